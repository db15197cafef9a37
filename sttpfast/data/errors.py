"""The two ways a dataset can be unusable: its files are missing, or one of them is corrupt.

Both are ``ValueError`` s, which the CLI prints as one ``Error: ...`` line (exit 2). Torch-free.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["DatasetNotFound", "DatasetCorrupt", "DataWarning", "corrupt"]


class DatasetNotFound(ValueError):
    """The dataset's files are not where they are expected (the message says which and where)."""


class DatasetCorrupt(DatasetNotFound):
    """A dataset file exists but is truncated or malformed (the message names the file).

    A subclass of :class:`DatasetNotFound` so that callers that report "no usable dataset"
    catch both with one ``except``.
    """


class DataWarning(UserWarning):
    """The data was read from another place than the one asked for (a ``--data-dir`` without
    the files, where a system-wide copy was found): the run goes on, the user is told."""


def corrupt(path: Path, what: str) -> DatasetCorrupt:
    """The error for file ``path`` whose problem is ``what`` (e.g. "has 7 labels but ...")."""
    return DatasetCorrupt(f"{path}: {what}. The file is truncated or corrupt: delete it and "
                          "download / extract the dataset again.")
