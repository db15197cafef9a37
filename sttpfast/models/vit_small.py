"""Small Vision Transformers for 28 px (Fashion-MNIST, MNIST) and 32 px (CIFAR) images.

timm's own ``VisionTransformer`` with 4x4 patches: a 32 px image is 8x8 = 64 tokens (49 at
28 px), where the ImageNet ViTs' 16x16 patches would leave 4 tokens. Widths and depths are
timm's tiny (192, 3 heads) and small (384, 6 heads) ViTs; the depth is 6 (half of timm's
12: small images have fewer tokens to mix, and CPU runs stay short). The cfgs tell the
truth: input size, the mean / std of the dataset each is meant for, no weights.

    model = sttpfast.create_model("vit_tiny_p4_32")               # CIFAR-10, (3, 32, 32)
    model = sttpfast.create_model("vit_tiny_p4_28")               # Fashion-MNIST, (1, 28, 28)
"""
from __future__ import annotations

from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from sttpfast.models.builder import CIFAR_MEAN, CIFAR_STD, build_registered

__all__ = ["vit_tiny_p4_32", "vit_small_p4_32", "vit_tiny_p4_28", "vit_small_p4_28"]

# Fashion-MNIST training-split statistics (sttpfast.data recomputes them from the data it loads)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)


def _cfg(size: int, chans: int, mean, std) -> dict:
    return dict(input_size=(chans, size, size), pool_size=None, crop_pct=1.0, interpolation="bicubic",
                fixed_input_size=True, mean=mean, std=std, first_conv="patch_embed.proj", classifier="head",
                num_classes=10, license="apache-2.0")


default_cfgs = generate_default_cfgs({
    "vit_tiny_p4_32": _cfg(32, 3, CIFAR_MEAN, CIFAR_STD),
    "vit_small_p4_32": _cfg(32, 3, CIFAR_MEAN, CIFAR_STD),
    "vit_tiny_p4_28": _cfg(28, 1, FASHION_MEAN, FASHION_STD),
    "vit_small_p4_28": _cfg(28, 1, FASHION_MEAN, FASHION_STD),
})


def _create(variant: str, pretrained: bool, size: int, chans: int, **kwargs) -> VisionTransformer:
    """timm's ``VisionTransformer`` through timm's builder (cfg, ``features_only``)."""
    kwargs = dict(dict(img_size=size, in_chans=chans, patch_size=4, num_classes=10, depth=6), **kwargs)
    return build_registered(VisionTransformer, variant, pretrained,
                            feature_cfg=dict(out_indices=kwargs.pop("out_indices", 3), feature_cls="getter"),
                            **kwargs)


@register_model
def vit_tiny_p4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Tiny/4 for 32x32 RGB images: width 192, 3 heads, depth 6 (2.7M parameters)."""
    return _create("vit_tiny_p4_32", pretrained, 32, 3, **dict(dict(embed_dim=192, num_heads=3), **kwargs))


@register_model
def vit_small_p4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Small/4 for 32x32 RGB images: width 384, 6 heads, depth 6 (10.7M parameters)."""
    return _create("vit_small_p4_32", pretrained, 32, 3, **dict(dict(embed_dim=384, num_heads=6), **kwargs))


@register_model
def vit_tiny_p4_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Tiny/4 for 28x28 grey-scale images (Fashion-MNIST): width 192, 3 heads, depth 6."""
    return _create("vit_tiny_p4_28", pretrained, 28, 1, **dict(dict(embed_dim=192, num_heads=3), **kwargs))


@register_model
def vit_small_p4_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Small/4 for 28x28 grey-scale images (Fashion-MNIST): width 384, 6 heads, depth 6."""
    return _create("vit_small_p4_28", pretrained, 28, 1, **dict(dict(embed_dim=384, num_heads=6), **kwargs))
