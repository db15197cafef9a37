"""Test helpers for interrupts: a callback that ends a fit like a killed job or a Ctrl-C, what
the terminal shows above a message, and a process's signal masks."""
from pathlib import Path

from fastai.callback.core import Callback, CancelFitException


class Interrupt(Callback):
    """Raises ``exception`` after ``k`` optimizer steps (after that step's checkpoint): fastai's
    CancelFitException ends the fit like a killed job, KeyboardInterrupt is a Ctrl-C."""

    order = 90

    def __init__(self, k, exception=CancelFitException):
        self.k, self.exception = k, exception

    def after_batch(self):
        if self.training and self.train_iter == self.k:
            raise self.exception()


def bar_shown_above(lines, said):
    """The progress bar's line as a terminal shows it, just above the line ``said`` of a
    captured stdout split at newlines (``lines``): fastprogress redraws its bar after carriage
    returns, so the terminal shows what follows the last one. Fails when ``said`` is missing."""
    assert said in lines, lines[-6:]
    return lines[lines.index(said) - 1].split("\r")[-1]


def signal_in_mask(pid: int, mask: str, signum: int) -> bool:
    """Whether ``signum`` is in process ``pid``'s ``mask`` in /proc/PID/status: ``"SigIgn"``
    (it ignores the signal) or ``"SigCgt"`` (a handler of its own catches it). False once
    the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(mask + ":"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        pass
    return False


def tensorboard_scalars(tb) -> dict:
    """Every scalar of a TensorBoard folder, all its event files merged as TensorBoard merges
    them: ``{tag: [(step, value), ...]}`` in step order. TensorBoard reads the files in name
    order (seconds, host, pid): a run resumed within the second of its kill, from a lower pid,
    is read before the killed process's file (a full suite saw steps [8, 10, 4])."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: sorted(((e.step, e.value) for e in acc.Scalars(tag)), key=lambda point: point[0])
            for tag in acc.Tags()["scalars"]}

