"""The run directory: resolved config, metrics.jsonl, activations.jsonl, summary.json,
checkpoints. Files that are rewritten are written to a temp file and renamed."""
from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
import yaml

from per import schema

CHECKPOINT = "checkpoints/last.pt"
BEST_CHECKPOINT = "checkpoints/best.pt"
WANDB_ID = "wandb_id.txt"


def _atomic_write_bytes(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
    """One run's directory and its records (DESIGN.md section 4)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    # --- config -------------------------------------------------------------
    def write_config(self, config: dict) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict | None:
        f = self.path / "config.yaml"
        return yaml.safe_load(f.read_text()) if f.exists() else None

    # --- summary ------------------------------------------------------------
    def read_summary(self) -> dict | None:
        f = self.path / "summary.json"
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
        atomic_write_text(self.path / "summary.json",
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
        f = self.path / name
        if not f.exists():
            return []
        return [json.loads(l) for l in f.read_text().splitlines() if l.strip()]

    # --- checkpoints ----------------------------------------------------------
    def save_checkpoint(self, state: dict, name: str = CHECKPOINT) -> None:
        _atomic_write_bytes(self.path / name, lambda f: torch.save(state, f))

    def load_checkpoint(self, name: str = CHECKPOINT, map_location=None) -> dict | None:
        f = self.path / name
        if not f.exists():
            return None
        return torch.load(f, map_location=map_location, weights_only=False)

    def clear(self) -> None:
        """Remove the records of an earlier attempt (resume=never)."""
        for name in ("metrics.jsonl", "activations.jsonl", "summary.json", CHECKPOINT, BEST_CHECKPOINT,
                     WANDB_ID):
            (self.path / name).unlink(missing_ok=True)

    def wandb_id(self) -> str:
        """The W&B run id of this attempt: kept across resumes, new after `clear()`."""
        f = self.path / WANDB_ID
        if not f.exists():
            atomic_write_text(f, uuid.uuid4().hex[:16])
        return f.read_text().strip()
