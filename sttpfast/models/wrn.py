"""Wide residual networks for 32x32 inputs, in two layouts.

``wrn{depth}_{width}`` (e.g. ``wrn28_10``): the network of the STTP paper's reference code
(Obukhov et al., AISTATS 2021, Figure 7), which the paper's compression numbers Z are
computed on. It differs from Zagoruyko & Komodakis' WRN in four ways:

- every convolution (stem, block convs, 1x1 projections) has a bias;
- the block's stride sits on its *second* 3x3 conv (ZK: on the first);
- the 1x1 projection shortcut sees the block's raw input ``x`` (ZK: ``relu(bn1(x))``);
- dropout follows the first conv, before ``bn2`` (ZK: after ``relu(bn2(.))``), and the convs
  are initialized Xavier-uniform with gain sqrt(2) and zero biases (ZK: He-normal);
  the final BN uses ``momentum=0.9`` as in the reference (its running statistics follow
  the latest batches closely).

``wrn{depth}_{width}_zk``: the standard WRN of Zagoruyko & Komodakis (2016), bias-free.

Both: a 3x3 stem with 16 channels, three stages of ``(depth - 4) / 6`` pre-activation
blocks with widths ``16k, 32k, 64k`` (stride 2 at the start of stages 2 and 3), a 1x1
projection where the shape changes, final BN + ReLU, global pooling, Linear.
"""
from __future__ import annotations

import math

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from sttpfast.models.builder import build_registered, cifar_cfg
from sttpfast.models.feature_chain import FeatureChainMixin
from sttpfast.models.head import ClassifierHeadMixin

__all__ = ["WideResNet"]

LAYOUTS = ("sttp", "zk")


class ReferenceBlock(nn.Module):
    """The STTP reference code's block: ``x -> conv2(relu(bn2(drop(conv1(relu(bn1(x))))))) + sc(x)``.

    ``(B, c_in, H, W) -> (B, c_out, H / stride, W / stride)``; the stride is on ``conv2``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, drop_rate: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride, 1, bias=True)
        needs_projection = stride != 1 or c_in != c_out
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=True) if needs_projection else None

    def forward(self, x):
        y = self.drop(self.conv1(torch.relu(self.bn1(x))))
        y = self.conv2(torch.relu(self.bn2(y)))
        # the projection sees the raw input, not the pre-activated one
        return y + (x if self.shortcut is None else self.shortcut(x))


class ZKBlock(nn.Module):
    """Zagoruyko & Komodakis' block: ``o = relu(bn1(x))``, ``conv2(drop(relu(bn2(conv1(o))))) + sc(o)``.

    ``(B, c_in, H, W) -> (B, c_out, H / stride, W / stride)``; the stride is on ``conv1``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, drop_rate: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        needs_projection = stride != 1 or c_in != c_out
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False) if needs_projection else None

    def forward(self, x):
        o = torch.relu(self.bn1(x))
        y = self.conv2(self.drop(torch.relu(self.bn2(self.conv1(o)))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(FeatureChainMixin, ClassifierHeadMixin, nn.Module):
    """WRN-depth-width. Input ``(B, in_chans, H, W)`` -> logits ``(B, num_classes)``.

    ``layout="sttp"``: the STTP reference network; ``"zk"``: Zagoruyko & Komodakis'
    (see the module docstring for the differences). Features ``(B, 64 * width, H / 4, W / 4)``.
    ``drop_rate`` is the dropout inside each block (the architecture's); there is no drop path.
    Feature levels: stem, the three stages; the last one after the final BN + ReLU
    (``final_norm``, the module ``act``).
    """

    def __init__(self, depth: int = 28, width: int = 10, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0, global_pool: str = "avg", layout: str = "sttp"):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
        if layout not in LAYOUTS:
            raise ValueError(f"WRN layout must be one of {LAYOUTS}, got {layout!r}")
        reference = layout == "sttp"
        block, n = (ReferenceBlock if reference else ZKBlock), (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=reference)
        stages, c_in = [], widths[0]
        for g, c_out in enumerate(widths[1:]):
            first_stride = 1 if g == 0 else 2
            stage = []
            for i in range(n):
                stage.append(block(c_in, c_out, first_stride if i == 0 else 1, drop_rate))
                c_in = c_out
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        # the reference code writes momentum=0.9 here (Keras' convention in PyTorch's argument)
        self.bn = nn.BatchNorm2d(widths[-1], momentum=0.9 if reference else 0.1)
        self.act = nn.ReLU()  # a module (no parameters) so that features_only can hook the final map
        self.drop_rate = drop_rate
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="stem"),
                             dict(num_chs=widths[1], reduction=1, module="stages.0"),
                             dict(num_chs=widths[2], reduction=2, module="stages.1"),
                             dict(num_chs=widths[3], reduction=4, module="act")]
        self.init_feature_chain([0, 1, 2, 3])  # positions in feature_chain()
        self.init_head(widths[-1], num_classes, global_pool)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if reference:
                    nn.init.xavier_uniform_(m.weight, gain=math.sqrt(2))
                    nn.init.zeros_(m.bias)
                else:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def feature_chain(self) -> list[nn.Module]:
        return [self.stem, *self.stages]

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))

    def _truncate_chain(self, k: int) -> None:
        self.stages = self.stages[:k - 1]

    def _prune_final_norm(self) -> None:
        self.bn, self.act = nn.Identity(), nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups (timm's layer-wise LR decay): stem, then stages (coarse) or blocks."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.(\d+)", None),
                                                                             (r"^bn", (99999,))])

    def forward_features(self, x):
        """``(B, C, H, W) -> (B, 64 * width, H / 4, W / 4)`` (after the final BN + ReLU)."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self._forward_chain_checkpointed(x)
        return self.act(self.bn(self.stages(self.stem(x))))


default_cfgs = generate_default_cfgs({
    name: cifar_cfg(first_conv="stem", pool_size=(8, 8))
    for name in ("wrn28_10", "wrn16_4", "wrn16_8", "wrn40_4", "wrn28_2", "wrn22_8", "wrn40_2",
                 "wrn28_10_zk", "wrn16_4_zk", "wrn16_8_zk", "wrn40_4_zk", "wrn28_2_zk", "wrn22_8_zk",
                 "wrn40_2_zk")
})


def _create(variant: str, pretrained: bool, **kwargs) -> WideResNet:
    return build_registered(WideResNet, variant, pretrained,
                            feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True), **kwargs)


@register_model
def wrn28_10(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-10 of the STTP paper's reference code (36.5M parameters, convs with biases)."""
    model_args = dict(depth=28, width=10)
    return _create("wrn28_10", pretrained, **dict(model_args, **kwargs))


@register_model
def wrn16_4(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-16-4, STTP reference layout."""
    model_args = dict(depth=16, width=4)
    return _create("wrn16_4", pretrained, **dict(model_args, **kwargs))


@register_model
def wrn16_8(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-16-8, STTP reference layout."""
    model_args = dict(depth=16, width=8)
    return _create("wrn16_8", pretrained, **dict(model_args, **kwargs))


@register_model
def wrn40_4(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-40-4, STTP reference layout."""
    model_args = dict(depth=40, width=4)
    return _create("wrn40_4", pretrained, **dict(model_args, **kwargs))


@register_model
def wrn28_2(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-2, STTP reference layout."""
    model_args = dict(depth=28, width=2)
    return _create("wrn28_2", pretrained, **dict(model_args, **kwargs))


@register_model
def wrn22_8(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-22-8, STTP reference layout."""
    model_args = dict(depth=22, width=8)
    return _create("wrn22_8", pretrained, **dict(model_args, **kwargs))


@register_model
def wrn40_2(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-40-2, STTP reference layout."""
    model_args = dict(depth=40, width=2)
    return _create("wrn40_2", pretrained, **dict(model_args, **kwargs))


@register_model
def wrn28_10_zk(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-10 of Zagoruyko & Komodakis (36.5M parameters, bias-free convs)."""
    model_args = dict(depth=28, width=10, layout="zk")
    return _create("wrn28_10_zk", pretrained, **dict(model_args, **kwargs))


@register_model
def wrn16_4_zk(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-16-4 of Zagoruyko & Komodakis."""
    model_args = dict(depth=16, width=4, layout="zk")
    return _create("wrn16_4_zk", pretrained, **dict(model_args, **kwargs))


@register_model
def wrn16_8_zk(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-16-8 of Zagoruyko & Komodakis."""
    model_args = dict(depth=16, width=8, layout="zk")
    return _create("wrn16_8_zk", pretrained, **dict(model_args, **kwargs))


@register_model
def wrn40_4_zk(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-40-4 of Zagoruyko & Komodakis (8.9M parameters)."""
    model_args = dict(depth=40, width=4, layout="zk")
    return _create("wrn40_4_zk", pretrained, **dict(model_args, **kwargs))


@register_model
def wrn28_2_zk(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-2 of Zagoruyko & Komodakis."""
    model_args = dict(depth=28, width=2, layout="zk")
    return _create("wrn28_2_zk", pretrained, **dict(model_args, **kwargs))


@register_model
def wrn22_8_zk(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-22-8 of Zagoruyko & Komodakis."""
    model_args = dict(depth=22, width=8, layout="zk")
    return _create("wrn22_8_zk", pretrained, **dict(model_args, **kwargs))


@register_model
def wrn40_2_zk(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-40-2 of Zagoruyko & Komodakis."""
    model_args = dict(depth=40, width=2, layout="zk")
    return _create("wrn40_2_zk", pretrained, **dict(model_args, **kwargs))
