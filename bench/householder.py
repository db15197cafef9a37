"""Benchmark 1: Householder frames, forward + backward.

sttpfast's compact-WY frames vs the torch-householder package vs
``torch.linalg.householder_product``, on the frame shapes that STTP / SVDP layers of
WRN-28-10 (r = 32, 64) and the SNGAN CIFAR discriminator (r = 64) create. Every method
starts from the same reflector parameters, builds the ``n x r`` frame and back-propagates
a random linear loss. Methods run interleaved; the table gives medians and the
per-repeat speed-up of sttpfast over each baseline (median, min-max).

    python bench/householder.py [--device cuda] [--repeats 15] [--dtype float32]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved, machine, markdown_table, median, ratio_stats  # noqa: E402

import sttpfast  # noqa: E402
from sttpfast.linalg.householder import householder_frame, reflectors_from_params  # noqa: E402
from sttpfast.surgery import parameterized_layers  # noqa: E402


def model_frame_shapes() -> list[tuple[int, int, str]]:
    """Distinct (rows, cols) frames of the benchmarked models, with where they come from."""
    seen = {}
    for arch, params, ranks in [("wrn28_10", ["sttp-l", "svdp-l"], [32, 64]), ("sngan_d32", ["sttp-l", "svdp-l"], [64])]:
        for param in params:
            for rank in ranks:
                model = timm.create_model(arch, num_classes=10 if arch.startswith("wrn") else None)
                sttpfast.parameterize(model, param, rank=rank)
                for _, _, p in parameterized_layers(model):
                    for core in p.layout.cores:
                        seen.setdefault((core.rows, core.cols), f"{arch} {param} r{rank}")
    return sorted((n, r, src) for (n, r), src in seen.items() if r > 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--max-shapes", type=int, default=0, help="0: all shapes")
    ap.add_argument("--batch", type=int, default=1, help="frames of each shape computed in one call")
    args = ap.parse_args(argv)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    try:
        from torch_householder import torch_householder_orgqr
    except Exception as err:  # the package compiles a C++ extension at install or first use
        print(f"torch-householder unavailable ({err}); its column is left out")
        torch_householder_orgqr = None

    shapes = model_frame_shapes()
    if args.max_shapes:
        shapes = shapes[:: max(1, len(shapes) // args.max_shapes)]
    rows = []
    for n, r, src in shapes:
        b = (args.batch,)
        bottom = (0.5 * torch.randn(*b, n - r, r, dtype=dtype, device=device)).requires_grad_(True)
        top = (0.5 * torch.randn(*b, r * (r - 1) // 2, dtype=dtype, device=device)).requires_grad_(True)
        probe = torch.randn(*b, n, r, dtype=dtype, device=device)

        def run(build):
            def step():  # forward, then the vector-Jacobian product for both parameter tensors
                torch.autograd.grad(build(), (bottom, top), probe)
            return step

        def linalg_frame():
            y = reflectors_from_params(bottom, top)
            return torch.linalg.householder_product(y, 2.0 / (y * y).sum(-2))

        fns = {"sttpfast WY": run(lambda: householder_frame(bottom, top)),
               "torch.linalg": run(linalg_frame)}
        if torch_householder_orgqr is not None:
            fns["torch-householder"] = run(lambda: torch_householder_orgqr(reflectors_from_params(bottom, top)))
            with torch.no_grad():  # same map: the comparison is fair
                ref = torch_householder_orgqr(reflectors_from_params(bottom, top))
                assert torch.allclose(householder_frame(bottom, top), ref, atol=1e-4)
        t = interleaved(fns, args.repeats, device=device)
        row = [f"{n}x{r}", src, f"{1e3 * median(t['sttpfast WY']):.3f}"]
        for name in ("torch-householder", "torch.linalg"):
            if name in t:
                med, lo, hi = ratio_stats(t[name], t["sttpfast WY"])
                row += [f"{1e3 * median(t[name]):.3f}", f"{med:.1f}x ({lo:.1f}-{hi:.1f})"]
            else:
                row += ["-", "-"]
        rows.append(row)
        print(" | ".join(row), file=sys.stderr, flush=True)
    print(f"\nHouseholder frames, forward+backward, batch {args.batch}, {args.dtype}, {args.device}; "
          f"{machine()}; {args.repeats} interleaved repeats\n")
    print(markdown_table(["frame n x r", "first seen in", "WY ms", "torch-householder ms", "speed-up vs t-h",
                          "linalg ms", "speed-up vs linalg"], rows))


if __name__ == "__main__":
    main()
