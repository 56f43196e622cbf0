"""per.analysis.curves: per-epoch curves side by side with the paper's numbers."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from per.analysis.curves import curves_markdown, epoch_curves, paper_numbers
from runner_utils import ROOT


def _run(path, method: str, rows: list[dict]) -> None:
    path.mkdir(parents=True)
    cell = {"table": "T3", "dataset": "ptb", "model": "lstm", "activation": "tanh", "method": method}
    (path / "summary.json").write_text(json.dumps({"status": "finished", "cell": cell}))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_curves_side_by_side_with_paper(tmp_path):
    _run(tmp_path / "v", "vanilla", [{"epoch": 1, "val_ppl": 300.0}, {"epoch": 2, "val_ppl": 200.0}])
    _run(tmp_path / "p", "per", [{"epoch": 1, "val_ppl": 310.0, "grad_ratio/0": 0.01,
                                  "grad_ratio/1": 0.03, "grad_ratio/2": None}])
    runs = {"vanilla": tmp_path / "v", "per": tmp_path / "p"}
    curves = epoch_curves(runs, ["val_ppl", "grad_ratio"])
    assert curves.loc[2, ("val_ppl", "vanilla")] == 200.0
    assert curves.loc[1, ("grad_ratio", "per")] == pytest.approx(0.02)   # median over sites
    assert curves.loc[2, ("val_ppl", "per")] != curves.loc[2, ("val_ppl", "per")]   # NaN: no epoch 2
    paper = paper_numbers(runs, ["val_ppl", "grad_ratio"])
    assert paper == {("val_ppl", "vanilla"): 123.2, ("val_ppl", "per"): 118.5}
    md = curves_markdown(curves, paper)
    assert md.splitlines()[0] == ("| epoch | val_ppl (per) | val_ppl (vanilla) | grad_ratio (per) "
                                  "| grad_ratio (vanilla) |")
    assert "| 1 | 310.0 | 300.0 | 0.02 | - |" in md
    assert md.splitlines()[-1] == "| paper | 118.5 | 123.2 | - | - |"


def test_selection_runs_get_no_paper_number(tmp_path):
    _run(tmp_path / "sel", "per", [{"epoch": 1, "val_ppl": 300.0}])
    (tmp_path / "sel" / "config.yaml").write_text("data:\n  val_size: 5000\n")
    _run(tmp_path / "fin", "per", [{"epoch": 1, "val_ppl": 300.0}])
    (tmp_path / "fin" / "config.yaml").write_text("data:\n  val_size: 0\n")
    paper = paper_numbers({"sel": tmp_path / "sel", "fin": tmp_path / "fin"}, ["val_ppl"])
    assert paper == {("val_ppl", "fin"): 118.5}


def test_curves_script_writes_csv_and_markdown(tmp_path):
    _run(tmp_path / "v", "vanilla", [{"epoch": 1, "val_ppl": 300.0, "test_ppl": 290.0}])
    out = tmp_path / "out" / "ptb"
    subprocess.run([sys.executable, str(ROOT / "scripts/curves.py"), "--run", f"vanilla={tmp_path / 'v'}",
                    "--out", str(out)], check=True, capture_output=True, text=True)
    assert "| paper | 123.2 | 122.0 |" in (out.with_suffix(".md")).read_text()
    assert out.with_suffix(".csv").exists()
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/curves.py"), "--run", f"vanilla={tmp_path / 'v'}",
                          "--run", f"per={tmp_path / 'nope'}", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True)       # a run without rows lost its column silently
    assert bad.returncode == 2 and f"no metrics.jsonl rows in per={tmp_path / 'nope'}" in bad.stderr
