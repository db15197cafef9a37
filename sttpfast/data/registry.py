"""The dataset registry: name -> :class:`DatasetSpec` (sizes, statistics, augmentation, reader).

The one place the CLI, the config and the loaders read dataset names from. Torch-free: the
readers are imported only when a dataset is actually read, so ``sttpfast --help`` and config
validation can list the names without importing torch.

    from sttpfast.data.registry import DATASET_NAMES, resolve_dataset
    DATASET_NAMES                         # ('cifar10', 'cifar100', ..., 'tiny_imagenet')
    spec = resolve_dataset("cifar10", root)
    raw = spec.reader(root)               # RawDataset (imports the CIFAR reader now)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

__all__ = ["DatasetSpec", "DATASETS", "DATASET_NAMES", "NAMES_HELP", "DATA_DIR_ENV",
           "default_data_dir", "data_root", "resolve_dataset", "dataset_info"]

DATA_DIR_ENV = "STTPFAST_DATA"


@dataclass(frozen=True)
class DatasetSpec:
    """Static description of a dataset.

    ``mean`` / ``std`` are per-channel statistics of the full official training split in
    [0, 1] units (what ``get_dls`` computes when it loads that full split). ``pad`` / ``flip``
    configure the training augmentation (random crop with ``pad`` pixels of zero padding,
    random horizontal flip). ``reader(root) -> RawDataset`` reads it from the data dir
    ``root``. ``files`` says what to put by hand in ``root``, ``folder`` the name(s) of what
    then holds the files.
    """

    name: str
    title: str
    n_classes: int | None
    in_chans: int
    image_size: int | tuple[int, int] | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    pad: int
    flip: bool
    reader: Callable[[Path], object] = field(repr=False, compare=False)
    torchvision_class: str | None = None  # torchvision.datasets class able to download it
    files: str = ""
    folder: str = ""
    note: str = ""  # appended to the hint (e.g. a system package providing the files)

    def hint(self, offer_download: bool) -> str:
        """How to make the dataset available: one sentence ('' when there is nothing to say)."""
        if not self.files:
            return ""
        how = ("pass --download (download=True) to fetch it with torchvision, "
               if offer_download and self.torchvision_class else "")
        text = (f"Put {self.files} there, {how}or point --data-dir / ${DATA_DIR_ENV} at the "
                f"folder holding {self.folder}.")
        return f"{text} {self.note}" if self.note else text

    @property
    def download_hint(self) -> str:
        """The hint shown when the dataset is missing (offers ``--download`` where possible)."""
        return self.hint(offer_download=True)


def default_data_dir() -> Path:
    """``$STTPFAST_DATA`` or ``~/data`` (absolute; it need not exist)."""
    return Path(os.environ.get(DATA_DIR_ENV) or "~/data").expanduser().absolute()


def data_root(data_dir: str | os.PathLike | None) -> Path:
    """The absolute data dir: ``data_dir`` if given, else :func:`default_data_dir`."""
    return Path(data_dir).expanduser().absolute() if data_dir is not None else default_data_dir()


# Each reader is imported when it is called: this module stays torch-free.
def _read_cifar10(root: Path):
    from sttpfast.data.readers.cifar import read_cifar10
    return read_cifar10(root)


def _read_cifar100(root: Path):
    from sttpfast.data.readers.cifar import read_cifar100
    return read_cifar100(root)


def _read_stl10(root: Path):
    from sttpfast.data.readers.stl import read_stl10
    return read_stl10(root)


def _read_mnist(root: Path):
    from sttpfast.data.readers.idx import read_mnist
    return read_mnist(root)


def _read_fashion_mnist(root: Path):
    from sttpfast.data.readers.idx import read_fashion_mnist
    return read_fashion_mnist(root)


def _read_digits(root: Path):
    from sttpfast.data.readers.digits import read_digits
    return read_digits(root)


def _read_tiny_imagenet(root: Path):
    from sttpfast.data.readers.imagefolder import read_tiny_imagenet
    return read_tiny_imagenet(root)


# mean / std: CIFAR, MNIST and the digits values are exact for the official training splits,
# Fashion-MNIST was checked against Debian's copy (0.2860 / 0.3530); the STL-10 and Tiny ImageNet
# values are the commonly published ones (get_dls always recomputes from the data it loads).
DATASETS: dict[str, DatasetSpec] = {s.name: s for s in [
    DatasetSpec("cifar10", "CIFAR-10", 10, 3, 32,
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), pad=4, flip=True,
                reader=_read_cifar10, torchvision_class="CIFAR10",
                files="the CIFAR-10 python version (cifar-10-python.tar.gz, extracted)",
                folder="cifar-10-batches-py"),
    DatasetSpec("cifar100", "CIFAR-100", 100, 3, 32,
                (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), pad=4, flip=True,
                reader=_read_cifar100, torchvision_class="CIFAR100",
                files="the CIFAR-100 python version (cifar-100-python.tar.gz, extracted)",
                folder="cifar-100-python"),
    DatasetSpec("stl10", "STL-10 (labeled splits)", 10, 3, 96,
                (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), pad=4, flip=True,
                reader=_read_stl10, torchvision_class="STL10",
                files="the STL-10 binary version (stl10_binary.tar.gz, extracted)",
                folder="stl10_binary"),
    DatasetSpec("mnist", "MNIST", 10, 1, 28, (0.1307,), (0.3081,), pad=2, flip=False,
                reader=_read_mnist, torchvision_class="MNIST",
                files="the four MNIST IDX files", folder="mnist/ or MNIST/raw/"),
    DatasetSpec("fashion_mnist", "Fashion-MNIST", 10, 1, 28, (0.2860,), (0.3530,), pad=2, flip=False,
                reader=_read_fashion_mnist, torchvision_class="FashionMNIST",
                files="the four Fashion-MNIST IDX files", folder="fashion_mnist/ or FashionMNIST/raw/",
                note="On Debian/Ubuntu, `apt-get install dataset-fashion-mnist` provides them system-wide."),
    DatasetSpec("digits", "scikit-learn digits (8x8 -> 16x16)", 10, 1, 16,
                (0.3056,), (0.3186,), pad=1, flip=False, reader=_read_digits),
    DatasetSpec("tiny_imagenet", "Tiny ImageNet (200 classes)", 200, 3, 64,
                (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821), pad=4, flip=True,
                reader=_read_tiny_imagenet,
                files="Tiny ImageNet (http://cs231n.stanford.edu/tiny-imagenet-200.zip, extracted)",
                folder="tiny-imagenet-200"),
]}
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)
NAMES_HELP = ", ".join(list(DATASETS) + ["imagefolder:PATH"])


def _imagefolder_spec(path: Path) -> DatasetSpec:
    """A spec for ``imagefolder:PATH``: classes from the folders; size and channels from the
    first training image."""
    from sttpfast.data.readers.imagefolder import probe_imagefolder, read_imagefolder

    classes, (h, w), chans = probe_imagefolder(path)
    return DatasetSpec(
        name=f"imagefolder:{path}", title=f"image folder {path}", n_classes=len(classes),
        in_chans=chans, image_size=h if h == w else (h, w), mean=None, std=None,
        pad=4, flip=chans == 3,  # natural-image augmentation; no flip for grayscale (digit-like) data
        reader=lambda root, path=path: read_imagefolder(path))


def resolve_dataset(name: str, root: Path) -> DatasetSpec:
    """Registry lookup (``-`` and ``_`` alike, any case); ``imagefolder:PATH`` (PATH absolute,
    relative to the working directory, or relative to the data dir ``root``) builds its spec
    from the folder.

    Raises:
        ValueError: unknown ``name`` (the message lists the allowed names).
        DatasetNotFound: ``imagefolder:PATH`` without the expected folders.
    """
    if not isinstance(name, str):
        raise ValueError(f"dataset name must be a string, got {name!r}; allowed: {NAMES_HELP}")
    if name.startswith("imagefolder:"):
        path = Path(name.split(":", 1)[1]).expanduser()
        if not path.is_absolute() and not path.exists() and (root / path).exists():
            path = root / path
        return _imagefolder_spec(path.absolute())
    key = name.lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {NAMES_HELP}")
    return DATASETS[key]


def dataset_info(name: str, data_dir: str | os.PathLike | None = None) -> dict:
    """``{n_classes, in_chans, image_size, mean, std}`` without loading any images.

    ``mean`` / ``std`` are per-channel, in [0, 1] units, of the full official training split
    (``None`` for ``imagefolder:PATH``: computed from the images when loaded).
    """
    spec = resolve_dataset(name, data_root(data_dir))
    return {"n_classes": spec.n_classes, "in_chans": spec.in_chans, "image_size": spec.image_size,
            "mean": spec.mean, "std": spec.std}
