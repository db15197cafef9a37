"""The wheel that `pip install .` (not editable) installs holds the whole package.

A sub-package without ``__init__.py`` is left out by ``find_packages``: an editable install
still imports (it reads the source tree), the installed wheel does not.
"""
import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes  # every test here launches processes (see conftest.py)


ROOT = Path(__file__).resolve().parents[1]
# never part of a clean checkout: environments, build outputs, run folders, caches
LOCAL = {".git", ".venv", "build", "dist", "runs", "__pycache__", ".pytest_cache", ".whl"}


def _clean_copy(dst: Path) -> Path:
    """The checkout as a fresh clone has it (the developer's sttpfast/callbacks link left out)."""
    def ignore(folder, names):
        here = Path(folder)
        return [n for n in names if n in LOCAL or n.endswith(".egg-info")
                or (here / n == ROOT / "sttpfast" / "callbacks" and (here / n).is_symlink())]

    return Path(shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True))


def test_wheel_holds_every_module_and_the_console_script(tmp_path):
    src = _clean_copy(tmp_path / "src")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".",
                           "-w", str(tmp_path / "wheel")], cwd=src, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("sttpfast-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = configparser.ConfigParser()
        scripts.read_string(zf.read(entry_points).decode())

    expected = {p.relative_to(src).as_posix() for p in (src / "sttpfast").rglob("*.py")}
    expected |= {"sttpfast/" + p.relative_to(src).as_posix() for p in (src / "callbacks").rglob("*.py")}
    assert {"sttpfast/__init__.py", "sttpfast/linalg/__init__.py", "sttpfast/callbacks/__init__.py"} <= expected
    assert sorted(expected - names) == []
    assert dict(scripts["console_scripts"]) == {"sttpfast": "sttpfast.cli:main"}


def test_sdist_holds_the_configs_apps_and_tests_readme_uses(tmp_path):
    """README runs `--cfg configs/...` and `apps/*.py`; the source archive left both out."""
    import tarfile

    src = _clean_copy(tmp_path / "src")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "sdist")], cwd=src,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (archive,) = (tmp_path / "sdist").glob("sttpfast-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    expected = {p.relative_to(src).as_posix() for folder in ("configs", "apps", "tests", "bench")
                for p in (src / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert {"configs/demo.yml", "apps/train.py", "apps/gan.py"} <= expected
    assert sorted(expected - names) == []
    assert {"README.md", "Makefile", "setup.py"} <= names
