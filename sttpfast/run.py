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

__all__ = ["run_training", "run_name", "prepare_run_dir", "RunError"]


class RunError(ValueError):
    """A run that cannot start (bad output folder, nothing to resume...)."""


def run_name(cfg: dict) -> str:
    p = cfg["param"]
    size = f"-r{p['rank']}" if p["rank"] else (f"-z{p['compression']:g}" if p["compression"] else "")
    data = cfg["data"]["name"].replace(":", "_").replace("/", "_")
    return f"{data}-{cfg['model']['arch']}-{p['name']}{size}-s{cfg['train']['seed']}"


def prepare_run_dir(cfg: dict) -> Path:
    """Create a fresh run folder under ``train.out`` (a numbered suffix if the name is taken)."""
    out = Path(cfg["train"]["out"]).expanduser()
    base = cfg["train"]["name"] or run_name(cfg)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".sttpfast-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RunError(f"cannot write to output folder {out}: {err.strerror}") from None
    path, i = out / base, 2
    while path.exists():
        path, i = out / f"{base}-{i}", i + 1
    path.mkdir()
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


def run_training(cfg: dict | None = None, resume: str | Path | None = None, extra_cbs=(), echo=print) -> dict:
    """Train as configured (or continue ``resume``); returns the summary written to summary.json."""
    from accelerate.utils import set_seed
    from fastai.callback.progress import ProgressCallback

    from sttpfast.callbacks.checkpoint import Checkpointer
    from sttpfast.callbacks.distributed import AccelerateTrainer, make_accelerator
    from sttpfast.callbacks.logging import TensorBoardLogger, WandbLogger
    from sttpfast.data import get_dls
    from sttpfast.learner import fit, spectral_learner

    state = None
    if resume is not None:
        run_dir, cfg, state = resume_config(resume)
    accelerator = make_accelerator(cfg["train"]["mixed_precision"])
    main = accelerator.is_main_process
    set_seed(cfg["train"]["seed"])
    if state is None:
        run_dir = prepare_run_dir(cfg) if main else None
        run_dir = Path(_broadcast(str(run_dir) if run_dir else None, accelerator))
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
        model_kwargs=cfg["model"]["kwargs"], run_dir=run_dir)
    if not (main and lg["progress"]):
        learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, ProgressCallback)])
        learn.logger = _epoch_logger(learn, echo if main else (lambda *a: None))
    start_epoch = 0
    if state is not None:
        learn.create_opt()
        start_epoch = checkpointer.restore(state)
        echo(f"resuming {run_dir} at epoch {start_epoch}, step {state['meta']['train_iter']}")
    elif main:
        save_config(cfg, run_dir / "config.yaml")
    report = learn.compression
    if main:
        echo(f"run {run_dir}: {report.summary()}")
    started = time.time()
    fit(learn, epochs=o["epochs"], lr=o["lr"], schedule=o["schedule"], steps=o["steps"], start_epoch=start_epoch)
    summary = _summary(learn, report, run_dir, time.time() - started, accelerator.num_processes)
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


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
        "steps": int(learn.train_iter), "seconds": round(seconds, 2), "processes": processes,
        "metrics": last, "best": getattr(_checkpointer(learn), "best", None),
        "nan_step": getattr(learn, "nan_step", None),
        "ranks_in_sync": getattr(learn, "ranks_in_sync", None), "rank_hashes": getattr(learn, "rank_hashes", None),
        "checkpoint": str(run_dir / "checkpoints" / "last"),
    }


def _checkpointer(learn):
    from sttpfast.callbacks.checkpoint import Checkpointer

    return next((cb for cb in learn.cbs if isinstance(cb, Checkpointer)), None)
