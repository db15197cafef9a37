"""The frame bank's ownership contract (DESIGN.md, "the batched weight build"): it batches
whichever module's forward is called, belongs to one parameterized tree, is copied with it,
and switched off it gives the per-layer reference."""
import copy

import pytest
import timm
import torch
from torch import nn

import sttpfast
from sttpfast.params.frame_bank import FrameBank, frame_bank_of


def perturbed(model):
    with torch.no_grad():
        for t in model.parameters():
            t.add_(0.01 * torch.randn_like(t))
    return model


def resnet_pair():
    """A float64 resnet20_cifar with a bank, and the same model without one."""
    model = timm.create_model("resnet20_cifar", num_classes=10).double().eval()
    sttpfast.parameterize(model, "sttp-r", rank=8)
    perturbed(model)
    plain = timm.create_model("resnet20_cifar", num_classes=10).double().eval()
    sttpfast.parameterize(plain, "sttp-r", rank=8, frame_bank=False)
    plain.load_state_dict(model.state_dict())
    return model, plain


def spy_on_builds(bank, monkeypatch):
    """Record (scope module count, built layers) of every batched build of ``bank``."""
    import sttpfast.params.frame_bank as fb

    calls, real = [], fb.build_weights

    def build(members, plans=None):
        out = real(members, plans)
        calls.append(len(members))
        return out

    monkeypatch.setattr(fb, "build_weights", build)
    return calls


def test_flag_off_means_no_bank_and_the_same_outputs():
    model, plain = resnet_pair()
    assert isinstance(frame_bank_of(model), FrameBank) and frame_bank_of(plain) is None
    assert not any(p.__dict__.get("frame_bank") for _, _, p in sttpfast.surgery.parameterized_layers(plain))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert (model(x) - plain(x)).abs().max().item() < 1e-12


def test_one_block_forward_is_batched_and_equals_the_per_layer_build(monkeypatch):
    model, plain = resnet_pair()
    calls = spy_on_builds(frame_bank_of(model), monkeypatch)
    x = torch.randn(2, 16, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        out, ref = model.blocks[1](x), plain.blocks[1](x)
    assert calls == [2]  # one batched build of the block's two convs, not the whole model's 22
    assert (out - ref).abs().max().item() < 1e-12
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert calls == [2, 22]  # the whole model: one build of all its chain layers


def test_a_wrapped_model_is_batched(monkeypatch):
    """DDP and accelerate call the wrapped model's forward: the model's scope opens."""

    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    model, plain = resnet_pair()
    calls = spy_on_builds(frame_bank_of(model), monkeypatch)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert (Wrapper(model)(x) - plain(x)).abs().max().item() < 1e-12
    assert calls == [22]


def test_training_step_gradients_match_the_per_layer_build():
    model, plain = resnet_pair()
    model.train(), plain.train()
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    for m in (model, plain):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12), name
    bank = frame_bank_of(model)
    # nothing kept after a pass: a read outside one opens a loose pass, freshly built
    assert not bank.active and bank._weights is None and bank._loose == {}


def test_deep_copy_gets_its_own_bank(monkeypatch):
    model, _ = resnet_pair()
    twin = copy.deepcopy(model)
    bank, twin_bank = frame_bank_of(model), frame_bank_of(twin)
    assert twin_bank is not None and twin_bank is not bank
    twin_layers = {id(m) for m in twin.modules()}
    assert all(id(layer) in twin_layers for layer, _ in twin_bank.members)
    assert all(p.__dict__["frame_bank"] is twin_bank for _, p in twin_bank.members)
    opened = []
    monkeypatch.setattr(FrameBank, "_open", lambda self, scope: opened.append(self) or FrameBank._close)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        twin(x)
    assert opened and all(b is twin_bank for b in opened)  # the original's bank is never touched


def test_generator_and_discriminator_have_separate_banks(monkeypatch):
    gan = nn.ModuleDict({"G": timm.create_model("sngan_g32"), "D": timm.create_model("sngan_d32")})
    sttpfast.parameterize(gan["G"], "sttp-c", rank=16, exclude=["l1"])
    sttpfast.parameterize(gan["D"], "sttp-c", rank=16)
    g_bank, d_bank = frame_bank_of(gan["G"]), frame_bank_of(gan["D"])
    assert g_bank is not None and d_bank is not None and g_bank is not d_bank
    g_layers, d_layers = {id(m) for m, _ in g_bank.members}, {id(m) for m, _ in d_bank.members}
    assert not g_layers & d_layers and len(d_layers) == 11
    calls = spy_on_builds(g_bank, monkeypatch)
    with torch.no_grad():
        gan["D"](gan["G"](torch.randn(2, 128)))
    assert sorted(calls) == sorted([len(g_layers), 11])  # each network built its own, once


def test_the_build_plan_is_made_once_and_redone_when_the_factors_change_dtype():
    """A bank keeps the grouping of each member list (BuildPlan) between builds; a change of
    the factors' dtype (or device) makes a new one, and a copy starts without any."""
    model, plain = resnet_pair()
    bank = frame_bank_of(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        model(x)
        (key, plan), = bank._plans.items()  # the root's scope: all 22 layers, one plan
        assert len(key) == 22 and len(plan.slots) == 22
        assert {lkey[1] for lkey in plan.layouts} == {torch.float64}
        first = model(x)
        assert bank._plans == {key: plan}  # reused: the same object
        model.float(), plain.float()
        out = model(x.float())
        (again,) = bank._plans.values()
        assert again is not plan and {lkey[1] for lkey in again.layouts} == {torch.float32}
        assert torch.allclose(out, plain(x.float()), rtol=1e-4, atol=1e-5)
        assert torch.allclose(out.double(), first, rtol=1e-4, atol=1e-5)
        assert frame_bank_of(copy.deepcopy(model))._plans == {}


@pytest.mark.parametrize("arch", ["resnet20_cifar", "resnet18"])
def test_gradient_checkpointing_with_the_bank_gives_the_gradients_without_it(arch):
    """timm's set_grad_checkpointing recomputes a block in the backward pass; torch checks that
    the recomputation saves tensors of the forward's shapes. The bank's batched build ran
    again there (a block's own build, or the whole tree's) and saved its frames: torch
    refused ("tensor at position 1: saved [8, 512, 3, 3], recomputed [28, 8, 8]"). The build
    keeps its saved tensors out of the checkpoint's; gradients equal the plain model's."""
    torch.manual_seed(0)
    plain = timm.create_model(arch, num_classes=5).double().train()
    sttpfast.parameterize(plain, "sttp-r", rank=4)
    perturbed(plain)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.double)
    plain(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-9, atol=1e-12, msg=name)


def test_gradient_checkpointing_with_the_bank_leaks_nothing_step_after_step():
    """The identity saved-tensor hooks returned the tensor itself: an op saving its output made
    a reference cycle the recomputed build never broke (42 tensors more every step on resnet18)."""
    import gc

    torch.manual_seed(0)
    model = timm.create_model("resnet20_cifar", num_classes=5).train()
    sttpfast.parameterize(model, "sttp-r", rank=4)
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    counts = []
    for _ in range(4):
        model(x).square().sum().backward()
        model.zero_grad(set_to_none=True)
        counts.append(live_tensors())
    assert counts[1] == counts[2] == counts[3], counts
