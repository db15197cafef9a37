"""One GAN run from a configuration: the code behind ``sttpfast gan`` and apps/gan.py.

    cfg, _ = build_config(cli={"data.name": "digits", "gan.d_param": "sttp-c", "gan.rank": 8,
                               "gan.steps": 200})
    summary = run_gan(cfg)                       # or run_gan(resume="runs/digits-gan-...")

The run folder is the classification app's (:mod:`sttpfast.run`): ``config.yaml`` (the merged
configuration, ``gan`` section included), ``checkpoints/ckpt-STEP`` with ``last`` / ``best``
(written by :class:`~sttpfast.gan.checkpoint.GANCheckpointer` through the same crash-safe
writer), ``tb/`` (TensorBoard: losses, learning rate, ``sv/<layer>/sigma_max`` of every G
and D layer, metrics, sample grids), ``samples/samples_STEP.png`` and ``metrics.jsonl`` at
each evaluation, ``summary.json`` and ``.lock``. Only the main process writes. SIGINT /
SIGTERM checkpoint after the current iteration and exit with 130 / 143 and the command that
resumes; SIGUSR1 checkpoints and goes on. A resumed run ends with the weights of an
uninterrupted one (CPU, fixed seed).

Several processes: DDP-like (``torchrun``, ``accelerate launch`` with a multi-process
config: every process holds G and D whole, :mod:`sttpfast.gan.distributed`), or sharded
with an FSDP2 config (``configs/accelerate/cpu_2proc_fsdp2.yaml``, ``gpu_fsdp2.yaml``): G, D
and G's EMA each sharded over the processes (:func:`~sttpfast.gan.distributed.shard_gan`),
checkpoints gathered whole and written by rank 0, metrics sampled on every rank. Under FSDP2
``--d-param sr`` and ``gan.sn_exact`` are refused (:func:`check_fsdp2`).

Every setting is checked before anything is created: unknown parameterizations (with the
closest names), a rank above what any layer can use, ``n_dis < 1`` (the schema), a missing
Inception weights or extractor file. A failed start leaves no run folder.
"""
from __future__ import annotations

import difflib
import json
import signal
from pathlib import Path

from fastai.callback.core import Callback

from sttpfast.atomic import write_file
from sttpfast.callbacks._util import log_scalars
from sttpfast.config import save_config
from sttpfast.processes import is_main_rank
from sttpfast.run import (RunError, TrainingInterrupted, _broadcast, _epoch_logger, _lock_run, _save_interrupted,
                          check_budget, check_global_batch, check_output, finished_summary, last_checkpoint,
                          name_taken, prepare_run_dir, resume_config, saying_warnings)

__all__ = ["run_gan", "gan_run_name", "check_gan_config", "check_fsdp2", "GANLossLogger", "SR"]

SR = "sr"  # d_param for spectral regularization: a dense D with dynamic compensation (Liu et al. 2019)


def gan_run_name(cfg: dict) -> str:
    """The default run folder name: ``DATA-gan-GPARAM-DPARAM[-rR]-sSEED`` (path-safe)."""
    g = cfg["gan"]
    rank = g["d_rank"] or g["rank"] or g["g_rank"]
    size = f"-r{rank}" if rank else ""
    name = f"{cfg['data']['name']}-gan-{g['g_param']}-{g['d_param']}{size}-s{cfg['train']['seed']}"
    return name.replace(":", "_").replace("/", "_").replace("\\", "_")


def _named(cfg: dict) -> dict:
    """``cfg`` whose ``train.name`` is the GAN default when unset (for sttpfast.run's folder helpers)."""
    name = gan_run_name(cfg) if cfg["train"]["name"] is None else cfg["train"]["name"]  # "" is refused later
    return {**cfg, "train": {**cfg["train"], "name": name}}


def _check_param(key: str, name: str, allow_sr: bool) -> str:
    from sttpfast.params import ALL_PARAMS, resolve_param

    if allow_sr and name == SR:
        return SR
    try:
        return resolve_param(name)
    except ValueError:
        valid = list(ALL_PARAMS) + ([SR] if allow_sr else [])
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise ValueError(f"unknown {key} {name!r}; {hint}allowed: {', '.join(valid)}") from None


def check_gan_config(cfg: dict) -> dict:
    """Check what the schema cannot (parameterization names, files); returns the ``gan``
    section with canonical names. ValueError naming the bad setting; nothing is built."""
    g = dict(cfg["gan"])
    g["g_param"] = _check_param("gan.g_param (--g-param)", g["g_param"], allow_sr=False)
    g["d_param"] = _check_param("gan.d_param (--d-param)", g["d_param"], allow_sr=True)
    if g["sn_exact"] and g["d_param"] != "sn":
        raise ValueError(f"--sn-exact (gan.sn_exact) needs --d-param sn (gan.d_param), got {g['d_param']!r}")
    _check_ranks_apply(g)
    _check_metric_settings_apply(g)
    if not g["metrics"]:
        raise ValueError("gan.metrics is empty: give one or more of fid, isc, kid (leave --metrics-every out for no "
                         "metrics)")
    unknown = [m for m in g["metrics"] if m not in ("fid", "isc", "kid")]
    if unknown:
        raise ValueError(f"gan.metrics: unknown {unknown!r}; allowed: fid, isc, kid")
    if g["best_by"] not in g["metrics"]:
        raise ValueError(f"gan.best_by {g['best_by']!r} is not among gan.metrics {g['metrics']}")
    if g["metrics_every"] is not None:
        if g["metrics_samples"] < 2:
            raise ValueError(f"gan.metrics_samples must be at least 2, got {g['metrics_samples']}")
        weights = g["inception_weights"]
        if g["extractor"] == "inception" and weights is not None:
            if not Path(weights).expanduser().is_file():
                raise ValueError(f"--inception-weights (gan.inception_weights): file not found: {weights}")
            from sttpfast.gan.metrics import check_inception_state

            try:
                check_inception_state(Path(weights).expanduser())
            except ValueError as err:
                raise ValueError(f"--inception-weights (gan.inception_weights): {err}") from None
        if g["extractor"] not in ("inception", "offline") and not Path(g["extractor"]).expanduser().is_file():
            raise ValueError(f"--extractor (gan.extractor): extractor file not found: {g['extractor']}")
    return g


def _takes_rank(param: str) -> bool:
    from sttpfast.params.registry import method

    return param != SR and method(param).rank_kind is not None


def _full_rank_lines(g: dict) -> list[str]:
    """A low-rank side given no rank runs at full rank: said before the run starts, as
    ``train`` says its rank (it ran D at Z 93% without a word)."""
    return [f"{side} {g[f'{key}_param']}: rank full (no --rank or --{key}-rank given: every layer at its full rank)"
            for key, side in (("g", "G"), ("d", "D"))
            if _takes_rank(g[f"{key}_param"]) and g[f"{key}_rank"] is None and g["rank"] is None]


def _check_ranks_apply(g: dict) -> None:
    """A rank given for networks that take none (dense, sn, sr) is refused, naming its flag."""
    for key, role in (("g", "generator"), ("d", "discriminator")):
        param = g[f"{key}_param"]
        if g[f"{key}_rank"] is not None and not _takes_rank(param):
            raise ValueError(f"--{key}-rank (gan.{key}_rank) has no meaning for the {role}'s {param} (it keeps "
                             "the full weights); leave it out")
    if g["rank"] is not None and not (_takes_rank(g["g_param"]) or _takes_rank(g["d_param"])):
        raise ValueError(f"--rank (gan.rank) has no meaning here: the generator is {g['g_param']} and the "
                         f"discriminator {g['d_param']}, neither takes a rank; leave it out")


def _check_metric_settings_apply(g: dict) -> None:
    """Metric settings changed from their defaults without ``gan.metrics_every`` are refused
    (they would be ignored), each named by its flag where it has one."""
    from sttpfast.config import GAN_CLI_FLAGS, GAN_METRIC_KEYS, SCHEMA

    if g["metrics_every"] is not None:
        return
    flags = {key: flag for flag, key in GAN_CLI_FLAGS.items()}
    changed = []
    for key in GAN_METRIC_KEYS:
        if g[key.split(".", 1)[1]] != SCHEMA[key].default:
            changed.append(f"--{flags[key].replace('_', '-')} ({key})" if key in flags else key)
    if changed:
        verb, pronoun = ("has", "it") if len(changed) == 1 else ("have", "them")
        raise ValueError(f"{', '.join(changed)} {verb} no effect without --metrics-every (gan.metrics_every): "
                         f"set it, or leave {pronoun} out")


def check_fsdp2(cfg: dict) -> None:
    """Under an FSDP2 launch (``FSDP_VERSION=2``), refuse the GAN settings that do not run on
    sharded networks yet (:data:`~sttpfast.gan.distributed.FSDP2_UNSUPPORTED`), with one
    ValueError naming them, before anything is built."""
    from sttpfast.fsdp import fsdp2_requested
    from sttpfast.gan.distributed import FSDP2_UNSUPPORTED

    if not fsdp2_requested():
        return
    g = cfg["gan"]
    used = [FSDP2_UNSUPPORTED[key] for key, on in (("sn_exact", bool(g["sn_exact"])), ("sr", g["d_param"] == SR)) if on]
    if used:
        raise ValueError(f"`sttpfast gan` under an FSDP2 config (FSDP_VERSION=2) does not support {'; '.join(used)} "
                         "yet: leave it out, or launch with configs/accelerate/cpu_2proc_gloo.yaml or "
                         "gpu_ddp_multinode.yaml (DDP: every process holds the whole networks)")


def _useful_rank(model, param: str, skip: set[str]) -> int | None:
    """The largest rank any selectable layer of ``model`` can use under ``param`` (None: no limit)."""
    from torch import nn

    from sttpfast.params.registry import method

    largest = method(param).largest_useful_rank
    if largest is None:
        return None
    transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    ranks = [largest(tuple(m.weight.shape), isinstance(m, transposed)) for name, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *transposed)) and name not in skip]
    return max(ranks) if ranks else None


def _check_rank(which: str, model, param: str, rank: int | None, skip: set[str] = frozenset()) -> None:
    if rank is None or param in ("dense", "sn", SR):
        return
    useful = _useful_rank(model, param, skip)
    if useful is not None and rank > useful:
        raise ValueError(f"rank {rank} is larger than any layer of the {which} allows under {param}: "
                         f"the largest useful rank there is {useful}")


def _build_networks(g: dict, in_chans: int):
    """``(G, D)`` as configured, with their ranks checked (before any parameterization)."""
    from torch import nn

    from sttpfast.models import create_model

    def build(role: str, key: str):
        # a kwarg the network does not take, or sizes it cannot be built with: the user's
        # free-form gan.*_kwargs, said as such (without any, timm's own ValueErrors pass through)
        kwargs = g[f"{key}_kwargs"]
        try:
            return create_model(g[key], in_chans=in_chans, **kwargs)
        except (TypeError, RuntimeError, ValueError) as err:
            if isinstance(err, ValueError) and not kwargs:
                raise
            raise RunError(f"gan.{key}_kwargs: the {role} {g[key]!r} cannot be built with {kwargs}: {err}") from None

    generator, discriminator = build("generator", "g"), build("discriminator", "d")
    # G's first Linear (z -> features) is never parameterized (gan_learner), so its rank does not count
    first = next((n for n, m in generator.named_modules() if isinstance(m, nn.Linear)), None)
    _check_rank("generator", generator, g["g_param"], g["g_rank"] or g["rank"], {first} if first else set())
    _check_rank("discriminator", discriminator, g["d_param"], g["d_rank"] or g["rank"])
    return generator, discriminator


def _finished(cfg: dict, meta: dict) -> bool:
    """Whether the checkpoint ``meta`` reached the G-step budget, the end-of-run evaluation
    included when the run has metrics: a checkpoint of the last step written before that
    evaluation is not finished (a run that ended has its summary.json: see finished_summary)."""
    if meta["train_iter"] < cfg["gan"]["steps"]:
        return False
    metrics = meta.get("metrics") or {}
    return cfg["gan"]["metrics_every"] is None or metrics.get("evaluated_at", meta["train_iter"]) == meta["train_iter"]


def run_gan(cfg: dict | None = None, resume: str | Path | None = None, extra_cbs=(), echo=print,
            steps: int | None = None, progress: bool | None = None) -> dict:
    """Train a GAN as configured (or continue the run folder ``resume``); returns the summary
    written to summary.json. ``steps`` raises a resumed run's G-step budget (the linear
    learning-rate decay then follows the new budget from there on); ``progress`` turns a
    resumed run's progress bar on or off (both saved to its config.yaml). Resuming a finished run
    changes nothing (``"already_finished": True``). Ctrl-C / SIGTERM: checkpoint, then
    :class:`~sttpfast.run.TrainingInterrupted` (exit status 130 / 143)."""
    from sttpfast.callbacks.distributed import make_accelerator

    state, lock = None, None
    try:
        if resume is not None:
            run_dir = Path(resume).expanduser()
            if (run_dir / "config.yaml").is_file() and is_main_rank():
                lock = _lock_run(run_dir)
            run_dir, cfg, state = resume_config(resume, echo, command="gan")
            if state["meta"].get("app") != "gan":
                raise RunError(f"{run_dir} is not a GAN run; resume it with: sttpfast train --resume {run_dir}")
            check_budget(run_dir, state["meta"], steps, budget_steps=cfg["gan"]["steps"])
            config_changed = steps is not None and steps != cfg["gan"]["steps"]
            if config_changed:
                cfg["gan"]["steps"] = int(steps)
            if progress is not None and progress != cfg["log"]["progress"]:
                cfg["log"]["progress"], config_changed = progress, True
            # summary.json of this very step: the run ended here (its checkpoint may predate
            # the end-of-run evaluation in runs from before that was checkpointed)
            finished = finished_summary(run_dir, state["meta"])
            if state["meta"]["train_iter"] >= cfg["gan"]["steps"] and finished is not None:
                echo(f"{run_dir} is already finished ({state['meta']['train_iter']} G steps); nothing changed. "
                     "To train further, resume with a larger --steps")
                return {**finished, "already_finished": True}
        else:
            config_changed = False
            for line in _full_rank_lines(check_gan_config(cfg)) if is_main_rank() else ():
                echo(line)
            check_output(_named(cfg))
            run_dir = None
        check_fsdp2(cfg)
        accelerator = make_accelerator("no")
        if state is not None:
            check_global_batch(run_dir, state["meta"], accelerator.num_processes, cfg["gan"]["bs"], "gan.bs")
        return _train(cfg, state, config_changed, accelerator, run_dir, extra_cbs, echo, lock)
    finally:
        if lock is not None:
            lock.release()


def _callbacks(cfg: dict, g: dict, main: bool, say, sharded: bool = False):
    """``(checkpointer, signals, metrics or None, every callback of the run)``."""
    from sttpfast.callbacks.compensation import SpectralCompensation
    from sttpfast.callbacks.logging import TensorBoardLogger, WandbLogger
    from sttpfast.callbacks.signals import SignalCheckpoint
    from sttpfast.gan.checkpoint import GANCheckpointer
    from sttpfast.gan.distributed import GANGradientSync

    lg = cfg["log"]
    metrics = None
    # sharded networks: every rank samples for the metrics (collectives), the main one writes
    if g["metrics_every"] is not None and (main or sharded):
        from sttpfast.gan.metrics import GANMetrics

        extractor = g["extractor"] if g["extractor"] in ("inception", "offline") else Path(g["extractor"]).expanduser()
        metrics = GANMetrics(every=g["metrics_every"], samples=g["metrics_samples"], metrics=g["metrics"],
                             extractor=extractor, feature_extractor_weights_path=g["inception_weights"],
                             best_by=g["best_by"], grid=g["grid"], batch_size=g["bs"],
                             extractor_steps=g["extractor_steps"], extractor_kwargs=g["extractor_kwargs"],
                             seed=cfg["train"]["seed"])
    compensation = SpectralCompensation(every=g["sr_every"]) if g["d_param"] == SR else None
    checkpointer = GANCheckpointer(every=cfg["train"]["checkpoint_every"], metrics=metrics, compensation=compensation)
    signals = SignalCheckpoint(checkpointer.save_interrupted, say)
    cbs = [GANGradientSync(), checkpointer, signals, GANLossLogger(every=lg["every"])]
    if metrics is not None:
        cbs.append(metrics)
    if compensation is not None:
        cbs.append(compensation)
    if main and lg["logger"] == "tensorboard":
        cbs.append(TensorBoardLogger(every=lg["every"]))
    elif main and lg["logger"] == "wandb":
        cbs.append(WandbLogger(project=lg["wandb_project"], config=cfg, every=lg["every"]))
    return checkpointer, signals, metrics, cbs


def _train(cfg, state, config_changed, accelerator, run_dir, extra_cbs, echo, lock) -> dict:
    from accelerate.utils import set_seed

    from sttpfast.callbacks.distributed import warn_missing_processes
    from sttpfast.callbacks.spectral import SingularValueLogger
    from sttpfast.data import get_dls
    from sttpfast.fsdp import fsdp2_requested
    from sttpfast.gan.distributed import shard_gan
    from sttpfast.gan.learner import gan_learner
    from sttpfast.learner import say_init_cost

    warn_missing_processes(accelerator, echo)
    main = accelerator.is_main_process
    say = echo if main else (lambda *a: None)
    g = check_gan_config(cfg)
    seed = cfg["train"]["seed"]
    set_seed(seed)
    d = cfg["data"]
    with saying_warnings(say):
        dls = get_dls(d["name"], data_dir=d["data_dir"], bs=g["bs"], subset=d["subset"], download=d["download"],
                      num_workers=d["num_workers"], seed=seed, augment=False, device=accelerator.device)
    generator, discriminator = _build_networks(g, dls.in_chans)
    sharded = fsdp2_requested() and accelerator.num_processes > 1
    checkpointer, signals, metrics, cbs = _callbacks(cfg, g, main, say, sharded)
    d_param = "dense" if g["d_param"] == SR else g["d_param"]
    if state is None:  # a resume loads every factor from its checkpoint: no spectral init to say
        for param in dict.fromkeys((g["g_param"], d_param)):
            say_init_cost(param, None, say)
    with saying_warnings(say):  # a side's surgery warnings as `warning:` lines, as train says them
        learn = gan_learner(
            dls, g=generator, d=discriminator, g_param=g["g_param"], d_param=d_param,
            init=None if state is None else "identity",
            rank=g["rank"], g_rank=g["g_rank"], d_rank=g["d_rank"], loss=g["loss"], n_dis=g["n_dis"],
            lr_g=g["lr_g"], lr_d=g["lr_d"], betas_g=(g["beta1"], g["beta2"]), betas_d=(g["beta1"], g["beta2"]),
            lr_decay=g["lr_decay"], ema_decay=g["ema"], ema_start=g["ema_start"], dequantize=g["dequantize"],
            sn_exact=g["sn_exact"], d_optimal=g["d_optimal"], sv_every=cfg["log"]["sv_every"], seed=seed,
            cbs=cbs + list(extra_cbs), run_dir=run_dir)
    if sharded:
        shard_gan(learn.model, main, say)  # before the optimizers: they step the shards
    if not any(isinstance(cb, SingularValueLogger) for cb in learn.cbs):
        learn.add_cb(SingularValueLogger(every=cfg["log"]["sv_every"]))  # sigma_max of every G and D layer
    if state is None:
        # data, networks, parameterizations and metrics are good: only now does the folder exist
        run_dir = prepare_run_dir(_named(cfg)) if main else None
        run_dir = Path(_broadcast(str(run_dir) if run_dir else None, accelerator))
        learn.path = learn.run_dir = run_dir
        if main:
            lock = _lock_run(run_dir)
            taken = name_taken(_named(cfg), run_dir)
            if taken:
                say(taken)
    try:
        return _fit(learn, cfg, state, config_changed, accelerator, run_dir, checkpointer, signals, metrics, say, main)
    finally:
        if state is None and lock is not None:
            lock.release()


def _fit(learn, cfg, state, config_changed, accelerator, run_dir, checkpointer, signals, metrics, say, main) -> dict:
    from fastai.callback.progress import ProgressCallback

    if not (main and cfg["log"]["progress"]):
        learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, ProgressCallback)])
        learn.logger = _epoch_logger(learn, say)
    if state is not None:
        learn.create_opt()
        checkpointer.restore(state)
        say(f"resuming {run_dir} at G step {state['meta']['train_iter']}")
    if main and (state is None or config_changed):
        write_file(run_dir / "config.yaml", lambda path: save_config(cfg, path, "gan"))
    say(f"run {run_dir}: G {learn.g_param} Z = {learn.compression_g.z:.2f}%, "
        f"D {cfg['gan']['d_param']} Z = {learn.compression_d.z:.2f}%")
    if metrics is not None:
        say(metrics.plan(len(learn.dls.train.dataset), learn.dls.dataset_name))
    checkpointer.clock.start()
    signals.install()
    try:
        if state is None or not _finished(cfg, state["meta"]):
            learn.fit(cfg["gan"]["steps"])
    except KeyboardInterrupt as stop:
        signals.uninstall()
        _save_interrupted(learn, checkpointer, run_dir, say, command="gan", step="G step")
        raise TrainingInterrupted(run_dir, 128 + getattr(stop, "signum", signal.SIGINT)) from None
    finally:
        signals.uninstall()
    summary = _summary(learn, cfg, run_dir, checkpointer.clock.seconds(), accelerator.num_processes, metrics, state)
    if main:
        write_file(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def _extractor_record(metrics, run_dir: Path) -> dict | None:
    """What the metrics were measured with, for a user to judge them: an extractor file's name,
    validation accuracy and training steps (an offline one's quality was shown nowhere)."""
    if metrics is None or metrics.extractor == "inception":
        return None
    path = metrics.weights_path
    if path is None and metrics.extractor == "offline":  # a resume with nothing left to train
        path = run_dir / "extractor.safetensors"
    if path is None or not Path(path).is_file():
        return None
    from sttpfast.gan.extractor import read_extractor_metadata

    meta = read_extractor_metadata(path)
    return {"name": meta["name"], "valid_accuracy": meta["valid_accuracy"], "steps": meta["steps"]}


def _summary(learn, cfg, run_dir: Path, seconds: float, processes: int, metrics, state) -> dict:
    meta = (state or {}).get("meta", {})
    steps = int(getattr(learn, "train_iter", 0))
    # a resume with nothing left to train (killed after its last checkpoint): the checkpoint's
    # counts and losses
    d_steps, loss_g, loss_d = int(getattr(learn, "d_iter", 0)), _float(learn.loss_g), _float(learn.loss_d)
    if not steps and meta:
        losses = meta.get("losses") or {}
        steps, d_steps, loss_g, loss_d = int(meta["train_iter"]), int(meta["d_iter"]), losses.get("g"), losses.get("d")
    rg, rd = learn.compression_g, learn.compression_d
    best = None
    if metrics is not None and metrics.best is not None:
        best = {"metric": metrics.best_name, "value": metrics.best, "step": metrics.best_step}
    g = cfg["gan"]
    return {
        "run_dir": str(run_dir), "app": "gan", "extractor": _extractor_record(metrics, run_dir),
        "g": g["g"], "d": g["d"], "g_param": learn.g_param,
        "d_param": g["d_param"], "g_rank": rg.rank, "d_rank": rd.rank,
        "g_z_percent": round(rg.z, 4), "d_z_percent": round(rd.z, 4),
        "g_params": rg.compressed_total, "g_params_dense": rg.dense_total,
        "d_params": rd.compressed_total, "d_params_dense": rd.dense_total,
        "steps": steps, "d_steps": d_steps, "seconds": round(seconds, 2),
        "processes": processes, "loss_g": loss_g, "loss_d": loss_d,
        "metrics": dict(metrics.values) if metrics is not None else {}, "best": best,
        "ranks_in_sync": getattr(learn, "ranks_in_sync", None),
        "nan_step": getattr(learn, "nan_step", None),
        "checkpoint": last_checkpoint(run_dir),
    }


def _float(value):
    return None if value is None else float(value)


class GANLossLogger(Callback):
    """Sends ``gan/loss_g`` and ``gan/loss_d`` (the iteration's last of each) to the loggers
    every ``every`` G steps."""

    order = 65  # before the loggers (70), which flush at a checkpoint step
    run_valid = False

    def __init__(self, every: int = 10):
        self.every = int(every)

    def after_batch(self):
        step = int(self.learn.train_iter)
        if self.training and step % self.every == 0 and self.learn.loss_g is not None:
            log_scalars(self.learn, {"gan/loss_g": float(self.learn.loss_g), "gan/loss_d": float(self.learn.loss_d)},
                        step)
