"""SNGAN ResNet generator and discriminator (Miyato et al. 2018), as in the STTP paper's code.

``sngan_g32`` / ``sngan_d32``: CIFAR-10 (32 px). G (ngf 256): Linear z -> 4x4x256, three
up-blocks 256 -> 256, BN, ReLU, conv3x3 -> 3, tanh. D (ndf 128): an optimized first block
3 -> 128, a downsampling block and two plain blocks 128 -> 128, ReLU, global sum pooling,
Linear 128 -> 1 without bias.
``sngan_g48`` / ``sngan_d48``: STL-10 (48 px). G (ngf 512): z -> 6x6x512, up-blocks
512 -> 256 -> 128 -> 64. D (ndf 1024): optimized block 3 -> 64, downsampling blocks
64 -> 128 -> 256 -> 512, a plain block 512 -> 1024, Linear 1024 -> 1 without bias.

Block layout (what the paper's Z values are computed on):

- generator block ``c_in -> c_out``: BN, ReLU, upsample, conv3x3 c_in -> c_out, BN, ReLU,
  conv3x3 c_out -> c_out; shortcut: upsample, conv1x1 c_in -> c_out. Upsampling is bilinear.
- discriminator block ``c_in -> c_out`` (not the first): ReLU, conv3x3 c_in -> c_in, ReLU,
  conv3x3 c_in -> c_out, [avgpool]; shortcut: conv1x1 c_in -> c_out, [avgpool] when the block
  downsamples or changes width, else the identity. The first conv keeps the input width.
- optimized first discriminator block: conv3x3 c_in -> c_out, ReLU, conv3x3, avgpool;
  shortcut: avgpool, conv1x1 (it sees raw images: no ReLU before either path).

Every conv has a bias; weights are Xavier-uniform (gain sqrt(2) in the residual convs, 1 in
shortcuts, the generator's Linear and its output conv); biases keep PyTorch's default init,
as in the reference code. The generator's first Linear is never parameterized
(``default_param_exclude``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from sttpfast.models.builder import build_registered
from sttpfast.models.feature_chain import FeatureChainMixin

__all__ = ["SNGANGenerator", "SNGANDiscriminator", "SHORTCUT_INPUTS", "DISCRIMINATOR_POOLS"]

#: what the shortcut of a non-first discriminator block receives: ``"relu"`` (relu(x), the
#: reference code, whose first ReLU acts in place on the block's input) or ``"input"`` (x)
SHORTCUT_INPUTS = ("relu", "input")


def _xavier(layer: nn.Module, gain: float) -> nn.Module:
    """Xavier-uniform weight; the bias (if any) keeps PyTorch's default init, as in the reference."""
    nn.init.xavier_uniform_(layer.weight, gain)
    return layer


def _upsample(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C, 2H, 2W)``, bilinear (the paper's code)."""
    # a float factor: TorchScript's interpolate takes Optional[float]
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class _GBlock(nn.Module):
    """Upsampling generator block ``(B, c_in, H, W)`` -> ``(B, c_out, 2H, 2W)``."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(c_in), nn.BatchNorm2d(c_out)
        self.conv1 = _xavier(nn.Conv2d(c_in, c_out, 3, 1, 1), math.sqrt(2))
        self.conv2 = _xavier(nn.Conv2d(c_out, c_out, 3, 1, 1), math.sqrt(2))
        self.shortcut = _xavier(nn.Conv2d(c_in, c_out, 1), 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(_upsample(F.relu(self.bn1(x))))
        y = self.conv2(F.relu(self.bn2(y)))
        return y + self.shortcut(_upsample(x))


class SNGANGenerator(nn.Module):
    """``z (B, z_dim)`` -> images ``(B, in_chans, H, W)`` in ``[-1, 1]``, ``H = W = bottom_width * 2**blocks``.

    Not a classifier, so of timm's model contract it has: a pretrained cfg (``input_size`` is
    the size of the images it makes, ``mean``/``std`` 0.5: images in ``[-1, 1]``),
    ``num_classes = 0``, ``num_features`` (the width of the last map, before the output conv),
    ``group_matcher``, torch.jit.script and torch.fx. It has no classifier, no
    ``forward_features``/``forward_head`` and no ``features_only`` (its input is a latent
    vector, not an image).

    Args:
        widths: channels at the bottom, then after each up-block (``len(widths) - 1`` blocks).
        bottom_width: side of the first feature map (the Linear's output is reshaped to it).
        in_chans: channels of the images made (3; 1 for grey-scale data).
        num_classes: 0 only (the generator is unconditional).

    Raises:
        ValueError: ``num_classes`` other than 0.
    """

    default_param_exclude = ("l1",)

    def __init__(self, widths=(256, 256, 256, 256), bottom_width: int = 4, z_dim: int = 128,
                 in_chans: int = 3, num_classes: int = 0):
        super().__init__()
        if num_classes:
            raise ValueError(f"num_classes={num_classes}: the SNGAN generator is unconditional (num_classes=0)")
        _check_widths(widths)
        _check_positive("bottom_width", bottom_width)
        _check_positive("z_dim", z_dim)
        self.z_dim, self.bottom_width, self.num_classes = z_dim, bottom_width, 0
        self.num_features = widths[-1]
        self.image_size = bottom_width * 2 ** (len(widths) - 1)
        self.l1 = _xavier(nn.Linear(z_dim, bottom_width**2 * widths[0]), 1.0)
        self.blocks = nn.Sequential(*[_GBlock(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.bn = nn.BatchNorm2d(widths[-1])
        self.conv_out = _xavier(nn.Conv2d(widths[-1], in_chans, 3, 1, 1), 1.0)

    def sample_z(self, n: int, device=None, generator=None) -> torch.Tensor:
        """Standard normal latents ``(n, z_dim)``."""
        return torch.randn(n, self.z_dim, device=device, generator=generator)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups (timm's layer-wise LR decay): the Linear, each up-block, the output."""
        return dict(stem=r"^l1", blocks=[(r"^blocks\.(\d+)", None), (r"^bn|^conv_out", (99999,))])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, z_dim)`` -> ``(B, in_chans, H, W)``."""
        x = self.l1(z).view(z.shape[0], -1, self.bottom_width, self.bottom_width)
        x = self.blocks(x)
        return torch.tanh(self.conv_out(F.relu(self.bn(x))))


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_widths(widths) -> None:
    """Channel widths, one per block: positive ints (a 0 ended in xavier's ZeroDivisionError)."""
    if (isinstance(widths, (str, bytes)) or not hasattr(widths, "__len__") or not len(widths)
            or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths)):
        raise ValueError(f"widths must be positive integers, got {widths!r}")


class _DBlockOptimized(nn.Module):
    """First discriminator block, on raw images: ``(B, c_in, H, W)`` -> ``(B, c_out, H/2, W/2)``."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = _xavier(nn.Conv2d(c_in, c_out, 3, 1, 1), math.sqrt(2))
        self.conv2 = _xavier(nn.Conv2d(c_out, c_out, 3, 1, 1), math.sqrt(2))
        self.shortcut = _xavier(nn.Conv2d(c_in, c_out, 1), 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.avg_pool2d(self.conv2(F.relu(self.conv1(x))), 2)
        return y + self.shortcut(F.avg_pool2d(x, 2))  # pool, then conv (cheaper, same map)


class _DBlock(nn.Module):
    """Discriminator block ``(B, c_in, H, W)`` -> ``(B, c_out, H', W')`` (``H' = H/2`` when ``down``).

    The first conv keeps the input width (c_in -> c_in), the second changes it (c_in -> c_out).
    ``shortcut`` is a 1x1 conv c_in -> c_out when the block downsamples or changes width, else
    ``nn.Identity`` (a module, so that hooks can see what it receives). It is fed relu(x) or x
    by ``shortcut_sees`` (see :data:`SHORTCUT_INPUTS`).
    """

    def __init__(self, c_in: int, c_out: int, down: bool, shortcut_sees: str = "relu"):
        super().__init__()
        self.down, self.shortcut_sees = down, shortcut_sees
        self.conv1 = _xavier(nn.Conv2d(c_in, c_in, 3, 1, 1), math.sqrt(2))
        self.conv2 = _xavier(nn.Conv2d(c_in, c_out, 3, 1, 1), math.sqrt(2))
        learnable = down or c_in != c_out
        self.shortcut = _xavier(nn.Conv2d(c_in, c_out, 1), 1.0) if learnable else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(x)
        y = self.conv2(F.relu(self.conv1(h)))
        s = self.shortcut(h if self.shortcut_sees == "relu" else x)
        if self.down:
            y, s = F.avg_pool2d(y, 2), F.avg_pool2d(s, 2)
        return y + s


class _SumPool(nn.Module):
    """Global sum pooling ``(B, C, H, W)`` -> ``(B, C)`` (the critic's; ``flatten=False`` keeps the map)."""

    def __init__(self, flatten: bool = True):
        super().__init__()
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=(2, 3)) if self.flatten else x


#: the critic's pooling choices: ``"sum"`` (the reference) or ``""`` (none: the map itself)
DISCRIMINATOR_POOLS = ("sum", "")


class SNGANDiscriminator(FeatureChainMixin, nn.Module):
    """Images ``(B, in_chans, H, W)`` -> critic scores ``(B, num_classes)`` (``num_classes=1``).

    Of timm's model contract it has: a pretrained cfg, ``num_features``/``head_hidden_size``,
    ``forward_features`` (the blocks, then ReLU: ``(B, widths[-1], H', W')``) and
    ``forward_head`` (global sum pooling, then the bias-free Linear), ``get_classifier``/
    ``reset_classifier(num_classes, global_pool)``, ``feature_info`` and ``features_only``
    (one level per block; the last after the final ReLU), ``forward_intermediates``,
    ``prune_intermediate_layers``, ``set_grad_checkpointing``, ``group_matcher``,
    torch.jit.script and torch.fx. It has no dropout and no drop path.

    Args:
        widths: output channels of the optimized first block, then of each further block.
        downs: whether each block halves the resolution (the first block always does).
        in_chans: channels of the images (3; 1 for grey-scale data).
        num_classes: outputs of the final Linear (1: the critic's score; 0: pooled features).
        global_pool: ``"sum"`` (the reference) or ``""`` (no pooling; needs ``num_classes=0``).
        shortcut_sees: what the shortcut of every non-first block receives: ``"relu"``
            (relu(x), the default: the reference code's first ReLU acts in place on the block's
            input, so its shortcut sees the rectified input) or ``"input"`` (the raw input x,
            the textbook pre-activation block). The optimized first block has no ReLU before
            its shortcut, so this does not change it.

    Raises:
        ValueError: ``shortcut_sees`` not one of :data:`SHORTCUT_INPUTS`, ``global_pool`` not
            one of :data:`DISCRIMINATOR_POOLS`, ``global_pool=""`` with ``num_classes > 0``.
    """

    def __init__(self, widths=(128, 128, 128, 128), downs=(True, True, False, False), in_chans: int = 3,
                 num_classes: int = 1, global_pool: str = "sum", shortcut_sees: str = "relu"):
        super().__init__()
        if shortcut_sees not in SHORTCUT_INPUTS:
            raise ValueError(f"shortcut_sees={shortcut_sees!r}: expected one of {', '.join(SHORTCUT_INPUTS)}")
        _check_widths(widths)
        self.num_features = self.head_hidden_size = widths[-1]
        self.shortcut_sees = shortcut_sees
        blocks = [_DBlockOptimized(in_chans, widths[0])]
        blocks += [_DBlock(a, b, d, shortcut_sees) for a, b, d in zip(widths[:-1], widths[1:], downs[1:])]
        self.blocks = nn.Sequential(*blocks)
        self.act = nn.ReLU()
        reductions = [2 ** sum(downs[:i + 1]) for i in range(len(widths))]  # the first block always halves
        self.feature_info = [dict(num_chs=w, reduction=r, module=f"blocks.{i}")
                             for i, (w, r) in enumerate(zip(widths, reductions))]
        self.feature_info[-1]["module"] = "act"
        self.init_feature_chain(list(range(len(widths))))  # positions in feature_chain()
        self.reset_classifier(num_classes, global_pool)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new bias-free Linear ``num_features -> num_classes`` (``0``: none); ``global_pool``
        ``"sum"`` or ``""`` (no pooling, needs ``num_classes=0``), ``None`` keeps the current one."""
        if global_pool is None:
            global_pool = self.global_pool_type
        if global_pool not in DISCRIMINATOR_POOLS:
            raise ValueError(f"unknown global_pool {global_pool!r} for the SNGAN discriminator (use 'sum' or '')")
        if global_pool == "" and num_classes > 0:
            raise ValueError(f"global_pool='' (no pooling) needs num_classes=0, got num_classes={num_classes}")
        self.global_pool = _SumPool(flatten=global_pool == "sum")
        # no bias: the reference's critic
        self.fc = _xavier(nn.Linear(self.num_features, num_classes, bias=False), 1.0) if num_classes else nn.Identity()
        self.num_classes, self.global_pool_type = num_classes, global_pool

    def feature_chain(self) -> list[nn.Module]:
        return list(self.blocks)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)

    def _truncate_chain(self, k: int) -> None:
        self.blocks = self.blocks[:k]

    def _prune_final_norm(self) -> None:
        self.act = nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups (timm's layer-wise LR decay): the first block, then one per block."""
        return dict(stem=r"^blocks\.0\.", blocks=r"^blocks\.(\d+)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> ``(B, widths[-1], H', W')``: the blocks, then ReLU."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self._forward_chain_checkpointed(x)
        return self.act(self.blocks(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, widths[-1], H', W')`` -> ``(B, num_classes)``: global sum pooling, Linear
        (``(B, widths[-1])`` with ``pre_logits``)."""
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


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
    # both convs of the first block see the raw images (its shortcut too)
    "sngan_d32": _gan_cfg(32, min_input_size=(3, 4, 4), pool_size=(8, 8),
                          first_conv=("blocks.0.conv1", "blocks.0.shortcut"), classifier="fc", num_classes=1),
    "sngan_d48": _gan_cfg(48, min_input_size=(3, 16, 16), pool_size=(3, 3),
                          first_conv=("blocks.0.conv1", "blocks.0.shortcut"), classifier="fc", num_classes=1),
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
    return build_registered(SNGANDiscriminator, "sngan_d32", pretrained,
                            feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
                            **dict(model_args, **kwargs))


@register_model
def sngan_d48(pretrained: bool = False, **kwargs) -> SNGANDiscriminator:
    """STL-10 discriminator (ndf 1024, 10.14M parameters): 64, 128, 256, 512 with downsampling, then a
    plain block 512 -> 1024."""
    model_args = dict(widths=(64, 128, 256, 512, 1024), downs=(True, True, True, True, False))
    return build_registered(SNGANDiscriminator, "sngan_d48", pretrained,
                            feature_cfg=dict(out_indices=(0, 1, 2, 3, 4), flatten_sequential=True),
                            **dict(model_args, **kwargs))
