"""Images a user predicts on: ``dls.test_dl(items)`` and fastai's ``Learner.predict(item)``.

fastai's own ``test_dl`` hands the items to ``valid.new`` as they are, which fits its
``Datasets`` of item transforms, not the in-memory loaders: the items become an unlabelled
:class:`~sttpfast.data.loaders.InMemoryImageDataset` of the training images' format first
(uint8 ``(C, H, W)``), and the validation loader's normalization (and resize) applies.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from fastai.data.core import DataLoaders
from torch import Tensor

from sttpfast.data.loaders import InMemoryImageDataset
from sttpfast.data.readers.imagefolder import image_pixels

__all__ = ["InMemoryDataLoaders", "prediction_images"]


class InMemoryDataLoaders(DataLoaders):
    """fastai's ``DataLoaders`` over :class:`~sttpfast.data.loaders.InMemoryImageDL` s, whose
    ``test_dl`` takes images as users have them (see :func:`prediction_images`)."""

    def test_dl(self, test_items, rm_type_tfms=None, with_labels: bool = False, **kwargs):
        """A loader of ``test_items`` with the validation loader's settings: batches ``(x,)``
        (no labels: ``get_preds`` gives targets None). ``with_labels`` only with an
        :class:`InMemoryImageDataset` that has labels (``rm_type_tfms`` is fastai's, unused:
        these loaders have no type transforms)."""
        like = self.valid.dataset
        if isinstance(test_items, InMemoryImageDataset):
            dataset = test_items if with_labels else InMemoryImageDataset(test_items.x, None, like.vocab)
        elif with_labels:
            raise ValueError("test items: with_labels needs an InMemoryImageDataset with labels")
        else:
            dataset = InMemoryImageDataset(prediction_images(test_items, like.x.shape[1:]), None, like.vocab)
        return self.valid.new(dataset, **kwargs)


def prediction_images(items, shape) -> Tensor:
    """``items`` -> uint8 ``(N, C, H, W)`` of the training images' ``shape`` ``(C, H, W)``.

    ``items``: one uint8 tensor or array of images ``(N, C, H, W)``, or a sequence of images,
    each a uint8 tensor / array ``(C, H, W)`` (or ``(H, W)`` with one channel), a PIL image,
    or an image file's path. PIL images and files are converted to the data's channels (L or
    RGB) and resized to its size, as the image-folder reader does; tensors must have the
    shape already. Anything else is a ValueError naming the item."""
    c, h, w = (int(d) for d in shape)
    if isinstance(items, (Tensor, np.ndarray)) and items.ndim == 4:
        items = list(items)
    elif isinstance(items, (Tensor, np.ndarray, str, os.PathLike)) or _is_pil(items):
        items = [items]
    items = list(items)
    if not items:
        raise ValueError("test items: none given")
    return torch.stack([_image(i, item, c, h, w) for i, item in enumerate(items)])


def _is_pil(item) -> bool:
    from PIL import Image
    return isinstance(item, Image.Image)


def _image(i: int, item, c: int, h: int, w: int) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, (str, os.PathLike)):
        try:
            with Image.open(item) as im:
                return _from_pil(im, c, h, w)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"test items: image {i} ({str(Path(item))!r}) is not a readable image file "
                             f"({err})") from None
    if _is_pil(item):
        return _from_pil(item, c, h, w)
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(np.ascontiguousarray(item))
    if not isinstance(item, Tensor):
        raise ValueError(f"test items: image {i} is a {type(item).__name__}; give uint8 tensors or arrays "
                         f"(C, H, W), PIL images or image files")
    if item.dtype != torch.uint8:
        raise ValueError(f"test items: image {i} holds {str(item.dtype).replace('torch.', '')} values; give uint8 "
                         f"pixels (0-255), as the training images are")
    if item.ndim == 2 and c == 1:
        item = item.unsqueeze(0)
    if tuple(item.shape) != (c, h, w):
        raise ValueError(f"test items: image {i} is a tensor of shape {tuple(item.shape)}; this model's data is "
                         f"uint8 {(c, h, w)} (give PIL images or files to have them resized)")
    return item


def _from_pil(im, c: int, h: int, w: int) -> Tensor:
    return torch.from_numpy(image_pixels(im, (h, w), c).copy()).permute(2, 0, 1).contiguous()
