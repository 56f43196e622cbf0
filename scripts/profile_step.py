"""Where a preset's training step spends its time: `torch.profiler` over a few of the
preset's real steps (`per.training.speed.preset_step` on generated data) on this machine's
device. Prints the operators (and, on a GPU, kernels) with the most self time per step,
self device time on a GPU and self CPU time on a CPU (on a GPU, the top ops by self CPU
time as well: the host's share), with the unprofiled wall time per step, and appends them as
one JSON line per preset to `--out`.

    python scripts/profile_step.py t2_cifar10_elu_per                   # the preset's settings
    python scripts/profile_step.py t1_cifar10_resnet56_per trainer.precision=bf16 --steps 5
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity

from experiments.common import BUILD, compose_preset
from per.training import runtime
from per.training.speed import endless_batches, on_generated_data, preset_step, timed


def profile_step(name: str, overrides: list[str], device: torch.device, steps: int, warmup: int,
                 top: int) -> dict[str, Any]:
    """The `top` operators of `steps` profiled training steps of preset `name` (after
    `warmup` unprofiled ones) by self time per step, in ms, with their calls per step."""
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as root:
        # One epoch for the warm-up, the timed steps and the profiled ones (an epoch's start
        # copies its permutation and augmentation draws to the device).
        cfg = on_generated_data(compose_preset(name, overrides), Path(root), warmup + 2 * steps)
        step = preset_step(cfg, BUILD[cfg["task"]], device)
        batches = endless_batches(step.task)
        for _ in range(warmup):
            step(next(batches))
        wall, _ = timed(lambda: [step(next(batches)) for _ in range(steps)], cuda)   # unprofiled
        activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                step(next(batches))
            if cuda:
                torch.cuda.synchronize()
    averages = prof.key_averages()

    def ranked(attr: str) -> tuple[float, list[dict[str, Any]]]:
        events = [e for e in averages if getattr(e, attr) > 0]
        ms = lambda e: getattr(e, attr) / 1e3 / steps                 # profiler times are in us
        return round(sum(ms(e) for e in events), 3), [
            {"op": e.key, "calls_per_step": e.count / steps, "ms_per_step": round(ms(e), 4)}
            for e in sorted(events, key=ms, reverse=True)[:top]]

    total, ops = ranked("self_device_time_total" if cuda else "self_cpu_time_total")
    result = {"preset": name, "overrides": overrides, "device": runtime.device_info(device)["name"],
              "torch": torch.__version__, "steps": steps, "time": "self device time" if cuda else "self CPU time",
              "wall_ms_per_step": round(1e3 * wall / steps, 3), "ms_per_step": total, "top": ops}
    if cuda:    # the host's share: where a launch-bound step spends its time
        result["cpu_ms_per_step"], result["top_cpu"] = ranked("self_cpu_time_total")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", help="an experiment preset (configs/experiment), e.g. t2_cifar10_elu_per")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.precision=bf16")
    ap.add_argument("--device", default="auto", choices=runtime.DEVICES)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps")
    ap.add_argument("--warmup", type=int, default=3, help="steps before profiling")
    ap.add_argument("--top", type=int, default=25, help="operators listed")
    ap.add_argument("--threads", type=int, default=1, help="CPU torch threads (default 1)")
    ap.add_argument("--out", default=None, help="append the result as a JSON line to this file")
    args = ap.parse_intermixed_args(argv)   # overrides before or after the options
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = profile_step(args.preset, args.overrides, runtime.resolve_device(args.device), args.steps,
                          args.warmup, args.top)
    print(f"{result['preset']} {' '.join(result['overrides'])} on {result['device']}: "
          f"{result['wall_ms_per_step']:.2f} ms per step (unprofiled); {result['ms_per_step']:.2f} ms of "
          f"{result['time']} per step")
    for key, label in (("top", result["time"]), ("top_cpu", "self CPU time")):
        if key in result:
            print(f" by {label}:")
            for row in result[key]:
                print(f"  {row['ms_per_step']:9.3f} ms  {row['calls_per_step']:7.1f} calls  {row['op']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
