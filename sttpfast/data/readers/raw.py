"""What every reader returns: both splits of a dataset, before they become loaders."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from torch import Tensor

from sttpfast.data.errors import DatasetNotFound

__all__ = ["Split", "RawDataset", "require_files"]


@dataclass
class Split:
    """One split before it is turned into tensors.

    ``x`` is either a uint8 tensor ``(N, C, H, W)`` (array formats) or a list of N image paths
    (folder formats, decoded only after ``subset`` has picked the images actually needed).
    ``y`` is int64 ``(N,)``.
    """

    x: Tensor | list[Path]
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    def select(self, idx: Tensor) -> "Split":
        """The items at int64 indices ``idx`` ``(K,)``, in that order."""
        if isinstance(self.x, Tensor):
            return Split(self.x[idx], self.y[idx])
        return Split([self.x[i] for i in idx.tolist()], self.y[idx])


@dataclass
class RawDataset:
    """Both splits, the class names (index -> name) and the folder the files were read from
    (``None``: bundled with a package, as scikit-learn's digits)."""

    train: Split
    valid: Split
    classes: list[str]
    source: Path | None = None


def require_files(name: str, files: Sequence[Path]) -> None:
    """Raise :class:`DatasetNotFound` listing every one of ``files`` that does not exist."""
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise DatasetNotFound(f"{name} not found: missing {', '.join(missing)}.")

