"""Which process this is, known before torch.distributed is set up.

``torchrun`` and ``accelerate launch`` tell every process its global rank in the ``RANK``
environment variable; a plain ``python`` / ``sttpfast`` run has none and is rank 0. Read
from the environment (no torch import), so the CLI can decide who speaks for the run before
it imports anything heavy: one process prints what the run chose and its summary, not each.
"""
from __future__ import annotations

import os

__all__ = ["is_main_rank", "world_size"]


def is_main_rank() -> bool:
    """True on global rank 0, or when the process was not started by a distributed launcher."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """How many processes run this job (``WORLD_SIZE``, set by the launchers; 1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
