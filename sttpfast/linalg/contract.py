"""One einsum in opt_einsum's contraction order, its path found once per equation and shapes.

The tensor layers (TT, TR, CP) contract chains of small cores at every weight build. opt_einsum
finds the cheapest pairwise order; its expression is cached per equation and operand shapes,
so a build pays the contractions alone. Under torch.compile the contraction is ``torch.einsum``
instead: opt_einsum's path search is Python that dynamo cannot trace (a graph break per layer,
and a recompile per layer class after it), while ``torch.einsum`` is one traced op whose path
torch finds with opt_einsum as well.
"""
from __future__ import annotations

from functools import lru_cache

import opt_einsum
import torch
from torch import Tensor

__all__ = ["contract"]


@lru_cache(maxsize=1024)
def _expression(eq: str, shapes: tuple[tuple[int, ...], ...]):
    return opt_einsum.contract_expression(eq, *shapes, optimize="auto")


def contract(eq: str, *operands: Tensor) -> Tensor:
    """``einsum(eq, *operands)`` (opt_einsum's symbols; up to 52 letters under torch.compile)."""
    if torch.compiler.is_compiling():
        return torch.einsum(eq, *operands)
    return _expression(eq, tuple(tuple(t.shape) for t in operands))(*operands, backend="torch")
