"""Corpus loading, download/checksum errors, batching, on generated text (never the network)."""
from __future__ import annotations

import gzip
import io
import re
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import pytest
import torch

import per.data.corpus as corpus_mod
from per.data.corpus import CORPORA, Corpus, batchify, get_batch, write_fake_corpus
from per.data.download import DatasetDamagedError, DatasetMissingError
from per.schema import SPLITS, TEST, TRAIN, VAL


def _split_counts(path: Path) -> tuple[int, int]:
    """(words, lines) of a text file, counted independently of the loader."""
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]  # files end with "\n"
    return sum(len(line.split()) for line in lines), len(lines)


@pytest.mark.parametrize("name", ["ptb", "wikitext2"])
def test_counts_vocab_and_ids(tmp_path: Path, name: str) -> None:
    directory = write_fake_corpus(tmp_path, name, n_train_lines=300, seed=1)
    c = Corpus(tmp_path, name, verify_checksums=False)
    spec = CORPORA[name]
    assert spec.files[VAL].split(".")[1] == "valid"   # the on-disk name stays the corpus's
    for split in SPLITS:
        words, lines = _split_counts(directory / spec.files[split])
        assert len(getattr(c, split)) == words + lines
        assert getattr(c, split).dtype == torch.long
    train_text = (directory / spec.files[TRAIN]).read_text().split("\n")[:-1]
    train_words = {w for line in train_text for w in line.split()}
    assert set(c.vocab) == train_words | {"<eos>"}
    assert c.vocab_size == len(c.vocab) == len(c.word2idx)
    # Ids in order of first appearance; the id stream spells the training text back.
    expected_tokens = [w for line in train_text for w in line.split() + ["<eos>"]]
    assert [c.vocab[i] for i in c.train.tolist()] == expected_tokens
    assert c.vocab == list(dict.fromkeys(expected_tokens))
    if name == "wikitext2":
        assert c.vocab[:2] == ["<eos>", "="]  # the file starts with an empty line, then a heading
    again = Corpus(tmp_path, name, verify_checksums=False)
    assert again.vocab == c.vocab and torch.equal(again.test, c.test)


def test_fake_corpus_format(tmp_path: Path) -> None:
    for name in ("ptb", "wikitext2"):
        directory = write_fake_corpus(tmp_path, name, n_train_lines=200)
        spec = CORPORA[name]
        train = (directory / spec.files[TRAIN]).read_text().split("\n")[:-1]
        assert len(train) == 200
        assert all(line == " " or (line.startswith(" ") and line.endswith(" ")
                                   and "  " not in line) for line in train)
        assert any("<unk>" in line.split() for line in train)
        if name == "wikitext2":
            assert " " in train and any(line.startswith(" = ") for line in train)
        train_words = {w for line in train for w in line.split()}
        for split in (VAL, TEST):
            text = (directory / spec.files[split]).read_text()
            assert len(text.split("\n")) - 1 == 20
            assert set(text.split()) <= train_words
    # Same seed, same text; other seed, other text.
    a = (write_fake_corpus(tmp_path / "a", seed=3) / "ptb.train.txt").read_text()
    b = (write_fake_corpus(tmp_path / "b", seed=3) / "ptb.train.txt").read_text()
    d = (write_fake_corpus(tmp_path / "d", seed=4) / "ptb.train.txt").read_text()
    assert a == b != d


def test_tokenize_matches_line_iteration() -> None:
    text = " a b \n \n\nc  d\r\ne\n f"
    expected = [w for line in io.StringIO(text, newline=None) for w in line.split() + ["<eos>"]]
    assert corpus_mod.tokenize(text.encode()) == expected
    assert corpus_mod.tokenize(b"") == []


def _write(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def test_unseen_words(tmp_path: Path) -> None:
    _write(tmp_path / "ptb", {"ptb.train.txt": " a <unk> b \n", "ptb.valid.txt": " a zz \n",
                              "ptb.test.txt": " b \n"})
    c = Corpus(tmp_path, "ptb", verify_checksums=False)
    assert c.vocab == ["a", "<unk>", "b", "<eos>"]
    assert c.val.tolist() == [0, 1, 3]  # "zz" -> <unk>
    _write(tmp_path / "ptb", {"ptb.train.txt": " a b \n"})
    with pytest.raises(ValueError, match="zz"):
        Corpus(tmp_path, "ptb", verify_checksums=False)


def test_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ptb, wikitext2"):
        Corpus(tmp_path, "wikitext103")


def test_gzip_copies_read_transparently(tmp_path: Path) -> None:
    plain = write_fake_corpus(tmp_path / "plain", "wikitext2", n_train_lines=100)
    gz = tmp_path / "gz" / "wikitext2"
    gz.mkdir(parents=True)
    for f in plain.iterdir():
        (gz / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes()))
    a = Corpus(tmp_path / "plain", "wikitext2", verify_checksums=False)
    b = Corpus(tmp_path / "gz", "wikitext2", verify_checksums=False)
    assert a.vocab == b.vocab and torch.equal(a.train, b.train)


def test_checksum_mismatch(tmp_path: Path) -> None:
    write_fake_corpus(tmp_path, "ptb", n_train_lines=50)
    with pytest.raises(DatasetDamagedError, match="checksum mismatch.*ptb.train.txt"):   # a user error
        Corpus(tmp_path, "ptb")


def _no_network(url: str, dest: Path, *args, **kwargs) -> Path:
    raise urllib.error.URLError("no network in tests")


class _Response(io.BytesIO):
    """What `urlopen` returns: the body, and headers announcing `length` bytes (its size)."""

    def __init__(self, body: bytes, length: int | None = None) -> None:
        super().__init__(body)
        self.headers = {"Content-Length": str(len(body) if length is None else length)}


def test_download_sends_a_user_agent_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real `download` (its callers' tests fake it): a request with a User-Agent (the
    WikiText mirror refuses urllib's), the file verified, then moved into place."""
    import hashlib
    from per.data import download as download_mod
    payload = b"archive bytes"
    seen = []

    def fake_urlopen(request, timeout):
        seen.append(request)
        return _Response(payload)
    monkeypatch.setattr(download_mod.urllib.request, "urlopen", fake_urlopen)
    dest = download_mod.download(CORPORA["wikitext2"].url, tmp_path / "w.zip",
                                 hashlib.sha256(payload).hexdigest())
    assert dest.read_bytes() == payload and list(tmp_path.iterdir()) == [dest]
    assert seen[0].full_url == CORPORA["wikitext2"].url and seen[0].get_header("User-agent")
    with pytest.raises(ValueError, match=f"checksum mismatch for {tmp_path / 'x.zip'} as downloaded from "
                                         f"{re.escape(CORPORA['wikitext2'].url)}: .* nothing was kept"):
        download_mod.download(CORPORA["wikitext2"].url, tmp_path / "x.zip", "0" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.zip"]     # nothing left behind
    # A server that closes before the announced length: urllib gives what came, no error.
    monkeypatch.setattr(download_mod.urllib.request, "urlopen", lambda request, timeout: _Response(payload, 100))
    with pytest.raises(OSError, match=f"download of {re.escape(CORPORA['ptb'].url)} ended after 13 of 100 bytes"):
        download_mod.download(CORPORA["ptb"].url, tmp_path / "short.tgz")     # no checksum to catch it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.zip"]


def test_what_a_killed_download_left_is_removed_once_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGKILL leaves the temp file (or a corpus fetch's temp folder): the next download
    removes it once it has not changed for `PARTIAL_AGE_S`; a fresh one may be another
    process's download in progress and stays."""
    import os
    import time
    from per.data import download as download_mod
    prefix = download_mod.PARTIAL_PREFIX
    stale, fresh, mine = tmp_path / f"{prefix}old.part", tmp_path / f"{prefix}new.part", tmp_path / "tmp.part"
    stale_dir = tmp_path / "ptb" / f"{prefix}killed"
    stale_dir.mkdir(parents=True)
    for path in (stale, fresh, mine, stale_dir / "simple-examples.tgz"):
        path.write_bytes(b"partial")
    old = time.time() - download_mod.PARTIAL_AGE_S - 60
    for path in (stale, mine, stale_dir / "simple-examples.tgz", stale_dir):
        os.utime(path, (old, old))
    monkeypatch.setattr(download_mod.urllib.request, "urlopen", lambda request, timeout: _Response(b"x"))
    download_mod.download(CORPORA["ptb"].url, tmp_path / "a.tgz")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, "a.tgz", "ptb", "tmp.part"])
    monkeypatch.setattr(corpus_mod, "download", _no_network)
    with pytest.raises(DatasetMissingError):
        Corpus(tmp_path, "ptb", download=True)
    assert list((tmp_path / "ptb").iterdir()) == []


def test_missing_files_download_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(corpus_mod, "download", lambda *a, **k: calls.append(a))
    _write(tmp_path / "ptb", {"ptb.valid.txt": " a \n"})
    with pytest.raises(DatasetMissingError) as err:
        Corpus(tmp_path, "ptb")
    msg = str(err.value)
    assert "ptb.train.txt" in msg and "ptb.test.txt" in msg and "ptb.valid.txt" not in msg
    assert CORPORA["ptb"].url in msg and str((tmp_path / "ptb").resolve()) in msg
    assert "simple-examples/data/ folder" in msg     # where in the archive the files are
    assert calls == []


def test_missing_files_download_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus_mod, "download", _no_network)
    with pytest.raises(DatasetMissingError, match="download failed: URLError") as err:
        Corpus(tmp_path, "wikitext2", download=True)
    assert "wiki.train.tokens" in str(err.value) and CORPORA["wikitext2"].url in str(err.value)


def _fake_archive(name: str, source: Path, dest: Path) -> None:
    """An archive laid out as the real one, holding the files of `source`."""
    spec = CORPORA[name]
    if name == "wikitext2":
        with zipfile.ZipFile(dest, "w") as zf:
            for f in spec.files.values():
                zf.write(source / f, f"{spec.archive_dir}/{f}")
    else:
        with tarfile.open(dest, "w:gz") as tf:
            for f in spec.files.values():
                tf.add(source / f, f"./{spec.archive_dir}/{f}")


@pytest.mark.parametrize("name", ["ptb", "wikitext2"])
def test_download_extracts_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        name: str) -> None:
    source = write_fake_corpus(tmp_path / "source", name, n_train_lines=50)
    urls = []

    def fake_download(url: str, dest: Path, *args, **kwargs) -> Path:
        urls.append(url)
        _fake_archive(name, source, dest)
        return dest

    monkeypatch.setattr(corpus_mod, "download", fake_download)
    root = tmp_path / "root"
    # Real checksums: the generated files fail verification and nothing is left behind.
    with pytest.raises(DatasetMissingError, match=f"checksum mismatch for {root / name}/.* as downloaded from "):
        Corpus(root, name, download=True)
    assert list((root / name).iterdir()) == []
    c = Corpus(root, name, download=True, verify_checksums=False)
    assert urls == [CORPORA[name].url] * 2
    expected = Corpus(tmp_path / "source", name, verify_checksums=False)
    assert c.vocab == expected.vocab and torch.equal(c.val, expected.val)


def test_batchify_and_get_batch() -> None:
    data = torch.arange(26)
    source = batchify(data, 4)
    assert source.shape == (6, 4) and source.is_contiguous()
    for j in range(4):  # column j: contiguous tokens, tail of 2 dropped
        assert source[:, j].tolist() == list(range(6 * j, 6 * j + 6))
    x, y = get_batch(source, 0, 3)
    assert x.shape == y.shape == (3, 4)
    assert torch.equal(x, source[0:3]) and torch.equal(y, source[1:4])
    x, y = get_batch(source, 3, 3)  # last window is shorter: T = L - 1 - i = 2
    assert x.shape == (2, 4) and torch.equal(y, source[4:6])
    starts = range(0, source.size(0) - 1, 3)
    targets = torch.cat([get_batch(source, i, 3)[1] for i in starts])
    assert torch.equal(targets, source[1:])  # every token but the first row is predicted once
