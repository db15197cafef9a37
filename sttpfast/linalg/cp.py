"""CP (CANDECOMP/PARAFAC) helpers: reconstruction and a memory-safe ALS.

A rank-``R`` CP tensor of shape ``(n_1, ..., n_D)`` is ``sum_r a_1r o ... o a_Dr`` with
factor matrices ``A_k (n_k, R)`` (the weights are absorbed into the factors).

Why not ``tensorly.decomposition.parafac``: its ALS forms the Khatri-Rao product of all
other factors, ``(prod_{j != k} n_j, R)``, which for a Conv3d(1024, 512, 3x3x3) kernel is
tens of GB. Here the MTTKRP ``X_(k) (odot_{j != k} A_j)`` is computed by contracting the
tensor with one factor at a time (the largest mode first), so the biggest intermediate is
``numel(X) * R / n_max``; the normal equations use the Hadamard product of ``R x R`` Grams.
"""
from __future__ import annotations

import math

import opt_einsum
import torch
from torch import Tensor

from sttpfast.linalg.contract import contract
from sttpfast.linalg.tucker import leading_subspace, unfold

__all__ = ["cp_to_tensor", "mttkrp", "cp_als", "cp_exact", "als_sweeps"]


def cp_to_tensor(factors: list[Tensor]) -> Tensor:
    """Full tensor ``(n_1, ..., n_D)`` of factors ``A_k (n_k, R)``."""
    d = len(factors)
    letters = [opt_einsum.get_symbol(i) for i in range(d)]
    rank = opt_einsum.get_symbol(d)
    eq = ",".join(f"{m}{rank}" for m in letters) + "->" + "".join(letters)
    return contract(eq, *factors)


def mttkrp(tensor: Tensor, factors: list[Tensor], skip: int) -> Tensor:
    """``X_(skip) (odot_{j != skip} A_j)`` without forming the Khatri-Rao product, ``(n_skip, R)``."""
    axes = list(range(tensor.dim()))  # which original mode each remaining dim of ``out`` is
    order = sorted((j for j in axes if j != skip), key=lambda j: -tensor.shape[j])
    # the largest mode first: it shrinks the intermediate the most, (..., R) from then on
    out = tensor.movedim(order[0], -1) @ factors[order[0]]
    axes.remove(order[0])
    for j in order[1:]:
        out = torch.einsum("...nr,nr->...r", out.movedim(axes.index(j), -2), factors[j])
        axes.remove(j)
    return out


#: sweeps of ALS at least / at most; between them, as many as ALS_WORK multiply-adds allow
MIN_SWEEPS, MAX_SWEEPS = 100, 1000
ALS_WORK = 2e10  # a few seconds of one CPU core


def als_sweeps(shape: tuple[int, ...], rank: int) -> int:
    """The default sweep budget of :func:`cp_als`: 1000 where a sweep is cheap (every layer of
    ResNet-20 at rank 15, as before the budget), down to 100 where it is not (a 512x512x3x3
    kernel at rank 278: 1000 sweeps did not finish resnet18 in 5 minutes)."""
    per_sweep = math.prod(shape) * rank * len(shape)  # the MTTKRPs dominate
    return int(min(MAX_SWEEPS, max(MIN_SWEEPS, ALS_WORK // max(per_sweep, 1))))


#: sweeps over which ALS must gain before it counts as stalled (see :func:`cp_als`)
STALL_WINDOW = 20


def cp_als(tensor: Tensor, rank: int, iters: int | None = None, tol: float = 1e-13,
           generator: torch.Generator | None = None) -> list[Tensor]:
    """Rank-``rank`` CP of ``tensor`` by alternating least squares, factors ``(n_k, rank)``.

    Started from the leading subspaces of the unfoldings (HOSVD init; columns beyond ``n_k``
    random); stops when the relative residual falls below ``tol``, gains less than 1e-6
    of itself over :data:`STALL_WINDOW` sweeps, or after ``iters`` sweeps (default :func:`als_sweeps`). At ``rank >= numel / max(shape)`` (every tensor's CP rank is at
    most that) no sweep is run: :func:`cp_exact` builds the decomposition directly.
    The factors come back balanced (equal column norms across modes).
    """
    if rank >= tensor.numel() // max(tensor.shape):
        return _live(_balanced(cp_exact(tensor, rank)))
    d = tensor.dim()
    iters = als_sweeps(tuple(tensor.shape), rank) if iters is None else iters
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    factors = []
    for k in range(d):
        n = tensor.shape[k]
        base = leading_subspace(unfold(tensor, k), min(rank, n))
        if rank > n:
            extra = torch.randn(n, rank - n, generator=gen, dtype=torch.float64).to(base)
            base = torch.cat([base, extra / extra.norm(dim=0, keepdim=True)], 1)
        factors.append(base)
    norm_sq = tensor.pow(2).sum()
    history: list[float] = []
    for _ in range(iters):
        for k in range(d):
            gram = torch.ones(rank, rank, dtype=tensor.dtype, device=tensor.device)
            for j in range(d):
                if j != k:
                    gram = gram * (factors[j].transpose(0, 1) @ factors[j])
            rhs = mttkrp(tensor, factors, k)
            factors[k] = torch.linalg.lstsq(gram, rhs.transpose(0, 1)).solution.transpose(0, 1)
        # |X - X_hat|^2 = |X|^2 - 2 <X, X_hat> + |X_hat|^2, from quantities already at hand
        full_gram = gram * (factors[-1].transpose(0, 1) @ factors[-1])
        inner = (rhs * factors[-1]).sum()
        residual = float((norm_sq - 2 * inner + full_gram.sum()).clamp_min(0).sqrt() / norm_sq.sqrt().clamp_min(1e-300))
        if residual < 1e-5:  # the expansion cancels below ~sqrt(eps): measure it directly
            residual = float((cp_to_tensor(factors) - tensor).norm() / norm_sq.sqrt().clamp_min(1e-300))
        history.append(residual)
        # done, or stalled: a gain under 1e-6 of itself over STALL_WINDOW sweeps. One sweep's gain
        # stopped ALS inside a swamp (a plateau it leaves after tens of sweeps: exact CP tensors
        # ended at 3-6e-2 where 100 sweeps reach 1e-14)
        if residual < tol or (len(history) > STALL_WINDOW
                              and history[-STALL_WINDOW - 1] - residual < 1e-6 * history[-STALL_WINDOW - 1]):
            break
    return _live(_balanced(factors))


def cp_exact(tensor: Tensor, rank: int) -> list[Tensor]:
    """An exact CP of ``tensor`` ``(n_1, ..., n_D)`` with ``rank >= R0 = numel / n_max`` terms.

    One term per index ``(i_j)_{j != m}`` of the modes other than the largest ``m``: the fiber
    ``X[..., :, ...]`` along ``m`` times the unit vectors ``e_{i_j}``. So ``A_m`` is the mode-m
    unfolding ``(n_m, R0)`` and every other ``A_j`` is one-hot ``(n_j, R0)``; columns beyond
    ``R0`` are zero (they add nothing). Costs a copy of the tensor, where ALS at this rank
    solves ``R0 x R0`` systems per sweep (150 s a sweep for a (512, 512, 3, 3) kernel).
    """
    shape = tuple(tensor.shape)
    largest = max(range(len(shape)), key=lambda k: shape[k])  # the first, on a tie
    others = [j for j in range(len(shape)) if j != largest]
    terms = tensor.numel() // shape[largest]
    if rank < terms:
        raise ValueError(f"an exact CP of a {shape} tensor needs rank >= {terms}, got {rank}")
    # columns run over the other modes' multi-index, row-major (the unfolding's order)
    index = torch.unravel_index(torch.arange(terms, device=tensor.device), [shape[j] for j in others])
    factors = [None] * len(shape)
    factors[largest] = tensor.movedim(largest, 0).reshape(shape[largest], terms)
    for position, j in enumerate(others):
        one_hot = torch.zeros(shape[j], terms, dtype=tensor.dtype, device=tensor.device)
        one_hot[index[position], torch.arange(terms, device=tensor.device)] = 1
        factors[j] = one_hot
    return [torch.cat([f, f.new_zeros(f.shape[0], rank - terms)], 1) for f in factors]


def _live(factors: list[Tensor]) -> list[Tensor]:
    """Terms zero in every mode (more terms than the tensor needs) given unit random columns in
    every mode but the first, which stays zero: the CP is the same, and the first factor of
    such a term gets a gradient. Zero in two modes or more, a term never gets one."""
    dead = torch.stack([f.norm(dim=0) for f in factors]).prod(0) == 0  # (R,)
    if not bool(dead.any()):
        return factors
    gen = torch.Generator().manual_seed(0)  # the same CP from the same tensor
    live = ~dead
    factors = [f.clone() for f in factors]
    for f in factors[1:]:
        scale = f[:, live].norm(dim=0).mean() if bool(live.any()) else f.new_ones(())
        fresh = torch.randn(f.shape[0], int(dead.sum()), generator=gen, dtype=torch.float64).to(f)
        f[:, dead] = fresh / fresh.norm(dim=0, keepdim=True) * scale
    factors[0][:, dead] = 0
    return factors


def _balanced(factors: list[Tensor]) -> list[Tensor]:
    """Rescale columns so every mode carries the same norm (the product is unchanged)."""
    norms = torch.stack([f.norm(dim=0) for f in factors])  # (D, R)
    tiny = torch.finfo(norms.dtype).tiny  # 1e-300 is 0 in float32: a zero column gave 0/0
    total = norms.prod(0) ** (1.0 / len(factors))
    return [f * (total / norms[k].clamp_min(tiny)) for k, f in enumerate(factors)]
