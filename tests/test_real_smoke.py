"""Short training runs on the real datasets in ../shared/data (skipped when absent).

Thresholds are far from the paper's numbers on purpose: they catch a broken pipeline
(labels misaligned with inputs, wrong normalization, a vocabulary off by one), which
stays at chance level, not small regressions.
"""
from __future__ import annotations

import collections
import math

import pytest

from per.data.cifar import convert_jpeg_npz_to_pickles
from per.data.corpus import Corpus
from per.training.image_task import build_image_experiment
from per.training.lm_task import build_lm_experiment
from per.training.run import train
from runner_utils import CPU_SMOKE, SHARED_DATA, compose_config

pytestmark = pytest.mark.slow


def test_resnet20_on_real_cifar10_beats_chance_by_far(tmp_path):
    npz = SHARED_DATA / "cifar10"
    if not (npz / "cifar10_train_jpeg.npz").exists():
        pytest.skip(f"no CIFAR-10 copy under {npz}")
    convert_jpeg_npz_to_pickles(npz / "cifar10_train_jpeg.npz", npz / "cifar10_test_jpeg.npz",
                                tmp_path / "data", seed=0)
    # BN ResNet-20 under the He et al. protocol, 200 steps of 128 images (half an epoch).
    cfg = compose_config("train_cifar", [
        *CPU_SMOKE, "experiment=t1_cifar10_resnet56_bn", "model=resnet20", f"data.root={tmp_path / 'data'}",
        "data.verify_checksums=false", "trainer.max_steps=200", "trainer.log_every=50"], tmp_path / "run")
    summary = train(cfg, build_image_experiment)
    assert summary["status"] == "finished" and summary["steps"] == 200
    # Chance is 90 % error. Half an epoch of a BN ResNet-20 reaches ~50-60 % error; a
    # pipeline that scrambles labels or pixels stays near 90 %.
    assert summary["final"]["test_error"] < 70.0, summary["final"]


def test_lstm_on_real_ptb_beats_unigram_baseline(tmp_path):
    if not (SHARED_DATA / "ptb" / "ptb.train.txt.gz").exists():
        pytest.skip(f"no PTB copy under {SHARED_DATA / 'ptb'}")
    corpus = Corpus(SHARED_DATA, "ptb")
    counts = collections.Counter(corpus.train.tolist())
    total = len(corpus.train)
    # Unigram baseline: perplexity of the training unigram distribution on validation.
    unigram_ppl = math.exp(-sum(math.log(counts[t] / total) for t in corpus.val.tolist())
                           / len(corpus.val))
    cfg = compose_config("train_lm", [
        *CPU_SMOKE, "experiment=t3_ptb_lstm_per", f"data.root={SHARED_DATA}", "model.hidden_size=128",
        "trainer.max_steps=600", "trainer.log_every=100", "++method.num_slices=64"], tmp_path / "run")
    summary = train(cfg, build_lm_experiment)
    assert summary["status"] == "finished"
    val_ppl = summary["best"]["val_ppl"]
    # ~690 for the unigram model; 600 SGD steps (under half an epoch) get well below.
    assert val_ppl < 0.6 * unigram_ppl, (val_ppl, unigram_ppl)
