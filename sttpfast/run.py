"""One training run from a configuration: the code behind ``sttpfast train`` and apps/train.py.

The run folder (``train.out/NAME``) holds ``config.yaml`` (the merged configuration),
``checkpoints/last`` and ``checkpoints/best``, ``tb/`` (TensorBoard events),
``singular_values.png`` for learned spectra, and ``summary.json``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from sttpfast.config import save_config

__all__ = ["run_training", "run_name", "check_output", "prepare_run_dir", "RunError", "TrainingInterrupted"]

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class RunError(ValueError):
    """A run that cannot start (bad output folder, nothing to resume...)."""


class TrainingInterrupted(SystemExit):
    """Ctrl-C during training: the checkpoint is saved and the process should exit with 130.

    A SystemExit (not a KeyboardInterrupt), so that click and the CLI pass the exit status
    through instead of printing ``Aborted!`` with status 1."""

    def __init__(self, run_dir: Path):
        super().__init__(INTERRUPTED_EXIT_CODE)
        self.run_dir = run_dir


def run_name(cfg: dict) -> str:
    """The default run folder name: ``DATA-ARCH-PARAM[-rR|-zZ]-sSEED`` (path-safe)."""
    p = cfg["param"]
    size = f"-r{p['rank']}" if p["rank"] else (f"-z{p['compression']:g}" if p["compression"] else "")
    name = f"{cfg['data']['name']}-{cfg['model']['arch']}-{p['name']}{size}-s{cfg['train']['seed']}"
    return name.replace(":", "_").replace("/", "_").replace("\\", "_")


def _check_name(name: str) -> str:
    """A run name is one plain folder name inside ``--out``, never a path."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name
            or (os.altsep and os.altsep in name) or Path(name).is_absolute()):
        raise RunError(f"run name {name!r} is not a plain folder name: --name must not be empty, '.', '..', "
                       "absolute or contain a path separator (the run folder is created inside --out)")
    return name


def check_output(cfg: dict) -> tuple[Path, str]:
    """``(out folder, run name)`` after checking both; creates nothing (see prepare_run_dir)."""
    out = Path(cfg["train"]["out"]).expanduser()
    base = _check_name(cfg["train"]["name"]) if cfg["train"]["name"] else run_name(cfg)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunError(f"cannot write to output folder {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(f"cannot write to output folder {out}: permission denied on {existing}")
    return out, base


def prepare_run_dir(cfg: dict) -> Path:
    """Create a fresh run folder under ``train.out`` (a numbered suffix if the name is taken).
    Called once everything else about the run has been checked: failed starts leave nothing."""
    out, base = check_output(cfg)
    try:
        out.mkdir(parents=True, exist_ok=True)
        path, i = out / base, 2
        while path.exists():
            path, i = out / f"{base}-{i}", i + 1
        path.mkdir()
    except OSError as err:
        raise RunError(f"cannot write to output folder {out}: {err.strerror}") from None
    return path


def _broadcast(value, accelerator):
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def resume_config(run_dir: str | Path) -> tuple[Path, dict, dict]:
    """``(run_dir, config, checkpoint state)`` of a run to resume; RunError/CheckpointError."""
    from sttpfast.callbacks.checkpoint import load_checkpoint_state

    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"{run_dir} is not a run folder (no config.yaml)")
    from sttpfast.config import build_config

    cfg, _ = build_config([run_dir / "config.yaml"])
    state = load_checkpoint_state(run_dir / "checkpoints" / "last")
    return run_dir, cfg, state


def _finished(cfg: dict, meta: dict) -> bool:
    """Whether the checkpoint ``meta`` already reached the configured budget."""
    steps, epochs = cfg["optim"]["steps"], cfg["optim"]["epochs"]
    if steps is not None:
        return meta["train_iter"] >= steps
    return meta["epoch"] >= epochs and not meta["skip"]


def _raise_budget(cfg: dict, steps: int | None, epochs: int | None) -> bool:
    """Apply a larger ``steps`` / ``epochs`` to a resumed run's config; True if changed."""
    optim, changed = cfg["optim"], False
    if steps is not None and steps != optim["steps"]:
        optim["steps"], changed = steps, True
    if epochs is not None and epochs != optim["epochs"]:
        optim["epochs"], changed = epochs, True
        if steps is None:
            optim["steps"] = None  # an epoch budget replaces a step budget
    return changed


def run_training(cfg: dict | None = None, resume: str | Path | None = None, extra_cbs=(), echo=print,
                 steps: int | None = None, epochs: int | None = None) -> dict:
    """Train as configured (or continue ``resume``); returns the summary written to summary.json.

    Resuming a run that already reached its budget changes nothing: it says so and returns
    the run's summary.json (``"already_finished": True``). ``steps`` / ``epochs`` raise a
    resumed run's budget (saved to its config.yaml) so that it continues.
    Ctrl-C during training saves an exact-resume checkpoint, prints how to resume and
    raises :class:`TrainingInterrupted` (exit status 130)."""
    from accelerate.utils import set_seed
    from fastai.callback.progress import ProgressCallback

    from sttpfast.callbacks.checkpoint import Checkpointer
    from sttpfast.callbacks.distributed import AccelerateTrainer, make_accelerator, warn_missing_processes
    from sttpfast.callbacks.logging import TensorBoardLogger, WandbLogger
    from sttpfast.data import get_dls
    from sttpfast.learner import fit, spectral_learner

    state, budget_raised = None, False
    if resume is not None:
        run_dir, cfg, state = resume_config(resume)
        budget_raised = _raise_budget(cfg, steps, epochs)
        done = state["meta"]
        if _finished(cfg, done) and (run_dir / "summary.json").is_file():
            echo(f"{run_dir} is already finished ({done['train_iter']} steps); nothing changed. "
                 "To train further, resume with a larger optim.steps / optim.epochs")
            return {**json.loads((run_dir / "summary.json").read_text()), "already_finished": True}
    else:
        check_output(cfg)  # a bad --name / --out fails before any work
    accelerator = make_accelerator(cfg["train"]["mixed_precision"])
    warn_missing_processes(accelerator, echo)
    main = accelerator.is_main_process
    set_seed(cfg["train"]["seed"])
    d, o, p, r, lg = cfg["data"], cfg["optim"], cfg["param"], cfg["reg"], cfg["log"]
    dls = get_dls(d["name"], data_dir=d["data_dir"], bs=d["bs"], subset=d["subset"], download=d["download"],
                  num_workers=d["num_workers"], seed=cfg["train"]["seed"], augment=d["augment"],
                  device=accelerator.device)
    checkpointer = Checkpointer(every=cfg["train"]["checkpoint_every"])
    cbs = [AccelerateTrainer(accelerator), checkpointer]
    if main and lg["logger"] == "tensorboard":
        cbs.append(TensorBoardLogger(every=lg["every"]))
    elif main and lg["logger"] == "wandb":
        cbs.append(WandbLogger(project=lg["wandb_project"], config=cfg, every=lg["every"]))
    learn = spectral_learner(
        dls, cfg["model"]["arch"], param=p["name"], rank=p["rank"], compression=p["compression"],
        include=p["include"] or None, exclude=p["exclude"] or None, init=p["init"], opt=o["opt"], lr=o["lr"],
        mom=o["mom"], wd=o["wd"], d_optimal=r["d_optimal"], frobenius_decay=r["frobenius_decay"],
        spectral_bound=r["spectral_bound"], sv_every=lg["sv_every"], cbs=cbs + list(extra_cbs),
        model_kwargs=cfg["model"]["kwargs"], run_dir=run_dir if state is not None else None)
    if state is None:
        # data, model, parameterization and config are good: only now does the run folder exist
        run_dir = prepare_run_dir(cfg) if main else None
        run_dir = Path(_broadcast(str(run_dir) if run_dir else None, accelerator))
        learn.path = learn.run_dir = run_dir
    if not (main and lg["progress"]):
        learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, ProgressCallback)])
        learn.logger = _epoch_logger(learn, echo if main else (lambda *a: None))
    start_epoch = 0
    if state is not None:
        learn.create_opt()
        start_epoch = checkpointer.restore(state)
        echo(f"resuming {run_dir} at epoch {start_epoch}, step {state['meta']['train_iter']}")
    if main and (state is None or budget_raised):
        save_config(cfg, run_dir / "config.yaml")
    report = learn.compression
    if main:
        echo(f"run {run_dir}: {report.summary()}")
    started = time.time()
    try:
        fit(learn, epochs=o["epochs"], lr=o["lr"], schedule=o["schedule"], steps=o["steps"],
            start_epoch=start_epoch)
    except KeyboardInterrupt:
        _save_interrupted(learn, checkpointer, run_dir, echo if main else (lambda *a: None))
        raise TrainingInterrupted(run_dir) from None
    summary = _summary(learn, report, run_dir, time.time() - started, accelerator.num_processes)
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _save_interrupted(learn, checkpointer, run_dir: Path, echo) -> None:
    """After Ctrl-C: an exact-resume checkpoint, loggers closed, how to resume."""
    for cb in learn.cbs:
        shutdown = getattr(cb, "_shutdown", None)  # the loggers: flush what was logged
        if shutdown is not None:
            shutdown(cancelled=True)
    step = checkpointer.save_interrupted()
    where = run_dir / "checkpoints" / "last"
    if step is None:
        echo(f"interrupted before the first step of this session; {where} is unchanged")
    else:
        echo(f"interrupted at step {step}: checkpoint saved in {where}")
    echo(f"resume with: sttpfast train --resume {run_dir}")


def _epoch_logger(learn, echo):
    """One readable line per epoch (fastai prints raw lists when there is no progress bar)."""

    def log(values):
        pairs = zip(learn.recorder.metric_names, values)
        echo("  ".join(f"{n} {v:.4f}" if isinstance(v, float) else f"{n} {v}" for n, v in pairs))
    return log


def _summary(learn, report, run_dir: Path, seconds: float, processes: int) -> dict:
    recorder = learn.recorder
    names = list(recorder.metric_names[1:-1])
    last = dict(zip(names, (float(v) if v is not None else None for v in recorder.values[-1]))) if recorder.values else {}
    return {
        "run_dir": str(run_dir),
        "param": report.param, "rank": report.rank,
        "z_percent": round(report.z, 4), "weights_percent": round(report.weights_ratio, 4),
        "params_compressed": report.compressed_total, "params_dense": report.dense_total,
        "steps": int(getattr(learn, "train_iter", 0)), "seconds": round(seconds, 2), "processes": processes,
        "metrics": last, "best": getattr(_checkpointer(learn), "best", None),
        "nan_step": getattr(learn, "nan_step", None),
        "ranks_in_sync": getattr(learn, "ranks_in_sync", None), "rank_hashes": getattr(learn, "rank_hashes", None),
        "checkpoint": str(run_dir / "checkpoints" / "last"),
    }


def _checkpointer(learn):
    from sttpfast.callbacks.checkpoint import Checkpointer

    return next((cb for cb in learn.cbs if isinstance(cb, Checkpointer)), None)
