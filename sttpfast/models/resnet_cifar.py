"""CIFAR ResNets (He et al. 2016, section 4.2): ``resnet{20,32,44,56,110}_cifar``.

A 3x3 stem with 16 channels, three stages of ``(depth - 2) / 6`` basic blocks with
16, 32, 64 channels, 1x1 conv + BN shortcuts where the shape changes (option B).
"""
from __future__ import annotations

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from sttpfast.models.builder import build_registered, cifar_cfg
from sttpfast.models.feature_chain import FeatureChainMixin
from sttpfast.models.head import ClassifierHeadMixin

__all__ = ["CifarResNet"]


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class CifarResNet(FeatureChainMixin, ClassifierHeadMixin, nn.Module):
    """Input ``(B, in_chans, H, W)`` -> logits ``(B, num_classes)``.

    Feature levels: the stem, then the end of each of the three stages (the blocks are one flat
    ``blocks`` sequence). The architecture has no dropout and no drop path.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, base_width: int = 16,
                 global_pool: str = "avg"):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        widths = [base_width, 2 * base_width, 4 * base_width]
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c_in = [], widths[0]
        for g, w in enumerate(widths):
            for i in range(n):
                blocks.append(_BasicBlock(c_in, w, 2 if (i == 0 and g > 0) else 1))
                c_in = w
        self.blocks = nn.Sequential(*blocks)
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="stem.2")] + [
            dict(num_chs=w, reduction=2**g, module=f"blocks.{(g + 1) * n - 1}") for g, w in enumerate(widths)]
        self.init_feature_chain([0] + [(g + 1) * n for g in range(len(widths))])  # positions in feature_chain()
        self.init_head(widths[-1], num_classes, global_pool)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def feature_chain(self) -> list[nn.Module]:
        return [self.stem, *self.blocks]

    def _truncate_chain(self, k: int) -> None:
        self.blocks = self.blocks[:k - 1]

    def _prune_final_norm(self) -> None:
        pass  # post-activation blocks: no final norm

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups (timm's layer-wise LR decay): the stem, then one group per block."""
        return dict(stem=r"^stem", blocks=r"^blocks\.(\d+)")

    def forward_features(self, x):
        """``(B, C, H, W) -> (B, 4 * base_width, H / 4, W / 4)``."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self._forward_chain_checkpointed(x)
        return self.blocks(self.stem(x))


default_cfgs = generate_default_cfgs({
    f"resnet{depth}_cifar": cifar_cfg(first_conv="stem.0", pool_size=(8, 8)) for depth in (20, 32, 44, 56, 110)
})


def _create(variant: str, pretrained: bool, **kwargs) -> CifarResNet:
    return build_registered(CifarResNet, variant, pretrained,
                            feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True), **kwargs)


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for 32x32 images (He et al. 2016, 0.27M parameters)."""
    model_args = dict(depth=20)
    return _create("resnet20_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 for 32x32 images (He et al. 2016, 0.46M parameters)."""
    model_args = dict(depth=32)
    return _create("resnet32_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet44_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-44 for 32x32 images (He et al. 2016, 0.66M parameters)."""
    model_args = dict(depth=44)
    return _create("resnet44_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for 32x32 images (He et al. 2016, 0.85M parameters)."""
    model_args = dict(depth=56)
    return _create("resnet56_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-110 for 32x32 images (He et al. 2016, 1.7M parameters)."""
    model_args = dict(depth=110)
    return _create("resnet110_cifar", pretrained, **dict(model_args, **kwargs))
