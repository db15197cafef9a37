"""``download=True`` without a network: one clear DatasetNotFound, no partial files left behind.

The network is simulated by replacing ``urllib.request.urlopen`` (what torchvision's downloads
call): either it cannot reach the host at all, or the connection breaks after half a file.
"""
from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

import sttpfast.data.readers.idx as idx_reader
from sttpfast.data import DatasetNotFound, get_dls

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def no_network(request, *args, **kwargs):
    """What urlopen does when DNS cannot be reached."""
    raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))


class BrokenConnection:
    """Stands in for urlopen: every response delivers one chunk, then the connection resets.

    Records, when the connection breaks, which files exist under ``watch`` (the half-written
    download), so a test can check that they existed and were removed."""

    def __init__(self, watch: Path):
        self.watch, self.seen = watch, []

    def __call__(self, request, *args, **kwargs):
        return _HalfResponse(request.full_url, self)


class _HalfResponse:
    def __init__(self, url: str, connection: BrokenConnection):
        self.url, self.length, self.connection, self.sent = url, 1_000_000, connection, False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, n: int = -1) -> bytes:
        if not self.sent:
            self.sent = True
            return b"\x1f\x8b" + bytes(1000)  # the start of a gzip stream
        self.connection.seen += sorted(p.name for p in self.connection.watch.rglob("*") if p.is_file())
        raise ConnectionResetError(104, "Connection reset by peer")


def tree(root: Path) -> list[str]:
    """Every file and folder under ``root`` (relative), or ['<absent>']."""
    if not root.exists():
        return ["<absent>"]
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def cifar10_by_hand(root: Path) -> str:
    """The reader's own words for where the files go (the message's second half)."""
    files = ", ".join(str(root / "cifar-10-batches-py" / f)
                      for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])
    return (f"Install it by hand instead: cifar10 not found: missing {files}. Put the CIFAR-10 "
            "python version (cifar-10-python.tar.gz, extracted) there, or point --data-dir / "
            "$STTPFAST_DATA at the folder holding cifar-10-batches-py.")


@pytest.mark.parametrize("exists", [True, False])
def test_unreachable_host_one_message_and_nothing_written(tmp_path, monkeypatch, exists):
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    root = tmp_path / "data"
    if exists:  # a data dir holding other things: they stay as they are
        (root / "mnist").mkdir(parents=True)
        (root / "notes.txt").write_text("mine")
    before = tree(root)
    with pytest.raises(DatasetNotFound) as err:
        get_dls("cifar10", data_dir=root, download=True)
    assert str(err.value) == (
        f"cifar10: downloading {CIFAR10_URL} failed (URLError: <urlopen error [Errno -3] Temporary "
        f"failure in name resolution>); nothing was kept in {root}. {cifar10_by_hand(root)}")
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    assert tree(root) == before == (["mnist", "notes.txt"] if exists else ["<absent>"])


def test_connection_broken_mid_file_leaves_no_partial_file(tmp_path, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    connection = BrokenConnection(root)
    monkeypatch.setattr(urllib.request, "urlopen", connection)
    with pytest.raises(DatasetNotFound) as err:
        get_dls("cifar10", data_dir=root, download=True)
    # torchvision retries an https URL over http once: two half-written archives, both removed.
    assert connection.seen == ["cifar-10-python.tar.gz", "cifar-10-python.tar.gz"]
    assert str(err.value) == (
        f"cifar10: downloading {CIFAR10_URL} failed (ConnectionResetError: [Errno 104] Connection "
        f"reset by peer); nothing was kept in {root}. {cifar10_by_hand(root)}")
    assert tree(root) == []


def test_mnist_all_mirrors_failing_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    root = tmp_path / "data"
    with pytest.raises(DatasetNotFound) as err:
        get_dls("mnist", data_dir=root, download=True)
    mirrors = torchvision.datasets.MNIST.mirrors
    tried = " ".join(f"Tried {m}, got: <urlopen error [Errno -3] Temporary failure in name resolution>"
                     for m in mirrors)
    dirs = ", ".join(str(d) for d in (root / "mnist", root / "MNIST" / "raw", root))
    assert str(err.value) == (
        f"mnist: downloading {mirrors[0]}train-images-idx3-ubyte.gz failed (RuntimeError: Error "
        f"downloading train-images-idx3-ubyte.gz: {tried}); nothing was kept in {root}. Install it "
        f"by hand instead: mnist not found: expected the IDX files {', '.join(idx_reader.IDX_FILES)} "
        f"(each plain or .gz) in one of: {dirs}. Put the four MNIST IDX files there, or point "
        f"--data-dir / $STTPFAST_DATA at the folder holding mnist/ or MNIST/raw/.")
    assert tree(root) == ["<absent>"]


def test_cli_download_failure_is_one_error_line(tmp_path, monkeypatch):
    from sttpfast.cli import main

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    root = tmp_path / "data"
    root.mkdir()
    result = CliRunner().invoke(main, ["train", "cifar10", "--data-dir", str(root), "--download",
                                       "--out", str(tmp_path / "runs"), "--epochs", "1"])
    assert result.exit_code == 2
    # the one error line (the rank line comes only once the data and the model are good)
    assert result.output == (
        f"Error: cifar10: downloading {CIFAR10_URL} failed (URLError: <urlopen error [Errno -3] "
        f"Temporary failure in name resolution>); nothing was kept in {root}. "
        f"{cifar10_by_hand(root)}\n")
    assert tree(root) == []


def _fake_cifar10(write_batches, calls):
    """A torchvision CIFAR10 stand-in whose 'download' writes the given batch files."""

    class FakeCIFAR10:
        url = CIFAR10_URL

        def __init__(self, root, train, download):
            calls.append(Path(root))
            write_batches(Path(root) / "cifar-10-batches-py")

    return FakeCIFAR10


def test_incomplete_download_is_not_kept(tmp_path, monkeypatch):
    import torchvision.datasets

    from test_data import write_cifar  # pytest puts tests/ on sys.path

    def three_batches_only(folder: Path):  # e.g. an archive whose layout changed
        write_cifar(folder.parent, n=2)
        for name in ("data_batch_4", "data_batch_5", "test_batch"):
            (folder / name).unlink()

    calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _fake_cifar10(three_batches_only, calls))
    root = tmp_path / "data"
    with pytest.raises(DatasetNotFound) as err:
        get_dls("cifar10", data_dir=root, download=True)
    [staging] = calls
    missing = ", ".join(str(staging / "cifar-10-batches-py" / f) for f in ("data_batch_4", "data_batch_5", "test_batch"))
    assert str(err.value) == (
        f"cifar10: downloading {CIFAR10_URL} failed (DatasetNotFound: cifar10 not found: missing "
        f"{missing}.); nothing was kept in {root}. {cifar10_by_hand(root)}")
    assert tree(root) == ["<absent>"]


def test_download_completes_a_partial_folder_keeping_the_users_files(tmp_path, monkeypatch):
    import torchvision.datasets

    from test_data import write_cifar  # pytest puts tests/ on sys.path

    root = tmp_path / "data"
    write_cifar(root, n=3, seed=1)
    folder = root / "cifar-10-batches-py"
    mine = (folder / "data_batch_1").read_bytes()
    (folder / "test_batch").unlink()  # the user's copy lacks the test batch
    calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10",
                        _fake_cifar10(lambda f: write_cifar(f.parent, n=5, seed=2), calls))
    dls = get_dls("cifar10", data_dir=root, bs=4, download=True, device="cpu")
    assert (folder / "data_batch_1").read_bytes() == mine  # kept, not overwritten
    assert dls.train.n == 5 * 3 and dls.valid.n == 5  # the user's five batches, the downloaded test batch
    assert tree(root) == ["cifar-10-batches-py"] + [f"cifar-10-batches-py/{n}" for n in sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])]


def test_data_dir_that_cannot_be_created(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    (tmp_path / "a_file").write_text("not a folder")
    root = tmp_path / "a_file" / "data"
    with pytest.raises(DatasetNotFound) as err:
        get_dls("cifar10", data_dir=root, download=True)
    assert str(err.value) == (
        f"cifar10: cannot create a folder in the data dir {root} (NotADirectoryError: [Errno 20] "
        f"Not a directory: '{root}'). {cifar10_by_hand(root)}")
    assert tree(tmp_path) == ["a_file"]
