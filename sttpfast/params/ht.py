"""Hierarchical Tucker layers (``ht``): the kernel's modes on a balanced dimension tree.

Modes ``(C_out, C_in, k_h, k_w)`` (spatial sizes of 1 dropped) sit on the tree
``{C_out, C_in} | {k_h, k_w}`` (see :func:`sttpfast.linalg.ht.dimension_tree`): leaves hold
``U_t (n_t, r_t)``, inner nodes transfer tensors ``B_t (r_left, r_right, r_t)`` (``r_root = 1``).
DOF: the sum of their sizes.

Rank: one int for every node, or a tuple with one rank per non-root node in pre-order
(for a conv: ``({C_out,C_in}, C_out, C_in, {k_h,k_w}, k_h, k_w)``); each at most
``min(prod of the node's modes, prod of the others)``. Decomposition: HT-SVD
(:func:`sttpfast.linalg.ht.ht_svd`), exact when every node's matricization has rank ``<= r_t``.
"""
from __future__ import annotations

from sttpfast.linalg.ht import dimension_tree, ht_rank_caps, ht_svd, ht_to_tensor
from sttpfast.params.tensorlayer import TensorLayer

__all__ = ["HTLayer"]


class HTLayer(TensorLayer):
    """Maps the tree's leaf frames and transfer tensors onto the kernel they define."""

    name, rank_kind = "ht", tuple

    @classmethod
    def bond_caps(cls, modes):
        return ht_rank_caps(tuple(modes))

    @classmethod
    def factor_shapes(cls, modes, ranks):
        nodes = dimension_tree(len(modes))
        full = [1, *ranks]
        return [(modes[node.modes[0]], full[i]) if not node.children
                else (full[node.children[0]], full[node.children[1]], full[i])
                for i, node in enumerate(nodes)]

    @classmethod
    def assemble(cls, modes, ranks, factors):
        return ht_to_tensor(factors, tuple(modes))

    @classmethod
    def decompose_tensor(cls, tensor, ranks):
        return ht_svd(tensor, ranks)
