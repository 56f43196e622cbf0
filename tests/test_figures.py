"""Figures: each plot writes a PNG and a PDF from small generated data; the 1-D curves
are checked numerically (not pixels)."""
from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, stats

from per.analysis import figures
from per.analysis.collect import runs_frame
from per.analysis.paper import load_paper_tables
from per.schema import EPOCH, TEST_ERROR, TRAIN_LOSS, VAL_ERROR


def assert_written(paths: list[Path], count: int) -> None:
    assert len(paths) == count
    for path in paths:
        head = path.read_bytes()[:8]
        assert head.startswith(b"\x89PNG") if path.suffix == ".png" else head.startswith(b"%PDF")
        assert path.stat().st_size > 1000


# --- analytic 1-D curves ------------------------------------------------------------

X = np.linspace(-6, 6, 1201)


def test_phi_bounds_and_value_at_zero():
    assert figures.phi(np.array(0.0)) == pytest.approx(math.sqrt(2 / math.pi))
    assert np.all(figures.phi(X) >= np.abs(X))
    assert figures.phi(np.array(6.0)) - 6.0 < 1e-8          # phi(x) -> |x|


@pytest.mark.parametrize("x", [-1.7, 0.0, 0.4, 2.5])
def test_phi_is_expected_distance_to_a_standard_normal(x):
    expected, _ = integrate.quad(lambda z: abs(x - z) * stats.norm.pdf(z), -12, 12, points=[x])
    assert figures.phi(np.array(x)) == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize("f, grad", [
    (figures.phi, figures.phi_grad),
    (figures.huber, figures.huber_grad),
    (figures.pseudo_huber, figures.pseudo_huber_grad),
])
def test_gradients_match_finite_differences(f, grad):
    h = 1e-5
    numeric = (f(X + h) - f(X - h)) / (2 * h)
    assert np.allclose(numeric, grad(X), atol=1e-6)


def test_phi_grad_is_erf_and_huber_values():
    assert np.allclose(figures.phi_grad(X), [math.erf(x / math.sqrt(2)) for x in X])
    assert figures.huber(np.array(3.0)) == 2.5 and figures.huber(np.array(0.5)) == 0.125
    assert figures.pseudo_huber(np.array(1.0)) == pytest.approx(math.sqrt(2) - 1)


def test_plot_losses_1d(tmp_path):
    assert_written(figures.plot_losses_1d(tmp_path), 2)


# --- activation figures -------------------------------------------------------------

def activations(scale: float) -> pd.DataFrame:
    """A `load_activations`-shaped frame: 2 sites x 4 units x 6 steps."""
    rows = []
    for step in range(0, 60, 10):
        for site in ("layer3", "layer6"):
            for unit in range(4):
                m = scale * (unit + 1) * (1 + step / 50)
                rows.append({"step": step, "epoch": step / 20, "site": site, "unit": unit,
                             "mean": m, "var": scale * (1 + unit), "q25": m - 1, "q50": m,
                             "q75": m + 1, "sw1": scale / (1 + step)})
    return pd.DataFrame(rows)


ACTS = {"vanilla": activations(3.0), "bn": activations(1.0), "per": activations(0.5)}


def _drawn(monkeypatch) -> list:
    """The figures `figures._save` is handed, kept for their axes."""
    kept, save = [], figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, out, name: kept.append(fig) or save(fig, out, name))
    return kept


def test_plot_activation_evolution(tmp_path, monkeypatch):
    """Rows: quartiles, mean, variance of each site; columns: methods; one line per unit,
    each the monitored series (a test that only checked a file was written passed
    whatever was drawn)."""
    drawn = _drawn(monkeypatch)
    paths = figures.plot_activation_evolution(ACTS, ["layer3", "layer6"], tmp_path)
    assert_written(paths, 2)
    axes = np.array(drawn[0].axes).reshape(6, 3)
    assert [ax.get_title() for ax in axes[0]] == ["vanilla", "bn", "per"]
    for j, method in enumerate(ACTS):
        for i, site in enumerate(["layer3", "layer6"]):
            data = ACTS[method][ACTS[method].site == site]
            for row, stat in ((0, "q50"), (1, "mean"), (2, "var")):
                lines = axes[3 * i + row, j].get_lines()
                assert len(lines) == 4
                for unit, line in enumerate(lines):
                    d = data[data.unit == unit].sort_values("step")
                    assert list(line.get_xdata()) == list(d.step) and list(line.get_ydata()) == list(d[stat])


def test_plot_sw1(tmp_path, monkeypatch):
    drawn = _drawn(monkeypatch)
    assert_written(figures.plot_sw1(ACTS, ["layer3", "layer6"], tmp_path), 2)
    for ax, site in zip(drawn[0].axes, ["layer3", "layer6"]):
        assert ax.get_title() == site and [line.get_label() for line in ax.get_lines()] == list(ACTS)
        for line, acts in zip(ax.get_lines(), ACTS.values()):
            d = acts[acts.site == site].drop_duplicates("step")
            assert list(line.get_ydata()) == list(d.sw1) and line.get_marker() == "None"   # 6 points
    short = {"per (diverged, seed 1)": ACTS["per"][ACTS["per"].step < 20]}   # 2 points: markers
    drawn.clear()
    figures.plot_sw1(short, ["layer3"], tmp_path)
    assert drawn[0].axes[0].get_lines()[0].get_marker() == "o"


def test_activation_figures_name_their_cell(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    titles, suptitle = [], Figure.suptitle
    monkeypatch.setattr(Figure, "suptitle", lambda fig, t, **kw: titles.append(t) or suptitle(fig, t, **kw))
    figures.plot_activation_evolution(ACTS, ["layer3"], tmp_path, title="T2 cifar10 elu_cnn11 elu")
    figures.plot_sw1(ACTS, ["layer3"], tmp_path, title="T2 cifar10 elu_cnn11 elu")
    assert titles == ["T2 cifar10 elu_cnn11 elu"] * 2


# --- sweeps, curves, ablation --------------------------------------------------------

def run(method: str = "vanilla", lam: float = 0.0, seed: int = 0, val_size: int = 0,
        test: float = 7.0, val: float | None = None, layout: str | None = None,
        num_slices: int | None = None, status: str = "finished",
        reduction: str | None = None) -> dict:
    """One row of the run table (T1 CIFAR-10 ResNet-56); a run with a layout has a
    reduction (default sum)."""
    return {"run_dir": f"{method}-{layout}-{num_slices}-{lam}-{seed}-{val_size}", "status": status,
            "task": "cifar", "table": "T1", "dataset": "cifar10", "model": "resnet56",
            "activation": "relu", "method": method, "lam": lam, "seed": seed,
            "val_size": val_size, "layout": layout, "num_slices": num_slices,
            "reduction": reduction or ("sum" if layout else None),
            "final_val_error": val, "final_test_error": test}


def sweep_runs() -> pd.DataFrame:
    rows = [run(seed=s, test=7.2 + 0.1 * s) for s in range(3)]
    rows += [run("bn", seed=s, test=6.9 + 0.1 * s) for s in range(3)]
    for lam, base in [(1e-5, 6.9), (3e-5, 6.6), (1e-4, 6.4), (3e-4, 6.8)]:
        for s in range(2):
            opts = {"method": "per", "lam": lam, "seed": s, "layout": "channels", "num_slices": 256}
            rows.append(run(**opts, val_size=5000, val=base + 0.1 * s, test=base))
            rows.append(run(**opts, test=base + 0.2 + 0.1 * s))
    return runs_frame(rows)


def test_plot_sweep(tmp_path):
    paths = figures.plot_sweep(sweep_runs(), tmp_path, paper=load_paper_tables())
    assert [p.name for p in paths] == ["sweep_T1_cifar10_resnet56_relu.png",
                                       "sweep_T1_cifar10_resnet56_relu.pdf"]
    assert_written(paths, 2)


def test_sweep_paper_lines_carry_their_methods_colour_and_label(tmp_path, monkeypatch):
    from matplotlib.axes import Axes
    lines, axhline = [], Axes.axhline
    monkeypatch.setattr(Axes, "axhline", lambda ax, *a, **kw: lines.append((kw.get("label"), kw.get("color")))
                        or axhline(ax, *a, **kw))
    rows = sweep_runs()
    variant = rows[rows.method == "per"].assign(layout="flatten")          # a second PER row label
    figures.plot_sweep(pd.concat([rows, variant], ignore_index=True), tmp_path, paper=load_paper_tables())
    labels = {label: color for label, color in lines}
    assert {"paper vanilla", "paper bn", "paper per"} <= set(labels)
    assert len({labels["paper vanilla"], labels["paper bn"], labels["paper per"]}) == 3   # one colour each
    assert "0.3" not in labels.values()                                   # none left grey


def test_sweep_marks_a_lambda_whose_selection_run_diverged(tmp_path, monkeypatch):
    from matplotlib.axes import Axes
    marks, plot = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda ax, *a, **kw: marks.append((a, kw.get("label"))) or plot(ax, *a, **kw))
    rows = sweep_runs()
    diverged = (rows.method == "per") & (rows.lam == 3e-4) & (rows.val_size > 0)
    rows.loc[diverged, "status"] = "diverged"
    rows.loc[diverged, "final_val_error"] = np.nan
    figures.plot_sweep(rows, tmp_path, paper=load_paper_tables())
    assert [(args[:3], label) for args, label in marks if label == "diverged"] == [((3e-4, 0.96, "x"), "diverged")]


def test_sweep_draws_off_grid_lambdas_on_the_methods_curve_without_a_star():
    rows = sweep_runs()
    extra = rows[(rows.method == "per") & (rows.lam == 3e-4)].assign(
        lam=3e-3, changes="method.lam=0.003 (not in the grid)")
    extra = extra.assign(final_val_error=extra.final_val_error - 2)      # best, but off the grid
    df = pd.concat([rows, extra], ignore_index=True)
    view, chosen = figures.sweep_view(df, "cifar")
    assert set(view.changes) == {""}                                   # one PER curve
    assert chosen[chosen.method == "per"].lam.tolist() == [1e-4]       # the grid's star only


def test_plot_training_curves(tmp_path):
    runs = sweep_runs()
    rows = [{**r, EPOCH: e, TRAIN_LOSS: 2.0 / e, TEST_ERROR: r["final_test_error"] + 5 / e}
            for r in runs.to_dict("records") for e in range(1, 6)]
    paths = figures.plot_training_curves(pd.DataFrame(rows), tmp_path)
    assert_written(paths, 2)


def test_plot_sweep_of_a_method_without_layout_alone(tmp_path, monkeypatch):
    """Only vanilla runs (no layout, reduction or slices anywhere): the keys come back from
    the groupbys as all-NaN floats, and still join the row labels."""
    from matplotlib.axes import Axes
    lines, axhline = [], Axes.axhline
    monkeypatch.setattr(Axes, "axhline", lambda ax, *a, **kw: lines.append(kw.get("label")) or axhline(ax, *a, **kw))
    frame = runs_frame([run("vanilla", 0.0, s, 0, test=7.0 + s) for s in range(2)])
    assert_written(figures.plot_sweep(frame, tmp_path), 2)
    assert "vanilla (λ=0)" in lines                       # the reported runs' line is drawn


def test_plot_ablation(tmp_path, monkeypatch):
    from matplotlib.axes import Axes
    labels, errorbar = [], Axes.errorbar
    points = {}

    def record(ax, x, *a, **kw):
        labels.append(kw.get("label"))
        points[(ax.get_title(), kw.get("label"))] = len(x)
        return errorbar(ax, x, *a, **kw)
    monkeypatch.setattr(Axes, "errorbar", record)
    rows = []
    for layout, reduction in (("channels", "sum"), ("flatten", "sum"), ("channels", "mean")):
        for lam in (1e-5, 1e-4, 1e-3):
            for s in range(2):
                rows.append(run("per", lam, s, 5000, val=6 + lam * 1e3 + s * 0.1, test=6.5,
                                layout=layout, num_slices=256, reduction=reduction))
    chosen = {16: 1e-3, 64: 1e-4, 1024: 1e-5}           # the reported runs: each count at its own lambda
    for slices in (16, 64, 1024):
        for s in range(2):
            for lam in (1e-5, 1e-4, 1e-3):
                rows.append(run("per", lam, s, 5000, val=6 + 16 / slices, test=6.5,
                                layout="channels", num_slices=slices))
            rows.append(run("per", chosen[slices], s, 0, test=6.4 + 16 / slices, layout="channels",
                            num_slices=slices))
    assert_written(figures.plot_ablation(runs_frame(rows), tmp_path), 2)
    # One line per (layout, reduction) on the left; on the right one per lambda for the
    # selection runs, and one through the reported runs' counts at their chosen lambdas.
    assert {l for l in labels if "," in l} == {"channels, sum", "flatten, sum", "channels, mean"}
    assert {l for l in labels if "," not in l} == {"λ=1e-05", "λ=1e-04", "λ=1e-03", "each at its chosen λ"}
    assert points[("", "λ=1e-04")] == 4                  # selection: 16, 64, 256, 1024 slices
    assert points[("", "each at its chosen λ")] == 3      # reported: 16, 64, 1024 joined
    assert figures.plot_ablation(sweep_runs(), tmp_path / "none") == []
    # Runs whose command line changed the protocol are not pooled with the presets' own.
    labels.clear()
    changed = [{**r, "changes": "optim.epochs=30", "run_dir": r["run_dir"] + "-c", "layout": "flatten",
                "reduction": "mean"} for r in rows]
    assert_written(figures.plot_ablation(runs_frame(rows + changed), tmp_path / "mixed"), 2)
    assert "flatten, mean" not in labels


def _records(frame: pd.DataFrame) -> list[dict]:
    """`activations(...)` as the monitor's `activations.jsonl` rows."""
    return [{"step": int(step), "epoch": float(g.epoch.iloc[0]), "site": site,
             "units": g.unit.tolist(), "sw1": float(g.sw1.iloc[0]),
             **{k: g[k].tolist() for k in ("mean", "var", "q25", "q50", "q75")}}
            for (step, site), g in frame.groupby(["step", "site"])]


def test_an_activation_figure_says_how_an_unfinished_run_ended(tmp_path):
    """Where a cell's only monitored run diverged, its legend says so (its curve stops)."""
    from test_analysis import make_run
    from per.analysis.collect import collect_runs
    run = make_run(tmp_path, method="per", lam=1e-4, seed=1, status="diverged", final={TEST_ERROR: 90.0})
    (run / "activations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(activations(1.0))))
    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "figures.py"))
    drawn = []

    class Figures:
        CELL = figures.CELL

        def plot_activation_evolution(self, acts, sites, out, **kw):
            drawn.append(list(acts))
            return []

        def plot_sw1(self, acts, sites, out, **kw):
            return []
    script["plot_activations"].__globals__["figures"] = Figures()     # run_path returns a copy of them
    df, _ = collect_runs(tmp_path)
    script["plot_activations"](df, tmp_path / "out")
    assert drawn == [["per (diverged, seed 1)"]]


def test_a_run_without_activation_records_gives_way_to_one_with_them(tmp_path):
    """The preferred run (seed 0) left an empty file (a kill during its first snapshot): the
    figure draws the label's next run that has records instead of losing the label."""
    from test_analysis import make_run
    from per.analysis.collect import collect_runs
    empty, full = (make_run(tmp_path, method="per", lam=1e-4, seed=s, final={TEST_ERROR: 7.0}) for s in (0, 1))
    (empty / "activations.jsonl").write_text("")
    (full / "activations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(activations(1.0))))
    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "figures.py"))
    df, _ = collect_runs(tmp_path)
    assert list(script["monitored_runs"](df).run_dir) == [str(full)]


def test_figures_script(tmp_path, capsys, monkeypatch):
    from test_analysis import make_run

    runs = tmp_path / "runs"
    make_run(runs, final={TEST_ERROR: 7.2})
    for lam, val in ((1e-4, 6.1), (3e-5, 6.4)):
        make_run(runs, method="per", lam=lam, val_size=5000,
                 final={VAL_ERROR: val, TEST_ERROR: 6.5})
    monitored = make_run(runs, method="per", lam=1e-4, final={TEST_ERROR: 6.7})
    records = _records(activations(1.0))
    vanilla = runs / "cifar" / "cifar10_resnet56_vanilla_channels" / "lam=0.0,seed=0,val=0"
    for run_dir in (monitored, vanilla):
        (run_dir / "activations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (runs / "broken").mkdir()
    (runs / "broken" / "summary.json").write_text("{")

    script = Path(__file__).resolve().parents[1] / "scripts" / "figures.py"
    main = runpy.run_path(str(script))["main"]
    out_dir = tmp_path / "figures"
    assert main(["--runs", str(runs), "--out", str(out_dir)]) == 0
    cell = "T1_cifar10_resnet56_relu"
    stems = ["losses_1d", f"activations_{cell}", f"sw1_{cell}", f"sweep_{cell}", f"curves_{cell}",
             f"curves_selection_{cell}"]
    expected = {f"{stem}.{ext}" for stem in stems for ext in ("png", "pdf")}
    assert {p.name for p in out_dir.iterdir()} == expected | {"written.txt"}
    assert (out_dir / "written.txt").read_text().splitlines() == [f"source: {runs}", *sorted(expected)]
    out, err = capsys.readouterr()
    assert "skipped the PER ablation" in out and "broken: skipped" in err
    # Empty activation files (a kill during the first snapshot): the cell is skipped, said so,
    # and the other figures are drawn (the empty cell crashed the script). Without the
    # records, a second call removes the figures it no longer draws; a file the script
    # never wrote stays.
    for run_dir in (monitored, vanilla):
        (run_dir / "activations.jsonl").write_text("")
    (out_dir / "mine.png").write_bytes(b"")
    assert main(["--runs", str(runs), "--out", str(out_dir)]) == 0
    gone = {f"{kind}_{cell}.{ext}" for kind in ("activations", "sw1") for ext in ("png", "pdf")}
    assert {p.name for p in out_dir.iterdir()} == (expected - gone) | {"written.txt", "mine.png"}
    out = capsys.readouterr().out
    assert "[figures] skipped activation figures: no run has activation records" in out
    assert "[figures] removed 4 files an earlier call wrote and this one did not: " in out
    # A mistyped --runs (no runs: only the 1-D loss figure), and a W&B project (fewer kinds
    # of figures) into the same folder remove nothing.
    kept = {p.name for p in out_dir.iterdir()}
    assert main(["--runs", str(tmp_path / "runz"), "--out", str(out_dir)]) == 0
    assert {p.name for p in out_dir.iterdir()} == kept and "removed" not in capsys.readouterr().out
    # ... and a later call on the runs again still removes what it no longer draws.
    (out_dir / "sweep_x.png").write_bytes(b"")
    listed = (out_dir / "written.txt").read_text()
    (out_dir / "written.txt").write_text(f"source: {runs}\n" + listed.split("\n", 1)[1] + "sweep_x.png\n")
    assert main(["--runs", str(runs), "--out", str(out_dir)]) == 0
    assert not (out_dir / "sweep_x.png").exists() and (out_dir / "mine.png").exists()
    # From a W&B project (the same table, run_dir "wandb:..."): the sweep, no file-based figures.
    from per.analysis import collect, wandb_source
    df, _ = collect.collect_runs(runs)
    asked = []
    monkeypatch.setattr(wandb_source, "collect_wandb", lambda project, entity, protocols:
                        asked.append((project, entity, protocols is not None))
                        or (df.assign(run_dir="wandb:ent/proj/" + df.index.astype(str)), []))
    main = runpy.run_path(str(script))["main"]
    assert main(["--wandb-project", "proj", "--wandb-entity", "ent", "--out", str(out_dir)]) == 0
    assert (out_dir / f"curves_{cell}.png").exists()               # drawn from the run folders: kept
    assert main(["--wandb-project", "proj", "--wandb-entity", "ent", "--out", str(tmp_path / "wb")]) == 0
    assert asked == [("proj", "ent", True)] * 2
    stems = ["losses_1d", f"sweep_{cell}"]
    assert {p.name for p in (tmp_path / "wb").iterdir()} == {f"{s}.{e}" for s in stems for e in ("png", "pdf")} | {
        "written.txt"}
    assert "from W&B: the sweeps and the ablation" in capsys.readouterr().out
    assert main(["--runs", str(tmp_path / "none"), "--out", str(tmp_path / "only1d")]) == 0
    assert {p.name for p in (tmp_path / "only1d").iterdir()} == {"losses_1d.png", "losses_1d.pdf", "written.txt"}


def test_a_point_of_one_run_gets_no_error_bar_rather_than_a_zero_one():
    """A lambda with one selection run has no std: no bar, not a zero-width one that reads
    as exact."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    frame = pd.DataFrame({"label": "per", "lam": [1e-4, 1e-3], "m": [5.0, 6.0], "s": [0.5, math.nan]})
    figures._lambda_panel(ax, frame, "m", "s", {"per": "C0"})
    (bars,) = ax.containers[0].lines[2]
    segments = bars.get_segments()
    assert np.allclose(segments[0][:, 1], [4.5, 5.5])
    assert segments[1].size == 0 or np.isnan(segments[1]).any()      # nothing drawn
    plt.close(fig)


def test_training_curves_average_only_the_runs_the_table_averages(tmp_path, monkeypatch):
    """A diverged and a killed run at the chosen lambda are counted in the table's row,
    not averaged: the curves leave them out too, so their last point is the row's mean."""
    from test_analysis import image, make_run
    runs = tmp_path / "runs"
    for lam, val in ((1e-4, 5.9), (3e-5, 6.1)):
        make_run(runs, method="per", lam=lam, val_size=5000, final=image(val, 6.0))
    make_run(runs, method="per", lam=1e-4, val_size=5000, seed=1, status="interrupted", final=image(None, None),
             earlier_test=90.0)
    for seed, test, status in ((0, 6.6, "finished"), (1, 6.8, "finished"), (2, None, "diverged"),
                               (3, 50.0, "interrupted")):
        make_run(runs, method="per", lam=1e-4, seed=seed, status=status, final=image(None, test), earlier_test=60.0)
    drawn = {}
    monkeypatch.setattr(figures, "plot_training_curves",
                        lambda metrics, out, name: drawn.setdefault(name, metrics) is None or [])
    script = Path(__file__).resolve().parents[1] / "scripts" / "figures.py"
    from per.analysis import collect
    runpy.run_path(str(script))["plot_curves"](collect.collect_runs(runs)[0], tmp_path / "figures")
    last = drawn["curves"][drawn["curves"].epoch == drawn["curves"].epoch.max()]
    assert sorted(last.seed) == [0, 1] and last[TEST_ERROR].mean() == pytest.approx(6.7)
    assert sorted(drawn["curves_selection"].status.unique()) == ["finished"]
