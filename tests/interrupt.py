"""A test callback that ends a fit like a killed job."""
from fastai.callback.core import Callback, CancelFitException


class Interrupt(Callback):
    """Stops the fit after ``k`` optimizer steps, like a killed job (after that step's checkpoint)."""

    order = 90

    def __init__(self, k):
        self.k = k

    def after_batch(self):
        if self.training and self.train_iter == self.k:
            raise CancelFitException()
