"""Weight parametrizations, one file each, and the registry of their names."""
from __future__ import annotations

from sttpfast.params.base import MatrixView, WeightParametrization
from sttpfast.params.lowrank import LowRank
from sttpfast.params.sttp import STTPConstant, STTPLearned, STTPPenalized
from sttpfast.params.svdp import SVDPConstant, SVDPLearned, SVDPPenalized

__all__ = [
    "PARAMETRIZATIONS", "ALIASES", "BASELINES", "ALL_PARAMS", "resolve_param", "default_init",
    "MatrixView", "WeightParametrization", "LowRank",
    "SVDPConstant", "SVDPLearned", "SVDPPenalized", "STTPConstant", "STTPLearned", "STTPPenalized",
]

#: low-rank parametrizations, built by the project (name -> class)
PARAMETRIZATIONS: dict[str, type[WeightParametrization]] = {
    cls.name: cls
    for cls in (SVDPConstant, SVDPLearned, SVDPPenalized, STTPConstant, STTPLearned, STTPPenalized, LowRank)
}
#: short names: plain svdp / sttp mean the learned-spectrum (-L) form
ALIASES = {"svdp": "svdp-l", "sttp": "sttp-l"}
#: full-rank baselines: no-op, and PyTorch's own spectral_norm parametrization (SNGAN)
BASELINES = ("dense", "sn")
ALL_PARAMS = tuple(PARAMETRIZATIONS) + tuple(ALIASES) + BASELINES


def resolve_param(name: str) -> str:
    """Canonical parametrization name, or a ValueError listing the allowed ones."""
    key = str(name).lower()
    key = ALIASES.get(key, key)
    if key not in PARAMETRIZATIONS and key not in BASELINES:
        raise ValueError(f"unknown parameterization {name!r}; allowed: {', '.join(ALL_PARAMS)}")
    return key


def default_init(param: str) -> str:
    """The paper's identity init for SVDP/STTP; spectral init for plain low rank (Khodak et al.)."""
    return "spectral" if param == "lowrank" else "identity"
