"""Small Vision Transformers for 32 px (CIFAR) and 28 px (Fashion-MNIST, MNIST) images.

timm's own ``VisionTransformer`` with 4x4 patches: a 32 px image is 8x8 = 64 tokens (49 at
28 px), where the ImageNet ViTs' 16x16 patches would leave 4 tokens. Widths and depths are
timm's tiny (192, 3 heads) and small (384, 6 heads) ViTs; the depth is 6 (half of timm's
12: small images have fewer tokens to mix, and CPU runs stay short). The cfgs tell the
truth: input size, CIFAR-10's mean / std, no weights. The input size is fixed at
construction (``fixed_input_size``), so the factory builds them for the data: on
Fashion-MNIST a ``vit_tiny_p4_32`` is made with ``img_size=28, in_chans=1`` (7x7 = 49 tokens).

    model = sttpfast.create_model("vit_tiny_p4_32")                          # CIFAR-10, (3, 32, 32)
    model = sttpfast.create_model("vit_tiny_p4_32", img_size=28, in_chans=1)  # Fashion-MNIST
"""
from __future__ import annotations

from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from sttpfast.models.builder import CIFAR_MEAN, CIFAR_STD, build_registered

__all__ = ["vit_tiny_p4_32", "vit_small_p4_32"]

def _cfg(size: int, chans: int, mean, std) -> dict:
    """No weights: no url / hf_hub_id / file, and no license (nothing is distributed)."""
    return dict(input_size=(chans, size, size), pool_size=None, crop_pct=1.0, interpolation="bicubic",
                fixed_input_size=True, mean=mean, std=std, first_conv="patch_embed.proj", classifier="head",
                num_classes=10)


default_cfgs = generate_default_cfgs({
    "vit_tiny_p4_32": _cfg(32, 3, CIFAR_MEAN, CIFAR_STD),
    "vit_small_p4_32": _cfg(32, 3, CIFAR_MEAN, CIFAR_STD),
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
