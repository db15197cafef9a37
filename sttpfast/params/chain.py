"""A weight as a tensor-train chain of Householder frames around a diagonal spectrum.

``W = U diag(s) V^T`` where ``U`` (``d_out x r``) is the contraction of the U-cores over
the output modes and ``V^T`` (``r x d_in``) that of the V-cores over the input modes.

* U-core ``k``: ``(R_{k-1}, n_k, R_k)``, stored as the frame ``(R_{k-1} n_k) x R_k``
  (left-orthonormal), so the chain ``U`` has orthonormal columns.
* V-core ``k``: ``(R_{k-1}, n_k, R_k)``, stored as the transposed frame
  ``(n_k R_k) x R_{k-1}`` (right-orthonormal), so ``V^T`` has orthonormal rows.
* the bond between the last U-core and the first V-core has rank ``r``; ``s`` sits there.

Hence the singular values of ``W`` are exactly ``|s|``.

Gauge: at every internal bond ``(C_k P)(P^T C_{k+1})`` leaves ``W`` unchanged, so every
core not adjacent to ``Sigma`` lives on the reduced ``St_U``. The two cores next to
``Sigma`` are on the full ``St``, except that with the spectrum fixed to ``I`` (``-C``) the
bond itself has an orthogonal gauge and the last U-core is on ``St_U`` as well.

Spectrum: ``learned`` gives ``s = S / max|S|`` (``|Sigma|_inf = 1``), ``fixed`` gives
``s = 1``. SVDP is the chain with one core on each side; STTP splits both sides into
prime modes (see :mod:`sttpfast.params.sttp`).

Gain: ``W = g U diag(s) V^T`` with a per-layer constant ``g`` (a buffer, 1 by default).
Both variants bound the spectrum (``|s| <= 1``), so without ``g`` a layer converted from a
trained dense weight would lose its scale ``sigma_max(W)``. ``g`` is fixed, not learned:
the bound is the point of these variants, and a learned ``g`` would make it unbounded.
With it, ``sigma_max(W) = g`` exactly for the matricized weight ``W (d_out, d_in)``: the
Lipschitz constant of a Linear layer, while a ``k_h x k_w`` convolution's operator norm can
reach ``sqrt(k_h k_w) g`` (each input pixel meets every kernel position); and ``g`` is a
constant of the layer like its rank: not a degree of freedom, not in ``Z``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.utils import parametrize

from sttpfast.linalg.householder import (
    frame_params_from_frame,
    frame_precision,
    householder_frame,
    identity_frame_params,
    st_u_gauge,
    stiefel_dof,
)
from sttpfast.linalg.memo import constant_memo
from sttpfast.linalg.tt import tt_ranks
from sttpfast.params.base import MatrixView, WeightParametrization, check_rank, learned_spectrum
from sttpfast.params.factorized import install_factorized_forward

__all__ = ["ChainLayout", "ChainFactors", "CoreFactors", "SpectralChain", "IDENTITY_NOISE", "contract_chain", "weight_matrix", "scaled_spectrum",
           "chain_weight", "contraction_plan", "segment_plan", "root_operands", "factor_operands", "build_flops"]

#: standard deviation of the reflector entries at the identity initialization. The STTP
#: reference code perturbs the frame ``E`` by ``1e-4 * randn`` and re-orthogonalizes; a
#: reflector ``y_j = e_j + b`` turns ``e_j`` into ``-e_j - 2 b + O(|b|^2)``, so reflector
#: noise 5e-5 gives the same frame deviation (standard deviation 1e-4 from ``-E``).
IDENTITY_NOISE = 5e-5


@dataclass(frozen=True)
class CoreFrame:
    """One core: its mode, its frame shape ``rows x cols`` and whether it is on ``St_U``."""

    mode: int
    left_rank: int
    right_rank: int
    is_u: bool
    reduced: bool

    @property
    def rows(self) -> int:
        return (self.left_rank if self.is_u else self.right_rank) * self.mode

    @property
    def cols(self) -> int:
        return self.right_rank if self.is_u else self.left_rank


@dataclass(frozen=True)
class ChainLayout:
    """Modes, TT ranks and core frames of a spectral chain."""

    out_modes: tuple[int, ...]
    in_modes: tuple[int, ...]
    ranks: tuple[int, ...]
    learned: bool

    def __post_init__(self):
        # derived once, here: a layout keys the plan caches and the bank's groups at every
        # build, and every build reads its cores. Not filled lazily (functools.cached_property
        # or on first use): a cache that torch.compile's trace filled was a graph break (the
        # property's lock) or a trace that diverged when dynamo restarted its analysis
        self.__dict__["_hash"] = hash((self.out_modes, self.in_modes, self.ranks, self.learned))
        self.__dict__["_cores"] = cores = self._derive_cores()
        n_out = len(self.out_modes)
        self.__dict__["_absorbable"] = tuple(c.reduced and c.rows == c.cols and k != n_out - 1
                                             for k, c in enumerate(cores))

    def __hash__(self) -> int:
        return self.__dict__["_hash"]

    @property
    def rank(self) -> int:
        return self.ranks[len(self.out_modes)]

    @property
    def cores(self) -> tuple[CoreFrame, ...]:
        return self.__dict__["_cores"]

    def _derive_cores(self) -> tuple[CoreFrame, ...]:
        n_out, modes, out = len(self.out_modes), self.out_modes + self.in_modes, []
        for k, n in enumerate(modes):
            is_u = k < n_out
            if is_u:
                reduced = k < n_out - 1 or not self.learned
            else:
                reduced = k > n_out
            out.append(CoreFrame(n, self.ranks[k], self.ranks[k + 1], is_u, reduced))
        return tuple(out)

    @property
    def absorbable(self) -> tuple[bool, ...]:
        """Per core: its frame is the constant ``-I`` (``St_U`` of a square frame, nothing to
        learn: :func:`~sttpfast.linalg.householder.householder_frame`) and it does not carry
        the spectrum (the last U-core does, in :func:`_chain_cores`). Such a U-core as the left
        operand of a merge, or V-core as the right one, is a square ``-I`` matrix: the merge is
        the other operand, negated, in the same row-major layout (no product, no copy)."""
        return self.__dict__["_absorbable"]

    @property
    def dof(self) -> int:
        frames = sum(stiefel_dof(c.rows, c.cols, c.reduced) for c in self.cores)
        return frames + (self.rank if self.learned else 0)

    @classmethod
    def build(cls, out_modes, in_modes, rank: int | None, learned: bool) -> "ChainLayout":
        out_modes, in_modes = tuple(out_modes), tuple(in_modes)
        ranks = tuple(tt_ranks(out_modes + in_modes, rank))
        return cls(out_modes, in_modes, ranks, learned)


class CoreFactors(NamedTuple):
    """The registered tensors of one core's frame: ``bottom`` ``(rows - cols, cols)`` and, on
    the full ``St``, the packed ``top`` ``(cols (cols - 1) / 2,)`` (None on ``St_U``)."""

    bottom: Tensor
    top: Tensor | None


class ChainFactors(NamedTuple):
    """A chain's factors by role: the raw spectrum ``S`` (``(r,)``, learned spectrum only, else
    None) and one :class:`CoreFactors` per core in chain order (U-cores, then V-cores).

    The parametrization's flat factor order (what ``torch.nn.utils.parametrize`` registers as
    ``original0, original1, ...``) is :meth:`flat`; :meth:`unpack` is its inverse.
    """

    spectrum: Tensor | None
    cores: tuple[CoreFactors, ...]

    @classmethod
    def unpack(cls, layout: "ChainLayout", factors) -> "ChainFactors":
        it = iter(factors)
        spectrum = next(it) if layout.learned else None
        cores = tuple(CoreFactors(next(it), None if core.reduced else next(it)) for core in layout.cores)
        return cls(spectrum, cores)

    def flat(self) -> tuple[Tensor, ...]:
        out = [] if self.spectrum is None else [self.spectrum]
        for core in self.cores:
            out.extend(t for t in core if t is not None)
        return tuple(out)


def _polar(m: Tensor) -> Tensor:
    """Closest matrix with orthonormal columns (the polar factor), ``(n, r) -> (n, r)``."""
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


def contract_chain(layout: ChainLayout, frames: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Contract the U- and V-chains of ``frames`` (each ``(..., rows, cols)``).

    Returns ``U (..., d_out, r)`` and ``V (..., d_in, r)``, both with orthonormal columns.
    The chains are contracted by two sweeps of matmuls whose reshapes are all views (U left
    to right, V right to left): a chain's cheapest order is the sweep, and it needs no
    permuted copies, unlike a generic einsum path. Leading dims batch equal layouts.
    """
    n_out = len(layout.out_modes)
    u = None
    for core, frame in zip(layout.cores[:n_out], frames[:n_out]):
        # frame: (R_{k-1} n_k) x R_k, i.e. the core as R_{k-1} x (n_k R_k)
        step = frame.reshape(*frame.shape[:-2], core.left_rank, core.mode * core.right_rank)
        u = step if u is None else _matmul(u, step)
        u = u.reshape(*frame.shape[:-2], -1, core.right_rank)
    # V right to left with plain (batched) matmuls: the rows come out in reversed mode order
    # (i_D outermost), fixed by one permutation at the end; a broadcasting matmul that keeps
    # the natural order costs an expand and, in backward, a reduction per core.
    v = None
    in_cores = layout.cores[n_out:]
    for core, frame in zip(reversed(in_cores), reversed(frames[n_out:])):
        # frame: (n_k R_k) x R_{k-1} -> the core as R_k x (n_k R_{k-1})
        batch = frame.shape[:-2]
        step = frame.reshape(*batch, core.mode, core.right_rank, core.left_rank).transpose(-3, -2)
        step = step.reshape(*batch, core.right_rank, core.mode * core.left_rank)
        v = step if v is None else _matmul(v, step)
        v = v.reshape(*batch, -1, core.left_rank)
    if len(in_cores) > 1:
        batch = v.shape[:-2]
        modes = [c.mode for c in reversed(in_cores)]
        nb, d = len(batch), len(modes)
        v = v.reshape(*batch, *modes, v.shape[-1])
        v = v.permute(*range(nb), *[nb + d - 1 - i for i in range(d)], nb + d)
        v = v.reshape(*batch, -1, v.shape[-1])
    return u, v


def scaled_spectrum(raw: Tensor | None, gain: Tensor, rank: int) -> Tensor:
    """``g s``: ``g * S / max|S|`` for a learned spectrum ``raw`` (``(..., r)``), ``g * 1`` for
    a fixed one (``raw`` None); ``gain`` is ``(...)``. Returns ``(..., r)``."""
    gain = gain.unsqueeze(-1)
    if raw is None:
        return gain.expand(*gain.shape[:-1], rank)
    return learned_spectrum(raw) * gain


def weight_matrix(u: Tensor, spectrum: Tensor | None, v: Tensor) -> Tensor:
    """``U diag(s) V^T``: ``(..., d_out, r), (..., r) or None, (..., d_in, r) -> (..., d_out, d_in)``."""
    if spectrum is not None:
        u = u * spectrum.unsqueeze(-2)
    return _matmul(u, v.mT)


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``; ``torch.bmm`` when both are 3-D (the frame bank's batched layouts): the same
    kernel on the same operands, but matmul's batched path records an expand of each operand and
    a view of the result in autograd too, four extra nodes per product, which on the small
    matrices of a chain cost more in backward than the product itself."""
    return torch.bmm(a, b) if a.dim() == 3 and b.dim() == 3 else a @ b


def _reshaped(t: Tensor, *shape: int) -> Tensor:
    """``t.reshape(*shape)``, or ``t`` itself when it has that shape already (a reshape to the
    same shape still records a view node in autograd)."""
    return t if t.shape == shape else t.reshape(*shape)


# ---------------------------------------------------------------------------------------
# the weight in one contraction of the whole chain, in the order of fewest FLOPs
@constant_memo
def contraction_plan(layout: ChainLayout) -> tuple[tuple, int]:
    """The cheapest order to contract all cores of ``layout`` (U-cores, ``Sigma``, V-cores) into ``W``.

    The chain is a product of matrices once every core is seen as ``(R_{k-1} n_k, R_k)`` or
    ``(R_{k-1}, n_k R_k)``: merging the contracted segments ``[a, m]`` and ``[m+1, b]`` is one
    matmul ``(R_{a-1} N_{a..m}, R_m) @ (R_m, N_{m+1..b} R_b)`` of ``R_{a-1} N_{a..b} R_b R_m``
    multiply-adds whose operands and result are plain reshapes (row-major
    ``(R_{a-1}, n_a, ..., n_b, R_b)``), so no order needs a permuted copy, and the result is
    ``W`` in its natural ``(d_out, d_in)`` layout. The classic matrix-chain dynamic program
    picks the split of every segment. ``U diag(s) V^T`` (the two sweeps, then the product
    through the bond of rank ``r``) is one of the orders; a cheaper one contracts through a
    smaller bond last, e.g. the ``R = 9`` bond before a 3x3 kernel mode.

    Returns ``(tree, flops)``: ``tree`` is a core index (a leaf) or ``(left, right)``.
    """
    return segment_plan(layout, 0, len(layout.out_modes + layout.in_modes) - 1)


@constant_memo
def segment_plan(layout: ChainLayout, first: int, last: int) -> tuple[tuple | int, int]:
    """:func:`contraction_plan` of the cores ``first..last`` alone: ``(tree, flops)``, the tree
    over core indices. The U side ``0..n_out-1`` contracts to ``U`` ``(d_out, r)``, the V side
    to ``V^T`` ``(r, d_in)``, both row-major with no permuted copy."""
    modes = layout.out_modes + layout.in_modes
    ranks, n = layout.ranks, last + 1
    span = [[math.prod(modes[a:b + 1]) for b in range(n)] for a in range(n)]
    cost = [[0] * n for _ in range(n)]
    split = [[0] * n for _ in range(n)]
    for length in range(2, n - first + 1):
        for a in range(first, n - length + 1):
            b = a + length - 1
            best = None
            for m in range(a, b):
                if _absorbs(layout, a, m, b):
                    c = cost[a][m] + cost[m + 1][b]  # a -I leaf: the merge is a sign (_contract)
                else:
                    c = cost[a][m] + cost[m + 1][b] + ranks[a] * span[a][b] * ranks[b + 1] * ranks[m + 1]
                if best is None or c < best:
                    best, split[a][b] = c, m
            cost[a][b] = best

    def tree(a, b):
        if a == b:
            return a
        m = split[a][b]
        return tree(a, m), tree(m + 1, b)
    return tree(first, last), cost[first][last]


def _absorbs(layout: ChainLayout, a: int, m: int, b: int) -> bool:
    """Whether the merge of ``[a, m]`` and ``[m + 1, b]`` has a ``-I`` leaf operand
    (:attr:`ChainLayout.absorbable`): a U-core alone on the left or a V-core alone on the right."""
    n_out = len(layout.out_modes)
    return (m == a < n_out and layout.absorbable[a]) or (m + 1 == b >= n_out and layout.absorbable[b])


@constant_memo
def _absorbed(layout: ChainLayout, node) -> tuple[int, ...]:
    """The ``-I`` leaves of the tree ``node`` that its merges absorb (see :func:`_contract`);
    cached with the plans it walks (both are fixed per layout)."""
    if isinstance(node, int):
        return ()
    left, right = node
    return tuple(_absorbed_leaf(layout, node)) + _absorbed(layout, left) + _absorbed(layout, right)


def _absorbed_leaf(layout: ChainLayout, node) -> list[int]:
    """``[k]`` when the merge ``node`` has the ``-I`` leaf ``k`` as an operand (a U-core on the
    left, a V-core on the right), else ``[]``."""
    left, right = node
    n_out = len(layout.out_modes)
    if isinstance(left, int) and left < n_out and layout.absorbable[left]:
        return [left]
    if isinstance(right, int) and right >= n_out and layout.absorbable[right]:
        return [right]
    return []


def _chain_cores(layout: ChainLayout, frames: list[Tensor], spectrum: Tensor | None,
                 skipped: tuple[int, ...] = ()) -> list[Tensor | None]:
    """Every core as a matrix ``(R_{k-1} n_k, R_k)`` (U) or ``(R_{k-1}, n_k R_k)`` (V: the
    transposed view of its frame), ``g s`` in the last U-core: ``(R n) x r``, the cheapest place.
    The ``-I`` cores ``skipped`` (absorbed by the contraction) are None; the sign of each goes
    into the last U-core with the spectrum (exact: a product of signs)."""
    n_out = len(layout.out_modes)
    cores = list(frames)
    negate = len(skipped) % 2 == 1
    if spectrum is not None:
        cores[n_out - 1] = cores[n_out - 1] * (spectrum.neg() if negate else spectrum).unsqueeze(-2)
    elif negate:
        cores[n_out - 1] = cores[n_out - 1].neg()
    # a V-core's frame is (n_k R_k) x R_{k-1}: its transpose is the core as R_{k-1} x (n_k R_k)
    for k in range(n_out, len(cores)):
        cores[k] = cores[k].mT
    for k in skipped:
        cores[k] = None
    return cores


def _contract(layout: ChainLayout, cores: list[Tensor | None], node) -> Tensor:
    """Segment ``[a, b]`` (a tree ``node`` of core indices) as one row-major ``(R_{a-1}, n_a..n_b, R_b)``
    array, batched over the leading dims (any reshape of it is a view), except a V-core leaf:
    the transposed ``(R_{a-1}, n_a R_a)`` view of its frame. A merge with an absorbed ``-I``
    leaf (None in ``cores``; its sign is in the last U-core) is the other operand: a U-core
    ``(R_{a-1} n_a, R_a)`` times ``(R_a, ...)``, or ``(..., R_{b-1})`` times a V-core
    ``(R_{b-1}, n_b R_b)``, lays out the same elements in the same order."""
    if isinstance(node, int):
        return cores[node]
    absorbed = _absorbed_leaf(layout, node)
    if absorbed:
        return _contract(layout, cores, node[1] if absorbed[0] == node[0] else node[0])
    left, right = _operands(layout, cores, node)
    return _matmul(left, right)


def _operands(layout: ChainLayout, cores: list[Tensor], node) -> tuple[Tensor, Tensor]:
    """The two operands of the merge at ``node``: ``(..., rows, R_m)`` and ``(..., R_m, cols)``."""
    left, right = _contract(layout, cores, node[0]), _contract(layout, cores, node[1])
    batch = left.shape[:-2]
    bond = layout.ranks[_last_core(node[0]) + 1]
    return (_reshaped(left, *batch, left.numel() // (bond * math.prod(batch)), bond),
            _reshaped(right, *batch, bond, right.numel() // (bond * math.prod(batch))))


def root_operands(layout: ChainLayout, frames: list[Tensor], spectrum: Tensor | None) -> tuple[Tensor, Tensor]:
    """The two operands of the last matmul of :func:`contraction_plan`'s order, every other
    merge done: ``(..., d_left, R_m)`` and ``(..., R_m, d_right)`` with ``d_left d_right = d_out d_in``."""
    tree, _ = contraction_plan(layout)
    cores = _chain_cores(layout, frames, spectrum, _absorbed(layout, tree))
    return _operands(layout, cores, _last_merge(layout))


@constant_memo
def _last_merge(layout: ChainLayout):
    """The node of :func:`contraction_plan`'s tree whose product is the last matmul: below the
    merges that absorb a ``-I`` leaf (each of those is its other operand)."""
    tree, _ = contraction_plan(layout)
    while absorbed := _absorbed_leaf(layout, tree):
        tree = tree[1] if absorbed[0] == tree[0] else tree[0]
    return tree


def _last_core(node) -> int:
    return node if isinstance(node, int) else _last_core(node[1])


def _first_core(node) -> int:
    return node if isinstance(node, int) else _first_core(node[0])


def factor_operands(layout: ChainLayout, frames: list[Tensor], spectrum: Tensor | None) -> tuple[Tensor, Tensor]:
    """The two factors of the factorized forward: ``U diag(g s)`` ``(..., d_out, r)`` and ``V^T``
    ``(..., r, d_in)``, so that ``W = (U diag(g s)) V^T``.

    Each side is contracted on its own in its order of fewest FLOPs (:func:`segment_plan`),
    which ends at the rank-``r`` bond whatever order :func:`contraction_plan` picks for ``W``;
    both come out row-major (``V^T`` is the conv kernel ``(r, C_in, *kernel)`` by a view). For
    SVDP the two factors are the frames themselves (``U`` times ``g s``, ``V^T`` a transposed view).
    """
    n_out, n = len(layout.out_modes), len(layout.out_modes + layout.in_modes)
    u_tree, v_tree = segment_plan(layout, 0, n_out - 1)[0], segment_plan(layout, n_out, n - 1)[0]
    cores = _chain_cores(layout, frames, spectrum, _absorbed(layout, u_tree) + _absorbed(layout, v_tree))
    batch = frames[0].shape[:-2]
    u = _contract(layout, cores, u_tree)
    v_t = _contract(layout, cores, v_tree)
    return u.reshape(*batch, -1, layout.rank), v_t.reshape(*batch, layout.rank, -1)


@constant_memo
def build_flops(layout: ChainLayout) -> tuple[int, int]:
    """Multiply-adds of the two ways to finish a build from the frames: ``(weight, factors)``.

    ``weight``: the whole contraction of :func:`contraction_plan`, with its last matmul that
    makes the ``d_out x d_in`` weight; ``factors``: the two sides of :func:`factor_operands`,
    each in its cheapest order, stopping at the rank-``r`` bond.
    """
    n_out, n = len(layout.out_modes), len(layout.out_modes + layout.in_modes)
    return contraction_plan(layout)[1], segment_plan(layout, 0, n_out - 1)[1] + segment_plan(layout, n_out, n - 1)[1]


def chain_weight(layout: ChainLayout, frames: list[Tensor], spectrum: Tensor | None) -> Tensor:
    """``W = U diag(g s) V^T`` of one chain, contracted in the order of :func:`contraction_plan`.

    Args:
        frames: one ``(rows, cols)`` frame per core, chain order (U-cores, then V-cores).
        spectrum: ``g s`` ``(r,)`` or None (``s = 1``, gain 1).
    Returns:
        ``(d_out, d_in)``.
    """
    left, right = root_operands(layout, frames, spectrum)
    return _matmul(left, right).reshape(math.prod(layout.out_modes), -1)


#: the name under which a layer's factors sit in ``parametrize._cache`` (torch keys its cached
#: weights by ``(id(module), tensor name)``; this key's id is the parametrization's own)
_FACTORS_KEY = "sttpfast.factors"


class SpectralChain(WeightParametrization):
    """``W = U diag(s) V^T`` with ``U``, ``V`` tensor-train chains of Householder frames.

    Factors (the tensors the optimizer sees), in order: ``S`` (``(r,)``, learned spectrum
    only), then for every core its ``bottom`` (``(rows - cols, cols)``) and, on the full
    ``St``, its packed ``top`` (``(cols (cols - 1) / 2,)``).
    """

    learned: bool = True
    #: the frames' triangular solves have no half-precision kernel, and half-precision frames
    #: would not stay orthonormal (half precision: float32 weights under autocast)
    dtypes = (torch.float32, torch.float64)
    #: how the layer runs its input (:mod:`sttpfast.params.factorized`): "auto" (multiply-add
    #: estimate per call), "factorized" (conv V^T, then 1x1 conv U diag(g s)), "materialized"
    forward_mode: str = "auto"

    @classmethod
    def apply_to(cls, module, rank=None, init="identity") -> None:
        """Register on ``module.weight`` and give the layer the path-choosing forward."""
        super().apply_to(module, rank, init)
        install_factorized_forward(module)

    def __init__(self, shape, transposed=False, rank=None, init="identity"):
        super().__init__(shape, transposed, rank, init)
        self.layout = self.chain_layout(self.view, rank)
        assert self.layout.rank == self.rank, (self.layout.rank, self.rank)
        # the layer's scale (see the module docstring); set by right_inverse
        self.register_buffer("gain", torch.ones(()))

    # -- structure ----------------------------------------------------------------------
    @classmethod
    def modes(cls, view: MatrixView) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    @classmethod
    def chain_layout(cls, view: MatrixView, rank: int | None) -> ChainLayout:
        check_rank(rank)
        out_modes, in_modes = cls.modes(view)
        assert math.prod(out_modes) == view.d_out and math.prod(in_modes) == view.d_in
        return ChainLayout.build(out_modes, in_modes, rank, cls.learned)

    @classmethod
    def count_dof(cls, shape, transposed, rank):
        return cls.chain_layout(MatrixView(shape, transposed), rank).dof

    @classmethod
    def largest_useful_rank(cls, shape, transposed=False):
        # the rank caps the TT ranks too, and those can exceed the SVD rank min(d_out, d_in)
        return max(cls.chain_layout(MatrixView(shape, transposed), None).ranks)

    def extra_repr(self) -> str:
        return (f"{self.view.shape}, rank={self.rank}, dof={self.dof}, "
                f"modes={self.layout.out_modes}x{self.layout.in_modes}, tt_ranks={self.layout.ranks}")

    # -- forward ------------------------------------------------------------------------
    def chain_factors(self, factors) -> ChainFactors:
        """The flat factors (``original0, original1, ...``) by role."""
        return ChainFactors.unpack(self.layout, factors)

    def _raw_and_frames(self, factors) -> tuple[Tensor | None, list[Tensor]]:
        """``(raw S or None, [frame per core])``, built here, one WY call per core."""
        raw, cores = self.chain_factors(factors)
        return raw, [householder_frame(core.bottom, core.top) for core in cores]

    def frames(self, *factors: Tensor) -> tuple[Tensor | None, list[Tensor]]:
        """``(s or None, [frame per core])``, built here, one WY call per core (``s`` without the gain)."""
        raw, frames = self._raw_and_frames(factors)
        return (None if raw is None else learned_spectrum(raw)), frames

    def svd_factors(self, *factors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(U (d_out, r), g s (r,), V (d_in, r))`` with ``W = U diag(g s) V^T``."""
        raw, frames = self._raw_and_frames(factors)
        u, v = contract_chain(self.layout, frames)
        return u, scaled_spectrum(raw, self.gain, self.rank), v

    def forward(self, *factors: Tensor) -> Tensor:
        return self.view.from_matrix(self._built("weight", factors))

    def _built(self, form: str, factors) -> Tensor | tuple[Tensor, Tensor]:
        """The weight ``(d_out, d_in)`` (``form="weight"``) or the pair ``(U diag(g s), V^T)``
        (``"factors"``): from the frame bank's batched build when a pass is open, else built
        here, from this layer's own frames.

        Under ``parametrize.cached()`` (validation) the pair is built once and kept with the
        weights torch caches there (dropped with them when the context ends), so a layer that
        runs factorized costs one build per pass, as a materialized one does: torch caches only
        what the parametrization's forward returns, the weight, never the factors."""
        if form == "factors" and getattr(parametrize, "_cache_enabled", 0):
            cache = parametrize._cache  # rebound (emptied) by torch when the context ends
            key = (id(self), _FACTORS_KEY)
            built = cache.get(key)
            if built is None:
                built = cache[key] = self._build(form, factors)
            return built
        return self._build(form, factors)

    def _build(self, form: str, factors) -> Tensor | tuple[Tensor, Tensor]:
        """:meth:`_built` without the validation cache."""
        bank = self.__dict__.get("frame_bank")
        built = None if bank is None else bank.weight(self) if form == "weight" else bank.factors(self)
        if built is None:
            # orthogonality needs full precision: never build frames under bf16/fp16 autocast
            with frame_precision(factors[-1]):
                raw, frames = self._raw_and_frames(factors)
                contract = chain_weight if form == "weight" else factor_operands
                built = contract(self.layout, frames, scaled_spectrum(raw, self.gain, self.rank))
        return built

    # -- the factorized forward (sttpfast.params.factorized) ------------------------------
    def conv_factors(self, factors) -> tuple[None, Tensor, Tensor, bool]:
        """``(None, V^T as a kernel (r, C_in, *kernel), U diag(g s) (d_out, r), depthwise=False)``:
        the layer as a conv ``C_in -> r`` carrying its stride / padding / dilation, then a 1x1
        conv ``r -> C_out`` with its bias (a Linear: ``V^T (r, d_in)`` then ``U diag(g s)``).

        ``V^T``'s columns are the weight's ``C_in * prod(kernel)`` columns in the matrix view's
        row-major order (STTP's input modes are those of ``C_in`` then the kernel), so the
        reshape to ``(r, C_in, *kernel)`` is the conv kernel. From the frame bank's batched build
        when a pass is open (without the final product ``U diag(g s) V^T``), else built here."""
        u, v_t = self._built("factors", factors)
        return None, v_t.reshape(self.rank, *self.view.natural[1:]), u, False

    def flops(self, batch_pixels_in: int, batch_pixels_out: int) -> tuple[int, int]:
        """(materialized, factorized) multiply-adds of one call (see factorized.py): the
        contraction from the frames (:func:`build_flops`: the whole plan, or the two sides) plus the layer's
        convolution (``P_out d_out d_in``, or ``P_out r (d_in + d_out)``); the frames cost the same."""
        whole, sweeps = build_flops(self.layout)
        d_out, d_in, r = self.view.d_out, self.view.d_in, self.rank
        return whole + batch_pixels_out * d_out * d_in, sweeps + batch_pixels_out * r * (d_in + d_out)

    def stored_elements(self, batch_pixels_in: int, batch_pixels_out: int) -> tuple[int, int]:
        """(materialized, factorized) elements one call keeps for backward beyond its input:
        the weight ``d_out d_in``, or the intermediate activation ``P_out r`` and both factors."""
        d_out, d_in, r = self.view.d_out, self.view.d_in, self.rank
        return d_out * d_in, batch_pixels_out * r + r * (d_in + d_out)

    # -- spectrum -----------------------------------------------------------------------
    def singular_values(self, *factors: Tensor) -> Tensor:
        raw = factors[0] if self.learned else None
        s = scaled_spectrum(raw, self.gain.to(factors[0].dtype), self.rank)
        return torch.sort(s.abs(), descending=True).values

    def spectral_bound(self) -> float:
        """``sigma_max(W) <= g`` by construction (equality: ``max|s| = 1``, or ``s = 1``)."""
        return float(self.gain)

    def log_spectrum(self, *factors: Tensor) -> Tensor:
        if not self.learned:
            return super().log_spectrum(*factors)
        return torch.log(learned_spectrum(factors[0]).abs())

    def raw_spectrum(self, *factors: Tensor) -> Tensor | None:
        return factors[0] if self.learned else None

    # -- initialization -----------------------------------------------------------------
    def right_inverse(self, weight: Tensor):
        if self._identity_on_register:
            self.gain = torch.ones((), dtype=weight.dtype, device=weight.device)
        return super().right_inverse(weight)

    def identity_factors(self, dtype=torch.float32, device=None, generator=None):
        spectrum = torch.ones(self.rank, dtype=dtype) if self.learned else None
        cores = tuple(CoreFactors(*identity_frame_params(core.rows, core.cols, core.reduced, IDENTITY_NOISE,
                                                         dtype=dtype, generator=generator))
                      for core in self.layout.cores)
        return tuple(t.to(device) for t in ChainFactors(spectrum, cores).flat())

    def decompose(self, weight: Tensor) -> tuple[Tensor, ...]:
        """Factors of the best rank-``r`` chain approximation of ``weight``; sets ``self.gain``.

        With ``W = U_r diag(S_r) V_r^T + (rest)`` the truncated SVD (``S`` descending):

        * learned spectrum: ``g = S_1`` and ``s = S_r / S_1``, so the chain is exactly
          ``U_r diag(S_r) V_r^T``: ``W`` itself at full rank, the best rank-``r``
          approximation otherwise (error ``sqrt(sum_{i>r} S_i^2)`` in Frobenius norm), as long
          as the TT ranks do not truncate ``U_r``, ``V_r`` (always for SVDP);
        * fixed spectrum: the chain can only hold ``g`` times a partial isometry; the closest
          one in Frobenius norm is ``g = mean(S_r)`` times the polar factor ``U_r V_r^T``.
          A square full-rank chain (``d_out = d_in = r``) holds ``g`` times an orthogonal
          matrix of one determinant sign only (its factors form a connected set, and the
          orthogonal group has two components). When the polar factor has the other sign,
          the closest matrix it holds flips the last (smallest) singular direction:
          ``Q = U_r diag(1, ..., 1, -1) V_r^T`` and ``g = (S_1 + ... + S_{r-1} - S_r) / r``
          (the best ``Q`` of that sign for any ``g > 0``, then the best ``g``), with
          Frobenius error ``sqrt(sum_i S_i^2 - r g^2)``.
        """
        lay, r = self.layout, self.rank
        mat = self.view.to_matrix(weight.detach()).to(torch.float64)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        u, s, v = u[:, :r], s[:r], vh[:r].transpose(0, 1)
        if not self.learned and self.view.d_out == self.view.d_in == r:
            if torch.linalg.det(u @ v.T) * self._orthogonal_sign() < 0:
                u, s = u.clone(), s.clone()
                u[:, -1], s[-1] = -u[:, -1], -s[-1]  # W = U diag(s) V^T still holds
        cores = lay.cores
        n_out = len(lay.out_modes)

        u_params, u_last = self._sweep_u(u, cores[:n_out])
        if self.learned:
            # the frames' sign flips end up in the learned spectrum, fitted to the frames below
            bottom, top, _, _ = frame_params_from_frame(u_last, reduced=False, flip=True)
            u_params.append((bottom, top))
            v_params, v_first = self._sweep_v(v, cores[n_out:])
            bottom, top, _, _ = frame_params_from_frame(v_first, reduced=False, flip=True)
        else:
            # U V^T = (U P)(V P)^T: rotate the last U-core into St_U form, move P to V
            u_last, p = self._reduce_last(u_last)
            v_params, v_first = self._sweep_v(v @ p, cores[n_out:])
            # a sign flip on V's column j goes to U's column j, where the St_U diagonal
            # (in [-1, 0] now) must stay below +1 after the flip
            diag = torch.diagonal(u_last[: u_last.shape[1]])
            bottom, top, sign_v, _ = frame_params_from_frame(v_first, reduced=False, flip=diag > -1 + 1e-6)
            bottom_u, _, _, _ = frame_params_from_frame(u_last * sign_v, reduced=True, rotate=False)
            u_params.append((bottom_u, None))
        v_params.insert(0, (bottom, top))
        cores = tuple(CoreFactors(b, t) for b, t in u_params + v_params)
        fitted = self._held_projections(mat, cores)
        if self.learned:  # gain = max|fitted| and max|s| = 1, so gain * s = fitted
            scale = fitted.abs().max()
            spectrum = fitted / scale.clamp_min(torch.finfo(fitted.dtype).tiny)
        else:  # g > 0: the chain's sign is in its frames
            scale, spectrum = (fitted.mean() if fitted.mean() > 0 else s.mean()), None
        self.gain = scale.to(dtype=weight.dtype, device=weight.device)
        out = ChainFactors(spectrum, cores).flat()
        return tuple(t.to(dtype=weight.dtype, device=weight.device).contiguous() for t in out)

    def _held_projections(self, mat: Tensor, cores: tuple) -> Tensor:
        """``u'_i^T W v'_i`` ``(r,)`` for ``W = mat`` (``(d_out, d_in)``, float64) and the frames
        the chain's ``cores`` hold, ``U'`` and ``V'``: the spectrum that fits ``W`` best on them
        (their mean, for a fixed spectrum). Where the TT ranks truncate ``U_r`` / ``V_r``,
        ``U' != U_r`` and ``S_r`` on ``U'``, ``V'`` can be worse than a zero weight; elsewhere
        ``U' = U_r`` (up to rounding) and this is ``S_r`` with the frames' signs."""
        u_held, v_held = contract_chain(self.layout, [householder_frame(c.bottom, c.top) for c in cores])
        return (u_held * (mat @ v_held)).sum(0)  # <W, u'_i v'_i^T>, the frames orthonormal

    def _orthogonal_sign(self) -> float:
        """Determinant sign of every ``W / g`` a square full-rank fixed-spectrum chain holds:
        that of the chain whose reflectors are all ``e_j`` (every frame ``-E``)."""
        frames = [-torch.eye(core.rows, core.cols, dtype=torch.float64) for core in self.layout.cores]
        return float(torch.linalg.det(chain_weight(self.layout, frames, None)).sign())

    @staticmethod
    def _reduce_last(frame: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate a frame into St_U form: ``(frame @ P, P)``."""
        rotated = st_u_gauge(frame)
        return rotated, frame.transpose(0, 1) @ rotated

    @staticmethod
    def _sweep_u(u: Tensor, cores: list[CoreFrame]):
        """Left-to-right TT-SVD of ``u`` (``d_out x r``) into St_U frames (gauge-fixed).

        Returns the parameters of all but the last core and the last core's frame."""
        params, rest = [], u
        for core in cores[:-1]:
            rest = rest.reshape(core.rows, -1)
            left, sv, right = torch.linalg.svd(rest, full_matrices=False)
            frame = left[:, : core.cols]
            bottom, _, _, p = frame_params_from_frame(frame, reduced=True)
            params.append((bottom, None))
            rest = p.transpose(0, 1) @ (sv[: core.cols, None] * right[: core.cols])
        return params, _polar(rest.reshape(cores[-1].rows, cores[-1].cols))

    @staticmethod
    def _sweep_v(v: Tensor, cores: list[CoreFrame]):
        """Right-to-left TT-SVD of ``v^T`` (``r x d_in``) into transposed St_U frames.

        Returns the parameters of all but the first core (in chain order) and the first
        core's frame ``(n_1 R_1) x r``."""
        params, rest = [], v.transpose(0, 1)
        for core in reversed(cores[1:]):
            rest = rest.reshape(-1, core.rows)  # columns are (mode, right rank), row-major
            left, sv, right = torch.linalg.svd(rest, full_matrices=False)
            frame = right[: core.cols].transpose(0, 1)
            bottom, _, _, p = frame_params_from_frame(frame, reduced=True)
            params.insert(0, (bottom, None))
            rest = (left[:, : core.cols] * sv[: core.cols]) @ p
        first = cores[0]
        return params, _polar(rest.reshape(first.cols, first.rows).transpose(0, 1))
