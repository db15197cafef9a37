"""One training run from a configuration: the code behind ``sttpfast train`` and apps/train.py.

The run folder (``train.out/NAME``) holds ``config.yaml`` (the merged configuration),
``checkpoints/ckpt-STEP`` folders with the links ``checkpoints/last`` and ``checkpoints/best``,
``tb/`` (TensorBoard events), ``singular_values.png`` for learned spectra, ``summary.json``
and ``.lock`` (the pid of the process using the run). Every file is written atomically
(:mod:`sttpfast.atomic`), one process at a time (:mod:`sttpfast.run_lock`); SIGTERM, SIGINT
and SIGUSR1 checkpoint (:mod:`sttpfast.callbacks.signals`).
"""
from __future__ import annotations

import json
import os
import signal
import warnings
from contextlib import contextmanager
from pathlib import Path

from sttpfast.atomic import clean_temporaries, try_making, write_file
from sttpfast.config import ConfigError, flat_rank, load_yaml, save_config
from sttpfast.processes import is_main_rank, world_size
from sttpfast.run_lock import RunLock, RunLocked

__all__ = ["run_training", "run_name", "check_output", "prepare_run_dir", "RunError", "TrainingInterrupted"]

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class RunError(ValueError):
    """A run that cannot start (bad output folder, nothing to resume...)."""


class TrainingInterrupted(SystemExit):
    """Ctrl-C / SIGTERM during training: the checkpoint is saved and the process should exit
    with 128 + the signal number (130 for SIGINT, 143 for SIGTERM).

    A SystemExit (not a KeyboardInterrupt), so that click and the CLI pass the exit status
    through instead of printing ``Aborted!`` with status 1."""

    def __init__(self, run_dir: Path, code: int = INTERRUPTED_EXIT_CODE):
        super().__init__(code)
        self.run_dir = run_dir


def run_name(cfg: dict) -> str:
    """The default run folder name: ``DATA-ARCH-PARAM[-rR|-zZ]-sSEED`` (path-safe)."""
    p = cfg["param"]
    rank = "x".join(map(str, flat_rank(p["rank"]))) if isinstance(p["rank"], list) else p["rank"]  # a tuple rank
    size = f"-r{rank}" if rank else (f"-z{p['compression']:g}" if p["compression"] else "")
    if not size and p.get("rank_scale"):
        size = f"-rs{p['rank_scale']:g}"
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
    """``(out folder, run name)`` after checking both (the missing folders are made and removed
    again: one that cannot be made is refused now); leaves nothing (see prepare_run_dir)."""
    out = Path(cfg["train"]["out"]).expanduser()
    base = _check_name(cfg["train"]["name"]) if cfg["train"]["name"] is not None else run_name(cfg)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunError(f"cannot write to output folder {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(f"cannot write to output folder {out}: permission denied on {existing}")
    if is_main_rank():  # the one process that writes; the others' probes raced with its own
        run = out / base  # probed down to the run folder itself: /proc exists but takes no folder
        _probe_folders(run if not run.exists() else out, existing)
    return out, base


def _probe_folders(out: Path, existing: Path) -> None:
    """Make the missing folders from ``existing`` down to ``out`` and remove them again: a
    folder that cannot be made (``/proc/x``, a full or read-only disk) is refused before any
    work, not after it (RunError)."""
    err = try_making(out, existing)
    if err is not None:
        raise RunError(f"cannot write to output folder {err.filename}: {err.strerror}")


def prepare_run_dir(cfg: dict) -> Path:
    """Create a fresh run folder under ``train.out`` (a numbered suffix if the name is taken);
    its absolute path. Called once everything else about the run has been checked: failed starts leave nothing."""
    out, base = check_output(cfg)
    try:
        out.mkdir(parents=True, exist_ok=True)
        path, i = out / base, 2
        while path.exists():
            path, i = out / f"{base}-{i}", i + 1
        path.mkdir()
    except OSError as err:
        raise RunError(f"cannot write to output folder {out}: {err.strerror}") from None
    return path.absolute()  # as a resume names it (a relative --out was "out/r" here, absolute there)


def name_taken(cfg: dict, run_dir: Path) -> str | None:
    """The warning when the folder of the run's name (``--name``, or the one derived from the
    config) existed and the run got a numbered one instead. A run there with a checkpoint is
    named as the one a later ``--resume`` of the name continues."""
    name = cfg["train"]["name"] if cfg["train"]["name"] is not None else run_name(cfg)
    if run_dir.name == name:
        return None
    taken = run_dir.parent / name
    if not (taken / "config.yaml").is_file():  # a folder or file of that name, not a run
        return f"warning: {taken} exists: this run is {run_dir}"
    if last_checkpoint(taken) is None:  # nothing a --resume could continue (it refuses)
        return (f"warning: {taken} exists (a run named {name} that stopped before its first checkpoint): "
                f"this run is {run_dir}")
    return (f"warning: {taken} exists (a run named {name}): this run is {run_dir}; "
            f"--resume {taken} continues that one")


def _broadcast(value, accelerator):
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def run_folder_problem(run_dir: Path) -> str | None:
    """Why ``run_dir`` is not a run folder (missing, no ``config.yaml`` or an empty one), or
    None. An empty config would read as the defaults: a resume then compared them with the
    checkpoint ("trained at data.bs 64 ... now says 128")."""
    config = run_dir / "config.yaml"
    if not run_dir.exists():
        return f"{run_dir} does not exist"
    if not config.is_file():
        return f"{run_dir} is not a run folder (no config.yaml)"
    try:
        empty = not load_yaml(config)  # no bytes, a comment alone, {} or ---: the defaults
    except ConfigError:
        return None  # unreadable or not YAML: said by whoever reads it, with the file named
    return f"{run_dir} is not a run folder: its config.yaml is empty" if empty else None


def resume_config(run_dir: str | Path, warn=print, command: str = "train") -> tuple[Path, dict, dict]:
    """``(run_dir, config, checkpoint state)`` of a run to resume: the newest complete
    checkpoint (a damaged newer one is skipped with a warning); RunError/CheckpointError
    (naming ``command``, the one resuming, where it says how to start the run again)."""
    from sttpfast.callbacks.checkpoint import load_checkpoint_state

    run_dir = Path(run_dir).expanduser().absolute()  # summary.json names it as a fresh run does
    problem = run_folder_problem(run_dir)
    if problem is not None:
        raise RunError(problem)
    compressed = _read_json(run_dir / COMPRESS_REPORT)
    if (compressed is not None and 2 not in compressed.get("requested_phases", [2])
            and not any((run_dir / "checkpoints").glob("ckpt-*"))):
        # `compress` without phase 2 saves the model alone (checkpoints/last/model.safetensors)
        raise RunError(f"{run_dir} holds a compressed model without a training state (compressed without "
                       "phase 2): it cannot be resumed; compress again with phase 2 (--phases 0,2)")
    from sttpfast.config import build_config, load_yaml

    cfg, _ = build_config([run_dir / "config.yaml"])
    if "keep_dense_if_no_gain" not in (load_yaml(run_dir / "config.yaml").get("param") or {}):
        # a run from before the dense-layer policy: it parameterized every selected layer
        cfg["param"]["keep_dense_if_no_gain"] = False
    checkpoints = run_dir / "checkpoints"
    if not (checkpoints.is_dir() and any(checkpoints.glob("ckpt-*"))):
        raise RunError(f"{run_dir} has no checkpoint: it stopped before its first one, and there is nothing to "
                       f"resume. Start it again with: sttpfast {command} --cfg {run_dir / 'config.yaml'} --out "
                       f"{run_dir.parent} (in a new, numbered folder next to it unless you remove this one first)")
    # the process that writes the run's checkpoints sets damaged ones aside (out of the rotation)
    state = load_checkpoint_state(run_dir / "checkpoints", warn=lambda msg: warn(f"warning: {msg}"),
                                  set_aside_damaged=is_main_rank())
    return run_dir, cfg, state


def _lock_run(run_dir: Path) -> RunLock:
    """Take the run folder's lock (RunError naming the holder's pid if another process has
    it) and remove the temporaries a killed process left behind."""
    try:
        lock = RunLock(run_dir).acquire()
    except RunLocked as err:
        raise RunError(str(err)) from None
    clean_temporaries(run_dir)
    clean_temporaries(run_dir / "checkpoints")
    return lock


def checkpoint_finished(cfg: dict, meta: dict) -> bool:
    """Whether the checkpoint ``meta`` already reached the configured budget, the last
    epoch's validation included (a checkpoint written after the last step, before that
    validation, is not finished; checkpoints older than the ``validated`` flag count as)."""
    steps, epochs = cfg["optim"]["steps"], cfg["optim"]["epochs"]
    if steps is not None:
        return meta["train_iter"] >= steps and meta.get("validated", True)
    return meta["epoch"] >= epochs and not meta["skip"]


#: summary.json sections a resume keeps: written by the command that made the run (compress)
KEPT_ON_RESUME = ("compress",)
#: the phases' results of `sttpfast compress` in its output run folder
COMPRESS_REPORT = "compress_report.json"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_summary(run_dir: Path) -> dict | None:
    return _read_json(run_dir / "summary.json")


def _kept_sections(run_dir: Path, summary: dict) -> dict:
    """The sections of the run's earlier summary.json that the final one keeps (compress's
    phases, written when phase 2 started, see :data:`KEPT_ON_RESUME`), with phase 2's result
    (this run's) filled in; compress_report.json is rewritten to match."""
    kept = {k: v for k, v in (_read_summary(run_dir) or {}).items() if k in KEPT_ON_RESUME}
    if "compress" in kept:
        phase_2 = {"accuracy": summary["metrics"].get("accuracy"), "z_percent": summary["z_percent"],
                   "steps": summary["steps"]}
        if summary.get("nan_step") is not None:
            phase_2["nan_step"] = summary["nan_step"]
        kept["compress"]["phases"]["2"] = phase_2
        write_file(run_dir / COMPRESS_REPORT, json.dumps(kept["compress"], indent=2))
        # phase 2 trains per-layer ranks (param.layer_ranks): the shared rank is compress's
        kept["rank"] = kept["compress"]["rank"]
    return kept


def finished_summary(run_dir: Path, meta: dict) -> dict | None:
    """The run's summary.json when it was written at the checkpoint's step (the run ended
    there); None otherwise (none yet, or one of a smaller budget, before a resume raised it)."""
    summary = _read_summary(run_dir)
    if summary is None or summary.get("steps") != meta["train_iter"]:
        return None
    return _relocated(summary, run_dir)


def _relocated(summary: dict, run_dir: Path) -> dict:
    """``summary`` with the paths it names under its ``run_dir`` moved to ``run_dir``: a run
    folder copied or moved elsewhere printed its old location (the file is not rewritten)."""
    old = summary.get("run_dir")
    if not isinstance(old, str) or old == str(run_dir):
        return summary
    return {key: (str(run_dir) + value[len(old):] if isinstance(value, str)
                  and (value == old or value.startswith(old + os.sep)) else value)
            for key, value in summary.items()}


def _processes(n: int) -> str:
    return f"{n} process" + ("es" if n != 1 else "")


def check_global_batch(run_dir: Path, meta: dict, processes: int, bs: int, key: str) -> None:
    """Refuse a resume whose global batch (``bs`` per process x ``processes``) is not the one the
    checkpoint ``meta`` was trained at (RunError saying how to keep it): the steps per epoch and
    the learning-rate schedule would change without a word. Checkpoints that predate the record
    (no ``processes`` / ``batch``) pass."""
    before, batch = meta.get("processes"), meta.get("batch")
    if before is None or batch is None or before * batch == processes * bs:
        return
    then, now = before * batch, processes * bs
    config = run_dir / "config.yaml"
    if before == processes:
        raise RunError(f"{run_dir} was trained at {key} {batch} per process; its config.yaml now says {bs}: the "
                       f"steps per epoch and the learning-rate schedule would change. Set {key}: {batch} in {config}")
    keep = (f", or set {key}: {then // processes} in {config} to keep the global batch of {then}"
            if then % processes == 0 else "")
    raise RunError(f"{run_dir} was trained by {_processes(before)} at a global batch of {then} ({key} {batch} each); "
                   f"this resume runs {_processes(processes)}, whose global batch would be {now}: the steps per epoch "
                   f"and the learning-rate schedule would change. Resume with {_processes(before)}{keep}")


def check_budget(run_dir: Path, meta: dict, steps: int | None, epochs: int | None = None,
                 budget_steps: int | None = None, budget_epochs: int | None = None) -> None:
    """Refuse a resume budget below what the checkpoint ``meta`` already trained, or below the
    run's own budget in the same unit (``budget_steps``, else ``budget_epochs``): a lower one
    would cut the learning-rate schedule short mid-way (RunError)."""
    done = meta["train_iter"]
    if steps is not None and steps < done:
        raise RunError(f"{run_dir} has trained {done} steps: a resume can only raise the budget "
                       f"(--steps {steps} is below them)")
    if epochs is not None and "skip" in meta:
        least = meta["epoch"] + (1 if meta["skip"] else 0)  # a started epoch must be finished
        if epochs < least:
            where = f"into epoch {least}" if meta["skip"] else f"{least} epochs"
            raise RunError(f"{run_dir} has trained {done} steps, {where}: a resume can only raise the budget "
                           f"(--epochs {epochs} is below them)")
    if steps is not None and budget_steps is not None and steps < budget_steps:
        raise RunError(f"{run_dir} has a budget of {budget_steps} steps ({done} trained): a resume can only "
                       f"raise the budget (--steps {steps} is below it)")
    if epochs is not None and budget_steps is None and budget_epochs is not None and epochs < budget_epochs:
        raise RunError(f"{run_dir} has a budget of {budget_epochs} epochs ({done} steps trained): a resume can "
                       f"only raise the budget (--epochs {epochs} is below it)")
    # a budget in the other unit: compared in steps, at the run's steps per epoch
    per_epoch = (done - meta.get("skip", 0)) // meta["epoch"] if meta.get("epoch") else None
    if per_epoch:
        if epochs is not None and steps is None and budget_steps is not None and epochs * per_epoch < budget_steps:
            raise RunError(f"{run_dir} has a budget of {budget_steps} steps ({done} trained): a resume can only "
                           f"raise the budget (--epochs {epochs} is {epochs * per_epoch} steps, below it)")
        if steps is not None and budget_steps is None and budget_epochs is not None \
                and steps < budget_epochs * per_epoch:
            raise RunError(f"{run_dir} has a budget of {budget_epochs} epochs, {budget_epochs * per_epoch} steps "
                           f"({done} trained): a resume can only raise the budget (--steps {steps} is below it)")


def _raise_budget(cfg: dict, steps: int | None, epochs: int | None) -> bool:
    """Apply a larger ``steps`` / ``epochs`` to a resumed run's config; True if changed."""
    optim, changed = cfg["optim"], False
    if steps is not None and steps != optim["steps"]:
        optim["steps"], changed = steps, True
    if epochs is not None and epochs != optim["epochs"]:
        optim["epochs"], changed = epochs, True
    if epochs is not None and steps is None and optim["steps"] is not None:
        # an epoch budget replaces a step budget (also when it equals the config's epochs,
        # which a step budget ignores)
        optim["steps"], changed = None, True
    return changed


def run_training(cfg: dict | None = None, resume: str | Path | None = None, extra_cbs=(), echo=print,
                 steps: int | None = None, epochs: int | None = None, announce=(), progress: bool | None = None) -> dict:
    """Train as configured (or continue ``resume``); returns the summary written to summary.json.

    ``announce``: lines said (by rank 0) once the data, the model and its parameterization are
    built and checked, before the run folder exists: what the run chose (the CLI's rank line),
    after any error about them.

    Resuming a run that already reached its budget changes nothing: it says so and returns
    the run's summary.json (``"already_finished": True``). ``steps`` / ``epochs`` raise a
    resumed run's budget (saved to its config.yaml) so that it continues; ``progress`` turns a
    resumed run's progress bar on or off (saved too).
    Ctrl-C (SIGINT) or SIGTERM during training saves an exact-resume checkpoint after the
    current step, prints how to resume and raises :class:`TrainingInterrupted` (exit status
    130 / 143); SIGUSR1 saves one and continues. Another process on the same run folder is
    refused (RunError naming its pid)."""
    import torch

    from sttpfast.callbacks.distributed import make_accelerator

    state, config_changed, lock = None, False, None
    try:
        if resume is not None:
            run_dir = Path(resume).expanduser()
            if (run_dir / "config.yaml").is_file() and is_main_rank():
                lock = _lock_run(run_dir)  # before reading: nobody else writes while we decide
            run_dir, cfg, state = resume_config(resume, echo)
            done = state["meta"]
            if done.get("app") == "gan":
                raise RunError(f"{run_dir} is a GAN run; resume it with: sttpfast gan --resume {run_dir}")
            check_budget(run_dir, done, steps, epochs, cfg["optim"]["steps"], cfg["optim"]["epochs"])
            config_changed = _raise_budget(cfg, steps, epochs)
            if progress is not None and progress != cfg["log"]["progress"]:
                cfg["log"]["progress"], config_changed = progress, True  # config.yaml says the new value
            finished = finished_summary(run_dir, done) if checkpoint_finished(cfg, done) else None
            if finished is not None:
                echo(f"{run_dir} is already finished ({done['train_iter']} steps); nothing changed. "
                     "To train further, resume with a larger --steps or --epochs")
                return {**finished, "already_finished": True}
            accelerator = make_accelerator(cfg["train"]["mixed_precision"])
            check_global_batch(run_dir, done, accelerator.num_processes, cfg["data"]["bs"], "data.bs")
            threads = done.get("threads")
            if threads is not None and threads != torch.get_num_threads():
                echo(f"warning: the run was checkpointed with {threads} CPU threads, this process uses "
                     f"{torch.get_num_threads()}: results can differ in the last bits from an uninterrupted run")
        else:
            check_output(cfg)  # a bad --name / --out fails before any work
            accelerator = make_accelerator(cfg["train"]["mixed_precision"])
        return _train(cfg, state, config_changed, accelerator, run_dir if state is not None else None,
                      extra_cbs, echo, lock, announce)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg, state, config_changed, accelerator, run_dir, extra_cbs, echo, lock, announce=()) -> dict:
    from accelerate.utils import set_seed
    from fastai.callback.progress import ProgressCallback

    from sttpfast.callbacks.checkpoint import Checkpointer
    from sttpfast.callbacks.distributed import AccelerateTrainer, warn_missing_processes
    from sttpfast.callbacks.logging import TensorBoardLogger, WandbLogger
    from sttpfast.callbacks.signals import SignalCheckpoint
    from sttpfast.data import get_dls
    from sttpfast.learner import fit, say_placeholder_init, spectral_learner
    from sttpfast.surgery import check_rank_useful

    warn_missing_processes(accelerator, echo)
    main = accelerator.is_main_process
    say = echo if main else (lambda *a: None)
    set_seed(cfg["train"]["seed"])
    d, o, p, r, lg = cfg["data"], cfg["optim"], cfg["param"], cfg["reg"], cfg["log"]
    with saying_warnings(say):
        dls = get_dls(d["name"], data_dir=d["data_dir"], bs=d["bs"], subset=d["subset"], download=d["download"],
                      num_workers=d["num_workers"], seed=cfg["train"]["seed"], augment=d["augment"],
                      device=accelerator.device)
    checkpointer = Checkpointer(every=cfg["train"]["checkpoint_every"])
    signals = SignalCheckpoint(checkpointer.save_interrupted, say)
    cbs = [AccelerateTrainer(accelerator), checkpointer, signals]
    if main and lg["logger"] == "tensorboard":
        cbs.append(TensorBoardLogger(every=lg["every"]))
    elif main and lg["logger"] == "wandb":
        cbs.append(WandbLogger(project=lg["wandb_project"], config=cfg, every=lg["every"]))
    if state is None:
        say_placeholder_init(p["name"], p["init"], say)
    with warnings.catch_warnings(record=True) as caught:  # said as `warning:` lines below
        warnings.simplefilter("always")
        learn = spectral_learner(
            dls, cfg["model"]["arch"], param=p["name"], rank=p.get("layer_ranks") or p["rank"],
            compression=p["compression"], plan=p.get("plan"), rank_scale=p.get("rank_scale"),
            unrepresentable=p.get("unrepresentable"), keep_dense_if_no_gain=p.get("keep_dense_if_no_gain", True),
            include=p["include"] or None, exclude=p["exclude"] or None,
            # a resume loads every factor from the checkpoint: the layers take the placeholders,
            # not a spectral init the load throws away (CP's ALS: minutes on resnet18)
            init=p["init"] if state is None else "identity", opt=o["opt"], lr=o["lr"],
            mom=o["mom"], wd=o["wd"], d_optimal=r["d_optimal"], frobenius_decay=r["frobenius_decay"],
            spectral_bound=r["spectral_bound"], sv_every=lg["sv_every"], cbs=cbs + list(extra_cbs),
            model_kwargs=cfg["model"]["kwargs"], run_dir=run_dir,
            img_size=d.get("img_size"), attention=p.get("attention"), attention_rank=p.get("attention_rank"),
            echo=say)
    if state is None and p["compression"] is None and not p.get("layer_ranks"):  # a new run only
        try:
            check_rank_useful(p["name"], p["rank"], learn.compression)
        except ValueError as err:
            raise RunError(str(err)) from None
    for line in announce:
        say(line)
    say_warnings(caught, say)
    if state is None:
        # data, model, parameterization and config are good: only now does the run folder exist
        run_dir = prepare_run_dir(cfg) if main else None
        run_dir = Path(_broadcast(str(run_dir) if run_dir else None, accelerator))
        learn.path = learn.run_dir = run_dir
        if main:
            lock = _lock_run(run_dir)
            taken = name_taken(cfg, run_dir)
            if taken:
                say(taken)
    try:
        return _fit_and_summarize(learn, cfg, state, config_changed, accelerator, run_dir, checkpointer,
                                  signals, say, fit, ProgressCallback, main)
    finally:
        if state is None and lock is not None:
            lock.release()


def say_warnings(caught, say) -> None:
    """The project's own warnings of building the run (a layer left dense, a rank that does
    not fit...) as ``warning:`` lines; any other warning goes on as Python shows it."""
    package = str(Path(__file__).resolve().parent)
    for w in caught:
        if issubclass(w.category, UserWarning) and str(w.filename).startswith(package):
            say(f"warning: {w.message}")
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


@contextmanager
def saying_warnings(say):
    """Collects the warnings raised inside; on leaving, the project's own are said as
    ``warning:`` lines (:func:`say_warnings`), at once: ``get_dls`` reading another folder
    than ``--data-dir`` is said before the model is built."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    say_warnings(caught, say)


def _fit_and_summarize(learn, cfg, state, config_changed, accelerator, run_dir, checkpointer, signals, say, fit,
                       ProgressCallback, main) -> dict:
    o, lg = cfg["optim"], cfg["log"]
    if not (main and lg["progress"]):
        learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, ProgressCallback)])
        learn.logger = _epoch_logger(learn, say)
    start_epoch = 0
    if state is not None:
        learn.create_opt()
        start_epoch = checkpointer.restore(state)
        say(f"resuming {run_dir} at epoch {start_epoch}, step {state['meta']['train_iter']}")
    if main and (state is None or config_changed):
        write_file(run_dir / "config.yaml", lambda path: save_config(cfg, path, "train"))
    report = learn.compression
    if cfg["param"].get("compression") is not None and report.rank is not None:
        say(f"rank {report.rank} gives Z = {report.z:.2f}%")  # the shared rank the target chose
    if report.plan:  # per-layer ranks: print the plan and keep it with the run
        say(report.plan_table())
        if main and state is None:  # a resume keeps the run's own (the energies its plan chose by)
            write_file(run_dir / "rank_plan.json", json.dumps(report.plan, indent=2))
    if report.left_dense:  # --compression left some layers dense: which and why, before training
        say(report.left_dense_table())
    say(f"run {run_dir}: {report.summary()}")
    checkpointer.clock.start()
    signals.install()
    try:
        if state is None or not checkpoint_finished(cfg, state["meta"]):
            fit(learn, epochs=o["epochs"], lr=o["lr"], schedule=o["schedule"], steps=o["steps"],
                start_epoch=start_epoch)
    except KeyboardInterrupt as stop:
        signals.uninstall()
        _save_interrupted(learn, checkpointer, run_dir, say)
        raise TrainingInterrupted(run_dir, 128 + getattr(stop, "signum", signal.SIGINT)) from None
    finally:
        signals.uninstall()
    summary = _summary(learn, report, run_dir, checkpointer.clock.seconds(), accelerator.num_processes, state)
    if main:
        summary.update(_kept_sections(run_dir, summary))  # what it holds beyond training (compress's phases)
        write_file(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def _save_interrupted(learn, checkpointer, run_dir: Path, echo, command: str = "train", step: str = "step") -> None:
    """After Ctrl-C: an exact-resume checkpoint, loggers closed, how to resume (``sttpfast
    COMMAND --resume``; ``step`` names what the run counts, e.g. ``G step``)."""
    from sttpfast.callbacks._util import end_progress_line

    end_progress_line(learn)  # a bar drawn part-way: the message goes below it, not onto its line
    for cb in learn.cbs:
        shutdown = getattr(cb, "_shutdown", None)  # the loggers: flush what was logged
        if shutdown is not None:
            shutdown(cancelled=True)
    saved = checkpointer.save_interrupted()
    where = run_dir / "checkpoints" / "last"
    if saved is None:
        echo(f"interrupted before the first {step} of this session; {where} is unchanged")
    else:
        echo(f"interrupted at {step} {saved}: checkpoint saved in {where}")
    processes = world_size()
    launch = f" (launched as this run was: {_processes(processes)})" if processes > 1 else ""
    echo(f"resume with: sttpfast {command} --resume {run_dir}{launch}")


def _epoch_logger(learn, echo):
    """One readable line per epoch (fastai prints raw lists when there is no progress bar)."""

    def log(values):
        pairs = zip(learn.recorder.metric_names, values)
        echo("  ".join(f"{n} {v:.4f}" if isinstance(v, float) else f"{n} {v}" for n, v in pairs))
    return log


def _summary(learn, report, run_dir: Path, seconds: float, processes: int, state: dict | None = None) -> dict:
    """The run's summary; a resumed run that had nothing left to train (killed after its
    last checkpoint, before summary.json) takes its metrics and step from that checkpoint."""
    recorder = learn.recorder
    if getattr(recorder, "values", None):
        names = list(recorder.metric_names[1:-1])
        last = dict(zip(names, (float(v) if v is not None else None for v in recorder.values[-1])))
    else:
        last = dict((state or {}).get("meta", {}).get("metrics") or {})
    steps = int(getattr(learn, "train_iter", 0)) or int((state or {}).get("meta", {}).get("train_iter", 0))
    return {
        "run_dir": str(run_dir),
        "param": report.param, "rank": report.rank,
        "z_percent": round(report.z, 4), "weights_percent": round(report.weights_ratio, 4),
        "params_compressed": report.compressed_total, "params_dense": report.dense_total,
        "steps": steps, "seconds": round(seconds, 2), "processes": processes,
        "metrics": last, "best": getattr(_checkpointer(learn), "best", None),
        "nan_step": getattr(learn, "nan_step", None),
        "ranks_in_sync": getattr(learn, "ranks_in_sync", None), "rank_hashes": getattr(learn, "rank_hashes", None),
        "checkpoint": last_checkpoint(run_dir),
    }


def last_checkpoint(run_dir: str | Path) -> str | None:
    """The run's last checkpoint folder, None when the run stopped before writing one."""
    last = Path(run_dir) / "checkpoints" / "last"
    return str(last) if last.exists() else None


def _checkpointer(learn):
    from sttpfast.callbacks.checkpoint import Checkpointer

    return next((cb for cb in learn.cbs if isinstance(cb, Checkpointer)), None)
