"""Run records -> figures (PNG and PDF): every figure the available runs support.

Always the 1-D loss figure; per cell, activation statistics and sliced W1 over training
(one monitored run per method: at the chosen lambda, finished, reported, lowest seed),
lambda sweeps and training curves at the chosen lambdas; the PER layout / slices
ablation when such runs exist. What cannot be drawn is named and skipped. From a W&B
project (`--wandb-project`), the sweeps and the ablation (the activation statistics and
training curves read the run folders' files). Files an earlier call on the same runs wrote
that this one does not (a cell whose runs are gone) are removed; `written.txt` records the source and
the files drawn.

    python scripts/figures.py --runs results/runs --out results/figures
    python scripts/figures.py --wandb-project per-repro --wandb-entity me
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from experiments.common import add_run_source_arguments, check_report_folder, preset_protocol, suite_paths
from per.analysis import figures
from per.analysis.collect import load_activations, load_run_metrics
from per.analysis.tables import at_chosen_lambda, method_sort_key, report_runs, row_labels, selection_runs
from per.analysis.wandb_source import WandbSourceError, collect_source
from per.schema import FINISHED
from per.training.records import ACTIVATIONS_FILE, read_jsonl


def monitored_runs(df: pd.DataFrame) -> pd.DataFrame:
    """One run with activation records per cell and row label, preferring the chosen
    lambda, finished runs, reported runs and low seeds (a file without records, left by a
    kill during the first snapshot, does not count)."""
    runs = df[[bool(read_jsonl(Path(d) / ACTIVATIONS_FILE)) for d in df.run_dir]]
    chosen = at_chosen_lambda(df, lambda d, task: d[d.task == task])[["run_dir"]]
    runs = runs.assign(label=row_labels(runs),
                       other_lam=~runs.run_dir.isin(chosen.run_dir),
                       unfinished=runs.status != FINISHED, held_out=runs.val_size > 0)
    return (runs.sort_values(["other_lam", "unfinished", "held_out", "seed"])
            .drop_duplicates([*figures.CELL, "label"]))


def plot_activations(df: pd.DataFrame, out: Path) -> list[Path]:
    runs = monitored_runs(df)
    if runs.empty:
        print("[figures] skipped activation figures: no run has activation records (activations.jsonl)")
        return []
    paths = []
    for key, cell in runs.groupby(figures.CELL):
        cell = cell.sort_values("label", key=lambda s: s.map(method_sort_key))
        # A run drawn other than finished says how it ended (a diverged run's curve stops).
        labels = [label if status == FINISHED else f"{label} ({status}, seed {seed})"
                  for label, status, seed in zip(cell.label, cell.status, cell.seed)]
        acts = {label: load_activations(d) for label, d in zip(labels, cell.run_dir)}
        sites = list(pd.concat(acts.values()).site.unique())
        name = "_".join(key)
        title = " ".join(key)
        paths += figures.plot_activation_evolution(acts, sites, out, name=f"activations_{name}", title=title)
        paths += figures.plot_sw1(acts, sites, out, name=f"sw1_{name}", title=title)
    return paths


def plot_curves(df: pd.DataFrame, out: Path) -> list[Path]:
    """Training curves at the chosen lambdas: reported runs, and for images also the
    selection runs (the only ones with a validation error); finished runs only, as the
    tables average (a diverged or killed run's epochs would pull the mean curve)."""
    paths = []
    sources = [("curves", report_runs), ("curves_selection", selection_runs)]
    for name, runs_of in sources:
        runs = at_chosen_lambda(df, runs_of)
        runs = runs[runs.status == FINISHED]
        if name == "curves_selection":
            runs = runs[runs.task == "cifar"]
        metrics = load_run_metrics(runs)
        if metrics.empty:
            print(f"[figures] skipped {name}: no finished run with metrics at the chosen lambdas")
            continue
        paths += figures.plot_training_curves(metrics, out, name=name)
    return paths


WRITTEN = "written.txt"   # in the figures folder: `source: <runs>`, then the files drawn (`remove_stale`)


def remove_stale(out: Path, paths: list[Path], source: str, drew_runs: bool) -> list[str]:
    """Remove the files the previous call listed in `out/WRITTEN` that this call did not
    write (a cell whose runs are gone), where both calls drew runs of the same `source`
    (so a mistyped `--runs`, or a W&B project, which draws fewer kinds, removes nothing);
    then list this call's files there (and, where nothing was removed, the earlier ones
    that are still there). Files this script never wrote stay. Returns the removed names."""
    listing = out / WRITTEN
    lines = listing.read_text().splitlines() if listing.is_file() else []
    earlier_source = lines[0].removeprefix("source: ") if lines[:1] and lines[0].startswith("source: ") else None
    earlier = {name for name in lines[1:] if name and "/" not in name}
    now = {p.name for p in paths}
    stale = sorted(earlier - now) if drew_runs and earlier_source == source else []
    for name in stale:
        (out / name).unlink(missing_ok=True)
    kept = {name for name in earlier - now if (out / name).is_file()}
    out.mkdir(parents=True, exist_ok=True)
    listing.write_text(f"source: {source}\n" + "".join(f"{name}\n" for name in sorted(now | kept)))
    return stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_source_arguments(ap)
    ap.add_argument("--out", default=suite_paths()["figures_dir"], help="folder for the figures (paths.figures_dir)")
    args = ap.parse_args(argv)
    check_report_folder(None if args.wandb_project else args.runs, args.out, "figures_dir")
    out = Path(args.out)

    paths = figures.plot_losses_1d(out)
    try:
        df, problems, source = collect_source(args.runs, args.wandb_project, args.wandb_entity,
                                              protocols=preset_protocol)
    except FileNotFoundError as e:     # only the 1-D loss figure, below
        df, problems, source = pd.DataFrame(), [str(e)], args.runs
    except WandbSourceError as e:
        raise SystemExit(f"[figures] {e}") from None
    for problem in problems:
        print(f"[figures] {problem}", file=sys.stderr)
    if df.empty:
        print(f"[figures] no runs in {source}: only the 1-D loss figure")
    else:
        if args.wandb_project:
            print("[figures] from W&B: the sweeps and the ablation; the activation statistics and "
                  "training curves need the run folders (--runs)")
        else:
            paths += plot_activations(df, out)
        paths += figures.plot_sweep(df, out)
        if not args.wandb_project:
            paths += plot_curves(df, out)
        ablation = figures.plot_ablation(df, out)
        if not ablation:
            print("[figures] skipped the PER ablation: no cifar10 resnet56 PER runs "
                  "that vary the layout or the number of slices")
        paths += ablation
    origin = str(source) if args.wandb_project else str(Path(args.runs).resolve())
    if stale := remove_stale(out, paths, origin, not df.empty):
        print(f"[figures] removed {len(stale)} files an earlier call wrote and this one did not: "
              + ", ".join(stale))
    print(f"wrote {len(paths)} files to {out} (listed in {WRITTEN})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
