"""GAN objectives: the hinge loss (SNGAN, the STTP paper) and the non-saturating loss.

Each objective is a pair of functions of the discriminator's scores (critic outputs,
any shape ``(B, 1)`` or ``(B,)``): the discriminator's loss of real and fake scores, and
the generator's loss of the fake scores. Both are means over the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from torch import Tensor

__all__ = ["GANLoss", "GAN_LOSSES", "gan_loss", "hinge_d", "hinge_g", "ns_d", "ns_g"]


def hinge_d(real: Tensor, fake: Tensor) -> Tensor:
    """``mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))`` (Lim & Ye; Miyato et al.)."""
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def hinge_g(fake: Tensor) -> Tensor:
    """``-mean(D(G(z)))``."""
    return -fake.mean()


def ns_d(real: Tensor, fake: Tensor) -> Tensor:
    """Cross-entropy of the scores as logits: ``mean(softplus(-D(x))) + mean(softplus(D(G(z))))``."""
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def ns_g(fake: Tensor) -> Tensor:
    """The non-saturating generator loss (Goodfellow et al.): ``mean(softplus(-D(G(z))))``."""
    return F.softplus(-fake).mean()


@dataclass(frozen=True)
class GANLoss:
    """A named pair ``discriminator(real_scores, fake_scores)`` / ``generator(fake_scores)``."""

    name: str
    discriminator: Callable[[Tensor, Tensor], Tensor]
    generator: Callable[[Tensor], Tensor]


GAN_LOSSES: dict[str, GANLoss] = {
    "hinge": GANLoss("hinge", hinge_d, hinge_g),
    "ns": GANLoss("ns", ns_d, ns_g),
}


def gan_loss(name: str) -> GANLoss:
    """The objective called ``name`` (``hinge`` or ``ns``), or a ValueError listing them."""
    if name not in GAN_LOSSES:
        raise ValueError(f"unknown GAN loss {name!r}; allowed: {', '.join(GAN_LOSSES)}")
    return GAN_LOSSES[name]
