"""The PyTorch word-language-model example's training loop (pytorch/examples
`word_language_model/main.py`; docs/protocols.md, Table 3), written out plainly, to run side
by side with our LM runner on the same PTB files: its own reader (each line's words, then
`<eos>`; one dictionary over the three splits), `batchify`, windows of `bptt` 35, the
example's 2-layer LSTM (`bench.ExampleLM`) with its initialization (embedding and decoder
uniform in +-0.1, decoder bias 0), no dropout (our `lstm` preset's), plain SGD at lr 20 after
a gradient-norm clip of 0.25, the state carried and detached per window. After `--steps`
steps it prints the validation perplexity over the whole validation split at batch 10, as
our run's `val_ppl` (docs/evidence.md, "Side by side").

    python scripts/lm_reference.py --root data --hidden 128 --steps 400 --seed 1
    python experiments/train_lm.py experiment=t3_ptb_lstm_vanilla model.hidden_size=128 \\
        trainer.max_steps=400 data.root=data seed=1          # ours, same files and steps
"""
from __future__ import annotations

import argparse
import gzip
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import ExampleLM

SPLITS = ("train", "valid", "test")


def read_split(folder: Path, split: str, vocab: dict[str, int]) -> torch.Tensor:
    """`ptb.<split>.txt` (or `.gz`) as word ids, adding new words to `vocab`: each line's
    words, then `<eos>`; lines end at `\n`, `\r\n` or `\r`, as a text-mode file's."""
    path = folder / f"ptb.{split}.txt"
    data = path.read_bytes() if path.exists() else gzip.decompress(path.with_suffix(".txt.gz").read_bytes())
    lines = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":        # the text's final line ending
        lines.pop()
    ids = [vocab.setdefault(word, len(vocab)) for line in lines for word in [*line.split(), "<eos>"]]
    return torch.tensor(ids)


def columns(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """`(n,)` -> `(n // batch, batch)`: column j holds the j-th contiguous stretch; the tail is dropped."""
    rows = ids.numel() // batch
    return ids[:rows * batch].view(batch, rows).t().contiguous()


def windows(data: torch.Tensor, bptt: int):
    """(inputs, targets) of each window of up to `bptt` steps: targets are the next tokens."""
    for i in range(0, data.size(0) - 1, bptt):
        n = min(bptt, data.size(0) - 1 - i)
        yield data[i:i + n], data[i + 1:i + 1 + n]


def zero_state(layers: int, batch: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSTM's `(h, c)` at the start of a split."""
    return torch.zeros(layers, batch, hidden), torch.zeros(layers, batch, hidden)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="data root holding ptb/ptb.{train,valid,test}.txt[.gz]")
    ap.add_argument("--hidden", type=int, default=650)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=400,
                    help="training windows, at most one epoch's (0: one epoch; the example anneals the lr "
                         "between epochs, which this loop leaves out)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    vocab: dict[str, int] = {}
    ids = {split: read_split(Path(args.root) / "ptb", split, vocab) for split in SPLITS}
    train, valid = columns(ids["train"], 20), columns(ids["valid"], 10)
    epoch = len(range(0, train.size(0) - 1, 35))
    if epoch == 0 or valid.size(0) < 2:
        ap.error(f"too little text: {train.size(0)} rows of 20 training tokens, {valid.size(0)} of 10 validation ones")
    if args.steps > epoch:
        ap.error(f"--steps {args.steps}: at most one epoch's {epoch} windows (0: one epoch)")
    model = ExampleLM(len(vocab), args.hidden, args.layers, dropout=0.0)
    for weight in (model.encoder.weight, model.decoder.weight):
        torch.nn.init.uniform_(weight, -0.1, 0.1)
    torch.nn.init.zeros_(model.decoder.bias)

    model.train()
    state, start, step, total = zero_state(args.layers, 20, args.hidden), time.time(), 0, 0.0
    for step, (x, y) in enumerate(windows(train, 35), 1):
        state = tuple(s.detach() for s in state)
        model.zero_grad()
        out, state = model(x, state)
        loss = F.cross_entropy(out.view(-1, len(vocab)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-20.0)
        total += loss.item()
        if step == args.steps:
            break

    model.eval()
    state, scored, nll = zero_state(args.layers, 10, args.hidden), 0, 0.0
    with torch.no_grad():
        for x, y in windows(valid, 35):
            out, state = model(x, state)
            nll += F.cross_entropy(out.view(-1, len(vocab)), y.reshape(-1), reduction="sum").item()
            scored += y.numel()
    print(f"example loop: seed {args.seed}, {step} steps, hidden {args.hidden} | train_loss={total / step:.4g} "
          f"val_ppl={math.exp(nll / scored):.4g} | {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
