"""sttpfast's fastai callbacks (imported as ``sttpfast.callbacks``).

    from sttpfast.callbacks import SpectralNormBound, SingularValueLogger, TensorBoardLogger
    learn = Learner(dls, model, cbs=[SpectralNormBound(1.0), SingularValueLogger(every=50),
                                     TensorBoardLogger()])

Every callback unwraps DDP / accelerate models and logs only on the main process.
"""
from sttpfast.callbacks._util import (
    is_main_process,
    log_image,
    log_scalars,
    loggers,
    run_dir,
    spectral_layers,
    unwrap_model,
)
from sttpfast.callbacks.checkpoint import Checkpointer
from sttpfast.callbacks.compensation import SpectralCompensation
from sttpfast.callbacks.distributed import AccelerateTrainer
from sttpfast.callbacks.guards import NaNGuard
from sttpfast.callbacks.logging import TensorBoardLogger, WandbLogger
from sttpfast.callbacks.penalties import DivergencePenalty, DOptimalPenalty, FrobeniusDecay
from sttpfast.callbacks.spectral import OrthogonalityMonitor, SingularValueLogger, SpectralNormBound
from sttpfast.callbacks.weight_cache import CachedValidationWeights

__all__ = [
    "TensorBoardLogger", "WandbLogger",
    "SpectralNormBound", "SingularValueLogger", "OrthogonalityMonitor",
    "DOptimalPenalty", "FrobeniusDecay", "DivergencePenalty",
    "SpectralCompensation", "NaNGuard", "CachedValidationWeights",
    "Checkpointer", "AccelerateTrainer",
    "unwrap_model", "is_main_process", "run_dir", "loggers", "log_scalars", "log_image", "spectral_layers",
]
