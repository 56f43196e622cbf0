"""How strongly a regularizer acts on a model: gradient ratios at its sites and parameters.

A lambda does something only if the penalty's gradient is not negligible next to the
task's. `measure_strength` answers that for one batch, without changing the model:

- `site_ratios`: per site, `||lam dL_site/dh|| / ||d(downstream loss)/dh||`, exactly the
  `grad_ratio/<site>` a training run logs (the downstream gradient includes the task and
  the penalties of later sites);
- `task_site_ratios`: per site, `||lam dL_site/dh|| / ||d(task loss)/dh||`, the penalty
  against the task alone (it takes a task-only backward pass, which a training step has not);
- `param_share`: `||grad_params(lam * penalty)|| / ||grad_params(task loss)||`, the
  penalty's pull on the weights relative to the task's.

Example:
    s = measure_strength(model, lambda: F.cross_entropy(model(x), y), "per", 1e-4)
    print(s.site_ratios, s.param_share)
"""
from __future__ import annotations

import contextlib
import copy
import math
import numbers
import statistics
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn

from per.regularizers import Regularizer
from per.schema import GRAD_RATIO_PREFIX


# A site's grad_ratio where a penalty acts without swamping the task's gradient: a median
# over the sites outside it means the lambda is off (the plan's warnings from `make
# strength`, and a run's after its second and its last epoch: `band_warning`).
BAND = (1e-3, 1.0)


def band_warning(ratios: dict[str, float]) -> str | None:
    """Where the median of a run's site `grad_ratio`s (site -> ratio; NaN ignored) leaves
    `BAND`, as one phrase saying what that means; None inside it or without a ratio."""
    values = [v for v in ratios.values() if v == v]
    if not values:
        return None
    median = statistics.median(values)
    if BAND[0] <= median <= BAND[1]:
        return None
    if median < BAND[0]:
        meaning = f"below {BAND[0]:g}: the penalty barely acts"
    elif math.isinf(median):
        meaning = "inf: the task's gradient is zero at most sites, so the penalty alone moves them"
    else:
        meaning = f"above {BAND[1]:g}: the penalty outweighs the task's gradient"
    return (f"median site grad_ratio {median:.2g} over {len(values)} sites "
            f"(range {min(values):.2g}..{max(values):.2g}), {meaning}")


@dataclass
class Strength:
    """Result of `measure_strength` (plain floats)."""
    site_ratios: dict[str, float]   # site name -> grad_ratio at that site
    param_share: float              # ||penalty's parameter gradient|| / ||task's||
    task_site_ratios: dict[str, float]   # site name -> the same over the task's gradient alone


def _param_grads(model: nn.Module, loss_fn: Callable[[], torch.Tensor], reg: Regularizer,
                 lam: float, task_weight: float, seed: int, track: bool) -> list[torch.Tensor]:
    """Parameter gradients of `task_weight * loss + lam * penalty` after one seeded pass.

    The same seed and the same attached regularizer make every pass draw the same PER
    directions and dropout masks, so the passes differ only in `lam` and `task_weight`.
    """
    reg.lam = lam
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    reg.begin_step(track=track)
    (task_weight * loss_fn() + reg.penalty()).backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def _site_grad_norms(model: nn.Module, names: list[str]) -> Iterator[dict[str, list[float]]]:
    """Record, per site and call, the norm of the gradient reaching the site's output in the
    backward passes run in the block (before the site adds its own penalty's)."""
    norms: dict[str, list[float]] = {n: [] for n in names}
    sites = dict(model.named_modules())

    def on_forward(name: str):
        def hook(module: nn.Module, args, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(lambda g: norms[name].append(float(g.double().norm())))
        return hook
    handles = [sites[n].register_forward_hook(on_forward(n)) for n in names]
    try:
        yield norms
    finally:
        for h in handles:
            h.remove()


def _task_ratio(ratio: float, full: list[float], task: list[float]) -> float:
    """`||lam g|| / ||task grad||` from the logged `ratio = ||lam g|| / ||downstream grad||`
    of a site called once per forward (NaN otherwise: the logged ratio is a mean over calls)."""
    if len(full) != 1 or len(task) != 1:
        return math.nan
    penalty = ratio * full[0]
    return penalty / task[0] if task[0] > 0 else (math.inf if penalty > 0 else math.nan)


def _norm(grads: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads))


def measure_strength(model: nn.Module, loss_fn: Callable[[], torch.Tensor], kind: str,
                     lams: float | list[float], *, seed: int = 0,
                     **regularizer_kwargs) -> Strength | list[Strength]:
    """Gradient ratios of a `kind` regularizer at each of `lams` on one batch.

    Args:
        model: in train mode, the plain module (not a `torch.compile` wrapper); its
            parameters and buffers (BN running statistics) are restored afterwards, and no
            optimizer step is taken.
        loss_fn: computes the task loss of one fixed batch with a forward pass of `model`.
        kind: "per", "l1" or "l2" (the kinds with a closed-form site gradient).
        lams: one lambda or a list.
        **regularizer_kwargs: passed to `Regularizer` (layout, reduction, num_slices, ...;
            not `path`: the ratios are the backward path's).

    Returns: a `Strength` per lambda (a single one when `lams` is a float). Each lambda
    costs two forward/backward passes, plus one for the task gradient (which also gives
    the task-only gradient at each site). The global RNG
    (CPU and the model's CUDA devices) is left as it was.
    """
    if kind not in ("per", "l1", "l2"):
        raise ValueError(f"measure_strength supports kinds per, l1, l2; got {kind!r}")
    if "path" in regularizer_kwargs:
        raise ValueError("measure_strength always uses path='backward' (its site ratios are the "
                         "backward path's grad_ratio); drop the path argument")
    single = isinstance(lams, numbers.Real)
    lam_list = [float(lams)] if single else [float(x) for x in lams]
    saved = copy.deepcopy(model.state_dict())
    reg = Regularizer(model, kind, 0.0, path="backward", **regularizer_kwargs)
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    names = reg.site_names
    with torch.random.fork_rng(devices=cuda), _restored(model, reg, saved):
        with _site_grad_norms(model, names) as task_norms:
            task = _norm(_param_grads(model, loss_fn, reg, 0.0, 1.0, seed, track=False))
        out = []
        for lam in lam_list:
            penalty = _norm(_param_grads(model, loss_fn, reg, lam, 0.0, seed, track=False))
            with _site_grad_norms(model, names) as full_norms:
                _param_grads(model, loss_fn, reg, lam, 1.0, seed, track=True)
            ratios = {k.removeprefix(GRAD_RATIO_PREFIX): float(v)
                      for k, v in reg.site_stats().items() if k.startswith(GRAD_RATIO_PREFIX)}
            task_ratios = {k: _task_ratio(v, full_norms[k], task_norms[k]) for k, v in ratios.items()}
            out.append(Strength(ratios, penalty / task if task > 0 else math.nan, task_ratios))
    return out[0] if single else out


@contextlib.contextmanager
def _restored(model: nn.Module, reg: Regularizer, saved: dict) -> Iterator[None]:
    """Detach `reg` and put back the model's state and gradients, whatever happens."""
    try:
        yield
    finally:
        reg.remove()
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
