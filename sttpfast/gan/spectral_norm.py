"""Spectral normalization with the exact ``sigma_max`` (an option of the ``sn`` baseline).

PyTorch's ``spectral_norm`` (what ``parameterize(d, "sn")`` registers, as in SNGAN) divides
W by a power-iteration estimate ``sigma = u^T W v``, one iteration per training forward
(15 at registration). The estimate is never above ``sigma_max``, so the layer's norm is
``>= 1``, and it lags when the top of the spectrum is crowded: measured here on the 32 px
discriminator at width 128 (digits, Adam 2e-4), the layers reached ``sigma_max`` 1.05-1.09
within 20 D steps; iterating each forward until the estimate changed by < 1e-7 (up to 1000
iterations) still left 1.017, because dozens of singular values sit within 1% of the top.

:class:`ExactSpectralNorm` sets ``u``, ``v`` to the exact top singular pair before the
forward of every spectral-norm layer whose weight changed since the last time (one
``eigh`` of the smaller Gram matrix, in float64: ~4 ms for 128 x 1152 on one CPU core,
once per D step). PyTorch's own forward then keeps them (they are a fixed point of its
power iteration) and divides by ``sigma_max`` exactly, so the layer's norm is 1 to float
rounding, in training and in evaluation, and the gradient is that of ``W / sigma_max(W)``.
"""
from __future__ import annotations

import torch
from fastai.callback.core import Callback
from torch import Tensor, nn

from sttpfast.surgery import parameterized_layers

__all__ = ["ExactSpectralNorm", "top_singular_pair", "spectral_norm_layers"]


def top_singular_pair(w: Tensor) -> tuple[Tensor, Tensor]:
    """Unit ``u (m,)``, ``v (n,)`` with ``u^T w v = sigma_max(w)`` for ``w (m, n)``, from the
    eigenvectors of the smaller Gram matrix (float64)."""
    w = w.double()
    if w.shape[0] <= w.shape[1]:
        u = torch.linalg.eigh(w @ w.T).eigenvectors[:, -1]
        v = w.T @ u
        return u, v / v.norm().clamp_min(1e-300)
    v = torch.linalg.eigh(w.T @ w).eigenvectors[:, -1]
    u = w @ v
    return u / u.norm().clamp_min(1e-300), v


def spectral_norm_layers(model: nn.Module):
    """Yield ``(name, layer, parametrization)`` for each layer under PyTorch's spectral norm."""
    for name, module, p in parameterized_layers(model):
        if type(p).__name__ == "_SpectralNorm":  # torch's class is private
            yield name, module, p


@torch.no_grad()
def _align_to_top_pair(module: nn.Module, args) -> None:
    p = module.parametrizations.weight[0]
    original = module.parametrizations.weight.original
    # Skip when W is unchanged since the last alignment (the G step's forward, validation
    # batches). A copy is compared, not the version counter: optimizers (fastai's too)
    # update ``p.data`` in place, which does not bump the parameter's version.
    seen = module.__dict__.get("_exact_sn_weight")
    if seen is not None and seen.shape == original.shape and torch.equal(seen, original):
        return
    u, v = top_singular_pair(p._reshape_weight_to_matrix(original))
    p._u.copy_(u)
    p._v.copy_(v)
    module.__dict__["_exact_sn_weight"] = original.detach().clone()


class ExactSpectralNorm(Callback):
    """Make every spectral-norm layer of the target divide by its exact ``sigma_max`` during
    the fit (see the module docstring). Target: ``learn.model.discriminator`` when the model
    has one, else the model. Hooks are added in ``before_fit``, removed after the fit."""

    order = -4  # before anything that runs a forward

    def __init__(self):
        super().__init__()
        self._handles = []

    def before_fit(self):
        model = self.learn.model
        target = getattr(model, "discriminator", None)
        target = model if target is None else target
        self._handles = [m.register_forward_pre_hook(_align_to_top_pair)
                         for _, m, _ in spectral_norm_layers(target)]

    def after_fit(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for _, m, _ in spectral_norm_layers(self.learn.model):
            m.__dict__.pop("_exact_sn_weight", None)
