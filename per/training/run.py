"""One run from a plain config dict: resume-or-skip, build, train, record.

Both entry points (experiments/train_cifar.py, experiments/train_lm.py) call `train`
with their task builder; nothing here imports Hydra.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch

from per import schema
from per.regularizers import Regularizer
from per.training import runtime
from per.training.loggers import WandbSink, wandb_group, wandb_name
from per.training.loop import Experiment, LoopSettings, StopSignal, TrainState, fit, restore
from per.training.monitor import default_monitor_sites
from per.training.optim import create_optimizer, create_schedule, param_groups
from per.training.records import RunDir

RESUME_MODES = ("auto", "never")
REGULARIZED = ("l1", "l2", "per", "vcl")
# Config keys that may change between a run and its resumption (where the data and
# runs live, how the run was launched, how it reports) without changing its result.
_VOLATILE = ("resume", "logger", "run_dir", "paths")
_VOLATILE_TRAINER = ("device", "gpus", "progress", "log_every")
_VOLATILE_DATA = ("root", "download", "verify_checksums")


class ConfigMismatchError(ValueError):
    """The run directory holds a run with a different configuration."""


def _comparable(cfg: dict) -> dict:
    out = {k: v for k, v in cfg.items() if k not in _VOLATILE}
    out["trainer"] = {k: v for k, v in cfg.get("trainer", {}).items() if k not in _VOLATILE_TRAINER}
    out["data"] = {k: v for k, v in cfg.get("data", {}).items() if k not in _VOLATILE_DATA}
    return out


def build_regularizer(model, method: dict) -> Regularizer | None:
    """The Regularizer for `method.name` in l1/l2/per/vcl; None for vanilla and rbn."""
    if method["name"] not in schema.METHODS:
        raise ValueError(f"unknown method {method['name']!r}; valid: {', '.join(schema.METHODS)}")
    if method["name"] not in REGULARIZED:
        return None
    return Regularizer(model, method["name"], method["lam"], layout=method["layout"],
                       num_slices=method["num_slices"], reduction=method.get("reduction", "sum"),
                       path=method["path"],
                       share_directions=method["share_directions"])


def cell_of(cfg: dict) -> dict:
    """The run's table cell (`summary.json` `cell`), from its config alone."""
    m = cfg["model"]
    return schema.make_cell(cfg["data"]["name"], m["name"], cfg["method"]["name"],
                            norm=m.get("norm", "none"), activation=m.get("activation"),
                            table=cfg.get("table"))


def _summary(status: str, cfg: dict, state: TrainState, device: str) -> dict:
    method = cfg["method"]
    return {"status": status, "task": cfg["task"], "cell": cell_of(cfg),
            "lam": float(method.get("lam", 0.0)) if method["name"] in REGULARIZED else 0.0,
            "seed": cfg["seed"], "epochs_completed": state.epoch, "steps": state.step,
            "wall_time_s": round(state.wall_time_s, 3), "device": device,
            "code_version": runtime.code_version(), "versions": runtime.versions(),
            "final": state.final, "best": state.best}


def train(cfg: dict, build: Callable[[dict, torch.device, Callable], Experiment]) -> dict:
    """Run (or resume, or skip) the run described by `cfg`; returns its summary.

    `cfg["run_dir"]` is the run directory. With `resume=auto` a finished or diverged
    run is skipped and any other continues from `checkpoints/last.pt`.
    """
    if cfg["resume"] not in RESUME_MODES:
        raise ValueError(f"unknown resume {cfg['resume']!r}; valid: {', '.join(RESUME_MODES)}")
    run = RunDir(cfg["run_dir"])
    if cfg["resume"] == "never":
        run.clear()
    else:
        if (stored := run.read_config()) is not None and _comparable(stored) != _comparable(cfg):
            raise ConfigMismatchError(
                f"{run.path} holds a run with another configuration; use another hydra.run.dir "
                "or resume=never to start over (compare its config.yaml)")
        old = run.read_summary()
        if old is not None and old.get("status") in (schema.FINISHED, schema.DIVERGED):
            print(f"[per] skipping {old['status']} run {run.path}")   # a divergence is a result too
            return old
    run.write_config(cfg)
    cell = cell_of(cfg)   # also validates the method/norm vocabulary before any work

    trainer, optim = cfg["trainer"], cfg["optim"]
    state = TrainState()
    sink = None
    dev_name = "unknown"
    stop = StopSignal().__enter__()   # a signal during set-up stops the run after its first step
    try:
        runtime.seed_everything(cfg["seed"])
        device = runtime.resolve_device(trainer["device"])
        runtime.configure_backends(device, trainer["deterministic"])
        dev_name = runtime.device_name(device)
        autocast = lambda: runtime.autocast_context(device, trainer["precision"])  # noqa: E731
        exp = build(cfg, device, autocast)
        model, task = exp.model, exp.task
        regularizer = build_regularizer(model, cfg["method"])
        if regularizer is not None:
            regularizer.materialize(lambda: task.probe_forward(model))
        groups = param_groups(model, list(regularizer.parameters()) if regularizer else None,
                              weight_decay=optim["weight_decay"], bias_lr_mult=optim["bias_lr_mult"],
                              bias_weight_decay=optim["bias_weight_decay"])
        optimizer = create_optimizer(groups, lr=optim["lr"], momentum=optim["momentum"],
                                     nesterov=optim["nesterov"])
        schedule = create_schedule(optim["schedule"], **optim["schedule_args"])
        epochs = trainer["epochs"]
        if optim.get("total_steps"):  # step-based protocols (He et al.: 64k iterations)
            epochs = -(-optim["total_steps"] // task.batches_per_epoch())
        limits = [s for s in (trainer["max_steps"], optim.get("total_steps")) if s]
        max_steps = min(limits) if limits else None
        mon = trainer["monitor"]
        settings = LoopSettings(
            epochs=epochs, max_steps=max_steps, precision=trainer["precision"],
            clip_norm=optim["clip_norm"], clip_mode=optim["clip_mode"],
            log_every=trainer["log_every"], monitor_every=mon["every"],
            monitor_sites=(mon["sites"] or default_monitor_sites(model)) if mon["every"] else [],
            monitor_units=mon["units"], monitor_layout=cfg["method"].get("layout", "channels"),
            monitor_slices=mon["slices"], seed=cfg["seed"],
            progress=sys.stderr.isatty() if trainer["progress"] is None else trainer["progress"])

        if cfg["resume"] == "auto" and (ckpt := run.load_checkpoint(map_location=device)) is not None:
            state = restore(ckpt, model, optimizer, schedule, regularizer, task)
            run.truncate("metrics.jsonl", "epoch", state.epoch)
            run.truncate("activations.jsonl", "step", state.step)
            print(f"[per] resuming {run.path} at epoch {state.epoch}, batch {state.batch}", flush=True)
        else:
            run.clear()
        run.write_summary(_summary(schema.RUNNING, cfg, state, dev_name))
        train_model = torch.compile(model) if trainer["compile"] else model
        lg = cfg["logger"]
        sink = WandbSink(mode=lg["mode"], project=lg["project"], entity=lg["entity"], run_dir=run.path,
                         run_id=run.wandb_id(), name=wandb_name(cfg), group=wandb_group(cfg),
                         tags=list(cell.values()), config=cfg)
        status, state = fit(train_model, task, optimizer, schedule, run, settings,
                            regularizer=regularizer, sink=sink, state=state,
                            checkpoint_extra={"config": cfg}, stop=stop)
    except BaseException:
        run.write_summary(_summary(schema.FAILED, cfg, state, dev_name))
        if sink is not None:
            sink.finish(exit_code=1)
        raise
    finally:
        stop.__exit__()
    summary = _summary(status, cfg, state, dev_name)
    run.write_summary(summary)
    sink.finish(summary, exit_code=0 if status in (schema.FINISHED, schema.DIVERGED) else 1)
    if status == schema.INTERRUPTED:
        summary["signal"] = stop.signum
    return summary
