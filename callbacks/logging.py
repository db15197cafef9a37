"""Loggers: TensorBoard and Weights & Biases, as fastai callbacks.

Both log the same things under the same tags:

* every ``every`` training steps and at the last step of a step budget (``after_batch``):
  ``train/loss`` (the task loss of the batch, ``learn.loss``), ``train/smooth_loss`` (the
  Recorder's running mean) and ``train/lr`` (the last parameter group's learning rate);
* every epoch (``after_epoch``): ``epoch`` and the Recorder's values of that epoch,
  ``train_loss`` -> ``train/epoch_loss``, ``valid_loss`` -> ``valid/loss`` and each metric
  ``m`` -> ``valid/m`` (``train_m`` with ``train_metrics=True``);

and accept whatever the other callbacks send through
:func:`sttpfast.callbacks._util.log_scalars` / :func:`~sttpfast.callbacks._util.log_image`.
The step is always :func:`~sttpfast.callbacks._util.global_step` (optimizer steps done,
over all the learner's fits), which never decreases, as W&B requires: a second fit of the
same learner (``fine_tune``) logs on after the first, into the same W&B run. Only the main
process logs.

Order 70: after the Recorder (50, whose epoch values are read) and after the monitors
that log through them (55), so that their last scalars and images arrive before the
logger closes. The loggers close in ``after_cancel_fit`` already when a fit is cancelled
(NaNGuard, early stopping), and otherwise in ``after_fit``; anything logged later is dropped.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from fastai.callback.core import Callback

from sttpfast.atomic import write_file
from sttpfast.callbacks._util import (
    count_steps_over_fits,
    global_step,
    is_main_process,
    positive_steps,
    run_dir,
    unwrap_model,
)

__all__ = ["TensorBoardLogger", "WandbLogger"]

LOGGER_ORDER = 70
WANDB_ID_FILE = "wandb-run-id"  # in the run folder: the W&B run a resumed fit continues


def _recorder_tag(name: str) -> str:
    """Recorder column name -> tag (``valid_loss`` -> ``valid/loss``, ``accuracy`` -> ``valid/accuracy``)."""
    if name == "train_loss":
        return "train/epoch_loss"
    for prefix in ("train_", "valid_"):
        if name.startswith(prefix):
            return f"{prefix[:-1]}/{name[len(prefix):]}"
    return f"valid/{name}"  # fastai's metrics are validation metrics unless prefixed


def _finite(value) -> float | None:
    """``value`` (a number or a one-element tensor) as a finite float, else None."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class _LoggerBase(Callback):
    """What both loggers log; subclasses implement ``_open``, ``_write``, ``_image``, ``_close``."""

    order = LOGGER_ORDER

    def __init__(self, every: int = 1):
        super().__init__()
        self.every = positive_steps(every)
        self._open_now = False

    # -- what subclasses provide ---------------------------------------------------------
    def _open(self) -> None:
        """Start writing (main process, ``before_fit``)."""
        raise NotImplementedError

    def _write(self, scalars: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def _image(self, tag: str, fig_or_path, step: int) -> None:
        raise NotImplementedError

    def _close(self, cancelled: bool, failed: bool = False) -> None:
        """Flush and stop; ``failed``: the previous fit died without ``after_fit``."""
        raise NotImplementedError

    def _flush(self) -> None:
        """Make what was logged durable (called when a checkpoint was written at this step)."""

    # -- the interface of a logger (see _util.loggers) -----------------------------------
    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Write ``{tag: value}`` at ``step``; non-finite values are written as they are."""
        if self._open_now and scalars:
            self._write({k: float(v) for k, v in scalars.items()}, int(step))

    def log_image(self, tag: str, fig_or_png_path, step: int) -> None:
        """Write a matplotlib figure or a PNG file (path) as image ``tag`` at ``step``."""
        if self._open_now:
            self._image(tag, fig_or_png_path, int(step))

    # -- events --------------------------------------------------------------------------
    def before_fit(self):
        count_steps_over_fits(self.learn, "before_fit")  # a second fit logs after the first's steps
        if self._open_now:  # a previous fit died of an exception fastai does not catch
            self._open_now = False
            self._close(cancelled=True, failed=True)
        if is_main_process():
            self._open()
            self._open_now = True

    def after_batch(self):
        if not self.training or not self._open_now:
            return
        step = global_step(self.learn)
        # and the budget's last step (fit's total_steps), which every may not land on
        if step % self.every and int(getattr(self.learn, "train_iter", 0)) != getattr(self.learn, "total_steps", None):
            return
        scalars = {}
        for tag, value in (("train/loss", getattr(self.learn, "loss", None)),
                           ("train/smooth_loss", getattr(self.learn, "smooth_loss", None))):
            value = _finite(value)  # None when absent (no Recorder) or not finite
            if value is not None:
                scalars[tag] = value
        opt = getattr(self.learn, "opt", None)
        if opt is not None and getattr(opt, "hypers", None):
            scalars["train/lr"] = float(opt.hypers[-1]["lr"])
        self.log_scalars(scalars, step)
        self._flush_at_checkpoint(step)

    def _flush_at_checkpoint(self, step: int) -> None:
        # the Checkpointer (same order, added first) just saved this step: a run killed now
        # resumes after it, so the logs up to it must be on disk (TensorBoard buffers them)
        if getattr(self.learn, "checkpoint_iter", None) == step:
            self._flush()

    def after_epoch(self):
        if not self._open_now or self.learn.epoch < getattr(self.learn, "resume_epoch", 0):
            return  # an epoch a resumed run skips: it was logged before
        scalars = {"epoch": float(self.learn.epoch)}
        recorder = getattr(self.learn, "recorder", None)
        values = getattr(recorder, "values", None)
        if values:
            # metric_names = ['epoch', 'train_loss', 'valid_loss', *metrics, ('time')];
            # values[-1] holds the same columns without 'epoch' and 'time'
            for name, value in zip(list(recorder.metric_names)[1:], values[-1]):
                value = _finite(value)
                if value is not None:
                    scalars[_recorder_tag(name)] = value
        self.log_scalars(scalars, global_step(self.learn))
        self._flush_at_checkpoint(global_step(self.learn))

    def after_cancel_fit(self):
        count_steps_over_fits(self.learn, "after_fit")
        self._shutdown(cancelled=True)

    def after_fit(self):
        count_steps_over_fits(self.learn, "after_fit")
        self._shutdown(cancelled=False)

    def _shutdown(self, cancelled: bool) -> None:
        if self._open_now:
            self._open_now = False
            self._close(cancelled)


class TensorBoardLogger(_LoggerBase):
    """Scalars and images to TensorBoard event files (``log_dir``, default ``run_dir/tb``).

    Events: ``before_fit`` opens a ``SummaryWriter``, ``after_batch`` / ``after_epoch`` log,
    ``after_fit`` (and ``after_cancel_fit``) flush and close it.
    """

    def __init__(self, log_dir: str | os.PathLike | None = None, every: int = 1):
        super().__init__(every)
        self.log_dir = log_dir
        self.writer = None

    def _open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when used

        path = Path(self.log_dir) if self.log_dir is not None else run_dir(self.learn) / "tb"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"TensorBoardLogger cannot make its folder {path} ({err})") from None
        # a resumed run (train_iter N done) continues at N + 1: purge_step makes TensorBoard drop
        # what the killed process logged after its checkpoint, so no step shows twice
        resumed = getattr(self.learn, "resume_iter", None)
        self.writer = SummaryWriter(log_dir=str(path), purge_step=None if resumed is None else resumed + 1)

    def _write(self, scalars, step):
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def _image(self, tag, fig_or_path, step):
        if isinstance(fig_or_path, (str, os.PathLike)):
            import matplotlib.image

            img = matplotlib.image.imread(str(fig_or_path))  # (H, W, 3|4) float in [0, 1]
            self.writer.add_image(tag, img[..., :3], step, dataformats="HWC")
        else:
            self.writer.add_figure(tag, fig_or_path, step, close=False)

    def _flush(self):
        self.writer.flush()

    def _close(self, cancelled, failed=False):
        self.writer.flush()
        self.writer.close()
        self.writer = None


#: the modes wandb.init takes (dryrun / run: the legacy names of offline / online)
WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")


class WandbLogger(_LoggerBase):
    """Scalars and images to Weights & Biases (a replacement for fastai 2.8.12's
    WandbCallback, which crashes in ``before_fit``).

    ``mode`` is passed to ``wandb.init`` (None: ``$WANDB_MODE`` decides; ``"offline"`` writes
    the run under ``run_dir/wandb``, ``"disabled"`` makes every call a no-op). Online without
    an API key, the run is logged offline instead (one line says so). ``config`` is
    logged as the run's config, completed with a few facts of the learner.

    Events: ``before_fit`` starts the run, ``after_batch`` / ``after_epoch`` log,
    ``after_cancel_fit`` and ``after_fit`` finish it (whichever comes first; a cancelled fit
    is marked ``cancelled`` in the summary). A run left open by an exception fastai does not
    catch is finished, as failed, at the next ``before_fit`` (or by wandb at exit).

    Resume: the run id is saved in ``run_dir/wandb-run-id`` (atomically); a resumed fit
    (``learn.resume_iter`` set by the Checkpointer) continues that W&B run
    (``wandb.init(id=..., resume="allow")``) and logs only the steps after its checkpoint.
    A later fit of the same learner continues this logger's run the same way.
    """

    def __init__(self, project: str = "sttpfast", config: dict | None = None, mode: str | None = None,
                 every: int = 1):
        super().__init__(every)
        # wandb reads $WANDB_MODE itself: a bad one failed at the first event, in a traceback
        # (after the run folder existed); refused here, before anything is made
        env = os.environ.get("WANDB_MODE")
        if mode is None and env is not None and env not in WANDB_MODES:
            raise ValueError(f"WANDB_MODE={env!r} is not a W&B mode: set it to online, offline or disabled, "
                             "or unset it")
        if mode is not None and mode not in WANDB_MODES:
            raise ValueError(f"unknown W&B mode {mode!r}; allowed: online, offline, disabled")
        self.project, self.config, self.mode = project, dict(config or {}), mode
        # not `self.run`: that is fastai's switch that turns a callback on and off
        self.wandb_run = None
        self._run_id = None  # the W&B run of this logger's earlier fits, which later ones continue

    def _learner_config(self) -> dict:
        learn = self.learn
        facts = {"model": type(unwrap_model(learn.model)).__name__, "n_epoch": getattr(learn, "n_epoch", None)}
        dls = getattr(learn, "dls", None)
        if dls is not None and getattr(dls, "train", None) is not None:
            facts["bs"] = getattr(dls.train, "bs", None)
        return {k: v for k, v in facts.items() if v is not None}

    def _open(self) -> None:
        import wandb

        config = {**self._learner_config(), **self.config}
        # wandb reads $WANDB_MODE once per process (its settings singleton); read it per fit,
        # mapping the legacy values that wandb.init(mode=...) does not take
        mode = self.mode or os.environ.get("WANDB_MODE") or None
        mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
        folder = run_dir(self.learn)
        id_file = folder / WANDB_ID_FILE
        resume = {}
        if self._run_id is not None:  # this logger's run of an earlier fit of the learner
            resume = {"id": self._run_id, "resume": "allow"}
        elif getattr(self.learn, "resume_iter", None) is not None and id_file.exists():
            # the killed / stopped process's run: continue it rather than start a second one
            resume = {"id": id_file.read_text().strip(), "resume": "allow"}
        try:
            self.wandb_run = wandb.init(project=self.project, config=config, mode=mode, dir=str(folder), **resume)
        except wandb.errors.UsageError as err:
            # no API key (and no prompt possible): log offline rather than fail the run
            if mode in ("offline", "disabled") or "api key" not in str(err).lower():
                raise
            print(f"wandb: no API key configured, logging offline to {folder}/wandb "
                  "(upload later with `wandb sync`, or `wandb login` before the next run)")
            self.wandb_run = wandb.init(project=self.project, config=config, mode="offline", dir=str(folder),
                                        **resume)
        self._run_id = self.wandb_run.id
        if mode != "disabled" and not resume:
            write_file(id_file, f"{self.wandb_run.id}\n")

    def _write(self, scalars, step):
        self.wandb_run.log(scalars, step=step)

    def _image(self, tag, fig_or_path, step):
        import wandb

        data = str(fig_or_path) if isinstance(fig_or_path, (str, os.PathLike)) else fig_or_path
        self.wandb_run.log({tag: wandb.Image(data)}, step=step)

    def _close(self, cancelled, failed=False):
        run, self.wandb_run = self.wandb_run, None
        if cancelled:
            run.summary["cancelled"] = True
        run.finish(exit_code=1 if failed else 0)
