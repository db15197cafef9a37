"""Model surgery: put layers' weights into a parametrization, account for compression, undo it.

``parameterize`` registers a ``torch.nn.utils.parametrize`` parametrization on the
``weight`` of selected Conv / ConvTranspose2d / Linear / Embedding layers. The model keeps
its classes and structure; only ``weight`` becomes a function of factors. Surgery is
atomic: it validates everything first, and if any layer fails, every layer touched so
far gets its original weight back.

Compression ``Z`` (Obukhov et al. 2021):
``Z = 100 * (sum of DOF of parameterized weights + everything else in the state_dict)
/ (everything in the dense model's state_dict)``, where "everything else" counts biases,
BN affine parameters and running statistics and untouched layers, and never
``num_batches_tracked``.
"""
from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from sttpfast.params.factorized import remove_factorized_forward
from sttpfast.params.frame_bank import attach_frame_bank, detach_frame_bank
from sttpfast.params.layers import (
    factors_of,
    layer_type,
    parameterized_layers,
    parametrization_of,
    remove_weight_parametrization,
    weight_first,
)
from sttpfast.params.attention import parameterize_attention
from sttpfast.params import BASELINES, MatrixView, WeightParametrization, default_init, method, method_of, resolve_param
from sttpfast.params.tensorlayer import Unrepresentable, current_unrepresentable_policy, unrepresentable_policy

__all__ = [
    "SUPPORTED_LAYERS", "LayerRow", "CompressionReport", "parameterize", "compression_report",
    "densify", "parameterization_spec", "apply_spec", "parametrization_of", "factors_of",
    "parameterized_layers", "rank_for_compression", "energy_plan", "PLANS", "UNREPRESENTABLE",
]

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear, nn.Embedding,
)
INITS = ("identity", "spectral")


# ---------------------------------------------------------------------------------------
def _param_name(p: nn.Module) -> str:
    entry = method_of(p)
    return entry.name if entry is not None else type(p).__name__


def _dense_shape(module: nn.Module) -> tuple[int, ...]:
    p = parametrization_of(module)
    if isinstance(p, WeightParametrization):
        return p.view.shape
    if p is not None:
        plist = module.parametrizations.weight
        if hasattr(plist, "original"):
            return tuple(plist.original.shape)
    return tuple(module.weight.shape)


def _layer_type(module: nn.Module) -> str:
    return layer_type(module).__name__


def _transposed(module: nn.Module) -> bool:
    return isinstance(module, nn.ConvTranspose2d)


# ---------------------------------------------------------------------------------------
# compression accounting
@dataclass
class LayerRow:
    name: str
    layer: str
    shape: tuple[int, ...]
    param: str
    rank: int | None
    dof: int
    dense: int
    #: every rank entry of a tensor format (TT / TR bonds, Tucker's pair...), None for one rank
    ranks: tuple[int, ...] | None = None

    @property
    def ratio(self) -> float:
        return 100.0 * self.dof / self.dense

    @property
    def rank_text(self) -> str:
        """``-``, ``8``, or every entry where they differ (``2x3x2``)."""
        if self.ranks is not None and len(set(self.ranks)) > 1:
            return "x".join(map(str, self.ranks))
        return "-" if self.rank is None else str(self.rank)


@dataclass
class CompressionReport:
    """Per-layer DOF and the model's compression ``z`` (percent, the paper's definition).

    ``weights_ratio`` is the same ratio over the parameterized weights alone.
    """

    rows: list[LayerRow] = field(default_factory=list)
    dense_total: int = 0
    compressed_total: int = 0
    rank: int | None = None
    param: str = "dense"
    #: per-layer ranks when they differ per layer: ``[{layer, rank, energy, params, dense}]``
    plan: list[dict] | None = None
    #: layers a compression target left dense because the method gains nothing on them at the
    #: rank chosen for them: ``[{layer, type, shape, rank, params, dense}]`` (``params`` the
    #: method's DOF there, ``>= dense``); they count at their dense size in ``z``
    left_dense: list[dict] = field(default_factory=list)
    #: the method that left them dense, where ``param`` names more than one (the attention
    #: forms beside it: "attn-qk-ov+attn-qk-ov-proj+svdp-r"); None: ``param``
    left_dense_param: str | None = None

    @property
    def z(self) -> float:
        return 100.0 * self.compressed_total / self.dense_total if self.dense_total else 100.0

    @property
    def weights_ratio(self) -> float:
        dense = sum(r.dense for r in self.rows)
        return 100.0 * sum(r.dof for r in self.rows) / dense if dense else 100.0

    def table(self) -> str:
        w = max([8] + [len(r.param) for r in self.rows])  # attn-qk-ov-proj is wider than 8
        head = f"{'layer':<36} {'type':<16} {'shape':<20} {'param':<{w}} {'rank':>5} {'dof':>10} {'dense':>10} {'%':>7}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.name:<36} {r.layer:<16} {'x'.join(map(str, r.shape)):<20} {r.param:<{w}} "
                         f"{r.rank_text:>5} {r.dof:>10} {r.dense:>10} {r.ratio:>7.2f}")
        lines.append("-" * len(head))
        lines.append(self.summary())
        return "\n".join(lines)

    def plan_table(self) -> str:
        """The per-layer rank plan (layer, rank, energy kept, params), or '' without one; the
        energy column only when the plan has energies (an energy plan; not its copy in a
        config's layer_ranks, which a column of dashes showed)."""
        if not self.plan:
            return ""
        energies = any(row.get("energy") is not None for row in self.plan)
        energy_head = f" {'energy':>8}" if energies else ""
        head = f"{'layer':<36} {'rank':>14}{energy_head} {'params':>10} {'dense':>10}"
        lines = [head, "-" * len(head)]
        for row in self.plan:
            rank = row["rank"] if not isinstance(row["rank"], list) else "x".join(map(str, row["rank"]))
            energy = ("-" if row.get("energy") is None else f"{row['energy']:.4f}").rjust(8)
            lines.append(f"{row['layer']:<36} {str(rank):>14}" + (f" {energy}" if energies else "")
                         + f" {row['params']:>10} {row['dense']:>10}")
        return "\n".join(lines)

    def left_dense_table(self) -> str:
        """One line saying how many layers were left dense and why, then one line per layer;
        '' when none was."""
        if not self.left_dense:
            return ""
        method = self.left_dense_param or self.param
        lines = [f"left dense: {len(self.left_dense)} layer(s) where {method} has at least as many parameters as "
                 "the dense weight at the rank chosen for them (no gain)"]
        for row in self.left_dense:
            rank = "x".join(map(str, row["rank"])) if isinstance(row["rank"], list) else row["rank"]
            lines.append(f"  {row['layer']:<36} {row['type']:<10} {'x'.join(map(str, row['shape'])):<14} "
                         f"rank {rank}: {row['params']:,} params >= {row['dense']:,} dense")
        return "\n".join(lines)

    def summary(self) -> str:
        return (f"layers {len(self.rows)}  params {self.compressed_total:,} / {self.dense_total:,}  "
                f"Z = {self.z:.2f}%  (weights only {self.weights_ratio:.2f}%)")

    def __str__(self) -> str:
        return self.table()


def _layer_dof(module: nn.Module, p: nn.Module) -> int:
    entry = method_of(p)
    if entry is not None:
        return entry.count_dof(_dense_shape(module), _transposed(module), getattr(p, "requested_rank", None))
    return sum(t.numel() for t in factors_of(module))  # a foreign parametrization: its tensors


def _check_model(model) -> None:
    """TypeError for anything but a module (a timm name passed as the model, say)."""
    if not isinstance(model, nn.Module):
        hint = " (a timm name: sttpfast.create_model(name) first)" if isinstance(model, str) else ""
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__} {model!r}"[:200] + hint)


def compression_report(model: nn.Module) -> CompressionReport:
    """Per-layer table and ``Z`` of a (possibly) parameterized model."""
    _check_model(model)
    report = CompressionReport()
    params = set()
    for name, module, p in parameterized_layers(model):
        dense = math.prod(_dense_shape(module))
        rank = getattr(p, "rank", None)
        ranks = getattr(p, "ranks", None)
        row = LayerRow(name, _layer_type(module), _dense_shape(module), _param_name(p), rank,
                       _layer_dof(module, p), dense, tuple(ranks) if isinstance(ranks, (tuple, list)) else None)
        report.rows.append(row)
        report.dense_total += dense
        report.compressed_total += row.dof
        params.add(row.param)
    for key, tensor in model.state_dict().items():
        if key.endswith("num_batches_tracked") or ".parametrizations." in f".{key}":
            continue
        report.dense_total += tensor.numel()
        report.compressed_total += tensor.numel()
    ranks = {r.rank for r in report.rows}
    report.rank = ranks.pop() if len(ranks) == 1 else None
    report.param = "+".join(sorted(params)) or "dense"
    return report


# ---------------------------------------------------------------------------------------
# selection
def _layer_kinds() -> str:
    """``Conv1d, ..., Linear or Embedding``: the supported layer types, for messages."""
    *most, last = [t.__name__ for t in SUPPORTED_LAYERS]
    return f"{', '.join(most)} or {last}"


def _select(model: nn.Module, include, exclude, pattern_kind: str = "include pattern") -> list[tuple[str, nn.Module]]:
    """Layers to parameterize, in module order. Errors name the offending pattern/layer (an
    ``include`` entry is a ``pattern_kind``: the keys of a per-layer rank mapping select too),
    and say so when nothing is selected (a model without such layers, a single layer, patterns
    that leave none)."""
    given = (include, exclude)
    include = [include] if isinstance(include, str) else list(include or [])
    exclude = [exclude] if isinstance(exclude, str) else list(exclude or [])
    if not include:
        exclude += list(getattr(model, "default_param_exclude", ()))
    modules = dict(model.named_modules())
    supported = {n: m for n, m in modules.items() if n and isinstance(m, SUPPORTED_LAYERS)}
    if isinstance(model, SUPPORTED_LAYERS):  # the root itself: torch's parametrize needs a parent name
        raise ValueError(f"the model is a single {type(model).__name__}: parameterize works on the layers inside "
                         "a model; wrap it: parameterize(nn.Sequential(layer), ...)")
    if not supported:
        raise ValueError(f"no {_layer_kinds()} layer in the model to parameterize")
    for pattern in include:
        if pattern in modules and pattern not in supported:
            raise ValueError(f"layer {pattern!r} is a {type(modules[pattern]).__name__}, which cannot be "
                             f"parameterized; supported layer types: {_layer_kinds()}")
        if not any(fnmatch.fnmatchcase(n, pattern) for n in supported):
            raise ValueError(f"{pattern_kind} {pattern!r} matches no {_layer_kinds()} layer; "
                             f"examples of layer names: {', '.join(list(supported)[:6])}")
    chosen = []
    for name, module in supported.items():
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        chosen.append((name, module))
    if not chosen:
        default = getattr(model, "default_param_exclude", ()) if not include else ()
        default_too = f" (and the model's default_param_exclude={list(default)!r})" if default else ""
        raise ValueError(f"no {_layer_kinds()} layer left to parameterize after include={given[0]!r}, "
                         f"exclude={given[1]!r} (--include / --exclude){default_too}")
    return chosen


def _check_target(param: str, compression) -> float:
    """A compression target for ``param`` (canonical name): a number in (0, 100] and a method
    that compresses; ValueError naming what is wrong."""
    compression = _check_compression(compression)
    if not method(param).compresses:
        raise ValueError(f"compression needs a low-rank parameterization, not {param!r}")
    return compression


def _check_compression(compression) -> float:
    # True == 1 would run at Z 1%; a string is refused as rank="8" is (the CLI and configs give numbers)
    if isinstance(compression, (bool, str)):
        raise ValueError(f"compression must be a number in (0, 100] (percent), got {compression!r}")
    try:
        value = float(compression)
    except (TypeError, ValueError):
        raise ValueError(f"compression must be a number in (0, 100] (percent), got {compression!r}") from None
    if not 0.0 < value <= 100.0 or math.isnan(value):
        raise ValueError(f"compression must be in (0, 100] (percent of the dense size), got {compression!r}")
    return value


def _layer_count_dof(param: str, module: nn.Module, rank) -> int:
    return method(param).count_dof(tuple(module.weight.shape), _transposed(module), rank)


def _gains_nothing(param: str, module: nn.Module, rank) -> bool:
    """Whether ``param`` at ``rank`` has at least as many DOF as the layer's dense weight
    (a depthwise kernel, a tiny head, a stem with few inputs): factorizing it saves nothing."""
    return _layer_count_dof(param, module, rank) >= module.weight.numel()


def _layer_size(param: str, module: nn.Module, rank, keep_dense_if_no_gain: bool) -> int:
    """What the layer's weight counts in ``Z`` at ``rank``: its DOF, or its dense size where the
    policy leaves it dense (then ``min(DOF, dense)``, so ``Z`` still grows with the rank)."""
    dof = _layer_count_dof(param, module, rank)
    return min(dof, module.weight.numel()) if keep_dense_if_no_gain else dof


def _z_for_rank(param, layers, base_dense, base_other, rank, keep_dense_if_no_gain: bool = False) -> float:
    dof = sum(_layer_size(param, m, rank, keep_dense_if_no_gain) for _, m in layers)
    return 100.0 * (base_other + dof) / base_dense


def _below_rank_one(model: nn.Module, param: str, compression: float, layers, keep_dense_if_no_gain: bool) -> str:
    """Why a target below what rank 1 gives cannot be reached: the parameters outside the
    selected layers (said instead of "the ranks move Z in steps", which misled when ``include``
    left most of the model out); ``""`` for a target at or above that floor."""
    base = compression_report(model)
    base_other = base.compressed_total - sum(m.weight.numel() for _, m in layers)
    floor = _z_for_rank(param, layers, base.dense_total, base_other, 1, keep_dense_if_no_gain)
    if compression >= floor:
        return ""
    return (f"every selected layer at rank 1 gives Z = {floor:.2f}% already: the parameters outside them are "
            f"{100.0 * base_other / base.dense_total:.2f}% of the dense model")


#: how far (percentage points) the achieved Z may be from a compression target without a warning
COMPRESSION_TOLERANCE = 0.5


def rank_for_compression(model: nn.Module, param: str, compression: float, layers=None,
                         keep_dense_if_no_gain: bool = True) -> tuple[int, float]:
    """The global rank whose ``Z`` is closest to ``compression`` (bisection).

    With ``keep_dense_if_no_gain`` (what :func:`parameterize` does by default) a layer whose
    DOF at a rank would reach its dense size counts at its dense size: it will be left dense.

    ``Z`` grows with the rank between the layers' largest useful ranks, not always across
    them: TR's int rank caps the ring bond too until it reaches a layer's largest TT bond,
    where that layer becomes the TT chain (ring bond 1) and its DOF drops. So the bisection
    runs over the whole range (today's answer wherever ``Z`` grows with the rank), then over
    each stretch between those ranks, and a stretch's rank replaces the answer only if its
    ``Z`` is strictly closer to the target."""
    param = resolve_param(param)
    compression = _check_target(param, compression)
    layers = layers if layers is not None else _select(model, None, None)
    if not layers:
        raise ValueError(f"no layer to parameterize: no rank of {param} gives Z = {compression:g}%")
    base = compression_report(model)
    chosen_dense = sum(m.weight.numel() for _, m in layers)
    base_other = base.compressed_total - chosen_dense
    # the stretches start at each layer's largest useful rank (STTP's TT bonds, CP's beyond
    # min(d_out, d_in)), where Z may drop
    starts = sorted({1, *(_useful_rank(param, m) for _, m in layers)})
    max_rank = starts[-1]
    z_of: dict[int, float] = {}  # each rank's Z once: the searches share their probes

    def z(r: int) -> float:
        if r not in z_of:
            z_of[r] = _z_for_rank(param, layers, base.dense_total, base_other, r, keep_dense_if_no_gain)
        return z_of[r]

    miss = lambda r: abs(z(r) - compression)  # noqa: E731

    def closest(lo: int, hi: int) -> int:
        first = lo
        while lo < hi:  # smallest rank with Z >= target, if Z grows with the rank in [lo, hi]
            mid = (lo + hi) // 2
            if z(mid) >= compression:
                hi = mid
            else:
                lo = mid + 1
        return min({lo, max(lo - 1, first)}, key=lambda r: (miss(r), r))

    best = closest(1, max_rank)
    for lo, hi in zip(starts, [*(s - 1 for s in starts[1:]), max_rank]):
        candidate = closest(lo, hi)
        if miss(candidate) < miss(best):
            best = candidate
    return best, z(best)


# ---------------------------------------------------------------------------------------
# per-layer rank plans
PLANS = ("shared", "energy")
UNREPRESENTABLE = ("skip", "error")


def _layer_spectrum_energy(module: nn.Module) -> torch.Tensor:
    """Cumulative retained energy ``e_k = sum_{i<=k} s_i^2 / sum s_i^2`` of the layer's
    matricized weight ``(C_out, C_in*k*k)``, ``(min(d_out, d_in),)``; all ones for a zero weight."""
    view = MatrixView(tuple(module.weight.shape), _transposed(module))
    s2 = torch.linalg.svdvals(view.to_matrix(module.weight.detach().to(torch.float64))).square()
    total = s2.sum()
    return torch.ones_like(s2) if total == 0 else s2.cumsum(0) / total


def _useful_rank(param: str, module: nn.Module) -> int:
    entry = method(param)
    if entry.largest_useful_rank is not None:
        return entry.largest_useful_rank(tuple(module.weight.shape), _transposed(module))
    view = MatrixView(tuple(module.weight.shape), _transposed(module))
    return min(view.d_out, view.d_in)


def _rank_on(param: str, module: nn.Module, rank):
    """An int ``rank`` as the layer would use it (capped at its largest useful rank); a tuple
    or tree rank as given."""
    return min(rank, _useful_rank(param, module)) if isinstance(rank, int) else rank


def energy_plan(model: nn.Module, param: str, compression: float, layers,
                keep_dense_if_no_gain: bool = True) -> tuple[dict[str, int], dict[str, float], float]:
    """Per-layer ranks by retained energy: ``({layer: rank}, {layer: energy kept}, achieved Z)``.

    One threshold ``tau`` is shared by all layers; each layer takes the smallest rank ``k``
    whose leading ``k`` singular values of its weight (the pretrained spectrum) keep a
    fraction ``>= tau`` of ``|W|_F^2``, so a flat spectrum gets a larger rank than a steep
    one. ``Z`` only changes where ``tau`` crosses one of the layers' cumulative energies, so
    the bisection runs over those values and takes the one whose ``Z`` is closest to the
    target. The rank is the method's int knob (for the tensor methods every bond is capped
    at it): the SVD rank for SVDP/STTP/lowrank, a proxy for the others. With
    ``keep_dense_if_no_gain`` a layer whose DOF at its rank reaches its dense size counts at
    its dense size (it will be left dense).
    """
    base = compression_report(model)
    base_other = base.compressed_total - sum(m.weight.numel() for _, m in layers)
    energies = {name: _layer_spectrum_energy(m) for name, m in layers}
    caps = {name: _useful_rank(param, m) for name, m in layers}

    def ranks_for(tau: float) -> dict[str, int]:
        out = {}
        for name, e in energies.items():
            k = int(torch.searchsorted(e, torch.tensor(tau, dtype=e.dtype) - 1e-12).item()) + 1
            out[name] = max(1, min(k, len(e), caps[name]))
        return out

    modules = dict(layers)

    def z(ranks: dict[str, int]) -> float:
        dof = sum(_layer_size(param, modules[n], r, keep_dense_if_no_gain) for n, r in ranks.items())
        return 100.0 * (base_other + dof) / base.dense_total

    taus = sorted({0.0, *(float(v) for e in energies.values() for v in e)})
    lo, hi = 0, len(taus) - 1
    while lo < hi:  # smallest threshold whose Z reaches the target (Z grows with tau)
        mid = (lo + hi) // 2
        if z(ranks_for(taus[mid])) >= compression:
            hi = mid
        else:
            lo = mid + 1
    best = min({lo, max(lo - 1, 0)}, key=lambda i: (abs(z(ranks_for(taus[i])) - compression), i))
    ranks = ranks_for(taus[best])
    kept = {name: float(energies[name][r - 1]) for name, r in ranks.items()}
    return ranks, kept, z(ranks)


def _scaled_ranks(param: str, layers, rank_scale: float) -> dict[str, int]:
    """Khodak et al.'s rank scale: each layer at ``round(scale * its full rank)`` (at least 1)."""
    return {name: max(1, round(rank_scale * _useful_rank(param, m))) for name, m in layers}


def _check_no_fixed_rows(entry, module: nn.Module) -> None:
    """An Embedding with ``padding_idx`` keeps that row at zero (zero at init, never a gradient).
    A factorized weight builds the row from factors the other rows share, so it cannot: the
    row would start non-zero and drift. ``sn`` (a dense weight over its norm) keeps it."""
    padding = getattr(module, "padding_idx", None) if isinstance(module, nn.Embedding) else None
    if padding is not None and entry.compresses:
        raise Unrepresentable(f"an Embedding with padding_idx={padding} keeps that row at zero, "
                              "which a factorized weight cannot")


def _screen_representable(param: str, layers, policy: str):
    """``(layers the method can represent, [(name, reason)] of the others)``; with policy
    ``error`` the first one it cannot represent is a ValueError naming it."""
    entry, keep, skipped = method(param), [], []
    for name, module in layers:
        try:
            _check_no_fixed_rows(entry, module)
            with unrepresentable_policy("error"):
                entry.count_dof(tuple(module.weight.shape), _transposed(module), None)
        except Unrepresentable as err:
            shape = tuple(module.weight.shape)
            if policy == "error":
                raise ValueError(f"{param} cannot represent layer {name!r} (weight {shape}): {err}; unrepresentable="
                                 "'skip' (--unrepresentable skip) leaves such layers dense") from None
            skipped.append((name, f"{param} cannot represent a weight of shape {shape} in layer {name!r} ({err})"))
            continue
        keep.append((name, module))
    return keep, skipped


def _refuse_tied_weights(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> None:
    """A selected layer whose weight another module holds too (tied weights, e.g. an embedding
    and an output head): refused, naming both. A parametrization replaces one module's weight,
    which would untie them (and the dense count would hold the shared tensor twice). One module
    registered under two names is one layer, not tied."""
    holders: dict[int, dict[int, str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is not None:
            holders.setdefault(id(weight), {}).setdefault(id(module), name)
    for _, module in layers:
        names = list(holders.get(id(module._parameters.get("weight")), {}).values())
        if len(names) > 1:
            raise ValueError(f"layers {' and '.join(map(repr, names))} share one weight (tied weights): a "
                             f"parametrization would untie them; exclude them (exclude={names!r})")


def _layer_ranks_by_name(ranks: Mapping, names: list[str]) -> dict:
    """``{layer name: rank}`` for the layers ``names`` a per-layer mapping selected; its keys are
    layer names or fnmatch patterns. A layer's own name wins over patterns; a layer that two
    patterns match is refused (which rank was meant is not clear)."""
    out = {}
    for name in names:
        if name in ranks:
            out[name] = ranks[name]
            continue
        hits = [key for key in ranks if fnmatch.fnmatchcase(name, key)]
        if len(hits) > 1:
            raise ValueError(f"layer {name!r} matches two patterns of the per-layer rank mapping, "
                             f"{hits[0]!r} and {hits[1]!r}: give it its own entry")
        out[name] = ranks[hits[0]]  # selected through one of the keys
    return out


def _normalize_layer_ranks(entry, ranks, layers) -> None:
    """Check a rank against every layer it goes to (tuple lengths, caps): one ValueError
    naming the first layer it does not fit."""
    for name, module in layers:
        rank = ranks[name] if isinstance(ranks, dict) else ranks
        try:
            entry.count_dof(tuple(module.weight.shape), _transposed(module), rank)
        except Unrepresentable:
            raise
        except ValueError as err:
            raise ValueError(f"layer {name!r} ({_layer_type(module)} {tuple(module.weight.shape)}): {err}") from None


# ---------------------------------------------------------------------------------------
# surgery
class _RefuseScripting:
    """``__prepare_scriptable__`` of a parameterized layer's ``parametrizations``: torch.jit.script
    calls it on every module before compiling, so scripting a parameterized model stops with
    one message saying what to do instead of a compiler error deep in a parametrization
    (torch.jit.script is deprecated and never compiled ``torch.nn.utils.parametrize``).
    A class, not a closure: it survives ``copy.deepcopy`` and pickling; it goes away with the
    ``parametrizations`` container when densify removes them."""

    def __init__(self, layer_type: str, param: str):
        self.layer_type, self.param = layer_type, param

    def __call__(self):
        raise ValueError(f"torch.jit.script cannot compile a {self.layer_type} parameterized as {self.param}: "
                         f"script the dense model instead, torch.jit.script(sttpfast.densify(model))")


def _register(module: nn.Module, param: str, rank, init: str) -> None:
    method(param).apply(module, rank, init)
    # new modules start in train mode: a layer of a model in eval() would get parametrizations
    # in train mode (spectral_norm's power iteration then runs at every evaluation)
    module.parametrizations.train(module.training)
    module.parametrizations.__dict__["__prepare_scriptable__"] = _RefuseScripting(_layer_type(module), param)


def _check_choice(what: str, value, allowed) -> None:
    if value is not None and value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


def parameterize(
    model: nn.Module,
    param: str,
    rank=None,
    compression: float | None = None,
    include=None,
    exclude=None,
    init: str | None = None,
    frame_bank: bool = True,
    plan: str | None = None,
    rank_scale: float | None = None,
    unrepresentable: str | None = None,
    keep_dense_if_no_gain: bool = True,
) -> CompressionReport:
    """Replace the weights of selected layers by ``param`` in place; return the report.

    Args:
        model: any ``nn.Module`` (a timm model, a registered sttpfast model...).
        param: a registered method (``sttp-r``, ``svdp-c``, ``lowrank``, ``tt``, ``ht``, ``sn``,
            ``dense``...; ``svdp`` and ``sttp`` mean the ``-l`` forms).
        rank: the method's rank shared by all layers (capped per layer by its shape): an
            int, a tuple for the tensor formats (TT / TR bonds, Tucker ``(R_out, R_in)``, an HT
            tree), or a mapping ``{layer name or fnmatch pattern: rank}`` (a per-layer plan; those
            layers only; a layer's own name wins over patterns, two patterns on one layer are refused).
            None means full rank.
        compression: instead of ``rank``, a target ``Z`` in percent; with ``plan="shared"``
            (the default) the global int rank whose ``Z`` is closest, with ``plan="energy"``
            one rank per layer by retained energy (:func:`energy_plan`).
        rank_scale: instead of ``rank``, each layer at ``round(scale * full rank)`` (Khodak et al.).
        include / exclude: glob patterns over module names (``"blocks.*.conv1"``). Without
            ``include`` every supported layer is taken except the model's
            ``default_param_exclude``.
        init: ``identity`` (the paper's; default for SVDP/STTP) or ``spectral`` (decompose
            the layer's current weight; default for ``lowrank`` and the tensor formats;
            converts pretrained layers). For ``lowrank`` and the tensor formats, which have no
            identity of their own, ``identity`` is a fixed pattern of placeholder factors
            (``eye`` blocks; CP: one-hot terms), not fitted to the weight: a deterministic start
            that trains, and what a resume builds before loading its checkpoint.
        frame_bank: build the weights of equal-shaped chain layers together (the default);
            False builds each layer on its own (same values; for debugging and reference, and
            needed under gradient checkpointing: ``torch.utils.checkpoint`` or timm's
            ``set_grad_checkpointing`` recompute a block on its own in backward, where the
            bank would build other tensors than the forward's, and torch refuses them).
        unrepresentable: a layer the method cannot represent (a reshaped format on a prime
            channel count): ``skip`` (warn naming the layers; they stay dense) or ``error``
            (a ValueError naming the first); None follows ``unrepresentable_policy``.
        keep_dense_if_no_gain: with ``compression``, a layer where the method has at least as
            many degrees of freedom as the dense weight at the rank chosen for it (a depthwise
            kernel, a tiny head) is left dense, and the rank search counts it at its dense
            size; the report's ``left_dense`` lists those layers. False parameterizes every
            selected layer. An explicit ``rank`` (or ``rank_scale``) always parameterizes
            every selected layer, so the paper's ``Z`` values stay exact.
    The report's ``plan`` lists ``{layer, rank, energy, params, dense}`` per layer when the
    ranks differ per layer (``plan="energy"``, ``rank_scale`` or a mapping), else None.
    Raises:
        ValueError: a bad argument, naming it and the allowed values; ``model`` is unchanged.
    """
    _check_model(model)
    param = resolve_param(param)
    entry = method(param)
    given = [n for n, v in (("rank", rank), ("compression", compression), ("rank_scale", rank_scale))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"give either {given[0]} or {given[1]}, not both")
    _check_choice("rank plan", plan, PLANS)
    _check_choice("unrepresentable policy", unrepresentable, UNREPRESENTABLE)
    if plan == "energy" and compression is None:
        raise ValueError("plan='energy' spends a compression budget: give compression=Z as well")
    if compression is not None:
        compression = _check_target(param, compression)
    if rank_scale is not None:
        if isinstance(rank_scale, bool) or not isinstance(rank_scale, (int, float)) or not 0 < rank_scale <= 1:
            raise ValueError(f"rank_scale must be a number in (0, 1] (a fraction of each layer's full rank), "
                             f"got {rank_scale!r}")
        if not entry.compresses:
            raise ValueError(f"rank_scale needs a low-rank parameterization, not {param!r}")
    if not isinstance(keep_dense_if_no_gain, bool):
        raise ValueError(f"keep_dense_if_no_gain must be True or False, got {keep_dense_if_no_gain!r}")
    init = init or default_init(param)
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; allowed: {', '.join(INITS)}")
    if rank is not None and entry.rank_kind is None:
        raise ValueError(f"--rank/rank has no meaning for {param} (it keeps the full weight); leave it out")
    per_layer = isinstance(rank, Mapping)
    if per_layer:
        if include is not None or exclude is not None:
            raise ValueError("a per-layer rank mapping names its layers; leave include / exclude out")
        if not rank:
            raise ValueError("the per-layer rank mapping is empty: give it {layer name or pattern: rank}")
        include = list(rank)
        rank = {name: entry.normalize_rank(tuple(r) if isinstance(r, list) else r) for name, r in rank.items()}
    else:
        rank = entry.normalize_rank(tuple(rank) if isinstance(rank, list) else rank)
    layers = _select(model, include, exclude, "the per-layer rank mapping's key" if per_layer else "include pattern")
    _refuse_tied_weights(model, layers)
    if per_layer:
        rank = _layer_ranks_by_name(rank, [name for name, _ in layers])
    for name, module in layers:
        if 0 in module.weight.shape:
            raise ValueError(f"layer {name!r} has a zero-size weight {tuple(module.weight.shape)}; "
                             "exclude it (exclude=[...])")
        if entry.dtypes is not None and module.weight.dtype not in entry.dtypes:
            # checked here: the frames are built at the first forward, which then failed on a
            # model already changed (it could neither run nor be densified)
            raise ValueError(f"layer {name!r} has {module.weight.dtype} weights: {param} builds its orthonormal "
                             "frames in float32 or float64; parameterize the model in float32 and compute in half "
                             f"precision under torch.autocast(device_type, dtype={module.weight.dtype})")
        if parametrize.is_parametrized(module, "weight"):
            held = _param_name(parametrization_of(module))
            if held.startswith("attn-"):  # the attention forms: the rest of the model is parameterized around them
                raise ValueError(f"layer {name!r} holds the attention forms ({held}): leave the layers "
                                 "parameterize_attention returned out of this call (exclude=their names), as "
                                 "--attention does on the command line")
            raise ValueError(f"layer {name!r} is already parameterized ({held}): exclude it (exclude=[...]) to "
                             "parameterize the others, or densify the model first")
    if param == "dense":
        return compression_report(model)
    layers, skipped = _screen_representable(param, layers, unrepresentable or current_unrepresentable_policy())
    if skipped:
        warnings.warn(f"{len(skipped)} layer(s) stay dense: " + "; ".join(why for _, why in skipped), stacklevel=2)
    if not layers and compression is not None:  # no rank can reach a target then
        raise ValueError(f"no layer left to parameterize for compression={compression:g}: {param} cannot "
                         "represent any selected layer")
    energies = None
    # the no-gain policy belongs to a compression target: an explicit rank means every layer
    leave_dense = keep_dense_if_no_gain and compression is not None
    if compression is not None and plan == "energy":
        rank, energies, achieved = energy_plan(model, param, compression, layers, leave_dense)
        per_layer = True
        if abs(achieved - compression) > COMPRESSION_TOLERANCE:
            floor = _below_rank_one(model, param, compression, layers, leave_dense)
            warnings.warn(f"{param}: the energy plan gives Z = {achieved:.2f}%, not within "
                          f"{COMPRESSION_TOLERANCE} points of {compression:g}% ({floor or 'the ranks move Z in steps'})",
                          stacklevel=2)
    elif compression is not None:
        rank, achieved = rank_for_compression(model, param, compression, layers, leave_dense)
        if abs(achieved - compression) > COMPRESSION_TOLERANCE:
            # one shared rank moves Z in steps; say so instead of silently missing the target
            floor = _below_rank_one(model, param, compression, layers, leave_dense)
            warnings.warn(f"{param}: no shared rank gives Z within {COMPRESSION_TOLERANCE} points of "
                          f"{compression:g}%; rank {rank} gives Z = {achieved:.2f}%" + (f" ({floor})" if floor else ""),
                          stacklevel=2)
    elif rank_scale is not None:
        rank, per_layer = _scaled_ranks(param, layers, float(rank_scale)), True
    _normalize_layer_ranks(entry, rank, layers)
    layer_rank = (lambda name: rank[name]) if per_layer else (lambda name: rank)  # noqa: E731
    left_dense = []
    if leave_dense:
        no_gain = {name for name, m in layers if _gains_nothing(param, m, layer_rank(name))}
        left_dense = [{"layer": name, "type": _layer_type(m), "shape": list(m.weight.shape),
                       "rank": entry.rank_to_spec(_rank_on(param, m, layer_rank(name))),
                       "params": _layer_count_dof(param, m, layer_rank(name)), "dense": m.weight.numel()}
                      for name, m in layers if name in no_gain]
        layers = [(name, m) for name, m in layers if name not in no_gain]
        if not layers:
            warnings.warn(f"{param} gains nothing on any selected layer at the rank chosen for Z "
                          f"{compression:g}%: every one stays dense (keep_dense_if_no_gain=False, "
                          "--no-keep-dense-if-no-gain on the command line, parameterizes them anyway)", stacklevel=2)
    if entry.largest_useful_rank is not None and isinstance(rank, int) and layers:
        useful = max(entry.largest_useful_rank(tuple(m.weight.shape), _transposed(m)) for _, m in layers)
        if rank > useful:
            warnings.warn(f"rank {rank} is above what every selected layer can use; the largest useful "
                          f"rank of {param} here is {useful} (the same as full rank)", stacklevel=2)
    if not per_layer:
        over = [n for n, m in layers if _layer_count_dof(param, m, rank) > m.weight.numel()]
        if over:
            at = "full rank" if rank is None else f"rank {rank}"
            warnings.warn(f"{param} at {at} has more degrees of freedom than the dense weight in "
                          f"{len(over)} layer(s): {', '.join(over[:5])}{' ...' if len(over) > 5 else ''}",
                          stacklevel=2)
    _apply_atomically([(name, module, param, layer_rank(name), _init_for(name, module, init))
                       for name, module in layers],
                      model if frame_bank else None)
    report = compression_report(model)
    report.rank, report.param = (None if per_layer else rank), param
    report.left_dense = left_dense
    if per_layer:
        report.plan = [{"layer": name, "rank": _running_rank(entry, module, rank[name]),
                        "energy": None if energies is None else round(energies[name], 6),
                        "params": _layer_count_dof(param, module, rank[name]), "dense": module.weight.numel()}
                       for name, module in layers]
    return report


def _running_rank(entry, module: nn.Module, asked):
    """The rank a parameterized layer runs at: an int rank capped at the layer's largest (the
    parametrization's ``rank``), a tuple as asked (its entries are checked, not capped)."""
    running = getattr(parametrization_of(module), "rank", None)
    if isinstance(asked, int) and isinstance(running, int):
        return running
    return entry.rank_to_spec(asked)


def _init_for(name: str, module: nn.Module, init: str) -> str:
    """``init`` for this layer: a spectral init of an all-zero weight (a zero-initialized output
    layer) would give zero factors or a zero gain, a layer no gradient can move, so such a
    layer gets the identity init, with a warning."""
    if init == "spectral" and not bool(module.weight.detach().any()):
        warnings.warn(f"layer {name!r} has an all-zero weight: its spectral init would be a zero layer that cannot "
                      "train; it gets the identity init instead", stacklevel=3)
        return "identity"
    return init


def _apply_atomically(plan, root: nn.Module | None = None) -> None:
    done: list[tuple[nn.Module, nn.Parameter]] = []
    try:
        for name, module, param, rank, init in plan:
            original = module.weight
            try:
                _register(module, param, rank, init)
            except Exception as err:
                raise ValueError(f"cannot parameterize layer {name!r} ({_layer_type(module)} "
                                 f"{tuple(original.shape)}) as {param}: {err}") from err
            done.append((module, original))
        if root is not None:
            attach_frame_bank(root)
    except BaseException:
        for module, original in reversed(done):
            remove_weight_parametrization(module)
            remove_factorized_forward(module)
            module.weight = original
            weight_first(module)
        raise


def densify(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A plain model with every parametrized weight materialized: the parameterized model's
    weights, bit for bit. Its outputs equal the parameterized model's bit for bit where the
    layers convolve with their weights (``forward_mode="materialized"``); where a layer runs
    its factors instead (cheaper, see :mod:`sttpfast.params.factorized`), up to float rounding
    (2-10e-6 on a float32 ViT / ConvNeXt).

    By default the parameterized ``model`` is left alone and a dense copy is returned."""
    _check_model(model)
    target = model if inplace else copy.deepcopy(model)
    # the weights are read with the bank still attached (one loose pass: the whole tree's
    # batched build), so the dense model holds the parameterized model's bits, not the
    # per-layer build's (which differs in the last bits)
    for _, module, _ in list(parameterized_layers(target)):
        remove_weight_parametrization(module)
        remove_factorized_forward(module)
    detach_frame_bank(target)
    return target


# ---------------------------------------------------------------------------------------
# specs: what a checkpoint stores to rebuild the same parameterization
def parameterization_spec(model: nn.Module) -> dict[str, dict]:
    """``{layer name: {"param", "rank", "shape"}}`` for every parametrized weight (TR layers
    also ``"ranks"``, their bonds: see ``TRLayer.rank_of_spec``)."""
    spec = {}
    for name, module, p in parameterized_layers(model):
        entry = method_of(p)
        if entry is not None:
            spec[name] = {"param": entry.name, "rank": entry.rank_to_spec(getattr(p, "requested_rank", None)),
                          "shape": list(_dense_shape(module))}
            if getattr(entry.cls, "rank_of_spec", None) is not None:
                spec[name]["ranks"] = list(p.ranks)
        else:
            raise ValueError(f"layer {name!r} has a foreign parametrization {type(p).__name__}; "
                             "only sttpfast's and spectral_norm can be saved")
    return spec


def apply_spec(model: nn.Module, spec: dict[str, dict], frame_bank: bool = True) -> None:
    """Re-apply a stored spec to a dense model of the same architecture (identity init;
    the checkpoint's tensors are loaded afterwards). Mismatches are reported together."""
    modules = dict(model.named_modules())
    problems = []
    for name, entry in spec.items():
        module = modules.get(name)
        if module is None:
            problems.append(f"layer {name!r} does not exist in the model")
        elif not isinstance(module, SUPPORTED_LAYERS):
            problems.append(f"layer {name!r} is a {type(module).__name__}, not a parameterizable layer")
        elif parametrize.is_parametrized(module, "weight"):
            problems.append(f"layer {name!r} is already parameterized")
        elif list(module.weight.shape) != list(entry["shape"]):
            problems.append(f"layer {name!r} has weight shape {list(module.weight.shape)}, "
                            f"the checkpoint has {list(entry['shape'])}")
    if problems:
        raise ValueError("checkpoint does not match the model: " + "; ".join(problems))
    plan = []
    requested = {}
    for name, e in spec.items():
        entry = method(e["param"])
        rank = entry.rank_from_spec(e.get("rank"))
        # a format whose rank changed meaning once rebuilds the bonds its spec stores (TR), and
        # keeps the rank it was asked for (what its spec says again)
        of_spec = getattr(entry.cls, "rank_of_spec", None)
        if of_spec is not None:
            requested[name], rank = rank, of_spec(e, _transposed(modules[name]))
        plan.append((name, modules[name], entry.name, rank, "identity"))
    _apply_atomically(plan, model if frame_bank else None)
    for name, rank in requested.items():
        modules[name].parametrizations.weight[0].requested_rank = rank


def check_rank_useful(param: str, rank, report) -> None:
    """Refuse (ValueError) one shared int ``rank`` above what every parameterized layer of
    ``report`` can use: it compresses nothing (``parameterize`` only warns, for library use)."""
    from sttpfast.params import method

    entry = method(param)
    if not isinstance(rank, int) or entry.largest_useful_rank is None or not report.rows:
        return
    useful = max(entry.largest_useful_rank(row.shape, row.layer == "ConvTranspose2d") for row in report.rows)
    if rank > useful:
        raise ValueError(f"rank {rank} is too large for {param} on this model: the largest useful rank is "
                         f"{useful} (no compression)")


def parameterize_for_run(model: nn.Module, param: str, rank=None, compression=None, include=None, exclude=None,
                         init=None, plan=None, rank_scale=None, unrepresentable=None, keep_dense_if_no_gain=True,
                         attention: str | None = None, attention_rank: int | None = None):
    """The surgery of a run (``spectral_learner``, ``sttpfast info``): the attention forms
    first (from the dense weights; ``param`` then leaves their Linears alone for ``qk-ov``, or
    treats q, k and v as three layers for ``q-k-v``), then ``param``. Returns the model's report."""
    factored = attention == "qk-ov"
    if attention is not None:
        formed = parameterize_attention(model, attention, rank=rank if attention_rank is None else attention_rank)
        exclude = ([exclude] if isinstance(exclude, str) else list(exclude or [])) + formed
    report = parameterize(model, param, rank=None if factored and param in BASELINES else rank,
                          compression=compression, include=include, exclude=exclude, init=init,
                          plan=plan, rank_scale=rank_scale, unrepresentable=unrepresentable,
                          keep_dense_if_no_gain=keep_dense_if_no_gain)
    if not factored:
        return report
    whole = compression_report(model)  # with the forms' layers; rank, plan, left-dense: param's
    whole.rank, whole.plan, whole.left_dense = report.rank, report.plan, report.left_dense
    whole.left_dense_param = report.param
    return whole
