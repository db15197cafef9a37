"""The timm-registered architectures."""
import pytest
import timm
import torch

import sttpfast  # noqa: F401  (registers the models)

CLASSIFIERS = ["wrn28_10", "wrn16_4", "wrn40_4", "resnet20_cifar", "resnet32_cifar", "resnet56_cifar",
               "resnet110_cifar", "vgg11_bn_cifar", "vgg16_bn_cifar", "vgg19_bn_cifar"]


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifiers_via_timm(name):
    model = timm.create_model(name, num_classes=7, in_chans=1, pretrained=False)
    assert model.num_classes == 7 and model.get_classifier().out_features == 7
    assert model.pretrained_cfg["architecture"] == name
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_known_parameter_counts():
    count = lambda n: sum(p.numel() for p in timm.create_model(n, num_classes=10).parameters())  # noqa: E731
    assert abs(count("wrn28_10") / 1e6 - 36.5) < 0.1  # Zagoruyko & Komodakis: 36.5M
    assert abs(count("resnet20_cifar") / 1e6 - 0.27) < 0.01  # He et al.: 0.27M


@pytest.mark.parametrize("g,d,size", [("sngan_g32", "sngan_d32", 32), ("sngan_g48", "sngan_d48", 48)])
def test_sngan_pairs(g, d, size):
    gen, disc = timm.create_model(g), timm.create_model(d)
    z = gen.sample_z(2)
    with torch.no_grad():
        img = gen(z)
        assert img.shape == (2, 3, size, size) and img.abs().max() <= 1
        assert disc(img).shape == (2, 1)


def test_sngan_d32_structure_of_the_paper():
    disc = timm.create_model("sngan_d32")
    convs = {n: tuple(m.weight.shape) for n, m in disc.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert convs["blocks.0.conv1"] == (128, 3, 3, 3) and convs["blocks.0.shortcut"] == (128, 3, 1, 1)
    assert convs["blocks.1.shortcut"] == (128, 128, 1, 1)
    assert "blocks.2.shortcut" not in convs and "blocks.3.shortcut" not in convs
    assert tuple(disc.fc.weight.shape) == (1, 128)


def test_pretrained_is_refused():
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("wrn16_4", pretrained=True)
