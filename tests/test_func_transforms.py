"""torch.func's transforms on parameterized models: per-sample gradients, input Jacobians (a
Lipschitz check), forward mode and second order give what plain autograd (or central
differences) gives. Inside a transform the frames are plain torch ops and the frame bank
stacks plainly (the hand-derived backwards are first order only)."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacfwd, jacrev, vmap

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


def test_second_order_and_forward_mode_are_exact():
    """Inside the transforms the frames are plain torch ops: a MAML meta-gradient (grad of a
    loss after an inner grad step) matches central differences (the hand-derived backward,
    first order only, gave it wrong by 20-260% without a word), and jacfwd equals jacrev."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    parameterize(model, "sttp-r", rank=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, y = torch.randn(5, 4, dtype=torch.double), torch.randn(5, 3, dtype=torch.double)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss(p):
        return (functional_call(model, p, (x,)) - y).square().sum()

    def meta(p):
        g = grad(loss)(p)
        return loss({k: p[k] - 0.1 * g[k] for k in p})

    meta_grad = grad(meta)(params)
    eps = 1e-6
    for name, value in params.items():
        for i in range(min(3, value.numel())):
            up = {k: v.clone() for k, v in params.items()}
            down = {k: v.clone() for k, v in params.items()}
            up[name].view(-1)[i] += eps
            down[name].view(-1)[i] -= eps
            numeric = (meta(up) - meta(down)) / (2 * eps)
            assert abs(float(meta_grad[name].view(-1)[i] - numeric)) <= 1e-6 * max(1.0, abs(float(numeric))), name
    forward = jacfwd(lambda xb: functional_call(model, params, (xb,)))(x[:1])
    torch.testing.assert_close(forward, jacrev(lambda xb: functional_call(model, params, (xb,)))(x[:1]),
                               rtol=1e-10, atol=1e-12)
