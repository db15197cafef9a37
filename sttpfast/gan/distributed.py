"""A GAN trained by several processes (``torchrun`` / ``accelerate launch``; gloo on CPU, NCCL on GPU).

Why not DDP around the pair: the GAN learner calls ``model.generator`` and
``model.discriminator`` on their own, and only one of them trains in each step, so a DDP
wrapper around the pair would neither forward those attributes nor see the right
parameters. Instead :class:`GANGradientSync` averages the gradients of the network being
trained over the processes right after its backward (one flat all-reduce per step), which
is what DDP does, without changing the model's structure (checkpoints keep their names).

What each process sees, for the run to equal one process whose batch is the sum of theirs:

* reals: the training loader is sharded (rank ``r`` gets every ``world``-th batch of the
  common seeded order), so the ranks' batches together are one process's batch;
* latent codes and dequantization noise: every rank draws the codes of the whole global
  batch from the common seeded stream and keeps its own rows (``learn.shard``);
* BatchNorm (G's): the batch statistics are those of the global batch
  (:class:`GlobalBatchNorm2d`, autograd through the all-reduce; PyTorch's SyncBatchNorm
  runs on GPUs only).

Only the main process writes (checkpoints, logs, metrics); after the fit the ranks compare
a hash of their parameters (``learn.ranks_in_sync``, ``learn.rank_hashes``).

Launched with an FSDP2 config (``FSDP_VERSION=2``, several processes), :func:`shard_gan`
shards G and D separately (two FSDP2 trees: each network's blocks, then its root; each
network's frame bank builds its weights inside its own units), and the EMA copy of G like
G, so that the EMA update is a local ``lerp`` of matching shards (no communication). FSDP2
then averages the gradients (reduce-scatter) and :class:`GANGradientSync` only shards the
data and the latent codes. The optimizers, created after sharding, step each rank's shards.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from fastai.callback.core import Callback
from torch import Tensor, nn

from sttpfast.callbacks.distributed import parameter_hash

__all__ = ["GANGradientSync", "GlobalBatchNorm2d", "world", "shard_gan", "FSDP2_UNSUPPORTED"]

# GAN settings that read or write D's weights outside its forward, or sample G on rank 0
# alone: not supported on sharded networks yet (refused with one message, see check_fsdp2)
FSDP2_UNSUPPORTED = {
    "sn_exact": "gan.sn_exact (the exact spectral norm reads D's weights outside its forward)",
    "sr": "--d-param sr (spectral regularization rewrites D's weights outside its forward)",
}


def world() -> tuple[int, int]:
    """``(rank, world size)``: ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _SumOverProcesses(torch.autograd.Function):
    """``all_reduce(SUM)`` that autograd differentiates: every process's output is the sum of
    the processes' inputs, so an input's gradient is the sum of the processes' output gradients
    (another all-reduce). torch's own (``torch.distributed.nn.functional.all_reduce``) is
    deprecated and warned once per process in every multi-process GAN run."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch of all processes.

    ``(B, C, H, W) -> (B, C, H, W)``. The per-channel sums ``(C,)`` of ``x`` and ``x^2`` are
    summed over the processes with an all-reduce that autograd differentiates, so gradients
    are those of one process holding the global batch. Running statistics are updated with
    the global mean and the unbiased global variance, as BatchNorm2d does. In eval mode (or
    a single process) it is BatchNorm2d."""

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Swap every BatchNorm2d in ``module`` (in place) for this class, keeping its state."""
        for name, child in module.named_children():
            if type(child) is nn.BatchNorm2d:
                child.__class__ = cls
            else:
                cls.convert(child)
        return module

    def forward(self, x: Tensor) -> Tensor:
        _, size = world()
        if not self.training or size == 1 or not self.track_running_stats:
            return super().forward(x)
        n_local = torch.tensor([float(x.shape[0] * x.shape[2] * x.shape[3])], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), n_local])
        stats = _SumOverProcesses.apply(stats)
        c = x.shape[1]
        n = stats[-1]
        mean, mean_sq = stats[:c] / n, stats[c:2 * c] / n
        var = (mean_sq - mean * mean).clamp_min(0.0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            unbiased = var.detach() * (n.detach() / (n.detach() - 1.0))
            self.running_mean.lerp_(mean.detach(), momentum)
            self.running_var.lerp_(unbiased, momentum)
        shape = (1, c, 1, 1)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def shard_gan(pair: nn.Module, main: bool = True, echo=print) -> nn.Module:
    """Shard a :class:`~sttpfast.gan.GANPair` with FSDP2 over the processes, in place: first
    every rank takes rank 0's weights and buffers (plain tensors, one broadcast each) and G's
    BatchNorm becomes :class:`GlobalBatchNorm2d`; then ``generator``, ``discriminator`` and
    ``generator_ema`` (when kept) are each sharded by :func:`sttpfast.fsdp.shard_model` (their
    blocks, then their root). Call before the optimizers exist. ``main`` says it once."""
    from sttpfast.fsdp import fsdp_units, shard_model

    GlobalBatchNorm2d.convert(pair.generator)
    ema = getattr(pair, "generator_ema", None)
    if ema is not None:
        GlobalBatchNorm2d.convert(ema)
    with torch.no_grad():
        for tensor in list(pair.parameters()) + list(pair.buffers()):
            dist.broadcast(tensor, src=0)
    networks = [("G", pair.generator), ("D", pair.discriminator)] + ([("G's EMA", ema)] if ema is not None else [])
    for _, network in networks:
        shard_model(network)
    if main:
        units = ", ".join(f"{name} {len(fsdp_units(net))}" for name, net in networks)
        echo(f"FSDP2: G and D are sharded over {world()[1]} processes (units: {units})")
    return pair


def _pair_hash(pair: nn.Module) -> str:
    """sha256 of the whole state (sharded tensors gathered: every rank calls this)."""
    import hashlib

    from sttpfast.fsdp import full_state_dict

    h = hashlib.sha256()
    for value in full_state_dict(pair).values():
        h.update(value.numpy().tobytes())
    return h.hexdigest()


class GANGradientSync(Callback):
    """Trains a :class:`~sttpfast.gan.GANLearner` with several processes (see the module
    docstring); does nothing in a single process."""

    order = -5  # after TrainEvalCallback moved the model, before everything else
    sharded = False

    def after_create(self):
        # shard as soon as the learner exists: GANLearner.fit sizes its epochs from the
        # loader's length, which must be this rank's (sharded in before_fit only, a 2-process
        # `--steps 60` run planned 35-step epochs of 17 and stopped after 34 G steps)
        self._shard_loader()

    def _shard_loader(self) -> None:
        rank, size = world()
        if size > 1:
            self.learn.shard = (rank, size)
            if hasattr(self.learn.dls.train, "shard"):
                self.learn.dls.train.shard(rank, size)  # validation: every process validates everything

    def before_fit(self):
        _, size = world()
        self.size = size
        if size == 1:
            return
        from sttpfast.fsdp import is_sharded

        learn = self.learn
        self._shard_loader()
        self.sharded = is_sharded(learn.model)
        if self.sharded:
            return  # shard_gan took rank 0's state; FSDP2 averages the gradients
        GlobalBatchNorm2d.convert(learn.model.generator)
        with torch.no_grad():  # start from rank 0's weights and buffers, whatever each rank built
            for tensor in list(learn.model.parameters()) + list(learn.model.buffers()):
                dist.broadcast(tensor, src=0)

    def after_backward(self):
        if self.size == 1 or self.sharded:
            return
        grads = [p.grad for group in self.learn.opt.param_lists for p in group if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(self.size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def after_batch(self):
        # the iteration's losses over the whole global batch (one all-reduce), before the
        # Recorder, the loggers and the summary read them: they were rank 0's half batch
        if getattr(self, "size", 1) == 1 or not self.learn.training:  # no size: a validate() outside fit
            return
        names = [n for n in ("loss", "loss_g", "loss_d") if torch.is_tensor(getattr(self.learn, n, None))]
        if not names:
            return
        values = torch.stack([getattr(self.learn, n).detach().float().reshape(()) for n in names])
        dist.all_reduce(values)
        values /= self.size
        for name, value in zip(names, values):
            setattr(self.learn, name, value.to(getattr(self.learn, name).dtype))

    def after_fit(self):
        from sttpfast.fsdp import is_sharded

        own = _pair_hash(self.learn.model) if is_sharded(self.learn.model) else parameter_hash(self.learn.model)
        hashes = [own]
        if self.size > 1:
            hashes = [None] * self.size
            dist.all_gather_object(hashes, own)
        self.learn.rank_hashes = hashes
        self.learn.ranks_in_sync = len(set(hashes)) == 1
