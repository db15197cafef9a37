"""Tensor-train with one rank cap per bond, and tensor rings (TR).

TT: cores ``(R_{k-1}, n_k, R_k)`` with ``R_0 = R_D = 1``. TR: the same chain closed into a
ring, ``R_0 = R_D`` and ``X[i_1..i_D] = trace(G_1[:, i_1, :] ... G_D[:, i_D, :])`` (Zhao et
al. 2016). A TT is the ring with ``R_0 = 1``.
"""
from __future__ import annotations

import opt_einsum
import torch
from torch import Tensor

from sttpfast.linalg.contract import contract


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


def _ring_equation(d: int, with_tensor: bool = False) -> str:
    """einsum equation of a ring of ``d`` cores (bond ``k`` before core ``k``, bond 0 closes it)."""
    bonds = [opt_einsum.get_symbol(k) for k in range(d)]
    modes = [opt_einsum.get_symbol(d + k) for k in range(d)]
    terms = [bonds[k] + modes[k] + bonds[(k + 1) % d] for k in range(d)]
    return ",".join(terms) + "->" + "".join(modes)


def tr_to_tensor(cores: list[Tensor]) -> Tensor:
    """Full tensor ``(n_1, ..., n_D)`` of ring cores ``(R_k, n_k, R_{k+1})``, ``R_D = R_0``
    (one einsum: the ring is traced while contracting, never built with both ring indices open)."""
    if len(cores) == 1:
        return torch.diagonal(cores[0], dim1=0, dim2=-1).sum(-1)
    return contract(_ring_equation(len(cores)), *cores)


def _chain_gram(chain: list[Tensor]) -> Tensor:
    """``D^T D`` of the design ``D[(rest), (b, a)] = chain[b, rest, a]`` by transfer matrices,
    ``(R_b R_a, R_b R_a)``: memory ``R^4``, never the design itself."""
    m = torch.einsum("cid,eif->cedf", chain[0], chain[0])
    for core in chain[1:]:
        m = torch.einsum("cedf,dig,fih->cegh", m, core, core)
    rb, ra = m.shape[0], m.shape[2]
    return m.permute(0, 2, 1, 3).reshape(rb * ra, rb * ra)


def _chain_rhs(target: Tensor, chain: list[Tensor]) -> Tensor:
    """``X_(k) D``: the target ``(n_k, n_{k+1}, ..., n_{k-1})`` against the chain, ``(n_k, R_b R_a)``."""
    d = len(chain)
    bonds = [opt_einsum.get_symbol(j) for j in range(d + 1)]
    modes = [opt_einsum.get_symbol(d + 1 + j) for j in range(d)]
    row = opt_einsum.get_symbol(2 * d + 1)
    eq = (row + "".join(modes) + "," + ",".join(bonds[j] + modes[j] + bonds[j + 1] for j in range(d))
          + "->" + row + bonds[0] + bonds[d])
    out = contract(eq, target, *chain)
    return out.reshape(out.shape[0], -1)


def tr_als(tensor: Tensor, ranks: list[int], iters: int = 300, tol: float = 1e-12, restarts: int = 2,
           generator: torch.Generator | None = None) -> list[Tensor]:
    """Tensor ring of ``tensor`` with bond ranks ``ranks = [R_0, R_1, ..., R_{D-1}]`` by ALS.

    Core ``k`` is ``(R_k, n_k, R_{(k+1) mod D})``. Started from the TT-SVD with bonds
    ``R_1..R_{D-1}`` embedded in the ring (ring index 0 carries it, the other ring indices
    start small and random); each sweep solves one core at a time by least squares against
    the chain of the others (normal equations; memory about ``numel(X) R / n``, the design
    matrix is never formed). ALS can stall in a swamp: if the relative residual is still
    above ``tol`` it restarts up to ``restarts`` times, from random cores (a restart near the
    TT-SVD start stalled where the first did: exact ring tensors came back at 1e-1), and
    keeps the best.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    tt = tt_svd_bonds(tensor, ranks[1:])
    norm = tensor.norm().clamp_min(1e-300)
    best, best_res = None, float("inf")
    for attempt in range(restarts + 1):
        start = _tt_start(tt, ranks[0], gen) if attempt == 0 else _random_start(tensor, ranks, norm, gen)
        cores, res = _tr_sweeps(tensor, start, iters, tol, norm)
        if res < best_res:
            best, best_res = cores, res
        if best_res < tol:
            break
    return best


def _tt_start(tt: list[Tensor], r0: int, gen) -> list[Tensor]:
    """The TT-SVD cores in ring index 0 of the ring bond ``r0``, the other indices small noise."""
    noise = lambda *s: 1e-2 * torch.randn(*s, generator=gen, dtype=torch.float64).to(tt[0])  # noqa: E731
    first = noise(r0, *tt[0].shape[1:])
    first[0] = tt[0][0]
    last = noise(*tt[-1].shape[:2], r0)
    last[..., 0] = tt[-1][..., 0]
    return [first, *tt[1:-1], last]


def _random_start(tensor: Tensor, ranks: list[int], norm: Tensor, gen) -> list[Tensor]:
    """Gaussian cores ``(R_k, n_k, R_{k+1})`` scaled so their ring has the norm of ``tensor``."""
    d = tensor.dim()
    cores = [torch.randn(ranks[k], n, ranks[(k + 1) % d], generator=gen, dtype=torch.float64).to(tensor)
             for k, n in enumerate(tensor.shape)]
    scale = (norm / tr_to_tensor(cores).norm().clamp_min(1e-300)) ** (1.0 / d)
    return [core * scale for core in cores]


def _tr_sweeps(tensor, cores, iters, tol, norm):
    d = tensor.dim()
    cores = list(cores)
    targets = [tensor.permute(*range(k, d), *range(k)) for k in range(d)]  # mode k first, ring order
    history = []
    residual = float("inf")
    norm_sq = float(norm) ** 2
    for _ in range(iters):
        for k in range(d):
            chain = cores[k + 1:] + cores[:k]  # the ring from k+1 round to k-1
            # normal equations of min |X_(k) - G_k D^T|: Gram by transfer matrices, right-hand
            # side by one contraction of X with the chain (memory ~ numel(X) R / n, no design)
            gram = _chain_gram(chain)
            rhs = _chain_rhs(targets[k], chain).transpose(0, 1)  # (R_{k+1} R_k, n_k)
            # a tiny ridge: the Gram is singular by the ring's gauge freedom
            ridge = 1e-12 * gram.diagonal().mean().clamp_min(1e-300)
            sol = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), rhs)
            rb, ra = chain[0].shape[0], chain[-1].shape[-1]
            cores[k] = sol.reshape(rb, ra, -1).permute(1, 2, 0).contiguous()
        # |X - X_hat|^2 = |X|^2 - 2 <X, X_hat> + |X_hat|^2 from the last solve
        fit = float((sol * (gram @ sol)).sum() - 2 * (sol * rhs).sum())
        residual = max(norm_sq + fit, 0.0) ** 0.5 / float(norm)
        if residual < 1e-5:  # the expansion cancels below ~sqrt(eps): measure it directly
            residual = float((tr_to_tensor(cores) - tensor).norm() / norm)
        history.append(residual)
        # stop when done, or when 20 sweeps gained less than 1% (a swamp: restart instead)
        if residual < tol or (len(history) > 20 and history[-21] - residual < 1e-2 * history[-21]):
            break
    return cores, residual
