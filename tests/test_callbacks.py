"""The callback library, each piece in a real (tiny) fastai fit on the bundled digits."""
import glob
import math
import os
from pathlib import Path

os.environ.setdefault("WANDB_SILENT", "true")

import pytest
import timm
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.metrics import accuracy
from torch import nn

import sttpfast
from sttpfast.callbacks import (
    DivergencePenalty,
    DOptimalPenalty,
    FrobeniusDecay,
    NaNGuard,
    OrthogonalityMonitor,
    SingularValueLogger,
    SpectralNormBound,
    TensorBoardLogger,
    WandbLogger,
    is_main_process,
    loggers,
    run_dir,
    spectral_layers,
    unwrap_model,
)
from sttpfast.data import get_dls
from sttpfast.params.base import MatrixView
from sttpfast.params.chain import SpectralChain
from sttpfast.penalties import d_optimal_penalty, frobenius_decay_penalty
from sttpfast.surgery import factors_of, parameterized_layers
from wandb_history import read_wandb_history

STEPS_PER_EPOCH = 4  # 256 training images, bs 64


# ---------------------------------------------------------------------------------------
# helpers
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for these tiny models: as fast as two on a quiet machine, and
    about 5x faster when another process shares the 2 cores (OpenMP/MKL barrier waits of the
    many small SVDs stall whenever one of the two threads is descheduled)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dls():
    return get_dls("digits", bs=64, subset=256)


def small_net(n_classes=10):
    """A tiny conv net with a ConvTranspose2d, (B, 1, 16, 16) -> (B, n_classes)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(8, 12, 3, padding=1), nn.ReLU(),
        nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, n_classes))


def resnet(param="dense", rank=8, **kwargs):
    model = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1)
    if param != "dense":
        sttpfast.parameterize(model, param, rank=rank, **kwargs)
    return model


def learner(dls, model, tmp_path, cbs=(), metrics=accuracy, **kwargs):
    return Learner(dls, model, loss_func=nn.CrossEntropyLoss(), metrics=metrics, path=tmp_path,
                   cbs=list(cbs), **kwargs)


def matrix(module):
    return MatrixView(tuple(module.weight.shape), isinstance(module, nn.ConvTranspose2d)).to_matrix(module.weight)


def weight_matrices(model):
    """Every Conv / ConvTranspose / Linear weight (parametrized or not) as its matrix."""
    return {name: matrix(m) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))}


class ScalarSink(Callback):
    """A minimal logger: records what log_scalars / log_image receive."""

    order = 70

    def __init__(self):
        super().__init__()
        self.scalars, self.images = [], []

    def log_scalars(self, scalars, step):
        self.scalars += [(step, k, v) for k, v in scalars.items()]

    def log_image(self, tag, fig_or_path, step):
        self.images.append((step, tag, fig_or_path))

    def values(self, tag):
        return [(s, v) for s, k, v in self.scalars if k == tag]


# ---------------------------------------------------------------------------------------
# helpers of _util
def test_util_helpers(dls, tmp_path):
    inner = nn.Linear(2, 2)

    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert unwrap_model(Wrapper(Wrapper(inner))) is inner and unwrap_model(inner) is inner
    assert is_main_process()
    sink = ScalarSink()
    learn = learner(dls, small_net(), tmp_path / "p", cbs=[sink, NaNGuard()])
    assert run_dir(learn) == tmp_path / "p" and (tmp_path / "p").is_dir()
    learn.run_dir = tmp_path / "run"
    assert run_dir(learn) == tmp_path / "run" and (tmp_path / "run").is_dir()
    assert loggers(learn) == [sink]
    # dense layers: exact svdvals; an STTP layer: its Sigma, equal to the weight's svdvals
    model = resnet("sttp-l", rank=4)
    with torch.no_grad():  # move the spectra away from the identity init
        for _, m, p in parameterized_layers(model):
            factors_of(m)[0].uniform_(0.2, 1.0)
    model.fc = nn.Linear(64, 10)  # a dense layer
    layers = list(spectral_layers(model))
    assert {n for n, *_ in layers} == set(weight_matrices(model))
    for name, m, p, fn in layers:
        exact = torch.linalg.svdvals(matrix(m).detach())[: fn().numel()]
        assert torch.allclose(fn(), exact, atol=1e-4), name
        assert (p is None) == (name == "fc")


# ---------------------------------------------------------------------------------------
# events
ALL_EVENTS = ["before_fit", "before_epoch", "before_train", "before_batch", "after_pred", "after_loss",
              "before_backward", "after_backward", "after_step", "after_batch", "after_train",
              "before_validate", "after_validate", "after_epoch", "after_fit"]


def test_user_callback_sees_every_standard_event(dls, tmp_path):
    class Spy(Callback):
        def __init__(self):
            super().__init__()
            self.seen = []

    spy = Spy()
    for event in ALL_EVENTS:
        setattr(spy, event, lambda e=event: spy.seen.append(e))
    ours = [SpectralNormBound(1.0), SingularValueLogger(every=2), OrthogonalityMonitor(every=2), DOptimalPenalty(),
            FrobeniusDecay(), NaNGuard(), TensorBoardLogger(), WandbLogger(mode="disabled")]
    learn = learner(dls, resnet("sttp-r", rank=4), tmp_path, cbs=[spy, *ours])
    learn.fit(1, 0.01)
    assert set(spy.seen) == set(ALL_EVENTS)
    assert spy.seen.count("after_step") == STEPS_PER_EPOCH and spy.seen[0] == "before_fit"
    assert spy.seen[-1] == "after_fit"


# ---------------------------------------------------------------------------------------
# loggers
def test_tensorboard_logger_writes_losses_metrics_and_images(dls, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    learn = learner(dls, small_net(), tmp_path, cbs=[TensorBoardLogger(), SingularValueLogger(every=2)])
    learn.fit(2, 0.01)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ["train/loss", "train/smooth_loss", "train/lr", "valid/loss", "valid/accuracy",
                "train/epoch_loss", "epoch", "sv/0/sigma_max", "sv/2/stable_rank", "sv/8/sigma_max"]:
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert all(abs(e.value - 0.01) < 1e-9 for e in acc.Scalars("train/lr"))
    valid = acc.Scalars("valid/loss")
    assert [e.step for e in valid] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    names = list(learn.recorder.metric_names[1:])
    for epoch, row in enumerate(learn.recorder.values):
        assert valid[epoch].value == pytest.approx(row[names.index("valid_loss")], rel=1e-6)
        assert acc.Scalars("valid/accuracy")[epoch].value == pytest.approx(row[names.index("accuracy")], rel=1e-6)
    assert "singular_values" in acc.Tags()["images"]
    assert learn.tensor_board_logger.writer is None  # closed


def test_tensorboard_logger_without_metrics_and_custom_dir(dls, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    learn = learner(dls, small_net(), tmp_path, metrics=[], cbs=[TensorBoardLogger(tmp_path / "elsewhere", every=2)])
    learn.fit(1, 0.01)
    acc = EventAccumulator(str(tmp_path / "elsewhere"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]
    assert "valid/loss" in acc.Tags()["scalars"] and not (tmp_path / "tb").exists()


def test_loggers_continue_the_step_count_over_several_fits_of_one_learner(dls, tmp_path, monkeypatch):
    """fastai counts steps from 0 in every fit: two fits (fine_tune, a second fit) logged steps
    1..4 twice, overlapping curves in TensorBoard and a second W&B run (its id overwriting
    the first's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    learn = learner(dls, small_net(), tmp_path, cbs=[TensorBoardLogger(), WandbLogger(), SingularValueLogger(every=2)])
    learn.fit(1, 0.01)
    learn.fit(1, 0.01)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert [e.step for e in acc.Scalars("valid/loss")] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert [e.step for e in acc.Scalars("sv/0/sigma_max")] == list(range(2, 2 * STEPS_PER_EPOCH + 1, 2))
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len({Path(r).name for r in runs}) == 1  # one W&B run, continued
    steps = sorted(int(r["_step"]) for f in runs for r in read_wandb_history(f) if "train/loss" in r)
    assert steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))


def test_loggers_log_the_last_step_of_a_step_budget(dls, tmp_path):
    """With every=10 (the CLI's default), a 3-step run logged no step scalar and a 25-step run
    ended at step 20: the budget's last step is logged too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sttpfast.learner import fit

    for steps, every, logged in ((3, 10, [3]), (6, 4, [4, 6])):
        learn = learner(dls, small_net(), tmp_path / str(steps), cbs=[TensorBoardLogger(every=every)])
        fit(learn, steps=steps, lr=0.01)
        acc = EventAccumulator(str(tmp_path / str(steps) / "tb"), size_guidance={"scalars": 0})
        acc.Reload()
        assert [e.step for e in acc.Scalars("train/loss")] == logged


def test_tensorboard_logger_with_a_folder_it_cannot_make_is_one_clear_error(dls, tmp_path):
    """TensorBoardLogger('/proc/nope') raised pathlib's FileNotFoundError from before_fit."""
    (tmp_path / "file").write_text("")
    learn = learner(dls, small_net(), tmp_path, cbs=[TensorBoardLogger(tmp_path / "file" / "tb")])
    with pytest.raises(ValueError, match=r"TensorBoardLogger cannot make its folder .*file/tb \(.*\)$"):
        learn.fit(1, 0.01)


def test_wandb_logger_offline(dls, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(config={"experiment": "test"})
    learn = learner(dls, small_net(), tmp_path, cbs=[logger, SingularValueLogger(every=2)])
    learn.fit(1, 0.01)
    assert logger.wandb_run is None  # finished
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    rows = read_wandb_history(runs[0])
    keys = set().union(*rows)
    for key in ["train/loss", "train/lr", "valid/loss", "valid/accuracy", "sv/0/sigma_max", "singular_values/path"]:
        assert key in keys, key
    valid = [float(r["valid/loss"]) for r in rows if "valid/loss" in r]
    assert valid == [pytest.approx(learn.recorder.values[-1][1], rel=1e-6)]
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "images" / "*.png"))


def test_wandb_logger_without_an_api_key_logs_offline(dls, tmp_path, monkeypatch, capsys):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no wandb settings
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / "no-netrc"))
    import wandb

    wandb.teardown()  # wandb reads its environment once per process: forget the earlier tests'
    logger = WandbLogger()
    learn = learner(dls, small_net(), tmp_path, cbs=[logger])
    learn.fit(1, 0.01)
    said = [line for line in capsys.readouterr().out.splitlines() if "no API key" in line]
    assert said == [f"wandb: no API key configured, logging offline to {tmp_path}/wandb "
                    "(upload later with `wandb sync`, or `wandb login` before the next run)"]
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1 and logger.wandb_run is None


def test_wandb_logger_disabled(dls, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = WandbLogger()
    learn = learner(dls, small_net(), tmp_path, cbs=[logger, SingularValueLogger(every=2)])
    learn.fit(1, 0.01)
    assert logger.wandb_run is None and len(learn.recorder.values) == 1
    assert not glob.glob(str(tmp_path / "wandb" / "offline-run-*"))


# ---------------------------------------------------------------------------------------
# spectral callbacks
class BoundChecker(Callback):
    """After every step: sigma_max of every matricized weight <= c (exact svdvals)."""

    order = SpectralNormBound.order + 1

    def __init__(self, c):
        super().__init__()
        self.c, self.steps, self.top = c, 0, 0.0

    @torch.no_grad()
    def after_step(self):
        sigmas = {n: float(torch.linalg.svdvals(w)[0]) for n, w in weight_matrices(self.learn.model).items()}
        bad = {n: s for n, s in sigmas.items() if s > self.c + 1e-4}
        assert not bad, f"step {self.learn.train_iter}: {bad}"
        self.steps, self.top = self.steps + 1, max(sigmas.values())


@pytest.mark.parametrize("arch,param,c", [("resnet", "dense", 0.5), ("small", "dense", 0.5),
                                          ("resnet", "lowrank", 0.5), ("resnet", "sttp-l", 1.0)])
def test_spectral_norm_bound_holds_after_every_step(dls, tmp_path, arch, param, c):
    model = resnet(param, rank=4) if arch == "resnet" else small_net()
    with torch.no_grad():
        assert max(float(torch.linalg.svdvals(w)[0]) for w in weight_matrices(model).values()) > c
    checker = BoundChecker(c)
    learn = learner(dls, model, tmp_path, cbs=[SpectralNormBound(c), checker])
    learn.fit(1, 0.01)
    assert checker.steps == STEPS_PER_EPOCH
    assert checker.top == pytest.approx(c, abs=1e-4)  # the projection was active
    with torch.no_grad():  # and it still holds after the fit (validation does not change it)
        assert max(float(torch.linalg.svdvals(w)[0]) for w in weight_matrices(model).values()) <= c + 1e-4


def test_spectral_norm_bound_refuses_c_below_one_for_chains(dls, tmp_path):
    learn = learner(dls, resnet("sttp-c", rank=4), tmp_path, cbs=[SpectralNormBound(0.5)])
    with pytest.raises(ValueError, match="max\\|s\\| = 1"):
        learn.fit(1, 0.01)


def test_singular_value_logger(dls, tmp_path):
    sink, svl = ScalarSink(), SingularValueLogger(every=1, top_k=5)
    model = resnet("lowrank", rank=4)
    learn = learner(dls, model, tmp_path, cbs=[svl, sink])
    learn.fit(1, 0.01)
    layers = list(weight_matrices(model))
    assert {r["step"] for r in svl.history} == set(range(1, STEPS_PER_EPOCH + 1))
    assert len(svl.history) == STEPS_PER_EPOCH * len(layers)
    # the last step's rows are the spectra of the final weights
    last = {r["layer"]: r for r in svl.history if r["step"] == STEPS_PER_EPOCH}
    with torch.no_grad():
        for name, w in weight_matrices(model).items():
            s = torch.linalg.svdvals(w)
            assert last[name]["sigma_max"] == pytest.approx(float(s[0]), rel=1e-4)
            assert last[name]["stable_rank"] == pytest.approx(float((s ** 2).sum() / s[0] ** 2), rel=1e-3)
            assert len(last[name]["values"]) == 4  # rank 4 < top_k 5
            logged = sink.values(f"sv/{name}/sigma_max")
            assert [st for st, _ in logged] == list(range(1, STEPS_PER_EPOCH + 1))
            assert logged[-1][1] == pytest.approx(last[name]["sigma_max"])
    png = tmp_path / "singular_values.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).ndim == 3
    assert [tag for _, tag, _ in sink.images] == ["singular_values"]  # after_fit: same step, not redrawn


def test_orthogonality_monitor(dls, tmp_path):
    sink, mon = ScalarSink(), OrthogonalityMonitor(every=2)
    model = resnet("sttp-l", rank=8)
    learn = learner(dls, model, tmp_path, cbs=[mon, sink])
    learn.fit(1, 0.05)
    chains = [n for n, _, p in parameterized_layers(model) if isinstance(p, SpectralChain)]
    assert set(mon.errors) == set(chains) and len(chains) == 22
    assert 0 < mon.max_error < 1e-4
    assert [s for s, _ in sink.values(f"ortho/{chains[3]}")] == [2, 4]


# ---------------------------------------------------------------------------------------
# penalties
class LossSpy(Callback):
    """At after_loss (after the penalties, order 5): records ``loss_grad - loss`` next to
    what ``fn(learn)`` says it should be, and checks that ``learn.loss`` is the task loss."""

    order = 6

    def __init__(self, fn):
        super().__init__()
        self.fn, self.rows = fn, []

    def after_loss(self):
        if self.training:
            learn = self.learn
            loss, loss_grad = learn.loss.detach(), learn.loss_grad.detach()
            task = learn.loss_func(learn.pred, *learn.yb).detach()
            assert float(loss) == pytest.approx(float(task), rel=1e-6)  # the logs see the task loss
            self.rows.append((float(loss_grad - loss), float(self.fn(learn))))


def test_d_optimal_penalty_adds_to_loss_grad_and_shrinks(dls, tmp_path):
    model = resnet("sttp-r", rank=8, init="spectral")  # a non-flat spectrum: penalty > 0
    sink = ScalarSink()
    spy = LossSpy(lambda learn: 2.0 * d_optimal_penalty(learn.model).detach())
    learn = learner(dls, model, tmp_path, cbs=[DOptimalPenalty(weight=2.0, log_every=1), spy, sink])
    learn.fit(2, 0.01)
    assert len(spy.rows) == 2 * STEPS_PER_EPOCH
    for extra, expected in spy.rows:
        assert expected > 0 and extra == pytest.approx(expected, abs=1e-5)
    logged = [v for _, v in sink.values("penalty/d_optimal")]
    assert len(logged) == 2 * STEPS_PER_EPOCH and logged[-1] < 0.8 * logged[0]  # spectra move towards 1
    assert logged == pytest.approx([expected / 2.0 for _, expected in spy.rows], rel=1e-5)


def test_d_optimal_penalty_is_a_noop_without_learned_spectra(dls, tmp_path):
    spy = LossSpy(lambda learn: 0.0)
    learn = learner(dls, resnet("sttp-l", rank=4), tmp_path, cbs=[DOptimalPenalty(), spy])  # -L: not penalized
    learn.fit(1, 0.01)
    assert all(extra == 0 for extra, _ in spy.rows) and len(spy.rows) == STEPS_PER_EPOCH
    spy = LossSpy(lambda learn: 0.0)
    learner(dls, small_net(), tmp_path, cbs=[DOptimalPenalty(only_penalized=False), spy]).fit(1, 0.01)
    assert all(extra == 0 for extra, _ in spy.rows)


class GradSnap(Callback):
    """Clones the low-rank factors' gradients at after_backward."""

    def __init__(self, order):
        super().__init__()
        self.order, self.grads = order, []

    def after_backward(self):
        model = unwrap_model(self.learn.model)
        self.grads.append([t.grad.clone() for _, m, _ in parameterized_layers(model) for t in factors_of(m)])


def test_frobenius_decay_gradient_matches_autograd(dls, tmp_path):
    wd = 0.05
    model = resnet("lowrank", rank=4, exclude=["fc"])  # fc stays dense
    before, after = GradSnap(order=4), GradSnap(order=6)  # around FrobeniusDecay (order 5)

    class Expected(Callback):
        order = 7

        def __init__(self):
            super().__init__()
            self.grads = []

        def after_backward(self):
            factors = [t for _, m, _ in parameterized_layers(model) for t in factors_of(m)]
            with torch.enable_grad():
                self.grads.append(torch.autograd.grad(wd * frobenius_decay_penalty(model), factors))

    expected = Expected()
    learn = learner(dls, model, tmp_path, cbs=[FrobeniusDecay(wd), before, after, expected])
    learn.fit(1, 0.01)
    assert len(expected.grads) == STEPS_PER_EPOCH
    for g0, g1, ge in zip(before.grads, after.grads, expected.grads):
        for a, b, e in zip(g0, g1, ge):
            assert e.abs().max() > 1e-4  # a real term
            torch.testing.assert_close(b - a, e, atol=1e-6, rtol=0)
    # no ordinary weight decay on the factors, but still on the dense weight
    assert all(learn.opt.state[t]["do_wd"] is False for _, m, _ in parameterized_layers(model) for t in factors_of(m))
    assert learn.opt.state[model.fc.weight].get("do_wd", True) is True


def test_divergence_penalty_formula_and_pull_towards_teacher(dls, tmp_path):
    torch.manual_seed(1)
    teacher = small_net()
    with torch.no_grad():  # confident logits: a teacher worth imitating even at T = 4
        teacher[-1].weight.mul_(50)
        teacher[-1].bias.mul_(50)
    x_valid = torch.cat([xb for xb, _ in dls.valid])

    def kl_to_teacher(student):
        student.eval()
        with torch.no_grad():
            p = F.softmax(teacher(x_valid) / 4, -1)
            return float((p * (p.log() - F.log_softmax(student(x_valid) / 4, -1))).sum(-1).mean())

    def formula(learn):  # weight * T^2 * KL(p_teacher || p_student), written out
        with torch.no_grad():
            p = F.softmax(teacher(*learn.xb) / 4, -1)
            q = F.log_softmax(learn.pred / 4, -1)
            return 3.0 * 16 * (p * (p.log() - q)).sum(-1).mean()

    results = {}
    for weight in (0.0, 3.0):
        torch.manual_seed(0)
        student = small_net()
        start = kl_to_teacher(student)
        spy = LossSpy(formula)
        cbs = [DivergencePenalty(teacher, weight=weight), spy] if weight else []
        learner(dls, student, tmp_path, cbs=cbs).fit(3, 0.01)
        results[weight] = kl_to_teacher(student)
        if weight:
            for extra, expected in spy.rows:
                assert extra == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert results[3.0] < 0.5 * start and results[3.0] < 0.5 * results[0.0]


# ---------------------------------------------------------------------------------------
# guards
def test_nan_guard_stops_before_the_bad_step(dls, tmp_path, capsys):
    class InjectNaN(Callback):
        order = 0  # before NaNGuard (45)

        def __init__(self):
            super().__init__()
            self.steps, self.snapshot = 0, None

        def after_loss(self):
            if self.training and self.learn.train_iter == 3:
                self.learn.loss_grad = self.learn.loss_grad * float("nan")
                self.learn.loss = torch.tensor(float("nan"))

        def after_step(self):
            self.steps += 1
            if self.learn.train_iter == 2:
                self.snapshot = {k: v.clone() for k, v in self.learn.model.state_dict().items()}

    inject, sink = InjectNaN(), ScalarSink()
    wandb_logger = WandbLogger(mode="disabled")
    learn = learner(dls, small_net(), tmp_path, cbs=[inject, NaNGuard(), sink, TensorBoardLogger(), wandb_logger])
    learn.fit(3, 0.01)
    assert learn.nan_step == 3 and inject.steps == 3
    state = learn.model.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert all(torch.equal(state[k], inject.snapshot[k]) for k in state)
    assert len(learn.recorder.values) == 0  # no epoch finished
    assert "NaNGuard: non-finite loss at step 3" in capsys.readouterr().out
    assert sink.values("nan_step") == [(3, 3.0)]
    assert learn.tensor_board_logger.writer is None and wandb_logger.wandb_run is None  # loggers closed


def test_nan_guard_leaves_a_healthy_run_alone(dls, tmp_path):
    learn = learner(dls, small_net(), tmp_path, cbs=[NaNGuard()])
    learn.fit(1, 0.01)
    assert getattr(learn, "nan_step", None) is None and math.isfinite(learn.recorder.values[-1][1])


def test_wandb_logger_resumed_run_continues_the_same_wandb_run_without_repeating_steps(tmp_path, monkeypatch):
    from sttpfast.config import build_config
    from sttpfast.run import run_training

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg, _ = build_config(overrides=[
        "data.name=digits", "data.bs=64", "data.subset=128", "param.name=sttp-r", "param.rank=2", "optim.steps=3",
        "log.logger=wandb", "log.every=1", "log.progress=false", f"train.out={tmp_path}", "train.name=w",
        "model.arch=wrn16_4", "model.kwargs.depth=10", "model.kwargs.width=1"])
    run = tmp_path / "w"
    run_training(cfg, echo=lambda *a: None)
    run_id = (run / "wandb-run-id").read_text().strip()
    run_training(resume=run, steps=5, echo=lambda *a: None)  # the budget raised: steps 4 and 5 continue it
    assert (run / "wandb-run-id").read_text() == f"{run_id}\n"
    files = sorted(glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert [os.path.basename(f) for f in files] == [f"run-{run_id}.wandb"] * 2  # both sessions: one W&B run
    steps = [sorted({int(r["_step"]) for r in read_wandb_history(f) if "train/loss" in r}) for f in files]
    # folder names need not sort in session order (same-second timestamps): compare as a set of sessions
    assert sorted(steps) == [[1, 2, 3], [4, 5]]


@pytest.mark.parametrize("make,message", [
    (lambda: SpectralNormBound(every=1.5), "every must be a positive whole number of steps, got 1.5"),
    (lambda: SpectralNormBound("1"), "c must be a positive finite bound on sigma_max, got '1'"),
    (lambda: SpectralNormBound(float("nan")), "c must be a positive finite bound on sigma_max, got nan"),
    (lambda: SingularValueLogger(every=None), "every must be a positive whole number of steps, got None"),
    (lambda: SingularValueLogger(top_k=0), "top_k must be a positive whole number, got 0"),
    (lambda: DOptimalPenalty(weight=-1), "weight must be a finite number >= 0, got -1"),
    (lambda: DOptimalPenalty(log_every=0), "log_every must be a positive whole number of steps, got 0"),
    (lambda: FrobeniusDecay(wd=float("nan")), "wd must be a finite number >= 0, got nan"),
    (lambda: FrobeniusDecay(wd="1e-4"), "wd must be a finite number >= 0, got '1e-4'"),
])
def test_bad_callback_arguments_are_one_clear_error(make, message):
    with pytest.raises(ValueError) as err:
        make()
    assert str(err.value) == message
