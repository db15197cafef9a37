"""Build parameterized weights once per validation pass instead of once per batch.

A parameterized layer rebuilds its dense weight from the factors on every forward. In
training that is needed (the factors change every step); in validation the factors are
fixed, so ``torch.nn.utils.parametrize.cached()`` lets the first batch build every weight
and the other batches reuse it.

``cached()`` is process-wide state (a counter in ``torch.nn.utils.parametrize``), so the
callback makes sure it is never left on where training could see a stale weight: it is
released in ``after_validate``, in ``after_cancel_validate``, and, in case an exception
that fastai does not catch (KeyboardInterrupt, an error in a callback) skipped those, again
before every training batch, at the start of every fit and at its end.
"""
from __future__ import annotations

from fastai.callback.core import Callback
from torch.nn.utils import parametrize

__all__ = ["CachedValidationWeights"]


class CachedValidationWeights(Callback):
    """Enter ``parametrize.cached()`` for each validation pass (see the module docstring).

    Order -20: the cache is on before any other callback of ``before_validate`` reads a
    weight, and off (``after_validate`` runs in order too) only once the pass is over.
    """

    order = -20

    def __init__(self):
        self._context = None  # the entered ``cached()`` context manager, while validating

    @property
    def active(self) -> bool:
        """Whether this callback holds the cache on right now."""
        return self._context is not None

    def release(self) -> None:
        """Leave the cache (discarding the built weights); a no-op when not holding it."""
        context, self._context = self._context, None
        if context is not None:
            context.__exit__(None, None, None)

    def before_validate(self):
        self.release()  # never nest: one context per pass
        self._context = parametrize.cached()
        self._context.__enter__()

    def after_validate(self):
        self.release()

    def after_cancel_validate(self):
        self.release()

    def before_fit(self):
        self.release()

    def before_batch(self):
        if self.training:
            self.release()

    def after_cancel_fit(self):
        self.release()

    def after_fit(self):
        self.release()
