"""A test callback that ends a fit like a killed job or a Ctrl-C."""
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
