"""Shared test fixtures."""
import os

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
