"""Run records -> the paper's tables beside the published numbers.

Collects the runs (local run directories, or a W&B project), chooses lambda per cell
on validation only, and writes Markdown, LaTeX and CSV tables plus `selection.csv`
(every lambda's validation score), `results.csv` (tidy numbers) and `runs.csv` (every
counted run; failed runs' errors are also printed, one line per error). Unreadable runs
are listed and skipped; the exit status is 0 as long as the tables were written.
Runs shorter than their protocol (smoke runs, `trainer.max_steps`, fewer epochs) are
marked partial and not compared with the paper unless `--include-partial` is given.

    python scripts/aggregate.py --runs results/runs --out results/tables
    python scripts/aggregate.py --wandb-project per-repro --wandb-entity me --task lm
"""
from __future__ import annotations

import argparse
import sys

from experiments.common import add_run_source_arguments, check_report_folder, preset_protocol, suite_paths
from per.analysis.tables import write_tables
from per.sweep import DEFAULT_SEEDS, DEFAULT_SELECT_SEEDS
from per.schema import FAILED, TASKS
from per.analysis.wandb_source import WandbSourceError, collect_source


def _count(value: str) -> int:
    if not value.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_source_arguments(ap)
    ap.add_argument("--out", default=suite_paths()["tables_dir"], help="folder for the tables (paths.tables_dir)")
    ap.add_argument("--task", choices=[*TASKS, "all"], default="all")
    ap.add_argument("--seeds", type=_count, default=DEFAULT_SEEDS,
                    help="seeds planned per reported row: rows with results from fewer are marked, not compared "
                         "(0: no expectation)")
    ap.add_argument("--select-seeds", type=_count, default=DEFAULT_SELECT_SEEDS,
                    help="seeds planned per lambda of an image cell's selection (0: no expectation)")
    ap.add_argument("--include-partial", action="store_true",
                    help="treat runs shorter than their protocol as complete (compare them with the paper)")
    args = ap.parse_args(argv)
    check_report_folder(None if args.wandb_project else args.runs, args.out, "tables_dir")

    try:
        df, problems, source = collect_source(args.runs, args.wandb_project, args.wandb_entity,
                                              protocols=preset_protocol)
    except (FileNotFoundError, WandbSourceError) as e:
        raise SystemExit(f"[aggregate] {e}") from None
    if args.task != "all":
        df = df[df.task == args.task]
    print(f"{len(df)} runs from {source}")
    for problem in problems:
        print(f"[aggregate] {problem}", file=sys.stderr)
    if df.empty:
        print("no runs to aggregate", file=sys.stderr)
        return 0
    for error, failed in df[df.status == FAILED].groupby(df.error.fillna("(no error recorded)")):
        print(f"[aggregate] {len(failed)} failed run{'s' if len(failed) > 1 else ''} ({failed.run_dir.iloc[0]}"
              f"{', ...' if len(failed) > 1 else ''}): {error}", file=sys.stderr)
    if df.partial.any():
        treatment = ("treated as complete (--include-partial)" if args.include_partial else
                     "averaged only where a row has no complete run, and not compared with the paper")
        print(f"[aggregate] {int(df.partial.sum())} runs shorter than their protocol: {treatment}",
              file=sys.stderr)
    paths = write_tables(df, args.out, include_partial=args.include_partial, seeds=args.seeds or None,
                         select_seeds=args.select_seeds or None)
    for path in paths:
        if path.suffix == ".md":
            print(f"\n{path.read_text()}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
