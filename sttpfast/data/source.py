"""Where a dataset's files come from: the data dir as it is, or a download made only on request.

A download never leaves a partial dataset behind: torchvision fetches into a temporary
folder inside the data dir, the reader verifies the result there, and only then are the
files moved into place (a rename, since both lie on the same filesystem). On any failure the
temporary folder is removed and :class:`DatasetNotFound` says in one line what failed (the
URL and the error) and where to put the files by hand.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from sttpfast.data.errors import DatasetCorrupt, DatasetNotFound
from sttpfast.data.readers.raw import RawDataset
from sttpfast.data.registry import DatasetSpec

__all__ = ["read_or_download", "download_dataset"]


def _with_hint(missing: DatasetNotFound, spec: DatasetSpec, offer_download: bool) -> DatasetNotFound:
    hint = spec.hint(offer_download)
    return DatasetNotFound(f"{missing} {hint}" if hint else str(missing))


def read_or_download(spec: DatasetSpec, root: Path, download: bool = False) -> RawDataset:
    """Read ``spec`` from the data dir ``root``; if its files are missing and ``download``,
    download it first (never otherwise).

    Raises:
        DatasetNotFound: files missing (names them and how to get them), or the download failed.
        DatasetCorrupt: a file is truncated or malformed (never answered by downloading again:
            the user's file is not overwritten).
    """
    try:
        return spec.reader(root)
    except DatasetCorrupt:
        raise
    except DatasetNotFound as missing:
        if not download:
            raise _with_hint(missing, spec, offer_download=True) from None
        download_dataset(spec, root, missing)
    return spec.reader(root)


def _source_url(downloader: type) -> str:
    """The URL torchvision's dataset class fetches from (its first one, for multi-file sets)."""
    url = getattr(downloader, "url", None)
    if isinstance(url, str):
        return url
    mirrors, resources = getattr(downloader, "mirrors", None), getattr(downloader, "resources", None)
    if mirrors and resources:
        return f"{mirrors[0]}{resources[0][0]}"
    return f"torchvision.datasets.{downloader.__name__}"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())  # torchvision's MNIST joins its mirrors' errors with newlines
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _move_into(src: Path, dst: Path) -> None:
    """Move the tree ``src`` into ``dst``, keeping every file that ``dst`` already has."""
    if not dst.exists():
        os.replace(src, dst)
    elif src.is_dir() and dst.is_dir():
        for child in src.iterdir():
            _move_into(child, dst / child.name)


def download_dataset(spec: DatasetSpec, root: Path, missing: DatasetNotFound | None = None) -> None:
    """Fetch ``spec`` with torchvision into the data dir ``root``, all or nothing.

    ``missing`` is the reader's error for the dataset's current absence: it names the exact
    files and folders expected, and is repeated if the download fails.
    """
    if spec.torchvision_class is None:
        raise DatasetNotFound(f"{spec.name} cannot be downloaded automatically. {spec.download_hint}")
    by_hand = f" Install it by hand instead: {_with_hint(missing, spec, offer_download=False)}" if missing else ""
    import torchvision.datasets as tvd

    downloader = getattr(tvd, spec.torchvision_class)
    url = _source_url(downloader)
    created = [p for p in (root, *root.parents) if not p.exists()]  # removed again if left empty
    staging = None
    try:
        try:
            root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".download-{spec.name}-", dir=root))
        except OSError as e:
            raise DatasetNotFound(f"{spec.name}: cannot create a folder in the data dir {root} "
                                  f"({_one_line(e)}).{by_hand}") from None
        try:
            if spec.name == "stl10":
                downloader(root=str(staging), split="train", download=True)
            else:
                downloader(root=str(staging), train=True, download=True)
            spec.reader(staging)  # verify: every file the reader needs is there and well-formed
        except Exception as e:  # network, integrity check, extraction, verification alike
            raise DatasetNotFound(f"{spec.name}: downloading {url} failed ({_one_line(e)}); nothing "
                                  f"was kept in {root}.{by_hand}") from None
        for entry in staging.iterdir():
            _move_into(entry, root / entry.name)
    finally:  # also on Ctrl-C: no partial files either way
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:  # not empty (the dataset is there), or not ours to remove
                break
