"""Benchmark: the data loader must not starve training (Fashion-MNIST, CPU).

Images/s of the training DataLoader alone (uint8 in memory -> random crop -> float,
normalized) against images/s of a training step of the model, same batch size.

    python bench/data_speed.py [--arch resnet20_cifar] [--params dense sttp-r]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine, markdown_table  # noqa: E402

import sttpfast  # noqa: E402
from sttpfast.data import get_dls, loader_throughput  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet20_cifar")
    ap.add_argument("--params", nargs="+", default=["dense", "sttp-r"])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--bs", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    dls = get_dls("fashion_mnist", data_dir=args.data_dir, bs=args.bs)
    loader = loader_throughput(dls.train, n_batches=200)
    rows = []
    for param in args.params:
        model = timm.create_model(args.arch, num_classes=10, in_chans=1)
        sttpfast.parameterize(model, param, rank=None if param in ("dense", "sn") else args.rank)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x, y = dls.train.one_batch()
        for _ in range(2):
            F.cross_entropy(model(x), y).backward()
        start = time.perf_counter()
        for _ in range(args.steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        step = args.bs * args.steps / (time.perf_counter() - start)
        rows.append([args.arch, param, f"{loader:,.0f}", f"{step:,.0f}", f"{loader / step:.0f}x"])
    print(f"\nFashion-MNIST training loader vs training step, batch {args.bs}, augmentation on; {machine()}\n")
    print(markdown_table(["model", "param", "loader images/s", "train step images/s", "loader / step"], rows))


if __name__ == "__main__":
    main()
