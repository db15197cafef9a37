"""GAN training: the two-optimizer learner, its objectives and the generator's moving average.

    from sttpfast.gan import gan_learner
    learn = gan_learner(dls, g="sngan_g32", d="sngan_d32", d_param="sttp-c", rank=64)
    learn.fit(steps=20000)

Modules (imports flow down): ``losses`` (hinge / non-saturating), ``reals`` (real images
into ``[-1, 1]``), ``ema`` (:class:`GeneratorEMA`), ``learner`` (:class:`GANLearner`,
:func:`gan_learner`), ``extractor`` (an offline feature extractor for torch-fidelity), ``metrics``
(:class:`GANMetrics`: IS / FID / KID every N steps; loaded on first use, like torch-fidelity).
The app on top (imported by ``sttpfast gan`` / apps/gan.py, not here): ``checkpoint``
(:class:`GANCheckpointer`, exact resume), ``distributed`` (several processes), ``run`` (:func:`run_gan`).
"""
import importlib

from sttpfast.gan.ema import GeneratorEMA, ema_update, make_ema_copy
from sttpfast.gan.learner import DISCRIMINATOR, GENERATOR, GANLearner, GANPair, LinearLRDecay, gan_learner
from sttpfast.gan.losses import GAN_LOSSES, GANLoss, gan_loss
from sttpfast.gan.reals import to_gan_range

__all__ = [
    "gan_learner", "GANLearner", "GANPair", "LinearLRDecay", "GENERATOR", "DISCRIMINATOR",
    "GeneratorEMA", "ema_update", "make_ema_copy", "GANLoss", "GAN_LOSSES", "gan_loss", "to_gan_range",
    "GANMetrics", "fidelity_metrics", "train_offline_extractor", "register_offline_extractor",
]

# name -> module, imported on first use (torch-fidelity is only needed for metrics)
_LAZY = {"GANMetrics": "sttpfast.gan.metrics", "fidelity_metrics": "sttpfast.gan.metrics",
         "train_offline_extractor": "sttpfast.gan.extractor",
         "register_offline_extractor": "sttpfast.gan.extractor"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sttpfast.gan' has no attribute {name!r}")
