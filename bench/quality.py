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

The default budget (ResNet-20, all 60k training images, 15 epochs one-cycle SGD) is where
the dense network has converged; on 2 CPU cores it is about 15 minutes per configuration
(8 methods x 3 targets x 2 seeds + dense: hours; run it on a GPU).

Needs Fashion-MNIST: ``apt-get install dataset-fashion-mnist`` (or --data-dir).
"""
from __future__ import annotations

import argparse
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
from sttpfast.learner import fit, spectral_learner  # noqa: E402


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


def classification_rows(args) -> tuple[list[list[str]], dict]:
    """Dense and every method at every target Z, once per seed. Returns the table rows and
    ``{method: [(Z %, mean accuracy %), ...]}`` for the plot (dense under ``"dense"``)."""
    dls_of = {seed: get_dls("fashion_mnist", data_dir=args.data_dir, bs=args.bs, subset=args.subset or None,
                            seed=seed) for seed in args.seeds}
    dls = dls_of[args.seeds[0]]

    def run(param, target):
        accs, started = [], time.perf_counter()
        for seed in args.seeds:
            report, acc, _ = train_one(dls_of[seed], args.arch, param, target, args, seed=seed)
            accs.append(100 * acc)
        per_run = (time.perf_counter() - started) / len(args.seeds)
        return report, accs, per_run

    def acc_cells(accs):
        return [f"{_mean(accs):.2f}", " / ".join(f"{a:.2f}" for a in accs)]

    rows, points = [], {}
    report, accs, per_run = run("dense", None)
    rows.append(["dense", "-", "-", f"{report.z:.2f}", *acc_cells(accs), f"{per_run:.0f}"])
    points["dense"] = [(report.z, _mean(accs))]
    print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    for target in args.targets:
        for param in args.params:
            model = timm.create_model(args.arch, num_classes=dls.n_classes, in_chans=dls.in_chans)
            with warnings.catch_warnings():  # "no shared rank gives Z within 0.5 points": judged here
                warnings.simplefilter("ignore")
                # the Z the run would reach, layers without gain left dense as in training
                reached = sttpfast.parameterize(model, param, compression=target).z
            if reached > 1.25 * target:  # the target is below what rank 1 gives
                rows.append([param, f"{target:g}", "-", f"min {reached:.2f}", "unreachable", "-", "-"])
            else:
                report, accs, per_run = run(param, target)
                rows.append([param, f"{target:g}", str(report.rank), f"{report.z:.2f}", *acc_cells(accs),
                             f"{per_run:.0f}"])
                points.setdefault(param, []).append((report.z, _mean(accs)))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows, points


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
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 2, 5, 10, not 2x10^0
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
    ap.add_argument("--vit", action="store_true",
                    help="a small ViT (vit_tiny_p4_32 at 28 px): linears only vs with the Q-K / O-V forms")
    ap.add_argument("--depth", type=int, default=6, help="--vit: transformer blocks")
    args = ap.parse_args(argv)
    args.seed = args.seeds[0]
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
    rows, points = classification_rows(args)
    hours = (time.perf_counter() - started) / 3600
    budget = (f"Fashion-MNIST, {args.arch}, {args.subset or 60000} training images, 10k test images, "
              f"{args.epochs} epochs one-cycle SGD lr {args.lr} wd {args.wd}, batch {args.bs}, "
              f"seeds {', '.join(map(str, args.seeds))}")
    print(f"\n{budget}; {hours:.2f} h in all; {machine()}\n")
    print(markdown_table(["param", "target Z %", "rank", "Z %", "test accuracy % (mean)", "per seed",
                          "s per run"], rows))
    if args.plot:
        plot_accuracy_against_z(points, args.plot, budget)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
