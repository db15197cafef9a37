"""Access to the parametrized weights of a model: which layers, which parametrization, which factors.

These helpers sit below both the frame bank and surgery (which re-exports them), so
neither has to import the other.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "parametrization_of", "factors_of", "parameterized_layers", "layer_type",
    "remove_weight_parametrization",
]


def parametrization_of(module: nn.Module) -> nn.Module | None:
    """The (first) parametrization on ``module.weight``, or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return module.parametrizations.weight[0]


def factors_of(module: nn.Module) -> tuple[torch.Tensor, ...]:
    """The factor tensors (``original0, original1, ...``) behind ``module.weight``."""
    plist = module.parametrizations.weight
    if plist.is_tensor:
        return (plist.original,)
    return tuple(getattr(plist, f"original{i}") for i in range(plist.ntensors))


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
