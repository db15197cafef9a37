"""The factorized forward of the spectral-chain layers (SVDP / STTP, issue 12): a layer runs
``x -> conv V^T -> 1x1 conv U diag(g s)`` instead of building ``W`` where that costs fewer
multiply-adds, and gives the materialized path's output and gradients (float64, 1e-10
relative), per layer, through the frame bank and on a whole model."""
import copy

import pytest
import timm
import torch
from torch import nn
from torch.nn.utils import parametrize

import sttpfast
from sttpfast.params import frame_bank as fb
from sttpfast.params.chain import build_flops
from sttpfast.params.factorized import ChoosingForward, uses_factorized_path
from sttpfast.params.frame_bank import frame_bank_of
from sttpfast.params.layers import factors_of, parameterized_layers, parametrization_of

RTOL = 1e-10
PARAMS = ["svdp-l", "svdp-r", "svdp-c", "sttp-l", "sttp-r", "sttp-c"]
LAYERS = {  # name -> (layer, input shape)
    "conv-stride2-bias": (lambda: nn.Conv2d(6, 12, 3, stride=2, padding=1), (2, 6, 9, 9)),
    "conv-dilated-nobias": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, bias=False), (2, 4, 7, 7)),
    "conv-same-rect": (lambda: nn.Conv2d(6, 4, (3, 1), padding="same"), (1, 6, 5, 6)),
    "conv-1x1": (lambda: nn.Conv2d(12, 10, 1), (2, 12, 4, 4)),
    "conv1d": (lambda: nn.Conv1d(6, 8, 5, stride=2, padding=1), (2, 6, 11)),
    "linear-bias": (lambda: nn.Linear(12, 10), (3, 5, 12)),
    "linear-nobias": (lambda: nn.Linear(10, 6, bias=False), (4, 10)),
}


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def perturbed(model):
    """Leave the identity: every frame entry differs from ``-E``, the spectrum from 1."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer, _ in parameterized_layers(model):
            for t in factors_of(layer):
                t.add_(0.3 * torch.randn(t.shape, generator=gen, dtype=t.dtype))
    return model


def outputs_and_grads(layer, x, mode):
    """Output and the gradients of a fixed probe loss wrt the input and every parameter."""
    parametrization_of(layer).forward_mode = mode
    x = x.detach().requires_grad_(True)
    out = layer(x)
    probe = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    params = [x] + [t for t in layer.parameters()]
    return out, torch.autograd.grad((out * probe).sum(), params)


@pytest.mark.parametrize("param", PARAMS)
def test_factorized_output_and_gradients_equal_the_materialized_path(param):
    for name, (make, shape) in LAYERS.items():
        torch.manual_seed(0)
        layer = make().double()
        # spectral init: gains != 1; rank 3 (low: the chains have TT ranks below the shape's)
        sttpfast.parameterize(nn.Sequential(layer), param, rank=3, init="spectral")
        perturbed(layer)
        assert isinstance(layer.forward, ChoosingForward)
        x = torch.randn(shape, dtype=torch.float64)
        out, grads = outputs_and_grads(layer, x, "factorized")
        assert uses_factorized_path(layer, x)
        ref, ref_grads = outputs_and_grads(layer, x, "materialized")
        assert not uses_factorized_path(layer, x)
        assert out.shape == ref.shape, name
        assert relative(out, ref) < RTOL, name
        assert len(grads) == len(ref_grads) == 1 + len(list(layer.parameters()))
        assert max(relative(g, r) for g, r in zip(grads, ref_grads) if r.numel()) < RTOL, name


def test_auto_picks_the_path_of_fewer_multiply_adds():
    # a wide 3x3 conv at rank 4: the factors cost far less than building W and convolving with it
    wide = nn.Conv2d(64, 64, 3, padding=1)
    sttpfast.parameterize(nn.Sequential(wide), "svdp-r", rank=4)
    p = parametrization_of(wide)
    x = torch.randn(8, 64, 16, 16)
    positions = 8 * 16 * 16
    # SVDP: the frames are U and V (no sweep); the plan's whole contraction is U diag(s) V^T
    assert build_flops(p.layout) == (64 * 576 * 4, 0)
    assert p.flops(positions, positions) == (64 * 576 * 4 + positions * 64 * 576, positions * 4 * (576 + 64))
    assert uses_factorized_path(wide, x)
    # full rank on a narrow conv: two convs cost more than one, plus nothing saved in the build
    narrow = nn.Conv2d(8, 8, 3, padding=1)
    sttpfast.parameterize(nn.Sequential(narrow), "sttp-r", rank=8)
    assert not uses_factorized_path(narrow, torch.randn(8, 8, 16, 16))
    # a Linear at rank 2 with one row: the build's final product outweighs the row's products
    head = nn.Linear(64, 64)
    sttpfast.parameterize(nn.Sequential(head), "svdp-r", rank=2)
    assert uses_factorized_path(head, torch.randn(1, 64))
    # memory: in training, wrn16_4's wide stage (bs 128, 64 channels at 32x32, rank 32) would keep
    # its intermediate activation (P_out r = 4,194,304 + factors 20,480 elements, instead of
    # W's 36,864) for backward: more than a tenth of the layer's input and output (1,677,721.6)
    stage = nn.Conv2d(64, 64, 3, padding=1)
    sttpfast.parameterize(nn.Sequential(stage), "sttp-r", rank=32)
    big = torch.randn(128, 64, 32, 32)
    assert parametrization_of(stage).stored_elements(128 * 32 * 32, 128 * 32 * 32) == (36_864, 4_214_784)
    assert not uses_factorized_path(stage, big)
    with torch.no_grad():  # nothing kept for backward: fewer multiply-adds decide
        assert uses_factorized_path(stage, big)
    assert uses_factorized_path(stage.eval(), big)  # eval mode: the same paths as under no_grad
    # forced modes, and a bad one named
    p.forward_mode = "materialized"
    assert not uses_factorized_path(wide, x)
    p.forward_mode = "fast"
    with pytest.raises(ValueError, match="forward_mode must be one of auto, factorized, materialized, got 'fast'"):
        wide(x)


def test_cached_factors_are_built_once_per_pass_and_equal(monkeypatch):
    layer = nn.Conv2d(64, 64, 3, padding=1).double()
    sttpfast.parameterize(nn.Sequential(layer), "sttp-r", rank=4)
    perturbed(layer)
    p = parametrization_of(layer)
    x = torch.randn(2, 64, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
    builds = []
    build = type(p)._build
    monkeypatch.setattr(type(p), "_build", lambda self, form, factors: builds.append(form) or build(self, form, factors))
    with torch.no_grad(), parametrize.cached():
        # a call costs its convolutions only (builds are per pass): 128 r (576 + 64) < 128 64 576
        assert uses_factorized_path(layer, x)
        first, second = layer(x), layer(x)
        assert builds == ["factors"]  # the second call reused the first call's factors
    assert relative(first, out) < RTOL and torch.equal(first, second)
    assert parametrize._cache == {}  # dropped with torch's cached weights
    with torch.no_grad():
        layer(x)
    assert builds == ["factors", "factors"]  # outside the context: built per call again


def test_cached_auto_mode_compares_the_convolutions_without_the_builds():
    # a Linear at rank 2 on one row: per call the build's final product (64 x 64 x 2) makes the
    # materialized path dearer, but under the cache the kernel is built once per pass and
    # one row costs 64 x 64 materialized against 2 x (64 + 64) factorized: still factorized;
    # a full-rank one (rank 64) on one row: 4,096 against 8,192, so materialized
    head = nn.Linear(64, 64).double()
    sttpfast.parameterize(nn.Sequential(head), "svdp-r", rank=2)
    p = parametrization_of(head)
    row = torch.randn(1, 64, dtype=torch.float64)
    assert p.flops(1, 1) == (64 * 64 * 2 + 64 * 64, 2 * 128) and p.flops(0, 0) == (64 * 64 * 2, 0)
    full = nn.Linear(64, 64).double()
    sttpfast.parameterize(nn.Sequential(full), "svdp-r", rank=64)
    with torch.no_grad():  # (no_grad: nothing kept for backward, multiply-adds alone decide)
        assert uses_factorized_path(full, row)  # per call: the build (64^3) tips it to the factors
    with torch.no_grad(), parametrize.cached():
        assert uses_factorized_path(head, row)
        assert not uses_factorized_path(full, row)


def resnet_pair():
    """A float64 resnet20_cifar (sttp-r, rank 16) with the frame bank and the same without it."""
    torch.manual_seed(0)
    model = perturbed(timm.create_model("resnet20_cifar", num_classes=10).double())
    sttpfast.parameterize(model, "sttp-r", rank=16)
    perturbed(model)
    plain = timm.create_model("resnet20_cifar", num_classes=10).double()
    sttpfast.parameterize(plain, "sttp-r", rank=16, frame_bank=False)
    plain.load_state_dict(model.state_dict())
    return model.train(), plain.train()


def test_whole_model_forward_and_backward_equal_with_the_bank_on_and_off(monkeypatch):
    model, plain = resnet_pair()
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    layers = [(name, layer) for name, layer, _ in parameterized_layers(model)]
    # resnet20 at rank 16, batch 4, training: the 16-channel convs (the stem 3 -> 16 too) and the
    # first 1x1 shortcut are at full rank, where two convs cost more than one; the 32-channel
    # convs at 16x16 would keep more intermediate activation than the memory slack allows, and so
    # would the head (10 outputs at rank 10); all those run materialized. The 64-channel convs run
    # factorized. Both paths in one model, one bank.
    inputs = {}
    handles = [layer.register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0]))
               for name, layer in layers]
    weights = []  # layers whose weight W the bank built: the materialized ones only
    real_weight = fb.BatchedBuild.weight
    monkeypatch.setattr(fb.BatchedBuild, "weight", lambda self, pid: weights.append(pid) or real_weight(self, pid))
    losses = [torch.nn.functional.cross_entropy(m(x), y) for m in (model, plain)]
    for h in handles:
        h.remove()
    factorized = [name for name, layer in layers if uses_factorized_path(layer, inputs[name])]
    materialized = sorted(name for name, _ in layers if name not in factorized)
    assert factorized == ["blocks.6.conv1", "blocks.6.conv2", "blocks.6.shortcut.0", "blocks.7.conv1",
                          "blocks.7.conv2", "blocks.8.conv1", "blocks.8.conv2"]
    assert len(materialized) == 15
    by_id = {id(parametrization_of(layer)): name for name, layer in layers}
    assert sorted(by_id[pid] for pid in weights) == materialized  # no final product for the others
    for loss in losses:
        loss.backward()
    assert relative(losses[0], losses[1]) < RTOL
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        if a.numel():  # empty factors (St_U of a square frame) have nothing to compare
            assert relative(a.grad, b.grad) < RTOL, name
    # the materialized path of the whole model gives the same loss
    for _, layer in layers:
        parametrization_of(layer).forward_mode = "materialized"
    assert relative(torch.nn.functional.cross_entropy(model(x), y), losses[0]) < RTOL


def test_a_cached_validation_pass_of_the_whole_model_equals_the_uncached_one(monkeypatch):
    model, _ = resnet_pair()
    model.eval()
    batches = [torch.randn(4, 3, 32, 32, dtype=torch.float64) for _ in range(3)]
    with torch.no_grad():
        expected = [model(x) for x in batches]
        builds = []
        real = fb.build_weights
        monkeypatch.setattr(fb, "build_weights", lambda members, plans=None: builds.append(len(members)) or real(members, plans))
        factored = []
        real_factors = fb.BatchedBuild.factors
        monkeypatch.setattr(fb.BatchedBuild, "factors", lambda self, pid: factored.append(pid) or real_factors(self, pid))
        with parametrize.cached():
            outs = [model(x) for x in batches]
    assert builds == [22]  # one batched build of all 22 layers for the whole pass
    # each factorized layer took its factors from that build once: the 3x3 convs of 32 and 64
    # outputs (rank 16: 16 (144 + 32) < 32 x 144 multiply-adds per position for the narrowest)
    # and the 32 -> 64 shortcut (16 (32 + 64) < 64 x 32); in training the 32-channel ones would
    # keep too much activation (test above), in validation nothing is kept
    names = {id(p): name for name, _, p in parameterized_layers(model)}
    assert [names[pid] for pid in factored] == [
        f"blocks.{b}.conv{c}" for b in (3, 4, 5) for c in (1, 2)] + [
        "blocks.6.conv1", "blocks.6.conv2", "blocks.6.shortcut.0", "blocks.7.conv1", "blocks.7.conv2",
        "blocks.8.conv1", "blocks.8.conv2"]
    for out, ref in zip(outs, expected):
        assert relative(out, ref) < RTOL


def test_copies_traces_and_densify_keep_working():
    model, _ = resnet_pair()
    model.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        twin = copy.deepcopy(model)
        assert frame_bank_of(twin) is not frame_bank_of(model)
        assert all(layer.forward.layer is layer for _, layer, _ in parameterized_layers(twin))
        assert torch.equal(twin(x), expected)
        traced = torch.fx.symbolic_trace(model)
        assert torch.equal(traced(x), expected)  # the loose pass hands out the same factors
        assert torch.equal(traced(x), expected)
        dense = sttpfast.densify(model)
        assert not any(parametrize.is_parametrized(m) for m in dense.modules())
        assert not any("forward" in m.__dict__ for m in dense.modules())  # the class's forward again
        assert relative(dense(x), expected) < RTOL
        one_block = model.blocks[1](torch.randn(2, 16, 32, 32, dtype=torch.float64))
        assert one_block.shape == (2, 16, 32, 32)


def test_factors_are_built_in_full_precision_under_bf16_autocast(monkeypatch):
    # orthogonality needs float32: the bank's contraction to (U diag(g s), V^T) runs with autocast
    # off; only the two convs run in bfloat16
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1))
    sttpfast.parameterize(model, "sttp-r", rank=4)
    x = torch.randn(2, 64, 8, 8)
    dtypes, real = [], fb.BatchedBuild.factors
    monkeypatch.setattr(fb.BatchedBuild, "factors",
                        lambda self, pid: [dtypes.append(t.dtype) or t for t in real(self, pid)])
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert dtypes == [torch.float32] * 8  # two layers, two factors each, in both passes
    assert out.dtype == torch.bfloat16 and relative(out.float(), expected) < 2e-2


def test_the_path_choice_follows_mode_shape_and_training_after_it_is_remembered():
    """ChoosingForward remembers its choice per input shape, mode and train/grad state: a later
    change of any of them (or a new parametrization) gives the path the rule says."""
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1))
    sttpfast.parameterize(model, "svdp-c", rank=2)
    layer = model[0]
    p = parametrization_of(layer)
    calls = []
    real = p.conv_factors
    p.conv_factors = lambda factors: calls.append(1) or real(factors)
    big, tiny = torch.randn(2, 64, 16, 16), torch.randn(1, 64, 1, 1)
    layer.eval()
    with torch.no_grad():
        assert uses_factorized_path(layer, big) is True
        layer(big), layer(big)
        assert len(calls) == 2
        p.forward_mode = "materialized"
        layer(big)
        assert len(calls) == 2
        p.forward_mode = "auto"
        layer(big)
        assert len(calls) == 3
    for x in (big, tiny):
        for training in (False, True):
            layer.train(training)
            before = len(calls)
            layer(x)
            assert (len(calls) > before) is uses_factorized_path(layer, x)
    sttpfast.densify(model)
    assert model(big).shape == (2, 64, 16, 16)


@pytest.mark.parametrize("param", ["svdp-r", "sttp-r", "cp", "tucker"])
@pytest.mark.parametrize("make", [
    lambda: timm.layers.StdConv2d(8, 16, 3, padding=1),  # weight standardization in its forward
    lambda: timm.layers.Conv2dSame(8, 16, 3, stride=2),  # "same" padding worked out per input
], ids=["StdConv2d", "Conv2dSame"])
def test_a_layer_class_with_its_own_forward_keeps_it(param, make):
    # the factorized path ran F.conv2d on the factors and skipped the subclass's forward:
    # resnetv2_50x1_bit differed from its own densify() by 1.87 (relative), Conv2dSame gave
    # 15x15 maps instead of 16x16
    torch.manual_seed(0)
    layer = make().double()
    x = torch.randn(2, 8, 31, 31, dtype=torch.float64)
    sttpfast.parameterize(nn.Sequential(layer), param, rank=4, init="spectral", keep_dense_if_no_gain=False)
    assert not isinstance(layer.__dict__.get("forward"), ChoosingForward)
    parametrization_of(layer).forward_mode = "factorized"  # no effect: the class's forward runs
    with torch.no_grad():
        expected = sttpfast.densify(nn.Sequential(layer))[0](x)
        out = layer(x)
    assert out.shape == expected.shape and torch.allclose(out, expected, rtol=RTOL, atol=1e-12)


def test_a_factorized_layer_takes_its_input_by_keyword():
    # ChoosingForward.__call__ took `x`: layer(input=x), as nn.Conv2d's forward names it, failed
    layer = nn.Conv2d(12, 10, 3)
    sttpfast.parameterize(nn.Sequential(layer), "svdp-r", rank=2)
    x = torch.randn(2, 12, 8, 8)
    assert torch.equal(layer(input=x), layer(x))
