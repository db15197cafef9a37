"""Benchmark 5b: peak memory per process of a training step, FSDP2 (sharded) against DDP.

Each configuration runs in a fresh ``torchrun --nproc_per_node N`` launch (gloo on CPUs,
NCCL on GPUs). Every process builds the model (same seed), parameterizes it, then wraps it:

* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` (what ``sttpfast train`` does with
  configs/accelerate/cpu_2proc_gloo.yaml);
* ``fsdp2``: :func:`sttpfast.fsdp.shard_model` (``fully_shard`` on every block, then the
  root: what ``sttpfast train`` does with configs/accelerate/cpu_2proc_fsdp2.yaml);

then runs ``--steps`` SGD steps (momentum 0.9; the D-optimal penalty for -R variants, from
the gathered factors under FSDP2, as the trainer computes it) on a random batch of
``--bs`` 3x32x32 images per process. Memory per process, as bench/step.py measures it: on
CPU the peak resident set (``VmHWM``, reset by ``/proc/self/clear_refs`` once the model and
optimizer exist and are wrapped) minus the resident set before the model was created, with
glibc told to map every allocation of 64 KiB or more on its own (freed tensors leave the
resident set); on GPU the CUDA allocator's peak. Next to it, the bytes each process holds
for parameters, gradients and momentum (its shard under FSDP2): what sharding divides.

    python bench/distributed_memory.py                       # wrn28_10 sttp-r r32 and dense, 2 processes
    python bench/distributed_memory.py --params sttp-r --bs 4 --steps 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine, markdown_table  # noqa: E402

#: glibc's mmap threshold for the measured processes (as in bench/step.py)
MMAP_THRESHOLD = 65536
MODES = ("ddp", "fsdp2")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _local_bytes(tensors) -> int:
    """Bytes this process holds for ``tensors`` (a sharded DTensor: its own slice)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def child(mode: str, arch: str, param: str, rank: int, bs: int, steps: int) -> None:
    """One process of a launch: prints (rank 0) a JSON line with every rank's numbers."""
    import torch.distributed as dist
    import torch.nn.functional as F

    import sttpfast
    from sttpfast.fsdp import gathered_factors, shard_model
    from sttpfast.models import create_model
    from sttpfast.penalties import d_optimal_penalty

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    me = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    g = torch.Generator().manual_seed(1 + me)
    x, y = torch.randn(bs, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (bs,), generator=g).to(device)
    before = torch.cuda.memory_allocated(device) if cuda else 1024 * _status_kib("VmRSS")
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10)
    report = sttpfast.parameterize(model, param, rank=None if param == "dense" else rank)
    model = model.to(device)
    if mode == "fsdp2":
        shard_model(model)
        wrapped = model
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.01, momentum=0.9)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    for _ in range(steps):
        loss = F.cross_entropy(wrapped(x), y)
        if param.endswith("-r"):
            loss = loss + d_optimal_penalty(model, factors=gathered_factors)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
    if cuda:
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if cuda else 1024 * _status_kib("VmHWM")
    params = list(model.parameters())
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    held = _local_bytes(params) + _local_bytes([p.grad for p in params if p.grad is not None]) + _local_bytes(state)
    mine = {"peak_mib": (peak - before) / 2**20, "held_mib": held / 2**20, "z": report.z}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if me == 0:
        print("RESULT " + json.dumps(everyone))
    dist.destroy_process_group()


def launch(mode: str, arch: str, param: str, rank: int, bs: int, steps: int, nproc: int, threads: int) -> list[dict]:
    """Every rank's numbers for one configuration, from a fresh ``torchrun`` launch."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), OMP_NUM_THREADS=str(threads),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), __file__,
           "--child", mode, arch, param, str(rank), str(bs), str(steps)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} {arch} {param} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="wrn28_10")
    parser.add_argument("--params", nargs="+", default=["sttp-r", "dense"])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--bs", type=int, default=4, help="images per process and step")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--child", nargs=6, metavar=("MODE", "ARCH", "PARAM", "RANK", "BS", "STEPS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, arch, param, rank, bs, steps = args.child
        child(mode, arch, param, int(rank), int(bs), int(steps))
        return
    rows = []
    for param in args.params:
        found = {mode: launch(mode, args.arch, param, args.rank, args.bs, args.steps, args.nproc, args.threads)
                 for mode in MODES}
        ddp, fsdp = (max(r["peak_mib"] for r in found[m]) for m in MODES)
        held = {m: max(r["held_mib"] for r in found[m]) for m in MODES}
        size = f" r{args.rank}" if param != "dense" else ""
        rows.append([f"{args.arch} {param}{size}", f"{found['ddp'][0]['z']:.2f}",
                     " / ".join(f"{r['peak_mib']:.0f}" for r in found["ddp"]),
                     " / ".join(f"{r['peak_mib']:.0f}" for r in found["fsdp2"]), f"**{fsdp / ddp:.2f}x**",
                     f"{held['ddp']:.1f}", f"{held['fsdp2']:.1f}"])
    device = "GPU (NCCL)" if torch.cuda.is_available() else "CPU (gloo)"
    print(f"Peak memory per process of a training step, {args.nproc} processes on {device}: FSDP2 "
          f"(sttpfast.fsdp.shard_model, every block + root) against DDP. Workload: {args.steps} SGD steps "
          f"(momentum 0.9, D-optimal penalty for -R) of {args.bs} random 3x32x32 images per process, "
          f"{args.threads} thread(s) per process. Memory: "
          + ("CUDA allocator's peak minus what was allocated before the model" if torch.cuda.is_available() else
             f"peak resident set (VmHWM, reset after model, optimizer and wrapping) minus the resident set before "
             f"the model, glibc MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}")
          + f". Machine: {machine()}.\n")
    print(markdown_table(["model", "Z %", "DDP peak MiB per rank", "FSDP2 peak MiB per rank",
                          "FSDP2 / DDP (max rank)", "DDP params+grads+momentum MiB",
                          "FSDP2 params+grads+momentum MiB"], rows))


if __name__ == "__main__":
    main()
