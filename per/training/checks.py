"""Config checks before a run touches its directory: every value against what is
allowed, and a stored run's config against the new one (what decides the result).

Plain dicts in, errors that name the dotted key, the bad value and what is allowed.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

from per import models, schema
from per.functional import LAYOUTS, REDUCTIONS
from per.data import cifar
from per.data.cifar import NORMALIZATIONS
from per.data.corpus import CORPORA
from per.models.elu_cnn import ACTIVATIONS
from per.models.lstm import DROPOUT_TYPES
from per.regularizers import PATHS, SAMPLINGS, Regularizer, sampling_conflict
from per.training.loggers import LOGGER_MODES, missing_credentials
from per.training.optim import CLIP_MODES, SCHEDULES, create_schedule, is_finite_number
from per.training.runtime import COMPILE_MODES, DEVICES, PRECISIONS

RESUME_MODES = ("auto", "never")
DATASETS = {"cifar": tuple(cifar.LAYOUTS), "lm": tuple(CORPORA)}   # what each task's builder loads
# Methods that exist for one task only: RBN is an LSTM cell; VCL acts on the
# pre-activations of conv nets (the LSTMs have no such sites).
METHOD_TASK = {"rbn": "lm", "vcl": "cifar"}
RUNNER = {"cifar": "experiments/train_cifar.py", "lm": "experiments/train_lm.py"}   # the entry point of each task

# Keys that may change between a run and its resumption without changing its result:
# where the data and runs live, how the run is launched and reports, sweep settings,
# labels (`table`: presets no longer restate the table their model gives).
VOLATILE = ("resume", "logger", "run_dir", "paths", "preset", "run_name", "table",
            "trainer.device", "trainer.gpus", "trainer.progress",
            "data.root", "data.download", "data.verify_checksums",
            "method.lam_grid", "method.slices_grid", "protocol_changes", "protocol")
# Keys that do not change a preset's protocol (`protocol_changes`), though a resume
# compares them: what a sweep sets per run (`per.sweep.Phase.hydra_args`, its selection
# split), the method options that make a cell's variants (`schema.METHOD_OPTIONS`, in
# the tables' row keys), the run's length (`per.analysis.collect.is_partial` judges a
# shorter one; `protocol_changes` names a longer one),
# what is logged how often, and how the same computation runs (equal up to float
# rounding: the gradient path, evaluation batch, compilation, memory format; or in
# distribution: how PER's directions are drawn).
NOT_PROTOCOL = ("seed", "method.lam", "data.val_size", *(f"method.{o}" for o in schema.METHOD_OPTIONS),
                "trainer.epochs", "trainer.max_steps", "trainer.log_every", "trainer.monitor",
                "method.path", "method.sampling", "data.eval_batch_size", "trainer.compile",
                "trainer.channels_last")
# `NOT_PROTOCOL` keys that are a task's protocol all the same: an LM's evaluation batch
# decides which tokens are scored (`per.data.corpus.batchify` drops the `len % B` tail)
# and with what context (each of the B columns starts from a zero state).
PROTOCOL_OF_TASK = {"lm": ("data.eval_batch_size",)}
# Keys that method configs no longer hold where they do not apply (l1, l2, vcl), with
# the value their absence stands for (the Regularizer's default): a stored run that
# has one at this value is the same run.
REMOVED = {f"method.{k}": inspect.signature(Regularizer).parameters[k].default
           for k in ("num_slices", "share_directions")}
# Keys added since runs were written that change what a run does, with what a stored run
# without them did: such a run is the same run only where the new value is that one.
ADDED = {"method.reduction": schema.REDUCTION_BEFORE_OPTION,   # the 1/N mean, then the only one
         "optim.drop_last": True, "data.drop_last": True}      # the last partial batch was dropped


class ConfigValueError(ValueError):
    """A config value outside what is allowed."""


class ConfigMismatchError(ValueError):
    """The run directory holds a run with a different configuration."""


_MISSING = object()


def _get(cfg: dict, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_at_least(lo: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and v >= lo), f"an integer >= {lo}"


def _number_at_least(lo: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: is_finite_number(v) and v >= lo), f"a finite number >= {lo}"


def _one_of(choices) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), f"one of {', '.join(map(str, choices))}"


def _optional(check: tuple[Callable[[Any], bool], str]) -> tuple[Callable[[Any], bool], str]:
    ok, what = check
    return (lambda v: v is None or ok(v)), f"null or {what}"


_BOOL = ((lambda v: isinstance(v, bool)), "true or false")
_POSITIVE = ((lambda v: is_finite_number(v) and v > 0), "a finite number > 0")
_STRING = ((lambda v: isinstance(v, str) and v != ""), "a non-empty string")
_STRINGS = ((lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v)), "a list of strings")
_INTS = ((lambda v: isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v)),
         "a list of integers >= 0")

# Checked where present (a task or method without the key does not have it).
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "task": _one_of(schema.TASKS),
    "seed": _int_at_least(0),
    "resume": _one_of(RESUME_MODES),
    "table": _optional(_STRING),
    "method.name": _one_of(schema.METHODS),
    "method.lam": _number_at_least(0),
    "method.layout": _one_of(LAYOUTS),
    "method.num_slices": _int_at_least(1),
    "method.reduction": _one_of(REDUCTIONS),
    "method.path": _one_of(PATHS),
    "method.share_directions": _BOOL,
    "method.sampling": _one_of(SAMPLINGS),
    "model.name": _one_of(models.list_models()),
    "model.rbn": _BOOL,
    "model.norm": _one_of(schema.NORMS),
    "model.activation": _one_of(ACTIVATIONS),
    "model.hidden_size": _int_at_least(1),
    "model.num_layers": _int_at_least(1),
    "model.dropout": ((lambda v: is_finite_number(v) and 0 <= v < 1), "a number in [0, 1)"),
    "model.dropout_type": _one_of(DROPOUT_TYPES),
    "data.name": _one_of([d for names in DATASETS.values() for d in names]),
    "data.normalize": _one_of(NORMALIZATIONS),
    "data.root": _STRING,
    "data.download": _BOOL,
    "data.verify_checksums": _BOOL,
    "data.val_size": _int_at_least(0),
    "data.batch_size": _int_at_least(1),
    "data.drop_last": _BOOL,
    "data.eval_batch_size": _int_at_least(1),
    "data.mixup_alpha": _number_at_least(0),
    "data.probe_size": _int_at_least(1),
    "data.bptt": _int_at_least(1),
    "optim.epochs": _int_at_least(1),
    "optim.total_steps": _optional(_int_at_least(1)),
    "optim.lr": _POSITIVE,
    "optim.momentum": ((lambda v: is_finite_number(v) and 0 <= v < 1), "a number in [0, 1)"),
    "optim.nesterov": _BOOL,
    "optim.weight_decay": _number_at_least(0),
    "optim.bias_weight_decay": _BOOL,
    "optim.bias_lr_mult": _number_at_least(0),
    "optim.clip_norm": _number_at_least(0),
    "optim.clip_mode": _one_of(CLIP_MODES),
    "optim.schedule": _one_of(SCHEDULES),
    "trainer.epochs": _int_at_least(1),
    "trainer.max_steps": _optional(_int_at_least(1)),
    "trainer.limit_eval_batches": _optional(_int_at_least(1)),
    "trainer.device": _one_of(DEVICES),
    "trainer.precision": _one_of(PRECISIONS),
    "trainer.compile": ((lambda v: isinstance(v, bool) or v in COMPILE_MODES),
                        f"true, false or one of {', '.join(COMPILE_MODES)}"),
    "trainer.channels_last": _BOOL,
    "trainer.deterministic": _BOOL,
    "trainer.log_every": _int_at_least(1),
    "trainer.progress": _optional(_BOOL),
    "trainer.monitor.every": _int_at_least(0),
    "trainer.monitor.sites": _optional(_STRINGS),
    "trainer.monitor.units": _int_at_least(1),
    "trainer.monitor.slices": _int_at_least(1),
    "trainer.gpus": _optional(_INTS),
    "logger.mode": _one_of(LOGGER_MODES),
    "logger.init_timeout": _POSITIVE,
}


def validate(cfg: dict, defaults: dict | None = None) -> None:
    """Check every known config value; the error lists each bad key, its value and
    what is allowed. Keys not listed here pass (other modules check their own). With
    `defaults` (the config its groups compose to, without command-line values), a key
    that the command line added and nothing reads is refused too (`_added_keys`), as is
    one it removed (`_removed_keys`).

    Raises:
        ConfigValueError: one or more values are outside what is allowed.
    """
    bad = []
    for key, (ok, allowed) in _CHECKS.items():
        value = _get(cfg, key)
        if value is not _MISSING and not ok(value):
            bad.append(f"{key}={value!r}: expected {allowed}")
    bad += _task_mismatches(cfg)
    bad += _unused_lambda(cfg)
    bad += _sampling_conflicts(cfg)
    bad += _schedule_problems(cfg)
    if defaults is not None:
        bad += _added_keys(cfg, defaults) + _removed_keys(cfg, defaults)
    logger = cfg.get("logger") if isinstance(cfg.get("logger"), dict) else {}
    if problem := missing_credentials(logger.get("mode")):
        bad.append(problem)
    if bad:
        raise ConfigValueError("invalid config value" + ("s" if len(bad) > 1 else "") + ":\n  "
                               + "\n  ".join(bad))


def _schedule_problems(cfg: dict) -> list[str]:
    """`optim.schedule_args` that its schedule refuses (an unknown argument, a value out of
    range: `per.training.optim.create_schedule`); an unknown schedule is left to `_CHECKS`."""
    name, args = _get(cfg, "optim.schedule"), _get(cfg, "optim.schedule_args")
    if name not in SCHEDULES or args is _MISSING:
        return []
    if not isinstance(args, dict):
        return [f"optim.schedule_args={args!r}: expected a mapping of the schedule's arguments"]
    try:
        create_schedule(name, **args)
    except ValueError as e:
        return [f"optim.schedule_args ({name}): {e}"]
    return []


# Added keys that are read: a schedule's arguments (checked by the schedule itself,
# `_schedule_problems`), `method.layout` where a method's config has none and the PER
# options other methods' configs leave out (`REMOVED`), accepted so that one
# `OVERRIDES=++method.layout=flatten` or `++method.num_slices=64` serves every preset of a
# plan (vanilla and BN runs do not read them), the grids the tables and sweeps read where no preset
# gives them (`method.lam_grid`, `method.slices_grid`), and what the entry point adds
# (`run_dir`).
_ADDABLE = ("optim.schedule_args", "method.layout", *REMOVED, "method.lam_grid", "method.slices_grid", "run_dir")


def _added_keys(cfg: dict, defaults: dict) -> list[str]:
    """Keys of `cfg` that its groups (`defaults`) do not hold, added on the command line
    (`+method.lamda=1e-3`, as Hydra's own error suggests for a misspelt key), other than
    `_ADDABLE` ones: no code reads them, so the run would silently ignore them. One line
    per key, with the closest keys of the config."""
    known = _flatten(defaults)
    bad = []
    for key, value in _flatten(cfg).items():
        if key in known or _under(key, _ADDABLE):
            continue
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.75)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        bad.append(f"{key}={value!r}: not a key of this config (added on the command line; "
                   f"nothing reads it){hint}")
    return bad


def _removed_keys(cfg: dict, defaults: dict) -> list[str]:
    """Keys its groups (`defaults`) hold that `cfg` lacks: removed on the command line
    (`~trainer.log_every`), where the runner would fail on them once the run's folder is
    written. One line per key, with its value in `defaults`. Keys that may be added
    (`_ADDABLE`: a schedule's arguments, the planners' grids) may be removed, as may
    `REMOVED` ones (their absence stands for their default)."""
    have = _flatten(cfg)
    parents = {key.rsplit(".", i)[0] for key in have for i in range(1, key.count(".") + 1)}
    return [f"{key}: removed on the command line (~{key}); the run needs it: set a value instead "
            f"(its config's: {value!r})"
            for key, value in _flatten(defaults).items() if key not in have and key not in parents
            and not any(key.startswith(k + ".") for k in have) and not _under(key, _ADDABLE)]


def _unused_lambda(cfg: dict) -> list[str]:
    """A nonzero `method.lam` for a method without a penalty (vanilla, rbn): nothing would
    read it, yet the run's folder would carry it."""
    name, lam = _get(cfg, "method.name"), _get(cfg, "method.lam")
    if name in schema.METHODS and name not in schema.REGULARIZED and is_finite_number(lam) and lam != 0:
        return [f"method.lam={lam!r}: method {name!r} has no penalty to weigh; leave it at 0 "
                f"(methods with a lambda: {', '.join(schema.REGULARIZED)})"]
    return []


def _sampling_conflicts(cfg: dict) -> list[str]:
    """`method.sampling=subspace` with a method, path or direction sharing it cannot serve
    (`per.regularizers.sampling_conflict`); invalid values of these keys are left to `_CHECKS`."""
    method = cfg.get("method") if isinstance(cfg.get("method"), dict) else {}
    defaults = inspect.signature(Regularizer).parameters
    sampling, name = method.get("sampling", defaults["sampling"].default), method.get("name")
    path = method.get("path", defaults["path"].default)
    share = method.get("share_directions", defaults["share_directions"].default)
    if (sampling not in SAMPLINGS or name not in schema.METHODS or path not in PATHS
            or not isinstance(share, bool)):
        return []       # reported by `_CHECKS`
    conflict = sampling_conflict(sampling, name, path, share)
    return [f"method.sampling={sampling!r}: {conflict}"] if conflict else []


def _task_mismatches(cfg: dict) -> list[str]:
    """Dataset, model and method that belong to another task than the run's (e.g. PTB or
    an LSTM under the image runner, RBN on a ResNet): one line per mismatch. Unknown
    values are left to `_CHECKS`."""
    task = _get(cfg, "task")
    if task not in schema.TASKS:
        return []       # reported by the task check
    allowed = {"data.name": DATASETS[task], "model.name": models.list_models(task),
               "method.name": [m for m in schema.METHODS if METHOD_TASK.get(m, task) == task]}
    bad = []
    for key, choices in allowed.items():
        value = _get(cfg, key)
        known = value is not _MISSING and _CHECKS[key][0](value)
        if known and value not in choices:
            other = ", ".join(RUNNER[t] for t in schema.TASKS if t != task)
            bad.append(f"{key}={value!r}: not for task {task!r} (this runner; another task's: {other}); "
                       f"expected one of {', '.join(choices)}")
    return bad


def _flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _decides_result(key: str) -> bool:
    return not _under(key, VOLATILE)


def _not_protocol(key: str, task: Any) -> bool:
    return _under(key, NOT_PROTOCOL) and not _under(key, PROTOCOL_OF_TASK.get(task, ()))


def config_differences(stored: dict, new: dict, defaults: dict | None = None) -> list[str]:
    """What differs between a stored run's config and a new one, on the keys that
    decide the result: one `key: stored -> new` line per dotted key. A key missing
    from the stored config (new since the run was written) counts only when its new
    value differs from what the run did (`ADDED`), else from its value in `defaults`
    (the config without command-line values); a key missing from the new config (see
    `REMOVED`) only when its stored value differs from the value its absence stands for."""
    a, b = _flatten(stored), _flatten(new)
    d = _flatten(defaults) if defaults is not None else {}
    out = []
    for key in sorted(a.keys() | b.keys()):
        if not _decides_result(key):
            continue
        old, now = a.get(key, _MISSING), b.get(key, _MISSING)
        if old is _MISSING and key in ADDED and now is not _MISSING:
            if now != ADDED[key]:
                out.append(f"{key}: <absent: the run had {ADDED[key]!r}> -> {_show(now)}")
            continue
        if old is _MISSING and key in d and now == d[key]:
            continue
        if now is _MISSING and key in REMOVED and old == REMOVED[key]:
            continue
        if old != now:
            out.append(f"{key}: {_show(old)} -> {_show(now)}")
    return out


# The `protocol_changes` entry of a run without a preset (`experiment=`): its groups were
# chosen on the command line (the default `optim` group, say, where its cell's preset
# names another), so it is not a run of its cell's protocol and never shares its rows.
NO_PRESET = "(no preset)"


def protocol_changes(defaults: dict, cfg: dict) -> list[str]:
    """How a run departs from the protocol its groups (its preset) give: `key=value` for
    each key that decides the result and was set on the command line (e.g.
    `optim.epochs=30`, `trainer.precision=bf16`), other than `NOT_PROTOCOL` keys (less
    `PROTOCOL_OF_TASK`'s: an LM's `data.eval_batch_size=20`), plus
    `trainer.epochs` where it runs past an epoch protocol's `optim.epochs` (a shorter run
    is partial: `per.analysis.collect.is_partial`; a step protocol caps the steps). Tables
    keep such runs in rows of their own and do not compare them with the paper. A run
    without a preset (no `preset` key) also lists `NO_PRESET`."""
    a, b = _flatten(defaults), _flatten(cfg)
    changes = {f"{key}={b[key]}" for key in b if _decides_result(key) and not _not_protocol(key, b.get("task"))
               and key in a and a[key] != b[key]}
    if longer := longer_than_protocol(cfg):
        changes.add(longer)
    if not cfg.get("preset"):
        changes.add(NO_PRESET)
    return sorted(changes)


def longer_than_protocol(cfg: dict) -> str | None:
    """`trainer.epochs=<n>` where the run trains past its epoch protocol's `optim.epochs`
    (a step protocol, `optim.total_steps`, caps the steps), else None."""
    b = _flatten(cfg)
    epochs, protocol, steps = (b.get(k) for k in ("trainer.epochs", "optim.epochs", "optim.total_steps"))
    return f"trainer.epochs={epochs}" if not steps and _is_int(epochs) and _is_int(protocol) and epochs > protocol else None


def protocol_of(config: dict) -> dict[str, Any]:
    """What a preset's protocol fixes, `{dotted key: value}`: `config` (what the preset
    composes to alone; or such a mapping, nested or dotted) on the keys that decide a
    result, `NOT_PROTOCOL` keys aside (less `PROTOCOL_OF_TASK`'s). A run records it as
    `protocol`."""
    flat = _flatten(config)
    return {k: v for k, v in flat.items() if _decides_result(k) and not _not_protocol(k, flat.get("task"))}


def protocol_differences(recorded: dict, present: dict) -> list[str]:
    """How a preset's `present` protocol differs from the one a run `recorded`
    (`protocol_of` both), with the runner's tolerance (`config_differences` with the
    present protocol as defaults: a key added since is accepted, unless `ADDED` says the
    run did otherwise): one `key: recorded -> present` line per key. The tables mark a
    run with differences as a run of an older version of its preset."""
    now = protocol_of(present)
    return config_differences(protocol_of(recorded), now, now)


def _show(value: Any) -> str:
    return "<absent>" if value is _MISSING else repr(value)
