"""What every evaluation pass shares: eval mode, no autograd, the mode restored after."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode (running BN statistics, no dropout) under `torch.no_grad`
    for the block; on exit its train/eval mode is what it was before.

    Example:
        with eval_mode(model):
            logits = model(x)
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
