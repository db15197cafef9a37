"""Penalty terms computed from the parametrizations' factors (used by the callbacks)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from sttpfast.params import LowRank
from sttpfast.surgery import factors_of, parameterized_layers

__all__ = ["d_optimal_penalty", "frobenius_decay_penalty"]


def d_optimal_penalty(model: nn.Module, only_penalized: bool = True) -> Tensor:
    """``-mean(log|s|)`` over the learned spectra of all (-R) layers (Obukhov et al. 2021).

    With ``s = S / max|S|`` every ``log|s| <= 0``, so the penalty is ``>= 0`` and pulls
    the spectrum towards 1, the D-optimal design. ``only_penalized=False`` also counts
    -L layers. Zero (a scalar) when no layer has a learned spectrum.
    """
    logs = [p.log_spectrum(*factors_of(m)) for _, m, p in parameterized_layers(model)
            if getattr(p, "learned", False) and (p.penalized or not only_penalized)]
    if not logs:
        return torch.zeros(())
    return -torch.cat(logs).mean()


def frobenius_decay_penalty(model: nn.Module) -> Tensor:
    """``(1/2) sum |U V^T|_F^2`` over low-rank layers (Khodak et al. 2021), computed as
    ``(1/2) tr((U^T U)(V^T V))`` without forming ``U V^T`` (``r x r`` work)."""
    terms = [0.5 * ((u.mT @ u) * (v.mT @ v)).sum() for _, m, p in parameterized_layers(model)
             if isinstance(p, LowRank) for u, v in [factors_of(m)]]
    return torch.stack(terms).sum() if terms else torch.zeros(())
