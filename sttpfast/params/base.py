"""Common ground of the weight parametrizations: the matrix view of a layer's weight.

A weight of shape ``(C_out, C_in, *kernel)`` is matricized row-major as
``C_out x (C_in * prod(kernel))``. Transposed convolutions store ``(C_in, C_out, *kernel)``
and swap the first two dims first. Linear ``(out, in)`` and Embedding ``(num, dim)``
weights are matrices already.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sttpfast.params.registry import METHOD_ATTR, Method, register_method

__all__ = ["MatrixView", "WeightParametrization", "learned_spectrum", "check_rank", "SPECTRUM_FLOOR"]


class MatrixView:
    """The ``d_out x d_in`` matrix view of a weight tensor (and back)."""

    def __init__(self, shape: tuple[int, ...], transposed: bool = False):
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) < 2 or min(self.shape) < 1:
            raise ValueError(f"cannot parameterize a weight of shape {self.shape}: it needs at least two "
                             "dimensions, none of them of size 0")
        self.transposed = bool(transposed)
        dims = list(self.shape)
        if self.transposed:
            dims[0], dims[1] = dims[1], dims[0]
        self.natural = tuple(dims)  # (C_out, C_in, *kernel) in output-first order
        self.d_out = dims[0]
        self.c_in = dims[1] if len(dims) > 1 else 1
        self.kernel = math.prod(dims[2:])
        self.d_in = self.c_in * self.kernel

    def to_matrix(self, weight: Tensor) -> Tensor:
        """``weight`` in the layer's shape -> ``(d_out, d_in)``."""
        if self.transposed:
            weight = weight.transpose(0, 1)
        return weight.reshape(self.d_out, self.d_in)

    def from_matrix(self, matrix: Tensor) -> Tensor:
        """``(d_out, d_in)`` -> the layer's weight shape."""
        weight = matrix.reshape(self.natural)
        return weight.transpose(0, 1) if self.transposed else weight

    def __repr__(self) -> str:
        return f"MatrixView(shape={self.shape}, transposed={self.transposed})"


#: floor of ``max|S|`` in :func:`learned_spectrum` (the reference code's value): a raw spectrum
#: that training drives to zero gives ``s = S / 1e-8`` (still ``|s| <= 1``), never 0/0
SPECTRUM_FLOOR = 1e-8


def check_rank(rank) -> None:
    """None (full rank) or a positive int, else a ValueError naming the value."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")


def learned_spectrum(raw: Tensor) -> Tensor:
    """``s = S / max(max|S|, 1e-8)``: ``max|s| = 1`` exactly (``<= 1`` for a vanishing ``S``), ``(..., r)``."""
    return raw / raw.abs().amax(dim=-1, keepdim=True).clamp_min(SPECTRUM_FLOOR)


_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def empty_factors_as_buffers(module: nn.Module) -> None:
    """Register the empty factors behind ``module.weight`` (``(0, r)``: the ``St_U`` frame of a
    square TT core has nothing below its fixed top block) as buffers instead of parameters.

    They hold no degree of freedom, yet as parameters each costs a gradient accumulation, an
    optimizer update and a DDP / FSDP exclusion at every step, and they are many (resnet20_cifar
    sttp-r at rank 32: 152 of its 299 factors; efficientnet_b0 sttp-r at Z 10%: 499 of 1068).
    Checkpoints do not change: a buffer is saved under the same ``state_dict`` key, and the
    factors keep their order (``original0, original1, ...``; :func:`factors_of` reads both)."""
    plist = module.parametrizations.weight
    for name, tensor in list(plist._parameters.items()):
        if tensor is not None and tensor.numel() == 0:
            del plist._parameters[name]
            plist.register_buffer(name, tensor.detach())


class WeightParametrization(nn.Module):
    """Base of the project's parametrizations (used with ``torch.nn.utils.parametrize``).

    Subclasses implement ``forward(*factors) -> W``, ``right_inverse(W) -> factors``,
    ``identity_factors()``, ``count_dof`` and ``singular_values(*factors)``.

    A subclass that defines ``name`` registers itself (:mod:`sttpfast.params.registry`) with
    what its class attributes say: ``aliases``, ``learned`` (a learned spectrum),
    ``bounded`` (``sigma_max <= spectral_bound()`` by construction), ``penalty``,
    ``default_init``. ``rank`` is the SVD rank ``r`` actually used (capped by the matrix
    shape), ``requested_rank`` what the user asked for.
    """

    name: str = "?"
    aliases: tuple[str, ...] = ()
    #: a learned spectrum (``log_spectrum``), and whether its sigma_max is bounded by construction
    learned: bool = False
    bounded: bool = False
    #: the training penalty of the method: "d_optimal" (the -R variants), "frobenius_decay"
    penalty: str | None = None
    default_init: str = "identity"
    #: the weight dtypes the method can build (None: any)
    dtypes: tuple | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            return  # an abstract intermediate class (SpectralChain, _SVDP...)
        setattr(cls, METHOD_ATTR, cls.name)
        register_method(Method(
            name=cls.name, aliases=tuple(cls.aliases), rank_kind=int, learned_spectrum=cls.learned,
            bounded=cls.bounded, penalty=cls.penalty, default_init=cls.default_init,
            apply=cls.apply_to, count_dof=cls.count_dof, largest_useful_rank=cls.largest_useful_rank, cls=cls,
            dtypes=cls.dtypes,
        ))

    @property
    def penalized(self) -> bool:
        """Whether the D-optimal penalty applies (the -R variants)."""
        return self.penalty == "d_optimal"

    @classmethod
    def apply_to(cls, module: nn.Module, rank=None, init: str = "identity") -> None:
        """Register this parametrization on ``module.weight`` (``init``: identity or spectral)."""
        p = cls(tuple(module.weight.shape), isinstance(module, _TRANSPOSED), rank, init)
        p = p.to(module.weight)  # its buffers (the gain) follow the layer's device and dtype
        if init == "identity":
            with p.registering_identity():
                parametrize.register_parametrization(module, "weight", p, unsafe=True)
        else:
            parametrize.register_parametrization(module, "weight", p, unsafe=True)
        empty_factors_as_buffers(module)

    def spectral_bound(self) -> float | None:
        """``sigma_max(W)`` bound that holds by construction, or None."""
        return None

    def __init__(self, shape, transposed: bool = False, rank: int | None = None, init: str = "identity"):
        super().__init__()
        check_rank(rank)
        self.view = MatrixView(shape, transposed)
        self.requested_rank = rank
        cap = min(self.view.d_out, self.view.d_in)
        self.rank = cap if rank is None else min(int(rank), cap)
        self.init = init
        self._identity_on_register = False

    # -- spec -------------------------------------------------------------------------
    @property
    def dof(self) -> int:
        """Degrees of freedom: free scalars of the factors the optimizer sees."""
        return self.count_dof(self.view.shape, self.view.transposed, self.requested_rank)

    @classmethod
    def count_dof(cls, shape, transposed: bool, rank: int | None) -> int:
        raise NotImplementedError

    @classmethod
    def largest_useful_rank(cls, shape, transposed: bool = False) -> int:
        """The smallest rank that gives the same parametrization as full rank (``rank=None``)."""
        view = MatrixView(shape, transposed)
        return min(view.d_out, view.d_in)

    def extra_repr(self) -> str:
        return f"{self.view.shape}, rank={self.rank}, dof={self.dof}"

    # -- initialization -----------------------------------------------------------------
    @contextmanager
    def registering_identity(self):
        """While registering, make ``right_inverse`` return the identity factors instead of
        decomposing the layer's current weight (saves an SVD that would be thrown away)."""
        self._identity_on_register = True
        try:
            yield self
        finally:
            self._identity_on_register = False

    def right_inverse(self, weight: Tensor):
        if self._identity_on_register:
            self._identity_on_register = False
            return self.identity_factors(dtype=weight.dtype, device=weight.device)
        return self.decompose(weight)

    def decompose(self, weight: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def identity_factors(self, dtype=torch.float32, device=None) -> tuple[Tensor, ...]:
        raise NotImplementedError

    # -- spectrum -----------------------------------------------------------------------
    def singular_values(self, *factors: Tensor) -> Tensor:
        """Singular values of ``forward(*factors)`` in descending order, ``(rank,)``."""
        return torch.linalg.svdvals(self.view.to_matrix(self(*factors)))

    def log_spectrum(self, *factors: Tensor) -> Tensor:
        """``log|s|`` of the learned spectrum, for the D-optimal penalty (``(rank,)``)."""
        raise NotImplementedError(f"{self.name} has no learned spectrum")

    def raw_spectrum(self, *factors: Tensor) -> Tensor | None:
        """The raw learned spectrum ``S`` (``(rank,)``) where :meth:`log_spectrum` is
        ``log|learned_spectrum(S)|``, which lets the penalty batch layers of equal rank; None
        where it is computed otherwise."""
        return None
