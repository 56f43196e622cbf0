"""Run directories -> tidy pandas frames (one row per run, per epoch, per monitored unit).

A run directory holds `config.yaml` (the resolved config), `summary.json` (the run's
status, cell, final and best-validation metrics), `metrics.jsonl` (one line per epoch)
and, when monitored, `activations.jsonl` (one line per monitor step and site).

Besides what `summary.json` says, each run's row carries:
- `partial`: the run is shorter than its protocol (see `is_partial`);
- `changes`: how the run departs from its preset's protocol (`key=value, ...` from the
  config's `protocol_changes`; "" for none, and for runs written before it existed), plus
  `method.lam=<lam> (not in the grid)` for a regularizer's lambda outside its config's
  `method.lam_grid` (an exploratory sweep, a lambda-0 control), and
  `preset=<name> (changed since the run)` where the collector is given the presets'
  present protocols and the one the run recorded differs (`checks.protocol_differences`:
  a run of an older version of its preset): tables keep such runs in rows of their own;
- `grid_size`: the number of lambdas in a regularized run's `method.lam_grid` (NA without
  one, and for unregularized runs); `lam_grid`: those lambdas, `lam_text` each, joined by
  ", " ("" without one);
- `min_test_error`, `min_test_epoch`: the lowest test error over the epochs of
  `metrics.jsonl` and its epoch, the "best test epoch" that the reference
  implementations report (image runs only). It is optimistic (test data pick the
  epoch), so it is reported beside the final-epoch number and never used to select;
- `started`: when the run's last attempt started (of two copies of a run, the newer counts);
- `diverged_copies`: the copies of the run that diverged where the one kept did not
  (`drop_duplicate_runs`).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path

import pandas as pd
import yaml

from per.training.checks import NO_PRESET, longer_than_protocol, protocol_differences
from per.training import records
from per.schema import (CELL_KEYS, CHANGES, DIVERGED, EPOCH, FAILED, FINISHED, HEADLINE_METRICS,
                        INTERRUPTED, METHOD_OPTIONS, REGULARIZED, RUNNING, STATUSES, SUMMARY_KEYS,
                        TEST_ERROR, VARIANT_KEYS, method_options)


RUN_COLUMNS = (
    "run_dir", "status", "task", *CELL_KEYS, "lam", "seed", "val_size", *METHOD_OPTIONS, CHANGES,
    "grid_size", "lam_grid", "experiment", "epochs_completed", "steps", "wall_time_s", "device",
    *(f"final_{m}" for m in HEADLINE_METRICS), "best_epoch", *(f"best_{m}" for m in HEADLINE_METRICS),
    "partial", "min_test_epoch", "min_test_error", "started", "diverged_copies", "error",
)
# What makes two runs the same run (e.g. an ablation preset's default point and the
# table preset's run, in two folders).
RUN_IDENTITY = ["task", *VARIANT_KEYS, "lam", "seed", "val_size"]
_DTYPES = {CHANGES: str, "lam_grid": str, "lam": float, "seed": int, "val_size": int, "num_slices": "Int64",
           "grid_size": "Int64", "epochs_completed": "Int64", "steps": "Int64", "wall_time_s": float,
           "best_epoch": "Int64", **{f"{w}_{m}": float for w in ("final", "best") for m in HEADLINE_METRICS},
           "partial": bool, "min_test_epoch": "Int64", "min_test_error": float, "diverged_copies": int}


OFF_GRID = "(not in the grid)"   # the `changes` entry of a lambda outside its run's grid
STALE = "(changed since the run)"   # the `changes` entry of a run of an older version of its preset
# A preset's present protocol (`checks.protocol_of`; None: unknown, e.g. no such preset now).
Protocols = Callable[[str], "dict | None"]


def lam_text(lam: float) -> str:
    """A lambda as `changes`, `lam_grid` and the sweeps' command lines write it: short
    (`3e-05`, `0.0003`) and exact (more than 6 significant digits are written in full)."""
    short = f"{lam:g}"
    return short if float(short) == lam else repr(float(lam))


def is_off_grid(changes: pd.Series) -> pd.Series:
    """Which rows' `changes` hold an off-grid lambda entry."""
    return changes.str.contains(OFF_GRID, regex=False)


def without_off_grid(changes: str) -> str:
    """`changes` without its off-grid lambda entry: for a sweep that chooses among its own
    lambdas (`per.sweep.chosen_lambda`, `--lams`), inside or outside the preset's grid."""
    return ", ".join(c for c in changes.split(", ") if c and not c.endswith(OFF_GRID))


def is_partial(config: Mapping, summary: Mapping) -> bool:
    """Whether a run is shorter than its protocol, the `optim` group its preset names:
    `optim.total_steps` steps when set (He et al.), else `optim.epochs` epochs.

    Partial: a `trainer.max_steps` below the protocol's steps (any `max_steps` under an
    epoch protocol: smoke and debug runs), fewer `trainer.epochs` than the protocol's
    `optim.epochs` (under either kind: `per.training.run.run_length`), or a finished run
    that completed fewer steps / epochs than the protocol. Records whose config has no
    `optim` group are not judged (False).
    """
    trainer, optim = config.get("trainer") or {}, config.get("optim") or {}
    max_steps, total_steps, epochs = trainer.get("max_steps"), optim.get("total_steps"), optim.get("epochs")
    fewer_epochs = bool(epochs) and (trainer.get("epochs") or epochs) < epochs
    if total_steps:
        # fewer epochs shorten a step protocol only since `run_length` honours them: an
        # older run that did all its steps anyway is complete.
        planned_short = ((bool(max_steps) and max_steps < total_steps)
                         or (fewer_epochs and summary["steps"] < total_steps))
        done_short = summary["steps"] < total_steps
    elif epochs:
        planned_short = bool(max_steps) or fewer_epochs
        done_short = summary["epochs_completed"] < epochs
    else:
        return False
    return planned_short or (summary["status"] == FINISHED and done_short)


def min_test(history: Iterable[Mapping]) -> tuple[int | None, float | None]:
    """(epoch, value) of the lowest finite `test_error` among per-epoch rows; (None, None)
    when no row has one (language models, runs stopped before their first epoch)."""
    rows = [r for r in history if isinstance(r.get(TEST_ERROR), (int, float))
            and math.isfinite(r[TEST_ERROR]) and r.get(EPOCH) is not None]
    if not rows:
        return None, None
    best = min(rows, key=lambda r: (r[TEST_ERROR], r[EPOCH]))
    return int(best[EPOCH]), float(best[TEST_ERROR])


def run_record(config: Mapping, summary: Mapping, run_dir: str,
               history: Iterable[Mapping] = (), protocols: Protocols | None = None) -> dict:
    """One row of the run table from a resolved config, a `summary.json` dict and the
    run's per-epoch rows (`metrics.jsonl`; for `min_test_*`); `protocols` gives a
    preset's present protocol, to mark runs of an older version of it (runs that recorded
    none are not judged).

    Raises KeyError or ValueError when the summary lacks a key or has an unknown status.
    A `running` status is read as `interrupted` (the collector cannot see the process).
    """
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    missing += [f"cell.{k}" for k in CELL_KEYS if k not in summary.get("cell", {})]
    if missing:
        raise KeyError(f"summary is missing {', '.join(missing)}")
    status = INTERRUPTED if summary["status"] == RUNNING else summary["status"]
    if status not in STATUSES:
        raise ValueError(f"unknown status {summary['status']!r}")
    final, best = summary["final"] or {}, summary["best"] or {}
    min_epoch, min_error = min_test(history)
    lam = float(summary["lam"])
    method = config.get("method") or {}
    # Only a regularizer's lambda has a grid (unregularized runs record lam = 0).
    grid = [float(g) for g in method.get("lam_grid") or []] if method.get("name") in REGULARIZED else []
    changes = list(config.get("protocol_changes") or [])
    if (longer := longer_than_protocol(dict(config))) and longer not in changes:   # a run recorded before it counted
        changes.append(longer)
    if grid and not any(math.isclose(lam, g, rel_tol=1e-9, abs_tol=0.0) for g in grid):
        changes.append(f"method.lam={lam_text(lam)} {OFF_GRID}")
    preset, recorded = config.get("preset"), config.get("protocol")
    if not preset and isinstance(recorded, Mapping) and NO_PRESET not in changes:   # recorded before it counted
        changes.append(NO_PRESET)
    if (protocols is not None and preset and isinstance(recorded, Mapping)
            and (present := protocols(preset)) is not None and protocol_differences(dict(recorded), present)):
        changes.append(f"preset={preset} {STALE}")
    return {
        "run_dir": run_dir, "status": status, "task": summary["task"],
        **{k: summary["cell"][k] for k in CELL_KEYS},
        "lam": lam, "seed": int(summary["seed"]),
        "val_size": int((config.get("data") or {}).get("val_size") or 0),
        **method_options(config), CHANGES: ", ".join(changes), "grid_size": len(grid) or None,
        "lam_grid": ", ".join(map(lam_text, grid)),
        "experiment": config.get("preset", config.get("experiment")),
        **{k: summary[k] for k in ("epochs_completed", "steps", "wall_time_s", "device")},
        **{f"final_{m}": final.get(m) for m in HEADLINE_METRICS},
        "best_epoch": best.get(EPOCH),
        **{f"best_{m}": best.get(m) for m in HEADLINE_METRICS},
        "partial": is_partial(config, summary), "min_test_epoch": min_epoch, "min_test_error": min_error,
        "started": (summary.get("attempts") or [{}])[-1].get("started"),
        "error": summary.get("error") if status == FAILED else None,
    }


def runs_frame(rows: list[dict]) -> pd.DataFrame:
    """The run table (columns `RUN_COLUMNS`, fixed dtypes) from `run_record` rows; a
    row without `partial` is not partial, one without `changes`, `lam_grid` or
    `diverged_copies` has none."""
    frame = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    frame["partial"] = frame.partial.eq(True)
    frame[[CHANGES, "lam_grid"]] = frame[[CHANGES, "lam_grid"]].fillna("")
    frame["diverged_copies"] = frame.diverged_copies.fillna(0)
    frame["started"] = pd.to_datetime(frame.started, utc=True, errors="coerce", format="ISO8601")
    return frame.astype(_DTYPES)


def drop_duplicate_runs(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Keep one run per `RUN_IDENTITY` (a finished one if any, complete before partial,
    then the one whose last attempt started last: e.g. a W&B run redone with
    `resume=never` beside the old one; else the first folder): the same seed of the
    same configuration is not an independent sample. A dropped copy that diverged where the
    kept one did not is counted in the kept run's `diverged_copies`, so the tables can show
    the disagreement that `n_diverged` no longer sees. Returns the remaining runs and one
    problem line per dropped run, with both runs' statuses."""
    ordered = (df.assign(unfinished=df.status != FINISHED)
               .sort_values(["unfinished", "partial", "started", "run_dir"],
                            ascending=[True, True, False, True], na_position="last"))
    duplicate = ordered.duplicated(RUN_IDENTITY)
    dropped = ordered[duplicate].merge(ordered.loc[~duplicate, [*RUN_IDENTITY, "run_dir", "status"]],
                                       on=RUN_IDENTITY, suffixes=("", "_kept"))
    problems = [f"{dup} ({status}): same run as {kept} ({status_kept}); not counted"
                for dup, status, kept, status_kept in
                zip(dropped.run_dir, dropped.status, dropped.run_dir_kept, dropped.status_kept)]
    diverged = dropped[(dropped.status == DIVERGED) & (dropped.status_kept != DIVERGED)]
    kept = ordered[~duplicate].drop(columns="unfinished")
    kept["diverged_copies"] += kept.run_dir.map(diverged.run_dir_kept.value_counts()).fillna(0).astype(int)
    return kept.sort_values("run_dir", ignore_index=True), problems


RunReader = Callable[[], tuple[Mapping, Mapping, Iterable[Mapping]]]


def run_table(runs: Iterable[tuple[str, RunReader]], errors: tuple[type[Exception], ...],
              protocols: Protocols | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The run table from (name, read) pairs, `read()` giving the run's config, summary
    and per-epoch rows, plus the problems list: a run whose reading or record raises
    one of `errors` is skipped, one left `running` is kept (read as `interrupted`), and
    duplicates of another run are dropped (`drop_duplicate_runs`), each with one line;
    runs of an older version of their preset (`protocols`, see `run_record`) get a line too."""
    rows, problems = [], []
    for name, read in runs:
        try:
            config, summary, history = read()
            rows.append(run_record(config, summary, name, history, protocols))
        except errors as err:
            problems.append(f"{name}: skipped ({type(err).__name__}: {err})")
            continue
        if summary["status"] == RUNNING:
            problems.append(f"{name}: status 'running' read as 'interrupted'")
        if STALE in rows[-1][CHANGES]:
            problems.append(f"{name}: its preset {config['preset']} has changed since the run; "
                            "reported in a row of its own, not compared with the paper")
    kept, duplicates = drop_duplicate_runs(runs_frame(rows))
    return kept, problems + duplicates


def _read_run_dir(run_dir: Path) -> tuple[dict, dict, list[dict]]:
    summary = json.loads((run_dir / records.SUMMARY).read_text())
    config = yaml.safe_load((run_dir / records.CONFIG).read_text())
    return config, summary, records.read_jsonl(run_dir / records.METRICS_FILE)


def collect_runs(root: str | Path, protocols: Protocols | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Every run under `root` (found by its `summary.json`), one row per run
    (`protocols`: see `run_record`).

    Returns the run table and a list of problems: unreadable or incomplete runs
    (skipped), duplicates of another run (skipped, see `drop_duplicate_runs`) and
    runs left `running` (kept, read as `interrupted`).

    Raises:
        FileNotFoundError: `root` is not a folder (a mistyped path reads as no runs).
    """
    if not Path(root).is_dir():
        raise FileNotFoundError(f"no runs folder {root} (check --runs / paths.runs_dir)")
    run_dirs = sorted(path.parent for path in Path(root).rglob(records.SUMMARY))
    return run_table(((str(d), partial(_read_run_dir, d)) for d in run_dirs),
                     (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError), protocols)


def load_metrics(run_dir: str | Path) -> pd.DataFrame:
    """`metrics.jsonl` as a frame, one row per epoch (per-site keys such as
    `grad_ratio/<site>` stay columns); empty when the file is missing."""
    return pd.DataFrame(records.read_jsonl(Path(run_dir) / records.METRICS_FILE))


def load_activations(run_dir: str | Path) -> pd.DataFrame:
    """`activations.jsonl` in long form: one row per (step, site, unit) with columns
    step, epoch, site, unit, mean, var, q25, q50, q75, sw1 (`sw1` belongs to the
    site and repeats over its units). Where records give the site's `layer` (its
    position among the model's post-activation sites), `site` is "layer <k>", so
    models whose site names differ (BN vs Fixup ResNets) line up; other sites (a
    pre-activation site's `layer` is null) keep their names."""
    per_unit = ["unit", "mean", "var", "q25", "q50", "q75"]
    rows = records.read_jsonl(Path(run_dir) / records.ACTIVATIONS_FILE)
    if not rows:
        return pd.DataFrame(columns=["step", "epoch", "site", *per_unit, "sw1"])
    wide = pd.DataFrame(rows).rename(columns={"units": "unit"})
    if "layer" in wide:
        at = wide.layer.notna()
        wide.loc[at, "site"] = "layer " + wide.layer[at].astype(int).astype(str)
    long = wide.explode(per_unit, ignore_index=True)
    return long[["step", "epoch", "site", *per_unit, "sw1"]].astype(
        {c: float for c in per_unit[1:]} | {"unit": int})


def load_run_metrics(runs: pd.DataFrame) -> pd.DataFrame:
    """`load_metrics` of every run in `runs`, stacked, with the run's columns beside
    each epoch (the input of `figures.plot_training_curves`)."""
    frames = [load_metrics(run.run_dir).assign(**run._asdict())
              for run in runs[list(RUN_COLUMNS)].itertuples(index=False)]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
