"""Spectral callbacks read what a parametrization offers (its bound, its spectrum) through
the registry: converted layers keep their gain, and the bound check names it."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import sttpfast
from sttpfast.callbacks.spectral import OrthogonalityMonitor, SpectralNormBound
from sttpfast.callbacks._util import matrix_of, spectral_layers
from sttpfast.penalties import d_optimal_layers, frobenius_decay_layers


def converted(param, scale):
    """Two Linear layers with sigma_max = scale each, converted with init="spectral"."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 5)).double()
    with torch.no_grad():
        for layer in model:
            layer.weight.mul_(scale / torch.linalg.svdvals(layer.weight)[0])
    sttpfast.parameterize(model, param, init="spectral")
    return model


@pytest.mark.parametrize("param", ["svdp-l", "sttp-r", "svdp-c"])
def test_bound_check_uses_each_layers_gain(param):
    model = converted(param, 3.0)
    bounds = [p.spectral_bound() for _, _, p, _ in spectral_layers(model)]
    if param == "svdp-c":  # the gain is the mean singular value there, below sigma_max
        assert all(1.0 < b < 3.0 for b in bounds)
    else:
        assert bounds == pytest.approx([3.0, 3.0], abs=1e-12)
    cb = SpectralNormBound(c=max(bounds) * 0.9)
    cb.learn = SimpleNamespace(model=model)
    with pytest.raises(ValueError, match=r"cannot hold for 2 layer\(s\) \(0 \(.*\), 1 \(.*\)\).*gain"):
        cb.before_fit()
    ok = SpectralNormBound(c=max(bounds) * 1.01)
    ok.learn = SimpleNamespace(model=model)
    ok.before_fit()  # nothing to project, nothing raised


def test_spectra_come_from_the_parametrization_with_the_gain():
    model = converted("sttp-l", 2.5)
    for _, module, p, sigma in spectral_layers(model):
        exact = torch.linalg.svdvals(module.weight.detach().reshape(module.weight.shape[0], -1))
        got = sigma()
        assert torch.allclose(got.double(), exact[: got.numel()], atol=1e-5)
        assert got[0].item() == pytest.approx(2.5, abs=1e-5)


def test_penalty_layers_follow_the_registry():
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 4))
    sttpfast.parameterize(model, "sttp-r", rank=2, include=["0"])
    sttpfast.parameterize(model, "svdp-l", rank=2, include=["1"])
    sttpfast.parameterize(model, "lowrank", rank=2, include=["2"])
    assert [n for n, _, _ in d_optimal_layers(model)] == ["0"]
    assert [n for n, _, _ in d_optimal_layers(model, only_penalized=False)] == ["0", "1"]
    assert [n for n, _, _ in frobenius_decay_layers(model)] == ["2"]
    mon = OrthogonalityMonitor()
    mon.learn = SimpleNamespace(model=model)
    assert set(mon.measure()) == {"0", "1"}  # the layers that offer orthonormal factors


@pytest.mark.parametrize("training", [True, False])
def test_singular_values_are_logged_on_training_steps_only(training):
    from sttpfast.callbacks.spectral import SingularValueLogger

    model = converted("sttp-l", 2.0)
    cb = SingularValueLogger(every=1)
    cb.learn = SimpleNamespace(model=model, train_iter=4, epoch=0, training=training, cbs=[])
    cb.history = []
    cb.after_batch()
    # a validation batch at a logging step used to log one more row per layer and batch
    assert len(cb.history) == (2 if training else 0)


def test_reading_the_spectrum_of_an_sn_layer_does_not_advance_its_power_iteration():
    """Logging must not change training: torch's spectral norm runs one power iteration each
    time its weight is read in training mode, so a logger reading it moved u and v."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    sttpfast.parameterize(model, "sn")
    model.train()
    sn = model[0].parametrizations.weight[0]
    u, v = sn._u.clone(), sn._v.clone()
    for _, _, _, sigma in spectral_layers(model):
        sigma()
    assert torch.equal(sn._u, u) and torch.equal(sn._v, v)
    assert model.training and sn.training  # the mode is restored


def test_the_spectrum_of_a_non_finite_weight_is_nan_not_an_exception():
    """A diverged run (NaNGuard stops it) still draws its heat map at after_cancel_fit: svdvals
    of a matrix with inf raised LinAlgError inside the callback and hid NaNGuard's message."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 5))
    with torch.no_grad():
        model[0].weight[1, 2] = float("inf")
        model[1].weight[0, 0] = float("nan")  # NaN is what made svdvals raise
    spectra = {name: sigma() for name, _, _, sigma in spectral_layers(model)}
    assert list(spectra) == ["0", "1"] and [s.shape for s in spectra.values()] == [(3,), (3,)]
    assert all(torch.isnan(s).all() for s in spectra.values())


@pytest.mark.parametrize("param", ["cp", "rcp", "tucker", "rtk", "tt", "rtt", "tr", "rtr", "ht"])
def test_spectral_norm_bound_holds_on_the_tensor_formats(param):
    """SpectralNormBound left CP / Tucker / TT / TR / HT layers alone (one warning): after a
    fit with c=0.5 a Tucker layer had sigma_max 3.13. Each factor is scaled by
    (c / sigma_max)^(1/k): the weight by c / sigma_max, the factors' balance kept."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.Conv2d(6, 8, 3), nn.Linear(8, 4), nn.ConvTranspose2d(6, 4, 3))
    with torch.no_grad():
        model[0].weight.mul_(5.0)  # sigma_max ~ 4: above the bound, and the transposed conv's
        model[3].weight.mul_(20.0)
        model[2].weight.mul_(0.01)  # below it
    sttpfast.parameterize(model, param, rank=2)
    sigma = {name: float(s()[0]) for name, _, _, s in spectral_layers(model)}
    assert sigma["0"] > 1.0 and sigma["3"] > 1.0 and sigma["2"] < 0.5
    weights = {name: m.weight.detach().clone() for name, m, _, _ in spectral_layers(model)}
    cb = SpectralNormBound(c=0.5)
    cb.learn = SimpleNamespace(model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "does not know how to bound"
        cb.before_fit()
    for name, module, _, s in spectral_layers(model):
        exact = float(torch.linalg.matrix_norm(matrix_of(module, module.weight.detach()), ord=2))
        if sigma[name] > 0.5:
            assert exact == pytest.approx(0.5, rel=1e-5), name
            assert torch.allclose(module.weight, weights[name] * (0.5 / sigma[name]), rtol=1e-4, atol=1e-7)
        else:
            assert torch.equal(module.weight, weights[name]), name
