"""Benchmark: what CP's spectral init (an ALS fit per layer) costs on a timm backbone.

Builds ``ARCH`` (random weights), then times ``parameterize(model, PARAM, compression=Z)``
with the spectral init, the figure ``sttpfast train`` / ``compress`` announce before it
starts. Prints the shared rank, Z, the ALS sweep budget per layer (:func:`als_sweeps`,
min-max) and the seconds.

    python bench/cp_init.py --arch resnet18 --compression 20 --threads 1   # README's figure
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine, markdown_table  # noqa: E402

import sttpfast  # noqa: E402
from sttpfast.linalg.cp import als_sweeps  # noqa: E402
from sttpfast.params.layers import parameterized_layers  # noqa: E402


def main(argv=None) -> list[list]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--param", default="cp", choices=["cp", "rcp"])
    ap.add_argument("--compression", type=float, default=20.0)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = sttpfast.create_model(args.arch, num_classes=args.num_classes)
    start = time.perf_counter()
    report = sttpfast.parameterize(model, args.param, compression=args.compression, init="spectral")
    seconds = time.perf_counter() - start
    sweeps = [als_sweeps(tuple(p.modes), max(p.ranks)) for _, _, p in parameterized_layers(model)]
    rows = [[args.arch, args.param, report.rank, f"{report.z:.2f}", len(sweeps),
             f"{min(sweeps)}-{max(sweeps)}" if sweeps else "-", f"{seconds:.1f}"]]
    print(machine())
    print(markdown_table(["arch", "param", "rank", "Z %", "layers", "ALS sweeps (budget)", "seconds"], rows))
    return rows


if __name__ == "__main__":
    main()
