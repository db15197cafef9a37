"""Crash-safe runs: killed at any point of the checkpoint write sequence, stopped by SIGTERM /
SIGINT, checkpointed by SIGUSR1, or doubled by a second process, a run resumes to the same
weights, metrics and smoothed loss as an uninterrupted one. A tiny wide ResNet with dropout
(depth 10, width 1, drop_rate 0.3) on digits keeps it fast and makes every global RNG draw count."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fastai.callback.core import Callback, CancelFitException
from interrupt import tensorboard_scalars
from safetensors.torch import load_file

from sttpfast.atomic import CRASH_POINTS, STALL_SECONDS, checkpoints, verify_checkpoint
from sttpfast.config import build_config
from sttpfast.run import RunError, check_budget, run_training

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.arch=wrn16_4", "model.kwargs.depth=10", "model.kwargs.width=1", "model.kwargs.drop_rate=0.3"]
STEPS = 10  # 4 batches per epoch: epoch ends at steps 4, 8 and the budget mid-epoch 3


def _cfg(tmp_path, name, steps=STEPS, *overrides):
    cfg, _ = build_config(overrides=["data.name=digits", "data.bs=64", "data.subset=256", "param.name=sttp-r",
                                     "param.rank=2", f"optim.steps={steps}", "optim.schedule=linear",
                                     "log.logger=none", "log.progress=false", f"train.out={tmp_path}",
                                     f"train.name={name}", "train.checkpoint_every=3", *TINY, *overrides])
    return cfg


def quiet(*args):
    pass


def _weights(run: Path) -> dict:
    return load_file(str(run / "checkpoints/last/model.safetensors"))


def _assert_same_run(run: Path, summary: dict, reference: dict) -> None:
    """Bit-identical weights, the same step count and the same metrics (smoothed train_loss
    included) as the uninterrupted run."""
    a, b = _weights(Path(reference["run_dir"])), _weights(run)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert summary["steps"] == reference["steps"]
    assert summary["metrics"] == reference["metrics"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    out = tmp_path_factory.mktemp("reference")
    return run_training(_cfg(out, "full"), echo=quiet)


# ---------------------------------------------------------------------------------------
class StopAfterEpoch(Callback):
    """Stops the fit right after epoch ``epoch``'s checkpoint, like a kill at that moment."""

    order = 90  # after the Checkpointer (70) wrote the epoch-end checkpoint

    def __init__(self, epoch):
        self.stop_epoch = epoch

    def after_epoch(self):
        if self.epoch == self.stop_epoch:
            raise CancelFitException()


# in-process, but its module fixture `reference` serves the tests that launch processes: built once
@pytest.mark.processes
def test_dropout_model_resumes_exactly_from_an_epoch_end_with_its_smoothed_loss(tmp_path, reference):
    cut = run_training(_cfg(tmp_path, "cut"), extra_cbs=[StopAfterEpoch(0)], echo=quiet)
    assert cut["steps"] == 4
    resumed = run_training(resume=tmp_path / "cut", echo=quiet)
    _assert_same_run(tmp_path / "cut", resumed, reference)


class SlowSteps(Callback):
    """Each training step takes ``seconds`` longer (a slow first session)."""

    def __init__(self, seconds):
        self.seconds = seconds

    def after_batch(self):
        if self.training:
            time.sleep(self.seconds)


def test_the_summary_of_a_resumed_run_counts_the_training_time_of_every_session(tmp_path):
    """summary.json's ``seconds``: the first session's time up to the checkpoint it resumed
    from (kept in the checkpoint) plus the resumed session's, not the last session's alone."""
    cut = run_training(_cfg(tmp_path, "t"), extra_cbs=[StopAfterEpoch(0), SlowSteps(0.5)], echo=quiet)
    first = json.loads((tmp_path / "t/checkpoints/last/state.json").read_text())["seconds"]
    assert cut["steps"] == 4 and first >= 4 * 0.5 and cut["seconds"] >= first
    resumed = run_training(resume=tmp_path / "t", echo=quiet)
    final = json.loads((tmp_path / "t/checkpoints/last/state.json").read_text())["seconds"]
    assert resumed["steps"] == STEPS and first < final <= resumed["seconds"]


# ---------------------------------------------------------------------------------------
# chaos: SIGKILL at each named point of the write sequence (the writer's test hook)
KILLS = ["file-temp-written:2", "file-renamed:2",  # summary.json (the 1st file is config.yaml)
         "checkpoint-files:2", "checkpoint-manifest:3", "checkpoint-renamed:4", "pointer-moved:2", "pruned:3"]


def _killed_run(cfg: dict, crash_at: str | None = None, cbs=()) -> int:
    """Train ``cfg`` in a forked child that the writer kills at ``crash_at`` (or one of
    ``cbs`` kills); its wait status."""
    pid = os.fork()
    if pid == 0:  # the child: train until the hook kills it
        if crash_at is not None:
            os.environ["STTPFAST_CRASH_AT"] = crash_at
        try:
            run_training(cfg, extra_cbs=cbs, echo=quiet)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.processes
def test_a_kill_at_every_point_of_the_write_sequence_resumes_bit_identical(tmp_path, reference):
    assert {k.split(":")[0] for k in KILLS} == set(CRASH_POINTS)
    identical = 0
    for i, point in enumerate(KILLS):
        status = _killed_run(_cfg(tmp_path, f"k{i}"), point)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (point, status)
        run = tmp_path / f"k{i}"
        resumed = run_training(resume=run, echo=quiet)
        assert not list(run.glob("**/.*.tmp-*")), point  # the resume removed the dead process's temporaries
        _assert_same_run(run, resumed, reference)
        identical += 1
    assert identical == len(KILLS) == 7


class KillInValidation(Callback):
    """SIGKILLs the process when the validation after step ``step`` starts."""

    def __init__(self, step):
        self.step = step

    def before_validate(self):
        if self.train_iter == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.processes
def test_a_kill_in_the_last_validation_after_the_last_steps_checkpoint_resumes_to_the_final_metrics(
        tmp_path, reference):
    """The budget ends mid-epoch at step 10, whose --every checkpoint is written before the
    epoch's validation: killed in that validation, the resume validates (it does not report
    the metrics of the epoch before)."""
    cfg = _cfg(tmp_path, "v", STEPS, "train.checkpoint_every=5")
    status = _killed_run(cfg, cbs=[KillInValidation(STEPS)])
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    run = tmp_path / "v"
    assert json.loads((run / "checkpoints/last/state.json").read_text())["train_iter"] == STEPS
    assert not (run / "summary.json").exists()
    resumed = run_training(resume=run, echo=quiet)
    _assert_same_run(run, resumed, reference)
    assert json.loads((run / "summary.json").read_text())["metrics"] == reference["metrics"]


class KillAfterStep(Callback):
    """SIGKILLs the process after step ``step`` and its --every checkpoint (order 90, after the
    Checkpointer) or in ``after_fit`` (``at_end``: after the epoch-end checkpoint)."""

    order = 90

    def __init__(self, step=None, at_end=False):
        self.step, self.at_end = step, at_end

    def after_batch(self):
        if self.training and self.train_iter == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def after_fit(self):
        if self.at_end:
            os.kill(os.getpid(), signal.SIGKILL)


def _killed(train) -> None:
    """Run ``train()`` in a forked child that must end SIGKILLed."""
    pid = os.fork()
    if pid == 0:
        try:
            train()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.processes
def test_a_run_killed_twice_in_the_same_epoch_resumes_bit_identical(tmp_path, reference):
    """Killed after step 5 (one batch into the 2nd epoch), resumed, killed after step 7: the
    checkpoint of step 7 counts the epoch's batches from its start (3), not from the resume (2)."""
    run = tmp_path / "twice"
    _killed(lambda: run_training(_cfg(tmp_path, "twice", STEPS, "train.checkpoint_every=1"),
                                 extra_cbs=[KillAfterStep(5)], echo=quiet))
    _killed(lambda: run_training(resume=run, extra_cbs=[KillAfterStep(7)], echo=quiet))
    state = json.loads((run / "checkpoints/last/state.json").read_text())
    assert (state["train_iter"], state["epoch"], state["skip"]) == (7, 1, 3)
    resumed = run_training(resume=run, echo=quiet)
    _assert_same_run(run, resumed, reference)


@pytest.mark.processes
def test_a_raised_budget_killed_before_its_summary_reports_the_new_steps_not_the_old_summary(tmp_path):
    """A finished 4-step run resumed to 8 steps and killed after the epoch-end checkpoint of
    step 8, before summary.json: the next resume reports step 8 (the old summary says 4)."""
    whole = tmp_path / "whole"
    run_training(_cfg(tmp_path, "whole", 4), echo=quiet)
    want = run_training(resume=whole, steps=8, echo=quiet)
    run = tmp_path / "raised"
    run_training(_cfg(tmp_path, "raised", 4), echo=quiet)
    _killed(lambda: run_training(resume=run, steps=8, extra_cbs=[KillAfterStep(at_end=True)], echo=quiet))
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    resumed = run_training(resume=run, echo=quiet)
    assert "already_finished" not in resumed
    assert (resumed["steps"], resumed["metrics"]) == (8, want["metrics"])
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


def test_a_resume_below_the_steps_already_trained_is_refused_and_changes_nothing(tmp_path):
    run_training(_cfg(tmp_path, "low", 6), echo=quiet)
    run = tmp_path / "low"
    before = {f: f.read_bytes() for f in run.rglob("*") if f.is_file() and f.name != ".lock"}
    with pytest.raises(RunError) as err:
        run_training(resume=run, steps=3, echo=quiet)
    assert str(err.value) == (f"{run} has trained 6 steps: a resume can only raise the budget "
                              "(--steps 3 is below them)")
    with pytest.raises(RunError) as err:
        run_training(resume=run, epochs=1, echo=quiet)
    assert str(err.value) == (f"{run} has trained 6 steps, into epoch 2: a resume can only raise the budget "
                              "(--epochs 1 is below them)")
    assert {f: f.read_bytes() for f in run.rglob("*") if f.is_file() and f.name != ".lock"} == before


@pytest.mark.processes
def test_resuming_an_unfinished_run_below_its_configured_budget_is_refused(tmp_path):
    """A 10-step run killed after step 5: --steps 7 is above the steps trained but below the
    run's own budget, which would cut the one-cycle schedule short mid-way (README: a resume
    never lowers the budget). Refused, nothing changed; --steps 10 or more continues."""
    run = tmp_path / "cut"
    _killed(lambda: run_training(_cfg(tmp_path, "cut", STEPS, "train.checkpoint_every=1"),
                                 extra_cbs=[KillAfterStep(5)], echo=quiet))
    before = {f: f.read_bytes() for f in run.rglob("*") if f.is_file() and f.name != ".lock"}
    with pytest.raises(RunError) as err:
        run_training(resume=run, steps=7, echo=quiet)
    assert str(err.value) == (f"{run} has a budget of 10 steps (5 trained): a resume can only raise the budget "
                              "(--steps 7 is below it)")
    assert {f: f.read_bytes() for f in run.rglob("*") if f.is_file() and f.name != ".lock"} == before
    assert run_training(resume=run, steps=10, echo=quiet)["steps"] == 10


def test_an_epoch_budget_below_the_runs_own_is_refused_too(tmp_path):
    meta = {"train_iter": 8, "epoch": 2, "skip": 0}
    with pytest.raises(RunError) as err:
        check_budget(tmp_path, meta, None, 3, budget_steps=None, budget_epochs=5)
    assert str(err.value) == (f"{tmp_path} has a budget of 5 epochs (8 steps trained): a resume can only raise "
                              "the budget (--epochs 3 is below it)")
    check_budget(tmp_path, meta, None, 5, budget_steps=None, budget_epochs=5)
    check_budget(tmp_path, meta, None, 3, budget_steps=12, budget_epochs=5)  # --epochs replaces a step budget
    # the other unit, at the run's 4 steps per epoch: 3 epochs are 12 steps, below a 20-step budget
    with pytest.raises(RunError) as err:
        check_budget(tmp_path, meta, None, 3, budget_steps=20, budget_epochs=5)
    assert str(err.value) == (f"{tmp_path} has a budget of 20 steps (8 trained): a resume can only raise the "
                              "budget (--epochs 3 is 12 steps, below it)")
    with pytest.raises(RunError) as err:
        check_budget(tmp_path, meta, 19, None, budget_steps=None, budget_epochs=5)
    assert str(err.value) == (f"{tmp_path} has a budget of 5 epochs, 20 steps (8 trained): a resume can only "
                              "raise the budget (--steps 19 is below it)")
    check_budget(tmp_path, meta, 20, None, budget_steps=None, budget_epochs=5)


def test_epochs_on_resume_replace_a_step_budget_even_when_equal_to_the_configs_epochs(tmp_path):
    """A 6-step run (its config keeps the default 10 epochs) resumed with --epochs 10 trains
    10 epochs (it was reported 'already finished', still on its 6 steps); --epochs 1 after
    the 2nd epoch is refused."""
    run_training(_cfg(tmp_path, "e", 6), echo=quiet)
    run = tmp_path / "e"
    assert build_config(overrides=[])[0]["optim"]["epochs"] == 10
    resumed = run_training(resume=run, epochs=3, echo=quiet)
    assert "already_finished" not in resumed and resumed["steps"] == 12
    with pytest.raises(RunError) as err:
        run_training(resume=run, epochs=2, echo=quiet)
    assert str(err.value) == (f"{run} has trained 12 steps, 3 epochs: a resume can only raise the budget "
                              "(--epochs 2 is below them)")
    again = run_training(_cfg(tmp_path, "ten", 6), echo=quiet)
    assert again["steps"] == 6
    ten = run_training(resume=tmp_path / "ten", epochs=10, echo=quiet)
    assert "already_finished" not in ten and ten["steps"] == 40


@pytest.mark.processes
def test_a_torn_newest_checkpoint_falls_back_to_the_previous_complete_one(tmp_path, reference):
    status = _killed_run(_cfg(tmp_path, "torn"), "pruned:3")
    assert os.WTERMSIG(status) == signal.SIGKILL
    run = tmp_path / "torn"
    newest, previous = checkpoints(run / "checkpoints")[:2]
    assert (newest.name, previous.name) == ("ckpt-00000006", "ckpt-00000004")
    model = newest / "model.safetensors"
    full = model.stat().st_size
    model.write_bytes(model.read_bytes()[: full // 2])  # a torn write
    lines = []
    resumed = run_training(resume=run, echo=lines.append)
    assert lines[0] == (f"warning: checkpoint {newest.name} is damaged ({model}: {full // 2} bytes, "
                        f"the manifest says {full}); falling back to {previous.name}, the newest complete checkpoint; "
                        f"the damaged one is kept as damaged-{newest.name}, out of the rotation")
    _assert_same_run(run, resumed, reference)
    # the damaged folder counted as one of the two kept: the resumed run's next save pruned
    # the good ckpt-4 and kept the damaged one, so one more damaged save left nothing
    assert (run / "checkpoints" / f"damaged-{newest.name}" / "model.safetensors").stat().st_size == full // 2
    kept = checkpoints(run / "checkpoints")
    assert [f.name for f in kept] == ["ckpt-00000010", "ckpt-00000009", "ckpt-00000004"]  # 4: `best` names it
    assert all(verify_checkpoint(f) == [] for f in kept)


def test_no_complete_checkpoint_is_refused_naming_the_damaged_files(tmp_path):
    run_training(_cfg(tmp_path, "bad", 3), echo=quiet)  # step 3: the --every and the epoch-end checkpoint
    folders = checkpoints(tmp_path / "bad/checkpoints")
    assert [f.name for f in folders] == ["ckpt-00000003.1", "ckpt-00000003"]
    for folder in folders:
        (folder / "optimizer.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError) as err:
        run_training(resume=tmp_path / "bad", echo=quiet)
    sizes = [json.loads((f / "manifest.json").read_text())["files"]["optimizer.safetensors"]["size"] for f in folders]
    assert str(err.value) == (f"no complete checkpoint in {tmp_path / 'bad/checkpoints'}: " + "; ".join(
        f"{f / 'optimizer.safetensors'}: 1 bytes, the manifest says {size}" for f, size in zip(folders, sizes)))


# ---------------------------------------------------------------------------------------
# real signals to a real `sttpfast train` process
def _cli_args(tmp_path, name, steps) -> list[str]:
    sets = ["data.subset=256", "param.rank=2", f"optim.steps={steps}", "optim.schedule=linear",
            "train.checkpoint_every=1", "log.progress=false", *TINY]
    return [sys.executable, "-m", "sttpfast.cli", "train", "digits", "--bs", "64", "--param", "sttp-r",
            "--logger", "none", "--out", str(tmp_path), "--name", name, *[a for s in sets for a in ("--set", s)]]


def _spawn(tmp_path, name, steps=30, **hooks) -> subprocess.Popen:
    """Start a training process (without waiting for it); ``hooks``: sttpfast.atomic's test
    variables (STTPFAST_STALL_AT=...)."""
    # the thread count of this test process (conftest): results differ in the last bits with another
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    env.pop("STTPFAST_CRASH_AT", None)
    env.pop("STTPFAST_STALL_AT", None)
    env.update(hooks)
    return subprocess.Popen(_cli_args(tmp_path, name, steps), env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _first_checkpoint(proc: subprocess.Popen, run: Path) -> None:
    """Return once ``proc`` has written its first checkpoint in ``run``."""
    deadline = time.time() + 300
    while not (run / "checkpoints/last").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)


def _start(tmp_path, name, steps=30) -> subprocess.Popen:
    """Start a training process and return once it has written its first checkpoint."""
    proc = _spawn(tmp_path, name, steps)
    _first_checkpoint(proc, tmp_path / name)
    return proc


@pytest.fixture(scope="module")
def reference30(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference30")
    cfg = _cfg(out, "full", 30, "train.checkpoint_every=1")
    return run_training(cfg, echo=quiet)


@pytest.mark.processes
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_checkpoint_print_the_resume_command_and_resume_exactly(tmp_path, reference30, sig, code):
    proc = _start(tmp_path, "s")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == code, out
    run = tmp_path / "s"
    step = int(re.search(r"interrupted at step (\d+): checkpoint saved in (\S+)", out).group(1))
    assert 0 < step < 30
    assert out.rstrip().endswith(f"resume with: sttpfast train --resume {run}"), out
    assert json.loads((run / "checkpoints/last/state.json").read_text())["train_iter"] == step
    assert "Traceback" not in out and "Aborted" not in out
    resumed = run_training(resume=run, echo=quiet)
    _assert_same_run(run, resumed, reference30)


@pytest.mark.processes
def test_a_second_sigint_while_stopping_exits_at_once_with_130_and_the_run_resumes_exactly(tmp_path, reference30):
    """Ctrl-C while a checkpoint write hangs (STTPFAST_STALL_AT holds the 2nd checkpoint's
    write for STALL_SECONDS, a disk that hangs): the run waits to stop after it; a second
    Ctrl-C ends the process at once, exit 130, with no traceback and no half checkpoint that
    a resume would take."""
    proc = _spawn(tmp_path, "i2", STTPFAST_STALL_AT="checkpoint-files:2")
    out = ""
    while "STTPFAST_STALL_AT: stalled at checkpoint-files" not in out:
        line = proc.stdout.readline()
        assert line, out
        out += line
    proc.send_signal(signal.SIGINT)  # the first: stop after this step (the write still hangs)
    time.sleep(1.0)  # two SIGINTs before the handler runs would count as one
    sent = time.time()
    proc.send_signal(signal.SIGINT)  # the second: exit now
    out += proc.communicate(timeout=300)[0]
    seconds = time.time() - sent
    assert (proc.returncode, "Traceback" in out, "KeyboardInterrupt" in out) == (130, False, False), out
    assert seconds < STALL_SECONDS / 4, out  # at once: not after the hanging write
    assert "interrupted at step" not in out, out  # no checkpoint written on the way out
    assert [c.name for c in checkpoints(tmp_path / "i2/checkpoints")] == ["ckpt-00000001"]
    _assert_same_run(tmp_path / "i2", run_training(resume=tmp_path / "i2", echo=quiet), reference30)


@pytest.mark.processes
def test_a_second_sigint_after_the_interrupted_checkpoint_exits_with_130_without_a_traceback(tmp_path, reference30):
    """The second Ctrl-C comes once the run said it saved its checkpoint (the process is on
    its way out, the training's handlers removed): exit 130, no KeyboardInterrupt traceback."""
    proc = _start(tmp_path, "i3")
    proc.send_signal(signal.SIGINT)
    out = ""
    while "interrupted at step" not in out:
        line = proc.stdout.readline()
        assert line, out
        out += line
    proc.send_signal(signal.SIGINT)
    out += proc.communicate(timeout=300)[0]
    assert (proc.returncode, "Traceback" in out, "KeyboardInterrupt" in out) == (130, False, False), out
    _assert_same_run(tmp_path / "i3", run_training(resume=tmp_path / "i3", echo=quiet), reference30)


@pytest.mark.processes
def test_sigusr1_checkpoints_and_training_continues_unchanged(tmp_path, reference30):
    proc = _start(tmp_path, "u")
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert re.search(r"SIGUSR1: checkpoint saved at step \d+; training continues", out), out
    run = tmp_path / "u"
    _assert_same_run(run, json.loads((run / "summary.json").read_text()), reference30)


@pytest.mark.processes
def test_a_second_process_on_the_run_is_refused_and_a_killed_holder_is_taken_over(tmp_path, reference30):
    proc = _start(tmp_path, "l")
    run = tmp_path / "l"
    with pytest.raises(RunError) as err:
        run_training(resume=run, echo=quiet)
    assert str(err.value) == (f"run folder {run} is in use by process {proc.pid} (lock {run / '.lock'}); "
                              "wait for it to end or stop it first")
    proc.kill()  # SIGKILL at a random moment: its lock goes with it
    proc.wait()
    resumed = run_training(resume=run, echo=quiet)
    assert (run / ".lock").read_text() == f"{os.getpid()}\n"
    _assert_same_run(run, resumed, reference30)


RANDOM_KILL_SEED = 7  # moments at 32%, 15% and 65% of the span


@pytest.mark.processes
def test_sigkill_at_random_moments_of_a_real_run_resumes_bit_identical(tmp_path, reference):
    """Three `sttpfast train` processes (the dropout model, a checkpoint every step) SIGKILLed
    at seeded random moments after their first checkpoint, each resumed to the end."""
    import random

    procs = [_spawn(tmp_path, f"r{i}", STEPS) for i in range(3)]  # all three at once: the test stays short
    for i, proc in enumerate(procs):
        _first_checkpoint(proc, tmp_path / f"r{i}")
    # the run's pace under this load: the time process 0 takes from its 1st to its 2nd checkpoint
    first, last = time.time(), tmp_path / "r0/checkpoints/last/state.json"
    while json.loads(last.read_text())["train_iter"] < 2:
        assert procs[0].poll() is None
        time.sleep(0.02)
    step_s = time.time() - first
    # kill within the first 70% of what is left of the run: none ends first
    rng = random.Random(RANDOM_KILL_SEED)
    delays = [rng.uniform(0, 0.7 * (STEPS - 2) * step_s) for _ in range(3)]
    started = time.time()
    for i, proc in sorted(enumerate(procs), key=lambda p: delays[p[0]]):
        time.sleep(max(0.0, started + delays[i] - time.time()))
        proc.kill()
    killed_at = []
    for i, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, (delays[i], out)  # killed, not finished
        run = tmp_path / f"r{i}"
        killed_at.append(json.loads((run / "checkpoints/last/state.json").read_text())["train_iter"])
        resumed = run_training(resume=run, echo=quiet)
        _assert_same_run(run, resumed, reference)
    print(f"random kills: delays {[round(d, 2) for d in delays]} s, newest checkpoint at steps {killed_at}; "
          f"3 of 3 resumed bit-identical")


@pytest.mark.processes
def test_tensorboard_after_a_kill_and_resume_shows_each_step_once_with_the_uninterrupted_values(tmp_path):
    full = run_training(_cfg(tmp_path, "full", STEPS, "log.logger=tensorboard", "log.every=1"), echo=quiet)
    cfg = _cfg(tmp_path, "tb", STEPS, "log.logger=tensorboard", "log.every=1")
    status = _killed_run(cfg, "checkpoint-files:4")  # while writing step 8's checkpoint: resumes at 6
    assert os.WTERMSIG(status) == signal.SIGKILL
    run_training(resume=tmp_path / "tb", echo=quiet)
    want, have = tensorboard_scalars(tmp_path / "full/tb"), tensorboard_scalars(tmp_path / "tb/tb")
    assert [step for step, _ in have["train/loss"]] == list(range(1, STEPS + 1))
    assert have == want
    assert full["steps"] == STEPS


def test_a_resume_mid_epoch_prints_and_logs_nothing_for_the_epochs_it_skips(tmp_path):
    # the skipped epochs printed rows ("epoch 0  train_loss 00:00") and the spectrum image was
    # logged again at step 0 (in W&B, steps going backwards)
    from interrupt import Interrupt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sttpfast.run import TrainingInterrupted

    cfg = _cfg(tmp_path, "r", STEPS, "log.logger=tensorboard", "log.every=1")
    with pytest.raises(TrainingInterrupted):
        run_training(cfg, extra_cbs=[Interrupt(6, KeyboardInterrupt)], echo=quiet)  # in epoch 1
    lines = []
    run_training(resume=tmp_path / "r", echo=lines.append)
    assert [line.split("  ")[0] for line in lines if line.startswith("epoch ")] == ["epoch 1", "epoch 2"]
    acc = EventAccumulator(str(tmp_path / "r" / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("singular_values")] == [4, 8, 10]  # each epoch's end, once


def test_a_resume_with_another_thread_count_is_warned_about(tmp_path):
    run_training(_cfg(tmp_path, "t", 3), echo=quiet)
    threads = torch.get_num_threads()
    lines = []
    torch.set_num_threads(threads + 1)
    try:
        run_training(resume=tmp_path / "t", steps=4, echo=lines.append)
    finally:
        torch.set_num_threads(threads)
    assert lines[0] == (f"warning: the run was checkpointed with {threads} CPU threads, this process uses "
                        f"{threads + 1}: results can differ in the last bits from an uninterrupted run")


def test_an_optimizer_state_from_before_empty_factors_were_buffers_still_loads():
    """Checkpoints written before 2026-11-30 hold an optimizer state for every empty (0, r)
    factor (then a parameter, now a buffer): resuming maps the states onto today's parameters;
    an optimizer state of another model is still refused."""
    import copy

    from fastai.optimizer import SGD
    from torch import nn
    from torch.nn.utils.parametrize import ParametrizationList

    import sttpfast
    from sttpfast.callbacks.checkpoint import CheckpointError, _optimizer_from_files, _optimizer_to_files

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 8, 8))
    sttpfast.parameterize(model, "sttp-r", rank=4)
    legacy = copy.deepcopy(model)
    for plist in legacy.modules():  # the old layout: every factor a parameter, in index order
        if isinstance(plist, ParametrizationList):
            factors = [getattr(plist, f"original{i}") for i in range(plist.ntensors)]
            for i in range(plist.ntensors):
                plist._parameters.pop(f"original{i}", None)
                plist._buffers.pop(f"original{i}", None)
            for i, t in enumerate(factors):
                plist.register_parameter(f"original{i}", nn.Parameter(t.detach().clone()))
    n_legacy, n_now = len(list(legacy.parameters())), len(list(model.parameters()))
    assert n_legacy > n_now  # the empty factors were parameters
    opt = SGD(list(legacy.parameters()), lr=0.1, mom=0.9)
    legacy(torch.randn(2, 3, 8, 8)).square().sum().backward()
    opt.step()
    tensors, meta = _optimizer_to_files(opt)
    assert meta["n_params"] == n_legacy
    fresh = SGD(list(model.parameters()), lr=0.1, mom=0.9)
    _optimizer_from_files(fresh, tensors, meta, model)
    names = dict(legacy.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(fresh.state[p]["grad_avg"], opt.state[names[name]]["grad_avg"]), name
    with pytest.raises(CheckpointError, match="not the same model"):
        _optimizer_from_files(SGD(list(model.parameters()), lr=0.1, mom=0.9), tensors, meta)  # no model: no mapping
    other = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(CheckpointError, match="not the same model"):
        _optimizer_from_files(SGD(list(other.parameters()), lr=0.1, mom=0.9), tensors, meta, other)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_that_arrives_during_the_ranks_agreement_is_acted_on_at_the_next_step(monkeypatch, signum):
    """Python runs a handler when the flag all-reduce returns; the reduced flags (without the
    new signal) then overwrote it: a SIGTERM reaching a rank while it waited there was lost
    (2 of 5 timed kills of one torchrun rank trained to the end). The signal must be kept,
    and acted on by every rank at the next agreement, never by one rank alone."""
    import torch.distributed as dist

    from sttpfast.callbacks.signals import SignalCheckpoint, StopRequested

    saved = []
    cb = SignalCheckpoint(checkpoint=lambda: saved.append(1) or 7, echo=lambda *a: None)
    cb.learn = type("L", (), {"model": torch.nn.Linear(2, 2)})()
    arrivals = [signum]  # delivered inside the first all-reduce, where the other rank had nothing

    def all_reduce(flags, op=None):
        if arrivals:
            cb._handle(arrivals.pop(), None)  # flags were built before: the other rank's view too
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    cb._act()  # the agreement this step: nothing (this rank must not act alone)
    assert saved == []
    if signum == signal.SIGUSR1:
        cb._act()
        assert saved == [1] and not cb.checkpoint_requested
        cb._act()
        assert saved == [1]
    else:
        with pytest.raises(StopRequested) as stop:
            cb._act()
        assert stop.value.signum == signal.SIGTERM
