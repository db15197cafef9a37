"""The command line, run as a user would (click's runner and a real subprocess)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from interrupt import signal_in_mask

import sttpfast.cli
from sttpfast.cli import INTERRUPTED, main
from sttpfast.config import build_config

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_info_sngan_discriminator_z():
    result = run("info", "--arch", "sngan_d32", "--param", "svdp-c", "--rank", "64")
    assert result.exit_code == 0, result.output
    assert "Z = 51.74%" in result.output and "blocks.1.conv1" in result.output


def test_info_compression_target():
    result = run("info", "--arch", "resnet20_cifar", "--param", "sttp", "--compression", "10")
    assert result.exit_code == 0, result.output
    assert "rank chosen for the target compression Z = 10%\nrank 14 gives Z = 10.08%\n" in result.output
    assert "Z = 10.08%  (weights only 9.04%)" in result.output


@pytest.mark.parametrize("args,lines", [
    # low rank without --rank: the documented default (32) compresses, and says so
    (["--param", "sttp"], ["rank 32 (the default for sttp; --rank N, --rank full or --compression Z to change it)",
                           "layers 22  params 80,762 / 274,042  Z = 29.47%  (weights only 28.65%)"]),
    (["--param", "sttp", "--rank", "full"], ["rank full (every layer at its full rank: no compression)",
                                             "layers 22  params 274,042 / 274,042  Z = 100.00%  (weights only 100.00%)"]),
    (["--param", "dense"], ["no rank (dense keeps every weight at full size)", "layers 0  params 274,042 / 274,042  "
                            "Z = 100.00%  (weights only 100.00%)"]),
])
def test_info_rank_default_full_and_none(args, lines):
    result = run("info", "--arch", "resnet20_cifar", *args)
    assert result.exit_code == 0, result.output
    out = result.output.splitlines()
    assert out[0] == lines[0] and out[-1] == lines[1]


def test_info_any_timm_model():
    result = run("info", "--arch", "resnet18", "--param", "svdp", "--rank", "8", "--num-classes", "10")
    assert result.exit_code == 0, result.output
    assert "layer1.0.conv1" in result.output


@pytest.mark.parametrize("param,line", [
    ("cp", "rank 278 gives Z = 20.03%"), ("tucker", "rank 108 gives Z = 20.11%"), ("tt", "rank 62 gives Z = 19.96%"),
    ("lowrank", "rank 62 gives Z = 19.95%"), ("svdp-r", "rank 64 gives Z = 20.03%")])
def test_info_counts_without_decomposing_any_weight(param, line, monkeypatch):
    # `info --arch resnet18 --param cp --compression 20` ran CP's ALS on every random weight
    # (minutes) to print counts that do not depend on the weights
    from sttpfast.params.chain import SpectralChain
    from sttpfast.params.lowrank import LowRank
    from sttpfast.params.tensorlayer import TensorLayer

    def refuse(*args, **kwargs):
        raise AssertionError("info decomposed a weight")
    for kind in (TensorLayer, SpectralChain, LowRank):
        monkeypatch.setattr(kind, "decompose", refuse)
    result = run("info", "--arch", "resnet18", "--param", param, "--compression", "20", "--num-classes", "10")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1] == line, result.output


@pytest.mark.parametrize("args,message", [
    (["--arch", "wrn28_1", "--param", "sttp"], "unknown architecture 'wrn28_1'; did you mean"),
    (["--arch", "wrn16_4", "--param", "sttpx"], r"Error: --param: unknown parameterization 'sttpx'; "
                                                r"did you mean 'sttp'\? allowed: "
                                                "svdp-l, svdp-r, svdp-c, sttp-l, sttp-r, sttp-c, lowrank, cp, rcp, tucker, rtk, tt, rtt, tr, "
                                                "rtr, ht, dense, sn, svdp, sttp"),
    (["--arch", "wrn16_4", "--param", "sttp", "--rank", "0"], r"^Error: --rank 0: expected a positive integer, a list of "
                                                              r"positive integers or 'full'"),
    (["--arch", "wrn16_4", "--param", "sttp", "--rank", "x"], "Error: --rank 'x' is not a valid rank: give a positive "
                                                              "integer \\(8\\), comma-separated integers"),
    (["--arch", "wrn16_4", "--param", "sttp", "--rank", "4", "--compression", "3"],
     "^Error: give either --rank or --compression, not both\n$"),  # the flags given, as compress says
    (["--arch", "wrn16_4", "--param", "sttp", "--compression", "150"], r"^Error: --compression 150.0: expected a "
                                                                        r"number in \(0, 100\]"),
    (["--arch", "wrn16_4", "--param", "sn", "--rank", "8"], "^Error: --rank 8: 'sn' takes no rank"),
    # settings with no effect on a method were taken without a word, where --rank is refused
    (["--arch", "wrn16_4", "--param", "dense", "--init", "spectral"],
     r"^Error: --init 'spectral': 'dense' has no factors to initialize \(init is for the low-rank "
     r"parameterizations\)\n$"),
    (["--arch", "wrn16_4", "--param", "sn", "--init", "identity"], r"^Error: --init 'identity': 'sn' has no factors"),
    (["--arch", "wrn16_4", "--param", "dense", "--include", "blocks.*"],
     r"^Error: --include \['blocks.\*'\]: 'dense' parameterizes no layer \(include / exclude choose the layers "
     r"of the other parameterizations\)\n$"),
    (["--arch", "wrn16_4", "--param", "dense", "--exclude", "fc"], r"^Error: --exclude \['fc'\]: 'dense' "),
    (["--arch", "wrn16_4", "--param", "dense", "--unrepresentable", "error"],
     r"^Error: --unrepresentable 'error': 'dense' parameterizes no layer \(the policy is for the layers a tensor "
     r"format cannot represent\)\n$"),
    (["--arch", "wrn16_4", "--param", "sttp", "--include", "nope"], "matches no"),
    (["--arch", "wrn16_4", "--param", "sttp", "--include", "bn"], "'bn' is a BatchNorm2d"),
    # it blamed 'dense', a --param the user never gave
    (["--arch", "resnet20_cifar", "--rank", "8"],
     r"^Error: param.rank = 8 \(--rank\): param.name \(--param\) is dense by default, which parameterizes no "
     r"layer: give a low-rank one \(sttp-r, svdp-r, lowrank, cp, tt, ...\)\n$"),
    (["--arch", "resnet20_cifar", "--compression", "5"], r"^Error: param.compression = 5.0 \(--compression\): "
                                                         r"param.name \(--param\) is dense by default, which"),
    (["--arch", "resnet20_cifar", "--init", "identity", "--include", "stem*"],
     r"^Error: param.init = 'identity' \(--init\), param.include = \['stem\*'\] \(--include\): param.name "
     r"\(--param\) is dense by default, which parameterizes no layer"),
    (["--arch", "resnet20_cifar", "--param", "dense", "--rank", "8"], r"^Error: --rank 8: 'dense' takes no rank "),
    (["--arch", "resnet20_cifar", "--param", "sttpr"],
     r"^Error: --param: unknown parameterization 'sttpr'; did you mean 'sttp-r'\? allowed: "),
    # a traceback ("Trying to create tensor with negative dimension -1")
    (["--arch", "resnet20_cifar", "--param", "sttp", "--in-chans", "-1"],
     r"^Error: --in-chans must be a positive integer, got -1\n$"),
    (["--arch", "resnet20_cifar", "--param", "sttp", "--num-classes", "-2"],
     r"^Error: --num-classes must be an integer >= 0 \(0: no classifier head\), got -2\n$"),
])
def test_info_bad_input_exit_2_one_message(args, message):
    import re

    result = run("info", *args)
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output
    assert "Traceback" not in result.output


@pytest.mark.processes
def test_console_script_subprocess():
    proc = subprocess.run([sys.executable, "-m", "sttpfast.cli", "info", "--arch", "sngan_d32",
                           "--param", "sttp-c", "--rank", "64"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Z = 16.71%" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "sttpfast.cli", "info", "--arch", "sngan_d32", "--param", "nope"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "unknown parameterization" in bad.stderr


def _imports(args):
    """Top-level module names a fresh ``python -X importtime -m sttpfast.cli ARGS`` imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "sttpfast.cli", *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, {line.rsplit("|", 1)[1].strip().split(".")[0] for line in proc.stderr.splitlines()
                  if line.startswith("import time:") and "|" in line}


@pytest.mark.processes
@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["info", "--help"]])
def test_help_does_not_import_torch(args):
    proc, modules = _imports(args)
    assert "click" in modules and "sttpfast" in modules
    assert not modules & {"torch", "fastai", "timm", "accelerate", "sklearn"}
    assert "Usage:" in proc.stdout and "Warning" not in proc.stderr


@pytest.mark.processes
def test_info_does_not_import_fastai():
    """``sttpfast info`` counts a model's parameters: it imported fastai (with pandas, sklearn and
    matplotlib: about 3 s of a 7 s command) for the surgery's wrapper alone."""
    proc, modules = _imports(["info", "--arch", "resnet20_cifar", "--param", "sttp-r", "--rank", "4"])
    assert "Z = " in proc.stdout
    assert not modules & {"fastai", "pandas", "sklearn", "matplotlib"}


def test_help_takes_its_choices_from_the_schema():
    result = run("train", "--help")
    assert "--schedule [one_cycle|linear|cosine|const]" in result.output
    words = " ".join(result.output.split())  # the help as printed, its line wrapping aside
    # `full` as --rank takes it (the help wrote FULL, which was refused)
    assert "--rank R|R1,R2,..|full" in words and "(default 32 for the low-rank methods)" in words


def test_help_says_the_default_arch_and_param_and_info_builds_no_images():
    """`train digits` used resnet20_cifar and dense without the help saying either; `info --help`
    said --img-size resizes images (info has none)."""
    for command in ("train", "info"):
        words = " ".join(run(command, "--help").output.split())
        assert "--arch TEXT any timm model name or a registered sttpfast model (default resnet20_cifar)" in words
        assert "(sttp, svdp-c, lowrank, sn, dense...) (default dense)" in words
    info = " ".join(run("info", "--help").output.split())
    assert "--img-size INTEGER build the model for N x N inputs, as train builds it for data of that size" in info
    assert "resize images" not in info


@pytest.mark.parametrize("spelling", ["full", "FULL", "Full"])
def test_rank_full_is_taken_in_any_case(spelling):
    result = run("info", "--arch", "resnet20_cifar", "--param", "tt", "--rank", spelling)
    assert result.exit_code == 0, result.output
    assert result.output == run("info", "--arch", "resnet20_cifar", "--param", "tt", "--rank", "full").output


@pytest.mark.processes
def test_fastai_jit_warning_is_silenced_and_no_other():
    code = ("import warnings, sttpfast, fastai.layers\n"
            "warnings.warn('a FutureWarning of the user', FutureWarning)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "torch.jit.script" not in proc.stderr
    assert "FutureWarning: a FutureWarning of the user" in proc.stderr


@pytest.mark.parametrize("pair,message", [
    ("optim.lr=abc", "Error: config optim.lr = 'abc': expected a number"),
    ("param.name=[sttp]", "Error: config param.name = ['sttp']: expected a string"),
    # once a traceback-free `Unknown format code 'g' for object of type 'str'` from the run name
    ("param.compression=abc", "Error: config param.compression = 'abc': expected a number or null"),
    # momentum 5 trained to a NaN loss
    ("optim.mom=5", "Error: config optim.mom = 5.0: expected a number in [0, 1)"),
    ("optim.mom=1", "Error: config optim.mom = 1.0: expected a number in [0, 1)"),
])
def test_train_bad_set_value_one_line_nothing_created(tmp_path, pair, message):
    result = run("train", "digits", "--param", "sttp", "--out", str(tmp_path / "runs"), "--set", pair)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [message]
    assert list(tmp_path.iterdir()) == []


def test_a_value_set_by_a_flag_is_named_by_the_flag_and_one_set_by_set_by_its_key(tmp_path):
    """`--rank 0` said "config param.rank = 0" (compress said "--rank"); a --set over the flag's
    key is still the key's value."""
    out = ["--out", str(tmp_path / "runs")]
    flag = run("train", "digits", "--param", "sttp", "--rank", "0", *out)
    assert flag.output.splitlines() == ["Error: --rank 0: expected a positive integer, a list of positive integers "
                                        "or 'full'"]
    both = run("train", "digits", "--param", "sttp", "--rank", "4", "--set", "param.rank=0", *out)
    assert both.output.splitlines() == ["Error: config param.rank = 0: expected a positive integer, a list of "
                                        "positive integers or 'full'"]
    gan = run("gan", "digits", "--lr-d", "-1", *out)
    assert gan.output.splitlines() == ["Error: --lr-d -1.0: expected a positive number"]
    assert (flag.exit_code, both.exit_code, gan.exit_code) == (2, 2, 2)
    assert not (tmp_path / "runs").exists()


def test_a_set_over_a_config_file_is_said_as_one_warning_line(tmp_path):
    # Python's warning format: "/.../sttpfast/config.py:526: UserWarning: ..." and a source line
    config = tmp_path / "c.yml"
    config.write_text("param:\n  rank: 8\n")
    result = run("train", "--cfg", str(config), "--set", "param.rank=4", "--set", "param.name=sttp-r", "--set",
                 "optim.lr=abc", "--out", str(tmp_path / "runs"))
    assert result.output.splitlines() == [
        f"warning: config param.rank: 8 from {config} overridden by 4 from --set",
        "Error: config optim.lr = 'abc': expected a number"]


@pytest.mark.parametrize("command", [["train", "--resume"], ["gan", "--resume"], ["export", "--format", "onnx"]])
def test_a_run_folder_that_does_not_exist_is_said_so(tmp_path, command):
    # it said "is not a run folder (no config.yaml)", as for a folder that is not a run
    missing = tmp_path / "nope"
    result = run(*command, str(missing)) if command[0] != "export" else run("export", str(missing), *command[1:])
    assert (result.exit_code, result.output) == (2, f"Error: {missing} does not exist\n")


def test_info_of_an_architecture_given_as_a_run_names_the_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("info", "resnet18")
    assert (result.exit_code, result.output) == (
        2, f"Error: {tmp_path / 'resnet18'} does not exist; for the architecture: sttpfast info --arch resnet18\n")


@pytest.mark.parametrize("command", [["train", "--resume"], ["gan", "--resume"], ["export", "--format", "onnx"]])
def test_a_run_folder_with_an_empty_config_is_said_so(tmp_path, command):
    # train --resume said the run "was trained at data.bs 64 per process; its config.yaml now
    # says 128": the defaults an empty file gives, compared with the checkpoint
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    for text in ("", "# only a comment\n", "{}\n"):  # each reads as the defaults
        (run_dir / "config.yaml").write_text(text)
        result = run(*command, str(run_dir)) if command[0] != "export" else run("export", str(run_dir), *command[1:])
        assert (result.exit_code, result.output) == (
            2, f"Error: {run_dir} is not a run folder: its config.yaml is empty\n")


@pytest.mark.parametrize("command,options,message", [
    # `sttpfast train` alone trained a dense resnet20_cifar on digits for 10 epochs, a default
    # neither --help nor README names
    ("train", ["--param", "sttp-r", "--rank", "8"], "Error: give the dataset: sttpfast train DATASET [options] (e.g. "
                                                    "sttpfast train digits --param sttp-r --steps 200), or a config "
                                                    "with --cfg"),
    # `sttpfast gan` alone started a 100,000-step full-width run on digits (38 s a step here)
    ("gan", ["--d-param", "sttp-c", "--rank", "8"], "Error: give the dataset: sttpfast gan DATASET [options] (e.g. "
                                                    "sttpfast gan digits --steps 200), or a config with --cfg; the "
                                                    "defaults train 100,000 G steps"),
])
def test_a_bare_command_asks_for_the_dataset(tmp_path, monkeypatch, command, options, message):
    monkeypatch.chdir(tmp_path)
    for args in ([], options):
        result = run(command, *args)
        assert (result.exit_code, result.output.splitlines()) == (2, [message])
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_before_training_one_line_exit_130(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sttpfast.cli, "build_config", interrupted)
    result = run("train", "digits", "--out", str(tmp_path / "runs"))
    assert result.exit_code == 130
    assert result.output == INTERRUPTED + "\n" == "interrupted before training started; nothing was written\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command,args", [("export", ["a-run", "--format", "onnx"]), ("info", ["--arch", "wrn16_4"])])
def test_ctrl_c_in_a_command_that_trains_nothing_does_not_speak_of_training(monkeypatch, command, args):
    # export said "interrupted before training started; nothing was written"
    import sttpfast.export
    import sttpfast.models

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sttpfast.export, "export_run", interrupted)
    monkeypatch.setattr(sttpfast.models, "create_model", interrupted)
    result = run(command, *args)
    assert (result.exit_code, result.output) == (130, "interrupted; nothing was written\n")


@pytest.mark.processes
@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_during_start_up_subprocess(tmp_path, sig, status):
    """A real SIGINT (SIGTERM: it died without a word) while the command imports torch: one
    line, exit 130 (143), no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "sttpfast.cli", "train", "digits", "--param", "sttp",
                             "--out", str(tmp_path / "runs")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    time.sleep(2.5)  # past the interpreter's start, well inside torch's import
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert err == INTERRUPTED + "\n" and out == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.processes
@pytest.mark.parametrize("app", ["train", "gan"])
def test_ctrl_c_during_the_start_up_of_two_processes_is_said_once_as_a_training_command(tmp_path, app):
    """Ctrl-C in a terminal reaches the launcher and every rank: each rank said the line (twice
    on two processes), and apps/*.py (click's name "apps/train.py", not "train") said the
    wording of the commands that train nothing."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "apps" / f"{app}.py"),
           "digits", "--steps", "2", "--logger", "none", "--out", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        ranks = []
        # until both ranks run the start-up's handler (SIGTERM: Python catches SIGINT from its start)
        while len(ranks) < 2 or not all(signal_in_mask(pid, "SigCgt", signal.SIGTERM) for pid in ranks):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            ranks = [int(pid) for pid in children.read_text().split()] if children.exists() else []
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, _ = proc.communicate(timeout=120)
    finally:  # a failed wait leaves no launcher and ranks behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert [line for line in out.splitlines() if "nothing was written" in line] == [INTERRUPTED]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,entry", [
    (["train", "digits"], "sttpfast.run.run_training"), (["gan", "digits"], "sttpfast.gan.run.run_gan"),
    (["compress", "a-run", "--param", "tt", "--rank", "2"], "sttpfast.compress.compress_run")])
def test_sigterm_after_the_imports_before_training_one_line_exit_143(tmp_path, monkeypatch, args, entry):
    """SIGTERM after the imports and before training's own handler (data, model, run folder):
    the process died without a word (exit -15); Ctrl-C there already gave the line (compress:
    exit 130 for either signal). The test's own handler stands in for the default action."""
    import importlib

    killed = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: killed.append(signum))

    def terminated(*args, **kwargs):  # SIGTERM while the run builds its data and model
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # the handler runs here
        raise AssertionError("SIGTERM did not stop the command")

    module, name = entry.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, terminated)
    try:
        result = run(*args, "--out", str(tmp_path / "runs"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (result.exit_code, result.output, killed) == (143, INTERRUPTED + "\n", [])


# --- tuple ranks on the command line (issue 9) ------------------------------------------------
@pytest.mark.parametrize("text,rank", [
    ("8", 8), ("4,8,8,4", [4, 8, 8, 4]), ("4x8x8x4", [4, 8, 8, 4]), (" 8 , 6 ", [8, 6]),
    ("(4,8,6),(3,3,3)", [[4, 8, 6], [3, 3, 3]]), ("((4,8,6),(3,3,3))", [[4, 8, 6], [3, 3, 3]]),
    ("4,0,-1", [4, 0, -1]),  # the syntax is fine: the method refuses the numbers (below)
])
def test_parse_rank(text, rank):
    assert sttpfast.cli.parse_rank(text) == rank


@pytest.mark.parametrize("text", ["x", "4,,8", "8,", "(4,8", "4)", "4 8", "1e3", ""])
def test_parse_rank_refuses_what_is_not_a_rank(text):
    with pytest.raises(ValueError) as err:
        sttpfast.cli.parse_rank(text)
    assert str(err.value) == f"{text!r} is not a valid rank: give {sttpfast.cli.RANK_SYNTAX}"


TT_RUN = ["train", "digits", "--arch", "resnet20_cifar", "--bs", "64", "--subset", "128", "--logger", "none"]


def test_train_with_a_compression_target_says_the_rank_chosen_before_training(tmp_path):
    result = run(*TT_RUN, "--param", "sttp", "--compression", "10", "--steps", "1", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "rank chosen for the target compression Z = 10%"
    assert lines[1] == "rank 14 gives Z = 10.00%"  # before the run starts (1 channel: the stem stays dense)
    assert lines[4] == (f"run {tmp_path / 'digits-resnet20_cifar-sttp-z10-s0'}: layers 21  params 27,370 / 273,754  "
                        "Z = 10.00%  (weights only 8.90%)")


def test_train_with_a_tt_tuple_rank_stores_it_and_resumes_the_same_layers(tmp_path):
    from sttpfast.checkpoint import load_parameterized, read_metadata
    from sttpfast.surgery import parameterized_layers

    result = run(*TT_RUN, "--param", "tt", "--rank", "2,3,2", "--include", "blocks.*.conv*", "--steps", "2",
                 "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "rank 2,3,2 (tt's tuple rank, the same for every layer)"
    folder = tmp_path / "digits-resnet20_cifar-tt-r2x3x2-s0"
    assert "  rank:\n  - 2\n  - 3\n  - 2\n" in (folder / "config.yaml").read_text()
    weights = folder / "checkpoints" / "last" / "model.safetensors"
    spec = json.loads(read_metadata(weights)["sttpfast_spec"])
    assert len(spec) == 18 and all(e == {"param": "tt", "rank": [2, 3, 2], "shape": e["shape"]} for e in spec.values())
    model = load_parameterized(weights)
    assert {p.requested_rank for _, _, p in parameterized_layers(model)} == {(2, 3, 2)}
    resumed = run("train", "--resume", str(folder), "--steps", "4")  # the config's rank rebuilds the same layers
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming {folder} at epoch 1, step 2" in resumed.output and "| 4 steps in" in resumed.output
    assert json.loads((folder / "summary.json").read_text())["params_compressed"] == 12010


@pytest.mark.parametrize("args,message", [
    (["--param", "tt", "--rank", "2,3"],  # a 3x3 conv's TT has three bonds
     "Error: layer 'stem.0' (Conv2d (16, 1, 3, 3)): tt: rank (2, 3) has 2 entries; a layer with modes "
     "(16, 1, 3, 3) needs 3: (R_1, R_2, R_3) (or one int for all)"),
    (["--param", "tt", "--rank", "2,0,2"],
     "Error: --rank [2, 0, 2]: tt: rank must be a positive integer or a tuple of positive integers, "
     "got (2, 0, 2)"),
    (["--param", "tucker", "--rank", "17,1"],
     "Error: layer 'stem.0' (Conv2d (16, 1, 3, 3)): tucker: rank (17, 1) is too large for modes (16, 1, 3, 3): "
     "the largest useful ranks are (9, 1)"),
    (["--param", "sttp-r", "--rank", "4,8"],
     "Error: --rank [4, 8]: sttp-r: rank must be a positive integer, got (4, 8)"),
    (["--param", "tt", "--rank", "4,,8"],
     f"Error: --rank '4,,8' is not a valid rank: give {sttpfast.cli.RANK_SYNTAX} or 'full'"),
])
def test_train_bad_tuple_rank_one_line_exit_2_nothing_created(tmp_path, args, message):
    result = run(*TT_RUN, *args, "--steps", "1", "--out", str(tmp_path / "runs"))
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == message and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.processes
def test_python_dash_m_sttpfast_is_the_command():
    # `python -m sttpfast` said "No module named sttpfast.__main__"
    proc = subprocess.run([sys.executable, "-m", "sttpfast", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("Usage: python -m sttpfast [OPTIONS] COMMAND [ARGS]...")


def test_info_with_an_energy_plan_prints_the_same_plan_every_time():
    # the plan reads the weights of a freshly built (random) model, unseeded: three runs gave
    # the stem rank 4, 3, 3 and Z 9.98, 9.99, 9.97%
    args = ["info", "--arch", "resnet20_cifar", "--param", "sttp-r", "--compression", "10", "--plan", "energy"]
    first, second = CliRunner().invoke(main, args), CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert first.output == second.output


def test_the_summary_line_gives_the_z_the_run_printed_before_training(capsys):
    """summary.json keeps Z to 4 decimals (10.065 for 2,767,993 / 27,501,172 = 10.0650001%):
    rounding that again gave 10.06 where the run had said 10.07."""
    sttpfast.cli._print_summary({"metrics": {"accuracy": 0.5}, "z_percent": 10.065, "params_compressed": 2_767_993,
                                 "params_dense": 27_501_172, "steps": 3, "seconds": 1.0, "run_dir": "r"})
    assert "| Z 10.07% |" in capsys.readouterr().out
    assert f"{100 * 2_767_993 / 27_501_172:.2f}" == "10.07" and f"{10.065:.2f}" == "10.06"


def test_info_with_the_datas_size_and_attention_shows_what_train_builds():
    """info had no --img-size nor --attention: it built a ViT at 224 px (other position
    embeddings) without the forms, so its Z (6.73%) was not the run's (8.17% with qk-ov)."""
    from sttpfast.data import get_dls
    from sttpfast.learner import spectral_learner

    dls = get_dls("digits", bs=32, subset=64, device="cpu")
    learn = spectral_learner(dls, "vit_tiny_patch16_224", param="svdp-r", rank=8, attention="qk-ov")
    result = run("info", "--arch", "vit_tiny_patch16_224", "--param", "svdp-r", "--rank", "8", "--num-classes", "10",
                 "--in-chans", "1", "--img-size", "16", "--attention", "qk-ov")
    assert result.exit_code == 0, result.output
    assert f"Z = {learn.compression.z:.2f}%" == "Z = 8.17%"
    assert result.output.splitlines()[-1].startswith(f"layers 50  params {learn.compression.compressed_total:,} / "
                                                     f"{learn.compression.dense_total:,}  Z = 8.17%")


def test_an_ht_rank_tree_of_another_shape_is_refused_on_the_command_line_too():
    """The config flattened the tree before any layer saw it: this tree (a leaf where an inner
    node is) ran with its ranks read onto other nodes; Python refused it."""
    result = run("info", "--arch", "resnet20_cifar", "--param", "ht", "--rank", "(5,(8,6,(4,3,2)))",
                 "--include", "blocks.*.conv*")
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1].endswith(
        "ht: the rank tree (5, (8, 6, (4, 3, 2))) does not fit the layer's dimension tree: it takes "
        "((r{16,16}, r{16}, r{16}), (r{3,3}, r{3}, r{3}))"), result.output
    cfg, _ = build_config(cli={"param.name": "ht", "param.rank": [[5, 8, 6], [4, 3, 2]]})
    assert cfg["param"]["rank"] == [[5, 8, 6], [4, 3, 2]]  # the tree as given, checked per layer


def test_a_run_given_an_ht_rank_tree_says_it_and_names_its_folder_by_the_flat_ranks(tmp_path):
    result = run("train", "digits", "--param", "ht", "--rank", "((5,8,6),(4,3,2))", "--include", "blocks.*.conv*",
                 "--steps", "1", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "rank (5,8,6),(4,3,2) (ht's rank tree, the same for every layer)"
    assert [p.name for p in tmp_path.iterdir()] == ["digits-resnet20_cifar-ht-r5x8x6x4x3x2-s0"]


def test_only_a_value_the_flag_gave_is_named_by_the_flag(tmp_path):
    """A file's bad value was blamed on a flag that set the same key (`--lr 0.1` with a file's
    `lr: -1` said "--lr -1.0"), a typo's suggestion became a flag, a nested --set over the flag
    was not seen, and the flag's own bad value under a --set of its key was named by the key."""
    out = ["--out", str(tmp_path / "runs")]
    bad_file = tmp_path / "lr.yml"
    bad_file.write_text("optim:\n  lr: -1\n")
    typo = tmp_path / "typo.yml"
    typo.write_text("param:\n  rnk: 3\n")
    cases = [
        (["train", "digits", "--cfg", str(bad_file), "--lr", "0.1"], "Error: config optim.lr = -1.0: expected a "
                                                                    "positive number"),
        (["train", "digits", "--cfg", str(typo), "--param", "tt", "--rank", "4"],
         f"Error: unknown config key 'param.rnk' in {typo}; did you mean 'param.rank'?"),
        (["train", "digits", "--param", "tt", "--rank", "4", "--set", "param={name: tt, rank: 0}"],
         "Error: config param.rank = 0: expected a positive integer, a list of positive integers or 'full'"),
        (["train", "digits", "--param", "tt", "--rank", "0", "--set", "param.rank=4"],
         "Error: --rank 0: expected a positive integer, a list of positive integers or 'full'"),
        (["train", "digits", "--param", "sn", "--rank", "8"], "Error: --rank 8: 'sn' takes no rank (ranks are for the "
                                                             "low-rank parameterizations)"),
        (["train", "digits", "--cfg", str(tmp_path / "sn.yml"), "--param", "sn"], "Error: param.rank = 8: 'sn' takes no "
                                                                              "rank (ranks are for the low-rank "
                                                                              "parameterizations)"),
    ]
    (tmp_path / "sn.yml").write_text("param:\n  rank: 8\n")
    for args, message in cases:
        result = run(*args, *out)
        assert (result.exit_code, result.output.splitlines()[-1]) == (2, message), (args, result.output)
    assert not (tmp_path / "runs").exists()


def test_the_rank_line_writes_a_deeper_ht_tree_as_rank_takes_it():
    """Each subtree was written flat in one pair of parentheses: a 5-mode tree's line read back
    as another tree."""
    from sttpfast.cli import rank_line

    line = rank_line("ht", [[5, [8, 6, 2], 3], [4, 3, 2]], "given")
    assert line == "rank (5,(8,6,2),3),(4,3,2) (ht's rank tree, the same for every layer)"


@pytest.mark.processes
@pytest.mark.parametrize("app", ["train", "gan", "compress"])
def test_the_apps_take_dash_h_as_sttpfast_does(app):
    # `sttpfast gan -h` printed the help, `python apps/gan.py -h` "Error: No such option '-h'."
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "apps" / f"{app}.py"), "-h"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Usage: apps/{app}.py [OPTIONS]")
    assert re.search(r"^  -h, --help +Show this message and exit\.$", proc.stdout, re.M), proc.stdout


@pytest.mark.parametrize("args,message", [
    (["gan", "digits", "--loss", "bogus"], "Error: Invalid value for '--loss': 'bogus' is not one of 'hinge', 'ns'. "
                                           "(sttpfast gan --help)"),
    (["train", "digits", "--steps", "abc"], "Error: Invalid value for '--steps': 'abc' is not a valid integer. "
                                            "(sttpfast train --help)"),
    (["export", "."], "Error: Missing option '--format'. (sttpfast export --help)"),
    (["nosuch"], "Error: No such command 'nosuch'. (sttpfast --help)"),
    (["info", "--nope"], "Error: No such option '--nope'. (sttpfast info --help)"),
])
@pytest.mark.processes
def test_a_usage_error_is_one_error_line_naming_help(args, message):
    # click printed the usage, a hint and a blank line before its Error line
    proc = subprocess.run([sys.executable, "-m", "sttpfast", *args], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr.replace("python -m sttpfast", "sttpfast")) == (
        2, "", message + "\n")


@pytest.mark.processes
def test_a_usage_error_of_an_app_script_is_one_line_too():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "apps/gan.py"), "--loss", "bogus"], capture_output=True,
                          text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (
        2, "Error: Invalid value for '--loss': 'bogus' is not one of 'hinge', 'ns'. (apps/gan.py --help)\n")


@pytest.mark.processes
def test_sttpfast_alone_prints_its_help_not_an_error():
    # the one-line usage errors caught click's "no arguments: show the help" too
    proc = subprocess.run([sys.executable, "-m", "sttpfast"], capture_output=True, text=True, timeout=120)
    assert "Error" not in proc.stdout + proc.stderr
    assert (proc.stdout + proc.stderr).startswith("Usage: python -m sttpfast [OPTIONS] COMMAND [ARGS]...")
