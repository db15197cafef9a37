"""One reader per on-disk dataset format; each returns a :class:`~sttpfast.data.readers.raw.RawDataset`.

    idx.py          MNIST / Fashion-MNIST IDX files (gzipped or not)
    cifar.py        CIFAR-10 / CIFAR-100 python pickle batches (restricted unpickler)
    stl.py          STL-10 binaries
    imagefolder.py  Tiny ImageNet and ``imagefolder:PATH`` folders of image files
    digits.py       scikit-learn's bundled digits (no files at all)

Readers know only the files they read: not the registry, not the loaders, not downloading.
A missing file raises :class:`~sttpfast.data.errors.DatasetNotFound` naming the exact paths
expected (the caller appends how to obtain the dataset); a malformed one
:class:`~sttpfast.data.errors.DatasetCorrupt` naming the file.
"""
