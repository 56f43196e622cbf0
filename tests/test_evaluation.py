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


def test_image_task_evaluates_with_its_default_precision_context() -> None:
    """ImageTask built without `autocast` (the library's own use) evaluates in full precision."""
    from per.data.cifar import DeviceLoader
    from per.training.image_task import ImageTask

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8, generator=gen)
    y = torch.arange(8) % 2
    loader = DeviceLoader(x, y, 4, device="cpu", train=False, mean=(0.5,) * 3, std=(0.25,) * 3)
    task = ImageTask(loader, {"test": loader}, probe=None)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))
    out = task.evaluate(model)
    assert set(out) == {"test_error", "test_loss"} and 0.0 <= out["test_error"] <= 100.0
