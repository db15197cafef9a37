"""STL-10 (labeled splits): raw binaries, 96x96x3 per image, each channel stored column-major."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sttpfast.data.errors import corrupt
from sttpfast.data.readers.raw import RawDataset, Split, require_files

__all__ = ["read_stl10", "STL10_FOLDER", "STL10_CLASSES"]

STL10_FOLDER = "stl10_binary"
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
_IMAGE_BYTES = 3 * 96 * 96


def read_stl10_split(x_path: Path, y_path: Path) -> Split:
    """``*_X.bin`` + ``*_y.bin`` -> uint8 ``(N, 3, 96, 96)``, int64 ``(N,)`` with labels 0..9."""
    data = np.fromfile(x_path, dtype=np.uint8)
    if data.size == 0 or data.size % _IMAGE_BYTES:
        raise corrupt(x_path, f"has {data.size} bytes, not a positive multiple of 3*96*96 = {_IMAGE_BYTES}")
    labels = np.fromfile(y_path, dtype=np.uint8)
    n = data.size // _IMAGE_BYTES
    if labels.size != n:
        raise corrupt(y_path, f"has {labels.size} labels but {x_path.name} holds {n} images")
    if labels.min() < 1 or labels.max() > 10:
        raise corrupt(y_path, "labels outside 1..10")
    # The official binary stores each channel column-major (Matlab order): swap H and W.
    x = torch.from_numpy(data.reshape(n, 3, 96, 96).transpose(0, 1, 3, 2).copy())
    return Split(x, torch.from_numpy(labels.astype(np.int64) - 1))


def read_stl10(root: Path) -> RawDataset:
    """``root/stl10_binary/{train,test}_{X,y}.bin`` (the unlabeled split is not read)."""
    d = root / STL10_FOLDER
    require_files("stl10", [d / n for n in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")])
    return RawDataset(read_stl10_split(d / "train_X.bin", d / "train_y.bin"),
                      read_stl10_split(d / "test_X.bin", d / "test_y.bin"), list(STL10_CLASSES), source=d)
