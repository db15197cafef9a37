"""Train a classifier; the same options as ``sttpfast train``.

    python apps/train.py digits --arch resnet20_cifar --param sttp-r --rank 16 --epochs 3
    accelerate launch apps/train.py fashion_mnist --arch resnet20_cifar --param sttp
    torchrun --nproc_per_node 2 apps/train.py digits --arch resnet20_cifar --param sttp-r --rank 8
"""
import sys

from sttpfast.cli import train

if __name__ == "__main__":
    train.main(args=sys.argv[1:], prog_name="apps/train.py")
