"""The registry-wide contract: every registered parameterization method, on a Linear, a
Conv2d, a 1x1 conv and a ConvTranspose2d (float64, eval mode):

* right_inverse is exact on weights the format can represent (the weights it produces);
* DOF (the registry's count, and the report's) equals the number of trainable scalars;
* gradcheck through the parametrization (the small Linear);
* densify gives a plain layer with the same outputs;
* the spec round-trips through a checkpoint (save_parameterized / load_parameterized).

The cases are generated from the registry, so a newly registered method is checked too.
"""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sttpfast.checkpoint import load_parameterized, save_parameterized
from sttpfast.params import methods
from sttpfast.params.layers import factors_of, parametrization_of
from sttpfast.surgery import compression_report, densify, parameterization_spec, parameterize

LAYERS = {
    "linear": (lambda: nn.Linear(6, 8), (2, 6)),
    "conv3x3": (lambda: nn.Conv2d(4, 8, 3), (2, 4, 5, 5)),
    "conv1x1": (lambda: nn.Conv2d(6, 8, 1), (2, 6, 5, 5)),
    "convT": (lambda: nn.ConvTranspose2d(4, 6, 3), (2, 4, 5, 5)),
}
NAMES = list(methods())


def pair(kind):
    """Two layers of one kind in a container (two chain layers make a frame bank), float64."""
    make, x_shape = LAYERS[kind]
    torch.manual_seed(1)
    return nn.ModuleDict({"a": make(), "b": make()}).double().eval(), torch.randn(x_shape, dtype=torch.float64)


def parameterized_pair(name, kind):
    model, x = pair(kind)
    entry = methods()[name]
    parameterize(model, name, rank=3 if entry.rank_kind is int else None)
    with torch.no_grad():  # move off the initial point: the contract is not about the init
        for layer in model.values():
            for t in (factors_of(layer) if parametrize.is_parametrized(layer) else ()):
                t.add_(0.1 * torch.randn_like(t))
    return model.eval(), x, entry


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("name", NAMES)
def test_right_inverse_is_exact_on_representable_weights(name, kind):
    model, _, _ = parameterized_pair(name, kind)
    layer = model["a"]
    with torch.no_grad():
        w = layer.weight.detach().clone()  # in the image of the format by construction
        if parametrize.is_parametrized(layer, "weight"):
            layer.weight = w  # parametrize calls right_inverse
        else:
            layer.weight.copy_(w)
        again = layer.weight
    assert ((again - w).norm() / w.norm()).item() < 1e-10


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("name", NAMES)
def test_dof_equals_trainable_scalars(name, kind):
    model, _, entry = parameterized_pair(name, kind)
    layer = model["a"]
    if parametrize.is_parametrized(layer, "weight"):
        trainable = sum(t.numel() for t in layer.parametrizations.weight.parameters() if t.requires_grad)
        shape = tuple(parametrization_of(layer).view.shape) if hasattr(parametrization_of(layer), "view") \
            else tuple(layer.parametrizations.weight.original.shape)
    else:
        trainable, shape = layer.weight.numel(), tuple(layer.weight.shape)
    transposed = isinstance(layer, nn.ConvTranspose2d)
    rank = 3 if entry.rank_kind is int else None
    assert entry.count_dof(shape, transposed, rank) == trainable
    rows = {r.name: r.dof for r in compression_report(model).rows}
    assert rows.get("a", trainable) == trainable


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name):
    model, _, _ = parameterized_pair(name, "linear")
    layer = model["a"]
    if not parametrize.is_parametrized(layer, "weight"):
        w = layer.weight.detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda t: t * 1.0, (w,))  # dense: the identity map
        return
    p = parametrization_of(layer)
    factors = tuple(t.detach().clone().requires_grad_(True) for t in factors_of(layer))
    assert torch.autograd.gradcheck(lambda *f: p(*f), factors)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("name", NAMES)
def test_densify_gives_a_plain_layer_with_the_same_outputs(name, kind):
    model, x, _ = parameterized_pair(name, kind)
    with torch.no_grad():
        out = model["a"](x)
        dense = densify(model)
        assert not any(parametrize.is_parametrized(m) for m in dense.modules())
        assert type(dense["a"]) is parametrize.type_before_parametrizations(model["a"])
        assert (dense["a"](x) - out).abs().max().item() < 1e-12
        assert torch.equal(model["a"](x), out)  # the original is untouched


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("name", NAMES)
def test_spec_round_trips_through_a_checkpoint(name, kind, tmp_path):
    model, x, _ = parameterized_pair(name, kind)
    path = save_parameterized(model, tmp_path / "m.safetensors")
    fresh, _ = pair(kind)
    loaded = load_parameterized(path, fresh).double().eval()
    assert parameterization_spec(loaded) == parameterization_spec(model)
    with torch.no_grad():
        assert (loaded["a"](x) - model["a"](x)).abs().max().item() < 1e-12
        assert (loaded["b"](x) - model["b"](x)).abs().max().item() < 1e-12
