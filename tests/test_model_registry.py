"""Every registered model (`per.models.list_models()`), in each of its variants (norm,
recurrent BN): forward on tiny inputs, backward, a finite gradient for every parameter,
and at least one regularizer site."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from per import models, schema
from per.sites import list_sites

# The LSTMs take their sizes from configs/model/*.yaml; here tiny ones.
LSTM_SIZES = {"vocab_size": 20, "hidden_size": 8, "num_layers": 2, "dropout": 0.5}
CASES = [(name, variant) for name in models.list_models()
         for variant in ([{"rbn": False}, {"rbn": True}] if schema.MODEL_TABLE[name] == "T3"
                         else [{"norm": norm} for norm in schema.NORMS])]


def _loss(name: str, model: torch.nn.Module) -> torch.Tensor:
    """Cross-entropy of a tiny batch: images `(2, 3, 32, 32)` for the CIFAR models
    (Tables 1-2), tokens `(T=5, B=3)` for the LSTMs (Table 3)."""
    if schema.MODEL_TABLE[name] == "T3":
        x = torch.randint(0, LSTM_SIZES["vocab_size"], (5, 3))
        logits, _ = model(x, model.init_hidden(3))          # (T, B, V)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), x.reshape(-1))
    logits = model(torch.randn(2, 3, 32, 32))                # (B, classes)
    return F.cross_entropy(logits, torch.tensor([0, 1]))


@pytest.mark.parametrize("name,variant", CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_model_trains_and_has_sites(name, variant):
    torch.manual_seed(0)
    sizes = LSTM_SIZES if schema.MODEL_TABLE[name] == "T3" else {}
    model = models.create(name, **sizes, **variant).train()
    loss = _loss(name, model)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"{name}: no finite gradient for {missing}"
    assert list_sites(model), f"{name} has no Site"
