"""timm's model contract for every registered sttpfast model (the checks of timm's own
tests/test_models.py, written as the project's test).

The models come from timm's registry (every entry point defined in an sttpfast module).
Cheap checks run on every model; the heavy ones (backward, torch.jit.script, torch.fx,
features, checkpointing) on the smallest model of each family (same module classes = same code).
"""
import warnings

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.models import group_parameters, model_entrypoint

import sttpfast  # noqa: F401  (registers the models)
from sttpfast.models.builder import CIFAR_MEAN, CIFAR_STD
from sttpfast.models.feature_chain import resolve_feature_indices

# the project's architectures; the small ViTs (sttpfast.models.vit_small) are timm's own
# VisionTransformer with CIFAR cfgs, checked in tests/test_timm_any.py
ALL = sorted(n for n in timm.list_models() if model_entrypoint(n).__module__.startswith("sttpfast.")
             and model_entrypoint(n).__module__ != "sttpfast.models.vit_small")


def _families() -> dict:
    """Smallest model of each family: models built from the same sttpfast module classes."""
    smallest = {}
    with torch.device("meta"):  # no memory, no init cost: only structure and counts
        for name in ALL:
            model = timm.create_model(name)
            key = frozenset(type(m).__name__ for m in model.modules() if type(m).__module__.startswith("sttpfast."))
            size = sum(p.numel() for p in model.parameters())
            if key not in smallest or size < smallest[key][1]:
                smallest[key] = (name, size)
    return {name: key for key, (name, _) in smallest.items()}


SMALLEST = sorted(_families())
GENERATORS = [n for n in ALL if n.startswith("sngan_g")]
IMAGE_MODELS = [n for n in ALL if n not in GENERATORS]  # classifiers and discriminators: images in
SMALLEST_IMAGE = [n for n in SMALLEST if n in IMAGE_MODELS]


def _input(model, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    if model.pretrained_cfg["architecture"] in GENERATORS:
        return model.sample_z(batch)
    return torch.randn(batch, *model.pretrained_cfg["input_size"])


def test_the_registry_lists_every_family():
    assert len(ALL) == 27
    assert SMALLEST == ["resnet20_cifar", "sngan_d32", "sngan_g32", "vgg11_bn_cifar", "wrn28_2", "wrn28_2_zk"]


# --- cheap checks, every model ------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_cfg_tells_the_truth(name):
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    gan = name.startswith("sngan")
    side = 48 if name.endswith("48") else 32
    assert cfg["input_size"] == (3, side, side) and cfg["architecture"] == name
    assert (cfg["mean"], cfg["std"]) == (((0.5,) * 3, (0.5,) * 3) if gan else (CIFAR_MEAN, CIFAR_STD))
    assert not {"url", "hf_hub_id", "file", "license"} & {k for k, v in cfg.items() if v}  # no weights, no license
    assert cfg["num_classes"] == (0 if name in GENERATORS else 1 if gan else 10)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_default_cfgs_forward_features_head_and_reset(name):
    """timm's test_model_forward + test_model_default_cfgs."""
    model = timm.create_model(name).eval()
    cfg, state = model.pretrained_cfg, model.state_dict()
    assert resolve_data_config(model=model)["input_size"] == cfg["input_size"]
    x = _input(model, 1)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (1, cfg["num_classes"]) and model.num_classes == cfg["num_classes"]
        feats = model.forward_features(x)
        assert feats.shape == (1, model.num_features, *cfg["pool_size"])
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (1, model.head_hidden_size) and model.head_hidden_size == model.num_features
        assert torch.equal(model.forward_head(feats), logits)
        model.reset_classifier(0)
        assert model.num_classes == 0 and torch.equal(model.forward_head(feats), pre)
        model.reset_classifier(0, "")
        assert torch.equal(model.forward_head(feats), feats)
    first = cfg["first_conv"] if isinstance(cfg["first_conv"], tuple) else (cfg["first_conv"],)
    assert all(state[f"{conv}.weight"].shape[1] == 3 for conv in first)  # the convs that see the images
    assert state[f"{cfg['classifier']}.weight"].shape == (cfg["num_classes"], model.num_features)


@pytest.mark.parametrize("name", SMALLEST_IMAGE)
def test_created_without_classifier_and_pooling(name):
    model = timm.create_model(name).eval()
    bare = timm.create_model(name, num_classes=0, global_pool="").eval()
    classifier = model.pretrained_cfg["classifier"]
    bare.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(f"{classifier}.")})
    x = _input(model, 1)
    with torch.no_grad():
        assert torch.equal(bare(x), model.forward_features(x))


@pytest.mark.parametrize("name", GENERATORS)
def test_generator_parts_of_the_contract(name):
    gen = timm.create_model(name)
    assert gen.num_classes == 0 and gen.num_features == gen.bn.num_features
    assert gen.pretrained_cfg["first_conv"] is None and gen.pretrained_cfg["classifier"] is None
    with pytest.raises(ValueError, match="num_classes=42: the SNGAN generator is unconditional"):
        timm.create_model(name, num_classes=42)
    with pytest.raises(ValueError, match=f"'{name}' does not support features_only"):
        timm.create_model(name, features_only=True)


# --- heavy checks, smallest of each family ------------------------------------------------

@pytest.mark.parametrize("name", SMALLEST)
def test_backward_reaches_every_parameter(name):
    kwargs = {} if name in GENERATORS else dict(num_classes=42)
    model = timm.create_model(name, **kwargs).train()
    out = model(_input(model))
    out.mean().backward()
    assert out.shape[-1] == (32 if name in GENERATORS else 42)  # a generator's last axis: the image width
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", SMALLEST)
def test_torchscript_and_fx_give_the_same_output(name):
    model = timm.create_model(name).eval()
    x = _input(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated in this torch
        expected = model(x)
        assert torch.equal(torch.jit.script(model)(x), expected)
        assert torch.equal(torch.fx.symbolic_trace(model)(x), expected)


@pytest.mark.parametrize("name", SMALLEST_IMAGE)
def test_features_only_equal_forward_intermediates(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = _input(model)
    info = model.feature_info
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, norm=True)
        assert torch.equal(final, model.forward_features(x))
        assert [m.shape[1] for m in maps] == [f["num_chs"] for f in info]
        assert [x.shape[-1] // m.shape[-1] for m in maps] == [f["reduction"] for f in info]
        raw = model.forward_intermediates(x, intermediates_only=True)
        for feature_cls, expected in (("hook", maps), ("getter", raw)):
            torch.manual_seed(0)  # the same weights
            features = timm.create_model(name, features_only=True, feature_cls=feature_cls,
                                         out_indices=tuple(range(len(info)))).eval()
            assert features.feature_info.channels() == [f["num_chs"] for f in info]
            got = features(x)
            assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))
        torch.manual_seed(0)
        fx = timm.create_model(name, features_only=True, feature_cls="fx", out_indices=tuple(range(len(info))))
        assert all(torch.equal(a, b) for a, b in zip(fx.eval()(x), maps))


@pytest.mark.parametrize("name", SMALLEST_IMAGE)
def test_stop_early_and_prune_keep_the_maps(name):
    model = timm.create_model(name).eval()
    x = _input(model)
    levels = len(model.feature_info)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        last, early = model.forward_intermediates(x, indices=[0, 1], stop_early=True)
        assert torch.equal(last, maps[1]) and all(torch.equal(a, b) for a, b in zip(early, maps[:2]))
        assert [torch.equal(a, b) for a, b in zip(model.forward_intermediates(x, indices=2)[1], maps[-2:])] == [1, 1]
        before = sum(p.numel() for p in model.parameters())
        assert model.prune_intermediate_layers([-levels, 1], prune_norm=True) == [0, 1]
        assert sum(p.numel() for p in model.parameters()) < before and model.num_classes == 0
        final, pruned = model.forward_intermediates(x)
    assert torch.equal(final, maps[1]) and all(torch.equal(a, b) for a, b in zip(pruned, maps[:2]))


def test_bad_feature_indices_are_one_clear_error():
    model = timm.create_model("resnet20_cifar")
    with pytest.raises(ValueError, match="feature index 4 is out of range for 4 feature levels"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=[0, 4])
    with pytest.raises(ValueError, match="output_fmt='NHWC': these convolutional networks give NCHW maps only"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NHWC")
    assert resolve_feature_indices(4, None) == ([0, 1, 2, 3], 3)
    assert resolve_feature_indices(4, 2) == ([2, 3], 3)
    assert resolve_feature_indices(5, (-1, 0)) == ([4, 0], 4)


@pytest.mark.parametrize("name", SMALLEST_IMAGE)
def test_grad_checkpointing_recomputes_blocks_with_equal_results(name):
    torch.manual_seed(0)
    plain = timm.create_model(name, num_classes=5).train()
    torch.manual_seed(0)
    ckpt = timm.create_model(name, num_classes=5).train()
    ckpt.set_grad_checkpointing(True)
    calls = []
    first_block = ckpt.feature_chain()[1]
    first_block.register_forward_pre_hook(lambda *_: calls.append(1))  # pre: the recomputation may stop early
    x = _input(plain)
    torch.manual_seed(3)
    out_plain = plain(x)
    out_plain.square().sum().backward()
    torch.manual_seed(3)
    out_ckpt = ckpt(x)
    assert len(calls) == 1
    out_ckpt.square().sum().backward()
    assert len(calls) == 2  # recomputed in the backward pass: torch.utils.checkpoint at work
    assert torch.allclose(out_ckpt, out_plain, rtol=1e-5, atol=1e-6)
    grads = dict(plain.named_parameters())
    for n, p in ckpt.named_parameters():
        assert torch.allclose(p.grad, grads[n].grad, rtol=1e-4, atol=1e-6), n
    # BatchNorm running statistics move once per step, as without checkpointing
    buffers = dict(plain.named_buffers())
    assert all(torch.equal(b, buffers[n]) for n, b in ckpt.named_buffers())


@pytest.mark.parametrize("name,coarse,groups", [
    ("resnet20_cifar", False, 1 + 9 + 1), ("wrn28_2", False, 1 + 12 + 1), ("wrn28_2", True, 1 + 3 + 1),
    ("vgg11_bn_cifar", False, 8 + 8 + 1), ("sngan_d32", False, 4 + 1), ("sngan_g32", False, 1 + 3),
])
def test_group_matcher_puts_every_parameter_in_one_group(name, coarse, groups):
    model = timm.create_model(name)
    grouped = group_parameters(model, model.group_matcher(coarse=coarse))
    names = [n for group in grouped.values() for n in group]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(grouped) == groups


def test_discriminator_head_choices():
    disc = timm.create_model("sngan_d32")
    assert disc.fc.bias is None
    disc.reset_classifier(3)
    assert disc.fc.bias is None and disc.fc.out_features == 3 and disc.global_pool_type == "sum"
    with pytest.raises(ValueError, match="unknown global_pool 'avg' for the SNGAN discriminator"):
        disc.reset_classifier(1, "avg")
    with pytest.raises(ValueError, match="global_pool='' .*needs num_classes=0, got num_classes=1"):
        disc.reset_classifier(1, "")
