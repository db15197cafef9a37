"""Access to the parametrized weights of a model: which layers, which parametrization, which factors.

These helpers sit below both the frame bank and surgery (which re-exports them), so
neither has to import the other.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from sttpfast.linalg.memo import constant_memo

__all__ = [
    "parametrization_of", "factors_of", "parameterized_layers", "layer_type",
    "remove_weight_parametrization", "weight_first",
]


def parametrization_of(module: nn.Module) -> nn.Module | None:
    """The (first) parametrization on ``module.weight``, or None."""
    # what parametrize.is_parametrized(module, "weight") and module.parametrizations.weight[0]
    # read, looked up in the module dicts directly: this runs for every layer at every forward
    # (the factorized forward's choice, the D-optimal penalty), where the attribute lookups
    # through nn.Module.__getattr__ cost more than the rest of the call
    plists = module._modules.get("parametrizations")
    if not isinstance(plists, nn.ModuleDict):
        return None
    plist = plists._modules.get("weight")
    return None if plist is None else plist._modules["0"]


def factors_of(module: nn.Module) -> tuple[torch.Tensor, ...]:
    """The factor tensors (``original0, original1, ...``) behind ``module.weight``."""
    plists = module._modules.get("parametrizations")
    plist = None if plists is None else plists._modules.get("weight")
    if plist is None:
        plist = module.parametrizations.weight  # not parametrized: the AttributeError it always gave
    if plist.is_tensor:
        return (plist.original,)
    # getattr(plist, "original<i>") in the order Python resolves it (an instance attribute, then
    # a parameter, then a buffer: parametrize registers a factor that does not require grad as a
    # buffer), without nn.Module.__getattr__'s cost on every factor of every layer at every step
    own, params, buffers = plist.__dict__, plist._parameters, plist._buffers
    out = []
    for name in _original_names(plist.ntensors):
        t = own[name] if name in own else params[name] if name in params else buffers.get(name)
        out.append(getattr(plist, name) if t is None else t)
    return tuple(out)


@constant_memo
def _original_names(n: int) -> tuple[str, ...]:
    return tuple(f"original{i}" for i in range(n))


def parameterized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """Yield ``(name, module, parametrization)`` for every parametrized weight under ``model``."""
    for name, module in model.named_modules():
        p = parametrization_of(module)
        if p is not None:
            yield name, module, p


def layer_type(module: nn.Module) -> type[nn.Module]:
    """The layer's own class (parametrize swaps in a generated subclass)."""
    return parametrize.type_before_parametrizations(module)


def remove_weight_parametrization(module: nn.Module) -> None:
    """Materialize ``module.weight`` as a plain parameter and give ``module`` its own class back.

    ``torch.nn.utils.parametrize`` gives a parametrized module a generated class that holds the
    ``weight`` property, and ``copy.deepcopy`` shares that class between the original and the
    copy; removing the parametrization deletes the property from the class, which would break
    every other module of it. So the module first gets a private copy of the generated class.
    The weight comes back as an ``nn.Parameter`` (trainable if any factor was), also under
    ``torch.no_grad`` where parametrize alone would register a buffer.
    """
    trainable = any(t.requires_grad for t in factors_of(module))
    cls = type(module)
    own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, own)
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    if not isinstance(module.weight, nn.Parameter):
        weight = module.weight.detach()
        delattr(module, "weight")
        module.weight = nn.Parameter(weight, requires_grad=trainable)
    weight_first(module)


def weight_first(module: nn.Module) -> None:
    """Put ``weight`` first among the module's parameters, where torch's layers define it:
    registering it again appends it after ``bias``, and an optimizer state matched by position
    would then no longer line up."""
    params = module._parameters
    if "weight" in params and next(iter(params)) != "weight":
        order = ["weight", *(k for k in params if k != "weight")]
        module._parameters = type(params)((k, params[k]) for k in order)
