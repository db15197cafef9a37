"""Importing this module registers the paper's architectures in timm's registry."""
from sttpfast.models import resnet_cifar, sngan, vgg_cifar, vit_small, wrn  # noqa: F401  (registration)
