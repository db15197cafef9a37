"""An offline feature extractor for IS / FID / KID: a classifier that sttpfast trains itself.

The standard metrics use torch-fidelity's InceptionV3, whose weights are downloaded on first
use. Where there is no network (and no weights file) the project can still measure sample
quality with a feature extractor it builds from the training data alone: a small classifier
(``resnet20_cifar`` by default) trained a few hundred steps on the GAN's own dataset. Its
pooled features (``pool``, ``(B, num_features)``) play the part of Inception's pool3 for
FID / KID, and its logits (``logits``, ``(B, num_classes)``) that of Inception's logits for IS.

Numbers made with it are *not* Inception FID: they are comparable only with numbers made
by the same extractor file. The extractor therefore has its own name,
``sttpfast-<arch>-<dataset>`` (e.g. ``sttpfast-resnet20-digits``), and the metrics callback
reports ``fid_sttpfast-resnet20-digits`` etc. instead of ``fid``.

    path = train_offline_extractor(dls, "runs/gan1/extractor.safetensors", steps=300)
    name = register_offline_extractor(path)        # torch-fidelity knows it by this name
    torch_fidelity.calculate_metrics(input1=..., input2=..., fid=True, feature_extractor=name,
                                     feature_extractor_weights_path=str(path))

The file is a safetensors state dict of the classifier, with everything needed to rebuild
and feed it (arch, model kwargs, classes, channels, image size, normalization) in its
metadata, so a run folder's extractor can be reused without the dataset.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from sttpfast.atomic import write_beside

__all__ = ["OfflineFeatureExtractor", "train_offline_extractor", "register_offline_extractor",
           "extractor_name", "offline_extractor_name", "read_extractor_metadata", "FEATURES", "DEFAULT_ARCH"]

#: the features the offline extractor provides, in ``forward``'s order
FEATURES = ("pool", "logits")
DEFAULT_ARCH = "resnet20_cifar"
_FORMAT = "sttpfast-feature-extractor-1"


def extractor_name(arch: str, dataset: str) -> str:
    """``sttpfast-<arch without _cifar>-<dataset>``: the torch-fidelity name and metric suffix."""
    short = arch[: -len("_cifar")] if arch.endswith("_cifar") else arch
    return f"sttpfast-{short}-{dataset}".replace("/", "-").replace(":", "-")


def offline_extractor_name(dls, arch: str = DEFAULT_ARCH) -> str:
    """The name :func:`train_offline_extractor` gives a classifier ``arch`` trained on ``dls``
    (known before it is trained)."""
    return extractor_name(arch, str(getattr(dls, "dataset_name", "data")))


def read_extractor_metadata(path: str | Path) -> dict:
    """The metadata of an extractor file (a ValueError names a missing or foreign file)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"offline extractor file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path} is not a safetensors file: {err}") from None
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is not an sttpfast feature extractor (no '{_FORMAT}' metadata)")
    return {"name": meta["name"], "arch": meta["arch"], "model_kwargs": json.loads(meta["model_kwargs"]),
            "num_classes": int(meta["num_classes"]), "in_chans": int(meta["in_chans"]),
            "image_size": int(meta["image_size"]), "mean": json.loads(meta["mean"]),
            "std": json.loads(meta["std"]), "dataset": meta["dataset"],
            "valid_accuracy": float(meta["valid_accuracy"]), "steps": int(meta["steps"])}


def _build_classifier(meta: dict) -> torch.nn.Module:
    from sttpfast.models import create_model

    return create_model(meta["arch"], num_classes=meta["num_classes"], in_chans=meta["in_chans"],
                        **meta["model_kwargs"])


class OfflineFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor around an sttpfast classifier file.

    torch-fidelity builds it as ``cls(name, features_list, **calculate_metrics_kwargs)``; the
    classifier comes from ``feature_extractor_weights_path`` (a file written by
    :func:`train_offline_extractor`), whose recorded name must equal ``name``.

    ``forward(x uint8 (B, 3, H, W))`` returns the requested features in ``features_list``
    order: ``pool`` float64 ``(B, num_features)``, ``logits`` float64 ``(B, num_classes)``.
    Inputs are mapped as the classifier saw its training data: grayscale datasets take the
    channel mean (exact for replicated gray images), images are resized to the classifier's
    size, then normalized with its dataset's mean / std.
    """

    def __init__(self, name: str, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"the offline extractor {name!r} needs feature_extractor_weights_path "
                             "(its .safetensors file)")
        meta = read_extractor_metadata(feature_extractor_weights_path)
        if meta["name"] != name:
            raise ValueError(f"{feature_extractor_weights_path} holds extractor {meta['name']!r}, not {name!r}")
        self.meta = meta
        self.model = _build_classifier(meta)
        self.model.load_state_dict(load_file(str(feature_extractor_weights_path)))
        self.model.eval()
        shape = (1, -1, 1, 1)
        self.register_buffer("mean", torch.tensor(meta["mean"], dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(meta["std"], dtype=torch.float32).view(shape))

    @staticmethod
    def get_provided_features_list():
        return FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def prepare(self, x: Tensor) -> Tensor:
        """uint8 ``(B, 3, H, W)`` -> the classifier's normalized input ``(B, in_chans, S, S)``."""
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        x = x.float() / 255.0
        if self.meta["in_chans"] == 1:
            x = x.mean(dim=1, keepdim=True)
        size = self.meta["image_size"]
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=size < min(x.shape[-2:]))
        return (x - self.mean) / self.std

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        pooled = self.model.forward_head(self.model.forward_features(self.prepare(x)), pre_logits=True)
        features = {"pool": pooled, "logits": self.model.get_classifier()(pooled)}
        return tuple(features[name].double() for name in self.features_list)


def register_offline_extractor(path: str | Path) -> str:
    """Register the extractor file ``path`` with torch-fidelity; returns its name (idempotent)."""
    name = read_extractor_metadata(path)["name"]
    if FEATURE_EXTRACTORS_REGISTRY.get(name) is not OfflineFeatureExtractor:
        if name in FEATURE_EXTRACTORS_REGISTRY:
            raise ValueError(f"feature extractor name {name!r} is already taken in torch-fidelity")
        register_feature_extractor(name, OfflineFeatureExtractor)
    return name


@contextlib.contextmanager
def _alone(learn):
    """Let one process of several train ``learn`` by itself (the main process trains the
    extractor): no collective the other processes do not join. NaNGuard all-reduces its flag
    when a process group exists (removed), and fastai gathers every batch's values over the
    processes (``maybe_gather``, in ``to_detach`` and the smoothed loss) whenever its
    ``num_distrib()``, read from ``WORLD_SIZE``, is above 1 (set to 1 for the fit)."""
    from sttpfast.callbacks.guards import NaNGuard

    learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, NaNGuard)])
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield learn
    finally:
        if saved is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = saved


def train_offline_extractor(dls, path: str | Path, arch: str = DEFAULT_ARCH, steps: int = 300,
                            lr: float = 5e-3, model_kwargs: dict | None = None, seed: int = 0,
                            overwrite: bool = False) -> Path:
    """Train a classifier on ``dls`` (sttpfast's loaders) and save it as an extractor file.

    Args:
        dls: ``get_dls(...)`` of the GAN's dataset (``dataset_name``, ``n_classes``,
            ``in_chans``, ``image_size``, ``mean``, ``std`` attached).
        path: the ``.safetensors`` file to write. An existing extractor file is the cache:
            it is returned as is (unless ``overwrite``) when it was made for the same
            dataset and arch, and refused otherwise.
        arch, model_kwargs: the classifier (any sttpfast / timm classifier with
            ``forward_features`` / ``forward_head``).
        steps, lr: Adam with a one-cycle schedule for ``steps`` optimizer steps.
        seed: seeds the weight init.
    Returns the path. Its metadata records the validation accuracy reached.
    """
    from sttpfast.learner import fit, spectral_learner

    path = Path(path)
    dataset = str(getattr(dls, "dataset_name", "data"))
    name = offline_extractor_name(dls, arch)
    if path.is_file() and not overwrite:
        meta = read_extractor_metadata(path)
        if meta["name"] != name:
            raise ValueError(f"{path} holds extractor {meta['name']!r}, not {name!r} (pass overwrite=True)")
        return path
    if int(steps) < 1:
        raise ValueError(f"steps must be a positive number of optimizer steps, got {steps!r}")
    # the caller's (a GAN run's) random streams are left as they were: the global one and its
    # loaders' shuffling / augmentation, else the GAN would train on other batches with metrics
    loaders = [dl for dl in (dls.train, dls.valid) if hasattr(dl, "rng_state")]
    states = [dl.rng_state() for dl in loaders]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            learn = spectral_learner(dls, arch, param="dense", opt="adam", lr=lr, wd=0.0,
                                     model_kwargs=dict(model_kwargs or {}), run_dir=path.parent, cbs=[])
            with _alone(learn), learn.no_bar(), learn.no_logging():
                fit(learn, steps=int(steps), lr=lr)
                accuracy = float(learn.validate()[1])
        finally:
            for dl, state in zip(loaders, states):
                dl.set_rng_state(state)
    model = learn.model.eval()
    meta = {"format": _FORMAT, "name": name, "arch": arch, "model_kwargs": json.dumps(dict(model_kwargs or {})),
            "num_classes": str(dls.n_classes), "in_chans": str(dls.in_chans), "image_size": str(dls.image_size),
            "mean": json.dumps(list(dls.train.mean)), "std": json.dumps(list(dls.train.std)),
            "dataset": dataset, "valid_accuracy": repr(accuracy), "steps": str(int(steps))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # a crash never leaves a half-written cache; the file gets open()'s mode like the run's others
    return write_beside(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
