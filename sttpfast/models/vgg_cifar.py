"""VGG with batch norm for 32x32 inputs: ``vgg{11,13,16,19}_bn_cifar``.

The convolutional part of Simonyan & Zisserman's configurations with BN after every conv,
then global average pooling and one Linear classifier (the usual CIFAR variant).
"""
from __future__ import annotations

from timm.models import register_model
from torch import nn

from sttpfast.models._factory import ClassifierHeadMixin, build

__all__ = ["CifarVGG", "VGG_CONFIGS"]

VGG_CONFIGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class CifarVGG(ClassifierHeadMixin, nn.Module):
    """Input ``(B, in_chans, H, W)`` -> logits ``(B, num_classes)``."""

    def __init__(self, depth: int = 16, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        layers, c_in = [], in_chans
        for v in VGG_CONFIGS[depth]:
            if v == "M":
                # ceil_mode keeps inputs smaller than 32 px (e.g. 8x8 digits) valid
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.num_classes, self.num_features = num_classes, c_in
        self.fc = nn.Linear(c_in, num_classes)

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(x)


def _vgg(depth: int):
    name = f"vgg{depth}_bn_cifar"

    def entry(pretrained: bool = False, **kwargs):
        return build(CifarVGG, name, pretrained, dict(depth=depth), kwargs)

    entry.__name__, entry.__module__ = name, __name__
    entry.__doc__ = f"VGG-{depth} with batch norm for 32x32 images."
    return register_model(entry)


for _d in VGG_CONFIGS:
    globals()[f"vgg{_d}_bn_cifar"] = _vgg(_d)
