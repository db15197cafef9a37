"""Benchmark: compressing a trained dense resnet20_cifar on Fashion-MNIST, phase by phase.

A dense resnet20_cifar is trained once; then every method at Z ~ 10% and ~ 3% goes through
``sttpfast compress`` (phase 0 decomposition, phase 1 block-wise distillation, phase 2
fine-tuning), and the same per-layer ranks are trained from scratch with the same phase-2
budget for comparison. Prints a markdown table (accuracy after each phase, in percent).

    python bench/compress.py                                           # every method, CPU budget
    python bench/compress.py --params tucker tt --targets 10 --subset 4000 --epochs 1
    python bench/compress.py --teacher /tmp/bench-compress-XXXX/dense --params sttp-r --epochs 4

``--teacher`` reuses a dense run trained before (its subset and epochs are read from its
config, its accuracy from its summary) instead of training one.

Needs Fashion-MNIST: ``apt-get install dataset-fashion-mnist`` (or --data-dir).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine, markdown_table  # noqa: E402

from sttpfast.compress import compress_run  # noqa: E402
from sttpfast.config import ConfigError, build_config, load_yaml  # noqa: E402
from sttpfast.run import run_training  # noqa: E402

ZOO = ["cp", "rcp", "tucker", "rtk", "tt", "rtt", "tr", "rtr", "ht", "sttp-r", "svdp-r", "lowrank"]
QUIET = lambda *a: None  # noqa: E731


def dense_run(out: Path, args) -> Path:
    cfg, _ = build_config(overrides=[
        "data.name=fashion_mnist", f"data.bs={args.bs}", f"data.subset={args.subset}", "param.name=dense",
        f"optim.epochs={args.dense_epochs}", f"optim.lr={args.lr}", "log.logger=none", "log.progress=false",
        f"train.out={out}", "train.name=dense", f"train.seed={args.seed}"]
        + ([f"data.data_dir={args.data_dir}"] if args.data_dir else []))
    summary = run_training(cfg, echo=QUIET)
    return Path(summary["run_dir"]), summary["metrics"]["accuracy"]


def existing_teacher(run: Path, args):
    """A dense run trained before: its directory and accuracy; ``args`` takes its data budget.
    Anything else (another method's run, a folder without a finished run) exits with one line."""
    def refuse(why: str):
        print(f"Error: {run} {why}", file=sys.stderr)
        raise SystemExit(2)
    try:
        cfg = load_yaml(run / "config.yaml")
        accuracy = json.loads((run / "summary.json").read_text())["metrics"]["accuracy"]
    except (ConfigError, OSError, ValueError, KeyError) as err:
        refuse(f"is not a finished run ({type(err).__name__}: {err})")
    if cfg["param"]["name"] != "dense":
        refuse(f"is a {cfg['param']['name']} run, not a dense one")
    args.subset, args.dense_epochs = cfg["data"]["subset"], cfg["optim"]["epochs"]
    args.bs, args.seed = cfg["data"]["bs"], cfg["train"]["seed"]
    return run, accuracy


def scratch_run(out: Path, compressed: Path, args) -> float:
    """The compressed run's per-layer ranks trained from a fresh init with the phase-2 budget."""
    cfg, _ = build_config([compressed / "config.yaml"], overrides=[
        f"train.out={out}", f"train.name={compressed.name}-scratch", "param.init=null",
        f"optim.lr={args.lr}"])
    return run_training(cfg, echo=QUIET)["metrics"]["accuracy"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", nargs="+", default=ZOO)
    ap.add_argument("--targets", nargs="+", type=float, default=[10.0, 3.0])
    ap.add_argument("--subset", type=int, default=12000, help="training images")
    ap.add_argument("--dense-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1, help="phase 2 and from-scratch epochs")
    ap.add_argument("--distill-steps", type=int, default=20, help="phase 1 steps per block")
    ap.add_argument("--bs", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--teacher", type=Path, default=None,
                    help="a dense run directory to compress instead of training one")
    args = ap.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="bench-compress-"))
    started = time.time()
    dense, dense_acc = existing_teacher(args.teacher, args) if args.teacher else dense_run(out, args)
    print(f"dense: {100 * dense_acc:.2f}% ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    rows = [["dense", "-", "100.00", "-", "-", f"{100 * dense_acc:.2f}", "-"]]
    for target in args.targets:
        for param in args.params:
            t0 = time.time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    report = compress_run(dense, param, compression=target, phases="0,1,2", epochs=args.epochs,
                                          distill_steps=args.distill_steps, out=out / f"{param}-z{target:g}",
                                          echo=QUIET)
                except ValueError as err:
                    rows.append([param, f"{target:g}", "-", "-", "-", "-", f"({err})"])
                    continue
                scratch = scratch_run(out, Path(report["run_dir"]), args)
            p = report["phases"]
            rows.append([param, f"{target:g}", f"{p['0']['z_percent']:.2f}",
                         *(f"{100 * p[k]['accuracy']:.2f}" for k in ("0", "1", "2")), f"{100 * scratch:.2f}"])
            print(" | ".join(rows[-1]), f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    print(f"Fashion-MNIST, resnet20_cifar, {args.subset} training images, dense {args.dense_epochs} epochs, "
          f"phase 1 {args.distill_steps} steps a block, phase 2 and from scratch {args.epochs} epoch(s); "
          f"{machine()}; {time.time() - started:.0f} s in all\n")
    print(markdown_table(["method", "target Z %", "Z %", "phase 0", "phase 1", "phase 2", "from scratch"], rows))


if __name__ == "__main__":
    main()
