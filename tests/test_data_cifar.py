"""CIFAR data: pickle layout round trip, download errors, checksums, split, DeviceLoader,
input normalization per protocol, mixup."""
from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from per.data import cifar
from per.data.cifar import (CIFAR_MEAN, CIFAR_STD, NORMALIZATIONS, DeviceLoader,
                            input_normalization, load_cifar, mixup, split_train_val,
                            write_fake_cifar)
from per.data.download import DatasetDamagedError, DatasetMissingError
from per.training.image_task import build_image_experiment
from runner_utils import compose_config

MEAN, STD = CIFAR_MEAN["cifar10"], CIFAR_STD["cifar10"]


def normalize(x_nhwc_uint8: torch.Tensor) -> torch.Tensor:
    """Reference normalization: uint8 (N, 32, 32, 3) -> float (N, 3, 32, 32)."""
    x = x_nhwc_uint8.permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, "cifar10", n_train=500, n_test=100, seed=1)
    write_fake_cifar(root, "cifar100", n_train=300, n_test=60, seed=2)
    return root


def test_fake_cifar10_layout_and_round_trip(fake_root: Path) -> None:
    d = fake_root / "cifar-10-batches-py"
    with open(d / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (100, 3072)
    with open(d / "batches.meta", "rb") as f:
        assert len(pickle.load(f, encoding="bytes")[b"label_names"]) == 10

    data = load_cifar("cifar10", fake_root, verify_checksums=False)
    assert data.train_x.shape == (500, 32, 32, 3) and data.train_x.dtype == np.uint8
    assert data.test_x.shape == (100, 32, 32, 3)
    assert data.train_y.dtype == np.int64 and data.train_y.shape == (500,)
    assert data.num_classes == 10 and data.class_names[0] == "airplane"
    # Row-major RGB planes: pixel (r, c) channel k of image i is data[i, k*1024 + r*32 + c].
    assert data.train_x[0, 5, 7, 2] == batch[b"data"][0, 2 * 1024 + 5 * 32 + 7]
    assert data.train_y[0] == batch[b"labels"][0]


def test_fake_cifar100_round_trip(fake_root: Path) -> None:
    with open(fake_root / "cifar-100-python" / "train", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert {b"fine_labels", b"coarse_labels", b"data", b"filenames", b"batch_label"} == set(batch)
    data = load_cifar("cifar100", fake_root, verify_checksums=False)
    assert data.train_x.shape == (300, 32, 32, 3) and data.test_x.shape == (60, 32, 32, 3)
    assert data.num_classes == 100 and len(data.class_names) == 100
    assert np.array_equal(data.train_y, batch[b"fine_labels"])
    assert data.train_y.max() < 100


def test_fake_data_is_learnable(fake_root: Path) -> None:
    """A nearest-class-mean classifier on raw pixels beats chance by far."""
    data = load_cifar("cifar10", fake_root, verify_checksums=False)
    tr = data.train_x.reshape(len(data.train_x), -1).astype(np.float32)
    te = data.test_x.reshape(len(data.test_x), -1).astype(np.float32)
    means = np.stack([tr[data.train_y == c].mean(0) for c in range(10)])
    pred = ((te[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == data.test_y).mean() > 0.5


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="cifar10, cifar100"):
        load_cifar("svhn", "/nonexistent")


def test_missing_files_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissingError) as e:
        load_cifar("cifar10", tmp_path)
    msg = str(e.value)
    assert "data_batch_1" in msg and "test_batch" in msg and "batches.meta" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    assert str((tmp_path / "cifar-10-batches-py").resolve()) in msg


def test_download_failure_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def offline(url: str, dest: Path, expected: str | None = None, algorithm: str = "sha256"):
        calls.append((url, Path(dest).name, expected, algorithm))
        raise OSError("network unreachable")

    monkeypatch.setattr(cifar, "download", offline)
    with pytest.raises(DatasetMissingError, match="network unreachable") as e:
        load_cifar("cifar100", tmp_path, download=True)
    assert "cifar-100-python.tar.gz" in str(e.value)
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    assert calls == [(url, "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "md5")]
    # data.verify_checksums=false skips the archive's md5 too (its error would advise it).
    with pytest.raises(DatasetMissingError):
        load_cifar("cifar100", tmp_path, download=True, verify_checksums=False)
    assert calls[1] == (url, "cifar-100-python.tar.gz", None, "md5")


def _fake_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A CIFAR-10 tarball of generated pickles, its md5 and theirs made the official ones."""
    import tarfile

    from per.data.download import file_digest
    src = tmp_path / "src"
    write_fake_cifar(src, "cifar10", n_train=50, n_test=10)
    archive = tmp_path / "fake.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    layout = cifar.LAYOUTS["cifar10"]
    md5 = {f: file_digest(src / "cifar-10-batches-py" / f, "md5") for f, _ in layout.train + layout.test + (layout.meta,)}
    monkeypatch.setitem(cifar.LAYOUTS, "cifar10", cifar._Layout(**{
        **layout.__dict__, "archive_md5": file_digest(archive, "md5"),
        "train": tuple((f, md5[f]) for f, _ in layout.train), "test": tuple((f, md5[f]) for f, _ in layout.test),
        "meta": (layout.meta[0], md5[layout.meta[0]])}))
    return archive


def test_download_extracts_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """download=True fetches the tarball (here a local fake), checks its md5 and extracts it."""
    archive = _fake_archive(tmp_path, monkeypatch)
    calls = []

    def fake_download(url: str, dest: Path, expected: str | None = None,
                      algorithm: str = "sha256") -> Path:
        calls.append((expected, algorithm))
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_bytes(archive.read_bytes())
        return Path(dest)

    monkeypatch.setattr(cifar, "download", fake_download)
    root = tmp_path / "root"
    data = load_cifar("cifar10", root, download=True)
    assert data.train_x.shape == (50, 32, 32, 3) and calls == [(cifar.LAYOUTS["cifar10"].archive_md5, "md5")]
    assert (root / "cifar-10-python.tar.gz").exists()


def test_a_tarball_put_in_the_root_by_hand_is_extracted_without_downloading(tmp_path, monkeypatch):
    """The offline error offers it; only the pickles still missing are moved in, each with one
    rename from a temp folder (runs that fetch at once never read a half-written file)."""
    archive = _fake_archive(tmp_path, monkeypatch)
    root = tmp_path / "root"
    with pytest.raises(DatasetMissingError, match=f"or put cifar-10-python.tar.gz itself in {root.resolve()}"):
        load_cifar("cifar10", root)
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(archive.read_bytes())
    kept = root / "cifar-10-batches-py" / "data_batch_1"
    kept.parent.mkdir()
    kept.write_bytes((tmp_path / "src/cifar-10-batches-py/data_batch_1").read_bytes())
    before = kept.stat().st_ino
    data = load_cifar("cifar10", root)                     # checksums on: all match
    assert data.train_x.shape == (50, 32, 32, 3) and kept.stat().st_ino == before
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_tarball_is_named(tmp_path, monkeypatch, damage):
    archive = _fake_archive(tmp_path, monkeypatch)
    root = tmp_path / "root"
    root.mkdir()
    packed = archive.read_bytes()
    packed = packed[:len(packed) // 2] if damage == "truncated" else packed[:100] + bytes(200) + packed[300:]
    (root / "cifar-10-python.tar.gz").write_bytes(packed)
    with pytest.raises(DatasetDamagedError, match=f"{root / 'cifar-10-python.tar.gz'}.*delete it"):
        load_cifar("cifar10", root, verify_checksums=False)
    with pytest.raises(DatasetDamagedError, match="checksum mismatch"):
        load_cifar("cifar10", root)
    assert [p.name for p in root.iterdir()] == ["cifar-10-python.tar.gz"]     # nothing half extracted


def test_checksum_mismatch(fake_root: Path) -> None:
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_cifar("cifar10", fake_root, verify_checksums=True)


def test_split_train_val() -> None:
    x = np.arange(100)[:, None].repeat(3, 1)
    y = np.arange(100)
    a = split_train_val(x, y, 20, seed=3)
    b = split_train_val(x, y, 20, seed=3)
    c = split_train_val(x, y, 20, seed=4)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[3], c[3])
    tx, ty, vx, vy = a
    assert len(ty) == 80 and len(vy) == 20
    assert sorted(np.concatenate([ty, vy]).tolist()) == list(range(100))
    assert np.array_equal(tx[:, 0], ty)
    tx, ty, vx, vy = split_train_val(x, y, 0, seed=0)
    assert vx.shape == (0, 3) and vy.shape == (0,) and np.array_equal(ty, y)
    for bad in (-1, 100):
        with pytest.raises(ValueError, match="val_size"):
            split_train_val(x, y, bad, seed=0)


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (103, 32, 32, 3), dtype=np.uint8), np.arange(103) % 10


def loader(images, train: bool, **kw) -> DeviceLoader:
    x, y = images
    return DeviceLoader(x, y, 16, device="cpu", train=train, mean=MEAN, std=STD, **kw)


def test_loader_shapes_and_lengths(images) -> None:
    train, ev = loader(images, True), loader(images, False)
    assert len(train) == 6 and len(ev) == 7
    assert len(loader(images, True, drop_last=False)) == 7
    xb, yb = next(train.epoch(0))
    assert xb.shape == (16, 3, 32, 32) and xb.dtype == torch.float32
    assert yb.shape == (16,) and yb.dtype == torch.int64
    assert sum(len(b[1]) for b in train.epoch(0)) == 96
    xb, _ = next(loader(images, True, channels_last=True).epoch(0))
    assert xb.is_contiguous(memory_format=torch.channels_last)


def test_eval_loader_is_normalized_input_in_order(images) -> None:
    x, y = images
    batches = list(loader(images, False).epoch(5))
    xs = torch.cat([b[0] for b in batches])
    ys = torch.cat([b[1] for b in batches])
    assert torch.equal(ys, torch.as_tensor(y, dtype=torch.int64))
    assert torch.allclose(xs, normalize(torch.as_tensor(x)), atol=1e-5)
    again = torch.cat([b[0] for b in loader(images, False).epoch(0)])
    assert torch.equal(xs, again)


def test_normalization_stats() -> None:
    """Data drawn with the normalization's own mean/std comes out with mean 0 and std 1."""
    rng = np.random.default_rng(0)
    x = np.clip(rng.normal(np.array(MEAN) * 255, np.array(STD) * 255, (400, 32, 32, 3)), 0, 255)
    dl = DeviceLoader(x.round().astype(np.uint8), np.zeros(400), 100, device="cpu", train=False,
                      mean=MEAN, std=STD)
    xs = torch.cat([b[0] for b in dl.epoch(0)])
    assert torch.allclose(xs.mean((0, 2, 3)), torch.zeros(3), atol=0.02)
    assert torch.allclose(xs.std((0, 2, 3)), torch.ones(3), atol=0.02)


def test_train_augmentation_is_crop_and_flip(images) -> None:
    """Every training image is a crop of the zero-padded source, possibly flipped; labels follow."""
    x, y = images[0][:40], images[1][:40]
    zero_pixel = normalize(torch.zeros(1, 1, 1, 3, dtype=torch.uint8))  # (1, 3, 1, 1)
    big = zero_pixel.repeat(len(x), 1, 40, 40)  # zero-padded sources, normalized
    big[:, :, 4:36, 4:36] = normalize(torch.as_tensor(x))
    assert_crops_and_flips(loader((x, y), True, seed=7), big, y)


def assert_crops_and_flips(dl: DeviceLoader, big: torch.Tensor, y: np.ndarray) -> None:
    """Each of `dl`'s epoch-2 images is a unique 32x32 crop of one of the padded, normalized
    sources big (N, 3, 40, 40), possibly flipped, with its label; 32 distinct sources."""
    windows = torch.nn.functional.unfold(big, 32)  # (N, 3*32*32, 81): every crop offset
    ids, n_flipped, n_shifted = [], 0, 0
    for xb, yb in dl.epoch(2):
        for img, label in zip(xb, yb):
            # Identify the source image, crop offset and flip by exhaustive search.
            cands = np.flatnonzero(y == label.item())
            found = []
            for f in (False, True):
                target = (img.flip(-1) if f else img).reshape(1, -1, 1)
                err = (windows[cands] - target).abs().amax(1)  # (candidates, 81)
                found += [(int(cands[i]), int(k), f) for i, k in (err < 1e-5).nonzero()]
            assert len(found) == 1, "batch image is not a unique crop/flip of a source image"
            i, k, f = found[0]
            ids.append(i)
            n_flipped += f
            n_shifted += k != 4 * 9 + 4
    assert len(set(ids)) == len(ids) == 32  # a permutation without repeats
    assert 4 < n_flipped < 28 and n_shifted > 20


def reference_sources(x: np.ndarray, mode: str, train_x: np.ndarray) -> np.ndarray:
    """Independent NumPy float64: uint8 (N, 32, 32, 3) -> (N, 3, 40, 40), normalized as `mode`
    (statistics of train_x) and zero-padded by 4 in the protocol's space: the raw image for
    "channel" (Fixup: torchvision pads before Normalize), the normalized one otherwise (VCL)."""
    pad = ((0, 0), (4, 4), (4, 4), (0, 0))
    xf, tf = x.astype(np.float64) / 255, train_x.astype(np.float64) / 255
    if mode == "channel":
        out = (np.pad(xf, pad) - np.array(MEAN)) / np.array(STD)
    elif mode == "pixel_mean":
        out = np.pad(xf - tf.mean(0), pad)
    else:
        out = np.pad((xf - tf.mean(0)) / tf.std(0), pad)
    return out.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("mode", NORMALIZATIONS)
def test_normalization_modes_against_numpy(fake_root: Path, mode: str) -> None:
    arrays = load_cifar("cifar10", fake_root, verify_checksums=False)
    train_x, train_y, _, _ = split_train_val(arrays.train_x, arrays.train_y, 100, seed=0)
    norm = input_normalization(mode, "cifar10", train_x)
    if mode != "channel":
        tf = train_x.astype(np.float64) / 255
        assert np.allclose(norm.mean, tf.mean(0).transpose(2, 0, 1), rtol=0, atol=1e-12)
        std = tf.std(0).transpose(2, 0, 1) if mode == "pixel_standardize" else 1.0
        assert np.allclose(norm.std, std, rtol=0, atol=1e-12)
    x, y = arrays.test_x[:40], arrays.test_y[:40]
    big = torch.from_numpy(reference_sources(x, mode, train_x)).float()
    kw = dict(device="cpu", mean=norm.mean, std=norm.std, pad_space=norm.pad_space)
    ev = torch.cat([b[0] for b in DeviceLoader(x, y, 16, train=False, **kw).epoch(0)])
    assert torch.allclose(ev, big[:, :, 4:36, 4:36], atol=1e-5)
    assert_crops_and_flips(DeviceLoader(x, y, 16, train=True, seed=7, **kw), big, y)


def test_bad_normalization_names_valid_choices(images) -> None:
    with pytest.raises(ValueError, match="valid: channel, pixel_mean, pixel_standardize"):
        input_normalization("per_channel", "cifar10", images[0])
    with pytest.raises(ValueError, match="valid: raw, normalized"):
        loader(images, True, pad_space="zero")
    pixel = np.full((3, 32, 32), 0.5)
    with pytest.raises(ValueError, match="per-channel"):
        DeviceLoader(*images, 16, device="cpu", train=True, mean=pixel, std=pixel)


@pytest.mark.parametrize("optim,mode", [("fixup", "channel"), ("he_bn", "pixel_mean"),
                                        ("vcl_elu", "pixel_standardize")])
def test_builder_normalizes_with_the_training_split(fake_root: Path, tmp_path: Path, optim: str,
                                                    mode: str) -> None:
    """Each protocol sets data.normalize; statistics come from the 400 kept of 500 (val_size 100)."""
    cfg = compose_config("train_cifar", [
        f"optim={optim}", "model=resnet20", f"data.root={fake_root}", "data.verify_checksums=false",
        "data.val_size=100", "data.batch_size=32", "data.probe_size=8", "trainer.device=cpu",
        "logger.mode=disabled"], tmp_path)
    assert cfg["data"]["normalize"] == mode
    task = build_image_experiment(cfg, torch.device("cpu"), contextlib.nullcontext).task
    arrays = load_cifar("cifar10", fake_root, verify_checksums=False)
    train_x = split_train_val(arrays.train_x, arrays.train_y, 100, seed=cfg["seed"])[0]
    test = torch.cat([b[0] for b in task.evals["test"].epoch(0)])
    expected = reference_sources(arrays.test_x, mode, train_x)[:, :, 4:36, 4:36]
    assert torch.allclose(test, torch.from_numpy(expected).float(), atol=1e-5)
    assert torch.equal(task.probe, test[:8])
    if mode != "channel":   # not the statistics of all 500
        full = reference_sources(arrays.test_x, mode, arrays.train_x)[:, :, 4:36, 4:36]
        assert not torch.allclose(test, torch.from_numpy(full).float(), atol=1e-3)


def test_train_loader_identity_when_unaugmented(images, monkeypatch: pytest.MonkeyPatch) -> None:
    """With all crop offsets at 4 (centre) and no flips a batch is the normalized source."""
    x, y = images
    real_randint = torch.randint

    def centred(low, high, size, *, generator=None, dtype=None):
        real_randint(low, high, size, generator=generator)   # keep the RNG stream as the real draw
        return torch.full(size, 4) if high == 9 else torch.zeros(size, dtype=dtype)

    monkeypatch.setattr(torch, "randint", centred)
    dl = loader(images, True)
    g = cifar._epoch_generator(0, 0)
    order = torch.randperm(len(x), generator=g)
    xb, yb = next(dl.epoch(0))
    assert torch.equal(yb, torch.as_tensor(y)[order[:16]])
    assert torch.allclose(xb, normalize(torch.as_tensor(x)[order[:16]]), atol=1e-5)


def test_train_loader_flip(images, monkeypatch: pytest.MonkeyPatch) -> None:
    x, _ = images
    real_randint = torch.randint

    def flipped(low, high, size, *, generator=None, dtype=None):
        real_randint(low, high, size, generator=generator)
        return torch.full(size, 4) if high == 9 else torch.ones(size, dtype=dtype)

    monkeypatch.setattr(torch, "randint", flipped)
    order = torch.randperm(len(x), generator=cifar._epoch_generator(0, 0))
    xb, _ = next(loader(images, True).epoch(0))
    assert torch.allclose(xb, normalize(torch.as_tensor(x)[order[:16]]).flip(-1), atol=1e-5)


def test_resume_from_start_batch(images) -> None:
    dl = loader(images, True, seed=3)
    full = list(dl.epoch(4))
    resumed = list(loader(images, True, seed=3).epoch(4, start_batch=2))
    assert len(resumed) == len(full) - 2
    for (a, ya), (b, yb) in zip(full[2:], resumed):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    other_epoch = next(dl.epoch(5))[0]
    other_seed = next(loader(images, True, seed=4).epoch(4))[0]
    assert not torch.equal(full[0][0], other_epoch)
    assert not torch.equal(full[0][0], other_seed)


def test_mixup() -> None:
    x = torch.randn(8, 3, 4, 4)
    y = torch.arange(8)
    xm, ya, yb, lam = mixup(x, y, 1.0, generator=torch.Generator().manual_seed(0))
    assert 0 <= lam <= 1 and torch.equal(ya, y)
    perm = yb  # labels are the indices, so y_b is the pairing
    assert sorted(perm.tolist()) == list(range(8))
    assert torch.allclose(xm, lam * x + (1 - lam) * x[perm])
    again = mixup(x, y, 1.0, generator=torch.Generator().manual_seed(0))
    assert again[3] == lam and torch.equal(again[2], yb)
    assert mixup(x, y, 0.0)[3] == 1.0


def test_generated_files_read_the_same_in_torchvision(tmp_path, monkeypatch):
    """The written pickles hold Python 2 strings, as the official files do: torchvision's
    reader (`encoding="latin1"`) gets the same images, labels and names as ours."""
    import torchvision.datasets.cifar as tvc
    monkeypatch.setattr(tvc, "check_integrity", lambda *args, **kwargs: True)   # other md5s
    for name, reader in (("cifar10", tvc.CIFAR10), ("cifar100", tvc.CIFAR100)):
        write_fake_cifar(tmp_path, name, n_train=30, n_test=10, seed=0)
        ours = load_cifar(name, tmp_path, download=False, verify_checksums=False)
        for train, x, y in ((True, ours.train_x, ours.train_y), (False, ours.test_x, ours.test_y)):
            theirs = reader(str(tmp_path), train=train)
            assert np.array_equal(theirs.data, x) and theirs.targets == [int(v) for v in y]
        assert len(theirs.classes) == (10 if name == "cifar10" else 100)
