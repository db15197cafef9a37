"""Spectral init of a square full-rank fixed-spectrum chain (svdp-c / sttp-c on Linear(8, 8)).

Such a chain holds ``g`` times an orthogonal matrix of one determinant sign only. A weight
whose polar factor has the other sign gets the closest matrix the chain holds: the last
(smallest) singular direction flipped, ``g = (S_1 + ... + S_7 - S_8) / 8``, Frobenius error
``sqrt(sum S_i^2 - 8 g^2)`` (see ``SpectralChain.decompose``).
"""
import math

import pytest
import torch
from torch import nn

import sttpfast

SPECTRUM = [3.0, 2.5, 2.0, 1.5, 1.2, 1.0, 0.8, 0.5]


def linear_with(det_sign: float) -> nn.Sequential:
    """Linear(8, 8) in float64 with singular values SPECTRUM and sign(det W) = det_sign."""
    gen = torch.Generator().manual_seed(0)
    a, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    b, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    if torch.linalg.det(a @ b.T) * det_sign < 0:
        a[:, 0] = -a[:, 0]
    model = nn.Sequential(nn.Linear(8, 8)).double()
    with torch.no_grad():
        model[0].weight.copy_(a @ torch.diag(torch.tensor(SPECTRUM, dtype=torch.float64)) @ b.T)
    return model


@pytest.mark.parametrize("param", ["svdp-c", "sttp-c"])
def test_other_determinant_sign_gets_the_closest_representable_matrix(param):
    model = linear_with(-1.0)
    weight = model[0].weight.detach().clone()
    sttpfast.parameterize(model, param, init="spectral")  # raised "frame column 7 is +e_7" before
    layer = model[0]
    gain = layer.parametrizations.weight[0].gain.item()
    assert gain == pytest.approx(1.4375, rel=1e-12)  # (12.5 - 2 * 0.5) / 8
    error = (layer.weight - weight).norm().item()
    assert error == pytest.approx(math.sqrt(24.83 - 8 * 1.4375**2), rel=1e-10)  # sqrt(8.29875)
    # what it holds: gain times an orthogonal matrix of determinant +1
    q = layer.weight.detach() / gain
    assert torch.allclose(q @ q.T, torch.eye(8, dtype=torch.float64), atol=1e-12)
    assert torch.linalg.det(q).item() == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("param", ["svdp-c", "sttp-c"])
def test_same_determinant_sign_keeps_the_polar_factor(param):
    model = linear_with(1.0)
    weight = model[0].weight.detach().clone()
    sttpfast.parameterize(model, param, init="spectral")
    gain = model[0].parametrizations.weight[0].gain.item()
    assert gain == pytest.approx(12.5 / 8, rel=1e-12)  # mean(S)
    error = (model[0].weight - weight).norm().item()
    assert error == pytest.approx(math.sqrt(24.83 - 8 * (12.5 / 8) ** 2), rel=1e-10)
