"""Sample quality of a GAN during training: IS / FID / KID through torch-fidelity, a sample grid.

    learn = gan_learner(dls, g="sngan_g32", d="sngan_d32", d_param="sttp-c", rank=64,
                        cbs=[GANMetrics(every=5000, samples=10000)])                 # Inception
    cbs=[GANMetrics(every=500, samples=1000, extractor="offline")]                    # no network

Every ``every`` generator steps :class:`GANMetrics` draws ``samples`` images from G (its
moving average when the pair keeps one), compares them with the real training images and
logs the values, keeps their history and the best value of ``best_by`` (``is_best`` /
``best`` / ``best_step`` for the best-checkpoint writer), and writes a sample grid PNG.
With G sharded (FSDP2) it runs on every rank: all sample from the gathered G, the main
process computes and writes, and every rank then holds its values.

Two feature extractors:

* ``extractor="inception"``: torch-fidelity's InceptionV3 (the published metric names
  ``isc``, ``fid``, ``kid``). Its weights come from ``feature_extractor_weights_path`` or
  torch-fidelity's download cache; with neither, a ValueError says so before training
  starts (never a download attempt halfway through a run).
* ``extractor="offline"`` (or the path of an extractor file): a classifier that sttpfast
  trains on the same dataset (:mod:`sttpfast.gan.extractor`), cached in the run folder.
  Its values carry the extractor's name (``fid_sttpfast-resnet20-digits``...), so they are
  never mistaken for Inception numbers.

Images enter torch-fidelity as uint8 ``(N, 3, H, W)`` (grayscale replicated to three
channels); the real images are taken at G's resolution, as the learner trains on them.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
import torch_fidelity
from fastai.callback.core import Callback
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.utils import save_image

from sttpfast.atomic import write_file
from sttpfast.callbacks._util import is_main_process, log_image, log_scalars, positive_steps, run_dir, unwrap_model
from sttpfast.gan.extractor import (DEFAULT_ARCH, offline_extractor_name, read_extractor_metadata,
                                    register_offline_extractor, train_offline_extractor)

__all__ = ["GANMetrics", "ImageSet", "fidelity_metrics", "inception_weights", "check_inception_state",
           "to_uint8_rgb", "METRICS",
           "INCEPTION", "INCEPTION_WEIGHTS_FILE"]

METRICS = ("isc", "fid", "kid")
INCEPTION = "inception-v3-compat"
#: the file torch-fidelity downloads (and caches under torch hub's ``checkpoints``)
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
#: torch-fidelity's result key -> our short name (``*_std`` keys follow their mean)
_RESULT_KEYS = {"inception_score_mean": "isc", "inception_score_std": "isc_std",
                "frechet_inception_distance": "fid", "kernel_inception_distance_mean": "kid",
                "kernel_inception_distance_std": "kid_std"}
_LOWER_IS_BETTER = {"fid": True, "kid": True, "isc": False}


class ImageSet(Dataset):
    """uint8 images ``(N, 3, H, W)`` as the Dataset torch-fidelity reads (one tensor per item)."""

    def __init__(self, images: Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images.contiguous()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


def to_uint8_rgb(x: Tensor) -> Tensor:
    """Images in ``[-1, 1]`` ``(N, C, H, W)``, C in {1, 3} -> uint8 ``(N, 3, H, W)`` (gray replicated)."""
    if x.shape[1] not in (1, 3):
        raise ValueError(f"images need 1 or 3 channels, got {x.shape[1]}")
    x = ((x.detach().float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def check_inception_state(path: Path) -> None:
    """``path`` holds torch-fidelity's InceptionV3 state dict (its first conv and its 1008-class
    head, by name and shape): ValueError before training, not at the first metrics step."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and unpickling errors alike: not a torch file
        raise ValueError(f"{path} is not InceptionV3 weights for torch-fidelity "
                         f"(not a PyTorch weights file: {str(err).splitlines()[0] if str(err) else type(err).__name__})"
                         ) from None
    expected = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "fc.weight": (1008, 2048)}
    found = {k: tuple(state[k].shape) for k in expected
             if isinstance(state, dict) and isinstance(state.get(k), torch.Tensor)}
    if found != expected:
        raise ValueError(f"{path} is not InceptionV3 weights for torch-fidelity "
                         f"(expected tensors {expected}, found {found or 'none of them'})")


def inception_weights(path: str | Path | None) -> Path:
    """The InceptionV3 weights file: ``path`` if given, else torch-fidelity's download cache.

    Raises a one-line ValueError naming ``feature_extractor_weights_path`` when the file is
    not there (torch-fidelity would otherwise try a download)."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ValueError(f"feature_extractor_weights_path: Inception weights file not found: {path}")
        try:
            check_inception_state(path)
        except ValueError as err:
            raise ValueError(f"feature_extractor_weights_path: {err}") from None
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if not cached.is_file():
        raise ValueError(f"Inception metrics need {INCEPTION_WEIGHTS_FILE}, which is not in torch-fidelity's cache "
                         f"({cached.parent}): pass feature_extractor_weights_path=FILE (--inception-weights FILE), "
                         "or use extractor='offline' (--extractor offline)")
    return cached


def fidelity_metrics(fakes: Tensor, reals: Tensor, metrics: Sequence[str] = METRICS,
                     extractor: str = INCEPTION, weights_path: str | Path | None = None,
                     cache_root: str | Path | None = None, reals_cache_name: str | None = None,
                     batch_size: int = 64, seed: int = 0, device: str | torch.device = "cpu") -> dict[str, float]:
    """IS / FID / KID of ``fakes`` against ``reals`` with one torch-fidelity call.

    Args:
        fakes, reals: uint8 ``(N, 3, H, W)``; IS reads only ``fakes``.
        metrics: a subset of ``("isc", "fid", "kid")``.
        extractor: a registered torch-fidelity extractor name; ``weights_path`` its weights.
        cache_root, reals_cache_name: cache the reals' features / statistics under this name
            (the name must change whenever the reals or the extractor do).
        seed: torch-fidelity's ``rng_seed`` (IS split shuffle, KID subsets).
    Returns ``{"isc", "isc_std", "fid", "kid", "kid_std"}`` (those asked for), as floats.
    KID uses subsets of ``min(1000, N_fakes, N_reals)`` images; IS ``min(10, N_fakes)`` splits.
    No ``kid_std`` when both sets are the subset size (every subset is the whole set).
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metrics {unknown or list(metrics)!r}; allowed: {', '.join(METRICS)}")
    n_fake, n_real = len(fakes), len(reals)
    kid_subset = min(1000, n_fake, n_real)
    if n_fake < 2 or n_real < 2:
        raise ValueError(f"metrics need at least 2 images per set, got {n_fake} fakes and {n_real} reals")
    cuda = torch.device(device).type == "cuda"
    result = torch_fidelity.calculate_metrics(
        input1=ImageSet(fakes), input2=ImageSet(reals), cuda=cuda, batch_size=batch_size,
        isc="isc" in metrics, fid="fid" in metrics, kid="kid" in metrics,
        feature_extractor=extractor, feature_extractor_weights_path=None if weights_path is None else str(weights_path),
        isc_splits=min(10, n_fake), kid_subset_size=kid_subset,
        cache=cache_root is not None and reals_cache_name is not None,
        cache_root=None if cache_root is None else str(cache_root), input2_cache_name=reals_cache_name,
        datasets_download=False, save_cpu_ram=True,  # no worker processes: the images are in memory
        rng_seed=seed, verbose=False)
    out = {_RESULT_KEYS[k]: float(v) for k, v in result.items() if k in _RESULT_KEYS}
    if kid_subset == n_fake == n_real:  # every subset is the whole set: a spread of 0 says nothing
        out.pop("kid_std", None)
    return out


class GANMetrics(Callback):
    """IS / FID / KID every ``every`` G steps on ``samples`` generated images, and a sample grid.

    Args:
        every: evaluate after G steps ``every, 2 * every, ...`` (and after the last step when
            ``at_end`` and the budget is not a multiple of ``every``).
        samples: images generated per evaluation; also the number of real images compared
            (fewer when the training set is smaller).
        metrics: a subset of ``("fid", "isc", "kid")``.
        extractor: ``"inception"`` (torch-fidelity's InceptionV3), ``"offline"`` (an sttpfast
            classifier trained on the learner's dataset at ``before_fit``, cached as
            ``run_dir / "extractor.safetensors"``), or the path of an extractor file.
        feature_extractor_weights_path: the InceptionV3 weights (``.pth``) for
            ``extractor="inception"``; default: torch-fidelity's cache.
        best_by: the metric whose best value is tracked (lower is better for fid / kid,
            higher for isc).
        grid: images in the sample grid (from fixed latent codes, the same at every evaluation).
        extractor_steps, extractor_kwargs: training steps and model kwargs of the offline
            classifier (``arch`` among the kwargs picks another classifier).
        seed: seeds the latent codes (drawn from a private generator, so evaluating never
            changes the training run's random stream) and torch-fidelity's.

    After each evaluation: ``values`` (``{name: value}``), ``history`` (list of
    ``{"step": k, **values}``), ``best`` / ``best_step`` and ``is_best`` (True only in the
    ``after_batch`` of the step whose evaluation improved ``best``; the checkpoint writer,
    at a larger ``order``, reads it there). Values go to the learner's loggers under
    ``metrics/<name>``, one JSON line per evaluation to ``run_dir / "metrics.jsonl"``, the
    grid to ``run_dir / "samples" / "samples_<step>.png``. Names are ``fid``, ``isc``,
    ``kid`` (+ ``_std``) for Inception and ``fid_<extractor name>``... otherwise.

    Only the main process evaluates (the others go on; nothing is gathered).
    """

    order = 60  # after TrainEvalCallback counted the step and GeneratorEMA averaged it
    run_valid = False

    def __init__(self, every: int = 5000, samples: int = 10000, metrics: Sequence[str] = ("fid", "isc", "kid"),
                 extractor: str | Path = "inception", feature_extractor_weights_path: str | Path | None = None,
                 best_by: str = "fid", grid: int = 64, at_end: bool = True, batch_size: int = 64,
                 extractor_steps: int = 300, extractor_kwargs: dict | None = None, seed: int = 0):
        super().__init__()
        self.every = positive_steps(every, "every")
        self.samples = positive_steps(samples, "samples", "")
        if self.samples < 2:
            raise ValueError(f"samples must be at least 2, got {samples!r}")
        self.metrics = tuple(metrics)
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise ValueError(f"unknown metrics {unknown or list(self.metrics)!r}; allowed: {', '.join(METRICS)}")
        if best_by not in self.metrics:
            raise ValueError(f"best_by {best_by!r} is not among the computed metrics {list(self.metrics)}")
        self.best_by, self.grid = best_by, positive_steps(grid, "grid", "")
        self.at_end, self.batch_size, self.seed = bool(at_end), positive_steps(batch_size, "batch_size", ""), int(seed)
        self.extractor_steps, self.extractor_kwargs = int(extractor_steps), dict(extractor_kwargs or {})
        self.weights_path: Path | None = None
        if str(extractor) == "inception":
            self.extractor_name: str | None = INCEPTION
            self.weights_path = inception_weights(feature_extractor_weights_path)  # fail before training
        elif str(extractor) == "offline":
            self.extractor_name = None  # built in before_fit, from the learner's data
        else:
            self.weights_path = Path(extractor)
            self.extractor_name = register_offline_extractor(self.weights_path)
        self.extractor = str(extractor)
        self.history: list[dict] = []
        self.values: dict[str, float] = {}
        self.best: float | None = None
        self.best_step: int | None = None
        self.is_best = False
        self._evaluated_at: int | None = None  # the G step of the newest evaluation

    # --- names ---------------------------------------------------------------------------
    def metric_name(self, metric: str) -> str:
        """The reported name of ``metric`` (``fid`` -> ``fid`` or ``fid_<extractor>``)."""
        if self.extractor_name == INCEPTION:
            return metric
        name = self.extractor_name
        if name is None:  # not built yet (a resumed run with nothing left to do): the name it gets
            dls = getattr(getattr(self, "learn", None), "dls", None)
            if dls is None:
                raise ValueError("the offline extractor is built at the start of fit; its names are not known yet")
            name = offline_extractor_name(dls, self.extractor_kwargs.get("arch", DEFAULT_ARCH))
        base, _, std = metric.partition("_")
        return f"{base}_{name}" + (f"_{std}" if std else "")

    def plan(self, n_reals: int, dataset: str) -> str:
        """One line saying what each evaluation compares, given the run's ``n_reals`` training
        images of ``dataset``; an extractor file of another dataset is named as such."""
        reals = min(self.samples, n_reals)
        short = (f" (all the training images: fewer than --metrics-samples {self.samples})"
                 if reals < self.samples else "")
        named = {"inception": "InceptionV3", "offline": "offline (an sttpfast classifier of the training data)"}
        extractor = named.get(self.extractor)
        if extractor is None:  # an extractor file
            meta = read_extractor_metadata(self.weights_path)
            other = (f"; trained on {meta['dataset']}, not on this run's {dataset}"
                     if meta["dataset"] != dataset else "")
            extractor = (f"{self.extractor} ({meta['name']}, {meta['valid_accuracy']:.2%} on the validation "
                         f"split of {meta['dataset']}{other})")
        return (f"metrics: {', '.join(self.metrics)} every {self.every} G steps{' and at the end' * self.at_end}, "
                f"{self.samples} generated images against {reals} real ones{short}, extractor {extractor}")

    @property
    def best_name(self) -> str:
        return self.metric_name(self.best_by)

    # --- checkpoint state ----------------------------------------------------------------
    @property
    def evaluated_at(self) -> int | None:
        """The G step of the newest evaluation in this fit (None before the first)."""
        return self._evaluated_at

    def state(self) -> dict:
        """What a checkpoint keeps: the history, the best value and the step of the newest
        evaluation."""
        return {"history": self.history, "best": self.best, "best_step": self.best_step, "values": self.values,
                "evaluated_at": self._evaluated_at}

    def load_state(self, state: dict) -> None:
        """Continue from a checkpoint's :meth:`state`."""
        self.history, self.best, self.best_step = list(state["history"]), state["best"], state["best_step"]
        self.values = dict(state["values"])

    def _history_lines(self) -> str:
        """``metrics.jsonl``: one JSON line per evaluation in ``history``, ``best`` true where it
        improved the best value so far."""
        key, lower = self.metric_name(self.best_by), _LOWER_IS_BETTER[self.best_by]
        best, lines = None, []
        for row in self.history:
            value = row.get(key, math.nan)
            better = math.isfinite(value) and (best is None or (value < best if lower else value > best))
            best = value if better else best
            lines.append(json.dumps({**row, "best": better}) + "\n")
        return "".join(lines)

    # --- events --------------------------------------------------------------------------
    def before_fit(self):
        self.is_best = False
        if self.extractor == "offline" and self.extractor_name is None:
            kwargs = dict(self.extractor_kwargs)
            arch = kwargs.pop("arch", DEFAULT_ARCH)
            path = run_dir(self.learn) / "extractor.safetensors"
            sharded, dl = self._sharded(), self.dls.train
            if is_main_process():
                shard, bs = (getattr(dl, "rank", 0), getattr(dl, "world_size", 1)), dl.bs
                if shard[1] > 1:
                    # several processes (FSDP2 or DDP): the extractor learns from the global
                    # batches, as in one process (the same extractor; under DDP it learnt from
                    # rank 0's half batches: another extractor under the same name)
                    dl.shard(0, 1)
                    dl.bs = bs * shard[1]
                try:
                    self.weights_path = train_offline_extractor(self.dls, path, arch=arch, steps=self.extractor_steps,
                                                                model_kwargs=kwargs, seed=self.seed)
                finally:
                    dl.shard(*shard)
                    dl.bs = bs
                self.extractor_name = register_offline_extractor(self.weights_path)
            if sharded:
                # the other ranks sample only: they report the main process's names, and their
                # loader continues from the shuffling state the extractor's training left
                name, state = _from_main((self.extractor_name, dl.rng_state()))
                self.extractor_name = name
                dl.set_rng_state(state)
        self._real_images = None
        self._evaluated_at = None

    def before_batch(self):
        self.is_best = False

    def after_batch(self):
        step = int(self.learn.train_iter)
        if step % self.every == 0:
            self.evaluate(step)

    def after_fit(self):
        step = int(getattr(self.learn, "train_iter", 0) or 0)
        if self.at_end and step > 0 and self._evaluated_at != step:
            self.evaluate(step)

    # --- the evaluation ----------------------------------------------------------------------
    def generator(self):
        """The network sampled: the EMA copy of G when the pair has one, else G."""
        pair = unwrap_model(self.learn.model)
        ema = getattr(pair, "generator_ema", None)
        return ema if ema is not None else pair.generator

    @torch.no_grad()
    def generate(self, n: int, seed: int) -> Tensor:
        """``n`` images from :meth:`generator` in eval mode, uint8 ``(n, 3, H, W)``. The latent
        codes come from a private generator seeded with ``seed`` (the run's streams are untouched);
        eval mode leaves BatchNorm's running statistics as they are."""
        from sttpfast.fsdp import gathered

        g = self.generator()
        device = next(g.parameters()).device
        rng = torch.Generator(device="cpu").manual_seed(seed)
        was_training = g.training
        g.eval()
        try:
            out = []
            with gathered(g):  # sharded (FSDP2): G whole on every rank for the passes, no per-batch gather
                for start in range(0, n, self.batch_size):
                    z = torch.randn(min(self.batch_size, n - start), g.z_dim, generator=rng).to(device)
                    out.append(to_uint8_rgb(g(z)).cpu())
        finally:
            g.train(was_training)
        return torch.cat(out)

    def _sharded(self) -> bool:
        """Whether G is sharded (FSDP2): then this callback runs on every rank, which all sample."""
        from sttpfast.fsdp import is_sharded

        return is_sharded(self.generator())

    def real_images(self) -> Tensor:
        """Up to ``samples`` training images at G's resolution, uint8 ``(N, 3, H, W)`` (cached)."""
        if self._real_images is None:
            x = self.dls.train.dataset.x
            idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))[: self.samples]
            x = x[idx]
            size = getattr(self.learn, "image_size", None)
            if size is not None and tuple(x.shape[-2:]) != (size, size):
                x = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False,
                                  antialias=size < min(x.shape[-2:])).round_().clamp_(0, 255).to(torch.uint8)
            self._real_images = x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x.contiguous()
        return self._real_images

    def evaluate(self, step: int) -> dict[str, float]:
        """Compute, record and log the metrics at G step ``step``; write the grid."""
        self._evaluated_at = step
        sharded = self._sharded()
        if not (sharded or is_main_process()):
            return {}
        # sharded G: every rank samples (gathering G is a collective), the main process alone
        # computes and writes, then every rank takes its values (the checkpoint writer reads
        # is_best on every rank: saving is a collective too)
        fakes = self.generate(self.samples, self.seed + 1)
        grid = self.generate(self.grid, self.seed)  # fixed codes: the same z at every evaluation
        if is_main_process():
            self._record(step, fakes, grid)
        if sharded:
            self.values, self.best, self.best_step, self.is_best, self.history = _from_main(
                (self.values, self.best, self.best_step, self.is_best, self.history))
        return self.values

    def _record(self, step: int, fakes: Tensor, grid: Tensor) -> None:
        """The main process's part of :meth:`evaluate`: metrics, best, logs, files."""
        folder = run_dir(self.learn)
        device = next(self.generator().parameters()).device
        reals = self.real_images()
        raw = fidelity_metrics(fakes, reals, self.metrics, self.extractor_name, self.weights_path,
                               cache_root=folder / "fidelity_cache",
                               reals_cache_name=f"reals-{len(reals)}-{reals.shape[-1]}px-seed{self.seed}",
                               batch_size=self.batch_size, seed=self.seed, device=device)
        self.values = {self.metric_name(k): v for k, v in raw.items()}
        value = raw[self.best_by]
        better = (self.best is None or (value < self.best if _LOWER_IS_BETTER[self.best_by] else value > self.best))
        if better and math.isfinite(value):
            self.best, self.best_step, self.is_best = value, step, True
        self.history.append({"step": step, **self.values})
        log_scalars(self.learn, {f"metrics/{k}": v for k, v in self.values.items()}, step)
        # the whole file from the history (restored with the checkpoint), atomically: after a crash
        # and a resume, an evaluation that ran after the last checkpoint is not recorded twice
        write_file(folder / "metrics.jsonl", self._history_lines())
        grid_path = folder / "samples" / f"samples_{step:07d}.png"
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid.float() / 255.0, grid_path, nrow=max(1, int(math.sqrt(self.grid))))
        log_image(self.learn, "samples", grid_path, step)
        self.grid_path = grid_path


def _from_main(value):
    """``value`` as the main process (rank 0) holds it, on every rank (a collective)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
