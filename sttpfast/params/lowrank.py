"""Plain low-rank ``W = U V^T`` (Khodak et al., ICLR 2021: factorized neural layers).

Spectral initialization: the SVD of the layer's freshly initialized dense weight, top
``r`` kept, ``U = U_r sqrt(S_r)``, ``V = V_r sqrt(S_r)``. Train it with Frobenius decay
(``(lambda/2) |U V^T|_F^2``, see the callbacks) in place of weight decay on ``U`` and ``V``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from sttpfast.params.base import MatrixView, WeightParametrization, check_rank

__all__ = ["LowRank"]


class LowRank(WeightParametrization):
    """Maps ``U (d_out x r)``, ``V (d_in x r)`` onto ``U V^T``: the matrices of rank ``<= r``."""

    name, penalty, default_init = "lowrank", "frobenius_decay", "spectral"

    @classmethod
    def count_dof(cls, shape, transposed, rank):
        check_rank(rank)
        view = MatrixView(shape, transposed)
        r = min(view.d_out, view.d_in) if rank is None else min(rank, view.d_out, view.d_in)
        return r * (view.d_out + view.d_in)

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        return self.view.from_matrix(u @ v.transpose(0, 1))

    def decompose(self, weight: Tensor):
        mat = self.view.to_matrix(weight.detach()).to(torch.float64)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        root = s[: self.rank].sqrt()
        factors = (u[:, : self.rank] * root, vh[: self.rank].transpose(0, 1) * root)
        return tuple(f.to(dtype=weight.dtype, device=weight.device).contiguous() for f in factors)

    def identity_factors(self, dtype=torch.float32, device=None):
        eye = lambda n: torch.eye(n, self.rank, dtype=dtype, device=device)  # noqa: E731
        return eye(self.view.d_out), eye(self.view.d_in)

    @torch.no_grad()
    def clip_sigma_max(self, factors: tuple[Tensor, Tensor], c: float) -> None:
        """Scale ``U`` and ``V`` in place by ``sqrt(c / sigma_max)`` if ``sigma_max(U V^T) > c``
        (an ``r x r`` SVD; the balance of the factors is kept)."""
        u, v = factors
        sigma = float(self.singular_values(u.float(), v.float())[0])
        if sigma > c:
            scale = math.sqrt(c / sigma)
            u.mul_(scale)
            v.mul_(scale)

    def singular_values(self, u: Tensor, v: Tensor) -> Tensor:
        # svdvals(U V^T) = svdvals(R_u R_v^T) with U = Q_u R_u, V = Q_v R_v: an r x r problem
        r_u = torch.linalg.qr(u).R
        r_v = torch.linalg.qr(v).R
        return torch.linalg.svdvals(r_u @ r_v.transpose(0, 1))
