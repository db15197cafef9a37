"""The registry of weight parameterization methods: one entry per name, read by everything else.

A :class:`Method` says what a method is and what it offers: its aliases, the kind of rank
hyper-parameter it takes (an ``int`` today; the tensor-layer methods will add tuples and
trees), whether it has a learned spectrum, whether its spectral norm is bounded by
construction, which penalty goes with it, and how it is put on a layer. The CLI choices,
config validation (:func:`resolve_method`), surgery, the compression accounting, the
checkpoint specs and the callbacks all read it; none of them tests concrete classes.

The project's parametrization classes register themselves when they are defined (through
:class:`~sttpfast.params.base.WeightParametrization`'s ``__init_subclass__``); ``dense`` and
``sn`` (PyTorch's ``spectral_norm``) are registered in :mod:`sttpfast.params.baselines`.

A parametrization module on a layer is matched to its method by the attribute
``sttpfast_method`` (a class attribute of the project's classes, set on the instance for
``sn``), never by its class name.
"""
from __future__ import annotations

import difflib
import numbers

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

__all__ = [
    "Method", "METHOD_ATTR", "register_method", "methods", "method", "method_of", "resolve_method",
    "all_names",
]

#: the attribute of a parametrization module naming its registered method
METHOD_ATTR = "sttpfast_method"


@dataclass(frozen=True)
class Method:
    """One registered parameterization method.

    Attributes:
        name: canonical name (``"sttp-r"``).
        aliases: other names that resolve to it (``("sttp",)`` for ``sttp-l``).
        rank_kind: type of the rank hyper-parameter (``int``), or None when it takes none.
        learned_spectrum: the parametrization exposes a learned spectrum (``log_spectrum``).
        bounded: ``sigma_max`` is bounded by construction (ask :meth:`spectral_bound`).
        penalty: the training penalty that goes with it (``"d_optimal"``,
            ``"frobenius_decay"``) or None.
        compresses: it can have fewer degrees of freedom than the dense weight.
        default_init: ``"identity"`` or ``"spectral"``.
        spectral_init_note: what the spectral init costs, said before it starts when it is
            an iterative fit (CP's ALS); None: a closed form, nothing to say.
        apply: ``apply(module, rank, init)`` puts the method on ``module.weight``.
        count_dof: ``count_dof(shape, transposed, rank)`` free scalars of one weight.
        largest_useful_rank: ``(shape, transposed) -> int``, or None (no rank).
        cls: the parametrization class, when the project implements it.
        dtypes: the weight dtypes it can build (SVDP / STTP's frames: float32 and float64), or
            None: any.
        scope: ``"layer"``: put on any supported layer by ``parameterize`` (a ``--param``
            choice); ``"attention"``: put on the projections of an attention block as a whole
            by :func:`sttpfast.params.attention.parameterize_attention` (``--attention``), and
            found here only by name (checkpoint specs, the report).
    """

    name: str
    apply: Callable[[nn.Module, Any, str], None]
    count_dof: Callable[[tuple, bool, Any], int]
    aliases: tuple[str, ...] = ()
    rank_kind: type | None = int
    learned_spectrum: bool = False
    bounded: bool = False
    penalty: str | None = None
    compresses: bool = True
    default_init: str = "identity"
    spectral_init_note: str | None = None
    largest_useful_rank: Callable[[tuple, bool], int] | None = None
    cls: type | None = field(default=None, compare=False)
    dtypes: tuple | None = None
    scope: str = "layer"

    # -- rank, an opaque per-method hyper-parameter ----------------------------------------
    def normalize_rank(self, rank):
        """``rank`` in the method's canonical form (None: full rank / no rank), or a ValueError
        naming the method and the form it expects. Here: None or a positive int (numpy's too)."""
        if isinstance(rank, numbers.Integral) and not isinstance(rank, bool):
            rank = int(rank)
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
            raise ValueError(f"{self.name}: rank must be a positive integer, got {rank!r}")
        return rank

    def rank_to_spec(self, rank):
        """The rank as stored in a spec (JSON); None means full rank / no rank."""
        return rank

    def rank_from_spec(self, value):
        """Inverse of :meth:`rank_to_spec`, with a ValueError naming a bad value."""
        if value is None or self.rank_kind is None:
            return None
        if self.rank_kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{self.name}: rank in the spec must be an integer, got {value!r}")
        return value

    # -- what a parametrization on a layer offers ------------------------------------------
    def spectral_bound(self, p: nn.Module) -> float | None:
        """``sigma_max`` bound of the layer that ``p`` parametrizes, or None if unbounded."""
        if not self.bounded:
            return None
        bound = getattr(p, "spectral_bound", None)
        return float(bound()) if callable(bound) else 1.0


_METHODS: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register_method(entry: Method) -> Method:
    """Add ``entry``; a name or alias taken by another method is a ValueError."""
    for key in (entry.name, *entry.aliases):
        owner = _METHODS.get(key) or _METHODS.get(_ALIASES.get(key, ""))
        if owner is not None and owner.name != entry.name:
            raise ValueError(f"parameterization name {key!r} is already registered by {owner.name!r}")
    _METHODS[entry.name] = entry
    for alias in entry.aliases:
        _ALIASES[alias] = entry.name
    return entry


def methods(scope: str | None = "layer") -> dict[str, Method]:
    """``{name: Method}`` of ``scope`` (None: every scope) in registration order (a copy)."""
    return {k: m for k, m in _METHODS.items() if scope is None or m.scope == scope}


def all_names(scope: str | None = "layer") -> tuple[str, ...]:
    """Every accepted name of ``scope``: canonical names, then aliases."""
    names = methods(scope)
    return tuple(names) + tuple(a for a, n in _ALIASES.items() if n in names)


def resolve_method(name: str, scope: str | None = "layer") -> str:
    """Canonical name of ``name`` (case-insensitive, aliases resolved) among the methods of
    ``scope``, or a ValueError listing them."""
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in methods(scope):
        allowed = all_names(scope)
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ";"
        raise ValueError(f"unknown parameterization {name!r}{hint} allowed: {', '.join(allowed)}")
    return key


def method(name: str) -> Method:
    """The :class:`Method` registered under ``name`` or one of its aliases (any scope)."""
    return _METHODS[resolve_method(name, scope=None)]


def method_of(p: nn.Module | None) -> Method | None:
    """The method of a parametrization module found on a layer, or None (not one of ours)."""
    name = getattr(p, METHOD_ATTR, None)
    return _METHODS.get(name) if isinstance(name, str) else None
