"""The protocols' parameter groups, as the runner builds them for a preset: which
parameters get weight decay and which learning-rate multiplier."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from experiments.common import BUILD, compose_preset
from per.training.run import build_setup
from per.training.speed import on_generated_data


def _groups(preset: str, *overrides: str) -> dict[str, dict]:
    with tempfile.TemporaryDirectory() as root:
        cfg = on_generated_data(compose_preset(preset, ("trainer.device=cpu", *overrides)), Path(root), 1)
        setup = build_setup(cfg, BUILD[cfg["task"]], torch.device("cpu"))
        return {g["name"]: g for g in setup.optimizer.param_groups}


@pytest.mark.parametrize("preset, wd, bias_wd, bias_lr", [
    ("t1_cifar10_resnet56_per", 1e-4, 1e-4, 0.1),     # Fixup: wd on all, biases/scales at lr/10
    ("t1_cifar10_resnet56_bn", 1e-4, 1e-4, 1.0),      # He et al.: wd on all, one lr
    ("t2_cifar10_elu_per", 1e-4, 0.0, 0.1),           # VCL protocol: no wd on biases, lr/10
    ("t3_ptb_lstm_per", 0.0, 0.0, 1.0),               # word-language-model example: plain SGD
])
def test_protocol_groups(preset, wd, bias_wd, bias_lr):
    groups = _groups(preset, *(("model.hidden_size=16",) if preset.startswith("t3_") else ()))
    assert (groups["default"]["weight_decay"], groups["default"]["lr_mult"]) == (wd, 1.0)
    assert (groups["bias"]["weight_decay"], groups["bias"]["lr_mult"]) == (bias_wd, bias_lr)
    assert "regularizer" not in groups


def test_vcl_betas_get_weight_decay_as_in_the_reference():
    """vcl_tests_main.py registers the betas as `vcl_<i>` model parameters, so they fall
    among the non-bias parameters that get `gamma_l2 = 1e-4`, at the full lr."""
    groups = _groups("t2_cifar10_elu_vcl")
    betas = groups["regularizer"]
    assert (betas["weight_decay"], betas["lr_mult"]) == (1e-4, 1.0)
    assert betas["params"] and all(p.dim() == 3 for p in betas["params"])    # (C, H, W) each
