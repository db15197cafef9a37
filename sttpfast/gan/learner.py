"""The GAN learner: a fastai ``Learner`` with two optimizers and ``n_dis`` D steps per G step.

    from sttpfast.gan import gan_learner
    dls = get_dls("digits", bs=64, augment=False)
    learn = gan_learner(dls, g="sngan_g32", d="sngan_d32", d_param="sttp-c", rank=64)
    learn.fit(steps=200)          # 200 generator steps, 1000 discriminator steps

Why not fastai's ``GANLearner``: it steps both networks with one optimizer (Adam's moments
keep moving the side that is meant to be frozen) and fails under DDP. Here each network
has its own optimizer holding only its own parameters, and the side that is not being
trained has ``requires_grad`` switched off, so it gets no gradient at all (not even from
a penalty callback that reads the whole model).

One fastai "batch" is one training iteration, as in torch_mimicry and Miyato et al.'s
SNGAN code: ``n_dis`` real batches are fetched; one generator step comes first (at
``i == 0``), then one discriminator step per real batch. G first is the reference order
(the published SNGAN numbers were made with it); at iteration ``k`` G therefore trains
against the D of iteration ``k - 1``, and the last thing an iteration does is train D.
``learn.train_iter`` counts iterations = G steps; ``learn.d_iter`` counts D steps.

Callback events. The classification callbacks use the standard events and run here
unchanged. Within ``before_batch`` / ``after_batch`` (once per iteration) each of the
``1 + n_dis`` steps fires ``after_pred``, ``after_loss``, ``before_backward``,
``after_backward``, ``before_step``, ``after_step`` with:

* ``learn.gan_phase``: ``"generator"`` or ``"discriminator"`` (None outside the steps);
* ``learn.opt``: the optimizer of that network (``learn.opt_g`` / ``learn.opt_d``);
* ``learn.pred``: D's scores (fakes for G's step; reals then fakes for D's step);
* ``learn.loss_grad`` / ``learn.loss``: that step's objective (penalties add to
  ``loss_grad``);
* ``learn.xb`` / ``learn.yb``: the real batch of the step (as the loader delivered it).

After the iteration ``learn.loss`` is the last discriminator loss (what the Recorder
smooths and prints as ``train_loss_d``), ``learn.loss_g`` / ``learn.loss_d`` the last of
each, and ``learn.opt`` is ``opt_g`` again. Validation computes D's loss on the
validation reals against fresh fakes (both networks in eval mode), without steps.

Frozen side, in full: parameters never change outside their own step (tested bit-exactly).
Buffers follow the reference loop: spectral norm's power-iteration vectors advance on
every training forward of D (also inside G's step), and G's BatchNorm running statistics
advance when G makes the fakes of D's steps (G stays in training mode, as in torch_mimicry).
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Sequence

import torch
from fastai.callback.core import Callback, CancelBatchException
from fastai.callback.progress import ProgressCallback  # noqa: F401  (progress bar, Learner.no_bar)
from fastai.learner import Learner
from fastai.optimizer import Adam
from torch import Tensor, nn

from sttpfast.callbacks._util import resize_progress_bar, with_defaults
from sttpfast.callbacks.guards import NaNGuard
from sttpfast.callbacks.penalties import DOptimalPenalty
from sttpfast.callbacks.spectral import SingularValueLogger
from sttpfast.gan.ema import GeneratorEMA, make_ema_copy
from sttpfast.gan.losses import GANLoss, gan_loss
from sttpfast.gan.reals import to_gan_range
from sttpfast.gan.spectral_norm import ExactSpectralNorm
from sttpfast.params import resolve_param
from sttpfast.params.registry import method
from sttpfast.surgery import parameterize

__all__ = ["GANPair", "GANLearner", "LinearLRDecay", "gan_learner", "GENERATOR", "DISCRIMINATOR", "LR_DECAYS"]

GENERATOR, DISCRIMINATOR = "generator", "discriminator"
LR_DECAYS = ("linear", "const")


class GANPair(nn.Module):
    """The two networks as one module: ``generator``, ``discriminator`` and, when an EMA of G
    is kept, ``generator_ema``. The learner's ``model``: callbacks that walk
    ``learn.model.named_modules()`` see both networks (layer names start with
    ``generator.`` / ``discriminator.``) and a checkpoint of it holds everything.

    ``forward(z (B, z_dim))`` returns ``generator(z)``: images ``(B, C, H, W)`` in ``[-1, 1]``.
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, generator_ema: nn.Module | None = None):
        super().__init__()
        self.generator, self.discriminator = generator, discriminator
        self.generator_ema = generator_ema

    def forward(self, z: Tensor) -> Tensor:
        return self.generator(z)


class LinearLRDecay(Callback):
    """Both learning rates decay linearly to 0 over ``total_steps`` G steps (the paper's):
    before iteration ``k`` (0-based), ``lr = lr_0 * (1 - k / total_steps)``, for G and D
    alike (each from its own ``lr_0``), so the D steps of an iteration share its rate."""

    order = 5  # after TrainEvalCallback

    def __init__(self, total_steps: int):
        self.total_steps = max(1, int(total_steps))

    def before_batch(self):
        if not self.training:
            return
        scale = max(0.0, 1.0 - self.learn.train_iter / self.total_steps)
        self.learn.opt_g.set_hyper("lr", self.learn.lr_g * scale)
        self.learn.opt_d.set_hyper("lr", self.learn.lr_d * scale)


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _resharded(*networks: nn.Module) -> None:
    """Reshard every FSDP2 unit of ``networks`` (no-op for plain networks). A root unit keeps
    its parameters whole after a forward (FSDP2's default), and a frozen-side forward
    (``no_grad``) has no backward to reshard them; ``module.parameters()`` would then hand
    :func:`_no_grad_for` those whole copies, whose ``requires_grad`` FSDP2 overwrites from the
    shards only at its next all-gather, so G's root parameters (``l1``, ``bn``, ``conv_out``)
    stayed frozen in G's step. Resharded, ``parameters()`` are the shards, and FSDP2 copies
    their ``requires_grad`` into the whole parameters at each all-gather."""
    from sttpfast.fsdp import fsdp_units

    for network in networks:
        for unit in fsdp_units(network):
            unit.reshard()


@contextlib.contextmanager
def _no_grad_for(params: Sequence[nn.Parameter]):
    """Switch ``requires_grad`` off for ``params`` (the frozen side) and back on afterwards."""
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _check_positive(name: str, value, integer: bool = False):
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value)
    if integer and not bad:
        bad = int(value) != value
    if bad:
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value) if integer else float(value)


def _check_betas(name: str, betas) -> tuple[float, float]:
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (beta1, beta2), got {betas!r}") from None
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"{name} must lie in [0, 1), got {betas!r}")
    return b1, b2


def _check_settings(n_dis, lr_g, lr_d, betas_g, betas_d, lr_decay, dequantize) -> tuple:
    """The loop's settings, checked (a ValueError names the first bad one)."""
    if lr_decay not in LR_DECAYS:
        raise ValueError(f"unknown lr_decay {lr_decay!r}; allowed: {', '.join(LR_DECAYS)}")
    if isinstance(dequantize, bool) or not isinstance(dequantize, (int, float)) or not 0.0 <= dequantize < 1.0:
        raise ValueError(f"dequantize must be a noise half-width in [0, 1), got {dequantize!r}")
    return (_check_positive("n_dis", n_dis, integer=True), _check_positive("lr_g", lr_g),
            _check_positive("lr_d", lr_d), _check_betas("betas_g", betas_g), _check_betas("betas_d", betas_d),
            lr_decay, float(dequantize))


class DiscriminatorLossColumns(Callback):
    """Names the Recorder's loss columns ``train_loss_d`` / ``valid_loss_d``: they are D's
    loss (``learn.loss`` after an iteration), which fastai's ``train_loss`` / ``valid_loss``
    did not say. Order 51: after the Recorder (50) names its columns, before the progress
    bar (60) prints them; the loggers' tags follow (``train/loss_d``, ``valid/loss_d``)."""

    order = 51

    def before_fit(self):
        recorder = getattr(self.learn, "recorder", None)
        if recorder is not None:
            renamed = {"train_loss": "train_loss_d", "valid_loss": "valid_loss_d"}
            recorder.metric_names = type(recorder.metric_names)(renamed.get(n, n) for n in recorder.metric_names)


class GANLearner(Learner):
    """A fastai ``Learner`` that trains ``model.generator`` and ``model.discriminator``
    adversarially (see the module docstring for the loop and the events).

    Args:
        dls: fastai DataLoaders of real images (labels are carried but unused).
        model: a :class:`GANPair`.
        loss: the objective (:func:`~sttpfast.gan.losses.gan_loss`).
        n_dis: D steps per G step.
        lr_g, lr_d, betas_g, betas_d: Adam for each network (no weight decay, eps 1e-8).
        lr_decay: ``linear`` (to 0 over the ``fit`` budget) or ``const``.
        image_size: side length of G's images; real images are resized to it (None: as
            delivered).
        dequantize: half-width of the uniform noise on real images in ``[-1, 1]`` units.
        seed: seeds the learner's own generator of latent codes and noise.
        iters_per_epoch: iterations per fastai epoch (default: one pass over the training
            loader, ``len(dls.train) // n_dis``, at least 1).
    """

    def export(self, fname="export.pkl", *args, **kwargs):
        """Refused before anything is written: a GAN learner does not pickle (its seeded
        ``torch.Generator`` s; parameterized layers' generated classes). Save the networks."""
        raise ValueError(
            f"learn.export({str(fname)!r}) cannot pickle a GAN learner; save a network with "
            "sttpfast.save_parameterized(learn.model.generator, 'generator.safetensors') (the discriminator and "
            "generator_ema alike; load with sttpfast.load_parameterized), or export a run's generator to ONNX "
            "with `sttpfast export RUN`")

    def __init__(self, dls, model: GANPair, loss: GANLoss, n_dis: int = 5, lr_g: float = 2e-4,
                 lr_d: float = 2e-4, betas_g=(0.0, 0.9), betas_d=(0.0, 0.9), lr_decay: str = "linear",
                 image_size: int | None = None, dequantize: float = 1.0 / 255.0, seed: int = 0,
                 iters_per_epoch: int | None = None, cbs=None, path=None, **learner_kwargs):
        settings = _check_settings(n_dis, lr_g, lr_d, betas_g, betas_d, lr_decay, dequantize)
        self.n_dis, self.lr_g, self.lr_d, self.betas_g, self.betas_d, self.lr_decay, self.dequantize = settings
        if iters_per_epoch is not None:
            iters_per_epoch = _check_positive("iters_per_epoch", iters_per_epoch, integer=True)
        self.image_size = image_size
        self.seed, self._iters_per_epoch = int(seed), iters_per_epoch
        self.opt_g = self.opt_d = None
        self.gan_phase, self.d_iter = None, 0
        self.loss_g = self.loss_d = None
        self._rng, self._valid_rng, self._reals = None, None, None
        self.reals_pass_rng, self.reals_drawn = None, 0
        self.shard = (0, 1)  # (rank, world): set by sttpfast.gan.distributed.GANGradientSync
        super().__init__(dls, model, loss_func=loss, lr=self.lr_g, cbs=[DiscriminatorLossColumns(), *(cbs or [])],
                         path=path, **learner_kwargs)

    # --- optimizers ------------------------------------------------------------------------
    def create_opt(self):
        """One Adam per network, each over that network's trainable parameters only."""
        def adam(params, lr, betas):
            if not params:
                raise ValueError("a GAN network has no trainable parameters")
            return Adam(params, lr=lr, mom=betas[0], sqr_mom=betas[1], eps=1e-8, wd=0.0)

        self.opt_g = adam(_trainable(self.model.generator), self.lr_g, self.betas_g)
        self.opt_d = adam(_trainable(self.model.discriminator), self.lr_d, self.betas_d)
        self.opt = self.opt_g

    # --- the step budget ---------------------------------------------------------------------
    @property
    def iters_per_epoch(self) -> int:
        if self._iters_per_epoch is not None:
            return self._iters_per_epoch
        return max(1, len(self.dls.train) // self.n_dis)

    def fit(self, steps: int, cbs=None, reset_opt: bool = False):
        """Train for ``steps`` generator steps (``steps * n_dis`` discriminator steps), in
        fastai epochs of :attr:`iters_per_epoch` iterations (the last one shorter), each
        followed by validation. With ``lr_decay="linear"`` both rates reach 0 at ``steps``."""
        steps = _check_positive("steps", steps, integer=True)
        if len(self.dls.train) == 0:
            raise ValueError("the training loader yields no batch (batch size larger than the data?)")
        self.total_steps, self.d_iter, self._reals = steps, 0, None
        extra = [LinearLRDecay(steps)] if self.lr_decay == "linear" else []
        # a resumed run continues in the epoch its checkpoint names: one that ended (and
        # validated) inside an epoch resumes in the next, whatever the new budget's epoch count
        n_epoch = max(math.ceil(steps / self.iters_per_epoch), int(getattr(self, "resume_epoch", 0) or 0) + 1)
        if reset_opt or not self.opt:
            self.create_opt()
        self.opt_d.set_hypers(lr=self.lr_d)  # fastai's fit sets opt (= opt_g) to lr_g
        super().fit(n_epoch, lr=self.lr_g, cbs=extra + list(cbs or []))
        return self

    # --- data --------------------------------------------------------------------------------
    def _next_real(self):
        """The next training batch; the loader restarts (a new shuffled pass) when exhausted."""
        for _ in range(2):
            if self._reals is None:
                dl = self.dls.train
                # where this pass starts, for an exact resume (see sttpfast.gan.checkpoint)
                self.reals_pass_rng = ({k: v.clone() for k, v in dl.rng_state().items()}
                                       if hasattr(dl, "rng_state") else None)
                self.reals_drawn = 0
                self._reals = iter(dl)
            try:
                batch = next(self._reals)
                self.reals_drawn += 1
                return batch
            except StopIteration:
                self._reals = None
        raise ValueError("the training loader yields no batch")

    def all_batches(self):
        if not self.training:
            self._valid_rng = None  # every validation draws the same codes, from its own stream
            return super().all_batches()
        # epochs end at multiples of iters_per_epoch, so a resumed run keeps the same epoch ends
        end = min((self.epoch + 1) * self.iters_per_epoch, self.total_steps)
        self.n_iter = max(0, end - self.train_iter)
        resize_progress_bar(self, self.n_iter)  # fastai sized it from the loader; an iteration takes n_dis batches
        for i in range(self.n_iter):
            self.one_batch(i, [self._next_real() for _ in range(self.n_dis)])

    def one_batch(self, i, b):
        if not self.training:
            return super().one_batch(i, b)
        self.iter = i
        self.real_batches = [self._set_device(batch) for batch in b]
        self._split(self.real_batches[0])
        self._with_events(self._do_one_batch, "batch", CancelBatchException)

    def generator_rng(self, device) -> torch.Generator:
        """The learner's random generator for latent codes and noise (seeded by ``seed``).
        Validation has its own (seeded by ``seed + 1`` at each validation), so that validating
        never moves the training stream: a resumed or multi-process run draws what an
        uninterrupted single process draws."""
        device = torch.device(device)
        if not getattr(self, "training", True):
            if self._valid_rng is None or self._valid_rng.device.type != device.type:
                self._valid_rng = torch.Generator(device=device).manual_seed(self.seed + 1)
            return self._valid_rng
        if self._rng is None or self._rng.device.type != device.type:
            self._rng = torch.Generator(device=device).manual_seed(self.seed)
        return self._rng

    def sample_z(self, n: int, device) -> Tensor:
        """Latent codes ``(n, z_dim)`` ~ N(0, I). With ``shard = (rank, world)`` (several
        processes, each ``n`` of a global batch) the codes of the whole batch are drawn and
        rank's rows kept, so together the processes use one process's codes."""
        z_dim = self.model.generator.z_dim
        rank, world = self.shard
        if not getattr(self, "training", True):
            rank, world = 0, 1  # each process validates on its own
        z = torch.randn(n * world, z_dim, device=device, generator=self.generator_rng(device))
        return z[rank * n:(rank + 1) * n]

    def reals(self, x: Tensor) -> Tensor:
        """A loader batch ``(B, C, H, W)`` -> reals in ``[-1, 1]`` at G's size (noise in training)."""
        dl = self.dls.train
        return to_gan_range(x, getattr(dl, "mean", None), getattr(dl, "std", None), self.image_size,
                            self.dequantize if self.training else 0.0, self.generator_rng(x.device), self.shard)

    # --- one iteration -------------------------------------------------------------------------
    def _do_one_batch(self):
        if not self.training:
            return self._validation_batch()
        try:
            self._generator_step()
            for batch in self.real_batches:
                self._discriminator_step(batch)
        finally:
            self.gan_phase, self.opt = None, self.opt_g
        self.loss = self.loss_d

    def _generator_step(self):
        self.gan_phase, self.opt = GENERATOR, self.opt_g
        g, d = self.model.generator, self.model.discriminator
        _resharded(g, d)
        with _no_grad_for(_trainable(d)):
            x = self.xb[0]
            fake = g(self.sample_z(x.shape[0], x.device))
            self.pred = d(fake)
            self("after_pred")
            self.loss_grad = self.loss_func.generator(self.pred)
            self.loss = self.loss_g = self.loss_grad.detach().clone()
            self("after_loss")
            self._do_grad_opt()

    def _discriminator_step(self, batch):
        self.gan_phase, self.opt = DISCRIMINATOR, self.opt_d
        self._split(batch)
        g, d = self.model.generator, self.model.discriminator
        _resharded(g, d)
        with _no_grad_for(_trainable(g)):
            real = self.reals(self.xb[0])
            with torch.no_grad():
                fake = g(self.sample_z(real.shape[0], real.device))
            # one forward of reals and fakes together: one weight build, one power iteration
            self.pred = d(torch.cat([real, fake]))
            self("after_pred")
            real_scores, fake_scores = self.pred.split(real.shape[0])
            self.loss_grad = self.loss_func.discriminator(real_scores, fake_scores)
            self.loss = self.loss_d = self.loss_grad.detach().clone()
            self("after_loss")
            self._do_grad_opt()
        self.d_iter += 1

    def _validation_batch(self):
        g, d = self.model.generator, self.model.discriminator
        real = self.reals(self.xb[0])
        fake = g(self.sample_z(real.shape[0], real.device))
        self.pred = d(torch.cat([real, fake]))
        self("after_pred")
        real_scores, fake_scores = self.pred.split(real.shape[0])
        self.loss_grad = self.loss_func.discriminator(real_scores, fake_scores)
        self.loss = self.loss_grad.clone()
        self("after_loss")


def _first_linear(model: nn.Module) -> str | None:
    return next((name for name, m in model.named_modules() if isinstance(m, nn.Linear)), None)


def _build(arch, in_chans: int | None, kwargs: dict | None) -> nn.Module:
    if isinstance(arch, nn.Module):
        return arch
    from sttpfast.models import create_model

    return create_model(arch, in_chans=in_chans, **(kwargs or {}))


def _rank_for(param: str, own: int | None, shared: int | None) -> int | None:
    """The rank to pass for ``param``: its own, else the shared one. Methods without a rank
    (``dense``, ``sn``) get only their own, so an explicit one is refused by ``parameterize``."""
    if method(param).rank_kind is None:
        return own
    return own if own is not None else shared


@torch.no_grad()
def _check_d_scores_g(generator: nn.Module, discriminator: nn.Module) -> None:
    """One forward of 2 latent codes through G then D (eval mode: no statistics move): D must
    give one score per image (a generator given as D failed only at the first D step)."""
    modes = [(m, m.training) for m in (generator, discriminator)]
    try:
        generator.eval(), discriminator.eval()
        device = next(generator.parameters(), torch.empty(0)).device  # a model given on its device
        images = generator(torch.zeros(2, generator.z_dim, device=device))
        try:
            scores = discriminator(images)
        except Exception as err:
            raise ValueError(f"the discriminator {type(discriminator).__name__} cannot score the generator's "
                             f"images, shape {tuple(images.shape)}: {err}") from None
        if not isinstance(scores, torch.Tensor) or scores.numel() != 2:
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"the discriminator {type(discriminator).__name__} gives {shape} for 2 images, "
                             "not one score per image")
    finally:
        for module, training in modes:
            module.train(training)


def gan_learner(
    dls,
    g: str | nn.Module = "sngan_g32",
    d: str | nn.Module = "sngan_d32",
    g_param: str = "dense",
    d_param: str = "sn",
    rank: int | None = None,
    g_rank: int | None = None,
    d_rank: int | None = None,
    loss: str = "hinge",
    n_dis: int = 5,
    lr_g: float = 2e-4,
    lr_d: float = 2e-4,
    betas_g=(0.0, 0.9),
    betas_d=(0.0, 0.9),
    lr_decay: str = "linear",
    ema_decay: float | None = None,
    ema_start: int = 0,
    dequantize: float = 1.0 / 255.0,
    sn_exact: bool = False,
    d_optimal: float = 1.0,
    sv_every: int = 100,
    g_kwargs: dict | None = None,
    d_kwargs: dict | None = None,
    seed: int = 0,
    cbs=None,
    run_dir: str | Path | None = None,
    init: str | None = None,
    **learner_kwargs,
) -> GANLearner:
    """A :class:`GANLearner` for generator ``g`` and discriminator ``d``, each parameterized
    on its own (each gets its own frame bank).

    Args:
        dls: the project's DataLoaders (``get_dls(name, augment=False)``: a GAN learns the
            data as they are; crops and flips would become part of what G imitates).
        g, d: registered model names (built with ``in_chans=dls.in_chans`` and ``g_kwargs`` /
            ``d_kwargs``, e.g. ``widths``) or models. G must have ``z_dim``; its output size
            is ``g.image_size`` when it has one, and real images are resized to it.
        g_param, d_param: parameterizations (``sttpfast.parameterize``); ``d_param="sn"`` is
            SNGAN. G's first Linear (z -> features) is never parameterized.
        rank: rank of both; ``g_rank`` / ``d_rank`` override it per network.
        loss: ``hinge`` (the paper's) or ``ns`` (non-saturating).
        n_dis: D steps per G step.
        lr_g, lr_d, betas_g, betas_d, lr_decay: Adam per network; ``linear`` decays to 0.
        ema_decay, ema_start: keep ``learn.model.generator_ema`` (:class:`GeneratorEMA`).
        dequantize: uniform noise half-width on reals in ``[-1, 1]`` (the paper's 1/255).
        sn_exact: divide D's ``sn`` layers by their exact ``sigma_max`` (:class:`ExactSpectralNorm`)
            instead of PyTorch's one-iteration estimate (the reference's, which lets it exceed 1).
        d_optimal: weight of the D-optimal penalty when a side is ``-r``.
        cbs: your callbacks; they run with the defaults (NaNGuard; singular-value logging for
            learned spectra; the D-optimal penalty for ``-r``), and one of a default's type (an
            instance or the class) replaces that default.
        init: the factors' init on both sides (None: each method's default, see
            :func:`sttpfast.parameterize`); ``"identity"`` when a checkpoint's tensors are loaded
            next (a resume), which skips the spectral init's fit.
    The surgery reports are ``learn.compression_g`` / ``learn.compression_d``.
    """
    # every argument is checked before a model is built or a given one is touched
    g_param, d_param = resolve_param(g_param), resolve_param(d_param)
    loss_obj = gan_loss(loss)
    _check_settings(n_dis, lr_g, lr_d, betas_g, betas_d, lr_decay, dequantize)
    if ema_decay is not None:
        GeneratorEMA(ema_decay, ema_start)  # validates before anything is built
    if sn_exact and d_param != "sn":
        raise ValueError(f"sn_exact needs d_param='sn', got d_param={d_param!r}")
    in_chans = getattr(dls, "in_chans", None)
    generator = _build(g, in_chans, g_kwargs)
    discriminator = _build(d, in_chans, d_kwargs)
    if not isinstance(getattr(generator, "z_dim", None), int):
        raise ValueError(f"the generator {type(generator).__name__} has no integer z_dim (latent size)")
    _check_d_scores_g(generator, discriminator)
    first = _first_linear(generator)
    report_g = parameterize(generator, g_param, rank=_rank_for(g_param, g_rank, rank),
                            exclude=[first] if first else None, init=init)
    report_d = parameterize(discriminator, d_param, rank=_rank_for(d_param, d_rank, rank), init=init)
    pair = GANPair(generator, discriminator,
                   make_ema_copy(generator) if ema_decay is not None else None)
    callbacks: list[Callback] = [NaNGuard()]
    if any(method(p).penalty == "d_optimal" for p in (g_param, d_param)) and d_optimal:
        callbacks.append(DOptimalPenalty(weight=d_optimal))
    if any(p[-2:] in ("-l", "-r") for p in (g_param, d_param)):
        callbacks.append(SingularValueLogger(every=sv_every))
    if sn_exact:
        callbacks.append(ExactSpectralNorm())
    if ema_decay is not None:
        callbacks.append(GeneratorEMA(ema_decay, ema_start))
    run_dir = Path(run_dir) if run_dir is not None else None
    path = run_dir if run_dir is not None else Path(".")
    learn = GANLearner(dls, pair, loss_obj, n_dis=n_dis, lr_g=lr_g, lr_d=lr_d, betas_g=betas_g,
                       betas_d=betas_d, lr_decay=lr_decay, image_size=getattr(generator, "image_size", None),
                       dequantize=dequantize, seed=seed, cbs=with_defaults(callbacks, list(cbs or [])), path=path,
                       model_dir=".", **learner_kwargs)
    learn.compression_g, learn.compression_d = report_g, report_d
    learn.g_param, learn.d_param, learn.run_dir = g_param, d_param, run_dir
    return learn
