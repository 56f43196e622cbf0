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
from per.data.corpus import Corpus, batchify, get_batch, num_windows
from per.models.lstm import detach_hidden
from per.training.evaluation import eval_mode
from per.training.loop import Experiment


def perplexity(loss: float) -> float:
    """exp(loss); inf where it overflows (a diverged run: the loop records it so)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


class LMTask:
    """Next-token cross-entropy on a batchified corpus (the task object `fit` drives).

    Each epoch walks the training stream in BPTT windows of `bptt` steps, carrying the
    hidden state from window to window (detached at each step, reset at the start of
    an epoch; `state_dict` saves it so a mid-epoch resume continues it). Evaluation
    runs every split from a fresh hidden state; metrics are mean token losses and
    their perplexities (`train_ppl`, `val_ppl`, `test_ppl`); lambda and the best
    checkpoint are chosen on `val_ppl`.

    Args:
        model: an LSTM language model (`init_hidden(batch)`, `forward(x, hidden)`).
        train: `(L, B)` token ids (`batchify` of the training split).
        evals: split -> `(L, B_eval)` token ids; `schema.VAL` and `schema.TEST`.
        bptt: window length in tokens.
        autocast: a no-argument factory of the precision context for forward passes.
        eval_limit: windows per split in evaluation (debug runs); None = all.
    """
    name = "lm"
    items = "tokens"
    selection_metric = schema.SELECTION_METRIC[name]

    def __init__(self, model: nn.Module, train: torch.Tensor, evals: dict[str, torch.Tensor], *,
                 bptt: int, autocast: Callable, eval_limit: int | None = None) -> None:
        self.model = model
        self.train = train            # (L, B) token ids
        self.evals = evals            # schema.VAL and schema.TEST: (L, B_eval)
        self.bptt = bptt
        self.autocast = autocast
        self.eval_limit = eval_limit  # BPTT windows per split (debug runs); None = all
        self.hidden = None            # carried across the windows of an epoch

    def batches_per_epoch(self) -> int:
        return num_windows(self.train.numel(), self.train.size(1), self.bptt)

    def train_batches(self, epoch: int, start: int) -> Iterator:
        if start == 0 or self.hidden is None:
            self.hidden = self.model.init_hidden(self.train.size(1))
        for i in range(start * self.bptt, self.train.size(0) - 1, self.bptt):
            yield get_batch(self.train, i, self.bptt)

    def train_step(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        x, y = batch                                  # (T, B) each
        logits, hidden = model(x, self.hidden)        # (T, B, V)
        # Carried to the next window cut from the graph and copied at once: under CUDA graphs
        # (trainer.compile=reduce-overhead) the model's outputs live in buffers that a later
        # replay, of this model or of another compiled one, overwrites.
        self.hidden = detach_hidden(hidden, copy=True)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
        return loss, {"items": y.numel()}

    def train_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        loss = sums["loss"] / sums["items"]
        return {schema.TRAIN_LOSS: loss, schema.TRAIN_PPL: perplexity(loss)}

    def _windows(self, data: torch.Tensor) -> range:
        starts = range(0, data.size(0) - 1, self.bptt)
        return starts[:self.eval_limit]

    def eval_batches(self) -> int:
        return sum(len(self._windows(data)) for data in self.evals.values())

    def evaluate(self, model: nn.Module, on_batch: Callable[[], None] | None = None) -> dict[str, float]:
        out = {}
        with eval_mode(model):
            for split, data in self.evals.items():
                hidden = model.init_hidden(data.size(1))
                total = torch.zeros((), device=data.device, dtype=torch.float64)
                tokens = 0
                for i in self._windows(data):
                    x, y = get_batch(data, i, self.bptt)
                    with self.autocast():
                        logits, hidden = model(x, hidden)
                    hidden = detach_hidden(hidden, copy=True)     # as in train_step: CUDA graphs
                    total += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                             y.reshape(-1), reduction="sum")
                    tokens += y.numel()
                    if on_batch is not None:
                        on_batch()
                loss = float(total) / tokens
                out[schema.metric_key(split, schema.LOSS)] = loss
                out[schema.metric_key(split, schema.PPL)] = perplexity(loss)
        return out

    def probe_forward(self, model: nn.Module) -> None:
        data = self.evals[schema.VAL]
        x, _ = get_batch(data, 0, self.bptt)
        with self.autocast():
            model(x, model.init_hidden(data.size(1)))

    def state_dict(self) -> dict:
        return {"hidden": self.hidden}

    def load_state_dict(self, state: dict) -> None:
        # Detached: checkpoints of older versions hold the state as the model returned it.
        self.hidden = None if state["hidden"] is None else detach_hidden(state["hidden"])


def build_lm_experiment(cfg: dict, device: torch.device, autocast: Callable) -> Experiment:
    """Corpus, model and task from the plain config dict (see configs/train_lm.yaml)."""
    data, mcfg = cfg["data"], cfg["model"]
    corpus = Corpus(data["root"], data["name"], download=data["download"],
                    verify_checksums=data["verify_checksums"])
    model = models.from_config(mcfg, vocab_size=len(corpus.vocab)).to(device)
    evals = {schema.VAL: batchify(corpus.val, data["eval_batch_size"], device),
             schema.TEST: batchify(corpus.test, data["eval_batch_size"], device)}
    for split, tokens in evals.items():   # before training, not at the first evaluation
        if tokens.size(0) < 2:            # an input and its next-token target per column
            raise ValueError(f"the {split} split ({len(getattr(corpus, split))} tokens) holds less than "
                             f"two tokens per column at data.eval_batch_size={data['eval_batch_size']}; "
                             "lower data.eval_batch_size")
    task = LMTask(model, batchify(corpus.train, data["batch_size"], device), evals,
                  bptt=data["bptt"], autocast=autocast, eval_limit=cfg["trainer"]["limit_eval_batches"])
    return Experiment(model, task)
