"""Any timm backbone at the data's resolution: build the model for the data's image size, or
find the smallest size it accepts.

    model, size = create_for_input("convnext_atto", in_chans=1, data_size=16, num_classes=10)
    # size == 32: convnext_atto's five stride-2 stages need 32 px; the data is resized to it

The order of preference:
1. ``img_size`` given (``--img-size``): the model is built for it (or refused, naming it);
2. the data's own size: models whose input size is fixed at construction (ViT, Swin,
   CoAtNet: timm's ``fixed_input_size``) are built for it with ``img_size=``;
3. the smallest multiple of the model's total stride (its deepest ``feature_info``
   reduction) above the data's size, up to the size its cfg names
   (``timm.data.resolve_data_config``): the data are then resized to it.
Nothing works: one ValueError that names ``--img-size``.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.data import resolve_data_config
from torch import nn

from sttpfast.models.factory import create_model

__all__ = ["create_for_data", "create_for_input", "input_error", "size_candidates"]


def input_error(model: nn.Module, in_chans: int, size: int) -> str | None:
    """Why ``model`` cannot run on a zero batch ``(1, in_chans, size, size)``; None if it can.

    Evaluation mode and no gradients: only the shapes are checked (a batch of one image
    would make BatchNorm refuse in training mode)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, size, size))
    except (RuntimeError, AssertionError, ValueError, IndexError) as err:
        text = str(err).strip()
        return text.splitlines()[0] if text else type(err).__name__
    finally:
        model.train(was_training)
    return None


def size_candidates(model: nn.Module, data_size: int, limit: int = 8) -> list[int]:
    """Sizes above ``data_size`` to try, smallest first: multiples of the model's total stride
    (deepest ``feature_info`` reduction, 32 when the model does not say) up to the input size
    of its cfg (``resolve_data_config``; at least one stride), at most ``limit`` of them."""
    info = getattr(model, "feature_info", None) or []
    reductions = [f.get("reduction", 0) for f in info if isinstance(f, dict)]
    if not reductions and hasattr(info, "reduction"):  # timm's FeatureInfo object
        reductions = list(info.reduction())
    stride = max(reductions, default=0) or 32
    top = max(int(resolve_data_config(model=model)["input_size"][-1]), stride)
    first = (data_size // stride + 1) * stride
    sizes = list(range(first, top + 1, stride))
    if len(sizes) > limit:  # keep the small ones and the cfg's own size
        sizes = sizes[: limit - 1] + [sizes[-1]]
    return sizes


class _SizeRefused(Exception):
    """The constructor refused the image size (not a user error yet: another size may work)."""


def _build(arch: str, in_chans: int, size: int, kwargs: dict) -> nn.Module:
    try:
        return create_model(arch, in_chans=in_chans, img_size=size, **kwargs)
    except TypeError as err:  # a constructor without in_chans / a model kwarg it does not know
        raise ValueError(f"architecture {arch!r} cannot be built for {in_chans}-channel {size}x{size} "
                         f"images: {err}") from None
    except (RuntimeError, AssertionError) as err:  # timm refuses the size at construction
        text = str(err).strip()
        raise _SizeRefused(text.splitlines()[0] if text else type(err).__name__) from None
    except ValueError as err:
        # create_model's own size checks (below the cfg's min_input_size, smaller than one
        # patch) name "img_size="; any other ValueError (weights, kwargs) is the user's to see
        if "img_size=" not in str(err):
            raise
        raise _SizeRefused(str(err)) from None


def create_for_input(arch: str, in_chans: int, data_size: int, img_size: int | None = None,
                     **kwargs: Any) -> tuple[nn.Module, int]:
    """Build ``arch`` for images ``(in_chans, S, S)`` and return ``(model, S)``.

    ``S`` is ``img_size`` when given, else ``data_size`` when the model runs at it, else the
    smallest size of :func:`size_candidates` it runs at (the caller resizes the data to ``S``).

    Raises:
        ValueError: unknown ``arch`` (close names suggested), a model that cannot take
            ``in_chans`` channels, no size that works (the message names ``--img-size``).
    """
    if img_size is not None:
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
            raise ValueError(f"img_size must be a positive number of pixels, got {img_size!r}")
        try:
            model = _build(arch, in_chans, img_size, kwargs)
        except _SizeRefused as err:
            raise ValueError(f"architecture {arch!r} cannot be built for {img_size}x{img_size} images "
                             f"({err}); choose another --img-size") from None
        reason = input_error(model, in_chans, img_size)
        if reason is not None:
            raise ValueError(f"architecture {arch!r} cannot run on {in_chans}x{img_size}x{img_size} images "
                             f"({reason}); choose another --img-size") from None
        return model, img_size
    first_reason = None
    try:
        model = _build(arch, in_chans, data_size, kwargs)
        first_reason = input_error(model, in_chans, data_size)
    except _SizeRefused as err:
        model, first_reason = None, str(err)
    if first_reason is None:
        return model, data_size
    probe = model if model is not None else create_model(arch, in_chans=in_chans, **kwargs)
    for size in size_candidates(probe, data_size):
        try:
            model = _build(arch, in_chans, size, kwargs)
        except _SizeRefused:
            continue
        if input_error(model, in_chans, size) is None:
            return model, size
    raise ValueError(f"architecture {arch!r} cannot run on the data's {in_chans}x{data_size}x{data_size} images "
                     f"({first_reason}) nor on larger sizes up to its cfg's; give the size to resize to with "
                     f"--img-size N, or pick a model for small inputs (e.g. resnet20_cifar)")


def create_for_data(arch: str, in_chans: int, image_size: int | tuple[int, int], /, img_size: int | None = None,
                    **model_kwargs: Any) -> tuple[nn.Module, int]:
    """:func:`create_for_input` for a dataset's images ``(in_chans, H, W)``, with a run's
    ``model.kwargs`` (an ``in_chans`` there repeats the data's; an ``img_size`` there counts
    as ``img_size`` when that is None): the model the run trains and the size ``S`` it runs at.
    Non-square data are refused (ValueError naming ``--img-size``)."""
    kwargs = dict(model_kwargs)
    in_chans = kwargs.pop("in_chans", None) or in_chans  # the data decide; model.kwargs may repeat them
    img_size = img_size if img_size is not None else kwargs.pop("img_size", None)
    if isinstance(image_size, (tuple, list)):
        if image_size[0] != image_size[1]:
            raise ValueError(f"the data's images are {image_size[0]}x{image_size[1]}; give a square --img-size N "
                             "to resize to")
        image_size = image_size[0]
    return create_for_input(arch, in_chans, image_size, img_size=img_size, **kwargs)
