"""The results pipeline as a user drives it: DRY_RUN plans, the ablation's plan, planned
steps against the built tasks, a real sweep on a pool of slots (one process per run) with
lambda selection, skipping of finished runs, the demo."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from experiments.common import compose_preset, preset_names
from per import sweep
from per.analysis.collect import lam_text
from per.data.cifar import write_fake_cifar
from per.data.corpus import Corpus, write_fake_corpus
from per.training.image_task import build_image_experiment
from per.training.lm_task import build_lm_experiment
from runner_utils import ROOT, compose_config, script_module

REPRO = [sys.executable, str(ROOT / "scripts/reproduce.py")]


def _grid(config_name: str, preset: str) -> list[float]:
    return compose_config(config_name, [f"experiment={preset}"], "x")["method"]["lam_grid"]


def _presets(prefixes: tuple[str, ...]) -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs/experiment").glob("*.yaml") if p.stem.startswith(prefixes))


def _planned_runs(stdout: str) -> int:
    return int(re.search(r"== .*?: (\d+) runs", stdout).group(1))


def test_dry_run_counts_match_presets():
    out = subprocess.run([*REPRO, "--task", "cifar", "--dry-run", "--seeds", "3"], capture_output=True,
                         text=True, check=True)
    # Images: one selection run per lambda (45k/5k) where the grid has several, then 3 seeds.
    expected = sum(3 + (len(g) if len(g) > 1 else 0)
                   for g in (_grid("train_cifar", p) for p in _presets(("t1_", "t2_"))))
    assert _planned_runs(out.stdout) == expected == 204
    out = subprocess.run([*REPRO, "--task", "lm", "--dry-run", "--seeds", "2"], capture_output=True,
                         text=True, check=True)
    expected = sum(2 * len(_grid("train_lm", p)) for p in _presets(("t3_",)))
    assert _planned_runs(out.stdout) == expected


@pytest.mark.parametrize("args, message", [
    (["--sweep", "t1_cifar10_resnet56_perr"], "did you mean t1_cifar10_resnet56_per"),
    (["--sweep", "t1_cifar10_resnet56_PER"], "did you mean t1_cifar10_resnet56_per,"),
    (["--sweep", "t1_cifar10_resnet56_per", "--lams", "1e-4,abc"], "expected comma-separated numbers"),
    (["--sweep", "t1_cifar10_resnet56_vanilla", "--lams", "1e-4"],
     "t1_cifar10_resnet56_vanilla: method 'vanilla' has no lambda to sweep (methods with one: l1, l2, per, vcl)"),
    (["--task", "cifar", "--seeds", "0"], "argument --seeds: expected a positive integer, got '0'"),
    (["--task", "cifar", "--select-seeds", "-1"], "argument --select-seeds: expected a positive integer"),
    (["--task", "cifar", "--val-size", "0"], "argument --val-size: expected a positive integer"),
    (["--task", "cifar", "--gpus", "a,b"], "argument --gpus: expected comma-separated GPU ids"),
    (["--sweep", "t1_cifar10_resnet56_per", "--override", "trainer.precision=fp16"],
     "trainer.precision='fp16': expected one of fp32, tf32, bf16"),
    (["--sweep", "t1_cifar10_resnet56_per", "--override", "trainer.max_step=2"],
     "Could not override 'trainer.max_step'"),
    (["--sweep", "t1_cifar10_resnet56_per", "--override", "+trainer.max_step=2"],
     "trainer.max_step=2: not a key of this config (added on the command line; nothing reads it); did you "
     "mean trainer.max_steps"),
])
def test_a_bad_plan_stops_before_planning(args, message):
    """Bad presets, lambdas and override values stop DRY_RUN too (not the first job)."""
    out = subprocess.run([*REPRO, *args, "--dry-run"], capture_output=True, text=True)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr
    assert "runs" not in out.stdout          # no plan printed


@pytest.mark.slow
def test_sweep_selects_on_validation_then_trains_seeds_and_skips_finished(tmp_path):
    data, runs = tmp_path / "data", tmp_path / "runs"
    write_fake_cifar(data, "cifar10", n_train=320, n_test=64, seed=0, noise=150.0)
    cmd = [*REPRO, "--sweep", "t1_cifar10_resnet56_per", "--lams", "1e-2,1e-4", "--seeds", "2",
           "--val-size", "64", "--runs", str(runs), "--launcher", "pool", "--gpus", "0",
           "--runs-per-gpu", "2"]
    for o in ("model=resnet20", f"data.root={data}", "data.verify_checksums=false", "trainer.device=cpu",
              "logger.mode=disabled", "trainer.epochs=1", "data.batch_size=32", "data.eval_batch_size=64",
              "++method.num_slices=16", "trainer.progress=false"):
        cmd += ["--override", o]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    select = {lam: json.loads((runs / f"cifar/t1_cifar10_resnet56_per-val64/lam={lam},seed=0/summary.json")
                              .read_text()) for lam in ("0.01", "0.0001")}
    assert all(s["status"] in ("finished", "diverged") for s in select.values())
    finished = {lam: s["final"]["val_error"] for lam, s in select.items() if s["status"] == "finished"}
    chosen = min(finished, key=lambda lam: (finished[lam], float(lam)))
    assert f"lambda = {float(chosen):g} (validation)" in first.stdout
    final = sorted((runs / "cifar/t1_cifar10_resnet56_per").iterdir())
    assert [d.name for d in final] == [f"lam={chosen},seed=0", f"lam={chosen},seed=1"]
    assert all(json.loads((d / "summary.json").read_text())["status"] == "finished" for d in final)
    assert (tmp_path / "tables/T1.md").exists() and (tmp_path / "figures/losses_1d.png").exists()
    # Each run's output is in its log; the pool ran both selection runs at once (2 slots).
    logs = tmp_path / "logs/cifar"
    log = (logs / "t1_cifar10_resnet56_per-val64/lam=0.01,seed=0.log").read_text()
    assert log.startswith("=== ")
    assert f", {max(1, os.cpu_count() // 2)} torch threads)" in log     # 2 runs at once share the cores
    assert (logs / f"t1_cifar10_resnet56_per/lam={float(chosen):g},seed=1.log").exists()
    starts = [line for line in first.stdout.splitlines() if " start " in line]
    assert len(starts) == 4 and "(2 of 2 slots busy)" in starts[1]

    mtimes = {p: p.stat().st_mtime for p in runs.rglob("summary.json")}
    again = subprocess.run(cmd + ["--no-report"], capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in runs.rglob("summary.json")} == mtimes
    # The relaunch started nothing: every run held its result.
    assert " start " not in again.stdout


@pytest.mark.slow
def test_the_local_launcher_runs_a_multirun_in_this_terminal(tmp_path):
    data, runs = tmp_path / "data", tmp_path / "runs"
    write_fake_cifar(data, "cifar10", n_train=96, n_test=32, seed=0)
    cmd = [*REPRO, "--sweep", "t1_cifar10_resnet56_vanilla", "--seeds", "2", "--runs", str(runs), "--no-report"]
    for o in ("model=resnet20", f"data.root={data}", "data.verify_checksums=false", "trainer.device=cpu",
              "logger.mode=disabled", "trainer.epochs=1", "data.batch_size=32", "trainer.progress=false"):
        cmd += ["--override", o]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "experiments/train_cifar.py -m experiment=t1_cifar10_resnet56_vanilla method.lam=0 seed=0,1" in out.stdout
    assert "epoch 1/1" in out.stdout                     # the runs' own lines, in this terminal
    assert len(list(runs.rglob("summary.json"))) == 2 and not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_a_failed_run_does_not_stop_the_others_and_the_tables_are_written(tmp_path):
    import fcntl
    data, runs = tmp_path / "data", tmp_path / "runs"
    write_fake_cifar(data, "cifar10", n_train=96, n_test=32, seed=0)
    cmd = [*REPRO, "--sweep", "t1_cifar10_resnet56_vanilla", "--seeds", "2", "--runs", str(runs),
           "--launcher", "pool", "--runs-per-gpu", "1"]
    for o in ("model=resnet20", f"data.root={data}", "data.verify_checksums=false", "trainer.device=cpu",
              "logger.mode=disabled", "trainer.epochs=1", "data.batch_size=32", "trainer.progress=false"):
        cmd += ["--override", o]
    # Seed 0's folder is held by this process: that run is refused (exit 2, a user error); seed 1 trains.
    held = runs / "cifar/t1_cifar10_resnet56_vanilla/lam=0,seed=0"
    held.mkdir(parents=True)
    with open(held / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0
    assert "[reproduce] stopped: 1 run failure: t1_cifar10_resnet56_vanilla lam=0 seed=0 exited with 2" in out.stderr
    assert "report:" not in out.stderr                     # the tables and figures were written
    assert json.loads((held.parent / "lam=0,seed=1/summary.json").read_text())["status"] == "finished"
    assert (tmp_path / "tables/T1.md").exists()
    log = tmp_path / "logs/cifar/t1_cifar10_resnet56_vanilla/lam=0,seed=0.log"
    assert f"is in use by process {os.getpid()}" in log.read_text()


def test_gpu_ids_are_checked_where_cuda_is(monkeypatch):
    import runpy
    unknown = runpy.run_path(str(ROOT / "scripts/reproduce.py"))["_unknown_gpus"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert unknown("0,1") == [] and unknown("0,2,x") == ["2", "x"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert unknown("5") == []                      # no CUDA: runs take the CPU


def test_slurm_without_its_hydra_plugin_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    """`--launcher slurm` needs the `slurm` extra; without it each multirun failed with
    Hydra's "Could not find 'hydra/launcher/submitit_slurm'" in its log."""
    repro = script_module("reproduce")
    real = repro.importlib.util.find_spec
    monkeypatch.setattr(repro.importlib.util, "find_spec",
                        lambda name, *a: None if name == repro.SUBMITIT_PLUGIN else real(name, *a))
    args = ["--sweep", "t1_cifar10_resnet56_per", "--launcher", "slurm", "--runs", str(tmp_path / "runs")]
    with pytest.raises(SystemExit):
        repro.main(args)
    assert "pip install -e '.[slurm]'" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    assert repro.main([*args, "--dry-run"]) == 0        # planning needs no plugin


def test_a_failed_report_script_is_named_in_one_line_not_a_traceback():
    import runpy
    run = runpy.run_path(str(ROOT / "scripts/reproduce.py"))["_run"]
    assert run([sys.executable, "-c", "import sys; sys.exit(3)"]) == "-c exited with 3 (its output above says why)"
    assert run([sys.executable, "-c", "pass"]) is None


def test_a_phase_launches_only_its_runs_without_a_result(tmp_path, capsys):
    preset = sweep.Preset("t1_cifar10_resnet56_per", compose_preset("t1_cifar10_resnet56_per",
                                                                  (f"paths.runs_dir={tmp_path}",)))
    phase = sweep.Phase(preset, (), [1e-4, 3e-5, 0.0], [0, 1])
    assert phase.run_dir(0.0, 1).name == "lam=0,seed=1"          # as Hydra names it: 0 is an int
    assert phase.run_dir(1e-4, 0).name == "lam=0.0001,seed=0"
    for (lam, seed), status in {(1e-4, 0): "finished", (1e-4, 1): "diverged", (3e-5, 0): "finished",
                                (3e-5, 1): "running", (0.0, 0): "finished"}.items():
        phase.run_dir(lam, seed).mkdir(parents=True)
        (phase.run_dir(lam, seed) / "summary.json").write_text(json.dumps({"status": status}))
        stored = {**preset.cfg, "seed": seed, "method": {**preset.cfg["method"], "lam": lam}}
        (phase.run_dir(lam, seed) / "config.yaml").write_text(yaml.safe_dump(stored))
    (phase.run_dir(0.0, 1).mkdir(parents=True))
    (phase.run_dir(0.0, 1) / "summary.json").write_text('{"status": "fini')        # cut by a kill
    todo = phase.pending()
    assert [(p.lams, p.seeds) for p in todo] == [([3e-5, 0.0], [1])]          # one multirun
    assert "method.lam=3e-05,0" in todo[0].hydra_args() and "seed=1" in todo[0].hydra_args()
    # A run of another config, or resume=never, is left to the entry point (refuse, or rerun).
    changed = {**preset.cfg, "seed": 0, "method": {**preset.cfg["method"], "lam": 1e-4},
               "optim": {**preset.cfg["optim"], "lr": 0.5}}
    (phase.run_dir(1e-4, 0) / "config.yaml").write_text(yaml.safe_dump(changed))
    assert (1e-4, 0) not in phase.done() and (3e-5, 0) in phase.done()
    never = sweep.Preset(preset.name, {**preset.cfg, "resume": "never"})
    assert dataclasses.replace(phase, preset=never).done() == set()
    # A run written before a key existed is its own where the key's value is the preset's
    # (with the preset's defaults, as the runner compares), not foreign.
    older = {**preset.cfg, "seed": 0, "method": {**preset.cfg["method"], "lam": 3e-5},
             "trainer": {k: v for k, v in preset.cfg["trainer"].items() if k != "limit_eval_batches"}}
    (phase.run_dir(3e-5, 0) / "config.yaml").write_text(yaml.safe_dump(older))
    assert phase.run_dir(3e-5, 0) in phase.foreign()                       # without defaults
    phase = dataclasses.replace(phase, preset=sweep.Preset(preset.name, preset.cfg,
                                                           alone=lambda: compose_preset(preset.name)))
    assert (3e-5, 0) in phase.done() and phase.run_dir(3e-5, 0) not in phase.foreign()
    # DRY_RUN names the folders a launch would refuse (the run of another config).
    assert phase.foreign() == [phase.run_dir(1e-4, 0)] and dataclasses.replace(phase, preset=never).foreign() == []
    sweep.print_plan([(None, phase)], "t", tmp_path / "no-tables")
    out = capsys.readouterr().out
    assert "WARNING: 1 run folders hold a run of another config" in out and str(phase.run_dir(1e-4, 0)) in out
    # A final phase, whose lambda is chosen later, at every lambda of its selection's grid.
    elsewhere = sweep.Preset(preset.name, {**preset.cfg, "run_dir": str(tmp_path / "sel/x")})
    select = dataclasses.replace(phase, preset=elsewhere, selection=True)
    sweep.print_plan([(select, dataclasses.replace(phase, lams=[]))], "t", tmp_path / "no-tables")
    out = capsys.readouterr().out
    assert "WARNING: 1 run folders hold a run of another config" in out and str(phase.run_dir(1e-4, 0)) in out


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts/demo.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "not a reproduction" in out.stdout
    assert {p.name for p in (tmp_path / "runs/cifar").iterdir()} == {       # not the ResNet-56 presets' names
        f"demo_cifar10_resnet20_{m}" for m in ("vanilla", "bn", "l2", "per", "l2-val192", "per-val192")}
    table = (tmp_path / "tables/T1.md").read_text()
    for method in ("vanilla", "bn", "l2", "per"):
        assert f"| {method} |" in table
    figures = {p.name for p in (tmp_path / "figures").iterdir()}
    assert {"losses_1d.png", "losses_1d.pdf"} <= figures
    assert any(f.startswith("sw1_") for f in figures) and any(f.startswith("activations_") for f in figures)


def test_ablation_plans_each_layout_x_reduction_preset_then_each_slice_count(tmp_path, caplog):
    presets = ("t1_cifar10_resnet56_per",
               *(n for n in preset_names("ablation_resnet56_*") if n != sweep.ABLATION_SLICES))
    compose = lambda n, o: sweep.Preset(n, compose_preset(n, o))  # noqa: E731
    caplog.set_level(logging.INFO, logger="per.sweep")
    phases = sweep.plan_ablation(compose, preset_names(), [0, 1], [0], 5000, (f"paths.runs_dir={tmp_path}",),
                                 presets=(*presets, "ablation_resnet56_not_there"))
    err = caplog.text
    assert "ablation_resnet56_not_there" in err
    # 256 slices is Table 1's PER cell: its runs serve the slice sweep too, trained once.
    assert f"{sweep.ABLATION_SLICES} at 256 slices: the runs of t1_cifar10_resnet56_per" in err
    slices = [s for s in compose(sweep.ABLATION_SLICES, ()).cfg["method"]["slices_grid"] if s != 256]
    assert [final.preset.name for _, final in phases] == [*presets, *[sweep.ABLATION_SLICES] * len(slices)]
    for select, final in phases:     # selection on 45k/5k, reported seeds on 50k, in the runs folder
        assert select.selection and select.preset.cfg["data"]["val_size"] == 5000
        assert select.preset.cell_dir.name.endswith("-val5000") and select.preset.cell_dir.parent == tmp_path / "cifar"
        assert final.preset.cfg["data"]["val_size"] == 0 and final.seeds == [0, 1] and final.lams == []
    assert [final.preset.cfg["method"]["num_slices"] for _, final in phases[len(presets):]] == slices
    assert len({select.preset.cell_dir for select, _ in phases}) == len(phases)


def test_planned_batches_per_epoch_are_the_built_tasks(tmp_path, monkeypatch):
    """The planner counts batches without reading data; the same count as the task the
    runner builds, on generated data of known size."""
    write_fake_cifar(tmp_path, "cifar10", n_train=330, n_test=16)
    cfg = compose_preset("t1_cifar10_resnet56_per", (f"data.root={tmp_path}", "data.verify_checksums=false",
                                                     "data.val_size=64", "data.batch_size=32"))
    monkeypatch.setattr(sweep, "TRAIN_SIZE", 330)
    monkeypatch.setattr(sweep, "TEST_SIZE", 16)
    cfg["data"]["eval_batch_size"] = 10
    task = build_image_experiment(cfg, torch.device("cpu"), contextlib.nullcontext).task
    assert sweep.batches_per_epoch(cfg) == task.batches_per_epoch() == 9   # Fixup keeps the last 10
    assert sweep.eval_batches_per_epoch(cfg) == task.eval_batches() == 7 + 2      # 64 held out, 16 test
    cfg = compose_preset("t2_cifar10_elu_vcl", (f"data.root={tmp_path}", "data.verify_checksums=false",
                                                "data.val_size=64", "data.batch_size=32"))
    task = build_image_experiment(cfg, torch.device("cpu"), contextlib.nullcontext).task
    assert sweep.batches_per_epoch(cfg) == task.batches_per_epoch() == 8   # the VCL code drops them

    write_fake_corpus(tmp_path, "ptb", n_train_lines=300)
    cfg = compose_preset("t3_ptb_lstm_per", (f"data.root={tmp_path}", "data.verify_checksums=false",
                                             "model.hidden_size=8"))
    task = build_lm_experiment(cfg, torch.device("cpu"), contextlib.nullcontext).task
    corpus = Corpus(tmp_path, "ptb", verify_checksums=False)
    monkeypatch.setattr(sweep, "EXPECTED_COUNTS", {"ptb": (0, corpus.train.numel(), corpus.val.numel(),
                                                           corpus.test.numel())})
    assert sweep.batches_per_epoch(cfg) == task.batches_per_epoch()
    assert sweep.eval_batches_per_epoch(cfg) == task.eval_batches() > 0



def test_a_shortened_run_is_planned_with_the_evaluations_it_makes():
    """`trainer.max_steps` stops in the first epoch (one evaluation, not the protocol's
    40), and `trainer.limit_eval_batches` caps each split's batches."""
    cfg = compose_preset("t3_ptb_lstm_per")
    assert sweep.evals_per_run(cfg) == cfg["optim"]["epochs"] * sweep.eval_batches_per_epoch(cfg)
    short = compose_preset("t3_ptb_lstm_per", ("trainer.max_steps=3", "trainer.limit_eval_batches=1"))
    assert sweep.eval_batches_per_epoch(short) == 2 and sweep.evals_per_run(short) == 2


def test_a_lambda_is_passed_on_the_command_line_short_and_exact():
    """`--lams=1.2345678e-4` must launch that lambda, not 0.000123457 (whose runs would
    never count as done)."""
    assert [lam_text(lam) for lam in (0.0, 1e-4, 3e-5, 2.5e-6)] == ["0", "0.0001", "3e-05", "2.5e-06"]
    for lam in (1.2345678e-4, 2 / 3, 1e-4 + 1e-12):
        assert float(lam_text(lam)) == lam


def test_the_plan_lists_each_phases_lambdas_so_a_grid_override_shows():
    out = subprocess.run([*REPRO, "--sweep", "t1_cifar10_resnet56_l2", "--override", "method.lam_grid=[1e-7,3e-8]",
                          "--dry-run"], capture_output=True, text=True, check=True)
    select = next(line for line in out.stdout.splitlines() if " select " in line)
    final = next(line for line in out.stdout.splitlines() if " final " in line)
    assert select.endswith("  1e-07,3e-08") and final.endswith("  chosen in select")


def test_a_reproduction_whose_report_would_overwrite_the_suites_is_refused_before_training(tmp_path):
    """RUNS=results/<trial> puts the tables in results/tables: refused at once, not after
    the training, unless there is no report."""
    runs = ROOT / "results" / "trial-that-does-not-exist"
    out = subprocess.run([*REPRO, "--sweep", "t1_cifar10_resnet56_per", "--runs", str(runs), "--dry-run"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "refusing to write the report of" in out.stderr and "runs" not in out.stdout
    out = subprocess.run([*REPRO, "--sweep", "t1_cifar10_resnet56_per", "--runs", str(runs), "--dry-run",
                          "--no-report"], capture_output=True, text=True)
    assert out.returncode == 0 and not runs.exists()


def test_a_plan_counts_the_final_runs_of_a_settled_selection(tmp_path, capsys):
    """Re-planning a half-finished reproduction: where a cell's selection holds every result,
    its lambda is known and the final runs that hold a result are done, not work left."""
    from per.schema import VAL_ERROR, TEST_ERROR, cell_of
    runs = tmp_path / "runs"

    def compose(name, overrides):
        return sweep.Preset(name, compose_preset(name, overrides))
    [(select, final)] = sweep.plan(["t1_cifar10_resnet56_per"], compose, [0, 1], [0], 5000, [1e-4, 3e-5],
                                   overrides=(f"paths.runs_dir={runs}",))

    def write(phase, lam, seed, metrics):
        run_dir = phase.run_dir(lam, seed)
        run_dir.mkdir(parents=True)
        cfg = {**phase.preset.cfg, "seed": seed, "method": {**phase.preset.cfg["method"], "lam": lam}}
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
        (run_dir / "summary.json").write_text(json.dumps(
            {"status": "finished", "task": "cifar", "cell": cell_of(cfg), "lam": lam, "seed": seed,
             "epochs_completed": 200, "steps": 70400, "wall_time_s": 1.0, "device": "cpu", "code_version": "x",
             "versions": {}, "final": metrics, "best": metrics}))
    assert sweep.with_settled_choices([(select, final)])[0][1].lams == []       # selection not done
    write(select, 1e-4, 0, {VAL_ERROR: 6.0, TEST_ERROR: 9.0})
    write(select, 3e-5, 0, {VAL_ERROR: 7.0, TEST_ERROR: 5.0})
    for seed in (0, 1):
        write(final, 1e-4, seed, {TEST_ERROR: 6.5})
    [(_, settled)] = sweep.with_settled_choices([(select, final)])
    assert settled.lams == [1e-4] and settled.done() == {(1e-4, 0), (1e-4, 1)} and final.lams == []
    # A folder the run table cannot read whole: the plan goes on, the launch will say why.
    odd = select.run_dir(3e-5, 7)
    shutil.copytree(select.run_dir(3e-5, 0), odd)
    summary = json.loads((odd / "summary.json").read_text())
    (odd / "summary.json").write_text(json.dumps({**summary, "seed": 7, "epochs_completed": 1.5}))
    assert sweep.with_settled_choices([(select, final)])[0][1].lams == []
    shutil.rmtree(odd)
    sweep.print_plan([(select, settled)], "t", ROOT / "results/step_times", "cuda-nvidia-h200")
    out = capsys.readouterr().out
    assert "4 runs hold a result already" in out and "estimated total: 0.0 device-hours" in out
    # A table that times none of the plan's configurations gives no total, not 0.
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables/x.json").write_text(json.dumps({"device": "X", "s_per_step": {}}))
    sweep.print_plan([(select, final)], "t", tmp_path / "tables", "x")
    assert "estimated total: ? device-hours on X" in capsys.readouterr().out


def test_a_plan_marks_hours_from_step_times_the_table_marks_stale(tmp_path, capsys):
    """A row measured before a change of the code it times is marked `!` where it is used,
    as is an estimate from it; `step_times.py` measuring it again clears the mark."""
    def phase(name):
        return sweep.Phase(sweep.Preset(name, compose_preset(name)), (), [1e-4], [0])
    elu, relu = phase("t2_cifar10_elu_per"), phase("t2_cifar10_relu_per")
    key = sweep.step_time_key(elu.preset.cfg)
    (tmp_path / "x.json").write_text(json.dumps({"device": "X", "s_per_step": {key: 0.157},
                                                 "stale": {key: "measured before the fix"}}))
    sweep.print_plan([(None, elu), (None, relu)], "t", tmp_path, "x")
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "t2_cifar10_" in line]
    assert "!1.4" in rows[0] and "!~1.4" in rows[1]
    assert f"! = from a step time the table marks stale, {key}: measured before the fix" in out
