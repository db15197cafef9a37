"""The dense-layer policy of a compression target (issue 12): with ``compression=Z`` a layer
where the method has at least as many degrees of freedom as the dense weight at the rank
chosen for it stays dense, the rank search counts it at its dense size, and the report's
``Z`` is what the model's parameters add up to. An explicit rank parameterizes every layer.

The expected sets are computed here from the papers' DOF formulas, not from the code under test."""
import copy
import math
import warnings

import pytest
import timm
import torch
from click.testing import CliRunner
from torch import nn

import sttpfast
from sttpfast.cli import main
from sttpfast.linalg.tt import prime_factors
from sttpfast.surgery import rank_for_compression


def _stiefel_entries(n: int, r: int, reduced: bool) -> int:
    """Free entries of an ``n x r`` Householder frame: St_U ``r(n - r)``, full St ``nr - r(r+1)/2``."""
    return r * (n - r) if reduced else n * r - r * (r + 1) // 2


def sttp_r_dof(shape: tuple, rank: int) -> int:
    """STTP-R (DESIGN.md): modes = primes of C_out, primes of C_in, kh*kw; bonds
    ``R_k = min(prod left, prod right, rank)``; U-cores ``(R_{k-1} n_k) x R_k`` and V-cores
    ``(n_k R_k) x R_{k-1}`` on St_U except the two next to Sigma (full St); plus Sigma."""
    c_out, c_in, *kernel = shape
    modes = prime_factors(c_out) + prime_factors(c_in) + [math.prod(kernel)]
    n_out, k_all = len(prime_factors(c_out)), len(modes)
    bonds = [min(math.prod(modes[:k]), math.prod(modes[k:]), rank) for k in range(k_all + 1)]
    dof = bonds[n_out]  # the learned spectrum
    for k in range(1, k_all + 1):
        if k <= n_out:
            rows, cols = bonds[k - 1] * modes[k - 1], bonds[k]
        else:
            rows, cols = modes[k - 1] * bonds[k], bonds[k - 1]
        dof += _stiefel_entries(rows, cols, reduced=k not in (n_out, n_out + 1))
    return dof


def svdp_r_dof(shape: tuple, rank: int) -> int:
    """SVDP-R: ``r (d_out + d_in) - r^2`` with ``r = min(d_out, d_in, rank)``."""
    d_out, d_in = shape[0], math.prod(shape[1:])
    r = min(d_out, d_in, rank)
    return r * (d_out + d_in) - r * r


def cp_dof(shape: tuple, rank: int) -> int:
    """CP over the modes ``(C_out, C_in, spatial sizes > 1)``: ``R * sum(modes)``, ``R`` at most
    ``prod(modes) / max(modes)`` (every tensor of those modes has a CP of that rank)."""
    modes = [*shape[:2], *(k for k in shape[2:] if k > 1)]
    return min(rank, math.prod(modes) // max(modes)) * sum(modes)


DOF = {"sttp-r": sttp_r_dof, "svdp-r": svdp_r_dof}
#: compression=10: (the rank the search finds, how many layers gain nothing at it)
CASES = {("mobilenetv3_small_050", "sttp-r"): (12, 7), ("efficientnet_b0", "sttp-r"): (25, 10),
         ("efficientnet_b0", "svdp-r"): (6, 6)}


def _model(arch: str) -> nn.Module:
    return timm.create_model(arch, num_classes=10)


def _weighted_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _counted(model: nn.Module) -> int:
    """Trainable scalars of the parametrizations + every other state_dict entry (dense layers,
    biases, BN statistics; not num_batches_tracked)."""
    factors = sum(t.numel() for m in model.modules() if hasattr(m, "parametrizations")
                  for t in m.parametrizations.weight.parameters() if t.requires_grad)
    rest = sum(t.numel() for k, t in model.state_dict().items()
               if ".parametrizations." not in f".{k}" and not k.endswith("num_batches_tracked"))
    return factors + rest


@pytest.mark.parametrize("arch,param", list(CASES))
def test_compression_leaves_exactly_the_layers_without_gain_dense(arch, param):
    model = _model(arch)
    dense = _counted(model)
    layers = _weighted_layers(model)
    shapes = {n: tuple(m.weight.shape) for n, m in layers.items()}  # read before: after, .weight builds it
    report = sttpfast.parameterize(model, param, compression=10)
    rank, count = CASES[(arch, param)]
    assert report.rank == rank and abs(report.z - 10) <= 0.5
    expected = [n for n, shape in shapes.items() if DOF[param](shape, rank) >= math.prod(shape)]
    assert [row["layer"] for row in report.left_dense] == expected and len(expected) == count
    assert [r.name for r in report.rows] == [n for n in layers if n not in expected]
    for row in report.left_dense:  # left as they were: plain dense weights
        assert not hasattr(layers[row["layer"]], "parametrizations")
        assert row["params"] == DOF[param](tuple(row["shape"]), rank) and row["dense"] == math.prod(row["shape"])
    # Z counts the dense layers at their dense size: the model's own parameters, to the last digit
    assert (report.dense_total, report.compressed_total) == (dense, _counted(model))
    assert report.z == 100.0 * _counted(model) / dense


@pytest.mark.parametrize("arch,param", list(CASES))
def test_an_explicit_rank_parameterizes_every_layer(arch, param):
    rank = CASES[(arch, param)][0]
    model = _model(arch)
    report = sttpfast.parameterize(model, param, rank=rank)
    assert report.left_dense == [] and [r.name for r in report.rows] == list(_weighted_layers(model))
    off = _model(arch)  # the policy turned off: every layer, at the rank the search finds
    report_off = sttpfast.parameterize(off, param, compression=10, keep_dense_if_no_gain=False)
    assert report_off.left_dense == [] and len(report_off.rows) == len(_weighted_layers(off))
    assert report_off.rank == rank


def test_the_rank_search_counts_the_layers_left_dense():
    """CP on resnet20_cifar: at the rank found for Z 10%, CP has more parameters than the dense
    fc and the 1x1 shortcut; the search counts them dense, so Z is smaller than CP everywhere."""
    model = timm.create_model("resnet20_cifar")
    dense = _counted(model)
    rank, predicted = rank_for_compression(model, "cp", 10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = sttpfast.parameterize(model, "cp", compression=10.0, init="identity")
    layers = _weighted_layers(timm.create_model("resnet20_cifar"))
    cp = {n: cp_dof(tuple(m.weight.shape), rank) for n, m in layers.items()}
    expected = [n for n, m in layers.items() if cp[n] >= m.weight.numel()]
    assert rank == 15 and expected == ["blocks.3.shortcut.0", "fc"]
    assert [row["layer"] for row in report.left_dense] == expected
    assert report.rank == rank and report.z == predicted == 100.0 * _counted(model) / dense
    # the same rank with every layer in CP form: those layers count their CP size instead
    every = timm.create_model("resnet20_cifar")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        all_cp = sttpfast.parameterize(every, "cp", rank=rank, init="identity")
    extra = sum(cp[n] - layers[n].weight.numel() for n in expected)
    assert all_cp.compressed_total - report.compressed_total == extra > 0
    assert abs(report.z - 10.0) <= 0.5


def test_info_prints_the_layers_left_dense_and_the_flag_turns_the_policy_off():
    args = ["info", "--arch", "mobilenetv3_small_050", "--num-classes", "10", "--param", "sttp-r",
            "--compression", "10"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    head = lines.index("left dense: 7 layer(s) where sttp-r has at least as many parameters as the dense "
                       "weight at the rank chosen for them (no gain)")
    assert lines[head + 1].split() == ["blocks.0.0.conv_dw", "Conv2d", "16x1x3x3", "rank", "9:", "144", "params",
                                       ">=", "144", "dense"]
    assert [line.split()[0] for line in lines[head + 1:head + 8]] == [
        "blocks.0.0.conv_dw", "blocks.0.0.se.conv_reduce", "blocks.0.0.se.conv_expand", "blocks.0.0.conv_pw",
        "blocks.1.0.conv_pw", "blocks.1.0.conv_dw", "blocks.1.1.conv_dw"]
    assert lines[-1].startswith("layers 47  ")
    off = CliRunner().invoke(main, [*args, "--no-keep-dense-if-no-gain"])
    assert off.exit_code == 0, off.output
    assert "left dense" not in off.output and off.output.splitlines()[-1].startswith("layers 54  ")


def test_train_prints_the_layers_left_dense_before_training(tmp_path):
    result = CliRunner().invoke(main, ["train", "digits", "--arch", "resnet20_cifar", "--param", "cp",
                                       "--compression", "10", "--bs", "64", "--subset", "128", "--steps", "1",
                                       "--logger", "none", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("left dense: "))
    assert lines[head].startswith("left dense: 3 layer(s) where cp has at least as many parameters")
    # digits are 1-channel: the stem (16, 1, 3, 3) joins the two of 3-channel inputs
    rows = [line.split() for line in lines[head + 1:head + 4]]
    expected = {"stem.0": (16, 1, 3, 3), "blocks.3.shortcut.0": (32, 16, 1, 1), "fc": (10, 64)}
    assert [row[0] for row in rows] == list(expected)
    for row, shape in zip(rows, expected.values()):
        rank = int(row[4].rstrip(":"))
        assert row[2] == "x".join(map(str, shape)) and row[5:] == [
            f"{cp_dof(shape, rank):,}", "params", ">=", f"{math.prod(shape):,}", "dense"]
        assert cp_dof(shape, rank) >= math.prod(shape)
    assert lines[head + 4].startswith("run ") and "epoch" not in "".join(lines[:head])


def test_a_run_from_before_the_policy_resumes_with_every_layer_parameterized(tmp_path):
    """Its config.yaml has no param.keep_dense_if_no_gain: it parameterized every layer, and
    resuming must rebuild those layers (the checkpoint holds their factors)."""
    args = ["train", "digits", "--arch", "resnet20_cifar", "--param", "tucker", "--compression", "10", "--bs", "64",
            "--subset", "128", "--logger", "none", "--out", str(tmp_path)]
    first = CliRunner().invoke(main, [*args, "--no-keep-dense-if-no-gain", "--steps", "2"])
    assert first.exit_code == 0, first.output
    assert "left dense" not in first.output
    folder = tmp_path / "digits-resnet20_cifar-tucker-z10-s0"
    config = (folder / "config.yaml").read_text()
    assert "  keep_dense_if_no_gain: false\n" in config
    (folder / "config.yaml").write_text(config.replace("  keep_dense_if_no_gain: false\n", ""))
    resumed = CliRunner().invoke(main, ["train", "--resume", str(folder), "--steps", "4"])
    assert resumed.exit_code == 0, resumed.output
    assert "left dense" not in resumed.output and "layers 22 " in resumed.output and "| 4 steps in" in resumed.output



def _steep_and_flat() -> nn.Module:
    """Linear 64->64 with spectrum 0.5^i (steep) and Linear 64->4 with a flat spectrum (all 1)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 4, bias=False))
    for layer, s in zip(model, [0.5 ** torch.arange(64, dtype=torch.float64), torch.ones(4, dtype=torch.float64)]):
        d_out, d_in = layer.weight.shape
        u = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64)).Q[:, :len(s)]
        v = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64)).Q[:, :len(s)]
        layer.weight.data = ((u * s) @ v.T).float()
    return model


def test_the_energy_plan_leaves_dense_a_layer_without_gain_at_its_own_rank():
    """plan='energy' at Z 15%: the steep layer keeps 3 directions (energy 1 - 4^-3), the flat
    4x64 one needs all 4, where lowrank's r (d_out + d_in) = 272 >= 256: it stays dense and
    counts 256, so Z = (3 * 128 + 256) / (4096 + 256); without the policy 272 would count."""
    model = _steep_and_flat()
    report = sttpfast.parameterize(model, "lowrank", compression=15, plan="energy")
    assert [(r["layer"], r["rank"], r["energy"], r["params"]) for r in report.plan] == [("0", 3, 0.984375, 384)]
    assert report.left_dense == [{"layer": "1", "type": "Linear", "shape": [4, 64], "rank": 4, "params": 272,
                                  "dense": 256}]
    assert not hasattr(model[1], "parametrizations")
    assert report.z == 100.0 * (3 * 128 + 256) / 4352 == 100.0 * _counted(model) / 4352
    every = sttpfast.parameterize(_steep_and_flat(), "lowrank", compression=15, plan="energy",
                                  keep_dense_if_no_gain=False)
    assert every.left_dense == [] and every.z == 100.0 * (3 * 128 + 272) / 4352


def test_a_target_where_no_layer_gains_says_every_layer_stays_dense():
    """Linear(1, 64) and Linear(64, 1) are rank 1 already: SVDP at any rank holds as many
    parameters as each weight, so nothing is parameterized, and the run must say so."""
    model = torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    with pytest.warns(UserWarning, match=r"svdp-r gains nothing on any selected layer at the rank chosen for Z 50%: "
                                         r"every one stays dense \(keep_dense_if_no_gain=False, --no-keep-dense-if-no-gain on the "
                                         r"command line, parameterizes them anyway\)$"):
        report = sttpfast.parameterize(model, "svdp-r", compression=50)
    assert report.z == 100.0 and [row["layer"] for row in report.left_dense] == ["0", "2"]
    # each row says the rank its layer would have had, not the shared rank above what it can use
    # (a 16x1x3x3 stem's row said rank 64)
    model = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1)
    with pytest.warns(UserWarning, match="gains nothing on any selected layer"):
        report = sttpfast.parameterize(model, "svdp-r", compression=100)
    assert report.rank == 64 and {row["layer"]: row["rank"] for row in report.left_dense}["stem.0"] == 9
    assert {row["rank"] for row in report.left_dense} == {9, 10, 16, 32, 64}  # 10: the 10 x 64 head


def test_the_left_dense_line_names_the_method_with_the_attention_forms_beside_it():
    """With --attention qk-ov the report's method is "attn-qk-ov+attn-qk-ov-proj+svdp-r": the
    left-dense line said that combination had no gain in the stem and the head, svdp-r layers."""
    from sttpfast.models import create_model
    from sttpfast.surgery import parameterize_for_run

    model = create_model("vit_tiny_p4_32", num_classes=10, in_chans=1, img_size=16)
    report = parameterize_for_run(model, "svdp-r", compression=20, attention="qk-ov", attention_rank=4)
    lines = report.left_dense_table().splitlines()
    assert lines[0] == ("left dense: 2 layer(s) where svdp-r has at least as many parameters as the dense weight "
                        "at the rank chosen for them (no gain)")
    assert [line.split()[0] for line in lines[1:]] == ["patch_embed.proj", "head"]
