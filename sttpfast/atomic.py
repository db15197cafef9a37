"""Crash-safe writing: single files and checkpoint folders that a kill can never leave half-written.

Every learner (classifier, GAN) writes through this module, so that one sequence is trusted:

* a file: written to a temporary in the same folder (``.NAME.tmp-PID-RANDOM``), flushed and
  fsync'd, renamed over ``NAME`` (atomic on POSIX), then the folder is fsync'd so that the
  rename itself survives a power loss;
* a checkpoint: every file written into a temporary folder (``.tmp-ckpt-STEP-PID-RANDOM``),
  then ``manifest.json`` (each file's size and sha256) last, the folder renamed to
  ``ckpt-STEP``, and only then the pointers (``last``, ``best``: symbolic links, swapped by
  one rename) moved to it. The previous complete checkpoint stays until the new one is in
  place, so at every instant a complete checkpoint exists; :func:`latest_complete` finds the
  newest one whose files match their manifest (the pointers are for people, resuming does
  not trust them).

Temporary names carry the process id and a random part, so two processes never share one;
:func:`clean_temporaries` removes those left by dead processes.

For tests, ``STTPFAST_CRASH_AT=POINT[:N]`` kills the process with SIGKILL the N-th time
(default first) the write sequence reaches ``POINT`` (see :data:`CRASH_POINTS`), and
``STTPFAST_STALL_AT=POINT[:N]`` holds it there for :data:`STALL_SECONDS` instead (a disk that
hangs), after saying so on stderr.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence, Union

__all__ = ["write_file", "write_beside", "write_checkpoint", "set_pointer", "read_pointer", "verify_checkpoint",
           "latest_complete", "checkpoints", "prune_checkpoints", "clean_temporaries", "CRASH_POINTS",
           "MANIFEST", "DamagedCheckpoints", "unwritable_reason", "try_making"]

MANIFEST = "manifest.json"
# the named moments of the write sequence, in order (the chaos test kills at each)
CRASH_POINTS = ("file-temp-written",      # a file's temporary is written, not yet renamed
                "file-renamed",           # a file renamed into place, folder not yet fsync'd
                "checkpoint-files",       # a checkpoint's data files written, no manifest yet
                "checkpoint-manifest",    # manifest written, folder still temporary
                "checkpoint-renamed",     # ckpt-STEP in place, pointers not yet moved
                "pointer-moved",          # a pointer moved, older checkpoints not yet pruned
                "pruned")                 # older checkpoints removed
_CKPT = re.compile(r"^ckpt-(\d+)(?:\.(\d+))?$")
_TEMP = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}$")

FileContent = Union[bytes, str, Callable[[Path], None]]


class DamagedCheckpoints(ValueError):
    """No complete checkpoint: the message names every damaged file."""


# ---------------------------------------------------------------------------------------
# test hooks
STALL_SECONDS = 120
_hits: dict[tuple[str, str], int] = {}


def _hit(variable: str, name: str) -> bool:
    """Whether the environment ``variable`` (``POINT[:N]``) names this visit of point ``name``."""
    point, _, nth = os.environ.get(variable, "").partition(":")
    if point != name:
        return False
    _hits[variable, name] = _hits.get((variable, name), 0) + 1
    return _hits[variable, name] == int(nth or 1)


def _crash_point(name: str) -> None:
    """Kill this process here if ``STTPFAST_CRASH_AT`` names this point, or stall it here if
    ``STTPFAST_STALL_AT`` does (tests only)."""
    if _hit("STTPFAST_CRASH_AT", name):
        os.kill(os.getpid(), signal.SIGKILL)
    if _hit("STTPFAST_STALL_AT", name):
        print(f"STTPFAST_STALL_AT: stalled at {name} for {STALL_SECONDS} s", file=sys.stderr, flush=True)
        time.sleep(STALL_SECONDS)


# ---------------------------------------------------------------------------------------
def _temp_name(name: str) -> str:
    return f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename is durable only after this)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_content(path: Path, content: FileContent) -> None:
    """Write ``content`` (bytes, text, or a function that writes the file at the path it is
    given) to ``path`` and fsync it."""
    if callable(content):
        content(path)
        os.chmod(path, _open_mode())  # the writer's own file may be owner-only (safetensors')
    else:
        data = content.encode("utf-8") if isinstance(content, str) else content
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
    _fsync(path)


def write_file(path: str | os.PathLike, content: FileContent) -> Path:
    """Replace ``path`` atomically and durably with ``content``: after a crash it holds the old
    or the new content, never a mix, never an empty file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(_temp_name(path.name))
    try:
        _write_content(tmp, content)
        _crash_point("file-temp-written")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _crash_point("file-renamed")
    _fsync(path.parent)
    return path


def write_beside(path: str | os.PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    For writers that want a file name of their own choosing (safetensors, ONNX): the
    temporary (``mkstemp``'s, and safetensors' own file, are owner-only) is given the mode
    ``open()`` would give (0666 less the umask) before the rename, like every other file of a
    run. The temporary's name holds this process's pid: the ones of writers that have ended
    (killed mid-write) are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries_of(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _open_mode())  # after writing: a writer may replace the file (safetensors: 0600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _remove_stale_temporaries_of(path: Path) -> None:
    """Remove ``write_beside``'s temporaries of ``path`` whose writer is no longer running."""
    prefix = f".{path.name}.tmp-"
    try:
        entries = [e for e in path.parent.iterdir() if e.name.startswith(prefix)]
    except OSError:  # a folder that can be written but not listed: nothing to tidy
        return
    for entry in entries:
        pid = entry.name[len(prefix):].split("-", 1)[0]
        try:
            if pid.isdigit() and not _alive(int(pid)):
                entry.unlink(missing_ok=True)
        except (OSError, OverflowError):  # another user's file, a pid no process can have: leave it
            pass


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why :func:`write_beside` could not write ``path`` (a file on the way is not a folder, a
    folder that takes no file such as ``/proc``, no permission), or None. Found by doing it:
    the missing folders are made and a temporary file created beside ``path``, then all of
    it is removed again (nothing is left either way)."""
    path = Path(path)
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    err = try_making(path.parent, existing, probe_file=f".{path.name}.")
    return None if err is None else err.strerror or str(err)


def try_making(folder: Path, existing: Path, probe_file: str | None = None) -> OSError | None:
    """Make the missing folders from ``existing`` (an ancestor that exists) down to
    ``folder``, and a temporary file named ``probe_file...`` in it if given, then remove all
    of it again; the OSError that stopped it (its ``filename`` the path that failed), or None."""
    missing = []
    while folder != existing:
        missing.append(folder)
        folder = folder.parent
    made = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            made.append(folder)
        if probe_file is not None:
            fd, tmp = tempfile.mkstemp(dir=missing[0] if missing else existing, prefix=probe_file, suffix=".probe")
            os.close(fd)
            os.unlink(tmp)
    except OSError as err:
        return err
    finally:
        for folder in reversed(made):
            folder.rmdir()
    return None


def _open_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the umask."""
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _step_key(folder: Path) -> tuple[int, int]:
    m = _CKPT.match(folder.name)
    return (int(m.group(1)), int(m.group(2) or 0))


def checkpoints(root: str | os.PathLike) -> list[Path]:
    """The ``ckpt-*`` folders under ``root``, newest (highest step, then latest written) first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _CKPT.match(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=_step_key, reverse=True)


def write_checkpoint(root: str | os.PathLike, step: int, files: dict[str, FileContent],
                     manifest: dict | None = None) -> Path:
    """Write ``files`` (name -> content) as the complete checkpoint ``root/ckpt-STEP`` and
    return its path. ``manifest`` (JSON-able) is stored in ``manifest.json`` next to each
    file's size and sha256. A second checkpoint of the same step gets ``ckpt-STEP.1``, ...
    Nothing existing is touched: move a pointer with :func:`set_pointer` afterwards."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name, n = f"ckpt-{step:08d}", 0
    while (root / name).exists():
        n += 1
        name = f"ckpt-{step:08d}.{n}"
    tmp = root / _temp_name(name)
    tmp.mkdir()
    try:
        entries = {}
        for fname, content in files.items():
            _write_content(tmp / fname, content)
            entries[fname] = {"size": (tmp / fname).stat().st_size, "sha256": _sha256(tmp / fname)}
        _crash_point("checkpoint-files")
        _write_content(tmp / MANIFEST, json.dumps({"step": step, "files": entries, **(manifest or {})}, indent=1))
        _fsync(tmp)
        _crash_point("checkpoint-manifest")
        os.rename(tmp, root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(root)
    _crash_point("checkpoint-renamed")
    return root / name


def set_pointer(root: str | os.PathLike, pointer: str, target: str | os.PathLike) -> None:
    """Point ``root/pointer`` (a relative symbolic link) at the checkpoint folder ``target``,
    atomically: a new link under a temporary name renamed over the old one."""
    root = Path(root)
    tmp = root / _temp_name(pointer)
    os.symlink(Path(target).name, tmp)
    try:
        os.replace(tmp, root / pointer)
    finally:
        if tmp.is_symlink():
            tmp.unlink()
    _fsync(root)
    _crash_point("pointer-moved")


def read_pointer(root: str | os.PathLike, pointer: str) -> Path | None:
    """The checkpoint folder ``root/pointer`` points at, or None."""
    link = Path(root) / pointer
    if not link.is_symlink():
        return None
    return Path(root) / os.readlink(link)


def verify_checkpoint(folder: str | os.PathLike, only: Sequence[str] | None = None) -> list[str]:
    """What is wrong with the checkpoint ``folder`` (empty when its files match the manifest):
    one line per damaged or missing file; ``only``: just these of the manifest's files (what a
    reader of the weights needs: a damaged optimizer state does not stop an export)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        entries = manifest["files"]
    except FileNotFoundError:
        return [f"{folder / MANIFEST}: missing (the checkpoint was not finished)"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{folder / MANIFEST}: unreadable ({err})"]
    problems = []
    for fname, want in entries.items():
        if only is not None and fname not in only:
            continue
        path = folder / fname
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {want['size']}")
        elif _sha256(path) != want["sha256"]:
            problems.append(f"{path}: checksum differs from the manifest")
    return problems


def latest_complete(root: str | os.PathLike, warn: Callable[[str], None] = lambda msg: None,
                    set_aside: bool = False) -> Path:
    """The newest checkpoint under ``root`` whose files match its manifest. Each newer damaged
    one is reported through ``warn``; DamagedCheckpoints (naming the damaged files) when
    none is complete, FileNotFoundError when there is no checkpoint at all.

    ``set_aside`` (a run about to continue): the newer damaged folders are renamed
    ``damaged-ckpt-...``, kept for a look but out of the rotation; counted among the
    checkpoints :func:`prune_checkpoints` keeps, they made it delete the good one."""
    found = checkpoints(root)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {root}")
    damaged = []
    for folder in found:
        problems = verify_checkpoint(folder)
        if not problems:
            if damaged:
                aside = _set_aside([f for f, _ in damaged]) if set_aside else []
                warn(f"checkpoint {damaged[-1][0].name} is damaged ({'; '.join(damaged[-1][1])}); "
                     f"falling back to {folder.name}, the newest complete checkpoint"
                     + (f"; the damaged one is kept as {', '.join(p.name for p in aside)}, out of the rotation"
                        if aside else ""))
            return folder
        damaged.append((folder, problems))
    raise DamagedCheckpoints("no complete checkpoint in " + str(root) + ": "
                             + "; ".join(p for _, problems in damaged for p in problems))


def _set_aside(folders: list[Path]) -> list[Path]:
    """Rename each checkpoint folder ``damaged-NAME`` (``damaged-NAME.1``... if taken)."""
    moved = []
    for folder in folders:
        target, n = folder.with_name(f"damaged-{folder.name}"), 0
        while target.exists():
            n += 1
            target = folder.with_name(f"damaged-{folder.name}.{n}")
        os.replace(folder, target)
        moved.append(target)
    _fsync(folders[0].parent)
    return moved


def prune_checkpoints(root: str | os.PathLike, keep: int = 2, pointers: tuple[str, ...] = ("last", "best")) -> None:
    """Remove checkpoint folders older than the newest ``keep`` finished ones (those with a
    manifest), except those a pointer names."""
    root = Path(root)
    named = {p.name for p in (read_pointer(root, n) for n in pointers) if p is not None}
    finished = 0
    for folder in checkpoints(root):
        if finished < keep:
            finished += (folder / MANIFEST).is_file()
        elif folder.name not in named:
            shutil.rmtree(folder, ignore_errors=True)
    _crash_point("pruned")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove temporaries (files, folders, links) left in ``folder`` by processes that are no
    longer running; returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TEMP.match(entry.name)
        if m is None or (_alive(int(m.group(1))) and int(m.group(1)) != os.getpid()):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
