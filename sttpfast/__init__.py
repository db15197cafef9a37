"""sttpfast: compressed, spectrally controlled layers (STTP, SVDP and baselines) for timm models.

    import timm, sttpfast
    model = timm.create_model("wrn28_10", num_classes=10)
    report = sttpfast.parameterize(model, "sttp", rank=32)
    dense = sttpfast.densify(model)

Importing the package is cheap: the public names load on first use (PEP 562), so the
command line's ``--help`` never pays for torch. The architectures are registered in timm
when the package is imported after torch (``import timm, sttpfast``), on first use of any
public name, or with ``import sttpfast.models``.
"""
import importlib
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

# fastai decorates a few activations with torch.jit.script at import time, and torch >= 2.9
# warns about that on every command; the filter matches only that message from that module.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning,
                        module=r"torch\.jit\._script")

# public name -> the module that defines it
_PUBLIC = {
    "parameterize": "sttpfast.surgery",
    "compression_report": "sttpfast.surgery",
    "densify": "sttpfast.surgery",
    "parameterization_spec": "sttpfast.surgery",
    "rank_for_compression": "sttpfast.surgery",
    "CompressionReport": "sttpfast.surgery",
    "save_parameterized": "sttpfast.checkpoint",
    "load_parameterized": "sttpfast.checkpoint",
    "get_dls": "sttpfast.data",
    "spectral_learner": "sttpfast.learner",
    "fit": "sttpfast.learner",
    "create_model": "sttpfast.models",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        importlib.import_module("sttpfast.models")  # the architectures, registered in timm
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"sttpfast.{name}") is not None:
        return importlib.import_module(f"sttpfast.{name}")  # a subpackage: sttpfast.models, ...
    raise AttributeError(f"module 'sttpfast' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_PUBLIC])


if "torch" in sys.modules:  # torch is loaded already, so registering the models costs little
    importlib.import_module("sttpfast.models")
