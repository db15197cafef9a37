"""VGG with batch norm for 32x32 inputs: ``vgg{11,13,16,19}_bn_cifar``.

The convolutional part of Simonyan & Zisserman's configurations with BN after every conv,
then global average pooling and one Linear classifier (the usual CIFAR variant).
"""
from __future__ import annotations

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from sttpfast.models.builder import build_registered, cifar_cfg
from sttpfast.models.feature_chain import FeatureChainMixin
from sttpfast.models.head import ClassifierHeadMixin

__all__ = ["CifarVGG", "VGG_CONFIGS"]

VGG_CONFIGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class CifarVGG(FeatureChainMixin, ClassifierHeadMixin, nn.Module):
    """Input ``(B, in_chans, H, W)`` -> logits ``(B, num_classes)``.

    Feature levels: the ReLU before each max-pool (reductions 1 ... 16); ``forward_features``
    ends after the last max-pool (reduction 32). No dropout, no drop path.
    """

    def __init__(self, depth: int = 16, num_classes: int = 10, in_chans: int = 3, global_pool: str = "avg"):
        super().__init__()
        if depth not in VGG_CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth}")
        layers, c_in, self.feature_info, feature_ends = [], in_chans, [], []
        for v in VGG_CONFIGS[depth]:
            if v == "M":
                feature_ends.append(len(layers) - 1)
                # the features before each pooling (the ReLU just added)
                self.feature_info.append(dict(num_chs=c_in, reduction=2 ** len(self.feature_info),
                                              module=f"features.{len(layers) - 1}"))
                # ceil_mode keeps inputs smaller than 32 px (e.g. 8x8 digits) valid
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.init_feature_chain(feature_ends)  # positions in feature_chain()
        self.init_head(c_in, num_classes, global_pool)

    def feature_chain(self) -> list[nn.Module]:
        return list(self.features)

    def _truncate_chain(self, k: int) -> None:
        self.features = self.features[:k]

    def _prune_final_norm(self) -> None:
        pass  # no final norm

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups (timm's layer-wise LR decay): one group per layer of ``features``."""
        return dict(stem=r"^features\.0\.", blocks=r"^features\.(\d+)")

    def forward_features(self, x):
        """``(B, C, H, W) -> (B, 512, ceil(H / 32), ceil(W / 32))``."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self._forward_chain_checkpointed(x)
        return self.features(x)


default_cfgs = generate_default_cfgs({
    f"vgg{depth}_bn_cifar": cifar_cfg(first_conv="features.0", pool_size=(1, 1)) for depth in VGG_CONFIGS
})


def _create(variant: str, pretrained: bool, **kwargs) -> CifarVGG:
    return build_registered(CifarVGG, variant, pretrained, feature_cfg=dict(flatten_sequential=True), **kwargs)


@register_model
def vgg11_bn_cifar(pretrained: bool = False, **kwargs) -> CifarVGG:
    """VGG-11 with batch norm for 32x32 images."""
    model_args = dict(depth=11)
    return _create("vgg11_bn_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def vgg13_bn_cifar(pretrained: bool = False, **kwargs) -> CifarVGG:
    """VGG-13 with batch norm for 32x32 images."""
    model_args = dict(depth=13)
    return _create("vgg13_bn_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def vgg16_bn_cifar(pretrained: bool = False, **kwargs) -> CifarVGG:
    """VGG-16 with batch norm for 32x32 images."""
    model_args = dict(depth=16)
    return _create("vgg16_bn_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def vgg19_bn_cifar(pretrained: bool = False, **kwargs) -> CifarVGG:
    """VGG-19 with batch norm for 32x32 images."""
    model_args = dict(depth=19)
    return _create("vgg19_bn_cifar", pretrained, **dict(model_args, **kwargs))
