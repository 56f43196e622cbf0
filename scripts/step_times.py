"""Measure seconds per training step of the distinct preset configurations on this
machine's device (generated data through the real task builders; the presets' batch sizes,
models, regularizers and optimizers) and write `results/step_times/<device>.json`, which
`make reproduce-* DRY_RUN=1` uses to estimate device time. Also prints images/s or tokens/s.

    python scripts/step_times.py [--match resnet56] [--steps 5] [--precision bf16]
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import tempfile
from pathlib import Path

import torch

from experiments.common import BUILD, compose_plain, compose_preset, preset_names
from per.sweep import ABLATION_SLICES, step_time_key
from per.training import runtime
from per.training.speed import on_generated_data, preset_step, seconds_per_step

ROOT = Path(__file__).resolve().parents[1]
STEP_TIMES_DIR = ROOT / compose_plain("train_cifar", [])["paths"]["step_times_dir"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--match", default="", help="only presets whose name matches this regular expression")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per preset (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--device", default="auto", choices=runtime.DEVICES)
    ap.add_argument("--precision", default="fp32", choices=runtime.PRECISIONS)
    ap.add_argument("--threads", type=int, default=0, help="CPU torch threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="default: results/step_times/<device>.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = runtime.resolve_device(args.device)
    info = runtime.device_info(device)
    # Table presets, then the ablation's (the slices preset at its default count only).
    names = [n for n in preset_names("t[0-9]*_*") + preset_names("ablation_*")
             if re.search(args.match, n) and n != ABLATION_SLICES]
    out = Path(args.out or STEP_TIMES_DIR / f"{info['slug']}.json")
    record = json.loads(out.read_text()) if out.exists() else {}
    if record.get("device") != info["name"] or record.get("precision") != args.precision:
        record = {"device": info["name"], "device_type": device.type, "precision": args.precision,
                  "s_per_step": {}}
    record.update(torch=torch.__version__, recorded=datetime.date.today().isoformat(),
                  steps=args.steps, warmup=args.warmup)
    seen = set()
    print(f"device: {record['device']}, precision {args.precision}")
    with tempfile.TemporaryDirectory() as data_root:
        for name in names:
            cfg = compose_preset(name, (f"trainer.precision={args.precision}",))
            key = step_time_key(cfg)
            if key in seen:
                continue
            seen.add(key)
            cfg = on_generated_data(cfg, Path(data_root), args.steps + args.warmup)
            s, rate = seconds_per_step(preset_step(cfg, BUILD[cfg["task"]], device), args.steps, args.warmup)
            record["s_per_step"][key] = s
            unit = "images/s" if cfg["task"] == "cifar" else "tokens/s"
            print(f"  {key:<55} {s * 1000:9.1f} ms/step {rate:10.0f} {unit}", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=1) + "\n")   # after each preset: a cut run keeps its rows
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
