"""SNGAN ResNet generator and discriminator (Miyato et al. 2018), as used by the STTP paper.

``sngan_g32`` / ``sngan_d32``: CIFAR-10 (32 px). G: Linear z -> 4x4x256, three up-blocks
256 -> 256, BN, ReLU, conv3x3 -> 3, tanh. D (128 channels): an optimized first block,
a downsampling block, two plain blocks, ReLU, global sum pooling, Linear -> 1.
``sngan_g48`` / ``sngan_d48``: STL-10 (48 px). G: z -> 6x6x512, up-blocks 512 -> 256 ->
128 -> 64. D: 64, 128, 256, 512 with downsampling, a plain block 512 -> 1024.
Upsampling is bilinear, as in the paper's code.

The generator's first Linear is never parameterized (``default_param_exclude``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from sttpfast.models.builder import build_registered

__all__ = ["SNGANGenerator", "SNGANDiscriminator"]


def _init(conv: nn.Module, gain: float) -> nn.Module:
    nn.init.xavier_uniform_(conv.weight, gain)
    nn.init.zeros_(conv.bias)
    return conv


class _GBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(c_in), nn.BatchNorm2d(c_out)
        self.conv1 = _init(nn.Conv2d(c_in, c_out, 3, 1, 1), math.sqrt(2))
        self.conv2 = _init(nn.Conv2d(c_out, c_out, 3, 1, 1), math.sqrt(2))
        self.shortcut = _init(nn.Conv2d(c_in, c_out, 1), 1.0)

    @staticmethod
    def _up(x):
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x):
        y = self.conv1(self._up(F.relu(self.bn1(x))))
        y = self.conv2(F.relu(self.bn2(y)))
        return y + self.shortcut(self._up(x))


class SNGANGenerator(nn.Module):
    """``z (B, z_dim)`` -> images ``(B, in_chans, H, W)`` in ``[-1, 1]``."""

    default_param_exclude = ("l1",)

    def __init__(self, widths=(256, 256, 256, 256), bottom_width: int = 4, z_dim: int = 128,
                 in_chans: int = 3, num_classes: int = 0):
        super().__init__()
        self.z_dim, self.bottom_width, self.num_classes = z_dim, bottom_width, 0
        self.image_size = bottom_width * 2 ** (len(widths) - 1)
        self.l1 = _init(nn.Linear(z_dim, bottom_width**2 * widths[0]), 1.0)
        self.blocks = nn.Sequential(*[_GBlock(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.bn = nn.BatchNorm2d(widths[-1])
        self.conv_out = _init(nn.Conv2d(widths[-1], in_chans, 3, 1, 1), 1.0)

    def sample_z(self, n: int, device=None, generator=None) -> torch.Tensor:
        return torch.randn(n, self.z_dim, device=device, generator=generator)

    def forward(self, z):
        x = self.l1(z).view(z.shape[0], -1, self.bottom_width, self.bottom_width)
        x = self.blocks(x)
        return torch.tanh(self.conv_out(F.relu(self.bn(x))))


class _DBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, down: bool, optimized: bool = False):
        super().__init__()
        self.down, self.optimized = down, optimized
        self.conv1 = _init(nn.Conv2d(c_in, c_out, 3, 1, 1), math.sqrt(2))
        self.conv2 = _init(nn.Conv2d(c_out, c_out, 3, 1, 1), math.sqrt(2))
        learnable = optimized or down or c_in != c_out
        self.shortcut = _init(nn.Conv2d(c_in, c_out, 1), 1.0) if learnable else None

    def forward(self, x):
        # the optimized first block sees raw images: no ReLU before its first conv
        y = self.conv1(x if self.optimized else F.relu(x))
        y = self.conv2(F.relu(y))
        if self.down:
            y = F.avg_pool2d(y, 2)
        if self.shortcut is None:
            return y + x
        if self.optimized:  # pool, then conv (cheaper, same map)
            return y + self.shortcut(F.avg_pool2d(x, 2))
        s = self.shortcut(x)
        return y + (F.avg_pool2d(s, 2) if self.down else s)


class SNGANDiscriminator(nn.Module):
    """Images ``(B, in_chans, H, W)`` -> critic scores ``(B, num_classes)`` (``num_classes=1``)."""

    def __init__(self, widths=(128, 128, 128, 128), downs=(True, True, False, False), in_chans: int = 3,
                 num_classes: int = 1):
        super().__init__()
        self.num_classes = self.num_features = num_classes
        self.num_features = widths[-1]
        blocks = [_DBlock(in_chans, widths[0], downs[0], optimized=True)]
        blocks += [_DBlock(a, b, d) for a, b, d in zip(widths[:-1], widths[1:], downs[1:])]
        self.blocks = nn.Sequential(*blocks)
        self.fc = _init(nn.Linear(widths[-1], num_classes), 1.0)

    def forward_features(self, x):
        return F.relu(self.blocks(x)).sum(dim=(2, 3))  # global sum pooling

    def forward(self, x):
        return self.fc(self.forward_features(x))


def _gan_cfg(size: int, **overrides) -> dict:
    """Cfg of a GAN network for ``size`` px images in ``[-1, 1]`` (mean = std = 0.5). For a
    generator ``input_size`` is the size of the images it makes (the data it is trained on)."""
    return dict(dict(input_size=(3, size, size), crop_pct=1.0, interpolation="bilinear", mean=(0.5, 0.5, 0.5),
                     std=(0.5, 0.5, 0.5)), **overrides)


default_cfgs = generate_default_cfgs({
    "sngan_g32": _gan_cfg(32, num_classes=0),
    "sngan_g48": _gan_cfg(48, num_classes=0),
    # the critic's global sum pooling sees 8x8 (CIFAR) and 3x3 (STL-10) maps; at least one
    # pixel must be left after its 2 (4) halvings
    "sngan_d32": _gan_cfg(32, min_input_size=(3, 4, 4), pool_size=(8, 8), first_conv="blocks.0.conv1",
                          classifier="fc", num_classes=1),
    "sngan_d48": _gan_cfg(48, min_input_size=(3, 16, 16), pool_size=(3, 3), first_conv="blocks.0.conv1",
                          classifier="fc", num_classes=1),
})


@register_model
def sngan_g32(pretrained: bool = False, **kwargs) -> SNGANGenerator:
    """CIFAR-10 generator: z (128) -> 4x4x256, three up-blocks 256 -> 256, images 32x32."""
    model_args = dict(widths=(256, 256, 256, 256), bottom_width=4)
    return build_registered(SNGANGenerator, "sngan_g32", pretrained, **dict(model_args, **kwargs))


@register_model
def sngan_g48(pretrained: bool = False, **kwargs) -> SNGANGenerator:
    """STL-10 generator: z (128) -> 6x6x512, up-blocks 512 -> 256 -> 128 -> 64, images 48x48."""
    model_args = dict(widths=(512, 256, 128, 64), bottom_width=6)
    return build_registered(SNGANGenerator, "sngan_g48", pretrained, **dict(model_args, **kwargs))


@register_model
def sngan_d32(pretrained: bool = False, **kwargs) -> SNGANDiscriminator:
    """CIFAR-10 discriminator (128 channels): optimized block, a downsampling block, two plain blocks."""
    model_args = dict(widths=(128, 128, 128, 128), downs=(True, True, False, False))
    return build_registered(SNGANDiscriminator, "sngan_d32", pretrained, **dict(model_args, **kwargs))


@register_model
def sngan_d48(pretrained: bool = False, **kwargs) -> SNGANDiscriminator:
    """STL-10 discriminator: 64, 128, 256, 512 with downsampling, then a plain block 512 -> 1024."""
    model_args = dict(widths=(64, 128, 256, 512, 1024), downs=(True, True, True, True, False))
    return build_registered(SNGANDiscriminator, "sngan_d48", pretrained, **dict(model_args, **kwargs))
