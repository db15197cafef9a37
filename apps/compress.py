"""Compress a dense run in three phases; the same options as ``sttpfast compress``.

    python apps/compress.py runs/dense_resnet20 --param tt --compression 10 --phases 0,1,2 --epochs 3
"""
import sys

from sttpfast.cli import compress

if __name__ == "__main__":
    compress.main(args=sys.argv[1:], prog_name="apps/compress.py")
