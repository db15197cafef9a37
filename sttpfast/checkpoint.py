"""Saving and loading parameterized models as safetensors (never unpickling anything).

The file holds the state_dict of the parameterized model (its factors) and, in the
safetensors metadata, the parameterization spec (layer -> param, rank, shape), the timm
architecture name and its constructor arguments, and the attention form (``qk-ov``, ``q-k-v``)
when the model is in one, so a checkpoint rebuilds its own model.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sttpfast.atomic import write_beside
from sttpfast.params.attention import ATTENTION_FORMS, attention_blocks, attention_form_of, split_qkv
from sttpfast.surgery import apply_spec, parameterization_spec

__all__ = ["save_parameterized", "load_parameterized", "read_metadata", "describe_spec_difference"]

_SPEC, _ARCH, _ARGS, _VERSION = "sttpfast_spec", "architecture", "model_args", "sttpfast_version"
_ATTENTION = "sttpfast_attention"
#: a tensor of a split attention block (:class:`~sttpfast.params.attention.SplitQKV`)
_SPLIT_TENSOR = re.compile(r"\.qkv\.[qkv]\.")


def _architecture(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture")


def _as_json(value):
    """``value`` as JSON data (tuples as lists: timm takes either), or raise TypeError."""
    if isinstance(value, (tuple, list)):
        return [_as_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _as_json(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(type(value).__name__)


def _jsonable_args(model: nn.Module) -> dict:
    """The model's timm creation arguments (``_model_args``) that the file can hold; the others
    are named in a warning (the file then rebuilds the model without them)."""
    out = {}
    for key, value in (getattr(model, "_model_args", {}) or {}).items():
        try:
            out[key] = _as_json(value)
        except TypeError:
            shown = getattr(value, "__name__", type(value).__name__)
            warnings.warn(f"save_parameterized: the model argument {key} ({shown}) is not JSON: the file "
                          "rebuilds the model without it", stacklevel=3)
    return out


def save_parameterized(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None,
                       tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (parameterized or not) to ``path``; atomic (temp file + rename).

    ``tensors``: the model's whole state, already gathered (:func:`sttpfast.fsdp.full_state_dict`,
    which every rank of a sharded model must call) when only this rank writes; by default
    ``model.state_dict()``, which must then hold no sharded tensor."""
    from sttpfast import __version__
    from sttpfast.fsdp import is_sharded

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"save_parameterized: {path} is a folder; give a file path (e.g. {path / 'model.safetensors'})")
    if not path.parent.is_dir():  # a mistyped folder is not made
        raise ValueError(f"save_parameterized: folder {path.parent} does not exist; create it first (or give "
                         "another path)")
    if tensors is None:
        if is_sharded(model):
            raise ValueError("save_parameterized: the model is sharded (FSDP2); gather its state on every rank "
                             "with sttpfast.fsdp.full_state_dict(model) and pass it as tensors=")
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {_SPEC: json.dumps(parameterization_spec(model)), _VERSION: __version__,
            _ARGS: json.dumps(_jsonable_args(model))}
    if _architecture(model):
        meta[_ARCH] = _architecture(model)
    form = attention_form_of(model)
    if form is not None:
        meta[_ATTENTION] = form
    for key, value in (metadata or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return write_beside(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a checkpoint; ValueError if the file is not a readable safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable safetensors checkpoint ({err})") from None


def describe_spec_difference(have: dict, want: dict) -> list[str]:
    """Human-readable differences between two parameterization specs."""
    out = []
    for name in sorted(set(have) | set(want)):
        a, b = have.get(name), want.get(name)
        if a is None:
            out.append(f"{name}: model is dense, checkpoint has {b['param']} rank {b['rank']}")
        elif b is None:
            out.append(f"{name}: model has {a['param']} rank {a['rank']}, checkpoint is dense")
        elif a != b:
            out.append(f"{name}: model has {a['param']} rank {a['rank']} shape {a['shape']}, "
                       f"checkpoint has {b['param']} rank {b['rank']} shape {b['shape']}")
    return out


def checkpoint_spec(path: str | os.PathLike) -> dict[str, dict]:
    """The parameterization spec stored in a :func:`save_parameterized` file (ValueError
    when it holds none)."""
    meta = read_metadata(path)
    if _SPEC not in meta:
        raise ValueError(f"{path}: no sttpfast parameterization spec in the metadata")
    return json.loads(meta[_SPEC])


def load_parameterized(path: str | os.PathLike, model: nn.Module | None = None, strict: bool = True) -> nn.Module:
    """Load a checkpoint written by :func:`save_parameterized`.

    Without ``model`` the architecture stored in the file is created with timm. A dense
    ``model`` gets the stored attention form and parameterization first (a ``q-k-v`` file
    splits its fused ``qkv`` Linears); an already parameterized one must match them. Any
    mismatch raises ValueError saying what differs; ``model`` is then unchanged.
    """
    meta = read_metadata(path)
    spec = checkpoint_spec(path)
    form = meta.get(_ATTENTION)
    if form is not None and form not in ATTENTION_FORMS:
        raise ValueError(f"{path}: the checkpoint's attention form {form!r} is not one this sttpfast knows "
                         f"({', '.join(ATTENTION_FORMS)})")
    if model is None:
        arch = meta.get(_ARCH)
        if not arch:
            raise ValueError(f"{path}: the checkpoint names no architecture; pass the model")
        import sttpfast.models  # noqa: F401  (registers sttpfast's architectures)

        model = timm.create_model(arch, **json.loads(meta.get(_ARGS, "{}")))
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: corrupt checkpoint ({err})") from None
    if form is None and any(_SPLIT_TENSOR.search(key) for key in tensors):
        form = "q-k-v"  # a file from before the record: its tensor names show the split
    current = parameterization_spec(model)
    if current:
        diff = describe_spec_difference(current, spec)
        if diff:
            raise ValueError(f"{path}: checkpoint does not match the model: " + "; ".join(diff))
        _load_state(model, tensors, path, strict)
        return model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = _split_as_saved(model, form)
    try:
        apply_spec(model, spec)
    except ValueError:
        _put_back(fused)
        raise
    try:
        _load_state(model, tensors, path, strict)
    except ValueError:
        from sttpfast.surgery import densify

        densify(model, inplace=True)
        _put_back(fused)
        model.load_state_dict(before)
        raise
    return model


def _split_as_saved(model: nn.Module, form: str | None) -> list[tuple[nn.Module, nn.Module]]:
    """Split the fused ``qkv`` Linears of a dense ``model`` when the checkpoint's form is
    ``q-k-v`` (its spec and tensors name ``qkv.q``, ``qkv.k``, ``qkv.v``); returns the
    ``(block, fused Linear)`` pairs :func:`_put_back` restores if loading fails.

    ``qk-ov`` needs no step here: its forms are parametrizations of the fused Linears, which
    the spec names and ``apply_spec`` puts back."""
    if form != "q-k-v":
        return []
    fused = [(block, block.qkv) for _, block, _, _ in attention_blocks(model)]
    if fused:  # split_qkv copies the weights: the fused Linears stay as they were
        split_qkv(model)
    return fused


def _put_back(fused: list[tuple[nn.Module, nn.Module]]) -> None:
    """Undo :func:`_split_as_saved`: each block gets its fused ``qkv`` Linear again."""
    for block, qkv in fused:
        block.qkv = qkv


def _load_state(model: nn.Module, tensors: dict[str, torch.Tensor], path, strict: bool) -> None:
    own = model.state_dict()
    problems = [f"{k}: model {tuple(own[k].shape)} vs checkpoint {tuple(v.shape)}"
                for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    if strict:
        problems += [f"missing in checkpoint: {k}" for k in own if k not in tensors][:10]
        problems += [f"unexpected in checkpoint: {k}" for k in tensors if k not in own][:10]
    if problems:
        raise ValueError(f"{path}: checkpoint does not match the model: " + "; ".join(problems))
    from sttpfast.fsdp import load_full_state_dict

    load_full_state_dict(model, tensors, strict=strict)  # each rank of a sharded model keeps its slice
