"""sttpfast: train compressed, spectrally controlled neural networks (STTP / SVDP)."""
from setuptools import find_packages, setup

setup(
    name="sttpfast",
    version="0.1.0",
    description="Spectral Tensor Train / SVD parameterizations of deep-learning layers, "
    "with a fastai-style training app",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sttpfast", "sttpfast.*"]) + ["sttpfast.callbacks"],
    # The callback library lives at the top of the repository but imports as
    # sttpfast.callbacks, so that it never collides with a user's own `callbacks` module.
    package_dir={"sttpfast.callbacks": "callbacks"},
    install_requires=[
        # torchvision >= 0.29 pulls a matching torch from PyPI (the CPU-only local wheel
        # cannot load PyPI's torchvision).
        "torch>=2.9",
        "torchvision>=0.29",
        "timm>=1.0",
        "fastai>=2.8",
        "accelerate>=1.0",
        "wandb>=0.18",
        "click>=8.1",
        "tensorboard>=2.15",
        "safetensors>=0.4",
        "opt_einsum>=3.3",
        "pyyaml>=6.0",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",
        "tensorly>=0.8",
        # GAN metrics (IS / FID / KID) and export of densified models to ONNX
        "torch-fidelity>=0.4",
        "onnx>=1.16",
        "onnxscript>=0.5",
    ],
    extras_require={
        # onnxruntime runs the exported file in the tests (and for users who check an export)
        "test": ["pytest>=8", "pytest-timeout>=2.2", "pytest-xdist>=3.5", "onnxruntime>=1.18"],
        "onnx": ["onnxruntime>=1.18"],
        "bench": ["torch-householder"],
    },
    entry_points={"console_scripts": ["sttpfast=sttpfast.cli:main"]},
)
