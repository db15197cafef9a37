"""Penalty terms computed from the parametrizations' factors (used by the callbacks)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from sttpfast.params.base import learned_spectrum
from sttpfast.params.layers import factors_of, parameterized_layers
from sttpfast.params.registry import method_of

__all__ = ["d_optimal_penalty", "frobenius_decay_penalty", "d_optimal_layers", "frobenius_decay_layers"]


def d_optimal_penalty(model: nn.Module, only_penalized: bool = True, factors=factors_of) -> Tensor:
    """``-mean(log|s|)`` over the learned spectra of all (-R) layers (Obukhov et al. 2021).

    With ``s = S / max|S|`` every ``log|s| <= 0``, so the penalty is ``>= 0`` and pulls
    the spectrum towards 1, the D-optimal design. ``only_penalized=False`` also counts
    -L layers. Zero (a scalar) when no layer has a learned spectrum. ``factors(module)`` reads
    a layer's factors (a sharded model's whole ones: :func:`sttpfast.fsdp.gathered_factors`).
    """
    layers = [(p, factors(m)) for _, m, p in d_optimal_layers(model, only_penalized)]
    if not layers:
        return torch.zeros(())
    raws = [p.raw_spectrum(*f) for p, f in layers]
    if any(raw is None for raw in raws):
        return -torch.cat([p.log_spectrum(*f) for p, f in layers]).mean()
    # one log|S / max|S|| per group of equal rank instead of one per layer (six autograd nodes
    # each, at every step); every row's values are those of its own layer's, in layer order
    groups: dict[tuple, list[int]] = {}
    for i, raw in enumerate(raws):
        groups.setdefault((raw.shape, raw.dtype, raw.device), []).append(i)
    logs: list[Tensor | None] = [None] * len(raws)
    for members in groups.values():
        stacked = raws[members[0]] if len(members) == 1 else torch.stack([raws[i] for i in members])
        rows = torch.log(learned_spectrum(stacked).abs())
        for i, row in zip(members, [rows] if len(members) == 1 else rows.unbind(0)):
            logs[i] = row
    return -torch.cat(logs).mean()


def d_optimal_layers(model: nn.Module, only_penalized: bool = True):
    """``(name, module, p)`` of the layers with a learned spectrum whose method takes the
    D-optimal penalty (all learned spectra with ``only_penalized=False``)."""
    for name, m, p in parameterized_layers(model):
        entry = method_of(p)
        if entry is not None and entry.learned_spectrum and (entry.penalty == "d_optimal" or not only_penalized):
            yield name, m, p


def frobenius_decay_layers(model: nn.Module):
    """``(name, module, p)`` of the layers whose method takes Frobenius decay (``W = U V^T``)."""
    for name, m, p in parameterized_layers(model):
        entry = method_of(p)
        if entry is not None and entry.penalty == "frobenius_decay":
            yield name, m, p


def frobenius_decay_penalty(model: nn.Module) -> Tensor:
    """``(1/2) sum |U V^T|_F^2`` over low-rank layers (Khodak et al. 2021), computed as
    ``(1/2) tr((U^T U)(V^T V))`` without forming ``U V^T`` (``r x r`` work)."""
    terms = [0.5 * ((u.mT @ u) * (v.mT @ v)).sum() for _, m, _ in frobenius_decay_layers(model)
             for u, v in [factors_of(m)]]
    return torch.stack(terms).sum() if terms else torch.zeros(())
