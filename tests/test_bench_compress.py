"""bench/compress.py --teacher: a dense run trained before is reused with its own data budget;
anything but a dense run is refused with one line."""
import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_compress", ROOT / "bench" / "compress.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(path: Path, param: str) -> Path:
    path.mkdir()
    (path / "config.yaml").write_text(yaml.safe_dump({
        "data": {"subset": 12000, "bs": 64}, "optim": {"epochs": 4}, "train": {"seed": 3},
        "param": {"name": param}}))
    (path / "summary.json").write_text(json.dumps({"metrics": {"accuracy": 0.8713}}))
    return path


def test_teacher_budget_comes_from_its_run(tmp_path):
    args = argparse.Namespace(subset=1, dense_epochs=1, bs=128, seed=0)
    run, accuracy = _bench().existing_teacher(_run(tmp_path / "dense", "dense"), args)
    assert run == tmp_path / "dense" and accuracy == 0.8713
    assert (args.subset, args.dense_epochs, args.bs, args.seed) == (12000, 4, 64, 3)


def test_a_compressed_run_is_not_a_teacher(tmp_path, capsys):
    args = argparse.Namespace(subset=1, dense_epochs=1, bs=128, seed=0)
    with pytest.raises(SystemExit) as exit_:
        _bench().existing_teacher(_run(tmp_path / "sttp-r", "sttp-r"), args)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"Error: {tmp_path / 'sttp-r'} is a sttp-r run, not a dense one\n"


def test_a_folder_without_a_finished_run_is_not_a_teacher(tmp_path, capsys):
    run = tmp_path / "dense"
    run.mkdir()
    (run / "config.yaml").write_text("param: {name: dense}\n")  # trained, but no summary yet
    with pytest.raises(SystemExit) as exit_:
        _bench().existing_teacher(run, argparse.Namespace())
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (f"Error: {run} is not a finished run (FileNotFoundError: [Errno 2] "
                                       f"No such file or directory: '{run / 'summary.json'}')\n")
