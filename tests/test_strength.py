"""per.strength: gradient ratios against quantities written out by hand."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import per
from per.analysis.strength import off_band, round_1_3
from per.strength import measure_strength


def _bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), per.Site(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), per.Site(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_single_site_ratio_and_param_share_by_hand():
    # One site right after a linear layer: d(task)/dh = w, and the penalty's
    # parameter gradient is the site gradient pulled back through the layer.
    torch.manual_seed(1)
    lin, site = nn.Linear(5, 4), per.Site()
    model = nn.Sequential(lin, site)
    x, w = torch.randn(8, 5), torch.randn(8, 4)
    lam = 3e-2
    got = measure_strength(model, lambda: (model(x) * w).sum(), "l2", lam)
    h = lin(x).detach()
    g = lam * 2 * h                                   # sum reduction: lam * 2 h_i per point
    assert got.site_ratios["1"] == pytest.approx(float(g.norm() / w.norm()), rel=1e-5)
    # dW = G^T x, db = sum_i G_i for an upstream gradient G at the site.
    def pnorm(G):
        return math.sqrt(float((G.T @ x).square().sum() + G.sum(0).square().sum()))
    assert got.param_share == pytest.approx(pnorm(g) / pnorm(w), rel=1e-5)
    mean = measure_strength(model, lambda: (model(x) * w).sum(), "l2", lam, reduction="mean")
    assert mean.site_ratios["1"] == pytest.approx(got.site_ratios["1"] / 8, rel=1e-5)
    as_numpy = measure_strength(model, lambda: (model(x) * w).sum(), "l2", np.float32(lam))
    assert as_numpy.site_ratios["1"] == pytest.approx(got.site_ratios["1"], rel=1e-5)   # one lambda, not a list


def test_task_only_ratios_by_hand_where_a_later_penalty_joins_the_downstream_gradient():
    torch.manual_seed(2)
    lin1, lin2 = nn.Linear(5, 4), nn.Linear(4, 3)
    model = nn.Sequential(lin1, per.Site(), lin2, per.Site())
    x, w = torch.randn(8, 5), torch.randn(8, 3)
    lam = 0.5                                          # large: the later penalty matters
    got = measure_strength(model, lambda: (model(x) * w).sum(), "l2", lam)
    h1 = lin1(x).detach()
    h2 = lin2(h1).detach()
    g1, g2 = lam * 2 * h1, lam * 2 * h2               # each site's penalty gradient (sum, L2)
    task1, full1 = w @ lin2.weight.detach(), (w + g2) @ lin2.weight.detach()
    assert got.site_ratios["1"] == pytest.approx(float(g1.norm() / full1.norm()), rel=1e-5)
    assert got.task_site_ratios["1"] == pytest.approx(float(g1.norm() / task1.norm()), rel=1e-5)
    # The last site sees the task's gradient alone: both ratios agree there.
    assert got.task_site_ratios["3"] == pytest.approx(got.site_ratios["3"], rel=1e-6)
    assert got.site_ratios["3"] == pytest.approx(float(g2.norm() / w.norm()), rel=1e-5)
    assert abs(got.task_site_ratios["1"] / got.site_ratios["1"] - 1) > 0.05   # the case differs


@pytest.mark.parametrize("kind", ["per", "l1", "l2"])
def test_ratios_match_a_training_step_and_leave_the_model_unchanged(kind):
    model, x, y = _bn_cnn(), torch.randn(6, 3, 5, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    lams = [1e-3, 1e-1]
    got = measure_strength(model, lambda: F.cross_entropy(model(x), y), kind, lams, seed=4,
                           num_slices=8)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k           # BN running statistics restored
    assert all(p.grad is None for p in model.parameters())
    assert per.list_sites(model)["3"].penalty_fn is None   # regularizer detached
    # The same numbers a tracked training step logs as grad_ratio/<site>.
    reg = per.Regularizer(model, kind, lams[1], num_slices=8)
    torch.manual_seed(4)
    reg.begin_step(track=True)
    F.cross_entropy(model(x), y).backward()
    logged = {k.split("/")[1]: float(v) for k, v in reg.site_stats().items() if "grad_ratio" in k}
    assert got[1].site_ratios == pytest.approx(logged, rel=1e-5)
    # Ratios grow with lambda; the parameter share is linear in it.
    assert all(got[1].site_ratios[s] > got[0].site_ratios[s] for s in logged)
    assert got[1].param_share == pytest.approx(100 * got[0].param_share, rel=1e-4)


def test_rejects_kinds_without_closed_form():
    with pytest.raises(ValueError, match="per, l1, l2"):
        measure_strength(nn.Sequential(per.Site("pre")), lambda: torch.zeros(()), "vcl", 0.1)
    with pytest.raises(ValueError, match="path"):   # was a duplicate-keyword TypeError
        measure_strength(nn.Sequential(per.Site("pre")), lambda: torch.zeros(()), "per", 0.1,
                         path="autograd")


@pytest.mark.parametrize("x, want", [(3.3e-4, 3e-4), (1.6e-4, 1e-4), (1.8e-4, 3e-4), (0.01, 0.01),
                                     (5.4e-7, 3e-7), (5.5e-7, 1e-6), (30.1, 30.0)])
def test_round_1_3_is_nearest_on_a_log_scale(x, want):
    assert round_1_3(x) == want      # exact decimals: grids written to presets stay readable


def _strength_rows(ratios: dict[tuple[str, str, float, str], float]) -> pd.DataFrame:
    """strength.csv rows (channels, sum) of (family, kind, lam, when) -> median site ratio."""
    return pd.DataFrame([{"family": fam, "kind": kind, "layout": "channels", "reduction": "sum", "lam": lam,
                          "when": when, "ratio_median": r} for (fam, kind, lam, when), r in ratios.items()])


def test_band_warning_says_where_the_median_site_ratio_lies():
    from per.strength import band_warning
    assert band_warning({"a": 1e-3, "b": 0.5, "c": float("nan")}) is None and band_warning({}) is None
    assert band_warning({"a": 1e-6, "b": 2e-6, "c": 0.5}) == (
        "median site grad_ratio 2e-06 over 3 sites (range 1e-06..0.5), below 0.001: the penalty barely acts")
    assert band_warning({"a": 2.0, "b": 3.0}).endswith("above 1: the penalty outweighs the task's gradient")
    assert "inf: the task's gradient is zero at most sites" in band_warning({"a": math.inf, "b": math.inf, "c": 1.0})


def test_off_band_names_each_measurement_of_a_lambda_outside_the_band():
    df = _strength_rows({("F", "per", 1e-4, "init"): math.inf, ("F", "per", 1e-4, "step 300"): 0.124,
                         ("F", "per", 1e-5, "init"): 0.5, ("F", "per", 1e-5, "step 300"): 0.2,
                         ("L", "per", 1e-4, "init"): 1.7e-4, ("L", "per", 1e-4, "step 300"): 3.6e-4})
    assert off_band(df, "F", "per", "channels", "sum", 1e-4) == "inf at init (inside: 0.124 after step 300)"
    assert off_band(df, "L", "per", "channels", "sum", 1e-4) == "0.00017 at init, 0.00036 after step 300"
    assert off_band(df, "F", "per", "channels", "sum", 1e-5) is None          # inside at both
    assert off_band(df, "F", "per", "flatten", "sum", 1e-4) is None           # not measured
    assert off_band(df, "F", "l2", "channels", "sum", 1e-4) is None
    # Unmeasured lambdas beyond a measurement out of the band on their side: named with it.
    assert off_band(df, "L", "per", "channels", "sum", 1e-6) == (
        "not measured; below 0.001, as at λ=0.0001 (larger, measured): 0.00017 at init, 0.00036 after step 300")
    assert off_band(df, "F", "per", "channels", "sum", 1e-3) is None      # 1e-4 is inf at init only
    assert off_band(df, "F", "per", "channels", "sum", 1e-6) is None      # 1e-5 is inside


def test_the_plan_warns_where_a_presets_own_lambda_was_measured_outside_the_band(tmp_path):
    """`reproduce.py` (DRY_RUN too) names each planned preset whose lambda `make strength`
    measured outside the band on the same model; other models and unmeasured lambdas pass."""
    import runpy

    from experiments.common import compose_preset
    from per import sweep
    warnings = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts/reproduce.py"))["strength_warnings"]
    csv = tmp_path / "strength.csv"
    _strength_rows({("Fixup ResNet-56", "per", 1e-4, "init"): math.inf,
                    ("deep ELU net, relu", "per", 1e-4, "init"): 1e-5}).to_csv(csv, index=False)

    def planned(name, lams):
        return (None, sweep.Phase(sweep.Preset(name, compose_preset(name)), (), lams, [0]))
    phases = [planned("t1_cifar100_resnet56_per", [1e-4, 1e-5]), planned("t1_cifar10_resnet110_per", [1e-4]),
              planned("t1_cifar10_resnet56_bn", [0.0]), planned("t2_cifar10_relu_per", [3e-5])]
    assert warnings(phases, csv) == ["t1_cifar100_resnet56_per: λ=0.0001 on Fixup ResNet-56 (measured on "
                                     "cifar10): inf at init"]
    assert warnings(phases, tmp_path / "none.csv") == []
