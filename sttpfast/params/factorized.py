"""Running a low-rank layer (CP, Tucker-2, SVDP / STTP) on its factors instead of its materialized kernel.

``torch.nn.utils.parametrize`` can only give a layer a *weight*; to contract the factors
with the input the layer's forward itself has to change. :func:`install_factorized_forward`
gives the layer (a Conv1d/2d/3d or Linear) an instance-level ``forward`` that, on every
call, picks one of two paths:

* materialized: the class's own forward, which reads ``module.weight`` (the
  parametrization builds the kernel; ``parametrize.cached()`` applies);
* factorized: 1x1 conv ``C_in -> R_in``, the middle conv (Tucker-2: the ``R_in -> R_out``
  core with the kernel; CP: a depthwise conv whose kernel is the outer product of the
  spatial factors; SVDP / STTP, which have no first 1x1 conv: ``C_in -> r`` whose kernel is
  ``V^T``) carrying the layer's stride, padding and dilation, then 1x1 conv
  ``R_out -> C_out`` with the bias (SVDP / STTP: ``U diag(g s)``). Linear layers: the same
  with matrix products.

Why an instance ``forward`` and not a wrapper module: the layer keeps its class, name,
attributes and state_dict keys, so surgery, ``densify``, specs, checkpoints and Z see
exactly the same model; ``copy.deepcopy`` carries the override along (it points at the
copy). A layer whose parametrization is removed without :func:`remove_factorized_forward`
finds no factorizable parametrization and simply runs the class's forward; densify removes
the override (torch.jit.script cannot compile an instance ``forward``).

The choice (``forward_mode = "auto"`` on the parametrization) compares multiply-adds for
this call: materialized = building the kernel (``p.flops``) + ``P_out C_out C_in K``;
factorized = ``P_in C_in R_in + P_out R_out R_in K + P_out R_out C_out`` (Tucker-2) or
``P_in C_in R + P_out R K + P_out R C_out`` (CP), with ``P_in``/``P_out`` the number of
input / output positions in the batch (rows of a Linear) and ``K`` the kernel size. SVDP /
STTP (:meth:`~sttpfast.params.chain.SpectralChain.flops`): the contraction from the frames
(the whole plan with its final ``d_out x d_in`` product, or each side in its cheapest order,
stopping at the rank-``r`` bond) + ``P_out C_out C_in K``, against that + ``P_out r (C_in K + C_out)``. The
backward pass costs about twice the forward on both paths, so the same comparison holds for
training. Memory, in training (train mode, autograd recording): a parametrization that reports what
each path keeps for backward (``stored_elements``; SVDP / STTP: the weight ``C_out C_in K``
against the intermediate activation ``P_out r`` and the factors) runs factorized only if
that costs at most :data:`MEMORY_SLACK` of the layer's input and output activations
(``P_in C_in + P_out C_out``) more: measured on wrn16_4 (bs 128, rank 32), the intermediate
activations of the wide 32x32 stage alone raised a training step's peak to 1.11x dense.
``forward_mode = "factorized"`` / ``"materialized"`` forces a path. Grouped
convs, non-zero padding modes, transposed convs and subclasses with a forward of their own
(timm's ``StdConv2d``, ``Conv2dSame``) always run materialized. Under
``parametrize.cached()`` (validation) both forms are built once per pass (torch caches the
kernel; SVDP / STTP keep their factors beside it, :meth:`~sttpfast.params.chain.SpectralChain._built`),
so a call costs its convolutions only and auto mode compares those, without the builds
(``flops(P_in, P_out) - flops(0, 0)``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from sttpfast.params.layers import factors_of, parametrization_of

__all__ = ["install_factorized_forward", "remove_factorized_forward", "uses_factorized_path", "ChoosingForward",
           "FORWARD_MODES", "MEMORY_SLACK"]

FORWARD_MODES = ("auto", "factorized", "materialized")
#: in training, the factorized path may keep this fraction of a layer's input and output
#: activations more than the materialized one (module docstring)
MEMORY_SLACK = 0.1
_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


#: the classes whose forward the factorized path reproduces, with the methods it stands in for
_BASE_FORWARDS = {nn.Linear: ("forward",), nn.Conv1d: ("forward", "_conv_forward"),
                  nn.Conv2d: ("forward", "_conv_forward"), nn.Conv3d: ("forward", "_conv_forward")}


def _runs_the_base_forward(module: nn.Module) -> bool:
    """Whether ``module`` is a Linear / Conv1d/2d/3d whose class keeps torch's own forward: a
    subclass with its own (timm's ``StdConv2d`` standardizes the weight, ``Conv2dSame`` pads
    per input) must run it, which the factorized path would skip."""
    cls = parametrize.type_before_parametrizations(module)
    for base, methods in _BASE_FORWARDS.items():
        if issubclass(cls, base):
            return all(getattr(cls, name) is getattr(base, name) for name in methods)
    return False


def install_factorized_forward(module: nn.Module) -> None:
    """Give a Conv1d/2d/3d or Linear layer the path-choosing forward; others, and subclasses
    with a forward of their own, are left alone (they run materialized)."""
    if _runs_the_base_forward(module):
        module.forward = ChoosingForward(module)


def remove_factorized_forward(module: nn.Module) -> None:
    """Give the layer its class's forward back (densify: a plain layer that torch.jit.script
    can compile, whose instance ``forward`` would otherwise be a :class:`ChoosingForward`)."""
    if isinstance(module.__dict__.get("forward"), ChoosingForward):
        del module.__dict__["forward"]


def _factorizable(module: nn.Module):
    p = parametrization_of(module)
    if p is None or not hasattr(p, "conv_factors") or getattr(p, "reshaped", False) or p.view.transposed:
        return None
    if isinstance(module, nn.Linear):
        return p
    if module.groups != 1 or module.padding_mode != "zeros":
        return None
    return p


def _positions(module: nn.Module, x: Tensor) -> tuple[int, int]:
    """Input and output positions in the batch (``P_in``, ``P_out``)."""
    if isinstance(module, nn.Linear):
        rows = x.numel() // x.shape[-1]
        return rows, rows
    nd = len(module.kernel_size)
    spatial = x.shape[-nd:]
    batch = x.numel() // (x.shape[-nd - 1] * math.prod(spatial))
    if isinstance(module.padding, str):
        pads = [0] * nd if module.padding == "valid" else None
    else:
        pads = module.padding
    if pads is None:  # "same"
        out = spatial
    else:
        out = [(s + 2 * p - d * (k - 1) - 1) // st + 1 for s, p, d, k, st in
               zip(spatial, pads, module.dilation, module.kernel_size, module.stride)]
    return batch * math.prod(spatial), batch * math.prod(out)


def uses_factorized_path(module: nn.Module, x: Tensor) -> bool:
    """Whether ``module`` runs ``x`` through its factors (the rule in the module docstring)."""
    p = _factorizable(module)
    if p is None:
        return False
    mode = getattr(p, "forward_mode", "auto")
    if mode not in FORWARD_MODES:
        raise ValueError(f"forward_mode must be one of {', '.join(FORWARD_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode == "factorized"
    p_in, p_out = _positions(module, x)
    dense, factored = p.flops(p_in, p_out)
    # under parametrize.cached() (validation) the kernel and the factors are built once per
    # pass, not per call: a call costs its convolutions only. torch keeps the flag private
    # (2.14); without it, every call counts its build
    if getattr(parametrize, "_cache_enabled", 0):
        build_dense, build_factored = p.flops(0, 0)
        dense, factored = dense - build_dense, factored - build_factored
    if factored >= dense:
        return False
    # train mode, not grad mode alone: a copy traced in eval mode (torch.export records with
    # autograd on) must take the paths the model takes under no_grad
    if not (module.training and torch.is_grad_enabled()) or not hasattr(p, "stored_elements"):
        return True
    kept, kept_factored = p.stored_elements(p_in, p_out)
    return kept_factored - kept <= MEMORY_SLACK * (p_in * p.view.c_in + p_out * p.view.d_out)


class ChoosingForward:
    """A layer's instance ``forward``: the factorized path when it is cheaper, else the class's.

    A small callable object rather than a closure, so that the layer deep-copies (the copy
    gets its own, pointing at the copy)."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        # the choice per (input shape, mode, train and grad, parametrize cache): it depends on
        # nothing else of a call, and making it costs more than a small layer's forward; kept
        # for one parametrization, dropped when the layer gets another
        self._choices: dict = {}
        self._of = None

    def __call__(self, input: Tensor) -> Tensor:  # noqa: A002 (torch's name: layer(input=x) works)
        x, layer = input, self.layer
        if torch.compiler.is_compiling():
            # traced: the choice is made once per graph anyway, and filling the cache here
            # made its state a guard that failed at the next call (one more compile)
            return _choosing_forward(layer, x, uses_factorized_path(layer, x))
        p = parametrization_of(layer)
        if p is not self._of:
            self._choices, self._of = {}, p
        key = (tuple(x.shape), getattr(p, "forward_mode", None), layer.training and torch.is_grad_enabled(),
               bool(getattr(parametrize, "_cache_enabled", 0)))
        factorized = self._choices.get(key)
        if factorized is None:
            factorized = self._choices[key] = uses_factorized_path(layer, x)
        return _choosing_forward(layer, x, factorized)

    def __getstate__(self):
        return {"layer": self.layer, "_choices": {}, "_of": None}


def _choosing_forward(self: nn.Module, x: Tensor, factorized: bool) -> Tensor:
    if not factorized:
        return type(self).forward(self, x)
    p = parametrization_of(self)
    # first is None where the middle conv takes the input itself (SVDP / STTP)
    first, middle, last, depthwise = p.conv_factors(factors_of(self))
    if isinstance(self, nn.Linear):
        h = x if first is None else F.linear(x, first)
        h = h * middle.reshape(-1) if depthwise else F.linear(h, middle)
        return F.linear(h, last, self.bias)
    nd = len(self.kernel_size)
    conv = _CONVS[nd]
    ones = [1] * nd
    h = x if first is None else conv(x, first.reshape(*first.shape, *ones))
    h = conv(h, middle, stride=self.stride, padding=self.padding, dilation=self.dilation,
             groups=middle.shape[0] if depthwise else 1)
    return conv(h, last.reshape(*last.shape, *ones), self.bias)
