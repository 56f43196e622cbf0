"""Activation snapshots (Figures 3-4): batch statistics on the probe batch, no dropout,
no regularizer, and no trace in the model's state, its modes or the RNG streams."""
from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
import torch.nn as nn

from per import Regularizer, capture_sites, models, to_points
from per.training.monitor import DROPOUT_MODULES, activation_stats, default_monitor_sites


def snapshot(model: nn.Module, forward: Callable[[], object], sites: list[str]) -> list[dict]:
    return activation_stats(model, forward, sites, num_units=4, layout="channels", num_slices=16,
                            step=3, epoch=0.0)


def reference_points(model: nn.Module, forward: Callable[[nn.Module], object], sites: list[str],
                     train: bool) -> dict[str, torch.Tensor]:
    """Site points (N, d) of a deep copy run in train mode with dropout off (train=True) or in
    eval mode (train=False)."""
    ref = copy.deepcopy(model).train(train)
    for m in ref.modules():
        if isinstance(m, DROPOUT_MODULES):
            m.eval()
    with torch.no_grad(), capture_sites(ref, sites) as captured:
        forward(ref)
    return {n: to_points(captured[n][0], "channels") for n in sites}


def assert_no_trace(model: nn.Module, run: Callable[[], object]) -> None:
    """`run()` changes no parameter or buffer, no module's mode and no global RNG state."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    run()
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)


@pytest.mark.parametrize("was_training", [True, False])
def test_bn_snapshot_is_the_batch_statistics_forward(was_training: bool) -> None:
    torch.manual_seed(0)
    model = models.create("resnet20", norm="bn")
    x = 2.0 * torch.randn(16, 3, 32, 32) + 1.0
    with torch.no_grad():
        model.train()(torch.randn(16, 3, 32, 32))   # running statistics away from init
    model.train(was_training)
    sites = default_monitor_sites(model)
    rows = []
    assert_no_trace(model, lambda: rows.extend(snapshot(model, lambda: model(x), sites)))
    batch = reference_points(model, lambda m: m(x), sites, train=True)
    running = reference_points(model, lambda m: m(x), sites, train=False)
    for row in rows:
        units = batch[row["site"]][:, :4]
        assert torch.allclose(torch.tensor(row["mean"]), units.mean(0), atol=1e-5)
        assert torch.allclose(torch.tensor(row["var"]), units.var(0), rtol=1e-4)
        assert torch.allclose(torch.tensor(row["q50"]), torch.quantile(units, 0.5, dim=0),
                              atol=1e-5)
        assert not torch.allclose(torch.tensor(row["mean"]), running[row["site"]][:, :4].mean(0),
                                  atol=1e-3)


def test_elu_net_snapshot_without_dropout_or_penalty() -> None:
    """The deep ELU net (BN and dropout after stacks 2-6): dropout is off during the
    snapshot, so it draws no random numbers; an attached PER regularizer does not act."""
    torch.manual_seed(0)
    model = models.create("elu_cnn11", norm="bn").train()
    reg = Regularizer(model, "per", 1.0, num_slices=8, path="autograd")
    reg.begin_step(track=True)
    x = torch.randn(8, 3, 32, 32)
    sites = default_monitor_sites(model)
    rows = []
    assert_no_trace(model, lambda: rows.extend(snapshot(model, lambda: model(x), sites)))
    assert float(reg.penalty()) == 0.0 and reg.site_stats() == {}
    assert snapshot(model, lambda: model(x), sites) == rows
    expected = reference_points(model, lambda m: m(x), sites, train=True)
    for row in rows:
        assert torch.allclose(torch.tensor(row["mean"]), expected[row["site"]][:, :4].mean(0),
                              atol=1e-5)


def test_recurrent_bn_lstm_snapshot_leaves_no_trace() -> None:
    """VD-LSTM with recurrent BN: per-step running statistics and trained length restored."""
    torch.manual_seed(0)
    model = models.create("vd_lstm", vocab_size=50, hidden_size=8, num_layers=2, dropout=0.5, rbn=True).train()
    tokens = torch.randint(0, 50, (5, 4))
    sites = default_monitor_sites(model)
    assert_no_trace(model, lambda: snapshot(model, lambda: model(tokens, model.init_hidden(4)),
                                            sites))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(tokens, model.init_hidden(4))   # a plain training forward does change them
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
