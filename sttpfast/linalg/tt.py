"""Tensor-train helpers: mode factorization, TT ranks, contraction and TT-SVD.

A TT tensor of shape ``(n_1, ..., n_D)`` is a chain of cores ``C_k`` of shape
``(R_{k-1}, n_k, R_k)`` with ``R_0 = R_D = 1``.
"""
from __future__ import annotations

import math
import opt_einsum
import torch
from torch import Tensor

from sttpfast.linalg.contract import contract
from sttpfast.linalg.memo import constant_memo

__all__ = ["prime_factors", "tt_ranks", "tt_contract", "tt_svd"]


def prime_factors(n: int) -> list[int]:
    """Prime factors of ``n`` in ascending order (``[]`` for 1)."""
    if n < 1:
        raise ValueError(f"prime_factors needs a positive integer, got {n}")
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def tt_ranks(modes: list[int] | tuple[int, ...], max_rank: int | None = None) -> list[int]:
    """TT ranks ``[R_0, ..., R_D]`` with ``R_k = min(prod(n_1..n_k), prod(n_{k+1}..n_D), max_rank)``.

    These are the largest ranks a TT tensor of these modes can have (capped by ``max_rank``),
    so every core ``(R_{k-1} n_k) x R_k`` is tall enough to be an orthonormal frame.
    """
    d = len(modes)
    ranks = [1]
    for k in range(1, d):
        r = min(math.prod(modes[:k]), math.prod(modes[k:]))
        ranks.append(r if max_rank is None else min(r, max_rank))
    ranks.append(1)
    return ranks


@constant_memo
def _chain_equation(d: int) -> str:
    """einsum equation contracting a TT chain of ``d`` cores (boundary bonds kept)."""
    bonds = [opt_einsum.get_symbol(i) for i in range(d + 1)]
    modes = [opt_einsum.get_symbol(d + 1 + i) for i in range(d)]
    terms = [bonds[k] + modes[k] + bonds[k + 1] for k in range(d)]
    return ",".join(terms) + "->" + bonds[0] + "".join(modes) + bonds[d]


def tt_contract(cores: list[Tensor]) -> Tensor:
    """Full tensor of a TT chain.

    Args:
        cores: ``D`` tensors ``(R_{k-1}, n_k, R_k)``; the boundary ranks may exceed 1.
    Returns:
        ``(R_0, n_1, ..., n_D, R_D)`` with the boundary dims squeezed when they are 1.
    """
    full = contract(_chain_equation(len(cores)), *cores)
    if cores[0].shape[0] == 1:
        full = full.squeeze(0)
    if cores[-1].shape[-1] == 1:
        full = full.squeeze(-1)
    return full


def tt_svd(tensor: Tensor, max_rank: int | None = None, rel_eps: float = 0.0) -> list[Tensor]:
    """TT-SVD (Oseledets 2011): left-orthonormal cores of ``tensor``.

    Each unfolding is truncated to ``min(tt_ranks(...)[k], rank where the relative
    discarded energy stays <= rel_eps)``. Exact when nothing is truncated.

    Args:
        tensor: ``(n_1, ..., n_D)``.
    Returns:
        cores ``(R_{k-1}, n_k, R_k)``; all but the last are left-orthonormal.
    """
    modes = list(tensor.shape)
    caps = tt_ranks(modes, max_rank)
    cores, rest, r_prev = [], tensor.reshape(1, -1), 1
    for k, n in enumerate(modes[:-1]):
        rest = rest.reshape(r_prev * n, -1)
        u, s, vh = torch.linalg.svd(rest, full_matrices=False)
        r = min(caps[k + 1], s.numel())
        if rel_eps > 0:
            tail = torch.flip(torch.cumsum(torch.flip(s**2, [0]), 0), [0])  # energy from i on
            keep = int((tail > (rel_eps**2) * tail[0]).sum())
            r = max(1, min(r, keep))
        cores.append(u[:, :r].reshape(r_prev, n, r))
        rest = s[:r, None] * vh[:r]
        r_prev = r
    cores.append(rest.reshape(r_prev, modes[-1], 1))
    return cores
