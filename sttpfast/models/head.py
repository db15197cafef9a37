"""timm's classifier API (pooling + Linear head) shared by the registered classifiers."""
from __future__ import annotations

import torch
from timm.layers import create_classifier
from torch import nn

__all__ = ["ClassifierHeadMixin"]


class ClassifierHeadMixin:
    """``global_pool`` + ``fc`` on top of ``forward_features``, with timm's methods.

    The model calls :meth:`init_head` in its constructor and defines
    ``forward_features(x) -> (B, num_features, H', W')``.
    """

    def init_head(self, num_features: int, num_classes: int, global_pool: str = "avg") -> None:
        self.num_features = self.head_hidden_size = num_features
        self.reset_classifier(num_classes, global_pool)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New head: ``num_classes=0`` gives pooled features; ``global_pool=''`` also drops the
        pooling (then ``num_classes`` must be 0). ``global_pool=None`` keeps the current pooling."""
        if global_pool is None:
            global_pool = getattr(self, "global_pool_type", "avg")
        if global_pool == "" and num_classes > 0:
            raise ValueError(f"global_pool='' (no pooling) needs num_classes=0, got num_classes={num_classes}")
        try:
            self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        except (AssertionError, KeyError) as err:
            raise ValueError(f"unknown global_pool {global_pool!r} (use 'avg', 'max', 'avgmax', 'catavgmax' "
                             f"or '')") from err
        self.num_classes, self.global_pool_type = num_classes, global_pool

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, num_features, H', W') -> (B, num_classes)`` (``(B, num_features)`` with ``pre_logits``)."""
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
