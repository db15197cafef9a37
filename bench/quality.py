"""Benchmark 3: compression vs accuracy on Fashion-MNIST (real data, installs offline).

Dense against every low-rank method (STTP-R, SVDP-R, low-rank with spectral init and
Frobenius decay, and the tensor layers CP, Tucker-2, TT, TR, HT) at matched Z: each method
gets the shared rank whose Z is closest to the target (its own rank knob: an int, TT/TR
bonds, a Tucker pair, an HT tree); a target below what rank 1 gives is reported as
unreachable, not silently replaced. Same model, data, schedule and budget for every row;
every configuration runs once per seed (``--seeds``), and the table gives the mean and each
seed's accuracy. ``--plot FILE`` draws accuracy against Z (mean, one line per method, dense
as a horizontal line).

    python bench/quality.py                                  # the budget: 60k images, 15 epochs, 2 seeds
    python bench/quality.py --subset 10000 --epochs 2 --seeds 0   # a quick look (not converged)
    python bench/quality.py --arch wrn16_4 --epochs 30               # the GPU budget
    python bench/quality.py --vit --targets 25 10 --lr 2e-3 --wd 0.05    # small ViT, Q-K / O-V forms
    python bench/quality.py --results quality.jsonl --params sttp-r --targets 10   # one piece of the budget

``--results FILE`` keeps every finished run (one JSON line: budget, method, target, seed,
Z, rank, accuracy, seconds) and reuses the runs of the same budget already in it, so the
default budget can be run in pieces (a method, a target or a seed at a time, on several
machines whose files are concatenated) and the last piece prints the whole table.

The default budget (ResNet-20, all 60k training images, 15 epochs one-cycle SGD) is where
the dense network has converged (93.91% test accuracy, seed 0). Measured here: about 55
minutes per configuration on one CPU core (dense 3259 s, STTP-R 3397 s, one torch thread),
so the 50 runs (8 methods x 3 targets x 2 seeds, dense x 2 seeds) are about 46 core-hours:
run it in pieces, or on a GPU. ``bench/results/quality.jsonl`` holds the runs finished so far
(pass it as ``--results`` to go on from them).

Needs Fashion-MNIST: ``apt-get install dataset-fashion-mnist`` (or --data-dir).
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
import warnings
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine, markdown_table  # noqa: E402

import sttpfast  # noqa: E402
from sttpfast.data import get_dls  # noqa: E402
from sttpfast.data.registry import DATASETS  # noqa: E402
from sttpfast.learner import fit, spectral_learner  # noqa: E402


FASHION = DATASETS["fashion_mnist"]

#: every low-rank method of the table (the registry's names)
METHODS = ["sttp-r", "svdp-r", "lowrank", "cp", "tucker", "tt", "tr", "ht"]


def train_one(dls, arch, param, compression, args, seed=None, **kwargs):
    torch.manual_seed(args.seed if seed is None else seed)
    learn = spectral_learner(dls, arch, param=param, compression=compression, lr=args.lr, wd=args.wd,
                             sv_every=10**9, opt=getattr(args, "opt", "sgd"), **kwargs)
    learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == "ProgressCallback"])
    start = time.perf_counter()
    fit(learn, epochs=args.epochs, lr=args.lr, schedule="one_cycle")
    learn.seconds_per_step = (time.perf_counter() - start) / max(1, learn.train_iter)
    values = learn.recorder.values[-1]
    names = list(learn.recorder.metric_names[1:-1])
    return learn.compression, float(values[names.index("accuracy")]), learn.seconds_per_step


def vit_rows(dls, args) -> list[list[str]]:
    """``--vit``: a small ViT dense vs lowrank / SVDP / STTP on the linears only vs with the
    per-head Q-K / O-V forms (``--attention qk-ov``), at each target Z. With the forms, the
    attention takes rank per head ``round(target * head_dim / 100)`` (its weights then sit at
    about the target) and the other layers' rank is chosen for the target Z overall."""
    model_kwargs = dict(depth=args.depth)
    head_dim = 192 // 3  # vit_tiny_p4_32: width 192, 3 heads
    rows = []
    report, acc, dense_step = train_one(dls, args.arch, "dense", None, args, model_kwargs=model_kwargs)
    rows.append(["dense", "-", "-", "-", f"{report.z:.2f}", f"{100 * acc:.2f}", "1.00"])
    print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    for target in args.targets:
        for param in args.params:
            for attention in (None, "qk-ov"):
                head_rank = max(1, round(target * head_dim / 100)) if attention else None
                try:
                    report, acc, step = train_one(dls, args.arch, param, target, args, model_kwargs=model_kwargs,
                                                  attention=attention, attention_rank=head_rank)
                except ValueError as err:  # a target below what rank 1 gives
                    rows.append([param, attention or "linears only", f"{target:g}", "-", "-", f"unreachable: {err}", "-"])
                else:
                    ranks = {r.rank for r in report.rows if not r.param.startswith("attn-")}
                    rank = "/".join(str(r) for r in sorted(ranks)) + (f", {head_rank}/head" if attention else "")
                    rows.append([param, attention or "linears only", f"{target:g}", rank, f"{report.z:.2f}",
                                 f"{100 * acc:.2f}", f"{step / dense_step:.2f}"])
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


#: what makes two runs the same run: the budget (arguments) and the configuration
BUDGET_KEYS = ("arch", "subset", "epochs", "bs", "lr", "wd")


class Results:
    """Finished runs, one JSON object per line of ``path`` (or in memory only without one):
    the budget (:data:`BUDGET_KEYS`), ``param``, ``target``, ``seed``, and what the run gave:
    ``z``, ``rank``, ``accuracy`` (%), ``seconds``. A line is written as soon as its run ends."""

    def __init__(self, path: str | None, args):
        self.path, self.budget = path, {k: getattr(args, k) for k in BUDGET_KEYS}
        self.runs, self.reused, self.trained = {}, 0, 0
        if path and Path(path).exists():
            for n, line in enumerate(Path(path).read_text().splitlines(), 1):
                try:
                    record = json.loads(line)
                    key = self._key(record, record["param"], record["target"], record["seed"])
                except (ValueError, KeyError, TypeError) as err:
                    print(f"Error: {path} line {n} is not a run record ({type(err).__name__}: {err})",
                          file=sys.stderr)
                    raise SystemExit(2) from None
                self.runs[key] = record

    def _key(self, budget: dict, param: str, target, seed: int) -> tuple:
        return (*(budget[k] for k in BUDGET_KEYS), param, target, seed)

    def get(self, param: str, target, seed: int) -> dict | None:
        record = self.runs.get(self._key(self.budget, param, target, seed))
        self.reused += record is not None
        return record

    def add(self, param: str, target, seed: int, z: float, rank, accuracy: float, seconds: float) -> dict:
        record = {**self.budget, "param": param, "target": target, "seed": seed, "z": z, "rank": str(rank),
                  "accuracy": accuracy, "seconds": seconds}
        self.runs[self._key(self.budget, param, target, seed)] = record
        self.trained += 1
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record


def classification_rows(args) -> tuple[list[list[str]], dict, Results]:
    """Dense and every method at every target Z, once per seed (runs already in
    ``args.results`` are reused, not trained again). Returns the table rows,
    ``{method: [(Z %, mean accuracy %), ...]}`` for the plot (dense under ``"dense"``) and
    the runs (:class:`Results`: how many were trained now, how many reused)."""
    results = Results(getattr(args, "results", None), args)
    dls_of = {}

    def dls(seed):
        if seed not in dls_of:  # loaded only when a run needs training
            dls_of[seed] = get_dls("fashion_mnist", data_dir=args.data_dir, bs=args.bs,
                                   subset=args.subset or None, seed=seed)
        return dls_of[seed]

    def run(param, target):
        records = []
        for seed in args.seeds:
            record = results.get(param, target, seed)
            if record is None:
                started = time.perf_counter()
                report, acc, _ = train_one(dls(seed), args.arch, param, target, args, seed=seed)
                record = results.add(param, target, seed, report.z, report.rank, 100 * acc,
                                     time.perf_counter() - started)
            records.append(record)
        return (records[0]["z"], records[0]["rank"], [r["accuracy"] for r in records],
                _mean([r["seconds"] for r in records]))

    def acc_cells(accs):
        return [f"{_mean(accs):.2f}", " / ".join(f"{a:.2f}" for a in accs)]

    rows, points = [], {}
    z, _, accs, per_run = run("dense", None)
    rows.append(["dense", "-", "-", f"{z:.2f}", *acc_cells(accs), f"{per_run:.0f}"])
    points["dense"] = [(z, _mean(accs))]
    print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    for target in args.targets:
        for param in [p for p in args.params if p != "dense"]:  # dense is the first row, run once
            # the dataset's registered shape: no loader needed to judge the target
            model = timm.create_model(args.arch, num_classes=FASHION.n_classes, in_chans=FASHION.in_chans)
            with warnings.catch_warnings():  # "no shared rank gives Z within 0.5 points": judged here
                warnings.simplefilter("ignore")
                # the Z the run would reach, layers without gain left dense as in training; a
                # count only, so no spectral init (CP's ALS fit alone takes seconds per call)
                reached = sttpfast.parameterize(model, param, compression=target, init="identity").z
            if reached > 1.25 * target:  # the target is below what rank 1 gives
                rows.append([param, f"{target:g}", "-", f"min {reached:.2f}", "unreachable", "-", "-"])
            else:
                z, rank, accs, per_run = run(param, target)
                rows.append([param, f"{target:g}", rank, f"{z:.2f}", *acc_cells(accs), f"{per_run:.0f}"])
                points.setdefault(param, []).append((z, _mean(accs)))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows, points, results


def plot_accuracy_against_z(points: dict, path: str, title: str) -> None:
    """Mean test accuracy against Z (log scale), one line per method; dense as a line across."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for param, pts in points.items():
        if param == "dense":
            ax.axhline(pts[0][1], color="black", linestyle="--", label=f"dense ({pts[0][1]:.2f}%)")
            continue
        pts = sorted(pts)
        ax.plot([z for z, _ in pts], [a for _, a in pts], marker="o", label=param)
    ax.set_xscale("log")
    # 2, 5, 10, not 2x10^0: within one decade the labels are minor ticks, formatted too
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("Z, % of the dense model's parameters")
    ax.set_ylabel("test accuracy, % (mean over seeds)")
    ax.set_title(textwrap.fill(title, 80), fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet20_cifar")
    ap.add_argument("--params", nargs="+", default=None, help=f"methods (default: {' '.join(METHODS)})")
    ap.add_argument("--targets", nargs="+", type=float, default=[2.0, 5.0, 10.0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--subset", type=int, default=0, help="training images (0: all 60k)")
    ap.add_argument("--bs", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--plot", default=None, metavar="FILE", help="write accuracy against Z as a PNG")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--results", default=None, metavar="FILE",
                    help="keep finished runs in FILE (JSON lines) and reuse those of the same budget")
    ap.add_argument("--vit", action="store_true",
                    help="a small ViT (vit_tiny_p4_32 at 28 px): linears only vs with the Q-K / O-V forms")
    ap.add_argument("--depth", type=int, default=6, help="--vit: transformer blocks")
    args = ap.parse_args(argv)
    args.seed = args.seeds[0]
    if args.vit and args.results:
        ap.error("--results keeps the classification table's runs; --vit runs without it")
    if args.vit:
        if args.arch == "resnet20_cifar":
            args.arch = "vit_tiny_p4_32"
        args.params = args.params or ["sttp-r", "svdp-r", "lowrank"]
        args.opt = "adam"
        dls = get_dls("fashion_mnist", data_dir=args.data_dir, bs=args.bs, subset=args.subset or None,
                      seed=args.seed)
        rows = vit_rows(dls, args)
        print(f"\nFashion-MNIST, {args.arch} (depth {args.depth}, built for 28 px, 1 channel), "
              f"{len(dls.train.dataset)} training images, {len(dls.valid.dataset)} test images, {args.epochs} "
              f"epochs one-cycle Adam "
              f"lr {args.lr} wd {args.wd}, batch {args.bs}, seed {args.seed} (1 seed); {machine()}\n")
        print(markdown_table(["param", "attention", "target Z %", "rank", "Z %", "test accuracy %",
                              "step time / dense"], rows))
        return
    args.params = args.params or METHODS
    started = time.perf_counter()
    rows, points, results = classification_rows(args)
    hours = (time.perf_counter() - started) / 3600
    reused = f", {results.reused} more reused from {args.results}" if results.reused else ""
    budget = (f"Fashion-MNIST, {args.arch}, {args.subset or 60000} training images, 10k test images, "
              f"{args.epochs} epochs one-cycle SGD lr {args.lr} wd {args.wd}, batch {args.bs}, "
              f"seeds {', '.join(map(str, args.seeds))}")
    print(f"\n{budget}; {results.trained} runs trained in {hours:.2f} h{reused}; {machine()}\n")
    print(markdown_table(["param", "target Z %", "rank", "Z %", "test accuracy % (mean)", "per seed",
                          "s per run"], rows))
    if args.plot:
        plot_accuracy_against_z(points, args.plot, budget)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
