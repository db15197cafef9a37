"""Shared test fixtures.

``make test`` runs the suite in two passes: the tests marked ``processes`` (they launch
Python processes of their own: torchrun, the apps, pip) one at a time, and the rest on two
pytest-xdist workers, one per core. The marked tests start 2-3 processes each and some of
them time signals and kills: beside another test they would fight for the cores. A test
that launches a Python process without the mark fails under xdist, saying so.
"""
import os

import pytest
import torch
from process_guard import refuse_python_processes

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
    """Under xdist, a test without the ``processes`` mark may not launch a Python process: it
    would run beside another worker's test (tests/process_guard.py says what counts)."""
    if "PYTEST_XDIST_WORKER" in os.environ and not request.node.get_closest_marker("processes"):
        refuse_python_processes(monkeypatch, f"{request.node.nodeid} launches a process: mark it "
                                             "@pytest.mark.processes (see tests/conftest.py)")
