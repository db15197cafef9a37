"""The classification Learner factory and its training-schedule callbacks.

    dls = get_dls("fashion_mnist", bs=128)
    learn = spectral_learner(dls, "wrn16_4", param="sttp-r", rank=16, cbs=[MyCallback()])
    fit(learn, epochs=5, lr=0.1, schedule="linear")     # or learn.fit_one_cycle(5, 0.1)

Surgery happens before the optimizer exists. The default callbacks follow the
parameterization: a learned spectrum (-l / -r) gets singular-value logging, -r also
the D-optimal penalty, ``lowrank`` gets Frobenius decay in place of weight decay.
"""
from __future__ import annotations

import math
from pathlib import Path

from fastai.callback.core import Callback, CancelTrainException
from fastai.callback.schedule import SchedCos, SchedLin, combined_cos
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy, top_k_accuracy
from fastai.optimizer import SGD, Adam
from torch import nn

from sttpfast.callbacks.guards import NaNGuard
from sttpfast.callbacks.penalties import DOptimalPenalty, FrobeniusDecay
from sttpfast.callbacks.spectral import SingularValueLogger, SpectralNormBound
from sttpfast.params import resolve_param
from sttpfast.surgery import parameterize

__all__ = ["spectral_learner", "fit", "LRSchedule", "StepBudget", "top5_accuracy", "SCHEDULES"]

SCHEDULES = ("one_cycle", "linear", "cosine", "const")


def top5_accuracy(inp, targ):
    """Top-5 accuracy (fastai metric)."""
    return top_k_accuracy(inp, targ, k=5)


class LRSchedule(Callback):
    """Sets the learning rate (and momentum, for one-cycle) from the global step.

    ``pos = train_iter / total_steps``, so a resumed run continues the schedule exactly
    and ``--steps`` budgets that end mid-epoch are honoured. Schedules: ``one_cycle``
    (fastai's: cosine warm-up for 25%, cosine decay to lr/1e5, momentum 0.95-0.85-0.95),
    ``linear`` (the paper's: linear decay to 0), ``cosine`` (to 0), ``const``."""

    order = 5  # after TrainEvalCallback has counted the step

    def __init__(self, lr_max: float, total_steps: int, kind: str = "one_cycle"):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}; allowed: {', '.join(SCHEDULES)}")
        self.lr_max, self.total_steps, self.kind = lr_max, max(1, total_steps), kind
        self.mom = None
        if kind == "one_cycle":
            self.lr = combined_cos(0.25, lr_max / 25.0, lr_max, lr_max / 25e4)
            self.mom = combined_cos(0.25, 0.95, 0.85, 0.95)
        elif kind == "linear":
            self.lr = SchedLin(lr_max, 0.0)
        elif kind == "cosine":
            self.lr = SchedCos(lr_max, 0.0)
        else:
            self.lr = lambda pos: lr_max

    def before_batch(self):
        if not self.training:
            return
        pos = min(self.train_iter / self.total_steps, 1.0)
        self.opt.set_hyper("lr", self.lr(pos))
        if self.mom is not None:
            self.opt.set_hyper("mom", self.mom(pos))


class StepBudget(Callback):
    """Ends training after ``total_steps`` optimizer steps (the epoch still validates)."""

    order = 6

    def __init__(self, total_steps: int):
        self.total_steps = total_steps

    def before_batch(self):
        if self.training and self.train_iter >= self.total_steps:
            raise CancelTrainException()


def default_metrics(n_classes: int) -> list:
    return [accuracy, top5_accuracy] if n_classes > 5 else [accuracy]


def default_callbacks(param: str, d_optimal: float = 1.0, frobenius_decay: float | None = None,
                      spectral_bound: float | None = None, sv_every: int = 100) -> list[Callback]:
    """Callbacks that the parameterization calls for."""
    cbs: list[Callback] = [NaNGuard()]
    if param in ("svdp-l", "svdp-r", "sttp-l", "sttp-r"):
        cbs.append(SingularValueLogger(every=sv_every))
    if param.endswith("-r") and d_optimal:
        cbs.append(DOptimalPenalty(weight=d_optimal))
    if param == "lowrank" and frobenius_decay:
        cbs.append(FrobeniusDecay(wd=frobenius_decay))
    if spectral_bound is not None:
        cbs.append(SpectralNormBound(c=spectral_bound))
    return cbs


def spectral_learner(
    dls,
    arch: str | nn.Module,
    param: str = "dense",
    rank: int | None = None,
    compression: float | None = None,
    include=None,
    exclude=None,
    init: str | None = None,
    opt: str = "sgd",
    lr: float = 0.1,
    mom: float = 0.9,
    wd: float = 5e-4,
    d_optimal: float = 1.0,
    frobenius_decay: float | None = None,
    spectral_bound: float | None = None,
    sv_every: int = 100,
    cbs=None,
    metrics=None,
    model_kwargs: dict | None = None,
    run_dir: str | Path | None = None,
    loss_func=None,
    **learner_kwargs,
) -> Learner:
    """A fastai ``Learner`` whose model has its weights in ``param`` form.

    Args:
        dls: fastai DataLoaders (``get_dls``), with ``n_classes`` / ``in_chans`` attached.
        arch: a timm / registered model name, or a model.
        param, rank, compression, include, exclude, init: see :func:`sttpfast.parameterize`.
        opt: ``sgd`` (momentum ``mom``) or ``adam``; ``wd`` is decoupled weight decay, never
            applied to BN / biases, and replaced by Frobenius decay on ``lowrank`` factors.
        d_optimal: weight of the D-optimal penalty for -r variants.
        frobenius_decay: lambda of Frobenius decay for ``lowrank`` (default ``wd``).
        spectral_bound: keep sigma_max <= c (SpectralNormBound) when given.
        cbs: extra callbacks (yours); they run with the defaults.
    The report of the surgery is ``learn.compression``; ``learn.run_dir`` is where the
    callbacks write (``run_dir`` or ``learn.path``).
    """
    from sttpfast.models import create_model

    param = resolve_param(param)
    if isinstance(arch, nn.Module):
        model = arch
    else:
        kwargs = dict(num_classes=getattr(dls, "n_classes", None), in_chans=getattr(dls, "in_chans", None))
        model = create_model(arch, **{**kwargs, **(model_kwargs or {})})
    report = parameterize(model, param, rank=rank, compression=compression, include=include,
                          exclude=exclude, init=init)
    if opt not in ("sgd", "adam"):
        raise ValueError(f"unknown optimizer {opt!r}; allowed: sgd, adam")
    opt_func = (lambda params, **kw: SGD(params, mom=mom, **kw)) if opt == "sgd" else Adam
    if frobenius_decay is None and param == "lowrank":
        frobenius_decay = wd
    callbacks = default_callbacks(param, d_optimal, frobenius_decay, spectral_bound, sv_every) + list(cbs or [])
    path = Path(run_dir) if run_dir is not None else Path(".")
    learn = Learner(dls, model, loss_func=loss_func or CrossEntropyLossFlat(), opt_func=opt_func, lr=lr,
                    metrics=metrics if metrics is not None else default_metrics(getattr(dls, "n_classes", 10)),
                    cbs=callbacks, wd=wd, wd_bn_bias=False, path=path, model_dir=".", **learner_kwargs)
    learn.compression, learn.param, learn.run_dir = report, param, path
    return learn


def fit(learn: Learner, epochs: int | None = None, lr: float | None = None, schedule: str = "one_cycle",
        steps: int | None = None, start_epoch: int = 0, cbs=None) -> Learner:
    """Train for ``epochs`` (or ``steps`` optimizer steps) with a step-based ``schedule``."""
    if epochs is None and steps is None:
        raise ValueError("give epochs or steps")
    per_epoch = len(learn.dls.train)
    if per_epoch == 0:
        raise ValueError("the training loader yields no batch (batch size larger than the data?)")
    if steps is not None:
        epochs = math.ceil(steps / per_epoch)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    total = steps if steps is not None else epochs * per_epoch
    lr = learn.lr if lr is None else lr
    extra = [LRSchedule(lr, total, schedule)] + ([StepBudget(steps)] if steps is not None else [])
    learn.total_steps = total
    learn.fit(epochs, lr, cbs=extra + list(cbs or []), start_epoch=start_epoch)
    return learn
