"""Callbacks on the layers' spectra: a hard bound on sigma_max, logging, an orthogonality check.

* :class:`SpectralNormBound` (``after_step``) projects every weight back to
  ``sigma_max <= c`` after each optimizer step.
* :class:`SingularValueLogger` (``after_batch``, ``after_epoch``, ``after_fit``) logs
  ``sigma_max`` and the stable rank of every layer and draws a heat map of the spectra.
* :class:`OrthogonalityMonitor` (``after_batch``) measures how far the chain factors ``U``,
  ``V`` of STTP / SVDP layers are from orthonormal (round-off only, by construction).

On a model sharded with FSDP2 each reads the whole parameters (:func:`sttpfast.fsdp.gathered`,
a collective every rank takes part in, at the same steps) and only rank 0 logs or draws;
the projection writes its result back into every rank's shards.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from fastai.callback.core import Callback
from torch import Tensor, nn

from sttpfast.callbacks._util import (
    global_step,
    is_real,
    is_main_process,
    log_image,
    output_folder,
    positive_steps,
    log_scalars,
    matrix_of,
    run_dir,
    spectral_layers,
    unwrap_model,
)
from sttpfast.fsdp import gathered
from sttpfast.params.layers import factors_of
from sttpfast.params.registry import method_of

__all__ = ["SpectralNormBound", "SingularValueLogger", "OrthogonalityMonitor", "stable_rank", "save_heatmap"]


def stable_rank(s: Tensor) -> float:
    """``sum s^2 / max s^2`` of singular values ``s`` ``(k,)`` (0 for a zero matrix)."""
    top = float(s.max()) if s.numel() else 0.0
    return float((s * s).sum()) / (top * top) if top > 0 else 0.0


class SpectralNormBound(Callback):
    """Keep every layer's largest singular value ``<= c`` by projecting after the step.

    In ``before_fit`` and every ``every`` optimizer steps (``after_step``):

    * plain Conv / ConvTranspose / Linear weights (``include_dense``): the exact
      ``sigma_max`` of the ``(d_out, d_in)`` matrix; if ``> c`` the weight is scaled by
      ``c / sigma_max`` in place (the closest scaling of W that satisfies the bound);
    * parametrizations that offer ``clip_sigma_max(factors, c)`` (low rank ``W = U V^T``
      scales ``U`` and ``V`` by ``sqrt(c / sigma_max)``; the tensor formats, CP / Tucker /
      TT / TR / HT, each of their ``k`` factors by ``(c / sigma_max)^(1/k)``) are asked to clip;
    * methods whose ``sigma_max`` is bounded by construction (the registry's ``bounded``:
      SVDP / STTP, ``sigma_max = g``, their gain, 1 unless converted from a dense weight;
      PyTorch's ``spectral_norm``, ``sigma_max ~ 1``): nothing to do.

    A bound by construction cannot be pushed lower: ``before_fit`` raises a ValueError when
    it exceeds ``c``. Layers with any other parametrization are left alone (one warning).
    Order 10: after TrainEvalCallback, before the Recorder and anything that reads weights.
    """

    order = 10
    run_valid = False

    def __init__(self, c: float = 1.0, every: int = 1, include_dense: bool = True):
        super().__init__()
        if not is_real(c) or not 0 < c < math.inf:
            raise ValueError(f"c must be a positive finite bound on sigma_max, got {c!r}")
        self.c, self.every, self.include_dense = float(c), positive_steps(every), include_dense

    def before_fit(self):
        model = unwrap_model(self.learn.model)
        unbounded, fixed = [], []
        for name, _, p, _ in spectral_layers(model):
            if p is None or callable(getattr(p, "clip_sigma_max", None)):
                continue
            entry = method_of(p)
            bound = entry.spectral_bound(p) if entry is not None else None
            if bound is None:
                unbounded.append(f"{name} ({type(p).__name__})")
            elif bound > self.c * (1 + 1e-6):
                fixed.append(f"{name} ({bound:.4g})")
        if fixed:
            raise ValueError(
                f"SpectralNormBound(c={self.c}) cannot hold for {len(fixed)} layer(s) "
                f"({', '.join(fixed[:4])}{' ...' if len(fixed) > 4 else ''}): their sigma_max is fixed "
                "by construction (SVDP/STTP: learned spectra normalized to max|s| = 1 times the "
                "layer's gain, constant spectra all equal to the gain; spectral_norm divides by "
                "sigma_max). Use a larger c, or scale the layer outputs instead.")
        if unbounded:
            warnings.warn(f"SpectralNormBound does not know how to bound {', '.join(unbounded[:4])}"
                          f"{' ...' if len(unbounded) > 4 else ''}; those layers are left alone",
                          stacklevel=2)
        self.project()  # the bound holds from the first forward pass on, not after step 1

    def after_step(self):
        # train_iter is incremented in after_batch: here it is the 0-based index of this step
        if (global_step(self.learn) + 1) % self.every == 0:
            self.project()

    @torch.no_grad()
    def project(self) -> None:
        """Scale every boundable weight whose ``sigma_max`` exceeds ``c`` back to ``c``."""
        model = unwrap_model(self.learn.model)
        with gathered(model, write_back=True):  # sharded: whole weights, projected, written back
            for _, module, p, _ in spectral_layers(model):
                if p is None and self.include_dense:
                    self._project_dense(module)
                elif p is not None and callable(getattr(p, "clip_sigma_max", None)):
                    p.clip_sigma_max(factors_of(module), self.c)

    def _project_dense(self, module: nn.Module) -> None:
        w = module.weight
        # spectral norm of the (d_out, d_in) matrix; in float32 at least, for a sharp bound
        sigma = float(torch.linalg.matrix_norm(matrix_of(module, w).float(), ord=2))
        if sigma > self.c:
            w.mul_(self.c / sigma)



class SingularValueLogger(Callback):
    """Log every layer's ``sigma_max`` and stable rank, and draw its spectra as a heat map.

    Every ``every`` training steps (``after_batch``) for each layer of
    :func:`~sttpfast.callbacks._util.spectral_layers`: scalars ``sv/{layer}/sigma_max``
    and ``sv/{layer}/stable_rank`` (``sum s^2 / max s^2``) through the learner's loggers,
    and one row ``{"step", "epoch", "layer", "sigma_max", "stable_rank", "values"}`` in
    ``self.history`` (``values``: the top ``top_k`` singular values, a list).

    With ``heatmap``, ``after_epoch`` and ``after_fit`` (``after_cancel_fit`` too, so a
    stopped run still gets it before the loggers close) draw the current top-``top_k``
    singular values of all layers (rows: layers, columns: index, color: value) into
    ``run_dir/singular_values.png`` and send it to the loggers as image ``singular_values``.
    ``heatmap=None`` (the default): drawn when the learner writes somewhere other than the
    current directory (its ``run_dir``, as the apps' learners have, or a ``path`` of its own),
    not next to a script that built a learner without a folder; ``True``: there as well.
    Order 55: after the Recorder, before the loggers (70).
    """

    order = 55
    run_valid = False

    def __init__(self, every: int = 100, top_k: int = 32, heatmap: bool | None = None):
        super().__init__()
        self.every, self.top_k, self.heatmap = positive_steps(every), positive_steps(top_k, "top_k", ""), heatmap
        self.history: list[dict] = []
        self.heatmap_path = None
        self._drawn_at = None

    def before_fit(self):
        self.history, self._drawn_at = [], None

    def spectra(self) -> dict[str, Tensor]:
        """``{layer: singular values (k,)}`` of the model now, descending, on the CPU (a sharded
        model's whole parameters: every rank must call this)."""
        model = unwrap_model(self.learn.model)
        with gathered(model):
            return {name: fn().cpu() for name, _, _, fn in spectral_layers(model)}

    def after_batch(self):
        step = global_step(self.learn)
        if not self.training or step % self.every:  # training steps only, not validation batches
            return
        scalars = {}
        for name, s in self.spectra().items():
            sigma_max, srank = float(s.max()) if s.numel() else 0.0, stable_rank(s)
            scalars[f"sv/{name}/sigma_max"], scalars[f"sv/{name}/stable_rank"] = sigma_max, srank
            self.history.append({"step": step, "epoch": int(self.learn.epoch), "layer": name,
                                 "sigma_max": sigma_max, "stable_rank": srank,
                                 "values": s[: self.top_k].tolist()})
        log_scalars(self.learn, scalars, step)

    def after_epoch(self):
        if self.learn.epoch < getattr(self.learn, "resume_epoch", 0):
            return  # an epoch a resumed run skips: drawn before (it logged step 0 again)
        self._draw()

    def after_cancel_fit(self):
        self._draw()

    def after_fit(self):
        self._draw()

    def _draw(self) -> None:
        step = global_step(self.learn)
        if not self._draws() or self._drawn_at == step:
            return
        self._drawn_at = step
        spectra = self.spectra()  # on every rank: a sharded model gathers its parameters
        if not spectra or not is_main_process():
            return
        path = run_dir(self.learn) / "singular_values.png"
        save_heatmap(spectra, self.top_k, path, title=f"top-{self.top_k} singular values, step {step}")
        self.heatmap_path = path
        log_image(self.learn, "singular_values", path, step)

    def _draws(self) -> bool:
        if self.heatmap is not None:
            return self.heatmap
        return output_folder(self.learn) != Path(".")


def save_heatmap(spectra: dict[str, Tensor], top_k: int, path, title: str = "") -> None:
    """Heat map of ``{layer: s (k,)}``: one row per layer, the first ``top_k`` values as columns
    (missing ones blank), written as a PNG to ``path`` with matplotlib's Agg backend."""
    # a bare Figure renders through Agg by itself: no pyplot state, no global backend switch
    from matplotlib.figure import Figure

    names = list(spectra)
    grid = torch.full((len(names), top_k), float("nan"))
    for i, s in enumerate(spectra.values()):
        k = min(top_k, s.numel())
        grid[i, :k] = s[:k]
    fig = Figure(figsize=(2.0 + 0.25 * top_k, 1.2 + 0.22 * len(names)))
    ax = fig.add_subplot()
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(names)), labels=names, fontsize=6)
    ax.set_xlabel("singular value index")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="singular value")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


class OrthogonalityMonitor(Callback):
    """Check that the chain factors of SVDP / STTP layers stay orthonormal.

    Every ``every`` training steps (``after_batch``), for each layer whose parametrization
    offers ``svd_factors`` (SVDP / STTP), with ``U (d_out, r)``, ``V (d_in, r)``:
    ``err = max(max|U^T U - I|, max|V^T V - I|)``, logged as ``ortho/{layer}``.
    ``self.errors`` holds the latest ``{layer: err}``, ``self.max_error`` the largest
    error seen during the fit. Order 55, like the other monitors.
    """

    order = 55
    run_valid = False

    def __init__(self, every: int = 100):
        super().__init__()
        self.every = positive_steps(every)
        self.max_error = 0.0
        self.errors: dict[str, float] = {}

    def before_fit(self):
        self.max_error, self.errors = 0.0, {}

    @torch.no_grad()
    def measure(self) -> dict[str, float]:
        """``{layer: orthogonality error}`` of every chain layer now."""
        errors = {}
        model = unwrap_model(self.learn.model)
        with gathered(model):  # sharded: the whole factors, on every rank
            for name, module, p, _ in spectral_layers(model):
                if not callable(getattr(p, "svd_factors", None)):
                    continue  # only parametrizations with orthonormal factors offer svd_factors
                u, _, v = p.svd_factors(*factors_of(module))
                eye = torch.eye(u.shape[-1], dtype=u.dtype, device=u.device)
                errors[name] = max(float((u.mT @ u - eye).abs().max()), float((v.mT @ v - eye).abs().max()))
        return errors

    def after_batch(self):
        step = global_step(self.learn)
        if not self.training or step % self.every:  # training steps only, not validation batches
            return
        self.errors = self.measure()
        if self.errors:
            self.max_error = max(self.max_error, *self.errors.values())
            log_scalars(self.learn, {f"ortho/{k}": v for k, v in self.errors.items()}, step)
