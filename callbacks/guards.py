"""Guards that stop a run that went wrong before it damages the weights."""
from __future__ import annotations

import torch
import torch.distributed as dist
from fastai.callback.core import Callback, CancelFitException

from sttpfast.callbacks._util import global_step, is_main_process, log_scalars

__all__ = ["NaNGuard"]


class NaNGuard(Callback):
    """Stop training at the first non-finite training loss, before it reaches the weights.

    ``after_loss`` checks ``learn.loss_grad`` (what would be backpropagated, penalties
    included) and ``learn.loss``. If either is NaN/inf it sets ``learn.nan_step`` to the
    0-based index of the offending step (``learn.train_iter``), prints one line, logs
    ``nan_step``, and raises fastai's ``CancelFitException``: backward and the optimizer
    step never run, so the weights are those after the last good step, and fastai still
    runs ``after_cancel_fit`` / ``after_fit`` (loggers close, checkpoints stay sane).

    Distributed: the flag is all-reduced so every rank stops at the same step (a rank that
    stopped alone would leave the others waiting in the next all-reduce).
    Order 45: after the loss penalties (5), which may be the source of the NaN.
    """

    order = 45
    run_valid = False

    def after_loss(self):
        if not len(self.learn.yb):
            return
        loss_grad, loss = self.learn.loss_grad, self.learn.loss
        bad = ~(torch.isfinite(loss_grad.detach()).all() & torch.isfinite(loss.detach()).all())
        if dist.is_available() and dist.is_initialized():
            flag = bad.to(device=loss_grad.device, dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = flag.bool()
        if not bool(bad):
            return
        step = global_step(self.learn)  # after_loss: not yet incremented = this step's index
        self.learn.nan_step = step
        if is_main_process():
            print(f"NaNGuard: non-finite loss at step {step} (epoch {self.learn.epoch}, "
                  f"loss={float(loss.detach().float().mean()):g}, loss_grad={float(loss_grad.detach().float().mean()):g}); "
                  "training stopped before backward, weights are those of the last good step",
                  flush=True)
        log_scalars(self.learn, {"nan_step": step}, step)
        raise CancelFitException()
