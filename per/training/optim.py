"""Optimizer construction and learning-rate schedules.

Param groups carry an `lr_mult` (biases and Fixup scales at lr/10 in the Fixup and
VCL protocols) and their own weight decay. Schedules give the base learning rate;
the loop writes `base * lr_mult` into each group before every step.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn

from per.schema import LOSS, VAL, VAL_ERROR, VAL_PPL, metric_key

SCHEDULES = ("multistep", "plateau")


def param_groups(model: nn.Module, extra: list[nn.Parameter] | None = None, *,
                 weight_decay: float, bias_lr_mult: float = 1.0,
                 bias_weight_decay: bool = True,
                 bias_patterns: tuple[str, ...] = ("bias", "scale")) -> list[dict]:
    """Split parameters into a default group and a bias/scale group (by name).

    `extra` (VCL's per-unit betas) goes in its own group at the full lr with the default
    weight decay, as in the VCL reference, where the betas are model parameters named
    `vcl_<i>` and so fall among its non-bias parameters.
    """
    default, biases = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        (biases if any(pat in leaf for pat in bias_patterns) else default).append(p)
    groups = [{"params": default, "weight_decay": weight_decay, "lr_mult": 1.0, "name": "default"},
              {"params": biases, "weight_decay": weight_decay if bias_weight_decay else 0.0,
               "lr_mult": bias_lr_mult, "name": "bias"}]
    if extra:
        groups.append({"params": list(extra), "weight_decay": weight_decay, "lr_mult": 1.0,
                       "name": "regularizer"})
    return [g for g in groups if g["params"]]


# Devices where SGD's update runs as one fused kernel per parameter group (`fused=True`):
# the same update as torch's default path, up to float rounding, with a fraction of its
# launches and host time (docs/speed.md, "The SGD update": ResNet-20's 59 tensors on one
# CPU thread, 0.343 ms against 0.907 ms per update).
FUSED_DEVICES = ("cpu", "cuda")
# The param-group keys that choose the update's kernels rather than its values.
KERNEL_KEYS = ("fused", "foreach")


def create_optimizer(groups: list[dict], *, lr: float, momentum: float = 0.0, nesterov: bool = False,
                     device: torch.device | None = None) -> torch.optim.SGD:
    """SGD over the given groups (every protocol of the paper uses SGD); on a device of
    `FUSED_DEVICES` its fused update, elsewhere torch's default.

    The fused update takes dense gradients only, and with momentum it creates the momentum
    buffers at the first step for all parameters at once: a parameter whose first gradient
    comes at a later step fails there (torch's default path handles both). Every parameter
    of this suite's models gets a dense gradient at every step."""
    fused = device is not None and device.type in FUSED_DEVICES
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, fused=fused or None)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)`, keeping this optimizer's kernel choice
    (`KERNEL_KEYS`): torch restores a checkpoint's param groups whole, so a run resumed from
    a checkpoint of another device or version would otherwise take that run's kernels."""
    kernels = [{k: g[k] for k in KERNEL_KEYS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keys in zip(optimizer.param_groups, kernels):
        group.update(keys)


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = base_lr * g.get("lr_mult", 1.0)


# What a plateau schedule may watch: validation metrics an epoch records, lower is better.
PLATEAU_METRICS = (VAL_PPL, metric_key(VAL, LOSS), VAL_ERROR)


def is_finite_number(v: object) -> bool:
    """An int or float (not a bool) that is finite."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_positive(name: str, v: object) -> None:
    if not is_finite_number(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")


@dataclass
class MultiStepSchedule:
    """Piecewise-constant lr, a pure function of (epoch, step).

    lr = base * prod(gammas of the milestones passed); `unit` says whether milestones
    count epochs or optimizer steps. During the first `warmup_steps` steps lr is
    `warmup_lr` (He et al.'s ResNet-110 warm-up: 0.01 for 400 iterations).
    """
    lr: float
    milestones: list[int] = field(default_factory=list)
    gamma: float | list[float] = 0.1
    unit: str = "epoch"
    warmup_steps: int = 0
    warmup_lr: float = 0.0

    def __post_init__(self) -> None:
        _check_positive("lr", self.lr)
        if self.unit not in ("epoch", "step"):
            raise ValueError(f"unknown schedule unit {self.unit!r}; valid: epoch, step")
        if (not isinstance(self.milestones, list) or not all(_is_count(m) for m in self.milestones)
                or self.milestones != sorted(set(self.milestones))):
            raise ValueError(f"milestones must be increasing integers >= 0, got {self.milestones!r}")
        gammas = self.gamma if isinstance(self.gamma, list) else [self.gamma] * len(self.milestones)
        if len(gammas) != len(self.milestones):
            raise ValueError(f"gamma must be one number or one per milestone ({len(self.milestones)}), "
                             f"got {self.gamma!r}")
        for g in gammas:
            _check_positive("gamma", g)
        if not _is_count(self.warmup_steps):
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.warmup_steps:
            _check_positive("warmup_lr", self.warmup_lr)
        self._values = [self.lr]
        for g in gammas:
            self._values.append(self._values[-1] * g)

    def base_lr(self, epoch: int, step: int) -> float:
        """epoch: 0-based epoch in progress; step: optimizer steps done so far."""
        if step < self.warmup_steps:
            return self.warmup_lr
        t = epoch if self.unit == "epoch" else step
        return self._values[bisect.bisect_right(self.milestones, t)]

    def end_epoch(self, metrics: dict) -> None:
        """Pure schedule: nothing to update."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class PlateauSchedule:
    """The word-language-model example's rule: lr /= factor after an epoch whose
    validation metric did not improve on the best so far."""
    lr: float
    factor: float = 4.0
    metric: str = VAL_PPL
    current: float = field(init=False)
    best: float = field(init=False, default=float("inf"))

    def __post_init__(self) -> None:
        _check_positive("lr", self.lr)
        if not is_finite_number(self.factor) or self.factor < 1:
            raise ValueError(f"factor must be a finite number >= 1 (lr /= factor), got {self.factor!r}")
        if self.metric not in PLATEAU_METRICS:
            raise ValueError(f"unknown plateau metric {self.metric!r}; valid: {', '.join(PLATEAU_METRICS)}")
        self.current = self.lr

    def base_lr(self, epoch: int, step: int) -> float:
        return self.current

    def end_epoch(self, metrics: dict) -> None:
        value = metrics.get(self.metric)
        if value is None:
            return
        if value < self.best:
            self.best = value
        else:
            self.current /= self.factor

    def state_dict(self) -> dict:
        return {"current": self.current, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.current, self.best = state["current"], state["best"]


def create_schedule(name: str, **kwargs) -> MultiStepSchedule | PlateauSchedule:
    """The schedule named by `optim.schedule`, built from `optim.schedule_args`.

    Args:
        name: "multistep" (`MultiStepSchedule`: lr, milestones, gamma, unit,
            warmup_steps, warmup_lr) or "plateau" (`PlateauSchedule`: lr, factor, metric).
        **kwargs: the schedule's fields.

    Raises:
        ValueError: unknown name (the error lists `SCHEDULES`), unknown argument (the error
            lists the schedule's) or a value out of range (lr, gamma, warmup_lr, factor > 0
            or >= 1; milestones increasing; metric one of `PLATEAU_METRICS`).

    Example:
        create_schedule("multistep", lr=0.1, milestones=[100, 150], gamma=0.1)
    """
    kinds = {"multistep": MultiStepSchedule, "plateau": PlateauSchedule}
    if name not in kinds:
        raise ValueError(f"unknown optim.schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    valid = [f.name for f in fields(kinds[name]) if f.init]
    if unknown := sorted(set(kwargs) - set(valid)):
        raise ValueError(f"unknown {name} schedule argument{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)}; valid: {', '.join(valid)}")
    return kinds[name](**kwargs)


CLIP_MODES = ("none", "global", "per_param")


def clip_gradients(params: list[torch.Tensor], max_norm: float, mode: str) -> None:
    """Clip without a host sync: `global` norm over all parameters (the LM protocol,
    0.25) or `per_param` norm of each parameter tensor (the VCL protocol, 1.0)."""
    if mode == "none":
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    elif mode == "per_param":
        norms = torch._foreach_norm(grads)
        coefs = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
        torch._foreach_mul_(grads, coefs)
    else:
        raise ValueError(f"unknown optim.clip_mode {mode!r}; valid: {', '.join(CLIP_MODES)}")
