"""Training on one CPU, one GPU or many processes through accelerate.

fastai's own DistributedTrainer calls ``.cuda()`` unconditionally and fails on CPU; this
callback uses accelerate directly, so the same code runs with gloo on CPUs and NCCL on
GPUs (``accelerate launch`` or ``torchrun``), with optional bf16 autocast.

* after_create (the Learner is built with an accelerator) and before_fit: each rank's
  loaders deliver its shard (training: every world-th batch of the common order;
  validation: every world-th item), so that ``len(dls.train)`` is the steps per epoch.
* before_fit: the model goes through ``accelerator.prepare_model`` (DDP when several
  processes, autocast when mixed precision).
* validation runs the unwrapped model (no DDP collectives while ranks hold different
  numbers of validation batches) with rank 0's buffers (BN statistics) on every rank, then
  the metric accumulators are summed over ranks, so every rank reports the metrics of the
  whole validation set for the model that is saved. That sum is the only reduction:
  fastai's ``Learner.to_detach`` would otherwise all-gather every batch's metric and average
  it over ranks (``maybe_gather``, on whenever ``WORLD_SIZE`` > 1) before weighting it by the
  local batch size, which is wrong as soon as the ranks' last validation batches differ in
  size (measured: digits, 359 images on 2 ranks, accuracy 0.31429 reported against 113/359 =
  0.31476 recomputed from the checkpoint).
* after_fit: the model is unwrapped again and the ranks compare a hash of their
  parameters (``learn.ranks_in_sync``, ``learn.rank_hashes``).

Launched with an FSDP2 config (``fsdp_version: 2``; accelerate itself falls back to DDP on
CPUs and would shard only the root), the model is sharded by sttpfast instead of wrapped
in DDP: see :class:`AccelerateTrainer` and :mod:`sttpfast.fsdp`. BN statistics, validation
and the metric reduction are as above; an FSDP1 config is refused (one message).
"""
from __future__ import annotations

import hashlib
import os
import re

import torch
import torch.distributed as dist
from fastai.callback.core import Callback
from fastai.learner import AvgLoss, AvgMetric
from fastai.metrics import AccumMetric
from fastai.torch_core import to_detach

__all__ = ["AccelerateTrainer", "end_processes", "parameter_hash", "make_accelerator", "requested_processes",
           "warn_missing_processes"]

_NUM_PROCESSES = re.compile(r"^--num[_-]processes(?:=(\d+))?$")


def end_processes() -> None:
    """The orderly end of a command run on several processes (accelerate's ``end_training``):
    every process waits for the others, then the process group is destroyed. Without it each
    process tore its gloo connections down at interpreter exit, whatever the others were still
    doing (a 2-process FSDP2 GAN run that had written all its files died there with SIGABRT on
    one rank). No process group: nothing to do. On gloo the wait is bounded (5 minutes): a
    process whose peer died is not kept waiting for gloo's 30-minute timeout."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    from datetime import timedelta

    from accelerate.state import PartialState

    if dist.get_world_size() > 1:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(minutes=5))
        else:
            dist.barrier()
    PartialState().destroy_process_group()


def make_accelerator(mixed_precision: str = "no"):
    """An ``accelerate.Accelerator`` for this machine. Without CUDA it is created with
    ``cpu=True``: only then does accelerate join the processes of ``torchrun`` /
    ``accelerate launch`` with gloo (otherwise each CPU process trains alone).

    Launched with an FSDP config: FSDP2 is run by the apps themselves (:class:`AccelerateTrainer`
    shards the classifier, :mod:`sttpfast.gan.distributed` G and D); FSDP1 is refused with one
    message, before anything is built."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from sttpfast.fsdp import fsdp_requested

    version = fsdp_requested()
    if version is not None and version != "2":
        # FSDP1 (FullyShardedDataParallel) refuses CPUs and wraps the model in a class of its
        # own; FSDP2 (fully_shard) is the one sttpfast shards with (sttpfast.fsdp.shard_model)
        raise ValueError(f"this run was launched with an FSDP config with fsdp_version {version} (FSDP_VERSION="
                         f"{os.environ.get('FSDP_VERSION', '')!r}); sttpfast shards with FSDP2 only: set "
                         "`fsdp_version: 2` in the config (configs/accelerate/cpu_2proc_fsdp2.yaml, gpu_fsdp2.yaml)")

    # AcceleratorState is a process-wide singleton that refuses a second, different
    # mixed_precision (a notebook or a test running several trainings in one process).
    # accelerate (checked up to 1.15) has no public way to change it: the documented route
    # is one Accelerator per process, and `AcceleratorState._reset_state` is what its own
    # test utilities call. It is used only when the precision really changes, keeps the
    # process group (PartialState), and a missing one is one clear error, not a traceback.
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") not in (None, mixed_precision):
        reset = getattr(AcceleratorState, "_reset_state", None)
        if reset is None:
            raise ValueError(f"this process already trained with mixed_precision={shared['_mixed_precision']!r}; "
                             f"this accelerate version cannot switch to {mixed_precision!r} in the same process: "
                             "start a new process")
        reset(reset_partial_state=False)
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision)


def requested_processes() -> int | None:
    """How many processes the launcher was asked for, where that can be known.

    ``torchrun`` and ``accelerate launch --multi_gpu`` set ``WORLD_SIZE``.
    ``accelerate launch --num_processes N --cpu`` starts ONE process with no variable
    saying N (accelerate 1.x: only ``ACCELERATE_USE_CPU=True``); the request is then read
    from the launcher's command line (the parent process, Linux ``/proc``)."""
    if os.environ.get("WORLD_SIZE", "").isdigit():
        return int(os.environ["WORLD_SIZE"])
    if "ACCELERATE_USE_CPU" not in os.environ:
        return None
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not any(a.endswith("accelerate") or "accelerate" in a.rsplit("/", 1)[-1] for a in argv[:3]):
        return None
    for i, arg in enumerate(argv):
        match = _NUM_PROCESSES.match(arg)
        if match:
            value = match.group(1) or (argv[i + 1] if i + 1 < len(argv) else "")
            return int(value) if value.isdigit() else None
    return None


def warn_missing_processes(accelerator, echo=print) -> None:
    """Say so (once, main process) when fewer processes run than the launcher was asked for."""
    wanted, running = requested_processes(), accelerator.num_processes
    if wanted is None or wanted <= running or not accelerator.is_main_process:
        return
    echo(f"warning: asked for {wanted} processes, running {running}: `accelerate launch --cpu` starts one "
         f"process; on CPU use `accelerate launch --multi_gpu --num_processes {wanted} ...` (without --cpu) "
         f"or `torchrun --nproc_per_node {wanted} ...`")


def parameter_hash(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes, in order (identical weights <=> identical hash)."""
    h = hashlib.sha256()
    for p in model.parameters():
        # a copy: a numpy view pins the storage, which FSDP2 frees (resizes) when it reshards
        h.update(p.detach().cpu().contiguous().clone().numpy().tobytes())
    return h.hexdigest()


class AccelerateTrainer(Callback):
    """Runs the fastai loop under an ``accelerate.Accelerator`` (see the module docstring).

    ``fsdp2`` (default: what the launcher asked for, :func:`sttpfast.fsdp.fsdp2_requested`):
    with several processes the model is sharded with :func:`sttpfast.fsdp.shard_model` as
    soon as the Learner exists (before its optimizer: fastai's optimizer then steps the
    shards), FSDP2 averages the gradients (no DDP), and validation runs on the whole
    parameters (:func:`sttpfast.fsdp.gathered`), so ranks with different numbers of
    validation batches run no collective in their forwards."""

    order = -5  # after TrainEvalCallback moved the model, before everything else

    def __init__(self, accelerator=None, mixed_precision: str = "no", fsdp2: bool | None = None):
        from sttpfast.fsdp import fsdp2_requested

        self.accelerator, self.mixed_precision = accelerator, mixed_precision
        self.fsdp2 = fsdp2_requested() if fsdp2 is None else fsdp2
        self._validation_gather = None

    @property
    def distributed(self) -> bool:
        return self.accelerator.num_processes > 1

    @property
    def sharding(self) -> bool:
        """Whether this run shards the model with FSDP2 (FSDP2 asked for, several processes)."""
        return self.fsdp2 and self.accelerator is not None and self.distributed

    def before_fit(self):
        if self.accelerator is None:
            self.accelerator = make_accelerator(self.mixed_precision)
        acc = self.accelerator
        self.learn.accelerator = acc
        if self.sharding:
            from sttpfast.fsdp import ShardingError, fsdp_units

            # a Learner built without an accelerator: fastai made its optimizer over the whole
            # parameters before this event, so sharding now would leave it stepping stale
            # tensors; refused before the model is touched
            if not fsdp_units(self.learn.model) and self.learn.opt is not None:
                raise ShardingError("the optimizer was created before the model was sharded with FSDP2; create the "
                                    "Learner with AccelerateTrainer(accelerator) so that it shards first")
            self._shard_model()
            if acc.mixed_precision == "bf16":
                self._autocast_bf16(self.learn.model)
        else:
            _ignore_empty_parameters_in_ddp(self.learn.model)
            self.learn.model = acc.prepare_model(self.learn.model)
        self._wrapped = self.learn.model
        if self.distributed:
            # an instance attribute shadows Learner.to_detach for this fit (removed in after_fit)
            self.learn.to_detach = self._to_detach
        self._shard_loaders()

    def after_create(self):
        # Shard as soon as the Learner exists: whatever sizes the fit from the loader's length
        # (learner.fit turns a step budget into epochs) must see this rank's batches per
        # epoch; sharding only in before_fit made `--steps 14` on 2 processes stop after one
        # 8-step epoch (epochs = ceil(14 / 16 unsharded batches) = 1).
        if self.accelerator is not None:
            self._shard_loaders()
            if self.sharding:
                self._shard_model()

    def _shard_model(self) -> None:
        """``fully_shard`` the model once (every block, then the root); ValueError naming a
        layer that cannot be sharded. The run says so once (rank 0)."""
        from sttpfast.fsdp import fsdp_units, shard_model

        model = self.learn.model
        if fsdp_units(model):
            return
        shard_model(model)
        if self.accelerator.is_main_process:
            units = fsdp_units(model)
            print(f"FSDP2: the model is sharded over {self.accelerator.num_processes} processes in "
                  f"{len(units)} units ({len(units) - 1} blocks and the root)")

    def _autocast_bf16(self, model) -> None:
        """bf16 autocast around the sharded model's forward, outputs back in float32 (what
        ``accelerator.prepare_model`` does for an unsharded one; FSDP2's hooks stay outside)."""
        if getattr(model, "_forward_before_autocast", None) is not None:
            return
        forward, device = model.forward, self.accelerator.device.type
        model._forward_before_autocast = forward

        def forward_bf16(*args, **kwargs):
            with torch.autocast(device, dtype=torch.bfloat16):
                out = forward(*args, **kwargs)
            return out.float() if torch.is_tensor(out) and out.is_floating_point() else out
        model.forward = forward_bf16

    def _shard_loaders(self) -> None:
        acc = self.accelerator
        for dl in (self.dls.train, self.dls.valid):
            if hasattr(dl, "shard"):
                dl.shard(acc.process_index, acc.num_processes)

    def after_batch(self):
        if self.distributed and self.training and torch.is_tensor(getattr(self.learn, "loss", None)):
            # the step's loss over the whole global batch (one scalar all-reduce), before the
            # Recorder and the loggers read it: train/loss was rank 0's half of the batch. The
            # ranks' training batches are equal in size (the loader drops the last one).
            loss = self.learn.loss.detach().clone()
            dist.all_reduce(loss)
            self.learn.loss = loss / self.accelerator.num_processes

    def _to_detach(self, b, cpu: bool = True, gather: bool = True):
        """fastai's ``to_detach`` that gathers over ranks only in training (the smoothed loss
        stays the mean over ranks); validation accumulators stay per rank until
        :meth:`_reduce` sums them once, weighted by each rank's own batch sizes."""
        return to_detach(b, cpu, gather and self.learn.training)

    def before_validate(self):
        if self.sharding:
            from sttpfast.fsdp import gathered

            # whole parameters for the pass: each rank's forwards then run no collective,
            # whatever its number of validation batches
            self._validation_gather = gathered(self._wrapped)
            self._validation_gather.__enter__()
        else:
            self.learn.model = self.accelerator.unwrap_model(self._wrapped, keep_fp32_wrapper=True)
        if self.distributed:
            # DDP broadcasts rank 0's buffers at the start of each training forward, so after
            # the last step every rank holds BN running statistics of its own shard. Validate
            # (and checkpoint) the same model everywhere: rank 0's, the one that is saved.
            with torch.no_grad():
                for buffer in self.learn.model.buffers():
                    dist.broadcast(buffer, src=0)

    def _release_validation_gather(self) -> None:
        context, self._validation_gather = self._validation_gather, None
        if context is not None:
            context.__exit__(None, None, None)

    def after_cancel_validate(self):
        self._release_validation_gather()

    def after_validate(self):
        self._release_validation_gather()
        self.learn.model = self._wrapped
        if not self.distributed:
            return
        recorder = getattr(self.learn, "recorder", None)
        if recorder is None:
            return
        for metric in recorder._valid_mets:
            self._reduce(metric)

    def _reduce(self, metric) -> None:
        device = self.accelerator.device
        if isinstance(metric, (AvgLoss, AvgMetric)):
            totals = torch.tensor([float(metric.total), float(metric.count)], dtype=torch.float64, device=device)
            dist.all_reduce(totals)
            metric.total, metric.count = totals[0].item(), int(totals[1].item())
        elif isinstance(metric, AccumMetric):
            parts = [None] * self.accelerator.num_processes
            dist.all_gather_object(parts, ([p.cpu() for p in metric.preds], [t.cpu() for t in metric.targs]))
            metric.preds = [p for preds, _ in parts for p in preds]
            metric.targs = [t for _, targs in parts for t in targs]

    def after_fit(self):
        acc = self.accelerator
        self._release_validation_gather()
        if not self.sharding:
            self.learn.model = acc.unwrap_model(self._wrapped, keep_fp32_wrapper=False)
        else:  # as unwrap_model does for an unsharded model: the class's forward, in float32
            model = self.learn.model
            if model.__dict__.pop("_forward_before_autocast", None) is not None:
                model.__dict__.pop("forward", None)
        self.learn.__dict__.pop("to_detach", None)
        from sttpfast.fsdp import gathered

        with gathered(self.learn.model):  # a sharded model: the hash of its whole parameters
            own = parameter_hash(self.learn.model)
        hashes = [own]
        if self.distributed:
            hashes = [None] * acc.num_processes
            dist.all_gather_object(hashes, own)
        self.learn.rank_hashes = hashes
        self.learn.ranks_in_sync = len(set(hashes)) == 1


def _ignore_empty_parameters_in_ddp(model) -> None:
    """Keep parameters with no element (e.g. empty factors of a parametrization; sttpfast's own,
    the ``(0, r)`` STTP cores, have been buffers since 2026-11-30) out of DDP: they hold nothing to synchronize, and DDP's bucket view of such a tensor has
    other strides than its gradient, so it warned "Grad strides do not match bucket view
    strides" on every run. The names go where DDP reads its ignore list (``prepare_model``
    wraps the model in DDP only with several processes; with one it is never read), through
    DDP's own setter: private, torch has no public one (2.14); without it only the warning
    comes back."""
    from torch.nn.parallel import DistributedDataParallel

    empty = [name for name, p in model.named_parameters() if p.numel() == 0]
    ignore = getattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", None)
    if empty and ignore is not None:
        ignore(model, empty)
