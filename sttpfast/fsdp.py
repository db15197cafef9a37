"""Sharding a parameterized model with FSDP2 (``torch.distributed.fsdp.fully_shard``).

    shard_model(model)                       # every block of the feature chain, then the root
    shard_model(model, units=["blocks.0", "blocks.1"])

Each unit's parameters (a parameterized layer's factors included) are sharded over the
processes and gathered only while the unit's forward (and backward) runs; the frame bank
(:mod:`sttpfast.params.frame_bank`) then builds each unit's weights, batched, inside that
forward. Works on CPUs with gloo and on GPUs with NCCL (the process group must exist).

Two things FSDP2 cannot do are handled here, not left to a deep error:

* a parameter with no element (an STTP core whose frame has no free entry, shape ``(0, r)``)
  cannot be sharded (FSDP2's reduce-scatter fails with "_chunk_cat expects non-empty
  tensor"): such parameters are left out of sharding (``ignored_params``); they hold nothing
  to synchronize;
* a unit inside a parametrization (``conv.parametrizations.weight``) would gather the factors
  only while the parametrization is called, after the frame bank's pass has started: refused
  with a message naming the layer, as is a unit that does not exist.
"""
from __future__ import annotations

import os

from torch import nn

from sttpfast.params.layers import parameterized_layers

__all__ = ["shard_model", "default_units", "fsdp_requested", "fsdp2_requested"]


def fsdp_requested() -> str | None:
    """The FSDP version the launcher asked for (``"1"`` / ``"2"``), or None: ``accelerate
    launch`` with a ``distributed_type: FSDP`` config sets ``ACCELERATE_USE_FSDP=true`` and
    ``FSDP_VERSION`` (``fsdp_version``, default 1) in every process."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() not in ("1", "true", "yes"):
        return None
    return os.environ.get("FSDP_VERSION", "1")


def fsdp2_requested() -> bool:
    """Whether the launcher asked for FSDP2 (see :func:`fsdp_requested`)."""
    return fsdp_requested() == "2"


def default_units(model: nn.Module) -> list[str]:
    """Names of the modules to shard one by one: the blocks of the model's feature chain
    (timm-style ``feature_chain()``, without the stem), or else the children of its first
    ``blocks`` / ``layers`` / ``stages`` sequence; [] when none is found (the root alone)."""
    names = {id(m): n for n, m in model.named_modules()}
    chain = getattr(model, "feature_chain", None)
    if callable(chain):
        return [names[id(m)] for m in chain()[1:] if id(m) in names]
    for attr in ("blocks", "layers", "stages"):
        seq = getattr(model, attr, None)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)):
            return [f"{attr}.{i}" for i in range(len(seq))]
    return []


def _check_units(model: nn.Module, units: list[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    layers = [name for name, _, _ in parameterized_layers(model)]
    out = []
    for unit in units:
        owner = next((layer for layer in layers if unit.startswith(f"{layer}.parametrizations")), None)
        if owner is not None:
            raise ValueError(f"cannot shard {unit!r} with FSDP2: it is inside the parametrization of layer "
                             f"{owner!r}; shard a module that contains the layer (its block) instead")
        if unit not in modules or unit == "":
            raise ValueError(f"cannot shard {unit!r} with FSDP2: the model has no such module "
                             f"(blocks: {', '.join(default_units(model)[:4]) or 'none'}...)")
        out.append(modules[unit])
    return out


def shard_model(model: nn.Module, units: list[str] | None = None, mesh=None) -> nn.Module:
    """Apply ``fully_shard`` to each unit (module names; default :func:`default_units`), then
    to the root, in place; returns ``model``. ValueError naming a unit that cannot be sharded."""
    from torch.distributed.fsdp import fully_shard

    modules = _check_units(model, default_units(model) if units is None else list(units))
    empty = {p for p in model.parameters() if p.numel() == 0}  # nothing to shard (see module doc)
    for module in modules:
        fully_shard(module, mesh=mesh, ignored_params=empty or None)
    fully_shard(model, mesh=mesh, ignored_params=empty or None)
    return model
