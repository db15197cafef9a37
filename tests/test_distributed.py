"""Several processes on CPU (gloo, ``torch.distributed.run``): validation metrics of the whole
validation set, exact resume after a crash, and sharded (FSDP2) training."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from interrupt import Interrupt
from safetensors.torch import load_file

from sttpfast.checkpoint import load_parameterized
from sttpfast.config import build_config
from sttpfast.data import get_dls
from sttpfast.run import run_training

pytestmark = pytest.mark.processes  # every test here launches processes (see conftest.py)

ROOT = Path(__file__).resolve().parents[1]
# digits, 512 training images: 8 steps of 2 x 32 images per epoch; 359 validation images, so
# the ranks' last validation batches differ in size (rank 0: 180 images, rank 1: 179)
TWO_PROC_STEPS = 14
TWO_PROC_ARGS = ["digits", "--arch", "resnet20_cifar", "--param", "sttp-r", "--rank", "6", "--bs", "32",
                 "--logger", "none", "--lr", "0.05", "--set", "data.subset=512",
                 "--set", "train.checkpoint_every=3", "--set", "log.progress=false"]


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    env.pop("STTPFAST_CRASH_AT", None)
    env.update(extra)
    return env


def _torchrun(args: list[str], env: dict, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           str(ROOT / "apps/train.py"), *args], capture_output=True, text=True, timeout=600,
                          env=env)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    """An uninterrupted 2-process run of TWO_PROC_STEPS steps (crosses an epoch end)."""
    out = tmp_path_factory.mktemp("ddp")
    proc = _torchrun([*TWO_PROC_ARGS, "--steps", str(TWO_PROC_STEPS), "--out", str(out), "--name", "full"], _env())
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    (out / "stdout.txt").write_text(proc.stdout)
    (out / "stderr.txt").write_text(proc.stderr)
    return out / "full"


def _repeated_lines(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    return [line for line in lines if lines.count(line) > 1]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _weights(run: Path) -> dict:
    return load_file(str(run / "checkpoints/last/model.safetensors"))


@pytest.mark.slow
def test_two_processes_print_each_line_once(two_process_run):
    """The user reads one process's output: the rank choice and the summary appear once, not per rank."""
    stdout = (two_process_run.parent / "stdout.txt").read_text()
    assert _repeated_lines(stdout) == []
    assert [line for line in stdout.splitlines() if line.startswith(("summary:", "rank "))] == [
        "rank 6", next(line for line in stdout.splitlines() if line.startswith("summary:"))]


@pytest.mark.slow
def test_ddp_is_not_handed_the_empty_sttp_cores(two_process_run):
    """STTP cores with no free entry (``(0, r)``) hold nothing to synchronize; given to DDP they
    made it warn "Grad strides do not match bucket view strides" on every run."""
    stderr = (two_process_run.parent / "stderr.txt").read_text()
    assert "bucket view strides" not in stderr


@pytest.mark.slow
def test_two_process_validation_metrics_equal_the_checkpoint_on_the_whole_validation_set(two_process_run):
    """Slow: 37 s (the 2-process run, shared with the next test) on the loaded 2-core machine."""
    summary = _summary(two_process_run)
    assert summary["processes"] == 2 and summary["ranks_in_sync"] is True
    cfg, _ = build_config([two_process_run / "config.yaml"])
    dls = get_dls("digits", bs=64, subset=512, seed=cfg["train"]["seed"], device="cpu")
    model = load_parameterized(two_process_run / "checkpoints/last/model.safetensors").eval()
    correct = loss = 0.0
    with torch.no_grad():
        for x, y in dls.valid:
            logits = model(x)
            correct += (logits.argmax(1) == y).sum().item()
            loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
    n = len(dls.valid.dataset)
    assert n == 359
    # the number of right answers over the number of images, as one process computes it
    assert summary["metrics"]["accuracy"] == correct / n, (summary["metrics"], correct, n)
    assert summary["metrics"]["valid_loss"] == pytest.approx(loss / n, rel=1e-5)


@pytest.mark.slow
def test_two_process_run_killed_mid_epoch_resumes_bit_identical(two_process_run, tmp_path):
    """Slow: 59 s (a crashed and a resumed 2-process run) on the loaded 2-core machine."""
    # rank 0 (the writer) is killed by SIGKILL at its second checkpoint (step 6, mid-epoch 1),
    # after the folder is in place and before `last` points at it; the launcher then ends rank 1
    crashed = _torchrun([*TWO_PROC_ARGS, "--steps", str(TWO_PROC_STEPS), "--out", str(tmp_path), "--name", "cut"],
                        _env(STTPFAST_CRASH_AT="checkpoint-renamed:2"))
    assert crashed.returncode != 0
    run = tmp_path / "cut"
    assert not (run / "summary.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("ckpt-*")) == ["ckpt-00000003", "ckpt-00000006"]
    resumed = _torchrun(["--resume", str(run)], _env())
    assert resumed.returncode == 0, (resumed.stdout[-2000:], resumed.stderr[-3000:])
    assert f"resuming {run} at epoch 0, step 6" in resumed.stdout
    a, b = _weights(two_process_run), _weights(run)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    s_full, s_cut = _summary(two_process_run), _summary(run)
    assert s_cut["steps"] == s_full["steps"] == TWO_PROC_STEPS
    assert s_cut["metrics"] == s_full["metrics"]  # smoothed train_loss included
    assert s_cut["best"] == s_full["best"]
    assert s_cut["rank_hashes"] == s_full["rank_hashes"] and len(set(s_cut["rank_hashes"])) == 1


@pytest.mark.slow
def test_a_resume_on_another_number_of_processes_keeps_the_global_batch_or_is_refused(two_process_run, tmp_path):
    """Slow: about 20 s (2 steps of one process). A 2-process run resumed by one process with
    the same data.bs trained at half the global batch, its one-cycle schedule restarted from
    the peak, without a word."""
    import shutil

    import yaml
    from click.testing import CliRunner

    from sttpfast.cli import main

    run = tmp_path / "copy"
    shutil.copytree(two_process_run, run, symlinks=True)
    result = CliRunner().invoke(main, ["train", "--resume", str(run), "--steps", str(TWO_PROC_STEPS + 2)])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [
        f"Error: {run} was trained by 2 processes at a global batch of 64 (data.bs 32 each); this resume runs 1 "
        "process, whose global batch would be 32: the steps per epoch and the learning-rate schedule would change. "
        f"Resume with 2 processes, or set data.bs: 64 in {run / 'config.yaml'} to keep the global batch of 64"]
    assert _summary(run)["steps"] == TWO_PROC_STEPS  # nothing trained
    config = run / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["bs"] = 64
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    result = CliRunner().invoke(main, ["train", "--resume", str(run), "--steps", str(TWO_PROC_STEPS + 2)])
    assert result.exit_code == 0, result.output
    assert _summary(run)["steps"] == TWO_PROC_STEPS + 2 and _summary(run)["processes"] == 1


def test_loader_worker_processes_change_nothing_and_resume_exactly(tmp_path):
    """``data.num_workers`` > 0 is allowed: a worker only indexes the in-memory tensors
    (``create_batch``); the shuffling order is drawn before the workers start and augmentation
    runs in ``after_batch`` in the main process, both from generators the checkpoint saves,
    and the workers' base seed is drawn from the global generator in the main process (the
    same draw with 0 workers). So workers hold no random state of their own: a run with 2
    workers, stopped mid-epoch and resumed with 2 workers, has the weights of a run without."""
    def cfg(name, workers):
        c, _ = build_config(overrides=[
            "data.name=digits", "data.bs=64", "data.subset=256", "data.augment=true", f"data.num_workers={workers}",
            "param.name=sttp-r", "param.rank=2", "optim.steps=6", "log.logger=none", "log.progress=false",
            "model.arch=wrn16_4", "model.kwargs.depth=10", "model.kwargs.width=1", "model.kwargs.drop_rate=0.3",
            f"train.out={tmp_path}", f"train.name={name}", "train.checkpoint_every=3"])
        return c

    plain = run_training(cfg("plain", 0), echo=lambda *a: None)
    cut = run_training(cfg("workers", 2), extra_cbs=[Interrupt(3)], echo=lambda *a: None)
    assert cut["steps"] == 3
    resumed = run_training(resume=tmp_path / "workers", echo=lambda *a: None)
    assert resumed["steps"] == plain["steps"] == 6
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "workers")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert resumed["metrics"] == plain["metrics"]


# ---------------------------------------------------------------------------------------
# FSDP2: every registered parametrization, sharded per residual block and at the root
_FSDP_WORKER = r'''
import json, logging, os, sys
import torch, torch.distributed as dist
from sttpfast.fsdp import shard_model
from sttpfast.models import create_model
from sttpfast.params import frame_bank
from sttpfast.params.registry import methods
from sttpfast.surgery import parameterize

torch.set_num_threads(1)
world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if world > 1 else 0
builds = []  # layers per batched weight build, during the last forward
notes = []  # the frame bank's log records (it says once per bank that it builds per FSDP unit)
handler = logging.Handler()
handler.emit = notes.append
logging.getLogger("sttpfast.params.frame_bank").addHandler(handler)
logging.getLogger("sttpfast.params.frame_bank").setLevel(logging.INFO)
real_build = frame_bank.build_weights
frame_bank.build_weights = lambda members, plans=None: builds.append(len(members)) or real_build(members, plans)
g = torch.Generator().manual_seed(1)
x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)  # the global batch
out = {}
for name, entry in methods().items():
    if os.environ.get("METHODS") and name not in os.environ["METHODS"].split(","):
        continue
    torch.manual_seed(0)
    notes.clear()
    model = create_model("resnet20_cifar", num_classes=10, base_width=4)
    parameterize(model, name, rank=2 if entry.rank_kind else None)
    if world > 1:
        shard_model(model)  # fully_shard on every residual block, then the root
    # eval: BN uses its running statistics, so a rank's half batch gives the same per-image loss
    model.eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for step in range(3):
        builds.clear()
        loss = torch.nn.functional.cross_entropy(model(x[rank::world]), y[rank::world])
        opt.zero_grad()
        loss.backward()  # FSDP2 averages the gradients over ranks: the gradient of the global mean
        opt.step()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    out[name] = {"losses": losses, "builds": list(builds), "notes": [r.getMessage() for r in notes]}
if rank == 0:
    print("RESULT " + json.dumps(out))
if world > 1:
    dist.destroy_process_group()
'''


def _fsdp_results(script: Path, nproc: int, **env) -> dict:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     "--nproc_per_node", str(nproc)]
    proc = subprocess.run([*launcher, str(script)], capture_output=True, text=True, timeout=600, env=_env(**env))
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


@pytest.mark.slow
def test_fsdp2_every_parametrization_matches_one_process(tmp_path):
    """2 processes, ``fully_shard`` on each of the 9 residual blocks and the root, 3 SGD steps:
    the losses equal one process's (same global batch of 16) to 1e-5 relative, for every
    registered parametrization; the spectral chains build their weights batched, one build
    per FSDP unit inside its forward. Slow: 137 s on the shared 2-core machine under load
    (83 s of CPU time; both launches, 18 methods each)."""
    from sttpfast.params.registry import methods

    script = tmp_path / "fsdp_worker.py"
    script.write_text(_FSDP_WORKER)
    one, two = _fsdp_results(script, 1), _fsdp_results(script, 2)
    assert sorted(two) == sorted(one) == sorted(methods())
    for name in one:
        assert two[name]["losses"] == pytest.approx(one[name]["losses"], rel=1e-5, abs=0), name
        chain = name.startswith(("svdp", "sttp"))
        # unsharded: one build of all 22 conv / linear layers per forward; sharded: the root's
        # own layers (stem conv, head) at the stem, then each block's (3 with a 1x1 shortcut)
        assert one[name]["builds"] == ([22] if chain else []), name
        assert two[name]["builds"] == ([2, 2, 2, 2, 3, 2, 2, 3, 2, 2] if chain else []), name
        assert one[name]["notes"] == []
        assert two[name]["notes"] == ([
            "frame bank: the model is sharded (FSDP2): 20 of 22 layers are not gathered at this module's forward; "
            "each FSDP unit builds its own layers, batched, when its forward gathers them (a layer used while "
            "sharded builds its weight on its own)"] if chain else []), name


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_localhost_match_one_process(tmp_path):
    """Two "nodes" of one process each (``torchrun --nnodes 2 --node_rank 0/1 --master_addr
    127.0.0.1``), sharded with FSDP2 as above: the same losses as one process (1e-5 relative).
    Slow: 39 s on the shared 2-core machine under load (3 methods)."""
    script = tmp_path / "fsdp_worker.py"
    script.write_text(_FSDP_WORKER)
    methods = "sttp-r,svdp-c,lowrank"
    port = _free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(METHODS=methods)) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-3000:] for _, err in outputs]
    two = json.loads(outputs[0][0].split("RESULT ", 1)[1])
    assert "RESULT" not in outputs[1][0]  # node 1 (global rank 1) does not report
    one = _fsdp_results(script, 1, METHODS=methods)
    assert sorted(two) == sorted(one) == sorted(methods.split(","))
    for name in one:
        assert two[name]["losses"] == pytest.approx(one[name]["losses"], rel=1e-5, abs=0), name


def test_shard_model_refuses_a_unit_it_cannot_shard_naming_the_layer():
    from sttpfast.fsdp import default_units, shard_model
    from sttpfast.models import create_model
    from sttpfast.surgery import parameterize

    model = create_model("resnet20_cifar", num_classes=10, base_width=4)
    parameterize(model, "sttp-r", rank=2)
    assert default_units(model) == [f"blocks.{i}" for i in range(9)]
    with pytest.raises(ValueError) as err:
        shard_model(model, units=["blocks.0", "blocks.1.conv2.parametrizations.weight"])
    assert str(err.value) == ("cannot shard 'blocks.1.conv2.parametrizations.weight' with FSDP2: it is inside the "
                              "parametrization of layer 'blocks.1.conv2'; shard a module that contains the layer "
                              "(its block) instead")
    with pytest.raises(ValueError) as err:
        shard_model(model, units=["blocks.9"])
    assert str(err.value) == ("cannot shard 'blocks.9' with FSDP2: the model has no such module "
                              "(blocks: blocks.0, blocks.1, blocks.2, blocks.3...)")
    assert not any(type(m).__name__.startswith("FSDP") for m in model.modules())  # nothing half done


def test_train_under_an_fsdp1_config_is_refused_with_one_message(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from sttpfast.cli import main

    # what `accelerate launch` with `fsdp_version: 1` sets in each process: FSDP1 refuses CPUs
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    result = CliRunner().invoke(main, ["train", "digits", "--arch", "resnet20_cifar", "--param", "sttp-r", "--rank",
                                       "4", "--steps", "1", "--logger", "none", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output == (  # the one error line (the rank line comes once everything is checked)
        "Error: this run was launched with an FSDP config with fsdp_version 1 (FSDP_VERSION='1'); sttpfast shards "
        "with FSDP2 only: set `fsdp_version: 2` in the config (configs/accelerate/cpu_2proc_fsdp2.yaml, "
        "gpu_fsdp2.yaml)\n")
    assert list(tmp_path.iterdir()) == []  # no run folder


_SIGINT_WORKER = '''
import os, signal, sys
from fastai.callback.core import Callback
from sttpfast.config import build_config
from sttpfast.run import TrainingInterrupted, run_training


class SigintRankZero(Callback):
    """Ctrl-C reaching rank 0 alone after step 2 (a launcher's signals arrive one by one)."""
    order = 90

    def after_batch(self):
        if self.training and self.learn.train_iter == 2 and os.environ.get("RANK") == "0":
            os.kill(os.getpid(), signal.SIGINT)


cfg, _ = build_config(overrides=["data.name=digits", "data.bs=32", "data.subset=256", "param.name=sttp-r",
                                 "param.rank=4", "optim.steps=6", "log.logger=none", "log.progress=false",
                                 "model.kwargs={base_width: 4}", f"train.out={sys.argv[1]}", "train.name=int"])
try:
    run_training(cfg, extra_cbs=[SigintRankZero()], echo=lambda *a: None)
    print(f"RANK {os.environ['RANK']} FINISHED", flush=True)
except TrainingInterrupted as stop:
    print(f"RANK {os.environ['RANK']} STOPPED {stop.code}", flush=True)
'''


@pytest.mark.slow
def test_ctrl_c_reaching_one_ddp_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Slow: ~30 s (a 2-process launch) on the loaded 2-core machine. Under DDP only an FSDP2
    run merged the ranks' stop requests: rank 0 stopped after step 2 and rank 1 went on into
    step 3's gradient all-reduce, where it died ("Connection closed by peer")."""
    script = tmp_path / "worker.py"
    script.write_text(_SIGINT_WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           str(tmp_path)], capture_output=True, text=True, timeout=600, env=_env())
    said = sorted(line for line in proc.stdout.splitlines() if line.startswith("RANK "))
    assert said == ["RANK 0 STOPPED 130", "RANK 1 STOPPED 130"], (proc.stdout[-2000:], proc.stderr[-3000:])
    state = json.loads((tmp_path / "int" / "checkpoints" / "last" / "state.json").read_text())
    assert state["train_iter"] == 2


@pytest.mark.slow
def test_an_input_error_under_two_processes_is_one_error_line(tmp_path):
    """Each rank printed the same `Error:` line (README promises one)."""
    proc = _torchrun(["digits", "--arch", "resnet20_cifarr", "--steps", "1", "--out", str(tmp_path)], _env())
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error:")]
    assert errors == ["Error: unknown architecture 'resnet20_cifarr'; did you mean resnet20_cifar, resnet32_cifar, "
                      "resnet110_cifar?"], proc.stdout + proc.stderr


def test_an_error_of_one_rank_alone_is_still_said(monkeypatch, capsys):
    """A rank other than 0 waits for the launcher to end it (rank 0 says the same error); an
    error of its own (rank 0 carries on) is said after the wait, naming the rank."""
    import sttpfast.cli as cli

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cli, "RANK_ERROR_WAIT", 0.05)
    cli.CLIError("no data on this node").show()
    assert capsys.readouterr().err == "Error: (rank 1) no data on this node\n"
