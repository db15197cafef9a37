"""The timm-registered architectures and the one model factory, ``create_model``."""
import math
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import resolve_data_config
from torch import nn

import sttpfast  # noqa: F401  (registers the models)
from sttpfast import parameterize
from sttpfast.models import create_model

WRN = ["wrn28_10", "wrn16_4", "wrn16_8", "wrn40_4", "wrn28_2", "wrn22_8", "wrn40_2"]
CLASSIFIERS = (WRN + [f"{name}_zk" for name in WRN] + [f"resnet{d}_cifar" for d in (20, 32, 44, 56, 110)]
               + [f"vgg{d}_bn_cifar" for d in (11, 13, 16, 19)])
DISCRIMINATORS = {"sngan_d32": 32, "sngan_d48": 48}
GENERATORS = {"sngan_g32": 32, "sngan_g48": 48}
MODULES = ["wrn", "resnet_cifar", "vgg_cifar", "sngan"]


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_registry_holds_exactly_the_written_out_entry_points():
    assert sorted(timm.list_models(module=MODULES)) == sorted(CLASSIFIERS + list(DISCRIMINATORS) + list(GENERATORS))


@pytest.mark.parametrize("name", CLASSIFIERS + list(DISCRIMINATORS))
def test_timm_contract_input_size_and_forward(name):
    model = timm.create_model(name).eval()
    size = DISCRIMINATORS.get(name, 32)
    cfg = resolve_data_config(model=model)
    assert cfg["input_size"] == model.pretrained_cfg["input_size"] == (3, size, size)
    assert model.pretrained_cfg["architecture"] == name
    assert not {"url", "hf_hub_id", "file"} & set(model.pretrained_cfg)  # no published weights
    num_classes = 1 if name in DISCRIMINATORS else 10
    assert model.num_classes == num_classes
    if name == "wrn28_10" or not name.startswith(("wrn28_10", "wrn22_8", "wrn16_8", "wrn40_4", "resnet110")):
        # the big ones are covered by their smaller siblings' forward (same code); wrn28_10 once
        with torch.no_grad():
            assert model(torch.randn(1, *cfg["input_size"])).shape == (1, num_classes)


@pytest.mark.parametrize("name", list(GENERATORS))
def test_generators_make_images_of_their_cfg_size(name):
    gen = timm.create_model(name).eval()
    size = GENERATORS[name]
    assert resolve_data_config(model=gen)["input_size"] == (3, size, size)
    with torch.no_grad():
        img = gen(gen.sample_z(2))
    assert img.shape == (2, 3, size, size) and img.abs().max() <= 1


@pytest.mark.parametrize("name", ["wrn16_4", "resnet20_cifar", "vgg11_bn_cifar"])
def test_classifier_api(name):
    model = timm.create_model(name, num_classes=7, in_chans=1).eval()
    x = torch.randn(2, 1, 32, 32)
    assert model.get_classifier().out_features == 7 and model.get_classifier().in_features == model.num_features
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
        model.reset_classifier(0, "")
        assert model(x).shape[:2] == (2, model.num_features) and model(x).ndim == 4
        model.reset_classifier(3, "avg")
        assert model(x).shape == (2, 3) and model.num_classes == 3
    with pytest.raises(ValueError, match="global_pool='' .*needs num_classes=0, got num_classes=5"):
        model.reset_classifier(5, "")


@pytest.mark.parametrize("name,channels,reductions", [
    ("wrn16_4", [16, 64, 128, 256], [1, 1, 2, 4]),
    ("resnet20_cifar", [16, 16, 32, 64], [1, 1, 2, 4]),
    ("vgg11_bn_cifar", [64, 128, 256, 512, 512], [1, 2, 4, 8, 16]),
])
def test_features_only(name, channels, reductions):
    model = timm.create_model(name, features_only=True).eval()
    assert model.feature_info.channels() == channels and model.feature_info.reduction() == reductions
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(1, c, 32 // r, 32 // r) for c, r in zip(channels, reductions)]


def test_features_only_is_refused_where_not_supported():
    with pytest.raises(ValueError, match="'sngan_g32' does not support features_only"):
        timm.create_model("sngan_g32", features_only=True)


def test_known_parameter_counts():
    count = lambda n: sum(p.numel() for p in timm.create_model(n, num_classes=10).parameters())  # noqa: E731
    assert count("wrn28_10_zk") == 36_479_194  # Zagoruyko & Komodakis: 36.5M
    assert count("wrn28_10") == 36_479_194 + 16 + 2 * 4 * (160 + 320 + 640) + (160 + 320 + 640)  # + conv biases
    assert count("wrn40_4_zk") == 8_949_210  # 8.9M
    assert count("resnet20_cifar") == 272_474  # He et al.: 0.27M


def test_wrn28_10_is_the_sttp_reference_network():
    model = timm.create_model("wrn28_10", num_classes=10)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert len(convs) == 1 + 3 * 4 * 2 + 3 and all(m.bias is not None for m in convs.values())
    block = model.stages[1][0]
    assert (block.conv1.stride, block.conv2.stride, block.shortcut.stride) == ((1, 1), (2, 2), (2, 2))
    assert model.bn.momentum == 0.9
    # Xavier-uniform, gain sqrt(2): |w| <= sqrt(2) * sqrt(6 / (fan_in + fan_out)); zero biases
    w = block.conv2.weight
    bound = math.sqrt(2) * math.sqrt(6 / (320 * 9 + 320 * 9))
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    assert all(torch.count_nonzero(m.bias) == 0 for m in convs.values())
    # the projection shortcut sees the block's raw input
    seen = {}

    def record_input(module, args, output):
        seen["x"] = args[0]

    block.shortcut.register_forward_hook(record_input)
    x = torch.randn(1, 160, 8, 8)
    block(x)
    assert torch.equal(seen["x"], x)


def test_wrn28_10_zk_is_the_standard_network():
    model = timm.create_model("wrn28_10_zk", num_classes=10)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    block = model.stages[1][0]
    assert (block.conv1.stride, block.conv2.stride) == ((2, 2), (1, 1))


def test_wrn28_10_compression_matches_figure_7():
    sttp = parameterize(create_model("wrn28_10", num_classes=10), "sttp-r", rank=32).z
    svdp = parameterize(create_model("wrn28_10", num_classes=10), "svdp-r", rank=16).z
    assert abs(sttp - 1.02) < 0.005 and abs(svdp - 3.88) < 0.005


def test_sngan_d32_structure_of_the_paper():
    disc = timm.create_model("sngan_d32")
    convs = {n: tuple(m.weight.shape) for n, m in disc.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert convs["blocks.0.conv1"] == (128, 3, 3, 3) and convs["blocks.0.shortcut"] == (128, 3, 1, 1)
    assert convs["blocks.1.shortcut"] == (128, 128, 1, 1)
    assert "blocks.2.shortcut" not in convs and "blocks.3.shortcut" not in convs
    assert tuple(disc.fc.weight.shape) == (1, 128)


# --- create_model -------------------------------------------------------------------------

def test_unknown_architecture_names_close_ones():
    with pytest.raises(ValueError, match="unknown architecture 'resnet20_cifr'; did you mean resnet20_cifar"):
        create_model("resnet20_cifr")


def test_pretrained_true_is_refused_for_architectures_without_weights():
    with pytest.raises(ValueError, match="no pretrained weights are published for 'wrn16_4'.*local file"):
        create_model("wrn16_4", pretrained=True)
    with pytest.raises(ValueError, match="no pretrained weights are published for 'wrn16_4'"):
        timm.create_model("wrn16_4", pretrained=True)


def test_pretrained_timm_model_from_a_local_safetensors_file(tmp_path):
    source = timm.create_model("resnet18", num_classes=10)
    path = tmp_path / "resnet18.safetensors"
    save_file(source.state_dict(), str(path))
    assert _same_state(create_model("resnet18", pretrained=path, num_classes=10), source)
    # another class count: the body is loaded, the classifier is new (timm's rule)
    other = create_model("resnet18", pretrained=str(path), num_classes=4)
    assert torch.equal(other.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert other.fc.out_features == 4


def test_pretrained_registered_model_from_a_local_pth_file(tmp_path):
    source = timm.create_model("resnet20_cifar", num_classes=10).eval()
    path = tmp_path / "resnet20.pth"
    torch.save(source.state_dict(), path)
    model = create_model("resnet20_cifar", pretrained=path, num_classes=10).eval()
    assert _same_state(model, source)
    assert model.pretrained_cfg["file"] == str(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_pretrained_file_that_does_not_fit_is_one_clear_error(tmp_path):
    path = tmp_path / "resnet20.pth"
    torch.save(timm.create_model("resnet20_cifar").state_dict(), path)
    with pytest.raises(ValueError, match=r"'.*resnet20.pth' does not fit 'resnet32_cifar': 84 missing from the file: "
                                         r"blocks.5.shortcut.0.weight"):
        create_model("resnet32_cifar", pretrained=path)


def test_pretrained_file_of_another_architecture_is_refused_with_another_class_count(tmp_path):
    """A new class count has timm drop the file's classifier and load the rest without strict
    checks: resnet18's file into resnet34 left 96 of 218 tensors random, into vgg11 all of
    them, without a word. The file must fit apart from the classifier."""
    path = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(path))
    with pytest.raises(ValueError, match=r"'.*resnet18.safetensors' does not fit 'resnet34': 96 missing from the file: "
                                         r"layer1.2.conv1.weight"):
        create_model("resnet34", pretrained=path, num_classes=10)
    with pytest.raises(ValueError, match=r"'.*resnet18.safetensors' does not fit 'vgg11': \d+ missing from the file"):
        create_model("vgg11", pretrained=path, num_classes=10)
    # a file without a classifier (a backbone) loads strictly and gets a new one
    backbone = timm.create_model("resnet18", num_classes=0)
    save_file(backbone.state_dict(), str(tmp_path / "backbone.safetensors"))
    model = create_model("resnet18", pretrained=tmp_path / "backbone.safetensors", num_classes=10)
    assert torch.equal(model.layer4[1].conv2.weight, backbone.layer4[1].conv2.weight) and model.fc.out_features == 10


def test_pretrained_file_missing():
    with pytest.raises(ValueError, match="pretrained weight file 'missing.pth' does not exist"):
        create_model("resnet20_cifar", pretrained="missing.pth")


def test_pretrained_file_of_another_kind(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"'.*weights.txt': expected one of .safetensors, .pth"):
        create_model("resnet20_cifar", pretrained=path)
    broken = tmp_path / "weights.pth"
    broken.write_text("hello")
    with pytest.raises(ValueError, match=r"cannot read pretrained weight file '.*weights.pth'"):
        create_model("resnet20_cifar", pretrained=broken)


def test_img_size_reaches_fixed_size_models():
    model = create_model("vit_tiny_patch16_224", num_classes=10, in_chans=1, img_size=32).eval()
    assert model.patch_embed.img_size == (32, 32)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_img_size_is_ignored_by_models_that_take_any_size():
    model = create_model("resnet20_cifar", num_classes=10, in_chans=1, img_size=16).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_img_size_below_a_known_minimum_is_refused():
    with pytest.raises(ValueError, match="'sngan_d48' needs inputs of at least 16x16 pixels, got img_size=8"):
        create_model("sngan_d48", img_size=8)
    with pytest.raises(ValueError, match="cuts images into 16x16 patches: img_size=8 is smaller than one patch"):
        create_model("vit_tiny_patch16_224", num_classes=10, img_size=8)
    with pytest.warns(UserWarning, match="img_size=28 is not a multiple of its patch size 16; the last 12 pixel"):
        create_model("vit_tiny_patch16_224", num_classes=10, img_size=28)


def test_pretrained_true_without_cache_or_network_is_one_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as if there were no network
    with pytest.raises(ValueError, match="cannot get the pretrained weights of 'resnet18' .not in timm's cache"):
        create_model("resnet18", pretrained=True, cache_dir=tmp_path)  # an empty cache


@pytest.mark.parametrize("code", [
    "import sttpfast, timm",                   # isort's order: sttpfast before timm and torch
    "import sttpfast; from timm import create_model",
    "import timm, sttpfast",
])
@pytest.mark.processes
def test_import_sttpfast_registers_the_models_whatever_the_import_order(code):
    # `import sttpfast` stays cheap (no torch) but the models must be in timm's registry as
    # soon as timm is there: `import sttpfast, timm` gave "Unknown model (resnet20_cifar)"
    proc = subprocess.run([sys.executable, "-c", f"{code}\nimport timm\n"
                           "print(type(timm.create_model('resnet20_cifar', num_classes=10)).__name__)"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["CifarResNet"]
