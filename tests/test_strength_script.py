"""`make strength` end to end on generated data with tiny models: the table, its
invariants (parameter share linear in lambda, sum = N x mean), and the ablation grids."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from runner_utils import ROOT

pytestmark = pytest.mark.slow


def test_strength_script_on_generated_data(tmp_path):
    out = tmp_path / "strength"
    cmd = [sys.executable, str(ROOT / "scripts/strength.py"), "--steps", "2",
           "--families", "LSTM", "Fixup ResNet-56", "--data-root", str(tmp_path / "absent"),
           "--out", str(out),
           "--override-cifar", "model=resnet20",      # the family's code path at a third of the cost
           "--override-cifar", "data.batch_size=4", "--override-cifar", "method.lam_grid=[1e-3,1e-4]",
           "--override-cifar", "data.eval_batch_size=64",
           "--override-lm", "data.batch_size=3", "--override-lm", "model.hidden_size=8",
           "--override-lm", "data.bptt=5"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    df = pd.read_csv(out / "strength.csv")
    assert set(df.data) == {"generated"}
    assert set(df["when"]) == {"init", "step 2"}
    fixup = df[df.family == "Fixup ResNet-56"]
    assert set(zip(fixup.kind, fixup.layout, fixup.reduction)) == {
        (k, lay, r) for k in ("per", "l1", "l2") for lay in ("channels", "flatten")
        for r in ("sum", "mean")}
    assert (df.ratio_min <= df.ratio_median).all() and (df.ratio_median <= df.ratio_max).all()
    assert (df.param_share > 0).all() and (df.sites > 0).all()
    # The penalty's parameter gradient is linear in lambda at fixed weights.
    key = ["family", "kind", "layout", "reduction", "when"]
    for _, g in df.groupby(key):
        ratio = g.param_share / g.lam
        assert ratio.max() == pytest.approx(ratio.min(), rel=1e-3)
    # LSTM: every site has N = bptt * batch = 15 points, so sum = 15 x mean on the parameters.
    lm = df[df.family == "LSTM"].set_index(["kind", "lam", "when", "reduction"]).param_share.unstack()
    assert (lm["sum"] / lm["mean"]).to_numpy() == pytest.approx(15.0, rel=1e-3)
    grids = json.loads((out / "ablation_grids.json").read_text())["grids"]
    assert grids["channels_sum"] == {"scale": 1.0, "lam_grid": [1e-3, 1e-4]}
    assert set(grids) == {"channels_sum", "channels_mean", "flatten_sum", "flatten_mean"}
    assert grids["channels_mean"]["scale"] > 100      # mean divides each site by N = B*H*W
    md = (out / "strength.md").read_text()
    assert "| Fixup ResNet-56 | per | channels | sum | 0.0001 |" in md
