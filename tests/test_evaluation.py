"""eval_mode: eval mode without autograd for the block, the previous mode restored."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from per.training.evaluation import eval_mode


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_restores_the_mode(training: bool) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5)).train(training)
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
        out = model(torch.randn(4, 3, requires_grad=True))
        assert not out.requires_grad
    assert all(m.training == training for m in model.modules())


def test_eval_mode_restores_the_mode_on_error() -> None:
    model = nn.Linear(2, 2).train()
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("boom")
    assert model.training and torch.is_grad_enabled()
