"""Tensor-ring layers (Wang et al., CVPR 2018): ``tr`` over the kernel's modes, ``rtr`` over the reshaped ones.

Cores ``G_k (R_k, n_k, R_{k+1})`` with the ring closed, ``R_D = R_0``:
``W[i_1..i_D] = trace(G_1[:, i_1, :] ... G_D[:, i_D, :])``. DOF ``sum_k R_k n_k R_{k+1}``.

Rank: one int for every bond, or a tuple ``(R_0, R_1, ..., R_{D-1})`` (``R_0`` is the bond
that closes the ring). Bonds ``1..D-1`` are capped like TT ranks; the ring bond at
``min(n_1 R_1, n_D R_{D-1})`` (a core seen as an ``R_0 x (n R)`` matrix has no more rank).
Full rank (``rank=None``, or an int at least every TT cap) is the TT chain, ring bond 1:
it holds any tensor exactly; every bond at its cap at once would not hold more, and on a
matrix the ring bond's cap is about ``min(n)^2`` (Linear(20, 20): 320,000 DOF).
Decomposition: TR-ALS from a TT-SVD start (:func:`sttpfast.linalg.ring.tr_als`): ALS can
stall, so it restarts and keeps the best; it is exact on well-posed ring tensors in practice,
not by construction.
"""
from __future__ import annotations

from sttpfast.linalg.ring import tr_als, tr_to_tensor
from sttpfast.linalg.tt import tt_ranks
from sttpfast.params.base import MatrixView
from sttpfast.params.tensorlayer import TensorLayer, check_chain_bonds

__all__ = ["TRLayer", "ReshapedTRLayer"]


class TRLayer(TensorLayer):
    """Maps ring cores ``(R_k, n_k, R_{k+1 mod D})`` onto the trace of their chain."""

    name, rank_kind = "tr", tuple

    @classmethod
    def bond_caps(cls, modes):
        inner = tt_ranks(list(modes))[1:-1]
        ring = min(modes[0] * inner[0], modes[-1] * inner[-1])
        return [ring, *inner]

    @classmethod
    def full_ranks(cls, modes):
        return [1, *tt_ranks(list(modes))[1:-1]]

    @classmethod
    def capped_ranks(cls, modes, rank):
        rank = cls.normalize_rank(rank)
        if isinstance(rank, int) and rank >= max(cls.full_ranks(modes)):  # the TT chain holds it all
            return cls.full_ranks(modes)
        return super().capped_ranks(modes, rank)

    @classmethod
    def rank_of_spec(cls, entry: dict, transposed: bool):
        """The rank a stored layer spec rebuilds: its ``ranks``; a spec without them was written
        while an int rank meant every bond ``min(rank, its cap)``, the ring bond included, and
        full rank every bond at its cap (now: the TT chain at or above the TT caps)."""
        if "ranks" in entry:
            return tuple(entry["ranks"])
        rank = entry.get("rank")
        if isinstance(rank, (list, tuple)):
            return tuple(rank)
        caps = cls.bond_caps(cls.modes_of(MatrixView(tuple(entry["shape"]), transposed)))
        return tuple(caps) if rank is None else tuple(min(int(rank), c) for c in caps)

    @classmethod
    def check_bonds(cls, modes, rank, ranks):
        names = [f"R_{k}" for k in range(len(modes))]
        check_chain_bonds(cls.name, rank, modes, [*ranks, ranks[0]], [*names, names[0]])

    @classmethod
    def rank_entries(cls, modes):
        return ["R_0 (the ring bond)", *(f"R_{k}" for k in range(1, len(modes)))]

    @classmethod
    def factor_shapes(cls, modes, ranks):
        d = len(modes)
        return [(ranks[k], n, ranks[(k + 1) % d]) for k, n in enumerate(modes)]

    @classmethod
    def assemble(cls, modes, ranks, factors):
        return tr_to_tensor(factors).reshape(modes)

    @classmethod
    def decompose_tensor(cls, tensor, ranks):
        return tr_als(tensor, ranks)


class ReshapedTRLayer(TRLayer):
    """Tensor ring over the reshaped modes ``(o_1, o_2, i_1, i_2, *spatial)``."""

    name, reshaped = "rtr", True
