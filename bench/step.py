"""Benchmark 2: training-step time, evaluation time and peak memory, parameterized vs dense.

For each model, the dense network and its parameterized versions (same init seed) are
compared three ways:

* train step time: SGD step = forward, cross-entropy (+ the D-optimal penalty for -R
  variants, as in training), backward, optimizer step, on one batch of random 3x32x32
  images; all configurations interleaved, ratios per repeat (median, min-max).
* validation pass time, as the trainer runs it: the validation pass of the project's
  Learner (``spectral_learner``, with its default callbacks and metrics) as ``fit`` runs it
  after each epoch, over a random in-memory validation set; interleaved, ratios per repeat.
* peak memory of a training step: each configuration in a fresh subprocess (glibc told to
  map every allocation of 64 KiB or more on its own, so freed tensors leave the resident
  set); the peak resident set (``VmHWM``, reset by ``/proc/self/clear_refs`` once the model
  and optimizer exist) during ``--mem-steps`` steps, minus the resident set before the
  model was created: parameters, gradients, optimizer state, activations and every
  temporary of the weight build. torch keeps no allocator statistics for the CPU, hence
  the resident set; on a GPU the CUDA allocator's peak is used instead.

    python bench/step.py [--models resnet20_cifar wrn16_4] [--params sttp-r svdp-r] [--rank 32]
    python bench/step.py --device cuda --models wrn28_10      # the GPU row
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved, machine, markdown_table, median, ratio_stats, set_threads  # noqa: E402

import sttpfast  # noqa: E402
from sttpfast.models import create_model  # noqa: E402
from sttpfast.penalties import d_optimal_penalty  # noqa: E402

#: glibc's mmap threshold for the memory subprocesses: fixed (no dynamic growth), so every
#: tensor of 64 KiB or more is its own mapping and returns to the OS when freed
MMAP_THRESHOLD = 65536


def build(arch: str, param: str, rank: int, device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10)
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


# ---------------------------------------------------------------------------------------
# validation pass through the trainer's own path
def random_dls(n_valid: int, bs: int, device):
    """fastai DataLoaders over random 3x32x32 images with 10 classes (``n_valid`` to validate)."""
    from fastai.data.core import DataLoaders
    from torch.utils.data import TensorDataset

    gen = torch.Generator().manual_seed(0)
    def dataset(n):
        return TensorDataset(torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen))
    dls = DataLoaders.from_dsets(dataset(bs), dataset(n_valid), bs=bs, device=device)
    dls.n_classes, dls.in_chans = 10, 3
    return dls


def validation_learner(arch: str, param: str, rank: int, dls, run_dir):
    """The project's Learner (``spectral_learner``, default callbacks and metrics) for
    ``arch`` in ``param`` form; its callbacks write into ``run_dir``."""
    from sttpfast.learner import spectral_learner

    torch.manual_seed(0)
    return spectral_learner(dls, arch, param=param, rank=rank if param not in ("dense", "sn") else None,
                            run_dir=run_dir)


def time_validation(learners: dict, repeats: int, device) -> dict[str, list[float]]:
    """Interleaved times of one validation pass per learner, as ``fit`` runs it after each
    epoch: fastai's ``_do_epoch_validate`` (every validation event and callback, no grad)
    inside the learner's fit context. The context's own events (``before_fit`` ...
    ``after_fit``, where callbacks set up and draw their plots) run once, outside the timing:
    in training they happen once per run or per epoch, not per validation pass."""
    with contextlib.ExitStack() as stack:
        for learn in learners.values():
            stack.enter_context(learn.no_bar())
            stack.enter_context(learn.validation_context())
        return interleaved({p: learn._do_epoch_validate for p, learn in learners.items()}, repeats,
                           warmup=1, device=device)


# ---------------------------------------------------------------------------------------
# peak memory, one configuration per fresh process
def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(arch: str, param: str, rank: int, bs: int, steps: int, device: str) -> dict:
    """In this (fresh) process: peak memory of ``steps`` training steps above the memory in
    use before the model was created, in MiB. CPU: resident set (``VmHWM``, reset once the
    model and optimizer exist); GPU: the CUDA allocator's peak of allocated bytes."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    x, y = torch.randn(bs, 3, 32, 32, device=device), torch.randint(0, 10, (bs,), device=device)
    gc.collect()
    before_model = torch.cuda.memory_allocated(device) if cuda else 1024 * _proc_status_kib("VmRSS")
    model = build(arch, param, rank, device)
    step = train_step_fn(model, x, y, param.endswith("-r"))
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    for _ in range(steps):
        step()
    peak = torch.cuda.max_memory_allocated(device) if cuda else 1024 * _proc_status_kib("VmHWM")
    return {"peak_mib": (peak - before_model) / 2**20, "before_model_mib": before_model / 2**20}


def measure_memory(arch: str, param: str, rank: int, bs: int, steps: int, device) -> float | None:
    """Peak memory of a training step of one configuration (MiB), from a fresh subprocess."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    cmd = [sys.executable, __file__, "--memory-child", arch, param, str(rank), str(bs), str(steps),
           str(torch.get_num_threads()), str(device)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"memory of {arch} {param} not measured:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def memory_method(device) -> str:
    """How :func:`memory_child` measures on ``device``, for the table's header."""
    if torch.device(device).type == "cuda":
        return "CUDA allocator's peak allocated bytes minus those allocated before model creation"
    return (f"peak resident set (VmHWM, reset after model and optimizer creation) minus the resident set "
            f"before model creation, glibc MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}")


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        arch, param, rank, bs, steps, threads, device = sys.argv[2:9]
        set_threads(int(threads))
        print(json.dumps(memory_child(arch, param, int(rank), int(bs), int(steps), device)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet20_cifar", "wrn16_4"])
    ap.add_argument("--params", nargs="+", default=["sttp-r", "svdp-r"])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--bs", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7, help="train step timing")
    ap.add_argument("--val-images", type=int, default=1024, help="size of the random validation set")
    ap.add_argument("--val-repeats", type=int, default=3, help="validation pass timing")
    ap.add_argument("--mem-steps", type=int, default=2, help="training steps per memory subprocess (0: no memory)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    device = torch.device(args.device)
    measure_mem = args.mem_steps > 0 and (device.type == "cuda" or Path("/proc/self/clear_refs").exists())
    rows = []
    for arch in args.models:
        configs = ["dense"] + args.params
        x = torch.randn(args.bs, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (args.bs,), device=device)
        models = {p: build(arch, p, args.rank, device) for p in configs}
        steps = {p: train_step_fn(m, x, y, p.endswith("-r")) for p, m in models.items()}
        t_step = interleaved(steps, args.repeats, device=device)
        del steps
        dls = random_dls(args.val_images, args.bs, device)
        with tempfile.TemporaryDirectory() as run_dir:  # what the callbacks write is thrown away
            learners = {p: validation_learner(arch, p, args.rank, dls, run_dir) for p in configs}
            t_val = time_validation(learners, args.val_repeats, device)
        del learners
        mem = {}
        if measure_mem:
            mem = {p: measure_memory(arch, p, args.rank, args.bs, args.mem_steps, device) for p in configs}
        for p in args.params:
            s_med, s_lo, s_hi = ratio_stats(t_step[p], t_step["dense"])
            v_med, v_lo, v_hi = ratio_stats(t_val[p], t_val["dense"])
            row = [arch, p, args.rank, f"{models[p].z:.2f}", f"{s_med:.3f} ({s_lo:.2f}-{s_hi:.2f})",
                   f"{v_med:.3f} ({v_lo:.2f}-{v_hi:.2f})"]
            if mem.get(p) is not None and mem.get("dense") is not None:
                row += [f"{mem['dense']:.0f} / {mem[p]:.0f}", f"{mem[p] / mem['dense']:.3f}"]
            else:
                row += ["-", "-"]
            if device.type == "cuda":
                row += [f"{1e3 * median(t_step['dense']):.1f}", f"{1e3 * median(t_step[p]):.1f}"]
            rows.append(row)
            print(" | ".join(map(str, row)), file=sys.stderr, flush=True)
    header = ["model", "param", "rank", "Z %", "train step / dense", "validation pass / dense",
              "step peak MiB dense / param", "step peak memory / dense"]
    if device.type == "cuda":
        header += ["dense step ms", "param step ms"]
    print(f"\nParameterized / dense, batch {args.bs} of random 3x32x32 images, 10 classes; {machine()}. "
          f"Train step: SGD (momentum 0.9), {args.repeats} interleaved repeats, median (min-max). "
          f"Validation pass: spectral_learner's (default callbacks and metrics) validation pass as fit runs it, over "
          f"{args.val_images} random images, {args.val_repeats} interleaved repeats. Step peak memory: "
          f"fresh process per configuration, {args.mem_steps} training steps; "
          f"{memory_method(device) if measure_mem else 'not measured (--mem-steps 0 or no /proc/self/clear_refs)'}.\n")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
