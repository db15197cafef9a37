"""sttpfast: compressed, spectrally controlled layers (STTP, SVDP and baselines) for timm models.

    import timm, sttpfast
    model = timm.create_model("wrn28_10", num_classes=10)
    report = sttpfast.parameterize(model, "sttp", rank=32)
    dense = sttpfast.densify(model)
"""
from sttpfast import models  # noqa: F401  (registers the architectures in timm)
from sttpfast.checkpoint import load_parameterized, save_parameterized
from sttpfast.data import get_dls
from sttpfast.learner import fit, spectral_learner
from sttpfast.surgery import (
    CompressionReport,
    compression_report,
    densify,
    parameterization_spec,
    parameterize,
    rank_for_compression,
)

__version__ = "0.1.0"
__all__ = [
    "parameterize", "compression_report", "densify", "parameterization_spec", "rank_for_compression",
    "CompressionReport", "save_parameterized", "load_parameterized", "get_dls", "spectral_learner", "fit",
    "__version__",
]
