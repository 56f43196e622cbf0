"""Run-time setup shared by both runners and the benchmarks: seed, device, precision."""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import re
import subprocess
from pathlib import Path

import numpy as np
import torch

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "tf32", "bf16")   # trainer.precision; see configure_backends
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")   # trainer.compile, besides false/true

log = logging.getLogger(__name__)


def compile_model(model: torch.nn.Module, setting: bool | str) -> torch.nn.Module:
    """`trainer.compile`: false -> `model` itself; true or "default" -> `torch.compile(model)`;
    "reduce-overhead" (CUDA graphs on a GPU) or "max-autotune" -> that `torch.compile` mode.

    Compiled models draw random numbers (PER's directions) from Inductor's generator: the same
    distribution, seeded from torch's, but not the numbers an eager run draws."""
    if setting is False:
        return model
    if setting is not True and setting not in COMPILE_MODES:
        raise ValueError(f"unknown trainer.compile {setting!r}; valid: false, true, {', '.join(COMPILE_MODES)}")
    if rnns := sorted({type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.RNNBase)}):
        log.warning("trainer.compile: torch.compile does not trace %s (Dynamo skips the frame that calls "
                    "it), so %s's forward runs eagerly, PER's sites in it compiled one by one; the "
                    "recurrent-BN LSTM (model.rbn) compiles whole",
                    "/".join(rnns), type(model).__name__)
    return torch.compile(model, mode=None if setting in (True, "default") else setting)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda if available else cpu; `cuda` without a GPU is an error."""
    if name not in DEVICES:
        raise ValueError(f"unknown trainer.device {name!r}; valid: {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def check_precision(precision: str) -> None:
    """Raise ValueError unless `precision` is one of `PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown trainer.precision {precision!r}; valid: {', '.join(PRECISIONS)}")


def autocast_context(device: torch.device, precision: str):
    """A context manager for the forward pass: bf16 autocast for "bf16", else a no-op."""
    check_precision(precision)
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def allows_tf32(precision: str) -> bool:
    """Whether `trainer.precision` lets a GPU take TF32 products: "tf32" and "bf16"."""
    return precision != "fp32"


def configure_backends(device: torch.device, deterministic: bool, precision: str) -> None:
    """On a GPU: cuDNN autotuning unless determinism is asked for, and TF32 tensor-core
    products (matmuls, cuDNN convolutions, PER's fused kernel) for "tf32" and "bf16" only.
    "fp32" is IEEE float32 for matmuls and convolutions, as the references ran (pre-Ampere
    GPUs have no TF32; PyTorch's own default would take cuDNN convolutions in TF32); PER's
    fused kernel then keeps float32 accuracy with three TF32 products on NVIDIA GPUs of
    compute capability 8.0 or more, IEEE products elsewhere (`per._triton.default_precision`)."""
    check_precision(precision)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        tf32 = allows_tf32(precision)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def device_info(device: torch.device) -> dict[str, str]:
    """`name` (the card, or the CPU model with its cores and torch threads) and `slug`
    (`cuda-<card>` or `cpu-<model>`: the stem of the device's step-time table)."""
    if device.type == "cuda":
        name = short = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.exists() else None
        short = found.group(1).strip() if found else (platform.processor() or platform.machine())
        name = f"{short} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    slug = re.sub(r"[^a-z0-9]+", "-", short.lower()).strip("-")
    return {"name": name, "slug": f"{device.type}-{slug}"}


def code_version() -> str:
    """`git describe` of the checkout this package runs from, `-dirty` when modified."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    """Versions of the libraries that decide the numbers."""
    import torchvision
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "numpy": np.__version__}
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["cudnn"] = str(torch.backends.cudnn.version())
    return out


def rng_state() -> dict:
    """All RNG states, for exact resume."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()   # the current device's generator
    return state


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`; RNG states are CPU byte tensors whatever `map_location` did."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
