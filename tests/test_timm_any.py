"""Any timm backbone at the data's resolution (issue 11, item 3): built for the data's size
where timm can (``img_size=``), else the batches are resized to the smallest size the model
accepts (said in one line), else one error naming ``--img-size``; the loaders follow the
model's timm cfg (``resolve_data_config``) for interpolation, and for normalization when the
model comes with weights. Tiny depths / widths keep each case at a few seconds."""
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file
from timm.data import resolve_data_config
from timm.models import register_model
from torch import nn

from sttpfast.cli import main
from sttpfast.data import get_dls
from sttpfast.data.transforms import channel_stats, resize_images
from sttpfast.learner import spectral_learner
from sttpfast.models import create_model
from sttpfast.models.builder import CIFAR_MEAN, CIFAR_STD
from sttpfast.models.input_size import create_for_input, size_candidates

TINY_CONVNEXT = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
TINY_SWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))


def write_images(root: Path, size: int, mode: str, per_class: int = 4) -> Path:
    """Generated PNGs: ``root/train/<class>/*.png`` and ``root/val/...``, two classes."""
    rng = np.random.default_rng(0)
    chans = 3 if mode == "RGB" else 1
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, chans), dtype=np.uint8)
                Image.fromarray(pixels[..., 0] if chans == 1 else pixels, mode=mode).save(root / split / cls / f"{i}.png")
    return root


def cli(*args):
    return CliRunner().invoke(main, ["train", *map(str, args)])


def test_convnext_on_16px_digits_is_fed_32px_batches_and_trains(tmp_path):
    # convnext's stem (/4) and three stride-2 downsamplings leave 16 px at 0x0: 32 is the smallest size
    result = cli("digits", "--arch", "convnext_atto", "--steps", "2", "--subset", "64", "--bs", "32",
                 "--logger", "none", "--out", tmp_path, "--set", "model.kwargs={depths: [1, 1, 1, 1], dims: [8, 16, 32, 64]}",
                 "--set", "log.progress=false")
    assert result.exit_code == 0, result.output
    assert ("resizing the 16x16 images to 32x32: the smallest size convnext_atto accepts (--img-size N to choose)"
            in result.output.splitlines())
    assert "2 steps in" in result.output


def test_learner_fits_loaders_to_the_size_the_backbone_needs():
    dls = get_dls("digits", bs=16, subset=32, device="cpu")
    notes = []
    learn = spectral_learner(dls, "convnext_atto", model_kwargs=TINY_CONVNEXT, echo=notes.append)
    xb, _ = dls.train.one_batch()
    assert tuple(xb.shape) == (16, 1, 32, 32)
    assert dls.image_size == 32 and dls.data_image_size == 16
    assert dls.train.interpolation == dls.valid.interpolation == "bicubic"  # convnext_atto's cfg
    assert notes == ["resizing the 16x16 images to 32x32: the smallest size convnext_atto accepts "
                     "(--img-size N to choose)"]
    learn.fit(1)  # one epoch of 2 batches through the resized loaders


def test_vit_is_built_for_32px_rgb_and_trains(tmp_path):
    root = write_images(tmp_path / "rgb32", 32, "RGB")
    dls = get_dls(f"imagefolder:{root}", bs=4, device="cpu")
    notes = []
    learn = spectral_learner(dls, "vit_tiny_patch16_224", model_kwargs=dict(depth=1), echo=notes.append)
    assert learn.model.patch_embed.img_size == (32, 32) and learn.model.patch_embed.num_patches == 4
    assert notes == [] and dls.train.resize is None  # built for the data: nothing resized
    xb, _ = dls.train.one_batch()
    assert tuple(xb.shape) == (4, 3, 32, 32)
    learn.fit(1)


def test_hierarchical_transformer_on_28px_grey(tmp_path):
    root = write_images(tmp_path / "grey28", 28, "L")
    dls = get_dls(f"imagefolder:{root}", bs=4, device="cpu")
    learn = spectral_learner(dls, "swin_tiny_patch4_window7_224", model_kwargs=TINY_SWIN)
    assert learn.model.patch_embed.img_size == (28, 28) and learn.model.patch_embed.proj.in_channels == 1
    assert dls.train.resize is None
    learn.fit(1)


def test_size_candidates_are_multiples_of_the_total_stride_up_to_the_cfg_size():
    model = create_model("convnext_atto", **TINY_CONVNEXT)  # reductions 4, 8, 16, 32; cfg 224
    assert size_candidates(model, 16) == [32, 64, 96, 128, 160, 192, 224]
    assert size_candidates(model, 64) == [96, 128, 160, 192, 224]
    vit = create_model("vit_tiny_p4_32", depth=1)  # feature reduction 4, cfg 32
    assert size_candidates(vit, 28) == [32]


def test_img_size_resizes_the_data_and_builds_the_model_for_it():
    dls = get_dls("digits", bs=8, subset=16, device="cpu")
    learn = spectral_learner(dls, "vit_tiny_p4_32", img_size=24, model_kwargs=dict(depth=1))
    assert learn.model.patch_embed.img_size == (24, 24)
    xb, _ = dls.valid.one_batch()
    assert tuple(xb.shape) == (8, 1, 24, 24)


def test_normalization_follows_the_cfg_only_for_pretrained_weights(tmp_path):
    root = write_images(tmp_path / "rgb32", 32, "RGB")
    weights = tmp_path / "vit.safetensors"
    save_file(create_model("vit_tiny_p4_32", depth=1, num_classes=2).state_dict(), str(weights))
    scratch = get_dls(f"imagefolder:{root}", bs=4, device="cpu")
    spectral_learner(scratch, "vit_tiny_p4_32", model_kwargs=dict(depth=1))
    train_x = scratch.train.dataset.x
    assert scratch.mean == channel_stats(train_x)[0]  # from scratch: the data's own statistics
    tuned = get_dls(f"imagefolder:{root}", bs=4, device="cpu")
    spectral_learner(tuned, "vit_tiny_p4_32", model_kwargs=dict(depth=1, pretrained=str(weights)))
    assert tuned.mean == CIFAR_MEAN and tuned.std == CIFAR_STD  # the weights' cfg (vit_tiny_p4_32: CIFAR-10)
    assert tuned.train.mean == CIFAR_MEAN and tuned.valid.std == CIFAR_STD
    x = train_x[:4].float()
    expected = (x / 255 - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    got, _ = tuned.valid.after_batch((train_x[:4], torch.zeros(4, dtype=torch.int64)))
    assert torch.allclose(got, expected, atol=1e-5)


def test_resize_images_exact_values():
    x = torch.tensor([[[[0.0, 255.0], [100.0, 50.0]]]])  # (1, 1, 2, 2)
    nearest = resize_images(x, 4, "nearest")
    assert torch.equal(nearest, x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    bicubic = resize_images(x, 5, "bicubic")
    raw = F.interpolate(x, size=(5, 5), mode="bicubic", align_corners=False)
    assert raw.max() > 255.0 and raw.min() < 0.0  # bicubic overshoots ...
    assert torch.equal(bicubic, raw.clamp(0, 255))  # ... and is clipped to the uint8 range
    assert torch.equal(resize_images(x, 4, "no-such-mode"), F.interpolate(x, size=(4, 4), mode="bilinear",
                                                                           align_corners=False))


# -- bad input: one Error line, exit 2 ----------------------------------------------------------
class _NoChannels(nn.Module):
    """A test model whose constructor takes no in_chans (3-channel images only)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


@register_model
def rgb_only_testnet(pretrained=False, **kwargs):
    """timm passes its cfg arguments to every entry point; the model sees the rest."""
    return _NoChannels(**{k: v for k, v in kwargs.items() if not k.startswith("pretrained_cfg") and k != "cache_dir"})


class _Fixed7(nn.Module):
    """A test model that takes exactly 1x7x7 images (a Linear on the flattened pixels)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.fc = nn.Linear(in_chans * 49, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


@register_model
def fixed7_testnet(pretrained=False, **kwargs):
    return _Fixed7(**{k: v for k, v in kwargs.items() if not k.startswith("pretrained_cfg") and k != "cache_dir"})


@pytest.mark.parametrize("args, message", [
    (["--arch", "vitt_tiny_patch16_224"],
     "Error: unknown architecture 'vitt_tiny_patch16_224'; did you mean vit_tiny_patch16_224, "
     "deit_tiny_patch16_224, vit_tiny_patch16_384?"),
    (["--arch", "convnext_atto", "--img-size", "20"],
     "Error: architecture 'convnext_atto' cannot run on 1x20x20 images (Calculated padded input size per "
     "channel: (1 x 1). Kernel size: (2 x 2). Kernel size can't be greater than actual input size); choose "
     "another --img-size"),
    (["--arch", "rgb_only_testnet"],
     "Error: architecture 'rgb_only_testnet' cannot be built for 1-channel 16x16 images: "
     "_NoChannels.__init__() got an unexpected keyword argument 'in_chans'"),
    (["--arch", "fixed7_testnet"],  # no size from 16 up to 224 works -> the message names --img-size
     "Error: architecture 'fixed7_testnet' cannot run on the data's 1x16x16 images (mat1 and mat2 shapes "
     "cannot be multiplied (1x256 and 49x10)) nor on larger sizes up to its cfg's; give the size to resize "
     "to with --img-size N, or pick a model for small inputs (e.g. resnet20_cifar)"),
])
def test_bad_backbone_one_error_line_exit_2(tmp_path, args, message):
    result = cli("digits", *args, "--steps", "1", "--subset", "16", "--logger", "none", "--out", tmp_path)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert errors[0] == message
    assert not any(tmp_path.iterdir())  # refused before any run folder


def test_create_for_input_refuses_a_bad_img_size_value():
    with pytest.raises(ValueError, match=r"^img_size must be a positive number of pixels, got 0$"):
        create_for_input("convnext_atto", 1, 16, img_size=0)


# -- the small ViTs registered for 32 px (timm's VisionTransformer, patch 4) -----------------------
@pytest.mark.parametrize("name, width, heads", [("vit_tiny_p4_32", 192, 3), ("vit_small_p4_32", 384, 6)])
def test_small_vit_cfg_tells_the_truth_and_timm_features_work(name, width, heads):
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    assert (cfg["input_size"], cfg["mean"], cfg["std"]) == ((3, 32, 32), CIFAR_MEAN, CIFAR_STD)
    assert cfg["fixed_input_size"] and cfg["num_classes"] == 10 and cfg["classifier"] == "head"
    assert not {"url", "hf_hub_id", "file", "license"} & {k for k, v in cfg.items() if v}
    torch.manual_seed(0)
    model = timm.create_model(name, depth=2).eval()
    assert resolve_data_config(model=model)["input_size"] == (3, 32, 32)
    assert (model.embed_dim, model.blocks[0].attn.num_heads, model.patch_embed.num_patches) == (width, heads, 64)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (1, 10)
        last = model.forward_intermediates(x, indices=1, intermediates_only=True)[0]
        torch.manual_seed(0)  # the same initial weights as `model`
        feats = timm.create_model(name, depth=2, features_only=True, out_indices=(1,)).eval()
        assert last.shape == (1, width, 8, 8) and torch.equal(feats(x)[0], last)


def test_small_vit_is_built_for_fashion_mnist_size():
    model = create_model("vit_tiny_p4_32", img_size=28, in_chans=1, depth=1)
    assert model.patch_embed.num_patches == 49 and model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
