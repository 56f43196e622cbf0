"""Hydra glue shared by the entry points: resolvers, config -> plain dict, exit codes."""
from __future__ import annotations

import sys
from typing import Callable

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from per import schema
from per.training.run import train

OmegaConf.register_new_resolver("valtag", lambda n: f"-val{n}" if int(n) > 0 else "", replace=True)


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain Python, with the run directory Hydra chose."""
    hydra_cfg = HydraConfig.get()
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["run_dir"] = hydra_cfg.runtime.output_dir
    gpus = plain["trainer"].get("gpus")
    if gpus and torch.cuda.is_available():   # multirun over several GPUs
        num = hydra_cfg.job.get("num", 0) or 0
        torch.cuda.set_device(int(gpus[num % len(gpus)]))
    return plain


def run_main(cfg: DictConfig, build: Callable) -> dict:
    """Train; a stop signal exits with 128+signal so schedulers see the interruption."""
    summary = train(to_plain(cfg), build)
    if summary["status"] == schema.INTERRUPTED:
        sys.exit(128 + int(summary.get("signal") or 15))
    return summary
