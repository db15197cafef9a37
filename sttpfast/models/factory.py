"""The one model factory: every caller (CLI, learner, checkpoints) creates models here."""
from __future__ import annotations

import difflib
import os
import warnings
from pathlib import Path
from typing import Any

import timm
from timm.models import PretrainedCfg, get_pretrained_cfg, load_state_dict

import sttpfast.models.registered  # noqa: F401  (registers the paper's architectures in timm)

__all__ = ["create_model", "WEIGHT_FILE_SUFFIXES"]

WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def create_model(arch: str, *, pretrained: bool | str | os.PathLike = False, img_size: int | None = None,
                 **kwargs: Any):
    """``timm.create_model`` with sttpfast's architectures registered and clear errors.

    Args:
        arch: a timm model name (``timm.list_models()``), including sttpfast's
            ``wrn28_10``, ``resnet20_cifar``, ``sngan_d32``...
        pretrained: ``False``; ``True`` for timm's published weights (from timm's cache or
            its hub); or the path of a weight file (``.safetensors``, ``.pth``, ``.bin``...)
            loaded strictly through timm's ``pretrained_cfg_overlay=dict(file=...)``.
            A file's classifier is kept when its class count equals ``num_classes`` and
            replaced by a fresh one otherwise (timm's rule).
        img_size: the data's image size (square, pixels). Passed to models whose input size
            is fixed at construction (ViT, Swin...: timm's ``fixed_input_size``); other models
            take any size and ignore it.
        kwargs: model arguments (``num_classes``, ``in_chans``, ``drop_rate``...); ``None``
            values are dropped.

    Raises:
        ValueError: unknown ``arch`` (with close names), ``pretrained=True`` for an
            architecture without published weights, a missing or unreadable weight file,
            a file that does not fit the architecture, an ``img_size`` the model cannot take.
    """
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ValueError(f"unknown architecture {arch!r}{hint}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        cfg = get_pretrained_cfg(arch) or PretrainedCfg()  # None: an entry point without cfgs
    except RuntimeError as err:  # a bad pretrained tag ("resnet18.no_such_tag")
        raise ValueError(f"architecture {arch!r}: {err}") from None
    _check_img_size(arch, cfg, img_size, kwargs)
    if isinstance(pretrained, (str, os.PathLike)):
        model = _create_from_file(arch, Path(pretrained), cfg, kwargs)
    elif not isinstance(pretrained, bool):
        raise ValueError(f"pretrained must be True, False or a file path, got {pretrained!r}")
    elif pretrained and not cfg.has_weights:
        raise ValueError(f"no pretrained weights are published for {arch!r}; train one, or start "
                         f"from a local file: pretrained='path/to/weights.safetensors'")
    else:
        try:
            model = timm.create_model(arch, pretrained=pretrained, **kwargs)
        except OSError as err:  # only the weight download does I/O here (not cached, hub unreachable)
            if not pretrained:
                raise
            raise ValueError(f"cannot get the pretrained weights of {arch!r} (not in timm's cache and "
                             f"not downloadable: {err}); fetch them where there is a network and pass "
                             f"pretrained='path/to/file', or set HF_HUB_OFFLINE=1 to fail fast") from None
    if img_size is not None:
        _check_patch_size(arch, model, img_size)
    return model


def _check_img_size(arch: str, cfg, img_size: int | None, kwargs: dict) -> None:
    """Put ``img_size`` into ``kwargs`` where the model fixes its input size at construction."""
    if img_size is None:
        return
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
        raise ValueError(f"img_size must be a positive number of pixels, got {img_size!r}")
    if cfg.min_input_size is not None and img_size < min(cfg.min_input_size[-2:]):
        raise ValueError(f"{arch!r} needs inputs of at least {cfg.min_input_size[-2]}x{cfg.min_input_size[-1]} "
                         f"pixels, got img_size={img_size}; resize the data or pick another architecture")
    if cfg.fixed_input_size:
        kwargs.setdefault("img_size", img_size)


def _check_patch_size(arch: str, model, img_size: int) -> None:
    """Patch-embedding models (ViT, Swin...) need at least one patch and see only whole patches."""
    patch_size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch_size is None:
        return
    patch = max(patch_size) if isinstance(patch_size, (tuple, list)) else int(patch_size)
    if img_size < patch:
        raise ValueError(f"{arch!r} cuts images into {patch}x{patch} patches: img_size={img_size} is smaller "
                         f"than one patch; resize the data (e.g. to {patch * 2}) or pick another architecture")
    if img_size % patch:
        warnings.warn(f"{arch!r}: img_size={img_size} is not a multiple of its patch size {patch}; the last "
                      f"{img_size % patch} pixel rows and columns are never seen (resize to "
                      f"{img_size // patch * patch} or {(img_size // patch + 1) * patch})", stacklevel=3)


def _create_from_file(arch: str, path: Path, cfg, kwargs: dict):
    """Build ``arch`` with the weights in ``path``, checked by a strict load; where the file's
    class count is not ``num_classes``, the classifier is new (timm's init)."""
    if not path.is_file():
        raise ValueError(f"pretrained weight file {str(path)!r} does not exist")
    if path.suffix not in WEIGHT_FILE_SUFFIXES:
        raise ValueError(f"pretrained weight file {str(path)!r}: expected one of {', '.join(WEIGHT_FILE_SUFFIXES)}")
    try:
        state = load_state_dict(str(path))
    except Exception as err:  # noqa: BLE001  (any reader failure means: not a weight file we can read)
        raise ValueError(f"cannot read pretrained weight file {str(path)!r}: {err}") from err
    overlay = dict(file=str(path), **_file_cfg(cfg, state))
    # timm drops a classifier of another class count and then loads the rest without strict
    # checks (a file of another architecture loads partly, with a log line): a new class count
    # is first built at the file's, loaded strictly (a check, dropped), then built as timm does
    build = dict(kwargs)
    if _names(cfg.classifier):  # a file without the classifier: built without one (0 classes)
        build["num_classes"] = overlay.setdefault("num_classes", 0)
    wanted = kwargs.get("num_classes", cfg.num_classes)
    try:
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **build)
    except RuntimeError as err:
        if "state_dict" not in str(err):
            raise
        raise ValueError(_mismatch_message(arch, path, state, build)) from None
    if build.get("num_classes", wanted) == wanted:
        return model
    # timm's own classifier init for the new head (ViT's differs from a plain reset's)
    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


def _names(field) -> tuple[str, ...]:
    """A cfg's ``classifier`` / ``first_conv``: one module name, several, or none."""
    return (field,) if isinstance(field, str) else tuple(field or ())


def _file_cfg(cfg, state: dict) -> dict:
    """The class count and input channels the file's weights were made for, so that timm keeps
    a classifier that fits and adapts only what differs from the requested model."""
    found: dict[str, Any] = {}
    for name in _names(cfg.classifier):
        weight = state.get(f"{name}.weight")
        if weight is not None:
            found["num_classes"] = weight.shape[0]  # (num_classes, num_features[, 1, 1])
    for name in _names(cfg.first_conv):
        weight = state.get(f"{name}.weight")
        if weight is not None and weight.ndim == 4:
            found["input_size"] = (weight.shape[1], *cfg.input_size[1:])  # conv (C_out, C_in, kh, kw)
    return found


def _mismatch_message(arch: str, path: Path, state: dict, kwargs: dict) -> str:
    """Which keys and shapes of the file and the model differ (first few of each)."""
    expected = {k: tuple(v.shape) for k, v in timm.create_model(arch, **kwargs).state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items()}
    parts = []
    for what, keys in (("missing from the file", [k for k in expected if k not in given]),
                       ("not in the model", [k for k in given if k not in expected]),
                       ("of another shape", [f"{k} {given[k]} vs {expected[k]}" for k in expected
                                             if k in given and given[k] != expected[k]])):
        if keys:
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            parts.append(f"{len(keys)} {what}: {', '.join(keys[:5])}{more}")
    return f"pretrained weight file {str(path)!r} does not fit {arch!r}: " + "; ".join(parts)
