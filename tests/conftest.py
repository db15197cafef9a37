"""Shared test fixtures.

``make test`` runs the suite in two passes: the tests marked ``processes`` (they launch
Python processes of their own: torchrun, the apps, pip) one at a time, and the rest on two
pytest-xdist workers, one per core. The marked tests start 2-3 processes each and some of
them time signals and kills: beside another test they would fight for the cores. A test
that launches a Python process without the mark fails under xdist, saying so.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# One intra-op thread: the tests use small tensors, and with two threads a second busy process
# on a 2-core machine makes every op wait at thread barriers (measured 10-100x slower).
torch.set_num_threads(int(os.environ.get("STTPFAST_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test that takes more than 20 s (its docstring says how long)")
    config.addinivalue_line("markers", "processes: launches Python processes of its own (make test runs these "
                                       "one at a time, the rest on two xdist workers)")


@pytest.fixture(autouse=True)
def _processes_are_marked(request, monkeypatch):
    """Under xdist, a test without the ``processes`` mark may not launch a Python process (the
    venv's interpreter or one of its scripts) nor fork: it would run beside another worker's test."""
    if "PYTEST_XDIST_WORKER" not in os.environ or request.node.get_closest_marker("processes"):
        return
    bin_dir = Path(sys.executable).parent
    said = f"{request.node.nodeid} launches a process: mark it @pytest.mark.processes (see tests/conftest.py)"
    init = subprocess.Popen.__init__

    def checked_init(self, args, *rest, **kwargs):
        first = args[0] if isinstance(args, (list, tuple)) else str(args).split()[0]
        if Path(first).parent == bin_dir or Path(first).resolve() == Path(sys.executable).resolve():
            raise AssertionError(said)
        init(self, args, *rest, **kwargs)

    def no_fork():
        raise AssertionError(said)

    monkeypatch.setattr(subprocess.Popen, "__init__", checked_init)
    monkeypatch.setattr(os, "fork", no_fork)
