"""The `train` run's contract: metric columns that line up for any step budget, resuming a
finished run, run folders created only for runs that start, Ctrl-C, the process count."""
import json
import shutil
import re
from pathlib import Path

import pytest
import torch
from fastai.callback.core import Callback
from interrupt import Interrupt, bar_shown_above, signal_in_mask

from sttpfast.checkpoint import load_parameterized
from sttpfast.config import build_config
from sttpfast.run import run_training


def _cfg(tmp_path, name, *overrides):
    cfg, _ = build_config(overrides=["data.name=digits", "data.bs=64", "data.subset=512", "param.name=sttp-r",
                                     "param.rank=4", "optim.schedule=linear", "log.logger=none",
                                     "log.progress=false", f"train.out={tmp_path}", f"train.name={name}",
                                     *overrides])
    return cfg


class KeepValidLoader(Callback):
    """Keeps the run's validation loader, to recompute its metrics afterwards."""

    def before_fit(self):
        self.valid = self.learn.dls.valid


def _accuracies(model, loader) -> tuple[float, float]:
    """(top-1, top-5) of ``model`` over ``loader``, counted exactly."""
    model.eval()
    top1 = top5 = n = 0
    with torch.no_grad():
        for x, y in loader:
            best = model(x).topk(5, dim=1).indices
            top1 += int((best[:, 0] == y).sum())
            top5 += int((best == y[:, None]).any(dim=1).sum())
            n += len(y)
    return top1 / n, top5 / n


def test_a_budget_ending_mid_epoch_keeps_metric_names_and_values_aligned(tmp_path):
    lines = []
    keep = KeepValidLoader()
    summary = run_training(_cfg(tmp_path, "mid", "optim.steps=10"), extra_cbs=[keep], echo=lines.append)
    assert summary["steps"] == 10  # 7 batches per epoch: the second epoch stops after 3

    model = load_parameterized(tmp_path / "mid/checkpoints/last/model.safetensors")
    top1, top5 = _accuracies(model, keep.valid)
    metrics = summary["metrics"]
    assert list(metrics) == ["train_loss", "valid_loss", "accuracy", "top5_accuracy"]
    assert abs(metrics["accuracy"] - top1) < 1e-6, (metrics, top1, top5)
    assert abs(metrics["top5_accuracy"] - top5) < 1e-6, (metrics, top1, top5)
    assert top5 > top1  # the two columns differ, so a swap cannot pass

    # the printed per-epoch table: every name followed by its own value
    last = [line for line in lines if line.startswith("epoch 1")][-1]
    shown = dict(re.findall(r"(\w+) (\S+)", last))
    assert shown["accuracy"] == f"{metrics['accuracy']:.4f}" and shown["top5_accuracy"] == f"{metrics['top5_accuracy']:.4f}"
    assert shown["train_loss"] == f"{metrics['train_loss']:.4f}" and shown["valid_loss"] == f"{metrics['valid_loss']:.4f}"

    # the best checkpoint was chosen by, and stores, real top-1 accuracy
    state = json.loads((tmp_path / "mid/checkpoints/best/state.json").read_text())
    best_top1, _ = _accuracies(load_parameterized(tmp_path / "mid/checkpoints/best/model.safetensors"), keep.valid)
    assert state["monitor"] == "accuracy" and abs(state["best"] - best_top1) < 1e-6, (state["best"], best_top1)


# ---------------------------------------------------------------------------------------
# resuming a finished run
def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resuming_a_finished_run_changes_nothing_and_a_raised_budget_continues(tmp_path):
    from click.testing import CliRunner

    from sttpfast.cli import main

    run_training(_cfg(tmp_path, "done", "optim.steps=6", "log.logger=tensorboard"), echo=lambda *a: None)
    run = tmp_path / "done"
    before = _files(run)
    result = CliRunner().invoke(main, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert f"{run} is already finished (6 steps); nothing changed" in result.output
    assert _files(run) == before  # byte-identical, no file added
    assert json.loads((run / "summary.json").read_text())["steps"] == 6

    # moved: the summary it prints names the folder where the run is now (it named the old one)
    moved = tmp_path / "moved"
    shutil.copytree(run, moved, symlinks=True)
    again = CliRunner().invoke(main, ["train", "--resume", str(moved)])
    assert again.exit_code == 0, again.output
    assert again.output.splitlines()[-1].endswith(f" | run {moved}"), again.output
    shutil.rmtree(moved)

    refused = CliRunner().invoke(main, ["train", "--resume", str(run), "--lr", "0.5"])
    assert refused.exit_code == 2 and "only --steps / --epochs may raise its budget" in refused.output
    assert _files(run) == before

    more = CliRunner().invoke(main, ["train", "--resume", str(run), "--steps", "9"])
    assert more.exit_code == 0, more.output
    assert "already finished" not in more.output
    assert json.loads((run / "summary.json").read_text())["steps"] == 9
    assert json.loads((run / "checkpoints/last/state.json").read_text())["train_iter"] == 9
    assert "steps: 9" in (run / "config.yaml").read_text()


# ---------------------------------------------------------------------------------------
# run folders: only for runs that start, only inside --out
def _cli(*args):
    from click.testing import CliRunner

    from sttpfast.cli import main

    return CliRunner().invoke(main, ["train", *map(str, args)])


BAD_STARTS = [
    (["nosuchdata"], "unknown dataset 'nosuchdata'"),                     # data
    (["digits", "--arch", "resnet20_cifr"], "unknown architecture"),      # model
    (["digits", "--param", "sttp", "--rank", "0"], "--rank 0: expected"),     # config, named by the flag
    (["digits", "--param", "sttp", "--compression", "150"], "--compression 150.0: expected a number in"),
    (["digits", "--param", "sttp", "--rank", "4", "--include", "nosuchlayer*"], "include pattern 'nosuchlayer\\*'"),
    (["digits", "--arch", "convnext_atto", "--param", "sttp", "--rank", "4", "--img-size", "20"],
     "architecture 'convnext_atto' cannot run on 1x20x20 images"),                     # model x data
]


@pytest.mark.parametrize("args,message", BAD_STARTS)
def test_a_failed_start_leaves_no_run_folder(tmp_path, args, message):
    out = tmp_path / "runs"
    result = _cli(*args, "--out", out, "--steps", "1")
    assert result.exit_code == 2 and re.search(message, result.output), result.output
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("name", ["../..", "..", "a/b", "/tmp/elsewhere", "."])
def test_a_run_name_that_leaves_out_is_refused(tmp_path, name):
    out = tmp_path / "a" / "runs"
    result = _cli("digits", "--out", out, "--name", name, "--steps", "1")
    assert result.exit_code == 2, result.output
    assert f"run name {name!r} is not a plain folder name" in result.output
    assert list(tmp_path.iterdir()) == []  # nothing created, inside --out or outside


# ---------------------------------------------------------------------------------------
# Ctrl-C
def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from sttpfast.run import TrainingInterrupted

    full = run_training(_cfg(tmp_path, "full", "optim.steps=12"), echo=lambda *a: None)
    lines = []
    with pytest.raises(TrainingInterrupted) as stop:  # mid-epoch 2 (7 batches per epoch)
        run_training(_cfg(tmp_path, "cut", "optim.steps=12"), extra_cbs=[Interrupt(9, KeyboardInterrupt)], echo=lines.append)
    assert stop.value.code == 130
    run = tmp_path / "cut"
    assert lines[-2:] == [f"interrupted at step 9: checkpoint saved in {run / 'checkpoints/last'}",
                          f"resume with: sttpfast train --resume {run}"]
    assert json.loads((run / "checkpoints/last/state.json").read_text())["train_iter"] == 9
    resumed = run_training(resume=run, echo=lambda *a: None)
    assert resumed["steps"] == full["steps"] == 12
    a, b = load_file(str(tmp_path / "full/checkpoints/last/model.safetensors")), load_file(
        str(run / "checkpoints/last/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # every metric identical, train_loss (fastai's smoothed loss, saved in the checkpoint) included
    assert resumed["metrics"] == full["metrics"]


def test_a_resume_at_an_epoch_end_prints_no_empty_progress_bar_warning(tmp_path):
    """Ctrl-C after an epoch's last step (8 batches per epoch) checkpoints before that epoch's
    validation: the resume skips all 8 batches and validates, and fastprogress, asked to
    redraw the emptied bar, printed its raw `UserWarning: Your generator is empty.`."""
    import warnings

    from sttpfast.run import TrainingInterrupted

    with pytest.raises(TrainingInterrupted):
        run_training(_cfg(tmp_path, "cut", "optim.steps=10", "log.progress=true"),
                     extra_cbs=[Interrupt(8, KeyboardInterrupt)], echo=lambda *a: None)
    state = json.loads((tmp_path / "cut/checkpoints/last/state.json").read_text())
    assert (state["epoch"], state["skip"], state["train_iter"]) == (0, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = run_training(resume=tmp_path / "cut", echo=lambda *a: None)
    assert resumed["steps"] == 10
    assert [f"{Path(w.filename).name}: {w.message}" for w in caught] == []


def test_ctrl_c_mid_epoch_is_said_on_its_own_line_below_the_progress_bar(tmp_path, capsys):
    """fastprogress draws its bar with a carriage return and no newline: the interrupt's
    message was glued to the bar ("... [1/8 00:00<00:01]interrupted at step 1: ...")."""
    from sttpfast.run import TrainingInterrupted

    with pytest.raises(TrainingInterrupted):
        run_training(_cfg(tmp_path, "cut", "optim.steps=10", "log.progress=true"),
                     extra_cbs=[Interrupt(1, KeyboardInterrupt)], echo=print)
    lines = capsys.readouterr().out.split("\n")
    said = f"interrupted at step 1: checkpoint saved in {tmp_path / 'cut' / 'checkpoints' / 'last'}"
    bar = bar_shown_above(lines, said)
    assert bar.startswith("Epoch 1/2 : |") and "[1/8 " in bar, bar
    assert lines[lines.index(said) + 1] == f"resume with: sttpfast train --resume {tmp_path / 'cut'}"


def test_a_step_budget_that_ends_mid_epoch_resumes_mid_epoch_with_a_larger_budget(tmp_path):
    """``--steps 2`` stops inside the first epoch (7 batches); ``--resume --steps 5`` must train
    steps 3 to 5 of that epoch, not take the epoch as done and train nothing."""
    run_training(_cfg(tmp_path, "r", "optim.steps=2"), echo=lambda *a: None)
    run = tmp_path / "r"
    state = json.loads((run / "checkpoints/last/state.json").read_text())
    assert (state["epoch"], state["skip"], state["train_iter"]) == (0, 2, 2)
    resumed = run_training(resume=run, steps=5, echo=lambda *a: None)
    assert resumed["steps"] == 5
    state = json.loads((run / "checkpoints/last/state.json").read_text())
    assert (state["epoch"], state["skip"], state["train_iter"]) == (0, 5, 5)


def test_ctrl_c_exits_130_through_the_cli(tmp_path, monkeypatch):
    import sttpfast.run as run_module

    original = run_module.run_training
    monkeypatch.setattr(run_module, "run_training",
                        lambda *a, **k: original(*a, **{**k, "extra_cbs": [Interrupt(2, KeyboardInterrupt)]}))
    result = _cli("digits", "--bs", "64", "--subset", "512", "--param", "sttp-r", "--rank", "4", "--steps", "5",
                  "--logger", "none", "--out", tmp_path, "--name", "c")
    assert result.exit_code == 130, result.output
    assert f"resume with: sttpfast train --resume {tmp_path / 'c'}" in result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output


# ---------------------------------------------------------------------------------------
# asked for more processes than run
class _OneProcess:
    num_processes, is_main_process = 1, True


def test_fewer_processes_than_asked_for_are_warned_about(monkeypatch):
    from sttpfast.callbacks.distributed import warn_missing_processes

    said = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    warn_missing_processes(_OneProcess(), said.append)  # a plain `python train.py`: nothing asked
    assert said == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    warn_missing_processes(_OneProcess(), said.append)
    assert said == ["warning: asked for 2 processes, running 1: `accelerate launch --cpu` starts one process; "
                    "on CPU use `accelerate launch --multi_gpu --num_processes 2 ...` (without --cpu) or "
                    "`torchrun --nproc_per_node 2 ...`"]


@pytest.mark.processes
def test_accelerate_launch_cpu_with_two_processes_warns(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           str(root / "apps/train.py"), "digits", "--bs", "64", "--subset", "256",
                           "--param", "sttp-r", "--rank", "4", "--steps", "1", "--logger", "none",
                           "--set", "log.progress=false", "--out", str(tmp_path), "--name", "one"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: asked for 2 processes, running 1" in proc.stdout, proc.stdout[-2000:]
    assert json.loads((tmp_path / "one/summary.json").read_text())["processes"] == 1


def test_a_vit_is_built_for_the_datas_image_size(tmp_path):
    """timm's ViT expects 224 px unless told: the learner builds it for the data's size."""
    result = _cli("digits", "--arch", "vit_tiny_patch16_224", "--param", "sttp-r", "--rank", "4", "--steps", "2",
                  "--out", tmp_path, "--logger", "none", "--set", "log.progress=false")
    assert result.exit_code == 0, result.output
    summary = json.loads(next(tmp_path.glob("*/summary.json")).read_text())
    assert summary["steps"] == 2


def test_a_rank_no_layer_can_use_is_one_error_line_and_creates_nothing(tmp_path):
    """`train --rank 1000`: parameterize only warns (library use); the run refuses it, as
    `compress` does, before any folder exists, without the raw Python warnings."""
    result = _cli("digits", "--arch", "resnet20_cifar", "--param", "tt", "--rank", "1000", "--steps", "1",
                  "--out", tmp_path, "--name", "big", "--set", "data.subset=256", "--logger", "none")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [  # one line: the rank is said only once it is good
        "Error: rank 1000 is too large for tt on this model: the largest useful rank is 64 (no compression)"]
    assert list(tmp_path.iterdir()) == []


def test_the_runs_warnings_are_warning_lines(tmp_path):
    """A warning of the parameterization (a layer left dense) is one `warning:` line of the
    run's output, not Python's warning with its source line."""
    lines = []
    run_training(_cfg(tmp_path, "w", "optim.steps=1", "param.name=rtt", "param.rank=2",
                      "param.unrepresentable=skip"), echo=lines.append)
    assert ("warning: 1 layer(s) stay dense: rtt cannot represent a weight of shape (16, 1, 3, 3) in layer "
            "'stem.0' (channel count 1 cannot be split into 2 factors (too small))") in lines


def test_resuming_a_run_killed_before_its_first_checkpoint_says_how_to_start_it_again(tmp_path, monkeypatch):
    # "Error: no checkpoint folder at RUN/checkpoints": true, and no word on what to do
    from click.testing import CliRunner

    from sttpfast.cli import main
    from sttpfast.config import save_config

    run = tmp_path / "killed"
    run.mkdir()
    save_config(_cfg(tmp_path, "killed"), run / "config.yaml")  # what a run writes before training
    for command in ("gan", "train"):
        result = CliRunner().invoke(main, [command, "--resume", str(run)])
        assert result.exit_code == 2, result.output
        assert result.output.splitlines() == [
            f"Error: {run} has no checkpoint: it stopped before its first one, and there is nothing to resume. "
            f"Start it again with: sttpfast {command} --cfg {run / 'config.yaml'} --out {tmp_path} (in a new, "
            "numbered folder next to it unless you remove this one first)"]
    # the command said does what it says from anywhere (the config's train.out is relative to
    # where it runs: the new run went to ./runs/ there); train's, run as said, for 1 step
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    said = result.output.split("Start it again with: sttpfast ")[1].split(" (in a new")[0].split()
    again = CliRunner().invoke(main, [*said, "--steps", "1"])
    assert again.exit_code == 0 and " | 1 step in " in again.output  # it said "1 steps"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "killed", "killed-2"]
    assert list(elsewhere.iterdir()) == []


def test_an_empty_run_name_is_refused():
    # --name "" ran under the derived name, though the message for bad names says it must not be empty
    from sttpfast.run import RunError, check_output

    with pytest.raises(RunError, match=r"^run name '' is not a plain folder name: --name must not be empty"):
        check_output({"train": {"out": "runs", "name": ""}})


@pytest.mark.processes
def test_sigusr1_during_start_up_does_not_kill_the_run(tmp_path):
    """SIGUSR1 asks a training run for a checkpoint; before training runs (imports, data,
    model) its default action killed the process (exit 138). It is ignored until the run's
    own handler is in place."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "sttpfast", "train", "digits", "--arch", "resnet20_cifar",
                             "--param", "sttp-r", "--rank", "4", "--steps", "1", "--subset", "128", "--bs", "64",
                             "--logger", "none", "--out", str(tmp_path), "--set", "log.progress=false"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    ignores = lambda: signal_in_mask(proc.pid, "SigIgn", signal.SIGUSR1)  # noqa: E731
    while not ignores() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    ignoring = ignores()
    proc.send_signal(signal.SIGUSR1)  # during start-up: the imports take seconds
    out, err = proc.communicate(timeout=300)
    assert ignoring, "SIGUSR1 was not ignored during start-up"
    assert proc.returncode == 0, (out[-2000:], err[-2000:])
    assert "summary: " in out


def test_only_the_main_process_probes_the_output_folder(tmp_path, monkeypatch):
    """Every process checks the output before the run; the probe made and removed the run
    folder itself, so a second process saw it half-made ('File exists': 888 failures in 300
    trials of 8 threads). Only rank 0, which writes, probes; the others check the rest."""
    import sttpfast.run

    made = []
    monkeypatch.setattr(sttpfast.run, "_probe_folders", lambda target, existing: made.append(target))
    cfg = {"train": {"out": str(tmp_path / "runs"), "name": "r"}}
    monkeypatch.setenv("RANK", "1")
    assert sttpfast.run.check_output(cfg) == (tmp_path / "runs", "r") and made == []
    monkeypatch.setenv("RANK", "0")
    sttpfast.run.check_output(cfg)
    assert made == [tmp_path / "runs" / "r"]
