"""The paper's figures and the suite's diagnostics, as PNG and PDF.

Each `plot_*` function takes data frames (from `per.analysis.collect`) and an output
folder, and returns the written paths. Figures are drawn on `matplotlib.figure.Figure`
objects (Agg canvas), never through pyplot's global state.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

import per
from per.analysis import tables
from per.analysis.collect import is_off_grid, without_off_grid
from per.analysis.paper import load_paper_tables
from per.schema import (CHANGES, EPOCH, FINISHED, HEADLINE_METRICS, PAPER_SPLIT, REPORT_METRIC,
                        SELECTION_METRIC, SETTING_KEYS, TASKS, TEST, VAL)

CELL = list(SETTING_KEYS)   # one figure per setting: the methods of a cell side by side
FORMATS = ("png", "pdf")


# --- 1-D losses (the paper's Figure 1) --------------------------------------------

def phi(x: np.ndarray) -> np.ndarray:
    """PER's 1-D loss, phi(x) = E|x - Z| for Z ~ N(0, 1) (`per.phi` in float64)."""
    return per.phi(torch.as_tensor(x, dtype=torch.float64)).numpy()


def phi_grad(x: np.ndarray) -> np.ndarray:
    """phi'(x) = erf(x / sqrt 2), the gradient `per.phi` backpropagates."""
    t = torch.as_tensor(x, dtype=torch.float64).requires_grad_()
    per.phi(t).sum().backward()
    return t.grad.numpy()


def huber(x: np.ndarray, delta: float = 1.0) -> np.ndarray:
    """x^2/2 for |x| <= delta, delta (|x| - delta/2) beyond."""
    return np.where(np.abs(x) <= delta, x ** 2 / 2, delta * (np.abs(x) - delta / 2))


def huber_grad(x: np.ndarray, delta: float = 1.0) -> np.ndarray:
    return np.clip(x, -delta, delta)


def pseudo_huber(x: np.ndarray, delta: float = 1.0) -> np.ndarray:
    """delta^2 (sqrt(1 + (x/delta)^2) - 1)."""
    return delta ** 2 * (np.sqrt(1 + (x / delta) ** 2) - 1)


def pseudo_huber_grad(x: np.ndarray, delta: float = 1.0) -> np.ndarray:
    return x / np.sqrt(1 + (x / delta) ** 2)


def _save(fig: Figure, out_dir: str | Path, name: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.{ext}" for ext in FORMATS]
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths


def plot_losses_1d(out_dir: str | Path, name: str = "losses_1d") -> list[Path]:
    """PER's phi against Huber and Pseudo-Huber (delta = 1) and their gradients in 1-D."""
    x = np.linspace(-4, 4, 801)
    curves = [("PER $\\phi$", phi, phi_grad), ("Huber", huber, huber_grad),
              ("Pseudo-Huber", pseudo_huber, pseudo_huber_grad)]
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    loss_ax, grad_ax = fig.subplots(1, 2)
    for label, f, grad in curves:
        loss_ax.plot(x, f(x), label=label)
        grad_ax.plot(x, grad(x), label=label)
    loss_ax.plot(x, np.abs(x), "k:", lw=1, label="$|x|$")
    grad_ax.plot(x, np.sign(x), "k:", lw=1, label="sign$(x)$")
    loss_ax.set(title="loss", xlabel="$x$", ylabel="value")
    grad_ax.set(title="gradient", xlabel="$x$", ylabel="derivative")
    for ax in (loss_ax, grad_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, out_dir, name)


# --- activation monitoring (the paper's Figures 3-4) --------------------------------

def plot_activation_evolution(acts_by_method: dict[str, pd.DataFrame], sites: list[str],
                              out_dir: str | Path, units: int = 4,
                              name: str = "activation_evolution", title: str = "") -> list[Path]:
    """Per site (row groups: quartiles, mean, variance) and method (columns), the
    first `units` monitored units over training steps (the monitor records 4); `acts_by_method`
    maps a method label to its `collect.load_activations` frame; `title` names the cell."""
    methods = list(acts_by_method)
    stats = ["quartiles", "mean", "variance"]
    fig = Figure(figsize=(3.8 * len(methods), 1.9 * len(stats) * len(sites)), layout="constrained")
    axes = fig.subplots(len(stats) * len(sites), len(methods), sharex=True, sharey="row",
                        squeeze=False)
    colors = [f"C{i}" for i in range(units)]
    for j, method in enumerate(methods):
        acts = acts_by_method[method]
        for i, site in enumerate(sites):
            q_ax, mean_ax, var_ax = axes[3 * i:3 * i + 3, j]
            data = acts[acts.site == site]
            for color, unit in zip(colors, sorted(data.unit.unique())[:units]):
                d = data[data.unit == unit].sort_values("step")
                q_ax.fill_between(d.step, d.q25, d.q75, color=color, alpha=0.25, lw=0)
                q_ax.plot(d.step, d.q50, color=color, label=f"unit {unit}")
                mean_ax.plot(d.step, d["mean"], color=color)
                var_ax.plot(d.step, d["var"], color=color)
            if (data["var"] > 0).any():
                var_ax.set_yscale("log")
            for ax, stat in zip((q_ax, mean_ax, var_ax), stats):
                ax.grid(alpha=0.3)
                if j == 0:
                    ax.set_ylabel(f"{site}\n{stat}")
        axes[0, j].set_title(method)
        axes[-1, j].set_xlabel("training step")
    axes[0, 0].legend(title="median, 25-75%", fontsize="small")
    if title:
        fig.suptitle(title)
    return _save(fig, out_dir, name)


def plot_sw1(acts_by_method: dict[str, pd.DataFrame], sites: list[str],
             out_dir: str | Path, name: str = "sw1", title: str = "") -> list[Path]:
    """Sliced W1 of each site's activations to N(0, I) over training, one line per method;
    `title` names the cell."""
    fig = Figure(figsize=(4 * len(sites), 3.4), layout="constrained")
    axes = fig.subplots(1, len(sites), squeeze=False)[0]
    for ax, site in zip(axes, sites):
        for method, acts in acts_by_method.items():
            d = acts[acts.site == site].drop_duplicates("step").sort_values("step")
            # markers where a series has few points (a run that diverged early): a line alone
            # would draw nothing for a single finite point
            ax.plot(d.step, d.sw1, label=method, marker="o" if d.sw1.notna().sum() < 5 else None)
        ax.set(title=site, xlabel="training step", ylabel="sliced $W_1$ to $N(0, I)$",
               yscale="log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    return _save(fig, out_dir, name)


# --- sweeps, curves, ablations -----------------------------------------------------

def _cell_name(key: tuple) -> str:
    return "_".join(str(k) for k in key)


def _in_cell(frame: pd.DataFrame, key: tuple) -> pd.DataFrame:
    """The rows of `frame` that belong to the cell `key` (values of `CELL`)."""
    return frame.merge(pd.DataFrame([dict(zip(CELL, key))]), on=CELL)


def _join(frame: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """`frame` joined with `other` on their shared columns, compared as objects: a key that
    no run of a method fills, such as vanilla's `layout`, may come back from a groupby as an
    all-NaN float column on one side and None on the other."""
    keys = [c for c in other.columns if c in frame.columns]
    as_object = {k: object for k in keys if k != "lam"}
    return frame.astype(as_object).merge(other.astype(as_object), on=keys)


def _lambda_panel(ax, frame: pd.DataFrame, mean: str, std: str, colors: dict[str, str],
                  chosen: pd.DataFrame | None = None) -> None:
    """Mean +- std against lambda for each `label` of `frame` (in the order of
    `colors`); rows at lambda = 0 as dashed horizontal lines; chosen lambdas starred."""
    for label, color in colors.items():
        d = frame[frame.label == label]
        swept, flat = d[d.lam > 0].sort_values("lam"), d[d.lam == 0]
        if len(swept):
            ax.errorbar(swept.lam, swept[mean], yerr=swept[std], color=color,
                        marker="o", capsize=3, label=label)
        for value in flat[mean]:
            ax.axhline(value, color=color, ls="--", label=f"{label} (λ=0)")
        if chosen is not None:
            picked = _join(swept, chosen)
            ax.plot(picked.lam, picked[mean], "*", color=color, ms=14, mec="k")


def sweep_view(df: pd.DataFrame, task: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, chosen): the runs with their off-grid marks dropped, so a method's lambdas in
    and beyond its grid draw as one curve, and the chosen lambda of each group (the grid's
    choice only: an off-grid lambda, its own table row, gets no star)."""
    chosen = tables.select_lambda(df, task)
    chosen = chosen[~is_off_grid(chosen[CHANGES])]
    return df.assign(**{CHANGES: df[CHANGES].map(without_off_grid)}), chosen[[*tables.GROUP_KEYS, "lam"]]


def plot_sweep(df: pd.DataFrame, out_dir: str | Path,
               paper: pd.DataFrame | None = None, name: str = "sweep") -> list[Path]:
    """Per cell, the selection metric (left; star = chosen lambda, x = a lambda with a
    diverged selection run) and the reported metric (right; dotted = the paper's value)
    against lambda, mean +- std over seeds."""
    paper = load_paper_tables() if paper is None else paper
    paths = []
    for task in TASKS:
        if not (df.task == task).any():
            continue
        view, chosen = sweep_view(df, task)
        all_scores = tables.lambda_scores(view, task)
        scores = all_scores.dropna(subset=["score"])
        reports = tables.lambda_reports(view, task)
        for key, cell in view[view.task == task].groupby(CELL):
            labels = cell[tables.GROUP_KEYS].drop_duplicates()
            labels["label"] = tables.row_labels(labels)
            labels = labels.sort_values("label", key=lambda s: s.map(tables.method_sort_key))
            colors = {label: f"C{i % 10}" for i, label in enumerate(labels.label)}
            method_colors: dict[str, str] = {}    # a method's colour: that of its first row label
            for method, label in zip(labels.method, labels.label):
                method_colors.setdefault(method, colors[label])
            fig = Figure(figsize=(11, 4), layout="constrained")
            sel_ax, rep_ax = fig.subplots(1, 2)
            _lambda_panel(sel_ax, _join(_in_cell(scores, key), labels), "score", "score_std",
                          colors, chosen)
            _lambda_panel(rep_ax, _join(_in_cell(reports, key), labels), "mean", "std", colors)
            # A lambda with a diverged selection run ranks last: an x at the panel's top.
            diverged = _join(_in_cell(all_scores[(all_scores.n_diverged > 0) & (all_scores.lam > 0)], key),
                             labels)
            for i, (label, lam) in enumerate(zip(diverged.label, diverged.lam)):
                sel_ax.plot(lam, 0.96, "x", color=colors[label], ms=9, mew=2,
                            transform=sel_ax.get_xaxis_transform(), label="diverged" if i == 0 else None)
            # The paper's values, dotted in each method's colour: test beside the reported
            # metric, and (language models) validation beside the selection metric.
            for ax, split in ((rep_ax, TEST), *(((sel_ax, VAL),) if task == "lm" else ())):
                published = _in_cell(paper[paper.split == PAPER_SPLIT[split]], key)
                for method, value in zip(published.method, published.value):
                    if method in set(cell.method):
                        ax.axhline(value, color=method_colors.get(method, "0.3"), ls=":", lw=1.2,
                                   label=f"paper {method}")
            selection = tables.metric_label(SELECTION_METRIC[task])
            report = tables.metric_label(REPORT_METRIC[task])
            sel_ax.set(title=f"selection: {selection}", ylabel=selection)
            rep_ax.set(title=f"reported: {report}", ylabel=report)
            for ax in (sel_ax, rep_ax):
                ax.set_xlabel("λ")
                if (cell.lam > 0).any():
                    ax.set_xscale("log")
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize="small")
                else:
                    ax.text(0.5, 0.5, "no finished runs", ha="center", transform=ax.transAxes)
                ax.grid(alpha=0.3)
            fig.suptitle(" ".join(key))
            paths += _save(fig, out_dir, f"{name}_{_cell_name(key)}")
    return paths


def plot_training_curves(metrics_by_run: pd.DataFrame, out_dir: str | Path,
                         name: str = "curves") -> list[Path]:
    """Per cell, each logged metric over epochs, one line per (method, lambda), the
    mean over the runs given (`collect.load_run_metrics` of the runs to show)."""
    paths = []
    for key, cell in metrics_by_run.groupby(CELL):
        metrics = [m for m in HEADLINE_METRICS if m in cell and cell[m].notna().any()]
        if not metrics:
            continue
        cell = cell.assign(label=tables.row_labels(cell) + cell.lam.map(
            lambda lam: f" λ={lam:.0e}" if lam > 0 else ""))
        cell = cell.sort_values("label", key=lambda s: s.map(tables.method_sort_key), kind="stable")
        fig = Figure(figsize=(4 * len(metrics), 3.4), layout="constrained")
        axes = fig.subplots(1, len(metrics), squeeze=False)[0]
        for ax, metric in zip(axes, metrics):
            curves = cell.groupby(["label", EPOCH], sort=False)[metric].mean().dropna()
            for label, curve in curves.groupby(level="label", sort=False):
                ax.plot(curve.index.get_level_values(EPOCH), curve.to_numpy(), label=label,
                        marker="o" if len(curve) == 1 else None)
            ylabel = tables.metric_label(metric)
            ax.set(title=ylabel, xlabel="epoch", ylabel=ylabel)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize="small")
        fig.suptitle(" ".join(key))
        paths += _save(fig, out_dir, f"{name}_{_cell_name(key)}")
    return paths


def _most_varied(runs: pd.DataFrame, fixed: str, varied: str):
    """The value of `fixed` at which `varied` takes the most distinct values."""
    return runs.groupby(fixed)[varied].nunique().idxmax()


def plot_ablation(df: pd.DataFrame, out_dir: str | Path,
                  dataset: str = "cifar10", model: str = "resnet56",
                  name: str = "ablation_per") -> list[Path]:
    """PER's point layout, reduction and number of slices on one image cell, mean +- std
    over seeds.

    Left: error against lambda, one line per (layout, reduction), at the number of slices
    where the most of those were run. Right: error against the number of slices, one
    line per lambda, at the (layout, reduction) where the most slice counts were run; where
    each count has runs at one lambda only, its own (the reported runs, at each count's
    chosen lambda), one line through them, each point labelled with its lambda.
    One row per metric: validation error of the selection runs, test error of the
    reported runs. Only runs of one protocol are drawn: the presets' own, else the most
    common `changes` (named in the title). Returns [] (nothing written) when the runs vary
    no option.
    """
    runs = df[(df.task == "cifar") & (df.dataset == dataset) & (df.model == model)
              & (df.method == "per") & (df.status == FINISHED)]
    # One protocol: the presets' own runs where there are any, else the most common changes.
    protocol = "" if runs[CHANGES].eq("").any() or runs.empty else runs[CHANGES].mode().iloc[0]
    runs = runs[runs[CHANGES] == protocol]
    runs = runs.assign(variant=runs.layout + ", " + runs.reduction)
    if runs.variant.nunique() < 2 and runs.num_slices.nunique() < 2:
        return []
    sources = [(SELECTION_METRIC["cifar"], tables.selection_runs(runs, "cifar")),
               (REPORT_METRIC["cifar"], tables.report_runs(runs, "cifar"))]
    sources = [(m, tables.drop_partial_beside_complete(r, [*tables.GROUP_KEYS, "lam"])) for m, r in sources]
    sources = [(m, r) for m, r in sources if r[tables.metric_column("cifar", m)].notna().any()]
    if not sources:
        return []
    fig = Figure(figsize=(10, 3.8 * len(sources)), layout="constrained")
    axes = fig.subplots(len(sources), 2, squeeze=False)
    for (metric, r), (layout_ax, slices_ax) in zip(sources, axes):
        column = tables.metric_column("cifar", metric)
        slices = _most_varied(r, "num_slices", "variant")
        by_variant = (r[r.num_slices == slices].groupby(["variant", "lam"])[column]
                      .agg(["mean", "std"]).reset_index())
        for variant, d in by_variant.groupby("variant"):
            layout_ax.errorbar(d.lam, d["mean"], yerr=d["std"], marker="o",
                               capsize=3, label=variant)
        variant = _most_varied(r, "variant", "num_slices")
        by_slices = (r[r.variant == variant].groupby(["lam", "num_slices"])[column]
                     .agg(["mean", "std"]).reset_index())
        if by_slices.lam.nunique() > 1 and by_slices.groupby("num_slices").lam.nunique().max() == 1:
            # Reported runs: each slice count at its own chosen lambda, one line through them.
            d = by_slices.sort_values("num_slices")
            slices_ax.errorbar(d.num_slices.astype(float), d["mean"], yerr=d["std"],
                               marker="o", capsize=3, label="each at its chosen λ")
            for x, y, lam in zip(d.num_slices.astype(float), d["mean"], d.lam):
                slices_ax.annotate(f"λ={lam:.0e}", (x, y), textcoords="offset points", xytext=(0, 7),
                                   ha="center", fontsize="x-small")
        else:
            for lam, d in by_slices.groupby("lam"):
                slices_ax.errorbar(d.num_slices.astype(float), d["mean"], yerr=d["std"],
                                   marker="o", capsize=3, label=f"λ={lam:.0e}")
        ticks = sorted(by_slices.num_slices.unique())
        layout_ax.set(title=f"layout, reduction (s={slices})", xscale="log", xlabel="λ",
                      ylabel=tables.metric_label(metric))
        slices_ax.set_xscale("log", base=2)
        slices_ax.set_xticks(ticks, labels=[str(t) for t in ticks])
        slices_ax.set(title=f"number of slices ({variant})", xlabel="slices",
                      ylabel=tables.metric_label(metric))
        for ax, varied in ((layout_ax, by_variant.variant), (slices_ax, by_slices.num_slices)):
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
            if varied.nunique() < 2:
                ax.text(0.5, 0.9, "not varied in these runs", ha="center", transform=ax.transAxes)
    fig.suptitle(f"PER ablation: {dataset} {model}" + (f" {{changed: {protocol}}}" if protocol else ""))
    return _save(fig, out_dir, name)
