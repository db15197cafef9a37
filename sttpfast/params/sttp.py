"""STTP: the Spectral Tensor Train Parameterization (Obukhov et al., AISTATS 2021).

``W = U diag(s) V^T`` where ``U`` is reshaped to the prime modes of ``C_out`` and ``V``
to the prime modes of ``C_in`` followed by one mode of size ``kh*kw`` (1 for a 1x1 conv or
a Linear); both are tensor trains of Householder frames with TT ranks
``R_k = min(prod(modes left of k), prod(modes right of k), rank)``. The low rank lives in
the TT cores of the frames, so a larger SVD rank fits the same parameter budget.
Variants ``-c`` / ``-l`` / ``-r`` as for SVDP (see :mod:`sttpfast.params.chain`).
"""
from sttpfast.linalg.tt import prime_factors
from sttpfast.params.chain import SpectralChain

__all__ = ["STTPLearned", "STTPPenalized", "STTPConstant"]


class _STTP(SpectralChain):
    @classmethod
    def modes(cls, view):
        # a C_out of 1 (a Linear with one output) still needs one U-core
        return prime_factors(view.d_out) or [1], prime_factors(view.c_in) + [view.kernel]


class STTPLearned(_STTP):
    """Maps onto rank-``r`` matrices ``U diag(s) V^T`` with TT-structured orthonormal
    ``U``, ``V`` and ``max|s| = 1``."""

    name, aliases, learned, bounded = "sttp-l", ("sttp",), True, True


class STTPPenalized(STTPLearned):
    """``sttp-l`` whose spectrum the D-optimal penalty pushes towards 1."""

    name, aliases, penalty = "sttp-r", (), "d_optimal"


class STTPConstant(_STTP):
    """Maps onto ``U V^T`` with TT-structured orthonormal ``U``, ``V`` (all singular values 1)."""

    name, learned, bounded = "sttp-c", False, True
