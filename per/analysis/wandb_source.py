"""W&B as a second source of the run table (the local run directories are the first).

The runners log the resolved config as the W&B run config, the `summary.json`
dict under the run summary's key "summary" and each `metrics.jsonl` row in the run's
history; this module reads them back into the same table `collect.collect_runs`
builds (the history only for image runs, for `min_test_*`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from per.analysis.collect import Protocols, collect_runs, run_table
from per.schema import EPOCH, TEST_ERROR, WANDB_SUMMARY_KEY


def _plain(value: Any) -> Any:
    """A plain-dict copy of W&B's nested summary / config mappings (W&B's `SummarySubDict`
    has `items` but is no `Mapping`), lists included."""
    if isinstance(value, Mapping) or callable(getattr(value, "items", None)):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class WandbSourceError(RuntimeError):
    """A W&B project could not be read (no key, no network, no such project); the message
    says which and what to do."""


def collect_wandb(project: str, entity: str | None = None, api: Any = None,
                  protocols: Protocols | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Every run of a W&B project as the run table of `collect.collect_runs`
    (`run_dir` is `wandb:<entity>/<project>/<run id>`), plus the problems list
    (`protocols`: see `collect.run_record`).

    `api` defaults to `wandb.Api()`; tests pass a stand-in with `runs(path)` whose
    runs have `path`, `config`, `summary` and `scan_history(keys)`.

    Raises:
        WandbSourceError: the project's runs cannot be listed (wandb's error named).
    """
    path = f"{entity}/{project}" if entity else project
    if api is None:
        import wandb
    try:
        api = wandb.Api() if api is None else api
        runs = list(api.runs(path))
    except Exception as e:      # wandb's errors: no API key, no network, no such entity or project
        raise WandbSourceError(f"cannot read the runs of W&B project {path!r}: {type(e).__name__}: {e} "
                               "(a key from `wandb login` or WANDB_API_KEY, network, and the project's "
                               "entity, --wandb-entity, are needed)") from e
    return run_table(((f"wandb:{'/'.join(run.path)}", partial(_read_run, run)) for run in runs),
                     (KeyError, ValueError, TypeError, AttributeError), protocols)


def collect_source(runs: str | Path, project: str | None = None, entity: str | None = None,
                   protocols: Protocols | None = None) -> tuple[pd.DataFrame, list[str], str]:
    """(run table, problems, where from): W&B `project` when given, else the run directories
    under `runs` (`FileNotFoundError` when that folder does not exist); `protocols`: see
    `collect.run_record`."""
    if project:
        return (*collect_wandb(project, entity, protocols=protocols), f"W&B project {project}")
    return (*collect_runs(runs, protocols), str(runs))


def _read_run(run: Any) -> tuple[dict, dict, Iterable[dict]]:
    """A W&B run's config, summary and (image runs) per-epoch test errors."""
    summary = _plain(run.summary[WANDB_SUMMARY_KEY])
    history = run.scan_history(keys=[EPOCH, TEST_ERROR]) if summary["task"] == "cifar" else ()
    return _plain(run.config), summary, history
