"""The classification Learner factory and its training-schedule callbacks.

    dls = get_dls("fashion_mnist", bs=128)
    learn = spectral_learner(dls, "wrn16_4", param="sttp-r", rank=16, cbs=[MyCallback()])
    fit(learn, epochs=5, lr=0.1, schedule="linear")     # or learn.fit_one_cycle(5, 0.1)

Surgery happens before the optimizer exists. The default callbacks follow the
parameterization: a learned spectrum (-l / -r) gets singular-value logging, -r also
the D-optimal penalty, ``lowrank`` gets Frobenius decay in place of weight decay.
"""
from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path

from fastai.callback.core import Callback
from fastai.callback.schedule import ParamScheduler, SchedCos, SchedLin, SchedNo, combined_cos
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy, top_k_accuracy
from fastai.optimizer import SGD, Adam, Optimizer
import torch
from torch import nn

from sttpfast.callbacks._util import positive_steps, resize_progress_bar, with_defaults
from sttpfast.callbacks.guards import NaNGuard
from sttpfast.callbacks.penalties import DOptimalPenalty, FrobeniusDecay
from sttpfast.callbacks.spectral import SingularValueLogger, SpectralNormBound
from sttpfast.callbacks.weight_cache import CachedValidationWeights
from sttpfast.config import choices
from sttpfast.params import BASELINES, method, resolve_param
from sttpfast.params.attention import (
    QKV_METHOD,
    attention_form_decay,
    attention_form_pairs,
)
from sttpfast.params.layers import parameterized_layers
from sttpfast.surgery import compression_report, parameterize, parameterize_for_run

__all__ = ["spectral_learner", "fit", "release_validation_cache", "SpectralLearner", "StepScheduler", "StepBudget", "schedule_functions",
           "AttentionFormDecay",
           "top5_accuracy", "SCHEDULES", "OPTIMIZERS"]

#: the schedules and optimizers the config schema allows (one list, in sttpfast/config.py)
SCHEDULES = choices("optim.schedule")
OPTIMIZERS = choices("optim.opt")


def top5_accuracy(inp, targ):
    """Top-5 accuracy (fastai metric)."""
    return top_k_accuracy(inp, targ, k=5)


def _one_cycle_defaults() -> dict:
    """fastai's own one-cycle defaults (div, div_final, pct_start), read from
    ``Learner.fit_one_cycle`` so that both always agree."""
    params = inspect.signature(Learner.fit_one_cycle).parameters
    return {name: params[name].default for name in ("div", "div_final", "pct_start")}


def schedule_functions(kind: str, lr_max: float, moms=(0.95, 0.85, 0.95)) -> dict:
    """``{hyper-parameter: f(pos)}`` for fastai's ``ParamScheduler``, ``pos`` in [0, 1].

    ``one_cycle`` is exactly fastai's ``fit_one_cycle`` (cosine warm-up from lr/div to lr
    over ``pct_start``, cosine decay to lr/div_final, momentum ``moms``); ``linear`` (the
    paper's) and ``cosine`` decay to 0; ``const`` keeps ``lr_max``."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; allowed: {', '.join(SCHEDULES)}")
    if kind == "one_cycle":
        d = _one_cycle_defaults()
        return {"lr": combined_cos(d["pct_start"], lr_max / d["div"], lr_max, lr_max / d["div_final"]),
                "mom": combined_cos(d["pct_start"], *moms)}
    if kind == "linear":
        return {"lr": SchedLin(lr_max, 0.0)}
    if kind == "cosine":
        return {"lr": SchedCos(lr_max, 0.0)}
    return {"lr": SchedNo(lr_max, lr_max)}


class StepScheduler(ParamScheduler):
    """fastai's ``ParamScheduler`` positioned by optimizer steps: ``pos = train_iter / total_steps``.

    fastai's own position (``pct_train``) assumes every epoch runs all its batches and the
    fit starts at step 0; a step budget that ends mid-epoch (``--steps``) or a resumed run
    breaks both. ``train_iter`` is exact in both cases (the Checkpointer restores it)."""

    def __init__(self, scheds: dict, total_steps: int):
        super().__init__(scheds)
        self.total_steps = max(1, int(total_steps))

    def before_batch(self):
        self._update_val(min(self.train_iter / self.total_steps, 1.0))


class _StepLimit:
    """A view of a training loader that stops once ``learn.train_iter`` reaches ``total``.

    The check runs before each batch is drawn, so the epoch simply ends early: fastai sees a
    normal end of training (no cancel event), validation and the Recorder run as usual."""

    def __init__(self, dl, learn, total: int):
        self.dl, self.learn, self.total = dl, learn, total

    def __len__(self):
        return max(0, min(len(self.dl), self.total - int(self.learn.train_iter)))

    def __iter__(self):
        for batch in self.dl:
            if self.learn.train_iter >= self.total:
                return
            yield batch

    def __getattr__(self, name):
        return getattr(self.dl, name)


class StepBudget(Callback):
    """Ends training after ``total_steps`` optimizer steps, also in the middle of an epoch.

    It shortens the last epoch's loader instead of cancelling the epoch: fastai's Recorder
    drops the training-loss column of a cancelled epoch, which shifted every later column
    (``accuracy`` showed top-5) in the table, summary.json, TensorBoard and ``best``.
    Order 75: the outermost loader view, after the Checkpointer (70) skipped the batches a
    resumed epoch already trained."""

    order = 75

    def __init__(self, total_steps: int):
        self.total_steps = total_steps

    def before_train(self):
        self.learn.dl = _StepLimit(self.learn.dl, self.learn, self.total_steps)
        resize_progress_bar(self.learn, len(self.learn.dl))  # sized and drawn before the loader was shortened


class AttentionFormDecay(Callback):
    """Frobenius decay on the factored attention forms (``--attention qk-ov``) in place of
    weight decay on their factors: ``after_backward`` adds the gradient of
    ``(wd / 2) sum_h |L_h R_h^T|^2 + |P_h Q_h^T|^2`` (:func:`attention_form_decay`);
    ``before_fit`` takes the factors out of the optimizer's ordinary weight decay. Order 5."""

    order = 5
    run_valid = False

    def __init__(self, wd: float):
        if wd < 0:
            raise ValueError(f"wd must be >= 0, got {wd!r}")
        self.wd = float(wd)

    def _model(self):
        return getattr(self.learn.model, "module", self.learn.model)  # DDP-wrapped or not

    def before_fit(self):
        if self.learn.opt is None:
            self.learn.create_opt()
        if not isinstance(self.learn.opt, Optimizer):  # a wrapped torch optimizer: no per-tensor switch
            raise ValueError("AttentionFormDecay needs a fastai optimizer (sgd or adam)")
        for u, v in attention_form_pairs(self._model()):
            for t in (u, v):
                self.learn.opt.state[t]["do_wd"] = False

    def after_backward(self):
        attention_form_decay(self._model(), self.wd)


class SpectralLearner(Learner):
    """fastai's Learner; ``export`` refuses (parameterized modules cannot be pickled)."""

    def export(self, fname="export.pkl", *args, **kwargs):
        """Refused before anything is written: ``torch.nn.utils.parametrize`` modules (generated
        classes) and the frame bank's hooks do not pickle. Save weights with safetensors."""
        raise ValueError(
            f"learn.export({str(fname)!r}) cannot pickle a parameterized model; save it with "
            "sttpfast.save_parameterized(learn.model, 'model.safetensors') (load with "
            "sttpfast.load_parameterized), or densify it first: sttpfast.densify(learn.model)")


def _n_classes(dls, model: nn.Module) -> int | None:
    """The loaders' ``n_classes`` (get_dls attaches it), else the model's (timm's
    ``num_classes``), else None."""
    n = getattr(dls, "n_classes", None)
    return n if n is not None else getattr(model, "num_classes", None)


def default_metrics(n_classes: int | None) -> list:
    """Accuracy, and top-5 accuracy where there are more than 5 classes (None: unknown, accuracy alone)."""
    if n_classes is None:
        return [accuracy]
    return [accuracy, top5_accuracy] if n_classes > 5 else [accuracy]


def default_callbacks(param: str, d_optimal: float = 1.0, frobenius_decay: float | None = None,
                      spectral_bound: float | None = None, sv_every: int = 100) -> list[Callback]:
    """Callbacks that the parameterization calls for."""
    cbs: list[Callback] = [NaNGuard(), CachedValidationWeights()]
    if param in ("svdp-l", "svdp-r", "sttp-l", "sttp-r"):
        cbs.append(SingularValueLogger(every=sv_every))
    if param.endswith("-r") and d_optimal:
        cbs.append(DOptimalPenalty(weight=d_optimal))
    if param == "lowrank" and frobenius_decay:
        cbs.append(FrobeniusDecay(wd=frobenius_decay))
    if spectral_bound is not None:
        cbs.append(SpectralNormBound(c=spectral_bound))
    return cbs


def _check_model_fits_data(model: nn.Module, dls) -> None:
    """A given model's classes and input channels (timm's ``num_classes``, its cfg's
    ``first_conv``) against the loaders': a ValueError before training, not a torch error at
    the first step. What a model does not say is not checked."""
    classes, data_classes = getattr(model, "num_classes", None), getattr(dls, "n_classes", None)
    if isinstance(classes, int) and classes > 0 and data_classes is not None and classes != data_classes:
        raise ValueError(f"the model has {classes} classes and the data {data_classes}: create it with "
                         f"num_classes={data_classes} (or call model.reset_classifier({data_classes}))")
    cfg = getattr(model, "pretrained_cfg", None)
    first = cfg.get("first_conv") if isinstance(cfg, dict) else None
    first = first[0] if isinstance(first, (tuple, list)) and first else first  # several: the first
    first = first if isinstance(first, str) else None
    conv = dict(model.named_modules()).get(first) if first else None
    chans, data_chans = getattr(conv, "in_channels", None), getattr(dls, "in_chans", None)
    if chans is not None and data_chans is not None and chans != data_chans:
        raise ValueError(f"the model takes {chans} input channels (its first layer {first!r}) and the data has "
                         f"{data_chans}: create it with in_chans={data_chans}")


def fit_dls_as_trained(dls, arch: str, img_size: int | None, model_kwargs: dict | None) -> None:
    """Fit ``dls`` (in place) as a training run of ``arch`` with these settings fitted its
    loaders: the same resize and normalization (``sttpfast compress`` evaluates, re-estimates
    and distils its teacher on them). The model built to find the size is dropped; pretrained
    weights are not loaded for it."""
    kwargs = dict(model_kwargs or {})
    pretrained = bool(kwargs.pop("pretrained", False))
    _model_for_data(arch, dls, img_size, kwargs, None, pretrained=pretrained)


def _model_for_data(arch: str, dls, img_size: int | None, model_kwargs: dict | None, echo,
                    pretrained: bool | None = None) -> nn.Module:
    """``arch`` built for the data's images; the loaders are fitted to it (resized to the size
    it needs, normalized as its cfg says when it has weights: ``pretrained``, by default the
    ``pretrained`` model argument). One ValueError when no size works, before any run folder
    exists."""
    from sttpfast.data.model_config import fit_dls_to_model
    from sttpfast.models.input_size import create_for_data

    chans, size = getattr(dls, "in_chans", None), getattr(dls, "data_image_size", getattr(dls, "image_size", None))
    kwargs = {"num_classes": getattr(dls, "n_classes", None), **(model_kwargs or {})}
    if chans is None or size is None:  # loaders that do not say what they deliver: build as asked
        from sttpfast.models import create_model

        chans = kwargs.pop("in_chans", None) or chans
        return create_model(arch, in_chans=chans, img_size=img_size if img_size is not None
                            else kwargs.pop("img_size", None), **kwargs)
    model, fitted = create_for_data(arch, chans, size, img_size=img_size, **kwargs)
    changed = fit_dls_to_model(dls, model, fitted,
                               pretrained=bool(kwargs.get("pretrained")) if pretrained is None else pretrained)
    if "resize" in changed and img_size is None and kwargs.get("img_size") is None and echo is not None:
        side = size if isinstance(size, int) else size[0]
        echo(f"resizing the {side}x{side} images to {fitted}x{fitted}: the smallest size {arch} accepts "
             f"(--img-size N to choose)")
    return model


def say_init_cost(param: str, init: str | None, echo) -> None:
    """Before the surgery: the method's note when its spectral init is an iterative fit
    (CP's ALS, minutes on resnet18), so a long silent start is not taken for a hang."""
    entry = method(param)
    if echo is not None and entry.spectral_init_note and (init or entry.default_init) == "spectral":
        echo(entry.spectral_init_note)


def say_placeholder_init(param: str, init: str | None, echo) -> None:
    """Before a new run: ``init="identity"`` asked of a method with no identity of its own
    (lowrank, the tensor formats; their default is ``spectral``) starts every layer from a fixed
    pattern of placeholder factors that ignores the weights (see :func:`sttpfast.parameterize`)."""
    if echo is not None and init == "identity" and method(param).default_init == "spectral":
        echo(f"{param}: init identity starts every layer from fixed placeholder factors, not from its weights "
             f"({param} has no identity of its own; the default, spectral, fits them)")


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
    plan: str | None = None,
    rank_scale: float | None = None,
    unrepresentable: str | None = None,
    img_size: int | None = None,
    echo=None,
    attention: str | None = None,
    attention_rank: int | None = None,
    keep_dense_if_no_gain: bool = True,
    **learner_kwargs,
) -> Learner:
    """A fastai ``Learner`` whose model has its weights in ``param`` form.

    Args:
        dls: fastai DataLoaders (``get_dls``), with ``n_classes`` / ``in_chans`` attached.
        arch: a timm / registered model name, or a model. A model with layers you parameterized
            already (several methods, say) is taken as it is under the default ``param="dense"``
            without surgery arguments, with the callbacks each of its methods calls for.
        param, rank, compression, include, exclude, init, plan, rank_scale, unrepresentable,
        keep_dense_if_no_gain: see :func:`sttpfast.parameterize` (``rank`` may be a per-layer mapping).
        opt: ``sgd`` (momentum ``mom``) or ``adam``; ``wd`` is decoupled weight decay, never
            applied to BN / biases, and replaced by Frobenius decay on ``lowrank`` factors.
        d_optimal: weight of the D-optimal penalty for -r variants.
        frobenius_decay: lambda of Frobenius decay for ``lowrank`` (default ``wd``).
        spectral_bound: keep sigma_max <= c (SpectralNormBound) when given.
        cbs: extra callbacks (yours); they run with the defaults, and one of a default's type
            (e.g. your own SingularValueLogger) replaces that default.
        img_size: resize the data to ``img_size`` x ``img_size`` and build ``arch`` for it.
            Without it ``arch`` is built for the data's size when it can take it (``img_size=``
            for ViT-style models), else the data are resized to the smallest size it accepts
            (said through ``echo``); no size works: ValueError naming ``--img-size``.
        echo: where one-line notes go (the CLI's ``click.echo``); None: silent.
        attention: ``"qk-ov"``: every attention block learns its per-head query-key and
            output-value forms factored at rank ``rank`` per head (full head width without
            ``rank``), with Frobenius decay ``frobenius_decay`` (default ``wd``) on the products
            (:mod:`sttpfast.params.attention`); ``param`` then applies to the other layers.
            ``"q-k-v"``: each fused ``qkv`` Linear becomes three Linears that ``param``
            parameterizes each on its own (own spectrum and bound).
        attention_rank: rank per head of the ``qk-ov`` forms when it differs from ``rank``
            (e.g. with ``compression``, which then picks the other layers' rank).
    The report of the surgery is ``learn.compression``; ``learn.run_dir`` is the run folder
    (None without ``run_dir``: callbacks that write then use ``learn.path``, the current
    directory, and the default heat map of the spectra is not drawn).
    """
    param = resolve_param(param)
    if opt not in OPTIMIZERS:  # before the model is touched
        raise ValueError(f"unknown optimizer {opt!r}; allowed: {', '.join(OPTIMIZERS)}")
    if isinstance(arch, nn.Module):
        model = arch
        _check_model_fits_data(model, dls)
    else:
        model = _model_for_data(arch, dls, img_size, model_kwargs, echo)
    surgery = (rank, compression, include, exclude, init, plan, rank_scale, attention, attention_rank)
    if param == "dense" and all(v is None for v in surgery) and next(parameterized_layers(model), None):
        report = compression_report(model)  # a model the user parameterized (several methods): as it is
    else:
        say_init_cost(param, init, echo)
        report = parameterize_for_run(model, param, rank=rank, compression=compression, include=include,
                                      exclude=exclude, init=init, plan=plan, rank_scale=rank_scale,
                                      unrepresentable=unrepresentable, keep_dense_if_no_gain=keep_dense_if_no_gain,
                                      attention=attention, attention_rank=attention_rank)
        replaced = sum(1 for row in report.rows if row.param == param) if param not in BASELINES else 0
        if replaced and init is None and (model_kwargs or {}).get("pretrained") and \
                method(param).default_init == "identity":
            warnings.warn(f"{param}'s identity init replaces the pretrained weights of the {replaced} layers it "
                          "parameterizes; init='spectral' (--init spectral) converts them instead", stacklevel=2)
    # the callbacks every method in the model calls for, each type once (a model may mix methods)
    methods = list(dict.fromkeys([param, *(row.param for row in report.rows)]))
    opt_func = (lambda params, **kw: SGD(params, mom=mom, **kw)) if opt == "sgd" else Adam
    if frobenius_decay is None and "lowrank" in methods:
        frobenius_decay = wd
    defaults = {}
    for name in methods:
        for cb in default_callbacks(name, d_optimal, frobenius_decay, spectral_bound, sv_every):
            defaults.setdefault(type(cb), cb)
    if QKV_METHOD in methods:  # the attention forms (--attention qk-ov, or the user's parameterize_attention)
        defaults.setdefault(AttentionFormDecay, AttentionFormDecay(wd if frobenius_decay is None else frobenius_decay))
    # a default the user gives their own of (a SingularValueLogger with other settings) is theirs
    callbacks = with_defaults(list(defaults.values()), list(cbs or []))
    run_dir = Path(run_dir) if run_dir is not None else None
    path = run_dir if run_dir is not None else Path(".")
    learn = SpectralLearner(dls, model, loss_func=loss_func or CrossEntropyLossFlat(), opt_func=opt_func, lr=lr,
                    metrics=metrics if metrics is not None else default_metrics(_n_classes(dls, model)),
                    cbs=callbacks, wd=wd, wd_bn_bias=False, path=path, model_dir=".", **learner_kwargs)
    learn.compression, learn.param, learn.run_dir = report, param, run_dir
    return learn


def fit(learn: Learner, epochs: int | None = None, lr: float | None = None, schedule: str = "one_cycle",
        steps: int | None = None, start_epoch: int = 0, cbs=None) -> Learner:
    """Train for ``epochs`` (or ``steps`` optimizer steps, which may end mid-epoch) with a
    step-based ``schedule`` (fastai's schedule functions, see :func:`schedule_functions`)."""
    if epochs is None and steps is None:
        raise ValueError("give epochs or steps")
    steps, epochs = (None if v is None else positive_steps(v, name, "") for v, name in ((steps, "steps"),
                                                                                          (epochs, "epochs")))
    per_epoch = len(learn.dls.train)
    if per_epoch == 0:
        raise ValueError("the training loader yields no batch (batch size larger than the data?)")
    if steps is not None:
        epochs = math.ceil(steps / per_epoch)
    total = steps if steps is not None else epochs * per_epoch
    lr = learn.lr if lr is None else lr
    moms = getattr(learn, "moms", None) or (0.95, 0.85, 0.95)
    extra = [StepScheduler(schedule_functions(schedule, lr, moms), total)]
    if steps is not None:
        extra.append(StepBudget(steps))
    learn.total_steps = total
    try:
        learn.fit(epochs, lr, cbs=extra + list(cbs or []), start_epoch=start_epoch)
    finally:
        release_validation_cache(learn)  # an exception fastai does not catch skipped after_validate
        learn.total_steps = None  # this fit's budget (the loggers log its last step): not a later fit's
    return learn


def release_validation_cache(learn: Learner) -> None:
    """Leave ``parametrize.cached()`` if a validation pass of ``learn`` still holds it."""
    for cb in learn.cbs:
        if isinstance(cb, CachedValidationWeights):
            cb.release()
