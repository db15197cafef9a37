"""Factored attention forms (issue 11, item 4b): ``qk-ov`` on timm's ``Attention`` (ViT) and
Swin's ``WindowAttention``. Full rank reproduces timm's block (float64), DOF equals the
trainable scalars, gradcheck, spectral init = truncated SVD of each head's products,
Frobenius decay gradient = autograd of the penalty, checkpoints, densify, refusals."""
import pytest
import timm
import torch
from click.testing import CliRunner
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention
from torch import nn
from torch.nn.utils import parametrize

from sttpfast.checkpoint import load_parameterized, save_parameterized
from sttpfast.cli import main
from sttpfast.config import choices
from sttpfast.params import methods
from sttpfast.params.attention import (ATTENTION_FORMS, attention_form_decay, attention_form_pairs,
                                       attention_form_penalty, parameterize_attention)
from sttpfast.params.registry import method
from sttpfast.surgery import compression_report, densify, parameterize


def perturbed(module: nn.Module) -> nn.Module:
    """float64, eval, every parameter moved off its init (biases included)."""
    module = module.double().eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("qkv_bias, proj_bias", [(True, True), (True, False), (False, True)])
def test_full_rank_equals_timm_attention_float64(qkv_bias, proj_bias):
    block = perturbed(Attention(12, num_heads=3, qkv_bias=qkv_bias, proj_bias=proj_bias))
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    expected = block(x)
    assert parameterize_attention(block) == ["qkv", "proj"]
    assert torch.allclose(block(x), expected, rtol=0, atol=1e-12)
    assert block.qkv.parametrizations.weight[0].rank == 4  # head width 12 / 3


def test_full_rank_equals_swin_window_attention_float64():
    block = perturbed(WindowAttention(8, num_heads=2, head_dim=None, window_size=2, qkv_bias=True))
    x = torch.randn(3, 4, 8, dtype=torch.float64)  # 3 windows of 2x2 tokens
    expected = block(x)
    parameterize_attention(block)
    assert torch.allclose(block(x), expected, rtol=0, atol=1e-12)


def test_spectral_init_is_the_truncated_svd_of_each_heads_products():
    block = perturbed(Attention(12, num_heads=3, qkv_bias=False))
    wq, wk, wv = (w.reshape(3, 4, 12) for w in block.qkv.weight.detach().chunk(3, 0))
    wo = block.proj.weight.detach().reshape(12, 3, 4).transpose(0, 1)
    parameterize_attention(block, rank=2)
    (left, right), (out_left, value) = attention_form_pairs(block)
    for form, got in ((wq.transpose(1, 2) @ wk, left @ right.mT), (wo @ wv, out_left @ value.mT)):
        u, s, vh = torch.linalg.svd(form)
        assert torch.allclose(got, u[..., :2] @ torch.diag_embed(s[..., :2]) @ vh[..., :2, :], atol=1e-12)
    # the weights hold the forms in a head of width 2: the other rows / columns are zero
    assert torch.equal(block.qkv.weight.reshape(3, 3, 4, 12)[:, :, 2:], torch.zeros(3, 3, 2, 12, dtype=torch.float64))
    assert torch.equal(block.proj.weight.reshape(12, 3, 4)[..., 2:], torch.zeros(12, 3, 2, dtype=torch.float64))


def test_dof_equals_trainable_scalars_and_z_is_exact():
    model = timm.create_model("vit_tiny_p4_32", depth=2, embed_dim=48, num_heads=3)  # head width 16
    dense_total = sum(t.numel() for k, t in model.state_dict().items())
    parameterize_attention(model, rank=5)
    report = compression_report(model)
    rows = {row.name: row for row in report.rows}
    for i in range(2):
        qkv, proj = model.blocks[i].attn.qkv, model.blocks[i].attn.proj
        assert rows[f"blocks.{i}.attn.qkv"].dof == sum(t.numel() for t in qkv.parametrizations.weight.parameters()) \
            == 3 * 3 * 5 * 48
        assert rows[f"blocks.{i}.attn.proj"].dof == sum(t.numel() for t in proj.parametrizations.weight.parameters()) \
            == 3 * 5 * 48
    assert report.dense_total == dense_total
    saved = 2 * (4 * 48 * 48 - 4 * 3 * 5 * 48)  # per block: 4 d^2 dense -> 4 H r d factored
    assert report.compressed_total == dense_total - saved
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.compressed_total == trainable  # no buffers in a ViT: Z counts exactly what trains


def test_gradcheck_through_the_block():
    block = perturbed(Attention(6, num_heads=2, qkv_bias=True))
    parameterize_attention(block, rank=2)
    x = torch.randn(1, 3, 6, dtype=torch.float64)
    tensors = [block.qkv.parametrizations.weight.original0, block.qkv.parametrizations.weight.original1,
               block.qkv.parametrizations.weight.original2, block.proj.parametrizations.weight.original0]
    inputs = [t.detach().clone().requires_grad_(True) for t in tensors]

    def through(*factors):  # functional form: the factors as inputs
        plist_qkv, plist_proj = block.qkv.parametrizations.weight, block.proj.parametrizations.weight
        w_qkv, w_proj = plist_qkv[0](*factors[:3]), plist_proj[0](factors[3])
        b, n, _ = x.shape
        qkv = torch.nn.functional.linear(x, w_qkv, block.qkv.bias).reshape(b, n, 3, 2, 3).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] * block.scale @ qkv[1].mT).softmax(-1)
        return torch.nn.functional.linear((attn @ qkv[2]).transpose(1, 2).reshape(b, n, 6), w_proj, block.proj.bias)

    with torch.no_grad():
        assert torch.allclose(through(*inputs), block(x), atol=1e-12)  # the functional form is the block
    assert torch.autograd.gradcheck(through, inputs)


def test_frobenius_decay_gradient_is_autograd_of_the_penalty():
    block = perturbed(Attention(8, num_heads=2))
    parameterize_attention(block, rank=3)
    factors = [t for pair in attention_form_pairs(block) for t in pair]
    attention_form_penalty(block, wd=0.3).backward()
    expected = [t.grad.clone() for t in factors]
    for t in factors:
        t.grad = None
    attention_form_decay(block, wd=0.3)
    for t, g in zip(factors, expected):
        assert torch.allclose(t.grad, g, atol=1e-12)


def test_checkpoint_round_trip_and_densify(tmp_path):
    torch.manual_seed(3)
    model = timm.create_model("vit_tiny_p4_32", depth=1, embed_dim=24, num_heads=2).eval()
    parameterize_attention(model, rank=4)
    parameterize(model, "lowrank", rank=3, exclude=["blocks.0.attn.*"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    save_parameterized(model, tmp_path / "m.safetensors")
    again = load_parameterized(tmp_path / "m.safetensors",
                               timm.create_model("vit_tiny_p4_32", depth=1, embed_dim=24, num_heads=2).eval())
    with torch.no_grad():
        assert torch.equal(again(x), expected)
        assert torch.allclose(densify(model)(x), expected, atol=1e-5)
    assert method("attn-qk-ov").rank_to_spec((2, 4)) == [2, 4]


def test_registered_by_name_but_not_a_layer_param():
    assert "attn-qk-ov" not in methods() and "attn-qk-ov" in methods(scope=None)
    assert methods(scope="attention").keys() == {"attn-qk-ov", "attn-qk-ov-proj"}
    assert choices("param.attention") == tuple(ATTENTION_FORMS) == ("qk-ov", "q-k-v")
    with pytest.raises(ValueError, match=r"^unknown parameterization 'attn-qk-ov'; allowed: "):
        parameterize(nn.Sequential(nn.Linear(3, 3)), "attn-qk-ov")


def test_refusals_leave_the_model_unchanged():
    with pytest.raises(ValueError, match=r"^Sequential has no attention blocks \(a fused qkv Linear, num_heads "
                                         r"and a proj Linear, as timm's ViT / Swin attention\); --attention "
                                         r"applies to transformers$"):
        parameterize_attention(nn.Sequential(nn.Linear(4, 4)))
    normed = nn.Sequential(Attention(8, num_heads=2), Attention(8, num_heads=2, qk_norm=True, norm_layer=nn.LayerNorm))
    with pytest.raises(ValueError, match=r"^attention block '1' normalizes between the projections \(q_norm\): "
                                         r"its forms are not products$"):
        parameterize_attention(normed)
    assert not parametrize.is_parametrized(normed[0].qkv)  # all blocks checked before any change
    with pytest.raises(ValueError, match=r"^unknown attention form 'qk'; allowed: qk-ov, q-k-v$"):
        parameterize_attention(normed, "qk")
    with pytest.raises(ValueError, match=r"^rank per head must be a positive integer, got 0$"):
        parameterize_attention(normed, rank=0)


def test_cli_says_the_rank_per_head_with_a_dense_rest(tmp_path):
    result = CliRunner().invoke(main, ["train", "digits", "--arch", "vit_tiny_p4_32", "--attention", "qk-ov",
                                       "--rank", "4", "--steps", "1", "--subset", "16", "--bs", "16", "--logger",
                                       "none", "--out", str(tmp_path), "--set", "model.kwargs={depth: 1}",
                                       "--set", "log.progress=false"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[:2] == ["no rank (dense keeps every weight at full size)",
                         "attention qk-ov: rank 4 per head (at most the head width)"]
    # only the forms are factored: qkv 3*3*4*192 and proj 3*4*192 of the dense 4*192^2
    assert [line for line in lines if line.startswith("run ")][0].split(": ", 1)[1].startswith("layers 2 ")


def test_cli_attention_on_a_model_without_attention_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["train", "digits", "--arch", "resnet20_cifar", "--attention", "qk-ov",
                                       "--steps", "1", "--subset", "16", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert [line for line in result.output.splitlines() if line.startswith("Error:")] == [
        "Error: CifarResNet has no attention blocks (a fused qkv Linear, num_heads and a proj Linear, as timm's "
        "ViT / Swin attention); --attention applies to transformers"]
    assert not any(tmp_path.iterdir())


def _train_tiny_vit(out, attention: str, param: str) -> str:
    """`sttpfast train digits` of a one-block vit_tiny_p4_32 at rank 4 for 2 steps: the `run ...`
    line it prints (layers, Z)."""
    result = CliRunner().invoke(main, ["train", "digits", "--arch", "vit_tiny_p4_32", "--attention", attention,
                                       "--param", param, "--rank", "4", "--steps", "2", "--subset", "32",
                                       "--bs", "16", "--logger", "none", "--out", str(out),
                                       "--set", "model.kwargs={depth: 1}", "--set", "log.progress=false"])
    assert result.exit_code == 0, result.output
    return [line for line in result.output.splitlines() if line.startswith("run ")][0]


def test_cli_trains_a_vit_with_qk_ov_forms_and_lowrank_linears(tmp_path):
    report = _train_tiny_vit(tmp_path, "qk-ov", "lowrank")
    # the forms on qkv and proj (3 heads at rank 4); lowrank r4 on patch_embed.proj, fc1, fc2, head
    assert " layers 6 " in report


# -- q-k-v: the fused qkv Linear as three layers, each parameterized on its own -----------------
def tiny_vit(seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_p4_32", depth=1, embed_dim=24, num_heads=2).double().eval()


def test_split_qkv_is_the_fused_layer_with_timms_state_dict():
    model, ref = tiny_vit(), tiny_vit()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert parameterize_attention(model, "q-k-v") == []
    assert type(model.blocks[0].attn.qkv).__name__ == "SplitQKV"
    assert torch.equal(model(x), ref(x))
    state, timm_state = model.state_dict(), ref.state_dict()
    assert list(state) == list(timm_state) and all(torch.equal(state[k], timm_state[k]) for k in state)
    model.load_state_dict(tiny_vit(seed=5).state_dict())  # timm's fused checkpoint loads into the parts
    assert torch.equal(model.blocks[0].attn.qkv.k.weight, tiny_vit(seed=5).blocks[0].attn.qkv.weight[24:48])


def test_q_k_v_each_own_rank_spectrum_bound_and_exact_z(tmp_path):
    model = tiny_vit()
    fused = model.blocks[0].attn.qkv.weight.detach().clone()
    parameterize_attention(model, "q-k-v")
    parameterize(model, "svdp-l", rank=6, include=["*.qkv.v"], init="spectral")
    report = parameterize(model, "svdp-l", rank=2, include=["*.qkv.q", "*.qkv.k"], init="spectral")
    rows = {row.name: row for row in report.rows}
    svdp = methods()["svdp-l"]
    assert [rows[f"blocks.0.attn.qkv.{n}"].rank for n in "qkv"] == [2, 2, 6]
    assert [rows[f"blocks.0.attn.qkv.{n}"].dof for n in "qkv"] == [2 * 48 - 4, 2 * 48 - 4, 6 * 48 - 36] \
        == [svdp.count_dof((24, 24), False, r) for r in (2, 2, 6)]
    parts = [getattr(model.blocks[0].attn.qkv, n) for n in "qkv"]
    spectra = [parametrize_of(p).singular_values(*factors(p)) for p in parts]
    assert [len(s) for s in spectra] == [2, 2, 6] and not torch.equal(spectra[0], spectra[1])
    # spectral init: each part's bound is its own initial sigma_max (the fused weight's thirds)
    own = [float(torch.linalg.matrix_norm(w, 2)) for w in fused.chunk(3, 0)]
    assert [svdp.spectral_bound(parametrize_of(p)) for p in parts] == pytest.approx(own, rel=1e-12)
    assert len(set(own)) == 3
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        plain = tiny_vit()
        plain.load_state_dict(densify(model).state_dict())  # densified: timm's own layout again
        assert torch.allclose(plain(x), expected, atol=1e-12)
    save_parameterized(model, tmp_path / "m.safetensors")
    fresh = tiny_vit(seed=9)
    split_qkv_first = parameterize_attention(fresh, "q-k-v")
    again = load_parameterized(tmp_path / "m.safetensors", fresh)
    with torch.no_grad():
        assert split_qkv_first == [] and torch.equal(again(x), expected)


def parametrize_of(layer):
    return layer.parametrizations.weight[0]


def factors(layer):
    plist = layer.parametrizations.weight
    return tuple(getattr(plist, f"original{i}") for i in range(plist.ntensors))


def test_cli_trains_with_q_k_v_split(tmp_path):
    report = _train_tiny_vit(tmp_path, "q-k-v", "sttp-r")
    assert " layers 8 " in report  # patch_embed, q, k, v, proj, fc1, fc2, head


@pytest.mark.parametrize("form", ["qk-ov", "q-k-v"])
def test_the_new_modules_take_the_models_eval_mode(form):
    # new modules start in train mode: after the forms were put into a model in eval(), its
    # parametrizations (and the split q, k, v Linears) were in train mode
    model = timm.create_model("vit_tiny_p4_32", depth=1, embed_dim=24, num_heads=2).eval()
    parameterize_attention(model, form, rank=4)
    assert [name for name, m in model.named_modules() if m.training] == []


@pytest.mark.parametrize("sizing", [["--compression", "20"], ["--rank-scale", "0.3"]])
def test_cli_qk_ov_with_a_compression_target_is_one_error_line(tmp_path, sizing):
    # the forms stayed at full head width (no gain) and the search squeezed every other layer to
    # rank 1, still missing the target (Z 33.85% for 20%), exit 0
    result = CliRunner().invoke(main, ["train", "digits", "--arch", "vit_tiny_p4_32", "--attention", "qk-ov",
                                       "--param", "svdp-l", *sizing, "--steps", "1", "--subset", "16",
                                       "--out", str(tmp_path), "--set", "model.kwargs={depth: 1}"])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [
        f"Error: param.attention = 'qk-ov' takes its rank per head from param.rank (--rank); "
        f"param.{sizing[0][2:].replace('-', '_')} does not size the attention forms: give --rank R or "
        "--attention-rank R, or --attention q-k-v (q, k and v are then layers the compression sizes like any other)"]
    assert not any(tmp_path.iterdir())


def test_cli_attention_of_a_kind_sttpfast_does_not_factor_says_so(tmp_path):
    # CoAtNet's Attention2d: "MaxxVit has no attention blocks", which is false
    result = CliRunner().invoke(main, ["train", "digits", "--arch", "coatnet_nano_rw_224", "--attention", "qk-ov",
                                       "--rank", "4", "--steps", "1", "--subset", "16", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert [line for line in result.output.splitlines() if line.startswith("Error:")] == [
        "Error: MaxxVit's attention (Attention2d) is not a kind sttpfast factors: --attention takes timm's ViT / "
        "Swin attention (a fused qkv Linear, num_heads and a proj Linear)"]
    assert not any(tmp_path.iterdir())


def _small(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return perturbed(timm.create_model(arch, num_classes=5, img_size=28, depth=2))


def test_qk_ov_refuses_rotary_position_embeddings_and_changes_nothing():
    """EVA-02 / RoPE ViTs rotate q and k by position before the product, so the query-key
    form is not W_Q^T W_K there: qk-ov changed the model (relative output error 0.69 on
    trained-scale weights) without a word. Refused; q-k-v (three Linears) keeps the function."""
    for arch in ("eva02_tiny_patch14_224", "vit_small_patch16_rope_224"):
        model = _small(arch)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=r"^attention block 'blocks.0.attn' rotates q and k by position "
                                             r"\(rotary embeddings\): its query-key form is not a product$"):
            parameterize_attention(model, "qk-ov")
        assert not any(parametrize.is_parametrized(m) for m in model.modules())
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["eva02_tiny_patch14_224", "beit_base_patch16_224"])
def test_q_k_v_runs_blocks_that_read_the_fused_weight_and_keeps_the_function(arch):
    """EVA and BEiT call F.linear(x, self.qkv.weight, q/k/v biases) on the fused layer: after
    split_qkv that raised AttributeError ('SplitQKV' object has no attribute 'weight')."""
    model = _small(arch)
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    expected = model(x)
    parameterize_attention(model, "q-k-v")
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    parameterize(model, "svdp-r", rank=4, include=["*.qkv.q", "*.qkv.k", "*.qkv.v"])
    assert model(x).shape == (2, 5)


def test_qk_ov_moves_separate_q_and_v_biases_as_it_moves_a_fused_bias():
    """BEiT keeps its query and value biases as q_bias / v_bias beside a bias-free qkv: qk-ov
    left them where the factored forms do not keep the function (wrong at full rank)."""
    model = _small("beit_base_patch16_224")
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    expected = model(x)
    parameterize_attention(model, "qk-ov")
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


def test_attention_rank_sizes_the_forms_while_a_tuple_rank_or_a_target_sizes_the_other_layers():
    """qk-ov took its rank per head from --rank only, so a tuple rank (tucker's 8,6) ended in
    'rank per head must be a positive integer, got [8, 6]' and a target could not size the rest."""
    runner = CliRunner()
    base = ["info", "--arch", "vit_tiny_patch16_224", "--num-classes", "10", "--in-chans", "1", "--img-size", "16"]
    tuple_rank = runner.invoke(main, base + ["--attention", "qk-ov", "--param", "tucker", "--rank", "8,6"])
    assert tuple_rank.exit_code == 2
    assert tuple_rank.output.strip() == ("Error: param.attention = 'qk-ov' takes its rank per head from param.rank "
                                         "(--rank), an integer, got [8, 6]: give the rank per head with "
                                         "--attention-rank R")
    alone = runner.invoke(main, base + ["--attention-rank", "8", "--param", "svdp-r", "--rank", "4"])
    assert alone.exit_code == 2
    assert alone.output.strip() == ("Error: param.attention_rank (--attention-rank) is the rank per head of "
                                    "--attention qk-ov; give --attention qk-ov, or leave it out")
    target = runner.invoke(main, base + ["--attention", "qk-ov", "--attention-rank", "8", "--param", "svdp-r",
                                         "--compression", "10"])
    assert target.exit_code == 0, target.output
    z = float(target.output.splitlines()[-1].split("Z = ")[1].split("%")[0])
    assert abs(z - 10) <= 0.5
    lines = target.output.splitlines()
    rank = int(lines[1].split()[1])
    assert lines[1] == f"rank {rank} gives Z = {z:.2f}%"  # the other layers' shared rank (it said 'rank None')
    qkv = next(line.split() for line in lines if line.startswith("blocks.0.attn.qkv "))
    assert qkv[3:5] == ["attn-qk-ov", "8"]


def test_a_run_with_an_attention_rank_says_it_and_its_folder_is_read_back_with_it(tmp_path):
    """`--attention-rank 2 --rank 4`: the run trained rank 2 per head but said 'rank 4 per head',
    and `info RUN` / `sttpfast export` rebuilt the forms at rank 4, so the checkpoint did not
    load ('model has attn-qk-ov-proj rank [3, 4] ..., checkpoint has ... [3, 2]', exit 2)."""
    from sttpfast.export import export_run

    runner = CliRunner()
    trained = runner.invoke(main, ["train", "digits", "--arch", "vit_tiny_patch16_224", "--attention", "qk-ov",
                                   "--attention-rank", "2", "--param", "svdp-r", "--rank", "4", "--steps", "1",
                                   "--bs", "32", "--subset", "64", "--logger", "none", "--out", str(tmp_path),
                                   "--name", "v", "--set", "log.progress=false"])
    assert trained.exit_code == 0, trained.output
    assert "attention qk-ov: rank 2 per head (at most the head width)" in trained.output.splitlines()
    info = runner.invoke(main, ["info", str(tmp_path / "v")])
    assert info.exit_code == 0, info.output
    qkv = next(line.split() for line in info.output.splitlines() if line.startswith("blocks.0.attn.qkv "))
    assert qkv[3:5] == ["attn-qk-ov", "2"]
    assert export_run(tmp_path / "v", "safetensors").is_file()


def test_qk_ov_refuses_a_block_that_holds_its_own_rotary_embedding():
    """timm's SAM attention keeps its rope as self.rope (forward(x) takes none): it was factored
    and its output changed by 3% at full rank."""
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    model = VisionTransformerSAM(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, use_rope=True,
                                 use_rel_pos=False, window_size=2, global_attn_indexes=(1,))
    with pytest.raises(ValueError, match=r"^attention block 'blocks.0.attn' rotates q and k by position"):
        parameterize_attention(model, "qk-ov")
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_qk_ov_with_an_attention_rank_keeps_the_energy_plan_of_the_other_layers():
    from sttpfast.surgery import parameterize_for_run

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, depth=2)
    report = parameterize_for_run(model, "sttp-r", compression=20, plan="energy", attention="qk-ov",
                                  attention_rank=4)
    assert report.plan and all(".attn." not in row["layer"] for row in report.plan)


def test_parameterizing_around_the_attention_forms_in_python_names_the_way():
    # "already parameterized (attn-qk-ov); densify the model first" undid the forms; the
    # command line leaves the layers parameterize_attention returns out, as Python can
    from sttpfast.params.attention import parameterize_attention

    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, num_classes=10)
    formed = parameterize_attention(model, "qk-ov", rank=4)
    with pytest.raises(ValueError) as err:
        parameterize(model, "sttp-r", rank=4)
    assert str(err.value) == ("layer 'blocks.0.attn.qkv' holds the attention forms (attn-qk-ov): leave the layers "
                              "parameterize_attention returned out of this call (exclude=their names), as --attention "
                              "does on the command line")
    report = parameterize(model, "sttp-r", rank=4, exclude=formed)
    assert "blocks.0.mlp.fc1" in {row.name for row in report.rows}


# ---------------------------------------------------------------------------------------
# a checkpoint rebuilds its attention form on its own (load_parameterized(path), no model)
def small_vit():
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, depth=2).eval()


def _in_form(form: str, sizing: str) -> nn.Module:
    """A ``small_vit`` in ``form``, its layers parameterized by svdp-r as ``sizing`` says."""
    torch.manual_seed(0)
    model = small_vit()
    formed = parameterize_attention(model, form, rank=4 if form == "qk-ov" else None)
    if sizing == "v at rank 4":  # the user's report: only a split layer parameterized
        parameterize(model, "svdp-r", rank=4, include="*.qkv.v", init="spectral")
    elif sizing == "the split layers":
        parameterize(model, "svdp-r", rank=4, include=["*.qkv.q", "*.qkv.k", "*.qkv.v"], init="spectral")
    elif sizing == "compression 20":  # all layers, q, k and v included
        parameterize(model, "svdp-r", compression=20, exclude=formed or None, init="spectral")
    return model


@pytest.mark.parametrize("form, sizing", [("q-k-v", "v at rank 4"), ("q-k-v", "the split layers"),
                                          ("q-k-v", "compression 20"), ("q-k-v", "dense"),
                                          ("qk-ov", "compression 20")])
def test_load_parameterized_alone_rebuilds_the_attention_form(tmp_path, form, sizing):
    from sttpfast.checkpoint import read_metadata
    from sttpfast.surgery import parameterization_spec

    model = _in_form(form, sizing)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    save_parameterized(model, tmp_path / "m.safetensors")
    assert read_metadata(tmp_path / "m.safetensors")["sttpfast_attention"] == form
    again = load_parameterized(tmp_path / "m.safetensors").eval()
    assert parameterization_spec(again) == parameterization_spec(model)
    assert [type(m).__name__ for m in again.modules()] == [type(m).__name__ for m in model.modules()]
    with torch.no_grad():
        assert torch.equal(again(x), expected)  # float32, bit-exact


def test_a_model_without_an_attention_form_records_none(tmp_path):
    from sttpfast.checkpoint import read_metadata

    model = small_vit()
    parameterize(model, "svdp-r", rank=4)
    save_parameterized(model, tmp_path / "m.safetensors")
    assert "sttpfast_attention" not in read_metadata(tmp_path / "m.safetensors")


def _without_the_attention_record(path):
    """Rewrite ``path`` as sttpfast wrote it before it recorded the attention form."""
    from safetensors.torch import load_file, save_file

    from sttpfast.checkpoint import read_metadata

    meta = read_metadata(path)
    del meta["sttpfast_attention"]
    save_file(load_file(str(path)), str(path), metadata=meta)


@pytest.fixture
def saved_q_k_v(tmp_path):
    """A small ViT split q-k-v with v at rank 4, saved to ``tmp_path / "m.safetensors"``:
    (the file's path, an input x of shape (2, 3, 32, 32), the model's output on x)."""
    model = _in_form("q-k-v", "v at rank 4")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    save_parameterized(model, tmp_path / "m.safetensors")
    return tmp_path / "m.safetensors", x, expected


def test_a_file_from_before_the_attention_record_loads_alone_and_into_a_split_model(saved_q_k_v):
    path, x, expected = saved_q_k_v
    _without_the_attention_record(path)
    # its tensor names show the split (qkv.q / qkv.k / qkv.v): it said "layer 'blocks.0.attn.qkv.v'
    # does not exist in the model"
    with torch.no_grad():
        assert torch.equal(load_parameterized(path)(x), expected)
    split = small_vit()
    parameterize_attention(split, "q-k-v")
    with torch.no_grad():
        assert torch.equal(load_parameterized(path, split)(x), expected)


def test_a_dense_fused_model_passed_in_is_split_as_the_checkpoint_says(saved_q_k_v):
    path, x, expected = saved_q_k_v
    fused = small_vit()
    again = load_parameterized(path, fused)
    with torch.no_grad():
        assert again is fused and torch.equal(again(x), expected)
    assert type(fused.blocks[1].attn.qkv).__name__ == "SplitQKV"


def test_a_fused_model_the_checkpoint_does_not_fit_is_left_fused(tmp_path):
    save_parameterized(_in_form("q-k-v", "v at rank 4"), tmp_path / "m.safetensors")
    wider = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, depth=2, embed_dim=96,
                              num_heads=3).eval()
    qkv = [block.attn.qkv for block in wider.blocks]
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_parameterized(tmp_path / "m.safetensors", wider)
    assert str(err.value) == ("checkpoint does not match the model: layer 'blocks.0.attn.qkv.v' has weight shape "
                              "[96, 96], the checkpoint has [192, 192]; layer 'blocks.1.attn.qkv.v' has weight shape "
                              "[96, 96], the checkpoint has [192, 192]")
    assert [block.attn.qkv for block in wider.blocks] == qkv
    assert all(torch.equal(v, before[k]) for k, v in wider.state_dict().items())


def test_an_attention_form_this_sttpfast_does_not_know_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_parameterized(small_vit(), path, metadata={"sttpfast_attention": "q-kv"})  # a later sttpfast's form
    with pytest.raises(ValueError) as err:
        load_parameterized(path)
    assert str(err.value) == (f"{path}: the checkpoint's attention form 'q-kv' is not one this sttpfast knows "
                              "(qk-ov, q-k-v)")
