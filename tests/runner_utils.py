"""Helpers for end-to-end tests: the real Hydra configs as plain dicts."""
from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Iterator

import torch

from experiments.common import compose_plain as compose_config  # noqa: F401
from per.training.records import RunDir

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

TIMING_KEYS = ("images_per_s", "tokens_per_s", "epoch_time_s", "eval_time_s")


def without_timing(row: dict) -> dict:
    """A metrics row without its wall-clock entries (which differ between equal runs)."""
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def script_module(name: str):
    """scripts/<name>.py as a module (its functions can be called and patched)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"scripts/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl rows."""
    return RunDir(run_dir).read_jsonl("metrics.jsonl")


@contextlib.contextmanager
def restored_backend_flags(ieee: bool = False) -> Iterator[None]:
    """Restores torch's TF32 and cuDNN-autotuning flags on exit (a run sets them from its
    `trainer.precision`; torch's backend modules break monkeypatch's undo). `ieee`: turn
    TF32 off inside."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark
    try:
        if ieee:
            matmul.allow_tf32 = cudnn.allow_tf32 = False
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = before


CPU_SMOKE = ["trainer.device=cpu", "logger.mode=disabled", "trainer.progress=false",
             "trainer.deterministic=true"]
