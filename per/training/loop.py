"""The one training loop, shared by the image and language-model runners.

Task differences live in a small task object (see `Task`); everything else
(precision, regularizer, clipping, lr, checkpoints, records, divergence, signals,
monitoring) lives here. The step has no host synchronization: losses, penalty
statistics and the non-finite check accumulate on the device and are read once
per `log_every` steps and at the end of each epoch.
"""
from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.nn as nn
from tqdm import tqdm

from per import schema
from per.regularizers import Regularizer
from per.training import runtime
from per.training.loggers import WandbSink
from per.training.monitor import activation_stats
from per.training.optim import clip_gradients, set_lr
from per.training.records import BEST_CHECKPOINT, RunDir

log = logging.getLogger(__name__)


class Task(Protocol):
    """What differs between image classification and language modelling."""
    name: str                 # "cifar" | "lm"
    items: str                # "images" | "tokens" (throughput unit)
    selection_metric: str | None  # validation metric that defines `best`, or None

    def batches_per_epoch(self) -> int: ...
    def train_batches(self, epoch: int, start: int) -> Iterator[Any]: ...
    def train_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward one batch: (mean task loss, sums to accumulate; must include 'items')."""
    def train_metrics(self, sums: dict[str, float]) -> dict[str, float]: ...
    def eval_batches(self) -> int:
        """Batches one `evaluate` runs (all splits, within `limit_eval_batches`)."""
    def evaluate(self, model: nn.Module, on_batch: Callable[[], None] | None = None) -> dict[str, float]:
        """Metrics of every evaluation split; `on_batch()` after each batch (progress)."""
    def probe_forward(self, model: nn.Module) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Experiment:
    """What a task builder returns: the model and its task object."""
    model: nn.Module
    task: Task


@dataclass
class LoopSettings:
    epochs: int
    max_steps: int | None = None      # stop after this many optimizer steps in total
    precision: str = "fp32"
    clip_norm: float = 0.0
    clip_mode: str = "none"
    log_every: int = 50               # steps between host reads (progress, divergence, penalty stats)
    monitor_every: int = 0            # steps between activation snapshots (0 = off)
    monitor_sites: list[str] = field(default_factory=list)
    monitor_units: int = 4
    monitor_layout: str = "channels"
    monitor_slices: int = 256
    seed: int = 0                     # seeds the monitor's own directions (not the training RNG)
    progress: bool = True


@dataclass
class TrainState:
    """Counters and records that a checkpoint carries besides the weights."""
    epoch: int = 0                    # epochs completed
    batch: int = 0                    # batches done in the epoch in progress
    step: int = 0                     # optimizer steps done
    wall_time_s: float = 0.0
    best: dict = field(default_factory=lambda: {"epoch": None})
    final: dict = field(default_factory=dict)
    sums: dict = field(default_factory=dict)  # epoch accumulators (floats, on resume)
    train_time_s: float = 0.0         # training time of the epoch in progress


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def format_metrics(metrics: dict) -> str:
    """`key=value` pairs, floats to 4 significant digits."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def checkpoint_state(model: nn.Module, optimizer, schedule, regularizer: Regularizer | None,
                     task: Task, state: TrainState, extra: dict) -> dict:
    """One plain dict: everything needed to continue exactly where the run stopped."""
    return {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "regularizer": regularizer.state_dict() if regularizer is not None else None,
            "task": task.state_dict(), "train_state": state.__dict__.copy(),
            "rng": runtime.rng_state(), **extra}


def restore(ckpt: dict, model: nn.Module, optimizer, schedule, regularizer: Regularizer | None,
            task: Task) -> TrainState:
    _unwrap(model).load_state_dict(ckpt["model"])
    if regularizer is not None and ckpt["regularizer"] is not None:
        regularizer.load_state_dict(ckpt["regularizer"])
    optimizer.load_state_dict(ckpt["optimizer"])
    schedule.load_state_dict(ckpt["schedule"])
    task.load_state_dict(ckpt["task"])
    runtime.set_rng_state(ckpt["rng"])
    return TrainState(**ckpt["train_state"])


def fit(model: nn.Module, task: Task, optimizer: torch.optim.Optimizer, schedule,
        run: RunDir, settings: LoopSettings, *, regularizer: Regularizer | None = None,
        sink: WandbSink | None = None, state: TrainState | None = None,
        checkpoint_extra: dict | None = None, stop: StopSignal | None = None,
        on_step: Callable[[int], None] | None = None) -> tuple[str, TrainState]:
    """Train until `settings.epochs` (or `max_steps`); returns (status, state).

    status is `finished`, `diverged` (a non-finite loss or penalty was seen) or
    `interrupted` (a stop signal arrived; a checkpoint was written first).
    `on_step(step)` is called after each optimizer step (tests use it to inject faults).
    """
    state = state or TrainState()
    extra = checkpoint_extra or {}
    device = next(model.parameters()).device
    autocast = runtime.autocast_context(device, settings.precision)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    steps_per_epoch = task.batches_per_epoch()

    def save(path: str | None = None) -> None:
        ckpt = checkpoint_state(model, optimizer, schedule, regularizer, task, state, extra)
        run.save_checkpoint(ckpt) if path is None else run.save_checkpoint(ckpt, path)

    def monitor(epoch_float: float) -> None:
        rows = activation_stats(model, lambda: task.probe_forward(model), settings.monitor_sites,
                                num_units=settings.monitor_units, layout=settings.monitor_layout,
                                num_slices=settings.monitor_slices, step=state.step,
                                epoch=epoch_float, seed=settings.seed)
        run.append("activations.jsonl", rows)

    def done() -> bool:
        return settings.max_steps is not None and state.step >= settings.max_steps

    if settings.monitor_every and settings.monitor_sites and state.step == 0:
        monitor(0.0)
    while state.epoch < settings.epochs and not done():
        epoch = state.epoch
        # Epoch accumulators: tensors stay on the device (losses, error counts, per-site
        # penalty statistics of tracked steps under keys with a '/'); Python numbers
        # (item counts) and the partial sums restored after a resume stay on the host.
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, float] = dict(state.sums)

        def read_sums() -> dict[str, float]:   # the one host read per log interval
            host = dict(counts)
            if sums:
                for k, v in zip(sums, torch.stack(list(sums.values())).tolist()):
                    host[k] = host.get(k, 0.0) + v
            return host

        t0 = time.perf_counter()
        batches = steps_per_epoch   # the batches of this epoch that will run
        if settings.max_steps is not None:
            batches = min(batches, state.batch + settings.max_steps - state.step)
        bar = tqdm(total=batches, initial=state.batch, desc=f"epoch {epoch + 1}/{settings.epochs}",
                   disable=not settings.progress, leave=False, dynamic_ncols=True)
        for batch in task.train_batches(epoch, state.batch):
            set_lr(optimizer, schedule.base_lr(epoch, state.step))
            track = state.step % settings.log_every == 0
            if regularizer is not None:
                regularizer.begin_step(track=track)
            with autocast:
                loss, batch_sums = task.train_step(model, batch)
                total = loss + regularizer.penalty() if regularizer is not None else loss
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            clip_gradients(params, settings.clip_norm, settings.clip_mode)
            optimizer.step()
            state.step += 1
            state.batch += 1
            n = batch_sums["items"]
            new = {"loss": loss.detach() * n, "total": total.detach() * n, **batch_sums}
            if regularizer is not None and track:
                new.update(regularizer.site_stats())
                new["tracked"] = 1
            for k, v in new.items():
                if isinstance(v, torch.Tensor):
                    v = v.detach().to(torch.float64)
                    sums[k] = sums[k] + v if k in sums else v
                else:
                    counts[k] = counts.get(k, 0.0) + v
            if on_step is not None:
                on_step(state.step)
            if track or state.batch == steps_per_epoch:
                host = read_sums()
                if not math.isfinite(host["total"]):
                    bar.close()
                    state.final = {**state.final, "diverged_at_step": state.step}
                    log.warning("diverged: non-finite training loss by step %d (epoch %d); recorded as "
                                "diverged", state.step, epoch + 1)
                    return schema.DIVERGED, state
                rate = host["items"] / (state.train_time_s + time.perf_counter() - t0)
                so_far = task.train_metrics(host)
                bar.set_postfix({**{k: f"{v:.4g}" for k, v in so_far.items()},
                                 f"{task.items}/s": f"{rate:.0f}"})
                if sink is not None:
                    sink.log_step({**so_far, "lr": optimizer.param_groups[0]["lr"],
                                   f"{task.items}_per_s": rate}, step=state.step)
            bar.update(1)
            if settings.monitor_every and settings.monitor_sites and state.step % settings.monitor_every == 0:
                monitor(epoch + state.batch / steps_per_epoch)
            if stop is not None and stop.signum is not None or done():
                break
        bar.close()
        state.train_time_s += time.perf_counter() - t0
        state.wall_time_s += time.perf_counter() - t0
        state.sums = read_sums()
        if not math.isfinite(state.sums.get("total", 0.0)):
            state.final = {**state.final, "diverged_at_step": state.step}
            log.warning("diverged: non-finite training loss by step %d (epoch %d); recorded as diverged",
                        state.step, epoch + 1)
            return schema.DIVERGED, state
        if stop is not None and stop.signum is not None and state.batch < steps_per_epoch:
            save()  # mid-epoch: the checkpoint continues at this very batch
            log.warning("stopped by %s at step %d (epoch %d, batch %d): checkpoint written; the same "
                        "command resumes", signal.Signals(stop.signum).name, state.step, epoch + 1,
                        state.batch)
            return schema.INTERRUPTED, state

        # ---- end of epoch: evaluate, record, checkpoint --------------------
        t_eval = time.perf_counter()
        row = {"epoch": epoch + 1, "step": state.step, "lr": optimizer.param_groups[0]["lr"]}
        row.update(task.train_metrics(state.sums))
        if regularizer is not None:  # averages over tracked steps; penalty = sum of unscaled L_site
            site_avgs = {k: v / state.sums.get("tracked", 1.0) for k, v in state.sums.items() if "/" in k}
            row["penalty"] = sum(v for k, v in site_avgs.items() if k.startswith("penalty/"))
            row.update(site_avgs)
        bar = tqdm(total=task.eval_batches(), desc=f"epoch {epoch + 1}/{settings.epochs} eval",
                   disable=not settings.progress, leave=False, dynamic_ncols=True)
        row.update(task.evaluate(model, on_batch=lambda: bar.update(1)))
        bar.close()
        row[f"{task.items}_per_s"] = state.sums["items"] / max(state.train_time_s, 1e-9)
        row["epoch_time_s"] = state.train_time_s
        state.wall_time_s += time.perf_counter() - t_eval
        schedule.end_epoch(row)
        state.epoch += 1
        state.batch = 0
        state.sums = {}
        state.train_time_s = 0.0
        state.final = {k: v for k, v in row.items() if "/" not in k}
        metric = task.selection_metric
        if metric is not None and row.get(metric) is not None and (
                state.best.get(metric) is None or row[metric] < state.best[metric]):
            state.best = {"epoch": epoch + 1, **{k: v for k, v in row.items() if "/" not in k and k != "epoch"}}
            run.save_checkpoint({"model": _unwrap(model).state_dict(), "epoch": epoch + 1, **extra},
                                BEST_CHECKPOINT)
        # Diagnostics (keys with '/') may be infinite legitimately: a grad ratio where the
        # task gradient is exactly zero (Fixup's zero-initialized branches).
        bad = [k for k, v in row.items() if isinstance(v, float) and "/" not in k and not math.isfinite(v)]
        if bad:
            run.append("metrics.jsonl", [row])
            log.warning("diverged: non-finite %s after epoch %d; recorded as diverged", ", ".join(bad),
                        epoch + 1)
            return schema.DIVERGED, state
        run.append("metrics.jsonl", [row])   # before the checkpoint: a resume truncates extras
        save()
        if sink is not None:
            sink.log(row, step=state.step)
        shown = {k: v for k, v in row.items() if "/" not in k and k not in ("epoch", "step")}
        log.info("epoch %d/%d step %d | %s", epoch + 1, settings.epochs, state.step, format_metrics(shown))
        if stop is not None and stop.signum is not None:
            log.warning("stopped by %s after epoch %d (step %d): checkpoint written; the same command "
                        "resumes", signal.Signals(stop.signum).name, epoch + 1, state.step)
            return schema.INTERRUPTED, state
    return schema.FINISHED, state
