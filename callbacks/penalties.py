"""Training penalties as callbacks: D-optimal spectrum, Frobenius decay, distillation.

Loss terms are added in ``after_loss`` to ``learn.loss_grad`` (what fastai backpropagates),
never to ``learn.loss``, so the Recorder and the loggers keep showing the task loss; the
penalty values are logged separately. Gradient terms with a closed form (Frobenius decay)
are added in ``after_backward`` instead, without building a graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.optimizer import Optimizer
from torch import nn

from sttpfast.callbacks._util import global_step, log_scalars, non_negative, positive_steps, unwrap_model
from sttpfast.fsdp import gathered_factors
from sttpfast.params.layers import factors_of
from sttpfast.penalties import d_optimal_layers, d_optimal_penalty, frobenius_decay_layers

__all__ = ["DOptimalPenalty", "FrobeniusDecay", "DivergencePenalty"]


class DOptimalPenalty(Callback):
    """Add ``weight * d_optimal_penalty(model)`` (``-mean log|s|`` over learned spectra) to
    the loss that is backpropagated (``after_loss``), pulling spectra towards 1.

    ``only_penalized``: only the ``-R`` layers (the paper's); False also penalizes ``-L``.
    A model without such layers makes it a no-op. The penalty value is logged as
    ``penalty/d_optimal`` every ``log_every`` steps (``after_batch``) and kept in
    ``self.value``. Order 5: after the loss is computed, before NaNGuard (45).
    """

    order = 5
    run_valid = False

    def __init__(self, weight: float = 1.0, only_penalized: bool = True, log_every: int = 50):
        super().__init__()
        self.weight, self.only_penalized = non_negative(weight, "weight"), only_penalized
        self.log_every = positive_steps(log_every, "log_every")
        self.active, self._last = False, None

    def before_fit(self):
        model = unwrap_model(self.learn.model)
        self.active = self.weight != 0 and any(True for _ in d_optimal_layers(model, self.only_penalized))

    def after_loss(self):
        if not self.active or not len(self.learn.yb):
            return
        # a sharded (FSDP2) layer's factors are gathered whole, layer by layer (every rank
        # computes the same penalty; its gradient lands in each rank's shards unaveraged)
        penalty = d_optimal_penalty(unwrap_model(self.learn.model), self.only_penalized, factors=gathered_factors)
        self.learn.loss_grad = self.learn.loss_grad + self.weight * penalty.to(self.learn.loss_grad.device)
        self._last = penalty.detach()  # a float() here would sync a GPU every step

    @property
    def value(self) -> float | None:
        """The penalty (unweighted) of the last training batch."""
        return None if self._last is None else float(self._last)

    def after_batch(self):
        step = global_step(self.learn)
        if self.active and self._last is not None and step % self.log_every == 0:
            log_scalars(self.learn, {"penalty/d_optimal": self.value}, step)


class FrobeniusDecay(Callback):
    """Frobenius decay for low-rank layers (Khodak et al. 2021) in place of weight decay.

    The penalty ``(wd / 2) |U V^T|_F^2`` of each layer whose method takes Frobenius decay
    (the registry's ``penalty``; :class:`~sttpfast.params.LowRank`)
    (``U (d_out, r)``, ``V (d_in, r)``) enters through its analytic gradient, added in
    ``after_backward`` (before the step, after DDP's gradient all-reduce, identically on all
    ranks since the factors are): ``U.grad += wd U (V^T V)``, ``V.grad += wd V (U^T U)``
    (``r x r`` products; ``U V^T`` is never formed). ``before_fit`` switches off the
    optimizer's ordinary weight decay on those factors (fastai ``do_wd = False``), which
    would otherwise decay ``|U|^2 + |V|^2`` as well. Other parameters keep theirs.

    Under fastai's MixedPrecision the gradients are still loss-scaled in
    ``after_backward``; use it in full precision. Order 5.
    """

    order = 5
    run_valid = False

    def __init__(self, wd: float = 5e-4):
        super().__init__()
        self.wd = non_negative(wd, "wd")

    def _factor_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        model = unwrap_model(self.learn.model)
        return [factors_of(m) for _, m, _ in frobenius_decay_layers(model)]

    def before_fit(self):
        if self.learn.opt is None:
            self.learn.create_opt()
        opt = self.learn.opt
        factors = [t for pair in self._factor_pairs() for t in pair]
        if isinstance(opt, Optimizer):
            for t in factors:
                opt.state[t]["do_wd"] = False
            return
        # a wrapped torch optimizer (fastai OptimWrapper): no per-parameter switch exists
        ids = {id(t) for t in factors}
        groups = getattr(getattr(opt, "opt", opt), "param_groups", [])
        if any(g.get("weight_decay", 0) and any(id(p) in ids for p in g["params"]) for g in groups):
            raise ValueError("FrobeniusDecay needs the low-rank factors out of the optimizer's weight "
                             "decay; with a wrapped torch optimizer put them in a parameter group "
                             "with weight_decay=0, or use a fastai optimizer")

    @torch.no_grad()
    def after_backward(self):
        if self.wd == 0:
            return
        for u, v in self._factor_pairs():
            # d/dU (1/2)|U V^T|^2 = U V^T V,  d/dV = V U^T U; both from the r x r Grams
            gu, gv = self.wd * (u @ (v.mT @ v)), self.wd * (v @ (u.mT @ u))
            for t, g in ((u, gu), (v, gv)):
                if not t.requires_grad:
                    continue
                if t.grad is None:
                    t.grad = g
                else:
                    t.grad.add_(g)


class DivergencePenalty(Callback):
    """Knowledge distillation: pull the student's predictions towards a teacher's.

    ``after_loss`` adds ``weight * T^2 * KL(softmax(teacher(x) / T) || softmax(pred / T))``
    (mean over the batch; logits ``(B, n_classes)``; the ``T^2`` keeps the gradient scale
    independent of ``T``, Hinton et al. 2015) to ``learn.loss_grad``. The teacher runs in
    eval mode under ``no_grad`` on the student's device (moved there in ``before_fit``); it
    is typically the pretrained dense model that a parameterized copy compresses. The
    divergence is logged as ``penalty/divergence`` every ``log_every`` steps and kept in
    ``self.value``. Order 5.
    """

    order = 5
    run_valid = False

    def __init__(self, teacher: nn.Module, weight: float = 1.0, temperature: float = 4.0, log_every: int = 50):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.teacher, self.weight, self.temperature = teacher, float(weight), float(temperature)
        self.log_every, self._last = positive_steps(log_every, "log_every"), None

    def before_fit(self):
        device = next(unwrap_model(self.learn.model).parameters()).device
        self.teacher.to(device).eval().requires_grad_(False)

    def after_loss(self):
        if not len(self.learn.yb):  # no loss without targets
            return
        t = self.temperature
        self.teacher.eval()  # in case something switched it back to training mode
        with torch.no_grad():
            teacher_logits = self.teacher(*self.learn.xb)
        student = F.log_softmax(self.learn.pred / t, dim=-1)
        teacher = F.log_softmax(teacher_logits.to(student.dtype) / t, dim=-1)
        # kl_div(input=log q, target=log p, log_target) = sum p (log p - log q) = KL(p || q)
        kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True) * t * t
        self.learn.loss_grad = self.learn.loss_grad + self.weight * kl
        self._last = kl.detach()

    @property
    def value(self) -> float | None:
        """The divergence (``T^2 KL``, unweighted) of the last training batch."""
        return None if self._last is None else float(self._last)

    def after_batch(self):
        step = global_step(self.learn)
        if self._last is not None and step % self.log_every == 0:
            log_scalars(self.learn, {"penalty/divergence": self.value}, step)
