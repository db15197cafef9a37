"""Batching the weights of many spectral-chain layers: few large calls instead of many tiny ones.

A spectral chain layer builds a dozen or more small Householder frames and contracts
them; a model does that hundreds of times per step, and on a CPU each tiny op costs
mostly fixed overhead. The bank builds every layer's weight together:

1. frames of equal shape (they recur across layers) are stacked and built in one batched
   :func:`~sttpfast.linalg.householder.householder_frame` call per shape;
2. layers of equal layout (shape, rank, variant) are contracted together: their frames
   are contiguous slices of the shape groups (the stacking order makes sure), so the
   U/V sweeps and ``U diag(s) V^T`` run once per layout, batched.

The bank lives for one forward pass of the module it is attached to: a forward pre-hook
clears it, the first layer that needs its weight computes all of them, the other layers
take theirs, and a forward hook (``always_call``) drops them afterwards. Outside a
forward pass (a callback reading one layer's weight, say) layers build their own
weight, so nothing stale or with a freed autograd graph is ever reused.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

from sttpfast.linalg.householder import householder_frame
from sttpfast.params.layers import factors_of, parameterized_layers

__all__ = ["FrameBank", "attach_frame_bank", "detach_frame_bank"]

_ATTR = "_sttpfast_frame_bank"


class FrameBank:
    """Weights of all spectral-chain layers under one module, computed together."""

    def __init__(self, members: list[tuple[nn.Module, nn.Module]]):
        self.members = members  # (layer, its SpectralChain parametrization)
        self._weights: dict[int, Tensor] | None = None
        self._active = False
        self._handles = []

    # -- hooks --------------------------------------------------------------------------
    def before_forward(self, module, args):
        self._active, self._weights = True, None

    def after_forward(self, module, args, output):
        self._active, self._weights = False, None

    # -- weights ------------------------------------------------------------------------
    def weight(self, parametrization: nn.Module) -> Tensor | None:
        """``parametrization``'s weight matrix ``(d_out, d_in)``, or None outside a forward."""
        if not self._active:
            return None
        if self._weights is None:
            # orthogonality needs full precision: never build frames under bf16/fp16 autocast
            with torch.autocast(_device_type(self), enabled=False):
                self._weights = self._compute()
        return self._weights.get(id(parametrization))

    def _layout_groups(self):
        groups = defaultdict(list)
        for layer, p in self.members:
            raw, params = p.split_factors(factors_of(layer))
            key = (p.layout, params[0][0].dtype, params[0][0].device)
            groups[key].append((id(p), raw, params, p.gain))
        return groups

    def _compute(self) -> dict[int, Tensor]:
        from sttpfast.params.chain import contract_chain, scaled_spectrum, weight_matrix

        layouts = self._layout_groups()
        # 1. frames, one WY call per frame shape; a (layout, core) block is a contiguous run
        shape_items = defaultdict(list)  # frame key -> [(bottom, top)]
        where = {}  # (layout key, core index) -> (frame key, start, count)
        for lkey, members in layouts.items():
            for k, core in enumerate(lkey[0].cores):
                fkey = (core.rows, core.cols, core.reduced, lkey[1], lkey[2])
                where[lkey, k] = (fkey, len(shape_items[fkey]), len(members))
                shape_items[fkey].extend(params[k] for _, _, params, _ in members)
        built = {}
        for fkey, items in shape_items.items():
            bottoms = torch.stack([b for b, _ in items])
            tops = None if fkey[2] else torch.stack([t for _, t in items])
            built[fkey] = householder_frame(bottoms, tops)
        # 2. contraction, one batched sweep per layout
        out = {}
        for lkey, members in layouts.items():
            frames = []
            for k in range(len(lkey[0].cores)):
                fkey, start, count = where[lkey, k]
                frames.append(built[fkey][start:start + count])
            u, v = contract_chain(lkey[0], frames)
            raw = torch.stack([raw for _, raw, _, _ in members]) if lkey[0].learned else None
            spectrum = scaled_spectrum(raw, torch.stack([gain for _, _, _, gain in members]), lkey[0].rank)
            for (pid, _, _, _), w in zip(members, weight_matrix(u, spectrum, v).unbind(0)):
                out[pid] = w
        return out


def _device_type(bank: FrameBank) -> str:
    return factors_of(bank.members[0][0])[0].device.type


def detach_frame_bank(model: nn.Module) -> None:
    """Remove the bank (hooks and references) from ``model``, if it has one."""
    bank = model.__dict__.pop(_ATTR, None)
    if bank is None:
        return
    for handle in bank._handles:
        handle.remove()
    for _, p in bank.members:
        p.__dict__.pop("frame_bank", None)


def attach_frame_bank(model: nn.Module) -> FrameBank | None:
    """(Re)build the bank of every spectral-chain layer under ``model``."""
    from sttpfast.params.chain import SpectralChain

    detach_frame_bank(model)
    members = [(m, p) for _, m, p in parameterized_layers(model) if isinstance(p, SpectralChain)]
    if len(members) < 2:
        return None
    bank = FrameBank(members)
    bank._handles = [model.register_forward_pre_hook(bank.before_forward),
                     model.register_forward_hook(bank.after_forward, always_call=True)]
    for _, p in members:
        p.__dict__["frame_bank"] = bank  # a plain attribute: not a submodule, not in state_dict
    model.__dict__[_ATTR] = bank
    return bank
