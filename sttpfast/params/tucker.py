"""Tucker layers: Tucker-2 on the channel modes (Kim et al., ICLR 2016) and reshaped Tucker.

``tucker``: ``W = G x_out U_out x_in U_in`` with a core ``G (R_out, R_in, *kernel)`` and
factors ``U_out (C_out, R_out)``, ``U_in (C_in, R_in)``. DOF
``R_out R_in prod(kernel) + C_out R_out + C_in R_in``. As a conv sequence: 1x1 ``C_in -> R_in``,
the ``k x k`` core conv ``R_in -> R_out`` (stride, padding, dilation), 1x1 ``R_out -> C_out``.
Rank: an int for both, or a pair ``(R_out, R_in)``; each at most its mode's rank
``min(C, prod(other modes))`` (a Linear or 1x1 conv: ``min(C_out, C_in)``).

``rtk``: Tucker over the reshaped channel modes ``(o_1, o_2, i_1, i_2)``, the kernel modes
kept in the core ``(R_o1, R_o2, R_i1, R_i2, *spatial)``; rank an int or one per channel mode.

Decomposition: HOSVD then HOOI sweeps on unfoldings (:func:`sttpfast.linalg.tucker.partial_tucker`),
exact when the weight has that multilinear rank.
"""
from __future__ import annotations

import math

from torch import Tensor

from sttpfast.linalg.tucker import partial_tucker, tucker_to_tensor
from sttpfast.params.tensorlayer import RESHAPE_MODES, TensorLayer

__all__ = ["TuckerLayer", "ReshapedTuckerLayer"]


class TuckerLayer(TensorLayer):
    """Maps ``(G, U_out, U_in)`` onto ``G x_1 U_out x_2 U_in``: kernels of channel ranks ``<= (R_out, R_in)``."""

    name, rank_kind = "tucker", tuple

    @classmethod
    def factored_axes(cls, modes) -> list[int]:
        return [0, 1] if not cls.reshaped else list(range(2 * RESHAPE_MODES))

    @classmethod
    def bond_caps(cls, modes):
        """A mode's rank is at most ``min(n_a, prod(modes) / n_a)`` (the rank of the mode-a
        unfolding): a Linear or 1x1 conv (C_out, C_in) needs no more than ``min(C_out, C_in)``
        in either mode; above that the core only adds parameters."""
        total = math.prod(modes)
        return [min(modes[a], total // modes[a]) for a in cls.factored_axes(modes)]

    @classmethod
    def rank_entries(cls, modes):
        if not cls.reshaped:
            return ["R_out", "R_in"]
        return [*(f"R_o{k + 1}" for k in range(RESHAPE_MODES)), *(f"R_i{k + 1}" for k in range(RESHAPE_MODES))]

    @classmethod
    def factor_shapes(cls, modes, ranks):
        axes = cls.factored_axes(modes)
        core = list(modes)
        for a, r in zip(axes, ranks):
            core[a] = r
        return [tuple(core), *[(modes[a], r) for a, r in zip(axes, ranks)]]

    @classmethod
    def assemble(cls, modes, ranks, factors):
        core, *mats = factors
        return tucker_to_tensor(core, mats, cls.factored_axes(modes))

    @classmethod
    def decompose_tensor(cls, tensor, ranks):
        core, mats = partial_tucker(tensor, ranks, cls.factored_axes(tuple(tensor.shape)))
        return [core, *mats]

    # -- the factorized forward (sttpfast.params.factorized) --------------------------------
    def conv_factors(self, factors: tuple[Tensor, ...]):
        """``(first (R_in, C_in), core (R_out, R_in, *kernel), last (C_out, R_out), depthwise=False)``."""
        if self.reshaped or self.view.transposed:
            return None
        core, u_out, u_in = factors
        return u_in.transpose(0, 1), core.reshape(core.shape[0], core.shape[1], *self.view.natural[2:]), u_out, False

    def flops(self, batch_pixels_in: int, batch_pixels_out: int) -> tuple[int, int]:
        """(materialized, factorized) multiply-adds for one call (see factorized.py)."""
        c_out, c_in, k = self.view.d_out, self.view.c_in, self.view.kernel
        r_out, r_in = self.ranks
        build = r_out * r_in * k * c_in + c_out * r_out * c_in * k
        dense = build + batch_pixels_out * c_out * c_in * k
        factored = batch_pixels_in * c_in * r_in + batch_pixels_out * (r_out * r_in * k + r_out * c_out)
        return dense, factored


class ReshapedTuckerLayer(TuckerLayer):
    """Tucker over the reshaped channel modes, the kernel kept in the core."""

    name, reshaped = "rtk", True
