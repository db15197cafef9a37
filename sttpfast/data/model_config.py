"""Fit loaded data to a model's timm cfg (``timm.data.resolve_data_config``): its input size
and interpolation, and its normalization where the model's weights call for it."""
from __future__ import annotations

from timm.data import resolve_data_config
from torch import nn

__all__ = ["fit_dls_to_model"]


def fit_dls_to_model(dls, model: nn.Module, size: int, pretrained: bool = False) -> dict:
    """Make both loaders of ``dls`` deliver what ``model`` takes (in place).

    Args:
        dls: ``get_dls`` DataLoaders (``image_size``, ``in_chans``, ``mean``, ``std`` attached).
        model: the timm model (``pretrained_cfg`` read with ``resolve_data_config``).
        size: the square image size the model was built for; batches are resized to it with
            the cfg's interpolation when it differs from the data's.
        pretrained: the model carries trained weights: normalize with the cfg's ``mean`` /
            ``std`` (the weights saw inputs normalized that way) when they have one value per
            data channel. From scratch, the data's exact statistics stay (they fit the data
            better than, say, ImageNet's).

    Returns:
        what changed: ``{"resize": (from, to)}`` and/or ``{"normalization": (mean, std)}``.
    """
    cfg = resolve_data_config(model=model)
    changed: dict = {}
    data_size = getattr(dls, "data_image_size", dls.image_size)
    if size != data_size:
        for dl in (dls.train, dls.valid):
            dl.resize, dl.interpolation = size, cfg.get("interpolation", "bilinear")
        changed["resize"] = (data_size, size)
    dls.data_image_size, dls.image_size = data_size, size
    mean, std = tuple(cfg.get("mean", ())), tuple(cfg.get("std", ()))
    if pretrained and len(mean) == len(std) == dls.in_chans:
        for dl in (dls.train, dls.valid):
            dl.set_normalization(mean, std)
        dls.mean, dls.std = mean, std
        changed["normalization"] = (mean, std)
    return changed
