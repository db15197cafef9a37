"""torch.func's transforms (grad, vmap, jacrev) on parameterized models: per-sample gradients
and input Jacobians (a Lipschitz check) give what plain autograd gives. The frame builds and
the frame bank's gated stack are autograd.Functions in the form those transforms accept."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from sttpfast import parameterize


def _model(param):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 4)).double()
    parameterize(model, param, rank=3)
    return model


@pytest.mark.parametrize("param", ["sttp-r", "svdp-c", "sttp-c", "tucker"])
def test_per_sample_gradients_and_input_jacobians_match_autograd(param):
    model = _model(param)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(3, 2, 4, 4, dtype=torch.double)

    def loss(p, xb):
        return functional_call(model, p, (xb.unsqueeze(0),)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(len(x)):
        model.zero_grad()
        model(x[i : i + 1]).square().sum().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-10, atol=1e-12)

    jac = jacrev(lambda xb: functional_call(model, params, (xb,)))(x[:1])
    reference = torch.autograd.functional.jacobian(model, x[:1])
    assert jac.shape == (1, 4, 1, 2, 4, 4)
    torch.testing.assert_close(jac, reference, rtol=1e-10, atol=1e-12)
