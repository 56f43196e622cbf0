"""Speed tooling: the benchmark runs at tiny sizes (no time assertions), the DRY_RUN device
estimates pick the right step-time table, and untracked steps skip the penalty value."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import per
from experiments.common import compose_preset
from per import sweep
from per.training import runtime
from runner_utils import ROOT


@pytest.mark.slow   # ~10 s of CPU; longer on a loaded machine
def test_bench_tiny_reports_every_ratio_as_json_lines(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/bench.py"), "--tiny", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [json.loads(line) for line in proc.stdout.splitlines()]
    got = {(r["bench"].split("/")[0], r["candidate"]) for r in rows}
    assert {("step", "per channels"), ("step", "per flatten"), ("step", "l2"), ("step", "per"),
            ("per_grad", "blocked 512 rows"), ("per_grad", "erf only"),
            ("trainer", "dataloader+torchvision")} <= got
    for r in rows:
        assert r["ratio"] > 0 and r["size"] == "tiny" and r["device"]
    assert rows[0]["bench"].startswith("step/resnet20")        # most important first


def _table(path, device: str, times: dict[str, float]) -> None:
    path.write_text(json.dumps({"device": device, "device_type": "cpu", "precision": "fp32",
                                "torch": "x", "recorded": "2020-01-01", "s_per_step": times}))


def test_dry_run_estimates_from_the_matching_table_else_the_measured_one(tmp_path, monkeypatch, capsys):
    names = ["t1_cifar10_resnet56_per", "t1_cifar100_resnet110_per"]
    phases = sweep.plan(names, lambda n, o: sweep.Preset(n, compose_preset(n, o)), [0], [0], 5000)
    _table(tmp_path / "cuda-some-card.json", "Some Card", {"cifar10|resnet56|none|per|channels|256": 0.01})
    sweep.print_plan(phases, "t", tmp_path)
    out = capsys.readouterr().out
    assert "NOT this machine" in out and "Some Card" in out
    here = runtime.device_info(runtime.resolve_device("auto"))
    _table(tmp_path / f"{here['slug']}.json", "This box", {"cifar10|resnet56|none|per|channels|256": 1.0})
    sweep.print_plan(phases, "t", tmp_path)
    out = capsys.readouterr().out
    assert "this machine's This box" in out and "NOT this machine" not in out
    # ResNet-56 CIFAR-10 measured; CIFAR-100 ResNet-110 estimated as twice it ("~"). 4 selection
    # runs each: Fixup's 200 epochs of 128-image batches from 45k images (5k held out).
    select56, select110 = (sweep.steps_per_run(select.preset.cfg) for select, _ in phases)
    assert select56 == select110 == 200 * (45_000 // 128)
    assert f"{4 * select56 / 3600:,.1f}" in out
    assert f"~{2 * 4 * select110 / 3600:,.1f}" in out
    assert " ?" not in out


@pytest.mark.slow
def test_dry_run_prints_device_hours_from_the_shipped_tables():
    for task in ("cifar", "lm"):
        out = subprocess.run([sys.executable, str(ROOT / "scripts/reproduce.py"), "--task", task,
                              "--dry-run"], capture_output=True, text=True, check=True).stdout
        assert "step times: " in out and "device-hours on " in out, out


def test_untracked_backward_steps_skip_the_penalty_value(monkeypatch):
    calls = []
    site_value = per.regularizers._site_value
    monkeypatch.setattr(per.regularizers, "_site_value", lambda *a: calls.append(1) or site_value(*a))
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), per.Site(), nn.Linear(8, 2))
    reg = per.Regularizer(model, "per", 1e-2, num_slices=8)
    for track in (False, True):
        reg.begin_step(track=track)
        model(torch.randn(5, 4)).sum().backward()
        assert len(calls) == int(track) and bool(reg.site_stats()) == track
