"""The parametrizations: round trips, DOF, spectrum bounds, gradients."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

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


def test_learned_spectrum_keeps_only_the_scale_free_part():
    p = SVDPLearned((6, 5), rank=3).double()
    w = low_rank_weight((6, 5), 3)
    assert rel_err(p(*p.decompose(7.5 * w)), w) < 1e-6


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
    assert bank.weight(bank.members[0][1]) is None  # outside a forward pass nothing is kept


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
