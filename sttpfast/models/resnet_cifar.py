"""CIFAR ResNets (He et al. 2016, section 4.2): ``resnet{20,32,44,56,110}_cifar``.

A 3x3 stem with 16 channels, three stages of ``(depth - 2) / 6`` basic blocks with
16, 32, 64 channels, 1x1 conv + BN shortcuts where the shape changes (option B).
"""
from __future__ import annotations

import torch
from timm.models import register_model
from torch import nn

from sttpfast.models._factory import ClassifierHeadMixin, build

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


class CifarResNet(ClassifierHeadMixin, nn.Module):
    """Input ``(B, in_chans, H, W)`` -> logits ``(B, num_classes)``."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, base_width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        widths = [base_width, 2 * base_width, 4 * base_width]
        self.num_classes, self.num_features = num_classes, widths[-1]
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c_in = [], widths[0]
        for g, w in enumerate(widths):
            for i in range(n):
                blocks.append(_BasicBlock(c_in, w, 2 if (i == 0 and g > 0) else 1))
                c_in = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x):
        return self.blocks(self.stem(x))

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(x)


def _resnet(depth: int):
    name = f"resnet{depth}_cifar"

    def entry(pretrained: bool = False, **kwargs):
        return build(CifarResNet, name, pretrained, dict(depth=depth), kwargs)

    entry.__name__, entry.__module__ = name, __name__
    entry.__doc__ = f"ResNet-{depth} for 32x32 images (He et al. 2016)."
    return register_model(entry)


for _d in (20, 32, 44, 56, 110):
    globals()[f"resnet{_d}_cifar"] = _resnet(_d)
