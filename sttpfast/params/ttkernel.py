"""Tensor-train layers: TT of the kernel's modes (``tt``) and of the reshaped modes (``rtt``).

``tt``: modes ``(C_out, C_in, k_h, k_w)`` (spatial sizes of 1 dropped), cores
``G_k (R_{k-1}, n_k, R_k)``, ``R_0 = R_D = 1``. ``rtt``: the channel counts split into
balanced factors, modes ``(o_1, o_2, i_1, i_2, *spatial)`` (Novikov et al. 2015 / Garipov et
al. 2016 style). Unlike STTP (``params/sttp.py``) the cores are unconstrained and there is no
spectrum. DOF ``sum_k R_{k-1} n_k R_k``.

Rank: one int for every bond, or a tuple ``(R_1, ..., R_{D-1})``; each bond at most
``min(prod of the modes left of it, prod right of it)``. Decomposition: TT-SVD with one cap
per bond (:func:`sttpfast.linalg.ring.tt_svd_bonds`), exact when the weight has those TT ranks.
"""
from __future__ import annotations

from sttpfast.linalg.ring import tt_svd_bonds
from sttpfast.linalg.tt import tt_contract, tt_ranks
from sttpfast.params.tensorlayer import TensorLayer, check_chain_bonds

__all__ = ["TTLayer", "ReshapedTTLayer"]


class TTLayer(TensorLayer):
    """Maps cores ``(R_{k-1}, n_k, R_k)`` onto their contraction: kernels of TT ranks ``<= ranks``."""

    name, rank_kind = "tt", tuple

    @classmethod
    def bond_caps(cls, modes):
        return tt_ranks(list(modes))[1:-1]

    @classmethod
    def rank_entries(cls, modes):
        return [f"R_{k}" for k in range(1, len(modes))]

    @classmethod
    def check_bonds(cls, modes, rank, ranks):
        check_chain_bonds(cls.name, rank, modes, [1, *ranks, 1], [None, *cls.rank_entries(modes), None])

    @classmethod
    def factor_shapes(cls, modes, ranks):
        full = [1, *ranks, 1]
        return [(full[k], n, full[k + 1]) for k, n in enumerate(modes)]

    @classmethod
    def assemble(cls, modes, ranks, factors):
        return tt_contract(factors).reshape(modes)

    @classmethod
    def decompose_tensor(cls, tensor, ranks):
        return tt_svd_bonds(tensor, ranks)


class ReshapedTTLayer(TTLayer):
    """TT over the reshaped modes ``(o_1, o_2, i_1, i_2, *spatial)``."""

    name, reshaped = "rtt", True
