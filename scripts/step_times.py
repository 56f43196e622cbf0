"""Measure seconds per training step of the distinct preset configurations on this
machine's device (generated data through the real task builders; the presets' batch sizes,
models, regularizers and optimizers) and write `results/step_times/<device>.json`, which
`make reproduce-* DRY_RUN=1` uses to estimate device time, and seconds per evaluation batch
(`s_per_eval_batch`), which it adds for each epoch's evaluation. Also prints images/s or tokens/s.

`--concurrency 1,2,4,8` also measures runs per hour with that many runs at once on the
device (one process each, `CONCURRENCY_PRESETS`: a ResNet-56 and an LM preset) into the
table, from which `make reproduce-* RUNS_PER_GPU=auto` (the default) picks the count per task.

    python scripts/step_times.py [--match resnet56] [--steps 5] [--precision bf16]
    python scripts/step_times.py --match '^$' --concurrency 1,2,4,8    # only runs per hour
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

from experiments.common import BUILD, compose_preset, preset_names, suite_paths
from per.sweep import ABLATION_SLICES, best_runs_per_device, step_time_key
from per.training import runtime
from per.training.speed import (
    on_generated_data, preset_step, runs_per_hour, seconds_per_eval_batch, seconds_per_step)

ROOT = Path(__file__).resolve().parents[1]
STEP_TIMES_DIR = ROOT / suite_paths()["step_times_dir"]
CONCURRENCY_PRESETS = ("t1_cifar10_resnet56_per", "t3_ptb_lstm_per")
EVAL_BATCHES = 2   # evaluation batches per split timed per configuration


def measure_concurrency(record: dict, counts: list[int], args, device, data_root: Path, out: Path) -> None:
    """`record["runs_per_hour"][preset][k]`: runs per hour with k runs at once (`RUNS_PER_GPU=auto`
    picks from these, `per.sweep.best_runs_per_device`)."""
    for name in CONCURRENCY_PRESETS:
        cfg = compose_preset(name, (f"trainer.precision={args.precision}",))
        generated = on_generated_data(cfg, data_root, args.steps + args.warmup)
        # A fresh entry: counts measured earlier (other steps, other versions) are dropped.
        rates = record.setdefault("runs_per_hour", {})[name] = {"task": cfg["task"], "steps": args.steps,
                                                               "warmup": args.warmup}
        for k in counts:
            rates[str(k)] = runs_per_hour(cfg, generated, BUILD[cfg["task"]], device, k, args.steps, args.warmup,
                                          threads=args.threads or 1)
            print(f"  {name:<34} {k} at once: {rates[str(k)]:8.3f} runs/hour", flush=True)
            out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"  best for {cfg['task']}: {best_runs_per_device(record, cfg['task'])[0]} at once")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--match", default="", help="only presets whose name matches this regular expression")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per preset (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--device", default="auto", choices=runtime.DEVICES)
    ap.add_argument("--precision", default="fp32", choices=runtime.PRECISIONS)
    ap.add_argument("--threads", type=int, default=0, help="CPU torch threads (0: torch's default)")
    ap.add_argument("--out", default=None, help="default: results/step_times/<device>.json")
    ap.add_argument("--concurrency", default="",
                    help="comma-separated numbers of runs at once, e.g. 1,2,4,8: runs per hour")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = runtime.resolve_device(args.device)
    info = runtime.device_info(device)
    # Table presets, then the ablation's (the slices preset once per count of its grid).
    # (preset, overrides) pairs.
    names = [(n,) for n in preset_names("t[0-9]*_*") + preset_names("ablation_*")
             if re.search(args.match, n) and n != ABLATION_SLICES]
    if re.search(args.match, ABLATION_SLICES):
        grid = compose_preset(ABLATION_SLICES)["method"]["slices_grid"]
        names += [(ABLATION_SLICES, f"method.num_slices={s}") for s in grid]
    out = Path(args.out or STEP_TIMES_DIR / f"{info['slug']}.json")
    record = json.loads(out.read_text()) if out.exists() else {}
    kernel = {}
    if device.type == "cuda":     # the products' mode of PER's fused kernel at this precision
        from per import _triton
        kernel["per_kernel_products"] = _triton.default_precision(_triton.has_tf32_tensor_cores(device),
                                                                  allow_tf32=runtime.allows_tf32(args.precision))
    # Rows measured otherwise are not mixed in (the table's label describes all of them).
    now = {"device": info["name"], "precision": args.precision, "torch": torch.__version__,
           "per_kernel_products": kernel.get("per_kernel_products")}
    if changed := [f"{k} {record.get(k)} -> {v}" for k, v in now.items() if record.get(k) != v]:
        if record and (names or args.concurrency):     # what it measures replaces the table
            print(f"starting {out} over ({'; '.join(changed)}): its earlier rows are dropped", flush=True)
        record = {"device": info["name"], "device_type": device.type, "precision": args.precision,
                  **kernel, "s_per_step": {}}
    record.update(torch=torch.__version__, recorded=datetime.date.today().isoformat())
    if names:   # the steps of the s_per_step rows (runs per hour record their own)
        record.update(steps=args.steps, warmup=args.warmup)
    seen = set()
    print(f"device: {record['device']}, precision {args.precision}, table: {out}", flush=True)
    with tempfile.TemporaryDirectory() as data_root:
        for name, *extra in names:
            # Evaluation is timed on EVAL_BATCHES full batches per split.
            cfg = compose_preset(name, (f"trainer.precision={args.precision}",
                                        f"trainer.limit_eval_batches={EVAL_BATCHES}", *extra))
            key = step_time_key(cfg)
            if key in seen:
                continue
            seen.add(key)
            cfg = on_generated_data(cfg, Path(data_root), args.steps + args.warmup)
            step = preset_step(cfg, BUILD[cfg["task"]], device)
            s, rate = seconds_per_step(step, args.steps, args.warmup)
            record["s_per_step"][key] = s
            if key in record.get("stale", {}):      # a row marked stale is measured again
                del record["stale"][key]
                if not record["stale"]:
                    del record["stale"]
            record.setdefault("s_per_eval_batch", {})[key] = e = seconds_per_eval_batch(step)
            unit = "images/s" if cfg["task"] == "cifar" else "tokens/s"
            print(f"  {key:<55} {s * 1000:9.1f} ms/step {rate:10.0f} {unit} {e * 1000:9.1f} ms/eval batch",
                  flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=1) + "\n")   # after each preset: a cut run keeps its rows
        if args.concurrency:
            out.parent.mkdir(parents=True, exist_ok=True)
            measure_concurrency(record, [int(k) for k in args.concurrency.split(",")], args, device,
                                Path(data_root), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
