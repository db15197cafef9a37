"""The guard of make test's second pass (tests/process_guard.py) refuses every way a test could
launch a Python process, and nothing else."""
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
from process_guard import refuse_python_processes


def test_every_way_of_launching_python_is_refused_and_other_programs_run(monkeypatch):
    said = "this test launches a process"
    refuse_python_processes(monkeypatch, said)
    # the venv's interpreter first on PATH, so that a bare "python" finds it
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    launches = {
        "by path": lambda: subprocess.run([sys.executable, "-c", "pass"]),
        "by name on PATH": lambda: subprocess.run(["python", "-c", "pass"]),
        "as executable=": lambda: subprocess.run(["anything", "-c", "pass"], executable=sys.executable),
        "a command string": lambda: subprocess.run(f"{sys.executable} -c pass", shell=True),
        "os.fork": os.fork,
        "os.posix_spawn": lambda: os.posix_spawn(sys.executable, [sys.executable, "-c", "pass"], os.environ),
        "multiprocessing (spawn)": lambda: multiprocessing.get_context("spawn").Process(target=print).start(),
        "multiprocessing (fork)": lambda: multiprocessing.get_context("fork").Process(target=print).start(),
    }
    if sys.prefix != sys.base_prefix:  # a script of the venv (make test's)
        launches["a venv script"] = lambda: subprocess.run([str(Path(sys.executable).parent / "sttpfast"), "--help"])
    for name, launch in launches.items():
        with pytest.raises(AssertionError, match=said):
            launch()
            pytest.fail(f"{name}: launched")
    assert subprocess.run(["true"]).returncode == 0  # not Python: runs
