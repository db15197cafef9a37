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
    python bench/step.py --timm            # timm's backbones at Z 10%, batch 32, 64x64 images
    python bench/step.py --profile         # + where a training step's time goes (torch.profiler)
    python bench/step.py --device cuda --models wrn28_10      # the GPU row
    python bench/step.py --compile --models resnet20_cifar    # torch.compile'd step / eager step

``--compile`` times, for the dense model and each parameterization, the training step under
``torch.compile`` (``--compile-backend``, inductor by default) against the same step run
eagerly (same init): the first call's compile time, both medians and their ratio. On a CPU
report ratios only.

``--timm`` sets ``--models`` to TIMM_MODELS, ``--compression 10`` (``parameterize(model, p,
compression=10)`` instead of a rank), ``--bs 32`` and ``--img-size 64`` (ViT built for it).
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
from torch.profiler import record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved, machine, markdown_table, median, ratio_stats, set_threads  # noqa: E402

import sttpfast  # noqa: E402
from sttpfast.models import create_model  # noqa: E402
from sttpfast.penalties import d_optimal_penalty  # noqa: E402

#: timm's own backbones of the ``--timm`` set
TIMM_MODELS = ["resnet18", "convnext_atto", "vit_tiny_patch16_224", "efficientnet_b0"]

#: glibc's mmap threshold for the memory subprocesses: fixed (no dynamic growth), so every
#: tensor of 64 KiB or more is its own mapping and returns to the OS when freed
MMAP_THRESHOLD = 65536


def build(arch: str, param: str, rank: int | None, device, compression: float | None = None,
          img_size: int = 32) -> torch.nn.Module:
    """``arch`` with 10 classes for ``img_size`` inputs, ``param`` at ``rank`` or at ``compression`` (Z %)."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, **({"img_size": img_size} if arch.startswith("vit") else {}))
    low_rank = param not in ("dense", "sn")
    report = sttpfast.parameterize(model, param, rank=rank if low_rank and compression is None else None,
                                   compression=compression if low_rank else None)
    model.z = report.z
    return model.to(device)


def train_step_fn(model, x, y, penalized: bool):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        # the labels are what --profile's breakdown reads (negligible cost without a profiler)
        model.train()
        with record_function("step.forward"):
            loss = F.cross_entropy(model(x), y)
            if penalized:
                loss = loss + d_optimal_penalty(model)
        opt.zero_grad(set_to_none=True)
        with record_function("step.backward"):
            loss.backward()
        with record_function("step.optimizer"):
            opt.step()
    return step


def compile_rows(args, device) -> list[list]:
    """``[model, param, compile s, eager ms, compiled ms, compiled / eager]`` per configuration."""
    import time
    rows = []
    for arch in args.models:
        x = torch.randn(args.bs, 3, args.img_size, args.img_size, device=device)
        y = torch.randint(0, 10, (args.bs,), device=device)
        for p in ["dense"] + args.params:
            eager = train_step_fn(build(arch, p, args.rank, device, args.compression, args.img_size), x, y,
                                  p.endswith("-r"))
            compiled = torch.compile(train_step_fn(build(arch, p, args.rank, device, args.compression,
                                                         args.img_size), x, y, p.endswith("-r")),
                                     backend=args.compile_backend)
            start = time.perf_counter()
            compiled()  # the first call compiles (the warm-up rounds below take the recompiles)
            compile_s = time.perf_counter() - start
            t = interleaved({"eager": eager, "compiled": compiled}, args.repeats, warmup=3, device=device)
            med, lo, hi = ratio_stats(t["compiled"], t["eager"])
            row = [arch, p, f"{compile_s:.0f}", f"{1e3 * median(t['eager']):.1f}",
                   f"{1e3 * median(t['compiled']):.1f}", f"{med:.3f} ({lo:.2f}-{hi:.2f})"]
            rows.append(row)
            print(" | ".join(map(str, row)), file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------------------------
# where the time of a training step goes
def _inside(event, name: str) -> bool:
    while event is not None:
        if event.name == name:
            return True
        event = event.cpu_parent
    return False


def step_breakdown(step, steps: int = 3) -> dict[str, float]:
    """ms per step of: frames (the Householder WY kernels), contraction (every other op of the
    weight build: the chain contraction, incl. the final product with s and the other side,
    and the stacking of the bank), layers (the network's own forward and backward:
    convolutions, norms, activations, loss) and the optimizer step; forward and backward
    apart. From one torch.profiler run of ``steps`` steps: the weight build is the frame
    bank's ``sttpfast.weight_build`` scope in forward; its backward is every autograd node
    whose sequence number belongs to an op of that scope."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = list(prof.events())
    total = {name: sum(e.cpu_time_total for e in events if e.name == name)
             for name in ("step.forward", "step.backward", "step.optimizer", "sttpfast.weight_build")}
    # the frame kernels: _WYFrame (full St), _WYFrameReduced (St_U), _SquareFrame (the constant -I)
    frames = ("_WYFrame", "_SquareFrame")
    wy_fwd = sum(e.cpu_time_total for e in events if e.name.startswith(frames) and not e.name.endswith("Backward"))
    build_seq = {e.sequence_nr for e in events if e.sequence_nr >= 0 and _inside(e, "sttpfast.weight_build")}
    build_bwd = sum(e.cpu_time_total for e in events
                    if e.name.startswith("autograd::engine::evaluate_function:") and e.sequence_nr in build_seq)
    wy_bwd = sum(e.cpu_time_total for e in events
                 if e.name.startswith(tuple(f"autograd::engine::evaluate_function: {f}" for f in frames)))
    us = {
        "frames fwd": wy_fwd,
        "contraction fwd": total["sttpfast.weight_build"] - wy_fwd,
        "layers fwd": total["step.forward"] - total["sttpfast.weight_build"],
        "frames bwd": wy_bwd,
        "contraction bwd": build_bwd - wy_bwd,
        "layers bwd": total["step.backward"] - build_bwd,
        "optimizer": total["step.optimizer"],
    }
    return {k: v / 1e3 / steps for k, v in us.items()}


def profile_table(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    keys = list(rows[0][2])
    body = []
    for arch, param, ms in rows:
        step_ms = sum(ms.values())
        body.append([arch, param, f"{step_ms:.0f}"] + [f"{ms[k]:.0f} ({100 * ms[k] / step_ms:.0f}%)" for k in keys])
    return markdown_table(["model", "param", "step ms"] + [f"{k} ms" for k in keys], body)


# ---------------------------------------------------------------------------------------
# validation pass through the trainer's own path
def random_dls(n_valid: int, bs: int, device, img_size: int = 32):
    """fastai DataLoaders over random 3 x img_size x img_size images with 10 classes (``n_valid`` to validate)."""
    from fastai.data.core import DataLoaders
    from torch.utils.data import TensorDataset

    gen = torch.Generator().manual_seed(0)
    def dataset(n):
        return TensorDataset(torch.randn(n, 3, img_size, img_size, generator=gen), torch.randint(0, 10, (n,), generator=gen))
    dls = DataLoaders.from_dsets(dataset(bs), dataset(n_valid), bs=bs, device=device)
    dls.n_classes, dls.in_chans = 10, 3
    return dls


def validation_learner(arch: str, param: str, rank: int | None, dls, run_dir, compression: float | None = None,
                       img_size: int = 32):
    """The project's Learner (``spectral_learner``, default callbacks and metrics) for
    ``arch`` in ``param`` form; its callbacks write into ``run_dir``."""
    from sttpfast.learner import spectral_learner

    torch.manual_seed(0)
    low_rank = param not in ("dense", "sn")
    return spectral_learner(dls, arch, param=param, rank=rank if low_rank and compression is None else None,
                            compression=compression if low_rank else None, run_dir=run_dir,
                            model_kwargs={"img_size": img_size} if arch.startswith("vit") else None)


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


def memory_child(arch: str, param: str, rank: int, bs: int, steps: int, device: str,
                 compression: float | None = None, img_size: int = 32) -> dict:
    """In this (fresh) process: peak memory of ``steps`` training steps above the memory in
    use before the model was created, in MiB. CPU: resident set (``VmHWM``, reset once the
    model and optimizer exist); GPU: the CUDA allocator's peak of allocated bytes."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    x = torch.randn(bs, 3, img_size, img_size, device=device)
    y = torch.randint(0, 10, (bs,), device=device)
    gc.collect()
    before_model = torch.cuda.memory_allocated(device) if cuda else 1024 * _proc_status_kib("VmRSS")
    model = build(arch, param, rank, device, compression, img_size)
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


def measure_memory(arch: str, param: str, rank: int, bs: int, steps: int, device,
                   compression: float | None = None, img_size: int = 32) -> float | None:
    """Peak memory of a training step of one configuration (MiB), from a fresh subprocess."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    cmd = [sys.executable, __file__, "--memory-child", arch, param, str(rank), str(bs), str(steps),
           str(torch.get_num_threads()), str(device), str(compression or 0), str(img_size)]
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


def validation_cell(times: list[float], dense: list[float]) -> str:
    if not times:
        return "-"
    med, lo, hi = ratio_stats(times, dense)
    return f"{med:.3f} ({lo:.2f}-{hi:.2f})"


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        arch, param, rank, bs, steps, threads, device, compression, img_size = sys.argv[2:11]
        set_threads(int(threads))
        print(json.dumps(memory_child(arch, param, int(rank), int(bs), int(steps), device,
                                      float(compression) or None, int(img_size))))
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
    ap.add_argument("--compression", type=float, default=None, help="target Z %% instead of --rank")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--timm", action="store_true",
                    help="timm's backbones (TIMM_MODELS) at --compression 10, --bs 32, --img-size 64")
    ap.add_argument("--profile", action="store_true", help="also print where a training step's time goes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--compile", action="store_true", help="only: torch.compile'd training step / eager step")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    args = ap.parse_args(argv)
    if args.timm:
        args.models, args.compression, args.bs, args.img_size = TIMM_MODELS, 10.0, 32, 64
    set_threads(args.threads)
    device = torch.device(args.device)
    if args.compile:
        rows = compile_rows(args, device)
        print(f"\nTraining step (SGD, momentum 0.9) under torch.compile (backend {args.compile_backend}) vs eager, "
              f"batch {args.bs} of random 3x{args.img_size}x{args.img_size} images; {machine()}; "
              f"{args.repeats} interleaved repeats after 3 warm-up steps, median (min-max) of the per-repeat "
              f"ratios. Compile: the first call.\n")
        print(markdown_table(["model", "param", "compile s", "eager step ms", "compiled step ms",
                              "compiled / eager"], rows))
        return
    size = args.img_size
    profiles = []
    measure_mem = args.mem_steps > 0 and (device.type == "cuda" or Path("/proc/self/clear_refs").exists())
    rows = []
    for arch in args.models:
        configs = ["dense"] + args.params
        x = torch.randn(args.bs, 3, size, size, device=device)
        y = torch.randint(0, 10, (args.bs,), device=device)
        models = {p: build(arch, p, args.rank, device, args.compression, size) for p in configs}
        steps = {p: train_step_fn(m, x, y, p.endswith("-r")) for p, m in models.items()}
        t_step = interleaved(steps, args.repeats, device=device)
        if args.profile:
            profiles += [(arch, p, step_breakdown(steps[p])) for p in configs]
            print(profile_table(profiles[-len(configs):]), file=sys.stderr, flush=True)
        del steps
        t_val = {p: [] for p in configs}
        if args.val_repeats > 0:
            dls = random_dls(args.val_images, args.bs, device, size)
            with tempfile.TemporaryDirectory() as run_dir:  # what the callbacks write is thrown away
                learners = {p: validation_learner(arch, p, args.rank, dls, run_dir, args.compression, size)
                            for p in configs}
                t_val = time_validation(learners, args.val_repeats, device)
            del learners
        mem = {}
        if measure_mem:
            mem = {p: measure_memory(arch, p, args.rank, args.bs, args.mem_steps, device, args.compression, size)
                   for p in configs}
        for p in args.params:
            s_med, s_lo, s_hi = ratio_stats(t_step[p], t_step["dense"])
            row = [arch, p, args.rank if args.compression is None else f"Z {args.compression:g}%", f"{models[p].z:.2f}", f"{s_med:.3f} ({s_lo:.2f}-{s_hi:.2f})",
                   validation_cell(t_val[p], t_val["dense"])]
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
    print(f"\nParameterized / dense, batch {args.bs} of random 3x{size}x{size} images, 10 classes; {machine()}. "
          f"Train step: SGD (momentum 0.9), {args.repeats} interleaved repeats, median (min-max). "
          f"Validation pass: spectral_learner's (default callbacks and metrics) validation pass as fit runs it, over "
          f"{args.val_images} random images, {args.val_repeats} interleaved repeats. Step peak memory: "
          f"fresh process per configuration, {args.mem_steps} training steps; "
          f"{memory_method(device) if measure_mem else 'not measured (--mem-steps 0 or no /proc/self/clear_refs)'}.\n")
    print(markdown_table(header, rows))
    if profiles:
        print(f"\nWhere a training step's time goes (torch.profiler, CPU time per step, mean of 3 steps; "
              "frames: the Householder WY kernels; contraction: the rest of the weight build, incl. the final "
              "product; layers: the network's own ops and the loss; see step_breakdown)\n")
        print(profile_table(profiles))


if __name__ == "__main__":
    main()
