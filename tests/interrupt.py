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
