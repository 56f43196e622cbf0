"""Benchmark: training-step time with PER/L2 vs no regularizer (DESIGN.md section 5).

A plain stack of 3x3 convs with ResNet-56's activation shapes (16/32/64 channels at
32/16/8 resolution, 2 * blocks convs per stage plus a stem) and a Site after every
ReLU; `--blocks` changes only the number of sites, not their shapes. Times forward +
backward of one step for each configuration, all in one run, and prints ms/step
(median of repeats) and the ratio to the unregularized step.

    python scripts/bench_per.py       # CPU defaults: batch 32, 3 blocks, 3 repeats, 1 thread
    python scripts/bench_per.py --device cuda --batch 128
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

import per

CONFIGS = [  # label, kind, layout, path
    ("none", None, None, None),
    ("per channels backward", "per", "channels", "backward"),
    ("per channels autograd", "per", "channels", "autograd"),
    ("per flatten backward", "per", "flatten", "backward"),
    ("per flatten autograd", "per", "flatten", "autograd"),
    ("l2 channels backward", "l2", "channels", "backward"),
]


def build_net(blocks: int) -> nn.Sequential:
    """Convs with ResNet-56 activation shapes for a (B, 3, 32, 32) input; a Site after each ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), per.Site()]
    c_in = 16
    for c in (16, 32, 64):
        for i in range(2 * blocks):
            stride = 2 if (i == 0 and c != c_in) else 1
            layers += [nn.Conv2d(c_in, c, 3, stride=stride, padding=1), nn.ReLU(), per.Site()]
            c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def time_step(model: nn.Module, reg: per.Regularizer | None, x: torch.Tensor, y: torch.Tensor,
              precision: str) -> float:
    """ms of one forward + backward training step."""
    autocast = (torch.autocast(x.device.type, dtype=torch.bfloat16) if precision == "bf16"
                else nullcontext())
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    if reg is not None:
        reg.begin_step()
    with autocast:
        loss = F.cross_entropy(model(x), y)
        if reg is not None:
            loss = loss + reg.penalty()
    loss.backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on cuda, 32 on cpu")
    parser.add_argument("--slices", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=None,
                        help="blocks per stage; default: 9 (ResNet-56) on cuda, 3 on cpu")
    parser.add_argument("--repeats", type=int, default=None, help="default: 20 on cuda, 3 on cpu")
    parser.add_argument("--warmup", type=int, default=None, help="default: 5 on cuda, 1 on cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: stable timings on a shared machine)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="default: bf16 autocast + channels_last on cuda, fp32 on cpu")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = args.device == "cuda"
    batch = args.batch or (128 if on_cuda else 32)
    blocks = args.blocks or (9 if on_cuda else 3)
    repeats = args.repeats or (20 if on_cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 1)
    precision = args.precision or ("bf16" if on_cuda else "fp32")
    memory_format = torch.channels_last if precision == "bf16" else torch.contiguous_format

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_net(blocks).to(device, memory_format=memory_format)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch,), device=device)
    with per.capture_sites(model, list(per.list_sites(model))) as seen:
        model(x)
    shapes = Counter(tuple(acts[0].shape[1:]) for acts in seen.values())
    name = (torch.cuda.get_device_name(device) if on_cuda
            else f"cpu, torch threads: {torch.get_num_threads()}")
    print(f"device: {name}; precision {precision}; batch {batch}; slices {args.slices}; "
          f"warmup {warmup}; median of {repeats} repeats")
    print("sites (C, H, W) x count: " + ", ".join(f"{s} x {n}" for s, n in shapes.items()))

    # Round robin over configurations, so load drifts on a shared machine hit all alike.
    times: dict[str, list[float]] = {label: [] for label, *_ in CONFIGS}
    for i in range(warmup + repeats):
        for label, kind, layout, path in CONFIGS:
            reg = (per.Regularizer(model, kind, 1e-4, layout=layout, num_slices=args.slices,
                                   path=path) if kind else None)
            ms = time_step(model, reg, x, y, precision)
            if reg is not None:
                reg.remove()
            if i >= warmup:
                times[label].append(ms)
    base = statistics.median(times["none"])
    print(f"{'config':<24}{'ms/step':>10}{'ratio':>8}")
    for label, ms in times.items():
        print(f"{label:<24}{statistics.median(ms):>10.1f}{statistics.median(ms) / base:>8.2f}")


if __name__ == "__main__":
    main()
