"""Word-level corpora (PTB, WikiText-2): download with checksums, tokenize, batch.

Tokenization follows the PyTorch word-language-model example: every line is split
on whitespace and gets one `<eos>` (empty lines too). The vocabulary is built from
the training split only, in order of first appearance, so ids are deterministic.

On-disk layout (`root/<name>/`):
- PTB: `ptb.{train,valid,test}.txt` (Mikolov's `simple-examples` tarball).
- WikiText-2 (v1, tokenized): `wiki.{train,valid,test}.tokens`.
A gzip copy `<file>.gz` is read transparently where the plain file is absent; the
SHA-256 checksums are those of the uncompressed contents.
"""
from __future__ import annotations

import math

import gzip
import hashlib
import itertools
import os
import random
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from per.schema import SPLITS, TEST, TRAIN, VAL

from .download import (PARTIAL_PREFIX, DatasetDamagedError, download, ensure_files, remove_stale_partials,
                       verify_file)

EOS = "<eos>"
UNK = "<unk>"
# How the files name each split (`ptb.valid.txt`); in the code a split has the schema's name.
FILE_SPLIT = {TRAIN: "train", VAL: "valid", TEST: "test"}


@dataclass(frozen=True)
class CorpusSpec:
    """Where a corpus comes from and what its files must hash to."""

    files: dict[str, str]    # split -> file name under root/<name>/
    sha256: dict[str, str]   # file name -> SHA-256 of the uncompressed file
    url: str                 # archive holding the files
    archive_dir: str         # folder of the files inside the archive


CORPORA: dict[str, CorpusSpec] = {
    "ptb": CorpusSpec(
        files={s: f"ptb.{FILE_SPLIT[s]}.txt" for s in SPLITS},
        sha256={
            "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
            "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
            "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
        },
        url="https://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",
        archive_dir="simple-examples/data",
    ),
    "wikitext2": CorpusSpec(
        files={s: f"wiki.{FILE_SPLIT[s]}.tokens" for s in SPLITS},
        sha256={
            "wiki.train.tokens": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
            "wiki.valid.tokens": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
            "wiki.test.tokens": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        },
        # The original research.metamind.io bucket is gone (403); Smerity's mirror serves the
        # same zip (the files' SHA-256 above are checked after extraction).
        url="https://wikitext.smerity.com/wikitext-2-v1.zip",
        archive_dir="wikitext-2",
    ),
}


# The real files' counts: (vocabulary size, train / val / test tokens with one <eos>
# per line). Tests assert them; the run planner sizes LM runs with the train count.
EXPECTED_COUNTS = {
    "ptb": (10_000, 929_589, 73_760, 82_430),
    "wikitext2": (33_278, 2_088_628, 217_646, 245_569),
}


def _spec(name: str) -> CorpusSpec:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; valid: {', '.join(CORPORA)}")
    return CORPORA[name]


class Corpus:
    """A tokenized corpus: vocabulary plus the three splits as id tensors.

    Args:
        root: data root; the files live in `root/<name>/`.
        name: "ptb" or "wikitext2".
        download: fetch the archive when files are missing.
        verify_checksums: check each file's SHA-256 (pass False for generated copies).

    Attributes:
        vocab: id -> word, training words in order of first appearance (incl. `<eos>`).
        word2idx: word -> id.
        train, val, test: LongTensor `(n,)` of token ids.

    Raises:
        DatasetMissingError: files absent and not downloadable.
        ValueError: unknown name, checksum mismatch, or a val/test word missing
            from the training vocabulary while `<unk>` is not in it.
    """

    def __init__(self, root: str | Path, name: str, *, download: bool = False,
                 verify_checksums: bool = True) -> None:
        spec = _spec(name)
        self.name = name
        self.directory = Path(root) / name
        missing = [f for f in spec.files.values() if _find(self.directory, f) is None]
        if missing:
            ensure_files(self.directory, missing, url=spec.url,
                         what=f"corpus {name!r} (the archive's {spec.archive_dir}/ folder holds its files)",
                         download_fn=lambda: _fetch(spec, self.directory, verify_checksums),
                         download_enabled=download)

        tokens = {}
        for split, file_name in spec.files.items():
            expected = spec.sha256[file_name] if verify_checksums else None
            path = _find(self.directory, file_name)
            try:
                tokens[split] = tokenize(_read(path, expected))
            except (EOFError, OSError, UnicodeDecodeError, zlib.error) as e:   # truncated or corrupt .gz, not UTF-8
                raise DatasetDamagedError(f"cannot read {path} ({type(e).__name__}: {e}): damaged or "
                                          "not the expected file; delete it and fetch it again "
                                          "(data.download=true)") from e
        self.vocab: list[str] = list(dict.fromkeys(tokens[TRAIN]))
        self.word2idx: dict[str, int] = {w: i for i, w in enumerate(self.vocab)}
        self.train = self._ids(tokens[TRAIN], TRAIN)
        self.val = self._ids(tokens[VAL], VAL)
        self.test = self._ids(tokens[TEST], TEST)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _ids(self, tokens: list[str], split: str) -> torch.Tensor:
        """Map tokens to ids; words unseen in train become `<unk>` (error if it is absent)."""
        unseen = set(tokens).difference(self.word2idx)
        if unseen and UNK not in self.word2idx:
            examples = ", ".join(sorted(unseen)[:5])
            raise ValueError(f"{self.name} {split}: {len(unseen)} words not in the training "
                             f"vocabulary and no {UNK} token to map them to (e.g. {examples})")
        unk = itertools.repeat(self.word2idx.get(UNK))
        ids = np.fromiter(map(self.word2idx.get, tokens, unk), dtype=np.int64, count=len(tokens))
        return torch.from_numpy(ids)


def tokenize(data: bytes) -> list[str]:
    """UTF-8 text -> tokens: each line's whitespace-separated words, then `<eos>`.

    Equivalent to the PyTorch example's `for line in open(path): line.split() + ['<eos>']`
    (text mode, so `\\r\\n` and `\\r` end lines too).
    """
    text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    if text and not text.endswith("\n"):
        text += "\n"
    return text.replace("\n", f" {EOS} ").split()


def _find(directory: Path, file_name: str) -> Path | None:
    """The file itself, else its `.gz` copy, else None."""
    for path in (directory / file_name, directory / f"{file_name}.gz"):
        if path.exists():
            return path
    return None


def _read(path: Path, expected_sha256: str | None) -> bytes:
    """Uncompressed bytes of `path` (gunzipped if `.gz`), checked against the digest if given."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if expected_sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != expected_sha256:
            raise DatasetDamagedError(
                f"checksum mismatch for {path} (uncompressed content): sha256 {got}, "
                f"expected {expected_sha256}. Delete the file to download it again, or pass "
                "data.verify_checksums=false for a converted or generated copy.")
    return data


def _fetch(spec: CorpusSpec, directory: Path, verify_checksums: bool) -> None:
    """Download the archive, extract the three files and verify them before moving them in."""
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(directory)       # what a killed fetch left
    with tempfile.TemporaryDirectory(dir=directory, prefix=PARTIAL_PREFIX) as tmp:
        tmp_dir = Path(tmp)
        archive = download(spec.url, tmp_dir / spec.url.rsplit("/", 1)[-1])
        members = {f: f"{spec.archive_dir}/{f}" for f in spec.files.values()}
        contents = _archive_members(archive, set(members.values()))
        for f, member in members.items():
            (tmp_dir / f).write_bytes(contents[member])
            if verify_checksums:
                verify_file(tmp_dir / f, spec.sha256[f], downloaded=(directory / f, spec.url))
        for f in spec.files.values():
            (tmp_dir / f).replace(directory / f)


def _archive_members(archive: Path, wanted: set[str]) -> dict[str, bytes]:
    """Contents of the files of a .zip or tar archive whose normalized paths are in `wanted`."""
    contents: dict[str, bytes] = {}
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if os.path.normpath(info.filename) in wanted:
                    contents[os.path.normpath(info.filename)] = zf.read(info)
    else:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:
                if member.isfile() and os.path.normpath(member.name) in wanted:
                    contents[os.path.normpath(member.name)] = tf.extractfile(member).read()
    absent = wanted.difference(contents)
    if absent:
        raise ValueError(f"{archive.name} lacks {', '.join(sorted(absent))}")
    return contents


def batchify(data: torch.Tensor, batch_size: int,
             device: torch.device | str | None = None) -> torch.Tensor:
    """Cut a token stream into `batch_size` parallel columns (PyTorch example semantics).

    data: `(n,)` -> `(n // batch_size, batch_size)`; column `j` holds the contiguous
    tokens `data[j * L:(j + 1) * L]` with `L = n // batch_size`; the tail is dropped.
    """
    n_rows = data.size(0) // batch_size
    data = data.narrow(0, 0, n_rows * batch_size)
    return data.view(batch_size, -1).t().contiguous().to(device)


def num_windows(tokens: int, batch_size: int, bptt: int) -> int:
    """BPTT windows per epoch over a stream of `tokens` batchified into `batch_size` columns."""
    return math.ceil((tokens // batch_size - 1) / bptt)


def get_batch(source: torch.Tensor, i: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One BPTT window starting at row `i` of `source: (L, B)`.

    Returns `x: (T, B)` and the next-token targets `y: (T, B)` (`y[t] = source[i + t + 1]`),
    with `T = min(bptt, L - 1 - i)`.
    """
    seq_len = min(bptt, source.size(0) - 1 - i)
    return source[i:i + seq_len], source[i + 1:i + 1 + seq_len]


def write_fake_corpus(root: str | Path, name: str = "ptb", *, n_train_lines: int = 2000,
                      seed: int = 0, vocab_size: int = 100) -> Path:
    """Write a small generated corpus in the real on-disk format; returns `root/<name>`.

    Text comes from a random sparse Markov chain over `vocab_size` word types (`<unk>`
    and `w1`, `w2`, ...; each word has 3 possible successors), so a small LSTM beats
    the unigram baseline quickly. The chain starts at `<unk>`, so `<unk>` is always in
    the training vocabulary; words of val/test unseen in train are written as `<unk>`.
    Every line is a space, tokens separated by single spaces, a space and `\\n`.
    WikiText style adds empty lines and ` = heading = ` lines (each split starts with
    an empty line, a heading and an empty line, as the real files). Val and test have
    `max(1, n_train_lines // 10)` lines each. Load it with `verify_checksums=False`.
    """
    spec = _spec(name)
    rng = random.Random(seed)
    words = [UNK] + [f"w{i}" for i in range(1, vocab_size)]
    successors = [rng.sample(range(vocab_size), 3) for _ in range(vocab_size)]
    weights = [[rng.random() for _ in range(3)] for _ in range(vocab_size)]

    def markov_words() -> Iterator[str]:
        state = 0
        while True:
            yield words[state]
            state = rng.choices(successors[state], weights=weights[state])[0]

    def split_lines(n_lines: int) -> list[list[str]]:
        stream = markov_words()
        lines: list[list[str]] = []
        while len(lines) < n_lines:
            if name == "wikitext2" and (not lines or rng.random() < 0.2):
                heading = list(itertools.islice(stream, rng.randint(1, 3)))
                lines += [[], ["=", *heading, "="], []]
            else:
                lines.append(list(itertools.islice(stream, rng.randint(3, 20))))
        return lines[:n_lines]

    directory = Path(root) / name
    directory.mkdir(parents=True, exist_ok=True)
    train = split_lines(n_train_lines)
    train_words = {w for line in train for w in line}
    for split, file_name in spec.files.items():
        if split == TRAIN:
            lines = train
        else:
            lines = [[w if w in train_words else UNK for w in line]
                     for line in split_lines(max(1, n_train_lines // 10))]
        text = "".join(" " + " ".join(line) + (" \n" if line else "\n") for line in lines)
        (directory / file_name).write_text(text, encoding="utf-8")
    return directory
