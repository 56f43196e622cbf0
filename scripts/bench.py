"""Speed benchmark (docs/speed.md): every ratio against its baseline, measured in
the same run on this machine's device, the quick sections first, then the compiling ones.
Each result is one JSON line, printed (and appended to `--out`) as soon as it is measured,
so a run cut short still reports what it has; a section that fails reports its error and the others run
(exit status 1).

1. `step`: training step, PER (channels and flatten layouts, flatten also with
   `method.sampling=subspace`) and L2 / vanilla, Fixup ResNets.
2. `per_grad` on single sites: blocked (CPU) or fused Triton (CUDA) / the unblocked product.
3. `optimizer`: the runner's fused SGD update / torch's default update, BN ResNet and LM presets.
4. `lm`: LM step, PER and recurrent BN / vanilla (2x650 LSTM, PTB sizes); tokens/s, ours /
   the PyTorch word-language-model example's training step at the same sizes and precision.
5. `compiled`: training step under `trainer.compile` (reduce-overhead, i.e. CUDA graphs, on
   a GPU): BN vanilla / eager, and Fixup PER / Fixup vanilla, both compiled. Each ratio
   synchronized at every step, then pipelined (as the training loop runs steps).
6. `loader`: training throughput, the project's device-resident loader + step / a plain DataLoader +
   torchvision-transforms trainer of the same model.
7. `compiled_lm`: section 5 for the LM: vanilla / eager, PER and recurrent BN / vanilla, all
   compiled; then tokens/s of the compiled LM step / the example's.
8. `epoch`: a real run of the BN ResNet preset for a few epochs (the runner's whole loop,
   evaluation included), and on a GPU the minutes of its full 164-epoch run.
9. `runs`: runs per hour with k runs at once on the device (one process each) / one run, for a
   ResNet and an LM preset (`make step-times CONCURRENCY=...` records them for
   `RUNS_PER_GPU=auto`).

Steps are the presets' real steps (`per.training.loop.TrainStep` built through the task
builders: regularizer, task step, clipping, optimizer) on generated data; configurations
alternate step by step so load drifts on a shared machine hit baseline and candidate alike.

    python scripts/bench.py                  # full size for this device (1 CPU thread)
    python scripts/bench.py --tiny           # seconds on a CPU: checks that it runs (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from experiments.common import BUILD, compose_preset
from per import functional, models, schema
from per.training import optim, runtime
from per.training.loop import TrainStep
from per.data.cifar import write_fake_cifar
from per.training import run as runner
from per.training.records import METRICS_FILE, RunDir
from per.training.speed import (endless_batches, interleaved_calls, interleaved_times, on_generated_data,
                                pipelined_times, preset_step, runs_per_hour)

# Sizes per mode: image models and batch, extra image/LM preset overrides, repeats (timed
# steps per configuration, median) and warm-up steps, loader-comparison steps, batch of
# the per_grad sites.
SIZES = {
    "cuda": dict(models=("resnet56", "resnet110"), batch=128, image=(), lm=(), repeats=20, warmup=5,
                 loader_steps=40, sites=128, at_once=(1, 2, 4, 8), run_steps=50, epochs=(3, 50000, 10000)),
    "cpu": dict(models=("resnet20", "resnet56"), batch=32, image=(), lm=(), repeats=5, warmup=1,
                loader_steps=6, sites=32, at_once=(1, 2), run_steps=5, epochs=(2, 640, 200)),
    "tiny": dict(models=("resnet20",), batch=2, image=("++method.num_slices=16",),
                 lm=("model.hidden_size=16", "data.bptt=5", "optim.batch_size=2"),
                 repeats=2, warmup=1, loader_steps=2, sites=2, at_once=(1, 2), run_steps=2, epochs=(2, 8, 4)),
}
PIPELINED_ROUNDS = 3   # runs of `repeats` consecutive steps per configuration (`pipelined_times`)
# The real CIFAR-10 sizes: `epoch` estimates a full run only on generated data this large.
CIFAR10_SIZES = (50000, 10000)
# In the order they run: the quick ones first, then the compiling ones (a GPU run cut at
# its time limit keeps what came first).
SECTIONS = ("step", "per_grad", "optimizer", "lm", "compiled", "loader", "compiled_lm", "epoch", "runs")
STEP_CONFIGS = {  # label -> (preset, overrides); the image model and batch are overridden too
    "vanilla": ("t1_cifar10_resnet56_vanilla", ()),
    "per channels": ("t1_cifar10_resnet56_per", ()),
    "per flatten": ("t1_cifar10_resnet56_per", ("method.layout=flatten",)),
    "per flatten, sampling=subspace": ("t1_cifar10_resnet56_per",
                                       ("method.layout=flatten", "method.sampling=subspace")),
    "l2": ("t1_cifar10_resnet56_l2", ()),
}


class Stopped(BaseException):
    """A stop signal that a section's run (`per.training.run.train`) turned into a clean
    stop; `main` ends the benchmark with it, after removing its generated data."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


class Reporter:
    """Prints each result as a JSON line and appends it to `out` (if given), flushed."""

    def __init__(self, out: str | None, common: dict[str, Any]) -> None:
        self.out = Path(out) if out else None
        self.common = common
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, **result: Any) -> None:
        line = json.dumps({**result, **self.common})
        print(line, flush=True)
        if self.out:
            with self.out.open("a") as f:
                f.write(line + "\n")


def ratio_result(bench: str, candidate: str, baseline: str, cand_s: list[float],
                 base_s: list[float]) -> dict[str, Any]:
    c, b = statistics.median(cand_s), statistics.median(base_s)
    return {"bench": bench, "candidate": candidate, "baseline": baseline, "ratio": round(c / b, 3),
            "candidate_ms": round(1e3 * c, 3), "baseline_ms": round(1e3 * b, 3)}


def build(name: str, overrides: tuple[str, ...], batches: int, args) -> TrainStep:
    """Preset `name`'s training step on `batches` batches of generated data, at the
    benchmark's precision and memory format."""
    cfg = compose_preset(name, (f"trainer.precision={args.precision}",
                                f"trainer.channels_last={str(args.channels_last).lower()}", *overrides))
    return preset_step(on_generated_data(cfg, args.data_root, batches), BUILD[cfg["task"]], args.device)


class CpuCompiled:
    """A training step taken with `PER_CPU_COMPILE=1`
    (`per.functional._per_grad_cpu_compiled`), the environment restored after each step."""

    def __init__(self, step: TrainStep) -> None:
        self.step, self.task, self.model = step, step.task, step.model

    def __call__(self, batch: Any) -> Any:
        before = os.environ.get("PER_CPU_COMPILE")
        os.environ["PER_CPU_COMPILE"] = "1"
        try:
            return self.step(batch)
        finally:
            if before is None:
                del os.environ["PER_CPU_COMPILE"]
            else:
                os.environ["PER_CPU_COMPILE"] = before


def bench_image_steps(report: Reporter, model: str, size: dict, args) -> None:
    over = (f"model={model}", f"data.batch_size={size['batch']}", *size["image"])
    steps = {label: build(name, (*over, *extra), size["warmup"] + size["repeats"], args)
             for label, (name, extra) in STEP_CONFIGS.items()}
    labels = ["per channels", "per flatten", "per flatten, sampling=subspace", "l2"]
    if args.device.type == "cpu":
        name, extra = STEP_CONFIGS["per channels"]
        steps["per channels, PER_CPU_COMPILE=1"] = CpuCompiled(
            build(name, (*over, *extra), size["warmup"] + size["repeats"], args))
        labels.insert(1, "per channels, PER_CPU_COMPILE=1")
    times = interleaved_times(steps, size["repeats"], size["warmup"])
    for label in labels:
        report(**ratio_result(f"step/{model}/batch{size['batch']}", label, "vanilla",
                              times[label], times["vanilla"]))


def bench_compiled_steps(report: Reporter, model: str, size: dict, args) -> None:
    """`trainer.compile` (reduce-overhead: CUDA graphs on a GPU; the default mode on a CPU):
    the BN vanilla step compiled / eager, and the Fixup PER step compiled / the Fixup
    vanilla step compiled (PER's cost where launches no longer hide it), with the graph
    breaks torch.compile counted while compiling them."""
    mode = compile_mode(args)
    batch = size["batch"]
    over = (f"model={model}", f"data.batch_size={batch}", *size["image"])
    n = pipelined_batches(size)
    compiled = (f"trainer.compile={mode}",)
    steps = {"bn eager": build("t1_cifar10_resnet56_bn", over, n, args),
             "bn compiled": build("t1_cifar10_resnet56_bn", (*over, *compiled), n, args),
             "vanilla compiled": build(STEP_CONFIGS["vanilla"][0], (*over, *compiled), n, args),
             "per channels compiled": build(STEP_CONFIGS["per channels"][0], (*over, *compiled), n, args)}
    report_compiled(report, f"compiled/{model}/batch{batch}", mode, steps, size,
                    (("bn compiled", "bn eager", "bn vanilla"), ("per channels compiled", "vanilla compiled", "fixup")))


def pipelined_batches(size: dict) -> int:
    """Training batches of generated data for a compiled section: its synchronized steps
    (two more warm-up steps: compiling, then recording CUDA graphs) or its pipelined ones
    (one warm-up step, which starts the epoch and its host-to-device copies, then
    `PIPELINED_ROUNDS` runs), each within one epoch."""
    return max(size["warmup"] + 2 + size["repeats"], 1 + PIPELINED_ROUNDS * size["repeats"])


def compile_mode(args) -> str:
    """`trainer.compile` of the compiled sections: CUDA graphs on a GPU, the default mode on a CPU."""
    return "reduce-overhead" if args.device.type == "cuda" else "default"


def report_compiled(report: Reporter, bench: str, mode: str, steps: dict[str, TrainStep], size: dict,
                    pairs: tuple[tuple[str, str, str], ...]) -> None:
    """Times `steps` (their first steps compile them, counting the graph breaks) and reports
    each (candidate, baseline, label) ratio of step times synchronized at every step, then
    again from `pipelined_times` (no synchronization between steps, as the training loop
    runs them): the host's per-step work only counts there where the device waits for it."""
    counters = torch._dynamo.utils.counters
    counters.clear()
    times = interleaved_times(steps, size["repeats"], size["warmup"] + 2)
    # Graph breaks, and frames Dynamo gave up on whole (run eagerly: e.g. the LSTM model's
    # forward, which calls nn.LSTM in a loop); both summed over the section's models.
    compiled = dict(graph_breaks=sum(counters["graph_break"].values()),
                    frames_eager=counters["frames"]["total"] - counters["frames"]["ok"])
    for candidate, baseline, label in pairs:
        report(**ratio_result(f"{bench}/{label}", f"{candidate} ({mode})", baseline, times[candidate],
                              times[baseline]), **compiled)
    piped = pipelined_times(steps, size["repeats"], 1, PIPELINED_ROUNDS)   # the warm-up starts the epoch
    for candidate, baseline, label in pairs:
        report(**ratio_result(f"{bench}/{label}/pipelined", f"{candidate} ({mode})", baseline,
                              piped[candidate], piped[baseline]), **compiled)


def bench_compiled_lm(report: Reporter, size: dict, args) -> None:
    """The LM steps (2x650 LSTM, PTB sizes) under `trainer.compile` as `bench_compiled_steps`:
    vanilla compiled / eager, PER and recurrent BN compiled / vanilla compiled; then tokens/s
    of our compiled vanilla step / the word-language-model example's (eager) step."""
    mode = compile_mode(args)
    n = pipelined_batches(size)
    compiled = (*size["lm"], f"trainer.compile={mode}")
    steps = {"vanilla eager": build("t3_ptb_lstm_vanilla", size["lm"], n, args),
             **{f"{m} compiled": build(f"t3_ptb_lstm_{m}", compiled, n, args) for m in ("vanilla", "per", "rbn")}}
    cfg = compose_preset("t3_ptb_lstm_vanilla", size["lm"])
    report_compiled(report, f"compiled/lstm{cfg['model']['hidden_size']}/batch{cfg['data']['batch_size']}"
                    f"x{cfg['data']['bptt']}", mode, steps, size,
                    (("vanilla compiled", "vanilla eager", "vanilla"), ("per compiled", "vanilla compiled", "per"),
                     ("rbn compiled", "vanilla compiled", "rbn")))
    bench_lm_reference(report, size, args, (f"trainer.compile={mode}",))


def bench_lm_steps(report: Reporter, size: dict, args) -> None:
    """LM PER and recurrent-BN steps / vanilla."""
    labels = {"vanilla": "t3_ptb_lstm_vanilla", "per": "t3_ptb_lstm_per", "rbn": "t3_ptb_lstm_rbn"}
    steps = {label: build(name, size["lm"], size["warmup"] + size["repeats"], args) for label, name in labels.items()}
    times = interleaved_times(steps, size["repeats"], size["warmup"])
    cfg = compose_preset("t3_ptb_lstm_per", size["lm"])
    for label in ("per", "rbn"):
        report(**ratio_result(f"step/lstm{cfg['model']['hidden_size']}/batch{cfg['data']['batch_size']}"
                              f"x{cfg['data']['bptt']}", label, "vanilla", times[label], times["vanilla"]))


class ExampleLM(nn.Module):
    """The PyTorch word-language-model example's LSTM model (examples/word_language_model):
    embedding, dropout, `nn.LSTM`, dropout, linear decoder; `(T, B)` tokens -> `(T, B, V)`.

    `layer_by_layer`: one single-layer `nn.LSTM` per layer with the dropout between them, as
    our model runs them (so that each layer's output is a site), instead of the example's
    one multi-layer call. The state is `(h, c)`, each `(layers, B, H)`, either way."""

    def __init__(self, vocab: int, hidden: int, layers: int, dropout: float,
                 layer_by_layer: bool = False) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab, hidden)
        self.rnns = nn.ModuleList([nn.LSTM(hidden, hidden) for _ in range(layers)] if layer_by_layer
                                  else [nn.LSTM(hidden, hidden, layers, dropout=dropout)])
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        out, states, first = self.drop(self.encoder(x)), [], 0
        for i, rnn in enumerate(self.rnns):
            if i:
                out = self.drop(out)
            last = first + rnn.num_layers
            out, (h, c) = rnn(out, (state[0][first:last], state[1][first:last]))
            states.append((h, c))
            first = last
        state = states[0] if len(states) == 1 else tuple(torch.cat(part) for part in zip(*states))
        return self.decoder(self.drop(out)), state


def bench_lm_reference(report: Reporter, size: dict, args, compiled: tuple[str, ...] = ()) -> None:
    """tokens/s: the vanilla LM preset's step (with `compiled`, its `trainer.compile` override)
    / the word-language-model example's training step at the same sizes and precision (its
    loop: detach the state, forward, cross-entropy, backward, clip the global norm,
    `p -= lr * grad`; eager, the forward under the benchmark's autocast, as ours), on random
    tokens. Eager runs also time the example with one `nn.LSTM` call per layer, as our model
    makes them: that row isolates the cost of splitting the layers (cuDNN overlaps the
    layers of one multi-layer call on a GPU)."""
    name = "t3_ptb_lstm_vanilla"
    cfg = compose_preset(name, size["lm"])
    m, bptt, batch = cfg["model"], cfg["data"]["bptt"], cfg["data"]["batch_size"]
    warmup = 3 if compiled else 1      # compiling, then recording the CUDA graphs
    n = warmup + size["warmup"] + size["repeats"]
    ours = build(name, (*size["lm"], *compiled), n, args)
    vocab = ours.model.encoder.num_embeddings          # the generated corpus's vocabulary
    tokens = torch.randint(vocab, (bptt * n + 1, batch), device=args.device)
    lr, clip = cfg["optim"]["lr"], cfg["optim"]["clip_norm"]

    def example_step(layer_by_layer: bool) -> Callable[[], None]:
        example = ExampleLM(vocab, m["hidden_size"], m["num_layers"], m["dropout"], layer_by_layer)
        example.to(args.device)
        zeros = torch.zeros(m["num_layers"], batch, m["hidden_size"], device=args.device)
        state, windows = [(zeros, zeros)], iter(range(n))

        def step() -> None:
            k = next(windows) * bptt
            x, y = tokens[k:k + bptt], tokens[k + 1:k + 1 + bptt]
            example.zero_grad()
            with runtime.autocast_context(args.device, args.precision):
                out, new = example(x, tuple(h.detach() for h in state[0]))
                loss = F.cross_entropy(out.view(-1, vocab).float(), y.reshape(-1))
            state[0] = new
            loss.backward()
            torch.nn.utils.clip_grad_norm_(example.parameters(), clip)
            with torch.no_grad():
                for p in example.parameters():
                    p.add_(p.grad, alpha=-lr)
        return step

    batches = endless_batches(ours.task)
    times = interleaved_calls({"ours": lambda: ours(next(batches)), "example": example_step(False),
                               "example, layer by layer": example_step(True)},
                              size["warmup"] + size["repeats"] - 1, warmup, args.device.type == "cuda")
    bench = f"trainer/lstm{m['hidden_size']}/batch{batch}x{bptt}"
    result = ratio_result(bench, "word-language-model example", f"ours ({compiled[0]})" if compiled else "ours",
                          times["example"], times["ours"])
    result["tokens_per_s"] = {k: round(batch * bptt / statistics.median(v)) for k, v in times.items()}
    report(**result)
    if not compiled:   # the cost of one nn.LSTM call per layer, apart from the rest of our step
        report(**ratio_result(f"{bench}/layer_by_layer", "word-language-model example",
                              "the example, one nn.LSTM per layer", times["example"],
                              times["example, layer by layer"]))


def _without_tf32(fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` with TF32 matmuls off during the call (as `trainer.precision=fp32` runs)."""
    def run() -> Any:
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return fn()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
    return run


def bench_per_grad(report: Reporter, size: dict, args) -> None:
    """One site of each ResNet stage (channels layout, 256 slices; on a GPU also two as wide
    as the ELU net's, d = 192 and 240): the path `per_grad` takes on this device, and one
    `erf` over the `N x s` projections (the CPU floor) / unblocked. Where the fused kernel
    runs, also each of its products' modes (`per._triton.PRECISIONS`: float32, TF32,
    3 x TF32), with its error against float64, and the unblocked product with TF32 off (the
    plain path of an fp32 run): where it beats the kernel's `tf32x3`, fp32 runs would do
    better on the plain path."""
    cuda = args.device.type == "cuda"
    shapes = [(size["sites"] * 32 * 32, 16), (size["sites"] * 16 * 16, 32), (size["sites"] * 8 * 8, 64)]
    if cuda:
        shapes += [(size["sites"] * 32 * 32, 192), (size["sites"] * 16 * 16, 240)]
    for n, d in shapes:
        x = torch.randn(n, d, device=args.device)
        theta = functional.sample_directions(d, 256, device=args.device)
        fns = {"unblocked": lambda: functional._per_grad_blocked(x, theta, 1 / 256, n),
               "per_grad": lambda: functional.per_grad(x, theta),
               "erf only": lambda: torch.empty(n, 256, device=args.device).erf_()}
        if cuda:
            fns["unblocked, TF32 off"] = _without_tf32(fns["unblocked"])
        modes = []
        if functional._use_fused_kernel(x):
            from per import _triton
            modes = [f"fused triton, {p}" for p in _triton.PRECISIONS]
            fns.update({mode: (lambda p=p: _triton.per_grad_fused(x, theta, 1 / 256, p))
                        for mode, p in zip(modes, _triton.PRECISIONS)})
        times = interleaved_calls(fns, max(size["repeats"], 5), 1, cuda)
        path = "fused triton" if functional._use_fused_kernel(x) else (
            f"blocked {functional.PER_GRAD_BLOCK_ROWS} rows" if not cuda else "unblocked")
        if not cuda and os.environ.get("PER_CPU_COMPILE") == "1":   # per_grad compiled, the baseline eager
            path += ", PER_CPU_COMPILE=1"
        for label in ("per_grad", "erf only", *(("unblocked, TF32 off",) if cuda else ())):
            report(**ratio_result(f"per_grad/N{n}/d{d}/s256", path if label == "per_grad" else label,
                                  "unblocked", times[label], times["unblocked"]))
        if modes:
            want = functional._per_grad_blocked(x.double(), theta.double(), 1 / 256, n)
        for mode in modes:
            err = ((fns[mode]().double() - want).norm() / want.norm()).item()
            report(**ratio_result(f"per_grad/N{n}/d{d}/s256", mode, "unblocked", times[mode], times["unblocked"]),
                   rel_error_vs_float64=float(f"{err:.3g}"))


def bench_optimizer(report: Reporter, size: dict, args) -> None:
    """The runner's SGD update (fused on CPU and CUDA: `per.training.optim.FUSED_DEVICES`) /
    torch's default update (foreach on CUDA, a loop over the tensors on CPU) of the same
    parameters and gradients: the BN ResNet preset (momentum, weight decay) and
    the LM preset (plain SGD). The loop runs the update outside the compiled graphs, so on a
    GPU its host time is part of each step."""
    cuda = args.device.type == "cuda"
    image = (f"model={size['models'][0]}", f"data.batch_size={size['batch']}", *size["image"])
    for name, over in (("t1_cifar10_resnet56_bn", image), ("t3_ptb_lstm_vanilla", size["lm"])):
        step = build(name, over, size["warmup"] + size["repeats"], args)
        step(next(endless_batches(step.task)))                # gradients and momentum buffers
        fused = step.optimizer
        default = torch.optim.SGD([{k: v for k, v in g.items() if k not in optim.KERNEL_KEYS}
                                   for g in fused.param_groups], lr=fused.defaults["lr"])
        times = interleaved_calls({"fused": fused.step, "default": default.step}, size["repeats"], 1, cuda)
        tensors = sum(len(g["params"]) for g in fused.param_groups)
        report(**ratio_result(f"optimizer/{name}/{over[0] if over else 'preset'}", "fused SGD",
                              "torch default SGD", times["fused"], times["default"]), tensors=tensors)


def bench_epochs(report: Reporter, size: dict, args) -> None:
    """A real run (`per.training.run.train`: the runner's loop with its data, steps, device
    reads, evaluation and checkpoints) of the BN ResNet preset (the benchmark's first model
    and batch; compiled as `bench_compiled_steps`) for a few epochs on generated CIFAR-10 of
    `size["epochs"]`'s sizes, at the benchmark's precision and memory format: seconds per
    epoch, training and evaluation (checkpoint writes not counted). The ratio is the loop's
    seconds per step / the bare step's (`pipelined_times`, the same config, measured before
    it). On data of the real size, also the minutes of the preset's full run at these
    settings: the first epoch (compiling) and the others at the last epoch's training and
    evaluation times. A stop signal (the bench's time limit) ends the benchmark, as it
    stops the run."""
    epochs, n_train, n_test = size["epochs"]
    mode = compile_mode(args)
    name, model, batch = "t1_cifar10_resnet56_bn", size["models"][0], size["batch"]
    full = (n_train, n_test) == CIFAR10_SIZES
    over = (f"trainer.precision={args.precision}", f"trainer.channels_last={str(args.channels_last).lower()}",
            f"model={model}", f"data.batch_size={batch}", f"trainer.compile={mode}", *size["image"],
            *(() if full else ("data.val_size=0", f"data.eval_batch_size={min(n_test, 1000)}")))
    folder = args.data_root / f"cifar10-{n_train}-{n_test}"
    if not folder.exists():
        write_fake_cifar(folder, "cifar10", n_train=n_train, n_test=n_test)
    data = (f"data.root={folder}", "data.download=false", "data.verify_checksums=false")
    run_dir = args.data_root / f"epoch-{model}"
    short = (f"trainer.epochs={epochs}", "optim.total_steps=null", "trainer.progress=false",
             "logger.mode=disabled", "resume=never")      # the preset's 64k steps would set the epochs
    cfg = compose_preset(name, (*over, *data, *short), run_dir)
    step = preset_step(cfg, BUILD["cifar"], args.device)    # first: the run reuses its compiled code
    bare = statistics.median(pipelined_times({"step": step}, size["repeats"], 3)["step"])
    del step
    summary = runner.train(cfg, BUILD["cifar"])
    if summary.get("signal"):   # the runner made the bench's time limit a clean stop: pass it on
        raise Stopped(summary["signal"])
    rows = RunDir(run_dir).read_jsonl(METRICS_FILE)
    if summary["status"] != schema.FINISHED or len(rows) != epochs:
        raise RuntimeError(f"the epoch run ended {summary['status']} after {len(rows)} of {epochs} epochs")
    train_s = [r[schema.EPOCH_TIME] for r in rows]
    eval_s = [r[schema.EVAL_TIME] for r in rows]
    steps = summary["steps"] // epochs
    loop_step = train_s[-1] / steps
    val_size = cfg["data"]["val_size"] or 0
    result = {"bench": f"epoch/{model}/batch{batch}", "candidate": f"runner loop ({mode})",
              "baseline": f"bare step ({mode}, pipelined)", "ratio": round(loop_step / bare, 3),
              "candidate_ms": round(1e3 * loop_step, 3), "baseline_ms": round(1e3 * bare, 3),
              "steps_per_epoch": steps, "epoch_train_s": [round(t, 4) for t in train_s],
              "epoch_eval_s": [round(t, 4) for t in eval_s],
              "train_examples": n_train - val_size, "eval_examples": n_test + val_size}
    if full:    # the preset's own length (64k steps: 163.7 epochs' worth, 164 evaluations)
        full_epochs, _, full_steps = runner.run_length(compose_preset(name, over), steps)
        seconds = (train_s[0] + eval_s[0] + (full_steps / steps - 1) * train_s[-1]
                   + (full_epochs - 1) * eval_s[-1])
        result.update(full_run_epochs=round(full_steps / steps, 2), full_run_min=round(seconds / 60, 2))
    report(**result)


class _ArrayDataset(torch.utils.data.Dataset):
    """uint8 (N, 32, 32, 3) images as PIL images through a torchvision transform, as
    torchvision.datasets.CIFAR10 serves them."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform: Callable) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image
        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def bench_loader(report: Reporter, size: dict, args) -> None:
    """images/s: the project's trainer (device-resident loader + preset step, on a GPU
    compiled with reduce-overhead, i.e. CUDA graphs) against a plain DataLoader +
    torchvision transforms trainer (fp32, eager, SGD) of the same model."""
    import torchvision.transforms as T
    model_name, batch, n_steps = size["models"][0], size["batch"], size["loader_steps"]
    cuda = args.device.type == "cuda"
    warmup = 3 if cuda else 1          # compiling: the train step, then its CUDA graph
    over = (f"model={model_name}", f"data.batch_size={batch}")
    graphs = ("trainer.compile=reduce-overhead",) if cuda else ()
    ours = build(STEP_CONFIGS["vanilla"][0], (*over, *graphs), n_steps + warmup, args)
    plain_model = models.from_config(compose_preset(STEP_CONFIGS["vanilla"][0], over)["model"],
                                     num_classes=10).to(args.device)
    opt = torch.optim.SGD(plain_model.parameters(), lr=1e-3, momentum=0.9)
    rng = np.random.default_rng(0)
    data = _ArrayDataset(rng.integers(0, 256, (batch * (n_steps + warmup), 32, 32, 3), dtype=np.uint8),
                         rng.integers(0, 10, batch * (n_steps + warmup)),
                         T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))]))
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=args.workers, pin_memory=cuda)

    def plain_step(xy) -> None:
        x, y = (t.to(args.device, non_blocking=True) for t in xy)
        loss = F.cross_entropy(plain_model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ours_batches, plain_batches = endless_batches(ours.task), iter(loader)
    times = interleaved_calls({"device loader": lambda: ours(next(ours_batches)),     # data fetch + step
                               "dataloader+torchvision": lambda: plain_step(next(plain_batches))}, n_steps, warmup,
                              cuda)
    result = ratio_result(f"trainer/{model_name}/batch{batch}", "dataloader+torchvision",
                          "device loader", times["dataloader+torchvision"], times["device loader"])
    result["images_per_s"] = {k: round(batch / statistics.median(v), 1) for k, v in times.items()}
    result["dataloader_workers"] = args.workers
    result["plain_trainer"] = "fp32, eager, NCHW (the issue's reference trainer)"
    result["ours"] = f"{args.precision}, {'reduce-overhead' if cuda else 'eager'}" + (", channels_last" * cuda)
    report(**result)


def bench_runs_at_once(report: Reporter, size: dict, args) -> None:
    """Runs per hour of k concurrent runs (one process each, `args.threads` threads) of the
    PER ResNet preset (the benchmark's first model and batch) and the PER LM preset."""
    image = (f"model={size['models'][0]}", f"data.batch_size={size['batch']}", *size["image"])
    for name, over in (("t1_cifar10_resnet56_per", image), ("t3_ptb_lstm_per", size["lm"])):
        cfg = compose_preset(name, (f"trainer.precision={args.precision}",
                                    f"trainer.channels_last={str(args.channels_last).lower()}", *over))
        generated = on_generated_data(cfg, args.data_root, size["run_steps"] + size["warmup"])
        rates = {k: runs_per_hour(cfg, generated, BUILD[cfg["task"]], args.device, k, size["run_steps"],
                                  size["warmup"], args.threads)
                 for k in size["at_once"]}
        for k in size["at_once"][1:]:
            report(bench=f"runs_per_hour/{name}/{over[0] if over else 'preset'}", candidate=f"{k} at once",
                   baseline="1 at once", ratio=round(rates[k] / rates[1], 3),
                   runs_per_hour={str(n): round(r, 4) for n, r in rates.items()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: seconds, no meaningful times")
    ap.add_argument("--device", default="auto", choices=runtime.DEVICES)
    ap.add_argument("--precision", default=None, choices=runtime.PRECISIONS,
                    help="default: bf16 on cuda (with channels_last), fp32 on cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU torch threads (default 1)")
    ap.add_argument("--workers", type=int, default=None,
                    help="DataLoader workers of the plain trainer (default: 0 on cpu, 8 on cuda)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--models", default="", help="comma-separated image models (default: the size's, "
                    "resnet56,resnet110 on cuda); the first is the one `optimizer`, `epoch`, `loader` and `runs` use")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    args.device = runtime.resolve_device(args.device)
    cuda = args.device.type == "cuda"
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.channels_last = cuda
    args.workers = args.workers if args.workers is not None else (8 if cuda else 0)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runtime.configure_backends(args.device, deterministic=False, precision=args.precision)
    mode = "tiny" if args.tiny else args.device.type
    size = dict(SIZES[mode])
    if args.models:
        size["models"] = tuple(args.models.split(","))
    report = Reporter(args.out, {"device": runtime.device_info(args.device)["name"], "size": mode,
                                 "precision": args.precision, "torch": torch.__version__})
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    if only - set(SECTIONS):
        ap.error(f"unknown --only section(s) {', '.join(sorted(only - set(SECTIONS)))}; valid: {', '.join(SECTIONS)}")
    sections: dict[str, Callable[[], Any]] = {   # run in the order of SECTIONS
        "step": lambda: [bench_image_steps(report, model, size, args) for model in size["models"]],
        "per_grad": lambda: bench_per_grad(report, size, args),
        "optimizer": lambda: bench_optimizer(report, size, args),
        "lm": lambda: (bench_lm_steps(report, size, args), bench_lm_reference(report, size, args)),
        "compiled": lambda: [bench_compiled_steps(report, model, size, args) for model in size["models"]],
        "compiled_lm": lambda: bench_compiled_lm(report, size, args),
        "epoch": lambda: bench_epochs(report, size, args),
        "loader": lambda: bench_loader(report, size, args),
        "runs": lambda: bench_runs_at_once(report, size, args),
    }
    failed = []
    try:
        with tempfile.TemporaryDirectory() as data_root:
            args.data_root = Path(data_root)
            for name in SECTIONS:
                if name not in only:
                    continue
                try:
                    sections[name]()
                except Exception as e:   # one section's failure (a compile error) keeps the others
                    traceback.print_exc()
                    report(bench=name, error=f"{type(e).__name__}: {e}")
                    failed.append(name)
    except Stopped as stop:          # the generated data removed, end as the signal would have
        signal.signal(stop.signum, signal.SIG_DFL)
        signal.raise_signal(stop.signum)
    if failed:
        print(f"[bench] failed sections: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
