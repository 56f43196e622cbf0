"""Measure seconds per training step of every distinct preset configuration on this
machine's device (synthetic data, the presets' batch sizes, models and regularizers),
and write results/step_times.json, which `make reproduce-* DRY_RUN=1` uses to
estimate device time. Also prints images/s or tokens/s.

    python scripts/step_times.py [--match resnet56] [--steps 5] [--precision bf16]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from reproduce import STEP_TIMES, load_presets  # noqa: E402

from per import models  # noqa: E402
from per.data.cifar import DeviceLoader  # noqa: E402
from per.data.corpus import EXPECTED_COUNTS  # noqa: E402
from per.training import runtime  # noqa: E402
from per.training.image_task import ImageTask  # noqa: E402
from per.training.lm_task import LMTask  # noqa: E402
from per.training.optim import clip_gradients, create_optimizer, param_groups  # noqa: E402
from per.training.run import build_regularizer  # noqa: E402


def time_preset(cfg: dict, task_name: str, device: torch.device, precision: str, steps: int) -> tuple[float, float]:
    """(seconds per step, items per second) of the preset's training step."""
    autocast = lambda: runtime.autocast_context(device, precision)  # noqa: E731
    m, data = dict(cfg["model"]), cfg["data"]
    name = m.pop("name")
    bs = data["batch_size"]
    if task_name == "cifar":
        n_classes = 100 if data["name"] == "cifar100" else 10
        model = models.create(name, num_classes=n_classes, **m).to(device)
        x = np.random.randint(0, 256, (bs * (steps + 3), 32, 32, 3), dtype=np.uint8)
        y = np.random.randint(0, n_classes, len(x))
        loader = DeviceLoader(x, y, bs, device=device, train=True, mean=(0.5,) * 3, std=(0.25,) * 3)
        task = ImageTask(loader, {}, probe=None, autocast=autocast)
    else:
        vocab = EXPECTED_COUNTS[data["name"]][0]
        model = models.create(name, vocab_size=vocab, rbn=cfg["method"]["name"] == "rbn", **m).to(device)
        tokens = torch.randint(0, vocab, ((steps + 3) * data["bptt"] + 1, bs), device=device)
        task = LMTask(model, tokens, {}, bptt=data["bptt"], autocast=autocast)
    reg = build_regularizer(model, cfg["method"])
    if reg is not None and cfg["method"]["name"] == "vcl":
        batch = next(iter(task.train_batches(0, 0)))
        reg.materialize(lambda: model(batch[0]))
    opt = create_optimizer(param_groups(model, list(reg.parameters()) if reg else None,
                                        weight_decay=cfg["optim"]["weight_decay"]), lr=1e-3, momentum=0.9)
    params = [p for g in opt.param_groups for p in g["params"]]
    times, items = [], 0
    for i, batch in enumerate(task.train_batches(0, 0)):
        if i == steps + 2:
            break
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if reg is not None:
            reg.begin_step()
        with autocast():
            loss, sums = task.train_step(model, batch)
            total = loss + reg.penalty() if reg is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        clip_gradients(params, cfg["optim"]["clip_norm"], cfg["optim"]["clip_mode"])
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:   # two warm-up steps
            times.append(time.perf_counter() - t0)
            items += int(sums["items"])
    s = float(np.median(times))
    return s, items / sum(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--match", default="", help="only presets whose name contains this")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--out", default=str(STEP_TIMES))
    args = ap.parse_args()
    device = runtime.resolve_device(args.device)
    presets = [p for t in ("cifar", "lm") for p in load_presets(task=t) if args.match in p.name]
    presets += [p for p in load_presets(["ablation_resnet56_flatten"]) if args.match in p.name]
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {}
    if record.get("device") != runtime.device_name(device):
        record = {"device": runtime.device_name(device), "precision": args.precision, "s_per_step": {}}
    seen = set()
    print(f"device: {record['device']}, precision {args.precision}")
    for p in presets:
        key = p.key()
        if key in seen:
            continue
        seen.add(key)
        s, rate = time_preset(p.cfg, p.task, device, args.precision, args.steps)
        record["s_per_step"][key] = s
        unit = "images/s" if p.task == "cifar" else "tokens/s"
        print(f"  {key:<55} {s * 1000:9.1f} ms/step {rate:10.0f} {unit}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
