"""CIFAR-10 / CIFAR-100: python pickle batches, read with a restricted unpickler.

The official "python version" archives hold dicts pickled by Python 2 with ``data`` uint8
``(N, 3072)`` (1024 red, then green, then blue values of a 32x32 image, row-major) and
``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100). The unpickler can only rebuild numpy
arrays and plain builtins, so a malicious "dataset" cannot run code.
"""
from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sttpfast.data.errors import corrupt
from sttpfast.data.readers.raw import RawDataset, Split, require_files

__all__ = ["read_cifar10", "read_cifar100", "CIFAR10_FOLDER", "CIFAR100_FOLDER", "CIFAR10_CLASSES"]

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]


def _numpy_core():
    try:  # numpy >= 2 ("numpy.core" is a deprecated alias there)
        from numpy import _core as core
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy import core
    return core


def _allowed_pickle_global(module: str, name: str):
    """The only globals a dataset pickle may reference: numpy array rebuilding + plain builtins.

    Pickles written by numpy 1.x name ``numpy.core.*``, numpy 2.x ``numpy._core.*``; both map to
    the installed numpy. ``_codecs.encode`` is how protocol-2 pickles store ``bytes``.
    """
    core = _numpy_core()
    if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed = {"_reconstruct": core.multiarray._reconstruct, "scalar": core.multiarray.scalar}
    elif module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed = {"_frombuffer": core.numeric._frombuffer}
    elif module == "numpy":
        allowed = {"ndarray": np.ndarray, "dtype": np.dtype}
    elif module == "_codecs":
        import codecs
        allowed = {"encode": codecs.encode}
    elif module in ("builtins", "__builtin__"):
        import builtins
        allowed = {n: getattr(builtins, n) for n in (
            "bytearray", "bytes", "str", "int", "float", "complex", "bool",
            "list", "tuple", "dict", "set", "frozenset", "slice", "range")}
    else:
        allowed = {}
    if name not in allowed:
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only numpy arrays "
                                     "and plain builtins are allowed in a dataset file)")
    return allowed[name]


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy-array and plain-builtin globals."""

    def find_class(self, module: str, name: str):
        return _allowed_pickle_global(module, name)


def load_pickle_batch(path: Path) -> dict:
    """Load one CIFAR batch file -> dict with ``str`` keys (b'data' and 'data' both accepted)."""
    try:
        with open(path, "rb") as f:
            # latin1: CIFAR's files were pickled by Python 2, and latin1 is the encoding that
            # rebuilds Python-2 numpy arrays byte for byte. Python-3 bytes keys stay bytes.
            obj = RestrictedUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, struct.error, MemoryError) as e:
        raise corrupt(path, f"cannot be unpickled as a CIFAR batch ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise corrupt(path, f"holds a {type(obj).__name__}, expected a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar_batches(files: Sequence[Path], label_key: str, n_classes: int) -> Split:
    """Concatenate CIFAR batches: uint8 ``(N, 3, 32, 32)``, int64 ``(N,)``."""
    xs, ys = [], []
    for path in files:
        batch = load_pickle_batch(path)
        if "data" not in batch or label_key not in batch:
            raise corrupt(path, f"has keys {sorted(map(str, batch))}, expected 'data' and '{label_key}'")
        data = np.asarray(batch["data"])
        labels = np.asarray(batch[label_key])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise corrupt(path, f"'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
        if labels.shape != (len(data),):
            raise corrupt(path, f"has {labels.size} labels for {len(data)} images")
        if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
            raise corrupt(path, f"labels outside 0..{n_classes - 1}")
        xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        ys.append(torch.from_numpy(labels.astype(np.int64)))
    return Split(torch.cat(xs), torch.cat(ys))


def read_cifar10(root: Path) -> RawDataset:
    """``root/cifar-10-batches-py/{data_batch_1..5, test_batch}``."""
    d = root / CIFAR10_FOLDER
    train = [d / f"data_batch_{i}" for i in range(1, 6)]
    require_files("cifar10", train + [d / "test_batch"])
    return RawDataset(read_cifar_batches(train, "labels", 10),
                      read_cifar_batches([d / "test_batch"], "labels", 10), list(CIFAR10_CLASSES), source=d)


def read_cifar100(root: Path) -> RawDataset:
    """``root/cifar-100-python/{train, test}`` (and the optional ``meta`` for class names)."""
    d = root / CIFAR100_FOLDER
    require_files("cifar100", [d / "train", d / "test"])
    classes = [str(i) for i in range(100)]
    if (d / "meta").is_file():  # optional: the fine class names
        names = load_pickle_batch(d / "meta").get("fine_label_names")
        if isinstance(names, list) and len(names) == 100:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return RawDataset(read_cifar_batches([d / "train"], "fine_labels", 100),
                      read_cifar_batches([d / "test"], "fine_labels", 100), classes, source=d)
