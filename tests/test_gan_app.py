"""The GAN app: `sttpfast gan`, apps/gan.py, the GAN config schema and configs, checkpoints,
exact resume, signals, metrics in a run, several processes, bad input."""
import glob
import json
import re
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from fastai.callback.core import Callback
from interrupt import bar_shown_above, tensorboard_scalars
from safetensors.torch import load_file

from sttpfast.cli import main
from sttpfast.config import DEFAULTS, GAN_CLI_FLAGS, SCHEMA, ConfigError, build_config
from sttpfast.gan.run import check_gan_config, run_gan
from sttpfast.run import TrainingInterrupted
from sttpfast.run_lock import RunLock

ROOT = Path(__file__).resolve().parents[1]
# 8 px digits (their own size: nothing resized), 8-channel networks: a G step takes milliseconds
TINY = ["gan.g_kwargs={widths: [8, 8, 8], bottom_width: 2, z_dim: 16}", "gan.d_kwargs={widths: [8, 8, 8, 8]}"]
TINY_SET = [a for item in TINY for a in ("--set", item)]
QUIET = ["--set", "log.progress=false"]


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _cfg(out, name, *overrides):
    cfg, _ = build_config(overrides=["data.name=digits", "data.subset=256", "gan.bs=32", "gan.steps=10",
                                     "gan.n_dis=2", *TINY, "log.progress=false", f"train.out={out}",
                                     f"train.name={name}", *overrides])
    return cfg


def _weights(run: Path) -> dict:
    return load_file(str(run / "checkpoints/last/model.safetensors"))


def _optimizer(run: Path) -> dict:
    return load_file(str(run / "checkpoints/last/optimizer.safetensors"))


def test_a_cp_discriminator_says_its_als_init_and_a_resume_fits_nothing(tmp_path, monkeypatch):
    """`--d-param cp`: the spectral init is CP's ALS fit, said before it starts as `sttpfast
    train` says it (the GAN command said nothing); a resume loads every factor from the
    checkpoint, so it fits nothing (it fitted D again and threw the fit away)."""
    from torch import nn

    from sttpfast.models import create_model
    from sttpfast.params import cp as cp_module
    from sttpfast.params.registry import method

    fits = []
    real = cp_module.cp_als
    monkeypatch.setattr(cp_module, "cp_als", lambda *a, **kw: fits.append(1) or real(*a, **kw))
    first = _cli("gan", "digits", "--d-param", "cp", "--rank", "2", "--steps", "1", "--n-dis", "1", "--bs", "32",
                 "--subset", "64", "--out", tmp_path, "--name", "cp", *TINY_SET, *QUIET)
    assert first.exit_code == 0, first.output
    d = create_model("sngan_d32", in_chans=1, widths=[8, 8, 8, 8])
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in d.modules())
    assert first.output.splitlines()[0] == method("cp").spectral_init_note and len(fits) == layers == 11
    resumed = _cli("gan", "--resume", tmp_path / "cp", "--steps", "2")
    assert resumed.exit_code == 0, resumed.output
    assert len(fits) == 11 and "ALS" not in resumed.output


def test_the_summary_line_says_the_z_the_run_line_said(tmp_path):
    # D's Z is 4,756 / 16,720 = 28.44497%: the summary line printed the 4-decimal summary.json
    # value rounded again, 28.45%, after the run line's 28.44%
    result = _cli("gan", "digits", "--d-param", "svdp-l", "--rank", "4", "--steps", "1", "--n-dis", "1", "--bs", "16",
                  "--subset", "64", "--out", tmp_path, "--name", "z", "--set", "gan.d_kwargs={widths: [16, 16, 16, 16]}",
                  "--set", TINY[0], *QUIET)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "z/summary.json").read_text())
    assert (summary["d_params"], summary["d_params_dense"], summary["d_z_percent"]) == (4756, 16720, 28.445)
    assert "D svdp-l Z = 28.44%" in result.output and "| D svdp-l Z 28.44% |" in result.output, result.output


def test_a_low_rank_side_without_a_rank_says_it_runs_at_full_rank(tmp_path):
    # `--d-param sttp-c` alone ran D at full rank (Z 93%) without a word, where train says its rank
    result = _cli("gan", "digits", "--d-param", "sttp-c", "--g-param", "svdp-r", "--g-rank", "2", "--steps", "1",
                  "--n-dis", "1", "--bs", "16", "--subset", "64", "--out", tmp_path, "--name", "f", *TINY_SET, *QUIET)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == ("D sttp-c: rank full (no --rank or --d-rank given: every layer at its "
                                             "full rank)")
    assert "rank full" not in result.output.split("\n", 1)[1]  # G has its rank


def test_the_parameterizations_warnings_are_warning_lines_and_sn_exact_names_its_flags(tmp_path):
    """A side's surgery warning (layers past their dense size) came out as Python's warning,
    with sttpfast's file, line and source; `train` says the same as a `warning:` line."""
    result = _cli("gan", "digits", "--d-param", "lowrank", "--rank", "4", "--steps", "1", "--n-dis", "1", "--bs", "32",
                  "--subset", "64", "--out", tmp_path, "--name", "lr", *TINY_SET, *QUIET)
    assert result.exit_code == 0, result.output
    assert "UserWarning" not in result.output and "learner.py" not in result.output, result.output
    assert [line for line in result.output.splitlines() if line.startswith("warning:")] == [
        "warning: lowrank at rank 4 has more degrees of freedom than the dense weight in 2 layer(s): "
        "blocks.0.shortcut, fc"]
    exact = _cli("gan", "digits", "--d-param", "sttp-c", "--rank", "4", "--sn-exact", "--steps", "1",
                 "--out", tmp_path, "--name", "x", *TINY_SET, *QUIET)
    assert exact.exit_code == 2 and exact.output.splitlines() == [
        "Error: --sn-exact (gan.sn_exact) needs --d-param sn (gan.d_param), got 'sttp-c'"], exact.output


def test_cli_gan_digits_sn_writes_the_run_folder(tmp_path):
    result = _cli("gan", "digits", "--d-param", "sn", "--steps", "20", "--bs", "32", "--subset", "256",
                  "--out", tmp_path, "--name", "sn", *TINY_SET, *QUIET)
    assert result.exit_code == 0, result.output
    run = tmp_path / "sn"
    state = json.loads((run / "checkpoints/last/state.json").read_text())
    assert state["app"] == "gan" and state["train_iter"] == 20 and state["d_iter"] == 100
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["steps"], summary["d_steps"], summary["processes"]) == (20, 100, 1)
    assert summary["d_param"] == "sn" and summary["d_z_percent"] == 100.0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["gan"]["d_param"] == "sn" and config["gan"]["steps"] == 20
    assert list(config) == ["data", "log", "train", "gan"]  # no classifier sections (model, param, optim, reg)
    assert list((run / "tb").glob("events.out.tfevents.*"))
    RunLock(run).acquire().release()  # the run let go of its folder
    weights = _weights(run)  # G, D and both parameterizations in one file
    assert any(k.startswith("generator.") for k in weights) and any(k.startswith("discriminator.") for k in weights)
    assert "summary: G dense Z 100.00% | D sn Z 100.00%" in result.output
    # the epoch rows name whose loss they show (fastai's "train_loss" / "valid_loss" read as G's
    # or a classifier's; the summary's loss_d then differed from "train_loss" without a word)
    rows = [line for line in result.output.splitlines() if line.startswith("epoch ")]
    assert len(rows) == 20 and all(re.fullmatch(r"epoch \d+  train_loss_d -?\d+\.\d{4}  valid_loss_d -?\d+\.\d{4}  "
                                                r"time \d\d:\d\d", row) for row in rows), rows


def test_a_gan_run_whose_name_was_taken_says_so(tmp_path):
    (tmp_path / "g").mkdir()  # a folder of that name, not a run: no resume hint
    result = _cli("gan", "digits", "--d-param", "sn", "--steps", "1", "--bs", "32", "--subset", "64",
                  "--out", tmp_path, "--name", "g", *TINY_SET, *QUIET)
    assert result.exit_code == 0, result.output
    assert [line for line in result.output.splitlines() if line.startswith("warning:")] == [
        f"warning: {tmp_path / 'g'} exists: this run is {tmp_path / 'g-2'}"]


class SendSignal(Callback):
    """Sends ``signum`` to this process after G step ``k`` (as `kill` from outside would)."""

    order = 90

    def __init__(self, k, signum=signal.SIGINT):
        self.k, self.signum = k, signum

    def after_batch(self):
        if self.training and self.train_iter == self.k:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("k,signum,params", [
    # rates of 0.01: the losses move (at the default 2e-4 the tiny D's hinge loss shows 2.0000)
    (6, signal.SIGINT, ["gan.d_param=sttp-c", "gan.g_param=svdp-r", "gan.rank=4", "gan.ema=0.9",
                        "gan.lr_d=0.01", "gan.lr_g=0.01"]),  # mid-epoch 1
    (4, signal.SIGTERM, ["gan.d_param=sr", "gan.sr_every=3", "gan.lr_d=0.01", "gan.lr_g=0.01"]),  # an epoch end
], ids=["sigint-mid-epoch-sttp-c-svdp-r-ema", "sigterm-epoch-end-sr"])
def test_resume_after_a_signal_is_bit_identical(tmp_path, k, signum, params):
    whole_said, resumed_said = [], []
    whole = run_gan(_cfg(tmp_path, "whole", *params), echo=whole_said.append)
    assert whole["steps"] == 10
    said = []
    with pytest.raises(TrainingInterrupted) as stop:
        run_gan(_cfg(tmp_path, "cut", *params), extra_cbs=[SendSignal(k, signum)], echo=said.append)
    assert stop.value.code == 128 + signum
    assert f"interrupted at G step {k}" in " ".join(said) and f"sttpfast gan --resume {tmp_path / 'cut'}" in said[-1]
    assert json.loads((tmp_path / "cut/checkpoints/last/state.json").read_text())["train_iter"] == k
    resumed = run_gan(resume=tmp_path / "cut", echo=resumed_said.append)
    assert (resumed["steps"], resumed["d_steps"]) == (10, 20)
    for load in (_weights, _optimizer):
        a, b = load(tmp_path / "whole"), load(tmp_path / "cut")
        assert a.keys() == b.keys()
        assert [key for key in a if not torch.equal(a[key], b[key])] == []
    # the printed rows too: the smoothed train_loss continued from the checkpoint (it restarted),
    # and the epochs the resume skips print nothing (they printed "epoch 0  train_loss 00:00")
    def rows(said):
        return {line.split("  ")[0]: [part for part in line.split("  ") if not part.startswith("time")]
                for line in said if line.startswith("epoch ")}

    have, want = rows(resumed_said), rows(whole_said)
    # 4 G steps per epoch; a signal at step 4 comes before epoch 0's validation, which the resume runs
    assert list(have) == ["epoch 0", "epoch 1", "epoch 2"][(1 if k > 4 else 0):]
    assert have == {epoch: want[epoch] for epoch in have}
    again = run_gan(resume=tmp_path / "cut", echo=lambda *a: None)  # finished: nothing changes
    assert again["already_finished"] is True


def test_a_resume_at_an_epoch_end_prints_no_empty_progress_bar_warning(tmp_path):
    """A signal after an epoch's last G step (4 G steps per epoch) checkpoints before that
    epoch's validation: the resume runs the validation with no G step left in the epoch, and
    fastprogress, asked to redraw the emptied bar, printed its raw `UserWarning: Your generator
    is empty.` (with its source line)."""
    import warnings

    with pytest.raises(TrainingInterrupted):
        run_gan(_cfg(tmp_path, "cut", "log.progress=true", "train.checkpoint_every=2"), extra_cbs=[SendSignal(4)],
                echo=lambda *a: None)
    assert json.loads((tmp_path / "cut/checkpoints/last/state.json").read_text())["epoch"] == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = run_gan(resume=tmp_path / "cut", echo=lambda *a: None)
    assert resumed["steps"] == 10
    assert [f"{Path(w.filename).name}: {w.message}" for w in caught] == []


class SignalAfterValidation(Callback):
    """Sends ``signum`` to this process in the validation after G step ``k`` (the signal is
    acted on at the epoch's end, after the loggers wrote its row)."""

    order = 90

    def __init__(self, k, signum=signal.SIGINT):
        self.k, self.signum = k, signum

    def after_validate(self):
        if self.train_iter == self.k:
            os.kill(os.getpid(), self.signum)


class KillAfterEpoch(Callback):
    """SIGKILLs the process at the end of the epoch that ends at G step ``k``, after the
    checkpoint writer and the loggers (70) are done with it."""

    order = 80

    def __init__(self, k):
        self.k = k

    def after_epoch(self):
        if self.train_iter == self.k:
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.processes
@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_a_run_stopped_at_an_epoch_end_logs_each_tensorboard_point_once(tmp_path, how):
    """Step 4 ends epoch 0 and is a --checkpoint-every step: its checkpoint was written before
    the epoch's validation, and the run was stopped after the epoch's row went to TensorBoard
    (SIGINT in the validation, acted on at the epoch's end; SIGKILL after the epoch). The
    resume took that checkpoint, validated epoch 0 again and logged `epoch`, `train/loss_d`
    and `valid/loss_d` at step 4 a second time."""
    sets = ["log.logger=tensorboard", "log.every=1", "train.checkpoint_every=2"]
    run_gan(_cfg(tmp_path, "whole", *sets), echo=lambda *a: None)
    if how == "sigint":
        with pytest.raises(TrainingInterrupted):
            run_gan(_cfg(tmp_path, "cut", *sets), extra_cbs=[SignalAfterValidation(4)], echo=lambda *a: None)
    else:
        pid = os.fork()
        if pid == 0:  # the child: killed after epoch 0
            try:
                run_gan(_cfg(tmp_path, "cut", *sets), extra_cbs=[KillAfterEpoch(4)], echo=lambda *a: None)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    state = json.loads((tmp_path / "cut/checkpoints/last/state.json").read_text())
    assert (state["train_iter"], state["epoch"]) == (4, 1)  # the validated end of epoch 0
    run_gan(resume=tmp_path / "cut", echo=lambda *a: None)
    want, have = tensorboard_scalars(tmp_path / "whole/tb"), tensorboard_scalars(tmp_path / "cut/tb")
    assert [step for step, _ in have["epoch"]] == [4, 8, 10]
    assert have == want


def test_an_interrupt_mid_epoch_is_said_on_its_own_line_below_the_progress_bar(tmp_path, capsys):
    """fastprogress draws its bar with a carriage return and no newline: the interrupt's
    message was glued to the bar ("... [1/4 00:00<00:00]interrupted at G step 1: ...")."""
    with pytest.raises(TrainingInterrupted):
        run_gan(_cfg(tmp_path, "cut", "log.progress=true"), extra_cbs=[SendSignal(1)], echo=print)
    lines = capsys.readouterr().out.split("\n")
    said = f"interrupted at G step 1: checkpoint saved in {tmp_path / 'cut' / 'checkpoints' / 'last'}"
    bar = bar_shown_above(lines, said)
    assert bar.startswith("Epoch 1/3 : |") and "[1/4 " in bar, bar
    assert lines[lines.index(said) + 1] == f"resume with: sttpfast gan --resume {tmp_path / 'cut'}"


def test_a_sigusr1_mid_epoch_is_said_on_its_own_line_below_the_progress_bar(tmp_path, capsys):
    """SIGUSR1's message was glued to the bar as the interrupt's was ("... [1/4 00:00<00:00]SIGUSR1:
    checkpoint saved at step 1; ..."); the bar goes on below it."""
    run_gan(_cfg(tmp_path, "usr1", "log.progress=true"), extra_cbs=[SendSignal(1, signal.SIGUSR1)], echo=print)
    lines = capsys.readouterr().out.split("\n")
    bar = bar_shown_above(lines, "SIGUSR1: checkpoint saved at step 1; training continues")
    assert bar.startswith("Epoch 1/3 : |") and "[1/4 " in bar, bar


@pytest.mark.processes
def test_a_killed_run_resumes_from_its_last_complete_checkpoint_bit_identically(tmp_path):
    """SIGKILL in the middle of writing the fifth checkpoint (steps 2, 3 = best, 4, 4 again after
    epoch 0's validation, 6; STTPFAST_CRASH_AT, the chaos hook of sttpfast.atomic): the run resumes
    from step 4 and ends as if never killed, its metrics file too."""
    args = [str(ROOT / "apps/gan.py"), "digits", "--d-param", "sttp-r", "--rank", "4", "--ema", "0.9", "--steps", "10",
            "--n-dis", "2", "--bs", "32", "--subset", "256", "--checkpoint-every", "2", "--logger", "none",
            "--metrics-every", "3", "--metrics-samples", "64", "--extractor", "offline",
            "--set", "gan.extractor_steps=5", "--set", "gan.grid=4", *TINY_SET, *QUIET]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    whole = subprocess.run([sys.executable, *args, "--out", str(tmp_path), "--name", "whole"],
                           capture_output=True, text=True, timeout=600, env=env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = subprocess.run([sys.executable, *args, "--out", str(tmp_path), "--name", "cut"], capture_output=True,
                            text=True, timeout=600, env={**env, "STTPFAST_CRASH_AT": "checkpoint-files:5"})
    assert killed.returncode == -signal.SIGKILL
    resumed = subprocess.run([sys.executable, str(ROOT / "apps/gan.py"), "--resume", str(tmp_path / "cut")],
                             capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {tmp_path / 'cut'} at G step 4" in resumed.stdout
    for load in (_weights, _optimizer):
        a, b = load(tmp_path / "whole"), load(tmp_path / "cut")
        assert a.keys() == b.keys() and [key for key in a if not torch.equal(a[key], b[key])] == []
    # the evaluation at step 6 ran before the kill and again after the resume: recorded once
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 9, 10]
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()
    # what the metrics were measured with (the offline extractor's quality was shown nowhere)
    record = json.loads((tmp_path / "cut" / "summary.json").read_text())["extractor"]
    assert record["name"] == "sttpfast-resnet20-digits" and record["steps"] == 5
    assert 0.0 < record["valid_accuracy"] <= 1.0 and set(record) == {"name", "valid_accuracy", "steps"}


METRICS_SETS = ["train.checkpoint_every=2", "log.logger=none", "gan.metrics_every=3", "gan.metrics_samples=64",
                "gan.extractor=offline", "gan.extractor_steps=5", "gan.grid=4"]


class KillAtTheEndOfFit(Callback):
    """SIGKILLs the process in ``after_fit`` at callback order ``order``: 55 is before GANMetrics
    (60) evaluates the end of the run, 80 after the checkpoint writer (70) saved the last step."""

    def __init__(self, order):
        self.order = order

    def after_fit(self):
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.processes
@pytest.mark.parametrize("order", [55, 80], ids=["before-the-last-evaluation", "before-summary-json"])
def test_a_kill_at_the_end_of_the_run_resumes_to_the_final_metrics(tmp_path, order):
    """Step 10's --every checkpoint is written before the end-of-run evaluation. Killed before
    that evaluation, the resume evaluates (it does not report step 9's metrics as the run's
    last); killed after the last checkpoint, before summary.json, the resume writes the summary
    of the uninterrupted run."""
    sets = ["gan.d_param=sttp-r", "gan.rank=4", *METRICS_SETS]
    whole = run_gan(_cfg(tmp_path, "whole", *sets), echo=lambda *a: None)
    pid = os.fork()
    if pid == 0:  # the child: killed at the end of the fit
        try:
            run_gan(_cfg(tmp_path, "cut", *sets), extra_cbs=[KillAtTheEndOfFit(order)], echo=lambda *a: None)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    run = tmp_path / "cut"
    last = json.loads((run / "checkpoints/last/state.json").read_text())
    assert last["train_iter"] == 10 and last["seconds"] > 0
    assert not (run / "summary.json").exists()
    resumed = run_gan(resume=run, echo=lambda *a: None)
    assert resumed["steps"] == 10
    assert resumed["seconds"] >= last["seconds"]  # the killed session's training time counts
    # the rank check runs at the end of a fit: the resume after the last checkpoint fits nothing
    apart = ("run_dir", "checkpoint", "seconds", "ranks_in_sync")
    assert {k: v for k, v in resumed.items() if k not in apart} == {k: v for k, v in whole.items() if k not in apart}
    assert (whole["ranks_in_sync"], resumed["ranks_in_sync"]) == (True, True if order == 55 else None)
    assert resumed["best"]["metric"].startswith("fid_") and resumed["best"]["metric"] in resumed["metrics"]
    assert json.loads((run / "checkpoints/last/state.json").read_text())["metrics"]["evaluated_at"] == 10
    assert (run / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 9, 10]


def test_a_finished_run_whose_last_checkpoint_precedes_its_final_evaluation_stays_finished(tmp_path, monkeypatch):
    """Runs written before the end-of-run evaluation was checkpointed (emulated: no save after
    it) are finished by their summary.json: a resume changes nothing."""
    from sttpfast.gan.checkpoint import GANCheckpointer

    with monkeypatch.context() as patch:
        patch.setattr(GANCheckpointer, "_evaluated_at", lambda self: None)
        run_gan(_cfg(tmp_path, "old", *METRICS_SETS), echo=lambda *a: None)
    run = tmp_path / "old"
    assert json.loads((run / "checkpoints/last/state.json").read_text())["metrics"]["evaluated_at"] == 9
    before = {f: f.read_bytes() for f in run.rglob("*") if f.is_file() and f.name != ".lock"}
    again = run_gan(resume=run, echo=lambda *a: None)
    assert again["already_finished"] is True
    assert {f: f.read_bytes() for f in run.rglob("*") if f.is_file() and f.name != ".lock"} == before


@pytest.mark.processes
def test_a_raised_budget_killed_before_its_summary_reports_the_new_steps(tmp_path):
    whole = tmp_path / "whole"
    run_gan(_cfg(tmp_path, "whole", "gan.steps=4", "log.logger=none"), echo=lambda *a: None)
    want = run_gan(resume=whole, steps=8, echo=lambda *a: None)
    run = tmp_path / "raised"
    run_gan(_cfg(tmp_path, "raised", "gan.steps=4", "log.logger=none"), echo=lambda *a: None)
    pid = os.fork()
    if pid == 0:
        try:
            run_gan(resume=run, steps=8, extra_cbs=[KillAtTheEndOfFit(80)], echo=lambda *a: None)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    resumed = run_gan(resume=run, echo=lambda *a: None)
    assert "already_finished" not in resumed
    apart = ("run_dir", "checkpoint", "seconds", "ranks_in_sync")  # the resume fits nothing: no rank check
    assert {k: v for k, v in resumed.items() if k not in apart} == {k: v for k, v in want.items() if k not in apart}
    assert (resumed["steps"], resumed["ranks_in_sync"]) == (8, None)


def test_a_resume_below_the_steps_already_trained_is_refused(tmp_path):
    run_gan(_cfg(tmp_path, "low", "gan.steps=4", "log.logger=none"), echo=lambda *a: None)
    run = tmp_path / "low"
    before = {f: f.read_bytes() for f in run.rglob("*") if f.is_file() and f.name != ".lock"}
    result = _cli("gan", "--resume", run, "--steps", "2")
    assert result.exit_code == 2
    assert result.output.strip() == (f"Error: {run} has trained 4 steps: a resume can only raise the budget "
                                     "(--steps 2 is below them)")
    assert {f: f.read_bytes() for f in run.rglob("*") if f.is_file() and f.name != ".lock"} == before
    result = _cli("gan", "--resume", run, "--set", "log.progress=true", "--set", "gan.lr_d=0.1")
    assert result.exit_code == 2 and result.output == (
        "Error: --resume continues with the run's own config.yaml; drop the other options (only --steps may raise "
        "its budget, and --set log.progress=true|false turns the progress bar on or off)\n")
    # the progress bar is display only: a resume may turn it on or off (it was refused)
    result = _cli("gan", "--resume", run, "--steps", "5", "--set", "log.progress=true")
    assert result.exit_code == 0, result.output
    # fastai's progress table (its header) in place of the project's one-line epoch rows ("epoch 5  train_loss_d ...")
    assert "resuming" in result.output and not re.search(r"^epoch \d", result.output, re.M)
    assert re.search(r"epoch +train_loss_d +valid_loss_d +time", result.output), result.output
    assert yaml.safe_load((run / "config.yaml").read_text())["log"]["progress"] is True


def test_a_raised_budget_inside_the_epoch_the_run_ended_in_trains_on(tmp_path):
    """One D step per G step: an epoch is 8 G steps, and a 3-step run ends (and validates)
    inside the first. Resumed to 5 steps it trains steps 4 and 5, to the weights of an
    uninterrupted 5-step run (constant rates; it trained nothing and moved `last` to a
    step-0 checkpoint)."""
    sets = ["gan.n_dis=1", "gan.steps=3", "log.logger=none", "gan.lr_decay=const"]
    whole = run_gan(_cfg(tmp_path, "whole", *sets[:2], "gan.steps=5", *sets[3:]), echo=lambda *a: None)
    run_gan(_cfg(tmp_path, "cut", *sets), echo=lambda *a: None)
    resumed = run_gan(resume=tmp_path / "cut", steps=5, echo=lambda *a: None)
    assert (resumed["steps"], resumed["d_steps"]) == (5, 5) == (whole["steps"], whole["d_steps"])
    assert json.loads((tmp_path / "cut/checkpoints/last/state.json").read_text())["train_iter"] == 5
    assert sorted(p.name for p in (tmp_path / "cut/checkpoints").glob("ckpt-*")) == ["ckpt-00000003", "ckpt-00000005"]
    for load in (_weights, _optimizer):
        a, b = load(tmp_path / "whole"), load(tmp_path / "cut")
        assert a.keys() == b.keys() and [key for key in a if not torch.equal(a[key], b[key])] == []


def test_a_run_with_metrics_raises_no_fastai_attribute_warning(tmp_path):
    """GANMetrics kept its real images as `_reals`, the learner's own attribute: fastai warned
    "You are shadowing an attribute (_reals)" with its source line in every such run."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_gan(_cfg(tmp_path, "m", "gan.steps=3", *METRICS_SETS), echo=lambda *a: None)
    assert [str(w.message) for w in caught if "shadowing" in str(w.message)] == []


def test_the_metrics_plan_is_said_before_the_run_with_the_real_images_it_compares(tmp_path):
    # --metrics-samples above the training images compared 64 fakes with the 40 reals there
    # without a word
    lines = []
    run_gan(_cfg(tmp_path, "m", "gan.steps=2", "data.subset=40", *METRICS_SETS), echo=lines.append)
    assert [line for line in lines if line.startswith("metrics:")] == [
        "metrics: fid, isc, kid every 3 G steps and at the end, 64 generated images against 40 real ones (all the "
        "training images: fewer than --metrics-samples 64), extractor offline (an sttpfast classifier of the "
        "training data)"]
    lines.clear()
    run_gan(_cfg(tmp_path, "n", "gan.steps=2", *METRICS_SETS), echo=lines.append)
    assert [line for line in lines if line.startswith("metrics:")] == [
        "metrics: fid, isc, kid every 3 G steps and at the end, 64 generated images against 64 real ones, "
        "extractor offline (an sttpfast classifier of the training data)"]


def test_resume_refuses_a_classification_run(tmp_path):
    trained = _cli("train", "digits", "--arch", "resnet20_cifar", "--param", "dense", "--steps", "1", "--bs", "64",
                   "--subset", "128", "--logger", "none", "--out", tmp_path, "--name", "c", *QUIET)
    assert trained.exit_code == 0, trained.output
    result = _cli("gan", "--resume", tmp_path / "c")
    assert result.exit_code == 2
    assert result.output.strip() == f"Error: {tmp_path / 'c'} is not a GAN run; resume it with: " \
                                    f"sttpfast train --resume {tmp_path / 'c'}"


def test_train_resume_refuses_a_gan_run_naming_the_gan_command(tmp_path):
    run_gan(_cfg(tmp_path, "g", "gan.steps=2", "log.logger=none"), echo=lambda *a: None)
    run = tmp_path / "g"
    before = {f: f.read_bytes() for f in run.rglob("*") if f.is_file() and f.name != ".lock"}
    result = _cli("train", "--resume", run)
    assert result.exit_code == 2
    assert result.output == f"Error: {run} is a GAN run; resume it with: sttpfast gan --resume {run}\n"
    assert {f: f.read_bytes() for f in run.rglob("*") if f.is_file() and f.name != ".lock"} == before


ALLOWED = ("svdp-l, svdp-r, svdp-c, sttp-l, sttp-r, sttp-c, lowrank, cp, rcp, tucker, rtk, tt, rtt, tr, rtr, ht, "
           "dense, sn, svdp, sttp")


@pytest.mark.parametrize("args,message", [
    (["--d-param", "sttp-x"], "unknown gan.d_param (--d-param) 'sttp-x'; did you mean 'sttp-r' or 'sttp-l' or "
                              f"'sttp-c'? allowed: {ALLOWED}, sr"),
    (["--g-param", "svdpc"], "unknown gan.g_param (--g-param) 'svdpc'; did you mean 'svdp-c' or 'svdp' or 'svdp-r'? "
                             f"allowed: {ALLOWED}"),
    # the tiny D's largest sttp-c rank is 18 and the tiny G's largest svdp-c rank 8: one above each
    (["--d-param", "sttp-c", "--rank", "19"], "rank 19 is larger than any layer of the discriminator allows under "
                                              "sttp-c: the largest useful rank there is 18"),
    (["--g-param", "svdp-c", "--g-rank", "9"], "rank 9 is larger than any layer of the generator allows under "
                                               "svdp-c: the largest useful rank there is 8"),
    (["--n-dis", "0"], "--n-dis 0: expected a positive integer (>= 1)"),
    # a rank neither network takes ran without a word (and named the run folder -r4)
    (["--d-param", "sn", "--rank", "4"], "--rank (gan.rank) has no meaning here: the generator is dense and the "
                                         "discriminator sn, neither takes a rank; leave it out"),
    (["--d-param", "sr", "--rank", "4"], "--rank (gan.rank) has no meaning here: the generator is dense and the "
                                         "discriminator sr, neither takes a rank; leave it out"),
    # it said "--rank/rank has no meaning for dense" of a --g-rank
    (["--d-param", "sttp-c", "--rank", "4", "--g-rank", "8"],
     "--g-rank (gan.g_rank) has no meaning for the generator's dense (it keeps the full weights); leave it out"),
    # metric settings without --metrics-every were ignored without a word
    (["--inception-weights", "/nowhere/pt_inception.pth"],
     "--inception-weights (gan.inception_weights) has no effect without --metrics-every (gan.metrics_every): "
     "set it, or leave it out"),
    (["--extractor", "offline", "--metrics-samples", "100"],
     "--metrics-samples (gan.metrics_samples), --extractor (gan.extractor) have no effect without --metrics-every "
     "(gan.metrics_every): set it, or leave them out"),
    (["--set", "gan.best_by=kid"],
     "gan.best_by has no effect without --metrics-every (gan.metrics_every): set it, or leave it out"),
    # it said "gan.metrics: unknown []"
    (["--metrics-every", "5", "--set", "gan.metrics=[]"],
     "gan.metrics is empty: give one or more of fid, isc, kid (leave --metrics-every out for no metrics)"),
    (["--metrics-every", "5", "--set", "gan.metrics=[fid, is]"], "gan.metrics: unknown ['is']; allowed: fid, isc, kid"),
    (["--metrics-every", "5", "--inception-weights", "/nowhere/pt_inception.pth"],
     "--inception-weights (gan.inception_weights): file not found: /nowhere/pt_inception.pth"),
    (["--set", "gan.g_kwargs={widths: [8, 8, 8], bottom_width: 2, z_dim: 16, foo: 3}"],
     "gan.g_kwargs: the generator 'sngan_g32' cannot be built with {'widths': [8, 8, 8], 'bottom_width': 2, "
     "'z_dim': 16, 'foo': 3}: SNGANGenerator.__init__() got an unexpected keyword argument 'foo'"),
    (["--set", "gan.d_kwargs={widths: [8, -1]}"],
     "gan.d_kwargs: the discriminator 'sngan_d32' cannot be built with {'widths': [8, -1]}: "
     "widths must be positive integers, got [8, -1]"),
    # a zero width ended in a ZeroDivisionError traceback (xavier init of an empty layer)
    (["--set", "gan.d_kwargs={widths: [0, 0, 0, 0]}"],
     "gan.d_kwargs: the discriminator 'sngan_d32' cannot be built with {'widths': [0, 0, 0, 0]}: "
     "widths must be positive integers, got [0, 0, 0, 0]"),
    (["--set", "gan.g_kwargs={widths: [8, 8, 8], bottom_width: 0, z_dim: 16}"],
     "gan.g_kwargs: the generator 'sngan_g32' cannot be built with {'widths': [8, 8, 8], 'bottom_width': 0, "
     "'z_dim': 16}: bottom_width must be a positive integer, got 0"),
])
def test_bad_input_is_one_error_line_exit_2_and_creates_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = _cli("gan", "digits", "--steps", "2", "--out", out, *TINY_SET, *args)
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == ["Error: " + message]
    assert not out.exists()


def test_inception_weights_that_are_not_inceptions_are_refused_before_the_run_folder(tmp_path):
    # it failed at the first metrics step, inside the progress bar, leaving a run folder
    out, weights = tmp_path / "out", tmp_path / "small.yml"
    weights.write_text("gan:\n  g_kwargs: {widths: [32, 32]}\n")
    result = _cli("gan", "digits", "--steps", "2", "--out", out, "--metrics-every", "1", "--metrics-samples", "16",
                  "--inception-weights", weights, *TINY_SET)
    assert result.exit_code == 2, result.output
    assert len(result.output.splitlines()) == 1 and result.output.startswith(
        f"Error: --inception-weights (gan.inception_weights): {weights} is not InceptionV3 weights for "
        "torch-fidelity (not a PyTorch weights file: ")
    assert not out.exists()


@pytest.mark.processes
def test_accelerate_launch_apps_gan_writes_checkpoints_grid_and_metrics(tmp_path):
    """The end-to-end path a user takes: accelerate's launcher, apps/gan.py, metrics with the
    offline extractor (no Inception download), best checkpoint by FID."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
           str(ROOT / "apps/gan.py"), "--dataset", "digits", "--d-param", "sttp-c", "--rank", "4", "--steps", "6",
           "--bs", "32", "--subset", "256", "--n-dis", "2", "--metrics-every", "3", "--metrics-samples", "64",
           "--extractor", "offline", "--out", str(tmp_path), "--name", "e2e", *TINY_SET, *QUIET,
           "--set", "gan.extractor_steps=20", "--set", "gan.grid=16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "e2e"
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["samples_0000003.png", "samples_0000006.png"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    name = "fid_sttpfast-resnet20-digits"
    assert [line["step"] for line in lines] == [3, 6] and all(line[name] > 0 for line in lines)
    summary = json.loads((run / "summary.json").read_text())
    best = min(lines, key=lambda line: line[name])
    assert summary["best"] == {"metric": name, "value": best[name], "step": best["step"]}
    best_state = json.loads((run / "checkpoints/best/state.json").read_text())
    assert best_state["train_iter"] == best["step"] and (run / "extractor.safetensors").is_file()
    assert json.loads((run / "checkpoints/last/state.json").read_text())["train_iter"] == 6


@pytest.mark.processes
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    common = [str(ROOT / "apps/gan.py"), "digits", "--d-param", "sn", "--steps", "4", "--n-dis", "2", "--subset", "256",
              "--logger", "none", *TINY_SET, *QUIET]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one = subprocess.run([sys.executable, *common, "--bs", "32", "--out", str(tmp_path / "one"), "--name", "r"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *common,
                          "--bs", "16", "--out", str(tmp_path / "two"), "--name", "r"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, (two.stdout[-2000:], two.stderr[-3000:])
    summaries = [line for line in two.stdout.splitlines() if line.startswith("summary:")]
    assert len(summaries) == 1, two.stdout  # one process speaks for the run
    s1 = json.loads((tmp_path / "one/r/summary.json").read_text())
    s2 = json.loads((tmp_path / "two/r/summary.json").read_text())
    assert (s2["processes"], s2["ranks_in_sync"], s2["steps"], s2["d_steps"]) == (2, True, 4, 8)
    assert (s1["processes"], s1["steps"], s1["d_steps"]) == (1, 4, 8)
    # the losses are the global batch's (they were rank 0's half: loss_g 26% off)
    assert s2["loss_g"] == pytest.approx(s1["loss_g"], rel=1e-3, abs=1e-4)
    assert s2["loss_d"] == pytest.approx(s1["loss_d"], rel=1e-3, abs=1e-4)
    # rank 1 wrote nothing: one run folder, and its files are rank 0's (one checkpoint writer)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["r"]
    assert sorted(p.name for p in (tmp_path / "two/r/checkpoints").iterdir()) == sorted(
        p.name for p in (tmp_path / "one/r/checkpoints").iterdir())
    # Same images, latent codes and noise per step and G's BatchNorm statistics over the
    # global batch: the runs differ only by float summation order (two half-batch gradients
    # averaged vs one mean). Adam divides each gradient entry by its own scale, so where the
    # true gradient is ~0 it turns that rounding noise into steps of up to lr: G's conv biases
    # (each followed by BatchNorm, which removes them: zero gradient) and the BN running means
    # they shift may differ by up to lr per update (4 G updates: 8e-4; measured 2.8e-4). D's
    # entries with cancelling gradients move less (measured 2.7e-5); G's weights, which
    # have real gradients, agree to 3e-8 (measured).
    a, b = _weights(tmp_path / "one/r"), _weights(tmp_path / "two/r")
    assert a.keys() == b.keys()
    gap = {k: float((a[k].double() - b[k].double()).abs().max())
           for k in a if a[k].is_floating_point() and a[k].numel()}
    g_weights = [k for k in gap if k.startswith("generator.") and k.endswith(".weight") and ".bn" not in k]
    assert len(g_weights) == 8 and max(gap[k] for k in g_weights) < 1e-6, {k: gap[k] for k in g_weights}
    assert max(gap[k] for k in gap if k.startswith("discriminator.")) < 1e-4
    assert max(gap.values()) < 4 * 2e-4


def test_the_gan_section_of_the_schema():
    assert DEFAULTS["gan"] == {
        "g": "sngan_g32", "d": "sngan_d32", "g_param": "dense", "d_param": "sn", "rank": None, "g_rank": None,
        "d_rank": None, "g_kwargs": {}, "d_kwargs": {}, "loss": "hinge", "n_dis": 5, "steps": 100000, "bs": 64,
        "lr_g": 2e-4, "lr_d": 2e-4, "beta1": 0.0, "beta2": 0.9, "lr_decay": "linear", "ema": None, "ema_start": 0,
        "dequantize": 1.0 / 255.0, "sn_exact": False, "sr_every": 5, "d_optimal": 1.0, "metrics_every": None,
        "metrics_samples": 5000, "metrics": ["fid", "isc", "kid"], "best_by": "fid", "extractor": "inception",
        "inception_weights": None, "extractor_steps": 300, "extractor_kwargs": {}, "grid": 64}
    assert set(GAN_CLI_FLAGS.values()) <= set(SCHEMA)
    with pytest.raises(ConfigError, match=r"config gan.beta2 = 1.0: expected a number in \[0, 1\)"):
        build_config(overrides=["gan.beta2=1"])
    with pytest.raises(ConfigError, match="unknown config key 'gan.ndis' in --set; did you mean 'gan.n_dis'"):
        build_config(overrides=["gan.ndis=3"])


def _table_rows():
    return sorted(ROOT.glob("configs/aistats21/table*_gan*/*.yml"))


def test_every_gan_table_config_is_valid_and_has_the_papers_z():
    from sttpfast.models import create_model
    from sttpfast.surgery import parameterize

    rows = _table_rows()
    assert {p.parent.name for p in rows} == {"table1_gan_reduced_discriminator", "table2_gan_full_discriminator",
                                            "table3_gan_ranks"}
    checked = {}
    for path in rows:
        cfg, _ = build_config([path])
        g = check_gan_config(cfg)
        expected = _expected_z(path)
        if expected is None:
            continue
        d = create_model(g["d"], in_chans=3, **g["d_kwargs"])
        param = "dense" if g["d_param"] == "sr" else g["d_param"]
        report = parameterize(d, param, rank=(g["d_rank"] or g["rank"]) if param not in ("dense", "sn") else None)
        checked[str(path.relative_to(ROOT))] = round(report.z, 2)
        assert round(report.z, 2) == expected, path
    assert len(checked) == 13, checked  # table 2: 8 CIFAR-10 + 3 STL-10 rows; table 3: rank 64 twice


def _expected_z(path: Path):
    """The Z (percent) of D that a config's header comment states from the paper, or None."""
    for line in path.read_text().splitlines():
        if line.startswith("# D Z ="):
            return float(line.split("=")[1].split("%")[0])
    return None


def test_a_non_finite_loss_stops_the_gan_run_with_exit_1_and_keeps_the_last_good_checkpoint(tmp_path):
    """An absurd D learning rate sends D's weights to inf; NaNGuard stops the run before the
    non-finite step reaches the weights and the command says so, exit 1 (as `sttpfast train`)."""
    result = _cli("gan", "digits", "--d-param", "sn", "--steps", "6", "--n-dis", "1", "--bs", "32", "--subset", "128",
                  "--checkpoint-every", "1", "--logger", "none", "--out", tmp_path, "--name", "nan",
                  "--set", "gan.lr_d=1e38", *TINY_SET, *QUIET)
    assert result.exit_code == 1, result.output
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    step = summary["nan_step"]
    assert isinstance(step, int) and 0 < step < 6
    assert result.output.strip().splitlines()[-1] == (
        f"Error: the loss became non-finite at step {step}; training stopped. "
        f"The last good checkpoint is {tmp_path / 'nan' / 'checkpoints' / 'last'}")
    weights = _weights(tmp_path / "nan")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_wandb_logs_a_gan_run_offline(tmp_path, monkeypatch):
    """`--logger wandb` (offline here): G and D losses and every D layer's sigma_max, per step."""
    from wandb_history import read_wandb_history

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    result = _cli("gan", "digits", "--d-param", "sttp-c", "--rank", "4", "--steps", "3", "--n-dis", "1", "--bs", "32",
                  "--subset", "128", "--logger", "wandb", "--out", tmp_path, "--name", "w",
                  "--set", "log.every=1", "--set", "log.sv_every=1", *TINY_SET, *QUIET)
    assert result.exit_code == 0, result.output
    [run_file] = glob.glob(str(tmp_path / "**" / "offline-run-*" / "run-*.wandb"), recursive=True)
    rows = read_wandb_history(run_file)
    assert sorted(int(r["_step"]) for r in rows if "gan/loss_g" in r) == [1, 2, 3]
    sigma = sorted({k for r in rows for k in r if k.startswith("sv/discriminator.") and k.endswith("/sigma_max")})
    assert len(sigma) == 11  # the tiny D: 8 convs, 2 shortcut convs and the final Linear
    assert all(abs(float(r[k]) - 1.0) < 1e-4 for r in rows for k in sigma if k in r)  # STTP-C: sigma_max = 1
