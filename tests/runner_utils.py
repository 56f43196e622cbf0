"""Helpers for end-to-end tests: the real Hydra configs as plain dicts."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "experiments"))
from common import compose_plain as compose_config  # noqa: E402,F401

CPU_SMOKE = ["trainer.device=cpu", "logger.mode=disabled", "trainer.progress=false",
             "trainer.deterministic=true"]
