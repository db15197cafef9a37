"""scikit-learn's bundled 8x8 digits, upsampled to 16x16: the zero-setup dataset (no files)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from sttpfast.data.readers.raw import RawDataset, Split

__all__ = ["read_digits"]

_SPLIT_SEED = 0  # fixed: the validation set never changes with the training seed


def read_digits(root: Path) -> RawDataset:
    """1797 images -> a fixed 80/20 split: uint8 ``(1438, 1, 16, 16)`` / ``(359, 1, 16, 16)``.

    ``root`` is ignored (the data ship with scikit-learn); it is taken like every reader's."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # (N, 64) values 0..16 -> [0, 255] -> bilinear 16x16 -> uint8 like every other dataset.
    x = torch.as_tensor(bunch.data, dtype=torch.float32).view(-1, 1, 8, 8) * (255.0 / 16.0)
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = x.round_().clamp_(0, 255).to(torch.uint8)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(_SPLIT_SEED))
    n_valid = len(y) // 5
    valid_idx, train_idx = perm[:n_valid].sort().values, perm[n_valid:].sort().values
    return RawDataset(Split(x[train_idx], y[train_idx]), Split(x[valid_idx], y[valid_idx]),
                      [str(i) for i in range(10)])
