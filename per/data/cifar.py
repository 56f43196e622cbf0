"""CIFAR-10/100: the official python-pickle layout, downloads with checksums, a device loader.

- `load_cifar` reads `cifar-10-batches-py/` or `cifar-100-python/` under a root,
  extracting the official tarball found there, or downloading it when asked.
- `input_normalization` gives a protocol's input normalization (`data.normalize`:
  Fixup's per-channel constants, He et al.'s per-pixel mean, VCL's per-pixel
  standardization), its statistics taken from the training split in use.
- `DeviceLoader` keeps the uint8 dataset on the training device and runs random
  crop (zero pad 4, in raw or normalized space), horizontal flip and normalization
  batched there. Its iteration is stateless: `epoch(e, start_batch=k)` is a pure
  function of (seed, e), so a resumed run sees exactly the batches it would have seen.
- `write_fake_cifar` writes a small learnable dataset in the official layout
  (tests, CPU demos); `convert_jpeg_npz_to_pickles` turns a JPEG-compressed copy of
  CIFAR-10 (an `.npz` of JPEG bytes, offsets, labels and class names, as the development
  machines carry) into that layout.
"""
from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .download import (PARTIAL_PREFIX, DatasetDamagedError, download, ensure_files, remove_stale_partials,
                       verify_file)

# Per-channel normalization: Fixup's cifar_train.py for CIFAR-10 (its std is below the true
# pixel std); for CIFAR-100 the usual true statistics (docs/protocols.md, Table 1).
CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2023, 0.1994, 0.2010), "cifar100": (0.2673, 0.2564, 0.2762)}

TRAIN_SIZE = 50_000   # training images of CIFAR-10 and of CIFAR-100, before any validation split
TEST_SIZE = 10_000    # test images of each
NORMALIZATIONS = ("channel", "pixel_mean", "pixel_standardize")   # data.normalize
PAD_SPACES = ("raw", "normalized")


@dataclass(frozen=True)
class _Layout:
    url: str
    archive_md5: str
    directory: str
    train: tuple[tuple[str, str], ...]  # (file, md5) as in torchvision's train_list
    test: tuple[tuple[str, str], ...]
    meta: tuple[str, str]
    label_key: bytes
    names_key: bytes
    num_classes: int


LAYOUTS = {
    "cifar10": _Layout(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive_md5="c58f30108f718f92721af3b95e74349a",
        directory="cifar-10-batches-py",
        train=(("data_batch_1", "c99cafc152244af753f735de768cd75f"),
               ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
               ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
               ("data_batch_4", "634d18415352ddfa80567beed471001a"),
               ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")),
        test=(("test_batch", "40351d587109b95175f43aff81a1287e"),),
        meta=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
        label_key=b"labels", names_key=b"label_names", num_classes=10),
    "cifar100": _Layout(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
        directory="cifar-100-python",
        train=(("train", "16019d7e3df5f24257cddd939b257f8d"),),
        test=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
        meta=("meta", "7973b15100ade9c7d40fb424638fde48"),
        label_key=b"fine_labels", names_key=b"fine_label_names", num_classes=100),
}

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


@dataclass
class CifarArrays:
    """A CIFAR dataset in memory. x: uint8 (N, 32, 32, 3) RGB; y: int64 (N,)."""
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    class_names: list[str]


def _layout(name: str) -> _Layout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown CIFAR dataset {name!r}; valid: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def _unpickle(path: Path) -> dict:
    # encoding="bytes": keys stay bytes for the official (Python 2) files and for ours.
    with open(path, "rb") as f:
        try:
            return pickle.load(f, encoding="bytes")
        except Exception as e:   # truncated or damaged: EOFError, UnpicklingError, ...
            raise DatasetDamagedError(f"cannot read {path} ({type(e).__name__}: {e}): damaged or not "
                                      "the expected file; delete it and fetch it again "
                                      "(data.download=true)") from e


def _read_batches(directory: Path, files: tuple[tuple[str, str], ...], label_key: bytes
                  ) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for fname, _ in files:
        d = _unpickle(directory / fname)
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    x = np.ascontiguousarray(np.concatenate(xs).transpose(0, 2, 3, 1))
    return x, np.concatenate(ys)


def _fetch_and_extract(layout: _Layout, archive: Path, verify_checksums: bool) -> None:
    """Download the official tarball to `archive` unless it is there already, then `_extract` it."""
    if not archive.exists():
        download(layout.url, archive, expected=layout.archive_md5 if verify_checksums else None, algorithm="md5")
    _extract(layout, archive, verify_checksums)


def _extract(layout: _Layout, archive: Path, verify_checksums: bool) -> None:
    """Check `archive`'s md5 (with `verify_checksums`, as the pickles'), extract it into a
    temp folder beside it, check the pickles there, then move in those still missing, each
    with one rename: runs that fetch at once never see a file half written. A damaged
    archive raises DatasetDamagedError naming it."""
    if verify_checksums:
        verify_file(archive, layout.archive_md5, "md5")
    root, directory = archive.parent, archive.parent / layout.directory
    remove_stale_partials(root)            # what a killed extraction left
    with tempfile.TemporaryDirectory(dir=root, prefix=PARTIAL_PREFIX) as tmp:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                try:
                    tar.extractall(tmp, filter="data")
                except TypeError:    # Python before 3.10.12 / 3.11.4: no filters
                    tar.extractall(tmp)
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as e:   # not a full disk, say
            raise DatasetDamagedError(f"cannot extract {archive} ({type(e).__name__}: {e}): damaged or "
                                      "not the official file; delete it and fetch it again") from e
        extracted = Path(tmp) / layout.directory
        directory.mkdir(parents=True, exist_ok=True)
        for fname, md5 in layout.train + layout.test + (layout.meta,):
            if not (extracted / fname).is_file():
                raise DatasetDamagedError(f"{archive} lacks {layout.directory}/{fname}: not the official "
                                          "file; delete it and fetch it again")
            if verify_checksums:
                verify_file(extracted / fname, md5, "md5")
            if not (directory / fname).exists():
                (extracted / fname).replace(directory / fname)


def load_cifar(name: str, root: str | Path, *, download: bool = False,
               verify_checksums: bool = True) -> CifarArrays:
    """Load CIFAR-10 or CIFAR-100 ("cifar10" | "cifar100") from the pickle layout under `root`.

    Missing files are extracted from the official tarball where it lies in `root`, else
    downloaded when `download` is true; otherwise (or when the download fails)
    DatasetMissingError names the files, URL and location.
    `verify_checksums` checks the archive's and each pickle file's md5 against the
    official ones (ValueError on mismatch); turn it off for generated or converted copies.
    """
    layout = _layout(name)
    root = Path(root)
    directory = root / layout.directory
    files = [f for f, _ in layout.train + layout.test] + [layout.meta[0]]
    archive = root / layout.url.rsplit("/", 1)[-1]
    if archive.exists() and not all((directory / f).exists() for f in files):
        _extract(layout, archive, verify_checksums)    # the tarball put there by hand
    ensure_files(directory, files, url=layout.url, what=name,
                 download_fn=lambda: _fetch_and_extract(layout, archive, verify_checksums),
                 download_enabled=download, or_else=f"put {archive.name} itself in {root.resolve()}")
    if verify_checksums:
        for fname, md5 in layout.train + layout.test + (layout.meta,):
            verify_file(directory / fname, md5, "md5")
    train_x, train_y = _read_batches(directory, layout.train, layout.label_key)
    test_x, test_y = _read_batches(directory, layout.test, layout.label_key)
    names = [n.decode() if isinstance(n, bytes) else n
             for n in _unpickle(directory / layout.meta[0])[layout.names_key]]
    return CifarArrays(train_x, train_y, test_x, test_y, layout.num_classes, names)


def split_train_val(x: np.ndarray, y: np.ndarray, val_size: int, seed: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out `val_size` random examples (fixed by `seed`); both parts keep dataset order.

    Returns (train_x, train_y, val_x, val_y); val_size=0 gives empty val arrays.
    """
    n = len(x)
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}) for {n} examples, got {val_size}")
    perm = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = np.sort(perm[:val_size]), np.sort(perm[val_size:])
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx]


def pixel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean and std (ddof 0, as np.std) of uint8 images x (N, H, W, 3).

    Returns two float64 (3, H, W) arrays on the 0-1 scale. Exact integer sums, taken
    in chunks, so the 50k training set needs no float64 copy.
    """
    s = np.zeros(x.shape[1:], np.int64)
    ss = np.zeros(x.shape[1:], np.int64)
    for i in range(0, len(x), chunk):
        c = x[i:i + chunk].astype(np.int64)
        s += c.sum(0)
        ss += (c * c).sum(0)
    n = len(x)
    mean = s / n
    var = (n * ss - s * s) / n**2            # n * ss - s**2 is exact in int64
    return ((mean / 255).transpose(2, 0, 1), (np.sqrt(var) / 255).transpose(2, 0, 1))


@dataclass(frozen=True)
class Normalization:
    """x_in = (x / 255 - mean) / std. mean, std: (3,) per channel or (3, H, W) per pixel
    (0-1 scale). pad_space: where the crop's zero padding lives, "raw" (black pixels,
    then normalized) or "normalized" (zeros after normalization)."""
    mean: np.ndarray
    std: np.ndarray
    pad_space: str


def input_normalization(mode: str, name: str, train_x: np.ndarray) -> Normalization:
    """The input normalization of a protocol (`data.normalize`), statistics from `train_x`.

    train_x: uint8 (N, 32, 32, 3), the training split actually used.
    - "channel" (Fixup's cifar_train.py): constants CIFAR_MEAN/CIFAR_STD of `name`;
      torchvision's RandomCrop(32, padding=4) pads the raw image before Normalize: "raw".
    - "pixel_mean" (He et al. 2016: "per-pixel mean subtracted"): mean (3, 32, 32), std 1;
      the paper does not say where it pads; we pad the mean-subtracted image with zeros
      (a per-pixel mean has no value outside the image): "normalized".
    - "pixel_standardize" (VCL code, vcl_tests_main.py + utils.run_augmentation_v1):
      per-pixel mean and std (np.std), then zero_pad of the standardized image: "normalized".
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"unknown data.normalize {mode!r}; valid: {', '.join(NORMALIZATIONS)}")
    if mode == "channel":
        return Normalization(np.array(CIFAR_MEAN[name]), np.array(CIFAR_STD[name]), "raw")
    mean, std = pixel_stats(train_x)
    if mode == "pixel_mean":
        return Normalization(mean, np.ones(3), "normalized")
    return Normalization(mean, std, "normalized")


def num_batches(num_examples: int, batch_size: int, drop_last: bool) -> int:
    """Batches of one `DeviceLoader` epoch: the last partial batch counts unless `drop_last`."""
    if drop_last:
        return num_examples // batch_size
    return math.ceil(num_examples / batch_size)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """CPU generator seeded from (seed, epoch) by numpy's SeedSequence hashing."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class DeviceLoader:
    """Batches from a uint8 dataset held on `device`, augmented and normalized there.

    x: uint8 (N, 32, 32, 3) numpy array or tensor; y: (N,) integer labels.
    mean, std: (3,) per channel or (3, 32, 32) per pixel, 0-1 scale (see `Normalization`).
    Training loaders (`train=True`) shuffle and apply random crop (zero pad 4) and
    horizontal flip; eval loaders keep order and do neither. `pad_space="raw"` pads the
    uint8 image (torchvision's RandomCrop(32, padding=4) before Normalize; per-channel
    statistics only), "normalized" pads the normalized one (per-pixel statistics are
    indexed by the source pixel, as when normalizing before the crop). All of an epoch's random numbers
    (permutation, crop offsets, flip bits) are drawn at the start of `epoch(e)`
    from a CPU generator seeded by (seed, e), so batches are identical on any
    device and `epoch(e, start_batch=k)` yields exactly batches k.. of `epoch(e)`.
    `drop_last` leaves out the last partial batch (default: for training loaders; the
    runner passes the protocol's `optim.drop_last`).
    """

    PAD = 4

    def __init__(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
                 batch_size: int, *, device: str | torch.device, train: bool,
                 mean: tuple[float, ...] | np.ndarray, std: tuple[float, ...] | np.ndarray,
                 pad_space: str = "raw", seed: int = 0, drop_last: bool | None = None,
                 channels_last: bool = False) -> None:
        x = torch.as_tensor(x)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[3] != 3:
            raise ValueError(f"x must be uint8 (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
        if pad_space not in PAD_SPACES:
            raise ValueError(f"unknown pad_space {pad_space!r}; valid: {', '.join(PAD_SPACES)}")
        if pad_space == "raw" and (np.ndim(mean) != 1 or np.ndim(std) != 1):
            raise ValueError("pad_space='raw' needs per-channel mean and std, shape (3,)")
        self.device = torch.device(device)
        self.num_examples = len(x)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.drop_last = train if drop_last is None else drop_last
        self.channels_last = channels_last
        x = x.to(self.device).permute(0, 3, 1, 2)  # (N, 3, H, W)
        size = x.shape[2:]
        # x_norm = x_uint8 * scale - shift, i.e. (x/255 - mean) / std; scale, shift: (3, H, W)
        std_t = self._per_pixel(std, size)
        mean_t = self._per_pixel(mean, size)
        scale, shift = 1.0 / (255.0 * std_t), mean_t / std_t
        if train:  # pad once; crops (and their scale/shift) are gathered from the padded copies
            pad = (self.PAD,) * 4
            x = torch.nn.functional.pad(x, pad)
            if pad_space == "raw":    # constant per channel: the border is a normalized black pixel
                scale = torch.nn.functional.pad(scale[None], pad, mode="replicate")[0]
                shift = torch.nn.functional.pad(shift[None], pad, mode="replicate")[0]
            else:                     # zero scale and shift: the border is 0 after normalization
                scale = torch.nn.functional.pad(scale, pad)
                shift = torch.nn.functional.pad(shift, pad)
        self.x = x.contiguous()
        self.scale, self.shift = scale, shift
        self.y = torch.as_tensor(y, dtype=torch.int64).to(self.device)
        self.image_size = self.x.shape[2] - (2 * self.PAD if train else 0)

    def _per_pixel(self, v: tuple[float, ...] | np.ndarray, size: torch.Size) -> torch.Tensor:
        """(3,) per channel or (3, H, W) per pixel -> float32 (3, H, W) on the device."""
        t = torch.as_tensor(np.asarray(v, dtype=np.float32), device=self.device)
        if t.shape == (3,):
            return t.view(3, 1, 1).expand(3, *size)
        if t.shape != (3, *size):
            raise ValueError(f"mean/std must have shape (3,) or (3, {size[0]}, {size[1]}), "
                             f"got {tuple(t.shape)}")
        return t

    def __len__(self) -> int:
        return num_batches(self.num_examples, self.batch_size, self.drop_last)

    def epoch(self, epoch: int, start_batch: int = 0
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x float32 (B, 3, 32, 32) normalized, y int64 (B,)) on the device."""
        n, bs = self.num_examples, self.batch_size
        if self.train:
            g = _epoch_generator(self.seed, epoch)
            order = torch.randperm(n, generator=g).to(self.device)
            offsets = torch.randint(0, 2 * self.PAD + 1, (n, 2), generator=g).to(self.device)
            flips = torch.randint(0, 2, (n,), generator=g, dtype=torch.bool).to(self.device)
        ar = torch.arange(self.image_size, device=self.device)
        channels = torch.arange(3, device=self.device).view(1, 3, 1, 1)
        for b in range(start_batch, len(self)):
            sl = slice(b * bs, min((b + 1) * bs, n))
            if self.train:
                idx = order[sl]
                rows = offsets[sl, 0:1] + ar  # (B, 32)
                cols = offsets[sl, 1:2] + torch.where(flips[sl, None], ar.flip(0), ar)
                pos = (channels, rows[:, None, :, None], cols[:, None, None, :])
                xb = self.x[(idx.view(-1, 1, 1, 1), *pos)]
                scale, shift = self.scale[pos], self.shift[pos]   # (B, 3, 32, 32)
                yb = self.y[idx]
            else:
                xb, yb = self.x[sl], self.y[sl]
                scale, shift = self.scale, self.shift
            xb = xb.float() * scale - shift
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float,
          generator: torch.Generator | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al. 2018, as in Fixup's cifar_train.py).

    x: (B, ...), y: (B,) -> (lam * x + (1 - lam) * x[perm], y, y[perm], lam) with
    lam ~ Beta(alpha, alpha) (lam = 1 when alpha <= 0). Train on
    `lam * CE(out, y_a) + (1 - lam) * CE(out, y_b)`. lam comes from the CPU RNG
    (no device sync); the pairing is drawn on `x`'s device. `generator`, if given,
    must live on `x`'s device and makes both draws reproducible.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device
                             if generator is not None else "cpu"))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha)) if alpha > 0 else 1.0
    perm = torch.randperm(len(x), generator=generator, device=x.device)
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 with `bytes` written as Python 2 `str` (BINSTRING opcodes), as the official
    files hold their keys, names and pixel buffers: they load as bytes under
    `encoding="bytes"` (our reader) and as str under `encoding="latin1"` (torchvision's)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256
                   else pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _dump(obj: dict, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _planes(x: np.ndarray) -> np.ndarray:
    """uint8 (N, 32, 32, 3) -> (N, 3072): R, G, B planes, each row-major (the official layout)."""
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), -1))


def _write_cifar10(root: Path, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                   test_y: np.ndarray, class_names: list[str]) -> Path:
    """Write cifar-10-batches-py/ (5 train batches, test_batch, batches.meta) under root."""
    directory = root / LAYOUTS["cifar10"].directory
    directory.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(np.arange(len(train_x)), 5)
    splits = [(f"data_batch_{i + 1}", f"training batch {i + 1} of 5", train_x[p], train_y[p])
              for i, p in enumerate(parts)]
    splits.append(("test_batch", "testing batch 1 of 1", test_x, test_y))
    for fname, batch_label, x, y in splits:
        _dump({b"batch_label": batch_label.encode(), b"labels": [int(v) for v in y],
               b"data": _planes(x),
               b"filenames": [f"{fname}_{i:05d}.png".encode() for i in range(len(x))]},
              directory / fname)
    _dump({b"num_cases_per_batch": len(parts[0]), b"label_names": [n.encode() for n in class_names],
           b"num_vis": 3072}, directory / "batches.meta")
    return directory


def _write_cifar100(root: Path, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                    test_y: np.ndarray, class_names: list[str]) -> Path:
    """Write cifar-100-python/ (train, test, meta) under root; coarse label = fine // 5."""
    directory = root / LAYOUTS["cifar100"].directory
    directory.mkdir(parents=True, exist_ok=True)
    for fname, (x, y) in [("train", (train_x, train_y)), ("test", (test_x, test_y))]:
        _dump({b"filenames": [f"{fname}_{i:05d}.png".encode() for i in range(len(x))],
               b"batch_label": f"{fname}ing batch 1 of 1".encode(),
               b"fine_labels": [int(v) for v in y], b"coarse_labels": [int(v) // 5 for v in y],
               b"data": _planes(x)}, directory / fname)
    _dump({b"fine_label_names": [n.encode() for n in class_names],
           b"coarse_label_names": [f"superclass_{i}".encode() for i in range(20)]},
          directory / "meta")
    return directory


def _fake_images(n: int, num_classes: int, rng: np.random.Generator, noise: float = 30.0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: a class colour plus a class-oriented stripe pattern (random phase) and
    Gaussian pixel noise of std `noise` (0-255 scale; larger is harder)."""
    class_rng = np.random.default_rng(12345)  # classes look the same in every split and seed
    colours = class_rng.uniform(40, 215, (num_classes, 3))
    freqs = class_rng.uniform(1.0, 4.0, num_classes)
    angles = class_rng.uniform(0, np.pi, num_classes)
    y = rng.integers(0, num_classes, n)
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    proj = np.cos(angles[y])[:, None, None] * xx + np.sin(angles[y])[:, None, None] * yy
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    stripes = 50.0 * np.sin(2 * np.pi * freqs[y][:, None, None] * proj + phase)
    img = colours[y][:, None, None, :] + stripes[..., None] + rng.normal(0, noise, (n, 32, 32, 3))
    return np.clip(img, 0, 255).astype(np.uint8), y.astype(np.int64)


def write_fake_cifar(root: str | Path, name: str = "cifar10", n_train: int = 1000,
                     n_test: int = 200, seed: int = 0, noise: float = 30.0) -> Path:
    """Write a small generated, learnable dataset in the official pickle layout; return its folder.

    `noise` is the pixel-noise std (0-255 scale): 30 is easy, ~150 leaves errors after
    a few dozen steps. Loadable with `load_cifar(name, root, verify_checksums=False)`.
    """
    layout = _layout(name)
    rng = np.random.default_rng(seed)
    train_x, train_y = _fake_images(n_train, layout.num_classes, rng, noise)
    test_x, test_y = _fake_images(n_test, layout.num_classes, rng, noise)
    if name == "cifar10":
        return _write_cifar10(Path(root), train_x, train_y, test_x, test_y, list(CIFAR10_CLASSES))
    names = [f"class_{i:02d}" for i in range(layout.num_classes)]
    return _write_cifar100(Path(root), train_x, train_y, test_x, test_y, names)


def decode_jpeg_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode a JPEG-compressed CIFAR copy (`.npz`: `jpeg` bytes, `offsets` (N + 1,), `labels`,
    `class_names`) -> uint8 (N, 32, 32, 3), int64 labels, names."""
    from PIL import Image

    with np.load(path) as z:
        jpeg, offsets = z["jpeg"], z["offsets"]
        labels = z["labels"].astype(np.int64)
        names = [str(n) for n in z["class_names"]]
    x = np.empty((len(labels), 32, 32, 3), dtype=np.uint8)
    for i in range(len(labels)):
        data = jpeg[offsets[i]:offsets[i + 1]].tobytes()
        x[i] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return x, labels, names


def convert_jpeg_npz_to_pickles(train_npz: str | Path, test_npz: str | Path, root: str | Path,
                                seed: int = 0) -> Path:
    """Decode the JPEG CIFAR-10 copy, shuffle it (it is sorted by class), write cifar-10-batches-py/.

    The result is lossy (JPEG quality 75), so load it with verify_checksums=False.
    """
    train_x, train_y, names = decode_jpeg_npz(train_npz)
    test_x, test_y, _ = decode_jpeg_npz(test_npz)
    rng = np.random.default_rng(seed)
    p_train, p_test = rng.permutation(len(train_x)), rng.permutation(len(test_x))
    return _write_cifar10(Path(root), train_x[p_train], train_y[p_train], test_x[p_test],
                          test_y[p_test], names)
