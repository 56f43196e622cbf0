"""W&B as a second source of the run table (the local run directories are the first).

The runners log the resolved config as the W&B run config, the `summary.json`
dict under the run summary's key "summary" and each `metrics.jsonl` row in the run's
history; this module reads them back into the same table `collect.collect_runs`
builds (the history only for image runs, for `min_test_*`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from per.analysis.collect import drop_duplicate_runs, run_record, runs_frame
from per.schema import RUNNING, TEST_ERROR

SUMMARY_KEY = "summary"


def _plain(value: Any) -> Any:
    """A plain-dict copy of W&B's nested summary / config mappings."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def collect_wandb(project: str, entity: str | None = None,
                  api: Any = None) -> tuple[pd.DataFrame, list[str]]:
    """Every run of a W&B project as the run table of `collect.collect_runs`
    (`run_dir` is `wandb:<entity>/<project>/<run id>`), plus the problems list.

    `api` defaults to `wandb.Api()`; tests pass a stand-in with `runs(path)` whose
    runs have `path`, `config`, `summary` and `scan_history(keys)`.
    """
    if api is None:
        import wandb
        api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    rows, problems = [], []
    for run in api.runs(path):
        name = f"wandb:{'/'.join(run.path)}"
        try:
            summary = _plain(run.summary[SUMMARY_KEY])
            history = run.scan_history(keys=["epoch", TEST_ERROR]) if summary["task"] == "cifar" else ()
            rows.append(run_record(_plain(run.config), summary, name, history))
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            problems.append(f"{name}: skipped ({type(err).__name__}: {err})")
            continue
        if summary["status"] == RUNNING:
            problems.append(f"{name}: status 'running' read as 'interrupted'")
    runs, duplicates = drop_duplicate_runs(runs_frame(rows))
    return runs, problems + duplicates
