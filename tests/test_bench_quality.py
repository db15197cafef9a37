"""bench/quality.py --results: finished runs are kept and reused, so the converged budget
(hours on a CPU) can run in pieces; the training itself is replaced by a stub here (what is
tested is which runs train and what the table says), the data loader too."""
import argparse
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(results, **kw):
    base = dict(arch="resnet20_cifar", subset=1000, epochs=2, bs=128, lr=0.1, wd=5e-4, data_dir=None,
                params=["sttp-r"], targets=[10.0], seeds=[0, 1], results=str(results))
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def trained(quality, monkeypatch):
    """The (param, target, seed) of every run trained; run i reaches accuracy 0.5 + i / 100."""
    calls = []

    def train_one(dls, arch, param, compression, args, seed=None, **kwargs):
        calls.append((param, compression, seed))
        return SimpleNamespace(z=100.0 if param == "dense" else 9.5, rank=14), 0.5 + len(calls) / 100, 0.01
    monkeypatch.setattr(quality, "train_one", train_one)
    monkeypatch.setattr(quality, "get_dls", lambda *a, **kw: object())
    return calls


def test_runs_are_kept_and_reused(quality, trained, tmp_path):
    results = tmp_path / "runs.jsonl"
    rows, points, runs = quality.classification_rows(_args(results, seeds=[0]))
    assert trained == [("dense", None, 0), ("sttp-r", 10.0, 0)]
    assert (runs.trained, runs.reused) == (2, 0)
    assert rows == [["dense", "-", "-", "100.00", "51.00", "51.00", "0"],
                    ["sttp-r", "10", "14", "9.50", "52.00", "52.00", "0"]]
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["param"], r["target"], r["seed"], r["accuracy"], r["rank"]) for r in lines] == [
        ("dense", None, 0, 51.0, "14"), ("sttp-r", 10.0, 0, 52.0, "14")]
    # the second seed is a new piece: only its runs train, the first seed's are read back
    rows, points, runs = quality.classification_rows(_args(results, seeds=[0, 1]))
    assert trained[2:] == [("dense", None, 1), ("sttp-r", 10.0, 1)]
    assert (runs.trained, runs.reused) == (2, 2)
    assert rows[1][4:6] == ["53.00", "52.00 / 54.00"]
    assert points == {"dense": [(100.0, 52.0)], "sttp-r": [(9.5, 53.0)]}
    # everything is there now: nothing trains, the same table comes out
    assert quality.classification_rows(_args(results))[0] == rows and len(trained) == 4


def test_params_dense_is_the_dense_row_alone(quality, trained, tmp_path):
    """`--params dense` (the dense run of a seed alone): the table is its row (the table
    phase asked for dense at each target Z and died after the run had trained)."""
    rows, points, runs = quality.classification_rows(_args(tmp_path / "runs.jsonl", params=["dense"], seeds=[1]))
    assert trained == [("dense", None, 1)]
    assert rows == [["dense", "-", "-", "100.00", "51.00", "51.00", "0"]]


def test_another_budget_trains_again(quality, trained, tmp_path):
    results = tmp_path / "runs.jsonl"
    quality.classification_rows(_args(results, seeds=[0]))
    quality.classification_rows(_args(results, seeds=[0], epochs=15))
    assert trained == [("dense", None, 0), ("sttp-r", 10.0, 0)] * 2
    assert len(results.read_text().splitlines()) == 4


@pytest.mark.parametrize("line, why", [('{"param": "dense"}', "KeyError: 'target'"),
                                       ("{not json", "JSONDecodeError: Expecting property name enclosed in "
                                                     "double quotes: line 1 column 2 (char 1)")])
def test_a_broken_results_file_is_refused(quality, trained, tmp_path, capsys, line, why):
    results = tmp_path / "runs.jsonl"
    results.write_text(line + "\n")
    with pytest.raises(SystemExit) as exit_:
        quality.classification_rows(_args(results))
    assert exit_.value.code == 2 and trained == []
    assert capsys.readouterr().err == f"Error: {results} line 1 is not a run record ({why})\n"


def test_results_is_refused_with_vit(quality, trained, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        quality.main(["--vit", "--results", str(tmp_path / "runs.jsonl")])
    assert exit_.value.code == 2 and trained == []
    # (argparse names the program after sys.argv[0]: pytest's here)
    assert capsys.readouterr().err.splitlines()[-1].split(": ", 1)[1] == (
        "error: --results keeps the classification table's runs; --vit runs without it")


DENSE_SEED_0 = ["dense", "-", "-", "100.00", "93.91", "93.91", "3259"]
DENSE_SEEDS_0_1 = ["dense", "-", "-", "100.00", "93.75", "93.91 / 93.59", "4102"]
#: each piece of the converged budget as the README prints it: (seeds, params, targets, runs reused, rows)
COMMITTED_PIECES = [
    ([0], ["sttp-r", "cp"], [10.0], 3, [DENSE_SEED_0, ["sttp-r", "10", "14", "10.00", "92.69", "92.69", "3397"],
                                ["cp", "10", "15", "9.84", "92.58", "92.58", "2378"]]),
    # the dense network's second seed (`--params dense --seeds 1`)
    ([0, 1], ["dense"], [10.0], 2, [DENSE_SEEDS_0_1]),
    # both seeds of STTP-R and CP at Z 10% (seed 1: `--params sttp-r --targets 10 --seeds 1`, then cp)
    ([0, 1], ["sttp-r", "cp"], [10.0], 6, [DENSE_SEEDS_0_1, ["sttp-r", "10", "14", "10.00", "92.67", "92.69 / 92.65", "3539"],
                                   ["cp", "10", "15", "9.84", "92.59", "92.58 / 92.60", "2641"]]),
    # Tucker-2 at Z 10%, seed 0 (`--params tucker --targets 10 --seeds 0`; rank 8 gives Z 9.48%), then seed 1
    ([0], ["tucker"], [10.0], 2, [DENSE_SEED_0, ["tucker", "10", "8", "9.48", "92.15", "92.15", "4180"]]),
    ([0, 1], ["tucker"], [10.0], 4, [DENSE_SEEDS_0_1, ["tucker", "10", "8", "9.48", "92.22", "92.15 / 92.28", "4521"]]),
    # SVDP-R at Z 10%, seed 0 (`--params svdp-r --targets 10 --seeds 0`; rank 4 gives Z 10.56%), then seed 1
    ([0], ["svdp-r"], [10.0], 2, [DENSE_SEED_0, ["svdp-r", "10", "4", "10.56", "91.00", "91.00", "3153"]]),
    ([0, 1], ["svdp-r"], [10.0], 4, [DENSE_SEEDS_0_1, ["svdp-r", "10", "4", "10.56", "91.02", "91.00 / 91.03", "3079"]]),
    # low rank (spectral init, Frobenius decay) at Z 10%, seed 0 (`--params lowrank --targets 10 --seeds 0`)
    ([0], ["lowrank"], [10.0], 2, [DENSE_SEED_0, ["lowrank", "10", "4", "10.69", "91.91", "91.91", "2774"]]),
    ([0, 1], ["lowrank"], [10.0], 4, [DENSE_SEEDS_0_1, ["lowrank", "10", "4", "10.69", "91.79", "91.91 / 91.67", "3118"]]),
    # TT at Z 10%, seed 0 (`--params tt --targets 10 --seeds 0`; rank 5 gives Z 8.88%)
    ([0], ["tt"], [10.0], 2, [DENSE_SEED_0, ["tt", "10", "5", "8.88", "92.27", "92.27", "3197"]]),
    # TR at Z 10%, seed 0 (`--params tr --targets 10 --seeds 0`; rank 4 gives Z 10.23%)
    ([0], ["tr"], [10.0], 2, [DENSE_SEED_0, ["tr", "10", "4", "10.23", "92.38", "92.38", "8147"]]),
    # STTP-R at Z 5% and 2%, seed 0 (`--params sttp-r --targets 5 --seeds 0`, then 2; ranks 8 and 3),
    # and README's curve of its seed 0 (`--params sttp-r --targets 2 5 10 --seeds 0`)
    ([0], ["sttp-r"], [5.0], 2, [DENSE_SEED_0, ["sttp-r", "5", "8", "4.90", "91.18", "91.18", "4127"]]),
    ([0], ["sttp-r"], [2.0], 2, [DENSE_SEED_0, ["sttp-r", "2", "3", "1.91", "86.73", "86.73", "4272"]]),
    ([0], ["sttp-r"], [2.0, 5.0, 10.0], 4, [DENSE_SEED_0, ["sttp-r", "2", "3", "1.91", "86.73", "86.73", "4272"],
                                             ["sttp-r", "5", "8", "4.90", "91.18", "91.18", "4127"],
                                             ["sttp-r", "10", "14", "10.00", "92.69", "92.69", "3397"]]),
    # CP at Z 5%, seed 0 (`--params cp --targets 5 --seeds 0`; rank 6 gives Z 4.75%), and beside STTP-R's
    ([0], ["cp"], [5.0], 2, [DENSE_SEED_0, ["cp", "5", "6", "4.75", "91.10", "91.10", "3138"]]),
    ([0], ["sttp-r", "cp"], [5.0], 3, [DENSE_SEED_0, ["sttp-r", "5", "8", "4.90", "91.18", "91.18", "4127"],
                                      ["cp", "5", "6", "4.75", "91.10", "91.10", "3138"]]),
    # CP at Z 2%, seed 0 (`--params cp --targets 2 --seeds 0`; rank 1 gives Z 1.75%, rank 2 2.35%), and CP's
    # curve of seed 0 beside STTP-R's (`--params sttp-r cp --targets 2 5 10 --seeds 0`)
    ([0], ["cp"], [2.0], 2, [DENSE_SEED_0, ["cp", "2", "1", "1.75", "66.48", "66.48", "1805"]]),
    ([0], ["sttp-r", "cp"], [2.0, 5.0, 10.0], 7,
     [DENSE_SEED_0, ["sttp-r", "2", "3", "1.91", "86.73", "86.73", "4272"], ["cp", "2", "1", "1.75", "66.48", "66.48", "1805"],
      ["sttp-r", "5", "8", "4.90", "91.18", "91.18", "4127"], ["cp", "5", "6", "4.75", "91.10", "91.10", "3138"],
      ["sttp-r", "10", "14", "10.00", "92.69", "92.69", "3397"], ["cp", "10", "15", "9.84", "92.58", "92.58", "2378"]]),
    # README's table: the five methods at Z 10%, both seeds (`--params sttp-r cp tucker svdp-r lowrank ...`)
    ([0, 1], ["sttp-r", "cp", "tucker", "svdp-r", "lowrank"], [10.0], 12,
     [DENSE_SEEDS_0_1, ["sttp-r", "10", "14", "10.00", "92.67", "92.69 / 92.65", "3539"],
      ["cp", "10", "15", "9.84", "92.59", "92.58 / 92.60", "2641"],
      ["tucker", "10", "8", "9.48", "92.22", "92.15 / 92.28", "4521"],
      ["svdp-r", "10", "4", "10.56", "91.02", "91.00 / 91.03", "3079"],
      ["lowrank", "10", "4", "10.69", "91.79", "91.91 / 91.67", "3118"]]),
]


def test_the_committed_converged_runs_are_read_back_under_the_default_budget(quality, trained, tmp_path):
    """bench/results/quality.jsonl (the README's converged piece) is reused by the default
    budget: each piece's table comes out without training anything."""
    committed = ROOT / "bench" / "results" / "quality.jsonl"
    results = tmp_path / "runs.jsonl"
    results.write_text(committed.read_text())
    for seeds, params, targets, reused, want in COMMITTED_PIECES:
        rows, _, runs = quality.classification_rows(_args(results, subset=0, epochs=15, seeds=seeds, params=params,
                                                          targets=targets))
        assert trained == [] and (runs.trained, runs.reused) == (0, reused), (seeds, params)
        assert rows == want, (seeds, params)
