"""Parameterized models stay timm models (issue 11, item 2): torch.fx tracing bit-identical
to the model, forward_features / forward_intermediates / features_only, torch.export,
torch.jit.script refused with a pointer to ``sttpfast.densify``, torch.compile of a step.

timm's models come from its registry (the smallest of a few families), never named by
hand; the project's own from the sttpfast entry points.
"""
import pytest
import timm
import torch
from timm.models import model_entrypoint

import sttpfast

METHODS = ["sttp-r", "svdp-r"]


def _smallest(names: list[str]) -> str:
    """The model of ``names`` with the fewest parameters (counted on the meta device: no memory)."""
    with torch.device("meta"):
        return min(names, key=lambda n: (sum(p.numel() for p in timm.create_model(n).parameters()), n))


# the paper's ResNets (sttpfast's registry) and two timm families whose depthwise convs and
# squeeze-excite blocks made the traced copy differ (issue 11)
OWN = _smallest([n for n in timm.list_models() if model_entrypoint(n).__module__ == "sttpfast.models.resnet_cifar"])
TIMM = [_smallest(timm.list_models(f"{family}_*")) for family in ("mobilenetv3", "efficientnet")]
MODELS = [OWN] + TIMM


def _parameterized(name: str, method: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    sttpfast.parameterize(model, method, compression=10)
    return model


def _input() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", MODELS)
def test_fx_traced_copy_is_bit_identical_to_the_model(name, method):
    model = _parameterized(name, method)
    x = _input()
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(traced(x), expected)
        assert torch.equal(traced(x), expected)  # the next forward of the copy builds afresh
    # in training too (traced in training mode: a trace bakes in ``self.training`` branches):
    # the copy's loss and every gradient equal the model's
    traced = torch.fx.symbolic_trace(model.train())
    losses, grads = [], []
    for net in (model, traced):
        net.zero_grad()
        torch.manual_seed(2)  # the same dropout masks
        loss = net(x).square().mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert torch.equal(losses[0], losses[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", MODELS)
def test_features_and_intermediates_give_the_models_bits(name, method):
    model = _parameterized(name, method)
    # the dense model convolves with W: the parameterized model's layers do too when forced to
    # (a layer that runs factorized, conv V^T then U diag(g s), rounds differently)
    for _, _, p in sttpfast.surgery.parameterized_layers(model):
        p.forward_mode = "materialized"
    dense = sttpfast.densify(model)
    x = _input()
    with torch.no_grad():
        features = model.forward_features(x)
        assert torch.equal(model.forward_head(features), model(x))
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, features)
        # the dense model (the unparameterized path) gives the same bits: densify reads the
        # weights through the bank's batched build
        assert torch.equal(dense.forward_features(x), features)
        dense_final, dense_maps = dense.forward_intermediates(x)
        assert torch.equal(dense_final, final)
        assert len(maps) == len(dense_maps) and all(torch.equal(a, b) for a, b in zip(maps, dense_maps))
        # timm's feature extractor (torch.fx) of the parameterized model: the same maps
        names = [info["module"] for info in model.feature_info]
        traced = timm.models.create_feature_extractor(model, names)(x)
        assert list(traced) == names
        assert all(torch.equal(traced[n], m) for n, m in zip(names, maps))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", MODELS)
def test_features_only_model_parameterized_equals_the_models_intermediates(name, method):
    def build(**kwargs):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10, **kwargs).eval()
        sttpfast.parameterize(model, method, rank=4)  # one rank: the same layers get the same factors
        return model
    model = build()
    x = _input()
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        for feature_cls in ("getter", "hook", "fx"):
            features = build(features_only=True, feature_cls=feature_cls)
            got = features(x)
            assert [t.shape for t in got] == [t.shape for t in expected], feature_cls
            # equal up to float rounding: a feature model that prunes the last layers (getter, fx;
            # seen on efficientnet_lite0 with timm 1.0.31) builds its frames in other batches of the frame
            # bank, which moves the last bits (2e-10 on maps of order 1)
            assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip(got, expected)), feature_cls


@pytest.mark.parametrize("method", METHODS)
def test_torch_export_of_the_parameterized_model_equals_it(method):
    model = _parameterized(OWN, method)
    x = _input()
    exported = torch.export.export(model, (x,)).module()
    with torch.no_grad():
        assert torch.equal(exported(x), model(x))


def test_torch_jit_script_is_refused_with_a_pointer_to_densify():
    model = _parameterized(OWN, "sttp-r")
    x = _input()
    with pytest.warns(FutureWarning, match="torch.jit.script. is deprecated"), pytest.raises(ValueError) as err:
        torch.jit.script(model)
    assert str(err.value) == ("torch.jit.script cannot compile a Conv2d parameterized as sttp-r: script the "
                              "dense model instead, torch.jit.script(sttpfast.densify(model))")
    with pytest.warns(FutureWarning, match="torch.jit.script. is deprecated"):
        scripted = torch.jit.script(sttpfast.densify(model))
    for _, _, p in sttpfast.surgery.parameterized_layers(model):
        p.forward_mode = "materialized"  # the dense model's bits: convolving with W
    with torch.no_grad():
        assert torch.equal(scripted(x), model(x))


def test_torch_compile_of_a_training_step_equals_eager():
    # backend "aot_eager": dynamo's capture of the parameterized forward (parametrizations,
    # frame bank) and AOT autograd's backward, the parts sttpfast's code meets; inductor's
    # C++ codegen adds minutes on a CPU and is measured by bench/step.py --compile instead
    import copy
    model = _parameterized(OWN, "sttp-r").train()
    twin = copy.deepcopy(model)
    torch.manual_seed(3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def training_step(net):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)

        def step(x, y):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            return loss.detach()
        return step
    eager, compiled = training_step(model), torch.compile(training_step(twin), backend="aot_eager")
    for _ in range(2):
        expected, got = eager(x, y), compiled(x, y)
        assert torch.isfinite(got) and abs(got.item() - expected.item()) <= 1e-5 * abs(expected.item())
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("method", ["sttp-r", "tt"])
def test_torch_compile_captures_a_parameterized_vit_in_one_graph(method):
    """Two training passes of a 3-block ViT compile one frame: no graph break, no recompile.
    Before: functools.cached_property's lock in the chain layout (sttp) and opt_einsum's path
    search (tt) broke the graph in every layer, and the frames after a break recompiled per
    layer class until dynamo's recompile limit (8) sent the rest of a deep ViT back to eager;
    the caches filled in the first call recompiled the whole model once more."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=3, num_classes=10)
    sttpfast.parameterize(model, method, rank=4)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 16, 16)
    torch._dynamo.reset()
    for _ in range(2):  # two training steps: the second on changed factors
        opt.zero_grad()
        got = compiled(x)
        got.sum().backward()
        opt.step()
    assert counter.frame_count == 1
    with torch.no_grad():  # the compiled model on the trained factors (a no_grad graph of its own)
        assert torch.allclose(compiled(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_traced_copy_never_uses_a_stale_weight():
    # the traced copy's weights come from loose passes: after an optimizer step, after a
    # backward through part of them, and in the other grad mode, they are built afresh
    model = _parameterized(OWN, "sttp-r").train()
    traced = torch.fx.symbolic_trace(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = _input()
    for _ in range(2):
        opt.zero_grad()
        traced(x).square().mean().backward()
        opt.step()
        torch.manual_seed(0)
        expected = model(x)
        assert torch.equal(traced(x), expected)
    head = model.get_classifier()
    stem = next(m for m in model.modules() if hasattr(m, "parametrizations"))
    with torch.no_grad():
        reference = stem.weight  # outside any pass: a loose pass of the whole tree
    head.zero_grad()
    stem(x).sum().backward()  # uses the stem's weight of a new (grad) loose pass, then frees its graph
    head(torch.ones(1, head.in_features)).sum().backward()  # would fail on a spent pass
    assert torch.equal(stem.weight.detach(), reference)
    with torch.no_grad():
        stem.weight  # a loose pass: the head's weight waits in it
        for t in head.parameters():
            t.add_(0.1)  # an in-place change, as an optimizer step makes
        changed = head.weight  # built afresh, not the one waiting
        assert torch.equal(changed, head.weight)  # (a second read: a new pass, surely fresh)
