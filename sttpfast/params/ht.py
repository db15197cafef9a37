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
        flattened in pre-order (a :class:`RankTree` that remembers the tree's shape)."""
        if isinstance(rank, RankTree):  # normalized already
            return rank
        if isinstance(rank, (tuple, list)) and any(isinstance(r, (tuple, list)) for r in rank):
            if len(rank) != 2:
                raise ValueError(f"ht: a rank tree is (left, right) under the root, each subtree an int or "
                                 f"(rank, left, right); got {rank!r}")
            flat = super().normalize_rank(tuple(_flatten_subtree(rank[0], rank) + _flatten_subtree(rank[1], rank)))
            return RankTree(flat, tree=_ints_tree(rank))
        return super().normalize_rank(rank)

    @classmethod
    def capped_ranks(cls, modes, rank):
        """A rank tree must have the shape of the dimension tree: a flat length that fits is
        not enough (a leaf and an inner node swapped read ranks onto other nodes)."""
        rank = cls.normalize_rank(rank)
        if isinstance(rank, RankTree):
            nodes = dimension_tree(len(modes))
            expected = tuple(_shape_of(nodes, child) for child in nodes[0].children)
            if _shape_of_tree(rank.tree) != expected:
                names = iter(cls.rank_entries(modes))
                template = _template(expected, names)
                raise ValueError(f"ht: the rank tree {rank.tree!r} does not fit the layer's dimension tree: it takes "
                                 f"{template}")
        return super().capped_ranks(modes, rank)

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


class RankTree(tuple):
    """A flat pre-order HT rank that came as a tree: ``tree`` keeps its shape for the check
    against a layer's dimension tree (equal to the flat tuple otherwise)."""

    def __new__(cls, flat, tree):
        self = super().__new__(cls, flat)
        self.tree = tree
        return self

    def __repr__(self) -> str:  # messages show the tree as the user gave it
        return repr(self.tree)

    def __getnewargs__(self):  # copy / deepcopy / pickle rebuild it with its tree
        return tuple(self), self.tree


def _ints_tree(node):
    """The tree with numpy's integers as Python's (its repr in messages)."""
    return tuple(_ints_tree(n) for n in node) if isinstance(node, (tuple, list)) else int(node)


def _shape_of(nodes, index: int):
    """A subtree's shape: ``"r"`` for a leaf, ``("r", left, right)`` for an inner node."""
    node = nodes[index]
    return "r" if not node.children else ("r", *(_shape_of(nodes, c) for c in node.children))


def _shape_of_tree(tree):
    """The shape of a given rank tree ``(left, right)``, as :func:`_shape_of` writes it."""
    def sub(node):
        return ("r", sub(node[1]), sub(node[2])) if isinstance(node, tuple) else "r"
    return tuple(sub(node) for node in tree)


def _template(shape, names) -> str:
    """A tree shape written with each node's name in pre-order: ``((r{8,6}, r{8}, r{6}), r{3})``."""
    if shape == "r":
        return next(names)
    parts = [_template(s, names) if s != "r" else next(names) for s in shape]
    return "(" + ", ".join(parts) + ")"


def _flatten_subtree(node, whole) -> list:
    """Pre-order ranks of a subtree: ``int`` (a leaf) or ``(rank, left, right)``."""
    if isinstance(node, (tuple, list)):
        if len(node) != 3 or isinstance(node[0], (tuple, list)):
            raise ValueError(f"ht: an inner node of a rank tree is (rank, left, right), got {tuple(node)!r} "
                             f"in {whole!r}")
        return [node[0], *_flatten_subtree(node[1], whole), *_flatten_subtree(node[2], whole)]
    return [node]
