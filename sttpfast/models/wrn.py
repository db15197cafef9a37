"""Wide residual networks (Zagoruyko & Komodakis 2016) for 32x32 inputs: ``wrn{depth}_{width}``.

Pre-activation blocks (BN-ReLU-conv3x3, twice), three groups of ``(depth - 4) / 6`` blocks
with widths ``16k, 32k, 64k``; 1x1 convs on the shortcut where the shape changes.
"""
from __future__ import annotations

import torch
from timm.models import register_model
from torch import nn

from sttpfast.models._factory import ClassifierHeadMixin, build

__all__ = ["WideResNet"]


class _PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, drop_rate: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.shortcut = None if (c_in == c_out and stride == 1) else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        o = torch.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.drop(torch.relu(self.bn2(y))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(ClassifierHeadMixin, nn.Module):
    """WRN-depth-width. Input ``(B, in_chans, H, W)`` -> logits ``(B, num_classes)``."""

    def __init__(self, depth: int = 28, width: int = 10, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.num_classes, self.num_features = num_classes, widths[-1]
        self.stem = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        blocks = []
        for g in range(3):
            for i in range(n):
                c_in = widths[g] if i == 0 else widths[g + 1]
                blocks.append(_PreActBlock(c_in, widths[g + 1], (1 if g == 0 else 2) if i == 0 else 1, drop_rate))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x):
        return torch.relu(self.bn(self.blocks(self.stem(x))))

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(x)


def _wrn(depth: int, width: int):
    name = f"wrn{depth}_{width}"

    def entry(pretrained: bool = False, **kwargs):
        return build(WideResNet, name, pretrained, dict(depth=depth, width=width), kwargs)

    entry.__name__ = name
    entry.__doc__ = f"WRN-{depth}-{width} for 32x32 images."
    entry.__module__ = __name__
    return register_model(entry)


for _d, _w in [(28, 10), (16, 4), (16, 8), (40, 4), (28, 2), (22, 8), (40, 2)]:
    globals()[f"wrn{_d}_{_w}"] = _wrn(_d, _w)
