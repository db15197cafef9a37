"""Folders of image files: Tiny ImageNet's layout and ``imagefolder:PATH``.

Readers return the image *paths*; :func:`decode_images` decodes them (with PIL, in threads)
only after ``subset`` has picked the images actually needed.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from sttpfast.data.errors import DatasetNotFound, corrupt
from sttpfast.data.readers.raw import RawDataset, Split, require_files

__all__ = ["read_tiny_imagenet", "read_imagefolder", "probe_imagefolder", "decode_images", "image_pixels",
           "TINY_IMAGENET_FOLDER"]

TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
_IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in _IMAGE_EXTENSIONS and p.is_file())


def image_pixels(im, size: tuple[int, int], chans: int) -> np.ndarray:
    """A PIL image -> uint8 ``(H, W, chans)`` of ``size`` ``(H, W)``: converted to L (one
    channel) or RGB, resized (bilinear) where its size differs."""
    from PIL import Image

    h, w = size
    im = im.convert("L" if chans == 1 else "RGB")
    if im.size != (w, h):
        im = im.resize((w, h), Image.BILINEAR)
    return np.asarray(im).reshape(h, w, chans)


def decode_images(paths: Sequence[Path], size: tuple[int, int], chans: int) -> Tensor:
    """Decode image files -> uint8 ``(N, chans, H, W)``; images of another size are resized."""
    from PIL import Image, UnidentifiedImageError

    h, w = size
    out = np.empty((len(paths), h, w, chans), dtype=np.uint8)

    def decode(i: int) -> None:
        try:
            with Image.open(paths[i]) as im:
                out[i] = image_pixels(im, size, chans)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise corrupt(Path(paths[i]), f"is not a readable image ({e})") from e

    # PIL releases the GIL while decoding, so threads give a real speed-up.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(decode, range(len(paths))))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def read_tiny_imagenet(root: Path) -> RawDataset:
    """``root/tiny-imagenet-200``: wnids.txt, train/<wnid>/images/*, val/images + val_annotations.txt."""
    d = root / TINY_IMAGENET_FOLDER
    require_files("tiny_imagenet", [d / "wnids.txt", d / "val" / "val_annotations.txt"])
    wnids = sorted({line.strip() for line in (d / "wnids.txt").read_text().splitlines() if line.strip()})
    index = {wnid: i for i, wnid in enumerate(wnids)}
    paths, labels = [], []
    for wnid in wnids:
        class_dir = d / "train" / wnid / "images"
        if not class_dir.is_dir():
            raise DatasetNotFound(f"tiny_imagenet not found: missing {class_dir} (class {wnid} of "
                                  f"{d / 'wnids.txt'}).")
        files = _image_files(class_dir)
        paths += files
        labels += [index[wnid]] * len(files)
    val_paths, val_labels = [], []
    annotations = d / "val" / "val_annotations.txt"
    for lineno, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise corrupt(annotations, f"line {lineno} is not '<file>\\t<wnid listed in wnids.txt>...'")
        image = d / "val" / "images" / parts[0]
        if not image.is_file():
            raise DatasetNotFound(f"tiny_imagenet not found: missing {image} (listed in {annotations}).")
        val_paths.append(image)
        val_labels.append(index[parts[1]])
    if not paths or not val_paths:
        raise DatasetNotFound(f"tiny_imagenet not found: no images under {d / 'train'} or "
                              f"{d / 'val' / 'images'}.")
    return RawDataset(Split(paths, torch.tensor(labels, dtype=torch.int64)),
                      Split(val_paths, torch.tensor(val_labels, dtype=torch.int64)), wnids, source=d)


def _imagefolder_layout(path: Path) -> tuple[Path, Path, list[str]]:
    """-> (train dir, valid dir, sorted class names) of an ``imagefolder:PATH`` dataset."""
    if path.exists() and not path.is_dir():
        raise DatasetNotFound(f"imagefolder: {path} is a file, not a folder: give the folder that holds "
                              "train/<class>/ and val/<class>/ (or test/<class>/)")
    train = path / "train"
    valid = next((path / n for n in ("val", "test") if (path / n).is_dir()), None)
    classes = sorted(p.name for p in train.iterdir() if p.is_dir()) if train.is_dir() else []
    if valid is None or not classes:
        raise DatasetNotFound(
            f"imagefolder not found: expected {train}/<class>/*.png|jpg and {path / 'val'}/<class>/... "
            f"(or {path / 'test'}/<class>/...); found "
            f"{'no class folders in ' + str(train) if not classes else 'no val/ or test/ folder'}.")
    return train, valid, classes


def _imagefolder_files(directory: Path, classes: list[str], training: bool = False) -> Split:
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for class_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
        if class_dir.name not in index:
            raise DatasetNotFound(f"imagefolder: class folder {class_dir} has no counterpart in "
                                  f"the training folder (classes: {', '.join(classes)})")
        files = _image_files(class_dir)
        if training and not files:  # as torchvision's ImageFolder refuses it
            raise DatasetNotFound(f"imagefolder: class folder {class_dir} holds no image file: no training image "
                                  "would belong to its class; remove it or add images")
        paths += files
        labels += [index[class_dir.name]] * len(files)
    if not paths:
        raise DatasetNotFound(f"imagefolder not found: no image files in {directory}/<class>/")
    return Split(paths, torch.tensor(labels, dtype=torch.int64))


def read_imagefolder(path: Path) -> RawDataset:
    """``path/train/<class>/*`` and ``path/val/<class>/*`` (or ``path/test/<class>/*``)."""
    train, valid, classes = _imagefolder_layout(path)
    return RawDataset(_imagefolder_files(train, classes, training=True), _imagefolder_files(valid, classes), classes,
                      source=path)


def _probe_image(path: Path) -> tuple[tuple[int, int], int]:
    """-> ((H, W), channels) of an image file, reading only its header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return (im.height, im.width), (1 if im.mode in ("1", "L", "LA", "I", "I;16", "F") else 3)
    except (UnidentifiedImageError, OSError) as e:
        raise corrupt(path, f"is not a readable image ({e})") from e


def probe_imagefolder(path: Path) -> tuple[list[str], tuple[int, int], int]:
    """-> (class names, (H, W), channels) of ``imagefolder:PATH``: the size of its first training
    image, and colour (3 channels) if the first image of any class has it, so that one grayscale
    image sorting first does not make a colour dataset gray (the others are resized / converted
    to match when decoded)."""
    train, _, classes = _imagefolder_layout(path)
    firsts = [files[0] for files in (_image_files(train / c) for c in classes) if files]
    if not firsts:
        raise DatasetNotFound(f"imagefolder not found: no image files in {train}/<class>/")
    probes = [_probe_image(f) for f in firsts]
    return classes, probes[0][0], max(chans for _, chans in probes)
