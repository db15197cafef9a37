"""Weight parametrizations, one file each, and the registry of their names.

Importing this package registers every method (:mod:`sttpfast.params.registry`).
"""
from __future__ import annotations

from sttpfast.params.base import MatrixView, WeightParametrization
from sttpfast.params.svdp import SVDPConstant, SVDPLearned, SVDPPenalized
from sttpfast.params.sttp import STTPConstant, STTPLearned, STTPPenalized
from sttpfast.params.lowrank import LowRank
from sttpfast.params.cp import CPLayer, ReshapedCPLayer  # noqa: F401  (registers cp, rcp)
from sttpfast.params.tucker import TuckerLayer, ReshapedTuckerLayer  # noqa: F401  (registers tucker, rtk)
from sttpfast.params.ttkernel import TTLayer, ReshapedTTLayer  # noqa: F401  (registers tt, rtt)
from sttpfast.params.tr import TRLayer, ReshapedTRLayer  # noqa: F401  (registers tr, rtr)
from sttpfast.params.ht import HTLayer  # noqa: F401  (registers ht)
from sttpfast.params.baselines import DENSE, SPECTRAL_NORM  # noqa: F401  (registers dense, sn)
from sttpfast.params import attention  # noqa: F401  (registers attn-qk-ov, attn-qk-ov-proj)
from sttpfast.params.registry import Method, all_names, method, method_of, methods, resolve_method

__all__ = [
    "PARAMETRIZATIONS", "ALIASES", "BASELINES", "ALL_PARAMS", "resolve_param", "default_init",
    "MatrixView", "WeightParametrization", "LowRank", "Method", "method", "method_of", "methods",
    "SVDPConstant", "SVDPLearned", "SVDPPenalized", "STTPConstant", "STTPLearned", "STTPPenalized",
]

#: the project's parametrization classes (name -> class), from the registry
PARAMETRIZATIONS: dict[str, type[WeightParametrization]] = {
    name: entry.cls for name, entry in methods().items() if entry.cls is not None
}
#: short names -> canonical names (plain svdp / sttp mean the learned-spectrum -L form)
ALIASES = {alias: entry.name for entry in methods().values() for alias in entry.aliases}
#: methods that keep the full weight and take no rank
BASELINES = tuple(name for name, entry in methods().items() if not entry.compresses)
#: every accepted name (CLI choices, config validation)
ALL_PARAMS = all_names()


def resolve_param(name: str) -> str:
    """Canonical parametrization name, or a ValueError listing the allowed ones."""
    return resolve_method(name)


def default_init(param: str) -> str:
    """The paper's identity init for SVDP/STTP; spectral init for plain low rank (Khodak et al.)."""
    return method(param).default_init
