"""Real PTB / WikiText-2 copies (shared/data, gzip): exact published counts and checksums."""
from __future__ import annotations

import gzip
import time
from pathlib import Path

import pytest

from per.data.corpus import CORPORA, EXPECTED_COUNTS, Corpus

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data"



@pytest.mark.slow
@pytest.mark.parametrize("name", ["ptb", "wikitext2"])
def test_real_corpus_counts(tmp_path: Path, name: str) -> None:
    source = SHARED_DATA / name
    files = CORPORA[name].files.values()
    if not all((source / f"{f}.gz").exists() for f in files):
        pytest.skip(f"no real {name} copy under {source}")
    (tmp_path / name).mkdir()
    for f in files:
        (tmp_path / name / f).write_bytes(gzip.decompress((source / f"{f}.gz").read_bytes()))

    start = time.perf_counter()
    corpus = Corpus(tmp_path, name, verify_checksums=True)
    load_s = time.perf_counter() - start
    assert (corpus.vocab_size, len(corpus.train), len(corpus.val), len(corpus.test)) \
        == EXPECTED_COUNTS[name]
    assert corpus.vocab.count("<eos>") == 1 and "<unk>" in corpus.word2idx
    assert int(corpus.train.max()) == corpus.vocab_size - 1
    assert load_s < 10.0, f"loading {name} took {load_s:.1f} s"

    # The gzip copies load the same way, checksums verified on the uncompressed content.
    from_gz = Corpus(SHARED_DATA, name, verify_checksums=True)
    assert from_gz.vocab == corpus.vocab and from_gz.test.equal(corpus.test)
