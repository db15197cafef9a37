"""Householder frames in compact WY form: orthonormality, agreement with the sequential
product of reflections, gradients, and the inverse map."""
import pytest
import timm
import torch

import sttpfast
from sttpfast.linalg.householder import (
    frame_params_from_frame,
    identity_frame_params,
    householder_frame,
    sequential_householder_frame,
    stiefel_dof,
)
from sttpfast.params.chain import SpectralChain
from sttpfast.surgery import parameterized_layers


def random_params(n, r, reduced, batch=(), dtype=torch.float64, scale=1.0):
    bottom = scale * torch.randn(*batch, n - r, r, dtype=dtype)
    top = None if reduced else scale * torch.randn(*batch, r * (r - 1) // 2, dtype=dtype)
    return bottom, top


def frame_shapes(arch, params, ranks):
    """Every (rows, cols, reduced) frame that these parameterizations of ``arch`` create."""
    shapes = set()
    for param in params:
        for rank in ranks:
            model = timm.create_model(arch, num_classes=10 if arch.startswith("wrn") else None)
            sttpfast.parameterize(model, param, rank=rank)
            for _, _, p in parameterized_layers(model):
                shapes |= {(c.rows, c.cols, c.reduced) for c in p.layout.cores}
    return sorted(shapes)


MODEL_SHAPES = sorted(set(frame_shapes("wrn28_10", ["sttp-l", "sttp-c", "svdp-l", "svdp-c"], [32, 64]))
                      | set(frame_shapes("sngan_d32", ["sttp-l", "sttp-c", "svdp-l", "svdp-c"], [64])))


def test_model_shapes_cover_both_manifolds():
    assert any(red for _, _, red in MODEL_SHAPES) and any(not red for _, _, red in MODEL_SHAPES)
    assert (5760, 64, False) in MODEL_SHAPES  # WRN-28-10's widest conv under SVDP r=64


@pytest.mark.parametrize("rows,cols,reduced", MODEL_SHAPES)
def test_frames_orthonormal_float32_at_model_shapes(rows, cols, reduced):
    bottom, top = random_params(rows, cols, reduced, dtype=torch.float32)
    q = householder_frame(bottom, top)
    assert q.shape == (rows, cols)
    err = (q.T @ q - torch.eye(cols)).abs().max().item()
    assert err <= 1e-5, err


@pytest.mark.parametrize("n,r,reduced", [(7, 3, False), (7, 3, True), (5, 5, False), (6, 1, True), (40, 16, False)])
def test_wy_equals_sequential_reflections(n, r, reduced):
    bottom, top = random_params(n, r, reduced, batch=(2,))
    assert torch.allclose(householder_frame(bottom, top), sequential_householder_frame(bottom, top), atol=1e-12)


def test_identity_params_give_minus_e():
    q = householder_frame(torch.zeros(5, 3), torch.zeros(3))
    assert torch.equal(q, -torch.eye(8, 3))


@pytest.mark.parametrize("reduced", [False, True])
def test_gradcheck_float64(reduced):
    bottom, top = random_params(6, 3, reduced, scale=0.7)
    bottom.requires_grad_(True)
    if top is None:
        assert torch.autograd.gradcheck(lambda b: householder_frame(b, None), (bottom,))
    else:
        top.requires_grad_(True)
        assert torch.autograd.gradcheck(householder_frame, (bottom, top))


@pytest.mark.parametrize("n,r", [(9, 4), (4, 4), (12, 1), (30, 12)])
@pytest.mark.parametrize("reduced", [False, True])
def test_inverse_reproduces_frame(n, r, reduced):
    q, _ = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64))
    bottom, top, signs, p = frame_params_from_frame(q, reduced, flip=True)
    assert bottom.shape == (n - r, r) and (top is None) == reduced
    assert torch.allclose(householder_frame(bottom, top), q @ p * signs, atol=1e-10)
    if reduced:  # only the column space is kept
        assert torch.allclose(q @ q.T, (q @ p) @ (q @ p).T, atol=1e-10)
    else:
        assert torch.equal(p, torch.eye(r, dtype=p.dtype))


def test_inverse_reports_unreachable_column():
    # a square full-St frame has a fixed determinant sign: flip one column and forbid flips
    q = householder_frame(*random_params(4, 4, False))
    q[:, 0] = -q[:, 0]
    with pytest.raises(ValueError, match="cannot reach"):
        frame_params_from_frame(q, reduced=False, flip=False)


def test_stiefel_dof():
    assert stiefel_dof(10, 4, False) == 10 * 4 - 10 and stiefel_dof(10, 4, True) == 24
    with pytest.raises(ValueError):
        stiefel_dof(3, 4, False)


def test_chain_layout_st_u_placement():
    from sttpfast.params import STTPConstant, STTPLearned

    learned = STTPLearned((128, 128, 3, 3), rank=64).layout
    n_out = len(learned.out_modes)
    flags = [c.reduced for c in learned.cores]
    # all but the two cores next to Sigma are on St_U
    assert flags[n_out - 1] is False and flags[n_out] is False
    assert all(flags[:n_out - 1]) and all(flags[n_out + 1:])
    constant = STTPConstant((128, 128, 3, 3), rank=64).layout
    assert [c.reduced for c in constant.cores][n_out - 1] is True
    assert isinstance(STTPLearned((4, 4), rank=2), SpectralChain)


@pytest.mark.parametrize("reduced", [True, False])
def test_identity_init_deviates_from_minus_e_like_the_reference(reduced):
    """The STTP reference perturbs E by 1e-4 * randn before orthogonalizing: our frames at the
    identity init must deviate from -E by the same amount (std 1e-4 below the top block)."""
    from sttpfast.params.chain import IDENTITY_NOISE

    g = torch.Generator().manual_seed(0)
    n, r = 1000, 50
    bottom, top = identity_frame_params(n, r, reduced, IDENTITY_NOISE, dtype=torch.float64, generator=g)
    dev = householder_frame(bottom, top) + torch.eye(n, r, dtype=torch.float64)
    assert 0.98e-4 < dev[r:].std().item() < 1.02e-4
    assert dev.abs().max().item() < 6e-4  # measured 4.3e-4 (the old noise: std 2e-3)
    if reduced:  # St_U: the top block moves at second order only
        assert dev[:r].abs().max().item() < 1e-5  # measured 5.5e-6
