"""Run configuration: defaults, YAML files merged in order, dotted overrides.

    cfg = build_config(["configs/env.yml", "configs/aistats21/.../sttp_r32.yml"],
                       overrides=["optim.lr=0.05"], cli={"data.bs": 64})

Precedence, lowest first: :data:`DEFAULTS`, the ``--cfg`` files in order (a later file
overriding an earlier one's value is warned about), explicit CLI flags, ``--set`` pairs.
Unknown keys are rejected with the closest valid key suggested. ``model.kwargs`` is the
one free-form table (extra keyword arguments for ``timm.create_model``).
"""
from __future__ import annotations

import copy
import difflib
import warnings
from pathlib import Path

import yaml

__all__ = ["DEFAULTS", "ConfigError", "build_config", "load_yaml", "merge", "apply_overrides",
           "save_config", "get", "flatten"]

DEFAULTS: dict = {
    "data": {
        "name": "digits",          # dataset (see sttpfast.data.DATASETS) or imagefolder:PATH
        "data_dir": None,          # default: $STTPFAST_DATA or ~/data
        "bs": 128,                 # batch size per process
        "subset": None,            # keep N training images (quick runs)
        "download": False,         # fetch a missing dataset with torchvision
        "num_workers": 0,
        "augment": True,
    },
    "model": {
        "arch": "resnet20_cifar",  # any timm name or a registered sttpfast model
        "kwargs": {},              # extra timm.create_model keyword arguments
    },
    "param": {
        "name": "dense",           # svdp-c|svdp-l|svdp-r|sttp-c|sttp-l|sttp-r|lowrank|sn|dense
        "rank": None,
        "compression": None,       # target Z in percent, instead of rank
        "init": None,              # identity | spectral (default per parameterization)
        "include": [],
        "exclude": [],
    },
    "optim": {
        "opt": "sgd",              # sgd | adam
        "lr": 0.1,
        "mom": 0.9,
        "wd": 5.0e-4,
        "schedule": "one_cycle",   # one_cycle | linear | cosine | const
        "epochs": 10,
        "steps": None,             # total optimizer steps; replaces epochs when set
    },
    "reg": {
        "d_optimal": 1.0,          # D-optimal penalty weight for the -r variants
        "frobenius_decay": None,   # lowrank: Frobenius decay (default: optim.wd)
        "spectral_bound": None,    # c: keep sigma_max <= c (SpectralNormBound)
    },
    "log": {
        "logger": "tensorboard",   # tensorboard | wandb | none
        "every": 10,               # steps between logged training scalars
        "sv_every": 100,           # steps between singular-value snapshots
        "wandb_project": "sttpfast",
        "progress": True,
    },
    "train": {
        "seed": 0,
        "out": "runs",             # the run folder goes under this directory
        "name": None,              # run folder name (default: derived from the config)
        "mixed_precision": "no",   # no | bf16
        "checkpoint_every": None,  # steps between 'last' checkpoints (default: each epoch)
    },
}

FREE_FORM = {("model", "kwargs")}


class ConfigError(ValueError):
    """A bad configuration file, key or value."""


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def flatten(cfg: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (free-form tables stay whole)."""
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and tuple(key.split(".")) not in FREE_FORM:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _valid_leaf(dotted: str) -> bool:
    return dotted in flatten(DEFAULTS)


def get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _set(cfg: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    node = cfg
    for part in path:
        node = node[part]
    node[last] = value


def load_yaml(path: str | Path) -> dict:
    """One YAML mapping; ConfigError for a missing, unreadable or non-mapping file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data


def merge(base: dict, update: dict, source: str, sources: dict | None = None) -> dict:
    """Merge ``update`` (nested mapping) into a copy of ``base``, checking every key.

    ``sources`` (dotted key -> where it was last set) is updated in place; a value set by an
    earlier source and changed by this one is warned about."""
    out = copy.deepcopy(base)
    sources = {} if sources is None else sources
    for dotted, value in flatten(update).items():
        if not _valid_leaf(dotted):
            section = dotted.split(".")[0]
            valid = flatten(DEFAULTS) if section not in DEFAULTS else \
                [k for k in flatten(DEFAULTS) if k.startswith(section + ".")]
            raise ConfigError(f"unknown config key {dotted!r} in {source}{_suggest(dotted, valid)}")
        old = get(out, dotted)
        if dotted in sources and old != value:
            warnings.warn(f"config {dotted}: {old!r} from {sources[dotted]} overridden by {value!r} from {source}",
                          stacklevel=2)
        _set(out, dotted, copy.deepcopy(value))
        sources[dotted] = source
    return out


def apply_overrides(cfg: dict, pairs: list[str], sources: dict | None = None) -> dict:
    """``["optim.lr=0.05", "param.include=[a, b]"]``: values are parsed as YAML."""
    update: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like key=value (e.g. optim.lr=0.05)")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"override {pair!r}: {raw!r} is not a valid YAML value") from None
        node = update
        *path, last = key.strip().split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return merge(cfg, update, "--set", sources)


def _validate(cfg: dict) -> None:
    def want(dotted, ok, what):
        if not ok(get(cfg, dotted)):
            raise ConfigError(f"config {dotted} = {get(cfg, dotted)!r}: expected {what}")

    pos_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
    opt_pos_int = lambda v: v is None or pos_int(v)  # noqa: E731
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    want("data.bs", pos_int, "a positive integer")
    want("data.subset", opt_pos_int, "a positive integer or null")
    want("optim.epochs", pos_int, "a positive integer (epochs >= 1)")
    want("optim.steps", opt_pos_int, "a positive integer or null")
    want("optim.lr", lambda v: number(v) and v > 0, "a positive number")
    want("optim.wd", lambda v: number(v) and v >= 0, "a number >= 0")
    want("optim.opt", lambda v: v in ("sgd", "adam"), "sgd or adam")
    want("optim.schedule", lambda v: v in ("one_cycle", "linear", "cosine", "const"), "one_cycle, linear, cosine or const")
    want("log.logger", lambda v: v in ("tensorboard", "wandb", "none"), "tensorboard, wandb or none")
    want("train.mixed_precision", lambda v: v in ("no", "bf16"), "no or bf16")
    want("train.seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
    want("train.checkpoint_every", opt_pos_int, "a positive integer or null")
    want("param.rank", opt_pos_int, "a positive integer or null")
    if get(cfg, "param.rank") is not None and get(cfg, "param.compression") is not None:
        raise ConfigError("give either param.rank or param.compression, not both")
    for key in ("param.include", "param.exclude"):
        if isinstance(get(cfg, key), str):
            _set(cfg, key, [get(cfg, key)])


def build_config(files=(), overrides=(), cli: dict | None = None) -> tuple[dict, dict]:
    """Defaults <- files (in order) <- explicit CLI values (dotted keys) <- ``--set`` pairs.

    Returns ``(config, sources)``; ``sources`` maps each dotted key that was set to where."""
    sources: dict = {}
    cfg = copy.deepcopy(DEFAULTS)
    for path in files:
        cfg = merge(cfg, load_yaml(path), str(path), sources)
    cli_update: dict = {}
    for dotted, value in (cli or {}).items():
        node = cli_update
        *path, last = dotted.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    # the command line is explicit: no warning when it overrides a file
    cfg = merge(cfg, cli_update, "the command line")
    sources.update({k: "the command line" for k in flatten(cli_update)})
    cfg = apply_overrides(cfg, list(overrides), sources)
    _validate(cfg)
    return cfg, sources


def save_config(cfg: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path
