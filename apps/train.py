"""Train a classifier; the same options as ``sttpfast train``.

    python apps/train.py digits --arch resnet20_cifar --param sttp-r --rank 16 --epochs 3
    torchrun --nproc_per_node 2 apps/train.py digits --arch resnet20_cifar --param sttp-r --rank 8
    accelerate launch --multi_gpu --num_processes 2 apps/train.py digits --arch resnet20_cifar --param sttp-r

Several processes on CPU: torchrun, or ``accelerate launch --multi_gpu`` (it starts the
processes, and they join with gloo when there is no GPU). ``accelerate launch --cpu
--num_processes 2`` starts ONE process (accelerate's simple launcher), and accelerate 1.x
refuses ``--cpu`` together with ``--multi_gpu``.
"""
import sys

from sttpfast.cli import train

if __name__ == "__main__":
    train.main(args=sys.argv[1:], prog_name="apps/train.py")
