"""Hierarchical Tucker (HT) helpers: the balanced dimension tree, HT-SVD and reconstruction.

The tree over modes ``0..D-1`` splits every node's modes into a left and a right half
(the left half gets the extra mode), down to single-mode leaves. Node ``t`` with modes
``mu_t`` has rank ``r_t`` (the root has 1). A leaf holds ``U_t (n_t, r_t)``; an inner node
(root included) a transfer tensor ``B_t (r_left, r_right, r_t)``, so that the frame of
``t`` is ``U_t = (U_left kron U_right) B_t`` (Grasedyck 2010). Nodes are numbered in
pre-order; ``ranks`` lists ``r_t`` for every non-root node in that order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sttpfast.linalg.tucker import leading_subspace

__all__ = ["HTNode", "dimension_tree", "ht_rank_caps", "ht_svd", "ht_to_tensor"]


@dataclass(frozen=True)
class HTNode:
    """One node: its modes and the pre-order indices of its children (``()`` for a leaf)."""

    modes: tuple[int, ...]
    children: tuple[int, ...] = ()


def dimension_tree(d: int) -> list[HTNode]:
    """The balanced dimension tree over ``d >= 2`` modes, nodes in pre-order (root first)."""
    nodes: list[HTNode] = []

    def build(modes: tuple[int, ...]) -> int:
        index = len(nodes)
        nodes.append(HTNode(modes))
        if len(modes) > 1:
            half = (len(modes) + 1) // 2
            left = build(modes[:half])
            right = build(modes[half:])
            nodes[index] = HTNode(modes, (left, right))
        return index

    build(tuple(range(d)))
    return nodes


def ht_rank_caps(shape: tuple[int, ...]) -> list[int]:
    """Largest meaningful rank of every non-root node: ``min(prod mu_t, prod of the rest)``."""
    total = math.prod(shape)
    caps = []
    for node in dimension_tree(len(shape))[1:]:
        inside = math.prod(shape[m] for m in node.modes)
        caps.append(min(inside, total // inside))
    return caps


def _matricize(tensor: Tensor, modes: tuple[int, ...]) -> Tensor:
    rest = [m for m in range(tensor.dim()) if m not in modes]
    return tensor.permute(*modes, *rest).reshape(math.prod(tensor.shape[m] for m in modes), -1)


def ht_svd(tensor: Tensor, ranks: list[int]) -> list[Tensor]:
    """HT-SVD: leading subspaces of every node's matricization, then the transfer tensors.

    Exact when every matricization has rank ``<= r_t``. Returns the factors in pre-order:
    ``U_t`` for leaves, ``B_t (r_l, r_r, r_t)`` for inner nodes (``r_root = 1``).
    """
    nodes = dimension_tree(tensor.dim())
    full_ranks = [1, *ranks]
    frames = [None] * len(nodes)
    for i, node in enumerate(nodes[1:], start=1):
        frames[i] = leading_subspace(_matricize(tensor, node.modes), full_ranks[i])
    out = []
    for i, node in enumerate(nodes):
        if not node.children:
            out.append(frames[i])
            continue
        left, right = node.children
        ul, ur = frames[left], frames[right]
        if i == 0:
            # root: project the whole tensor onto U_left kron U_right
            mat = _matricize(tensor, nodes[left].modes)  # (prod left, prod right)
            out.append((ul.transpose(0, 1) @ mat @ ur).unsqueeze(-1))
        else:
            ut = frames[i].reshape(ul.shape[0], ur.shape[0], -1)  # rows ordered left modes, right modes
            out.append(torch.einsum("ar,bs,abt->rst", ul, ur, ut))
    return out


def ht_to_tensor(factors: list[Tensor], shape: tuple[int, ...]) -> Tensor:
    """Full tensor ``shape`` from the pre-order HT factors of :func:`ht_svd`."""
    nodes = dimension_tree(len(shape))

    def frame(i: int) -> Tensor:  # (prod of node i's modes, r_i)
        node = nodes[i]
        if not node.children:
            return factors[i]
        ul, ur = frame(node.children[0]), frame(node.children[1])
        b = factors[i]
        return torch.einsum("ar,bs,rst->abt", ul, ur, b).reshape(ul.shape[0] * ur.shape[0], b.shape[-1])

    return frame(0).reshape(shape)
