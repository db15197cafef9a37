"""Batched image transforms: random crop + flip of a whole batch at once, and the exact
per-channel statistics the normalization uses."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["random_crop_flip", "channel_stats", "resize_images"]


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std, in [0, 1] units, of uint8 images ``(N, C, H, W)``.

    Uses a 256-bin histogram per channel: exact, float64 and no float copy of the data.
    """
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = counts.sum().clamp_min(1.0)
        mean = (counts * values).sum() / total
        var = (counts * values.square()).sum() / total - mean.square()
        means.append(float(mean))
        # A constant channel would divide by zero: floor the std at one grey level.
        stds.append(max(float(var.clamp_min(0.0).sqrt()), 1.0 / 255.0))
    return tuple(means), tuple(stds)


def random_crop_flip(x: Tensor, pad: int, flip: bool, generator: torch.Generator, draws: int | None = None,
                     start: int = 0) -> Tensor:
    """Random crop after ``pad`` pixels of zero padding, and random horizontal flip, per image.

    ``x``: ``(B, C, H, W)`` of any dtype on any device -> same shape, dtype and device. The random
    draws come from ``generator`` (a CPU generator), so the augmentation stream depends only on
    its seed. Vectorized: one ``torch.gather`` with a per-image index map, no Python loop.
    ``draws`` / ``start``: draw for a batch of ``draws`` images and take images ``start`` ..
    ``start + B - 1`` of it (a rank's part of the global batch: N processes then augment as
    one process with N times the batch does).
    """
    b, c, h, w = x.shape
    if b == 0 or (pad <= 0 and not flip):
        return x
    n = b if draws is None else draws
    if not 0 <= start <= n - b:
        raise ValueError(f"images {start}..{start + b - 1} are not in a batch of {n} draws")
    pad = max(pad, 0)
    part = slice(start, start + b)
    offset_y = torch.randint(0, 2 * pad + 1, (n,), generator=generator)[part]
    offset_x = torch.randint(0, 2 * pad + 1, (n,), generator=generator)[part]
    rows = offset_y[:, None] + torch.arange(h)  # (B, H): row of the padded image per output row
    cols = offset_x[:, None] + torch.arange(w)  # (B, W)
    if flip:
        flipped = torch.rand(n, generator=generator)[part] < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x  # zeros: black border, as torchvision
    width = w + 2 * pad
    index = (rows[:, :, None] * width + cols[:, None, :]).view(b, 1, h * w).to(x.device)
    out = torch.gather(padded.reshape(b, c, -1), 2, index.expand(b, c, h * w))
    return out.view(b, c, h, w)


#: the resampling modes that are antialiased when they shrink (see :func:`resize_images`)
SMOOTH_MODES = ("bilinear", "bicubic")


def resize_mode(interpolation: str) -> str:
    """The mode :func:`resize_images` applies for a timm cfg's ``interpolation`` (``bilinear``,
    ``bicubic``, ``nearest``, ``area``; any other name: bilinear)."""
    return interpolation if interpolation in ("nearest", "bilinear", "bicubic", "area") else "bilinear"


def resize_images(x: Tensor, size: int, interpolation: str = "bilinear") -> Tensor:
    """Float images ``(B, C, H, W)`` in uint8 units [0, 255] -> ``(B, C, size, size)``, same range.

    ``interpolation``: see :func:`resize_mode`. Antialiased when shrinking (:data:`SMOOTH_MODES`);
    bicubic overshoot is clipped back to [0, 255] so that the normalization sees the range it
    was computed on."""
    mode = resize_mode(interpolation)
    smooth = mode in SMOOTH_MODES
    shrink = size < max(x.shape[-2:])
    out = F.interpolate(x, size=(size, size), mode=mode, **({"align_corners": False, "antialias": shrink}
                                                            if smooth else {}))
    return out.clamp_(0.0, 255.0) if mode == "bicubic" else out
