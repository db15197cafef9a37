"""The parametrizations: round trips, DOF, spectrum bounds, gradients."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sttpfast import parameterize
from sttpfast.params import (
    PARAMETRIZATIONS,
    LowRank,
    MatrixView,
    STTPConstant,
    STTPLearned,
    STTPPenalized,
    SVDPConstant,
    SVDPLearned,
    SVDPPenalized,
    resolve_param,
)

SHAPES = [(128, 128, 3, 3), (12, 6, 3, 3), (10, 64), (1, 128), (128, 3, 3, 3), (16, 1, 3, 3), (8, 8), (6, 4, 5)]
LEARNED = [SVDPLearned, SVDPPenalized, STTPLearned, STTPPenalized]
CONSTANT = [SVDPConstant, STTPConstant]


def low_rank_weight(shape, rank, transposed=False):
    view = MatrixView(shape, transposed)
    m = torch.randn(view.d_out, rank, dtype=torch.float64) @ torch.randn(rank, view.d_in, dtype=torch.float64)
    return view.from_matrix(m / torch.linalg.svdvals(m)[0])


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cls", [SVDPLearned, SVDPPenalized])
def test_svdp_learned_round_trip_low_rank_weight(cls, shape):
    p = cls(shape, rank=5).double()
    w = low_rank_weight(shape, p.rank)  # rank <= r, sigma_max = 1
    assert rel_err(p(*p.decompose(w)), w) < 1e-4


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cls", [STTPLearned, STTPPenalized])
def test_sttp_learned_round_trip_at_full_tt_ranks(cls, shape):
    p = cls(shape, rank=None).double()  # TT ranks untruncated
    w = low_rank_weight(shape, min(3, p.rank))
    assert rel_err(p(*p.decompose(w)), w) < 1e-4


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cls", LEARNED + CONSTANT)
def test_round_trip_of_weights_in_the_image(cls, shape):
    """decompose(forward(f)) reproduces forward(f) even with truncated TT ranks."""
    p = cls(shape, rank=4).double()
    factors = [torch.randn_like(t) * 0.3 for t in p.identity_factors(dtype=torch.float64)]
    w = p(*factors)
    assert rel_err(p(*p.decompose(w)), w) < 1e-4


def test_learned_conversion_keeps_the_layer_scale_in_the_gain():
    p = SVDPLearned((6, 5), rank=3).double()
    w = low_rank_weight((6, 5), 3)  # sigma_max = 1
    assert rel_err(p(*p.decompose(7.5 * w)), 7.5 * w) < 1e-12
    assert abs(p.gain.item() - 7.5) < 1e-12 and p.spectral_bound() == p.gain.item()
    assert p.singular_values(*p.decompose(7.5 * w))[0].item() == pytest.approx(7.5, abs=1e-12)


@pytest.mark.parametrize("cls,shape,rank", [(SVDPLearned, (12, 6, 3, 3), 4), (SVDPPenalized, (10, 64), 7),
                                            (STTPLearned, (7, 3, 2), 4), (STTPPenalized, (5, 2, 3), 3)])
def test_conversion_at_rank_r_is_the_svd_truncation(cls, shape, rank):
    """The converted layer is U_r diag(S_r) V_r^T: its error is exactly the SVD tail (for STTP on
    shapes whose TT ranks leave U_r, V_r untruncated: a prime C_out, short input modes)."""
    view = MatrixView(shape)
    w = torch.randn(shape, dtype=torch.float64)
    p = cls(shape, rank=rank).double()
    approx = p(*p.decompose(w))
    s = torch.linalg.svdvals(view.to_matrix(w))
    tail = s[rank:].square().sum().sqrt()
    assert abs((approx - w).norm() - tail).item() < 1e-12 * s[0].item()
    u, sv, vh = torch.linalg.svd(view.to_matrix(w), full_matrices=False)
    best = (u[:, :rank] * sv[:rank]) @ vh[:rank]
    assert rel_err(view.to_matrix(approx), best) < 1e-12


@pytest.mark.parametrize("cls", LEARNED + CONSTANT)
@pytest.mark.parametrize("shape,rank", [((64, 32, 3, 3), 14), ((32, 16, 3, 3), 8), ((128, 256), 16)])
def test_conversion_with_truncating_tt_ranks_fits_the_spectrum_to_the_frames_it_holds(cls, shape, rank):
    """STTP at rank r cannot hold U_r, V_r themselves when its TT ranks truncate them; the
    frames it does hold, U' and V', get the spectrum that fits W best (u'_i^T W v'_i, their
    mean for -C): never worse than a zero weight. The spectrum of U_r's own S_r on U', V'
    was worse than zero on a trained ResNet-20 (relative error 1.02)."""
    view = MatrixView(shape)
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.float64) * torch.linspace(2.0, 0.1, shape[0], dtype=torch.float64).reshape(
        -1, *([1] * (len(shape) - 1)))
    p = cls(shape, rank=rank).double()
    factors = p.decompose(w)
    u, spectrum, v = p.svd_factors(*factors)
    mat = view.to_matrix(w)
    fitted = (u * (mat @ v)).sum(0)  # u'_i^T W v'_i
    want = fitted if p.learned else fitted.mean().expand_as(fitted)
    assert torch.allclose(spectrum, want, rtol=1e-10, atol=1e-12 * fitted.abs().max().item())
    assert (view.to_matrix(p(*factors)) - mat).norm() < mat.norm()


@pytest.mark.parametrize("cls,shape,rank", [(SVDPConstant, (12, 6, 3, 3), 4), (SVDPConstant, (9, 5), 5),
                                            (STTPConstant, (8, 4, 3, 3), None)])
def test_fixed_spectrum_conversion_is_the_mean_scale_times_the_polar_factor(cls, shape, rank):
    """-C holds g U V^T only; the closest such matrix to W (Frobenius) is mean(S_r) U_r V_r^T."""
    view = MatrixView(shape)
    w = torch.randn(shape, dtype=torch.float64)
    p = cls(shape, rank=rank).double()
    approx = view.to_matrix(p(*p.decompose(w)))
    u, sv, vh = torch.linalg.svd(view.to_matrix(w), full_matrices=False)
    r = p.rank
    assert abs(p.gain.item() - sv[:r].mean().item()) < 1e-12
    assert rel_err(approx, sv[:r].mean() * u[:, :r] @ vh[:r]) < 1e-12
    assert torch.allclose(torch.linalg.svdvals(approx)[:r], sv[:r].mean().expand(r), rtol=1e-12)


def test_spectral_conversion_of_a_trained_resnet_is_exact_at_full_rank():
    """A trained dense resnet20_cifar (float64) converted with init="spectral" keeps its outputs."""
    import copy

    import timm

    import sttpfast

    torch.manual_seed(0)
    dense = timm.create_model("resnet20_cifar", num_classes=10).double()
    opt = torch.optim.SGD(dense.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):  # a few steps: the weights are no longer the fresh init
        x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(dense(x), y).backward()
        opt.step()
    dense.eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = dense(x)
        for param in ("svdp-l", "sttp-l", "sttp-r"):
            model = copy.deepcopy(dense)
            sttpfast.parameterize(model, param, init="spectral")
            out = model(x)
            assert rel_err(out, ref) < 1e-12, param  # measured 3.7e-15 (svdp-l), 6.7e-15 (sttp)
            gains = [p.gain.item() for _, _, p in sttpfast.surgery.parameterized_layers(model)]
            assert all(g != 1.0 for g in gains)  # every layer kept its own scale


def test_transposed_conv_view_round_trip():
    w = low_rank_weight((8, 6, 3, 3), 4, transposed=True)
    p = STTPLearned((8, 6, 3, 3), transposed=True, rank=None).double()
    assert p.view.d_out == 6 and p.view.d_in == 8 * 9
    assert rel_err(p(*p.decompose(w)), w) < 1e-4


@pytest.mark.parametrize("name,cls", sorted(PARAMETRIZATIONS.items()))
@pytest.mark.parametrize("shape", [(128, 128, 3, 3), (64, 32, 1, 1), (10, 640)])
@pytest.mark.parametrize("rank", [1, 16, 64])
def test_dof_equals_free_scalars_the_optimizer_sees(name, cls, shape, rank):
    p = cls(shape, rank=rank)
    factors = p.identity_factors()
    assert sum(t.numel() for t in factors) == p.dof == cls.count_dof(shape, False, rank)


def test_dof_formulas_of_the_paper():
    r, d_out, d_in = 16, 64, 288
    assert SVDPLearned((64, 32, 3, 3), rank=r).dof == r * (d_out + d_in) - r * r
    assert SVDPConstant((64, 32, 3, 3), rank=r).dof == r * (d_out + d_in) - r * (3 * r + 1) // 2
    assert LowRank((64, 32, 3, 3), rank=r).dof == r * (d_out + d_in)


def test_st_u_cores_store_exactly_r_times_n_minus_r_entries():
    p = STTPConstant((128, 128, 3, 3), rank=64)
    factors = p.identity_factors()
    it = iter(factors)
    for core in p.layout.cores:
        bottom = next(it)
        if core.reduced:
            assert bottom.numel() == core.cols * (core.rows - core.cols)
        else:
            top = next(it)
            assert bottom.numel() + top.numel() == core.rows * core.cols - core.cols * (core.cols + 1) // 2


@pytest.mark.parametrize("cls", LEARNED)
@pytest.mark.parametrize("shape", [(128, 128, 3, 3), (32, 16, 3, 3), (10, 64)])
def test_learned_spectrum_bounds_sigma_max(cls, shape):
    p = cls(shape, rank=8)
    factors = [t + torch.randn_like(t) for t in p.identity_factors()]
    factors[0] = 3.0 * torch.randn(p.rank)  # an arbitrary raw spectrum
    w = p.view.to_matrix(p(*factors))
    sv = torch.linalg.svdvals(w)
    assert sv[0] <= 1 + 1e-5
    assert torch.allclose(sv[: p.rank], p.singular_values(*factors), atol=1e-5)
    assert p.log_spectrum(*factors).shape == (p.rank,)


@pytest.mark.parametrize("cls", CONSTANT)
def test_constant_spectrum_is_all_ones(cls):
    p = cls((32, 16, 3, 3), rank=8)
    factors = [t + 0.5 * torch.randn_like(t) for t in p.identity_factors()]
    sv = torch.linalg.svdvals(p.view.to_matrix(p(*factors)))
    assert torch.allclose(sv[:8], torch.ones(8), atol=1e-5) and sv[8:].abs().max() < 1e-5


def test_lowrank_spectral_init_and_singular_values():
    w = torch.randn(24, 10, 3, dtype=torch.float64)
    p = LowRank((24, 10, 3), rank=5).double()
    u, v = p.decompose(w)
    mat = w.reshape(24, 30)
    U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
    assert torch.allclose(u, U[:, :5] * S[:5].sqrt())  # Khodak et al.: U_r sqrt(S_r)
    assert torch.allclose(p.singular_values(u, v), S[:5])


@pytest.mark.parametrize("cls", [STTPLearned, SVDPConstant, LowRank])
def test_gradcheck_through_the_parametrization(cls):
    p = cls((4, 6, 3), rank=2).double()
    factors = tuple((t + 0.3 * torch.randn_like(t)).requires_grad_(True) for t in p.identity_factors(torch.float64))
    assert torch.autograd.gradcheck(lambda *f: p(*f), factors)


def test_registered_on_a_module_trains():
    conv = nn.Conv2d(8, 16, 3)
    p = STTPPenalized(tuple(conv.weight.shape), rank=4)
    with p.registering_identity():
        parametrize.register_parametrization(conv, "weight", p, unsafe=True)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    x = torch.randn(2, 8, 6, 6)
    before = conv.weight.detach().clone()
    conv(x).square().mean().backward()
    opt.step()
    assert not torch.allclose(before, conv.weight)
    assert torch.linalg.svdvals(conv.weight.reshape(16, -1))[0] <= 1 + 1e-5


def test_resolve_param():
    assert resolve_param("STTP") == "sttp-l" and resolve_param("svdp") == "svdp-l"
    with pytest.raises(ValueError, match="allowed: .*sttp-c"):
        resolve_param("ttp")


@pytest.mark.parametrize("cls", [STTPLearned, STTPConstant, SVDPLearned])
def test_matmul_sweeps_equal_the_tt_contraction_of_the_cores(cls):
    """forward() contracts by matmul sweeps; check against the generic TT contraction of
    the cores as DESIGN.md defines them (U-core = frame reshaped, V-core = transposed frame)."""
    from sttpfast.linalg.tt import tt_contract

    p = cls((24, 12, 3, 3), rank=5).double()
    factors = [t + 0.3 * torch.randn_like(t) for t in p.identity_factors(torch.float64)]
    spectrum, frames = p.frames(*factors)
    cores, n_out = [], len(p.layout.out_modes)
    for k, (core, frame) in enumerate(zip(p.layout.cores, frames)):
        if core.is_u:
            c = frame.reshape(core.left_rank, core.mode, core.right_rank)
            if k == n_out - 1 and spectrum is not None:
                c = c * spectrum
        else:
            c = frame.reshape(core.mode, core.right_rank, core.left_rank).permute(2, 0, 1)
        cores.append(c)
    full = tt_contract(cores).reshape(24, 12 * 9)
    assert torch.allclose(p.view.to_matrix(p(*factors)), full, atol=1e-12)
    u, _, v = p.svd_factors(*factors)
    assert torch.allclose(u.T @ u, torch.eye(5, dtype=u.dtype), atol=1e-12)
    assert torch.allclose(v.T @ v, torch.eye(5, dtype=v.dtype), atol=1e-12)


def test_frame_bank_matches_per_layer_frames():
    import copy

    import timm
    import torch.nn.functional as F

    import sttpfast
    from sttpfast.params.frame_bank import detach_frame_bank

    model = timm.create_model("resnet20_cifar", num_classes=10)
    sttpfast.parameterize(model, "sttp-r", rank=8)
    with torch.no_grad():
        for t in model.parameters():
            t.add_(0.01 * torch.randn_like(t))
    plain = copy.deepcopy(model)
    detach_frame_bank(plain)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for m in (model, plain):
        F.cross_entropy(m(x), y).backward()
    assert torch.allclose(model(x), plain(x), atol=1e-5)  # batched matmuls round differently
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    bank = model.__dict__["_sttpfast_frame_bank"]
    # outside a forward pass nothing is kept (a read there opens a loose pass, freshly built)
    assert bank._weights is None and bank._loose == {}


def test_tt_helpers():
    from sttpfast.linalg.tt import prime_factors, tt_contract, tt_ranks, tt_svd

    assert prime_factors(640) == [2, 2, 2, 2, 2, 2, 2, 5] and prime_factors(1) == [] and prime_factors(97) == [97]
    assert tt_ranks([2, 2, 2, 2], None) == [1, 2, 4, 2, 1] and tt_ranks([2, 2, 2, 2], 3) == [1, 2, 3, 2, 1]
    full = torch.randn(3, 4, 5, 2, dtype=torch.float64)
    cores = tt_svd(full)  # untruncated: exact
    assert [tuple(c.shape) for c in cores] == [(1, 3, 3), (3, 4, 10), (10, 5, 2), (2, 2, 1)]
    assert torch.allclose(tt_contract(cores), full, atol=1e-12)
    for c in cores[:-1]:  # left-orthonormal
        m = c.reshape(-1, c.shape[-1])
        assert torch.allclose(m.T @ m, torch.eye(m.shape[1], dtype=m.dtype), atol=1e-12)
    low = tt_svd(full, max_rank=2)
    assert max(c.shape[-1] for c in low) <= 2
    assert (tt_contract(low) - full).norm() < full.norm()


def test_chain_stays_orthonormal_under_bf16_autocast():
    p = STTPLearned((32, 16, 3, 3), rank=8)
    factors = [t + 0.3 * torch.randn_like(t) for t in p.identity_factors()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = p(*factors)
    assert w.dtype == torch.float32
    assert torch.linalg.svdvals(p.view.to_matrix(w))[0] <= 1 + 1e-5


def test_learned_spectrum_stays_in_range_even_when_it_vanishes():
    """s = S / max(max|S|, 1e-8) (the reference's clamp): |s| <= 1 always, and a raw spectrum
    driven to zero gives zeros and finite gradients instead of 0/0."""
    from sttpfast.params.base import learned_spectrum

    raw = torch.zeros(4, requires_grad=True)
    s = learned_spectrum(raw)
    s.sum().backward()
    assert torch.equal(s, torch.zeros(4)) and torch.isfinite(raw.grad).all()
    tiny = torch.tensor([1e-12, -3e-12])
    assert torch.equal(learned_spectrum(tiny), tiny / 1e-8)
    big = torch.tensor([2.0, -4.0, 1.0])
    assert torch.equal(learned_spectrum(big), torch.tensor([0.5, -1.0, 0.25]))


@pytest.mark.parametrize("cls", [SVDPConstant, STTPLearned])
def test_spectrum_stays_in_range_during_training(cls):
    conv = nn.Conv2d(8, 12, 3)
    p = cls(tuple(conv.weight.shape), rank=6)
    with p.registering_identity():
        parametrize.register_parametrization(conv, "weight", p, unsafe=True)
    opt = torch.optim.SGD(conv.parameters(), lr=1.0)
    for _ in range(5):
        opt.zero_grad()
        (-conv(torch.randn(4, 8, 6, 6)).square().mean()).backward()  # pushes the weight to grow
        opt.step()
    sv = torch.linalg.svdvals(conv.weight.detach().reshape(12, -1))
    if cls.learned:
        assert sv[0].item() == pytest.approx(1.0, abs=1e-5) and sv[6:].max() < 1e-5
    else:
        assert torch.allclose(sv[:6], torch.ones(6), atol=1e-5) and sv[6:].max() < 1e-5


def test_registry_entries_say_what_each_method_offers():
    from sttpfast.params import ALL_PARAMS, method, method_of, methods
    from sttpfast.params.registry import Method, register_method

    assert list(methods()) == ["svdp-l", "svdp-r", "svdp-c", "sttp-l", "sttp-r", "sttp-c", "lowrank",
                               "cp", "rcp", "tucker", "rtk", "tt", "rtt", "tr", "rtr", "ht", "dense", "sn"]
    assert ALL_PARAMS == tuple(methods()) + ("svdp", "sttp")
    offers = {n: (m.learned_spectrum, m.bounded, m.penalty, m.rank_kind, m.default_init) for n, m in methods().items()}
    assert offers["sttp-r"] == (True, True, "d_optimal", int, "identity")
    assert offers["svdp-c"] == (False, True, None, int, "identity")
    assert offers["lowrank"] == (False, False, "frobenius_decay", int, "spectral")
    assert offers["sn"] == (False, True, None, None, "identity") and offers["dense"][3] is None
    assert offers["cp"] == (False, False, None, int, "spectral")
    assert offers["tt"] == offers["ht"] == (False, False, None, tuple, "spectral")  # a rank per bond / node
    assert method("STTP") is methods()["sttp-l"] and method_of(STTPLearned((4, 4), rank=2)).name == "sttp-l"
    with pytest.raises(ValueError, match="^parameterization name 'sttp' is already registered by 'sttp-l'$"):
        register_method(Method(name="my-sttp", aliases=("sttp",), apply=None, count_dof=None))
    assert "my-sttp" not in methods()


@pytest.mark.parametrize("param,shape,sign", [
    ("svdp-r", (16, 16, 1), 1.0), ("sttp-r", (16, 16, 1), -1.0), ("sttp-c", (16, 16, 3), -1.0),
    ("sttp-r", (16, 3, 3), 1.0), ("sttp-r", (12, 12, 1), -1.0), ("sttp-r", (32, 16, 3), 1.0),
])
def test_identity_init_is_the_identity_pattern_with_the_chains_sign(param, shape, sign):
    """Every frame starts near -E (reflectors Y ~ E): W = (-1)^(number of frames) E-pattern.
    SVDP has two frames; an STTP chain one per mode (C_out's primes, C_in's, the kernel mode,
    a 1x1 kernel's too), so a 16 -> 16 1x1 conv (4 + 5 cores) starts at -I (README says so)."""
    out, cin, k = shape
    model = nn.Sequential(nn.Conv2d(cin, out, k, bias=False))
    parameterize(model, param, rank=64)
    w = model[0].weight.detach().reshape(out, -1)
    big = w[w.abs() > 0.5]
    assert len(big) == min(out, cin * k * k)
    assert torch.all(big.sign() == sign)
    torch.testing.assert_close(big.abs(), torch.ones_like(big), atol=1e-3, rtol=0)
