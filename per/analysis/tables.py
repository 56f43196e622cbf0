"""Honest lambda selection and the paper's tables (docs/protocols.md, "Reporting").

Run table (`collect.collect_runs`) -> per-lambda validation scores -> chosen lambda
per cell -> the reported runs at that lambda -> mean, std, n, the paper's value,
and a 95% Welch interval for the difference to the cell's baseline row.

Images choose lambda on runs trained on 45k with 5k held out (`val_size > 0`) and
report the final-epoch test error of the runs trained on all 50k (`val_size == 0`);
language models choose on the best-validation perplexity and report the test
perplexity of that checkpoint, from the same runs. Selection never reads a test metric.

Beside the image tables' number stands the mean "best test epoch" (the lowest test
error over the epochs, as the reference implementations report it: optimistic), so
the gap to the paper reads both ways. For language models the table's number is
already the references' protocol (test perplexity at the best validation epoch), so
that column is left empty.

Runs shorter than their protocol (`collect.is_partial`: smoke runs, `max_steps`,
fewer epochs) are averaged, and ranked in the lambda selection, only where a row has
no complete run; such a row, and one whose lambda was chosen on partial selection runs,
is marked partial and not compared with the paper unless `include_partial` is set
(which averages a row's partial runs with its complete ones and compares the row; the
selection still ranks partial runs only where a cell has no complete one). Runs whose
command line changed their preset's protocol (`changes`, e.g. `optim.epochs=30`) form
rows of their own, labelled with the changes and never compared with the paper.

Where the caller names the seeds it planned (`seeds` per reported row, `select_seeds` per
lambda of an image cell's selection; `make tables SEEDS=3 SELECT_SEEDS=1`), a row with
results (finished or diverged) from fewer seeds, or a grid with a lambda that has fewer,
is marked and not compared with the paper (a job stopped between launches leaves both).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
from scipy import stats

from per.analysis.collect import is_off_grid, lam_text
from per.analysis.paper import load_paper_tables
from per.schema import (CELL_KEYS, CHANGES, DIVERGED, ERROR, FAILED, FINISHED, INTERRUPTED, LOSS,
                        PAPER_SPLIT, PPL, REPORT_FROM, REPORT_METRIC, SELECTION_METRIC, SELECTION_VAL_SIZE,
                        TASKS, TEST, TRAIN, VAL, VARIANT_KEYS)

# What runs are grouped by: a cell of the paper and its ablation variant.
GROUP_KEYS = list(VARIANT_KEYS)
# Splits each task reports, and the metric of each split. The `split` column of the
# results holds the paper's label of the split (`PAPER_SPLIT`).
SPLITS = {"cifar": (TEST,), "lm": (VAL, TEST)}
SPLIT_METRIC = {VAL: SELECTION_METRIC, TEST: REPORT_METRIC}
DECIMALS = {"cifar": 2, "lm": 1}
# Labels of metrics (`metric_key(split, measure)`) in tables and figures.
SPLIT_LABELS = {TRAIN: "training", VAL: "validation", TEST: "test"}
MEASURE_LABELS = {LOSS: "loss", ERROR: "error (%)", PPL: "perplexity"}


def metric_label(metric: str) -> str:
    """A metric's label with its unit: `test_error` -> "test error (%)"."""
    split, measure = metric.split("_", 1)
    return f"{SPLIT_LABELS[split]} {MEASURE_LABELS[measure]}"


# The metric of a table's numbers with its unit, per task (T3's columns name the split).
TABLE_METRIC_LABEL = {"cifar": metric_label(REPORT_METRIC["cifar"]), "lm": MEASURE_LABELS[PPL]}
BEST_TEST_LABEL = "best test epoch (as the references report; optimistic)"
# Row order of the paper's tables, extra rows after; `bn+<method>` rows come last.
METHOD_ORDER = ("vanilla", "bn", "l1", "l2", "vcl", "rbn", "per")
SPLIT_ORDER = tuple(PAPER_SPLIT.values())
# (row keys, column keys) of each table in the paper's layout; other tables get DEFAULT_LAYOUT.
TABLE_LAYOUT = {
    "T1": (["method"], ["dataset", "model"]),
    "T2": (["method"], ["dataset", "activation"]),
    "T3": (["model", "method"], ["dataset", "split"]),
}
DEFAULT_LAYOUT = (["model", "activation", "method"], ["dataset", "split"])


def metric_column(task: str, metric: str) -> str:
    """Run-table column of `metric` where the task reports from (`final_` / `best_`)."""
    return f"{REPORT_FROM[task]}_{metric}"


def selection_runs(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """The runs of `task` that lambda is chosen on (images: those with a held-out split; where
    a cell has runs held out at several sizes, e.g. a quick `--val-size 64` sweep beside the
    protocol's 5000, only those of the largest with a finished or diverged run: scores of
    different splits do not average)."""
    runs = df[df.task == task]
    if task != "cifar":
        return runs
    runs = runs[runs.val_size > 0]
    # The largest size with evidence (a finished or diverged run), else the largest.
    evidence = runs.val_size.where(runs.status.isin((FINISHED, DIVERGED)))
    by_cell = runs.assign(evidence=evidence).groupby(GROUP_KEYS, dropna=False)
    largest = by_cell.evidence.transform("max").fillna(by_cell.val_size.transform("max"))
    return runs[runs.val_size == largest]


def report_runs(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """The runs of `task` that the tables report (images: those trained on all 50k)."""
    runs = df[df.task == task]
    return runs[runs.val_size == 0] if task == "cifar" else runs


def lambda_scores(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """Validation score of every (cell, lambda) among the task's selection runs (partial
    runs only in a cell without a finished complete one, as `cell_results` reports):
    `score` (mean over finished runs of the selection metric), `score_std`, `n`
    (finished runs with a score), `n_diverged` (runs whose loss diverged, and diverged
    copies of counted runs, `collect.drop_duplicate_runs`: evidence against the lambda;
    `n_diverged_copies` of them copies), `n_failed` (runs that crashed: out of memory, a
    missing file; no evidence about the lambda, and the same command resumes them),
    `n_interrupted` (killed or still running: no evidence yet), `n_partial` (finished
    or diverged runs shorter than the protocol) and `n_settled` (runs with a result:
    finished or diverged, or with a diverged copy)."""
    runs = drop_partial_beside_complete(selection_runs(df, task))
    runs = runs.assign(
        value=runs[metric_column(task, SELECTION_METRIC[task])].where(runs.status == FINISHED),
        diverged=(runs.status == DIVERGED).astype(int) + runs.diverged_copies,
        failed=runs.status == FAILED,
        interrupted=runs.status == INTERRUPTED,
        settled=runs.status.isin((FINISHED, DIVERGED)) | (runs.diverged_copies > 0),
        partial_evidence=runs.partial & runs.status.isin((FINISHED, DIVERGED)))
    return (runs.groupby([*GROUP_KEYS, "lam"], dropna=False)
            .agg(score=("value", "mean"), score_std=("value", "std"), n=("value", "count"),
                 n_diverged=("diverged", "sum"), n_diverged_copies=("diverged_copies", "sum"),
                 n_failed=("failed", "sum"), n_interrupted=("interrupted", "sum"),
                 n_partial=("partial_evidence", "sum"), n_settled=("settled", "sum"))
            .reset_index())


def lambda_reports(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """The reported metric of every (cell, lambda) among the task's report runs: `mean`,
    `std`, `n` over finished runs (for sweep plots; tables use the chosen lambda only);
    partial runs only at a (cell, lambda) without a finished complete one, as `cell_results`."""
    runs = drop_partial_beside_complete(report_runs(df, task), [*GROUP_KEYS, "lam"])
    return (runs[runs.status == FINISHED]
            .groupby([*GROUP_KEYS, "lam"], dropna=False)[metric_column(task, REPORT_METRIC[task])]
            .agg(mean="mean", std="std", n="count")
            .reset_index())


def select_lambda(df: pd.DataFrame, task: str, seeds_per_lambda: int | None = None) -> pd.DataFrame:
    """The chosen lambda of every cell (and ablation variant) of `task`.

    The lowest mean validation score wins, except that a lambda with a diverged
    selection run ranks after every lambda without one (ties: smaller lambda). A cell
    whose runs all share one lambda (vanilla, bn, rbn: 0; a one-lambda sweep) takes it
    even without a score (its row still counts its diverged runs; `per.sweep.chosen_lambda`
    refuses it for a final phase); a cell with several lambdas and no selection scores
    gets NaN. Columns: the group keys, lam, score, score_std, n, n_diverged, n_failed,
    n_lams; the counts are those of the chosen lambda, or of the whole cell's selection
    runs where none has a score; `n_scored` (lambdas of the grid with finished or
    diverged selection runs of at least `seeds_per_lambda` seeds, default 1; any lambda
    where the cell records no grid) and `grid_size`
    (lambdas in the cell's grid, NA without one): where a grid of several lambdas has
    unscored ones, the choice is among part of the grid; `n_unsettled` (the cell's
    selection runs without a result: failed or interrupted), `select_val_size` (images:
    the held-out size the choice was made on; NA for LMs) and `selection_partial` (a cell
    of several lambdas whose selection ranked partial runs: it had no finished complete one).
    """
    runs = df[df.task == task]
    # The cell's grid: every lambda of the `method.lam_grid`s its runs record (runs of an
    # old grid beside a regenerated one: the lambdas of both).
    cells = (runs.groupby(GROUP_KEYS, dropna=False)
             .agg(n_lams=("lam", "nunique"), only_lam=("lam", "first"),
                  grid=("lam_grid", lambda grids: frozenset(lam for g in grids for lam in g.split(", ") if lam)))
             .reset_index())
    cells["grid_size"] = cells.grid.map(len).replace(0, pd.NA)
    all_scores = lambda_scores(df, task)
    scores = all_scores.dropna(subset=["score"])
    best = (scores.assign(unstable=scores.n_diverged > 0)
            .sort_values(["unstable", "score", "lam"])
            .drop_duplicates(GROUP_KEYS)
            .drop(columns="unstable"))
    totals = all_scores.merge(cells[[*GROUP_KEYS, "grid"]], on=GROUP_KEYS, how="left")
    in_grid = pd.Series([not grid or lam_text(lam) in grid for lam, grid in zip(totals.lam, totals.grid)],
                        index=totals.index, dtype=bool)
    cell_totals = (totals.assign(scored=(totals.n_settled >= (seeds_per_lambda or 1)) & in_grid,
                                 unsettled=totals.n_failed + totals.n_interrupted)
                   .groupby(GROUP_KEYS, dropna=False)
                   .agg(cell_diverged=("n_diverged", "sum"), cell_failed=("n_failed", "sum"),
                        n_scored=("scored", "sum"), n_unsettled=("unsettled", "sum"),
                        cell_partial=("n_partial", "sum"))
                   .reset_index())
    split = selection_runs(df, task).groupby(GROUP_KEYS, dropna=False).val_size.max().rename("select_val_size")
    chosen = (cells.merge(best, on=GROUP_KEYS, how="left").merge(cell_totals, on=GROUP_KEYS, how="left")
              .merge(split.reset_index(), on=GROUP_KEYS, how="left"))
    chosen["n_diverged"] = chosen.n_diverged.fillna(chosen.cell_diverged)
    chosen["n_failed"] = chosen.n_failed.fillna(chosen.cell_failed)
    chosen["lam"] = chosen.lam.where(chosen.lam.notna() | (chosen.n_lams > 1), chosen.only_lam)
    counts = ["n", "n_diverged", "n_failed", "n_scored", "n_unsettled"]
    chosen[counts] = chosen[counts].fillna(0).astype(int)
    chosen["grid_size"] = chosen.grid_size.astype("Int64")
    chosen["selection_partial"] = (chosen.n_lams > 1) & chosen.cell_partial.gt(0)
    chosen["select_val_size"] = chosen.select_val_size.astype("Int64") if task == "cifar" else pd.NA
    # Grouping turns a key column without values (layout of vanilla-only runs) into
    # float NaN: restore the run table's dtypes so the result merges back onto runs.
    chosen = chosen.astype({k: runs[k].dtype for k in GROUP_KEYS})
    return chosen[[*GROUP_KEYS, "lam", "score", "score_std", *counts, "n_lams", "grid_size", "select_val_size",
                   "selection_partial"]]


def baseline_method(method: str) -> str:
    """The row a method is compared with: `bn` for `bn+<method>`, else `vanilla`."""
    return "bn" if method.startswith("bn+") else "vanilla"


def welch_interval(a: Sequence[float], b: Sequence[float],
                   level: float = 0.95) -> tuple[float, float]:
    """Confidence interval of mean(a) - mean(b), Welch-Satterthwaite degrees of
    freedom; NaN when either side has fewer than two values."""
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(level)
    return float(ci.low), float(ci.high)


def _kept_runs(runs: pd.DataFrame, include_partial: bool, keys: Sequence[str] = tuple(GROUP_KEYS)) -> pd.DataFrame:
    """`runs` with `kept`: a run counts unless it is partial and its group (`keys`) has a
    finished complete run (every run counts with `include_partial`)."""
    keys = list(keys)
    complete = (runs[(runs.status == FINISHED) & ~runs.partial][keys]
                .drop_duplicates().assign(has_complete=True))
    runs = runs.merge(complete, on=keys, how="left")
    has_complete = runs.has_complete.eq(True)
    return runs.drop(columns="has_complete").assign(
        kept=include_partial | ~runs.partial | ~has_complete)


def drop_partial_beside_complete(runs: pd.DataFrame, keys: Sequence[str] = tuple(GROUP_KEYS)) -> pd.DataFrame:
    """`runs` without the partial runs of groups (`keys`: cell and variant; add "lam" for
    what a figure draws per lambda) that have a finished complete run: what tables average."""
    runs = _kept_runs(runs, include_partial=False, keys=keys)
    return runs[runs.kept].drop(columns="kept")


def at_chosen_lambda(df: pd.DataFrame, runs_of: Callable[[pd.DataFrame, str], pd.DataFrame]
                     ) -> pd.DataFrame:
    """The runs `runs_of(df, task)` at each cell's chosen lambda, all tasks (partial runs
    only where their cell has no finished complete one, as the tables average)."""
    frames = [drop_partial_beside_complete(runs_of(df, task).merge(select_lambda(df, task)[[*GROUP_KEYS, "lam"]],
                                                                   on=[*GROUP_KEYS, "lam"]))
              for task in TASKS if (df.task == task).any()]
    return pd.concat(frames, ignore_index=True)


def cell_results(df: pd.DataFrame, task: str, paper: pd.DataFrame | None = None,
                 include_partial: bool = False, seeds: int | None = None,
                 select_seeds: int | None = None) -> pd.DataFrame:
    """One row per (cell, variant, split) of `task`, at the chosen lambda.

    `seeds`: the seeds planned per reported row; `select_seeds`: per lambda of an image
    cell's selection (a language model's lambdas are chosen on its reported runs, so on
    `seeds`). None: no expectation.

    Columns: the group keys, split, lam, score (selection), mean, std (ddof=1), n
    (finished reported runs), n_diverged, n_failed (crashed), n_interrupted,
    n_partial_excluded (partial runs left out beside complete ones), partial (the
    row's runs are shorter than the protocol), n_diverged_copies (the row's runs'
    `diverged_copies`: copies that diverged where the counted one did not), paper, diff
    (mean - paper; NaN for a partial row or one whose lambda was chosen on partial runs
    unless `include_partial`, where a copy of a counted run diverged, where the lambda was
    chosen among part of its grid, while selection runs lack a result, or on another
    held-out size than the protocol's), n_scored, grid_size, grid_incomplete
    (`select_lambda`'s: a grid of several lambdas with unscored ones), n_unsettled,
    select_val_size, selection_partial (`select_lambda`'s), choice_unsettled (a grid of
    several lambdas whose selection has runs without a result), off_protocol_split
    (images: a grid's lambda chosen on another held-out size than `SELECTION_VAL_SIZE`),
    best_test (images: mean over the same runs
    of the best test epoch's error; NaN for language models), best_test_diff
    (best_test - paper), baseline, vs_baseline (mean - baseline mean), ci_low, ci_high
    (95% Welch interval of vs_baseline; NaN where the baseline row is not fit to compare
    with: `baseline_note` says why), n_settled (reported runs with a result: finished or
    diverged), seeds_expected (`seeds`), seeds_short (fewer than `seeds` runs with a
    result), not_validated (a lambda > 0 without a finished or diverged selection run, not
    a grid's only lambda), n_select, n_select_diverged (finished, diverged selection runs of
    the chosen lambda), not_compared
    (why the row is not compared with the paper, set whether or not the paper has a value:
    "" where it would be), task.
    """
    paper = load_paper_tables() if paper is None else paper
    chosen = _choices(df, task, select_seeds if task == "cifar" else seeds)
    runs = _kept_runs(report_runs(df, task).merge(chosen[[*GROUP_KEYS, "lam"]],
                                                  on=[*GROUP_KEYS, "lam"]), include_partial)
    kept = runs[runs.kept]
    finished = kept[kept.status == FINISHED]
    split_columns = {metric_column(task, SPLIT_METRIC[s][task]): PAPER_SPLIT[s]
                     for s in SPLITS[task]}
    values = (finished.rename(columns=split_columns)
              .melt(id_vars=GROUP_KEYS, value_vars=list(split_columns.values()),
                    var_name="split", value_name="value")
              .dropna(subset=["value"]))
    summary = (values.groupby([*GROUP_KEYS, "split"], dropna=False).value
               .agg(mean="mean", std="std", n="count", values=list).reset_index())
    counts = _run_counts(runs)
    published = paper[[*CELL_KEYS, "split", "value"]].rename(columns={"value": "paper"})
    out = (chosen.merge(pd.DataFrame({"split": list(split_columns.values())}), how="cross")
           .merge(summary, on=[*GROUP_KEYS, "split"], how="left")
           .merge(counts, on=GROUP_KEYS, how="left")
           .merge(published, on=[*CELL_KEYS, "split"], how="left"))
    numbers = ["n", "n_diverged", "n_failed", "n_interrupted", "n_partial_excluded", "n_diverged_copies",
               "n_settled", "n_select", "n_select_diverged"]
    out[numbers] = out[numbers].fillna(0).astype(int)
    out["partial"] = out.partial.eq(True)
    out["values"] = [v if isinstance(v, list) else [] for v in out["values"]]
    is_test = out.split == PAPER_SPLIT[TEST]
    out["best_test"] = out.best_test.where(is_test) if task == "cifar" else math.nan
    out["seeds_expected"] = pd.array([seeds] * len(out), dtype="Int64")
    out["seeds_short"] = out.n_settled.lt(seeds) if seeds else False
    grid_only = out.grid_size.eq(1).fillna(False).astype(bool)          # a protocol constant: VCL's weight
    out["not_validated"] = out.lam.gt(0) & out.n_select.eq(0) & out.n_select_diverged.eq(0) & ~grid_only
    out["not_compared"] = _not_compared(out, include_partial)
    out["diff"] = (out["mean"] - out.paper).where(out.not_compared.eq(""))
    out["best_test_diff"] = (out.best_test - out.paper).where(out.not_compared.eq(""))
    return _against_baselines(out, include_partial).drop(columns=["values"]).assign(task=task)


# Why a row is not compared with the paper, in order of precedence: (reason, row's flag).
NOT_COMPARED = (
    ("protocol changed", lambda out, partial_ok: out[CHANGES].ne("")),
    ("partial", lambda out, partial_ok: (out.partial | out.selection_partial) & (not partial_ok)),
    ("seeds missing", lambda out, partial_ok: out.seeds_short),
    ("a duplicate diverged", lambda out, partial_ok: out.n_diverged_copies.gt(0)),
    ("λ not validated", lambda out, partial_ok: out.not_validated),
    ("grid incomplete", lambda out, partial_ok: out.grid_incomplete),
    ("selection unsettled", lambda out, partial_ok: out.choice_unsettled),
    ("other held-out size", lambda out, partial_ok: out.off_protocol_split),
)


def _not_compared(out: pd.DataFrame, include_partial: bool, skip: Sequence[str] = ()) -> pd.Series:
    """Per row, the first `NOT_COMPARED` reason that applies (those in `skip` aside), ""
    where none does."""
    reason = pd.Series("", index=out.index)
    for text, applies in reversed(NOT_COMPARED):
        if text not in skip:
            reason = reason.mask(applies(out, include_partial).astype(bool), text)
    return reason


def _choices(df: pd.DataFrame, task: str, seeds_per_lambda: int | None) -> pd.DataFrame:
    """`select_lambda`'s choice per (cell, variant), flagged where a grid's choice is not
    yet the protocol's: grid_incomplete, choice_unsettled, off_protocol_split (and
    `select_lambda`'s selection_partial); `n_select`, `n_select_diverged`: its `n`, `n_diverged`."""
    chosen = (select_lambda(df, task, seeds_per_lambda)
              [[*GROUP_KEYS, "lam", "score", "n", "n_diverged", "n_scored", "grid_size", "n_unsettled",
                "select_val_size", "selection_partial"]]
              .rename(columns={"n": "n_select", "n_diverged": "n_select_diverged"}))
    # An off-grid lambda is a row of its own, not part of a grid.
    grid = (chosen.grid_size > 1).fillna(False).astype(bool) & ~is_off_grid(chosen[CHANGES])
    # NA (language models, whose choice has no held-out split) is no other split.
    other_split = chosen.select_val_size.astype("Int64").ne(SELECTION_VAL_SIZE).fillna(False).astype(bool)
    return chosen.assign(grid_incomplete=grid & (chosen.n_scored < chosen.grid_size).fillna(False).astype(bool),
                         choice_unsettled=grid & (chosen.n_unsettled > 0),
                         off_protocol_split=grid & other_split)


def _run_counts(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (cell, variant): the kept runs that diverged, failed or were interrupted, the
    partial runs left out, whether kept runs are partial, the diverged copies of kept runs,
    the kept runs with a result (finished or diverged), and the mean best test error of
    the finished ones (images)."""
    return (runs.assign(n_diverged=runs.kept & (runs.status == DIVERGED),
                        n_settled=runs.kept & runs.status.isin((FINISHED, DIVERGED)),
                        n_failed=runs.kept & (runs.status == FAILED),
                        n_interrupted=runs.kept & (runs.status == INTERRUPTED),
                        n_partial_excluded=~runs.kept,
                        partial=runs.kept & runs.partial,
                        n_diverged_copies=runs.diverged_copies.where(runs.kept, 0),
                        best_test=runs.min_test_error.where(runs.kept & (runs.status == FINISHED)))
            .groupby(GROUP_KEYS, dropna=False)
            .agg(n_diverged=("n_diverged", "sum"), n_failed=("n_failed", "sum"),
                 n_interrupted=("n_interrupted", "sum"),
                 n_partial_excluded=("n_partial_excluded", "sum"), partial=("partial", "any"),
                 n_diverged_copies=("n_diverged_copies", "sum"), n_settled=("n_settled", "sum"),
                 best_test=("best_test", "mean"))
            .reset_index())


def _against_baselines(out: pd.DataFrame, include_partial: bool) -> pd.DataFrame:
    """`out` with each row's baseline (same table, dataset, model, activation, protocol
    changes and split; `baseline_method`), vs_baseline (mean - baseline mean) and its 95%
    Welch interval (ci_low, ci_high). These are NaN where the baseline row is not fit to
    compare with, and `baseline_note` says why (where both rows have a mean): a
    `NOT_COMPARED` reason of its own (its protocol changes are the row's), or a partial
    baseline beside a complete row or the reverse (unless `include_partial`)."""
    baseline = out.method.map(baseline_method)
    partial = (out.partial | out.selection_partial) & (not include_partial)
    out = out.assign(baseline=baseline.where(baseline != out.method), partial_any=partial,
                     blocker=_not_compared(out, include_partial, skip=("protocol changed", "partial")))
    baselines = (out[[*CELL_KEYS, CHANGES, "split", "mean", "values", "partial_any", "blocker"]]
                 .drop_duplicates(subset=[*CELL_KEYS, CHANGES, "split"])
                 .rename(columns={"method": "baseline", "mean": "baseline_mean", "values": "baseline_values",
                                  "partial_any": "baseline_partial", "blocker": "baseline_blocker"}))
    out = out.merge(baselines, on=[*CELL_KEYS[:-1], "baseline", CHANGES, "split"], how="left")
    note = pd.Series("", index=out.index)
    mismatch = out.baseline_partial.notna() & out.baseline_partial.ne(out.partial_any)
    note = note.mask(mismatch, out.baseline + ": " + out.baseline_partial.map(
        {True: "partial", False: "complete, this row partial"}, na_action="ignore").fillna(""))
    blocked = out.baseline_blocker.fillna("").ne("")
    note = note.mask(blocked, out.baseline + ": " + out.baseline_blocker.fillna(""))
    out["baseline_note"] = note.where(out["mean"].notna() & out.baseline_mean.notna(), "")
    fit = note.eq("")
    out["vs_baseline"] = (out["mean"] - out.baseline_mean).where(fit)
    intervals = [welch_interval(ours, theirs if ok and isinstance(theirs, list) else [])
                 for ours, theirs, ok in zip(out["values"], out.baseline_values, fit)]
    out["ci_low"] = [low for low, _ in intervals]
    out["ci_high"] = [high for _, high in intervals]
    return out.drop(columns=["baseline_mean", "baseline_values", "baseline_partial", "baseline_blocker",
                             "partial_any", "blocker"])


def all_results(df: pd.DataFrame, paper: pd.DataFrame | None = None, include_partial: bool = False,
                seeds: int | None = None, select_seeds: int | None = None) -> pd.DataFrame:
    """`cell_results` of every task present in the run table, stacked."""
    paper = load_paper_tables() if paper is None else paper
    frames = [cell_results(df, task, paper, include_partial, seeds, select_seeds)
              for task in TASKS if (df.task == task).any()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def method_sort_key(label: str) -> tuple[int, str]:
    """Sort key of a row label (`per`, `per [flatten, sum, s=256]`): the paper's row order."""
    method = label.split(" [")[0]
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), label)


def _rank(values: pd.Series, order: Sequence[str]) -> pd.Series:
    """Position of each value in `order`; values not in it follow, sorted."""
    extra = sorted(set(values.dropna().astype(str)) - set(order))
    return values.map({v: i for i, v in enumerate([*order, *extra])})


def _variant(row: pd.Series) -> str:
    parts = [str(row[opt]) for opt in ("layout", "reduction") if pd.notna(row[opt])]
    parts += [f"s={row.num_slices}"] if pd.notna(row.num_slices) else []
    return ", ".join(parts)


def row_labels(frame: pd.DataFrame) -> pd.Series:
    """Row label of each row: its method, plus `[layout, reduction, s=num_slices]` where
    the frame holds several variants of that method (e.g. `per [flatten, mean, s=256]`),
    plus `{changed: ...}` for runs that departed from their preset's protocol."""
    variant = frame.apply(_variant, axis=1) if len(frame) else pd.Series(dtype=str)
    several = variant.groupby(frame.method).transform("nunique") > 1
    labels = frame.method.where(~several, frame.method + " [" + variant + "]")
    return labels.where(frame[CHANGES].eq(""), labels + " {changed: " + frame[CHANGES] + "}")


def _cell_text(row: pd.Series, decimals: int) -> str:
    """`mean ± std (n=k) λ=... · k/m diverged · partial · paper p (diff) · vs baseline d [lo, hi]`."""
    f = f".{decimals}f"
    if row.n >= 2:
        text = f"{row['mean']:{f}} ± {row['std']:{f}} (n={row.n})"
    elif row.n == 1:
        text = f"{row['mean']:{f}} (n=1)"
    else:
        text = "— (n=0)"
    if pd.isna(row.lam):
        text += " λ not selected"
    elif row.lam > 0:
        fixed = pd.notna(row.grid_size) and row.grid_size == 1   # a protocol constant: VCL's weight
        text += f" λ={row.lam:.0e}" + (" (fixed)" if fixed else " (not validated)" if row.not_validated else "")
    if row.grid_incomplete:
        text += f" · grid incomplete: {row.n_scored}/{row.grid_size} λ scored"
    if row.choice_unsettled:
        text += f" · selection: {row.n_unsettled} run{'s' if row.n_unsettled > 1 else ''} without a result"
    if row.off_protocol_split:
        text += f" · λ chosen on {row.select_val_size} held-out images (protocol: {SELECTION_VAL_SIZE})"
    total = row.n + row.n_diverged + row.n_failed + row.n_interrupted
    if row.seeds_short:
        text += f" · results from {row.n_settled} of {row.seeds_expected} seeds"
    if row.n_diverged:
        text += f" · {row.n_diverged}/{total} diverged"
    if row.n_diverged_copies:
        text += f" · {row.n_diverged_copies} duplicate{'s' if row.n_diverged_copies > 1 else ''} diverged"
    if row.n_failed:
        text += f" · {row.n_failed}/{total} failed (error in runs.csv; rerun resumes)"
    if row.n_interrupted:
        text += f" · {row.n_interrupted}/{total} interrupted"
    if row.partial:
        text += " · partial (shorter than the protocol)"
    if row.n_partial_excluded:
        text += f" · {row.n_partial_excluded} partial left out"
    if row.selection_partial:
        text += " · λ chosen on partial runs"
    if pd.notna(row.paper):
        text += f" · paper {row.paper:{f}}"
        if pd.notna(row["diff"]):
            text += f" ({row['diff']:+{f}})"
        elif row.not_compared:
            text += f" (not compared: {row.not_compared})"
    if row.baseline_note:
        text += f" · vs {row.baseline}: not compared ({row.baseline_note})"
    elif pd.notna(row.ci_low):
        text += (f" · vs {row.baseline} {row.vs_baseline:+{f}}"
                 f" [{row.ci_low:+{f}}, {row.ci_high:+{f}}]")
    return text


def _best_text(row: pd.Series, decimals: int) -> str:
    """`best (diff vs paper)`, or `—` where there is no best test epoch."""
    if pd.isna(row.best_test):
        return "—"
    f = f".{decimals}f"
    diff = f" ({row.best_test_diff:+{f}} vs paper)" if pd.notna(row.best_test_diff) else ""
    return f"{row.best_test:{f}}{diff}"


def _table_rows(results: pd.DataFrame, table_id: str, paper: pd.DataFrame
                ) -> tuple[pd.DataFrame, list[str], list[str], pd.DataFrame]:
    """The results of one table in the paper's order, with row labels, its row keys,
    its column keys, and the column keys' rows in order."""
    rows, cols = TABLE_LAYOUT.get(table_id, DEFAULT_LAYOUT)
    orders = {k: list(paper[k].unique()) for k in ("dataset", "model", "activation")}
    orders |= {"method": METHOD_ORDER, "split": SPLIT_ORDER}

    def by_rank(s: pd.Series) -> pd.Series:
        return _rank(s, orders.get(s.name, ()))

    t = results[results.table == table_id].copy()
    if t.empty:
        raise ValueError(f"no results for table {table_id!r}")
    t["variant"] = t.apply(_variant, axis=1)
    t = t.sort_values([*rows, "variant", *cols], key=by_rank)
    t["method"] = row_labels(t)
    return t, rows, cols, t[cols].drop_duplicates().sort_values(cols, key=by_rank)


def _metric_label(t: pd.DataFrame) -> str:
    """The metric (with its unit) of a table's numbers."""
    labels = sorted({TABLE_METRIC_LABEL[task] for task in t.task})
    return labels[0] if len(labels) == 1 else " / ".join(labels)


def format_table(results: pd.DataFrame, table_id: str,
                 paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """One paper table (`T1`, `T2`, `T3`, or any other `table` value) as text, laid out
    as in the paper: T1 methods x (dataset, model), T2 methods x (dataset, activation),
    T3 (model, method) x (dataset, split). Columns are (*column keys, metric): each
    cell is a string (see `_cell_text`) under the metric with its unit; image tables
    add a `BEST_TEST_LABEL` column per cell. Rows of ablation variants are labelled
    `per [flatten, sum, s=256]`."""
    paper = load_paper_tables() if paper is None else paper
    t, rows, cols, col_keys = _table_rows(results, table_id, paper)
    label = _metric_label(t)
    t[label] = [_cell_text(r, DECIMALS[r.task]) for _, r in t.iterrows()]
    quantities = [label]
    if (t.task == "cifar").any():
        t[BEST_TEST_LABEL] = [_best_text(r, DECIMALS[r.task]) for _, r in t.iterrows()]
        quantities.append(BEST_TEST_LABEL)
    wide = t.set_index([*rows, *cols])[quantities].unstack(cols)     # columns (quantity, *cols)
    wide.columns = wide.columns.reorder_levels([*range(1, len(cols) + 1), 0])
    col_index = pd.MultiIndex.from_tuples(
        [(*key, q) for key in col_keys.itertuples(index=False) for q in quantities],
        names=[*cols, "metric"])
    row_index = pd.MultiIndex.from_frame(t[rows].drop_duplicates())
    wide = wide.reindex(index=row_index if len(rows) > 1 else row_index.get_level_values(0), columns=col_index)
    return _with_paper_cells(wide, table_id, rows, cols, quantities, paper, max(DECIMALS[k] for k in t.task))


NO_RUNS = "— (no runs)"


def _with_paper_cells(wide: pd.DataFrame, table_id: str, rows: list[str], cols: list[str],
                      quantities: list[str], paper: pd.DataFrame, decimals: int) -> pd.DataFrame:
    """`wide` (`format_table`'s) with the paper's cells that no run reached in the columns
    it has: `— (no runs) · paper X` in each row of the cell's method (its variants too;
    rows of changed protocols stay empty), and rows for the paper's methods without runs
    there, in the paper's order. Columns without runs stay out (a sweep of one cell gets
    a table of that cell's column)."""
    index = [i if len(rows) > 1 else (i,) for i in wide.index]      # tuples, the method last
    present = {c[:-1] for c in wide.columns}
    published = [cell for cell in paper[paper.table == table_id].itertuples(index=False)
                 if tuple(getattr(cell, k) for k in cols) in present]
    orders = {k: list(paper[k].unique()) for k in rows[:-1]}

    def rank(label: tuple) -> tuple:
        """Paper order of a row: its leading keys, then its method (variants and changes aside)."""
        lead = [orders[k].index(v) if v in orders[k] else len(orders[k]) for k, v in zip(rows, label[:-1])]
        return (*lead, method_sort_key(label[-1].split(" {")[0])[0])

    texts = {}
    for cell in published:
        keys = tuple(getattr(cell, k) for k in rows)
        labels = [i for i in index if i[:-1] == keys[:-1] and _row_method(i[-1]) == cell.method]
        if not labels:      # a row of its own, before the first row that follows it in the paper's order
            at = next((n for n, i in enumerate(index) if rank(i) > rank(keys)), len(index))
            index.insert(at, keys)
            labels = [keys]
        col = tuple(getattr(cell, k) for k in cols)
        for label in labels:
            texts[label if len(rows) > 1 else label[0], col] = f"{NO_RUNS} · paper {cell.value:.{decimals}f}"
    index = [i if len(rows) > 1 else i[0] for i in index]
    wide = wide.reindex(index=pd.MultiIndex.from_tuples(index, names=rows) if len(rows) > 1 else
                        pd.Index(index, name=rows[0])).astype(object)
    for (label, col), text in texts.items():
        if pd.isna(wide.at[label, (*col, quantities[0])]):
            wide.at[label, (*col, quantities[0])] = text
            for q in quantities[1:]:
                wide.at[label, (*col, q)] = "—"
    return wide


def _row_method(label: str) -> str | None:
    """The method of a row label (`per [flatten, sum, s=256]` -> per); None for a row of
    changed protocols, which the paper's numbers do not describe."""
    return None if "{changed" in label else label.split(" [")[0]


def table_numbers(results: pd.DataFrame, table_id: str,
                  paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """One paper table as numbers, one row per table cell (row keys, column keys) in
    the paper's order, each quantity in its own column; headers name the metric
    and its unit (`test error (%) mean`, `paper test error (%)`). Image tables have the
    `BEST_TEST_LABEL` columns; language-model tables do not."""
    paper = load_paper_tables() if paper is None else paper
    t, rows, cols, _ = _table_rows(results, table_id, paper)
    label = _metric_label(t)
    best = ({"best_test": BEST_TEST_LABEL, "best_test_diff": "best test epoch - paper"}
            if (t.task == "cifar").any() else {})
    columns = {
        "lam": "lambda", "score": "selection score (validation)", "mean": f"{label} mean",
        "std": f"{label} std", "n": "n", "paper": f"paper {label}", "diff": "ours - paper",
        **best, "baseline": "baseline", "vs_baseline": "ours - baseline",
        "ci_low": "95% CI low", "ci_high": "95% CI high", "n_diverged": "diverged",
        "n_failed": "failed", "n_interrupted": "interrupted", "partial": "partial",
        "n_partial_excluded": "partial runs left out", "n_scored": "lambdas scored",
        "grid_size": "lambdas in grid", "n_unsettled": "selection runs without a result",
        "select_val_size": "held-out images of the selection",
        "selection_partial": "lambda chosen on partial runs", "n_diverged_copies": "duplicates diverged",
        "n_select": "selection runs of the lambda", "n_settled": "runs with a result",
        "seeds_expected": "seeds planned", "not_compared": "not compared with the paper because",
        "baseline_note": "not compared with the baseline because",
    }
    return t[[*rows, *cols, *columns]].rename(columns=columns).reset_index(drop=True)


def to_markdown(table: pd.DataFrame) -> str:
    """A Markdown (GitHub) table; column levels are joined by spaces."""
    flat = table.reset_index()
    header = [" ".join(str(c) for c in col if c != "") if isinstance(col, tuple) else str(col)
              for col in flat.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |"
              for row in flat.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def to_latex(numbers: pd.DataFrame, decimals: int) -> str:
    """A LaTeX tabular (booktabs) of `table_numbers`: lambda in scientific notation,
    metrics with `decimals` decimals, counts as integers, `--` where empty."""
    def number(value) -> str:
        return "--" if pd.isna(value) else f"{value:.{decimals}f}"

    formatters = {c: number for c in numbers.columns if numbers[c].dtype.kind == "f"}
    formatters["lambda"] = lambda v: "--" if pd.isna(v) else "0" if v == 0 else f"{v:.0e}"
    formatters["partial"] = formatters["lambda chosen on partial runs"] = lambda v: "yes" if v else "no"
    return numbers.to_latex(index=False, escape=True, formatters=formatters, na_rep="--")


LEGEND = ("mean ± std over seeds (n finished runs) at the λ chosen on validation; "
          "diverged/interrupted runs are counted, not averaged; paper = published value "
          "(ours − paper); vs <baseline>: difference to the baseline row with its 95% "
          "Welch interval. Image tables report the final-epoch test error; beside it, "
          f"\"{BEST_TEST_LABEL}\" is the mean over the same runs of each run's lowest "
          "test error over its epochs (never used to choose anything). Language models "
          "report the test perplexity at the best validation epoch, which is already "
          "the references' protocol, so they have no such column. Partial rows come "
          "from runs shorter than their protocol or a λ chosen on such runs, "
          "{changed: key=value} rows from runs whose command line changed their preset's "
          "protocol or whose λ is outside the preset's grid, \"grid incomplete\" rows from "
          "a λ chosen before every λ of the grid had a finished or diverged selection run "
          "(from every planned seed, where the seeds are given), \"results from k of m seeds\" "
          "rows from fewer runs with a result than the planned seeds, and \"duplicate "
          "diverged\" rows from runs of which another copy diverged; none is compared with "
          "the paper, and a row is compared with its baseline only where both are complete "
          "or both partial and the baseline has no other such mark.")


def selection_note(t: pd.DataFrame) -> str:
    """One line on how this table's lambdas were chosen: on what, over how many finished
    selection runs per chosen lambda, and the seeds planned per row."""
    chosen = t[t.lam.gt(0) & t.score.notna()].drop_duplicates(subset=GROUP_KEYS)
    parts = []
    for task, rows in chosen.groupby("task"):
        runs = sorted(set(rows.n_select))
        count = f"{runs[0]}" if len(runs) == 1 else f"{runs[0]}-{runs[-1]}"
        on = ("validation perplexity" if task == "lm" else
              " / ".join(f"{size} held-out training images" for size in sorted(set(rows.select_val_size.dropna()))))
        parts.append(f"λ chosen on {on}, over {count} finished selection run{'s' if runs[-1] != 1 else ''} "
                     "of the chosen λ")
    planned = t.seeds_expected.dropna().unique()
    if len(planned):
        parts.append(f"{planned[0]} seeds planned per row")
    return ("Here: " + "; ".join(parts) + ".") if parts else ""


def selection_table(df: pd.DataFrame) -> pd.DataFrame:
    """`lambda_scores` of every task present, with a `chosen` column marking the
    lambda `select_lambda` picked."""
    frames = []
    for task in TASKS:
        if (df.task == task).any():
            chosen = select_lambda(df, task)[[*GROUP_KEYS, "lam"]].assign(chosen=True)
            scores = lambda_scores(df, task).merge(chosen, on=[*GROUP_KEYS, "lam"], how="left")
            frames.append(scores.assign(task=task, chosen=scores.chosen.eq(True)))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_tables(df: pd.DataFrame, out_dir: str | Path,
                 paper: pd.DataFrame | None = None, include_partial: bool = False,
                 seeds: int | None = None, select_seeds: int | None = None) -> list[Path]:
    """Write `selection.csv` (every lambda's validation score, the chosen one marked),
    `results.csv` (tidy `cell_results` of all tasks), `runs.csv` (the run table `df`: every
    run it holds, its status, changes and, where it failed, its error) and, per table,
    `<T>.md` (text in the paper's layout), `<T>.csv` and `<T>.tex` (`table_numbers`: one
    number per column). `seeds`, `select_seeds`: the seeds planned (`cell_results`).
    Returns the written paths."""
    paper = load_paper_tables() if paper is None else paper
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = all_results(df, paper, include_partial, seeds, select_seeds)
    paths = [out / "selection.csv", out / "results.csv", out / "runs.csv"]
    selection_table(df).to_csv(paths[0], index=False)
    results.to_csv(paths[1], index=False)
    df.sort_values(["task", "run_dir"]).to_csv(paths[2], index=False)
    for table_id in sorted(results.table.unique()) if not results.empty else []:
        table = format_table(results, table_id, paper)
        numbers = table_numbers(results, table_id, paper)
        decimals = max(DECIMALS[task] for task in results[results.table == table_id].task.unique())
        md, tex, csv = (out / f"{table_id}.{ext}" for ext in ("md", "tex", "csv"))
        note = selection_note(results[results.table == table_id])
        md.write_text(f"## {table_id}\n\n{LEGEND}\n\n" + (f"{note}\n\n" if note else "") + to_markdown(table))
        tex.write_text(to_latex(numbers, decimals))
        numbers.to_csv(csv, index=False, float_format="%.6g")
        paths += [md, tex, csv]
    return paths
