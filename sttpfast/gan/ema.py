"""An exponential moving average of the generator's weights (BigGAN / StudioGAN style).

After every generator step ``k`` (1-based count of G steps done):
``p_ema <- lerp(p, p_ema, decay)`` i.e. ``decay * p_ema + (1 - decay) * p`` for every
parameter and floating-point buffer (BN running statistics), with ``decay = 0`` (a plain
copy) while ``k < start``; integer buffers (``num_batches_tracked``) are copied.
For a parameterized generator the average is taken over the free parameters (the factors),
not over the built weights: every value of the factors is a valid weight of the same form,
so the averaged generator keeps its parameterization (and its bounds) exactly.
Under FSDP2 the copy is sharded like the generator and averaged shard by shard.
"""
from __future__ import annotations

import copy

import torch
from fastai.callback.core import Callback
from torch import nn

__all__ = ["GeneratorEMA", "ema_update", "make_ema_copy"]


def make_ema_copy(generator: nn.Module) -> nn.Module:
    """A frozen deep copy of ``generator`` (no parameter requires grad), to hold the average."""
    ema = copy.deepcopy(generator)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` on parameters and floating buffers (in place);
    other buffers are copied. The two modules must have the same structure. Both sharded
    alike (FSDP2, :func:`sttpfast.gan.distributed.shard_gan`): both are resharded first (a
    root keeps its parameters whole after its forward: G's, or the EMA's after sampling),
    then each rank averages its own slices (no communication)."""
    from sttpfast.fsdp import fsdp_units

    for unit in fsdp_units(model) + fsdp_units(ema):
        unit.reshard()
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        if e.is_floating_point():
            e.lerp_(b, 1.0 - decay)
        else:
            e.copy_(b)


class GeneratorEMA(Callback):
    """Keep ``learn.model.generator_ema`` the moving average of ``learn.model.generator``.

    ``after_batch`` of each training iteration (one G step, see :mod:`sttpfast.gan.learner`):
    ``k = learn.train_iter`` G steps are done (TrainEvalCallback, order -10, counted it);
    the update uses ``decay`` once ``k >= start`` and copies before. If the pair has no
    ``generator_ema`` yet, ``before_fit`` creates it (:func:`make_ema_copy`); the factory
    creates it up front so that checkpoints always hold it.
    """

    order = 0
    run_valid = False

    def __init__(self, decay: float = 0.9999, start: int = 0):
        super().__init__()
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay!r}")
        if int(start) < 0:
            raise ValueError(f"EMA start must be a step count >= 0, got {start!r}")
        self.decay, self.start = float(decay), int(start)

    def before_fit(self):
        pair = self.learn.model
        if getattr(pair, "generator_ema", None) is None:
            pair.generator_ema = make_ema_copy(pair.generator)

    def after_batch(self):
        step = int(self.learn.train_iter)
        decay = self.decay if step >= self.start else 0.0
        ema_update(self.learn.model.generator_ema, self.learn.model.generator, decay)
