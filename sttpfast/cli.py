"""The ``sttpfast`` command line (click).

Every bad input ends in one ``Error: ...`` line and exit status 2, never a traceback; Ctrl-C
before training starts ends in one line and exit status 130.

Start-up is cheap: this module imports click and the config schema only (no torch), so
``--help`` answers at once; each command imports what it needs when it runs. The options
are built from the schema in :mod:`sttpfast.config` (types, choices, help), and the
parameterization names are checked after parsing by :func:`sttpfast.params.resolve_param`.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import sys
import threading
import time
import typing
import warnings
from pathlib import Path

import click

from sttpfast.config import (CLI_FLAGS, FULL_RANK, GAN_CLI_FLAGS, SCHEMA, ConfigError, ConfigWarning, attention_rank_of,
                             build_config, check_sections_read, choices, coerce, flatten, load_yaml, named_by_flags,
                             type_members)
from sttpfast.processes import is_main_rank, world_size

__all__ = ["main", "CLIError"]

INTERRUPTED = "interrupted before training started; nothing was written"
#: the same for the commands that train nothing (export, info)
INTERRUPTED_NO_TRAINING = "interrupted; nothing was written"
TRAINING_COMMANDS = ("train", "gan", "compress")


def _interrupted_line() -> str:
    """What Ctrl-C before any work says: 'before training started' only where training follows."""
    context = click.get_current_context(silent=True)
    # the command's own name: apps/train.py runs `train` under the name "apps/train.py"
    command = context.command.name if context is not None else None
    return INTERRUPTED if command in TRAINING_COMMANDS or command is None else INTERRUPTED_NO_TRAINING
#: what Ctrl-C in `compress` outside phase 2's training left, by the stage it came in
COMPRESS_INTERRUPTED = {
    "start-up": INTERRUPTED, "phase 0": "interrupted in phase 0; nothing was written",
    "phase 1": "interrupted in phase 1; nothing was written (phase 1 keeps no checkpoint)",
    "phase 2": "interrupted as phase 2 started, before its first step: phases 0 and 1 are not kept",
    "writing": "interrupted while writing the compressed run: its folder may be incomplete",
}


#: seconds a rank other than 0 waits before saying its error (see :meth:`CLIError.show`); 3 s
#: was too short on a quiet machine: torchrun had not ended rank 1 when rank 0 said the same error
RANK_ERROR_WAIT = 10.0


class CLIError(click.ClickException):
    """A usage problem: printed as one line, exit status 2.

    Launched on several processes, every rank meets a bad input alike, and each printed the
    line. A rank other than 0 waits :data:`RANK_ERROR_WAIT` seconds first: rank 0 says the
    error and the launcher ends the others in that time (torchrun's agent checks its workers
    every 0.1 s), so the line comes once (on one machine: another node's ranks may not be
    ended in that time, and say it too, naming their rank). A rank still alive after the wait
    met an error of its own (rank 0 carries on) and says it, naming the rank."""

    exit_code = 2

    def show(self, file=None) -> None:
        if not is_main_rank() and world_size() > 1:
            leave = lambda signum, frame: os._exit(self.exit_code)  # noqa: E731  (the launcher ends it)
            with _signal_handler(leave, signal.SIGINT, signal.SIGTERM):
                time.sleep(RANK_ERROR_WAIT)
            self.message = f"(rank {os.environ['RANK']}) {self.message}"
        super().show(file)


@contextlib.contextmanager
def interrupts_end_start_up():
    """While the command imports torch, fastai and the rest, Ctrl-C ends it at once with one
    line and exit 130. A KeyboardInterrupt raised inside a C extension's initialization comes
    out as an ImportError traceback (scipy's, seen here) or a death by SIGINT, so the handler
    leaves from where it runs instead of raising; nothing has been written yet."""

    def leave(signum, frame):
        if is_main_rank():  # Ctrl-C in a terminal reaches every rank: rank 0 says it
            os.write(2, (_interrupted_line() + "\n").encode())
        os._exit(128 + signum)  # 130 for Ctrl-C, 143 for SIGTERM (it died without a word)

    with _signal_handler(leave, signal.SIGINT, signal.SIGTERM):
        yield


@contextlib.contextmanager
def _signal_handler(handler, *signums):
    """``handler`` for ``signums`` while the block runs, the previous handlers back after it.
    Outside the main thread (where signal.signal refuses) nothing changes; a previous handler
    installed from C (None to Python) cannot be put back and stays replaced."""
    try:
        previous = {sig: signal.signal(sig, handler) for sig in signums}
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for sig, before in previous.items():
            if before is not None:
                signal.signal(sig, before)


def _import_training_modules():
    """Import what a training run imports lazily, so that it happens during start-up."""
    import accelerate  # noqa: F401
    import fastai.callback.progress  # noqa: F401

    import sttpfast.callbacks  # noqa: F401
    import sttpfast.data  # noqa: F401
    import sttpfast.learner  # noqa: F401
    import sttpfast.run  # noqa: F401


def user_errors(fn):
    """Turn the library's ValueErrors (bad arguments, bad files) into CLIError, and Ctrl-C
    that reaches this level (start-up: imports, data, model) into one line and exit 130. A
    command that returns leaves its process group first (several processes)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            # SIGTERM's default action killed the process without a word once the imports were
            # done; training installs its own handler over this one and puts it back
            with _signal_handler(_raise_terminated, signal.SIGTERM):
                result = fn(*args, **kwargs)
            _end_processes()
            return result
        except SystemExit:  # a deliberate exit, the same on every process (interrupted, diverged)
            _end_processes()
            raise
        except ValueError as err:
            raise CLIError(str(err)) from None
        except KeyboardInterrupt as stop:
            if is_main_rank():  # Ctrl-C in a terminal reaches every rank: rank 0 says it
                click.echo(_interrupted_line(), err=True)
            sys.exit(128 + getattr(stop, "signum", signal.SIGINT))

    return wrapper


class Terminated(KeyboardInterrupt):
    """SIGTERM outside training (which checkpoints its own): the command ends as after Ctrl-C,
    with one line and exit status 143."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated()


#: dotted key -> the flag that sets it (train's, gan's, compress's); the dataset is an argument
FLAG_OF_KEY = {key: "--" + name.replace("_", "-") for flags in (CLI_FLAGS, GAN_CLI_FLAGS)
               for name, key in flags.items() if name != "dataset"} | {"reg.frobenius_decay": "--frobenius-decay"}


def _keys_set_in(files, overrides) -> set[str]:
    """The dotted keys the config files and ``--set`` pairs set (a pair's key may be a section)."""
    keys = {pair.partition("=")[0].strip() for pair in overrides}
    for path in files:
        keys.update(flatten(load_yaml(path)))
    return keys


def _build_config(files, overrides, explicit) -> tuple[dict, dict]:
    """:func:`~sttpfast.config.build_config`, its notes (a value a later source overrides) said
    as ``warning:`` lines; Python showed them with the file and line of sttpfast's code. An
    error in a value a flag gave names the flag (``--rank 0``), not the key."""
    for key, value in explicit.items():  # each flag's own value first: its error names the flag
        if key in FLAG_OF_KEY:
            try:
                coerce(key, value)
            except ConfigError as err:
                raise ConfigError(named_by_flags(str(err), {key: FLAG_OF_KEY[key]})) from None
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConfigWarning)
            return build_config(files, overrides, explicit)
    except ConfigError as err:
        # the method's checks of a value ("--rank [2, 0, 2]: tt: ...", "--param: unknown ...") and
        # the rules across keys ("give either --rank or --compression", "--rank 8: 'sn' takes no
        # rank") name the flags whose keys no file or --set also set; a file's or --set's value,
        # an unknown key and its suggestion stay in the config's words
        message = str(err)
        if message.startswith(("give either", "config ")) or re.match(r"[\w.]+ = ", message):
            elsewhere = _keys_set_in(files, overrides)
            flags = {key: FLAG_OF_KEY[key] for key in explicit
                     if key in FLAG_OF_KEY and not any(key == k or key.startswith(k + ".") for k in elsewhere)}
            message = named_by_flags(message, flags)
        raise ConfigError(message) from None
    finally:  # also before a later value's error
        for w in caught:
            if issubclass(w.category, ConfigWarning):
                click.echo(f"warning: {w.message}")
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _end_processes() -> None:
    """A command launched on several processes ends together: a barrier, then the process
    group goes (sttpfast.callbacks.distributed.end_processes). A command that joined no
    process group imports nothing for it."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        from sttpfast.callbacks.distributed import end_processes

        end_processes()


RANK_SYNTAX = ("a positive integer (8), comma-separated integers for a tensor format's tuple rank (4,8,8,4: "
               "TT bonds; 8,6: Tucker's R_out,R_in; 4x8x8x4 works too) or an HT rank tree in parentheses "
               "((4,8,6),(3,3,3))")


def parse_rank(text: str):
    """A ``--rank`` value: ``"8"`` -> 8; ``"4,8,8,4"`` or ``"4x8x8x4"`` -> ``[4, 8, 8, 4]``;
    ``"(4,8,6),(3,3,3)"`` -> ``[[4, 8, 6], [3, 3, 3]]`` (an HT tree: parentheses group a subtree).
    Only the syntax is checked here (ValueError naming the text); whether the numbers are a
    rank of the method (positive, how many, how large) is the method's to say
    (:meth:`sttpfast.params.Method.normalize_rank`, then each layer)."""
    spelled = text.replace("x", ",") if "(" not in text else text
    tokens = [t for t in re.findall(r"\s+|-?\d+|[(),]|[^\s\d(),-]+|-", spelled) if not t.isspace()]
    pos = 0

    def bad():
        return ValueError(f"{text!r} is not a valid rank: give {RANK_SYNTAX}")

    def items(closing: str | None) -> list:
        nonlocal pos
        out = []
        while True:
            if pos < len(tokens) and tokens[pos] == "(":
                pos += 1
                out.append(items(")"))
            elif pos < len(tokens) and re.fullmatch(r"-?\d+", tokens[pos]):
                out.append(int(tokens[pos]))
                pos += 1
            else:
                raise bad()
            if pos < len(tokens) and tokens[pos] == ",":
                pos += 1
                continue
            if closing is not None:
                if pos < len(tokens) and tokens[pos] == closing:
                    pos += 1
                    return out
                raise bad()
            if pos != len(tokens):
                raise bad()
            return out

    parsed = items(None)
    return parsed[0] if len(parsed) == 1 else parsed  # "8" is an int; "((4,8,6),(3,3,3))" the tree inside


class RankType(click.ParamType):
    """``--rank``: a positive integer, a tuple / tree for the tensor formats (:func:`parse_rank`),
    or ``full`` (where ``allow_full``). A value that is not one ends in one ``Error:`` line."""

    def __init__(self, allow_full: bool = True):
        self.allow_full = allow_full
        self.name = "R|R1,R2,..|full" if allow_full else "R|R1,R2,.."

    def convert(self, value, param, ctx):
        if isinstance(value, (int, list)):
            return value
        if self.allow_full and str(value).lower() == FULL_RANK:  # FULL as the help once wrote it
            return FULL_RANK
        try:
            return parse_rank(str(value))
        except ValueError as err:
            # a CLIError, not self.fail: one line without click's usage block
            raise CLIError(f"--rank {err}{f' or {FULL_RANK!r}' if self.allow_full else ''}") from None


def schema_option(flag: str, key: str | None = None, help_text: str | None = None):
    """A click option for the schema key ``key`` (default ``CLI_FLAGS[flag]``): its type,
    choices and help come from the schema (``help_text`` where a command uses it otherwise); unset
    it is None, so the config files' value stays."""
    key = key or CLI_FLAGS[flag]
    s = SCHEMA[key]
    members = [m for m in type_members(s.type) if m is not type(None)]
    decl = "--" + flag.replace("_", "-")
    kwargs: dict = {"default": None, "help": help_text or s.help}
    if isinstance(s.default, (str, int, float)) and not isinstance(s.default, bool) and "default" not in kwargs["help"]:
        kwargs["help"] += f" (default {s.default})"  # the option's own default is None (see above)
    if key == "param.rank":
        kwargs["type"] = RankType()
        kwargs["metavar"] = kwargs["type"].name  # as typed: click writes a type's name in capitals
    elif choices(key):
        kwargs["type"] = click.Choice(choices(key))
    elif members == [bool] and s.default is True:  # on by default: the flag pair turns it off
        decl = f"{decl}/--no-{decl[2:]}"
    elif members == [bool]:
        kwargs["is_flag"] = True
    elif typing.get_origin(members[0]) is list:
        kwargs.update(multiple=True, default=())
        kwargs["help"] += " (repeatable)"
    elif members[0] in (int, float):
        kwargs["type"] = members[0]
    return click.option(decl, flag, **kwargs)


def param_options(fn):
    """--param / --rank / --compression / --include / --exclude / --init, shared by commands."""
    for flag in reversed(("param", "rank", "compression", "include", "exclude", "init")):
        fn = schema_option(flag)(fn)
    return fn


def say(message: str) -> None:
    """Print a line about the whole run: once, from rank 0, when several processes run it."""
    if is_main_rank():
        click.echo(message)


def _tree_text(node) -> str:
    """A rank (sub)tree in --rank's syntax: ``[5, [8, 6, 2], 3]`` -> ``(5,(8,6,2),3)``."""
    return "(" + ",".join(map(_tree_text, node)) + ")" if isinstance(node, list) else str(node)


def rank_line(param: str, rank, how: str) -> str:
    """What rank a run uses and why, printed before any work starts."""
    if how == "default":
        return (f"rank {rank} (the default for {param}; --rank N, --rank full or --compression Z to change it)")
    if how == "full":
        return "rank full (every layer at its full rank: no compression)"
    if how == "compression":
        return f"rank chosen for the target compression Z = {rank:g}%"
    if how == "none":
        return f"no rank ({param} keeps every weight at full size)"
    if how == "rank_scale":
        return f"rank scale {rank:g}: each layer at that fraction of its full rank"
    if how == "layer_ranks":
        return f"per-layer ranks for {rank} layers (param.layer_ranks)"
    if isinstance(rank, list) and any(isinstance(r, list) for r in rank):  # an HT tree, as --rank takes it
        return f"rank {','.join(map(_tree_text, rank))} ({param}'s rank tree, the same for every layer)"
    if isinstance(rank, list):  # a tensor format's tuple rank, in the syntax --rank takes
        return f"rank {','.join(map(str, rank))} ({param}'s tuple rank, the same for every layer)"
    return f"rank {rank}"


def _rank_choice(cfg: dict, sources: dict) -> tuple[object, str]:
    """``(value, how)`` for :func:`rank_line` from a built config."""
    from sttpfast.params import BASELINES, resolve_param

    p = cfg["param"]
    if resolve_param(p["name"]) in BASELINES:
        return None, "none"
    if p["compression"] is not None:
        return p["compression"], "compression"
    if p.get("rank_scale") is not None:
        return p["rank_scale"], "rank_scale"
    if p.get("layer_ranks"):
        return len(p["layer_ranks"]), "layer_ranks"
    if p["rank"] is None:
        return None, "full"
    return p["rank"], "default" if sources.get("param.rank") == "default" else "given"


def _one_line(err: click.UsageError) -> click.UsageError:
    """``err`` as one ``Error:`` line naming the command's help, as every other bad input is
    said: click printed the usage, a hint and a blank line before it. ``sttpfast`` alone (click's
    "no arguments: the help", a UsageError too) stays the help."""
    if isinstance(err, click.exceptions.NoArgsIsHelpError):
        return err
    where = f" ({err.ctx.command_path} --help)" if err.ctx is not None else ""
    return click.UsageError(err.format_message() + where)


class _OneLineUsageErrors:
    """Mixin for click commands and groups: their usage errors (a bad option value, a missing
    option, an unknown option or command) as one line (:func:`_one_line`)."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as err:
            raise _one_line(err) from None


class _Command(_OneLineUsageErrors, click.Command):
    """A ``sttpfast`` command (usage errors in one line; ``-h`` for help, also when run alone
    as ``apps/*.py`` run it, outside the group's context settings)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("context_settings", {}).setdefault("help_option_names", ["-h", "--help"])
        super().__init__(*args, **kwargs)


class _Group(_OneLineUsageErrors, click.Group):
    """The ``sttpfast`` group (usage errors in one line, an unknown command's too)."""

    command_class = _Command

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as err:
            raise _one_line(err) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sttpfast")
def main():
    """sttpfast: train compressed, spectrally controlled networks (STTP, SVDP and baselines)."""
    _ignore_checkpoint_requests_until_training()


def _ignore_checkpoint_requests_until_training() -> None:
    """SIGUSR1 asks a training run for a checkpoint (SignalCheckpoint handles it from the first
    step on). Before that (imports, data, model) there is nothing to save, and its default
    action would kill the process: ignore it until the run's handler takes over."""
    if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


@main.command()
@click.argument("run", required=False, type=click.Path())
@schema_option("arch")
@param_options
@click.option("--num-classes", type=int, default=None, help="classifier outputs (model default if unset)")
@click.option("--in-chans", type=int, default=None, help="input channels (model default if unset)")
@schema_option("plan")
@schema_option("rank_scale")
@schema_option("unrepresentable")
@schema_option("keep_dense_if_no_gain")
@schema_option("img_size", help_text="build the model for N x N inputs, as train builds it for data of that size")
@schema_option("attention")
@schema_option("attention_rank")
@user_errors
def info(run, arch, param, rank, compression, include, exclude, init, num_classes, in_chans, plan, rank_scale,
         unrepresentable, keep_dense_if_no_gain, img_size, attention, attention_rank):
    """Per-layer table (rank, DOF) and the compression Z of ARCH under PARAM (give the data's
    --num-classes, --in-chans and --img-size to see what `train` builds for them), or of a
    run folder's last checkpoint: sttpfast info RUN."""
    if run is not None:
        options = (arch, param, rank, compression, init, num_classes, in_chans, plan, rank_scale, unrepresentable,
                   keep_dense_if_no_gain, img_size, attention, attention_rank)
        if any(v is not None for v in options) or include or exclude:
            raise CLIError("info RUN shows the run's own model; drop --arch, --param and the other options")
        _info_of_run(run)
        return
    if arch is None:
        raise CLIError("give the architecture: --arch NAME (any timm model or a registered sttpfast model), or a run "
                       "folder: sttpfast info RUN")
    if in_chans is not None and in_chans < 1:
        raise CLIError(f"--in-chans must be a positive integer, got {in_chans}")
    if num_classes is not None and num_classes < 0:
        raise CLIError(f"--num-classes must be an integer >= 0 (0: no classifier head), got {num_classes}")
    # the same rank rules as `train` (the default rank for the low-rank methods, 'full', none for dense/sn)
    cli = {CLI_FLAGS[k]: v for k, v in dict(param=param, rank=rank, compression=compression, init=init,
                                             include=list(include), exclude=list(exclude), plan=plan,
                                             rank_scale=rank_scale, unrepresentable=unrepresentable,
                                             keep_dense_if_no_gain=keep_dense_if_no_gain, img_size=img_size,
                                             attention=attention, attention_rank=attention_rank).items()
           if v is not None}
    cfg, sources = _build_config((), (), cli)
    p = cfg["param"]

    import torch

    from sttpfast.surgery import parameterize_for_run
    from sttpfast.models import create_model

    # the run's seed: an energy plan reads the weights of this freshly built (untrained) model,
    # so the same command prints the same plan
    torch.manual_seed(cfg["train"]["seed"])
    model = create_model(arch, num_classes=num_classes, in_chans=in_chans, img_size=cfg["data"]["img_size"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = parameterize_for_run(model, p["name"], rank=p["rank"], compression=p["compression"],
                                      include=p["include"] or None, exclude=p["exclude"] or None,
                                      # counts only: decomposing the random weights (CP's ALS: minutes
                                      # on resnet18) would change no number printed
                                      init="identity", plan=p["plan"], rank_scale=p["rank_scale"],
                                      unrepresentable=p["unrepresentable"],
                                      keep_dense_if_no_gain=p["keep_dense_if_no_gain"], attention=p["attention"],
                                      attention_rank=p["attention_rank"])
    click.echo(rank_line(p["name"], *_rank_choice(cfg, sources)))
    if report.plan:
        click.echo(report.plan_table())
    elif p["compression"] is not None:
        click.echo(f"rank {report.rank} gives Z = {report.z:.2f}%")
    if report.left_dense:
        click.echo(report.left_dense_table())
    click.echo(report.table())
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)


def _info_of_run(run: str) -> None:
    """The per-layer table of a run folder's last checkpoint (a GAN run: G's, then D's)."""
    from sttpfast.export import RESUME_HINT, is_gan_run, load_gan_run_pair, load_run_model, run_checkpoint
    from sttpfast.surgery import compression_report

    run_dir = Path(run).expanduser().absolute()
    if not run_dir.exists():
        import timm

        import sttpfast.models  # noqa: F401  (registers the paper's architectures)

        if timm.is_model(run):  # `sttpfast info resnet18`: the architecture is an option
            raise CLIError(f"{run_dir} does not exist; for the architecture: sttpfast info --arch {run}")
    # a damaged last checkpoint: export's remedy (--which best) is no option here
    run_checkpoint(run_dir, "last", damaged_hint=RESUME_HINT)
    if is_gan_run(run_dir, "last"):
        pair, _ = load_gan_run_pair(run_dir, "last")
        click.echo(f"run {run_dir}: a GAN, the last checkpoint")
        for role, network in (("G", pair.generator), ("D", pair.discriminator)):
            click.echo(f"{role}:")
            click.echo(compression_report(network).table())
        return
    model, _, _ = load_run_model(run_dir, "last")
    report = compression_report(model)
    click.echo(f"run {run_dir}: {report.param}, the last checkpoint")
    click.echo(report.table())


#: ``--frobenius-decay`` given without a value: lambda is the run's weight decay
FROBENIUS_AT_WD = "wd"


def _frobenius_decay_value(value: str):
    """``--frobenius-decay [LAMBDA]``: a number >= 0, or (alone) ``optim.wd``'s value, which
    the learner uses when ``reg.frobenius_decay`` is unset (None)."""
    if value == FROBENIUS_AT_WD:
        return None
    try:
        number = float(value)
    except ValueError:
        raise CLIError(f"--frobenius-decay {value!r}: expected a number >= 0 (or the flag alone)") from None
    if not number >= 0:
        raise CLIError(f"--frobenius-decay {value!r}: expected a number >= 0 (or the flag alone)")
    return number


class _TrainCommand(_Command):
    """``sttpfast train``: a negative ``--frobenius-decay`` value gets its own message. click
    reads ``-1`` after an option whose value is optional as an option of its own ("No such
    option '-1'"), even written ``--frobenius-decay=-1``."""

    def parse_args(self, ctx, args):
        for i, arg in enumerate(args):
            if arg == "--":
                break
            value = arg.partition("=")[2] if arg.startswith("--frobenius-decay=") else None
            if arg == "--frobenius-decay" and i + 1 < len(args):
                value = args[i + 1]
            if value is not None and value.startswith("-") and _is_number(value):
                number = _frobenius_decay_value(value)  # raises unless it is -0
                args = [*args[:i], f"--frobenius-decay={abs(number)}", *args[i + (1 if "=" in arg else 2):]]
                break
        return super().parse_args(ctx, args)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_frobenius_decay_applies(param: str) -> None:
    from sttpfast.params import method

    if method(param).penalty != "frobenius_decay":
        raise CLIError(f"--frobenius-decay applies to the methods trained with it (lowrank), not {param!r}")


def train_options(fn):
    """Every ``sttpfast train`` flag of :data:`sttpfast.config.CLI_FLAGS`, from the schema."""
    for flag in reversed([f for f in CLI_FLAGS if f != "dataset"]):
        fn = schema_option(flag)(fn)
    return fn


@main.command(cls=_TrainCommand)
@click.argument("dataset", required=False)
@train_options
@click.option("--resume", default=None, type=click.Path(), help="continue the run in this folder")
@click.option("--cfg", multiple=True, type=click.Path(), help="YAML config, repeatable (later wins)")
@click.option("--set", "overrides", multiple=True, help="dotted override, e.g. optim.lr=0.05 (repeatable)")
@click.option("--frobenius-decay", "frobenius_decay", is_flag=False, flag_value=FROBENIUS_AT_WD, default=None,
              metavar="[LAMBDA]", help="lowrank: Frobenius decay (Khodak et al.) in place of weight decay; "
                                       "alone: lambda = --wd")
@user_errors
def train(resume, cfg, overrides, frobenius_decay, **flags):
    """Train a classifier: sttpfast train DATASET --arch ARCH --param PARAM [--rank R|full].

    Low-rank methods without --rank or --compression use rank 32 (the STTP paper's rank for
    classification); --rank full trains at full rank."""
    explicit = {CLI_FLAGS[name]: list(v) if isinstance(v, tuple) else v for name, v in flags.items()
                if v is not None and v != ()}
    if frobenius_decay is not None:
        explicit["reg.frobenius_decay"] = _frobenius_decay_value(frobenius_decay)
    if resume is not None:
        # only the budget may change on resume: --steps / --epochs continue a finished run
        budget = {key: explicit.pop(key) for key in ("optim.steps", "optim.epochs") if key in explicit}
        progress = _resume_progress(overrides, explicit, cfg, "--steps / --epochs")
        with interrupts_end_start_up():
            _import_training_modules()
        from sttpfast.run import run_training

        summary = run_training(resume=resume, echo=click.echo, steps=budget.get("optim.steps"),
                               epochs=budget.get("optim.epochs"), progress=progress)
    else:
        if flags["dataset"] is None and not cfg and not overrides:
            raise CLIError("give the dataset: sttpfast train DATASET [options] (e.g. sttpfast train digits --param sttp-r "
                           "--steps 200), or a config with --cfg")
        with interrupts_end_start_up():
            config, sources = _build_config(cfg, overrides, explicit)
            check_sections_read(config, sources, "train")
            _import_training_modules()
        if frobenius_decay is not None:
            _check_frobenius_decay_applies(config["param"]["name"])
        # what the run chose, said once data, model and rank are known good (a bad rank is then
        # one Error line) and before the run folder and the training
        chosen = [rank_line(config["param"]["name"], *_rank_choice(config, sources))]
        if config["param"].get("attention") == "qk-ov":  # the forms take the rank per head (issue 11)
            per_head = attention_rank_of(config["param"])
            chosen.append(f"attention qk-ov: rank {per_head} per head (at most the head width)" if per_head
                          else "attention qk-ov: full head width (no compression of the attention)")
        from sttpfast.run import run_training

        summary = run_training(config, echo=click.echo, announce=chosen)
    _print_summary(summary)
    _exit_if_the_loss_diverged(summary)


def _resume_progress(overrides, explicit: dict, cfg, budget_flags: str) -> bool | None:
    """The ``--set log.progress=...`` a resume may take (display only: a run continued into a
    log file turns its bar off), or None; anything else but the budget is refused, since
    the run continues with its own config.yaml."""
    progress = [pair for pair in overrides if pair.partition("=")[0].strip() == "log.progress"]
    if explicit or cfg or len(progress) != len(overrides):
        raise CLIError(f"--resume continues with the run's own config.yaml; drop the other options (only {budget_flags} "
                       "may raise its budget, and --set log.progress=true|false turns the progress bar on or off)")
    if not progress:
        return None
    return build_config(overrides=progress)[0]["log"]["progress"]  # parsed and checked as any --set


def _exit_if_the_loss_diverged(summary: dict) -> None:
    """NaNGuard stopped the run: say so and exit 1 (the checkpoint kept is the last good one)."""
    step = summary.get("nan_step")
    if step is not None and summary.get("checkpoint") is None:
        click.echo(f"Error: the loss became non-finite at step {step}, before the first checkpoint; training "
                   "stopped and there is nothing to resume (a lower --lr may help)", err=True)
        sys.exit(1)
    if step is not None:
        click.echo(f"Error: the loss became non-finite at step {step}; training stopped. "
                   f"The last good checkpoint is {summary['checkpoint']}", err=True)
        sys.exit(1)


# --- sttpfast gan ---------------------------------------------------------------------------
def gan_options(fn):
    """Every ``sttpfast gan`` flag of :data:`sttpfast.config.GAN_CLI_FLAGS`, from the schema."""
    for flag in reversed([f for f in GAN_CLI_FLAGS if f != "dataset"]):
        fn = schema_option(flag, GAN_CLI_FLAGS[flag])(fn)
    return fn


@main.command()
@click.argument("dataset", required=False)
@gan_options
@click.option("--dataset", "dataset_option", default=None, help="the dataset (instead of the DATASET argument)")
@click.option("--resume", default=None, type=click.Path(), help="continue the GAN run in this folder")
@click.option("--cfg", multiple=True, type=click.Path(), help="YAML config, repeatable (later wins)")
@click.option("--set", "overrides", multiple=True, help="dotted override, e.g. gan.lr_d=4e-4 (repeatable)")
@user_errors
def gan(resume, cfg, overrides, dataset_option, **flags):
    """Train a GAN: sttpfast gan DATASET --d-param sttp-c --rank 64 [--g-param svdp-r] [--steps N].

    SNGAN networks (sngan_g32 / sngan_d32 by default), hinge loss, n_dis D steps per G step,
    Adam 2e-4 (0, 0.9), linear decay; --d-param sn (SNGAN) or sr (spectral compensation) for
    the baselines; IS / FID / KID every --metrics-every G steps."""
    if dataset_option is not None:
        if flags["dataset"] not in (None, dataset_option):
            raise CLIError(f"two datasets given: {flags['dataset']!r} and --dataset {dataset_option!r}")
        flags["dataset"] = dataset_option
    explicit = {GAN_CLI_FLAGS[name]: list(v) if isinstance(v, tuple) else v for name, v in flags.items()
                if v is not None and v != ()}
    if resume is not None:
        steps = explicit.pop("gan.steps", None)
        progress = _resume_progress(overrides, explicit, cfg, "--steps")
        with interrupts_end_start_up():
            _import_training_modules()
            import sttpfast.gan.run  # noqa: F401
        from sttpfast.gan.run import run_gan

        summary = run_gan(resume=resume, echo=click.echo, steps=steps, progress=progress)
    else:
        if flags["dataset"] is None and not cfg and not overrides:
            # the defaults are the paper's budget (100,000 G steps, full-width networks): a bare
            # `sttpfast gan` tried to see what it does started that, for days on a CPU
            raise CLIError("give the dataset: sttpfast gan DATASET [options] (e.g. sttpfast gan digits --steps 200), "
                           "or a config with --cfg; the defaults train 100,000 G steps")
        with interrupts_end_start_up():
            config, sources = _build_config(cfg, overrides, explicit)
            check_sections_read(config, sources, "gan")
            _import_training_modules()
            import sttpfast.gan.run  # noqa: F401
        from sttpfast.gan.run import run_gan

        summary = run_gan(config, echo=click.echo)
    best = summary.get("best")
    # Z from the counts, as the run line said it (the z_percent values are rounded already)
    parts = [f"{side} {summary[f'{s}_param']} Z {100 * summary[f'{s}_params'] / summary[f'{s}_params_dense']:.2f}%"
             for side, s in (("G", "g"), ("D", "d"))]
    parts += [f"{k} {v:.4g}" for k, v in summary.get("metrics", {}).items() if not k.endswith("_std")]
    if summary.get("extractor"):  # what the metrics were measured with
        parts.append(f"extractor {summary['extractor']['name']} (valid accuracy "
                     f"{summary['extractor']['valid_accuracy']:.3f}, {summary['extractor']['steps']} steps)")
    if best:
        parts.append(f"best {best['metric']} {best['value']:.4g} at step {best['step']}")
    parts += [f"{_count(summary['steps'], 'G step')} in {summary['seconds']:.1f} s", f"run {summary['run_dir']}"]
    say("summary: " + " | ".join(parts))
    _exit_if_the_loss_diverged(summary)


# -- compress: decompose a dense run, distil block by block, fine-tune ------------------------
def _as_tuples(rank):
    """A parsed ``--rank`` with its lists as tuples (what :func:`sttpfast.parameterize` takes)."""
    return tuple(_as_tuples(r) for r in rank) if isinstance(rank, list) else rank


@main.command()
@click.argument("run", type=click.Path())
@click.option("--param", required=True, help="the compressed layers' method (tt, tucker, sttp-r, lowrank...)")
@click.option("--rank", default=None, type=RankType(allow_full=False),
              help="the method's rank: an int, comma-separated ints (a tuple: TT / TR bonds, Tucker R_out,R_in) "
                   "or an HT tree ((4,8,6),(3,3,3))")
@click.option("--compression", type=float, default=None, help="target Z in percent (instead of --rank)")
@click.option("--plan", type=click.Choice(choices("param.plan")), default=None,
              help="with --compression: one shared rank, or per-layer ranks by retained energy")
@click.option("--phases", default=None,
              help="0 decompose, 1 block-wise distillation, 2 end-to-end fine-tuning  [default: 0,1,2; 0,2 for "
                   "a model without feature_chain(), as timm's own]")
@click.option("--epochs", type=int, default=None, help="phase 2's epochs  [default: 1]")
@click.option("--steps", type=int, default=None, help="phase 2's optimizer steps (instead of --epochs)")
@click.option("--distill-steps", type=int, default=None, help="phase 1's steps per block (default one epoch)")
@click.option("--bn-batches", type=int, default=20, show_default=True,
              help="phase 0: training batches the BatchNorm statistics are re-estimated on (0: the teacher's)")
@click.option("--lr", type=float, default=None, help="phase 2's peak learning rate (default the dense run's / 10)")
@click.option("--unrepresentable", type=click.Choice(choices("param.unrepresentable")), default=None,
              help="layers the method cannot represent: leave dense (skip) or refuse (error)")
@click.option("--out", default=None, type=click.Path(), help="output run folder, a new one (default RUN-PARAM next to RUN, numbered if taken)")
@schema_option("include")
@schema_option("exclude")
@schema_option("keep_dense_if_no_gain")
@user_errors
def compress(run, param, rank, compression, plan, phases, epochs, steps, distill_steps, bn_batches, lr,
             unrepresentable, out, include, exclude, keep_dense_if_no_gain):
    """Compress a dense run: sttpfast compress RUN --param tt --compression 10 --phases 0,1,2 --epochs 3."""
    with interrupts_end_start_up():
        _import_training_modules()
        from sttpfast.compress import compress_run, compression_method
        from sttpfast.run import last_checkpoint
    param = compression_method(param)  # sn / dense: said first, whatever else is given
    rank = _as_tuples(rank)
    if rank is None and compression is None:
        raise CLIError("give the size of the compressed layers: --rank R or --compression Z")
    if rank is not None and compression is not None:
        raise CLIError("give either --rank or --compression, not both")
    if plan == "energy" and compression is None:
        raise CLIError("--plan energy spends a compression budget: give --compression Z instead of --rank")
    for flag, value in (("--steps", steps), ("--distill-steps", distill_steps)):
        if value is not None and value < 1:
            raise CLIError(f"{flag} must be a positive integer, got {value}")

    progress: dict = {}
    try:
        result = compress_run(run, param, rank=rank, compression=compression, plan=plan, phases=phases,
                              epochs=epochs, steps=steps, distill_steps=distill_steps, lr=lr, out=out,
                              unrepresentable=unrepresentable, include=list(include) or None,
                              exclude=list(exclude) or None, keep_dense_if_no_gain=keep_dense_if_no_gain is not False,
                              bn_batches=bn_batches, echo=click.echo, progress=progress)
    except KeyboardInterrupt as stop:  # phase 2's training checkpoints its own interrupts: not this one
        click.echo(COMPRESS_INTERRUPTED.get(progress.get("stage"), INTERRUPTED), err=True)
        sys.exit(128 + getattr(stop, "signum", signal.SIGINT))
    phase_2 = result["phases"].get("2", {})
    _exit_if_the_loss_diverged({"nan_step": phase_2.get("nan_step"),
                                "checkpoint": last_checkpoint(result["run_dir"])})


@main.command()
@click.argument("run", type=click.Path())
@click.option("--format", "fmt", required=True, metavar="safetensors|onnx",
              help="safetensors (loads with timm; sttpfast's own architectures need `import sttpfast`, "
                   "which registers them) or onnx (runs with onnxruntime alone)")
@click.option("--out", default=None, type=click.Path(), help="file to write (default RUN/export/WHICH.FORMAT)")
@click.option("--which", default="last", metavar="last|best", help="the checkpoint to export (default last)")
@click.option("--force", is_flag=True, help="overwrite an existing --out")
@user_errors
def export(run, fmt, out, which, force):
    """Densify a run's checkpoint into a plain file: sttpfast export RUN --format onnx."""
    from sttpfast.export import export_run

    path = export_run(run, fmt, out=out, which=which, force=force)
    click.echo(f"wrote {path}")


def _count(n: int, noun: str) -> str:
    """``1 step``, ``2 steps``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _print_summary(summary: dict) -> None:
    m = summary.get("metrics", {})
    acc = m.get("accuracy")
    parts = [f"accuracy {acc:.4f}" if acc is not None else "accuracy -"]
    if m.get("top5_accuracy") is not None:
        parts.append(f"top-5 {m['top5_accuracy']:.4f}")
    # Z from the counts, as the run printed it before training (z_percent is rounded already)
    z = 100 * summary["params_compressed"] / summary["params_dense"]
    parts += [f"Z {z:.2f}%", f"params {summary['params_compressed']:,} / {summary['params_dense']:,}",
              f"{_count(summary['steps'], 'step')} in {summary['seconds']:.1f} s", f"run {summary['run_dir']}"]
    say("summary: " + " | ".join(parts))


if __name__ == "__main__":  # pragma: no cover
    main()
