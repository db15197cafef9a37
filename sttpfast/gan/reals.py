"""Real images as the GAN sees them: in ``[-1, 1]`` at the generator's resolution, dequantized.

The project's loaders deliver images normalized per channel (``(x/255 - mean) / std``);
the generator ends in ``tanh``, so real images are mapped back to ``[0, 1]`` with the
loader's own ``mean`` / ``std``, resized when the dataset's size differs from the
generator's output (digits are 16 px, the SNGAN presets make 32 or 48 px), then to
``[-1, 1]``, plus uniform noise in ``[-a, a]`` during training (the paper's
dequantization, ``a = 1/255``): without it D could tell reals by their 256 exact levels.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["to_gan_range"]


def to_gan_range(x: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None,
                 size: int | None = None, noise: float = 0.0,
                 generator: torch.Generator | None = None, shard: tuple[int, int] = (0, 1)) -> Tensor:
    """Normalized images ``(B, C, H, W)`` -> images in ``[-1, 1]`` ``(B, C, size, size)``.

    Args:
        x: a loader's batch, ``(x_01 - mean) / std`` per channel (``mean`` / ``std`` None: ``x``
            is already in ``[0, 1]``).
        size: the output side length; a different input size is resized bilinearly (with
            antialiasing when shrinking). None keeps the size.
        noise: half-width ``a`` of the uniform dequantization noise added after mapping to
            ``[-1, 1]`` (0 adds none); drawn from ``generator`` (on ``x``'s device).
        shard: ``(rank, world)`` of a multi-process run whose ``world`` processes hold equal
            parts of one global batch: the noise of the whole batch is drawn and rank's rows
            kept, so the processes together add what one process would.
    """
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
        std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
        x = x * std_t + mean_t
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < min(x.shape[-2:]))
    x = x * 2.0 - 1.0
    if noise > 0:
        rank, world = shard
        u = torch.rand((x.shape[0] * world, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
        u = u[rank * x.shape[0]:(rank + 1) * x.shape[0]]
        x = x + (u * 2.0 - 1.0) * noise
    return x
