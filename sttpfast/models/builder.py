"""Building the registered architectures through timm's own ``build_model_with_cfg``.

No weights are published for these networks, so their cfgs carry no ``url``/``hf_hub_id``;
``pretrained=True`` works only with a local file given through timm's
``pretrained_cfg_overlay=dict(file=...)`` (what :func:`sttpfast.models.create_model` does
for ``pretrained="path"``).
"""
from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg
from torch import nn

__all__ = ["build_registered", "cifar_cfg", "CIFAR_MEAN", "CIFAR_STD"]

# CIFAR-10 training-split statistics (sttpfast.data recomputes them from the data it loads)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

# the pretrained-cfg keys that say where weights come from
_WEIGHT_SOURCES = ("file", "state_dict", "url", "hf_hub_id")


def cifar_cfg(**overrides: Any) -> dict[str, Any]:
    """A pretrained cfg for a 32x32 CIFAR classifier (no weights: no url / hf_hub_id)."""
    return dict(dict(input_size=(3, 32, 32), pool_size=None, crop_pct=1.0, interpolation="bilinear",
                     mean=CIFAR_MEAN, std=CIFAR_STD, first_conv=None, classifier="fc", num_classes=10),
                **overrides)


def _names_weights(cfg: Any) -> bool:
    cfg = cfg if isinstance(cfg, dict) else {}
    return any(cfg.get(key) for key in _WEIGHT_SOURCES)


def build_registered(model_cls: type[nn.Module], variant: str, pretrained: bool,
                     feature_cfg: dict | None = None, **kwargs: Any) -> nn.Module:
    """``build_model_with_cfg`` for an architecture without published weights.

    timm handles ``pretrained_cfg`` / ``pretrained_cfg_overlay`` (a local ``file``) and
    ``features_only`` (through ``feature_cfg``; only models with ``feature_info`` pass it).

    Raises:
        ValueError: ``pretrained=True`` without a local weight file.
    """
    if pretrained and not (_names_weights(kwargs.get("pretrained_cfg_overlay"))
                           or _names_weights(kwargs.get("pretrained_cfg"))):
        raise ValueError(f"no pretrained weights are published for {variant!r}; train one, or start "
                         f"from a local file: pretrained='path/to/weights.safetensors'")
    if kwargs.get("features_only") and feature_cfg is None:
        raise ValueError(f"{variant!r} does not support features_only")
    return build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=feature_cfg, **kwargs)
