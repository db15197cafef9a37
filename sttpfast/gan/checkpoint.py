"""GAN checkpoints that resume exactly: G, D, the EMA of G, both optimizers, every random stream.

The same folders and the same crash-safe writer as the classification app
(:func:`sttpfast.atomic.write_checkpoint`: ``run_dir/checkpoints/ckpt-STEP`` with
``manifest.json``, the links ``last`` and ``best``), the same file names, so
:func:`sttpfast.callbacks.checkpoint.load_checkpoint_state` reads them:

* ``model.safetensors``: the :class:`~sttpfast.gan.GANPair` (``generator.*``,
  ``discriminator.*``, ``generator_ema.*``: factors + both parameterization specs);
* ``optimizer.safetensors``: both Adam states, ``generator.state.{i}.{name}`` and
  ``discriminator.state.{i}.{name}``;
* ``rng.safetensors``: torch / numpy global states, the learner's latent-code generator
  (``latent``), and the training loader's generators at the start of the current pass over
  the data (``loader.shuffle``, ``loader.augment``);
* ``state.json``: ``"app": "gan"``, the G step (``train_iter``), D steps, the fastai epoch to
  resume in, the batches drawn in the current pass, optimizer scalars, python's RNG, the
  metrics history and best value, the SR callback's running spectra (as tensors in
  ``rng.safetensors`` under ``sr.*``).

Resuming (:meth:`GANCheckpointer.restore`, then ``fit`` with the same budget): epochs
before the saved one are skipped (no training, no validation); at the start of the saved
epoch the counters are set, the loader is rewound to the pass start and the batches
already drawn are drawn again and dropped, and only then the global random state is
restored (creating the loader's iterator draws from it). The run then continues with
weights identical to an uninterrupted one (CPU, fixed seed).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from fastai.callback.core import Callback, CancelTrainException, CancelValidException
from safetensors.torch import save_file

from sttpfast.atomic import prune_checkpoints, read_pointer, set_pointer, write_checkpoint
from sttpfast.callbacks._util import is_main_process, unwrap_model
from sttpfast.callbacks.checkpoint import (CheckpointError, TrainingClock, _global_rng, _optimizer_from_files,
                                           _optimizer_to_files, _set_global_rng, quiet_skipped_epochs,
                                           recorder_state, restore_recorder)
from sttpfast.checkpoint import load_parameterized, save_parameterized
from sttpfast.fsdp import full_state_dict, is_sharded
from sttpfast.processes import world_size

__all__ = ["GANCheckpointer", "APP", "is_gan_checkpoint"]

APP = "gan"  # state.json's "app": tells a GAN checkpoint from a classifier's
_NETWORKS = ("generator", "discriminator")


def is_gan_checkpoint(folder: str | Path) -> bool:
    """Whether the checkpoint folder ``folder`` was written by :class:`GANCheckpointer`."""
    try:
        return json.loads((Path(folder) / "state.json").read_text()).get("app") == APP
    except (OSError, json.JSONDecodeError):
        return False


class GANCheckpointer(Callback):
    """Saves ``last`` every ``every`` G steps and at the end of fit, ``best`` when the
    metrics callback (``metrics``, a :class:`~sttpfast.gan.metrics.GANMetrics`) reports a new
    best value; :meth:`save_interrupted` after Ctrl-C / SIGTERM.

    Args:
        every: G steps between ``last`` checkpoints (None: only at the end and at evaluations).
        metrics: the run's GANMetrics (its history and best are saved and restored), or None.
        compensation: the run's SpectralCompensation (SR) callback (its running spectra are
            saved and restored), or None.
    Only the main process writes; sharded (FSDP2) networks are gathered whole on every rank
    first, and each rank loads its own slice of the same files on resume.
    """

    order = 70  # after GANMetrics (60) decided is_best for this step

    def __init__(self, every: int | None = None, metrics=None, compensation=None):
        self.every, self.metrics, self.compensation = every, metrics, compensation
        self.saved_iter = None
        self.saved_evaluation = None  # the metrics' newest evaluation step in the newest checkpoint
        self.saved_epoch = None  # the fastai epoch the newest checkpoint resumes in
        self._resume = None
        self._resume_epoch = 0  # the fastai epoch a checkpoint taken now resumes in
        self.clock = TrainingClock()  # the run's training seconds, saved in each checkpoint

    @property
    def root(self) -> Path:
        return Path(getattr(self.learn, "run_dir", None) or self.learn.path) / "checkpoints"

    # -- saving ---------------------------------------------------------------------------
    def _save(self, pointers: tuple[str, ...]) -> int | None:
        learn = self.learn
        if getattr(learn, "nan_step", None) is not None:
            return None
        pair = unwrap_model(learn.model)
        # sharded (FSDP2) networks: every rank takes part in gathering G, D, the EMA and both
        # optimizer states whole; rank 0 alone writes them, the files a one-process run writes
        sharded = is_sharded(pair)
        if not (sharded or is_main_process()):
            return None
        model_tensors = full_state_dict(pair) if sharded else None
        step = int(learn.train_iter)
        opt_tensors, opt_meta = {}, {}
        for name, opt in zip(_NETWORKS, (learn.opt_g, learn.opt_d)):
            tensors, meta = _optimizer_to_files(opt)
            opt_tensors.update({f"{name}.{k}": v for k, v in tensors.items()})
            opt_meta[name] = meta
        if not is_main_process():
            # every rank skips (or saves) the same steps: the gathering is collective
            self.saved_iter, self.saved_evaluation, self.saved_epoch = step, self._evaluated_at(), self._resume_epoch
            return step
        rng_tensors, rng_meta = _global_rng()
        if learn._rng is not None:
            rng_tensors["latent"] = learn._rng.get_state()
        if learn.reals_pass_rng is not None:
            rng_tensors.update({f"loader.{k}": v for k, v in learn.reals_pass_rng.items()})
        recorder, smooth = recorder_state(learn)  # the printed train_loss continues exactly
        if smooth is not None:
            rng_tensors["recorder.smooth_loss"] = smooth
        if self.compensation is not None:
            sr = self.compensation.state_dict()
            rng_tensors.update({f"sr.{k}": v.detach().cpu().contiguous() for k, v in sr["running_max"].items()})
        meta = {"app": APP, "train_iter": step, "d_iter": int(learn.d_iter), "epoch": self._resume_epoch,
                "reals_drawn": int(learn.reals_drawn), "reals_started": learn._reals is not None,
                "latent_device": None if learn._rng is None else learn._rng.device.type,
                "optimizer": opt_meta, "rng": rng_meta, "metrics": self._metrics_state(),
                "recorder": recorder,
                "sr_compensations": None if self.compensation is None else self.compensation.compensations,
                # the step's last losses: the summary of a resume with nothing left to train
                "losses": {name: None if loss is None else float(loss)
                           for name, loss in (("g", getattr(learn, "loss_g", None)), ("d", getattr(learn, "loss_d", None)))},
                "threads": torch.get_num_threads(), "seconds": self.clock.seconds(),
                "processes": world_size(), "batch": int(learn.dls.train.bs)}  # the global batch, for a resume
        files = {
            "model.safetensors": lambda path: save_parameterized(pair, path, metadata={"train_iter": step, "app": APP},
                                                             tensors=model_tensors),
            "optimizer.safetensors": lambda path: save_file(opt_tensors, str(path)),
            "rng.safetensors": lambda path: save_file(rng_tensors, str(path)),
            "state.json": json.dumps(meta),
        }
        folder = write_checkpoint(self.root, step, files, {"epoch": self._resume_epoch, "app": APP})
        for pointer in pointers:
            set_pointer(self.root, pointer, folder)
        prune_checkpoints(self.root, keep=2)
        self.saved_iter = learn.checkpoint_iter = step
        self.saved_evaluation, self.saved_epoch = self._evaluated_at(), self._resume_epoch
        return step

    def _metrics_state(self) -> dict | None:
        return None if self.metrics is None else self.metrics.state()

    def _evaluated_at(self) -> int | None:
        return None if self.metrics is None else self.metrics.evaluated_at

    def save_interrupted(self) -> int | None:
        """Save ``last`` where Ctrl-C stopped the fit (between iterations); the step saved, or
        None when this session trained nothing yet."""
        if self._resume is not None or not hasattr(self.learn, "opt_g") or self.learn.opt_g is None:
            return None
        if self.saved_iter == int(self.learn.train_iter):
            return self.saved_iter
        if int(self.learn.train_iter) == 0:
            return None
        return self._save(("last",))

    def after_batch(self):
        if not self.training:
            return
        self._resume_epoch = self.epoch  # mid-epoch: the rest of this epoch and its validation follow
        best = self.metrics is not None and self.metrics.is_best
        if best or (self.every and self.train_iter % self.every == 0):
            self._save(("best", "last") if best else ("last",))

    def after_epoch(self):
        if self._resume is not None:
            return
        step = int(self.learn.train_iter)
        # without --checkpoint-every: one checkpoint per epoch (as the classification app)
        if self.every is None and self.saved_iter != step:
            self._save(("last",))
        # an --every step that ends the epoch was saved before the epoch's validation: saved
        # again after it (as the classification app's epoch-end checkpoint), so that a run
        # stopped now resumes in the next epoch; resumed from the first, it validated this
        # epoch a second time and logged its row (epoch, losses) again at this step
        elif self.saved_iter == step and self.saved_epoch != self._resume_epoch:
            self._save(("last",))

    def after_validate(self):
        self._resume_epoch = self.epoch + 1  # validation consumed latent codes: resume after it

    def after_fit(self):
        if getattr(self, "_unquiet", None) is not None:
            self._unquiet()
            self._unquiet = None
        # after GANMetrics.after_fit (lower order): an end-of-run evaluation may be the best
        step = int(self.learn.train_iter)
        best = self.metrics is not None and self.metrics.is_best and self.metrics.best_step == step
        # the last step's --every checkpoint came before the end-of-run evaluation: save again,
        # so that the newest checkpoint holds the run's final metrics (a resume from the
        # older one evaluates again)
        if self.saved_iter != step or self.saved_evaluation != self._evaluated_at():
            self._save(("best", "last") if best else ("last",))
        elif best and is_main_process():
            set_pointer(self.root, "best", read_pointer(self.root, "last"))

    # -- resuming -------------------------------------------------------------------------
    def restore(self, state: dict) -> None:
        """Load a checkpoint state (from ``load_checkpoint_state``) into the learner's model and
        optimizers (call ``learn.create_opt()`` first); the rest is applied when the saved
        epoch starts."""
        meta = state["meta"]
        if meta.get("app") != APP:
            raise CheckpointError(f"{state['folder']} is not a GAN checkpoint")
        learn = self.learn
        self.clock.resume(meta)
        load_parameterized(state["folder"] / "model.safetensors", unwrap_model(learn.model))
        for name, opt in zip(_NETWORKS, (learn.opt_g, learn.opt_d)):
            prefix = f"{name}."
            tensors = {k[len(prefix):]: v for k, v in state["optimizer"].items() if k.startswith(prefix)}
            _optimizer_from_files(opt, tensors, meta["optimizer"][name], unwrap_model(learn.model))
        if self.metrics is not None and meta.get("metrics"):
            self.metrics.load_state(meta["metrics"])
        if self.compensation is not None and meta.get("sr_compensations") is not None:
            running = {k[3:]: v for k, v in state["rng"].items() if k.startswith("sr.")}
            self.compensation.load_state_dict({"running_max": running, "compensations": meta["sr_compensations"]})
        self._resume = state
        self.saved_iter, self.saved_epoch = int(meta["train_iter"]), int(meta["epoch"])
        learn.resume_iter, learn.resume_epoch = meta["train_iter"], meta["epoch"]

    def before_fit(self):
        epoch = 0 if self._resume is None else int(self._resume["meta"]["epoch"])
        self._unquiet = quiet_skipped_epochs(self.learn, lambda: self.epoch < epoch) if epoch > 0 else None

    def before_train(self):
        if self._resume is None:
            return
        epoch = self._resume["meta"]["epoch"]
        if self.epoch < epoch:
            raise CancelTrainException  # trained before the checkpoint
        self._apply_resume()

    def before_validate(self):
        if self._resume is not None and self.epoch < self._resume["meta"]["epoch"]:
            raise CancelValidException

    def _apply_resume(self) -> None:
        meta, rng = self._resume["meta"], self._resume["rng"]
        learn = self.learn
        self._resume = None
        learn.train_iter, learn.d_iter = int(meta["train_iter"]), int(meta["d_iter"])
        restore_recorder(learn, meta.get("recorder") or {}, rng.get("recorder.smooth_loss"))
        losses = meta.get("losses") or {}  # what the summary reports if nothing is left to train
        learn.loss_g, learn.loss_d = (None if losses.get(k) is None else torch.tensor(losses[k]) for k in ("g", "d"))
        if "latent" in rng:
            learn.generator_rng(meta["latent_device"] or "cpu").set_state(rng["latent"])
        loader = {k.split(".", 1)[1]: v for k, v in rng.items() if k.startswith("loader.")}
        learn._reals = None
        if meta["reals_started"] and loader:
            # replay the current pass: same order, same draws from the global generator
            learn.dls.train.set_rng_state(loader)
            learn.reals_pass_rng = {k: v.clone() for k, v in loader.items()}
            learn._reals = iter(learn.dls.train)
            for _ in range(int(meta["reals_drawn"])):
                next(learn._reals)
            learn.reals_drawn = int(meta["reals_drawn"])
        _set_global_rng({k: v for k, v in rng.items() if k.startswith(("torch", "cuda.", "numpy"))}, meta["rng"])
        self._resume_epoch = int(meta["epoch"])
