"""The one model factory: every caller (CLI, learner, checkpoints) creates models here."""
from __future__ import annotations

import difflib

import timm

import sttpfast.models.registered  # noqa: F401  (registers the paper's architectures in timm)

__all__ = ["create_model"]


def create_model(arch: str, **kwargs):
    """``timm.create_model`` with sttpfast's architectures registered and a clear error
    (with close names) for an unknown one. ``None`` values are dropped."""
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ValueError(f"unknown architecture {arch!r}{hint}")
    return timm.create_model(arch, pretrained=False, **{k: v for k, v in kwargs.items() if v is not None})
