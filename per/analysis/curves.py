"""Per-epoch curves of a few runs side by side, with the paper's numbers for their cells.

Used for side-by-side evidence (for example vanilla vs PER on real PTB) where full
tables would need every seed and lambda.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from per.analysis.paper import load_paper_tables, paper_value
from per.schema import EPOCH, ERROR, PAPER_SPLIT, PPL, metric_key
from per.training.records import METRICS_FILE, RunDir

# The paper's split of each metric it publishes: `val_ppl` -> "valid", `test_error` -> "test".
METRIC_PAPER_SPLIT = {metric_key(split, measure): label
                      for split, label in PAPER_SPLIT.items() for measure in (ERROR, PPL)}


def _value(row: dict, metric: str) -> float | None:
    """`row[metric]`, or for a per-site prefix such as `grad_ratio` the median over sites."""
    if metric in row:
        return row[metric]
    sites = pd.Series([v for k, v in row.items() if k.startswith(metric + "/") and v is not None],
                      dtype=float)
    return float(sites.median()) if len(sites) else None


def epoch_curves(runs: dict[str, str | Path], metrics: list[str]) -> pd.DataFrame:
    """One row per epoch, one column per (metric, run label), from each `metrics.jsonl`.

    A metric may name a per-site prefix (`grad_ratio`, `penalty`): its median over sites.
    """
    rows = [{"run": label, EPOCH: r[EPOCH], **{m: _value(r, m) for m in metrics}}
            for label, path in runs.items() for r in RunDir(path).read_jsonl(METRICS_FILE)]
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).pivot(index=EPOCH, columns="run", values=metrics)


def paper_numbers(runs: dict[str, str | Path], metrics: list[str],
                  paper: pd.DataFrame | None = None) -> dict[tuple[str, str], float]:
    """(metric, run label) -> the paper's number for that run's cell and split, where it has one
    (not for a selection run, trained with images held out: not the paper's protocol)."""
    paper = load_paper_tables() if paper is None else paper
    out = {}
    for label, path in runs.items():
        run = RunDir(path)
        if ((run.read_config() or {}).get("data") or {}).get("val_size"):
            continue
        cell = (run.read_summary() or {}).get("cell")
        for m in metrics:
            if cell and m in METRIC_PAPER_SPLIT:
                out[m, label] = paper_value(paper, cell["dataset"], cell["model"],
                                            cell["activation"], cell["method"], METRIC_PAPER_SPLIT[m])
    return out


def curves_markdown(curves: pd.DataFrame, paper: dict[tuple[str, str], float]) -> str:
    """Markdown table of `epoch_curves`, with a last row holding the paper's numbers."""
    cols = list(curves.columns)
    lines = ["| epoch | " + " | ".join(f"{m} ({run})" for m, run in cols) + " |",
             "| --- |" + " --- |" * len(cols)]
    for epoch, row in curves.iterrows():
        lines.append(f"| {epoch} | " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    if paper:
        lines.append("| paper | " + " | ".join(_fmt(paper.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"
