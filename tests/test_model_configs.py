"""Model settings in configs/model/*.yaml reach the modules they configure."""
from __future__ import annotations

import pytest
import torch.nn as nn

from per import models
from runner_utils import compose_config


def _build(config_name: str, overrides: list[str], **extra) -> nn.Module:
    cfg = compose_config(config_name, overrides, "unused")
    return models.from_config(cfg["model"], **extra)


@pytest.mark.parametrize("overrides,slope", [([], 0.01), (["model.leaky_slope=0.1"], 0.1)])
def test_leaky_slope_from_config(overrides: list[str], slope: float) -> None:
    """Table 2 LeakyReLU: slope 0.01 by default (the VCL code's nn.LeakyReLU()), configurable."""
    model = _build("train_cifar", ["experiment=t2_cifar10_leaky_relu_per", *overrides])
    slopes = [m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert slopes == [slope] * 10


@pytest.mark.parametrize("overrides,length", [([], 100), (["model.rbn_max_length=40"], 40)])
def test_rbn_max_length_from_config(overrides: list[str], length: int) -> None:
    model = _build("train_lm", ["experiment=t3_ptb_vd_lstm_rbn", *overrides],
                   vocab_size=50, hidden_size=8, rbn=True)
    assert [layer["rnn"].max_length for layer in model.layers] == [length, length]
