"""The GAN learner: two optimizers, n_dis D steps per G step, frozen sides, LR decay, EMA,
real-image preparation, and the spectral baselines on D (SR compensation, exact sn)."""
import math

import pytest
import torch
from fastai.callback.core import Callback
from torch import nn

from sttpfast.callbacks.compensation import SpectralCompensation, compensate
from sttpfast.callbacks.spectral import SingularValueLogger
from sttpfast.data import get_dls
from sttpfast.gan import GeneratorEMA, ema_update, gan_learner, make_ema_copy, to_gan_range
from sttpfast.gan.losses import hinge_d, hinge_g, ns_d, ns_g
from sttpfast.gan.spectral_norm import top_singular_pair
from sttpfast.models import create_model
from sttpfast.surgery import parameterize, parametrization_of

# Tiny networks: G makes 16 px digits directly (bottom 2, three up-blocks), D is 8 wide.
TINY = dict(g_kwargs=dict(widths=(8, 8, 8, 8), bottom_width=2, z_dim=16), d_kwargs=dict(widths=(8, 8, 8, 8)))


@pytest.fixture(scope="module")
def dls():
    return get_dls("digits", bs=32, augment=False, device="cpu")


def tiny_learner(dls, tmp_path, **kwargs):
    learn = gan_learner(dls, run_dir=tmp_path, **{**TINY, **kwargs})
    return learn


def quiet_fit(learn, steps):
    with learn.no_bar(), learn.no_logging():
        learn.fit(steps=steps)
    return learn


def params_of(module):
    return [p.detach().clone() for p in module.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def d_sigma_maxes(d: nn.Module) -> list[float]:
    """Exact sigma_max (float64) of the effective weight of every Conv / Linear of ``d``, as
    the last forward used it (eval mode: spectral norm reads its stored u, v, no iteration)."""
    was = d.training
    d.eval()
    with torch.no_grad():
        out = [float(torch.linalg.matrix_norm(m.weight.reshape(m.weight.shape[0], -1).double(), 2))
               for m in d.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    d.train(was)
    return out


# ----------------------------------------------------------------------------------------
# the loop
class PhaseLog(Callback):
    """Records, per iteration, the phase and optimizer of every step, and frozen-side checks."""

    order = 60

    def before_fit(self):
        self.iterations, self.violations, self.moved, self.frozen_grads = [], [], [], []

    def before_batch(self):
        if self.training:
            self.current = []

    def after_pred(self):
        if not self.training:
            return
        self.before = {"generator": params_of(self.learn.model.generator),
                       "discriminator": params_of(self.learn.model.discriminator)}

    def after_backward(self):
        other = self.learn.model.discriminator if self.learn.gan_phase == "generator" else self.learn.model.generator
        self.frozen_grads.append(all(p.grad is None or not p.grad.any() for p in other.parameters()))

    def before_step(self):
        self.current.append((self.learn.gan_phase, self.learn.opt))

    def after_step(self):
        phase = self.learn.gan_phase
        other = "discriminator" if phase == "generator" else "generator"
        now = {"generator": params_of(self.learn.model.generator),
               "discriminator": params_of(self.learn.model.discriminator)}
        if not same(self.before[other], now[other]):
            self.violations.append((len(self.iterations), phase))
        self.moved.append(not same(self.before[phase], now[phase]))

    def after_batch(self):
        if self.training:
            self.iterations.append(self.current)


def test_each_optimizer_holds_only_its_network(dls, tmp_path):
    learn = tiny_learner(dls, tmp_path, d_param="sttp-c", rank=4, lr_d=4e-4, betas_g=(0.5, 0.999))
    learn.create_opt()
    g_ids = {id(p) for p in learn.model.generator.parameters()}
    d_ids = {id(p) for p in learn.model.discriminator.parameters()}
    opt_g_ids = {id(p) for p, *_ in learn.opt_g.all_params()}
    opt_d_ids = {id(p) for p, *_ in learn.opt_d.all_params()}
    assert opt_g_ids == g_ids and opt_d_ids == d_ids and not g_ids & d_ids
    assert learn.opt is learn.opt_g
    hg, hd = learn.opt_g.hypers[0], learn.opt_d.hypers[0]
    assert (hg["lr"], hg["mom"], hg["sqr_mom"], hg["wd"], hg["eps"]) == (2e-4, 0.5, 0.999, 0.0, 1e-8)
    assert (hd["lr"], hd["mom"], hd["sqr_mom"], hd["wd"], hd["eps"]) == (4e-4, 0.0, 0.9, 0.0, 1e-8)


# With momentum (0.5) an optimizer shared by both networks would carry G's step into the D
# steps (fastai's GANLearner); -r on both sides puts the D-optimal penalty of the whole
# pair into every step's loss, which must not reach the frozen side.
@pytest.mark.parametrize("g_param, d_param, betas", [("svdp-c", "sn", (0.0, 0.9)),
                                                     ("svdp-r", "sttp-r", (0.5, 0.999))])
def test_one_g_step_then_n_dis_d_steps_and_the_frozen_side_never_moves(dls, tmp_path, g_param, d_param, betas):
    log = PhaseLog()
    learn = tiny_learner(dls, tmp_path, d_param=d_param, rank=4, g_param=g_param, n_dis=3, cbs=[log],
                         betas_g=betas, betas_d=betas)
    quiet_fit(learn, 4)
    assert learn.train_iter == 4 and learn.d_iter == 12
    assert len(log.iterations) == 4
    for steps in log.iterations:
        assert [phase for phase, _ in steps] == ["generator", "discriminator", "discriminator", "discriminator"]
        assert steps[0][1] is learn.opt_g and all(opt is learn.opt_d for _, opt in steps[1:])
    assert log.violations == []          # bit-exact: the other network's parameters never changed
    assert all(log.moved) and len(log.moved) == 16  # while the stepped one always did
    assert all(log.frozen_grads)         # and the frozen side never got a gradient
    assert learn.gan_phase is None and learn.opt is learn.opt_g


def test_short_fit_on_digits_is_finite_and_decays_both_rates_linearly(dls, tmp_path):
    class Rates(Callback):
        order = 60

        def before_fit(self):
            self.seen, self.losses = [], []

        def before_step(self):
            self.seen.append((self.learn.gan_phase, self.learn.opt.hypers[0]["lr"]))

        def after_batch(self):
            if self.training:
                self.losses.append((float(self.learn.loss_g), float(self.learn.loss_d)))

    rates = Rates()
    learn = tiny_learner(dls, tmp_path, d_param="sttp-c", rank=4, n_dis=2, lr_g=2e-4, lr_d=4e-4, cbs=[rates])
    quiet_fit(learn, 6)
    assert len(rates.losses) == 6 and all(math.isfinite(g) and math.isfinite(d) for g, d in rates.losses)
    assert all(math.isfinite(v) for v in learn.recorder.values[-1])  # train and valid loss
    expected = []
    for k in range(6):
        scale = max(0.0, 1.0 - k / 6)
        expected += [("generator", 2e-4 * scale), ("discriminator", 4e-4 * scale), ("discriminator", 4e-4 * scale)]
    assert rates.seen == expected


def test_constant_rates_and_the_non_saturating_loss(dls, tmp_path):
    learn = tiny_learner(dls, tmp_path, d_param="sn", n_dis=1, lr_decay="const", loss="ns")
    quiet_fit(learn, 2)
    assert learn.opt_g.hypers[0]["lr"] == 2e-4 and learn.opt_d.hypers[0]["lr"] == 2e-4
    assert learn.loss_func.name == "ns" and math.isfinite(float(learn.loss_d))


def test_losses_exact_values():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> 2.5/3; relu(1 + fake) = [0, 1, 2] -> 1
    assert float(hinge_d(real, fake)) == pytest.approx(2.5 / 3 + 1.0, rel=1e-7)
    assert float(hinge_g(fake)) == pytest.approx(1.0 / 3, rel=1e-6)
    sp = lambda t: math.log1p(math.exp(t))  # noqa: E731
    assert float(ns_d(real, fake)) == pytest.approx((sp(-2) + sp(-0.5) + sp(1)) / 3 + (sp(-2) + sp(0) + sp(1)) / 3, rel=1e-6)
    assert float(ns_g(fake)) == pytest.approx((sp(2) + sp(0) + sp(-1)) / 3, rel=1e-6)


# ----------------------------------------------------------------------------------------
# the networks
def test_g_and_d_are_parameterized_independently_and_gs_first_linear_never(dls, tmp_path):
    learn = tiny_learner(dls, tmp_path, g_param="svdp-c", d_param="sttp-c", g_rank=4, d_rank=2)
    g, d = learn.model.generator, learn.model.discriminator
    assert parametrization_of(g.l1) is None
    assert {r.param for r in learn.compression_g.rows} == {"svdp-c"}
    assert {r.param for r in learn.compression_d.rows} == {"sttp-c"}
    assert {r.rank for r in learn.compression_g.rows} == {4, 1}  # conv_out 8 -> 1 caps at 1
    assert {r.rank for r in learn.compression_d.rows} == {2, 1}  # the 1x1 shortcut from 1 channel, fc
    assert len(learn.compression_g.rows) == 10 and len(learn.compression_d.rows) == 11
    # each network has its own frame bank
    assert g.__dict__["_sttpfast_frame_bank"] is not d.__dict__["_sttpfast_frame_bank"]


def test_first_linear_of_any_generator_is_excluded(dls, tmp_path):
    class TinyG(nn.Module):
        z_dim = 4

        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 16 * 16)
            self.out = nn.Linear(16 * 16, 16 * 16)

        def forward(self, z):
            return torch.tanh(self.out(self.embed(z))).view(-1, 1, 16, 16)

    learn = gan_learner(dls, g=TinyG(), d_kwargs=TINY["d_kwargs"], g_param="svdp-c", rank=2, run_dir=tmp_path)
    assert parametrization_of(learn.model.generator.embed) is None
    assert parametrization_of(learn.model.generator.out) is not None


def test_real_images_are_mapped_to_minus_one_one_resized_and_dequantized():
    x8 = torch.arange(0, 256, dtype=torch.float32).view(1, 1, 16, 16)
    mean, std = (0.3,), (0.2,)
    x = (x8 / 255.0 - 0.3) / 0.2
    out = to_gan_range(x, mean, std)
    assert torch.allclose(out, x8 * (2.0 / 255.0) - 1.0, atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(0)
    noisy = to_gan_range(x, mean, std, noise=1.0 / 255.0, generator=g)
    delta = noisy - out
    assert float(delta.abs().max()) <= 1.0 / 255.0 + 1e-6 and float(delta.abs().max()) > 0.9 / 255.0
    up = to_gan_range(x, mean, std, size=32)
    assert up.shape == (1, 1, 32, 32) and float(up.min()) >= -1.0 - 1e-6 and float(up.max()) <= 1.0 + 1e-6


def test_learner_feeds_d_reals_at_gs_size(dls, tmp_path):
    class Seen(Callback):
        order = 60

        def after_pred(self):
            if self.learn.gan_phase == "discriminator":
                self.shape = tuple(self.learn.pred.shape)

    seen = Seen()
    # the default 32 px generator (tiny widths): 16 px digits are resized to 32
    learn = gan_learner(dls, g_kwargs=dict(widths=(8, 8, 8, 8), z_dim=16), d_kwargs=TINY["d_kwargs"],
                        d_param="sn", n_dis=1, cbs=[seen], run_dir=tmp_path)
    assert learn.image_size == 32
    quiet_fit(learn, 1)
    assert seen.shape == (64, 1)  # 32 reals + 32 fakes, one forward
    learn.training = True
    reals = learn.reals(dls.train.one_batch()[0])
    assert reals.shape == (32, 1, 32, 32)
    assert float(reals.min()) >= -1 - 1.5 / 255 and float(reals.max()) <= 1 + 1.5 / 255


def test_classification_callbacks_run_on_both_networks(dls, tmp_path):
    svl = SingularValueLogger(every=2, heatmap=True)
    learn = tiny_learner(dls, tmp_path, d_param="sttp-r", rank=4, n_dis=1, cbs=[svl])
    quiet_fit(learn, 2)
    layers = {row["layer"] for row in svl.history}
    assert any(name.startswith("generator.") for name in layers)
    assert any(name.startswith("discriminator.") for name in layers)
    assert (tmp_path / "singular_values.png").exists()
    assert learn.d_optimal_penalty.value is not None and math.isfinite(learn.d_optimal_penalty.value)


# ----------------------------------------------------------------------------------------
# EMA of G
def test_ema_copies_before_start_then_lerps_parameters_and_buffers(dls, tmp_path):
    class Trace(Callback):
        order = 1  # right after GeneratorEMA (0)

        def before_fit(self):
            self.rows = []

        def after_batch(self):
            if self.training:
                g, e = self.learn.model.generator, self.learn.model.generator_ema
                self.rows.append((params_of(g) + [b.clone() for b in g.buffers()],
                                   params_of(e) + [b.clone() for b in e.buffers()]))

    trace = Trace()
    learn = tiny_learner(dls, tmp_path, d_param="sn", n_dis=1, ema_decay=0.5, ema_start=2, cbs=[trace])
    quiet_fit(learn, 4)
    (g1, e1), (g2, e2), (g3, e3), (g4, e4) = trace.rows
    assert same(g1, e1)                    # step 1 < start: copy
    for g_now, e_prev, e_now in [(g2, e1, e2), (g3, e2, e3), (g4, e3, e4)]:
        for p, prev, cur in zip(g_now, e_prev, e_now):
            if cur.is_floating_point():
                assert torch.equal(cur, torch.lerp(prev, p, 0.5))
            else:
                assert torch.equal(cur, p)
    assert not same(g4, e4)
    assert all(not p.requires_grad for p in learn.model.generator_ema.parameters())


def test_ema_copy_of_a_parameterized_generator_is_its_own_model():
    g = create_model("sngan_g32", widths=(8, 8, 8, 8), z_dim=16)
    parameterize(g, "sttp-c", rank=4)
    ema = make_ema_copy(g).eval()
    g.eval()
    z = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(ema(z), g(z))
        ema_update(ema, g, 0.9)  # identical models: the average is the model
        assert torch.equal(ema(z), g(z))
    assert ema.__dict__["_sttpfast_frame_bank"] is not g.__dict__["_sttpfast_frame_bank"]


# ----------------------------------------------------------------------------------------
# bad input
@pytest.mark.parametrize("kwargs, message", [
    (dict(n_dis=0), "n_dis must be a positive integer, got 0"),
    (dict(n_dis=2.5), "n_dis must be a positive integer, got 2.5"),
    (dict(loss="wgan"), "unknown GAN loss 'wgan'; allowed: hinge, ns"),
    (dict(lr_decay="cosine"), "unknown lr_decay 'cosine'; allowed: linear, const"),
    (dict(lr_g=0.0), "lr_g must be a positive number, got 0.0"),
    (dict(betas_d=(0.0, 1.0)), "betas_d must lie in [0, 1), got (0.0, 1.0)"),
    (dict(ema_decay=1.0), "EMA decay must be in [0, 1), got 1.0"),
    (dict(d_param="sttp-c", sn_exact=True), "sn_exact needs d_param='sn', got d_param='sttp-c'"),
    (dict(d_param="sttp-x"), "unknown parameterization 'sttp-x'"),
    # a generator given as D crashed at the first D step, after the run folder was made
    (dict(d="sngan_g32", d_kwargs=TINY["g_kwargs"]),
     "the discriminator SNGANGenerator cannot score the generator's images, shape (2, 1, 16, 16): "),
])
def test_bad_arguments_give_one_clear_message(dls, tmp_path, kwargs, message):
    with pytest.raises(ValueError) as err:
        tiny_learner(dls, tmp_path, **kwargs)
    assert message in str(err.value)


def test_fit_needs_a_positive_step_count(dls, tmp_path):
    learn = tiny_learner(dls, tmp_path)
    with pytest.raises(ValueError, match=r"steps must be a positive integer, got 0"):
        learn.fit(steps=0)


# ----------------------------------------------------------------------------------------
# SR: dynamic spectral compensation
def test_compensation_rebuilds_w_from_the_running_max_spectrum():
    conv = nn.Conv2d(6, 5, 3)
    w0 = conv.weight.detach().double().reshape(5, -1)
    m1 = compensate(conv.weight.data, conv, None)
    s0 = torch.linalg.svdvals(w0)
    assert torch.allclose(m1, s0 / s0[0], rtol=0, atol=1e-12)
    u, _, vh = torch.linalg.svd(w0, full_matrices=False)
    assert torch.allclose(conv.weight.detach().double().reshape(5, -1), (u * m1) @ vh, rtol=0, atol=1e-6)
    # a flatter spectrum next: the running max keeps each normalized value's maximum
    with torch.no_grad():
        conv.weight.copy_(torch.randn(5, 6, 3, 3))
    w1 = conv.weight.detach().double().reshape(5, -1)
    m2 = compensate(conv.weight.data, conv, m1)
    s1 = torch.linalg.svdvals(w1)
    assert torch.equal(m2, torch.maximum(m1, s1 / s1[0]))
    assert float(torch.linalg.matrix_norm(conv.weight.detach().double().reshape(5, -1), 2)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("d_param", ["dense", "sn"])
def test_spectral_compensation_every_5_d_steps_in_a_gan_fit(dls, tmp_path, d_param):
    sr = SpectralCompensation(every=5)

    class Before(Callback):
        """Snapshots D's weights and the running maxima before the compensation (order 10)."""

        order = 9

        def after_step(self):
            if self.learn.gan_phase == "discriminator":
                self.weights = {n: compensation_weight(m).detach().double().reshape(m.weight.shape[0], -1).clone()
                                for n, m in sr.layers()}
                self.running = {k: v.clone() for k, v in sr.running_max.items()}
                self.count = sr.compensations

    before = Before()

    class After(Callback):
        order = 11

        def before_fit(self):
            self.d_steps, self.sigmas, self.errors, self.monotone = [], [], [], []

        def after_step(self):
            if self.learn.gan_phase != "discriminator" or sr.compensations == before.count:
                return
            self.d_steps.append(self.learn.d_iter + 1)
            for name, module in sr.layers():
                w_before = before.weights[name]
                u, s, vh = torch.linalg.svd(w_before, full_matrices=False)
                m = s / s[0]
                if name in before.running:
                    assert torch.all(sr.running_max[name] >= before.running[name])
                    self.monotone.append(name)
                    m = torch.maximum(before.running[name], m)
                assert torch.allclose(sr.running_max[name], m, rtol=0, atol=1e-12)
                w_after = compensation_weight(module).detach().double().reshape(module.weight.shape[0], -1)
                self.errors.append(float((w_after - (u * m) @ vh).abs().max()))
                self.sigmas.append(float(torch.linalg.matrix_norm(w_after, 2)))

    after = After()
    learn = tiny_learner(dls, tmp_path, d_param=d_param, n_dis=5, cbs=[sr, before, after])
    quiet_fit(learn, 3)
    assert after.d_steps == [5, 10, 15] and sr.compensations == 3
    assert len(after.sigmas) == 3 * 11 and max(after.sigmas) <= 1 + 1e-4 and min(after.sigmas) >= 1 - 1e-4
    assert max(after.errors) <= 1e-6  # W = U diag(m) V^T to float32 precision
    assert len(after.monotone) == 2 * 11


def compensation_weight(module):
    """The dense tensor SR rebuilds: the weight, or spectral norm's original."""
    if parametrization_of(module) is not None:
        return module.parametrizations.weight.original
    return module.weight


def test_spectral_compensation_refuses_low_rank_layers(dls, tmp_path):
    learn = tiny_learner(dls, tmp_path, d_param="sttp-c", rank=4, cbs=[SpectralCompensation()])
    with pytest.raises(ValueError, match=r"11 layer\(s\) have a low-rank parameterization: blocks.0.conv1 \(sttp-c\)"):
        quiet_fit(learn, 1)


def test_spectral_compensation_on_a_plain_model_counts_optimizer_steps():
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from torch.utils.data import DataLoader, TensorDataset

    ds = TensorDataset(torch.randn(64, 6), torch.randint(0, 3, (64,)))
    dls_ = DataLoaders(DataLoader(ds, batch_size=8), DataLoader(ds, batch_size=8))
    sr = SpectralCompensation(every=3)
    learn = Learner(dls_, nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)),
                    loss_func=nn.CrossEntropyLoss(), cbs=[sr])
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2)
    assert sr.compensations == 8 // 3 and set(sr.running_max) == {"0", "2"}


# ----------------------------------------------------------------------------------------
# SN: the exact sigma_max option
def _sn_sigmas_during_fit(dls, tmp_path, sn_exact, steps=4):
    class Probe(Callback):
        order = 60

        def before_fit(self):
            self.sigmas = []

        def after_pred(self):
            self.sigmas += d_sigma_maxes(self.learn.model.discriminator)

    probe = Probe()
    learn = tiny_learner(dls, tmp_path, d_param="sn", sn_exact=sn_exact, cbs=[probe])
    quiet_fit(learn, steps)
    return probe.sigmas


def test_exact_sn_keeps_every_d_layer_at_sigma_max_one(dls, tmp_path):
    sigmas = _sn_sigmas_during_fit(dls, tmp_path, sn_exact=True)
    # 4 G steps + 20 D steps + 12 validation batches, 11 layers each
    assert len(sigmas) == (4 + 20 + 12) * 11
    assert max(sigmas) <= 1 + 1e-4 and min(sigmas) >= 1 - 1e-4


def test_reference_sn_estimate_lets_sigma_max_exceed_one(dls, tmp_path):
    """PyTorch's one power iteration per forward (SNGAN's) underestimates sigma_max: the
    layers' norms exceed 1 by more than 1e-3 within 4 iterations even at width 8 (measured
    max 1.0053); this is why ``sn_exact`` exists."""
    sigmas = _sn_sigmas_during_fit(dls, tmp_path, sn_exact=False)
    assert min(sigmas) >= 1 - 1e-6  # the estimate is a lower bound of sigma_max
    assert max(sigmas) > 1 + 1e-3


def test_top_singular_pair_is_exact():
    for shape in [(5, 9), (9, 5), (1, 7)]:
        w = torch.randn(*shape, dtype=torch.float64)
        u, v = top_singular_pair(w)
        assert float(u @ w @ v) == pytest.approx(float(torch.linalg.svdvals(w)[0]), rel=1e-12)


def test_the_loader_is_sharded_when_the_learner_is_created_so_the_step_budget_holds(tmp_path, monkeypatch):
    # GANLearner.fit turns --steps into epochs from the loader's length; the loader was
    # sharded only in before_fit, so 2 processes ran epochs of half the planned length and a
    # `--steps 60` run stopped after 34 G steps, exit 0
    import sttpfast.gan.distributed as gan_distributed
    from sttpfast.gan.distributed import GANGradientSync

    monkeypatch.setattr(gan_distributed, "world", lambda: (0, 2))
    fresh = get_dls("digits", bs=32, augment=False, device="cpu")
    whole = len(fresh.train)
    learn = tiny_learner(fresh, tmp_path, n_dis=2, cbs=[GANGradientSync()])
    assert (fresh.train.rank, fresh.train.world_size) == (0, 2)
    assert len(fresh.train) == whole // 2
    assert learn.iters_per_epoch == len(fresh.train) // 2


def test_the_progress_bar_counts_the_epochs_g_steps(dls, tmp_path):
    # its total was the loader's batch count: with n_dis = 2 the bar stopped at half of it
    # at every epoch's end (and the last, shorter epoch lower still)
    class Totals(Callback):
        order = 61  # after ProgressCallback (60) updated the bar

        def before_fit(self):
            self.seen = []

        def before_train(self):
            self.seen.append(None)

        def after_batch(self):
            if self.training:  # the bar's total and the last value it showed (None once complete)
                bar = self.learn.progress.pbar
                self.seen[-1] = (bar.total, bar.last_v)

    learn = tiny_learner(dls, tmp_path, n_dis=2)
    per_epoch = len(dls.train) // 2
    totals = Totals()
    with learn.no_logging():
        learn.fit(steps=per_epoch + 3, cbs=[totals])
    # last_v None: the bar reached its total and closed (fastprogress resets it there)
    assert totals.seen == [(per_epoch, None), (3, None)]


def test_a_callback_the_user_gives_replaces_the_gan_default_of_its_type(dls, tmp_path):
    """As spectral_learner does: a user's DOptimalPenalty (or the class, which fastai
    instantiates) ran beside the default one, the penalty twice."""
    from sttpfast.callbacks.penalties import DOptimalPenalty

    mine = DOptimalPenalty(weight=0.5)
    learn = tiny_learner(dls, tmp_path, d_param="sttp-r", rank=2, cbs=[mine, SingularValueLogger])
    assert [cb for cb in learn.cbs if isinstance(cb, DOptimalPenalty)] == [mine]
    assert [type(cb) for cb in learn.cbs].count(SingularValueLogger) == 1


def test_gan_export_refuses_before_writing_anything(dls, tmp_path):
    """learn.export('g.pkl') raised "cannot pickle 'generator' object" and left a 592-byte file."""
    learn = tiny_learner(dls, tmp_path / "run", d_param="sttp-c", rank=2)
    with pytest.raises(ValueError, match=r"^learn.export\('.*g.pkl'\) cannot pickle a GAN learner; save a network with "
                                         r"sttpfast.save_parameterized\(learn.model.generator, 'generator.safetensors'\)"
                                         r".*sttpfast export RUN"):
        learn.export(tmp_path / "g.pkl")
    assert not (tmp_path / "g.pkl").exists() and not (tmp_path / "run" / "g.pkl").exists()
