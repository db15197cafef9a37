"""The suite's guard for its two passes (see tests/conftest.py): a test without the
``processes`` mark may not launch a Python process while it runs beside another xdist worker."""
import multiprocessing.process
import os
import shutil
import subprocess
import sys
from pathlib import Path


def refuse_python_processes(monkeypatch, said: str) -> None:
    """Make the running test fail with AssertionError(``said``) where it would launch a Python
    process: this interpreter or a script of its virtual environment (by path, by name on
    PATH, or as ``executable=``), ``os.fork``, ``os.posix_spawn``, or a multiprocessing process
    (any start method). Other programs run as usual."""
    python = Path(sys.executable).resolve()
    # a venv's bin/ holds its scripts (sttpfast, torchrun, accelerate); outside a venv the
    # interpreter's folder is /usr/bin, whose other programs are not Python
    scripts = Path(sys.executable).parent if sys.prefix != sys.base_prefix else None
    popen_init = subprocess.Popen.__init__

    def is_python(program) -> bool:
        path = Path(shutil.which(str(program)) or str(program))
        return path.resolve() == python or (scripts is not None and path.parent == scripts)

    def checked_init(self, args, *rest, **kwargs):
        first = args[0] if isinstance(args, (list, tuple)) else str(args).split()[0]
        if is_python(kwargs.get("executable") or first):
            raise AssertionError(said)
        popen_init(self, args, *rest, **kwargs)

    def refused(*args, **kwargs):
        raise AssertionError(said)

    monkeypatch.setattr(subprocess.Popen, "__init__", checked_init)
    monkeypatch.setattr(os, "fork", refused)
    monkeypatch.setattr(os, "posix_spawn", refused)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refused)
