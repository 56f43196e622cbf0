"""Word-level LSTM language models of Table 3: LSTM, RE-LSTM, VD-LSTM, RE-VD-LSTM.

Embedding -> dropout -> [LSTM layer -> Site -> dropout] x num_layers -> Linear decoder,
as the PyTorch word-language-model example, with one single-layer LSTM per layer so
each layer's hidden output is a named site (`layers.{l}.site`, before dropout).

- `re_*` (tied): the decoder weight is the embedding weight (same Parameter).
- `vd_*`: dropout 0.5 (their configs), variational (locked) by default: one mask `(1, B, F)` per
  forward call, shared over time (AWD-LSTM's LockedDropout); `dropout_type="standard"`
  draws a fresh mask per element and step (the PyTorch example).
- `rbn=True`: recurrent batch normalization (Cooijmans et al. 2016) in a custom
  layer (`RBNLSTMLayer`); otherwise nn.LSTM (cuDNN on GPU).

Hidden state: a list with one `(h, c)` per layer, each `(1, B, H)`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..sites import Site
from . import register

DROPOUT_TYPES = ("variational", "standard")
Hidden = list[tuple[torch.Tensor, torch.Tensor]]


class SequenceDropout(nn.Module):
    """Dropout on sequences `x: (T, B, F)`.

    "variational": one Bernoulli mask `(1, B, F)` per call, shared over time, scaled
    by `1 / (1 - p)`. "standard": `F.dropout` (fresh mask per element). Identity in
    eval mode or with `p = 0`.
    """

    def __init__(self, p: float, dropout_type: str = "variational") -> None:
        super().__init__()
        if dropout_type not in DROPOUT_TYPES:
            raise ValueError(f"unknown dropout_type {dropout_type!r}; "
                             f"valid: {', '.join(DROPOUT_TYPES)}")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p
        self.dropout_type = dropout_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.dropout_type == "standard":
            return F.dropout(x, self.p, training=True)
        mask = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1.0 - self.p) / (1.0 - self.p)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}, dropout_type={self.dropout_type!r}"


class RBNLSTMLayer(nn.Module):
    """One LSTM layer with recurrent batch normalization (Cooijmans et al. 2016).

        gates_t = BN_x(W_x x_t) + BN_h(W_h h_{t-1}) + b          (order i, f, g, o)
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(BN_c(c_t))

    BN_x and BN_h have a gain only (their shift is `b`); BN_c has gain and shift.
    Gains start at 0.1, shifts at 0. In training, each time step is normalized with
    its own batch statistics; population statistics (moving averages, momentum 0.1, as
    jihunchoi's; the paper averages over the training set) are kept per time step
    t = 0 .. max_length - 1 of the forward call (training steps beyond update the
    last slot). `trained_length` records the longest window trained on (at most
    max_length); in eval mode step t uses slot min(t, trained_length - 1), so steps
    beyond the longest trained window reuse the last trained step's statistics
    (Cooijmans et al. 2016), never untouched slots. t counts from the start of each
    forward call (one BPTT window), while h and c carry over between calls. Init as
    jihunchoi's bnlstm: W_x orthogonal, W_h the identity tiled 4x, b = 0.

    W_x x and BN_x run for all time steps at once; only the recurrent part loops.
    """

    def __init__(self, input_size: int, hidden_size: int, max_length: int = 100,
                 momentum: float = 0.1, eps: float = 1e-5, gamma_init: float = 0.1) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.max_length, self.momentum, self.eps = max_length, momentum, eps
        h4 = 4 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(h4, input_size))
        self.weight_hh = nn.Parameter(torch.eye(hidden_size).repeat(4, 1))
        self.bias = nn.Parameter(torch.zeros(h4))
        self.gamma_x = nn.Parameter(torch.full((h4,), gamma_init))
        self.gamma_h = nn.Parameter(torch.full((h4,), gamma_init))
        self.gamma_c = nn.Parameter(torch.full((hidden_size,), gamma_init))
        self.beta_c = nn.Parameter(torch.zeros(hidden_size))
        nn.init.orthogonal_(self.weight_ih)
        for part, size in (("x", h4), ("h", h4), ("c", hidden_size)):
            self.register_buffer(f"running_mean_{part}", torch.zeros(max_length, size))
            self.register_buffer(f"running_var_{part}", torch.ones(max_length, size))
        self.register_buffer("trained_length", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x: `(T, B, input_size)`, hidden `(h, c)` each `(1, B, H)` ->
        output `(T, B, H)` and the last `(h, c)`, each `(1, B, H)`."""
        T = x.size(0)
        if self.training:
            self.trained_length.clamp_(min=min(T, self.max_length))
        gates_x = self._normalize_inputs(x @ self.weight_ih.t()) + self.bias   # (T, B, 4H)
        mean_h, var_h = self._statistics("h", T)
        mean_c, var_c = self._statistics("c", T)
        h, c = hidden[0][0], hidden[1][0]
        outputs = []
        # unbind, not gates_x[t]: its backward stacks once instead of T full-size scatters.
        for t, gates_x_t in enumerate(gates_x.unbind(0)):
            slot = min(t, mean_h.size(0) - 1)
            gates_h = F.batch_norm(h @ self.weight_hh.t(), mean_h[slot], var_h[slot],
                                   self.gamma_h, None, self.training, self.momentum, self.eps)
            i, f, g, o = (gates_x_t + gates_h).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            c_hat = F.batch_norm(c, mean_c[slot], var_c[slot], self.gamma_c, self.beta_c,
                                 self.training, self.momentum, self.eps)
            h = torch.sigmoid(o) * torch.tanh(c_hat)
            outputs.append(h)
        return torch.stack(outputs), (h.unsqueeze(0), c.unsqueeze(0))

    def _normalize_inputs(self, z: torch.Tensor) -> torch.Tensor:
        """BN_x of `z = W_x x: (T, B, 4H)`, each time step with its own statistics."""
        T, B = z.shape[:2]
        if self.training:
            mean, var = z.mean(dim=1), z.var(dim=1, unbiased=False)            # (T, 4H)
            with torch.no_grad():
                self._update_running(self.running_mean_x, mean)
                self._update_running(self.running_var_x, var * B / (B - 1))
        else:
            mean, var = self._statistics("x", T)
        return (z - mean.unsqueeze(1)) * torch.rsqrt(var.unsqueeze(1) + self.eps) * self.gamma_x

    def _statistics(self, part: str, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Population mean and variance of BN_{part} for a window of T steps.

        Training: the buffers themselves, `(max_length, F)` (step t uses slot
        min(t, max_length - 1); F.batch_norm updates that row in place). Eval:
        `(T, F)`, step t reading slot min(t, trained_length - 1).
        """
        mean = getattr(self, f"running_mean_{part}")
        var = getattr(self, f"running_var_{part}")
        if self.training:
            return mean, var
        last = (self.trained_length - 1).clamp(min=0)
        slots = torch.arange(T, device=mean.device).clamp(max=last)
        return mean[slots], var[slots]

    def _update_running(self, running: torch.Tensor, batch: torch.Tensor) -> None:
        """Exponential moving average of per-step statistics `batch: (T, F)` into
        `running: (max_length, F)`; steps beyond max_length update the last slot in turn."""
        n = min(batch.size(0), self.max_length)
        batch = batch.to(running.dtype)  # statistics may be bf16 under autocast
        running[:n].lerp_(batch[:n], self.momentum)
        for t in range(self.max_length, batch.size(0)):
            running[-1].lerp_(batch[t], self.momentum)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, max_length={self.max_length}"


class LSTMLanguageModel(nn.Module):
    """Word-level LSTM language model.

    Args:
        vocab_size: V.
        hidden_size: H, also the embedding size.
        num_layers: stacked LSTM layers, each followed by a Site.
        dropout: p on the embedding output, between layers and on the output.
        dropout_type: "variational" (mask shared over time) or "standard".
        tied: decoder weight is the embedding weight.
        rbn: recurrent batch normalization layers instead of nn.LSTM.
        rbn_max_length: time steps with their own RBN population statistics (at
            least the training window; longer eval windows reuse the last trained step's).
    """

    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int, dropout: float,
                 dropout_type: str = "variational", tied: bool = False,
                 rbn: bool = False, rbn_max_length: int = 100) -> None:
        super().__init__()
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_layers
        self.tied, self.rbn = tied, rbn
        self.drop = SequenceDropout(dropout, dropout_type)
        self.dropout_type = dropout_type
        self.encoder = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(
            nn.ModuleDict({
                "rnn": (RBNLSTMLayer(hidden_size, hidden_size, max_length=rbn_max_length)
                        if rbn else nn.LSTM(hidden_size, hidden_size)),
                "site": Site(),
            })
            for _ in range(num_layers))
        self.decoder = nn.Linear(hidden_size, vocab_size)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tied:
            self.decoder.weight = self.encoder.weight
        else:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, x: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, Hidden]:
        """x: `(T, B)` token ids -> logits `(T, B, V)` and the new hidden state."""
        h = self.drop(self.encoder(x))
        new_hidden = []
        for layer, layer_hidden in zip(self.layers, hidden):
            h, layer_hidden = layer["rnn"](h, layer_hidden)
            h = self.drop(layer["site"](h))
            new_hidden.append(layer_hidden)
        return self.decoder(h), new_hidden

    def init_hidden(self, batch_size: int) -> Hidden:
        """Zero state: per layer `(h, c)`, each `(1, batch_size, H)`."""
        w = self.encoder.weight
        return [(w.new_zeros(1, batch_size, self.hidden_size),
                 w.new_zeros(1, batch_size, self.hidden_size)) for _ in range(self.num_layers)]


def detach_hidden(hidden: Hidden, copy: bool = False) -> Hidden:
    """Cut the graph between BPTT windows (truncated backpropagation); `copy`: into new
    tensors, which outlive the buffers the model wrote them to."""
    if copy:
        return [(h.detach().clone(), c.detach().clone()) for h, c in hidden]
    return [(h.detach(), c.detach()) for h, c in hidden]


# Sizes and dropout come from the config (configs/model/*.yaml: 650 units, 2 layers,
# VD dropout 0.5); the registered names differ in tying only.
@register("lstm", task="lm")
@register("vd_lstm", task="lm")
def untied_lstm(vocab_size: int, *, hidden_size: int, num_layers: int, dropout: float,
                **options) -> LSTMLanguageModel:
    """LSTM and VD-LSTM: untied embeddings. `options`: dropout_type, rbn, rbn_max_length."""
    return LSTMLanguageModel(vocab_size, hidden_size, num_layers, dropout, tied=False, **options)


@register("re_lstm", task="lm")
@register("re_vd_lstm", task="lm")
def tied_lstm(vocab_size: int, *, hidden_size: int, num_layers: int, dropout: float,
              **options) -> LSTMLanguageModel:
    """RE-LSTM and RE-VD-LSTM: tied input/output embeddings. `options` as `untied_lstm`."""
    return LSTMLanguageModel(vocab_size, hidden_size, num_layers, dropout, tied=True, **options)
