"""SVDP: ``W = U diag(s) V^T`` with Householder frames ``U``, ``V`` (Obukhov et al. 2021).

Variants (``r = min(d_out, d_in, rank)``):

* ``svdp-l`` learned spectrum ``s = S / max|S|``, so ``|Sigma|_inf = 1``: the matricized
  weight has ``sigma_max = 1`` by construction (a Linear layer is 1-Lipschitz; a ``k x k``
  conv's operator norm is at most ``k`` times that); ``U``, ``V`` on the full Stiefel
  manifold. DOF ``r(d_out + d_in) - r^2``.
* ``svdp-r`` the same map, plus the D-optimal penalty ``-mean(log|s|)`` (a callback).
* ``svdp-c`` spectrum fixed to ``I``; ``U`` on ``St_U``, ``V`` on ``St``.
  DOF ``r(d_out + d_in) - r(3r + 1)/2``.

It is the spectral chain with a single core on each side of ``Sigma``.
"""
from sttpfast.params.chain import SpectralChain

__all__ = ["SVDPLearned", "SVDPPenalized", "SVDPConstant"]


class _SVDP(SpectralChain):
    @classmethod
    def modes(cls, view):
        return [view.d_out], [view.d_in]


class SVDPLearned(_SVDP):
    """Maps onto ``{U diag(s) V^T : U in St(d_out, r), V in St(d_in, r), max|s| = 1}``."""

    name, aliases, learned, bounded = "svdp-l", ("svdp",), True, True


class SVDPPenalized(SVDPLearned):
    """``svdp-l`` whose spectrum the D-optimal penalty pushes towards 1."""

    name, aliases, penalty = "svdp-r", (), "d_optimal"


class SVDPConstant(_SVDP):
    """Maps onto ``{U V^T : U in St_U(d_out, r), V in St(d_in, r)}`` (all singular values 1)."""

    name, learned, bounded = "svdp-c", False, True
