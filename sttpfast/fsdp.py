"""Sharding a parameterized model with FSDP2 (``torch.distributed.fsdp.fully_shard``).

    shard_model(model)                       # every block of the feature chain, then the root
    shard_model(model, units=["blocks.0", "blocks.1"])

Each unit's parameters (a parameterized layer's factors included) are sharded over the
processes and gathered only while the unit's forward (and backward) runs; the frame bank
(:mod:`sttpfast.params.frame_bank`) then builds each unit's weights, batched, inside that
forward. Works on CPUs with gloo and on GPUs with NCCL (the process group must exist).

Two things FSDP2 cannot do are handled here, not left to a deep error:

* a parameter with no element cannot be sharded (FSDP2's reduce-scatter fails with
  "_chunk_cat expects non-empty tensor"): such parameters are left out of sharding
  (``ignored_params``); they hold nothing to synchronize. (The project's own, an STTP core
  whose frame has no free entry, shape ``(0, r)``, is a buffer since 2026-11-30; a model may
  hold others.)
* a unit inside a parametrization (``conv.parametrizations.weight``) would gather the factors
  only while the parametrization is called, after the frame bank's pass has started: refused
  with a message naming the layer, as is a unit that does not exist.

Outside a unit's forward its parameters are sharded ``DTensor`` s. What reads whole tensors
there (the checkpoint writer, validation, the spectrum callbacks) goes through the helpers
below; each is a collective: every rank calls it, in the same order.

* :func:`gathered` (a context): every unit's parameters whole on every rank (FSDP2's own
  ``unshard``), optionally written back into the shards at exit (a projection in place);
* :func:`full_tensor` / :func:`full_state_dict`: a whole copy of one tensor / of the model's
  state (what a one-process run saves); :func:`shard_like` / :func:`load_full_state_dict`:
  the reverse, from a whole tensor every rank holds (a checkpoint every rank reads).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from sttpfast.params.layers import factors_of, parameterized_layers

__all__ = ["ShardingError", "shard_model", "default_units", "fsdp_requested", "fsdp2_requested", "fsdp_units",
           "is_sharded", "gathered", "full_tensor", "gathered_factors", "full_state_dict", "shard_like",
           "load_full_state_dict"]


class ShardingError(ValueError):
    """A model or unit FSDP2 cannot shard. Its text stays the one message it was raised with
    when fastai's callback event wrapper rewrites ``args`` (``Exception occured in ...``), so
    a refusal raised while a Learner is built still reaches the CLI as one ``Error:`` line."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


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
            raise ShardingError(f"cannot shard {unit!r} with FSDP2: it is inside the parametrization of layer "
                             f"{owner!r}; shard a module that contains the layer (its block) instead")
        if unit not in modules or unit == "":
            raise ShardingError(f"cannot shard {unit!r} with FSDP2: the model has no such module "
                             f"(blocks: {', '.join(default_units(model)[:4]) or 'none'}...)")
        out.append(modules[unit])
    return out


def shard_model(model: nn.Module, units: list[str] | None = None, mesh=None) -> nn.Module:
    """Apply ``fully_shard`` to each unit (module names; default :func:`default_units`), then
    to the root, in place; returns ``model``. ShardingError (a ValueError) naming a unit that
    cannot be sharded, before anything is sharded."""
    from torch.distributed.fsdp import fully_shard

    modules = _check_units(model, default_units(model) if units is None else list(units))
    empty = {p for p in model.parameters() if p.numel() == 0}  # nothing to shard (see module doc)
    for module in modules:
        fully_shard(module, mesh=mesh, ignored_params=empty or None)
    fully_shard(model, mesh=mesh, ignored_params=empty or None)
    return model


# ---------------------------------------------------------------------------------------
# whole tensors of a sharded model (collectives: every rank calls them, in the same order)
def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to (root last), [] if none."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    return units[1:] + units[:1] if units and units[0] is model else units


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP2-sharded parameters (``DTensor`` s)."""
    return any(_is_dtensor(p) for p in model.parameters())


@contextmanager
def gathered(model: nn.Module, write_back: bool = False) -> Iterator[nn.Module]:
    """Every FSDP2 unit of ``model`` unsharded for the ``with`` block: ``model.parameters()``
    are whole plain tensors on every rank and a forward pass runs no collective (units stay
    unsharded after their forward), so the ranks may run different numbers of forwards
    (validation). ``write_back``: in-place changes to the whole parameters (a projection) are
    copied into the shards at exit (each rank keeps its own slice). A model without units
    passes through unchanged. Memory: the whole model's parameters on every rank for the
    block (what one process holds); the spectrum callbacks read it every ``every`` steps."""
    units = fsdp_units(model)
    if not units:
        yield model
        return
    sharded = dict(model.named_parameters())
    saved = [_reshard_setting(unit) for unit in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        if write_back:
            with torch.no_grad():
                for name, whole in model.named_parameters():
                    shard = sharded[name]
                    if _is_dtensor(shard) and whole is not shard:
                        shard.to_local().copy_(shard_like(whole.detach(), shard).to_local())
        for unit, setting in zip(units, saved):
            unit.reshard()
            _restore_reshard_setting(unit, setting)


def _reshard_setting(unit) -> tuple:
    """A unit's reshard-after-forward setting as FSDP2 holds it. FSDP2 has a setter
    (``set_reshard_after_forward``) and no getter, and the root's setting is chosen at its
    first forward (``_auto_reshard_after_forward``: the root keeps its parameters), so the
    setting is read from the state the setter writes (checked with torch 2.14) to be put back.
    None where a torch release holds it elsewhere: the unit then gets fully_shard's default
    back (below)."""
    try:
        state = unit._get_fsdp_state()
        return (state._auto_reshard_after_forward, [g.post_forward_mesh_info for g in state._fsdp_param_groups])
    except AttributeError:
        return None


def _restore_reshard_setting(unit, setting: tuple | None) -> None:
    if setting is None:  # not readable in this torch: fully_shard's default, resharded after forward
        unit.set_reshard_after_forward(True, recurse=False)
        return
    state = unit._get_fsdp_state()
    state._auto_reshard_after_forward = setting[0]
    for group, info in zip(state._fsdp_param_groups, setting[1]):
        group.post_forward_mesh_info = info


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor behind ``t`` (an all-gather for a sharded ``DTensor``, differentiable);
    ``t`` itself otherwise."""
    return t.full_tensor() if _is_dtensor(t) else t


def gathered_factors(module: nn.Module) -> tuple[Tensor, ...]:
    """The factors of a parameterized layer (:func:`~sttpfast.params.layers.factors_of`), whole
    on every rank; gradients flow back to the shards (a penalty computed from them)."""
    return tuple(full_tensor(f) for f in factors_of(module))


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every sharded tensor gathered whole: detached CPU copies,
    the same keys and values a one-process model of the same weights has."""
    return {k: full_tensor(v).detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def shard_like(whole: Tensor, like: Tensor) -> Tensor:
    """``whole`` (the same on every rank) as a ``DTensor`` sharded as ``like`` (this rank's
    slice, no communication), on ``like``'s device; ``whole`` moved there when ``like`` is a
    plain tensor."""
    if not _is_dtensor(like):
        return whole.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def load_full_state_dict(model: nn.Module, tensors: dict[str, Tensor], strict: bool = True) -> None:
    """``model.load_state_dict`` of a whole (one-process) state into a sharded or plain model."""
    own = model.state_dict()
    model.load_state_dict({k: shard_like(v, own[k]) if k in own else v for k, v in tensors.items()}, strict=strict)
