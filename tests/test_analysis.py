"""Run collection, honest lambda selection and tables, on generated run directories."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from per.analysis import collect, paper as paper_mod, tables
from per.analysis.wandb_source import collect_wandb
from per.schema import (EPOCH, LR, PENALTY, STEP, TEST_ERROR, TEST_PPL, TRAIN_LOSS, VAL_ERROR,
                        VAL_PPL, make_cell)
from runner_utils import ROOT, SHARED_DATA, compose_config

SHARED_PAPER_CSV = SHARED_DATA.parent / "paper" / "paper_tables.csv"   # the one copy, where present


def make_run(root: Path, *, task: str = "cifar", dataset: str = "cifar10",
             model: str = "resnet56", method: str = "vanilla", norm: str = "none",
             activation: str | None = None,
             lam: float = 0.0, seed: int = 0, val_size: int = 0, status: str = "finished",
             final: dict | None = None, best: dict | None = None, layout: str = "channels",
             num_slices: int = 256, reduction: str = "sum", epochs: int = 2,
             preset: str | None = None,
             protocol_epochs: int | None = None, max_steps: int | None = None,
             earlier_test: float | None = None, changes: list[str] | None = None,
             lam_grid: list[float] | None = None) -> Path:
    """A run directory as the runners write it: config.yaml, summary.json, metrics.jsonl.

    `protocol_epochs` (default `epochs`) is the protocol's length (`optim.epochs`);
    `earlier_test` is the test error of every epoch before the last; `changes` the
    config's `protocol_changes`; `lam_grid` its `method.lam_grid`."""
    cell = make_cell(dataset, model, method, norm, activation)
    name = preset or f"{dataset}_{model}_{cell['method']}_{layout}"
    run_dir = root / task / name / f"lam={lam},seed={seed},val={val_size}" / "-".join(changes or [])
    run_dir.mkdir(parents=True)
    data = {"name": dataset, "val_size": val_size} if task == "cifar" else {"name": dataset}
    config = {"task": task, "seed": seed, "preset": preset, "data": data,
              "model": {"name": model, "norm": norm, "activation": cell["activation"]},
              "method": {"name": method, "lam": lam, "layout": layout, "reduction": reduction,
                         "num_slices": num_slices},
              "trainer": {"epochs": epochs, "max_steps": max_steps},
              "optim": {"epochs": protocol_epochs or epochs, "total_steps": None}}
    if changes is not None:
        config["protocol_changes"] = changes
    if lam_grid is not None:
        config["method"]["lam_grid"] = lam_grid
    final = final or {}
    summary = {"status": status, "task": task, "cell": cell, "lam": lam, "seed": seed,
               "epochs_completed": epochs, "steps": 10 * epochs, "wall_time_s": 1.5,
               "device": "cpu", "code_version": "abc", "versions": {"torch": "2"},
               "final": final, "best": best or {"epoch": epochs, **final}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "summary.json").write_text(json.dumps(summary))
    earlier = {TEST_ERROR: earlier_test} if earlier_test is not None else {}
    lines = [{EPOCH: e, STEP: 10 * e, LR: 0.1, TRAIN_LOSS: 1.0 / e, PENALTY: 0.0,
              **(final if e == epochs else earlier)} for e in range(1, epochs + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return run_dir


def image(val: float | None, test: float | None) -> dict:
    return {TRAIN_LOSS: 0.1, VAL_ERROR: val, TEST_ERROR: test}


def lm(val: float, test: float) -> dict:
    return {EPOCH: 5, TRAIN_LOSS: 4.0, VAL_PPL: val, TEST_PPL: test}


PER = {"method": "per"}
SEL = {"val_size": 5000}


def build_runs(root: Path) -> None:
    """Two cells (T1 CIFAR-10 ResNet-56, T3 PTB LSTM) with traps for the selection."""
    for seed, test in enumerate([7.0, 7.2, 7.4]):
        make_run(root, seed=seed, final=image(None, test))
    for seed, test in enumerate([6.9, 7.0, 7.1]):
        make_run(root, norm="bn", seed=seed, final=image(None, test))
    # Selection runs: 1e-4 has the best validation error; 3e-5 the best test error (trap);
    # 3e-4 a better validation error in one seed but a diverged second seed.
    for lam, vals, test in [(1e-4, [6.0, 6.2], 9.0), (3e-5, [6.5, 6.7], 5.0)]:
        for seed, val in enumerate(vals):
            make_run(root, **PER, **SEL, lam=lam, seed=seed, final=image(val, test))
    make_run(root, **PER, **SEL, lam=3e-4, seed=0, final=image(5.5, 5.5))
    make_run(root, **PER, **SEL, lam=3e-4, seed=1, status="diverged", final=image(None, None))
    # Final runs (all 50k): three finished, one diverged, one left running at 1e-4.
    # Seeds 1 and 2 had a lower test error at their first epoch (best test epoch 6.5, 6.6).
    for seed, test, earlier in [(0, 6.6, None), (1, 6.7, 6.5), (2, 6.8, 6.6)]:
        make_run(root, **PER, lam=1e-4, seed=seed, final=image(None, test), earlier_test=earlier)
    make_run(root, **PER, lam=1e-4, seed=3, status="diverged", final=image(None, None))
    make_run(root, **PER, lam=1e-4, seed=4, status="running", final=image(None, None))
    for seed, test in enumerate([5.0, 5.1]):
        make_run(root, **PER, lam=3e-5, seed=seed, final=image(None, test))
    # The same run again, from an ablation preset's folder: not counted twice.
    make_run(root, **PER, lam=1e-4, seed=0, final=image(None, 6.6), preset="ablation_s256")
    # Partial runs: a 6-step vanilla run beside complete ones (left out), and a ResNet-110
    # cell with only 2 of its protocol's 200 epochs (shown, not compared with the paper).
    make_run(root, seed=5, final=image(None, 50.0), max_steps=6)
    for seed, test in enumerate([30.0, 32.0]):
        make_run(root, model="resnet110", seed=seed, final=image(None, test), protocol_epochs=200)
    # An ablation variant (flatten layout); L1 and L2 cells with no selection runs.
    make_run(root, **PER, **SEL, layout="flatten", lam=1e-4, final=image(6.3, 6.0))
    for seed, test in enumerate([6.9, 7.1]):
        make_run(root, **PER, layout="flatten", lam=1e-4, seed=seed, final=image(None, test))
    for lam in (1e-4, 3e-5):
        make_run(root, method="l1", lam=lam, final=image(None, 6.5))
    make_run(root, method="l2", lam=1e-4, final=image(None, 6.5))    # one lambda, never validated
    # Language model: lambda 3e-5 has the best test perplexity (trap).
    ptb = {"task": "lm", "dataset": "ptb", "model": "lstm"}
    final_lm = {TRAIN_LOSS: 4.0, VAL_PPL: 200.0, TEST_PPL: 190.0}
    for seed, (val, test) in enumerate([(123, 120), (125, 122)]):
        make_run(root, **ptb, seed=seed, final=final_lm, best=lm(val, test))
    for lam, pairs in [(1e-4, [(118, 116), (120, 118)]), (3e-5, [(121, 100), (121, 100)])]:
        for seed, (val, test) in enumerate(pairs):
            make_run(root, **ptb, **PER, lam=lam, seed=seed, final=final_lm, best=lm(val, test))
    make_run(root, **ptb, method="rbn", final=final_lm, best=lm(118, 115))
    # Corrupt records.
    bad = make_run(root, seed=7, final=image(None, 1.0))
    (bad / "summary.json").write_text("{not json")
    no_cell = make_run(root, seed=8, final=image(None, 1.0))
    summary = json.loads((no_cell / "summary.json").read_text())
    del summary["cell"]
    (no_cell / "summary.json").write_text(json.dumps(summary))
    no_config = make_run(root, seed=9, final=image(None, 1.0))
    (no_config / "config.yaml").unlink()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    build_runs(root)
    return root


@pytest.fixture(scope="module")
def collected(root):
    return collect.collect_runs(root)


@pytest.fixture(scope="module")
def paper() -> pd.DataFrame:
    return paper_mod.load_paper_tables()


def row(frame: pd.DataFrame, **match) -> pd.Series:
    """The single row of `frame` matching column values (NaN matches NaN)."""
    mask = np.ones(len(frame), dtype=bool)
    for key, value in match.items():
        mask &= frame[key].isna() if value is None else frame[key] == value
    assert mask.sum() == 1, f"{mask.sum()} rows match {match}"
    return frame[mask].iloc[0]


# --- collection -------------------------------------------------------------------

def test_collect_rows_columns_and_problems(collected):
    df, problems = collected
    assert list(df.columns) == list(collect.RUN_COLUMNS)
    assert len(df) == 35
    bad = [p for p in problems if "skipped" in p]
    assert len(bad) == 3
    assert any("seed=7" in p and "JSONDecodeError" in p for p in bad)
    assert any("seed=8" in p and "cell" in p for p in bad)
    assert any("seed=9" in p and "config.yaml" in p for p in bad)
    assert any("seed=4" in p and "interrupted" in p for p in problems)
    duplicate = [p for p in problems if "same run as" in p]
    assert len(duplicate) == 1
    assert "ablation_s256" in duplicate[0] and "cifar10_resnet56_per_channels" in duplicate[0]
    same = df.run_dir.str.contains("ablation_s256") | df.run_dir.str.contains(
        "cifar10_resnet56_per_channels/lam=0.0001,seed=0,val=0")
    assert same.sum() == 1


def test_collect_values(collected):
    df, _ = collected
    running = row(df, method="per", layout="channels", lam=1e-4, seed=4, val_size=0)
    assert running.status == "interrupted"
    assert running.table == "T1" and running.activation == "relu"
    sel = row(df, method="per", layout="channels", lam=1e-4, seed=1, val_size=5000)
    assert sel.final_val_error == 6.2 and sel.final_test_error == 9.0
    assert sel.num_slices == 256 and sel.best_epoch == 2
    bn = row(df, method="bn", seed=0)
    assert bn.lam == 0.0 and pd.isna(bn.layout) and pd.isna(bn.num_slices)
    l1 = row(df, method="l1", lam=1e-4)
    assert l1.layout == "channels" and pd.isna(l1.num_slices)
    lm_run = row(df, task="lm", method="per", lam=1e-4, seed=0)
    assert lm_run.val_size == 0 and lm_run.best_val_ppl == 118 and lm_run.final_val_ppl == 200
    assert lm_run.table == "T3" and lm_run.activation == "tanh"
    assert pd.isna(lm_run.final_test_error) and pd.isna(lm_run.min_test_error)
    # Best test epoch from metrics.jsonl; partial runs.
    best = row(df, task="cifar", method="per", layout="channels", lam=1e-4, seed=1, val_size=0)
    assert (best.min_test_epoch, best.min_test_error, best.final_test_error) == (1, 6.5, 6.7)
    assert row(df, method="vanilla", seed=0, model="resnet56").min_test_epoch == 2
    assert set(df[df.partial].run_dir.str.extract(r"(resnet\d+)_vanilla.*seed=(\d)").apply(tuple, axis=1)) == {
        ("resnet56", "5"), ("resnet110", "0"), ("resnet110", "1")}


def test_load_metrics_and_activations(tmp_path):
    run = make_run(tmp_path, final=image(None, 7.0), epochs=3)
    metrics = collect.load_metrics(run)
    assert list(metrics.epoch) == [1, 2, 3] and metrics.test_error.iloc[-1] == 7.0
    records = [{"step": s, "epoch": s / 10, "site": site, "units": [0, 1],
                "mean": [s, -s], "var": [1.0, 2.0], "q25": [-1, -2], "q50": [0, 0],
                "q75": [1, 2], "sw1": 0.5 * s}
               for s in (0, 10) for site in ("a", "b")]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"step": 20, "si'
    (run / "activations.jsonl").write_text(text)
    acts = collect.load_activations(run)
    assert len(acts) == 8
    assert list(acts.columns) == ["step", "epoch", "site", "unit", "mean", "var",
                                  "q25", "q50", "q75", "sw1"]
    late_b1 = row(acts, step=10, site="b", unit=1)
    assert late_b1["mean"] == -10 and late_b1["var"] == 2.0 and late_b1.q75 == 2
    assert late_b1.sw1 == 5.0
    assert collect.load_activations(tmp_path).empty


def test_activations_in_the_monitors_own_format_load_pre_sites_too(tmp_path):
    """Rows as `activation_stats` writes them: a post site's `layer` is its position (shown
    as "layer k"), a pre-activation site's is null and keeps its name (it crashed the load)."""
    import torch

    from per import models
    from per.training.monitor import activation_stats
    torch.manual_seed(0)
    model = models.create("elu_cnn11", norm="none", activation="relu")
    x = torch.randn(2, 3, 32, 32)
    rows = activation_stats(model, lambda: model(x), ["layer1.pre_site", "layer3.site"], num_units=2,
                            layout="channels", num_slices=8, step=0, epoch=0.0)
    assert [r["layer"] for r in rows] == [None, 3]
    (tmp_path / "activations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    acts = collect.load_activations(tmp_path)
    assert sorted(acts.site.unique()) == ["layer 3", "layer1.pre_site"] and len(acts) == 4


def test_load_run_metrics(collected):
    df, _ = collected
    runs = df[(df.method == "vanilla") & (df.model == "resnet56") & ~df.partial]
    metrics = collect.load_run_metrics(runs)
    assert len(metrics) == 3 * 2
    assert set(metrics.seed) == {0, 1, 2}
    assert metrics[metrics.epoch == 2].sort_values("seed").test_error.tolist() == [7.0, 7.2, 7.4]


# --- paper ------------------------------------------------------------------------

def test_paper_csv_is_the_shared_copy(paper):
    repo_csv = paper_mod.paper_csv_path()
    if SHARED_PAPER_CSV.exists():
        assert repo_csv.read_bytes() == SHARED_PAPER_CSV.read_bytes()
    assert len(paper) == 110
    assert paper_mod.paper_value(paper, "cifar10", "resnet56", "relu", "per") == 6.72
    assert paper_mod.paper_value(paper, "ptb", "lstm", "tanh", "per", "valid") == 118.5
    assert math.isnan(paper_mod.paper_value(paper, "cifar10", "resnet56", "relu", "l1"))
    explicit = paper_mod.load_paper_tables(repo_csv)
    pd.testing.assert_frame_equal(explicit, paper)


def test_the_paper_csv_path_resolves_paths_references_and_refuses_others(tmp_path):
    (tmp_path / "configs/paths").mkdir(parents=True)
    config = tmp_path / "configs/paths/default.yaml"
    config.write_text("results_dir: out\nsub: ${paths.results_dir}/p\npaper_csv: ${paths.sub}/t.csv\n")
    assert paper_mod.paper_csv_path(tmp_path) == tmp_path / "out/p/t.csv"
    config.write_text("paper_csv: ${oc.env:X,a}/t.csv\n")
    with pytest.raises(ValueError, match="needs a resolver"):
        paper_mod.paper_csv_path(tmp_path)
    config.write_text("paper_csv: ${paths.paper_csv}/t.csv\n")
    with pytest.raises(ValueError, match="cannot resolve paths.paper_csv"):
        paper_mod.paper_csv_path(tmp_path)


def test_the_library_imports_without_hydra_omegaconf_or_wandb():
    """`per/` is usable without Hydra: every module of the package imports with those three
    made unimportable."""
    code = """
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("hydra", "omegaconf", "wandb"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import per
skip = ("per._triton",)          # needs Triton, a CUDA wheel's
for m in pkgutil.walk_packages(per.__path__, "per."):
    if m.name not in skip:
        importlib.import_module(m.name)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


# --- selection ----------------------------------------------------------------------

def test_select_lambda_uses_validation_only(collected):
    df, _ = collected
    chosen = tables.select_lambda(df, "cifar")
    per = row(chosen, method="per", layout="channels")
    assert per.lam == 1e-4            # not 3e-5 (best test) nor 3e-4 (a diverged seed)
    assert per.score == pytest.approx(6.1) and per.n == 2 and per.n_lams == 3
    assert row(chosen, method="per", layout="flatten").lam == 1e-4
    vanilla = row(chosen, method="vanilla", model="resnet56")
    assert vanilla.lam == 0.0 and vanilla.n == 0 and math.isnan(vanilla.score)
    assert math.isnan(row(chosen, method="l1").lam)       # two lambdas, no selection runs
    lm_chosen = tables.select_lambda(df, "lm")
    lm_per = row(lm_chosen, method="per")
    assert lm_per.lam == 1e-4 and lm_per.score == pytest.approx(119.0) and lm_per.n == 2
    assert row(lm_chosen, method="rbn").lam == 0.0

    # Scrambling every test metric (the best test epoch included) changes nothing:
    # selection never reads them.
    rng = np.random.default_rng(0)
    scrambled = df.copy()
    test_columns = [c for c in df.columns if c.endswith(("test_error", "test_ppl", "test_epoch"))]
    assert {"min_test_error", "min_test_epoch", "final_test_error"} <= set(test_columns)
    for col in test_columns:
        scrambled[col] = rng.integers(1, 1000, len(df))
    for task in ("cifar", "lm"):
        pd.testing.assert_frame_equal(tables.select_lambda(scrambled, task),
                                      tables.select_lambda(df, task))


def test_reduction_ablation_runs_stay_out_of_the_table_cell(tmp_path, paper):
    """The ablation's `reduction: mean` runs share the T1 cell's keys and folder but run
    another objective on another grid: they form their own variant, never the cell's."""
    for lam, reduction, val in ((1e-4, "sum", 7.0), (3e-5, "sum", 7.2), (3.0, "mean", 6.5)):
        for val_size, final in ((5000, image(val, 9.0)), (0, image(None, val))):
            make_run(tmp_path, method="per", lam=lam, reduction=reduction, val_size=val_size,
                     final=final, preset=f"per_{reduction}")
    df, _ = collect.collect_runs(tmp_path)
    chosen = tables.select_lambda(df, "cifar")
    assert len(chosen) == 2
    assert row(chosen, reduction="sum").lam == 1e-4 and row(chosen, reduction="sum").n_lams == 2
    assert row(chosen, reduction="mean").lam == 3.0
    t1 = tables.format_table(tables.cell_results(df, "cifar", paper), "T1")
    assert list(t1.index) == ["vanilla", "bn", "per [channels, mean, s=256]", "per [channels, sum, s=256]"]
    assert t1.loc["vanilla"].iloc[0] == "— (no runs) · paper 7.21"       # the paper's rows stay


def test_crashed_runs_are_failed_not_diverged(tmp_path, paper):
    """A crash (out of memory, a missing file) says nothing about lambda: it neither ranks
    the lambda last nor counts as diverged; a diverged run does both."""
    for lam, seed, status, val in ((1e-4, 0, "finished", 6.0), (1e-4, 1, "failed", None),
                                   (3e-5, 0, "finished", 6.5), (3e-4, 0, "finished", 5.0),
                                   (3e-4, 1, "diverged", None)):
        make_run(tmp_path, method="per", lam=lam, seed=seed, val_size=5000, status=status,
                 final=image(val, None))
    for seed, status in ((0, "finished"), (1, "failed")):
        make_run(tmp_path, method="per", lam=1e-4, seed=seed, status=status, final=image(None, 6.8))
    df, _ = collect.collect_runs(tmp_path)
    chosen = row(tables.select_lambda(df, "cifar"), method="per")
    assert (chosen.lam, chosen.n, chosen.n_diverged, chosen.n_failed) == (1e-4, 1, 0, 1)
    result = row(tables.cell_results(df, "cifar", paper), method="per")
    assert (result.n, result.n_diverged, result.n_failed) == (1, 0, 1)
    text = tables.format_table(tables.cell_results(df, "cifar", paper), "T1").loc["per"].iloc[0]
    assert "1/2 failed" in text and "diverged" not in text


def test_a_lone_diverged_lambda_is_counted_but_gets_no_final_runs(tmp_path, paper):
    """`--lams X` with X diverged in selection: the row keeps X and counts the divergence,
    and `chosen_lambda` refuses X for a final phase. A lone lambda whose selection run
    crashed keeps it (the rerun resumes the crash). A one-lambda LM cell whose runs all
    diverged still shows them."""
    from per import sweep
    make_run(tmp_path, method="per", lam=1e30, val_size=5000, status="diverged", final=image(None, None))
    make_run(tmp_path, method="l2", lam=1e-4, val_size=5000, status="failed", final=image(None, None))
    for seed in range(3):
        make_run(tmp_path, task="lm", dataset="ptb", model="lstm", seed=seed, status="diverged",
                 final=lm(math.inf, math.inf))
    df = collect.collect_runs(tmp_path)[0]
    chosen = tables.select_lambda(df, "cifar")
    per = row(chosen, method="per")
    assert (per.lam, per.n, per.n_diverged) == (1e30, 0, 1)
    l2 = row(chosen, method="l2")
    assert (l2.lam, l2.n_failed, l2.n_diverged) == (1e-4, 1, 0)
    cell_dir = next((tmp_path / "cifar").glob("*_per_*"))
    with pytest.raises(sweep.SelectionError, match="diverged in every selection run"):
        sweep.chosen_lambda(_own_phase(cell_dir, [1e30]))
    per_text = tables.format_table(tables.cell_results(df, "cifar", paper), "T1").loc["per"].iloc[0]
    assert per_text.startswith("— (n=0) λ=1e+30 · ") and "validated" not in per_text    # it was: it diverged
    t3 = tables.format_table(tables.cell_results(df, "lm", paper), "T3")
    assert all("3/3 diverged" in text for text in t3.iloc[0])


def test_lambda_scores(collected):
    df, _ = collected
    scores = tables.lambda_scores(df, "cifar")
    unstable = row(scores, method="per", layout="channels", lam=3e-4)
    assert unstable.score == 5.5 and unstable.n == 1 and unstable.n_diverged == 1
    trap = row(scores, method="per", layout="channels", lam=3e-5)
    assert trap.score == pytest.approx(6.6) and trap.score_std == pytest.approx(math.sqrt(0.02))


# --- results ------------------------------------------------------------------------

def test_cell_results_images(collected, paper):
    df, _ = collected
    res = tables.cell_results(df, "cifar", paper)
    per = row(res, method="per", layout="channels")
    assert per.split == "test" and per.lam == 1e-4
    assert per["mean"] == pytest.approx(6.7, abs=1e-12)
    assert per["std"] == pytest.approx(0.1, abs=1e-12)
    assert (per.n, per.n_diverged, per.n_interrupted) == (3, 1, 1)
    assert per.paper == 6.72 and per["diff"] == pytest.approx(-0.02, abs=1e-12)
    assert per.baseline == "vanilla" and per.vs_baseline == pytest.approx(-0.5, abs=1e-12)
    # Welch by hand: se^2 = s1^2/n1 + s2^2/n2, Welch-Satterthwaite df.
    v1, v2 = 0.1 ** 2 / 3, 0.2 ** 2 / 3
    dof = (v1 + v2) ** 2 / (v1 ** 2 / 2 + v2 ** 2 / 2)
    half = stats.t.ppf(0.975, dof) * math.sqrt(v1 + v2)
    assert (per.ci_low, per.ci_high) == pytest.approx((-0.5 - half, -0.5 + half), abs=1e-9)

    vanilla = row(res, method="vanilla", model="resnet56")
    assert vanilla["mean"] == pytest.approx(7.2, abs=1e-12)
    assert vanilla["std"] == pytest.approx(0.2, abs=1e-12)
    assert vanilla.n == 3 and vanilla.paper == 7.21
    assert pd.isna(vanilla.baseline) and math.isnan(vanilla.ci_low)
    bn = row(res, method="bn")
    assert bn["mean"] == pytest.approx(7.0, abs=1e-12) and bn.paper == 6.95
    assert bn.baseline == "vanilla"
    flat = row(res, method="per", layout="flatten")
    assert flat["mean"] == pytest.approx(7.0) and flat["std"] == pytest.approx(math.sqrt(0.02))
    assert flat.paper == 6.72             # the paper's PER value, beside each variant
    l1 = row(res, method="l1")
    assert l1.n == 0 and math.isnan(l1.lam) and math.isnan(l1["mean"]) and math.isnan(l1.paper)
    # Best test epoch over the same runs, beside the final-epoch number.
    assert per.best_test == pytest.approx((6.6 + 6.5 + 6.6) / 3)
    assert per.best_test_diff == pytest.approx(per.best_test - 6.72)
    # Partial runs: left out beside complete ones; alone, shown but not compared.
    assert vanilla.n_partial_excluded == 1 and not vanilla.partial
    r110 = row(res, method="vanilla", model="resnet110")
    assert r110.partial and r110.n == 2 and r110["mean"] == 31.0 and r110.paper == 6.90
    assert math.isnan(r110["diff"]) and math.isnan(r110.best_test_diff)


def test_partial_runs_are_compared_only_when_asked(collected, paper):
    df, _ = collected
    res = tables.cell_results(df, "cifar", paper, include_partial=True)
    vanilla = row(res, method="vanilla", model="resnet56")
    assert vanilla.n == 4 and vanilla["mean"] == pytest.approx((7.0 + 7.2 + 7.4 + 50.0) / 4)
    assert vanilla.partial and vanilla.n_partial_excluded == 0
    r110 = row(res, method="vanilla", model="resnet110")
    assert r110["diff"] == pytest.approx(31.0 - 6.90)


def test_figures_average_what_the_tables_average(collected):
    """The sweep figure's reported metric and the curves at the chosen lambda leave out
    a partial run beside complete ones, as the table row does."""
    df, _ = collected
    reports = tables.lambda_reports(df, "cifar")
    vanilla = row(reports, method="vanilla", model="resnet56", lam=0.0)
    assert vanilla.n == 3 and vanilla["mean"] == pytest.approx((7.0 + 7.2 + 7.4) / 3)
    assert row(reports, method="vanilla", model="resnet110", lam=0.0).n == 2   # partial alone: kept
    curves = tables.at_chosen_lambda(df, tables.report_runs)
    r56 = curves[(curves.method == "vanilla") & (curves.model == "resnet56")]
    assert len(r56) == 3 and not r56.partial.any()


PROTOCOL = {"epochs": 200, "total_steps": None}
HE = {"epochs": 164, "total_steps": 64000}


@pytest.mark.parametrize("trainer, optim, status, steps, epochs, partial", [
    ({"epochs": 200, "max_steps": None}, PROTOCOL, "finished", 78200, 200, False),
    ({"epochs": 200, "max_steps": 6}, PROTOCOL, "finished", 6, 0, True),          # smoke run
    ({"epochs": 2, "max_steps": None}, PROTOCOL, "finished", 782, 2, True),       # fewer epochs
    ({"epochs": 200, "max_steps": None}, PROTOCOL, "finished", 391, 1, True),     # stopped short
    ({"epochs": 200, "max_steps": None}, PROTOCOL, "diverged", 391, 1, False),    # a result
    ({"epochs": 164, "max_steps": None}, HE, "finished", 64000, 164, False),
    ({"epochs": 164, "max_steps": 100}, HE, "finished", 100, 0, True),
    ({"epochs": 164, "max_steps": 64000}, HE, "finished", 64000, 164, False),
    ({"epochs": 2, "max_steps": None}, HE, "finished", 782, 2, True),             # fewer epochs
    ({"epochs": 2, "max_steps": None}, HE, "diverged", 500, 1, True),             # planned short
    ({"epochs": 2, "max_steps": None}, HE, "finished", 64000, 164, False),        # an older run: all steps
    ({"epochs": 1}, None, "finished", 1, 1, False),                              # no protocol recorded
])
def test_is_partial(trainer, optim, status, steps, epochs, partial):
    config = {"trainer": trainer, **({"optim": optim} if optim else {})}
    summary = {"status": status, "steps": steps, "epochs_completed": epochs}
    assert collect.is_partial(config, summary) is partial


def test_is_partial_on_real_configs(tmp_path):
    finished = {"status": "finished", "steps": 78200, "epochs_completed": 200}
    preset = compose_config("train_cifar", ["experiment=t1_cifar10_resnet56_per"], tmp_path)
    assert not collect.is_partial(preset, finished)
    smoke = compose_config("train_cifar", ["experiment=t1_cifar10_resnet56_per", "debug=smoke"], tmp_path)
    assert collect.is_partial(smoke, {**finished, "steps": 4, "epochs_completed": 0})
    he = compose_config("train_cifar", ["experiment=t1_cifar10_resnet56_bn"], tmp_path)
    assert not collect.is_partial(he, {**finished, "steps": 64000, "epochs_completed": 164})
    assert collect.is_partial(he, {**finished, "steps": 640, "epochs_completed": 2})


def test_a_language_model_grid_is_compared_with_the_paper(tmp_path, paper):
    """An LM's lambda is chosen on validation perplexity, with no held-out split: a
    complete grid's row is compared, not marked as chosen on another split."""
    ptb = {"task": "lm", "dataset": "ptb", "model": "lstm", "epochs": 5}
    grid = [1e-4, 3e-5]
    for seed in range(2):
        make_run(tmp_path, **ptb, seed=seed, final=lm(125 + seed, 122 + seed))
        for lam in grid:
            make_run(tmp_path, **ptb, method="per", lam=lam, seed=seed, lam_grid=grid,
                     final=lm(118 + (lam > 5e-5) + seed, 114 + seed))
    df, _ = collect.collect_runs(tmp_path)
    res = tables.cell_results(df, "lm", paper)
    test = row(res, method="per", split="test")
    assert test.lam == 3e-5 and not test.off_protocol_split and not test.grid_incomplete
    assert test["diff"] == pytest.approx(0.0) and "held-out" not in tables._cell_text(test, 1)   # 114.5


def test_cell_results_language_model(collected, paper):
    df, _ = collected
    res = tables.cell_results(df, "lm", paper)
    assert len(res) == 3 * 2                       # vanilla, per, rbn x valid, test
    valid = row(res, method="per", split="valid")
    test = row(res, method="per", split="test")
    assert valid["mean"] == 119 and valid["std"] == pytest.approx(math.sqrt(2))
    assert test["mean"] == 117 and test.n == 2 and test.lam == 1e-4
    assert (valid.paper, test.paper) == (118.5, 114.5)
    assert test["diff"] == pytest.approx(2.5)
    # Equal variances (2) and n = 2 on both sides: df = 2, half-width t(2) * sqrt(2).
    assert test.vs_baseline == -4
    half = 4.302652729911275 * math.sqrt(2)
    assert (test.ci_low, test.ci_high) == pytest.approx((-4 - half, -4 + half), abs=1e-9)
    rbn = row(res, method="rbn", split="test")
    assert rbn.n == 1 and math.isnan(rbn["std"]) and math.isnan(rbn.ci_low)
    assert res.best_test.isna().all()      # the LM protocol already reports at the best validation


def test_welch_interval_matches_formula():
    a, b = [1.0, 2.0, 4.0, 7.0], [3.0, 3.5, 9.0]
    low, high = tables.welch_interval(a, b)
    v1, v2 = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 3
    dof = (v1 + v2) ** 2 / (v1 ** 2 / 3 + v2 ** 2 / 2)
    diff = np.mean(a) - np.mean(b)
    half = stats.t.ppf(0.975, dof) * math.sqrt(v1 + v2)
    assert (low, high) == pytest.approx((diff - half, diff + half))
    assert all(math.isnan(x) for x in tables.welch_interval([1.0], b))


# --- tables -------------------------------------------------------------------------

def test_format_table_layouts(collected, paper):
    df, _ = collected
    results = tables.all_results(df, paper)
    t1 = tables.format_table(results, "T1", paper)
    assert list(t1.index) == ["vanilla", "bn", "l1", "l2", "per [channels, sum, s=256]",
                              "per [flatten, sum, s=256]"]
    error, best = "test error (%)", "best test epoch (as the references report; optimistic)"
    assert list(t1.columns) == [("cifar10", "resnet56", error), ("cifar10", "resnet56", best),
                                ("cifar10", "resnet110", error), ("cifar10", "resnet110", best)]
    assert t1.loc["per [channels, sum, s=256]", ("cifar10", "resnet56", error)] == (
        "6.70 ± 0.10 (n=3) λ=1e-04 · 1/5 diverged · 1/5 interrupted · paper 6.72 (-0.02)"
        " · vs vanilla -0.50 [-0.92, -0.08]")
    assert t1.loc["per [channels, sum, s=256]", ("cifar10", "resnet56", best)] == "6.57 (-0.15 vs paper)"
    assert t1.loc["vanilla", ("cifar10", "resnet56", error)] == (
        "7.20 ± 0.20 (n=3) · 1 partial left out · paper 7.21 (-0.01)")
    assert t1.loc["vanilla", ("cifar10", "resnet110", error)] == (
        "31.00 ± 1.41 (n=2) · partial (shorter than the protocol) · paper 6.90 (not compared: partial)")
    assert t1.loc["l1", ("cifar10", "resnet56", error)] == "— (n=0) λ not selected"
    assert t1.loc["l1", ("cifar10", "resnet56", best)] == "—"
    assert t1.loc["l2", ("cifar10", "resnet56", error)] == "6.50 (n=1) λ=1e-04 (not validated)"
    t3 = tables.format_table(results, "T3", paper)
    # The paper's cells of the columns we ran, without runs: `— (no runs) · paper X`, in its order.
    assert list(t3.index) == [(model, method) for model in ("lstm", "re_lstm", "vd_lstm", "re_vd_lstm")
                              for method in ("vanilla", "l1", "l2", "rbn", "per")]
    assert list(t3.columns) == [("ptb", "valid", "perplexity"), ("ptb", "test", "perplexity")]
    assert t3.loc[("lstm", "l1"), ("ptb", "test", "perplexity")] == "— (no runs) · paper 114.1"
    assert t1.loc["bn", ("cifar10", "resnet110", error)] == "— (no runs) · paper 6.62"
    assert t1.loc["bn", ("cifar10", "resnet110", best)] == "—"
    assert t1.loc["per [flatten, sum, s=256]", ("cifar10", "resnet110", error)] == "— (no runs) · paper 6.19"
    assert pd.isna(t1.loc["l1", ("cifar10", "resnet110", error)])      # the paper has no such cell
    assert t3.loc[("lstm", "rbn"), ("ptb", "test", "perplexity")] == "115.0 (n=1) · paper 115.1 (-0.1)"


def test_table_numbers(collected, paper):
    df, _ = collected
    results = tables.all_results(df, paper)
    t1 = tables.table_numbers(results, "T1", paper)
    assert list(t1.columns[:12]) == [
        "method", "dataset", "model", "lambda", "selection score (validation)",
        "test error (%) mean", "test error (%) std", "n", "paper test error (%)", "ours - paper",
        "best test epoch (as the references report; optimistic)", "best test epoch - paper"]
    per = row(t1, method="per [channels, sum, s=256]")
    assert (per["lambda"], per["n"], per["diverged"], per["interrupted"]) == (1e-4, 3, 1, 1)
    assert per["test error (%) mean"] == pytest.approx(6.7)
    assert per["ours - paper"] == pytest.approx(-0.02)
    assert per["95% CI low"] == pytest.approx(-0.9155, abs=1e-4)
    t3 = tables.table_numbers(results, "T3", paper)
    assert "perplexity mean" in t3 and "split" in t3 and not any("best" in c for c in t3.columns)
    assert row(t3, method="per", split="test")["perplexity mean"] == 117


def test_write_tables(collected, paper, tmp_path):
    df, _ = collected
    paths = tables.write_tables(df, tmp_path / "tables", paper)
    names = sorted(p.name for p in paths)
    assert names == sorted(["selection.csv", "results.csv", "runs.csv", "T1.md", "T1.tex", "T1.csv",
                            "T3.md", "T3.tex", "T3.csv"])
    assert all(p.stat().st_size > 0 for p in paths)
    md = (tmp_path / "tables" / "T1.md").read_text()
    assert ("| method | cifar10 resnet56 test error (%) | cifar10 resnet56 best test epoch "
            "(as the references report; optimistic) |") in md
    assert "| per [channels, sum, s=256] | 6.70 ± 0.10 (n=3) λ=1e-04" in md
    assert "| ptb valid perplexity | ptb test perplexity |" in (tmp_path / "tables" / "T3.md").read_text()
    # CSV and LaTeX: one number per column.
    csv = pd.read_csv(tmp_path / "tables" / "T1.csv")
    assert csv["test error (%) mean"].dtype == float and csv["n"].dtype == int
    assert csv["lambda"].dtype == float and csv["95% CI high"].dtype == float
    assert row(csv, method="vanilla", model="resnet56")["test error (%) mean"] == pytest.approx(7.2)
    tex = (tmp_path / "tables" / "T1.tex").read_text()
    assert r"\begin{tabular}" in tex and "±" not in tex and r"test error (\%) mean" in tex
    assert "per [channels, sum, s=256] & cifar10 & resnet56 & 1e-04 & 6.10 & 6.70 & 0.10 & 3 & 6.72 & -0.02" in tex
    results = pd.read_csv(tmp_path / "tables" / "results.csv")
    assert len(results) == 7 + 6
    selection = pd.read_csv(tmp_path / "tables" / "selection.csv")
    chosen = selection[(selection.method == "per") & selection.chosen]
    assert sorted(chosen.lam) == [1e-4, 1e-4, 1e-4]     # cifar channels, flatten, lm


# --- W&B source -------------------------------------------------------------------

class FakeRun:
    def __init__(self, run_id: str, config: dict, summary: dict, history: list[dict] = ()) -> None:
        self.id, self.path = run_id, ["ent", "proj", run_id]
        self.config, self.summary, self.history = config, summary, history

    def scan_history(self, keys: list[str]) -> list[dict]:
        """The history rows that have every key (as W&B's `scan_history(keys=...)`)."""
        return [{k: r[k] for k in keys} for r in self.history if all(k in r for k in keys)]


class FakeApi:
    def __init__(self, runs: list[FakeRun]) -> None:
        self._runs = runs
        self.paths: list[str] = []

    def runs(self, path: str) -> list[FakeRun]:
        self.paths.append(path)
        return self._runs


def test_wandb_source_matches_local(root, collected):
    df, _ = collected
    fake_runs = [FakeRun(f"r{i:03d}", yaml.safe_load(Path(d, "config.yaml").read_text()),
                         {"summary": json.loads(Path(d, "summary.json").read_text()),
                          "_runtime": 3},
                         [json.loads(line) for line in Path(d, "metrics.jsonl").read_text().splitlines()])
                 for i, d in enumerate(df.run_dir)]
    fake_runs.append(FakeRun("broken", {"method": {"name": "per"}}, {"_runtime": 3}))
    api = FakeApi(fake_runs)
    remote, problems = collect_wandb("proj", entity="ent", api=api)
    assert api.paths == ["ent/proj"]
    assert remote.run_dir.iloc[0] == "wandb:ent/proj/r000"
    pd.testing.assert_frame_equal(remote.drop(columns="run_dir"), df.drop(columns="run_dir"))
    assert any("broken" in p and "skipped" in p for p in problems)
    assert any("interrupted" in p for p in problems)


def test_a_wandb_project_that_cannot_be_read_is_one_clear_error(tmp_path, monkeypatch):
    """No key, no network, no such project: one line naming the project and what is needed,
    from the library and from both scripts (a 7-frame traceback before)."""
    from per.analysis.wandb_source import WandbSourceError

    class NoKey:
        def runs(self, path):
            raise RuntimeError("No API key configured. Use `wandb login` to log in.")
    with pytest.raises(WandbSourceError, match="cannot read the runs of W&B project 'ent/proj': RuntimeError: "
                                               "No API key configured"):
        collect_wandb("proj", entity="ent", api=NoKey())
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for script in ("aggregate", "figures"):
        out = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), "--wandb-project", "nope",
                              "--out", str(tmp_path / script)], capture_output=True, text=True, cwd=ROOT,
                             timeout=120)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert f"[{script}] cannot read the runs of W&B project 'nope'" in out.stderr


class SubDict:
    """Like W&B's `SummarySubDict`: `items` and `[]`, but no `Mapping`."""
    def __init__(self, data: dict) -> None:
        self._data = data

    def items(self):
        return [(k, SubDict(v) if isinstance(v, dict) else v) for k, v in self._data.items()]

    def __getitem__(self, key):
        return self._data[key]


def test_wandb_summaries_are_read_as_plain_dicts():
    from per.analysis.wandb_source import _plain
    summary = {"status": "finished", "cell": {"table": "T1"}, "attempts": [{"started": None}]}
    plain = _plain(SubDict(summary))
    assert plain == summary and type(plain) is dict and type(plain["cell"]) is dict
    assert json.loads(json.dumps(plain)) == summary


# --- the aggregate script -------------------------------------------------------------

def test_aggregate_script(root, tmp_path, capsys):
    script = Path(__file__).resolve().parents[1] / "scripts" / "aggregate.py"
    main = runpy.run_path(str(script))["main"]
    assert main(["--runs", str(root), "--out", str(tmp_path), "--task", "cifar"]) == 0
    out, err = capsys.readouterr()
    assert "## T1" in out and "## T3" not in out
    assert "6.70 ± 0.10 (n=3)" in out
    assert "JSONDecodeError" in err and "interrupted" in err
    assert (tmp_path / "T1.md").exists() and not (tmp_path / "T3.md").exists()
    assert "3 runs shorter than their protocol" in err and "not compared with the paper" in err
    assert math.isnan(row(pd.read_csv(tmp_path / "T1.csv"), model="resnet110")["ours - paper"])
    assert main(["--runs", str(root), "--out", str(tmp_path), "--include-partial"]) == 0
    assert "treated as complete" in capsys.readouterr().err
    t1 = pd.read_csv(tmp_path / "T1.csv")      # the default 3 seeds planned: ResNet-110 ran 2
    assert row(t1, model="resnet110")["not compared with the paper because"] == "seeds missing"
    assert main(["--runs", str(root), "--out", str(tmp_path), "--include-partial", "--seeds", "2"]) == 0
    assert row(pd.read_csv(tmp_path / "T1.csv"), model="resnet110")["ours - paper"] == pytest.approx(24.1)
    (tmp_path / "nothing").mkdir()
    assert main(["--runs", str(tmp_path / "nothing"), "--out", str(tmp_path / "empty")]) == 0
    with pytest.raises(SystemExit, match="no runs folder .*nowhere"):     # a mistyped --runs
        main(["--runs", str(tmp_path / "nowhere"), "--out", str(tmp_path)])


def test_failed_runs_errors_are_listed_by_aggregate_and_in_runs_csv(tmp_path, capsys):
    """A failed run says why in `runs.csv` and on stderr, one line per distinct error; a
    summary written before errors were recorded says it has none."""
    missing = "DatasetMissingError: CIFAR file data_batch_1 not found under /data"
    for seed, error in ((0, missing), (1, missing), (2, "RuntimeError: CUDA out of memory"), (3, None)):
        run_dir = make_run(tmp_path / "runs", method="per", lam=1e-4, seed=seed, status="failed",
                           final=image(None, None))
        if error:
            summary = json.loads((run_dir / "summary.json").read_text())
            (run_dir / "summary.json").write_text(json.dumps({**summary, "error": error}))
    make_run(tmp_path / "runs", seed=0, final=image(None, 7.0))
    script = Path(__file__).resolve().parents[1] / "scripts" / "aggregate.py"
    assert runpy.run_path(str(script))["main"](["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "t")]) == 0
    err = capsys.readouterr().err
    assert f"[aggregate] 2 failed runs ({tmp_path / 'runs'}" in err and f", ...): {missing}" in err
    assert "[aggregate] 1 failed run (" in err and "): RuntimeError: CUDA out of memory" in err
    assert "): (no error recorded)" in err
    runs = pd.read_csv(tmp_path / "t/runs.csv")
    assert len(runs) == 5 and sorted(runs.error.dropna()) == [missing, missing, "RuntimeError: CUDA out of memory"]
    assert runs[runs.status == "finished"].error.isna().all()
    assert ("| per | — (n=0) λ=1e-04 (not validated) · results from 0 of 3 seeds · 4/4 failed (error in "
            "runs.csv; rerun resumes) · paper 6.72 (not compared: seeds missing) |") in (
        tmp_path / "t/T1.md").read_text()


def test_reports_of_other_runs_are_not_written_into_the_suites_own_folders(root, tmp_path, capsys):
    """`make tables RUNS=results/debug` would write `results/debug/../tables`, the
    reproduction's own tables: refused, naming what to pass instead."""
    from experiments.common import suite_paths
    for script, key in (("aggregate.py", "tables_dir"), ("figures.py", "figures_dir")):
        main = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / script))["main"]
        before = sorted(Path(suite_paths()[key]).glob("*")) if Path(suite_paths()[key]).exists() else []
        with pytest.raises(SystemExit) as stop:
            main(["--runs", str(root), "--out", suite_paths()[key]])
        assert stop.value.code == 2 and "pass --out" in capsys.readouterr().err
        after = sorted(Path(suite_paths()[key]).glob("*")) if Path(suite_paths()[key]).exists() else []
        assert after == before


def test_runs_with_a_changed_protocol_get_their_own_row_not_compared_with_the_paper(tmp_path, paper):
    for seed, test in enumerate([7.0, 7.2]):
        make_run(tmp_path, seed=seed, final=image(None, test), changes=[])
    for seed, test in enumerate([9.0, 9.4]):
        make_run(tmp_path, seed=seed, final=image(None, test), changes=["optim.epochs=30"])
    df, problems = collect.collect_runs(tmp_path)
    assert problems == [] and len(df) == 4          # not duplicates of each other
    res = tables.cell_results(df, "cifar", paper)
    plain, changed = row(res, changes=""), row(res, changes="optim.epochs=30")
    assert plain["mean"] == pytest.approx(7.1) and not math.isnan(plain["diff"])
    assert changed["mean"] == pytest.approx(9.2) and math.isnan(changed["diff"])
    assert list(tables.row_labels(res)) == ["vanilla", "vanilla {changed: optim.epochs=30}"]
    text = tables.format_table(res, "T1", paper)
    assert "vanilla {changed: optim.epochs=30}" in text.to_string()
    assert "(not compared: protocol changed)" in text.to_string()
    # A changed PER row is compared with the vanilla row of the same changes.
    for seed, test in enumerate([8.0, 8.4]):
        make_run(tmp_path, **PER, lam=1e-4, seed=seed, final=image(None, test), changes=["optim.epochs=30"])
    res = tables.cell_results(collect.collect_runs(tmp_path)[0], "cifar", paper)
    assert row(res, method="per").vs_baseline == pytest.approx(8.2 - 9.2)


GRID = [3e-4, 1e-4, 3e-5, 1e-5]


def test_off_grid_lambdas_get_their_own_row_and_never_the_papers(tmp_path, paper):
    """An exploratory sweep beyond the preset's grid must not win the paper's cell (the
    reproduce pipeline chooses among the grid only, `per.sweep.chosen_lambda`)."""
    for lam, val in ((3e-3, 6.2), (1e-3, 5.5), *zip(GRID, (6.3, 5.9, 6.1, 6.4))):
        make_run(tmp_path, **PER, **SEL, lam=lam, final=image(val, None), lam_grid=GRID)
    for lam, tests in ((1e-3, (6.4, 6.5)), (1e-4, (6.8, 6.9))):
        for seed, test in enumerate(tests):
            make_run(tmp_path, **PER, lam=lam, seed=seed, final=image(None, test), lam_grid=GRID)
    df, problems = collect.collect_runs(tmp_path)
    assert problems == []
    assert set(df.changes[df.lam > 5e-4]) == {"method.lam=0.003 (not in the grid)",
                                             "method.lam=0.001 (not in the grid)"}
    assert set(df.changes[df.lam < 5e-4]) == {""} and set(df.grid_size) == {4}
    res = tables.cell_results(df, "cifar", paper)
    grid_row = row(res, method="per", changes="")
    assert grid_row.lam == 1e-4 and grid_row["mean"] == pytest.approx(6.85)
    assert not math.isnan(grid_row["diff"]) and not grid_row.grid_incomplete
    off = res[res.changes != ""]
    assert off["diff"].isna().all() and 1e-3 not in set(res.lam[res.changes == ""])


def test_only_a_regularizers_lambda_has_a_grid(tmp_path, paper):
    """A lambda-0 PER control is off the grid; a VCL weight other than its grid's is too;
    vanilla runs given a grid (scripts/demo.py passes one to every preset) have none."""
    make_run(tmp_path, **PER, **SEL, lam=0.0, final=image(1.0, None), lam_grid=GRID)
    make_run(tmp_path, method="vcl", model="elu_cnn11", activation="elu", lam=0.1, final=image(None, 7.0),
             lam_grid=[0.01])
    make_run(tmp_path, lam=0.0, final=image(None, 7.0), lam_grid=[1e-5, 1e-6])
    df, _ = collect.collect_runs(tmp_path)
    by_method = df.set_index("method")
    assert by_method.loc["per", "changes"] == "method.lam=0 (not in the grid)"
    assert by_method.loc["vcl", "changes"] == "method.lam=0.1 (not in the grid)"
    assert by_method.loc["vanilla", "changes"] == "" and pd.isna(by_method.loc["vanilla", "grid_size"])
    res = tables.cell_results(df, "cifar", paper)
    assert not res.grid_incomplete.any()           # an off-grid row is its own, not a partial grid
    assert res[res.method != "vanilla"]["diff"].isna().all()
    assert not math.isnan(row(res, method="vanilla")["diff"])


def test_the_largest_held_out_size_with_evidence_is_scored(tmp_path):
    make_run(tmp_path, **PER, val_size=64, lam=1e-4, final=image(6.0, None))
    make_run(tmp_path, **PER, val_size=5000, lam=1e-4, status="running")   # just launched
    scores = tables.lambda_scores(collect.collect_runs(tmp_path)[0], "cifar")
    assert scores.score.tolist() == [6.0]


def test_an_incomplete_grid_is_marked_and_not_compared_with_the_paper(tmp_path, paper):
    make_run(tmp_path, **PER, **SEL, lam=3e-5, final=image(6.7, None), lam_grid=GRID)
    make_run(tmp_path, **PER, **SEL, lam=1e-5, final=image(6.9, None), lam_grid=GRID)
    make_run(tmp_path, **PER, **SEL, lam=1e-4, status="running", lam_grid=GRID)
    make_run(tmp_path, **PER, **SEL, lam=3e-4, status="failed", lam_grid=GRID)
    for seed, test in enumerate([6.6, 6.8]):
        make_run(tmp_path, **PER, lam=3e-5, seed=seed, final=image(None, test), lam_grid=GRID)
    df, _ = collect.collect_runs(tmp_path)
    scores = tables.lambda_scores(df, "cifar").set_index("lam")
    assert scores.loc[1e-4, "n_interrupted"] == 1 and scores.loc[3e-4, "n_failed"] == 1
    chosen = tables.select_lambda(df, "cifar")
    assert chosen.lam.tolist() == [3e-5] and chosen.n_scored.tolist() == [2]
    res = tables.cell_results(df, "cifar", paper)
    per_row = row(res, method="per")
    assert per_row.grid_incomplete and math.isnan(per_row["diff"])
    text = tables.format_table(res, "T1", paper).to_string()
    assert "grid incomplete: 2/4 λ scored" in text and "(not compared: grid incomplete)" in text
    # Once every lambda has a finished run, the grid is complete; the row is compared once
    # the selection's other runs (interrupted, failed) have a result too.
    for lam in (1e-4, 3e-4):
        make_run(tmp_path, **PER, **SEL, lam=lam, seed=1, final=image(7.5, None), lam_grid=GRID)
    per_row = row(tables.cell_results(collect.collect_runs(tmp_path)[0], "cifar", paper), method="per")
    assert not per_row.grid_incomplete and per_row.choice_unsettled and per_row.n_unsettled == 2
    assert math.isnan(per_row["diff"])
    for lam in (1e-4, 3e-4):
        run = make_run(tmp_path / "redo", **PER, **SEL, lam=lam, final=image(7.5, None), lam_grid=GRID)
        old = tmp_path / run.relative_to(tmp_path / "redo")
        shutil.rmtree(old)
        shutil.move(run, old)
    per_row = row(tables.cell_results(collect.collect_runs(tmp_path)[0], "cifar", paper), method="per")
    assert not per_row.choice_unsettled and not math.isnan(per_row["diff"])


def test_only_lambdas_of_the_grid_count_as_scored(tmp_path, paper):
    """Runs of an old grid and a regenerated one in one row (and a run that recorded no grid):
    a lambda of the new grid that never ran leaves the grid incomplete."""
    old, new = [1e-2, 3e-3, 1e-3, 3e-4], [3e-2, 1e-2, 3e-3, 1e-3]
    make_run(tmp_path, **PER, **SEL, lam=3e-4, final=image(5.0, None), lam_grid=old)
    for lam, val in ((3e-2, 9.0), (1e-2, 8.0), (3e-3, 7.0)):        # 1e-3 never ran
        make_run(tmp_path, **PER, **SEL, lam=lam, final=image(val, None), lam_grid=new)
    make_run(tmp_path, **PER, **SEL, lam=1e-4, final=image(9.5, None))  # no grid recorded
    for seed in range(2):
        make_run(tmp_path, **PER, lam=3e-4, seed=seed, final=image(None, 6.7 + seed / 10), lam_grid=old)
    df, _ = collect.collect_runs(tmp_path)
    per = row(tables.cell_results(df, "cifar", paper), method="per")
    assert (per.lam, per.n_scored, per.grid_size) == (3e-4, 4, 5)
    assert per.grid_incomplete and math.isnan(per["diff"])
    assert "grid incomplete: 4/5 λ scored" in tables._cell_text(per, 2)


def test_selection_reads_one_held_out_size_per_cell(tmp_path, paper):
    """A quick sweep held out on 64 images must not average into the 5000-image scores."""
    make_run(tmp_path, **PER, val_size=64, lam=1e-4, final=image(1.0, None))
    make_run(tmp_path, **PER, val_size=5000, lam=1e-4, final=image(6.0, None))
    make_run(tmp_path, **PER, val_size=5000, lam=3e-5, final=image(5.0, None))
    df, _ = collect.collect_runs(tmp_path)
    scores = tables.lambda_scores(df, "cifar").set_index("lam")
    assert scores.loc[1e-4, "score"] == 6.0 and scores.loc[1e-4, "n"] == 1
    assert tables.select_lambda(df, "cifar").lam.tolist() == [3e-5]


def test_a_one_value_grid_reads_as_fixed_not_unvalidated(tmp_path, paper):
    for seed, test in enumerate([7.0, 7.2]):
        make_run(tmp_path, dataset="cifar10", model="elu_cnn11", method="vcl", activation="elu",
                 lam=0.01, seed=seed, final=image(None, test), lam_grid=[0.01])
    res = tables.cell_results(collect.collect_runs(tmp_path)[0], "cifar", paper)
    text = tables.format_table(res, "T2", paper).to_string()
    assert "λ=1e-02 (fixed)" in text and "not validated" not in text


def test_selection_ranks_partial_runs_only_without_complete_ones(tmp_path, paper):
    """A short finished run must not outrank complete evidence (as the tables report)."""
    make_run(tmp_path, **PER, **SEL, lam=1e-4, final=image(6.0, None))
    make_run(tmp_path, **PER, **SEL, lam=3e-4, final=image(5.0, None), epochs=1, protocol_epochs=2)
    df, _ = collect.collect_runs(tmp_path)
    assert df.partial.tolist() == [False, True]
    assert tables.select_lambda(df, "cifar").lam.tolist() == [1e-4]
    only_partial = df[df.partial]
    assert tables.select_lambda(only_partial, "cifar").lam.tolist() == [3e-4]


def test_a_lambda_chosen_on_partial_selection_runs_is_marked_and_not_compared(tmp_path, paper):
    """Smoke selection runs (`max_steps`) choose lambda where no complete one exists: the row
    of complete final runs at that lambda says so and is compared only with `include_partial`."""
    for lam, val in zip(GRID, (6.0, 7.0, 8.0, 9.0)):
        make_run(tmp_path, **PER, **SEL, lam=lam, max_steps=6, final=image(val, None), lam_grid=GRID)
    for seed in range(2):
        make_run(tmp_path, **PER, lam=3e-4, seed=seed, final=image(None, 6.6 + seed / 10), lam_grid=GRID)
    df, _ = collect.collect_runs(tmp_path)
    per = row(tables.cell_results(df, "cifar", paper), method="per")
    assert per.lam == 3e-4 and not per.partial and math.isnan(per["diff"])
    text = tables._cell_text(per, 2)
    assert per.selection_partial and "λ chosen on partial runs" in text and "(not compared: partial)" in text
    per = row(tables.cell_results(df, "cifar", paper, include_partial=True), method="per")
    assert per["diff"] == pytest.approx(6.65 - 6.72)
    for lam, val in zip(GRID, (6.0, 7.0, 8.0, 9.0)):          # complete selection runs: compared
        make_run(tmp_path, **PER, **SEL, lam=lam, seed=1, final=image(val, None), lam_grid=GRID)
    per = row(tables.cell_results(collect.collect_runs(tmp_path)[0], "cifar", paper), method="per")
    assert not per.selection_partial and per["diff"] == pytest.approx(6.65 - 6.72)


def test_chosen_lambda_needs_every_lambda_of_the_grid_and_only_those(tmp_path, capsys):
    from per import sweep
    make_run(tmp_path, **PER, **SEL, lam=1e-4, final=image(6.0, None))
    make_run(tmp_path, **PER, **SEL, lam=3e-4, status="failed", final=image(None, None))
    make_run(tmp_path, **PER, **SEL, lam=1e-2, final=image(1.0, None))      # an earlier --lams sweep
    cell_dir = next((tmp_path / "cifar").glob("*_per_*"))
    phase = functools.partial(_own_phase, cell_dir)
    with pytest.raises(sweep.SelectionError, match="at lambda 0.0003 seed 0; the same command resumes them"):
        sweep.chosen_lambda(phase([1e-4, 3e-4]))
    assert sweep.chosen_lambda(phase([1e-4])) == 1e-4       # 1e-2 scores better but is not in the grid
    two_seeds = dataclasses.replace(phase([1e-4]), seeds=[0, 1])    # SELECT_SEEDS=2: seed 1 never ran
    with pytest.raises(sweep.SelectionError, match="at lambda 0.0001 seed 1; the same command resumes them"):
        sweep.chosen_lambda(two_seeds)


def test_of_two_finished_copies_of_a_run_the_newest_attempt_counts(tmp_path):
    """E.g. a W&B run redone with resume=never beside the old one: which is kept must not
    depend on the (random) run ids; the problem line names both statuses."""
    for name, test, started in (("b_new", 6.0, "2026-11-02T10:00:00+0000"),
                                ("a_old", 9.0, "2026-11-01T10:00:00+0000")):
        run = make_run(tmp_path, preset=name, final={TEST_ERROR: test})
        summary = json.loads((run / "summary.json").read_text())
        summary["attempts"] = [{"code_version": "x", "started": started, "resumed_from": None}]
        (run / "summary.json").write_text(json.dumps(summary))
    df, problems = collect.collect_runs(tmp_path)
    assert len(df) == 1 and df.final_test_error.iloc[0] == 6.0
    assert problems == [f"{tmp_path / 'cifar' / 'a_old'}/lam=0.0,seed=0,val=0 (finished): same run as "
                        f"{tmp_path / 'cifar' / 'b_new'}/lam=0.0,seed=0,val=0 (finished); not counted"]


def test_a_diverged_copy_of_a_counted_run_is_shown_and_not_compared(tmp_path, paper):
    """Of a finished and a diverged copy of one run, the finished one counts (one run per
    identity); the row says a copy diverged and is not compared with the paper."""
    for seed, test in enumerate([7.0, 7.1, 7.2]):
        make_run(tmp_path, seed=seed, final=image(None, test))
    make_run(tmp_path, seed=2, status="diverged", final=image(None, None), preset="copy")
    df, problems = collect.collect_runs(tmp_path)
    assert len(problems) == 1 and df.diverged_copies.tolist() == [0, 0, 1]
    vanilla = row(tables.cell_results(df, "cifar", paper), method="vanilla")
    assert (vanilla.n, vanilla.n_diverged, vanilla.n_diverged_copies) == (3, 0, 1)
    assert vanilla.paper == 7.21 and math.isnan(vanilla["diff"])
    text = tables._cell_text(vanilla, 2)
    assert "1 duplicate diverged" in text and "(not compared: a duplicate diverged)" in text


def test_a_diverged_copy_of_a_selection_run_counts_against_its_lambda(tmp_path):
    """The lowest validation error, but one copy of that run diverged: the lambda ranks as
    unstable (last), as it would with the diverged run counted."""
    grid = [3e-4, 1e-4]
    make_run(tmp_path, method="per", lam=3e-4, val_size=5000, final=image(5.0, None), lam_grid=grid)
    make_run(tmp_path, method="per", lam=3e-4, val_size=5000, status="diverged", final=image(None, None),
             lam_grid=grid, preset="copy")
    make_run(tmp_path, method="per", lam=1e-4, val_size=5000, final=image(5.5, None), lam_grid=grid)
    df, _ = collect.collect_runs(tmp_path)
    chosen = row(tables.select_lambda(df, "cifar"), method="per")
    assert chosen.lam == 1e-4 and chosen.n_scored == 2
    # selection.csv says that the divergence counted against 3e-4 is a copy's.
    scores = row(tables.selection_table(df), method="per", lam=3e-4)
    assert (scores.n, scores.n_diverged, scores.n_diverged_copies) == (1, 1, 1)


def test_a_run_without_a_preset_recorded_before_the_marker_gets_it(tmp_path):
    """Runs written by the entry points record their protocol; without a preset, those
    from before `(no preset)` was recorded get it when collected."""
    run = make_run(tmp_path, seed=1, final=image(None, 7.0))
    _record_protocol(run, {"optim.epochs": 2})
    df, _ = collect.collect_runs(tmp_path)
    assert df.changes.tolist() == ["(no preset)"]


def _record_protocol(run: Path, protocol: dict) -> None:
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "protocol": protocol}))


def _own_phase(cell_dir: Path, lams: list[float]):
    """A selection phase whose config is that of the cell's first run (as `reproduce` composes it)."""
    from per import sweep
    cfg = yaml.safe_load(next(cell_dir.rglob("config.yaml")).read_text())
    return sweep.Phase(sweep.Preset("p", {**cfg, "run_dir": str(cell_dir / "x")}), (), lams, [0], selection=True)


def test_a_run_of_an_older_version_of_its_preset_is_never_reported_as_the_presets(tmp_path, paper):
    """Given the presets' present protocols, a run that recorded another one gets a row of
    its own and is not compared with the paper; runs that recorded none, presets that no
    longer exist, and a key added since at the run's value are not judged."""
    now = {"p": {"optim.lr": 0.1, "model.depth": 56, "optim.new_key": 1}}.get
    recorded = {0: {"optim.lr": 0.1, "model.depth": 56}, 1: {"optim": {"lr": 0.1}, "model": {"depth": 56}},
                2: {"optim.lr": 0.2, "model.depth": 56}, 3: None}
    for seed, protocol in recorded.items():
        run = make_run(tmp_path, preset="p", seed=seed, final=image(None, 7.0 + seed))
        if protocol:
            _record_protocol(run, protocol)
    _record_protocol(make_run(tmp_path, preset="gone", seed=4, final=image(None, 7.0)), {"optim.lr": 0.2})
    df, problems = collect.collect_runs(tmp_path, protocols=now)
    stale = df[df.changes.str.contains(collect.STALE, regex=False)]
    assert stale.seed.tolist() == [2] and stale.changes.tolist() == ["preset=p (changed since the run)"]
    assert [p for p in problems if "changed since the run" in p] == [
        f"{tmp_path}/cifar/p/lam=0.0,seed=2,val=0: its preset p has changed since the run; "
        "reported in a row of its own, not compared with the paper"]
    res = tables.cell_results(df, "cifar", paper)
    assert row(res, changes="").n == 4 and row(res, changes="").paper == 7.21
    old = row(res, changes="preset=p (changed since the run)")
    assert old.n == 1 and math.isnan(old["diff"])


def test_a_reproductions_choice_uses_only_runs_of_its_own_config(tmp_path, caplog):
    """A run at another seed with another config (an older preset) takes no part, as the
    runner would not count it either (`Phase.holds_own_run`); it is named."""
    from per import sweep
    for lam, val in ((1e-4, 6.0), (3e-4, 5.0)):
        make_run(tmp_path, **PER, **SEL, lam=lam, final=image(val, None))
    old = make_run(tmp_path, **PER, **SEL, lam=1e-4, seed=1, final=image(1.0, None))
    phase = _own_phase(next((tmp_path / "cifar").glob("*_per_*")), [1e-4, 3e-4])
    assert sweep.chosen_lambda(phase) == 1e-4            # the seed-1 run's 1.0 counts: same config
    config = yaml.safe_load((old / "config.yaml").read_text())
    config["model"]["norm"] = "bn"                       # as if the preset had changed since
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    assert sweep.chosen_lambda(phase) == 3e-4
    assert f"{old}: another config than this selection's" in caplog.text


@pytest.mark.parametrize("case", ["other_split", "unsettled"])
def test_a_choice_made_off_protocol_is_shown_and_not_compared(tmp_path, paper, case):
    """A grid's lambda chosen on another held-out size than the protocol's 5000 images (the
    5000-image runs were all interrupted), or while selection runs lack a result."""
    grid = {**PER, "lam_grid": [1e-4, 3e-4]}
    if case == "other_split":
        for lam, val in ((1e-4, 6.0), (3e-4, 5.0)):
            make_run(tmp_path, **grid, lam=lam, val_size=64, final=image(val, None))
            make_run(tmp_path, **grid, **SEL, lam=lam, status="interrupted", final=image(None, None))
    else:
        make_run(tmp_path, **grid, **SEL, lam=1e-4, final=image(6.0, None))
        make_run(tmp_path, **grid, **SEL, lam=1e-4, seed=1, status="interrupted", final=image(None, None))
        make_run(tmp_path, **grid, **SEL, lam=3e-4, final=image(5.0, None))
    for seed in range(2):
        make_run(tmp_path, **grid, lam=3e-4, seed=seed, final=image(None, 6.5 + seed / 10))
    df, _ = collect.collect_runs(tmp_path)
    res = tables.cell_results(df, "cifar", paper)
    per = row(res, method="per")
    assert per.lam == 3e-4 and per.n == 2 and per.paper == 6.72 and math.isnan(per["diff"])
    text = tables._cell_text(per, 2)
    if case == "other_split":
        assert per.off_protocol_split and not per.choice_unsettled and per.select_val_size == 64
        assert "λ chosen on 64 held-out images (protocol: 5000)" in text and "other held-out size" in text
    else:
        assert per.choice_unsettled and not per.off_protocol_split and per.n_unsettled == 1
        assert "selection: 1 run without a result" in text and "selection unsettled" in text


def test_a_partial_run_is_left_out_only_beside_a_complete_one_at_its_lambda(tmp_path, paper):
    """Figures draw per lambda: a complete run at another lambda does not hide the chosen
    lambda's partial run, which the table row shows (marked partial)."""
    grid = {**PER, "lam_grid": [1e-4, 3e-4]}
    for lam, val in ((1e-4, 6.0), (3e-4, 5.0)):
        make_run(tmp_path, **grid, **SEL, lam=lam, final=image(val, None))
    make_run(tmp_path, **grid, lam=1e-4, final=image(None, 7.0))
    make_run(tmp_path, **grid, lam=3e-4, max_steps=5, final=image(None, 6.8))      # partial
    df, _ = collect.collect_runs(tmp_path)
    per = row(tables.cell_results(df, "cifar", paper), method="per")
    assert per.lam == 3e-4 and per.n == 1 and per.partial
    assert row(tables.lambda_reports(df, "cifar"), lam=3e-4)["mean"] == 6.8
    curves = tables.at_chosen_lambda(df, tables.report_runs)
    assert curves.lam.tolist() == [3e-4] and curves.partial.tolist() == [True]


def test_a_run_trained_past_its_protocol_is_a_change_even_if_it_did_not_record_it(tmp_path):
    make_run(tmp_path, epochs=300, protocol_epochs=200, changes=[], final=image(None, 7.0))
    make_run(tmp_path, seed=1, epochs=200, protocol_epochs=200, changes=[], final=image(None, 7.0))
    df, _ = collect.collect_runs(tmp_path)
    assert df.sort_values("seed").changes.tolist() == ["trainer.epochs=300", ""]


def test_lambdas_that_agree_to_six_digits_keep_labels_of_their_own(tmp_path):
    """An off-grid lambda next to a grid value is labelled as itself, not as that value."""
    make_run(tmp_path, method="per", lam=1.0000001e-4, lam_grid=[1e-4, 3e-5], final=image(None, 7.0))
    df, _ = collect.collect_runs(tmp_path)
    assert df.changes.tolist() == ["method.lam=0.00010000001 (not in the grid)"]
    assert df.lam_grid.tolist() == ["0.0001, 3e-05"]


LM = {"task": "lm", "dataset": "ptb", "model": "lstm"}
LM_FINAL = {TRAIN_LOSS: 4.0, VAL_PPL: 300.0, TEST_PPL: 290.0}


def test_rows_and_grids_short_of_the_planned_seeds_are_marked_and_not_compared(tmp_path, paper):
    """A reproduction stopped between launches: the LM's 3e-4 ran one seed of three and
    scores best on it; the vanilla image row has one final seed of three. Given the
    planned seeds, neither is compared with the paper and the grid is incomplete; without
    them, as before, they are."""
    for seed, (val, test) in enumerate([(123, 122), (124, 121), (125, 123)]):
        make_run(tmp_path, **LM, seed=seed, final=LM_FINAL, best=lm(val, test))
    grid = {**LM, **PER, "lam_grid": [3e-4, 1e-4, 3e-5]}
    make_run(tmp_path, **grid, lam=3e-4, seed=0, final=LM_FINAL, best=lm(110, 112))
    for lam, (val, test) in ((1e-4, (118, 114)), (3e-5, (119, 100))):
        for seed in range(3):
            make_run(tmp_path, **grid, lam=lam, seed=seed, final=LM_FINAL, best=lm(val, test))
    make_run(tmp_path, final=image(None, 6.0))
    df, _ = collect.collect_runs(tmp_path)

    res = tables.all_results(df, paper, seeds=3, select_seeds=1)
    per = row(res, method="per", split="test")
    assert (per.lam, per.n, per.n_settled, per.seeds_short) == (3e-4, 1, 1, True)
    assert per.grid_incomplete and per.n_scored == 2 and per.not_compared == "seeds missing"
    assert math.isnan(per["diff"])
    assert not row(res, method="vanilla", split="test", task="lm").seeds_short
    vanilla = row(res, method="vanilla", task="cifar")
    assert vanilla.seeds_short and vanilla.not_compared == "seeds missing" and math.isnan(vanilla["diff"])
    t3 = tables.format_table(res, "T3", paper).loc[("lstm", "per"), ("ptb", "test", "perplexity")]
    assert t3 == ("112.0 (n=1) λ=3e-04 · grid incomplete: 2/3 λ scored · results from 1 of 3 seeds"
                  " · paper 114.5 (not compared: seeds missing)")
    t1 = tables.format_table(res, "T1", paper).iloc[0, 0]
    assert t1 == "6.00 (n=1) · results from 1 of 3 seeds · paper 7.21 (not compared: seeds missing)"

    unplanned = tables.all_results(df, paper)
    assert row(unplanned, method="per", split="test")["diff"] == pytest.approx(112 - 114.5)
    assert not row(unplanned, method="per", split="test").grid_incomplete


def test_a_baseline_unfit_to_compare_gives_no_difference(tmp_path, paper):
    """A complete PER row against a partial vanilla row (smoke runs), or one short of its
    seeds: no difference or interval, and the text says why."""
    grid = {**PER, "lam_grid": [1e-4, 3e-5]}
    for lam, val in ((1e-4, 5.9), (3e-5, 6.1)):
        make_run(tmp_path, **grid, **SEL, lam=lam, final=image(val, 6.0))
    for seed, test in enumerate([6.6, 6.7, 6.8]):
        make_run(tmp_path, **grid, lam=1e-4, seed=seed, final=image(None, test))
    for seed, test in enumerate([80.0, 82.0, 84.0]):
        make_run(tmp_path, seed=seed, max_steps=6, final=image(None, test))
    df, _ = collect.collect_runs(tmp_path)
    per = row(tables.cell_results(df, "cifar", paper), method="per")
    assert per.baseline_note == "vanilla: partial" and math.isnan(per.vs_baseline) and math.isnan(per.ci_low)
    assert per["diff"] == pytest.approx(6.7 - 6.72)
    text = tables.format_table(tables.cell_results(df, "cifar", paper), "T1").loc["per", ("cifar10", "resnet56",
                                                                                        "test error (%)")]
    assert text.endswith("· paper 6.72 (-0.02) · vs vanilla: not compared (vanilla: partial)")
    # Both partial (a demo), or partial runs treated as complete: compared.
    both = row(tables.cell_results(df, "cifar", paper, include_partial=True), method="per")
    assert both.baseline_note == "" and both.vs_baseline == pytest.approx(6.7 - 82.0)
    # A complete vanilla row with one seed of three.
    for run_dir in (tmp_path / "cifar").glob("*vanilla*/*"):
        shutil.rmtree(run_dir)
    make_run(tmp_path, final=image(None, 7.2))
    df, _ = collect.collect_runs(tmp_path)
    per = row(tables.cell_results(df, "cifar", paper, seeds=3), method="per")
    assert per.baseline_note == "vanilla: seeds missing" and math.isnan(per.vs_baseline)
    assert row(tables.cell_results(df, "cifar", paper), method="per").vs_baseline == pytest.approx(6.7 - 7.2)


def test_a_lambda_never_validated_is_not_compared(tmp_path, paper):
    """Final runs at a lambda without selection runs or a recorded grid (hand-made or W&B
    records); VCL's fixed weight (a grid of one) stays compared."""
    for seed in range(3):
        make_run(tmp_path, **PER, model="resnet110", lam=1e-4, seed=seed, final=image(None, 6.0))
    df, _ = collect.collect_runs(tmp_path)
    per = row(tables.cell_results(df, "cifar", paper), method="per")
    assert per.not_validated and per.not_compared == "λ not validated" and math.isnan(per["diff"])
    text = tables.format_table(tables.cell_results(df, "cifar", paper), "T1").loc["per"].iloc[0]
    assert text == "6.00 ± 0.00 (n=3) λ=1e-04 (not validated) · paper 6.19 (not compared: λ not validated)"


def test_tables_say_how_lambda_was_chosen(collected, paper, tmp_path):
    df, _ = collected
    tables.write_tables(df, tmp_path, paper, seeds=3, select_seeds=1)
    t1 = (tmp_path / "T1.md").read_text()
    assert ("Here: λ chosen on 5000 held-out training images, over 1-2 finished selection runs of the "
            "chosen λ; 3 seeds planned per row.") in t1
    t3 = (tmp_path / "T3.md").read_text()
    assert "Here: λ chosen on validation perplexity, over 2 finished selection runs of the chosen λ;" in t3
    numbers = pd.read_csv(tmp_path / "T1.csv")
    per = row(numbers, method="per [channels, sum, s=256]")
    assert (per["selection runs of the lambda"], per["seeds planned"], per["runs with a result"]) == (2, 3, 4)


def test_rows_added_for_the_papers_cells_keep_the_order_of_the_rows_with_runs(tmp_path, paper):
    """A method without runs gets its row at its place in the paper's order; rows with
    runs, changed ones included, stay where they were."""
    make_run(tmp_path, final=image(None, 7.0))
    make_run(tmp_path, changes=["optim.epochs=30"], final=image(None, 8.0))
    for method, lam in (("per", 1e-4), ("l2", 1e-4)):
        make_run(tmp_path, method=method, lam=lam, final=image(None, 6.5))
    df, _ = collect.collect_runs(tmp_path)
    t1 = tables.format_table(tables.cell_results(df, "cifar", paper), "T1")
    assert list(t1.index) == ["vanilla", "vanilla {changed: optim.epochs=30}", "bn", "l2", "per"]
    assert t1.loc["bn"].iloc[0] == "— (no runs) · paper 6.95"
    assert t1.loc["vanilla {changed: optim.epochs=30}"].iloc[0].startswith("8.00 (n=1)")
