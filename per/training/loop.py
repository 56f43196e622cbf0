"""The one training loop, shared by the image and language-model runners.

Task differences live in a small task object (see `Task`); everything else
(precision, regularizer, clipping, lr, checkpoints, records, divergence, signals,
monitoring) lives here. The step has no host synchronization: losses, penalty
statistics and the non-finite check accumulate on the device and are read once
per `log_every` steps and at the end of each epoch.
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Protocol

import torch
import torch.nn as nn
from tqdm import tqdm

from per import schema
from per.regularizers import Regularizer
from per.strength import band_warning
from per.training import runtime
from per.training.loggers import WandbSink
from per.training.monitor import Monitor
from per.training.optim import clip_gradients, load_optimizer_state, set_lr
from per.training.records import ACTIVATIONS_FILE, BEST_CHECKPOINT, METRICS_FILE, RunDir

log = logging.getLogger(__name__)
# Without a progress bar (output to a file), a progress line at the first host read
# after this many seconds since the last line.
PROGRESS_LINE_S = 60.0


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
    """How `fit` trains: the length of the run, clipping, and how often it reads the host.

    A run ends after `epochs` epochs or `max_steps` optimizer steps in total, whichever
    comes first; `clip_mode` and `clip_norm` are `per.training.optim.clip_gradients`'.
    Every `log_every` steps the loop reads its device accumulators once (progress bar,
    W&B step row, divergence check) and the regularizer records per-site statistics.
    Without a bar (`progress` false), such a read logs a progress line at most every
    `PROGRESS_LINE_S` seconds.
    """
    epochs: int
    max_steps: int | None = None
    clip_norm: float = 0.0
    clip_mode: str = "none"
    log_every: int = 50
    progress: bool = True             # tqdm bars (training and evaluation)


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


class ForcedStop(SystemExit):
    """A second SIGTERM/SIGINT: stop now, without the clean stop's checkpoint (the run
    resumes from its last one). Exits with 128 + the signal's number."""


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps:
    `with StopSignal() as stop: ... if stop.requested: ...`. A second signal raises
    `ForcedStop` wherever the process is (a long compile, setup or evaluation)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopSignal":
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise ForcedStop(128 + signum)
        self.signum = signum
        log.warning("%s: stopping after the current step with a checkpoint; send it again to stop "
                    "at once (the run then resumes from its last checkpoint)", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class TrainStep:
    """One optimizer step, the same in `fit`, `scripts/step_times.py` and `scripts/bench.py`:
    the regularizer's step begins, the task's forward runs under `autocast()`, then
    backward, clipping and the update."""
    model: nn.Module
    task: Task
    optimizer: torch.optim.Optimizer
    regularizer: Regularizer | None = None
    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    clip_norm: float = 0.0
    clip_mode: str = "none"

    def __post_init__(self) -> None:
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]   # once, not per step

    def __call__(self, batch: Any, track: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(task loss, total loss, the task's sums) of one batch; `track` has the regularizer
        record per-site statistics (`site_stats()`) in this step's backward."""
        if self.regularizer is not None:
            self.regularizer.begin_step(track=track)
        with self.autocast():
            loss, sums = self.task.train_step(self.model, batch)
            # On the default backward path `penalty()` is 0 and lambda enters in each site's
            # backward (per.regularizers._AddPenaltyGrad adds lam * dL_site/dh to the site's
            # gradient); on the autograd path it is lam * sum_sites L_site itself.
            total = loss + self.regularizer.penalty() if self.regularizer is not None else loss
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        clip_gradients(self._params, self.clip_norm, self.clip_mode)
        self.optimizer.step()
        return loss, total, sums


class EpochSums:
    """An epoch's accumulators. Tensors (losses, error counts, per-site statistics of tracked
    steps) stay on the device and are read in one host copy; Python numbers (item counts)
    and the partial sums restored after a resume stay on the host."""

    def __init__(self, restored: dict[str, float]) -> None:
        self.device: dict[str, torch.Tensor] = {}
        self.host: dict[str, float] = dict(restored)

    def add(self, new: dict[str, Any]) -> None:
        for k, v in new.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().to(torch.float64)
                self.device[k] = self.device[k] + v if k in self.device else v
            else:
                self.host[k] = self.host.get(k, 0.0) + v

    def read(self) -> dict[str, float]:
        """All sums as floats: the one host read per log interval."""
        out = dict(self.host)
        if self.device:
            for k, v in zip(self.device, torch.stack(list(self.device.values())).tolist()):
                out[k] = out.get(k, 0.0) + v
        return out


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
    """Load a `checkpoint_state` dict into the run's objects (weights, optimizer, schedule,
    regularizer, task state such as the LM's hidden state, RNG states); returns its counters."""
    _unwrap(model).load_state_dict(ckpt["model"])
    if regularizer is not None and ckpt["regularizer"] is not None:
        regularizer.load_state_dict(ckpt["regularizer"])
    load_optimizer_state(optimizer, ckpt["optimizer"])
    schedule.load_state_dict(ckpt["schedule"])
    task.load_state_dict(ckpt["task"])
    runtime.set_rng_state(ckpt["rng"])
    return TrainState(**ckpt["train_state"])


def _diverged(what: str, when: str) -> str:
    log.warning("diverged: non-finite %s %s; recorded as diverged", what, when)
    return schema.DIVERGED


def _stopped(stop: StopSignal, where: str) -> str:
    log.warning("stopped by %s %s: checkpoint written; the same command resumes",
                signal.Signals(stop.signum).name, where)
    return schema.INTERRUPTED


def _save_best(run: RunDir, model: nn.Module, epoch: int, extra: dict) -> None:
    run.save_checkpoint({"model": _unwrap(model).state_dict(), "epoch": epoch, **extra}, BEST_CHECKPOINT)


def _complete_best(run: RunDir, model: nn.Module, state: TrainState, extra: dict) -> None:
    """On a resume from the end of the best epoch so far: write `best.pt` if a kill between
    `last.pt` and `best.pt` left it missing or older (the restored weights are that epoch's)."""
    if state.epoch == 0 or state.batch != 0 or state.best.get(schema.EPOCH) != state.epoch:
        return
    try:
        if torch.load(run.path / BEST_CHECKPOINT, map_location="cpu", weights_only=False)["epoch"] == state.epoch:
            return
    except Exception:   # missing, or cut short by the kill: written anew below
        pass
    log.info("writing %s for epoch %d (the kill came before it)", BEST_CHECKPOINT, state.epoch)
    _save_best(run, model, state.epoch, extra)


class _EpochProgress:
    """An epoch's progress bar over its `batches` (the steps that will run), and, without
    a bar, a progress line at most every `PROGRESS_LINE_S` seconds."""

    def __init__(self, settings: LoopSettings, items: str, epoch: int, state: TrainState, batches: int) -> None:
        self.settings, self.items, self.epoch, self.batches = settings, items, epoch, batches
        self.t0 = self.last_line = time.perf_counter()
        self.first_batch = state.batch
        self.bar = tqdm(total=batches, initial=state.batch, desc=f"epoch {epoch + 1}/{settings.epochs}",
                        disable=not settings.progress, leave=False, dynamic_ncols=True)

    def show(self, state: TrainState, so_far: dict[str, float], rate: float) -> None:
        """The metrics so far and the throughput (`items` per second) on the bar or in a line."""
        self.bar.set_postfix({**{k: f"{v:.4g}" for k, v in so_far.items()}, f"{self.items}/s": f"{rate:.0f}"})
        now = time.perf_counter()
        if self.settings.progress or now - self.last_line < PROGRESS_LINE_S:
            return
        self.last_line = now
        left = (self.batches - state.batch) * (now - self.t0) / (state.batch - self.first_batch)
        log.info("epoch %d/%d batch %d/%d step %d | %s | %.0f %s/s | epoch ends in about %s",
                 self.epoch + 1, self.settings.epochs, state.batch, self.batches, state.step,
                 format_metrics(so_far), rate, self.items, f"{left:.0f} s" if left < 60 else f"{left / 60:.1f} min")

    def close(self) -> None:
        self.bar.close()


def _warn_if_off_band(regularizer: Regularizer | None, row: dict[str, Any]) -> None:
    """Warn where the median of the PER/L1/L2 sites' grad_ratio over the epoch of `row`
    leaves `per.strength.BAND` (the lambda barely acts, or swamps the task). `fit` asks
    after the second epoch (the first is dominated by the start: a Fixup net's zero-initialized
    layers give no task gradient at first, an infinite ratio) and after the last."""
    if regularizer is None or regularizer.kind not in ("per", "l1", "l2") or regularizer.lam <= 0:
        return
    ratios = {k: v for k, v in row.items() if k.startswith(schema.GRAD_RATIO_PREFIX) and isinstance(v, float)}
    if why := band_warning(ratios):
        log.warning("epoch %d: %s (%s at lambda=%g); see the README's \"Does a lambda act?\"",
                    row[schema.EPOCH], why, regularizer.kind.upper(), regularizer.lam)


def _epoch_row(model: nn.Module, task: Task, optimizer: torch.optim.Optimizer, regularizer: Regularizer | None,
              state: TrainState, settings: LoopSettings) -> dict[str, Any]:
    """The metrics row of the epoch just trained (`state.sums`, `state.train_time_s`):
    training metrics, the regularizer's site averages over tracked steps (penalty = the sum
    of the unscaled L_site; None without a tracked step), then the evaluation (its time
    added to `state.wall_time_s`)."""
    t_eval = time.perf_counter()
    epoch = state.epoch
    row = {schema.EPOCH: epoch + 1, schema.STEP: state.step, schema.LR: optimizer.param_groups[0]["lr"]}
    row.update(task.train_metrics(state.sums))
    if regularizer is not None:
        site_avgs = {k: v / state.sums.get("tracked", 1.0) for k, v in state.sums.items()
                     if schema.is_diagnostic(k)}
        # null in an epoch without a tracked step (`log_every` longer than the epoch): not 0.
        row[schema.PENALTY] = (sum(v for k, v in site_avgs.items() if k.startswith(schema.PENALTY_PREFIX))
                               if state.sums.get("tracked") else None)
        row.update(site_avgs)
    bar = tqdm(total=task.eval_batches(), desc=f"epoch {epoch + 1}/{settings.epochs} eval",
               disable=not settings.progress, leave=False, dynamic_ncols=True)
    row.update(task.evaluate(model, on_batch=lambda: bar.update(1)))
    bar.close()
    row[schema.throughput_key(task.items)] = state.sums["items"] / max(state.train_time_s, 1e-9)
    row[schema.EPOCH_TIME] = state.train_time_s
    row[schema.EVAL_TIME] = time.perf_counter() - t_eval
    state.wall_time_s += time.perf_counter() - t_eval
    return row


def fit(model: nn.Module, task: Task, optimizer: torch.optim.Optimizer, schedule,
        run: RunDir, settings: LoopSettings, *, autocast: Callable[[], ContextManager] = contextlib.nullcontext,
        regularizer: Regularizer | None = None, sink: WandbSink | None = None, monitor: Monitor | None = None,
        state: TrainState | None = None, checkpoint_extra: dict | None = None, stop: StopSignal | None = None,
        on_step: Callable[[int], None] | None = None) -> tuple[str, TrainState]:
    """Train until `settings.epochs` (or `max_steps`); returns (status, state).

    status is `finished`, `diverged` (a non-finite loss or penalty was seen) or
    `interrupted` (a stop signal arrived; a checkpoint was written first).
    `autocast()` wraps each forward pass (decided once by the caller, who built the task
    with the same one). `on_step(step)` is called after each optimizer step (tests use it
    to inject faults).
    """
    state = state or TrainState()
    extra = checkpoint_extra or {}
    stop = stop or StopSignal()
    step = TrainStep(model, task, optimizer, regularizer, autocast, settings.clip_norm, settings.clip_mode)
    steps_per_epoch = task.batches_per_epoch()
    max_steps = math.inf if settings.max_steps is None else settings.max_steps
    # The monitor captures the sites of the model itself (a compiled model's are its
    # `_orig_mod`'s, under other names), with the parameters the compiled one trains.
    plain = _unwrap(model)
    if monitor is not None and state.step == 0:
        run.append(ACTIVATIONS_FILE, monitor.snapshot(plain, lambda: task.probe_forward(plain), 0, 0.0))
    _complete_best(run, model, state, extra)

    while state.epoch < settings.epochs and state.step < max_steps:
        epoch = state.epoch
        sums = EpochSums(state.sums)
        progress = _EpochProgress(settings, task.items, epoch, state,
                                 min(steps_per_epoch, state.batch + max_steps - state.step))
        for batch in task.train_batches(epoch, state.batch):
            set_lr(optimizer, schedule.base_lr(epoch, state.step))
            track = state.step % settings.log_every == 0
            loss, total, batch_sums = step(batch, track=track)
            state.step += 1
            state.batch += 1
            n = batch_sums["items"]
            sums.add({"loss": loss.detach() * n, "total": total.detach() * n, **batch_sums})
            if regularizer is not None and track:
                sums.add({**regularizer.site_stats(), "tracked": 1})
            if on_step is not None:
                on_step(state.step)
            if track or state.batch == steps_per_epoch:
                host = sums.read()
                if not math.isfinite(host["total"]):
                    progress.close()
                    state.wall_time_s += time.perf_counter() - progress.t0
                    state.final = {**state.final, "diverged_at_step": state.step}
                    return _diverged("training loss", f"by step {state.step} (epoch {epoch + 1})"), state
                rate = host["items"] / (state.train_time_s + time.perf_counter() - progress.t0)
                so_far = task.train_metrics(host)
                progress.show(state, so_far, rate)
                if sink is not None:
                    sink.log_step({**so_far, schema.LR: optimizer.param_groups[0]["lr"],
                                   schema.throughput_key(task.items): rate}, step=state.step)
            progress.bar.update(1)
            if monitor is not None and monitor.due(state.step):
                run.append(ACTIVATIONS_FILE, monitor.snapshot(plain, lambda: task.probe_forward(plain), state.step,
                                                         epoch + state.batch / steps_per_epoch))
            if stop.requested or state.step >= max_steps:
                break
        progress.close()
        state.train_time_s += time.perf_counter() - progress.t0
        state.wall_time_s += time.perf_counter() - progress.t0
        state.sums = sums.read()
        if not math.isfinite(state.sums.get("total", 0.0)):
            state.final = {**state.final, "diverged_at_step": state.step}
            return _diverged("training loss", f"by step {state.step} (epoch {epoch + 1})"), state
        if stop.requested and state.batch < steps_per_epoch and state.step < max_steps:
            # mid-epoch: the checkpoint continues at this very batch
            run.save_checkpoint(checkpoint_state(model, optimizer, schedule, regularizer, task, state, extra))
            return _stopped(stop, f"at step {state.step} (epoch {epoch + 1}, batch {state.batch})"), state

        # ---- end of epoch: evaluate, record, checkpoint --------------------
        row = _epoch_row(model, task, optimizer, regularizer, state, settings)
        schedule.end_epoch(row)
        state.epoch += 1
        state.batch = 0
        state.sums = {}
        state.train_time_s = 0.0
        metrics = {k: v for k, v in row.items() if not schema.is_diagnostic(k)}
        state.final = metrics
        metric = task.selection_metric
        is_best = metric is not None and row.get(metric) is not None and math.isfinite(row[metric]) and (
            state.best.get(metric) is None or row[metric] < state.best[metric])
        if is_best:
            state.best = {schema.EPOCH: epoch + 1, **{k: v for k, v in metrics.items() if k != schema.EPOCH}}
        run.append(METRICS_FILE, [row])   # before the checkpoint: a resume truncates extras
        if sink is not None:
            sink.log(row, step=state.step)
        # Diagnostics may be infinite legitimately: a grad ratio where the downstream gradient
        # is exactly zero (Fixup's zero-initialized branches).
        if bad := [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]:
            return _diverged(", ".join(bad), f"after epoch {epoch + 1}"), state
        run.save_checkpoint(checkpoint_state(model, optimizer, schedule, regularizer, task, state, extra))
        if is_best:   # after last.pt: a kill in between is repaired on resume (_complete_best)
            _save_best(run, model, epoch + 1, extra)
        shown = {k: v for k, v in metrics.items() if k not in (schema.EPOCH, schema.STEP)}
        log.info("epoch %d/%d step %d | %s", epoch + 1, settings.epochs, state.step, format_metrics(shown))
        if epoch == 1 or state.epoch >= settings.epochs or state.step >= max_steps:
            _warn_if_off_band(regularizer, row)
        if stop.requested and state.epoch < settings.epochs and state.step < max_steps:
            return _stopped(stop, f"after epoch {epoch + 1} (step {state.step})"), state
    # A stop that arrives during the last epoch's evaluation (or its last steps) lets the run
    # finish: its records are complete, and a relaunch would only rebuild it to say so.
    return schema.FINISHED, state
