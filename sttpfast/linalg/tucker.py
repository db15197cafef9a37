"""Tucker helpers: unfoldings, leading subspaces, mode products and (partial) HOSVD / HOOI.

A Tucker tensor over a subset ``axes`` of the modes of ``X (n_1, ..., n_D)`` is a core ``G``
(``X``'s shape with ``n_k`` replaced by ``R_k`` for ``k`` in ``axes``) and factors ``U_k
(n_k, R_k)``: ``X = G x_k U_k`` over ``k`` in ``axes``. Every helper works on unfoldings of the
tensor itself (never a Kronecker or Khatri-Rao product), so memory stays a small multiple
of the tensor's size.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["unfold", "leading_subspace", "mode_product", "tucker_to_tensor", "partial_tucker"]


def unfold(tensor: Tensor, axis: int) -> Tensor:
    """Mode-``axis`` unfolding ``(n_axis, prod of the other modes)``."""
    return tensor.movedim(axis, 0).reshape(tensor.shape[axis], -1)


def leading_subspace(matrix: Tensor, rank: int) -> Tensor:
    """The ``rank`` leading left singular vectors of ``matrix (m, n)``, ``(m, rank)``, ``rank <= m``.

    When ``rank`` exceeds the numerical rank of ``matrix`` the extra columns are still an
    orthonormal completion. Memory: ``m^2`` (Gram matrix) when ``m <= n``, else ``m n``."""
    if rank > matrix.shape[0]:
        raise ValueError(f"leading_subspace: rank {rank} exceeds the {matrix.shape[0]} rows")
    if matrix.shape[0] <= matrix.shape[1]:
        # the m x m Gram matrix: memory m^2 whatever the number of columns
        vals, vecs = torch.linalg.eigh(matrix @ matrix.transpose(0, 1))
        return vecs.flip(-1)[:, :rank]
    # reduced SVD (never the m x m full U: a 131072 x 9 matricization would need 137 GB);
    # columns beyond n: an orthonormal completion from fixed random directions
    u = torch.linalg.svd(matrix, full_matrices=False).U
    if rank > u.shape[1]:
        gen = torch.Generator().manual_seed(0)
        extra = torch.randn(u.shape[0], rank - u.shape[1], generator=gen, dtype=torch.float64).to(u)
        extra = extra - u @ (u.transpose(0, 1) @ extra)
        u = torch.cat([u, torch.linalg.qr(extra).Q], 1)
    return u[:, :rank]


def mode_product(tensor: Tensor, matrix: Tensor, axis: int) -> Tensor:
    """``tensor x_axis matrix``: mode ``axis`` (size ``n``) mapped by ``matrix (m, n)`` to size ``m``."""
    moved = tensor.movedim(axis, -1)
    return (moved @ matrix.transpose(0, 1)).movedim(-1, axis)


def tucker_to_tensor(core: Tensor, factors: list[Tensor], axes: list[int]) -> Tensor:
    """``core x_k factors[i]`` for ``k = axes[i]``; factors ``(n_k, R_k)``."""
    out = core
    for factor, axis in zip(factors, axes):
        out = mode_product(out, factor, axis)
    return out


def partial_tucker(tensor: Tensor, ranks: list[int], axes: list[int], iters: int = 5) -> tuple[Tensor, list[Tensor]]:
    """Tucker decomposition over ``axes`` (HOSVD start, then ``iters`` HOOI sweeps).

    Exact (to rounding) when ``tensor`` has multilinear rank ``<= ranks`` on ``axes``.

    Args:
        tensor: ``(n_1, ..., n_D)``.
        ranks: ``R_k <= n_k`` for each ``k`` in ``axes``.
    Returns:
        ``core`` (``tensor``'s shape with ``R_k`` on ``axes``) and orthonormal factors ``(n_k, R_k)``.
    """
    factors = [leading_subspace(unfold(tensor, a), r) for a, r in zip(axes, ranks)]
    for _ in range(iters if len(axes) > 1 else 0):
        for i, (axis, rank) in enumerate(zip(axes, ranks)):
            projected = tensor
            for j, (other, factor) in enumerate(zip(axes, factors)):
                if j != i:
                    projected = mode_product(projected, factor.transpose(0, 1), other)
            factors[i] = leading_subspace(unfold(projected, axis), rank)
    core = tensor
    for axis, factor in zip(axes, factors):
        core = mode_product(core, factor.transpose(0, 1), axis)
    return core, factors
