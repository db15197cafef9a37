"""The full-rank baselines as registry entries: ``dense`` (no parametrization) and ``sn``.

``sn`` is PyTorch's own ``torch.nn.utils.parametrizations.spectral_norm`` (the SNGAN
baseline): ``W = W_0 / sigma_max(W_0)`` with ``sigma_max`` estimated by power iteration, so
``sigma_max(W) = 1`` (up to the estimate). Every entry of ``W_0`` is free: its DOF is the
dense size. Neither takes a rank.
"""
from __future__ import annotations

import math

from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from sttpfast.params.layers import parametrization_of
from sttpfast.params.registry import METHOD_ATTR, Method, register_method

__all__ = ["DENSE", "SPECTRAL_NORM"]


def _full_dof(shape, transposed=False, rank=None) -> int:
    return math.prod(shape)


def _apply_dense(module: nn.Module, rank=None, init: str = "identity") -> None:
    """Nothing to do: the layer keeps its plain weight."""


def _apply_spectral_norm(module: nn.Module, rank=None, init: str = "identity") -> None:
    spectral_norm(module)
    # the registry recognizes parametrizations by this attribute, never by (private) class names
    setattr(parametrization_of(module), METHOD_ATTR, "sn")


DENSE = register_method(Method(name="dense", apply=_apply_dense, count_dof=_full_dof, rank_kind=None,
                               compresses=False))
SPECTRAL_NORM = register_method(Method(name="sn", apply=_apply_spectral_norm, count_dof=_full_dof,
                                       rank_kind=None, bounded=True, compresses=False))
