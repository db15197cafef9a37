"""Helpers shared by the callbacks: unwrapping, the main process, the run folder, logging.

Every callback that writes something goes through :func:`log_scalars` / :func:`log_image`,
which forward to whichever loggers (callbacks with a ``log_scalars`` method, see
:mod:`sttpfast.callbacks.logging`) the learner has. A callback therefore never needs to
know whether TensorBoard, W&B, both or neither are in use.
"""
from __future__ import annotations

import math
import numbers

from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sttpfast.params.base import MatrixView
from sttpfast.params.layers import factors_of, parameterized_layers
from sttpfast.params.registry import method_of

__all__ = [
    "unwrap_model", "is_main_process", "run_dir", "loggers", "log_scalars", "log_image",
    "global_step", "DENSE_LAYERS", "matrix_of", "weight_matrix_of", "spectral_layers", "resize_progress_bar",
]

#: layers whose plain (unparametrized) weight is bounded / logged as a dense matrix
DENSE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)


def positive_steps(every, name: str = "every", what: str = " of steps") -> int:
    """``every`` as a positive int (a whole float too, not a bool), or a ValueError naming it."""
    whole = isinstance(every, numbers.Integral) or (isinstance(every, float) and every.is_integer())
    if isinstance(every, bool) or not whole or every < 1:
        raise ValueError(f"{name} must be a positive whole number{what}, got {every!r}")
    return int(every)


def is_real(value) -> bool:
    """A real number (numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def non_negative(value, name: str) -> float:
    """``value`` as a finite float >= 0 (a weight, a decay), or a ValueError naming it."""
    if not is_real(value) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def with_defaults(defaults: list, given: list) -> list:
    """The learner's callback list: the ``defaults`` of types the user gave none of (an
    instance or the class, which fastai instantiates), then the user's ``given`` ones."""
    kinds = {cb if isinstance(cb, type) else type(cb) for cb in given}
    return [cb for cb in defaults if type(cb) not in kinds] + list(given)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under DistributedDataParallel / accelerate wrappers (``.module`` chains)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def is_main_process() -> bool:
    """True when not distributed, or on rank 0: the only process that logs and writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def resize_progress_bar(learn, total: int) -> None:
    """Set the total of the learner's current progress bar (fastai sized it from the loader
    and drew it before a step budget or the GAN's iterations shortened the epoch), and
    redraw it at once if it is already shown, so the first step is not shown out of a wrong
    total. Nothing without a progress bar."""
    bar = getattr(getattr(learn, "progress", None), "pbar", None)
    if bar is None:
        return
    bar.total = total
    # an epoch with no step left (a resume from a checkpoint of its last step, before its
    # validation) is not redrawn: fastprogress draws an empty bar as a raw `UserWarning: Your
    # generator is empty.`; the epoch's end clears the line drawn at fastai's size as usual
    if bar.last_v is not None and total > 0:  # drawn: no step done yet, so a fresh start at 0 is right
        bar.update(0)


def end_progress_line(learn) -> None:
    """End the line of the learner's console progress bar when it is drawn part-way (a stop
    mid-epoch), so that what is printed next starts on a line of its own: fastprogress draws
    the bar with a carriage return and no newline, and the interrupt's message was glued to
    it ("... [1/5 00:00<00:01]interrupted at ..."). Nothing without a bar, or once the bar is
    done (it cleared its line and left the cursor at its start)."""
    from fastprogress import fastprogress

    bar = getattr(getattr(learn, "progress", None), "pbar", None)
    if not isinstance(bar, fastprogress.ConsoleProgressBar) or bar.last_v is None or not fastprogress.printing():
        return
    fastprogress.WRITER_FN("", flush=fastprogress.FLUSH)  # the bar's own writer: the stream it drew on
    bar.last_v = None  # its line is ended: a second call prints no empty line


def output_folder(learn) -> Path:
    """Where the callbacks of ``learn`` write: ``learn.run_dir`` if set, else ``learn.path``."""
    return Path(getattr(learn, "run_dir", None) or learn.path)


def run_dir(learn) -> Path:
    """:func:`output_folder`, created."""
    path = output_folder(learn)
    path.mkdir(parents=True, exist_ok=True)
    return path


#: the learner's attributes (in its ``__dict__``: fastai's Learner hands unknown names to its
#: model) that carry the step count over fits: the steps of the earlier fits, and the last step seen
STEPS_BEFORE_FIT, STEPS_SEEN = "sttpfast_steps_before_fit", "sttpfast_steps_seen"


def global_step(learn) -> int:
    """Optimizer steps done so far, over all the learner's fits. fastai's TrainEvalCallback
    (order -10) increments ``train_iter`` in ``after_batch`` before any later callback runs,
    so in ``after_batch`` of step ``k`` (0-based) this is ``k + 1``: the step count that the
    batch completes. fastai counts from 0 again in each fit; the loggers keep the steps of
    the earlier fits (:func:`count_steps_over_fits`), so a second fit (``fine_tune``) logs on."""
    return int(getattr(learn, "train_iter", 0) or 0) + int(vars(learn).get(STEPS_BEFORE_FIT, 0))


def count_steps_over_fits(learn, event: str) -> None:
    """``before_fit``: the fit starts after the steps of the earlier fits; ``after_fit``: note
    where it ended (a fit that dies of an exception fastai does not catch is not counted: the
    next one starts where that one did). Idempotent, so every logger of the learner can call it."""
    if event == "before_fit":
        vars(learn)[STEPS_BEFORE_FIT] = vars(learn).get(STEPS_SEEN, 0)
    else:
        vars(learn)[STEPS_SEEN] = global_step(learn)


def loggers(learn) -> list:
    """The learner's callbacks that can take scalars (they define ``log_scalars``)."""
    # Look on the class: a fastai Callback forwards unknown attributes to the learner.
    return [cb for cb in getattr(learn, "cbs", []) if callable(getattr(type(cb), "log_scalars", None))]


def log_scalars(learn, scalars: dict[str, float], step: int) -> None:
    """Send ``{tag: value}`` at ``step`` to every logger (only the main process logs)."""
    if not scalars or not is_main_process():
        return
    scalars = {k: float(v) for k, v in scalars.items()}
    for cb in loggers(learn):
        cb.log_scalars(scalars, step)


def log_image(learn, tag: str, fig_or_png_path, step: int) -> None:
    """Send a matplotlib figure or a PNG file's path to every logger that takes images."""
    if not is_main_process():
        return
    for cb in loggers(learn):
        if callable(getattr(type(cb), "log_image", None)):
            cb.log_image(tag, fig_or_png_path, step)


# ---------------------------------------------------------------------------------------
# spectra
def matrix_of(module: nn.Module, weight: Tensor) -> Tensor:
    """``weight`` of ``module`` as its ``(d_out, d_in)`` matrix (transposed convs swap dims 0/1)."""
    transposed = isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    return MatrixView(tuple(weight.shape), transposed).to_matrix(weight)


def weight_matrix_of(module: nn.Module) -> Tensor:
    """The effective weight of ``module`` (parametrized or not) as ``(d_out, d_in)``."""
    return matrix_of(module, module.weight)


def _read_weight_matrix(module: nn.Module) -> Tensor:
    """``weight_matrix_of(module)`` with its parametrizations in eval mode: torch's spectral norm
    runs a power iteration (moving its ``u``, ``v`` buffers) each time its weight is read in
    training mode, so reading it for a log would change training."""
    plist = getattr(module, "parametrizations", None)
    steps = list(plist["weight"]) if plist is not None and "weight" in plist else []
    modes = [m.training for m in steps]
    for m in steps:
        m.train(False)
    try:
        return weight_matrix_of(module)
    finally:
        for m, mode in zip(steps, modes):
            m.train(mode)


def _exact_svdvals(module: nn.Module) -> Callable[[], Tensor]:
    def values() -> Tensor:
        with torch.no_grad():
            matrix = _read_weight_matrix(module).float()
            if not torch.isfinite(matrix).all():  # a diverged layer: NaN values, not a LinAlgError
                return matrix.new_full((min(matrix.shape),), float("nan"))
            return torch.linalg.svdvals(matrix)
    return values


def _param_svdvals(module: nn.Module, p: nn.Module) -> Callable[[], Tensor]:
    def values() -> Tensor:
        with torch.no_grad():
            return p.singular_values(*factors_of(module)).float()
    return values


def spectral_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module | None, Callable[[], Tensor]]]:
    """Yield ``(name, module, parametrization or None, sigma_fn)`` in module order.

    Covers every parametrized weight and every plain Conv / ConvTranspose / Linear layer.
    ``sigma_fn()`` returns the singular values of the layer's matricized weight, descending,
    detached float32 ``(min(d_out, d_in),)`` (``(rank,)`` for low-rank parametrizations): from
    the parametrization's own ``singular_values`` when it has one (cheap for STTP / SVDP,
    whose spectrum is a factor), else the exact ``torch.linalg.svdvals`` of the weight.
    """
    model = unwrap_model(model)
    parametrized = {id(m): (m, p) for _, m, p in parameterized_layers(model)}
    for name, module in model.named_modules():
        if id(module) in parametrized:
            p = parametrized[id(module)][1]
            entry = method_of(p)
            cheap = entry is not None and entry.cls is not None  # the project's classes compute their own
            fn = _param_svdvals(module, p) if cheap else _exact_svdvals(module)
            yield name, module, p, fn
        elif isinstance(module, DENSE_LAYERS) and isinstance(getattr(module, "weight", None), Tensor):
            yield name, module, None, _exact_svdvals(module)
