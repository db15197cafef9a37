"""sttpfast: compressed, spectrally controlled layers (STTP, SVDP and baselines) for timm models.

    import timm, sttpfast
    model = timm.create_model("wrn28_10", num_classes=10)
    report = sttpfast.parameterize(model, "sttp", rank=32)
    dense = sttpfast.densify(model)

Importing the package is cheap: the public names load on first use (PEP 562), so the
command line's ``--help`` never pays for torch. The architectures are in timm's registry
whatever the import order: at once when torch is loaded already, otherwise right after
timm's own import (``import sttpfast, timm``), on first use of any public name, or with
``import sttpfast.models``.
"""
import importlib
import importlib.abc
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


class _RegisterModelsAfterTimm(importlib.abc.MetaPathFinder):
    """Registers the architectures right after ``timm`` is imported (a post-import hook).

    ``import sttpfast`` must not load torch (the command line's start-up), yet
    ``import sttpfast, timm`` (isort's order) must find ``resnet20_cifar`` in timm's
    registry. This finder sits first on ``sys.meta_path`` until timm's import: it takes
    timm's own spec and makes its loader import ``sttpfast.models`` once timm has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # once, and the lookup below must not come back here
        spec = importlib.util.find_spec("timm")
        if spec is not None and spec.loader is not None:
            run_timm = spec.loader.exec_module

            def exec_module(module):
                run_timm(module)
                importlib.import_module("sttpfast.models")

            spec.loader.exec_module = exec_module  # this spec's own loader object: no one else's
        return spec


if "torch" in sys.modules or "timm" in sys.modules:  # loaded already: registering costs little
    importlib.import_module("sttpfast.models")
elif not any(isinstance(f, _RegisterModelsAfterTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterModelsAfterTimm())
