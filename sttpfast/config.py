"""Run configuration: one schema, YAML files merged in order, dotted overrides.

    cfg, sources = build_config(["configs/env.yml", "configs/aistats21/.../sttp_r32.yml"],
                                overrides=["optim.lr=0.05"], cli={"data.bs": 64})

The dataclasses below are the schema, and the only place it is written: every key, its
default, its type (values from files and ``--set`` are checked and coerced against it), its
allowed values (``Literal`` types) and its range. The command line's flags map onto these
keys (:data:`CLI_FLAGS`) and take their choices from here.

Precedence, lowest first: the defaults, the ``--cfg`` files in order (a later file
overriding an earlier one's value is warned about), explicit CLI flags, ``--set`` pairs.
Unknown keys are rejected with the closest valid key suggested. ``model.kwargs`` is the
one free-form table (extra keyword arguments for ``timm.create_model``).

Rank. Without ``param.rank`` and ``param.compression``, a low-rank parameterization gets
rank :data:`DEFAULT_RANK` (the STTP paper's rank for classification), so the first command a
user types compresses; ``rank: full`` asks for full rank explicitly. ``dense`` and ``sn``
take no rank. In the returned config full rank is ``rank: None`` (what
:func:`sttpfast.parameterize` takes); :func:`save_config` writes it back as ``full``.

This module does not import torch (the CLI's ``--help`` reads it); the parameterization
names are checked through :func:`sttpfast.params.resolve_param` when a config is built.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

__all__ = ["DEFAULTS", "DEFAULT_RANK", "SCHEMA", "CLI_FLAGS", "ConfigError", "Setting", "build_config", "load_yaml",
           "merge", "apply_overrides", "save_config", "get", "flatten", "settings", "choices", "coerce", "type_members"]

#: rank of the low-rank parameterizations when neither rank nor compression is given
DEFAULT_RANK = 32
FULL_RANK = "full"


class ConfigError(ValueError):
    """A bad configuration file, key or value."""


def _positive(v) -> bool:
    return v is None or v > 0


def _non_negative(v) -> bool:
    return v is None or v >= 0


def _percent(v) -> bool:
    return v is None or 0 < v <= 100


def _positive_fraction(v) -> bool:
    return v is None or 0 < v <= 1


def _below_one(v) -> bool:
    return v is None or 0 <= v < 1


def _rank(v) -> bool:
    # a list (TT / TR bonds, a Tucker pair, an HT tree) is checked by its method when the
    # config is built (its length and form depend on the method)
    return v is None or v == FULL_RANK or isinstance(v, list) or v > 0


def _int_tree(value) -> list | None:
    """``value`` as nested lists of ints (a tuple rank, an HT tree), or None if it is not one."""
    if not isinstance(value, (list, tuple)) or not value:
        return None
    out = []
    for v in value:
        if isinstance(v, int) and not isinstance(v, bool):
            out.append(v)
        elif (sub := _int_tree(v)) is not None:
            out.append(sub)
        else:
            return None
    return out


def setting(default, help: str, check=None, what: str = ""):
    """A schema field: its default, a help line, and an optional range check ``check(value) -> bool``
    described by ``what`` (used in the error message)."""
    kind = {"default_factory": lambda: copy.deepcopy(default)} if isinstance(default, (list, dict)) \
        else {"default": default}
    return field(**kind, metadata={"help": help, "check": check, "what": what})


@dataclass
class DataConfig:
    name: str = setting("digits", "dataset (see sttpfast.data) or imagefolder:PATH")
    data_dir: Optional[str] = setting(None, "where datasets live (default $STTPFAST_DATA or ~/data)")
    bs: int = setting(128, "batch size per process", _positive, "a positive integer")
    subset: Optional[int] = setting(None, "use N training images and at most N validation images (quick runs)",
                                    _positive, "a positive integer")
    download: bool = setting(False, "download a missing dataset with torchvision")
    num_workers: int = setting(0, "data loader worker processes", _non_negative, "an integer >= 0")
    augment: bool = setting(True, "training-time augmentation")
    img_size: Optional[int] = setting(None, "resize images to N x N and build the model for N (default: the "
                                            "data's size, or the smallest size the model accepts)",
                                      _positive, "a positive integer")


@dataclass
class ModelConfig:
    arch: str = setting("resnet20_cifar", "any timm model name or a registered sttpfast model")
    kwargs: dict = setting({}, "extra timm.create_model keyword arguments (free-form)")


@dataclass
class ParamConfig:
    name: str = setting("dense", "weight parameterization (sttp, svdp-c, lowrank, sn, dense...)")
    rank: Union[int, list[int], Literal["full"], None] = setting(
        None, f"the method's rank shared by all layers: an int (the SVD rank r), a tuple for the tensor formats "
              f"(TT / TR bonds 4,8,4; Tucker R_out,R_in 8,6; an HT tree (4,8,6),(3,3,3); a list in YAML), or "
              f"'full' (default {DEFAULT_RANK} for the low-rank methods)",
        _rank, "a positive integer, a list of positive integers or 'full'")
    compression: Optional[float] = setting(None, "target Z in percent (instead of rank)", _percent,
                                           "a number in (0, 100] (percent of the dense size)")
    init: Optional[Literal["identity", "spectral"]] = setting(
        None, "factor initialization (default: identity for SVDP/STTP, spectral for lowrank and the tensor formats, "
              "whose identity is a fixed placeholder pattern)")
    include: list[str] = setting([], "globs of layer names to parameterize")
    exclude: list[str] = setting([], "globs of layer names to leave dense")
    # -- per-layer ranks and unrepresentable layers (tensor-layer zoo) --
    plan: Literal["shared", "energy"] = setting(
        "shared", "with --compression: one shared rank, or per-layer ranks by retained energy")
    rank_scale: Optional[float] = setting(None, "each layer at this fraction of its full rank (instead of rank)",
                                          _positive_fraction, "a number in (0, 1]")
    unrepresentable: Literal["skip", "error"] = setting(
        "skip", "a layer the method cannot represent (e.g. rtt on a prime channel count): leave dense or refuse")
    layer_ranks: dict = setting({}, "per-layer ranks {layer: rank} (a saved rank plan; replaces rank)")
    keep_dense_if_no_gain: bool = setting(
        True, "with --compression: leave dense the layers where the method has at least as many parameters "
              "as the dense weight at the rank chosen for them (depthwise kernels, tiny heads)")
    attention: Optional[Literal["qk-ov", "q-k-v"]] = setting(
        None, "transformer attention: qk-ov (per-head W_Q W_K^T and W_O W_V factored, rank per head) or q-k-v "
              "(the fused qkv Linear as three layers that --param parameterizes each on its own)")
    attention_rank: Optional[int] = setting(
        None, "qk-ov's rank per head when it is not --rank (then --rank, a tuple rank, --compression or "
              "--rank-scale size the other layers)", _positive, "a positive integer")


@dataclass
class OptimConfig:
    opt: Literal["sgd", "adam"] = setting("sgd", "optimizer")
    lr: float = setting(0.1, "peak learning rate", _positive, "a positive number")
    mom: float = setting(0.9, "SGD momentum", _below_one, "a number in [0, 1)")
    wd: float = setting(5.0e-4, "weight decay", _non_negative, "a number >= 0")
    schedule: Literal["one_cycle", "linear", "cosine", "const"] = setting("one_cycle", "learning-rate schedule")
    epochs: int = setting(10, "epochs", _positive, "a positive integer (epochs >= 1)")
    steps: Optional[int] = setting(None, "total optimizer steps (replaces epochs when set)", _positive,
                                   "a positive integer")


@dataclass
class RegConfig:
    d_optimal: float = setting(1.0, "D-optimal penalty weight for the -r variants", _non_negative, "a number >= 0")
    frobenius_decay: Optional[float] = setting(None, "lowrank: Frobenius decay (default: optim.wd)", _non_negative,
                                               "a number >= 0")
    spectral_bound: Optional[float] = setting(None, "keep sigma_max <= c (SpectralNormBound)", _positive,
                                              "a positive number")


@dataclass
class LogConfig:
    logger: Literal["tensorboard", "wandb", "none"] = setting("tensorboard", "where training scalars go")
    every: int = setting(10, "steps between logged training scalars", _positive, "a positive integer")
    sv_every: int = setting(100, "steps between singular-value snapshots", _positive, "a positive integer")
    wandb_project: str = setting("sttpfast", "Weights & Biases project")
    progress: bool = setting(True, "fastai's progress bar")


@dataclass
class TrainConfig:
    seed: int = setting(0, "random seed", lambda v: 0 <= v < 2**32, "an integer in [0, 2**32 - 1]")
    out: str = setting("runs", "folder for run folders")
    name: Optional[str] = setting(None, "run folder name (default: derived from the config)")
    mixed_precision: Literal["no", "bf16"] = setting("no", "autocast dtype")
    checkpoint_every: Optional[int] = setting(None, "steps between 'last' checkpoints (default: each epoch)",
                                              _positive, "a positive integer")


# --- the GAN app (``sttpfast gan``, apps/gan.py); data / log / train sections are shared ---------
@dataclass
class GanConfig:
    g: str = setting("sngan_g32", "generator architecture (sngan_g32, sngan_g48 or any registered generator)")
    d: str = setting("sngan_d32", "discriminator architecture (sngan_d32, sngan_d48...)")
    g_param: str = setting("dense", "generator parameterization (its first Linear is never parameterized)")
    d_param: str = setting("sn", "discriminator parameterization (sn, sr, sttp-c, svdp-r...); sr: dense + "
                                 "spectral compensation")
    rank: Optional[int] = setting(None, "SVD rank of both networks' low-rank layers", _positive, "a positive integer")
    g_rank: Optional[int] = setting(None, "generator rank (overrides gan.rank)", _positive, "a positive integer")
    d_rank: Optional[int] = setting(None, "discriminator rank (overrides gan.rank)", _positive, "a positive integer")
    g_kwargs: dict = setting({}, "generator constructor arguments (free-form: widths, bottom_width, z_dim)")
    d_kwargs: dict = setting({}, "discriminator constructor arguments (free-form: widths...)")
    loss: Literal["hinge", "ns"] = setting("hinge", "GAN objective (hinge or non-saturating)")
    n_dis: int = setting(5, "discriminator steps per generator step", _positive, "a positive integer (>= 1)")
    steps: int = setting(100000, "generator steps", _positive, "a positive integer")
    bs: int = setting(64, "batch size per process (of reals and of fakes)", _positive, "a positive integer")
    lr_g: float = setting(2.0e-4, "generator Adam learning rate", _positive, "a positive number")
    lr_d: float = setting(2.0e-4, "discriminator Adam learning rate", _positive, "a positive number")
    beta1: float = setting(0.0, "Adam beta1 of both networks", _below_one, "a number in [0, 1)")
    beta2: float = setting(0.9, "Adam beta2 of both networks", _below_one, "a number in [0, 1)")
    lr_decay: Literal["linear", "const"] = setting("linear", "learning rates: linear to 0, or constant")
    ema: Optional[float] = setting(None, "keep an EMA of G with this decay (e.g. 0.9999)", _below_one,
                                   "a number in [0, 1)")
    ema_start: int = setting(0, "G step from which the EMA averages (copies before)", _non_negative,
                             "an integer >= 0")
    dequantize: float = setting(1.0 / 255.0, "uniform noise half-width on reals in [-1, 1] units", _below_one,
                                "a number in [0, 1)")
    sn_exact: bool = setting(False, "sn: divide by the exact sigma_max instead of the power-iteration estimate")
    sr_every: int = setting(5, "sr: discriminator steps between spectral compensations", _positive,
                            "a positive integer")
    d_optimal: float = setting(1.0, "D-optimal penalty weight for the -r variants", _non_negative, "a number >= 0")
    metrics_every: Optional[int] = setting(None, "G steps between IS / FID / KID evaluations (and at the end; "
                                                 "default: no metrics)", _positive, "a positive integer")
    metrics_samples: int = setting(5000, "images generated per evaluation", _positive, "a positive integer")
    metrics: list[str] = setting(["fid", "isc", "kid"], "metrics computed (fid, isc, kid)")
    best_by: Literal["fid", "isc", "kid"] = setting("fid", "metric of the best checkpoint")
    extractor: str = setting("inception", "feature extractor: inception, offline (a classifier sttpfast trains "
                                          "on the dataset) or an extractor file")
    inception_weights: Optional[str] = setting(None, "InceptionV3 weights file (.pth; default torch-fidelity's "
                                                     "cache)")
    extractor_steps: int = setting(300, "training steps of the offline extractor", _positive, "a positive integer")
    extractor_kwargs: dict = setting({}, "offline extractor model arguments (free-form; arch picks the classifier)")
    grid: int = setting(64, "images in the sample grid", _positive, "a positive integer")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    param: ParamConfig = field(default_factory=ParamConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    log: LogConfig = field(default_factory=LogConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gan: GanConfig = field(default_factory=GanConfig)


@dataclass(frozen=True)
class Setting:
    """One leaf of the schema: ``key`` is dotted (``optim.lr``)."""

    key: str
    type: object
    default: object
    help: str
    check: object = None
    what: str = ""


def settings() -> dict[str, Setting]:
    """Every schema key (dotted) -> its :class:`Setting`, in schema order."""
    out = {}
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            key = f"{section.name}.{f.name}"
            out[key] = Setting(key, hints[f.name], getattr(defaults, f.name), f.metadata["help"],
                               f.metadata["check"], f.metadata["what"])
    return out


SCHEMA = settings()
#: the defaults as a nested dict (the shape every config has)
DEFAULTS: dict = dataclasses.asdict(Config())
FREE_FORM = {"model.kwargs", "param.layer_ranks", "gan.g_kwargs", "gan.d_kwargs", "gan.extractor_kwargs"}

#: ``sttpfast train`` flag -> schema key; a flag left unset keeps the files' value
CLI_FLAGS = {
    "dataset": "data.name", "data_dir": "data.data_dir", "bs": "data.bs", "subset": "data.subset",
    "download": "data.download", "arch": "model.arch", "param": "param.name", "rank": "param.rank",
    "compression": "param.compression", "init": "param.init", "include": "param.include",
    "exclude": "param.exclude", "opt": "optim.opt", "lr": "optim.lr", "wd": "optim.wd",
    "schedule": "optim.schedule", "epochs": "optim.epochs", "steps": "optim.steps", "seed": "train.seed",
    "out": "train.out", "name": "train.name", "logger": "log.logger", "mixed_precision": "train.mixed_precision",
    # tensor-layer zoo: per-layer rank plans, unrepresentable layers
    "plan": "param.plan", "rank_scale": "param.rank_scale", "unrepresentable": "param.unrepresentable",
}
# any timm backbone at the data's size; factored attention forms (issue 11)
CLI_FLAGS.update({"img_size": "data.img_size", "attention": "param.attention",
                  "attention_rank": "param.attention_rank"})
# the dense-layer policy of --compression (issue 12)
CLI_FLAGS.update({"keep_dense_if_no_gain": "param.keep_dense_if_no_gain"})


#: ``sttpfast gan`` flag -> schema key (the GAN app shares data / log / train with ``train``)
GAN_CLI_FLAGS = {
    "dataset": "data.name", "data_dir": "data.data_dir", "subset": "data.subset", "download": "data.download",
    "g_arch": "gan.g", "d_arch": "gan.d", "g_param": "gan.g_param", "d_param": "gan.d_param", "rank": "gan.rank",
    "g_rank": "gan.g_rank", "d_rank": "gan.d_rank", "loss": "gan.loss", "n_dis": "gan.n_dis",
    "steps": "gan.steps", "bs": "gan.bs", "lr_g": "gan.lr_g", "lr_d": "gan.lr_d", "ema": "gan.ema",
    "sn_exact": "gan.sn_exact", "metrics_every": "gan.metrics_every", "metrics_samples": "gan.metrics_samples",
    "extractor": "gan.extractor", "inception_weights": "gan.inception_weights", "seed": "train.seed",
    "out": "train.out", "name": "train.name", "checkpoint_every": "train.checkpoint_every", "logger": "log.logger",
}
__all__ += ["GAN_CLI_FLAGS"]

def type_members(tp) -> tuple:
    """The alternatives of a ``Union`` / ``Optional`` type (the type itself otherwise)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def choices(key: str) -> tuple[str, ...]:
    """The allowed string values of a schema key (its ``Literal`` members); () when free."""
    literals = [m for m in type_members(SCHEMA[key].type) if typing.get_origin(m) is Literal]
    return tuple(a for m in literals for a in typing.get_args(m))


def _describe(tp) -> str:
    parts = []
    for m in type_members(tp):
        if m is type(None):
            parts.append("null")
        elif typing.get_origin(m) is Literal:
            parts.append(" or ".join(repr(a) for a in typing.get_args(m)))
        elif typing.get_origin(m) is list:
            parts.append(f"a list of {'integers' if typing.get_args(m) == (int,) else 'strings'}")
        else:
            parts.append({int: "an integer", float: "a number", str: "a string", bool: "true or false",
                          dict: "a mapping"}[m])
    return ", ".join(parts[:-1]) + " or " + parts[-1] if len(parts) > 1 else parts[0]


def _coerce_to(tp, value):
    """``value`` as type ``tp``, or raise TypeError."""
    if tp is type(None):
        if value is None:
            return None
    elif typing.get_origin(tp) is Literal:
        if isinstance(value, str) and value in typing.get_args(tp):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:  # an integer is a number too; nan and inf are not useful anywhere here
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is list and typing.get_args(tp) == (int,):  # a tuple rank, an HT tree
        tree = _int_tree(value)
        if tree is not None:
            return tree
    elif typing.get_origin(tp) is list:  # a single glob is a list of one
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    elif tp is dict:
        if isinstance(value, dict):
            return value
    raise TypeError


def coerce(key: str, value):
    """``value`` checked against the schema's type and range for ``key``; ConfigError naming both."""
    s = SCHEMA[key]
    for tp in type_members(s.type):
        try:
            value = _coerce_to(tp, value)
            break
        except TypeError:
            continue
    else:
        raise ConfigError(f"config {key} = {value!r}: expected {_describe(s.type)}")
    if s.check is not None and not s.check(value):
        raise ConfigError(f"config {key} = {value!r}: expected {s.what}")
    if isinstance(value, dict):
        glued = [k for k, v in value.items() if v is None and isinstance(k, str) and ":" in k]
        if glued:
            name, _, rest = glued[0].partition(":")
            raise ConfigError(f"config {key} = {value!r}: {glued[0]!r} is a key without a value; YAML needs a "
                              f"space after the colon: {{{name}: {rest}}}")
    return value


def named_by_flags(message: str, flags: dict[str, str]) -> str:
    """A config error's ``message`` with each key a command-line flag set named by that flag
    (``flags``: dotted key -> ``--flag``): ``config param.rank = 0: expected ...`` -> ``--rank 0:
    expected ...``, as the user typed it. A message that names flags already is left as it is."""
    if "--" in message:
        return message
    for key, flag in flags.items():
        message = re.sub(rf"(?:\bconfig )?(?<![\w.]){re.escape(key)}(?!\w)( = )?",
                         lambda m, flag=flag: flag + (" " if m.group(1) else ""), message)
    return message


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def flatten(cfg: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (free-form tables stay whole)."""
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in FREE_FORM:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


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


def _nest(flat: dict) -> dict:
    """``{"a.b": 1} -> {"a": {"b": 1}}``."""
    out: dict = {}
    for dotted, value in flat.items():
        node = out
        *path, last = dotted.split(".")
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {dotted!r}: {part!r} is a value, not a section")
        node[last] = value
    return out


class _YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers in exponent form (``1e-3``, ``5E-4``) as floats the
    way YAML 1.2 does; YAML 1.1 wants a dot (``1.0e-3``) and makes ``1e-3`` a string."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$""", re.X),
    list("-+0123456789"))


def _yaml_load(text: str):
    return yaml.load(text, Loader=_YAMLLoader)  # noqa: S506 (a SafeLoader subclass)


def _yaml_problem(err: Exception) -> str:
    """The parser's complaint on one line: where (1-based), what, and in what context (its
    own message spans several lines with the source quoted)."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(err).split())
    text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, where = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context:
        text += f" ({context}" + (f" from line {where.line + 1}, column {where.column + 1}" if where else "") + ")"
    return text


def load_yaml(path: str | Path) -> dict:
    """One YAML mapping; ConfigError for a missing, unreadable or non-mapping file."""
    path = Path(path)
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:  # it named neither the file nor what it is
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                          f"{err.start})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data


class ConfigWarning(UserWarning):
    """A value a later config source overrode or dropped (the CLI says it as a ``warning:`` line)."""


def merge(base: dict, update: dict, source: str, sources: dict | None = None) -> dict:
    """Merge ``update`` (nested mapping) into a copy of ``base``, checking every key and value.

    ``sources`` (dotted key -> where it was last set) is updated in place; a value set by an
    earlier source and changed by this one is warned about."""
    out = copy.deepcopy(base)
    sources = {} if sources is None else sources
    for dotted, value in flatten(update).items():
        if dotted not in SCHEMA:
            keys = [k for k in SCHEMA if k.startswith(dotted + ".")]
            if keys:  # `optim: 3`: a section given a value
                raise ConfigError(f"config {dotted} in {source} is a section, not a value: give its keys as a "
                                  f"mapping ({keys[0]} and the others), or --set {dotted}.KEY=VALUE")
            section = dotted.split(".")[0]
            valid = [k for k in SCHEMA if k.startswith(section + ".")] or list(SCHEMA)
            raise ConfigError(f"unknown config key {dotted!r} in {source}{_suggest(dotted, valid)}")
        value = coerce(dotted, value)
        old = get(out, dotted)
        if dotted in sources and old != value:
            warnings.warn(f"config {dotted}: {old!r} from {sources[dotted]} overridden by {value!r} from {source}",
                          ConfigWarning, stacklevel=2)
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
            value = _yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"override {pair!r}: {raw!r} is not a valid YAML value") from None
        if isinstance(value, (bool, int, float)) and _takes_text(key.strip()):
            value = raw.strip()  # YAML reads `no`, `on`, `1e3` as non-strings; a text field keeps the text
        update[key.strip()] = value
    return merge(cfg, _nest(update), "--set", sources)


def _takes_text(key: str) -> bool:
    """Whether the schema key holds text (``str`` or a ``Literal`` of strings) and no number."""
    if key not in SCHEMA:
        return False
    members = type_members(SCHEMA[key].type)
    if any(m in (bool, int, float) for m in members):
        return False
    return str in members or bool(choices(key))


#: the settings of the low-rank methods' layers (refused with the default method, dense)
LOW_RANK_SETTINGS = ("rank", "compression", "rank_scale", "layer_ranks", "init", "include", "exclude", "plan",
                     "unrepresentable")


def _refuse_low_rank_settings_without_a_method(p: dict, name: str, sources: dict) -> None:
    """A setting of the low-rank methods given while param.name is dense by default (never
    chosen): a method was meant. The checks below blamed "'dense'", a name the user never gave.
    With --attention, --rank is the attention forms' rank per head: dense is then a choice."""
    if name != "dense" or "param.name" in sources or p.get("attention") is not None:
        return
    given = [key for key in LOW_RANK_SETTINGS if f"param.{key}" in sources and p[key] not in (None, [], {}, FULL_RANK)]
    if given:
        flags = {key: "--" + flag.replace("_", "-") for flag, key in CLI_FLAGS.items()}
        said = ", ".join(f"param.{key} = {p[key]!r}" + (f" ({flags[f'param.{key}']})" if f"param.{key}" in flags
                                                         else "") for key in given)
        raise ConfigError(f"{said}: param.name (--param) is dense by default, which parameterizes no layer: "
                          "give a low-rank one (sttp-r, svdp-r, lowrank, cp, tt, ...)")


def _resolve_param(cfg: dict, sources: dict) -> None:
    """Check the parameterization name and fill in the rank it gets (see the module docstring)."""
    from sttpfast.params import BASELINES, resolve_param

    p = cfg["param"]
    try:
        name = resolve_param(p["name"])
    except ValueError as err:
        raise ConfigError(f"config param.name: {err}") from None
    if p["rank"] is not None and p["compression"] is not None:
        raise ConfigError("give either param.rank or param.compression, not both")
    sized = [k for k in ("rank", "compression", "rank_scale", "layer_ranks") if p[k] not in (None, {})]
    if len(sized) > 1:
        raise ConfigError(f"give one of param.rank, param.compression, param.rank_scale and param.layer_ranks, "
                          f"not param.{sized[0]} and param.{sized[1]}")
    if p.get("attention_rank") is not None and p.get("attention") != "qk-ov":
        raise ConfigError("param.attention_rank (--attention-rank) is the rank per head of --attention qk-ov; "
                          "give --attention qk-ov, or leave it out")
    if (p.get("attention") == "qk-ov" and p.get("attention_rank") is None and p["rank"] is not None
            and not isinstance(p["rank"], int)):
        raise ConfigError(f"param.attention = 'qk-ov' takes its rank per head from param.rank (--rank), an integer, "
                          f"got {p['rank']!r}: give the rank per head with --attention-rank R")
    if p.get("attention") == "qk-ov" and p.get("attention_rank") is None and len(sized) == 1 and sized[0] != "rank":
        # the search would size the other layers alone, the forms at full head width gaining nothing
        raise ConfigError(f"param.attention = 'qk-ov' takes its rank per head from param.rank (--rank); "
                          f"param.{sized[0]} does not size the attention forms: give --rank R or --attention-rank R, "
                          "or --attention q-k-v (q, k and v are then layers the compression sizes like any other)")
    if p["plan"] == "energy" and p["compression"] is None:
        raise ConfigError("param.plan = 'energy' (--plan energy) spends a compression budget: give "
                          "param.compression (--compression Z) as well")
    _refuse_low_rank_settings_without_a_method(p, name, sources)
    if name in BASELINES and p["init"] is not None:
        raise ConfigError(f"param.init = {p['init']!r}: {p['name']!r} has no factors to initialize "
                          "(init is for the low-rank parameterizations)")
    if name == "dense":  # settings of the layers parameterize chooses: refused as a rank is
        for key in ("include", "exclude"):
            if p[key]:
                raise ConfigError(f"param.{key} = {p[key]!r}: {p['name']!r} parameterizes no layer (include / "
                                  "exclude choose the layers of the other parameterizations)")
        if p["unrepresentable"] == "error":
            raise ConfigError(f"param.unrepresentable = 'error': {p['name']!r} parameterizes no layer (the policy "
                              "is for the layers a tensor format cannot represent)")
    if name in BASELINES and p.get("attention") is None:  # with --attention the rank is per head
        if p["rank"] not in (None, FULL_RANK):
            raise ConfigError(f"param.rank = {p['rank']!r}: {p['name']!r} takes no rank "
                              f"(ranks are for the low-rank parameterizations)")
        p["rank"] = None
    elif p["rank"] == FULL_RANK:
        p["rank"] = None
    elif isinstance(p["rank"], list):  # a tuple rank: the method says whether it takes one, of what form
        from sttpfast.params import method

        try:
            rank = method(name).normalize_rank(tuple(p["rank"]))
        except ValueError as err:
            raise ConfigError(f"config param.rank = {p['rank']!r}: {err}") from None
        tree = getattr(rank, "tree", None)  # an HT tree stays one: each layer checks its shape
        p["rank"] = _as_lists(tree) if tree is not None else list(rank) if isinstance(rank, tuple) else rank
    elif p["rank"] is None and p["compression"] is None and p["rank_scale"] is None and not p["layer_ranks"]:
        p["rank"] = DEFAULT_RANK
        sources["param.rank"] = "default"


def attention_rank_of(p: dict) -> int | None:
    """The rank per head of the ``qk-ov`` forms a ``param`` section gives: ``attention_rank``
    (``--attention-rank``), else an int ``rank``, else None (the full head width)."""
    if p.get("attention_rank") is not None:
        return p["attention_rank"]
    return p["rank"] if isinstance(p.get("rank"), int) else None


def flat_rank(tree) -> list:
    """A tuple rank's entries in pre-order: an HT tree ``[[5, 8, 6], [4, 3, 2]]`` -> 5, 8, 6, 4, 3, 2."""
    return [x for node in tree for x in flat_rank(node)] if isinstance(tree, list) else [tree]


def _as_lists(tree):
    """A nested tuple as nested lists (YAML, JSON)."""
    return [_as_lists(node) for node in tree] if isinstance(tree, (tuple, list)) else tree


def build_config(files=(), overrides=(), cli: dict | None = None) -> tuple[dict, dict]:
    """Defaults <- files (in order) <- explicit CLI values (dotted keys) <- ``--set`` pairs.

    Returns ``(config, sources)``: the nested config (the keys of :data:`DEFAULTS`) and a map
    from each dotted key that was set to where (a file, ``the command line``, ``--set``, or
    ``default`` for the rank filled in for a low-rank parameterization)."""
    sources: dict = {}
    cfg = copy.deepcopy(DEFAULTS)
    for path in files:
        update = load_yaml(path)
        steps_before = cfg["optim"]["steps"]
        cfg = merge(cfg, update, str(path), sources)
        _later_settings_replace(cfg, flatten(update), str(path), sources, steps_before)
    # the command line is explicit: no warning when it overrides a file
    cli_update = _nest(dict(cli or {}))
    steps_before = cfg["optim"]["steps"]
    cfg = merge(cfg, cli_update, "the command line")
    sources.update({k: "the command line" for k in flatten(cli_update)})
    cfg = apply_overrides(cfg, list(overrides), sources)
    # flags and --set are one command: `--steps 7 --set optim.epochs=2` keeps both
    given = {k for k, where in sources.items() if where in ("the command line", "--set")}
    _later_settings_replace(cfg, given, "the command line", sources, steps_before)
    _resolve_param(cfg, sources)
    return cfg, sources


#: the settings that size the parameterized layers: one per run, the latest source's
SIZE_KEYS = ("param.rank", "param.compression", "param.rank_scale", "param.layer_ranks")
#: what metrics_every = null turns off: the settings read only when GAN metrics are computed
GAN_METRIC_KEYS = ("gan.metrics_samples", "gan.metrics", "gan.best_by", "gan.extractor", "gan.inception_weights",
                   "gan.extractor_steps", "gan.extractor_kwargs")


def _later_settings_replace(cfg: dict, keys_set, where: str, sources: dict, steps_before=None) -> None:
    """A later source (a flag, ``--set``, a later file) that sets ``keys_set`` replaces what they
    make meaningless in the earlier ones:

    * ``optim.epochs`` without ``optim.steps``: the epochs are the budget, the steps go (steps
      replace epochs whenever set: ``--cfg paper.yml --epochs 1`` kept the paper's 100,000);
      the other way round, steps over an earlier source's epochs (``steps_before``, the steps
      before this source, None: the epochs were the budget) keep the epochs, said as no budget;
    * one of :data:`SIZE_KEYS` (a rank, a compression target, a rank scale, per-layer ranks):
      the others an earlier source set go (``--cfg demo.yml --compression 10`` over the file's
      rank 8; two given by one source are refused);
    * ``gan.metrics_every`` set to null: the earlier metric settings go back to their defaults
      (a paper config's ``metrics_samples`` then refused the run as "no effect").
    """
    def reset(key: str, value, trigger: str, why: str) -> None:
        old, by = get(cfg, key), sources.get(trigger, where)
        if old != value:  # said, as merge says a value a later source overrides
            warnings.warn(f"config {key}: {old!r} from {sources.get(key, 'the defaults')} dropped: {why} from {by}",
                          ConfigWarning, stacklevel=3)
            _set(cfg, key, copy.deepcopy(value))
            sources[key] = by

    if "optim.epochs" in keys_set and "optim.steps" not in keys_set:
        reset("optim.steps", None, "optim.epochs", f"optim.epochs {cfg['optim']['epochs']} is the budget")
    earlier_epochs = sources.get("optim.epochs", "default")
    if ("optim.steps" in keys_set and "optim.epochs" not in keys_set and cfg["optim"]["steps"] is not None
            and earlier_epochs not in ("default", where) and steps_before is None):
        # the other way round: the epochs stay (steps win whenever set), not as the budget
        warnings.warn(f"config optim.epochs: {cfg['optim']['epochs']} from {earlier_epochs} is not the budget: "
                      f"optim.steps {cfg['optim']['steps']} from {sources.get('optim.steps', where)} is",
                      ConfigWarning, stacklevel=3)
    sized = [key for key in SIZE_KEYS if key in keys_set and get(cfg, key) not in (None, {})]
    if len(sized) == 1:  # two from one source: refused by _resolve_param
        for key in SIZE_KEYS:
            if key not in keys_set:
                reset(key, SCHEMA[key].default, sized[0], f"{sized[0]} {get(cfg, sized[0])!r} sizes the layers")
    if "gan.metrics_every" in keys_set and cfg["gan"]["metrics_every"] is None:
        for key in GAN_METRIC_KEYS:
            if key not in keys_set:
                reset(key, SCHEMA[key].default, "gan.metrics_every", "gan.metrics_every null turns the metrics off")


#: the sections only one command reads (both read data, log and train)
COMMAND_SECTIONS = {"train": ("model", "param", "optim", "reg"), "gan": ("gan",)}


def check_sections_read(cfg: dict, sources: dict, command: str) -> None:
    """Refuse settings that ``command`` (``train`` or ``gan``) would ignore: a GAN config given
    to ``train`` trained a dense classifier without a word. Only values other than the
    defaults count (a run's config.yaml from before runs kept their command's sections alone
    holds every section). ConfigError naming where they were set (the first file or flag that
    set any) and the command that reads them."""
    other = "gan" if command == "train" else "train"
    flat, defaults = flatten(cfg), flatten(DEFAULTS)
    foreign = sorted(key for key, where in sources.items()
                     if key.split(".")[0] in COMMAND_SECTIONS[other] and where != "default"
                     and flat.get(key) != defaults.get(key))
    if not foreign:
        return
    where = sources[foreign[0]]
    keys = [key for key in foreign if sources[key] == where]
    listed = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    fix = (f"run it with sttpfast {other} --cfg {where}" if where not in ("the command line", "--set")
           else "leave them out")
    if command == "train":
        raise ConfigError(f"{where} sets {listed}, GAN settings that sttpfast train does not read: {fix}")
    raise ConfigError(f"{where} sets {listed}, which sttpfast gan does not read (the GAN's networks and optimizers "
                      f"are under gan.*): {fix}")


def save_config(cfg: dict, path: str | Path, command: str | None = None) -> Path:
    """Write ``cfg`` as YAML that :func:`build_config` reads back to the same config.

    ``command`` (``"train"`` or ``"gan"``): leave out the sections only the other command
    reads (a classification run's config.yaml listed the GAN's 25 defaults as if they
    applied); they read back as their defaults."""
    from sttpfast.params import BASELINES, resolve_param

    out = copy.deepcopy(cfg)
    if command is not None:
        other = "gan" if command == "train" else "train"
        for section in COMMAND_SECTIONS[other]:
            out.pop(section, None)
    p = out.get("param")
    if (p is not None and p["rank"] is None and p["compression"] is None and p["rank_scale"] is None and not p["layer_ranks"]
            and resolve_param(p["name"]) not in BASELINES):
        p["rank"] = FULL_RANK  # None would read back as the default rank
    path = Path(path)
    path.write_text(yaml.safe_dump(out, sort_keys=False), encoding="utf-8")
    return path
