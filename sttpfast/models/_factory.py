"""Shared plumbing for the timm-registered architectures."""
from __future__ import annotations

from torch import nn

# keyword arguments timm.create_model passes to every entry point
_TIMM_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def build(cls: type[nn.Module], name: str, pretrained: bool, defaults: dict, kwargs: dict) -> nn.Module:
    """Instantiate ``cls`` for the registered ``name``; no pretrained weights are published."""
    if pretrained:
        raise ValueError(f"no pretrained weights exist for {name!r}; train one or load a checkpoint")
    for key in _TIMM_KWARGS:
        kwargs.pop(key, None)
    model = cls(**{**defaults, **kwargs})
    model.pretrained_cfg = model.default_cfg = {"architecture": name, "num_classes": getattr(model, "num_classes", 0)}
    return model


class ClassifierHeadMixin:
    """timm's classifier API on a model with ``self.fc`` and ``self.num_features``."""

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x):
        return self.forward_head(self.forward_features(x))
