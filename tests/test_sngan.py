"""The paper's SNGAN networks, exactly (FACTS.md: layer lists, parameter counts, Z at rank 64)."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import sttpfast  # noqa: F401  (registers the models)
from sttpfast.models.sngan import SNGANDiscriminator
from sttpfast.surgery import parameterize


def _conv(c_in: int, c_out: int, k: int) -> int:
    """Parameters of a Conv2d with bias: weight c_out*c_in*k*k plus c_out biases."""
    return c_out * c_in * k * k + c_out


def _count(name: str) -> int:
    return sum(p.numel() for p in timm.create_model(name).parameters())


def _convs(model: nn.Module) -> dict:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# --- parameter counts ---------------------------------------------------------------------

def test_sngan_d48_has_the_reference_parameter_count():
    # optimized block 3->64: conv3x3 3->64, conv3x3 64->64, conv1x1 3->64
    #   1792 + 36928 + 256 = 38976
    # block 64->128 (down): conv3x3 64->64 (first conv keeps the input width), conv3x3 64->128, 1x1 64->128
    #   36928 + 73856 + 8320 = 119104
    # block 128->256 (down): 147584 + 295168 + 33024 = 475776
    # block 256->512 (down): 590080 + 1180160 + 131584 = 1901824
    # block 512->1024 (plain, width changes: 1x1 shortcut): 2359808 + 4719616 + 525312 = 7604736
    # Linear 1024->1, no bias: 1024
    # total 38976 + 119104 + 475776 + 1901824 + 7604736 + 1024 = 10141440 (FACTS.md: about 10.14M)
    blocks = [(3, 64, 64, True)] + [(a, a, b, True) for a, b in ((64, 128), (128, 256), (256, 512), (512, 1024))]
    by_hand = sum(_conv(i, h, 3) + _conv(h, o, 3) + _conv(i, o, 1) for i, h, o, _ in blocks) + 1024
    assert by_hand == 10_141_440
    assert _count("sngan_d48") == 10_141_440


def test_sngan_d32_has_the_reference_parameter_count():
    # optimized block 3->128: 3584 + 147584 + 512; downsampling block 128->128: 147584 * 2 + 16512;
    # two plain blocks (identity shortcut): 147584 * 2 each; Linear 128->1 without bias: 128
    by_hand = (_conv(3, 128, 3) + _conv(128, 128, 3) + _conv(3, 128, 1)
               + 2 * _conv(128, 128, 3) + _conv(128, 128, 1) + 4 * _conv(128, 128, 3) + 128)
    assert by_hand == 1_053_824
    assert _count("sngan_d32") == 1_053_824


def test_sngan_generators_have_the_reference_parameter_counts():
    bn = lambda c: 2 * c  # noqa: E731  (weight and bias; running statistics are buffers)
    block = lambda i, o: bn(i) + _conv(i, o, 3) + bn(o) + _conv(o, o, 3) + _conv(i, o, 1)  # noqa: E731
    # 32 px: Linear 128 -> 4*4*256 (528384), three blocks 256->256 (1246976 each), BN 256, conv3x3 256->3
    g32 = 128 * 4096 + 4096 + 3 * block(256, 256) + bn(256) + _conv(256, 3, 3)
    assert g32 == 4_276_739 and _count("sngan_g32") == 4_276_739
    # 48 px: Linear 128 -> 6*6*512 (2377728), blocks 512->256, 256->128, 128->64, BN 64, conv3x3 64->3
    g48 = 128 * 18432 + 18432 + block(512, 256) + block(256, 128) + block(128, 64) + bn(64) + _conv(64, 3, 3)
    assert g48 == 4_878_083 and _count("sngan_g48") == 4_878_083


# --- layer lists --------------------------------------------------------------------------

def test_sngan_d48_first_conv_of_each_block_keeps_the_input_width():
    convs = _convs(timm.create_model("sngan_d48"))
    assert convs["blocks.0.conv1"] == (64, 3, 3, 3) and convs["blocks.0.conv2"] == (64, 64, 3, 3)
    for i, (c_in, c_out) in enumerate(((64, 128), (128, 256), (256, 512), (512, 1024)), start=1):
        assert convs[f"blocks.{i}.conv1"] == (c_in, c_in, 3, 3)
        assert convs[f"blocks.{i}.conv2"] == (c_out, c_in, 3, 3)
        assert convs[f"blocks.{i}.shortcut"] == (c_out, c_in, 1, 1)
    assert [b.down for b in timm.create_model("sngan_d48").blocks[1:]] == [True, True, True, False]


@pytest.mark.parametrize("name,width", [("sngan_d32", 128), ("sngan_d48", 1024)])
def test_discriminator_final_linear_has_no_bias_and_every_conv_has_one(name, width):
    disc = timm.create_model(name)
    assert disc.fc.bias is None and tuple(disc.fc.weight.shape) == (1, width)
    assert all(m.bias is not None for m in disc.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name,widths,bottom", [("sngan_g32", (256, 256, 256, 256), 4),
                                                ("sngan_g48", (512, 256, 128, 64), 6)])
def test_generator_layers_of_the_paper(name, widths, bottom):
    gen = timm.create_model(name)
    assert (gen.z_dim, gen.bottom_width) == (128, bottom)
    assert tuple(gen.l1.weight.shape) == (bottom * bottom * widths[0], 128)
    convs = _convs(gen)
    for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
        block = gen.blocks[i]
        assert (block.bn1.num_features, block.bn2.num_features) == (c_in, c_out)
        assert convs[f"blocks.{i}.conv1"] == (c_out, c_in, 3, 3)  # first conv in -> out
        assert convs[f"blocks.{i}.conv2"] == (c_out, c_out, 3, 3)
        assert convs[f"blocks.{i}.shortcut"] == (c_out, c_in, 1, 1)
    assert len(gen.blocks) == 3 and gen.bn.num_features == widths[-1]
    assert convs["conv_out"] == (3, widths[-1], 3, 3)


def test_generator_block_upsamples_bilinearly():
    torch.manual_seed(0)
    block = timm.create_model("sngan_g32").blocks[0].eval()
    x = torch.randn(2, 256, 4, 4)
    up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
    y = block.conv2(F.relu(block.bn2(block.conv1(up(F.relu(block.bn1(x)))))))
    expected = y + block.shortcut(up(x))
    with torch.no_grad():
        assert torch.allclose(block(x), expected, atol=1e-5)
        nearest = F.interpolate(x, scale_factor=2, mode="nearest")
        assert not torch.allclose(block.shortcut(nearest), block.shortcut(up(x)), atol=1e-3)


# --- what the shortcut sees ---------------------------------------------------------------

def _record_inputs(disc: nn.Module, names: list[str]) -> dict:
    """Forward hooks that record the input of the named modules and of their blocks."""
    seen = {}
    modules = dict(disc.named_modules())
    for name in names:
        modules[name].register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0]))
        block = name.rsplit(".", 1)[0]
        modules[block].register_forward_hook(lambda m, args, out, block=block: seen.__setitem__(block, args[0]))
    return seen


def test_shortcut_sees_relu_of_the_block_input_by_default():
    torch.manual_seed(0)
    disc = timm.create_model("sngan_d32")
    assert disc.shortcut_sees == "relu"
    seen = _record_inputs(disc, ["blocks.1.shortcut", "blocks.2.shortcut"])
    disc(torch.randn(2, 3, 32, 32))
    for block in ("blocks.1", "blocks.2"):  # the downsampling block and a plain block
        assert (seen[block] < 0).any()
        assert torch.equal(seen[f"{block}.shortcut"], F.relu(seen[block]))
    assert isinstance(disc.blocks[2].shortcut, nn.Identity)


def test_shortcut_sees_the_raw_input_when_asked_and_the_outputs_differ():
    torch.manual_seed(0)
    reference = timm.create_model("sngan_d32")
    raw = timm.create_model("sngan_d32", shortcut_sees="input")
    raw.load_state_dict(reference.state_dict())
    seen = _record_inputs(raw, ["blocks.1.shortcut", "blocks.3.shortcut"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out_raw, out_ref = raw(x), reference(x)
    for block in ("blocks.1", "blocks.3"):
        assert torch.equal(seen[f"{block}.shortcut"], seen[block])
    assert not torch.allclose(out_raw, out_ref, atol=1e-3)


def test_shortcut_of_a_plain_block_by_hand():
    torch.manual_seed(0)
    block = timm.create_model("sngan_d32").blocks[2]
    x = torch.randn(2, 128, 8, 8)
    h = F.relu(x)
    with torch.no_grad():
        assert torch.allclose(block(x), block.conv2(F.relu(block.conv1(h))) + h, atol=1e-5)


def test_unknown_shortcut_input_is_one_clear_error():
    with pytest.raises(ValueError, match="shortcut_sees='relu\\(x\\)': expected one of relu, input"):
        SNGANDiscriminator(shortcut_sees="relu(x)")
    with pytest.raises(ValueError, match="shortcut_sees='x'"):
        timm.create_model("sngan_d48", shortcut_sees="x")


# --- grey-scale data ----------------------------------------------------------------------

def test_in_chans_one_for_grey_scale_images():
    disc = timm.create_model("sngan_d32", in_chans=1)
    gen = timm.create_model("sngan_g32", in_chans=1).eval()
    assert tuple(disc.blocks[0].conv1.weight.shape) == (128, 1, 3, 3)
    assert tuple(disc.blocks[0].shortcut.weight.shape) == (128, 1, 1, 1)
    with torch.no_grad():
        images = gen(gen.sample_z(2))
        assert images.shape == (2, 1, 32, 32)
        assert disc(images).shape == (2, 1)


# --- the paper's Z at rank 64 -------------------------------------------------------------

@pytest.mark.parametrize("param,z", [("svdp-c", 51.74), ("svdp-l", 53.36), ("svdp-r", 53.36),
                                     ("sttp-c", 16.71), ("sttp-l", 18.33), ("sttp-r", 18.33)])
def test_cifar_discriminator_z_of_the_paper(param, z):
    assert abs(parameterize(timm.create_model("sngan_d32"), param, rank=64).z - z) < 0.005


def test_stl10_discriminator_sttp_c_z_of_the_paper():
    assert abs(parameterize(timm.create_model("sngan_d48"), "sttp-c", rank=64).z - 3.25) < 0.005


# --- initialization -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sngan_d32", "sngan_g32"])
def test_xavier_weights_and_pytorch_default_biases_as_in_the_reference(name):
    torch.manual_seed(0)
    model = timm.create_model(name)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for layer_name, layer in layers.items():
        fan_in = layer.weight[0].numel()
        fan_out = layer.weight.shape[0] * layer.weight[0, 0].numel()
        residual = layer_name.endswith(("conv1", "conv2"))
        bound = (2 ** 0.5 if residual else 1.0) * (6 / (fan_in + fan_out)) ** 0.5  # Xavier-uniform
        assert 0.9 * bound < layer.weight.abs().max() <= bound, layer_name
        if layer.bias is not None:  # PyTorch's default: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))
            assert 0.5 / fan_in ** 0.5 < layer.bias.abs().max() <= 1 / fan_in ** 0.5, layer_name


# --- Z as a user sees it: `sttpfast info` (the ranks of the paper's Tables 1-3) -------------
#
# An independent count from the DOF formulas (DESIGN.md), written out here so that the printed
# numbers are checked against arithmetic that does not go through sttpfast's parametrizations:
#   SVDP, r = min(d_out, d_in, rank): -L/-R r(d_out + d_in) - r^2; -C r(d_out + d_in) - r(3r+1)/2
#   STTP: modes = primes of C_out, primes of C_in, kh*kw; TT ranks R_k = min(left, right, rank);
#   U-cores (R_{k-1} n_k) x R_k frames, V-cores (n_k R_k) x R_{k-1}; St_U: r(n - r), full St:
#   nr - r(r+1)/2 for the two cores next to Sigma (only the V one with the spectrum fixed); + r
#   for a learned Sigma.

def _primes(n: int) -> list[int]:
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


def _svdp_dof(d_out: int, d_in: int, rank: int, fixed: bool) -> int:
    r = min(d_out, d_in, rank)
    return r * (d_out + d_in) - (r * (3 * r + 1) // 2 if fixed else r * r)


def _sttp_dof(shape: tuple, rank: int, fixed: bool) -> int:
    out_modes = _primes(shape[0])
    modes = out_modes + _primes(shape[1]) + [math.prod(shape[2:])]
    ranks = [1] + [min(math.prod(modes[:k]), math.prod(modes[k:]), rank) for k in range(1, len(modes))] + [1]
    sigma = len(out_modes)  # the bond of Sigma: after the last output mode
    dof = 0
    for k, n in enumerate(modes):
        rows, cols = (ranks[k] * n, ranks[k + 1]) if k < sigma else (n * ranks[k + 1], ranks[k])
        full = (k == sigma - 1 and not fixed) or k == sigma
        dof += rows * cols - cols * (cols + 1) // 2 if full else cols * (rows - cols)
    return dof + (0 if fixed else ranks[sigma])


def _z_by_hand(arch: str, param: str, rank: int, never=(), **kwargs) -> tuple[int, int]:
    """``(params kept, dense state_dict entries)``: every Conv/Linear but ``never`` parameterized."""
    model = timm.create_model(arch, **kwargs)
    dense = sum(v.numel() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked"))
    kept = dense
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and name not in never:
            shape, fixed = tuple(m.weight.shape), param.endswith("-c")
            dof = (_svdp_dof(shape[0], math.prod(shape[1:]), rank, fixed) if param.startswith("svdp")
                   else _sttp_dof(shape, rank, fixed))
            kept += dof - m.weight.numel()
    return kept, dense


def _info_summary(*args: str) -> str:
    """The last line of `sttpfast info ...` (layers, params, Z, weights-only ratio)."""
    from click.testing import CliRunner

    from sttpfast.cli import main

    result = CliRunner().invoke(main, ["info", *args])
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1]


# (arch, param, rank, printed Z, the paper's value or None where the seeds do not give one)
_INFO_Z = [
    # Table 2 (full D) and Table 3 (D of the rank sweep), CIFAR-10 32 px D, rank 64: FACTS.md
    ("sngan_d32", "svdp-c", 64, "51.74", 51.74), ("sngan_d32", "svdp-l", 64, "53.36", 53.36),
    ("sngan_d32", "svdp-r", 64, "53.36", 53.36), ("sngan_d32", "sttp-c", 64, "16.71", 16.71),
    ("sngan_d32", "sttp-l", 64, "18.33", 18.33), ("sngan_d32", "sttp-r", 64, "18.33", 18.33),
    # Table 2, STL-10 48 px D, rank 64: the paper gives STTP-C 3.25 (FACTS.md)
    ("sngan_d48", "sttp-c", 64, "3.25", 3.25), ("sngan_d48", "sttp-r", 64, "3.52", None),
    ("sngan_d48", "svdp-c", 64, "14.23", None), ("sngan_d48", "svdp-r", 64, "14.50", None),
    # table 3's ranks (STTP-R 16-128, SVDP-R 4-64) on the CIFAR-10 G (the paper sweeps them on D); its first
    # Linear (528,384 of 4,280,323 state entries) stays dense, which sets a floor of ~12.3%
    ("sngan_g32", "sttp-r", 16, "13.20", None), ("sngan_g32", "sttp-r", 24, "13.81", None),
    ("sngan_g32", "sttp-r", 32, "14.61", None), ("sngan_g32", "sttp-r", 48, "16.47", None),
    ("sngan_g32", "sttp-r", 64, "18.82", None), ("sngan_g32", "sttp-r", 96, "23.92", None),
    ("sngan_g32", "sttp-r", 128, "30.24", None),
    ("sngan_g32", "svdp-r", 4, "14.30", None), ("sngan_g32", "svdp-r", 8, "15.87", None),
    ("sngan_g32", "svdp-r", 16, "18.99", None), ("sngan_g32", "svdp-r", 24, "22.08", None),
    ("sngan_g32", "svdp-r", 32, "25.14", None), ("sngan_g32", "svdp-r", 48, "31.19", None),
    ("sngan_g32", "svdp-r", 64, "37.13", None),
    # the STL-10 G at rank 64 (its dense Linear 128 -> 6*6*512 is half of the network)
    ("sngan_g48", "sttp-r", 64, "53.24", None), ("sngan_g48", "svdp-r", 64, "66.94", None),
]


@pytest.mark.parametrize("arch,param,rank,printed,paper", _INFO_Z,
                         ids=[f"{a}-{p}-r{r}" for a, p, r, _, _ in _INFO_Z])
def test_info_prints_the_z_of_the_paper_networks(arch, param, rank, printed, paper):
    line = _info_summary("--arch", arch, "--param", param, "--rank", str(rank))
    kept, dense = _z_by_hand(arch, param, rank, never=("l1",) if arch.startswith("sngan_g") else ())
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in timm.create_model(arch).modules())
    layers -= arch.startswith("sngan_g")  # G's first Linear is never parameterized
    assert line.startswith(f"layers {layers}  params {kept:,} / {dense:,}  Z = {printed}%  ")
    assert f"{100 * kept / dense:.2f}" == printed
    if paper is not None:
        assert float(printed) == paper


def test_info_never_parameterizes_the_generator_first_linear():
    from click.testing import CliRunner

    from sttpfast.cli import main

    result = CliRunner().invoke(main, ["info", "--arch", "sngan_g32", "--param", "sttp-c", "--rank", "64"])
    assert result.exit_code == 0, result.output
    rows = [line.split()[0] for line in result.stdout.splitlines() if line.startswith(("l1", "blocks", "conv_out"))]
    assert rows == [f"blocks.{i}.{c}" for i in range(3) for c in ("conv1", "conv2", "shortcut")] + ["conv_out"]
    assert result.stdout.strip().splitlines()[-1].startswith("layers 10  params 786,909 / 4,280,323  Z = 18.38%")


@pytest.mark.parametrize("param,printed", [("svdp-c", "51.66"), ("sttp-c", "16.54"), ("sttp-r", "18.13")])
def test_info_z_of_the_grey_scale_discriminator(param, printed):
    # Fashion-MNIST's D has a 1-channel first conv and shortcut: slightly lower Z than the
    # paper's CIFAR numbers (51.74 / 16.71 / 18.33), which are for 3 input channels
    line = _info_summary("--arch", "sngan_d32", "--param", param, "--rank", "64", "--in-chans", "1")
    kept, dense = _z_by_hand("sngan_d32", param, 64, in_chans=1)
    assert dense == 1_053_824 - 2 * 128 * 9 - 2 * 128  # conv3x3 and conv1x1 lose two input channels
    assert line.startswith(f"layers 11  params {kept:,} / {dense:,}  Z = {printed}%  ")


def test_info_refuses_classes_for_the_generator():
    from click.testing import CliRunner

    from sttpfast.cli import main

    result = CliRunner().invoke(main, ["info", "--arch", "sngan_g32", "--param", "sttp-r", "--num-classes", "10"])
    assert result.exit_code == 2
    assert "Error: num_classes=10: the SNGAN generator is unconditional (num_classes=0)" in result.output
    assert "Traceback" not in result.output
