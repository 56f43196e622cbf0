"""End-to-end tests of the language-model runner on generated PTB-format text."""
from __future__ import annotations

import contextlib
import functools
import gzip
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from per import schema
from per.data.corpus import write_fake_corpus
from per.data.download import DatasetMissingError
from per.training import lm_task
from per.training import run as run_mod
from per.training.lm_task import LMTask, build_lm_experiment
from per.training.loop import fit
from per.training.run import train
from runner_utils import CPU_SMOKE, ROOT, compose_config, metrics, without_timing


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    write_fake_corpus(root, "ptb", n_train_lines=300, seed=0, vocab_size=50)
    write_fake_corpus(root, "wikitext2", n_train_lines=300, seed=1, vocab_size=50)
    return root


def _cfg(data_root, run_dir, *overrides):
    return compose_config("train_lm", [
        *CPU_SMOKE, f"data.root={data_root}", "data.verify_checksums=false",
        "model.hidden_size=16", "data.bptt=10", "data.batch_size=8", "data.eval_batch_size=4",
        "++method.num_slices=16", "trainer.log_every=3", *overrides], run_dir)


QUICK = {("re_vd_lstm", "per"), ("lstm", "rbn")}
CASES = [pytest.param(model, method, marks=() if (model, method) in QUICK else pytest.mark.slow)
         for model in ("lstm", "re_lstm", "vd_lstm", "re_vd_lstm")
         for method in ("vanilla", "l1", "l2", "rbn", "per")]


@pytest.mark.parametrize("model,method", CASES)
def test_every_model_and_method_trains(data_root, tmp_path, model, method):
    summary = train(_cfg(data_root, tmp_path, f"model={model}", f"method={method}",
                         "trainer.max_steps=3", "trainer.epochs=1"), build_lm_experiment)
    assert summary["status"] == schema.FINISHED and summary["steps"] == 3
    assert summary["cell"] == {"table": "T3", "dataset": "ptb", "model": model,
                               "activation": "tanh", "method": method}
    assert summary["best"]["epoch"] == 1 and summary["best"]["test_ppl"] > 1


def test_lm_learns_and_records_best_validation_epoch(data_root, tmp_path):
    summary = train(_cfg(data_root, tmp_path, "model=lstm", "method=per", "method.lam=1e-3",
                         "trainer.epochs=3", "optim.lr=5", "data=wikitext2"), build_lm_experiment)
    rows = metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for key in ("train_loss", "penalty", "val_ppl", "test_ppl", "lr", "tokens_per_s"):
        assert key in rows[0]
    assert all(r["epoch_time_s"] > 0 and r["eval_time_s"] > 0 for r in rows)   # training, evaluation
    assert any(k.startswith("grad_ratio/") for k in rows[0])
    best = min(rows, key=lambda r: r["val_ppl"])
    assert summary["best"]["epoch"] == best["epoch"]
    assert summary["best"]["test_ppl"] == pytest.approx(best["test_ppl"])
    assert rows[-1]["val_ppl"] < 50      # vocabulary 50 + <eos>: uniform guessing is ~51
    assert (tmp_path / "checkpoints/best.pt").exists()


def test_plateau_schedule_divides_lr_by_four(data_root, tmp_path):
    train(_cfg(data_root, tmp_path, "model=lstm", "trainer.epochs=4", "optim.lr=1e-6"),
          build_lm_experiment)
    lrs = [r["lr"] for r in metrics(tmp_path)]
    assert lrs[0] == 1e-6
    assert all(b in (a, a / 4) for a, b in zip(lrs, lrs[1:]))


@pytest.mark.slow
def test_resume_after_sigterm_mid_epoch_is_exact(data_root, tmp_path, monkeypatch):
    overrides = ["model=vd_lstm", "method=per", "trainer.epochs=2"]
    ref = train(_cfg(data_root, tmp_path / "ref", *overrides), build_lm_experiment)
    per_epoch = ref["steps"] // 2

    def kill_at(step):
        if step == per_epoch + 2:
            signal.raise_signal(signal.SIGTERM)
    monkeypatch.setattr(run_mod, "fit", functools.partial(fit, on_step=kill_at))
    cut = train(_cfg(data_root, tmp_path / "cut", *overrides), build_lm_experiment)
    assert cut["status"] == schema.INTERRUPTED
    monkeypatch.undo()
    resumed = train(_cfg(data_root, tmp_path / "cut", *overrides), build_lm_experiment)
    assert resumed["status"] == schema.FINISHED
    assert without_timing(resumed["final"]) == without_timing(ref["final"])
    assert without_timing(resumed["best"]) == without_timing(ref["best"])


def test_non_finite_loss_is_recorded_as_diverged(data_root, tmp_path, monkeypatch):
    calls = []
    real_step = LMTask.train_step

    def nan_at_fifth_step(self, model, batch):   # tanh-bounded LSTMs rarely blow up on demand
        loss, sums = real_step(self, model, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 5 else loss), sums
    monkeypatch.setattr(LMTask, "train_step", nan_at_fifth_step)
    summary = train(_cfg(data_root, tmp_path, "model=lstm", "trainer.epochs=2"), build_lm_experiment)
    assert summary["status"] == schema.DIVERGED
    assert 5 <= summary["steps"] <= 5 + 3        # noticed within one log interval (3 steps)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


def test_missing_corpus_gives_clear_error(tmp_path):
    with pytest.raises(DatasetMissingError, match="ptb.train.txt"):
        train(_cfg(tmp_path / "nowhere", tmp_path / "run"), build_lm_experiment)


def test_bf16_autocast_run(data_root, tmp_path):
    summary = train(_cfg(data_root, tmp_path, "model=vd_lstm", "method=per", "trainer.precision=bf16",
                         "trainer.max_steps=2"), build_lm_experiment)
    assert summary["status"] == schema.FINISHED and summary["best"]["val_ppl"] > 1


def test_perplexity_overflow_is_diverged(data_root, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="per")
    real_step = LMTask.train_step

    def huge_loss(self, model, batch):   # +800 nats per token: exp overflows; the gradient is unchanged
        loss, sums = real_step(self, model, batch)
        return loss + 800.0, sums
    monkeypatch.setattr(LMTask, "train_step", huge_loss)
    summary = train(_cfg(data_root, tmp_path, "model=lstm", "trainer.epochs=2"), build_lm_experiment)
    assert summary["status"] == schema.DIVERGED and summary["epochs_completed"] == 1
    assert math.isinf(summary["final"]["train_ppl"])
    assert json.loads((tmp_path / "summary.json").read_text())["final"]["train_ppl"] is None   # inf -> null
    assert any(r.getMessage().startswith("diverged: non-finite train_ppl after epoch 1") for r in caplog.records)


def test_a_non_finite_validation_perplexity_is_never_the_best_epoch(data_root, tmp_path, monkeypatch):
    """... and the diverged epoch's row still reaches W&B, as it reaches metrics.jsonl."""
    from per.training import loggers
    logged = []
    monkeypatch.setattr(loggers.WandbSink, "log", lambda self, row, step: logged.append(row["epoch"]))
    monkeypatch.setattr(lm_task, "perplexity", lambda loss: math.inf)
    summary = train(_cfg(data_root, tmp_path, "model=lstm", "trainer.epochs=2"), build_lm_experiment)
    assert summary["status"] == schema.DIVERGED and summary["best"] == {"epoch": None}
    assert not (tmp_path / "checkpoints/best.pt").exists()
    assert logged == [1] and [r["epoch"] for r in metrics(tmp_path)] == [1]


def test_an_eval_batch_wider_than_a_split_is_named_before_training(data_root, tmp_path):
    """It was a ZeroDivisionError at the first evaluation, after a whole epoch."""
    cfg = _cfg(data_root, tmp_path, "data.eval_batch_size=100000")
    with pytest.raises(ValueError, match=r"val split .* data.eval_batch_size=100000"):
        train(cfg, build_lm_experiment)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 0


def test_limit_eval_batches(data_root, tmp_path):
    cfg = _cfg(data_root, tmp_path, "model=lstm", "trainer.limit_eval_batches=2")
    exp = build_lm_experiment(cfg, torch.device("cpu"), contextlib.nullcontext)
    seen = []
    out = exp.task.evaluate(exp.model, on_batch=lambda: seen.append(1))
    assert exp.task.eval_batches() == len(seen) == 4   # 2 windows of val and of test
    assert out["val_ppl"] == pytest.approx(math.exp(out["val_loss"]))


@pytest.mark.parametrize("damage", ["truncated_gz", "corrupt_gz", "not_utf8"])
def test_damaged_text_file_is_named(tmp_path, damage):
    root = tmp_path / "data"
    write_fake_corpus(root, "ptb", n_train_lines=50, seed=0, vocab_size=20)
    valid = root / "ptb/ptb.valid.txt"
    if damage.endswith("_gz"):
        packed = gzip.compress(valid.read_bytes())
        valid.unlink()
        valid = valid.with_name("ptb.valid.txt.gz")
        if damage == "truncated_gz":
            packed = packed[:len(packed) // 2]
        else:       # bytes changed mid-stream: zlib.error, neither EOFError nor OSError
            packed = packed[:40] + bytes(b ^ 0xFF for b in packed[40:80]) + packed[80:]
        valid.write_bytes(packed)
    else:
        valid.write_bytes(b"caf\xe9 au lait\n")   # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=f"cannot read {re.escape(str(valid))} .*damaged"):
        train(_cfg(root, tmp_path / "run"), build_lm_experiment)
    assert json.loads((tmp_path / "run/summary.json").read_text())["status"] == "failed"


def test_the_carried_hidden_state_is_a_copy_of_the_models_output():
    """Under CUDA graphs (`trainer.compile=reduce-overhead`) a model's outputs live in buffers
    that a later replay overwrites; the H200 bench's compiled LM section failed so when the
    task carried a view of them into the next window. The task keeps a detached copy."""
    from per.models.lstm import LSTMLanguageModel
    torch.manual_seed(0)
    model = LSTMLanguageModel(vocab_size=20, hidden_size=8, num_layers=2, dropout=0.0)
    returned = []
    forward = model.forward
    model.forward = lambda x, hidden: returned.append(out := forward(x, hidden)) or out
    tokens = torch.randint(20, (31, 3))
    task = LMTask(model, tokens, {}, bptt=5, autocast=contextlib.nullcontext)
    batches = task.train_batches(0, 0)
    for _ in range(2):
        task.train_step(model, next(batches))
        carried = [t for pair in task.hidden for t in pair]
        out = [t for pair in returned[-1][1] for t in pair]
        assert all(not c.requires_grad for c in carried)
        assert all(c.untyped_storage().data_ptr() != o.untyped_storage().data_ptr() for c, o in zip(carried, out))
        assert all(torch.equal(c, o.detach()) for c, o in zip(carried, out))


def test_evaluation_feeds_each_window_a_copy_of_the_models_output():
    """As in training: under CUDA graphs a recurrent-BN model compiles whole, and feeding its
    output state straight back in fails at the next window (pytorch/pytorch#175557)."""
    from per.models.lstm import LSTMLanguageModel
    torch.manual_seed(0)
    model = LSTMLanguageModel(vocab_size=20, hidden_size=8, num_layers=2, dropout=0.0)
    calls = []                            # (hidden given, hidden returned) per window
    forward = model.forward
    model.forward = lambda x, hidden: calls.append((hidden, out := forward(x, hidden))) or out
    tokens = torch.randint(20, (31, 3))
    task = LMTask(model, tokens, {"val": torch.randint(20, (26, 2))}, bptt=5, autocast=contextlib.nullcontext)
    plain = task.evaluate(model)
    assert len(calls) == 5
    for (_, (_, returned)), (given, _) in zip(calls, calls[1:]):
        pairs = [(g, r) for gp, rp in zip(given, returned) for g, r in zip(gp, rp)]
        assert all(g.untyped_storage().data_ptr() != r.untyped_storage().data_ptr() and torch.equal(g, r)
                   for g, r in pairs)
    model.forward = forward
    assert task.evaluate(model) == plain


def test_the_example_loop_runs_on_the_same_files(data_root, tmp_path):
    """scripts/lm_reference.py (the LM side-by-side check's other side: the PyTorch example's
    loop) reads the same PTB files as our corpus (the same ids, columns and windows) and
    prints the validation perplexity our runs log."""
    import importlib.util

    from per.data.corpus import Corpus, batchify, num_windows, tokenize
    spec = importlib.util.spec_from_file_location("lm_reference", ROOT / "scripts/lm_reference.py")
    sys.path.insert(0, str(ROOT / "scripts"))       # it imports bench's ExampleLM, as a script does
    try:
        ref = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ref)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    ours, vocab = Corpus(data_root, "ptb", verify_checksums=False), {}
    ids = {split: ref.read_split(data_root / "ptb", split, vocab) for split in ref.SPLITS}
    assert list(vocab) == ours.vocab
    for split, mine in (("train", ours.train), ("valid", ours.val), ("test", ours.test)):
        assert torch.equal(ids[split], mine)
        assert torch.equal(ref.columns(ids[split], 20), batchify(mine, 20))
        assert len(list(ref.windows(ref.columns(ids[split], 10), 35))) == num_windows(len(mine), 10, 35)
    # Lines end as in a text-mode file (\n, \r\n, \r), not at \f or \x85 (whitespace within a line).
    (tmp_path / "ptb").mkdir()
    text = "a b\x0cc\r\n d\x85e \r\rf\n".encode()
    (tmp_path / "ptb" / "ptb.train.txt").write_bytes(text)
    words: dict[str, int] = {}
    ids = ref.read_split(tmp_path / "ptb", "train", words).tolist()
    assert ids == [words[t] for t in tokenize(text)]
    assert tokenize(text) == ["a", "b", "c", "<eos>", "d", "e", "<eos>", "<eos>", "f", "<eos>"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "scripts/lm_reference.py"), "--root", str(data_root),
                               "--hidden", "8", *args], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    epoch = num_windows(len(ours.train), 20, 35)
    out = run("--steps", "0")                      # one epoch
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith(f"example loop: seed 0, {epoch} steps, hidden 8 | train_loss=") and "val_ppl=" in line
    assert 1 < float(line.split("val_ppl=")[1].split()[0]) < 2 * len(vocab)
    refused = run("--steps", str(epoch + 1))        # the example anneals lr between epochs: not here
    assert refused.returncode == 2 and f"at most one epoch's {epoch} windows" in refused.stderr
