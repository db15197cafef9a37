"""Tensor-train with one rank cap per bond, and tensor rings (TR).

TT: cores ``(R_{k-1}, n_k, R_k)`` with ``R_0 = R_D = 1``. TR: the same chain closed into a
ring, ``R_0 = R_D`` and ``X[i_1..i_D] = trace(G_1[:, i_1, :] ... G_D[:, i_D, :])`` (Zhao et
al. 2016). A TT is the ring with ``R_0 = 1``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sttpfast.linalg.tt import tt_contract

__all__ = ["tt_svd_bonds", "tr_to_tensor", "tr_als"]


def tt_svd_bonds(tensor: Tensor, bonds: list[int]) -> list[Tensor]:
    """TT-SVD with the rank of bond ``k`` (between modes ``k`` and ``k+1``) capped at ``bonds[k]``.

    Exact when every unfolding ``(n_1..n_k) x (n_{k+1}..n_D)`` has rank ``<= bonds[k-1]``.

    Args:
        tensor: ``(n_1, ..., n_D)``; ``bonds``: ``D - 1`` positive ints.
    Returns:
        cores ``(R_{k-1}, n_k, R_k)``; all but the last are left-orthonormal.
    """
    modes = list(tensor.shape)
    cores, rest, r_prev = [], tensor.reshape(1, -1), 1
    for k, n in enumerate(modes[:-1]):
        rest = rest.reshape(r_prev * n, -1)
        u, s, vh = torch.linalg.svd(rest, full_matrices=False)
        r = min(bonds[k], s.numel())
        if r < bonds[k]:  # keep the requested shape: pad with zero directions
            u = torch.cat([u[:, :r], u.new_zeros(u.shape[0], bonds[k] - r)], 1)
            s = torch.cat([s[:r], s.new_zeros(bonds[k] - r)])
            vh = torch.cat([vh[:r], vh.new_zeros(bonds[k] - r, vh.shape[1])], 0)
            r = bonds[k]
        cores.append(u[:, :r].reshape(r_prev, n, r))
        rest = s[:r, None] * vh[:r]
        r_prev = r
    cores.append(rest.reshape(r_prev, modes[-1], 1))
    return cores


def tr_to_tensor(cores: list[Tensor]) -> Tensor:
    """Full tensor ``(n_1, ..., n_D)`` of ring cores ``(R_{k-1}, n_k, R_k)``, ``R_0 = R_D``."""
    if cores[0].shape[0] == 1:
        return tt_contract(cores)
    full = tt_contract(cores)  # (R_0, n_1, ..., n_D, R_0)
    return torch.diagonal(full, dim1=0, dim2=-1).sum(-1)


def _subchain(cores: list[Tensor]) -> Tensor:
    """Contraction of an open chain, keeping both boundary bonds: ``(R_first, prod n, R_last)``."""
    out = cores[0].reshape(cores[0].shape[0], -1, cores[0].shape[-1])
    for core in cores[1:]:
        out = torch.einsum("anb,bmc->anmc", out, core).reshape(out.shape[0], -1, core.shape[-1])
    return out


def tr_als(tensor: Tensor, ranks: list[int], iters: int = 200, tol: float = 1e-10, restarts: int = 2,
           generator: torch.Generator | None = None) -> list[Tensor]:
    """Tensor ring of ``tensor`` with bond ranks ``ranks = [R_0, R_1, ..., R_{D-1}]`` by ALS.

    Core ``k`` is ``(R_k, n_k, R_{(k+1) mod D})``. Started from the TT-SVD with bonds
    ``R_1..R_{D-1}`` embedded in the ring (ring index 0 carries it, the other ring indices
    start small and random); each sweep solves one core at a time by least squares against
    the chain of the others. ALS can stall in a swamp: if the relative residual is still
    above ``tol`` it restarts (other random ring indices) up to ``restarts`` times and keeps
    the best. Memory: the chain of the other cores, ``numel(X) / n_k * R_k R_{k+1}``.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    tt = tt_svd_bonds(tensor, ranks[1:])
    norm = tensor.norm().clamp_min(1e-300)
    best, best_res = None, float("inf")
    for _ in range(restarts + 1):
        cores, res = _tr_sweeps(tensor, tt, ranks[0], iters, tol, norm, gen)
        if res < best_res:
            best, best_res = cores, res
        if best_res < tol:
            break
    return best


def _tr_sweeps(tensor, tt, r0, iters, tol, norm, gen):
    d = tensor.dim()
    noise = lambda *s: 1e-2 * torch.randn(*s, generator=gen, dtype=torch.float64).to(tensor)  # noqa: E731
    first = noise(r0, *tt[0].shape[1:])
    first[0] = tt[0][0]
    last = noise(*tt[-1].shape[:2], r0)
    last[..., 0] = tt[-1][..., 0]
    cores = [first, *tt[1:-1], last]
    targets = [tensor.movedim(list(range(k, d)) + list(range(k)), list(range(d))).reshape(tensor.shape[k], -1)
               for k in range(d)]
    history = []
    residual = float("inf")
    for _ in range(iters):
        for k in range(d):
            chain = _subchain(cores[k + 1:] + cores[:k])  # (R_{k+1}, prod others, R_k)
            design = chain.permute(1, 0, 2).reshape(chain.shape[1], -1)  # (rest, R_{k+1} R_k)
            # normal equations with a tiny ridge: the design is rank deficient by the ring's gauge
            gram = design.transpose(0, 1) @ design
            ridge = 1e-12 * gram.diagonal().mean().clamp_min(1e-300)
            sol = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device),
                                     design.transpose(0, 1) @ targets[k].transpose(0, 1))
            cores[k] = sol.reshape(chain.shape[0], chain.shape[2], -1).permute(1, 2, 0).contiguous()
        residual = float((tr_to_tensor(cores) - tensor).norm() / norm)
        history.append(residual)
        # stop when done, or when 20 sweeps gained less than 1% (a swamp: restart instead)
        if residual < tol or (len(history) > 20 and history[-21] - residual < 1e-2 * history[-21]):
            break
    return cores, residual
