"""Train a GAN; the same options as ``sttpfast gan`` (the same code path).

    python apps/gan.py digits --d-param sn --steps 500
    accelerate launch apps/gan.py --dataset fashion_mnist --d-param sttp-c --rank 64 --steps 20000
    accelerate launch apps/gan.py --cfg configs/aistats21/table2_gan_full_discriminator/sttp_c.yml --data-dir ~/data
    torchrun --nproc_per_node 2 apps/gan.py digits --d-param sttp-c --rank 8 --bs 32

Several processes on CPU: torchrun, or ``accelerate launch --multi_gpu --num_processes N``
(they join with gloo when there is no GPU); ``--bs`` is per process.
"""
import sys

from sttpfast.cli import gan

if __name__ == "__main__":
    gan.main(args=sys.argv[1:], prog_name="apps/gan.py")
