"""``get_dls``: a dataset name -> fastai ``DataLoaders`` over in-memory uint8 image tensors."""
from __future__ import annotations

import numbers
import os
import warnings

import torch
from fastai.torch_core import default_device
from torch import Tensor

from sttpfast.data.errors import DatasetNotFound, DataWarning
from sttpfast.data.loaders import InMemoryImageDataset, InMemoryImageDL
from sttpfast.data.readers.imagefolder import decode_images
from sttpfast.data.readers.raw import Split
from sttpfast.data.registry import DATA_DIR_ENV, DatasetSpec, data_root, resolve_dataset
from sttpfast.data.source import read_or_download
from sttpfast.data.inference import InMemoryDataLoaders
from sttpfast.data.transforms import channel_stats

__all__ = ["get_dls"]


def _subset_indices(n: int, k: int, generator: torch.Generator) -> Tensor:
    """The first ``k`` of a seeded permutation of ``range(n)``, sorted back into file order."""
    return torch.randperm(n, generator=generator)[: min(k, n)].sort().values


def _to_tensors(split: Split, spec: DatasetSpec) -> tuple[Tensor, Tensor]:
    if isinstance(split.x, Tensor):
        return split.x, split.y
    size = spec.image_size if isinstance(spec.image_size, tuple) else (spec.image_size,) * 2
    return decode_images(split.x, size, spec.in_chans), split.y


def get_dls(name: str, data_dir: str | os.PathLike | None = None, bs: int = 128,
            subset: int | None = None, download: bool = False, num_workers: int = 0,
            seed: int = 0, augment: bool = True, device: str | torch.device | None = None
            ) -> InMemoryDataLoaders:
    """Load dataset ``name`` into memory and wrap it in fastai ``DataLoaders``.

    Args:
        name: one of ``DATASETS`` (cifar10, cifar100, stl10, mnist, fashion_mnist, digits,
            tiny_imagenet) or ``imagefolder:PATH``.
        data_dir: folder holding the datasets; default ``$STTPFAST_DATA`` or ``~/data``.
        bs: batch size (training batches drop the incomplete last batch).
        subset: keep the first ``subset`` training images of a seeded shuffle, and
            ``min(subset, len(valid))`` validation images, for quick runs.
        download: fetch a missing dataset with torchvision (never done otherwise; all or
            nothing: a failed download leaves no file behind).
        num_workers: fastai worker processes (0 is usually fastest: the data are in memory).
        seed: seeds the subset choice, the shuffling and the augmentation.
        augment: random crop (+ flip for natural images) on the training loader.
        device: where batches are delivered; default fastai's ``default_device()``.

    Returns:
        fastai ``DataLoaders`` (:class:`InMemoryDataLoaders`: ``test_dl`` takes images as
        tensors, PIL images or files) whose ``train`` / ``valid`` yield ``(x float32 (B,C,H,W), y int64 (B,))``,
        with ``n_classes``, ``in_chans``, ``image_size``, ``dataset_name``, ``mean``, ``std``,
        ``c`` (= n_classes), ``vocab`` and ``source`` (the folder the files were read from)
        attached. Files found outside ``data_dir`` (Debian's system-wide Fashion-MNIST, where
        the folder given has none) are read with a :class:`DataWarning` naming both folders.

    Raises:
        ValueError: unknown ``name`` (the message lists the allowed names).
        DatasetNotFound: files missing (the message names them and their full paths), or the
            download failed (the message says what failed and where to put the files by hand).
        DatasetCorrupt: a file is truncated or malformed (the message names it).
    """
    def whole(value, least: int) -> bool:
        return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= least
    if not whole(bs, 1):
        raise ValueError(f"bs must be a positive integer, got {bs!r}")
    if subset is not None and not whole(subset, 1):
        raise ValueError(f"subset must be None or a positive integer, got {subset!r}")
    if not whole(seed, 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    root = data_root(data_dir)
    spec = resolve_dataset(name, root)
    given = f"data folder {root} (--data-dir, or data.data_dir in a config file)"
    if data_dir is not None and spec.files and root.exists() and not root.is_dir():
        raise DatasetNotFound(f"{given} is a file, not a folder: point --data-dir / ${DATA_DIR_ENV} at the "
                              f"folder holding {spec.folder}")
    if data_dir is not None and spec.files and not download and not root.is_dir():
        # refused, not passed over: Fashion-MNIST was read from the system package instead
        raise DatasetNotFound(f"{given} does not exist. {spec.download_hint}")
    raw = read_or_download(spec, root, download)
    if data_dir is not None and spec.files and raw.source is not None and not raw.source.is_relative_to(root):
        # Debian's system-wide Fashion-MNIST, found where the user's folder had no files
        warnings.warn(f"no {spec.name} files under {root} (--data-dir): read the copy in {raw.source}",
                      DataWarning, stacklevel=2)

    train, valid = raw.train, raw.valid
    if subset is not None:
        generator = torch.Generator().manual_seed(seed)
        train = train.select(_subset_indices(len(train), subset, generator))
        valid = valid.select(_subset_indices(len(valid), subset, generator))
    train_x, train_y = _to_tensors(train, spec)
    valid_x, valid_y = _to_tensors(valid, spec)
    mean, std = channel_stats(train_x)

    device = default_device() if device is None else torch.device(device)
    train_ds = InMemoryImageDataset(train_x, train_y, raw.classes)
    valid_ds = InMemoryImageDataset(valid_x, valid_y, raw.classes)
    common = dict(bs=bs, mean=mean, std=std, seed=seed, pad=spec.pad, flip=spec.flip,
                  num_workers=num_workers, device=device)
    # drop_last only when at least one full batch exists, so a tiny subset still trains.
    train_dl = InMemoryImageDL(train_ds, shuffle=True, drop_last=len(train_ds) >= bs,
                               augment=augment, **common)
    valid_dl = InMemoryImageDL(valid_ds, shuffle=False, drop_last=False, augment=False, **common)
    dls = InMemoryDataLoaders(train_dl, valid_dl, path=root, device=device)
    dls.n_classes = dls.c = len(raw.classes)  # = spec.n_classes for the official data
    dls.in_chans, dls.image_size, dls.dataset_name = spec.in_chans, spec.image_size, spec.name
    dls.mean, dls.std, dls.vocab, dls.source = mean, std, valid_ds.vocab, raw.source
    return dls
