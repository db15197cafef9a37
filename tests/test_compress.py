"""sttpfast compress: decompose a dense run (phase 0), distil block by block (1), fine-tune (2)."""
import json
import re
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner

import sttpfast
from sttpfast.cli import main
from sttpfast.compress import compress_run, parse_phases
from sttpfast.config import build_config
from sttpfast.surgery import parameterization_spec, parameterize


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A dense resnet20_cifar at width 4 trained for a few steps on 256 digits."""
    from sttpfast.run import run_training

    out = tmp_path_factory.mktemp("compress")
    cfg, _ = build_config(overrides=[
        "data.name=digits", "data.bs=64", "data.subset=256", "param.name=dense", "optim.steps=8", "optim.opt=adam",
        "optim.lr=0.01", "log.logger=none", "log.progress=false", f"train.out={out}", "train.name=dense",
        "model.kwargs={base_width: 4}"])
    run_training(cfg, echo=lambda *a: None)
    return out / "dense"


def test_three_phases_report_lower_block_mse_and_a_resumable_run(dense_run, tmp_path):
    from sttpfast.export import export_run
    from sttpfast.run import run_training

    torch.manual_seed(0)
    report = compress_run(dense_run, "tucker", compression=20, phases="0,1,2", distill_steps=12, epochs=1,
                          out=tmp_path / "c", echo=lambda *a: None)
    assert list(report["phases"]) == ["0", "1", "2"]
    z = report["phases"]["0"]["z_percent"]
    # the shared Tucker rank closest to 20% (the width-4 net moves Z in coarse steps)
    assert z == 19.3794 and report["phases"]["1"]["z_percent"] == report["phases"]["2"]["z_percent"] == z
    assert all(0 <= phase["accuracy"] <= 1 for phase in report["phases"].values())
    before, after = report["phases"]["1"]["block_mse_before"], report["phases"]["1"]["block_mse_after"]
    assert list(before) == ["stem", *(f"blocks.{i}" for i in range(9))]
    # the stem conv (3 -> 4 channels) and a 1x1 shortcut gain nothing in Tucker form and stay
    # dense: the student's stem is the teacher's, exactly, and phase 1 must leave it so (it used
    # to drift to 1e-3 while the later blocks were distilled)
    assert report["phases"]["0"]["left_dense"] == ["stem.0", "blocks.3.shortcut.0"]
    assert before["stem"] == after["stem"] == 0.0
    for block in list(before)[1:]:  # held-out MSE against the teacher, per block
        assert after[block] < before[block], (block, before[block], after[block])
    folder = tmp_path / "c"
    assert json.loads((folder / "compress_report.json").read_text()) == report
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["compress"] == report and summary["steps"] == 4 and summary["z_percent"] == z
    # the shared rank the target chose, at the top as in a trained run's summary (it was null:
    # phase 2 trains per-layer ranks, param.layer_ranks)
    assert report["rank"] == 3 and summary["rank"] == 3
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    assert cfg["param"]["name"] == "tucker" and cfg["param"]["layer_ranks"]
    model = sttpfast.load_parameterized(folder / "checkpoints" / "last" / "model.safetensors")
    assert {e["param"] for e in parameterization_spec(model).values()} == {"tucker"}
    # a normal run folder: export reads it, --resume continues phase 2
    assert export_run(folder, "safetensors").is_file()
    resumed = run_training(resume=folder, epochs=2, echo=lambda *a: None)  # 4 batches an epoch
    assert resumed["steps"] == 8 and resumed["z_percent"] == z
    # the phases' results stay in summary.json after the resume (they were dropped), phase 2's
    # now the resumed run's
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["compress"] == resumed["compress"]
    assert resumed["compress"] == {**report, "phases": {**report["phases"], "2": {
        "accuracy": resumed["metrics"]["accuracy"], "z_percent": z, "steps": 8}}}
    assert json.loads((folder / "compress_report.json").read_text()) == resumed["compress"]


@pytest.mark.parametrize("text,phases", [("0,1,2", (0, 1, 2)), ("0,2", (0, 2)), ("0", (0,)), ([0, 1], (0, 1))])
def test_parse_phases(text, phases):
    assert parse_phases(text) == phases


def _cli(*args):
    return CliRunner().invoke(main, ["compress", *map(str, args)])


def _one_error_line(result, message, tmp_path):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert lines == [message], result.output


@pytest.mark.parametrize("args,message", [
    (["--phases", "1,2"], "Error: --phases '1,2': give increasing phases from 0, 1, 2 starting with 0 (the "
                          "decomposition), e.g. 0,1,2 or 0,2"),
    (["--phases", "0,3"], "Error: --phases '0,3': give increasing phases from 0, 1, 2 starting with 0 (the "
                          "decomposition), e.g. 0,1,2 or 0,2"),
    (["--phases", "0,2,1"], "Error: --phases '0,2,1': give increasing phases from 0, 1, 2 starting with 0 (the "
                            "decomposition), e.g. 0,1,2 or 0,2"),
    (["--rank", "999"], "Error: rank 999 is too large for tucker on this model: the largest useful rank is 16 "
                        "(no compression)"),
    (["--lr", "-1"], "Error: --lr -1.0: expected a positive number"),
    (["--lr", "nan"], "Error: --lr nan: expected a number"),
    # the command's flags, not the library's words (it said plan='energy', compression=Z)
    (["--rank", "4", "--plan", "energy"], "Error: --plan energy spends a compression budget: give --compression Z "
                                          "instead of --rank"),
    (["--rank", "4", "--compression", "5"], "Error: give either --rank or --compression, not both"),
    # --steps won silently, and the output config kept both
    (["--rank", "4", "--epochs", "2", "--steps", "3"], "Error: give either --epochs or --steps (phase 2's budget), "
                                                       "not both"),
    # phase 2's flags without phase 2 (and phase 1's without phase 1) did nothing, without a word
    (["--phases", "0,1", "--steps", "2", "--lr", "0.1"], "Error: --steps, --lr set phase 2, which --phases 0,1 "
                                                         "leaves out: add 2 to --phases, or leave them out"),
    (["--phases", "0,2", "--distill-steps", "3"], "Error: --distill-steps sets phase 1, which --phases 0,2 leaves "
                                                  "out: add 1 to --phases, or leave it out"),
    # it warned, then wrote a "compressed" run at Z 100%
    (["--param", "svdp-r", "--compression", "100"],
     "Error: svdp-r at Z 100% leaves every selected layer dense (it gains nothing on them at the rank that target "
     "gives): nothing to compress; give a smaller --compression, or --no-keep-dense-if-no-gain"),
    (["--rank", "4,x"], "Error: --rank '4,x' is not a valid rank: give a positive integer (8), comma-separated "
                        "integers for a tensor format's tuple rank (4,8,8,4: TT bonds; 8,6: Tucker's R_out,R_in; "
                        "4x8x8x4 works too) or an HT rank tree in parentheses ((4,8,6),(3,3,3))"),
])
def test_bad_input_one_line_exit_2_nothing_written(dense_run, tmp_path, args, message):
    if "--rank" not in args and "--compression" not in args:
        args = [*args, "--compression", "20"]
    if "--param" not in args:
        args = ["--param", "tucker", *args]
    result = _cli(dense_run, *args, "--out", tmp_path / "c")
    _one_error_line(result, message, tmp_path)
    assert not (tmp_path / "c").exists()


def test_missing_run_and_non_dense_checkpoint_are_refused(dense_run, tmp_path):
    missing = tmp_path / "nope"
    _one_error_line(_cli(missing, "--param", "tt", "--rank", "2"),
                    f"Error: {missing} does not exist", tmp_path)  # it said "not a run folder"
    (tmp_path / "empty").mkdir()
    _one_error_line(_cli(tmp_path / "empty", "--param", "tt", "--rank", "2"),
                    f"Error: {tmp_path / 'empty'} is not a run folder (no config.yaml)", tmp_path)
    # a run folder whose checkpoint is already compressed
    fake = tmp_path / "sttp"
    (fake / "checkpoints" / "last").mkdir(parents=True)
    shutil.copy(dense_run / "config.yaml", fake / "config.yaml")
    model = sttpfast.load_parameterized(dense_run / "checkpoints" / "last" / "model.safetensors")
    sttpfast.parameterize(model, "sttp-r", rank=2)
    sttpfast.save_parameterized(model, fake / "checkpoints" / "last" / "model.safetensors")
    _one_error_line(_cli(fake, "--param", "tt", "--rank", "2", "--out", tmp_path / "c"),
                    f"Error: {fake}: the checkpoint is not a dense model (22 layer(s) are sttp-r); compress starts "
                    "from a run trained with --param dense", tmp_path)
    assert not (tmp_path / "c").exists()


def test_a_run_whose_config_is_not_yaml_is_one_error_line_for_compress_info_and_export(dense_run, tmp_path):
    # compress and info printed the YAML parser's five lines (context and a ^ pointer)
    bad = tmp_path / "bad"
    shutil.copytree(dense_run, bad)
    (bad / "config.yaml").write_text("model: [\n")
    message = (f"Error: config file {bad / 'config.yaml'} is not valid YAML: line 2, column 1: expected the node "
               "content, but found '<stream end>' (while parsing a flow node from line 2, column 1)")
    _one_error_line(_cli(bad, "--param", "tt", "--rank", "2", "--out", tmp_path / "c"), message, tmp_path)
    for command in (["info", bad], ["export", bad, "--format", "safetensors"], ["train", "--resume", bad]):
        result = CliRunner().invoke(main, list(map(str, command)))
        _one_error_line(result, message, tmp_path)
    assert not (tmp_path / "c").exists()


def test_a_method_that_does_not_compress_is_refused_by_name(dense_run, tmp_path):
    """`--param sn` used to ask for --rank, then refuse --rank: one message instead."""
    from sttpfast.params import methods

    names = ", ".join(n for n, m in methods().items() if m.compresses)
    for args in ([], ["--rank", "4"], ["--compression", "10"]):
        _one_error_line(_cli(dense_run, "--param", "sn", *args, "--out", tmp_path / "c"),
                        f"Error: sn does not compress (it keeps every weight dense); compress with one of: {names}",
                        tmp_path)
    assert not (tmp_path / "c").exists()
    # an unknown name lists what compress takes (dense and sn were listed, then refused)
    with_aliases = ", ".join([*names.split(", "), "svdp", "sttp"])
    _one_error_line(_cli(dense_run, "--param", "nope", "--rank", "4", "--out", tmp_path / "c"),
                    f"Error: unknown parameterization 'nope'; compress takes: {with_aliases}", tmp_path)


def test_a_gan_run_is_refused_as_a_gan_run(tmp_path):
    """It said 'not a dense model (11 layer(s) are sn)' of a dense GAN run."""
    from sttpfast.gan.run import run_gan

    cfg, _ = build_config(overrides=["data.name=digits", "data.subset=128", "gan.bs=32", "gan.steps=1",
                                     "gan.g_kwargs={widths: [8, 8, 8], bottom_width: 2, z_dim: 16}",
                                     "gan.d_kwargs={widths: [8, 8, 8, 8]}",
                                     "log.logger=none", "log.progress=false", f"train.out={tmp_path}",
                                     "train.name=g"])
    run_gan(cfg, echo=lambda *a: None)
    _one_error_line(_cli(tmp_path / "g", "--param", "tt", "--rank", "4", "--out", tmp_path / "c"),
                    f"Error: {tmp_path / 'g'} is a GAN run; compress starts from a classification run trained "
                    "with --param dense", tmp_path)
    assert not (tmp_path / "c").exists()


def test_an_existing_out_folder_is_refused_before_any_work(dense_run, tmp_path):
    """An explicit --out is the folder written, never a numbered neighbour of it."""
    taken = tmp_path / "taken"
    taken.mkdir()
    _one_error_line(_cli(dense_run, "--param", "tucker", "--compression", "20", "--phases", "0", "--out", taken),
                    f"Error: --out {taken} exists; give a new folder (without --out: RUN-PARAM next to RUN, "
                    "numbered if taken)", tmp_path)
    assert list(taken.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_resuming_a_run_compressed_without_phase_2_says_why_it_cannot(dense_run, tmp_path, monkeypatch):
    from sttpfast.export import export_run
    from sttpfast.run import RunError, run_training

    monkeypatch.chdir(dense_run.parent)  # RUN given relative: the report names it absolute
    result = _cli(dense_run.name, "--param", "tucker", "--compression", "20", "--phases", "0", "--out", tmp_path / "p0")
    assert result.exit_code == 0, result.output
    assert export_run(tmp_path / "p0", "safetensors").is_file()  # the model alone exports
    assert json.loads((tmp_path / "p0/compress_report.json").read_text())["teacher"] == str(dense_run.resolve())
    # `sttpfast info RUN`: the compressed run's per-layer table (only compress_report.json held it)
    shown = CliRunner().invoke(main, ["info", str(tmp_path / "p0")])
    assert shown.exit_code == 0, shown.output
    z = json.loads((tmp_path / "p0/compress_report.json").read_text())["phases"]["0"]["z_percent"]
    assert shown.output.splitlines()[0] == f"run {tmp_path / 'p0'}: tucker, the last checkpoint"
    assert re.fullmatch(rf"layers \d+  params [\d,]+ / [\d,]+  Z = {z:.2f}%  \(weights only \d+\.\d\d%\)",
                        shown.output.splitlines()[-1]), shown.output
    assert "blocks.0.conv1" in shown.output
    mixed = CliRunner().invoke(main, ["info", str(tmp_path / "p0"), "--param", "tt"])
    assert (mixed.exit_code, mixed.output) == (
        2, "Error: info RUN shows the run's own model; drop --arch, --param and the other options\n")
    with pytest.raises(RunError) as err:
        run_training(resume=tmp_path / "p0", steps=2, echo=lambda *a: None)
    assert str(err.value) == (f"{tmp_path / 'p0'} holds a compressed model without a training state (compressed "
                              "without phase 2): it cannot be resumed; compress again with phase 2 (--phases 0,2)")


def test_compress_to_cp_says_its_als_init_before_it_starts(dense_run, tmp_path):
    result = _cli(dense_run, "--param", "cp", "--rank", "4", "--phases", "0", "--out", tmp_path / "cp")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == ("cp: the spectral init fits every layer's weight by ALS, 100 to 1000 "
                                             "sweeps each, fewer where a sweep costs more (resnet18 at Z = 20%: "
                                             "1.5 to 3 CPU-minutes)")


def test_a_teacher_that_stopped_before_its_budget_is_said_and_a_damaged_one_names_compress_remedy(dense_run,
                                                                                                   tmp_path):
    import shutil

    half = tmp_path / "half"  # as if stopped (SIGTERM) at step 8 of 20: compressed without a word
    shutil.copytree(dense_run, half, symlinks=True)
    config = half / "config.yaml"
    config.write_text(config.read_text().replace("steps: 8", "steps: 20"))
    result = _cli(half, "--param", "tucker", "--rank", "2", "--phases", "0", "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == (
        f"warning: the teacher {half} stopped at step 8 of its 20: compressing that checkpoint "
        f"(`sttpfast train --resume {half}` trains it to the end first)")
    # a damaged last checkpoint: export's remedy "--which best" is no option of compress
    model = (half / "checkpoints" / "last").resolve() / "model.safetensors"
    full = model.stat().st_size
    model.write_bytes(model.read_bytes()[:1000])
    _one_error_line(_cli(half, "--param", "tucker", "--rank", "2", "--out", tmp_path / "d"),
                    f"Error: checkpoint {model.parent} is damaged ({model}: 1000 bytes, the manifest says {full}); "
                    f"resume the run (sttpfast train --resume {half}): it falls back to the newest complete "
                    "checkpoint and trains on from there", tmp_path)
    info = CliRunner().invoke(main, ["info", str(half)])  # nor of info
    _one_error_line(info, f"Error: checkpoint {model.parent} is damaged ({model}: 1000 bytes, the manifest says "
                          f"{full}); resume the run: it falls back to the newest complete checkpoint", tmp_path)


def test_an_empty_out_is_refused_as_such(dense_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it said "--out  exists" (the working directory)
    _one_error_line(_cli(dense_run, "--param", "tucker", "--rank", "2", "--out", ""),
                    "Error: --out is empty; give the folder of the compressed run (without --out: RUN-PARAM next "
                    "to RUN)", tmp_path)


def test_epochs_and_steps_together_are_refused_from_python_too(dense_run, tmp_path):
    """compress_run(epochs=2, steps=3) ran 3 steps without a word (only the CLI refused)."""
    with pytest.raises(ValueError) as err:
        compress_run(dense_run, "tucker", compression=20, epochs=2, steps=3, out=tmp_path / "c",
                     echo=lambda *a: None)
    assert str(err.value) == "give either --epochs or --steps (phase 2's budget), not both"
    assert not (tmp_path / "c").exists()


def test_an_output_folder_that_cannot_be_made_is_refused_before_any_work(dense_run, tmp_path):
    # it was found after phases 0 and 1 had run, and their work was lost
    result = _cli(dense_run, "--param", "tucker", "--compression", "20", "--phases", "0,1", "--distill-steps", "1",
                  "--out", "/proc/sttpfast-test/c")
    _one_error_line(result, "Error: cannot write to output folder /proc/sttpfast-test: No such file or directory",
                    tmp_path)


def test_an_output_folder_in_an_existing_folder_that_takes_none_is_refused_before_any_work(dense_run, tmp_path):
    # /proc exists but takes no folder: found only when the run folder was made, after phase 1
    result = _cli(dense_run, "--param", "tucker", "--compression", "20", "--phases", "0,1", "--distill-steps", "1",
                  "--out", "/proc/sttpfast-nope")
    _one_error_line(result, "Error: cannot write to output folder /proc/sttpfast-nope: No such file or directory",
                    tmp_path)


def test_compress_feeds_the_teacher_the_image_size_it_was_trained_at(tmp_path):
    """A run trained with --img-size 32 on 16 px digits: compress evaluated (and re-estimated
    BatchNorm, distilled) at 16 px, so its 'dense' accuracy was not the run's. At full rank
    the converted student is the teacher: phase 0 (teacher's statistics) equals it too."""
    from sttpfast.run import run_training

    cfg, _ = build_config(overrides=[
        "data.name=digits", "data.bs=64", "data.subset=256", "data.img_size=32", "param.name=dense",
        "optim.steps=8", "optim.opt=adam", "optim.lr=0.01", "log.logger=none", "log.progress=false",
        f"train.out={tmp_path}", "train.name=d32", "model.kwargs={base_width: 4}"])
    trained = run_training(cfg, echo=lambda *a: None)["metrics"]["accuracy"]
    result = _cli(tmp_path / "d32", "--param", "svdp-r", "--rank", "16", "--phases", "0", "--bn-batches", "0",
                  "--out", str(tmp_path / "c"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "c" / "compress_report.json").read_text())
    assert report["dense"]["accuracy"] == pytest.approx(trained, abs=1e-6)
    assert report["phases"]["0"]["accuracy"] == pytest.approx(trained, abs=1e-6)


def test_resuming_a_compressed_run_keeps_the_energies_of_its_rank_plan(dense_run, tmp_path):
    """The energy plan's rank_plan.json (each layer's retained energy) was rewritten by
    `train --resume` from the per-layer ranks alone: every energy became null."""
    out = tmp_path / "energy"
    result = _cli(dense_run, "--param", "tucker", "--compression", "30", "--plan", "energy", "--phases", "0,2",
                  "--steps", "2", "--bn-batches", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "rank_plan.json").read_text())
    assert all(isinstance(row["energy"], float) for row in plan)
    resumed = CliRunner().invoke(main, ["train", "--resume", str(out), "--steps", "3"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "rank_plan.json").read_text()) == plan


def test_ctrl_c_in_phase_1_says_where_it_stopped(dense_run, tmp_path, monkeypatch):
    """It said 'interrupted before training started', after phases 0 and 1 had run."""
    import sttpfast.compress

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sttpfast.compress, "distill_blocks", interrupted)
    result = _cli(dense_run, "--param", "tucker", "--compression", "30", "--phases", "0,1,2", "--bn-batches", "1",
                  "--out", str(tmp_path / "c"))
    assert result.exit_code == 130
    assert result.output.splitlines()[-1] == "interrupted in phase 1; nothing was written (phase 1 keeps no checkpoint)"
    assert not (tmp_path / "c").exists()


def test_the_default_phases_leave_phase_1_out_for_a_timm_model_and_say_so(tmp_path):
    """The default 0,1,2 refused every timm model (no feature_chain() for phase 1); an explicit
    --phases 0,1,2 still does."""
    from sttpfast.run import run_training

    cfg, _ = build_config(overrides=[
        "data.name=digits", "data.bs=32", "data.subset=64", "param.name=dense", "optim.steps=2",
        "log.logger=none", "log.progress=false", f"train.out={tmp_path}", "train.name=mnv3",
        "model.arch=mobilenetv3_small_050"])
    run_training(cfg, echo=lambda *a: None)
    result = _cli(tmp_path / "mnv3", "--param", "tucker", "--compression", "40", "--steps", "1", "--bn-batches", "1",
                  "--out", str(tmp_path / "c"))
    assert result.exit_code == 0, result.output
    assert ("phases 0,2: phase 1 (block-wise distillation) needs the model's blocks in order (feature_chain(), "
            "which sttpfast's own architectures have); MobileNetV3 has none") in result.output.splitlines()
    assert sorted(json.loads((tmp_path / "c" / "compress_report.json").read_text())["phases"]) == ["0", "2"]
    refused = _cli(tmp_path / "mnv3", "--param", "tucker", "--compression", "40", "--phases", "0,1,2",
                   "--out", str(tmp_path / "d"))
    assert refused.exit_code == 2 and "MobileNetV3 has no feature_chain()" in refused.output


def test_a_non_finite_loss_in_phase_2_is_exit_1_and_keeps_the_phases_results(dense_run, tmp_path):
    # it ended in a TypeError traceback (formatting a missing accuracy) and left no report
    result = _cli(dense_run, "--param", "tucker", "--compression", "20", "--phases", "0,2", "--steps", "4",
                  "--lr", "1e30", "--out", tmp_path / "c")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    report = json.loads((tmp_path / "c" / "compress_report.json").read_text())
    step = report["phases"]["2"]["nan_step"]
    assert isinstance(step, int) and 0 < step <= 4
    assert list(report["phases"]) == ["0", "2"] and report["phases"]["0"]["accuracy"] is not None
    assert result.output.strip().splitlines()[-1].startswith(f"Error: the loss became non-finite at step {step}")
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["compress"] == report


def test_an_interrupted_phase_2_resumes_with_the_phases_results(dense_run, tmp_path, monkeypatch):
    # the phases' results were written only after phase 2 returned: an interrupted run,
    # resumed as told, had no compress_report.json and no `compress` in summary.json
    from interrupt import Interrupt

    import sttpfast.run
    from sttpfast.run import TrainingInterrupted, run_training

    def ctrl_c_after_step_2(cfg, extra_cbs=(), **kwargs):  # compress imports run_training at call time
        return run_training(cfg, extra_cbs=[*extra_cbs, Interrupt(2, KeyboardInterrupt)], **kwargs)

    monkeypatch.setattr(sttpfast.run, "run_training", ctrl_c_after_step_2)
    torch.manual_seed(0)
    with pytest.raises(TrainingInterrupted):
        compress_run(dense_run, "tucker", compression=20, phases="0,1,2", distill_steps=2, steps=4,
                     out=tmp_path / "c", echo=lambda *a: None)
    folder = tmp_path / "c"
    early = json.loads((folder / "compress_report.json").read_text())
    assert list(early["phases"]) == ["0", "1"]
    assert json.loads((folder / "summary.json").read_text())["compress"] == early
    resumed = run_training(resume=folder, echo=lambda *a: None)
    assert resumed["steps"] == 4
    report = json.loads((folder / "compress_report.json").read_text())
    assert report["phases"]["0"] == early["phases"]["0"] and report["phases"]["1"] == early["phases"]["1"]
    assert report["phases"]["2"] == {"accuracy": resumed["metrics"]["accuracy"], "z_percent": resumed["z_percent"],
                                     "steps": 4}
    assert resumed["compress"] == report == json.loads((folder / "summary.json").read_text())["compress"]


def test_phase_1_prints_each_blocks_own_mse(dense_run):
    # it printed the optimized loss, a sum over blocks 1..i of relative MSEs, labelled "train
    # MSE": it only grew block after block and matched nothing in compress_report.json
    from sttpfast.compress import block_mse, distill_blocks

    teacher = sttpfast.load_parameterized(dense_run / "checkpoints" / "last" / "model.safetensors")
    student = sttpfast.load_parameterized(dense_run / "checkpoints" / "last" / "model.safetensors")
    parameterize(student, "tucker", rank=2, keep_dense_if_no_gain=False)
    torch.manual_seed(0)
    batch = [(torch.randn(8, 1, 16, 16), torch.zeros(8, dtype=torch.long))]  # digits: 1 x 16 x 16
    expected = block_mse(student, teacher, batch)  # lr 0: the student does not move
    lines = []
    distill_blocks(student, teacher, batch, steps_per_block=1, lr=0.0, echo=lines.append)
    assert [line.split(": MSE ")[1].split(" ")[0] for line in lines] == [f"{v:.5f}" for v in expected]
    assert lines[1].startswith("phase 1: block 2/10 blocks.0: MSE ")
    assert lines[1].endswith(" on the last training batch")


def test_include_and_exclude_select_the_layers_so_a_tuple_rank_works(dense_run, tmp_path):
    # README: "A tuple fits one layer shape: give it with --include ... (`sttpfast compress
    # --rank` reads the same syntax)" but compress had no --include: a TT tuple failed on the
    # 1x1 shortcuts whatever one did
    result = _cli(dense_run, "--param", "tt", "--rank", "2,3,2", "--include", "blocks.*.conv*",
                  "--exclude", "blocks.0.*", "--phases", "0", "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    ranks = yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())["param"]["layer_ranks"]
    assert sorted(ranks) == sorted(f"blocks.{b}.conv{c}" for b in range(1, 9) for c in (1, 2))
    assert set(map(tuple, ranks.values())) == {(2, 3, 2)}


def test_recalibrated_batchnorm_holds_the_average_of_the_batches_statistics():
    from sttpfast.compress import recalibrate_batchnorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(2), torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3),
                                torch.nn.Dropout(0.5), torch.nn.Conv2d(3, 2, 1), torch.nn.BatchNorm2d(2))
    parameterize(model, "lowrank", rank=1, include=["1"])
    kept = {k: v.clone() for k, v in model[0].state_dict().items()}
    batches = [(torch.randn(4, 2, 6, 6) * (i + 1), torch.zeros(4)) for i in range(3)]
    model.eval()
    with torch.no_grad():
        first_out = [model[1](model[0](x)) for x, _ in batches]
        assert recalibrate_batchnorm(model, batches + [(torch.randn(4, 2, 6, 6) * 100, None)], batches=3) == 2
    # every batch counts the same (not the running average of momentum 0.1)
    assert torch.allclose(model[2].running_mean, torch.stack([h.mean((0, 2, 3)) for h in first_out]).mean(0),
                          rtol=1e-5, atol=1e-6)
    assert torch.allclose(model[2].running_var,
                          torch.stack([h.var((0, 2, 3), unbiased=True) for h in first_out]).mean(0),
                          rtol=1e-5, atol=1e-6)
    assert int(model[2].num_batches_tracked) == 3 and model[2].momentum == 0.1
    # the norm before the first parameterized layer sees the teacher's inputs: kept as it was
    assert all(torch.equal(v, kept[k]) for k, v in model[0].state_dict().items())
    # the dropout stayed in eval mode: the last norm saw what the eval-mode network feeds it
    assert not model.training and not any(m.training for m in model)
    with torch.no_grad():
        last_in = [model[4](model[3](model[2](h))) for h in first_out]
    assert torch.allclose(model[5].running_mean, torch.stack([h.mean((0, 2, 3)) for h in last_in]).mean(0),
                          rtol=1e-5, atol=1e-6)


def test_phase_0_recalibrates_the_students_batchnorm_and_reports_both_accuracies(dense_run, tmp_path):
    # the decomposed student kept the teacher's normalization statistics: phase 0 was at chance
    # for every method in README's benchmark (its activations have other scales)

    report = compress_run(dense_run, "tucker", compression=20, phases="0", out=tmp_path / "c", echo=lambda *a: None)
    phase = report["phases"]["0"]
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert (summary["param"], summary["rank"], summary["z_percent"]) == ("tucker", 3, phase["z_percent"])
    assert phase["bn_batches"] == 4  # 256 digits in batches of 64: all 4 of the training loader
    assert 0 <= phase["accuracy_teacher_statistics"] <= 1 and 0 <= phase["accuracy"] <= 1
    teacher = sttpfast.load_parameterized(dense_run / "checkpoints" / "last" / "model.safetensors")
    student = sttpfast.load_parameterized(tmp_path / "c" / "checkpoints" / "last" / "model.safetensors")
    name = "blocks.0.bn1.running_mean"
    assert not torch.equal(student.state_dict()[name], teacher.state_dict()[name])

    kept = compress_run(dense_run, "tucker", compression=20, phases="0", bn_batches=0, out=tmp_path / "k",
                        echo=lambda *a: None)
    assert kept["phases"]["0"]["bn_batches"] == 0
    assert kept["phases"]["0"]["accuracy"] == kept["phases"]["0"]["accuracy_teacher_statistics"] == \
        phase["accuracy_teacher_statistics"]
    student = sttpfast.load_parameterized(tmp_path / "k" / "checkpoints" / "last" / "model.safetensors")
    assert torch.equal(student.state_dict()[name], teacher.state_dict()[name])


def test_bn_batches_on_the_command_line(dense_run, tmp_path):
    result = _cli(dense_run, "--param", "tucker", "--compression", "20", "--phases", "0", "--bn-batches", "2",
                  "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("phase 0 "))
    assert line.split("): ")[1].startswith("accuracy ") and ", with the teacher's normalization statistics " in line
    assert " (BatchNorm statistics re-estimated on 2 training batches)" in line
    report = json.loads((tmp_path / "c" / "compress_report.json").read_text())
    assert report["phases"]["0"]["bn_batches"] == 2
    bad = _cli(dense_run, "--param", "tucker", "--compression", "20", "--bn-batches", "-1", "--out", tmp_path / "d")
    _one_error_line(bad, "Error: --bn-batches must be an integer >= 0 (0 keeps the teacher's statistics), got -1",
                    tmp_path)
    assert not (tmp_path / "d").exists()
