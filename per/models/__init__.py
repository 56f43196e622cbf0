"""Model registry: `create(name, **kwargs)` builds a model by its registry key.

Configs name registry keys (never import paths). Each model module registers its
variants with `@register("name")`.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable:
    """Decorator: register a model factory under `name`."""
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise KeyError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn
    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, **kwargs) -> nn.Module:
    """Build the registered model `name` with keyword arguments `kwargs`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)


from . import resnet, elu_cnn, lstm  # noqa: E402,F401  (registration side effects)
