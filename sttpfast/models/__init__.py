"""Architectures registered in timm's registry (importing this module registers them)."""
from sttpfast.models import resnet_cifar, sngan, vgg_cifar, wrn  # noqa: F401  (registration)
from sttpfast.models.resnet_cifar import CifarResNet
from sttpfast.models.sngan import SNGANDiscriminator, SNGANGenerator
from sttpfast.models.vgg_cifar import CifarVGG
from sttpfast.models.wrn import WideResNet

__all__ = ["CifarResNet", "CifarVGG", "SNGANDiscriminator", "SNGANGenerator", "WideResNet"]
