"""Timing helpers shared by the benchmarks: interleaved repeats, medians, markdown tables."""
from __future__ import annotations

import os
import platform
import statistics
import time
from datetime import date

import torch


def set_threads(n: int) -> None:
    """Use ``n`` CPU threads (0: keep torch's default). On a machine that other work keeps
    busy, one thread avoids OpenMP threads waiting for each other's time slices."""
    if n:
        torch.set_num_threads(n)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_once(fn, device="cpu") -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(fns: dict, repeats: int, warmup: int = 2, device="cpu", inner: int = 1) -> dict[str, list[float]]:
    """Time every function ``repeats`` times, A B C A B C ..., after ``warmup`` rounds.

    Interleaving puts A and B under the same machine load, so their ratio is fair on a
    shared, noisy machine. Each sample is the mean of ``inner`` calls (seconds)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(time_once(lambda: [fn() for _ in range(inner)], device) / inner)
    return samples


def median(xs):
    return statistics.median(xs)


def ratio_stats(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median and min-max of the per-repeat ratios num/den (paired samples)."""
    ratios = [a / b for a, b in zip(num, den)]
    return statistics.median(ratios), min(ratios), max(ratios)


def baseline_columns(times: dict, reference: str, names, ms_fmt: str = ".1f", bold: bool = False) -> list[str]:
    """For each baseline in ``names``: its median ms and its per-repeat speed-up over
    ``reference`` (median, min-max); ``-`` columns where a baseline was not run."""
    row = []
    for name in names:
        if name not in times:
            row += ["-", "-"]
            continue
        med, lo, hi = ratio_stats(times[name], times[reference])
        speedup = f"**{med:.1f}x**" if bold else f"{med:.1f}x"
        row += [f"{1e3 * statistics.median(times[name]):{ms_fmt}}", f"{speedup} ({lo:.1f}-{hi:.1f})"]
    return row


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
            f"({torch.get_num_threads()} torch threads), {gpu}, "
            f"torch {torch.__version__}, {date.today().isoformat()}")


def markdown_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
