"""The paper's published numbers (Tables 1-3), from the project's one copy of them:
`paths.paper_csv` (configs/paths/default.yaml), one row per (cell, split)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import yaml

PATHS_CONFIG = Path("configs") / "paths" / "default.yaml"


def find_repo_root(start: Path | None = None) -> Path:
    """The first folder at or above `start` (default: this module, then the working
    directory) that holds `configs/paths/default.yaml`."""
    starts = [start] if start is not None else [Path(__file__), Path.cwd()]
    for origin in starts:
        for folder in [origin.resolve(), *origin.resolve().parents]:
            if (folder / PATHS_CONFIG).is_file():
                return folder
    raise FileNotFoundError(
        f"no {PATHS_CONFIG} above {', '.join(str(s) for s in starts)}; "
        "run from the repository or pass the CSV's path explicitly")


def paper_csv_path(root: Path | None = None) -> Path:
    """`paths.paper_csv` of the repository at `root` (default: `find_repo_root()`), its
    `${paths.<key>}` references resolved (plain YAML: no Hydra or OmegaConf needed)."""
    root = find_repo_root() if root is None else root
    paths = yaml.safe_load((root / PATHS_CONFIG).read_text())

    def resolve(key: str, seen: tuple[str, ...] = ()) -> str:
        if key in seen or key not in paths:
            raise ValueError(f"{root / PATHS_CONFIG}: cannot resolve paths.{key} (via {' -> '.join(seen) or '-'})")
        value = re.sub(r"\$\{paths\.(\w+)\}", lambda m: resolve(m.group(1), (*seen, key)), str(paths[key]))
        if "${" in value:
            raise ValueError(f"{root / PATHS_CONFIG}: paths.{key} = {paths[key]!r} needs a resolver; "
                             "only ${paths.<key>} references are read here")
        return value

    return root / resolve("paper_csv")


def load_paper_tables(path: str | Path | None = None) -> pd.DataFrame:
    """The paper's numbers: columns table, dataset, model, activation, method,
    split ("valid" / "test"), metric ("error_pct" / "perplexity"), value."""
    return pd.read_csv(path if path is not None else paper_csv_path())


def paper_value(paper: pd.DataFrame, dataset: str, model: str, activation: str,
                method: str, split: str = "test") -> float:
    """The paper's number for one cell and split; NaN when the paper has none."""
    hit = paper.loc[(paper.dataset == dataset) & (paper.model == model)
                    & (paper.activation == activation) & (paper.method == method)
                    & (paper.split == split), "value"]
    return float(hit.iloc[0]) if len(hit) else math.nan
