"""Activation monitoring (the paper's Figures 3-4): on a fixed probe batch, per site,
mean / variance / quartiles of a few fixed units and the sliced W1 of the site's
points to N(0, I). Snapshots describe the network as it trains: normalization layers
use the probe batch's statistics, and nothing of the training state changes."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn

from per import sliced_wasserstein_normal, to_points
from per.models.lstm import SequenceDropout
from per.sites import capture_sites, list_sites

DROPOUT_MODULES = (nn.modules.dropout._DropoutNd, SequenceDropout)


def default_monitor_sites(model: nn.Module) -> list[str]:
    """Layers 3, 6, 9 (1-based) of the post-activation sites when the model has at
    least nine (the deep ELU net's monitored layers), else first, middle and last."""
    names = list(list_sites(model, role="post"))
    if len(names) >= 9:
        return [names[i - 1] for i in (3, 6, 9)]
    return sorted({names[0], names[len(names) // 2], names[-1]}, key=names.index)


@contextmanager
def batch_statistics_mode(model: nn.Module) -> Iterator[None]:
    """Train mode without dropout, leaving no trace: inside the block normalization
    layers (BN, recurrent BN) normalize with the batch's statistics and dropout is the
    identity (so no random numbers are drawn); on exit every buffer (running means and
    variances, num_batches_tracked, trained lengths) and every module's mode are restored."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.clone()) for b in model.buffers()]
    model.train()
    for m in model.modules():
        if isinstance(m, DROPOUT_MODULES):
            m.eval()
    try:
        yield
    finally:
        for b, saved in buffers:
            b.copy_(saved)
        for m, training in modes:
            m.training = training


@torch.no_grad()
def activation_stats(model: nn.Module, forward: Callable[[], object], sites: list[str], *,
                     num_units: int, layout: str, num_slices: int, step: int,
                     epoch: float, seed: int = 0) -> list[dict]:
    """One row per site. Units are the first `num_units` coordinates of the site's
    points (channels for conv sites under the `channels` layout, hidden units for
    the LSTM); `sw1` uses all coordinates; `layer` is the site's 1-based position
    among the model's post-activation sites. `forward` runs under `batch_statistics_mode`
    (batch statistics, no dropout, state restored) and no_grad (no regularizer acts);
    the random directions come from a generator seeded by (seed, step), so monitoring
    leaves the training RNG streams (PER directions, dropout, mixup) untouched."""
    with batch_statistics_mode(model), capture_sites(model, sites) as captured:
        forward()
    layer = {n: i + 1 for i, n in enumerate(list_sites(model, role="post"))}
    rows = []
    probs = None
    for name in sites:
        points = to_points(captured[name][0], layout).float()      # (N, d)
        units = list(range(min(num_units, points.shape[1])))
        vals = points[:, units]                                     # (N, k)
        if probs is None:
            probs = torch.tensor([0.25, 0.5, 0.75], device=vals.device)
        q = torch.quantile(vals, probs, dim=0)                      # (3, k)
        gen = torch.Generator(device=points.device).manual_seed(seed * 1_000_003 + step)
        sw1 = sliced_wasserstein_normal(points, num_slices=num_slices, generator=gen)
        stats = torch.stack([vals.mean(0), vals.var(0), *q]).cpu().tolist()
        rows.append({"step": step, "epoch": epoch, "site": name, "layer": layer.get(name), "units": units,
                     "mean": stats[0], "var": stats[1], "q25": stats[2], "q50": stats[3],
                     "q75": stats[4], "sw1": float(sw1)})
    return rows


@dataclass
class Monitor:
    """Activation snapshots (`activation_stats`) of `sites` at step 0 and every `every`
    optimizer steps; the loop appends the rows to `activations.jsonl`. The points are in the
    `channels` layout whatever the run's regularizer uses: a figure compares methods, so
    every run is measured alike."""
    sites: list[str]
    every: int
    num_units: int = 4
    num_slices: int = 256
    seed: int = 0                # seeds the monitor's own directions (not the training RNG)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def snapshot(self, model: nn.Module, forward: Callable[[], object], step: int, epoch: float) -> list[dict]:
        """One row per site after `forward()` (the probe batch through `model`)."""
        return activation_stats(model, forward, self.sites, num_units=self.num_units, layout="channels",
                                num_slices=self.num_slices, step=step, epoch=epoch, seed=self.seed)
