"""The protocols' parameter groups, as the runner builds them for a preset: which
parameters get weight decay and which learning-rate multiplier."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import torch

from experiments.common import BUILD, compose_preset
from per.training.optim import create_optimizer, load_optimizer_state, param_groups, set_lr
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
    assert all(g["fused"] for g in groups.values())            # the fused update on CPU and CUDA


def test_vcl_betas_get_weight_decay_as_in_the_reference():
    """vcl_tests_main.py registers the betas as `vcl_<i>` model parameters, so they fall
    among the non-bias parameters that get `gamma_l2 = 1e-4`, at the full lr."""
    groups = _groups("t2_cifar10_elu_vcl")
    betas = groups["regularizer"]
    assert (betas["weight_decay"], betas["lr_mult"]) == (1e-4, 1.0)
    assert betas["params"] and all(p.dim() == 3 for p in betas["params"])    # (C, H, W) each


def _updated(groups_of, device: str, fused: bool, steps: int = 4) -> list[torch.Tensor]:
    """The parameters of a small model after `steps` SGD steps with momentum, Nesterov, weight
    decay and lr multipliers (the protocols' settings), fused or on torch's default path."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1)).to(device)
    opt = create_optimizer(groups_of(model), lr=0.1, momentum=0.9, nesterov=True,
                           device=torch.device(device) if fused else None)
    assert [g["fused"] for g in opt.param_groups] == [fused or None] * len(opt.param_groups)
    for step in range(steps):
        set_lr(opt, 0.1 if step < 2 else 0.01)
        opt.zero_grad(set_to_none=True)
        model(torch.randn(8, 6).to(device)).pow(2).mean().backward()
        opt.step()
    return [p.detach().cpu() for p in model.parameters()]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_the_fused_update_is_torchs_update(device):
    """SGD's fused kernel (the runner's on CPU and CUDA) gives the default path's parameters."""
    groups_of = functools.partial(param_groups, weight_decay=1e-4, bias_lr_mult=0.1)
    for fused, default in zip(_updated(groups_of, device, True), _updated(groups_of, device, False)):
        torch.testing.assert_close(fused, default, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("saved_on, resumed_on", [(None, "cpu"), ("cpu", None)])
def test_a_resumed_optimizer_keeps_its_own_kernels(saved_on, resumed_on):
    """torch restores a checkpoint's param groups whole, `fused` and `foreach` included:
    `load_optimizer_state` keeps the resuming run's choice and takes the saved state."""
    params = [torch.nn.Parameter(torch.ones(3))]

    def sgd(on):
        return create_optimizer([{"params": params}], lr=0.1, momentum=0.9,
                                device=torch.device(on) if on else None)

    saved = sgd(saved_on)
    params[0].grad = torch.ones(3)
    saved.step()
    resumed = sgd(resumed_on)
    load_optimizer_state(resumed, saved.state_dict())
    assert resumed.param_groups[0]["fused"] == (True if resumed_on else None)
    torch.testing.assert_close(resumed.state[params[0]]["momentum_buffer"], torch.ones(3))
