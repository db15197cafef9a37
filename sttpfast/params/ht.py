"""Hierarchical Tucker layers (``ht``): the kernel's modes on a balanced dimension tree.

Modes ``(C_out, C_in, k_h, k_w)`` (spatial sizes of 1 dropped) sit on the tree
``{C_out, C_in} | {k_h, k_w}`` (see :func:`sttpfast.linalg.ht.dimension_tree`): leaves hold
``U_t (n_t, r_t)``, inner nodes transfer tensors ``B_t (r_left, r_right, r_t)`` (``r_root = 1``).
DOF: the sum of their sizes.

Rank: one int for every node, a tuple with one rank per non-root node in pre-order
(for a conv: ``({C_out,C_in}, C_out, C_in, {k_h,k_w}, k_h, k_w)``), or the same as a tree:
``(left, right)`` under the root, each subtree an int (a leaf's rank) or
``(rank, left, right)`` (an inner node's rank and its subtrees), e.g.
``((4, 8, 6), (3, 3, 3))`` for a conv; it is stored flat, in pre-order. Each rank at most
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
    def rank_entries(cls, modes):
        return ["r{" + ",".join(str(modes[m]) for m in node.modes) + "}"
                for node in dimension_tree(len(modes))[1:]]

    @classmethod
    def normalize_rank(cls, rank):
        """An int, a flat pre-order tuple, or a tree ``(left, right)`` (see the module docstring),
        flattened in pre-order."""
        if isinstance(rank, (tuple, list)) and any(isinstance(r, (tuple, list)) for r in rank):
            if len(rank) != 2:
                raise ValueError(f"ht: a rank tree is (left, right) under the root, each subtree an int or "
                                 f"(rank, left, right); got {rank!r}")
            rank = tuple(_flatten_subtree(rank[0], rank) + _flatten_subtree(rank[1], rank))
        return super().normalize_rank(rank)

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


def _flatten_subtree(node, whole) -> list:
    """Pre-order ranks of a subtree: ``int`` (a leaf) or ``(rank, left, right)``."""
    if isinstance(node, (tuple, list)):
        if len(node) != 3 or isinstance(node[0], (tuple, list)):
            raise ValueError(f"ht: an inner node of a rank tree is (rank, left, right), got {tuple(node)!r} "
                             f"in {whole!r}")
        return [node[0], *_flatten_subtree(node[1], whole), *_flatten_subtree(node[2], whole)]
    return [node]
