"""The paper's published numbers (Tables 1-3), from the project's one copy of them:
`results/paper/paper_tables.csv`, one row per (cell, split)."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

PAPER_CSV = Path("results") / "paper" / "paper_tables.csv"


def find_repo_root(start: Path | None = None) -> Path:
    """The first folder at or above `start` (default: this module, then the working
    directory) that holds `results/paper/paper_tables.csv`."""
    starts = [start] if start is not None else [Path(__file__), Path.cwd()]
    for origin in starts:
        for folder in [origin.resolve(), *origin.resolve().parents]:
            if (folder / PAPER_CSV).is_file():
                return folder
    raise FileNotFoundError(
        f"no {PAPER_CSV} above {', '.join(str(s) for s in starts)}; "
        "run from the repository or pass the CSV's path explicitly")


def load_paper_tables(path: str | Path | None = None) -> pd.DataFrame:
    """The paper's numbers: columns table, dataset, model, activation, method,
    split ("valid" / "test"), metric ("error_pct" / "perplexity"), value."""
    return pd.read_csv(path if path is not None else find_repo_root() / PAPER_CSV)


def paper_value(paper: pd.DataFrame, dataset: str, model: str, activation: str,
                method: str, split: str = "test") -> float:
    """The paper's number for one cell and split; NaN when the paper has none."""
    hit = paper.loc[(paper.dataset == dataset) & (paper.model == model)
                    & (paper.activation == activation) & (paper.method == method)
                    & (paper.split == split), "value"]
    return float(hit.iloc[0]) if len(hit) else math.nan
