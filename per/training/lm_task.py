"""Word-level language modelling (PTB, WikiText-2): the task object and its builder.

The PyTorch word-language-model protocol: batchified corpus, BPTT windows, hidden
state carried across windows and detached, perplexity = exp(mean token loss).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from per import models, schema
from per.data.corpus import Corpus, batchify, get_batch
from per.models.lstm import detach_hidden
from per.training.loop import Experiment


def perplexity(loss: float) -> float:
    """exp(loss); inf where it overflows (a diverged run: the loop records it so)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


class LMTask:
    name = "lm"
    items = "tokens"
    selection_metric = schema.VAL_PPL

    def __init__(self, model: nn.Module, train: torch.Tensor, evals: dict[str, torch.Tensor], *,
                 bptt: int, autocast: Callable, eval_limit: int | None = None) -> None:
        self.model = model
        self.train = train            # (L, B) token ids
        self.evals = evals            # "val" and "test": (L, B_eval)
        self.bptt = bptt
        self.autocast = autocast
        self.eval_limit = eval_limit  # BPTT windows per split (debug runs); None = all
        self.hidden = None            # carried across the windows of an epoch

    def batches_per_epoch(self) -> int:
        return math.ceil((self.train.size(0) - 1) / self.bptt)

    def train_batches(self, epoch: int, start: int) -> Iterator:
        if start == 0 or self.hidden is None:
            self.hidden = self.model.init_hidden(self.train.size(1))
        for i in range(start * self.bptt, self.train.size(0) - 1, self.bptt):
            yield get_batch(self.train, i, self.bptt)

    def train_step(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        x, y = batch                                  # (T, B) each
        self.hidden = detach_hidden(self.hidden)
        logits, self.hidden = model(x, self.hidden)   # (T, B, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
        return loss, {"items": y.numel()}

    def train_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        loss = sums["loss"] / sums["items"]
        return {schema.TRAIN_LOSS: loss, "train_ppl": perplexity(loss)}

    def _windows(self, data: torch.Tensor) -> range:
        starts = range(0, data.size(0) - 1, self.bptt)
        return starts[:self.eval_limit]

    def eval_batches(self) -> int:
        return sum(len(self._windows(data)) for data in self.evals.values())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, on_batch: Callable[[], None] | None = None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        out = {}
        for split, data in self.evals.items():
            hidden = model.init_hidden(data.size(1))
            total = torch.zeros((), device=data.device, dtype=torch.float64)
            tokens = 0
            for i in self._windows(data):
                x, y = get_batch(data, i, self.bptt)
                with self.autocast():
                    logits, hidden = model(x, hidden)
                total += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1),
                                         reduction="sum")
                tokens += y.numel()
                if on_batch is not None:
                    on_batch()
            loss = float(total) / tokens
            out[f"{split}_loss"] = loss
            out[f"{split}_ppl"] = perplexity(loss)
        model.train(was_training)
        return out

    def probe_forward(self, model: nn.Module) -> None:
        data = self.evals["val"]
        x, _ = get_batch(data, 0, self.bptt)
        with self.autocast():
            model(x, model.init_hidden(data.size(1)))

    def state_dict(self) -> dict:
        return {"hidden": self.hidden}

    def load_state_dict(self, state: dict) -> None:
        self.hidden = state["hidden"]


def build_lm_experiment(cfg: dict, device: torch.device, autocast: Callable) -> Experiment:
    """Corpus, model and task from the plain config dict (see configs/train_lm.yaml)."""
    data, mcfg = cfg["data"], dict(cfg["model"])
    corpus = Corpus(data["root"], data["name"], download=data["download"],
                    verify_checksums=data["verify_checksums"])
    name = mcfg.pop("name")
    method = cfg["method"]["name"]
    model = models.create(name, vocab_size=len(corpus.vocab), rbn=method == "rbn", **mcfg).to(device)
    evals = {"val": batchify(corpus.valid, data["eval_batch_size"], device),
             "test": batchify(corpus.test, data["eval_batch_size"], device)}
    task = LMTask(model, batchify(corpus.train, data["batch_size"], device), evals,
                  bptt=data["bptt"], autocast=autocast, eval_limit=cfg["trainer"]["limit_eval_batches"])
    return Experiment(model, task)
