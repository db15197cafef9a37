"""Checkpoints that resume exactly: model, optimizer, schedule position, RNG and data order.

A checkpoint is a folder ``run_dir/checkpoints/ckpt-STEP`` written by
:func:`sttpfast.atomic.write_checkpoint` (with ``manifest.json``: sizes and checksums);
``checkpoints/last`` and ``checkpoints/best`` are links to the newest and the best one:

* ``model.safetensors``: the parameterized model (its factors + the parameterization spec);
* ``optimizer.safetensors``: every tensor of the optimizer state (``state.{i}.{name}``);
* ``rng.safetensors``: torch CPU / CUDA generator states, numpy's key, and the training
  loader's shuffling and augmentation generators *at the start of the epoch* to resume;
* ``state.json``: counters (epoch, batches done in it, global step), optimizer scalars and
  hyper-parameters, python's RNG state, the best metric so far.

A crash never leaves a half-written checkpoint where one is looked for, and resuming takes
the newest complete one (an older one when the newest is damaged, with a warning). Resuming replays the data order: the epoch's generators
are restored, the batches already trained are drawn and skipped (no forward pass), and the
global RNG is restored right before the first new batch, so the resumed run ends with
weights identical to an uninterrupted one (on CPU, fixed seed). Nothing is unpickled.

DataLoader worker processes (``data.num_workers`` > 0) hold no random state to save: a
worker only indexes the in-memory tensors; the order is drawn before the workers start and
augmentation runs in the main process (``after_batch``), both from the loader's generators
saved here, and the workers' base seed is one draw from the global generator in the main
process, made with or without workers (tests/test_distributed.py checks both claims).
Under several processes rank 0 writes; the ranks' RNG states are equal (same seed, same
draws), so rank 0's state resumes every rank. A sharded (FSDP2) model's weights and
optimizer state are gathered whole first (every rank takes part), so the files are the
ones a one-process run writes, and a checkpoint resumes on any number of processes.
"""
from __future__ import annotations

import difflib
import json
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from fastai.callback.core import Callback
from fastcore.foundation import L
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sttpfast.atomic import (MANIFEST, DamagedCheckpoints, latest_complete, prune_checkpoints, set_pointer,
                             write_checkpoint)
from sttpfast.callbacks._util import is_main_process, positive_steps, unwrap_model
from sttpfast.checkpoint import load_parameterized, save_parameterized
from sttpfast.data.transforms import SMOOTH_MODES, resize_mode
from sttpfast.fsdp import full_state_dict, full_tensor, is_sharded, shard_like
from sttpfast.processes import world_size

__all__ = ["Checkpointer", "load_checkpoint_state", "find_checkpoint", "CheckpointError", "TrainingClock",
           "recorder_state", "restore_recorder", "quiet_skipped_epochs"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing, corrupt, or not this model's)."""


# ---------------------------------------------------------------------------------------
# optimizer state <-> tensors + JSON
def _optimizer_to_files(opt) -> tuple[dict, dict]:
    """Whole tensors (a sharded parameter's state is gathered: every rank calls this) + JSON."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for i, state in enumerate(sd["state"]):
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{i}.{key}"] = full_tensor(value).detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(i), {})[key] = value
    hypers = [{k: _plain(v) for k, v in group.items()} for group in sd["hypers"]]
    return tensors, {"n_params": len(sd["state"]), "scalars": _plain(scalars), "hypers": hypers}


def _plain(value):
    """JSON-able copy: fastai's L lists and numpy scalars become lists and floats."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, L)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return float(value)


def _optimizer_from_files(opt, tensors: dict, meta: dict, model=None) -> None:
    n = sum(len(group) for group in opt.param_lists)
    if meta["n_params"] != n and model is not None:
        tensors, meta = _without_empty_factor_states(opt, model, tensors, meta)
    if meta["n_params"] != n:
        raise CheckpointError(f"optimizer has {n} parameters, the checkpoint {meta['n_params']}: "
                              "not the same model or parameterization")
    params = [p for group in opt.param_lists for p in group]
    states = [dict(meta["scalars"].get(str(i), {})) for i in range(n)]
    for key, value in tensors.items():
        _, i, name = key.split(".", 2)
        p = params[int(i)]
        if value.shape != p.shape and name != "step":
            raise CheckpointError(f"optimizer state {key} has shape {tuple(value.shape)}, parameter {tuple(p.shape)}")
        states[int(i)][name] = value.to(p.device) if name == "step" else shard_like(value, p)  # a shard's slice
    opt.load_state_dict({"state": states, "hypers": L(meta["hypers"])})


def _without_empty_factor_states(opt, model, tensors: dict, meta: dict) -> tuple[dict, dict]:
    """A checkpoint written before empty factors became buffers (2026-11-30: the ``(0, r)``
    factors of square ``St_U`` frames, see ``sttpfast.params.base.empty_factors_as_buffers``)
    holds an optimizer state for each of them, next to its layer's other factors: map its
    states onto today's parameters, dropping those. Returned unchanged when the checkpoint's
    count is not that layout's (the caller then refuses it)."""
    from torch.nn.utils.parametrize import ParametrizationList

    owner = {}  # id(factor) -> its ParametrizationList
    for module in model.modules():
        if isinstance(module, ParametrizationList) and not module.is_tensor:
            owner.update({id(getattr(module, f"original{i}")): module for i in range(module.ntensors)})
    params = [p for group in opt.param_lists for p in group]
    legacy, seen = [], set()
    for p in params:
        plist = owner.get(id(p))
        if plist is None:
            legacy.append(p)
        elif id(plist) not in seen:  # then every factor of the layer, the empty ones too, in order
            seen.add(id(plist))
            legacy.extend(getattr(plist, f"original{i}") for i in range(plist.ntensors))
    if len(legacy) != meta["n_params"] or len(legacy) == len(params):
        return tensors, meta
    index = {id(p): k for k, p in enumerate(params)}
    new_index = [index.get(id(t)) for t in legacy]  # None: an empty factor, now a buffer
    moved = {}
    for key, value in tensors.items():
        _, i, name = key.split(".", 2)
        if new_index[int(i)] is not None:
            moved[f"state.{new_index[int(i)]}.{name}"] = value
    scalars = {str(new_index[int(i)]): v for i, v in meta["scalars"].items() if new_index[int(i)] is not None}
    return moved, dict(meta, n_params=len(params), scalars=scalars)


# ---------------------------------------------------------------------------------------
# RNG state
def _global_rng() -> tuple[dict, dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, state, gauss_next = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, list(state), gauss_next]}
    return tensors, meta


def _set_global_rng(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = meta["python"]
    random.setstate((version, tuple(state), gauss_next))


# ---------------------------------------------------------------------------------------
def _read(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"corrupt checkpoint {what} {path}: {err}") from None


def recorder_state(learn) -> tuple[dict, torch.Tensor | None]:
    """The Recorder's running values that outlive an epoch, ``(meta, tensor (1,))``: the
    smoothed training loss (``train_loss`` of the table is its value at the epoch end)."""
    recorder = getattr(learn, "recorder", None)
    if recorder is None:
        return {}, None
    smooth = recorder.smooth_loss
    return {"smooth_count": int(smooth.count)}, torch.as_tensor(smooth.val).detach().cpu().reshape(1).clone()


def restore_recorder(learn, saved: dict, smooth: torch.Tensor | None) -> None:
    """Put back what :func:`recorder_state` saved (nothing for a checkpoint without it)."""
    recorder = getattr(learn, "recorder", None)
    if recorder is None or smooth is None:
        return
    recorder.smooth_loss.count = saved.get("smooth_count", 0)
    recorder.smooth_loss.val = smooth.reshape(()).clone()


def quiet_skipped_epochs(learn, skipped) -> Callable[[], None]:
    """Drop the table rows of the epochs a resumed fit skips (``skipped()`` true); returns the
    undo. fastai ends a skipped epoch in the Recorder's ``after_epoch`` all the same, which
    printed a row for each ("epoch 0  train_loss 00:00"). Call in ``before_fit`` after the
    ProgressCallback (order 60) has put in its logger."""
    inner = learn.logger

    def logger(row):
        if not skipped():
            inner(row)

    learn.logger = logger

    def undo():
        if learn.logger is logger:  # (ProgressCallback may have put back its own already)
            learn.logger = inner
    return undo


def find_checkpoint(root: str | os.PathLike, warn=lambda msg: None, set_aside_damaged: bool = False) -> Path:
    """The checkpoint folder to resume from under ``root`` (``run_dir/checkpoints``): the newest
    complete one, verified against its manifest; a damaged newer one is reported through
    ``warn`` and skipped. CheckpointError when none is complete (naming the damaged files).
    A folder written before manifests existed (a plain ``last`` folder) is used as it is."""
    root = Path(root)
    try:
        return latest_complete(root, warn, set_aside=set_aside_damaged)
    except DamagedCheckpoints as err:
        raise CheckpointError(str(err)) from None
    except FileNotFoundError:
        legacy = root / "last"
        if legacy.is_dir() and not legacy.is_symlink():
            return legacy
        raise CheckpointError(f"no checkpoint folder in {root}") from None


#: how a loader's normalization turns pixels into the model's input (recorded with it)
NORMALIZED_INPUT = "float32 (x / 255 - mean) / std per channel, x the image's uint8 pixels"


def _normalization(dl) -> dict | None:
    """``{mean, std, input}`` of a loader that normalizes (sttpfast's), else None; with
    ``resize`` ``{size, interpolation}`` where the loader resized the images first."""
    mean, std = getattr(dl, "mean", None), getattr(dl, "std", None)
    if mean is None or std is None:
        return None
    out = {"mean": [float(m) for m in mean], "std": [float(v) for v in std], "input": NORMALIZED_INPUT}
    size = getattr(dl, "resize", None)
    if size is not None:
        how = resize_mode(getattr(dl, "interpolation", "bilinear"))  # what the loader applied
        smooth = ", antialiased when shrinking" if how in SMOOTH_MODES else ""
        out["resize"] = {"size": int(size), "interpolation": how}
        out["input"] = f"{NORMALIZED_INPUT} resized to {size}x{size} ({how}{smooth}) as floats first"
    return out


def load_checkpoint_state(folder: str | os.PathLike, warn=lambda msg: None,
                          set_aside_damaged: bool = False) -> dict:
    """Read and check a checkpoint (not yet applied); CheckpointError if unusable. ``folder``
    is one checkpoint folder, or a ``checkpoints`` folder to resume from (the newest complete
    checkpoint in it, see :func:`find_checkpoint`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint folder at {folder}")
    if not (folder / "state.json").exists() and not (folder / MANIFEST).exists():
        folder = find_checkpoint(folder, warn, set_aside_damaged)
    try:
        meta = json.loads((folder / "state.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {folder / 'state.json'}") from None
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"corrupt checkpoint state {folder / 'state.json'}: {err}") from None
    return {"folder": folder, "meta": meta, "optimizer": _read(folder / "optimizer.safetensors", "optimizer"),
            "rng": _read(folder / "rng.safetensors", "RNG state")}


class TrainingClock:
    """The seconds of training a run has behind it over all its sessions: those up to the
    checkpoint this session resumed from (saved in it as ``seconds``), plus this session's
    since :meth:`start`. Time trained after a run's last checkpoint and lost with the
    process does not count."""

    def __init__(self):
        self.before, self.started = 0.0, time.time()

    def resume(self, meta: dict) -> None:
        self.before = float(meta.get("seconds", 0.0))  # checkpoints older than this field: 0

    def start(self) -> None:
        self.started = time.time()

    def seconds(self) -> float:
        """To the summary's 2 decimals, in checkpoints too: a resumed run's total then never
        reads below the seconds of the checkpoint it resumed from."""
        return round(self.before + time.time() - self.started, 2)


class Checkpointer(Callback):
    """Saves ``last`` every ``every`` steps (and at each epoch end) and ``best`` by ``monitor``.

    Args:
        every: steps between ``last`` checkpoints (None: only at epoch ends).
        monitor: a recorder column (``accuracy``, ``valid_loss``...) for ``best``; one the
            recorder does not keep is refused when the fit starts. None (the default):
            ``accuracy``, and no ``best`` on a learner without that metric.
        mode: ``max`` or ``min`` for ``monitor``.
        resume: a state from :func:`load_checkpoint_state` to continue from; apply it with
            :meth:`restore` after ``learn.create_opt()``.
    After a non-finite loss (NaNGuard) nothing more is written: ``last`` stays good.
    """

    order = 70  # after the Recorder has the epoch's metrics

    def __init__(self, every: int | None = None, monitor: str | None = None, mode: str = "max",
                 folder: str | os.PathLike | None = None):
        if mode not in ("max", "min"):
            raise ValueError(f"Checkpointer mode must be 'max' or 'min', got {mode!r}")
        if monitor is not None and not isinstance(monitor, str):
            raise ValueError(f"Checkpointer monitor must be a recorder column's name, got {monitor!r}")
        self.every = None if every is None else positive_steps(every, "Checkpointer every")
        self.monitor, self.mode = monitor or "accuracy", mode
        self._monitor_given = monitor is not None
        self.folder = None if folder is None else Path(folder)
        self.best = None
        self.saved_iter = None  # the step of the last checkpoint written
        self._resume = None  # (epoch, skip, train_iter, loader rng, global rng) while resuming
        self._epoch_rng = None  # training loader generators at the start of this epoch
        self._pending_rng = None  # global RNG to restore right before the first new batch
        self._epoch_start_iter = 0  # global step at the start of the current epoch
        self.clock = TrainingClock()  # the run's training seconds, saved in each checkpoint

    # -- paths ----------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        if self.folder is not None:
            return self.folder
        return Path(getattr(self.learn, "run_dir", None) or self.learn.path) / "checkpoints"

    # -- saving ---------------------------------------------------------------------------
    def _save(self, pointers: tuple[str, ...], epoch: int, skip: int, loader_rng: dict,
              validated: bool = False) -> None:
        """Write a complete ``ckpt-STEP`` folder, then point ``pointers`` (``last``, ``best``) at it.

        ``validated``: written after the epoch's validation (``after_epoch``). A checkpoint
        taken after a step is not, even at the last step of the budget: a resume from it
        still runs that epoch's validation, so the run ends with its real final metrics."""
        if getattr(self.learn, "nan_step", None) is not None:
            return
        model = unwrap_model(self.learn.model)
        train_iter = int(self.learn.train_iter)
        # a sharded (FSDP2) model: every rank takes part in gathering the whole state, which
        # rank 0 alone writes, as a one-process run would
        sharded = is_sharded(model)
        if not (sharded or is_main_process()):
            return
        model_tensors = full_state_dict(model) if sharded else None
        opt_tensors, opt_meta = _optimizer_to_files(self.learn.opt)
        if not is_main_process():
            # every rank skips (or saves) the same steps: the gathering is collective, and a
            # signal at a step saved already must find every rank skipping it
            self.saved_iter = train_iter
            return
        rng_tensors, rng_meta = _global_rng()
        rng_tensors.update({f"loader.{k}": v for k, v in loader_rng.items()})
        recorder, smooth = self._recorder_state()
        if smooth is not None:
            rng_tensors["recorder.smooth_loss"] = smooth
        meta = {"epoch": epoch, "skip": skip, "train_iter": train_iter, "best": self.best,
                "monitor": self.monitor, "optimizer": opt_meta, "rng": rng_meta, "recorder": recorder,
                "metrics": self._last_metrics(), "validated": validated, "threads": torch.get_num_threads(),
                "processes": world_size(), "batch": int(self.dls.train.bs),  # the global batch, for a resume
                "normalization": _normalization(self.dls.train),  # what the model was fed (export says it)
                "seconds": self.clock.seconds()}
        files = {
            "model.safetensors": lambda path: save_parameterized(
                model, path, metadata={"epoch": epoch, "train_iter": train_iter}, tensors=model_tensors),
            "optimizer.safetensors": lambda path: save_file(opt_tensors, str(path)),
            "rng.safetensors": lambda path: save_file(rng_tensors, str(path)),
            "state.json": json.dumps(meta),
        }
        folder = write_checkpoint(self.root, train_iter, files, {"epoch": epoch, "skip": skip})
        for pointer in pointers:
            set_pointer(self.root, pointer, folder)
        prune_checkpoints(self.root, keep=2)
        self.saved_iter = self.learn.checkpoint_iter = train_iter  # the loggers flush at this step

    def _recorder_state(self) -> tuple[dict, torch.Tensor | None]:
        return recorder_state(self.learn)

    def _last_metrics(self) -> dict:
        recorder = getattr(self.learn, "recorder", None)
        if recorder is None or not recorder.values:
            return {}
        names = list(recorder.metric_names[1:-1])
        return {n: (None if v is None else float(v)) for n, v in zip(names, recorder.values[-1])}

    def before_train(self):
        skip = self._apply_resume_at_epoch_start()
        self._epoch_rng = {k: v.clone() for k, v in self.dls.train.rng_state().items()}
        self._epoch_start_iter = int(self.learn.train_iter) - skip  # global step at this epoch's start

    def save_interrupted(self) -> int | None:
        """Save ``last`` where an exception fastai does not catch (Ctrl-C) stopped the fit, so
        that resuming continues exactly. Returns the step saved, or None when nothing new was
        trained in this fit (``last`` is then already the right checkpoint).

        Exact when the interruption falls between steps (any callback event but the middle
        of a step); inside a step the step is redone on resume."""
        if self._epoch_rng is None or self._resume is not None:
            return None  # before the first epoch started, or while still replaying a resume
        if self.saved_iter == int(self.learn.train_iter):
            return self.saved_iter  # this step is already checkpointed (epoch end, --every)
        done = int(self.learn.train_iter) - self._epoch_start_iter
        self._save(("last",), self.epoch, done, self._epoch_rng)
        return int(self.learn.train_iter)

    def after_batch(self):
        if self.training and self.every and self.train_iter % self.every == 0 and self._resume is None:
            # batches of this epoch done: counted from the epoch's start (fastai's iter restarts
            # at 0 after the batches a resumed epoch skipped)
            self._save(("last",), self.epoch, int(self.learn.train_iter) - self._epoch_start_iter, self._epoch_rng)

    def after_epoch(self):
        if self._skipped_epoch():
            return
        done = int(self.learn.train_iter) - self._epoch_start_iter
        if done < len(self.dls.train):
            # a step budget ended the epoch early (StepBudget): the position is mid-epoch, so
            # that a resume with a larger budget trains the rest of this epoch
            epoch, skip, loader_rng = self.epoch, done, self._epoch_rng
        else:  # the next epoch starts with the generators as they are now
            epoch, skip, loader_rng = self.epoch + 1, 0, {k: v.clone() for k, v in self.dls.train.rng_state().items()}
        value = self._monitored()
        if value is not None and (self.best is None or (value > self.best if self.mode == "max" else value < self.best)):
            self.best = value
            self._save(("best", "last"), epoch, skip, loader_rng, validated=True)  # one folder, two names
        else:
            self._save(("last",), epoch, skip, loader_rng, validated=True)

    def _recorded(self) -> list[str] | None:
        """The recorder's value columns (its names without 'epoch' and 'time'), None without one."""
        recorder = getattr(self.learn, "recorder", None)
        return None if recorder is None else list(recorder.metric_names[1:-1])

    def _monitored(self) -> float | None:
        names, recorder = self._recorded(), getattr(self.learn, "recorder", None)
        if not names or self.monitor not in names or not recorder.values:  # not kept: the default's
            return None
        value = recorder.values[-1][names.index(self.monitor)]
        return None if value is None else float(value)

    # -- resuming -------------------------------------------------------------------------
    def restore(self, state: dict) -> int:
        """Apply a checkpoint state to ``self.learn`` (model, optimizer); return the epoch to
        start from. Call after ``learn.create_opt()`` and before ``fit``."""
        meta = state["meta"]
        load_parameterized(state["folder"] / "model.safetensors", unwrap_model(self.learn.model))
        _optimizer_from_files(self.learn.opt, state["optimizer"], meta["optimizer"], unwrap_model(self.learn.model))
        rng = state["rng"]
        loader = {k.split(".", 1)[1]: v for k, v in rng.items() if k.startswith("loader.")}
        self.best = meta.get("best")
        self.clock.resume(meta)
        self._recorder_resume = (meta.get("recorder", {}), rng.get("recorder.smooth_loss"))
        self._resume = (meta["epoch"], meta["skip"], meta["train_iter"], loader,
                        ({k: v for k, v in rng.items() if k.startswith(("torch", "cuda.", "numpy"))}, meta["rng"]))
        # loggers continue from here (TensorBoard purge_step) and skip the epochs before
        self.learn.resume_iter, self.learn.resume_epoch = meta["train_iter"], meta["epoch"]
        return meta["epoch"]

    def _skipped_epoch(self) -> bool:
        return self._resume is not None and self.epoch < self._resume[0]

    def before_fit(self):
        names = self._recorded()  # after the Recorder's before_fit
        if self._monitor_given and names is not None and self.monitor not in names:  # `best` would never be written
            close = difflib.get_close_matches(self.monitor, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"Checkpointer monitor {self.monitor!r} is not a column of the recorder "
                             f"({', '.join(names)}){hint}")
        self._unquiet = quiet_skipped_epochs(self.learn, self._skipped_epoch) if (
            self._resume is not None and self._resume[0] > 0) else None

    def after_fit(self):
        if getattr(self, "_unquiet", None) is not None:
            self._unquiet()
        self._unquiet = None

    def _apply_resume_at_epoch_start(self) -> int:
        """Position the resumed epoch; returns the number of its batches already trained."""
        if self._resume is None or self.epoch != self._resume[0]:
            return 0
        epoch, skip, train_iter, loader_rng, global_rng = self._resume
        self.dls.train.set_rng_state(loader_rng)
        self.learn.train_iter = train_iter
        self._restore_recorder()
        if skip:
            # mid-epoch: the state was saved after batch `skip`, so it is restored once the
            # skipped batches are drawn, before the next one (see _finish_resume)
            self._pending_rng = global_rng
            self.learn.dl = _SkipFirst(self.learn.dl, skip, then=self._finish_resume)
        else:
            # epoch start: the state was saved at the previous epoch end, before this epoch's
            # loader iterator drew its base seed from the global generator: restore it now,
            # before that draw (restoring at the first batch put dropout one draw out of step)
            _set_global_rng(*global_rng)
            self._resume = None
        return skip

    def _restore_recorder(self) -> None:
        restore_recorder(self.learn, *getattr(self, "_recorder_resume", ({}, None)))

    def _finish_resume(self):
        if self._pending_rng is not None:
            _set_global_rng(*self._pending_rng)
            self._pending_rng, self._resume = None, None

    def before_batch(self):
        if self.training:
            self._finish_resume()

    def after_train(self):
        # an epoch whose batches were all skipped still ends the resume phase
        self._finish_resume()


class _SkipFirst:
    """A loader view that draws and drops the first ``n`` batches (keeping their RNG draws),
    then calls ``then()`` before drawing the next one."""

    def __init__(self, dl, n: int, then=lambda: None):
        self.dl, self.n, self.then = dl, n, then

    def __len__(self):
        return max(len(self.dl) - self.n, 0)

    def __iter__(self):
        it = iter(self.dl)
        for _ in range(self.n):
            next(it, None)
        self.then()
        yield from it

    def __getattr__(self, name):
        return getattr(self.dl, name)
