"""Common ground of the tensor-layer parametrizations (CP, Tucker, TT, TR, HT and reshaped variants).

A weight in natural order ``(C_out, C_in, *kernel)`` is viewed as a tensor of *modes*:

* plain: ``(C_out, C_in, *spatial)`` with spatial sizes of 1 dropped (a Linear, a 1x1
  conv: ``(out, in)``, a 2-way tensor);
* reshaped (``reshaped = True``): each channel count split into ``RESHAPE_MODES``
  balanced factors, ``(o_1, o_2, i_1, i_2, *spatial)`` (row-major, so ``C_out = o_1 o_2``).
  A channel count that does not split (1 or a prime) cannot be reshaped: such a layer is
  skipped with a warning (it stays dense and counts at its dense size) or refused with a
  ValueError, per :func:`unrepresentable_policy` (default ``"skip"``).

The rank is each method's own hyper-parameter (an int, or a tuple of per-bond / per-mode /
per-node ranks); ``requested_rank`` keeps what was asked for (it goes into the spec as a
list), ``ranks`` the per-bond values after capping, ``rank`` the largest of them (an int,
for reports). The default init is ``spectral``: ``right_inverse`` decomposes the layer's
weight (fresh or pretrained) in float64.
"""
from __future__ import annotations

import math
import numbers
import warnings
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from sttpfast.linalg.tt import prime_factors
from sttpfast.params.base import MatrixView, WeightParametrization
from sttpfast.params.factorized import install_factorized_forward
from sttpfast.params.registry import Method, register_method

__all__ = [
    "TensorLayer", "TensorMethod", "Unrepresentable", "RESHAPE_MODES", "balanced_factors",
    "unrepresentable_policy", "set_unrepresentable_policy", "current_unrepresentable_policy",
]

#: number of modes each channel count is split into by the reshaped variants
RESHAPE_MODES = 2
_POLICY = {"unrepresentable": "skip"}
_POLICIES = ("skip", "error")


class Unrepresentable(ValueError):
    """The method cannot represent a layer of this shape (a reshaped variant on a prime channel count)."""


def set_unrepresentable_policy(policy: str) -> None:
    """``"skip"`` (warn, leave the layer dense) or ``"error"`` (a ValueError naming the layer)."""
    if policy not in _POLICIES:
        raise ValueError(f"unknown policy {policy!r} for layers a method cannot represent; allowed: "
                         f"{', '.join(_POLICIES)}")
    _POLICY["unrepresentable"] = policy


def current_unrepresentable_policy() -> str:
    """The policy in force: ``"skip"`` (the default) or ``"error"``."""
    return _POLICY["unrepresentable"]


@contextmanager
def unrepresentable_policy(policy: str):
    """Context manager form of :func:`set_unrepresentable_policy`."""
    old = _POLICY["unrepresentable"]
    set_unrepresentable_policy(policy)
    try:
        yield
    finally:
        _POLICY["unrepresentable"] = old


def balanced_factors(n: int, parts: int) -> list[int]:
    """``n`` as ``parts`` factors, largest first, near-equal by a greedy rule: the primes, largest
    first, each onto the currently smallest part. Not always the most equal split (72 gives
    [12, 6], not [9, 8]); a reshaped layer's modes, and so its checkpoints, follow this rule, so
    it stays. ``Unrepresentable`` if ``n`` has fewer than ``parts`` prime factors."""
    primes = prime_factors(n)
    if len(primes) < parts:
        raise Unrepresentable(f"channel count {n} cannot be split into {parts} factors "
                              f"({'prime' if len(primes) == 1 else 'too small'})")
    buckets = [1] * parts
    for p in sorted(primes, reverse=True):
        buckets[buckets.index(min(buckets))] *= p
    return sorted(buckets, reverse=True)


class TensorMethod(Method):
    """Registry entry of a tensor-layer method: the rank may be an int or a tuple (a JSON list)."""

    def normalize_rank(self, rank):
        return self.cls.normalize_rank(rank)

    def rank_to_spec(self, rank):
        return list(rank) if isinstance(rank, tuple) else rank

    def rank_from_spec(self, value):
        if value is None:
            return None
        if isinstance(value, list):
            value = tuple(value)
        return self.cls.normalize_rank(value)


def _is_positive_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x > 0


def _ints(rank):
    """numpy's integers as Python's (a spec is JSON): ``np.int64(4)`` -> 4, tuples entry-wise."""
    return tuple(int(r) for r in rank) if isinstance(rank, (tuple, list)) else int(rank)


def check_chain_bonds(name: str, rank, modes, bonds: list[int], names: list[str | None]) -> None:
    """ValueError for a bond more than its core can use given its neighbour: a core
    ``(bonds[k], n_k, bonds[k+1])`` has rank at most ``bonds[k] n_k`` on its right bond and
    ``n_k bonds[k+1]`` on its left; the rest of such a bond stays zero with a zero gradient for
    good. ``bonds``: the chain's ``len(modes) + 1`` bonds (a ring repeats its first); ``names``:
    each bond's name (None: fixed at 1, checked by the per-bond caps)."""
    for k, n in enumerate(modes):
        left, right = bonds[k], bonds[k + 1]
        core = f"({left}, {n}, {right})"
        if names[k] and names[k + 1] and right > left * n:
            raise ValueError(f"{name}: rank {rank!r}: {names[k + 1]} = {right} is more than the core {core} can use "
                             f"(at most {left} x {n} = {left * n} from {names[k]} = {left})")
        if names[k] and names[k + 1] and left > n * right:
            raise ValueError(f"{name}: rank {rank!r}: {names[k]} = {left} is more than the core {core} can use "
                             f"(at most {n} x {right} = {n * right} from {names[k + 1]} = {right})")


class TensorLayer(WeightParametrization):
    """Base of the tensor-layer parametrizations (see the module docstring).

    Subclasses define ``name``, ``reshaped``, ``rank_kind`` and the format:
    ``bond_caps(modes)`` (the largest useful value of every rank entry),
    ``factor_shapes(modes, ranks)``, ``assemble(modes, ranks, factors) -> tensor (modes)``
    and ``decompose_tensor(tensor, ranks) -> factors``.
    """

    reshaped: bool = False
    rank_kind: type = int
    default_init = "spectral"
    #: said before a spectral init that is an iterative fit (see ``Method.spectral_init_note``)
    spectral_init_note: str | None = None
    #: how the layer runs its input: "auto" (FLOP estimate), "factorized", "materialized"
    forward_mode: str = "auto"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)  # registers a plain Method ...
        if "name" in cls.__dict__:  # ... which this entry replaces (tuple ranks, specs as lists)
            register_method(TensorMethod(
                name=cls.name, aliases=tuple(cls.aliases), rank_kind=cls.rank_kind, learned_spectrum=False,
                bounded=False, penalty=cls.penalty, default_init=cls.default_init,
                spectral_init_note=cls.spectral_init_note, apply=cls.apply_to,
                count_dof=cls.count_dof, largest_useful_rank=cls.largest_useful_rank, cls=cls))

    # -- modes and ranks ------------------------------------------------------------------
    @classmethod
    def modes_of(cls, view: MatrixView) -> tuple[int, ...]:
        """The tensor modes of the weight (``Unrepresentable`` if the layout cannot hold it)."""
        spatial = [k for k in view.natural[2:] if k > 1]
        if not cls.reshaped:
            return (view.d_out, view.c_in, *spatial)
        out = balanced_factors(view.d_out, RESHAPE_MODES)
        inp = balanced_factors(view.c_in, RESHAPE_MODES)
        return (*out, *inp, *spatial)

    @classmethod
    def bond_caps(cls, modes: tuple[int, ...]) -> list[int]:
        raise NotImplementedError

    @classmethod
    def full_ranks(cls, modes: tuple[int, ...]) -> list[int]:
        """The ranks of ``rank=None``, which hold any tensor of ``modes`` exactly (here every
        entry at its cap; not always the smallest that do: CP's cap is a bound)."""
        return cls.bond_caps(modes)

    @classmethod
    def check_bonds(cls, modes: tuple[int, ...], rank: tuple, ranks: list[int]) -> None:
        """ValueError for a tuple ``rank`` (entries ``ranks``, each within its cap) whose entries
        do not fit together (a chain's neighbouring bonds); here none."""

    @classmethod
    def rank_entries(cls, modes: tuple[int, ...]) -> list[str]:
        """Names of the rank entries of a layer with ``modes`` (for messages): ``R_1, R_2...``."""
        return [f"R_{k + 1}" for k in range(len(cls.bond_caps(modes)))]

    @classmethod
    def normalize_rank(cls, rank):
        """None, a positive int, or (for tuple ranks) a tuple of positive ints; else ValueError."""
        if rank is None:
            return rank
        if _is_positive_int(rank):
            return _ints(rank)
        if isinstance(rank, (tuple, list)) and cls.rank_kind is tuple and rank and all(map(_is_positive_int, rank)):
            return _ints(rank)
        kind = "a positive integer" + (" or a tuple of positive integers" if cls.rank_kind is tuple else "")
        raise ValueError(f"{cls.name}: rank must be {kind}, got {rank!r}")

    @classmethod
    def capped_ranks(cls, modes: tuple[int, ...], rank) -> list[int]:
        """Every rank entry of the format, capped at its largest useful value."""
        caps = cls.bond_caps(modes)
        rank = cls.normalize_rank(rank)
        if rank is None:
            return list(cls.full_ranks(modes))
        if isinstance(rank, int):
            return [min(rank, c) for c in caps]
        if len(rank) != len(caps):
            raise ValueError(f"{cls.name}: rank {rank!r} has {len(rank)} entries; a layer with modes "
                             f"{modes} needs {len(caps)}: ({', '.join(cls.rank_entries(modes))}) "
                             "(or one int for all)")
        over = [(r, c) for r, c in zip(rank, caps) if r > c]
        if over:
            raise ValueError(f"{cls.name}: rank {rank!r} is too large for modes {modes}: the largest "
                             f"useful ranks are {tuple(caps)}")
        cls.check_bonds(modes, rank, list(rank))
        return list(rank)

    @classmethod
    def _modes_or_none(cls, shape, transposed):
        view = MatrixView(shape, transposed)
        try:
            return view, cls.modes_of(view)
        except Unrepresentable:
            if _POLICY["unrepresentable"] == "error":
                raise
            return view, None

    @classmethod
    def count_dof(cls, shape, transposed, rank) -> int:
        view, modes = cls._modes_or_none(shape, transposed)
        if modes is None:  # skipped: the layer stays dense
            return math.prod(view.shape)
        ranks = cls.capped_ranks(modes, rank)
        return sum(math.prod(s) for s in cls.factor_shapes(modes, ranks))

    @classmethod
    def largest_useful_rank(cls, shape, transposed=False) -> int:
        _, modes = cls._modes_or_none(shape, transposed)
        return 1 if modes is None else max(cls.full_ranks(modes))

    @classmethod
    def apply_to(cls, module: nn.Module, rank=None, init: str = "spectral") -> None:
        """Register on ``module.weight``; a layer the method cannot represent is skipped with a
        warning or refused, per :func:`unrepresentable_policy`."""
        shape = tuple(module.weight.shape)
        try:
            cls.modes_of(MatrixView(shape, isinstance(module, _TRANSPOSED)))
        except Unrepresentable as err:
            if _POLICY["unrepresentable"] == "error":
                raise
            warnings.warn(f"{cls.name} cannot represent a weight of shape {shape} ({err}); the layer stays "
                          "dense (unrepresentable_policy('error') refuses instead)", stacklevel=3)
            return
        super().apply_to(module, rank, init)
        install_factorized_forward(module)

    # -- the parametrization ----------------------------------------------------------------
    def __init__(self, shape, transposed: bool = False, rank=None, init: str = "spectral"):
        super().__init__(shape, transposed, None, init)
        self.modes = self.modes_of(self.view)
        self.requested_rank = self.normalize_rank(rank)
        self.ranks = self.capped_ranks(self.modes, self.requested_rank)
        self.rank = max(self.ranks)

    @property
    def dof(self) -> int:
        return sum(math.prod(s) for s in self.factor_shapes(self.modes, self.ranks))

    def spec(self) -> dict:
        rank = list(self.requested_rank) if isinstance(self.requested_rank, tuple) else self.requested_rank
        return {"param": self.name, "rank": rank, "shape": list(self.view.shape)}

    def extra_repr(self) -> str:
        return f"{self.view.shape}, modes={self.modes}, ranks={tuple(self.ranks)}, dof={self.dof}"

    def forward(self, *factors: Tensor) -> Tensor:
        return self.view.from_matrix(self.assemble(self.modes, self.ranks, list(factors)))

    @torch.no_grad()
    def clip_sigma_max(self, factors: tuple[Tensor, ...], c: float) -> None:
        """Scale the ``k`` factors in place by ``(c / sigma_max)^(1/k)`` if ``sigma_max(W) > c``
        (exact, of the ``(d_out, d_in)`` matrix): every format here is linear in each factor, so
        ``W`` scales by ``c / sigma_max`` and the factors keep their balance (SpectralNormBound)."""
        exact = [f.to(torch.promote_types(f.dtype, torch.float32)) for f in factors]  # float32 at least
        matrix = self.assemble(self.modes, self.ranks, exact).reshape(self.view.d_out, self.view.d_in)
        sigma = float(torch.linalg.matrix_norm(matrix, ord=2))
        if sigma > c:
            scale = (c / sigma) ** (1.0 / len(factors))
            for f in factors:
                f.mul_(scale)

    def decompose(self, weight: Tensor) -> tuple[Tensor, ...]:
        tensor = self.view.to_matrix(weight.detach()).to(torch.float64).reshape(self.modes)
        factors = self.decompose_tensor(tensor, self.ranks)
        return tuple(f.to(dtype=weight.dtype, device=weight.device).contiguous() for f in factors)

    def identity_factors(self, dtype=torch.float32, device=None) -> tuple[Tensor, ...]:
        """Placeholders of the right shapes (``eye`` over the first dim): what a checkpoint load
        overwrites. Training starts from the spectral init (the default), not from these, except
        with ``init="identity"`` or an all-zero weight."""
        return tuple(torch.eye(s[0], math.prod(s[1:]), dtype=dtype, device=device).reshape(s)
                     for s in self.factor_shapes(self.modes, self.ranks))

    # -- to implement -----------------------------------------------------------------------
    @classmethod
    def factor_shapes(cls, modes, ranks) -> list[tuple[int, ...]]:
        raise NotImplementedError

    @classmethod
    def assemble(cls, modes, ranks, factors: list[Tensor]) -> Tensor:
        raise NotImplementedError

    @classmethod
    def decompose_tensor(cls, tensor: Tensor, ranks: list[int]) -> list[Tensor]:
        raise NotImplementedError


_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
