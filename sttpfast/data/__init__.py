"""Datasets -> fastai ``DataLoaders`` over in-memory uint8 image tensors.

    from sttpfast.data import get_dls, dataset_info
    dls = get_dls("cifar10", data_dir="~/data", bs=128)      # dls.train, dls.valid
    xb, yb = dls.train.one_batch()                          # float32 (B,C,H,W), int64 (B,)
    dls.n_classes, dls.in_chans, dls.image_size             # what the learner builds the model from

The package, one concept per module (imports flow down this list, never up):

    errors.py      DatasetNotFound / DatasetCorrupt (ValueErrors: the CLI prints one line);
                   DataWarning (files read from elsewhere than --data-dir: said, not refused)
    registry.py    name -> DatasetSpec; the dataset names; torch-free
    readers/       one reader per on-disk format (idx, cifar, stl, imagefolder, digits), each
                   into ONE uint8 tensor (N, C, H, W) per split, kept in memory
    source.py      read from the data dir, or download (only on request, all or nothing)
    transforms.py  batched random crop + flip; exact per-channel statistics
    loaders.py     the in-memory fastai DataLoader: seeded shuffling/augmentation, rank sharding
    factory.py     get_dls, tying them together
    model_config.py  fit_dls_to_model: resize / normalize for a model's timm cfg

Nothing is ever downloaded unless ``download=True``. A missing dataset raises
:class:`DatasetNotFound` naming the exact files and paths expected; a truncated or corrupt file
raises :class:`DatasetCorrupt` (a subclass) naming the file. CIFAR's pickle batches are loaded
with a restricted unpickler, so a malicious "dataset" cannot run code. The normalization
statistics are computed exactly from the training images loaded (``dls.mean`` / ``dls.std``);
:func:`dataset_info` gives those of the full official training splits without loading anything.

Importing this package (and ``registry``) does not import torch: the names that need it are
loaded on first access, so ``sttpfast --help`` can list the datasets cheaply.
"""
from __future__ import annotations

from importlib import import_module

from sttpfast.data.errors import DatasetCorrupt, DatasetNotFound, DataWarning
from sttpfast.data.registry import DATASET_NAMES, DATASETS, DatasetSpec, dataset_info, default_data_dir

__all__ = [
    "get_dls", "dataset_info", "loader_throughput", "DATASETS", "DATASET_NAMES", "DatasetSpec",
    "DatasetNotFound", "DatasetCorrupt", "DataWarning", "InMemoryImageDataset", "InMemoryImageDL",
    "random_crop_flip", "channel_stats", "default_data_dir", "fit_dls_to_model",
]

# name -> module defining it; imported on first access (these modules import torch / fastai)
_TORCH_NAMES = {
    "get_dls": "sttpfast.data.factory",
    "loader_throughput": "sttpfast.data.loaders",
    "InMemoryImageDataset": "sttpfast.data.loaders",
    "InMemoryImageDL": "sttpfast.data.loaders",
    "random_crop_flip": "sttpfast.data.transforms",
    "channel_stats": "sttpfast.data.transforms",
    "fit_dls_to_model": "sttpfast.data.model_config",
}


def __getattr__(name: str):
    module = _TORCH_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'sttpfast.data' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_TORCH_NAMES))
