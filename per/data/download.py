"""Fetch-or-find dataset files with checksum verification and clear offline errors."""
from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path


class DatasetMissingError(FileNotFoundError):
    """A dataset file is absent and could not be downloaded; the message says where to put it."""


class DatasetDamagedError(ValueError):
    """A dataset file cannot be read or is not the official one; the message says what to do."""


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: str | Path, expected: str, algorithm: str = "sha256", *,
                downloaded: tuple[str | Path, str] | None = None) -> None:
    """Raise DatasetDamagedError (a ValueError) if `path`'s digest differs from `expected`.
    `downloaded`: (the file's destination, its URL) for a fresh download, which is not kept."""
    got = file_digest(path, algorithm)
    if got == expected:
        return
    if downloaded is None:
        raise DatasetDamagedError(
            f"checksum mismatch for {path}: {algorithm} {got}, expected {expected}. "
            "Delete the file to download it again, or pass data.verify_checksums=false "
            "for a converted or generated copy.")
    dest, url = downloaded
    raise DatasetDamagedError(
        f"checksum mismatch for {dest} as downloaded from {url}: {algorithm} {got}, expected "
        f"{expected}; nothing was kept. The server may send another version: put the official "
        "file there yourself, or pass data.verify_checksums=false to accept this one.")


PARTIAL_AGE_S = 600   # a download's leftovers untouched this long are a killed process's
PARTIAL_PREFIX = ".per-download-"   # its temp files and folders: never a user's file


def remove_stale_partials(folder: Path) -> None:
    """Remove what killed downloads left in `folder` (temp files and folders named
    `PARTIAL_PREFIX...`) once nothing in one has changed for `PARTIAL_AGE_S`: a running
    download (another run's, say) keeps writing to its own."""
    now = time.time()
    for path in folder.glob(f"{PARTIAL_PREFIX}*"):
        try:     # another process may remove its own leftovers meanwhile
            if now - max(p.lstat().st_mtime for p in (path, *path.rglob("*"))) <= PARTIAL_AGE_S:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink()
        except OSError:
            continue


USER_AGENT = "Mozilla/5.0 (per-repro dataset download)"


def download(url: str, dest: str | Path, expected: str | None = None,
             algorithm: str = "sha256", timeout: float = 60.0) -> Path:
    """Download `url` to `dest` atomically (temp file, verify, rename)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(dest.parent)
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False, prefix=PARTIAL_PREFIX, suffix=".part") as tmp:
        tmp_path = Path(tmp.name)
        try:
            # A browser-like agent: some mirrors (WikiText's) refuse urllib's default one.
            request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                shutil.copyfileobj(resp, tmp)
                size = resp.headers.get("Content-Length")
                # urllib returns what came when a server closes early: a short file, no error.
                if size is not None and size.isdigit() and tmp.tell() != int(size):
                    raise OSError(f"download of {url} ended after {tmp.tell():,} of {int(size):,} bytes")
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
    try:
        if expected is not None:
            verify_file(tmp_path, expected, algorithm, downloaded=(dest, url))
        tmp_path.replace(dest)
    finally:
        tmp_path.unlink(missing_ok=True)
    return dest


def ensure_files(directory: str | Path, files: list[str], *, url: str, what: str,
                 download_fn, download_enabled: bool, or_else: str = "") -> None:
    """Make sure `files` exist under `directory`, calling `download_fn()` if allowed.

    Raises DatasetMissingError naming the missing files, the URL and the expected
    location when they are absent and downloading is off or fails; `or_else`: another
    way to provide them, for the message.
    """
    directory = Path(directory)
    missing = [f for f in files if not (directory / f).exists()]
    if not missing:
        return
    reason = "data.download=false"
    if download_enabled:
        try:
            download_fn()
        except Exception as e:  # network down, HTTP error, bad checksum
            reason = f"download failed: {type(e).__name__}: {e}"
        missing = [f for f in files if not (directory / f).exists()]
        if not missing:
            return
    raise DatasetMissingError(
        f"{what}: missing {', '.join(missing)} in {directory.resolve()} ({reason}). "
        f"Download it from {url} and place the files there{', or ' + or_else if or_else else ''}, or run with "
        "data.download=true on a machine with internet access.")
