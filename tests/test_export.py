"""`sttpfast export` and sttpfast.export: densified files that run without sttpfast."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file
from torch.nn.utils import parametrize

import sttpfast.models  # noqa: F401  (registers resnet20_cifar, sngan_*: all a user of the files imports)
from sttpfast.cli import main
from sttpfast.export import export_generator, export_model, load_run_model, run_checkpoint
from sttpfast.surgery import parameterization_spec, parameterize


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny sttp-r run on digits, trained through the CLI (one step is enough: the
    checkpoint's factors are what is exported)."""
    out = tmp_path_factory.mktemp("runs")
    result = _cli("train", "digits", "--arch", "resnet20_cifar", "--param", "sttp-r", "--rank", "4", "--steps", "1",
                  "--bs", "64", "--subset", "256", "--logger", "none", "--out", out, "--name", "r")
    assert result.exit_code == 0, result.output
    return out / "r"


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _digits_batch(n):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def test_safetensors_export_loads_into_plain_timm(run, tmp_path):
    out = tmp_path / "net.safetensors"
    result = _cli("export", run, "--format", "safetensors", "--out", out)
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {out}\n"
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["architecture"] == "resnet20_cifar"
    assert json.loads(meta["model_args"]) == {"num_classes": 10, "in_chans": 1}
    assert meta["checkpoint"] == "last"
    # the input the model was trained on: nothing recorded it, and the statistics depend on the
    # data (and the subset) the run loaded
    assert json.loads(meta["normalization"]) == _normalization()

    plain = timm.create_model(meta["architecture"], **json.loads(meta["model_args"]))
    plain.load_state_dict(load_file(str(out)), strict=True)
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())

    parameterized, _, _ = load_run_model(run)
    assert len(parameterization_spec(parameterized)) == 22  # every conv and the head: sttp-r rank 4
    x = _digits_batch(4)
    with torch.no_grad():
        want = parameterized.eval()(x)
        got = plain.eval()(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def _normalization() -> dict:
    """What the fixture's run fed its model: its loader's per-channel statistics."""
    from sttpfast.data import get_dls

    dls = get_dls("digits", bs=64, subset=256, device="cpu")
    return {"mean": list(dls.train.mean), "std": list(dls.train.std),
            "input": "float32 (x / 255 - mean) / std per channel, x the image's uint8 pixels"}


def test_onnx_export_matches_pytorch_with_any_batch(run, tmp_path):
    import onnx
    import onnxruntime

    out = tmp_path / "net.onnx"
    result = _cli("export", run, "--format", "onnx", "--which", "best", "--out", out)
    assert result.exit_code == 0, result.output
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["normalization"]) == _normalization() and props["checkpoint"] == "best"
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name) == ("input", "output")
    assert inp.shape[1:] == [1, 16, 16] and isinstance(inp.shape[0], str)  # only the batch axis is free
    model, _, shape = load_run_model(run, "best")
    assert shape == (1, 1, 16, 16)
    for n in (1, 5):  # traced at batch 1; the batch axis is dynamic
        x = _digits_batch(n)
        with torch.no_grad():
            want = model.eval()(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert not [p for p in tmp_path.iterdir() if p.name != "net.onnx"]  # no temp or external-data file


TWO_BLOCKS = ["--set", "model.kwargs.depth=2"]  # the ViT's structure, at a fraction of its export time


@pytest.mark.parametrize("arch,args,size", [
    ("convnext_atto", ["--param", "sttp-r", "--rank", "4"], 32),  # the 16 px digits resized to 32
    ("vit_tiny_patch16_224", ["--param", "sttp-r", "--rank", "4", "--attention", "qk-ov", *TWO_BLOCKS], 16),  # 16 px
    ("vit_tiny_patch16_224", ["--param", "svdp-l", "--rank", "4", "--attention", "q-k-v", "--img-size", "32",
                              *TWO_BLOCKS], 32),
], ids=["convnet-resized", "vit-qk-ov-data-size", "vit-q-k-v-img-size"])
def test_a_run_of_a_timm_model_built_for_its_data_exports_as_it_ran(tmp_path, arch, args, size):
    """The export rebuilds the model as the run built it: the size the run trained at (resized
    or built for the data), the attention form; the ONNX file takes that size and matches."""
    import onnxruntime

    result = _cli("train", "digits", "--arch", arch, *args, "--steps", "1", "--bs", "16", "--subset", "64",
                  "--logger", "none", "--out", tmp_path, "--name", "t")
    assert result.exit_code == 0, result.output
    model, margs, shape = load_run_model(tmp_path / "t")
    assert shape == (1, 1, size, size)
    from sttpfast.export import load_gan_run_pair

    with pytest.raises(ValueError) as err:  # it said "config.yaml names no gan.g / gan.d / data.name"
        load_gan_run_pair(tmp_path / "t")
    assert str(err.value) == f"{tmp_path / 't'} is not a GAN run: load it with sttpfast.export.load_run_model"
    out = tmp_path / "t.onnx"
    result = _cli("export", tmp_path / "t", "--format", "onnx", "--out", out)
    assert result.exit_code == 0, result.output
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [1, size, size]
    x = torch.randn(3, 1, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.eval()(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], want, rtol=0, atol=1e-4)


def test_default_target_and_force(run):
    target = run / "export" / "last.safetensors"
    try:
        first = _cli("export", run, "--format", "safetensors")
        assert first.exit_code == 0, first.output
        assert first.output == f"wrote {target}\n"
        before = target.read_bytes()
        tensors = {k: v.clone() for k, v in load_file(str(target)).items()}  # not views of the mapped file
        again = _cli("export", run, "--format", "safetensors")
        assert again.exit_code == 2
        assert again.output == f"Error: {target} exists; add --force (force=True in Python) to overwrite it\n"
        assert target.read_bytes() == before and _files(run / "export") == ["last.safetensors"]
        target.write_bytes(b"stale")
        forced = _cli("export", run, "--format", "safetensors", "--force")
        assert forced.exit_code == 0, forced.output
        rewritten = load_file(str(target))  # the same checkpoint gives the same tensors
        assert rewritten.keys() == tensors.keys() and all(torch.equal(rewritten[k], tensors[k]) for k in tensors)
    finally:
        shutil.rmtree(run / "export", ignore_errors=True)


@pytest.mark.parametrize("case", ["not_a_run", "no_checkpoint", "no_best", "format", "which", "suffix", "suffix_onnx",
                                  "damaged", "folder", "under_a_file", "proc", "run_file", "checkpoint_file"])
def test_bad_input_is_one_error_line_and_writes_nothing(run, tmp_path, case):
    target = tmp_path / "out" / "x.onnx"
    folder, fmt, extra = run, "onnx", []
    if case == "under_a_file":  # a traceback (FileExistsError) after the model was built
        (tmp_path / "a_file").write_text("")
        target = tmp_path / "a_file" / "x.onnx"
        message = f"cannot write export target {target}: {tmp_path / 'a_file'} is not a folder"
    elif case == "proc":  # a folder that takes no file: a traceback (FileNotFoundError)
        target = Path("/proc/x.onnx")
        message = f"cannot write export target {target}: No such file or directory"
    elif case in ("run_file", "checkpoint_file"):  # --force overwrote the run's own config.yaml
        folder = tmp_path / "copy"
        shutil.copytree(run, folder, symlinks=True)
        extra = ["--force"]
        if case == "run_file":
            target = folder / "config.yaml"
            message = (f"export target {target} exists and is not an onnx file: --force overwrites only an "
                       "earlier export of that format")
        else:
            target, fmt = (folder / "checkpoints" / "last").resolve() / "model.safetensors", "safetensors"
            message = (f"export target {target} is inside the run's checkpoints folder "
                       f"{folder / 'checkpoints'}: export elsewhere (the default is {folder / 'export'})")
    elif case == "folder":  # --out expdir/ wrote a file named expdir
        target = f"{tmp_path / 'out'}/"
        message = f"export target {target} names a folder; give a file name (e.g. {target}last.onnx)"
    elif case == "suffix":  # an ONNX file named as another format's file
        target = tmp_path / "out" / "x.safetensors"
        message = (f"export target {target} is named as a safetensors file, but the format is onnx; "
                   f"name it x.onnx or pass --format safetensors")
    elif case == "suffix_onnx":  # "named as a onnx file"
        target, fmt = tmp_path / "out" / "x.onnx", "safetensors"
        message = (f"export target {target} is named as an onnx file, but the format is safetensors; "
                   f"name it x.safetensors or pass --format onnx")
    elif case == "not_a_run":
        folder = tmp_path / "empty"
        folder.mkdir()
        message = f"{folder} is not a run folder (no config.yaml)"
    elif case in ("no_checkpoint", "no_best"):
        folder = tmp_path / "copy"
        shutil.copytree(run, folder)
        which = "last" if case == "no_checkpoint" else "best"
        shutil.rmtree(folder / "checkpoints" / which)
        extra = ["--which", which]
        message = (f"{folder} has no '{which}' checkpoint "
                   f"({folder / 'checkpoints' / which / 'model.safetensors'} is missing)")
    elif case == "damaged":  # a torn model file: the manifest's sizes and hashes say so
        folder = tmp_path / "copy"
        shutil.copytree(run, folder, symlinks=True)
        model = (folder / "checkpoints" / "last").resolve() / "model.safetensors"
        full = model.stat().st_size
        model.write_bytes(model.read_bytes()[:1000])
        # the run's one checkpoint is last and best: it offered --which best and a resume, both dead ends
        message = (f"checkpoint {model.parent} is damaged ({model}: 1000 bytes, the manifest says {full}); "
                   "no other checkpoint of the run is complete")
    elif case == "format":
        fmt = "tflite"
        message = "unknown export format 'tflite'; allowed: safetensors, onnx"
    else:
        extra = ["--which", "middle"]
        message = "unknown checkpoint 'middle'; allowed: last, best"
    before = _files(tmp_path)
    contents = {f: f.read_bytes() for f in Path(tmp_path).rglob("*") if f.is_file()}
    result = _cli("export", folder, "--format", fmt, "--out", target, *extra)
    assert result.exit_code == 2
    assert result.output == f"Error: {message}\n"
    assert _files(tmp_path) == before  # no file, no folder, no temp file
    assert all(f.read_bytes() == content for f, content in contents.items())  # nothing overwritten


def test_a_damaged_optimizer_state_does_not_stop_an_export_of_intact_weights(run, tmp_path):
    """Export reads the model and its state; a torn optimizer.safetensors refused it ('is
    damaged ...; export another one (--which best)', the same checkpoint in a one-checkpoint run)."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, symlinks=True)
    optimizer = (copy / "checkpoints" / "last").resolve() / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    result = _cli("export", copy, "--format", "safetensors")
    assert result.exit_code == 0, result.output
    reference = _cli("export", run, "--format", "safetensors", "--out", tmp_path / "intact.safetensors")
    assert reference.exit_code == 0, reference.output
    a, b = load_file(str(copy / "export/last.safetensors")), load_file(str(tmp_path / "intact.safetensors"))
    assert sorted(a) == sorted(b) and [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.processes
def test_an_export_removes_the_temporaries_a_killed_export_left(run, tmp_path):
    # kill -9 during an export left ".x.onnx.XXXX.tmp.onnx" beside the target for good
    out = tmp_path / "x.onnx"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has ended
    stale = tmp_path / f".x.onnx.tmp-{dead}-abcd1234.tmp.onnx"
    stale.write_bytes(b"torn")
    running = tmp_path / f".x.onnx.tmp-{os.getppid()}-abcd1234.tmp.onnx"  # a live writer's: kept
    running.write_bytes(b"being written")
    result = _cli("export", run, "--format", "onnx", "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, running.name])


def test_both_checkpoint_layouts_are_found(run, tmp_path):
    """Today's ``checkpoints/last/`` folder, and ``ckpt-STEP/`` named by a link or a pointer file."""
    assert run_checkpoint(run) == run / "checkpoints" / "last" / "model.safetensors"
    linked = tmp_path / "linked"
    shutil.copytree(run, linked, symlinks=True)
    ckpts = linked / "checkpoints"
    os.replace(ckpts / "last", ckpts / "ckpt-1")
    os.symlink("ckpt-1", ckpts / "last")
    assert run_checkpoint(linked).resolve() == (ckpts / "ckpt-1" / "model.safetensors").resolve()
    os.unlink(ckpts / "last")
    (ckpts / "last").write_text("ckpt-1\n")
    assert run_checkpoint(linked) == ckpts / "ckpt-1" / "model.safetensors"


def test_export_model_leaves_the_model_alone_and_checks_its_arguments(tmp_path):
    model = timm.create_model("resnet20_cifar", num_classes=3, in_chans=1)
    parameterize(model, "svdp-c", rank=2)
    spec = parameterization_spec(model)
    with pytest.raises(ValueError, match="unknown export format 'pt'; allowed: safetensors, onnx"):
        export_model(model, tmp_path / "a.pt", "pt")
    with pytest.raises(ValueError, match=r"ONNX export needs input_shape \(B, C, H, W\) with positive sizes, got None"):
        export_model(model, tmp_path / "a.onnx", "onnx")
    assert list(tmp_path.iterdir()) == []
    path = export_model(model, tmp_path / "a.safetensors", "safetensors", model_args={"num_classes": 3, "in_chans": 1})
    assert model.training and parameterization_spec(model) == spec  # still parameterized, still training
    plain = timm.create_model("resnet20_cifar", num_classes=3, in_chans=1)
    plain.load_state_dict(load_file(str(path)), strict=True)
    x = _digits_batch(2)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), model.eval()(x), rtol=0, atol=1e-5)


GENERATOR_OUTPUT = ("float32 images (B, C, H, W) in [-1, 1] from z ~ N(0, 1) (B, z_dim); uint8 pixels: "
                    "round((y + 1) * 127.5) clipped to [0, 255]")


def test_gan_generator_exports_alone_with_a_z_input(tmp_path):
    import onnxruntime

    from sttpfast.gan import GANPair

    g_args = {"widths": [16, 8], "bottom_width": 4, "z_dim": 8, "in_chans": 1}
    generator = timm.create_model("sngan_g32", **g_args)
    discriminator = timm.create_model("sngan_d32", widths=(8, 8, 8, 8), in_chans=1)
    parameterize(generator, "sttp-r", rank=2, exclude=["l1"])
    parameterize(discriminator, "sn")
    pair = GANPair(generator, discriminator)
    with torch.no_grad():  # BatchNorm statistics that are not the defaults
        generator.bn.running_mean.uniform_(-0.5, 0.5)
        generator.bn.running_var.uniform_(0.5, 2.0)
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = generator.eval()(z)
    assert want.shape == (3, 1, 8, 8)

    onnx_path = export_generator(pair, tmp_path / "g.onnx", "onnx")
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert props == {"z_dim": "8", "output": GENERATOR_OUTPUT}  # it said z_dim alone: how to read the images?
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [8]
    np.testing.assert_allclose(session.run(None, {"input": z.numpy()})[0], want.numpy(), rtol=0, atol=1e-4)

    st_path = export_generator(pair, tmp_path / "g.safetensors", "safetensors", model_args={"widths": [16, 8]})
    with safe_open(str(st_path), framework="pt") as f:
        meta = f.metadata()
    assert meta["architecture"] == "sngan_g32" and meta["z_dim"] == "8" and meta["output"] == GENERATOR_OUTPUT
    assert json.loads(meta["model_args"]) == {"z_dim": 8, "in_chans": 1, "bottom_width": 4, "widths": [16, 8]}
    tensors = load_file(str(st_path))
    assert not any(k.startswith("discriminator") or "parametrizations" in k for k in tensors)
    plain = timm.create_model("sngan_g32", **json.loads(meta["model_args"]))
    plain.load_state_dict(tensors, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(z), want, rtol=0, atol=1e-5)

    with pytest.raises(ValueError, match="ema=True, but the model keeps no generator_ema"):
        export_generator(pair, tmp_path / "e.onnx", "onnx", ema=True)
    with pytest.raises(ValueError, match="SNGANDiscriminator has no integer z_dim"):
        export_generator(discriminator, tmp_path / "d.onnx", "onnx")


def test_spectral_norm_is_densified_as_the_model_runs_in_eval(tmp_path):
    """torch's spectral_norm runs a power iteration when its weight is computed in training
    mode; the exported weight must be the one inference uses (no extra iteration)."""
    model = timm.create_model("resnet20_cifar", num_classes=3, in_chans=1)
    parameterize(model, "sn")
    assert model.training
    path = export_model(model, tmp_path / "sn.safetensors", "safetensors")
    plain = timm.create_model("resnet20_cifar", num_classes=3, in_chans=1)
    plain.load_state_dict(load_file(str(path)), strict=True)
    x = _digits_batch(4)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), model.eval()(x), rtol=0, atol=1e-5)


def test_onnx_without_its_packages_is_one_clear_error(run, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    result = _cli("export", run, "--format", "onnx", "--out", tmp_path / "x.onnx")
    assert result.exit_code == 2
    assert result.output == "Error: ONNX export needs the package(s) onnxscript: pip install 'sttpfast[onnx]'\n"
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_gan_run_writes_its_ema_generator(tmp_path):
    """`sttpfast export RUN` on a GAN run folder: the generator alone (its EMA copy, which the
    run kept), densified; safetensors loads into plain timm, ONNX runs in onnxruntime."""
    import onnxruntime

    from sttpfast.export import load_gan_run_pair

    trained = _cli("gan", "digits", "--g-param", "sttp-r", "--d-param", "svdp-c", "--rank", "4", "--ema", "0.5",
                   "--steps", "3", "--n-dis", "1", "--bs", "32", "--subset", "128", "--logger", "none",
                   "--out", tmp_path, "--name", "g", "--set", "log.progress=false",
                   "--set", "gan.g_kwargs={widths: [8, 8, 8], bottom_width: 2, z_dim: 16}",
                   "--set", "gan.d_kwargs={widths: [8, 8, 8, 8]}")
    assert trained.exit_code == 0, trained.output
    run = tmp_path / "g"
    pair, args = load_gan_run_pair(run)
    assert args == {"in_chans": 1, "widths": [8, 8, 8], "bottom_width": 2, "z_dim": 16}
    with pytest.raises(ValueError) as err:  # it said "config.yaml names no model.arch / data.name"
        load_run_model(run)
    assert str(err.value) == f"{run} is a GAN run: load it with sttpfast.export.load_gan_run_pair"
    ema = pair.generator_ema.eval()
    spec = parameterization_spec(ema)  # every conv of G's copy, sttp-r rank 4; never the first Linear
    assert len(spec) == 7 and "l1" not in spec and {s["rank"] for s in spec.values()} == {4}
    z = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ema(z)
        assert not torch.equal(want, pair.generator.eval()(z))  # the EMA is what is exported, not G

    damaged = tmp_path / "damaged"  # a torn model file: one Error line (it was a traceback)
    shutil.copytree(run, damaged, symlinks=True)
    model = (damaged / "checkpoints" / "last").resolve() / "model.safetensors"
    full = model.stat().st_size
    model.write_bytes(model.read_bytes()[:1000])
    refused = _cli("export", damaged, "--format", "onnx")
    assert refused.exit_code == 2 and refused.output == (
        f"Error: checkpoint {model.parent} is damaged ({model}: 1000 bytes, the manifest says {full}); "
        "no other checkpoint of the run is complete\n")

    result = _cli("export", run, "--format", "safetensors")
    out = run / "export/last.safetensors"
    assert result.exit_code == 0 and result.output == f"wrote {out}\n", result.output
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["architecture"] == "sngan_g32" and meta["z_dim"] == "16"
    tensors = load_file(str(out))
    assert not any(k.startswith(("discriminator", "generator")) or "parametrizations" in k for k in tensors)
    plain = timm.create_model(meta["architecture"], **json.loads(meta["model_args"]))
    plain.load_state_dict(tensors, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(z), want, rtol=0, atol=1e-5)

    onnx_out = tmp_path / "g.onnx"
    assert _cli("export", run, "--format", "onnx", "--out", onnx_out).exit_code == 0
    session = onnxruntime.InferenceSession(str(onnx_out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": z.numpy()})[0]
    assert got.shape == (5, 1, 8, 8)
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-4)


def test_exported_and_saved_files_take_the_umasks_mode_like_every_other_run_file(tmp_path):
    """mkstemp's temporaries are owner-only (0600): renamed into place they left export files
    and checkpoint weights unreadable to the group, unlike config.yaml and summary.json."""
    from safetensors.torch import save_file

    from sttpfast.atomic import write_file
    from sttpfast.checkpoint import save_parameterized

    umask = os.umask(0o022)
    try:
        model = timm.create_model("resnet20_cifar", num_classes=3, in_chans=1)
        paths = [export_model(model, tmp_path / "a.safetensors", "safetensors"),
                 save_parameterized(model, tmp_path / "m.safetensors"),
                 write_file(tmp_path / "o.safetensors", lambda p: save_file({"a": torch.zeros(1)}, str(p)))]
        assert [oct(p.stat().st_mode & 0o777) for p in paths] == [oct(0o644)] * 3
    finally:
        os.umask(umask)


def test_the_normalization_metadata_says_the_resize_the_loader_applied():
    """A run whose loader resized (digits' 16 px to the 32 px convnext_atto needs) exported
    the normalization alone: the ONNX input is 32x32, and nothing said how to get there."""
    from sttpfast.callbacks.checkpoint import _normalization as normalization_of
    from sttpfast.data import get_dls

    dls = get_dls("digits", bs=64, subset=256, device="cpu")
    dls.train.resize, dls.train.interpolation = 32, "bicubic"
    assert normalization_of(dls.train) == {
        "mean": list(dls.train.mean), "std": list(dls.train.std), "resize": {"size": 32, "interpolation": "bicubic"},
        "input": "float32 (x / 255 - mean) / std per channel, x the image's uint8 pixels resized to 32x32 "
                 "(bicubic, antialiased when shrinking) as floats first"}
