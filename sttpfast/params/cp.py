"""CP layers: the kernel as a sum of ``R`` rank-one tensors (Lebedev et al., ICLR 2015).

``cp``: modes ``(C_out, C_in, k_h, k_w)`` (spatial sizes of 1 dropped; a Linear is the
``(out, in)`` matrix), factors ``A_k (n_k, R)``, ``W = sum_r a_out,r o a_in,r o a_h,r o a_w,r``.
DOF ``R * sum(n_k)``. As a conv sequence: a 1x1 conv ``C_in -> R``, a depthwise ``k_h x k_w``
conv (the outer product of the spatial factors, carrying stride, padding and dilation), a
1x1 conv ``R -> C_out`` (see :mod:`sttpfast.params.factorized`).

``rcp``: the same over the reshaped modes ``(o_1, o_2, i_1, i_2, k_h, k_w)``.

The rank is one int; ``None`` means the largest useful rank ``prod(modes) / max(modes)``
(every tensor of these modes has a CP of that rank). Decomposition: memory-safe CP-ALS
(:func:`sttpfast.linalg.cp.cp_als`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from sttpfast.linalg.cp import cp_als, cp_to_tensor
from sttpfast.params.tensorlayer import TensorLayer

__all__ = ["CPLayer", "ReshapedCPLayer"]


class CPLayer(TensorLayer):
    """Maps ``A_k (n_k, R)`` onto ``sum_r o_k A_k[:, r]``: the kernels of CP rank ``<= R``."""

    name = "cp"
    # measured: `python bench/cp_init.py --arch resnet18 --compression 20 --threads 1` (rank 278),
    # 92-165 s on this project's 2-core x86_64 machine (2026-12-01 / 12-02)
    spectral_init_note = ("cp: the spectral init fits every layer's weight by ALS, 100 to 1000 sweeps each, fewer "
                          "where a sweep costs more (resnet18 at Z = 20%: 1.5 to 3 CPU-minutes)")

    @classmethod
    def bond_caps(cls, modes):
        return [math.prod(modes) // max(modes)]

    @classmethod
    def factor_shapes(cls, modes, ranks):
        return [(n, ranks[0]) for n in modes]

    @classmethod
    def assemble(cls, modes, ranks, factors):
        return cp_to_tensor(factors)

    @classmethod
    def decompose_tensor(cls, tensor, ranks):
        return cp_als(tensor, ranks[0])

    def identity_factors(self, dtype=torch.float32, device=None) -> tuple[Tensor, ...]:
        """Placeholders with no zero column: term ``r`` is one-hot at ``r mod n_k`` in every
        mode. ``eye(3, R)`` left terms 3.. zero in both spatial modes, where no factor gets a
        gradient (they never trained under ``init="identity"`` or from an all-zero weight).
        The first mode is scaled so the kernel keeps the norm of ``eye``'s, ``sqrt(min(n, R))``."""
        rank = self.ranks[0]
        columns = torch.arange(rank)
        factors = [(torch.arange(n).unsqueeze(1) == (columns % n).unsqueeze(0)).to(dtype=dtype, device=device)
                   for n in self.modes]
        factors[0] = factors[0] * math.sqrt(min(min(self.modes), rank) / rank)
        return tuple(factors)

    # -- the factorized forward (sttpfast.params.factorized) --------------------------------
    def conv_factors(self, factors: tuple[Tensor, ...]):
        """``(first (R, C_in), middle (R, R_or_1, *kernel), last (C_out, R), depthwise)`` of the
        1x1 / depthwise kxk / 1x1 sequence, or None when the layout has no such split."""
        if self.reshaped or self.view.transposed:
            return None
        a_out, a_in, *spatial = factors
        kernel = self.view.natural[2:]
        rank = a_out.shape[1]
        depth = torch.ones(rank, dtype=a_out.dtype, device=a_out.device)
        for f in spatial:  # outer product of the spatial factors, per rank-one term
            depth = (depth.unsqueeze(-1) * f.transpose(0, 1).reshape(rank, *([1] * (depth.dim() - 1)), -1))
        depth = depth.reshape(rank, 1, *kernel)
        return a_in.transpose(0, 1), depth, a_out, True

    def flops(self, batch_pixels_in: int, batch_pixels_out: int) -> tuple[int, int]:
        """(materialized, factorized) multiply-adds for one call (see factorized.py)."""
        c_out, c_in, k = self.view.d_out, self.view.c_in, self.view.kernel
        r = self.ranks[0]
        build = r * c_out * c_in * k
        dense = build + batch_pixels_out * c_out * c_in * k
        factored = batch_pixels_in * c_in * r + batch_pixels_out * r * k + batch_pixels_out * r * c_out
        return dense, factored


class ReshapedCPLayer(CPLayer):
    """CP over the reshaped modes ``(o_1, o_2, i_1, i_2, *spatial)``."""

    name, reshaped = "rcp", True
    spectral_init_note = ("rcp: the spectral init fits every layer's weight by ALS, 100 to 1000 sweeps each, fewer "
                          "where a sweep costs more")
