"""The run directory: resolved config, metrics.jsonl, activations.jsonl, summary.json,
checkpoints, and the lock held while a process runs in it. Files that are rewritten are
written to a temp file and renamed; every record is readable by the group and others
as the umask allows (0644 under the usual 022)."""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
import yaml

from per import schema

CHECKPOINT = "checkpoints/last.pt"
PREVIOUS_CHECKPOINT = "checkpoints/prev.pt"   # the checkpoint before `last.pt`
BEST_CHECKPOINT = "checkpoints/best.pt"
WANDB_ID = "wandb_id.txt"
WANDB_DIR = "wandb"       # W&B's files of the run (`loggers.WandbSink`)
# The checkpoints to resume from, newest first: `last.pt.new` exists only complete (written
# atomically) and newer than `last.pt`, which a kill before `save_checkpoint`'s renames left.
CHECKPOINTS = (f"{CHECKPOINT}.new", CHECKPOINT, PREVIOUS_CHECKPOINT)
CONFIG = "config.yaml"      # the resolved config
METRICS_FILE = "metrics.jsonl"   # one row per epoch
ACTIVATIONS_FILE = "activations.jsonl"   # the monitor's rows
SUMMARY = "summary.json"
LOCK = ".lock"

log = logging.getLogger(__name__)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a jsonl record, [] when it is missing. A line that is not JSON (a kill
    mid-append leaves a partial last one, which a resume truncates) is skipped with a
    warning naming it."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d: unreadable line skipped", path, number)
    return rows


class RunLockedError(RuntimeError):
    """Another process holds the run directory's lock."""


class CheckpointError(RuntimeError):
    """No readable checkpoint although one was written."""


def _file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write_bytes(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())   # mkstemp creates 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, lambda f: f.write(text.encode()))


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN and inf floats are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class RunDir:
    """One run's directory and its records (README, "What lands in a run directory")."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)    # created by `lock()` or the first write, not here
        self._lock_fd: int | None = None

    # --- lock ---------------------------------------------------------------
    def lock(self) -> None:
        """Take the directory's advisory lock (`flock` on `.lock`, which keeps the
        holder's pid) for this process's life, or until `unlock()`.

        Raises:
            RunLockedError: another process holds it; the message names its pid.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise RunLockedError(f"{self.path} is in use by process {holder} (lock {self.path / LOCK}); "
                                 "wait for it to end, or stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock; the file stays (removing it would race with a waiting process)."""
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- any text record (the Hydra record under .hydra/) -------------------
    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.path / name, text)

    # --- config -------------------------------------------------------------
    def write_config(self, config: dict) -> None:
        atomic_write_text(self.path / CONFIG, yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict | None:
        f = self.path / CONFIG
        return yaml.safe_load(f.read_text()) if f.exists() else None

    # --- summary ------------------------------------------------------------
    def read_summary(self) -> dict | None:
        f = self.path / SUMMARY
        if not f.exists():
            return None
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError:
            return None

    def write_summary(self, summary: dict) -> None:
        missing = [k for k in schema.SUMMARY_KEYS if k not in summary]
        if missing:
            raise KeyError(f"summary.json is missing keys {missing}")
        if summary["status"] not in schema.STATUSES:
            raise ValueError(f"unknown status {summary['status']!r}; valid: {schema.STATUSES}")
        atomic_write_text(self.path / SUMMARY,
                          json.dumps(_clean(summary), indent=2, allow_nan=False) + "\n")

    # --- per-epoch and monitoring logs ----------------------------------------
    def append(self, name: str, rows: list[dict]) -> None:
        with open(self.path / name, "a") as f:
            for row in rows:
                f.write(json.dumps(_clean(row), allow_nan=False) + "\n")
            f.flush()

    def truncate(self, name: str, key: str, max_value: float) -> None:
        """Drop lines of a jsonl log whose `key` exceeds `max_value` (or that are
        unreadable): after a resume, the log matches the checkpoint it resumed from."""
        f = self.path / name
        if not f.exists():
            return
        keep = []
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get(key, math.inf) <= max_value:
                keep.append(line)
        atomic_write_text(f, "".join(l + "\n" for l in keep))

    def read_jsonl(self, name: str) -> list[dict]:
        return read_jsonl(self.path / name)

    # --- checkpoints ----------------------------------------------------------
    def save_checkpoint(self, state: dict, name: str = CHECKPOINT) -> None:
        """Write `name` atomically; the `last.pt` it replaces becomes `prev.pt`."""
        path = self.path / name
        if name == CHECKPOINT and path.exists():
            # Between these two renames only prev.pt exists: a reader falls back to it.
            _atomic_write_bytes(self.path / f"{name}.new", lambda f: torch.save(state, f))
            os.replace(path, self.path / PREVIOUS_CHECKPOINT)
            os.replace(self.path / f"{name}.new", path)
        else:
            _atomic_write_bytes(path, lambda f: torch.save(state, f))

    def load_checkpoint(self, map_location=None) -> tuple[dict, str] | None:
        """The newest readable checkpoint and its name: the complete `last.pt.new` that a
        kill before `save_checkpoint`'s renames leaves (the renames are finished here: a run
        resumed after its last save writes no other), else `last.pt`, else `prev.pt`; None
        when none exists. A damaged newer one is named in a warning and set aside as
        `*.damaged` once an older one has loaded (so that the next save does not rotate it
        into `prev.pt`). Temporary files of writes that a kill cut short are removed.

        Raises:
            CheckpointError: checkpoints exist but none can be read; they stay in place, so
                every relaunch says so (and checks its config) until `resume=never`.
        """
        self._remove_partial_writes()
        damaged = []
        for name in CHECKPOINTS:
            f = self.path / name
            if not f.exists():
                continue
            try:
                loaded = torch.load(f, map_location=map_location, weights_only=False), name
            except Exception as e:   # truncated zip, unpickling error, ...
                log.warning("checkpoint %s is damaged (%s: %s)", f, type(e).__name__, e)
                damaged.append(f)
                continue
            for bad in damaged:
                os.replace(bad, bad.with_name(bad.name + ".damaged"))
                log.warning("kept %s as %s.damaged", bad, bad.name)
            if name == f"{CHECKPOINT}.new":
                if (self.path / CHECKPOINT).exists():
                    os.replace(self.path / CHECKPOINT, self.path / PREVIOUS_CHECKPOINT)
                os.replace(f, self.path / CHECKPOINT)
            return loaded
        if damaged:
            raise CheckpointError(f"no readable checkpoint in {self.path}: {', '.join(map(str, damaged))} "
                                  "damaged; resume=never starts the run over")
        return None

    def has_checkpoint(self) -> bool:
        """Whether a checkpoint to resume from exists (readable or not)."""
        return any((self.path / name).exists() for name in CHECKPOINTS)

    def holds_result_or_progress(self) -> bool:
        """Whether resuming would keep something: a checkpoint, or a finished or diverged
        summary. A run that failed before its first checkpoint (a bad value, a missing
        file) holds neither: a new attempt starts it over, whatever its config."""
        if self.has_checkpoint():
            return True
        summary = self.read_summary()
        return summary is not None and summary.get("status") in (schema.FINISHED, schema.DIVERGED)

    def clear(self) -> None:
        """Remove the records of an earlier attempt (resume=never, or no checkpoint to
        resume from), its local W&B runs included: the new attempt is a new W&B run. What
        makes a run resumable or done goes first, its history last: a kill in between
        leaves a run that resumes whole or starts over, never a result without its history."""
        for name in (SUMMARY, *CHECKPOINTS, BEST_CHECKPOINT, WANDB_ID, METRICS_FILE, ACTIVATIONS_FILE):
            (self.path / name).unlink(missing_ok=True)
        for damaged in (self.path / CHECKPOINT).parent.glob("*.damaged"):
            damaged.unlink()
        self._remove_partial_writes()
        for old_run in (self.path / WANDB_DIR).glob("*run-*"):    # offline-run-*, run-* folders
            if old_run.is_dir():
                shutil.rmtree(old_run)

    def _remove_partial_writes(self) -> None:
        """Delete `_atomic_write_bytes` temporaries (`.<name>.*.tmp`) in the run folder and its
        checkpoint folder (the summary, config and W&B id are written in the run folder):
        only a killed write leaves one, and the caller holds the run's lock."""
        for folder in (self.path, (self.path / CHECKPOINT).parent):
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    def wandb_id(self) -> str:
        """The W&B run id of this attempt: kept across resumes, new after `clear()`."""
        f = self.path / WANDB_ID
        if not f.exists():
            atomic_write_text(f, uuid.uuid4().hex[:16])
        return f.read_text().strip()
