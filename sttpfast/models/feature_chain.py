"""timm's feature-extraction methods for a network whose trunk is a chain of layers.

A model that mixes in :class:`FeatureChainMixin` lists its trunk with ``feature_chain()``
(modules applied one after the other to ``(B, C, H, W)`` maps) and sets ``feature_ends``:
for each entry of its ``feature_info``, the position in the chain of the layer whose output
is that feature level. The mixin then gives timm's ``forward_intermediates``,
``prune_intermediate_layers`` and ``set_grad_checkpointing``.

Gradient checkpointing runs each segment of the chain between two feature levels under
``torch.utils.checkpoint`` (non-reentrant); BatchNorm running statistics are restored after
the recomputation in the backward pass, so that a checkpointed step updates them exactly
once, as an ordinary step does.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

__all__ = ["FeatureChainMixin", "resolve_feature_indices", "checkpoint_segment"]


def resolve_feature_indices(num_levels: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's index convention: ``None`` all levels, an int ``n`` the last ``n`` levels, a sequence
    the levels named (negative ones count from the end). Returns the levels and the deepest one.

    Raises:
        ValueError: an index out of range, ``n`` not in ``1..num_levels``, or no index at all.
    """
    if indices is None:
        take = list(range(num_levels))
    elif isinstance(indices, int):
        if not 0 < indices <= num_levels:
            raise ValueError(f"indices={indices}: the last n feature levels need 1 <= n <= {num_levels}")
        take = list(range(num_levels - indices, num_levels))
    else:
        take = []
        for index in indices:
            level = index + num_levels if index < 0 else index
            if not 0 <= level < num_levels:
                raise ValueError(f"feature index {index} is out of range for {num_levels} feature levels")
            take.append(level)
        if not take:
            raise ValueError("indices=[]: name at least one feature level")
    return take, max(take)


def _batchnorm_buffers(module: nn.Module) -> list[torch.Tensor]:
    return [buf for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked) if buf is not None]


def checkpoint_segment(layers: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``layers`` applied in order to ``x`` under ``torch.utils.checkpoint``: their activations are
    not kept but recomputed in the backward pass. Shapes as the layers'."""
    calls = [0]

    def run(t: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 1:
            for layer in layers:
                t = layer(t)
            return t
        # the recomputation runs in train mode too: keep BN running statistics from moving twice.
        # try/finally: the non-reentrant checkpoint may stop the recomputation early (by raising)
        buffers = [buf for layer in layers for buf in _batchnorm_buffers(layer)]
        saved = [buf.clone() for buf in buffers]
        try:
            for layer in layers:
                t = layer(t)
            return t
        finally:
            with torch.no_grad():
                for buf, value in zip(buffers, saved):
                    buf.copy_(value)

    return checkpoint(run, x, use_reentrant=False)


class FeatureChainMixin:
    """``forward_intermediates``, ``prune_intermediate_layers``, ``set_grad_checkpointing``.

    The model calls :meth:`init_feature_chain` and defines ``feature_chain() -> list[nn.Module]``, ``feature_ends: list[int]``,
    ``final_norm(x)`` (what ``forward_features`` applies to the last level, e.g. the final
    BN + ReLU of a pre-activation network; the identity if nothing), ``_truncate_chain(k)``
    (keep the first ``k`` layers of the chain) and ``_prune_final_norm()``. Chain layers after
    the last level (VGG's last max-pool) follow the final norm.
    """

    def init_feature_chain(self, feature_ends: list[int]) -> None:
        """Called in the constructor: the chain positions of the feature levels; checkpointing off
        (an instance attribute: TorchScript does not see class attributes)."""
        self.feature_ends = list(feature_ends)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each segment between feature levels in the backward pass (less memory)."""
        self.grad_checkpointing = enable

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _forward_chain_checkpointed(self, x: torch.Tensor) -> torch.Tensor:
        """``forward_features`` under gradient checkpointing, one checkpoint per segment."""
        layers, start = self.feature_chain(), 0
        for end in self.feature_ends:
            x = checkpoint_segment(layers[start:end + 1], x)
            start = end + 1
        x = self.final_norm(x)
        for layer in layers[start:]:
            x = layer(x)
        return x

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """``(B, C, H, W)`` -> ``(features, [level maps (B, C_i, H / r_i, W / r_i)])``.

        Args:
            indices: feature levels to return (see :func:`resolve_feature_indices`).
            norm: apply ``final_norm`` to the last level's map (it only fits that level's width).
            stop_early: stop after the deepest level asked for (``features`` is then that map).
            output_fmt: ``"NCHW"`` only (these are convolutional networks).
            intermediates_only: return the list of maps only.

        Raises:
            ValueError: another ``output_fmt``, a bad index.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: these convolutional networks give NCHW maps only")
        take, deepest = resolve_feature_indices(len(self.feature_ends), indices)
        layers, start, last_level = self.feature_chain(), 0, len(self.feature_ends) - 1
        intermediates = []
        for level, end in enumerate(self.feature_ends):
            segment = layers[start:end + 1]
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint_segment(segment, x)
            else:
                for layer in segment:
                    x = layer(x)
            start = end + 1
            if level == last_level:  # the output always gets the final norm, the intermediate on request
                raw, x = x, self.final_norm(x)
                if level in take:
                    intermediates.append(x if norm else raw)
            elif level in take:
                intermediates.append(x)
            if level == deepest and (intermediates_only or stop_early) and level < last_level:
                return intermediates if intermediates_only else (x, intermediates)
        if intermediates_only:
            return intermediates
        for layer in layers[start:]:
            x = layer(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the layers after the deepest level in ``indices`` (and the final norm, the head).
        Returns the levels, resolved (negative indices count from the end before pruning)."""
        take, deepest = resolve_feature_indices(len(self.feature_ends), indices)
        self._truncate_chain(self.feature_ends[deepest] + 1)
        self.feature_ends = self.feature_ends[:deepest + 1]
        if prune_norm:
            self._prune_final_norm()
        if prune_head:
            self.reset_classifier(0, "")
        return take
