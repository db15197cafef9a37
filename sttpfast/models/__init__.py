"""Architectures registered in timm's registry (importing this module registers them)
and :func:`create_model`, the one model factory."""
from sttpfast.models import registered  # noqa: F401  (registration)
from sttpfast.models.factory import create_model
from sttpfast.models.resnet_cifar import CifarResNet
from sttpfast.models.sngan import SNGANDiscriminator, SNGANGenerator
from sttpfast.models.vgg_cifar import CifarVGG
from sttpfast.models.wrn import WideResNet

__all__ = ["create_model", "CifarResNet", "CifarVGG", "SNGANDiscriminator", "SNGANGenerator", "WideResNet"]
