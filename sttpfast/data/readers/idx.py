"""MNIST / Fashion-MNIST: the four IDX files, each plain or gzipped.

An unsigned-byte IDX file is the magic ``0x0000 08 ndim``, ``ndim`` big-endian uint32 sizes,
then the bytes in row-major order. Fashion-MNIST is also found in Debian's
``dataset-fashion-mnist`` package location when it is not under the data dir.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sttpfast.data.errors import DatasetNotFound, corrupt
from sttpfast.data.readers.raw import RawDataset, Split

__all__ = ["read_idx", "read_mnist", "read_fashion_mnist", "IDX_FILES", "FASHION_CLASSES",
           "DEBIAN_FASHION_MNIST"]

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt: dataset-fashion-mnist


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file of ``ndim`` dimensions -> uint8 array of its shape."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise corrupt(path, f"cannot be decompressed ({type(e).__name__}: {e})") from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise corrupt(path, f"has only {len(raw)} bytes, shorter than an IDX header")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != 0x0800 | ndim:
        raise corrupt(path, f"has IDX magic 0x{magic:08x}, expected 0x{0x0800 | ndim:08x} "
                            f"(unsigned bytes, {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise corrupt(path, f"has {len(raw)} bytes but its header {dims} promises {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):  # plain first: faster to read
        if candidate.is_file():
            return candidate
    return None


def read_idx_dataset(name: str, dirs: Sequence[Path], classes: list[str]) -> RawDataset:
    """The first of ``dirs`` holding all four :data:`IDX_FILES` -> uint8 ``(N, 1, 28, 28)`` splits."""
    for directory in dirs:
        found = [_find_idx_file(directory, stem) for stem in IDX_FILES]
        if all(found):
            break
    else:
        raise DatasetNotFound(
            f"{name} not found: expected the IDX files {', '.join(IDX_FILES)} (each plain or .gz) "
            f"in one of: {', '.join(map(str, dirs))}.")
    splits = []
    for images_path, labels_path in (found[0:2], found[2:4]):
        images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
        if len(images) != len(labels):
            raise corrupt(labels_path, f"has {len(labels)} labels but {images_path.name} holds "
                                       f"{len(images)} images")
        if len(labels) and labels.max() >= len(classes):
            raise corrupt(labels_path, f"labels outside 0..{len(classes) - 1}")
        x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28)
        splits.append(Split(x, torch.from_numpy(labels.astype(np.int64))))
    return RawDataset(splits[0], splits[1], classes, source=directory)


def read_mnist(root: Path) -> RawDataset:
    """IDX files in ``root/mnist``, ``root/MNIST/raw`` (torchvision's layout) or ``root``."""
    return read_idx_dataset("mnist", [root / "mnist", root / "MNIST" / "raw", root],
                            [str(i) for i in range(10)])


def read_fashion_mnist(root: Path) -> RawDataset:
    """IDX files in ``root/fashion_mnist``, ``root/FashionMNIST/raw``, ``root`` or Debian's folder."""
    dirs = [root / "fashion_mnist", root / "FashionMNIST" / "raw", root, DEBIAN_FASHION_MNIST]
    return read_idx_dataset("fashion_mnist", dirs, list(FASHION_CLASSES))
