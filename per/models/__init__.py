"""Model registry: `create(name, **kwargs)` builds a model by its registry key,
`from_config(cfg["model"], ...)` from a config's model group.

Configs name registry keys (never import paths). Each model module registers its
variants with `@register("name", task=...)`.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_TASK: dict[str, str] = {}     # model -> the task it is built for (`schema.TASKS`)


def register(name: str, task: str) -> Callable:
    """Decorator: register a model factory under `name`, for `task` ("cifar" or "lm")."""
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise KeyError(f"model {name!r} registered twice")
        _REGISTRY[name], _TASK[name] = fn, task
        return fn
    return wrap


def list_models(task: str | None = None) -> list[str]:
    """Registered model names, all or those of one task."""
    return sorted(n for n in _REGISTRY if task is None or _TASK[n] == task)


def create(name: str, **kwargs) -> nn.Module:
    """Build the registered model `name` with keyword arguments `kwargs`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)


def from_config(model_cfg: dict, **kwargs) -> nn.Module:
    """Build the model a config's `model` group names (`name` plus its options), with
    what the data decides (`num_classes`, `vocab_size`) in `kwargs`, which take
    precedence over the group's options."""
    options = {k: v for k, v in model_cfg.items() if k != "name"}
    return create(model_cfg["name"], **{**options, **kwargs})


from . import resnet, elu_cnn, lstm  # noqa: E402,F401  (registration side effects)
