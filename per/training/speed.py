"""Timing a preset's real training step (`TrainStep`, built by `run.build_setup` through the
task builders) on generated data: the step-time tables (`scripts/step_times.py`) and the
speed benchmark (`scripts/bench.py`)."""
from __future__ import annotations

import copy
import functools
import queue
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from per.data.cifar import write_fake_cifar
from per.data.corpus import EXPECTED_COUNTS, write_fake_corpus
from per.sweep import steps_per_run
from per.training.loop import Experiment, Task, TrainStep
from per.training import runtime
from per.training.run import build_setup


def on_generated_data(cfg: dict, root: Path, batches: int) -> dict:
    """`cfg` reading generated data written under `root` (once per dataset and size): exactly
    `batches` training batches of images and two full evaluation batches, or a corpus over
    the real vocabulary size (the generated text reaches about 90% of its words) and more
    than enough windows."""
    cfg = copy.deepcopy(cfg)
    data = cfg["data"]
    if cfg["task"] == "cifar":
        n, n_test = data["batch_size"] * batches, 2 * data["eval_batch_size"]
        folder = root / f"{data['name']}-{n}-{n_test}"
        if not folder.exists():
            write_fake_cifar(folder, data["name"], n_train=n, n_test=n_test)
        data["val_size"] = 0
    else:
        vocab = EXPECTED_COUNTS[data["name"]][0]
        folder = root / f"{data['name']}-{vocab}"
        if not folder.exists():
            write_fake_corpus(folder, data["name"], n_train_lines=vocab, vocab_size=vocab)
    data.update(root=str(folder), download=False, verify_checksums=False)
    return cfg


def preset_step(cfg: dict, build: Callable[[dict, torch.device, Callable], Experiment],
                device: torch.device) -> TrainStep:
    """The training step of `cfg` (model, task, regularizer, optimizer, clipping, precision,
    `trainer.compile`), as `fit` takes it, with the backends set as the runner sets them."""
    runtime.configure_backends(device, cfg["trainer"]["deterministic"], cfg["trainer"]["precision"])
    s = build_setup(cfg, build, device)
    model = runtime.compile_model(s.model, cfg["trainer"]["compile"])
    return TrainStep(model, s.task, s.optimizer, s.regularizer, s.autocast, cfg["optim"]["clip_norm"],
                     cfg["optim"]["clip_mode"])


def endless_batches(task: Task) -> Iterator[Any]:
    """The task's training batches, epoch after epoch."""
    epoch = 0
    while True:
        yield from task.train_batches(epoch, 0)
        epoch += 1


def _on_cuda(step: TrainStep) -> bool:
    return next(step.model.parameters()).is_cuda


def timed(fn: Callable[[], Any], cuda: bool) -> tuple[float, Any]:
    """(seconds, result) of `fn()`, synchronized on CUDA."""
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def interleaved_calls(fns: dict[str, Callable[..., Any]], repeats: int, warmup: int, cuda: bool,
                      inputs: dict[str, Iterator[Any]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, one call of each in turn (so load drifts on a
    shared machine hit all alike), after `warmup` untimed rounds, synchronized on CUDA. With
    `inputs`, each call takes the next item of its function's iterator, fetched outside
    the timed region."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for k, fn in fns.items():
            call = functools.partial(fn, next(inputs[k])) if inputs is not None else fn
            s, _ = timed(call, cuda)
            if i >= warmup:
                times[k].append(s)
    return times


def interleaved_times(steps: dict[str, TrainStep], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step of each configuration (`interleaved_calls`, each step on its own
    task's next batch)."""
    return interleaved_calls(steps, repeats, warmup, any(_on_cuda(s) for s in steps.values()),
                             {k: endless_batches(s.task) for k, s in steps.items()})


def pipelined_times(steps: dict[str, TrainStep], repeats: int, warmup: int,
                    rounds: int = 3) -> dict[str, list[float]]:
    """Seconds per step of each configuration with the host running ahead of the device, as
    in `fit` (which reads the device once per `log_every` steps): `rounds` runs of `repeats`
    consecutive steps (batch fetch included), synchronized only at their ends,
    configurations taking turns run by run, after `warmup` steps of each."""
    batches = {k: endless_batches(s.task) for k, s in steps.items()}
    for k, step in steps.items():
        for _ in range(warmup):
            step(next(batches[k]))
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, step in steps.items():
            s, _ = timed(lambda: [step(next(batches[k])) for _ in range(repeats)], _on_cuda(step))
            times[k].append(s / repeats)
    return times


def seconds_per_step(step: TrainStep, repeats: int, warmup: int) -> tuple[float, float]:
    """(seconds per step, items per second) of `repeats` steps after `warmup`. On a GPU as
    `fit` runs them, back to back and synchronized only at the end (`pipelined_times`: the
    median of its runs; a step synchronized alone also waits for its own launches, which
    put the H200 table's steps 8-14% above its runs per hour); elsewhere the median of
    steps timed one by one."""
    if _on_cuda(step):
        s = statistics.median(pipelined_times({"step": step}, repeats, warmup)["step"])
        _, (_, _, sums) = timed(lambda: step(next(endless_batches(step.task))), True)
        return s, int(sums["items"]) / s
    times, items = [], 0
    for i, batch in zip(range(warmup + repeats), endless_batches(step.task)):
        s, (_, _, sums) = timed(lambda: step(batch), False)
        if i >= warmup:
            times.append(s)
            items += int(sums["items"])
    return statistics.median(times), items / sum(times)


def seconds_per_eval_batch(step: TrainStep) -> float:
    """Seconds per evaluation batch of the step's task and model (all its evaluation splits,
    as `fit` runs them at the end of an epoch), after one untimed evaluation."""
    cuda = _on_cuda(step)
    step.task.evaluate(step.model)
    s, _ = timed(lambda: step.task.evaluate(step.model), cuda)
    return s / step.task.eval_batches()


def _concurrent_worker(cfg: dict, build: Callable, device: str, threads: int, steps: int,
                       warmup: int, barrier: Any, results: Any) -> None:
    """One of the concurrent runs: build the step, warm up, wait for the others, then put
    the wall-clock seconds of `steps` steps into `results`."""
    try:
        torch.set_num_threads(threads)
        step = preset_step(cfg, build, torch.device(device))
        batches = endless_batches(step.task)
        cuda = device.startswith("cuda")
        for _ in range(warmup):
            step(next(batches))
        barrier.wait()
        s, _ = timed(lambda: [step(next(batches)) for _ in range(steps)], cuda)
        results.put(s)
    except BaseException as e:      # a failed run must not leave the others waiting
        barrier.abort()
        results.put(repr(e))
        raise


def concurrent_steps_per_s(cfg: dict, build: Callable, device: torch.device, runs: int, steps: int,
                           warmup: int, threads: int = 1) -> float:
    """Optimizer steps per second of all `runs` copies of `cfg`'s training step together,
    each in its own process on `device` (`threads` CPU threads each), started at once after
    every process has warmed up: `runs * steps / slowest run's seconds`. Multiply by
    3600 / `per.sweep.steps_per_run(cfg)` for runs per hour."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(runs), ctx.Queue()
    procs = [ctx.Process(target=_concurrent_worker, daemon=True,
                         args=(cfg, build, str(device), threads, steps, warmup, barrier, results))
             for _ in range(runs)]
    for p in procs:
        p.start()
    got: list[float | str] = []
    try:
        while len(got) < runs:
            try:
                got.append(results.get(timeout=5))
            except queue.Empty:     # a run that has died (failed, killed, crashed) ends them all
                if any(p.exitcode not in (None, 0) for p in procs) or not any(p.is_alive() for p in procs):
                    barrier.abort()
                    break
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    # The first cause, not the others' broken barrier.
    failed = sorted((g for g in got if isinstance(g, str)), key=lambda g: g.startswith("BrokenBarrierError"))
    if failed or len(got) < runs:
        cause = failed[0] if failed else f"exit codes {[p.exitcode for p in procs]}"
        raise RuntimeError(f"{runs - len(got) + len(failed)} of {runs} concurrent runs failed: {cause}")
    return runs * steps / max(got)


def runs_per_hour(cfg: dict, generated: dict, build: Callable, device: torch.device, runs: int, steps: int,
                  warmup: int, threads: int = 1) -> float:
    """Runs of `cfg` (its full length, `per.sweep.steps_per_run`) finished per hour with `runs`
    of them at once, from `concurrent_steps_per_s` on `generated` (`cfg` on generated data)."""
    return 3600 * concurrent_steps_per_s(generated, build, device, runs, steps, warmup, threads) / steps_per_run(cfg)
