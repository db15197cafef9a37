"""Spectral regularization by dynamic compensation (Liu et al. 2019), the paper's SR baseline.

Every ``every`` discriminator steps, for each weight ``W`` (matricized ``(d_out, d_in)``):
``W = U diag(s) V^T``; the spectrum normalized by its maximum, ``s / s_1``, updates a
running elementwise maximum ``m <- max(m, s / s_1)`` (the first time: ``m = s / s_1``);
and the weight is rebuilt as ``W <- U diag(m) V^T``. Each normalized spectrum is
descending with first entry 1, so ``m`` is too: right after a compensation every layer's
``sigma_max`` is exactly 1 (float rounding) and the small singular values cannot collapse
below the largest they have had relative to ``s_1``, which is what counters mode collapse.
"""
from __future__ import annotations

import torch
from fastai.callback.core import Callback
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sttpfast.callbacks._util import DENSE_LAYERS, positive_steps, unwrap_model
from sttpfast.params.base import MatrixView
from sttpfast.surgery import parametrization_of

__all__ = ["SpectralCompensation", "compensate"]


def _is_torch_spectral_norm(p: nn.Module) -> bool:
    return type(p).__name__ == "_SpectralNorm"  # torch's class is private


def _raw_weight(module: nn.Module) -> Tensor:
    """The stored dense weight: ``weight`` itself, or spectral norm's unnormalized original."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


@torch.no_grad()
def compensate(weight: Tensor, module: nn.Module, running_max: Tensor | None) -> Tensor:
    """Rebuild ``weight`` (the layer's dense tensor, in place) as ``U diag(m) V^T``.

    ``running_max``: the layer's ``m`` ``(min(d_out, d_in),)`` so far (None the first time).
    Returns the new ``m`` (float64). The SVD is computed in float64 for a sharp result.
    """
    view = MatrixView(tuple(weight.shape), isinstance(module, nn.modules.conv._ConvTransposeNd))
    w = view.to_matrix(weight).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    normalized = s / s[0] if s[0] > 0 else torch.ones_like(s)
    m = normalized if running_max is None else torch.maximum(running_max.to(normalized), normalized)
    weight.copy_(view.from_matrix((u * m) @ vh).to(weight.dtype))
    return m


class SpectralCompensation(Callback):
    """The SR baseline: dynamic spectral compensation of every dense layer of the target.

    Target: ``learn.model.discriminator`` on a GAN learner (a model with a
    ``discriminator``), else the whole model. Layers: every Conv / ConvTranspose / Linear of
    the target whose weight is dense or under PyTorch's spectral norm (``sn``: its original,
    unnormalized weight is compensated, SR on top of SN as in Liu et al.). A layer under a
    low-rank parameterization has no dense weight to rebuild: ``before_fit`` raises a
    ValueError naming it.

    When: ``after_step`` of every ``every``-th step of the target. On a GAN learner these are
    discriminator steps (``learn.gan_phase == "discriminator"``; ``learn.d_iter`` is the
    0-based index of the step), elsewhere every optimizer step (``learn.train_iter``).

    State: ``running_max`` ``{layer name: m (float64, (min(d_out, d_in),))}``,
    ``compensations`` (how many were done); ``state_dict`` / ``load_state_dict`` for resume.
    Order 10, with the other projections (after TrainEvalCallback, before loggers).
    """

    order = 10
    run_valid = False

    def __init__(self, every: int = 5):
        super().__init__()
        self.every = positive_steps(every)
        self.running_max: dict[str, Tensor] = {}
        self.compensations = 0

    # --- which layers -----------------------------------------------------------------------
    def target(self) -> nn.Module:
        model = unwrap_model(self.learn.model)
        discriminator = getattr(model, "discriminator", None)
        return model if discriminator is None else discriminator

    def layers(self) -> list[tuple[str, nn.Module]]:
        """``(name, layer)`` of every layer compensated, in module order (ValueError for a
        layer with a parameterization other than spectral norm)."""
        chosen, refused = [], []
        for name, module in self.target().named_modules():
            if not isinstance(module, DENSE_LAYERS):
                continue
            p = parametrization_of(module)
            if p is None or _is_torch_spectral_norm(p):
                chosen.append((name, module))
            else:
                refused.append(f"{name} ({getattr(p, 'name', type(p).__name__)})")
        if refused:
            raise ValueError(
                f"SpectralCompensation rebuilds dense weights; {len(refused)} layer(s) have a low-rank "
                f"parameterization: {', '.join(refused[:4])}{' ...' if len(refused) > 4 else ''}. "
                "Use it with dense or sn layers (the SR baseline is SN plus compensation).")
        return chosen

    def before_fit(self):
        self.layers()  # fail before the first step, not at the fifth

    # --- when --------------------------------------------------------------------------------
    def _step_index(self) -> int | None:
        phase = getattr(self.learn, "gan_phase", None)
        if phase is None:
            return int(self.learn.train_iter)
        return int(self.learn.d_iter) if phase == "discriminator" else None

    def after_step(self):
        index = self._step_index()
        if index is not None and (index + 1) % self.every == 0:
            self.compensate()

    @torch.no_grad()
    def compensate(self) -> None:
        """Compensate every layer now (what ``after_step`` does every ``every`` steps)."""
        for name, module in self.layers():
            self.running_max[name] = compensate(_raw_weight(module), module, self.running_max.get(name))
        self.compensations += 1

    # --- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"running_max": {k: v.clone() for k, v in self.running_max.items()},
                "compensations": self.compensations}

    def load_state_dict(self, state: dict) -> None:
        self.running_max = {k: v.clone().double() for k, v in state["running_max"].items()}
        self.compensations = int(state["compensations"])
