"""Speed tooling: the benchmark runs at tiny sizes (no time assertions), the DRY_RUN device
estimates pick the right step-time table, and untracked steps skip the penalty value."""
from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn as nn

import per
from experiments.common import BUILD, compose_preset
from per import sweep
from per.training import runtime
from per.training.speed import concurrent_steps_per_s, interleaved_calls, on_generated_data
from runner_utils import ROOT, restored_backend_flags, script_module


@pytest.mark.slow   # ~10 s of CPU; longer on a loaded machine
def test_bench_tiny_reports_every_ratio_as_json_lines(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/bench.py"), "--tiny", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [json.loads(line) for line in proc.stdout.splitlines()]
    got = {(r["bench"].split("/")[0], r["candidate"]) for r in rows}
    assert {("step", "per channels"), ("step", "per channels, PER_CPU_COMPILE=1"), ("step", "per flatten"),
            ("step", "per flatten, sampling=subspace"), ("step", "l2"), ("step", "per"), ("step", "rbn"),
            ("compiled", "bn compiled (default)"), ("compiled", "per channels compiled (default)"),
            ("compiled", "vanilla compiled (default)"), ("compiled", "rbn compiled (default)"),
            ("epoch", "runner loop (default)"), ("trainer", "word-language-model example"),
            ("per_grad", f"blocked {per.functional.PER_GRAD_BLOCK_ROWS} rows"), ("per_grad", "erf only"),
            ("trainer", "dataloader+torchvision"), ("runs_per_hour", "2 at once"), ("optimizer", "fused SGD")} <= got
    assert sorted(r["bench"].split("/")[1] for r in rows if r["bench"].startswith("optimizer/")) == [
        "t1_cifar10_resnet56_bn", "t3_ptb_lstm_vanilla"]
    for r in rows:
        assert r["ratio"] > 0 and r["size"] == "tiny" and r["device"]
    assert {r["graph_breaks"] for r in rows if r["bench"].startswith("compiled/")} == {0}   # PER traced whole
    # ... but Dynamo skips the plain LSTM model's forward whole (nn.LSTM): counted apart.
    assert {r["frames_eager"] for r in rows if r["bench"].startswith("compiled/")
            and not r["bench"].startswith("compiled/lstm")} == {0}
    assert all(r["frames_eager"] > 0 for r in rows if r["bench"].startswith("compiled/lstm"))
    compiled = [r["bench"] for r in rows if r["bench"].startswith("compiled/")]
    assert {b for b in compiled if b.endswith("/pipelined")} == {b + "/pipelined" for b in compiled
                                                                 if not b.endswith("/pipelined")}
    assert [(r["bench"].split("/")[-1], r["baseline"]) for r in rows if r["bench"].startswith("trainer/lstm")] == [
        ("batch2x5", "ours"), ("layer_by_layer", "the example, one nn.LSTM per layer"),
        ("batch2x5", "ours (trainer.compile=default)")]
    epoch = next(r for r in rows if r["bench"].startswith("epoch/"))
    assert len(epoch["epoch_train_s"]) == len(epoch["epoch_eval_s"]) == 2     # a finished run (else an error row)
    assert "full_run_min" not in epoch          # generated data smaller than CIFAR-10: no estimate
    assert rows[0]["bench"].startswith("step/resnet20")        # most important first
    order = [r["bench"].split("/")[0] for r in rows]
    assert order.index("compiled") > max(i for i, b in enumerate(order) if b.startswith("step"))  # compiling last


def test_the_example_lm_layer_by_layer_computes_what_its_one_multilayer_call_does():
    """The bench's layer-by-layer variant of the word-language-model example differs from
    the example only in how its LSTM layers are called: same weights, same outputs and state."""
    bench = script_module("bench")
    torch.manual_seed(0)
    whole, split = bench.ExampleLM(50, 8, 2, 0.0), bench.ExampleLM(50, 8, 2, 0.0, layer_by_layer=True)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        for layer in range(2):
            getattr(split.rnns[layer], f"{name}_l0").data.copy_(getattr(whole.rnns[0], f"{name}_l{layer}"))
    split.encoder.load_state_dict(whole.encoder.state_dict())
    split.decoder.load_state_dict(whole.decoder.state_dict())
    x, state = torch.randint(50, (5, 3)), (torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    (out_w, (h_w, c_w)), (out_s, (h_s, c_s)) = whole(x, state), split(x, state)
    assert out_w.shape == (5, 3, 50) and h_s.shape == c_s.shape == (2, 3, 8)
    for a, b in ((out_w, out_s), (h_w, h_s), (c_w, c_s)):
        torch.testing.assert_close(a, b)


def test_a_failing_bench_section_is_reported_and_the_rest_runs(tmp_path, monkeypatch):
    bench = script_module("bench")

    def broken(*args):
        raise RuntimeError("inductor fell over")
    monkeypatch.setattr(bench, "bench_per_grad", broken)
    out = tmp_path / "bench.jsonl"
    assert bench.main(["--tiny", "--device", "cpu", "--only", "per_grad,loader", "--out", str(out)]) == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["bench"] == "per_grad" and rows[0]["error"] == "RuntimeError: inductor fell over"
    assert rows[1]["bench"].startswith("trainer/")     # the next section still ran


def test_bench_epoch_estimates_the_full_run_on_data_of_the_real_size(tmp_path, monkeypatch):
    bench = script_module("bench")
    monkeypatch.setattr(bench, "CIFAR10_SIZES", bench.SIZES["tiny"]["epochs"][1:])   # tiny counts as full
    out = tmp_path / "bench.jsonl"
    assert bench.main(["--tiny", "--device", "cpu", "--only", "epoch", "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    steps = row["steps_per_epoch"]
    assert steps == bench.SIZES["tiny"]["epochs"][1] // bench.SIZES["tiny"]["batch"]
    assert row["full_run_epochs"] == round(64000 / steps, 2)       # he_bn: 64k steps decide the length
    train, evals = row["epoch_train_s"], row["epoch_eval_s"]
    want = (train[0] + evals[0] + (64000 / steps - 1) * train[-1] + (-(-64000 // steps) - 1) * evals[-1]) / 60
    assert row["full_run_min"] == pytest.approx(want, rel=0.02, abs=0.02)   # from the rounded epoch times
    assert row["candidate_ms"] == pytest.approx(1e3 * train[-1] / steps, rel=0.01)


def test_bench_epoch_reports_a_run_that_did_not_finish_as_an_error(tmp_path, monkeypatch):
    bench = script_module("bench")
    monkeypatch.setattr(bench.runner, "train", lambda cfg, build: {"status": "diverged", "steps": 3})
    out = tmp_path / "bench.jsonl"
    assert bench.main(["--tiny", "--device", "cpu", "--only", "epoch", "--out", str(out)]) == 1
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row == {**row, "bench": "epoch", "error": "RuntimeError: the epoch run ended diverged after 0 of 2 epochs"}


@pytest.mark.slow   # the tiny epoch run, stopped: about 10 s each
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_during_the_epoch_run_ends_the_bench(tmp_path, signum):
    """The runner turns SIGTERM and SIGINT into a clean stop; the bench passes the signal on,
    so a time limit (gpu_check's `timeout`) or Ctrl-C ends it instead of the next sections
    running, after removing its generated data."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT / "scripts")!r})
        import bench
        train = bench.runner.train
        def stopped(cfg, build):     # the signal while the run builds its model: it stops after a step
            return train(cfg, lambda *a: (os.kill(os.getpid(), {int(signum)}), build(*a))[1])
        bench.runner.train = stopped
        sys.exit(bench.main(["--tiny", "--device", "cpu", "--only", "epoch,runs", "--out", {str(tmp_path / "b.jsonl")!r}]))
    """)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}, cwd=ROOT)
    assert proc.returncode == -signum, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert not (tmp_path / "b.jsonl").exists()       # neither an epoch row from the cut run nor the next section
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("tmp")]    # the generated data is gone


def test_pipelined_times_run_consecutive_steps_after_a_warm_up():
    from per.training.speed import pipelined_times

    class Step:           # the parts of a TrainStep that timing uses
        def __init__(self):
            self.model, self.calls = nn.Linear(1, 1), []
            self.task = self

        def train_batches(self, epoch, start):
            return iter(range(epoch * 100, epoch * 100 + 7))

        def __call__(self, batch):
            self.calls.append(batch)

    steps = {"a": Step(), "b": Step()}
    times = pipelined_times(steps, repeats=3, warmup=1, rounds=2)
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2} and all(t > 0 for v in times.values() for t in v)
    assert steps["a"].calls == steps["b"].calls == list(range(7))   # 1 + 2 x 3 batches, one epoch


@pytest.mark.parametrize("cuda", [False, True])
def test_step_times_on_a_gpu_run_the_steps_back_to_back(monkeypatch, cuda):
    """`seconds_per_step`: steps synchronized one by one on a CPU; on a GPU (simulated: no
    synchronization here) consecutive steps synchronized at the end, as `fit` runs them."""
    from per.training import speed
    syncs = []
    monkeypatch.setattr(speed, "_on_cuda", lambda step: cuda)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: syncs.append(len(step.calls)))

    class Step:           # the parts of a TrainStep that timing uses
        def __init__(self):
            self.model, self.calls, self.task = nn.Linear(1, 1), [], self

        def train_batches(self, epoch, start):
            return iter(range(epoch * 100, epoch * 100 + 50))

        def __call__(self, batch):
            self.calls.append(batch)
            time.sleep(0.002)
            return None, None, {"items": torch.tensor(32)}
    step = Step()
    s, rate = speed.seconds_per_step(step, repeats=4, warmup=2)
    assert s >= 0.002 and rate == pytest.approx(32 / s, rel=0.5)
    if cuda:    # after the warm-up, 3 runs of 4 steps, then one step for the items per step
        assert syncs == [2, 6, 6, 10, 10, 14, 14, 15] and rate == pytest.approx(32 / s)
    else:
        assert syncs == [] and len(step.calls) == 6


def test_bench_times_the_plain_product_with_tf32_off_and_restores_the_flag():
    bench = script_module("bench")
    seen = []
    with restored_backend_flags():
        torch.backends.cuda.matmul.allow_tf32 = True
        bench._without_tf32(lambda: seen.append(torch.backends.cuda.matmul.allow_tf32))()
        assert seen == [False] and torch.backends.cuda.matmul.allow_tf32
        with pytest.raises(ZeroDivisionError):
            bench._without_tf32(lambda: 1 / 0)()
        assert torch.backends.cuda.matmul.allow_tf32


def _table(path, device: str, times: dict[str, float], evals: dict[str, float] | None = None) -> None:
    path.write_text(json.dumps({"device": device, "device_type": "cpu", "precision": "fp32", "torch": "x",
                                "recorded": "2020-01-01", "s_per_step": times,
                                **({"s_per_eval_batch": evals} if evals else {})}))


def test_dry_run_estimates_from_the_matching_table_else_the_measured_one(tmp_path, monkeypatch, capsys):
    names = ["t1_cifar10_resnet56_per", "t1_cifar100_resnet110_per"]
    phases = sweep.plan(names, lambda n, o: sweep.Preset(n, compose_preset(n, o)), [0], [0], 5000)
    _table(tmp_path / "cuda-some-card.json", "Some Card", {"cifar10|resnet56|none|per|channels|256": 0.01})
    sweep.print_plan(phases, "t", tmp_path)
    out = capsys.readouterr().out
    assert "NOT this machine" in out and "Some Card" in out
    here = runtime.device_info(runtime.resolve_device("auto"))
    # Another device of this machine's kind goes before one of the other kind.
    other, same = ("cuda-a-card", "cpu-other-cpu") if here["slug"].startswith("cpu") else ("cpu-a-cpu", "cuda-z-card")
    (kinds := tmp_path / "kinds").mkdir()
    _table(kinds / f"{other}.json", "Other kind", {"cifar10|resnet56|none|per|channels|256": 0.02})
    _table(kinds / f"{same}.json", "Same kind", {"cifar10|resnet56|none|per|channels|256": 0.5})
    sweep.print_plan(phases, "t", kinds)
    assert "NOT this machine" in (out := capsys.readouterr().out) and "Same kind" in out
    # This machine's model measured with other cores or threads: both names are given.
    _table(tmp_path / f"{here['slug']}.json", "This box", {"cifar10|resnet56|none|per|channels|256": 1.0})
    sweep.print_plan(phases, "t", tmp_path)
    out = capsys.readouterr().out
    assert f"this machine's model, measured as This box (torch x, 2020-01-01); here: {here['name']}" in out
    assert "NOT this machine" not in out
    _table(tmp_path / f"{here['slug']}.json", here["name"], {"cifar10|resnet56|none|per|channels|256": 1.0})
    sweep.print_plan(phases, "t", tmp_path)
    out = capsys.readouterr().out
    assert f"this machine's {here['name']} (torch x" in out and "here:" not in out
    # ResNet-56 CIFAR-10 measured; CIFAR-100 ResNet-110 estimated as twice it ("~"). 4 selection
    # runs each: Fixup's 200 epochs of 128-image batches from 45k images (5k held out), the
    # last partial batch kept (352 batches).
    select56, select110 = (sweep.steps_per_run(select.preset.cfg) for select, _ in phases)
    assert select56 == select110 == 200 * 352
    assert f"{4 * select56 / 3600:,.1f}" in out
    assert f"~{2 * 4 * select110 / 3600:,.1f}" in out
    assert " ?" not in out and "evaluation not measured for 2 configurations" in out
    # With evaluation times: each epoch adds its evaluation batches (5k held out + 10k test
    # images at 1000 a batch: 15 per epoch, 200 epochs).
    _table(tmp_path / f"{here['slug']}.json", "This box", {"cifar10|resnet56|none|per|channels|256": 1.0},
           {"cifar10|resnet56|none|per|channels|256": 10.0})
    sweep.print_plan(phases, "t", tmp_path)
    out = capsys.readouterr().out
    assert sweep.evals_per_run(phases[0][0].preset.cfg) == 200 * 15
    assert f"{4 * (select56 + 10 * 200 * 15) / 3600:,.1f}" in out
    assert f"~{2 * 4 * (select110 + 10 * 200 * 15) / 3600:,.1f}" in out
    assert "evaluation not measured" not in out
    # A table chosen by name wins over this machine's; an unknown name lists the tables.
    sweep.print_plan(phases, "t", tmp_path, "cuda-some-card")
    out = capsys.readouterr().out
    assert "chosen table cuda-some-card: Some Card" in out and f"{4 * select56 * 0.01 / 3600:,.1f}" in out
    assert "PER kernel" not in out
    table = json.loads((tmp_path / "cuda-some-card.json").read_text())   # a GPU table names its kernel's mode
    (tmp_path / "cuda-some-card.json").write_text(json.dumps({**table, "per_kernel_products": "ieee"}))
    sweep.print_plan(phases, "t", tmp_path, "cuda-some-card")
    assert "Some Card (torch x, 2020-01-01, PER kernel products ieee)" in capsys.readouterr().out
    with pytest.raises(ValueError, match=f"valid: {', '.join(sorted(['cuda-some-card', here['slug']]))}$"):
        sweep.print_plan(phases, "t", tmp_path, "cuda-other")


def test_the_step_time_key_names_the_activation_and_estimates_from_another():
    elu, relu = (compose_preset(f"t2_cifar100_{a}_per") for a in ("elu", "relu"))
    assert sweep.step_time_key(elu) == "cifar100|elu_cnn11|none|per|channels|256|elu"
    assert sweep.step_time_key(relu) == "cifar100|elu_cnn11|none|per|channels|256|relu"
    assert sweep.step_time_key(compose_preset("t1_cifar10_resnet56_per")) == "cifar10|resnet56|none|per|channels|256"
    times = {"cifar100|elu_cnn11|none|per|channels|256|elu": 3.0, "cifar10|elu_cnn11|none|per|channels|256|relu": 2.0}
    assert sweep.step_time(times, sweep.step_time_key(elu)) == (3.0, False)
    # The same data with another activation before the same activation on CIFAR-10.
    assert sweep.step_time(times, sweep.step_time_key(relu)) == (3.0, True)
    assert sweep.step_time({"cifar10|elu_cnn11|none|per|channels|256|relu": 2.0}, sweep.step_time_key(relu)) == (2.0, True)
    assert sweep.step_time({}, sweep.step_time_key(relu)) == (None, False)


@pytest.mark.slow   # one LM step time: about 20 s
def test_step_times_start_a_fresh_table_when_the_kernels_products_changed(tmp_path):
    """A table's rows were measured with one mode of PER's fused kernel (`per_kernel_products`,
    GPU tables) and one torch: rows of another mode or torch are not mixed in, the table
    starts over. A row marked stale and measured again loses its mark."""
    here = runtime.device_info(torch.device("cpu"))
    out = tmp_path / "table.json"
    old = {"device": here["name"], "device_type": "cpu", "precision": "fp32", "torch": torch.__version__,
           "s_per_step": {"old|row": 1.0}}
    stale = {"ptb|lstm||vanilla||": "old code", "old|row": "old code"}
    for stored, kept in (({"stale": stale}, True), ({"per_kernel_products": "ieee"}, False),
                         ({"torch": "1.0"}, False)):
        out.write_text(json.dumps({**old, **stored}))
        subprocess.run([sys.executable, str(ROOT / "scripts/step_times.py"), "--device", "cpu", "--threads", "1",
                        "--match", "^t3_ptb_lstm_vanilla$", "--steps", "1", "--warmup", "0", "--out", str(out)],
                       check=True, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        table = json.loads(out.read_text())
        assert ("old|row" in table["s_per_step"]) == kept and "ptb|lstm||vanilla||" in table["s_per_step"]
        assert table.get("stale") == ({"old|row": "old code"} if kept else None)     # measured again: not stale
        assert "per_kernel_products" not in table        # a CPU table: no fused kernel


@pytest.mark.slow
def test_dry_run_prints_device_hours_from_the_shipped_tables():
    for task in ("cifar", "lm"):
        out = subprocess.run([sys.executable, str(ROOT / "scripts/reproduce.py"), "--task", task,
                              "--dry-run"], capture_output=True, text=True, check=True).stdout
        assert "step times: " in out and "device-hours on " in out, out
        assert "note:" not in out                          # the presets' own settings
    out = subprocess.run([sys.executable, str(ROOT / "scripts/reproduce.py"), "--sweep", "t1_cifar10_resnet56_per",
                          "--override", "trainer.precision=bf16", "--override", "data.val_size=64", "--dry-run"],
                         capture_output=True, text=True, check=True).stdout
    assert "note: trainer.precision=bf16 change what a step costs" in out and "data.val_size" not in out.split("note:")[1]


def test_untracked_backward_steps_skip_the_penalty_value(monkeypatch):
    calls = []
    site_value = per.regularizers._site_value
    monkeypatch.setattr(per.regularizers, "_site_value", lambda *a: calls.append(1) or site_value(*a))
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), per.Site(), nn.Linear(8, 2))
    reg = per.Regularizer(model, "per", 1e-2, num_slices=8)
    for track in (False, True):
        reg.begin_step(track=track)
        model(torch.randn(5, 4)).sum().backward()
        assert len(calls) == int(track) and bool(reg.site_stats()) == track


def test_best_runs_per_device_takes_the_smallest_count_near_the_best():
    table = {"device": "Card", "runs_per_hour": {
        "t1_cifar10_resnet56_per": {"task": "cifar", "1": 10.0, "2": 17.0, "4": 20.0, "8": 20.5},
        "t3_ptb_lstm_per": {"task": "lm", "steps": 5, "warmup": 2, "1": 3.0, "2": 2.0}}}
    assert sweep.best_runs_per_device(table, "cifar")[0] == 4      # 8 is within 5% of 4
    k, why = sweep.best_runs_per_device(table, "lm")
    assert k == 1 and "Card" in why and "2: 2" in why
    assert sweep.best_runs_per_device({"device": "Card", "s_per_step": {}}, "cifar")[0] == 1
    assert sweep.best_runs_per_device(None, "lm")[0] == 1


def test_the_choice_and_the_slowdown_read_the_same_measurement_of_a_task():
    """A table holding two presets of a task: both readers take the first measured one."""
    table = {"device": "Card", "runs_per_hour": {
        "t3_ptb_lstm_per": {"task": "lm", "1": 6.0, "2": 6.9, "4": 6.8},
        "t3_ptb_lstm_rbn": {"task": "lm", "1": 1.0, "4": 30.0}}}
    assert sweep.runs_per_hour(table, "lm") == {1: 6.0, 2: 6.9, 4: 6.8}
    assert sweep.best_runs_per_device(table, "lm")[0] == 2
    assert sweep.concurrency_slowdown(table, "lm", 4)[0] == pytest.approx(4 * 6.0 / 6.8)


def test_the_slowdown_of_runs_at_once_is_measured_or_bounded_or_unknown():
    table = {"runs_per_hour": {"x": {"task": "lm", "steps": 20, "1": 6.0, "2": 6.6, "4": 6.8}}}
    assert sweep.concurrency_slowdown(table, "lm", 1) == (1.0, "")
    factor, how = sweep.concurrency_slowdown(table, "lm", 4)
    assert factor == pytest.approx(4 * 6.0 / 6.8) and how.endswith("measured")
    factor, how = sweep.concurrency_slowdown(table, "lm", 8)       # 8 not measured: no gain beyond 4
    assert factor == pytest.approx(8 * 6.0 / 6.8) and "from 4 at once measured" in how
    assert sweep.concurrency_slowdown(table, "cifar", 2)[0] is None
    assert sweep.concurrency_slowdown(None, "lm", 2)[0] is None


@pytest.mark.slow   # three DRY_RUN plans: about 25 s
def test_dry_run_prints_the_wall_clock_on_the_slots():
    # One LM preset, 4 lambdas x 40 seeds of equal length: 160 runs, whole rounds on 1, 4, 8 slots.
    repro = [sys.executable, str(ROOT / "scripts/reproduce.py"), "--sweep", "t3_ptb_lstm_per", "--seeds", "40",
             "--dry-run", "--step-table", "cuda-nvidia-h200", "--launcher", "pool"]
    plan = lambda *a: subprocess.run([*repro, *a], capture_output=True, text=True, check=True).stdout
    number = lambda pattern, out: float(re.search(pattern, out).group(1).replace(",", ""))
    wall = lambda out: number(r"all cells at once: ([\d,.]+) h", out)
    one = plan("--gpus", "0", "--runs-per-gpu", "1")
    total = number(r"estimated total: ([\d,.]+) device-hours", one)
    assert wall(one) == pytest.approx(total, abs=0.1)
    assert wall(plan("--gpus", "0,1,2,3", "--runs-per-gpu", "1")) == pytest.approx(total / 4, abs=0.1)
    # The LM's runs per hour at 4 at once (H200 table), none gained beyond: 8 at once on one GPU.
    crowded = plan("--gpus", "0", "--runs-per-gpu", "8")
    rates = json.loads((ROOT / "results/step_times/cuda-nvidia-h200.json").read_text())["runs_per_hour"]
    lm = next(r for r in rates.values() if r["task"] == "lm")
    assert "from 4 at once measured" in crowded
    assert wall(crowded) == pytest.approx(total * lm["1"] / lm["4"], abs=0.1)


def test_runs_per_gpu_auto_takes_this_devices_best_count(tmp_path, monkeypatch, capsys):
    reproduce = script_module("reproduce")
    monkeypatch.setattr(reproduce, "STEP_TIMES_DIR", tmp_path)
    phase = sweep.plan(["t1_cifar10_resnet56_per"], reproduce.compose, [0], [0], 5000)[0][1]
    args = reproduce.argparse.Namespace(gpus="0,1", runs_per_gpu="auto", launcher="pool", step_table=None,
                                        dry_run=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert reproduce.slots(args, "cifar") == ["CPU", "CPU"]                 # runs that find no GPU
    assert "no runs-per-hour measurement" in capsys.readouterr().out       # said once per task
    args.dry_run = True                                                      # a plan, here for GPUs
    assert reproduce.slots(args, "cifar") == ["GPU 0", "GPU 1"]             # no table: 1 per GPU
    monkeypatch.undo()
    monkeypatch.setattr(reproduce, "STEP_TIMES_DIR", tmp_path)
    here = runtime.device_info(runtime.resolve_device("auto"))
    (tmp_path / f"{here['slug']}.json").write_text(json.dumps({
        "device": "This box", "s_per_step": {},
        "runs_per_hour": {"x": {"task": "cifar", "1": 1.0, "2": 1.9, "4": 3.0}}}))
    reproduce._auto_runs_per_gpu.cache_clear()     # read once per task and process
    assert reproduce.slots(args, "cifar") == ["GPU 0"] * 4 + ["GPU 1"] * 4
    assert len(reproduce.slots(args, "cifar")) == 8
    assert capsys.readouterr().out.count("runs per GPU for cifar: 4") == 1
    args.runs_per_gpu = "3"
    assert len(reproduce.slots(args, "cifar")) == 6
    # A DRY_RUN from another device's table takes that table's count.
    _table(tmp_path / "cuda-card.json", "Card", {})
    table = json.loads((tmp_path / "cuda-card.json").read_text())
    (tmp_path / "cuda-card.json").write_text(json.dumps(
        {**table, "runs_per_hour": {"x": {"task": "cifar", "1": 1.0, "2": 1.5}}}))
    args.runs_per_gpu, args.step_table = "auto", "cuda-card"
    assert len(reproduce.slots(args, "cifar")) == 4
    assert reproduce.command(phase, args, "GPU 1")[-1] == "trainer.gpus=[1]"    # one run, its GPU
    assert "-m" not in reproduce.command(phase, args, "GPU 1")
    assert not any(a.startswith("trainer.gpus") for a in reproduce.command(phase, args, "CPU"))
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            reproduce.main(["--task", "cifar", "--dry-run", "--runs-per-gpu", bad])
    assert "expected 'auto' or a positive integer" in capsys.readouterr().err


def _tiny_lm(tmp_path) -> dict:
    cfg = compose_preset("t3_ptb_lstm_vanilla", ("model.hidden_size=16", "data.bptt=5", "optim.batch_size=2"))
    return on_generated_data(cfg, tmp_path, 4)


def _build_or_die(cfg: dict, device, autocast):
    """A task builder whose first caller (of all processes) dies at once, without a word."""
    try:
        with open(os.environ["PER_TEST_DIE_MARKER"], "x"):
            pass
    except FileExistsError:
        return BUILD["lm"](cfg, device, autocast)
    os._exit(9)


@pytest.mark.slow   # starts 5 processes that import torch: ~20 s
def test_concurrent_runs_report_their_joint_steps_per_second(tmp_path, monkeypatch):
    cfg = _tiny_lm(tmp_path)
    assert concurrent_steps_per_s(cfg, BUILD["lm"], torch.device("cpu"), 2, steps=3, warmup=1) > 0
    # One run dies without a word while the other waits for it: an error, not a hang.
    monkeypatch.setenv("PER_TEST_DIE_MARKER", str(tmp_path / "died"))
    with pytest.raises(RuntimeError, match=r"of 2 concurrent runs failed: exit codes .*9"):
        concurrent_steps_per_s(cfg, _build_or_die, torch.device("cpu"), 2, steps=1, warmup=0)
    cfg["model"]["hidden_size"] = -1            # a run fails to build: its error, not the barrier's
    with pytest.raises(RuntimeError, match="2 of 2 concurrent runs failed: (?!BrokenBarrier)"):
        concurrent_steps_per_s(cfg, BUILD["lm"], torch.device("cpu"), 2, steps=1, warmup=0)


@pytest.mark.slow   # a pytest collection, the tiny bench and one LM step time: about a minute
def test_gpu_check_script_writes_every_result_as_it_goes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PY": sys.executable, "BENCH_ARGS": "--tiny --device cpu",
           "STEP_ARGS": "--match ^t3_ptb_lstm_vanilla$ --steps 1 --warmup 0", "CONCURRENCY": ""}
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "torch" in (out / "versions.txt").read_text()
    assert "skipped" in (out / "pytest_gpu.txt").read_text() or torch.cuda.is_available()
    assert {json.loads(line)["bench"].split("/")[0] for line in (out / "bench.jsonl").read_text().splitlines()} == {
        "step", "compiled", "per_grad", "optimizer", "trainer", "epoch"}
    table = json.loads((out / "step_times.json").read_text())
    assert list(table["s_per_step"]) == list(table["s_per_eval_batch"]) == ["ptb|lstm||vanilla||"]
    only = tmp_path / "steps_only"
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), str(only)], cwd=ROOT,
                          env={**env, "PARTS": "steps", "STEP_OUT": str(tmp_path / "table.json")},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in only.iterdir()} == {"nvidia-smi.txt", "versions.txt", "step_times.log"}
    assert "ptb|lstm||vanilla||" in json.loads((tmp_path / "table.json").read_text())["s_per_step"]
    bad = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), str(tmp_path / "bad")], cwd=ROOT,
                         env={**env, "PARTS": "tests,step"}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown part 'step' in PARTS; valid: tests, bench, steps, profile" in bad.stderr
    for bad_only in ("epoch@", "@200", "epoch@2x"):   # refused before anything runs
        bad = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), str(tmp_path / "bad_only")], cwd=ROOT,
                             env={**env, "PARTS": "bench", "BENCH_ONLY": bad_only}, capture_output=True,
                             text=True, timeout=60)
        assert bad.returncode == 2 and "bad BENCH_ONLY group" in bad.stderr, bad_only
    bad = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), str(tmp_path / "bad_name")], cwd=ROOT,
                         env={**env, "PARTS": "tests,bench", "BENCH_ONLY": "lm@60;epoc,per_grad@200"},
                         capture_output=True, text=True, timeout=60)     # before the tests, too
    assert bad.returncode == 2 and "unknown bench section 'epoc' in BENCH_ONLY; valid: step,per_grad," in bad.stderr
    assert not (tmp_path / "bad_name" / "pytest_gpu.txt").exists()
    bad = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), str(tmp_path / "bad_glob")], cwd=ROOT,
                         env={**env, "PARTS": "bench", "BENCH_ONLY": "st*@60"}, capture_output=True, text=True,
                         timeout=60)     # a name, not a pattern
    assert bad.returncode == 2 and "unknown bench section 'st*'" in bad.stderr
    # The tests part is cut with SIGINT, on which pytest still prints its failures and summary.
    interrupted = tmp_path / "interrupted"
    interrupted.write_text(f"#!/bin/sh\ncase \"$*\" in *pytest*) exec {sys.executable} -c \"import time\n"
                           "try:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('summary on SIGINT')\";; esac\n"
                           f"exec {sys.executable} \"$@\"\n")
    interrupted.chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), str(tmp_path / "cut")], cwd=ROOT,
                          env={**env, "PY": str(interrupted), "PARTS": "tests", "TEST_S": "3"},
                          capture_output=True, text=True, timeout=60)
    assert "summary on SIGINT" in (tmp_path / "cut" / "pytest_gpu.txt").read_text(), proc.stderr[-2000:]
    for value in ("5m", "08", "0"):       # bash reads 08 as octal; 0 would read as "spent"
        bad = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), str(tmp_path / "bad_s")], cwd=ROOT,
                             env={**env, "TEST_S": value}, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and f"TEST_S={value}: expected whole seconds >= 1" in bad.stderr
    # TOTAL_S: a part's limit is cut to what is left less 15 s (a stand-in python that
    # sleeps: about 50 - 15 = 35 s instead of its 300), then a part with under 20 s left is skipped.
    sleeper = tmp_path / "sleeper"
    sleeper.write_text(f"#!/bin/sh\ncase \"$*\" in *bench.py*) exec sleep 100;; esac\nexec {sys.executable} \"$@\"\n")
    sleeper.chmod(0o755)
    started = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), str(tmp_path / "short")], cwd=ROOT,
                          env={**env, "PY": str(sleeper), "PARTS": "bench,steps", "BENCH_ONLY": "per_grad@300",
                               "TOTAL_S": "50"}, capture_output=True, text=True, timeout=120)
    took, said = time.monotonic() - started, proc.stdout + proc.stderr   # a part's output goes through its log
    assert proc.returncode == 1 and 33 < took < 48, (took, said[-3000:])
    assert said.count("skipped (TOTAL_S=50 spent): ") == 1 and "scripts/step_times.py" in said
    groups = tmp_path / "groups"        # BENCH_ONLY groups: one bench process and limit each
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), str(groups)], cwd=ROOT,
                          env={**env, "PARTS": "bench", "BENCH_ONLY": " per_grad@120 ;; epoch@1"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]   # epoch cut at 1 s
    benches = [json.loads(line)["bench"] for line in (groups / "bench.jsonl").read_text().splitlines()]
    assert benches and all(b.startswith("per_grad/") for b in benches)       # the first group's rows
    prof = tmp_path / "profile"
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), str(prof)], cwd=ROOT,
                          env={**env, "PARTS": "profile", "PROFILE_PRESETS": "t3_ptb_lstm_per:model.hidden_size=16",
                               "PROFILE_ARGS": "data.bptt=5 --steps 1 --warmup 1"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads((prof / "profile.jsonl").read_text())
    assert row["preset"] == "t3_ptb_lstm_per" and row["top"] and "ms of self CPU time per step" in proc.stdout
    assert row["overrides"] == ["model.hidden_size=16", "data.bptt=5"]     # preset:override entries


def test_profile_step_lists_the_ops_with_the_most_time(tmp_path):
    profile = script_module("profile_step")
    out = tmp_path / "profile.jsonl"
    over = ["model=resnet20", "data.batch_size=4", "++method.num_slices=16"]
    for _ in range(2):      # appends
        assert profile.main(["t1_cifar10_resnet56_per", *over, "--device", "cpu", "--steps", "1", "--warmup", "1",
                             "--top", "5", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["overrides"] == over and rows[0]["time"] == "self CPU time"
    assert rows[0]["wall_ms_per_step"] > 0 and "top_cpu" not in rows[0]    # the host list is the GPU's extra
    top = rows[0]["top"]
    assert len(top) == 5 and [r["ms_per_step"] for r in top] == sorted((r["ms_per_step"] for r in top), reverse=True)
    assert 0 < sum(r["ms_per_step"] for r in top) <= rows[0]["ms_per_step"] + 1e-3
    assert any("convolution" in r["op"] for r in top) and all(r["calls_per_step"] > 0 for r in top)


def test_interleaved_calls_take_turns_and_time_only_the_call():
    """One call of each function per round, warm-up rounds untimed, and an input's fetch
    (here a 50 ms sleep) outside the timed region."""
    calls = []

    def slow_inputs(k):
        while True:
            time.sleep(0.05)
            yield k

    fns = {"a": calls.append, "b": calls.append}
    times = interleaved_calls(fns, repeats=3, warmup=2, cuda=False,
                              inputs={k: slow_inputs(k) for k in fns})
    assert calls == ["a", "b"] * 5
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert max(max(v) for v in times.values()) < 0.04        # the 50 ms fetches are not timed
