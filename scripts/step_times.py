"""Measure seconds per training step of the distinct preset configurations on this
machine's device (synthetic data, the presets' batch sizes, models, regularizers and
optimizers) and write `results/step_times/<device>.json`, which `make reproduce-*
DRY_RUN=1` uses to estimate device time. Also prints images/s or tokens/s.

    python scripts/step_times.py [--match resnet56] [--steps 5] [--precision bf16]

`PresetStep` (one preset's real training step) is shared with scripts/bench.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from reproduce import STEP_TIMES_DIR, device_info, load_presets  # noqa: E402

from per import models  # noqa: E402
from per.data.cifar import DeviceLoader  # noqa: E402
from per.data.corpus import EXPECTED_COUNTS  # noqa: E402
from per.regularizers import Regularizer  # noqa: E402
from per.training import runtime  # noqa: E402
from per.training.image_task import ImageTask  # noqa: E402
from per.training.lm_task import LMTask  # noqa: E402
from per.training.optim import clip_gradients, create_optimizer, param_groups  # noqa: E402
from per.training.run import build_regularizer  # noqa: E402


@dataclass
class PresetStep:
    """One preset's training step as `per.training.loop.fit` takes it (regularizer,
    autocast, task step, backward, clipping, optimizer), on synthetic data."""
    model: nn.Module
    task: Any
    regularizer: Regularizer | None
    optimizer: torch.optim.Optimizer
    clip_norm: float
    clip_mode: str
    autocast: Callable
    items: str                            # "images" | "tokens"

    def batches(self) -> Iterator[Any]:
        """Endless training batches (epochs of the synthetic data)."""
        epoch = 0
        while True:
            yield from self.task.train_batches(epoch, 0)
            epoch += 1

    def __call__(self, batch: Any) -> int:
        """One optimizer step; returns the items (images or tokens) it trained on."""
        if self.regularizer is not None:
            self.regularizer.begin_step()
        with self.autocast():
            loss, sums = self.task.train_step(self.model, batch)
            total = loss + self.regularizer.penalty() if self.regularizer is not None else loss
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip_gradients(params, self.clip_norm, self.clip_mode)
        self.optimizer.step()
        return int(sums["items"])


def build_step(cfg: dict, task_name: str, device: torch.device, precision: str = "fp32",
               batches: int = 8, channels_last: bool = False) -> PresetStep:
    """The preset `cfg`'s step on `batches` batches of random data (images or tokens)."""
    autocast = lambda: runtime.autocast_context(device, precision)  # noqa: E731
    m, data = dict(cfg["model"]), cfg["data"]
    name = m.pop("name")
    bs = data["batch_size"]
    if task_name == "cifar":
        n_classes = 100 if data["name"] == "cifar100" else 10
        model = models.create(name, num_classes=n_classes, **m).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        x = np.random.randint(0, 256, (bs * batches, 32, 32, 3), dtype=np.uint8)
        y = np.random.randint(0, n_classes, len(x))
        loader = DeviceLoader(x, y, bs, device=device, train=True, mean=(0.5,) * 3, std=(0.25,) * 3,
                              channels_last=channels_last)
        task = ImageTask(loader, {}, probe=None, autocast=autocast)
    else:
        vocab = EXPECTED_COUNTS[data["name"]][0]
        model = models.create(name, vocab_size=vocab, rbn=cfg["method"]["name"] == "rbn", **m).to(device)
        tokens = torch.randint(0, vocab, (batches * data["bptt"] + 1, bs), device=device)
        task = LMTask(model, tokens, {}, bptt=data["bptt"], autocast=autocast)
    reg = build_regularizer(model, cfg["method"])
    if reg is not None and cfg["method"]["name"] == "vcl":
        batch = next(iter(task.train_batches(0, 0)))
        reg.materialize(lambda: model(batch[0]))
    opt = create_optimizer(param_groups(model, list(reg.parameters()) if reg else None,
                                        weight_decay=cfg["optim"]["weight_decay"]), lr=1e-3, momentum=0.9)
    return PresetStep(model, task, reg, opt, cfg["optim"]["clip_norm"], cfg["optim"]["clip_mode"],
                      autocast, "images" if task_name == "cifar" else "tokens")


def timed(step: PresetStep, batch: Any) -> tuple[float, int]:
    """(seconds, items) of one step, synchronized on CUDA."""
    cuda = next(step.model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    items = step(batch)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, items


def time_preset(cfg: dict, task_name: str, device: torch.device, precision: str,
                steps: int, warmup: int = 2) -> tuple[float, float]:
    """(median seconds per step, items per second) after `warmup` steps."""
    step = build_step(cfg, task_name, device, precision, batches=steps + warmup)
    times, items = [], 0
    for i, batch in zip(range(steps + warmup), step.batches()):
        s, n = timed(step, batch)
        if i >= warmup:
            times.append(s)
            items += n
    return float(np.median(times)), items / sum(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--match", default="", help="only presets whose name matches this regular expression")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per preset (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=0, help="CPU torch threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="default: results/step_times/<device>.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = runtime.resolve_device(args.device)
    info = device_info(device.type)
    presets = [p for t in ("cifar", "lm") for p in load_presets(task=t) if re.search(args.match, p.name)]
    ablations = sorted(f.stem for f in (ROOT / "configs" / "experiment").glob("ablation_*.yaml")
                       if re.search(args.match, f.stem) and "slices" not in f.stem)
    presets += load_presets(ablations) if ablations else []
    out = Path(args.out or STEP_TIMES_DIR / f"{info['slug']}.json")
    record = json.loads(out.read_text()) if out.exists() else {}
    if record.get("device") != info["name"] or record.get("precision") != args.precision:
        record = {"device": info["name"], "device_type": device.type, "precision": args.precision,
                  "s_per_step": {}}
    record.update(torch=torch.__version__, recorded=datetime.date.today().isoformat(),
                  steps=args.steps, warmup=args.warmup)
    seen = set()
    print(f"device: {record['device']}, precision {args.precision}")
    for p in presets:
        key = p.key()
        if key in seen:
            continue
        seen.add(key)
        s, rate = time_preset(p.cfg, p.task, device, args.precision, args.steps, args.warmup)
        record["s_per_step"][key] = s
        unit = "images/s" if p.task == "cifar" else "tokens/s"
        print(f"  {key:<55} {s * 1000:9.1f} ms/step {rate:10.0f} {unit}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")   # after each preset: a cut run keeps its rows
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
