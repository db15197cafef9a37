"""`sttpfast train` sharded with FSDP2 on 2 CPU processes (gloo), against one process.

The runs train a 2-block ViT (LayerNorm, no dropout: each image's loss does not depend on
the other images of the batch, so a rank's half batch gives the per-image losses of the
whole batch; BatchNorm in training mode would not) on digits, 3 SGD steps, the same global
batch of 64 images (2 x 32 or 1 x 64). Launched as ``accelerate launch --config_file
configs/accelerate/cpu_2proc_fsdp2.yaml`` does: torchrun with ``ACCELERATE_USE_FSDP=true``
and ``FSDP_VERSION=2`` in each process.

Tolerance: losses, metrics, spectra and weights to 1e-5 relative, not bitwise: FSDP2 sums
the two ranks' gradients (reduce-scatter) where one process sums the 64 per-image terms in
one reduction, so the float32 rounding differs (measured: 1.5e-7 relative on the losses,
5e-7 absolute on the weights after 3 steps). Loading a checkpoint is exact on any number of
processes (each rank keeps its slice of the same file): asserted bitwise.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from fastcore.xtras import modify_exception
from safetensors.torch import load_file

pytestmark = pytest.mark.processes  # every test here launches processes (see conftest.py)

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ("dense", "sttp-r", "svdp-r", "lowrank")
FSDP2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}  # what cpu_2proc_fsdp2.yaml sets

# Runs the jobs of a JSON list (argv[1]) one after another in this process (1 or 2 ranks):
# {"out", "name", "param"} trains 3 steps; {"resume": run folder, "steps"} continues a run.
# Prints, on rank 0, RESULT {name: {losses of the steps, summary, spectra logged, weights
# after the checkpoint was loaded == the file}}.
_WORKER = r'''
import json, os, signal, sys
import torch, torch.distributed as dist
from fastai.callback.core import Callback
from safetensors.torch import load_file
from sttpfast.callbacks import SingularValueLogger
from sttpfast.config import build_config
from sttpfast.fsdp import full_state_dict
from sttpfast.run import run_training

torch.set_num_threads(1)
world = int(os.environ.get("WORLD_SIZE", "1"))


class Observe(Callback):
    """The global mean loss of each step, the weights when the fit starts, the spectra logged."""
    order = 100

    def __init__(self):
        self.losses, self.logged, self.start_state, self.history = [], [], None, []

    def before_fit(self):
        self.start_state = full_state_dict(self.learn.model)  # every rank: gathers the shards

    def after_batch(self):
        if self.training:
            self.logged.append(self.learn.loss.item())  # what the loggers read, on rank 0
            loss = self.learn.loss.detach().clone()
            if world > 1:
                dist.all_reduce(loss)
            self.losses.append(loss.item() / world)

    def after_fit(self):
        logger = next(cb for cb in self.learn.cbs if isinstance(cb, SingularValueLogger)) if any(
            isinstance(cb, SingularValueLogger) for cb in self.learn.cbs) else None
        self.history = logger.history if logger is not None else []


class SignalRankZero(Callback):
    """SIGUSR1 to rank 0 alone, after step ``at`` (a scheduler's signal reaching one process)."""
    order = 90

    def __init__(self, at):
        self.at = at

    def after_batch(self):
        if self.training and self.at and self.learn.train_iter == self.at and int(os.environ.get("RANK", "0")) == 0:
            os.kill(os.getpid(), signal.SIGUSR1)


out = {}
for job in json.loads(sys.argv[1]):
    seen, said = Observe(), []
    cbs = [seen, SignalRankZero(job.get("usr1_at"))]
    if "resume" in job:
        loaded = load_file(os.path.join(job["resume"], "checkpoints", "last", "model.safetensors"))
        summary = run_training(resume=job["resume"], steps=job["steps"], extra_cbs=cbs, echo=said.append)
        exact = sorted(loaded) == sorted(seen.start_state) and all(
            torch.equal(loaded[k], seen.start_state[k]) for k in loaded)
        name = job["name"]
    else:
        rank = [] if job["param"] == "dense" else ["param.rank=4"]
        rank += [f"train.mixed_precision={job['precision']}"] if "precision" in job else []
        cfg, _ = build_config(overrides=[
            "data.name=digits", f"data.bs={64 // world}", "data.subset=256", "data.augment=false",
            f"param.name={job['param']}", *rank, "optim.steps=3", "log.logger=none", "log.progress=false",
            "log.sv_every=1", "model.arch=vit_tiny_p4_32", "model.kwargs={depth: 2, embed_dim: 24, num_heads: 2}",
            f"train.out={job['out']}", f"train.name={job['name']}", "train.checkpoint_every=3",
            *job.get("set", [])])
        summary, exact, name = run_training(cfg, extra_cbs=cbs, echo=said.append), None, job["name"]
    out[name] = {"losses": seen.losses, "logged": seen.logged, "summary": summary, "loaded_exactly": exact, "said": said,
                 "spectra": [[h["step"], h["layer"], h["values"]] for h in seen.history]}
if int(os.environ.get("RANK", "0")) == 0:
    print("RESULT " + json.dumps(out))
'''


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("STTPFAST_CRASH_AT", "ACCELERATE_USE_FSDP", "FSDP_VERSION", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    env.update(extra)
    return env


def _launch(script: Path, jobs: list[dict], nproc: int) -> dict:
    """Run the worker on ``nproc`` processes (2: sharded with FSDP2), return rank 0's RESULT."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     "--nproc_per_node", str(nproc)]
    env = _env(**FSDP2_ENV) if nproc > 1 else _env()
    proc = subprocess.run([*launcher, str(script), json.dumps(jobs)], capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def _copy_run(run: Path, to: Path, bs: int) -> Path:
    """A copy of a run folder whose config asks for ``bs`` images per process (the same global
    batch of 64 on the other number of processes)."""
    shutil.copytree(run, to, symlinks=True)
    config = to / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["bs"] = bs
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return to


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and a == pytest.approx(b, rel=1e-5, abs=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """1 process, then 2 FSDP2 processes: 3 steps of each parameterization; then each way's
    sttp-r checkpoint (step 3) continued to step 6 on the other number of processes, and the
    one-process checkpoint continued on one process (the reference)."""
    tmp = tmp_path_factory.mktemp("fsdp_train")
    script = tmp / "worker.py"
    script.write_text(_WORKER)
    fresh = [{"out": str(tmp / "runs"), "param": p} for p in PARAMS]
    fresh.append({"out": str(tmp / "runs"), "param": "sttp-r", "precision": "bf16", "tag": "bf16"})
    fresh.append({"out": str(tmp / "runs"), "param": "lowrank", "set": ["reg.spectral_bound=0.5"],
                  "tag": "lowrank-bound"})
    fresh[1]["usr1_at"] = 2  # sttp-r: SIGUSR1 to rank 0 alone after step 2 (one process: to the only one)
    # the same at a step already checkpointed (every step is): rank 0 skipped the save, rank 1
    # went into the gathering alone, and gloo aborted the run
    fresh.append({"out": str(tmp / "runs"), "param": "sttp-r", "set": ["train.checkpoint_every=1"],
                  "tag": "usr1-saved", "usr1_at": 2})
    for job in fresh:
        job["tag"] = job.get("tag", job["param"])
    one = _launch(script, [{**job, "name": f"one-{job['tag']}"} for job in fresh], 1)
    one_on_two = _copy_run(tmp / "runs/one-sttp-r", tmp / "runs/one-on-two", 32)
    two = _launch(script, [{**job, "name": f"two-{job['tag']}"} for job in fresh]
                  + [{"resume": str(one_on_two), "steps": 6, "name": "one-on-two"}], 2)
    two_on_one = _copy_run(tmp / "runs/two-sttp-r", tmp / "runs/two-on-one", 64)
    one_on_one = _copy_run(tmp / "runs/one-sttp-r", tmp / "runs/one-on-one", 64)
    resumed = _launch(script, [{"resume": str(two_on_one), "steps": 6, "name": "two-on-one"},
                               {"resume": str(one_on_one), "steps": 6, "name": "one-on-one"}], 1)
    return {**one, **two, **resumed, "root": tmp / "runs"}


@pytest.mark.slow
@pytest.mark.parametrize("param", PARAMS)
def test_fsdp2_train_matches_one_process(runs, param):
    """Slow: the module's runs take 70-90 s on the loaded 2-core machine (3 launches, one of
    them with 2 processes, 15 runs); the asserts after them are instant."""
    one, two = runs[f"one-{param}"], runs[f"two-{param}"]
    assert two["summary"]["processes"] == 2 and one["summary"]["processes"] == 1
    assert len(one["losses"]) == 3 and _close(two["losses"], one["losses"]), (two["losses"], one["losses"])
    # validation on the gathered weights, the metric accumulators summed over ranks
    for metric, value in one["summary"]["metrics"].items():
        assert two["summary"]["metrics"][metric] == pytest.approx(value, rel=1e-5, abs=0), metric
    assert two["summary"]["ranks_in_sync"] is True
    # the checkpoint: gathered whole, written once by rank 0, the files one process writes
    for name in ("model", "optimizer"):
        a = load_file(str(runs["root"] / f"one-{param}/checkpoints/last/{name}.safetensors"))
        b = load_file(str(runs["root"] / f"two-{param}/checkpoints/last/{name}.safetensors"))
        assert sorted(a) == sorted(b) and all(a[k].shape == b[k].shape for k in a), name
        assert [k for k in a if not torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6)] == [], name


@pytest.mark.slow
@pytest.mark.parametrize("param", ["sttp-r", "svdp-r"])
def test_fsdp2_spectrum_logging_gathers_the_same_values_as_one_process(runs, param):
    """SingularValueLogger (log.sv_every=1) on the sharded model: every rank gathers the
    factors, rank 0 logs and draws; the values logged at each step are one process's."""
    one, two = runs[f"one-{param}"]["spectra"], runs[f"two-{param}"]["spectra"]
    assert len(one) == 3 * 10  # 3 steps x 10 parameterized layers (2 blocks x 4, patch embedding, head)
    assert [(step, layer) for step, layer, _ in two] == [(step, layer) for step, layer, _ in one]
    for (step, layer, a), (_, _, b) in zip(two, one):
        assert _close(a, b), (step, layer, a, b)
    assert (runs["root"] / f"two-{param}/singular_values.png").is_file()  # the heat map, drawn by rank 0


@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_on_one_process_and_the_reverse(runs):
    """A 2-process (FSDP2) checkpoint continued on 1 process, and a 1-process checkpoint
    continued on 2 FSDP2 processes: the weights right after loading are the file's, bitwise;
    steps 4-6 match the 1-process continuation of the 1-process checkpoint to 1e-5 relative."""
    reference = runs["one-on-one"]
    assert reference["loaded_exactly"] is True and len(reference["losses"]) == 3
    for name in ("two-on-one", "one-on-two"):
        run = runs[name]
        assert run["loaded_exactly"] is True, name
        assert run["summary"]["steps"] == 6 and run["summary"]["processes"] == (1 if name == "two-on-one" else 2)
        assert _close(run["losses"], reference["losses"]), (name, run["losses"], reference["losses"])
        for metric, value in reference["summary"]["metrics"].items():
            assert run["summary"]["metrics"][metric] == pytest.approx(value, rel=1e-5, abs=0), (name, metric)


def test_sharding_error_stays_one_message_through_fastais_event_wrapper():
    """A refusal raised in a callback event (the trainer shards in ``after_create``) reaches the
    CLI as its own message: fastai rewrites an exception's args with ``Exception occured in``."""
    from sttpfast.fsdp import ShardingError

    err = modify_exception(ShardingError("cannot shard 'blocks.9' with FSDP2: the model has no such module"),
                           "Exception occured in `AccelerateTrainer` when calling event `after_create`:\n\t...",
                           replace=True)
    assert isinstance(err, ValueError)
    assert str(err) == "cannot shard 'blocks.9' with FSDP2: the model has no such module"


@pytest.mark.slow
def test_fsdp2_bf16_autocasts_the_sharded_forward(runs):
    """``train.mixed_precision=bf16``: the sharded model's forward runs under bf16 autocast (as
    accelerate's prepare_model does for an unsharded one), so its losses are not the float32
    ones, and they are one process's bf16 losses to 1e-3 relative: bf16 keeps 8 bits of mantissa
    (4e-3 relative per rounding) and CPU kernels round a 32-image batch differently from a
    64-image one (measured: 1.5e-4 relative at step 3, 1e-7 at step 1)."""
    one, two, fp32 = runs["one-bf16"], runs["two-bf16"], runs["one-sttp-r"]
    assert abs(two["losses"][0] - fp32["losses"][0]) > 1e-4  # bf16 rounding shows in the first loss
    assert len(two["losses"]) == 3
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-3, abs=0), (two["losses"], one["losses"])


@pytest.mark.slow
def test_fsdp2_sigusr1_to_one_rank_checkpoints_on_every_rank_at_the_same_step(runs):
    """SIGUSR1 reaches rank 0 alone after step 2 (``usr1_at``): the ranks agree on it before
    acting (saving gathers the shards, a collective every rank must join at the same step), so
    the checkpoint is written at step 2 and training continues to step 3, with the losses of
    one process (which got the signal at the same step)."""
    one, two = runs["one-sttp-r"], runs["two-sttp-r"]
    for run in (one, two):
        assert "SIGUSR1: checkpoint saved at step 2; training continues" in run["said"]
        assert run["summary"]["steps"] == 3 and len(run["losses"]) == 3
    assert _close(two["losses"], one["losses"])


@pytest.mark.slow
def test_the_loss_the_loggers_read_is_the_whole_global_batchs(runs):
    # train/loss in TensorBoard and W&B was rank 0's half of the batch (16% off one process's)
    one, two = runs["one-sttp-r"], runs["two-sttp-r"]
    assert _close(one["logged"], one["losses"]) and _close(two["logged"], one["losses"])


@pytest.mark.slow
def test_fsdp2_sigusr1_at_a_step_already_checkpointed_continues_on_every_rank(runs):
    one, two = runs["one-usr1-saved"], runs["two-usr1-saved"]
    for run in (one, two):
        assert "SIGUSR1: checkpoint saved at step 2; training continues" in run["said"]
        assert run["summary"]["steps"] == 3 and len(run["losses"]) == 3
    assert _close(two["losses"], one["losses"])


@pytest.mark.slow
def test_fsdp2_spectral_norm_bound_projects_the_sharded_weights(runs):
    """``reg.spectral_bound=0.5`` (SpectralNormBound: low-rank factors clipped, plain Linear
    weights scaled, before the first step and after each): on the sharded model the whole
    weights are gathered, projected and written back into each rank's shards; the losses are
    one process's, and every layer of the saved 2-process model keeps ``sigma_max <= 0.5``, which
    the run without the bound exceeds."""
    from sttpfast.callbacks import spectral_layers
    from sttpfast.checkpoint import load_parameterized

    one, two = runs["one-lowrank-bound"], runs["two-lowrank-bound"]
    assert _close(two["losses"], one["losses"]), (two["losses"], one["losses"])

    def sigma_max(run: str) -> dict[str, float]:
        model = load_parameterized(runs["root"] / f"{run}/checkpoints/last/model.safetensors")
        return {name: float(values().max()) for name, _, _, values in spectral_layers(model)}

    bounded, free = sigma_max("two-lowrank-bound"), sigma_max("one-lowrank")
    assert len(bounded) == 10 and sorted(bounded) == sorted(free)
    assert max(bounded.values()) <= 0.5 * (1 + 1e-5), bounded
    assert max(free.values()) > 0.6, free


@pytest.mark.slow
def test_accelerate_launch_with_the_shipped_fsdp2_config_shards_and_checkpoints(tmp_path):
    """The command README gives: ``accelerate launch --config_file
    configs/accelerate/cpu_2proc_fsdp2.yaml apps/train.py ...``: 2 processes, the model sharded
    (said once, by rank 0), one checkpoint written by rank 0 that one process loads.
    Slow: 30 s on the loaded 2-core machine."""
    from sttpfast.checkpoint import load_parameterized
    from sttpfast.surgery import parameterization_spec

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/cpu_2proc_fsdp2.yaml"), str(ROOT / "apps/train.py"), "digits", "--arch",
           "resnet20_cifar", "--param", "sttp-r", "--rank", "4", "--steps", "2", "--bs", "32", "--logger", "none",
           "--out", str(tmp_path), "--name", "fsdp", "--set", "data.subset=128", "--set", "log.progress=false",
           "--set", "model.kwargs={base_width: 4}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert proc.stdout.count("FSDP2: the model is sharded over 2 processes in 10 units (9 blocks and the root)") == 1
    summary = json.loads((tmp_path / "fsdp/summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2 and summary["ranks_in_sync"] is True
    model = load_parameterized(tmp_path / "fsdp/checkpoints/last/model.safetensors").eval()
    spec = parameterization_spec(model)
    assert len(spec) == 22 and {layer["param"] for layer in spec.values()} == {"sttp-r"}
    with torch.no_grad():
        logits = model(torch.zeros(2, 1, 8, 8))  # digits: 8x8 grayscale
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
