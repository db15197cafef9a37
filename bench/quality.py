"""Benchmark 3: compression vs accuracy on Fashion-MNIST (real data, installs offline).

dense vs sttp-r vs svdp-r vs lowrank (spectral init + Frobenius decay) at matched Z:
each parameterization gets the global rank whose Z is closest to the target; a target
below what rank 1 gives is reported as unreachable, not silently replaced.
Same model, seed, data, schedule and budget for every row.

    python bench/quality.py                                   # CPU budget: resnet20_cifar
    python bench/quality.py --arch wrn16_4 --epochs 30 --subset 0    # the GPU budget
    python bench/quality.py --vit --targets 25 10 --lr 2e-3 --wd 0.05    # small ViT, Q-K / O-V forms

Needs Fashion-MNIST: ``apt-get install dataset-fashion-mnist`` (or --data-dir).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine, markdown_table  # noqa: E402

import sttpfast  # noqa: E402
from sttpfast.data import get_dls  # noqa: E402
from sttpfast.learner import fit, spectral_learner  # noqa: E402


def train_one(dls, arch, param, compression, args, **kwargs):
    torch.manual_seed(args.seed)
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet20_cifar")
    ap.add_argument("--params", nargs="+", default=["sttp-r", "svdp-r", "lowrank"])
    ap.add_argument("--targets", nargs="+", type=float, default=[2.0, 5.0, 10.0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--subset", type=int, default=30000, help="training images (0: all 60k)")
    ap.add_argument("--bs", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--vit", action="store_true",
                    help="a small ViT (vit_tiny_p4_32 at 28 px): linears only vs with the Q-K / O-V forms")
    ap.add_argument("--depth", type=int, default=6, help="--vit: transformer blocks")
    args = ap.parse_args(argv)
    dls = get_dls("fashion_mnist", data_dir=args.data_dir, bs=args.bs, subset=args.subset or None, seed=args.seed)
    if args.vit:
        if args.arch == "resnet20_cifar":
            args.arch = "vit_tiny_p4_32"
        args.opt = "adam"
        rows = vit_rows(dls, args)
        print(f"\nFashion-MNIST, {args.arch} (depth {args.depth}, built for 28 px, 1 channel), "
              f"{len(dls.train.dataset)} training images, {len(dls.valid.dataset)} test images, {args.epochs} "
              f"epochs one-cycle Adam "
              f"lr {args.lr} wd {args.wd}, batch {args.bs}, seed {args.seed} (1 seed); {machine()}\n")
        print(markdown_table(["param", "attention", "target Z %", "rank", "Z %", "test accuracy %",
                              "step time / dense"], rows))
        return
    rows = []
    report, acc, _ = train_one(dls, args.arch, "dense", None, args)
    rows.append(["dense", "-", "-", f"{report.z:.2f}", f"{100 * acc:.2f}"])
    print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    for target in args.targets:
        for param in args.params:
            min_z = sttpfast.parameterize(timm.create_model(args.arch, num_classes=dls.n_classes,
                                                            in_chans=dls.in_chans), param, rank=1).z
            if min_z > 1.25 * target:
                rows.append([param, f"{target:g}", "-", f"min {min_z:.2f}", "unreachable"])
            else:
                report, acc, _ = train_one(dls, args.arch, param, target, args)
                rows.append([param, f"{target:g}", str(report.rank), f"{report.z:.2f}", f"{100 * acc:.2f}"])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"\nFashion-MNIST, {args.arch}, {args.subset or 60000} training images, 10k test images, "
          f"{args.epochs} epochs one-cycle SGD lr {args.lr} wd {args.wd}, batch {args.bs}, seed {args.seed} "
          f"(1 seed); {machine()}\n")
    print(markdown_table(["param", "target Z %", "rank", "Z %", "test accuracy %"], rows))


if __name__ == "__main__":
    main()
