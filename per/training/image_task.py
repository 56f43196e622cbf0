"""Image classification on CIFAR-10/100: the task object and its builder."""
from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from per import models, schema
from per.data.cifar import (DeviceLoader, input_normalization, load_cifar, mixup,
                            split_train_val)
from per.training.checks import ConfigValueError
from per.training.evaluation import eval_mode
from per.training.loop import Experiment


class ImageTask:
    """Cross-entropy training on device-resident CIFAR; errors in percent.

    `autocast`: a no-argument factory of the precision context for forward passes
    (default: none)."""
    name = "cifar"
    items = "images"

    def __init__(self, train: DeviceLoader, evals: dict[str, DeviceLoader], probe: torch.Tensor | None,
                 *, mixup_alpha: float = 0.0, autocast: Callable = contextlib.nullcontext,
                 eval_limit: int | None = None) -> None:
        self.train = train
        self.evals = evals            # schema.VAL (optional) and schema.TEST
        self.eval_limit = eval_limit  # batches per split (debug runs); None = all
        self.probe = probe            # (P, 3, 32, 32) fixed test images for monitoring, or None
        self.mixup_alpha = mixup_alpha
        self.autocast = autocast
        self.selection_metric = schema.SELECTION_METRIC[self.name] if schema.VAL in evals else None

    def batches_per_epoch(self) -> int:
        return len(self.train)

    def train_batches(self, epoch: int, start: int) -> Iterator:
        return self.train.epoch(epoch, start)

    def train_step(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        x, y = batch                                  # x: (B, 3, 32, 32), y: (B,)
        if self.mixup_alpha > 0:
            x, y_a, y_b, lam = mixup(x, y, self.mixup_alpha)
            logits = model(x)
            loss = lam * F.cross_entropy(logits, y_a) + (1 - lam) * F.cross_entropy(logits, y_b)
            pred = logits.argmax(1)
            errors = y.numel() - (lam * (pred == y_a).sum() + (1 - lam) * (pred == y_b).sum())
        else:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            errors = (logits.argmax(1) != y).sum()
        return loss, {"items": y.numel(), "errors": errors}

    def train_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {schema.TRAIN_LOSS: sums["loss"] / sums["items"],
                schema.TRAIN_ERROR: 100.0 * sums["errors"] / sums["items"]}

    def eval_batches(self) -> int:
        return sum(min(len(loader), self.eval_limit or len(loader)) for loader in self.evals.values())

    def evaluate(self, model: nn.Module, on_batch: Callable[[], None] | None = None) -> dict[str, float]:
        out = {}
        with eval_mode(model):
            for split, loader in self.evals.items():
                n = 0
                e_sum = torch.zeros((), device=loader.device)
                l_sum = torch.zeros((), device=loader.device)
                for x, y in itertools.islice(loader.epoch(0), self.eval_limit):
                    with self.autocast():
                        logits = model(x)
                    l_sum += F.cross_entropy(logits.float(), y, reduction="sum")
                    e_sum += (logits.argmax(1) != y).sum()
                    n += y.numel()
                    if on_batch is not None:
                        on_batch()
                out[schema.metric_key(split, schema.ERROR)] = 100.0 * float(e_sum) / n
                out[schema.metric_key(split, schema.LOSS)] = float(l_sum) / n
        return out

    def probe_forward(self, model: nn.Module) -> None:
        with self.autocast():
            model(self.probe)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_image_experiment(cfg: dict, device: torch.device, autocast: Callable) -> Experiment:
    """Data, model and task from the plain config dict (see configs/train_cifar.yaml)."""
    data, mcfg = cfg["data"], cfg["model"]
    arrays = load_cifar(data["name"], data["root"], download=data["download"],
                        verify_checksums=data["verify_checksums"])
    if data["val_size"] >= len(arrays.train_x):     # known only once the data are read
        raise ConfigValueError(f"data.val_size={data['val_size']}: expected fewer than the "
                               f"{len(arrays.train_x)} training images of {data['name']}")
    train_x, train_y, val_x, val_y = split_train_val(arrays.train_x, arrays.train_y,
                                                     data["val_size"], seed=cfg["seed"])
    # Statistics of the training split in use (45k when val_size > 0), computed once.
    norm = input_normalization(data["normalize"], data["name"], train_x)
    channels_last = cfg["trainer"]["channels_last"]

    def loader(x, y, batch_size, train):
        return DeviceLoader(x, y, batch_size, device=device, train=train, mean=norm.mean,
                            std=norm.std, pad_space=norm.pad_space, seed=cfg["seed"],
                            drop_last=train and data["drop_last"], channels_last=channels_last)

    evals = {}
    if data["val_size"] > 0:
        evals[schema.VAL] = loader(val_x, val_y, data["eval_batch_size"], False)
    evals[schema.TEST] = loader(arrays.test_x, arrays.test_y, data["eval_batch_size"], False)
    probe = next(iter(loader(arrays.test_x[:data["probe_size"]], arrays.test_y[:data["probe_size"]],
                             data["probe_size"], False).epoch(0)))[0]

    model = models.from_config(mcfg, num_classes=arrays.num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    task = ImageTask(loader(train_x, train_y, data["batch_size"], True), evals, probe,
                     mixup_alpha=data["mixup_alpha"], autocast=autocast,
                     eval_limit=cfg["trainer"]["limit_eval_batches"])
    return Experiment(model, task)
