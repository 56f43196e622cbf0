"""One run from a plain config dict: check, lock, resume-or-skip, build, train, record.

Both entry points (experiments/train_cifar.py, experiments/train_lm.py) call `train`
with their task builder; nothing here imports Hydra. Progress goes to the `per`
logger: a start line, one line per epoch, an end line, and one line for each resume,
skip, stop signal and divergence.
"""
from __future__ import annotations

import functools
import logging
import sys
import time
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn as nn

from per import schema
from per.regularizers import Regularizer
from per.sites import list_sites
from per.training import runtime
from per.training.checks import (ConfigMismatchError, ConfigValueError, config_differences, protocol_changes,
                                 protocol_of, validate)
from per.training.loggers import WandbSink, run_variant, wandb_group, wandb_name, wandb_tags
from per.training.loop import (Experiment, ForcedStop, LoopSettings, StopSignal, Task, TrainState, fit,
                               format_metrics, restore)
from per.training.monitor import Monitor, default_monitor_sites
from per.training.optim import (MultiStepSchedule, PlateauSchedule, create_optimizer, create_schedule,
                                param_groups)
from per.training.records import ACTIVATIONS_FILE, METRICS_FILE, RunDir

# Method config keys passed to Regularizer where present (absent: its default).
REGULARIZER_OPTIONS = ("layout", "num_slices", "reduction", "path", "share_directions", "sampling")
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"   # Hydra's job-log format

log = logging.getLogger(__name__)


def console_logging() -> None:
    """Send the `per` logger's INFO lines to stderr when no handler is configured
    (a plain-Python caller); under Hydra, or with the caller's own logging set up,
    the lines go to those handlers and nothing is added."""
    logger = logging.getLogger("per")
    if not logger.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def build_regularizer(model, method: dict) -> Regularizer | None:
    """The Regularizer for `method.name` in l1/l2/per/vcl; None for vanilla and rbn."""
    if method["name"] not in schema.METHODS:
        raise ValueError(f"unknown method {method['name']!r}; valid: {', '.join(schema.METHODS)}")
    if method["name"] not in schema.REGULARIZED:
        return None
    options = {k: method[k] for k in REGULARIZER_OPTIONS if k in method}   # PER-only keys in per.yaml
    return Regularizer(model, method["name"], method["lam"], **options)


@dataclass
class Setup:
    """What a run trains, built from its config before any checkpoint is loaded."""
    model: nn.Module
    task: Task
    regularizer: Regularizer | None
    optimizer: torch.optim.Optimizer
    schedule: MultiStepSchedule | PlateauSchedule
    autocast: Callable[[], ContextManager]   # the forward passes' precision, decided once


def build_setup(cfg: dict, build: Callable[[dict, torch.device, Callable], Experiment],
                device: torch.device) -> Setup:
    """The task builder's model and task on `device`, the regularizer (VCL's betas created by
    one probe forward), the optimizer over both, and the lr schedule."""
    optim = cfg["optim"]
    autocast = functools.partial(runtime.autocast_context, device, cfg["trainer"]["precision"])
    exp = build(cfg, device, autocast)
    model, task = exp.model, exp.task
    regularizer = build_regularizer(model, cfg["method"])
    if regularizer is not None:
        regularizer.materialize(lambda: task.probe_forward(model))
    groups = param_groups(model, list(regularizer.parameters()) if regularizer else None,
                          weight_decay=optim["weight_decay"], bias_lr_mult=optim["bias_lr_mult"],
                          bias_weight_decay=optim["bias_weight_decay"])
    optimizer = create_optimizer(groups, lr=optim["lr"], momentum=optim["momentum"], nesterov=optim["nesterov"],
                                 device=device)
    schedule = create_schedule(optim["schedule"], **optim["schedule_args"])
    return Setup(model, task, regularizer, optimizer, schedule, autocast)


def create_monitor(cfg: dict, model: nn.Module) -> Monitor | None:
    """The run's activation monitor (`trainer.monitor`), or None when `every` is 0.

    Raises:
        ConfigValueError: a site name the model does not have (checked here: it needs the model).
    """
    mon = cfg["trainer"]["monitor"]
    sites = list_sites(model)          # pre-activation sites (VCL's) can be monitored too
    if unknown := [name for name in mon["sites"] or () if name not in sites]:
        raise ConfigValueError(f"trainer.monitor.sites: unknown site{'s' if len(unknown) > 1 else ''} "
                               f"{', '.join(unknown)}; valid: {', '.join(sites)}")
    if not mon["every"]:
        return None
    return Monitor(mon["sites"] or default_monitor_sites(model), mon["every"], num_units=mon["units"],
                   num_slices=mon["slices"], seed=cfg["seed"])


def run_length(cfg: dict, batches_per_epoch: int) -> tuple[int, int | None, int]:
    """(epochs, max_steps, planned steps) of the run: `optim.total_steps` (step-based
    protocols, He et al.'s 64k iterations) sets the epochs it needs and caps the steps,
    as does `trainer.max_steps`. There, `trainer.epochs` below the protocol's
    `optim.epochs` shortens the run to that many epochs (a partial run); at or above it,
    the steps decide."""
    trainer, optim = cfg["trainer"], cfg["optim"]
    epochs = trainer["epochs"]
    if optim.get("total_steps"):
        needed = -(-optim["total_steps"] // batches_per_epoch)
        epochs = min(epochs, needed) if epochs < optim.get("epochs", epochs) else needed
    limits = [s for s in (trainer["max_steps"], optim.get("total_steps")) if s]
    max_steps = min(limits) if limits else None
    planned = epochs * batches_per_epoch
    return epochs, max_steps, min(planned, max_steps) if max_steps else planned


def _check_has_a_batch(cfg: dict, batches_per_epoch: int) -> None:
    """Raise ValueError, naming the sizes, when the training split holds no full batch."""
    if batches_per_epoch == 0:
        data = cfg["data"]
        sizes = ", ".join(f"data.{k}={data[k]}" for k in ("batch_size", "bptt", "val_size") if k in data)
        raise ValueError(f"the training split holds less than one training batch ({sizes}); "
                         "lower data.batch_size" + (" or data.val_size" if "val_size" in data else
                                                    " or data.bptt"))


def _summary(status: str, cfg: dict, state: TrainState, device: str, attempts: list[dict]) -> dict:
    method = cfg["method"]
    return {"status": status, "task": cfg["task"], "cell": schema.cell_of(cfg),
            "lam": float(method.get("lam", 0.0)) if method["name"] in schema.REGULARIZED else 0.0,
            "seed": cfg["seed"], "epochs_completed": state.epoch, "steps": state.step,
            "wall_time_s": round(state.wall_time_s, 3), "device": device,
            "code_version": attempts[-1]["code_version"], "versions": runtime.versions(),
            "attempts": attempts, "final": state.final, "best": state.best}


def error_text(e: BaseException, limit: int = 500) -> str:
    """A failed run's error as its summary records it (`error`): `Type: message` on one
    line, at most `limit` characters."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _earlier_attempts(summary: dict | None) -> list[dict]:
    """The attempts a stored summary lists (one, from its `code_version`, for records
    written before summaries listed attempts)."""
    if summary is None:
        return []
    if "attempts" in summary:
        return summary["attempts"]
    return [{"code_version": summary.get("code_version"), "started": None, "resumed_from": None}]


def _key_metrics(metrics: dict) -> str:
    return format_metrics({k: metrics[k] for k in schema.HEADLINE_METRICS if k in metrics}) or "no metrics"


def train(cfg: dict, build: Callable[[dict, torch.device, Callable], Experiment], *,
          defaults: dict | None = None, protocol: dict | None = None,
          records: dict[str, str] | None = None) -> dict:
    """Run (or resume, or skip) the run described by `cfg`; returns its summary.

    `cfg["run_dir"]` is the run directory. Before anything there changes, every
    config value is checked (ConfigValueError; so is a key the command line added to
    `defaults` that nothing reads), a stored run's config is compared
    with `cfg` on what decides the result, where the directory holds a checkpoint or a
    result (ConfigMismatchError names each differing key; keys missing from the stored
    config are accepted at their value in `defaults`, the config without command-line
    values; a run that failed before its first checkpoint starts over) and the directory's lock is
    taken (RunLockedError names the holder). With `resume=auto` a finished or diverged
    run is then skipped and any other continues from its newest readable checkpoint.
    `records` (name -> text) are written into the run directory once the run starts
    (the entry points' `.hydra/` record). With `protocol` (the config its preset gives
    alone; else `defaults`), the stored config also lists the run's `protocol_changes`
    and holds the protocol itself as `protocol` (`per.training.checks.protocol_of`).
    """
    console_logging()
    validate(cfg, defaults)
    protocol = protocol if protocol is not None else defaults
    variant = run_variant(cfg, protocol)      # W&B's group: what the tables keep apart
    if protocol is not None:
        cfg = {**cfg, "protocol_changes": protocol_changes(protocol, cfg),
               "protocol": protocol_of(protocol)}
    cell = schema.cell_of(cfg)
    run = RunDir(cfg["run_dir"])
    if (cfg["resume"] == "auto" and run.holds_result_or_progress()
            and (stored := run.read_config()) is not None):
        if diffs := config_differences(stored, cfg, defaults):
            raise ConfigMismatchError(
                f"{run.path} holds a run with another configuration ({len(diffs)} key"
                f"{'s differ' if len(diffs) > 1 else ' differs'}, stored -> now):\n  " + "\n  ".join(diffs)
                + "\nUse another hydra.run.dir, or resume=never to start this one over.")
    run.lock()
    try:
        return _train_locked(cfg, build, run, cell, records or {}, variant)
    finally:
        run.unlock()


def _on_terminal() -> bool:
    """A bar only where both streams are a terminal: the bar draws on stderr, and the log
    (and, without a bar, its progress lines) goes to stdout under Hydra's config
    (`configs/hydra`), to stderr through `console_logging` otherwise; so redirecting
    either stream to a file (`> run.log`, `2> run.log`) gives progress lines, not a bar."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def _loop_settings(cfg: dict, batches_per_epoch: int) -> tuple[LoopSettings, int]:
    """How `fit` trains this run (`run_length`, clipping, host reads, progress bar only on
    a terminal unless `trainer.progress` says), and its planned steps."""
    trainer, optim = cfg["trainer"], cfg["optim"]
    epochs, max_steps, planned = run_length(cfg, batches_per_epoch)
    return LoopSettings(epochs=epochs, max_steps=max_steps, clip_norm=optim["clip_norm"],
                        clip_mode=optim["clip_mode"], log_every=trainer["log_every"],
                        progress=_on_terminal() if trainer["progress"] is None else trainer["progress"]), planned


def _resume(run: RunDir, setup: Setup, ckpt: dict, ckpt_name: str, planned: int) -> TrainState:
    """Restore the run's objects from a checkpoint and cut its records back to it."""
    state = restore(ckpt, setup.model, setup.optimizer, setup.schedule, setup.regularizer, setup.task)
    run.truncate(METRICS_FILE, "epoch", state.epoch)
    run.truncate(ACTIVATIONS_FILE, "step", state.step)
    # 1-based, as the stop and epoch lines count: batch 0 is the epoch's start.
    log.info("resuming %s from %s in epoch %d after batch %d (step %d of %d)", run.path, ckpt_name,
             state.epoch + 1, state.batch, state.step, planned)
    return state


def _train_locked(cfg: dict, build: Callable, run: RunDir, cell: dict, records: dict[str, str],
                  variant: list[str]) -> dict:
    previous = None
    if cfg["resume"] == "never":
        run.clear()
    else:
        previous = run.read_summary()
        if previous is not None and previous.get("status") in (schema.FINISHED, schema.DIVERGED):
            log.info("skipping %s: already %s (%s); resume=never runs it again", run.path,
                     previous["status"], _key_metrics(previous.get("final") or {}))
            return previous   # a divergence is a result too
    for name, text in records.items():
        run.write_text(name, text)
    run.write_config(cfg)

    trainer = cfg["trainer"]
    state = TrainState()
    attempts = [{"code_version": runtime.code_version(),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_from": None}]
    sink = None
    dev_name = "unknown"
    with StopSignal() as stop:   # a signal during set-up stops the run after its first step
        try:
            runtime.seed_everything(cfg["seed"])
            device = runtime.resolve_device(trainer["device"])
            runtime.configure_backends(device, trainer["deterministic"], trainer["precision"])
            dev_name = runtime.device_info(device)["name"]
            setup = build_setup(cfg, build, device)
            model, task = setup.model, setup.task
            _check_has_a_batch(cfg, task.batches_per_epoch())
            settings, planned = _loop_settings(cfg, task.batches_per_epoch())
            log.info("run %s | device %s | %s parameters | %d steps planned (%d epoch%s of %d batches%s)",
                     run.path, dev_name, f"{sum(p.numel() for p in model.parameters()):,}", planned,
                     settings.epochs, "s" if settings.epochs > 1 else "", task.batches_per_epoch(),
                     f", max_steps {settings.max_steps}" if settings.max_steps else "")
            loaded = run.load_checkpoint(map_location=device) if cfg["resume"] == "auto" else None
            if loaded is not None:
                state = _resume(run, setup, *loaded, planned)
                attempts[0]["resumed_from"] = {"checkpoint": loaded[1], "epoch": state.epoch,
                                               "batch": state.batch, "step": state.step}
                attempts = _earlier_attempts(previous) + attempts
            else:
                run.clear()
            running = _summary(schema.RUNNING, cfg, state, dev_name, attempts)
            run.write_summary(running)
            train_model = runtime.compile_model(model, trainer["compile"])
            lg = cfg["logger"]
            sink = WandbSink(mode=lg["mode"], project=lg["project"], entity=lg["entity"], run_dir=run.path,
                             run_id=run.wandb_id() if lg["mode"] != "disabled" else None,
                             name=wandb_name(cfg, variant), group=wandb_group(cfg, variant),
                             tags=wandb_tags(cfg, cell), config=cfg,
                             init_timeout=lg["init_timeout"])
            sink.set_summary(running)      # a killed run reads back from W&B as interrupted
            if loaded is not None:   # a killed attempt's W&B rows may never have left its buffer
                for row in run.read_jsonl(METRICS_FILE):
                    sink.log(row, step=row[schema.STEP])
            status, state = fit(train_model, task, setup.optimizer, setup.schedule, run, settings,
                                autocast=setup.autocast, regularizer=setup.regularizer, sink=sink,
                                monitor=create_monitor(cfg, model), state=state,
                                checkpoint_extra={"config": cfg}, stop=stop)
            summary = _summary(status, cfg, state, dev_name, attempts)
            # W&B first: a summary that says finished means its W&B record is complete too
            # (a kill in between resumes from the last checkpoint and finishes both again).
            sink.finish(summary, exit_code=0 if status in (schema.FINISHED, schema.DIVERGED) else 1)
            run.write_summary(summary)
        except BaseException as e:
            forced = isinstance(e, ForcedStop)      # a second stop signal: no evidence of a fault
            ended = _summary(schema.INTERRUPTED if forced else schema.FAILED, cfg, state, dev_name, attempts)
            ended = ended if forced else {**ended, "error": error_text(e)}
            run.write_summary(ended)
            if forced:
                log.warning("stopped %s at once by a second signal; %s", run.path,
                            "it resumes from its last checkpoint" if run.has_checkpoint()
                            else "no checkpoint yet: the next launch starts it over")
            else:
                log.error("failed %s after %d steps: %s: %s", run.path, state.step, type(e).__name__, e)
            if sink is not None:
                sink.finish(ended, exit_code=1)    # W&B's copy says failed (or interrupted) too
            raise
    best = state.best
    log.info("%s %s | %s%s | steps %d, epochs %d | wall %.1f s", status, run.path, _key_metrics(state.final),
             f" | best epoch {best['epoch']}: {_key_metrics(best)}" if best.get("epoch") else "",
             state.step, state.epoch, state.wall_time_s)
    if stop.requested:   # also where the run finished first (a signal during its last evaluation)
        summary["signal"] = stop.signum
    return summary
