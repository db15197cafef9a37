"""SIGTERM / SIGINT / SIGUSR1 during training, acted on at the next loop hook.

The handler only sets a flag (no I/O inside a signal handler); the callback acts after the
current training step (or at the epoch end when the signal came during validation):

* SIGTERM, SIGINT: stop by raising :class:`StopRequested` (a KeyboardInterrupt, which the
  run turns into a checkpoint, the resume command and exit status 128 + signal number:
  130 for SIGINT, 143 for SIGTERM). A second one while stopping exits at once, with that
  status: also after :meth:`SignalCheckpoint.uninstall`, while the run writes its
  interrupted checkpoint and the interpreter shuts down (the process is on its way out;
  a KeyboardInterrupt there would end it with a traceback or killed by SIGINT instead).
* SIGUSR1 (what cluster schedulers send before the time limit): write a checkpoint and
  continue.
"""
from __future__ import annotations

import os
import signal
import threading

from fastai.callback.core import Callback

from sttpfast.callbacks._util import end_progress_line

__all__ = ["SignalCheckpoint", "StopRequested"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(KeyboardInterrupt):
    """Training stopped by ``signum``; the exit status is ``128 + signum``."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def _exit_at_once(signum, frame):
    """The second stop signal: end now, no checkpoint (the last complete one stays), exit
    status 128 + signum."""
    os._exit(128 + signum)


class SignalCheckpoint(Callback):
    """Install with :meth:`install` around the fit, remove with :meth:`uninstall`.

    Args:
        checkpoint: called with no argument for SIGUSR1; returns the step saved (or None).
        echo: where to say what was done.
    """

    order = 95  # after every other after_batch: the step is complete

    def __init__(self, checkpoint, echo=print):
        self.checkpoint, self.echo = checkpoint, echo
        self.stop_signal = None
        self.checkpoint_requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGUSR1:
            self.checkpoint_requested = True
        elif self.stop_signal is not None:
            _exit_at_once(signum, frame)
        else:
            self.stop_signal = signum

    def install(self) -> "SignalCheckpoint":
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for signum in (*STOP_SIGNALS, signal.SIGUSR1):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the previous handlers; after a stop signal, SIGINT and SIGTERM instead end
        the process at once from now on (it is stopping: the user's second signal wins)."""
        for signum, handler in self._previous.items():
            stopping = self.stop_signal is not None and signum in STOP_SIGNALS
            signal.signal(signum, _exit_at_once if stopping else handler)
        self._previous = {}

    def _agree(self) -> tuple[int | None, bool]:
        """``(stop signal, checkpoint request)`` to act on at this step.

        Several processes act together. The launcher's signal reaches each rank at a
        slightly different step, so the requests are merged over the ranks (one tiny
        all-reduce per step) and every rank acts at the same step: a rank that stopped alone
        left the others in the next step's gradient all-reduce (DDP, the GAN's own sync),
        and saving a sharded (FSDP2) model gathers it, a collective every rank must join.
        A signal whose handler runs while the all-reduce waits (Python runs it when the call
        returns) is not in this step's flags: it stays set, for the next step's agreement
        (overwritten by the reduced flags, it was lost)."""
        import torch
        import torch.distributed as dist

        model = getattr(self.learn, "model", None)
        if model is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.stop_signal, self.checkpoint_requested
        flags = torch.tensor([self.stop_signal or 0, int(self.checkpoint_requested)],
                             device=next(model.parameters()).device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, checkpoint = int(flags[0]) or None, bool(flags[1])
        if stop is not None:  # every rank is stopping now (a second signal then exits at once)
            self.stop_signal = stop
        return stop, checkpoint

    def _act(self):
        stop, checkpoint = self._agree()
        if checkpoint:
            self.checkpoint_requested = False
            step = self.checkpoint()
            if step is not None:
                # below a bar drawn part-way, not glued to its line; the bar goes on below it
                end_progress_line(self.learn)
                self.echo(f"SIGUSR1: checkpoint saved at step {step}; training continues")
        if stop is not None:
            raise StopRequested(stop)

    def after_batch(self):
        if self.training:
            self._act()

    def after_epoch(self):
        self._act()
