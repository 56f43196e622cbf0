"""LSTM language models: variants, tying, dropout, recurrent BN, sites, hidden state."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from per.data.corpus import Corpus, batchify, get_batch, write_fake_corpus
from per.models import create
from per.models.lstm import LSTMLanguageModel, RBNLSTMLayer, SequenceDropout, detach_hidden
from per.sites import capture_sites, list_sites

V, H, T, B = 30, 16, 7, 5
VARIANTS = ["lstm", "re_lstm", "vd_lstm", "re_vd_lstm"]


def _lstm(name: str, dropout: float = 0.0, **kwargs) -> LSTMLanguageModel:
    """A small 2-layer `name` (sizes and dropout come from configs/model/*.yaml in runs)."""
    return create(name, vocab_size=V, hidden_size=H, num_layers=2, dropout=dropout, **kwargs)


@pytest.mark.parametrize("rbn", [False, True])
@pytest.mark.parametrize("name", VARIANTS)
def test_forward_backward(name: str, rbn: bool) -> None:
    torch.manual_seed(0)
    model = _lstm(name, dropout=0.5, rbn=rbn)
    assert model.tied == name.startswith("re_")
    assert model.drop.p == 0.5
    assert model.dropout_type == "variational"
    x = torch.randint(0, V, (T, B))
    logits, hidden = model(x, model.init_hidden(B))
    assert logits.shape == (T, B, V)
    assert len(hidden) == 2 and all(h.shape == c.shape == (1, B, H) for h, c in hidden)
    F.cross_entropy(logits.view(-1, V), x.view(-1)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(not h.requires_grad for pair in detach_hidden(hidden) for h in pair)


def test_bad_dropout_type() -> None:
    with pytest.raises(ValueError, match="variational, standard"):
        _lstm("vd_lstm", dropout=0.5, dropout_type="locked")


def test_init() -> None:
    model = _lstm("lstm")
    for w in (model.encoder.weight, model.decoder.weight):
        assert w.abs().max() <= 0.1
    assert torch.all(model.decoder.bias == 0)


def test_tied_weights_share_storage() -> None:
    model = _lstm("re_lstm")
    assert model.decoder.weight is model.encoder.weight
    assert model.decoder.weight.data_ptr() == model.encoder.weight.data_ptr()
    n_params = sum(p.numel() for p in model.parameters())
    untied = _lstm("lstm")
    assert n_params == sum(p.numel() for p in untied.parameters()) - V * H
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x = torch.randint(0, V, (T, B))
    before = model.encoder.weight.detach().clone()
    F.cross_entropy(model(x, model.init_hidden(B))[0].view(-1, V), x.view(-1)).backward()
    opt.step()
    assert not torch.equal(model.encoder.weight, before)
    assert torch.equal(model.decoder.weight, model.encoder.weight)
    assert model.decoder.weight.data_ptr() == model.encoder.weight.data_ptr()


def test_variational_dropout_mask_shared_over_time() -> None:
    torch.manual_seed(0)
    drop = SequenceDropout(0.5, "variational").train()
    out = drop(torch.ones(10, 8, 64))
    assert set(out.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(out, out[:1].expand_as(out))                  # constant over time
    assert all(not torch.equal(out[0, 0], out[0, b]) for b in range(1, 8))  # per sequence
    assert not torch.equal(out, drop(torch.ones(10, 8, 64)))         # fresh mask per call


def test_standard_dropout_and_eval() -> None:
    torch.manual_seed(0)
    x = torch.ones(10, 8, 64)
    out = SequenceDropout(0.5, "standard").train()(x)
    assert set(out.unique().tolist()) == {0.0, 2.0}
    assert not torch.equal(out[0], out[1])                           # differs across time
    for kind in ("variational", "standard"):
        assert torch.equal(SequenceDropout(0.5, kind).eval()(x), x)
        assert torch.equal(SequenceDropout(0.0, kind).train()(x), x)


@pytest.mark.parametrize("rbn", [False, True])
def test_sites_see_layer_output_before_dropout(rbn: bool) -> None:
    torch.manual_seed(0)
    model = _lstm("vd_lstm", dropout=0.5, rbn=rbn)
    names = ["layers.0.site", "layers.1.site"]
    assert list(list_sites(model)) == names
    rnn_out, decoder_in = [], []
    for layer in model.layers:
        layer["rnn"].register_forward_hook(lambda m, i, o: rnn_out.append(o[0].detach()))
    model.decoder.register_forward_pre_hook(lambda m, i: decoder_in.append(i[0].detach()))
    x = torch.randint(0, V, (T, B))
    with capture_sites(model, names) as captured:
        model(x, model.init_hidden(B))
    for name, out in zip(names, rnn_out):
        (h,) = captured[name]
        assert h.shape == (T, B, H)
        assert torch.equal(h, out)
    assert (decoder_in[0] == 0).any() and not (captured[names[1]][0] == 0).any()


def test_hidden_state_carry() -> None:
    torch.manual_seed(0)
    model = _lstm("lstm").eval()
    x = torch.randint(0, V, (2 * T, B))
    full, _ = model(x, model.init_hidden(B))
    first, hidden = model(x[:T], model.init_hidden(B))
    second, _ = model(x[T:], detach_hidden(hidden))
    torch.testing.assert_close(torch.cat([first, second]), full)
    fresh, _ = model(x[T:], model.init_hidden(B))
    assert not torch.allclose(fresh, second)


def _running_stats(layer: RBNLSTMLayer) -> dict[str, torch.Tensor]:
    """The per-time-step population statistics buffers, each `(max_length, F)`."""
    return {k: v for k, v in layer.named_buffers() if k.startswith("running_")}


def _rbn_reference(layer: RBNLSTMLayer, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
                   training: bool, last_slot: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step-by-step recurrent BN with explicit statistics, step t on slot min(t, last_slot);
    returns outputs and running stats."""
    running = {k: v.clone() for k, v in _running_stats(layer).items()}
    m, eps = layer.momentum, layer.eps

    def bn(z: torch.Tensor, part: str, slot: int, gamma: torch.Tensor) -> torch.Tensor:
        mean_key, var_key = f"running_mean_{part}", f"running_var_{part}"
        if training:
            mean, var = z.mean(0), z.var(0, unbiased=False)
            running[mean_key][slot] = (1 - m) * running[mean_key][slot] + m * mean
            running[var_key][slot] = (1 - m) * running[var_key][slot] + m * z.var(0)
        else:
            mean, var = running[mean_key][slot], running[var_key][slot]
        return gamma * (z - mean) / torch.sqrt(var + eps)

    outputs = []
    for t in range(x.size(0)):
        slot = min(t, last_slot)
        gates = (bn(x[t] @ layer.weight_ih.t(), "x", slot, layer.gamma_x)
                 + bn(h @ layer.weight_hh.t(), "h", slot, layer.gamma_h) + layer.bias)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(bn(c, "c", slot, layer.gamma_c) + layer.beta_c)
        outputs.append(h)
    return torch.stack(outputs), running


@pytest.mark.parametrize("max_length", [100, 3])
def test_rbn_matches_step_by_step_reference(max_length: int) -> None:
    torch.manual_seed(0)
    layer = RBNLSTMLayer(6, H, max_length=max_length)
    with torch.no_grad():  # move every parameter away from its special initial value
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(T, B, 6)
    h0, c0 = torch.randn(B, H), torch.randn(B, H)
    with torch.no_grad():
        expected, expected_running = _rbn_reference(layer, x, h0, c0, training=True,
                                                    last_slot=max_length - 1)
    out, (h, c) = layer.train()(x, (h0[None], c0[None]))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(h[0], out[-1])
    for name, buf in _running_stats(layer).items():
        torch.testing.assert_close(buf, expected_running[name])
    # Per-time-step statistics: each step's running stats differ from the others.
    n_used = min(T, max_length)
    assert layer.trained_length.item() == n_used
    for name, buf in _running_stats(layer).items():
        assert all(not torch.allclose(buf[s], buf[s + 1]) for s in range(n_used - 1))
        assert (buf[n_used:] == (0.0 if "mean" in name else 1.0)).all()  # slots never used
    # Eval mode normalizes with the running statistics (and leaves them unchanged).
    with torch.no_grad():
        expected_eval, _ = _rbn_reference(layer, x, h0, c0, training=False,
                                          last_slot=n_used - 1)
    before = {k: v.clone() for k, v in layer.named_buffers()}
    out_eval, _ = layer.eval()(x, (h0[None], c0[None]))
    torch.testing.assert_close(out_eval, expected_eval)
    assert all(torch.equal(v, before[k]) for k, v in layer.named_buffers())


def test_rbn_eval_beyond_trained_window_reuses_last_trained_step() -> None:
    """Cooijmans et al.: eval steps past the longest trained window use its last step's
    population statistics, not the untouched slots after it."""
    torch.manual_seed(0)
    short, long = 3, 2 * T
    layer = RBNLSTMLayer(6, H, max_length=100)
    h0, c0 = torch.randn(B, H), torch.randn(B, H)
    for window in (short, 2):                       # the longest window counts
        layer.train()(torch.randn(window, B, 6), (h0[None], c0[None]))
    assert layer.trained_length.item() == short
    for name, buf in _running_stats(layer).items():
        assert (buf[short:] == (0.0 if "mean" in name else 1.0)).all()  # untouched
    x = torch.randn(long, B, 6)
    with torch.no_grad():
        out, _ = layer.eval()(x, (h0[None], c0[None]))
        expected, _ = _rbn_reference(layer, x, h0, c0, training=False, last_slot=short - 1)
        untouched, _ = _rbn_reference(layer, x, h0, c0, training=False, last_slot=long - 1)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out[short:], untouched[short:])
    # The trained length travels with the state dict.
    restored = RBNLSTMLayer(6, H, max_length=100)
    restored.load_state_dict(layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x, (h0[None], c0[None]))[0], out)


def test_rbn_max_length_reaches_the_layers() -> None:
    for name in VARIANTS:
        model = _lstm(name, rbn=True, rbn_max_length=40)
        assert all(layer["rnn"].max_length == 40 for layer in model.layers)
        assert all(layer["rnn"].running_mean_h.shape == (40, 4 * H) for layer in model.layers)


def test_rbn_gradients_flow_through_all_parameters() -> None:
    torch.manual_seed(0)
    layer = RBNLSTMLayer(6, H)
    x = torch.randn(T, B, 6, requires_grad=True)
    out, _ = layer(x, (torch.randn(1, B, H), torch.randn(1, B, H)))
    out.pow(2).sum().backward()
    assert x.grad is not None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    assert layer.gamma_x.detach().eq(0.1).all() and layer.beta_c.detach().eq(0).all()


def test_rbn_hidden_state_carry() -> None:
    """With one statistics slot, eval-mode RBN is a plain recurrence: windows compose."""
    torch.manual_seed(0)
    model = LSTMLanguageModel(V, H, num_layers=2, dropout=0.0, rbn=True, rbn_max_length=1)
    model.train()(torch.randint(0, V, (T, B)), model.init_hidden(B))  # fill the running stats
    model.eval()
    x = torch.randint(0, V, (2 * T, B))
    full, _ = model(x, model.init_hidden(B))
    first, hidden = model(x[:T], model.init_hidden(B))
    second, _ = model(x[T:], hidden)
    torch.testing.assert_close(torch.cat([first, second]), full)


def test_learns_fake_corpus(tmp_path: Path) -> None:
    """A small LSTM beats the unigram baseline on the generated corpus within one epoch."""
    torch.manual_seed(0)
    write_fake_corpus(tmp_path, "ptb", n_train_lines=1500)
    corpus = Corpus(tmp_path, "ptb", verify_checksums=False)
    counts = torch.bincount(corpus.train, minlength=corpus.vocab_size).float() + 1.0
    unigram_ppl = math.exp(F.nll_loss(counts.div(counts.sum()).log().expand(
        len(corpus.val), -1), corpus.val).item())
    model = create("lstm", vocab_size=corpus.vocab_size, hidden_size=48, num_layers=1, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train = batchify(corpus.train, 20)
    hidden = model.init_hidden(20)
    for i in range(0, train.size(0) - 1, 20):
        x, y = get_batch(train, i, 20)
        logits, hidden = model(x, detach_hidden(hidden))
        opt.zero_grad()
        F.cross_entropy(logits.view(-1, corpus.vocab_size), y.reshape(-1)).backward()
        opt.step()
    model.eval()
    valid = batchify(corpus.val, 1)
    with torch.no_grad():
        logits, _ = model(valid[:-1], model.init_hidden(1))
    ppl = math.exp(F.cross_entropy(logits.view(-1, corpus.vocab_size), valid[1:].view(-1)).item())
    assert ppl < 0.5 * unigram_ppl


@pytest.mark.parametrize("rbn", [False, True])
def test_bf16_autocast(rbn: bool) -> None:
    model = _lstm("vd_lstm", dropout=0.5, rbn=rbn)
    x = torch.randint(0, V, (T, B))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, hidden = model(x, model.init_hidden(B))
        logits, _ = model(x, detach_hidden(hidden))
    logits.float().sum().backward()
    assert torch.isfinite(model.encoder.weight.grad).all()
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())
