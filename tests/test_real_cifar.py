"""Real CIFAR-10 (the JPEG copy in ../shared/data/cifar10): conversion to the pickle layout."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import PIL
import pytest

from per.data.cifar import convert_jpeg_npz_to_pickles, decode_jpeg_npz, load_cifar

DATA = Path(__file__).resolve().parents[2] / "shared/data/cifar10"
TRAIN, TEST = DATA / "cifar10_train_jpeg.npz", DATA / "cifar10_test_jpeg.npz"
# shared/data/README.md: SHA-256 of the decoded train array with Pillow 13.0.0 (libjpeg-turbo 3.2.0).
TRAIN_SHA256 = "bf3aabd52be912dae02a0435296c4dab5289524b57f55cd162dc4796935a611b"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (TRAIN.exists() and TEST.exists()):
        pytest.skip(f"real CIFAR-10 JPEG copy not found in {DATA}")
    root = tmp_path_factory.mktemp("cifar10_real")
    start = time.perf_counter()
    convert_jpeg_npz_to_pickles(TRAIN, TEST, root, seed=0)
    print(f"converted 60k JPEGs in {time.perf_counter() - start:.1f} s")
    return root


def test_converted_real_cifar10(converted: Path) -> None:
    data = load_cifar("cifar10", converted, verify_checksums=False)
    assert data.train_x.shape == (50_000, 32, 32, 3) and data.train_x.dtype == np.uint8
    assert data.test_x.shape == (10_000, 32, 32, 3)
    assert np.array_equal(np.bincount(data.train_y), [5000] * 10)
    assert np.array_equal(np.bincount(data.test_y), [1000] * 10)
    assert data.class_names[0] == "airplane" and data.class_names[9] == "truck"
    # Shuffled: the copy is sorted by class, each training batch must hold every class.
    assert all(len(np.unique(data.train_y[i:i + 100])) >= 8 for i in range(0, 50_000, 10_000))
    # README: per-channel mean (0.4913, 0.4821, 0.4465) and std (0.2452, 0.2428, 0.2606) on train.
    hist = np.stack([np.bincount(data.train_x[..., c].ravel(), minlength=256) for c in range(3)])
    v = np.arange(256) / 255
    mean = hist @ v / hist.sum(1)
    std = np.sqrt(hist @ v**2 / hist.sum(1) - mean**2)
    assert np.allclose(mean, [0.4913, 0.4821, 0.4465], atol=2e-4)
    assert np.allclose(std, [0.2452, 0.2428, 0.2606], atol=2e-4)
    with pytest.raises(ValueError, match="checksum mismatch"):  # lossy copy != official files
        load_cifar("cifar10", converted, verify_checksums=True)


def test_decoded_train_matches_readme_hash() -> None:
    if not TRAIN.exists():
        pytest.skip(f"real CIFAR-10 JPEG copy not found in {DATA}")
    if PIL.__version__ != "13.0.0":
        pytest.skip("the README's hash is for Pillow 13.0.0; other decoders may differ by +-1")
    x, y, _ = decode_jpeg_npz(TRAIN)
    assert hashlib.sha256(x.tobytes()).hexdigest() == TRAIN_SHA256
    assert np.array_equal(y, np.repeat(np.arange(10), 5000))
