"""Benchmark 2: training-step and evaluation overhead of parameterized models vs dense.

For each model, the dense network and its parameterized versions (same init seed, same
batch of random 32x32 images) run interleaved: SGD step = forward, cross-entropy (+ the
D-optimal penalty for -R variants, as in training), backward, optimizer step. Eval =
forward in eval mode under ``parametrize.cached()`` (weights materialized once, as an
evaluation loop does). Ratios are per-repeat parameterized / dense (median, min-max).

    python bench/step.py [--models resnet20_cifar wrn16_4] [--params sttp-r svdp-r] [--rank 32]
    python bench/step.py --device cuda --models wrn28_10      # the GPU row
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved, machine, markdown_table, median, ratio_stats  # noqa: E402

import sttpfast  # noqa: E402
from sttpfast.penalties import d_optimal_penalty  # noqa: E402


def build(arch: str, param: str, rank: int, device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10)
    report = sttpfast.parameterize(model, param, rank=rank if param not in ("dense", "sn") else None)
    model.z = report.z
    return model.to(device)


def train_step_fn(model, x, y, penalized: bool):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        model.train()
        loss = F.cross_entropy(model(x), y)
        if penalized:
            loss = loss + d_optimal_penalty(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def eval_fn(model, x):
    def run():
        with torch.no_grad():
            model(x)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet20_cifar", "wrn16_4"])
    ap.add_argument("--params", nargs="+", default=["sttp-r", "svdp-r"])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--bs", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for arch in args.models:
        x = torch.randn(args.bs, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (args.bs,), device=device)
        models = {p: build(arch, p, args.rank, device) for p in ["dense"] + args.params}
        steps = {p: train_step_fn(m, x, y, p.endswith("-r")) for p, m in models.items()}
        evals = {p: eval_fn(m, x) for p, m in models.items()}
        t_step = interleaved(steps, args.repeats, device=device)
        for m in models.values():
            m.eval()
        # one cached() context around the whole evaluation, as an evaluation loop does:
        # every parameterized weight is built once, then reused by every batch
        with parametrize.cached():
            t_eval = interleaved(evals, args.repeats, device=device)
        for p in args.params:
            s_med, s_lo, s_hi = ratio_stats(t_step[p], t_step["dense"])
            e_med, e_lo, e_hi = ratio_stats(t_eval[p], t_eval["dense"])
            row = [arch, p, args.rank, f"{models[p].z:.2f}", f"{s_med:.3f} ({s_lo:.2f}-{s_hi:.2f})",
                   f"{e_med:.3f} ({e_lo:.2f}-{e_hi:.2f})"]
            if device.type == "cuda":
                row += [f"{1e3 * median(t_step['dense']):.1f}", f"{1e3 * median(t_step[p]):.1f}"]
            rows.append(row)
            print(" | ".join(map(str, row)), file=sys.stderr, flush=True)
    header = ["model", "param", "rank", "Z %", "train step / dense", "cached eval / dense"]
    if device.type == "cuda":
        header += ["dense step ms", "param step ms"]
    print(f"\nStep time ratios, batch {args.bs} of 3x32x32, SGD, {args.repeats} interleaved repeats; {machine()}\n")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
