"""Reproduce the paper's tables: plan and launch the runs, choose lambda honestly,
then write tables and figures.

Images (Tables 1-2): every lambda of a cell's grid is trained on 45k images with 5k
held out (`data.val_size=5000`); the lambda with the lowest mean final validation
error is then trained on all 50k with `--seeds` seeds, and the table reports their
final-epoch test error. Language models (Table 3): every lambda x seed; lambda is
chosen on validation perplexity and the table reports the test perplexity of the
best-validation checkpoint. All cells run at once on the launcher's slots (`per.parallel`:
one process per run on GPU slots, or Hydra multiruns through the basic or submitit
launcher); finished runs are skipped and interrupted ones resume.

    python scripts/reproduce.py --task cifar [--dry-run]
    python scripts/reproduce.py --sweep t1_cifar10_resnet56_per --lams 1e-4,3e-5
    python scripts/reproduce.py --ablation

The planner is `per.sweep`; presets are composed by `experiments.common`.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from experiments.common import (ENTRY, check_report_folder, compose_preset, group_choices, preset_names, preset_task,
                                suite_paths)
from per import parallel, sweep
from per.analysis.collect import lam_text
from per.analysis.strength import BAND, FAMILIES, STRENGTH_CSV, off_band
from per.schema import REGULARIZED, SELECTION_VAL_SIZE, TASKS
from per.training.checks import validate

ROOT = Path(__file__).resolve().parents[1]
PATHS = suite_paths()
STEP_TIMES_DIR = ROOT / PATHS["step_times_dir"]   # <device slug>.json, written by scripts/step_times.py
TABLE_PRESET = re.compile(r"t\d+_")                 # t1_..., t2_..., t3_...: the paper's table cells


@functools.cache
def _alone(name: str) -> dict:
    """Preset `name` without command-line values (a resume's defaults)."""
    return compose_preset(name)


def compose(name: str, overrides: tuple[str, ...]) -> sweep.Preset:
    """Preset `name` with `overrides`, every value checked as a run would check it (so a
    bad value, or a key added that nothing reads or removed that the run needs, stops a
    `DRY_RUN` plan too); an error exits naming it."""
    try:
        cfg = compose_preset(name, overrides)
        groups = tuple(group_choices(overrides))
        edits = any(o.startswith(("+", "~")) and o not in groups for o in overrides)   # add or remove keys
        validate(cfg, (compose_preset(name, groups) if groups else _alone(name)) if edits else None)
        return sweep.Preset(name, cfg, alone=functools.partial(_alone, name))
    except ValueError as e:
        raise SystemExit(f"{name}: {e}") from None
    except (HydraException, OmegaConfBaseException) as e:   # a misspelt key or group in OVERRIDES
        raise SystemExit(f"{name} with overrides {' '.join(overrides) or '(none)'}: {e}") from None


def command(unit: sweep.Phase, args, slot: str | None = None) -> list[str]:
    """The entry point's command for `unit`: one run on the pool's `slot` (`GPU <id>`: on
    that GPU), or a multirun through Hydra's basic (local) or submitit (slurm) launcher."""
    entry = [sys.executable, str(ROOT / "experiments" / f"{ENTRY[unit.preset.task]}.py")]
    if slot is not None:
        gpu = [f"trainer.gpus=[{slot.removeprefix('GPU ')}]"] if slot.startswith("GPU ") else []
        return [*entry, *unit.hydra_args(), *gpu]
    return [*entry, "-m", *unit.hydra_args(), *(["launcher=slurm"] if args.launcher == "slurm" else [])]


def _lams_arg(text: str) -> list[float]:
    try:
        lams = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 1e-4,3e-5; got {text!r}") from None
    if not all(math.isfinite(lam) and lam >= 0 for lam in lams):
        raise argparse.ArgumentTypeError(f"lambdas must be finite numbers >= 0; got {text!r}")
    return lams


def runs_per_gpu(args, task: str) -> int:
    """`--runs-per-gpu`, or for "auto" the best measured count for `task` in this machine's
    device's table, or `--step-table`'s where given (`per.sweep.best_runs_per_device`; 1
    without a measurement), said once per task."""
    if args.runs_per_gpu != "auto":
        return int(args.runs_per_gpu)
    return _auto_runs_per_gpu(task, args.step_table)


@functools.lru_cache(maxsize=None)
def _auto_runs_per_gpu(task: str, table_name: str | None = None) -> int:
    table = (sweep.step_time_table(STEP_TIMES_DIR, table_name)[0] if table_name
             else sweep.device_table(STEP_TIMES_DIR))
    k, why = sweep.best_runs_per_device(table, task)
    print(f"[reproduce] runs per GPU for {task}: {k} ({why})", flush=True)
    return k


def _positive_int(value: str) -> int:
    if not (value.strip().isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def _gpus_arg(value: str) -> str:
    if not all(g.isdigit() for g in value.split(",")):
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU ids (integers >= 0), e.g. 0,1; got {value!r}")
    return value


def _runs_per_gpu_arg(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {value!r}")
    return value


def slots(args, task: str) -> list[str]:
    """One label per unit running at once: each GPU of `--gpus` `runs_per_gpu` times (the
    pool; `CPU` for each where a run would find no GPU), `--slurm-multiruns` multiruns in
    flight (slurm), one multirun (local)."""
    if args.launcher == "pool":
        import torch
        here = "GPU {}" if torch.cuda.is_available() or args.dry_run else "CPU"    # a plan may be for GPUs
        return [here.format(g) for g in args.gpus.split(",") for _ in range(runs_per_gpu(args, task))]
    if args.launcher == "slurm":
        return ["SLURM"] * args.slurm_multiruns
    return ["this machine"]


def execute(phases: list, args) -> list[str]:
    """Run the plan's runs without a result, every cell at once on the slots (`per.parallel`):
    a cell's final runs start once its selection has chosen lambda. A failed run holds back
    only its cell's final runs (if it was a selection run); the rest goes on. Returns the
    failures; a stop signal exits."""
    table, _ = sweep.step_time_table(STEP_TIMES_DIR, args.step_table)
    split = parallel.each_run if args.launcher == "pool" else parallel.each_multirun
    sched = parallel.Scheduler(phases, split, _choose, sweep.unit_seconds(table))
    if args.launcher != "local":
        print(f"[reproduce] each unit's output: {_logs(args)}/<task>/<cell>/lam=...,seed=....log", flush=True)
    labels = slots(args, phases[0][1].preset.task)
    stop = parallel.launch(sched, labels, functools.partial(_start, args=args, at_once=len(labels)),
                           say=lambda line: print(f"[reproduce] {time.strftime('%H:%M:%S')} {line}", flush=True),
                           describe=_describe)
    if stop:
        failed = "".join(f"\n[reproduce] failed meanwhile: {why}" for why in sched.failures)
        raise SystemExit(f"[reproduce] stopped by {signal.Signals(stop).name}; the same command resumes "
                         "(finished runs are not run again)" + failed)
    return sched.failures


def strength_warnings(phases: list, strength_csv: Path) -> list[str]:
    """One line per planned regularized preset whose own lambda (`method.lam`) is
    planned and measured by `make strength` (`strength_csv`) outside `BAND` on the same
    model, or unmeasured beyond a measured lambda already outside it
    (`per.analysis.strength.off_band`); [] without the file."""
    if not strength_csv.is_file():
        return []
    df = pd.read_csv(strength_csv)
    presets, planned = {}, {}              # name -> preset, and its planned lambdas
    for ph in (ph for pair in phases for ph in pair if ph is not None):
        presets[ph.preset.name] = ph.preset
        planned.setdefault(ph.preset.name, []).extend(ph.lams)
    lines = []
    for name, preset in presets.items():
        cfg = preset.cfg
        kind, lam = cfg["method"]["name"], cfg["method"]["lam"]
        if kind not in REGULARIZED or not any(math.isclose(lam, p, rel_tol=1e-9) for p in planned[name]):
            continue
        for fam in FAMILIES:
            base = _alone(fam.base)
            if kind in fam.grids and base["model"] == cfg["model"]:
                layout = cfg["method"]["layout"] if cfg["task"] == "cifar" else "-"
                if where := off_band(df, fam.name, kind, layout, cfg["method"]["reduction"], lam):
                    lines.append(f"{name}: λ={lam_text(lam)} on {fam.name} (measured on "
                                 f"{base['data']['name']}): {where}")
    return lines


def print_wall_clock(phases: list, args) -> None:
    """DRY_RUN's wall clock: the plan on `slots` as `execute` would order it (`parallel.simulate`),
    each run's device time from the step-time table, stretched by the measured slowdown of
    running `runs_per_gpu` at once on a GPU."""
    table, _ = sweep.step_time_table(STEP_TIMES_DIR, args.step_table)
    if table is None or args.launcher == "slurm":
        return                                # SLURM's queue decides it
    if any(sweep.phase_seconds(ph, table)[0] is None for pair in phases for ph in pair if ph is not None):
        print("   wall clock: ? (configurations without a step time)")
        return
    task = phases[0][1].preset.task
    labels = slots(args, task)
    slowdown, how = sweep.concurrency_slowdown(table, task, labels.count(labels[0]))
    if slowdown is None:
        print(f"   wall clock: ? ({how}; `make step-times CONCURRENCY=1,2,4,8` measures it)")
        return
    seconds = sweep.unit_seconds(table)
    # A final phase whose lambda is settled waits on nothing: its runs without a result alone.
    chains = [(None, final) if select is not None and final.lams else (select, final) for select, final in phases]
    wall = parallel.simulate(chains, len(labels), lambda unit: seconds(unit) * slowdown) / 3600
    if args.launcher == "local":
        print(f"   wall clock, one multirun at a time: {wall:,.1f} h")
    else:
        gpus = args.gpus.count(",") + 1
        print(f"   wall clock on {len(labels)} slot{'s' * (len(labels) > 1)} ({gpus} GPU{'s' * (gpus > 1)}), "
              f"all cells at once: {wall:,.1f} h" + (f" ({how})" if how else ""))


def _choose(select: sweep.Phase) -> float:
    lam = sweep.chosen_lambda(select)
    print(f"[reproduce] {select.preset.name}: lambda = {lam:g} (validation)", flush=True)
    return lam


def _lams_seeds(unit: sweep.Phase) -> tuple[str, str]:
    """The unit's lambdas and seeds as its command line gives them."""
    return ",".join(map(lam_text, unit.lams)), ",".join(map(str, unit.seeds))


def _describe(unit: sweep.Phase) -> str:
    lams, seeds = _lams_seeds(unit)
    return f"{unit.preset.cell_dir.name} lam={lams} seed={seeds}"


SUBMITIT_PLUGIN = "hydra_plugins.hydra_submitit_launcher"    # what `launcher=slurm` loads (the `slurm` extra)


def _logs(args) -> Path:
    return Path(args.runs).parent / "logs"


def _start(unit: sweep.Phase, slot: str, args, at_once: int) -> tuple[subprocess.Popen, str]:
    """Start `unit` on `slot` in a session of its own (a Ctrl-C reaches it once, through
    `parallel.launch`); its output goes to the terminal (local) or to a log file. The pool's
    `at_once` runs share this machine's cores: each gets `OMP_NUM_THREADS` = cores / runs
    (at least 1) unless the environment sets it."""
    cmd = command(unit, args, slot if args.launcher == "pool" else None)
    env = dict(os.environ)
    if args.launcher == "pool":
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // at_once)))
    if args.launcher == "local":
        print("[reproduce] " + " ".join(cmd), flush=True)
        return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True), "its output above"
    log = _logs(args) / unit.preset.task / unit.preset.cell_dir.name / "lam={},seed={}.log".format(*_lams_seeds(unit))
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        out.flush()
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return process, str(log)


def _unknown_gpus(gpus: str) -> list[str]:
    """Ids in `gpus` that name no CUDA device of this machine (none checked without CUDA:
    runs there take the CPU)."""
    import torch   # here: --help and DRY_RUN need no torch
    if not torch.cuda.is_available():
        return []
    return [g for g in gpus.split(",") if not (g.isdigit() and int(g) < torch.cuda.device_count())]


def _run(cmd: list[str]) -> str | None:
    """Run `cmd`: None when it succeeds, else one line saying it failed (its own output says why)."""
    print("[reproduce] " + " ".join(cmd), flush=True)
    if (code := subprocess.run(cmd, cwd=ROOT).returncode) != 0:
        return f"{Path(cmd[1]).name} exited with {code} (its output above says why)"
    return None


def _show_library_lines() -> None:
    """The planner's warnings and notes (`per.sweep`'s logger: a run of another config, a
    preset not generated yet) on stderr as this script's own lines, where the caller has
    not set up logging."""
    logging.basicConfig(format="[reproduce] %(message)s", stream=sys.stderr)
    logging.getLogger("per.sweep").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    _show_library_lines()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", choices=TASKS)
    what.add_argument("--sweep", metavar="PRESET", help="one preset's lambda sweep")
    what.add_argument("--ablation", action="store_true", help="ResNet-56 PER: layout x reduction, then slices")
    ap.add_argument("--lams", type=_lams_arg,
                    help="comma-separated lambdas (default: the preset's lam_grid)")
    ap.add_argument("--seeds", type=_positive_int, default=sweep.DEFAULT_SEEDS, help="seeds of the reported runs")
    ap.add_argument("--select-seeds", type=_positive_int, default=sweep.DEFAULT_SELECT_SEEDS,
                    help="seeds per lambda on the 45k/5k split")
    ap.add_argument("--gpus", type=_gpus_arg, default="0", help="comma-separated GPU ids (pool launcher)")
    ap.add_argument("--runs-per-gpu", type=_runs_per_gpu_arg, default="auto",
                    help="runs at once per GPU (pool launcher); auto: the best count measured "
                         "on this device by `scripts/step_times.py --concurrency`, else 1")
    ap.add_argument("--launcher", choices=["local", "pool", "slurm"], default="local",
                    help="local: one multirun at a time here; pool: --gpus x --runs-per-gpu runs at "
                         "once here, one process each; slurm: --slurm-multiruns submitit multiruns at once")
    ap.add_argument("--slurm-multiruns", type=_positive_int, default=8,
                    help="multiruns in flight at once under --launcher slurm (each submits its runs)")
    ap.add_argument("--runs", default=PATHS["runs_dir"],
                    help="root of the run directories; tables and figures go beside it")
    ap.add_argument("--val-size", type=_positive_int, default=SELECTION_VAL_SIZE,
                    help="images held out for lambda selection (another size: rows not compared with the paper)")
    ap.add_argument("--override", action="append", default=[],
                    help="Hydra override passed to every run (repeatable), e.g. trainer.precision=bf16")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--step-table", default=None, metavar="NAME",
                    help="device-hours from results/step_times/NAME.json (e.g. cuda-nvidia-h200) "
                         "instead of this machine's device's table")
    ap.add_argument("--no-report", action="store_true", help="skip tables and figures at the end")
    args = ap.parse_args(argv)
    if args.launcher == "slurm" and not args.dry_run and importlib.util.find_spec(SUBMITIT_PLUGIN) is None:
        ap.error("--launcher slurm needs Hydra's submitit launcher, which is not installed: "
                 "pip install -e '.[slurm]' (or '.[dev]')")
    if args.launcher == "pool" and (bad := _unknown_gpus(args.gpus)):
        import torch
        ap.error(f"--gpus {args.gpus}: no GPU {', '.join(bad)} here; valid: "
                 f"{', '.join(map(str, range(torch.cuda.device_count())))}")
    args.runs = str(Path(args.runs).resolve())
    if not args.no_report:       # before training: the report goes beside the runs (below)
        check_report_folder(args.runs, str(Path(args.runs).parent / "tables"), "tables_dir")
    seeds, select_seeds = list(range(args.seeds)), list(range(args.select_seeds))
    lams = args.lams

    over = (f"paths.runs_dir={args.runs}", *args.override)
    plan_args = (seeds, select_seeds, args.val_size)
    if args.task:
        names = [n for n in preset_names() if TABLE_PRESET.match(n) and preset_task(n) == args.task]
        phases = sweep.plan(names, compose, *plan_args, overrides=over)
        title = f"reproduce-{args.task}"
    elif args.sweep:
        try:
            phases = sweep.plan([args.sweep], compose, *plan_args, lams, overrides=over)
        except ValueError as e:
            ap.error(str(e))
        title = f"sweep {args.sweep}"
    else:
        phases = sweep.plan_ablation(compose, preset_names(), *plan_args, overrides=over)
        title = "ablation"
    settled = sweep.with_settled_choices(phases)      # final runs with a result count as done
    try:
        sweep.print_plan(settled, title, STEP_TIMES_DIR, args.step_table)
    except ValueError as e:
        ap.error(str(e))
    print_wall_clock(settled, args)
    if warnings := strength_warnings(phases, ROOT / PATHS["strength_dir"] / STRENGTH_CSV):
        print(f"   warning: measured by `make strength` ({PATHS['strength_dir']}/strength.md), the median site "
              f"grad_ratio at these presets' own lambda leaves {BAND[0]:g}..{BAND[1]:g}, or would (not measured, "
              "beyond a measured lambda outside it) (below: the penalty "
              "barely acts; inf: the task's gradient is zero at most sites, so the penalty alone moves them; "
              "see the README's \"Before you launch a full reproduction\"):\n     "
              + "\n     ".join(warnings))
    if args.dry_run:
        return 0
    failures = execute(phases, args)
    report = []
    if not args.no_report:   # also after failures: the tables mark what they lack
        results = Path(args.runs).parent     # results/runs -> results/{tables,figures}
        seed_args = {"aggregate.py": ["--seeds", str(args.seeds), "--select-seeds", str(args.select_seeds)]}
        report = [problem for script, dest in (("aggregate.py", "tables"), ("figures.py", "figures"))
                  if (problem := _run([sys.executable, str(ROOT / "scripts" / script), "--runs", args.runs,
                                       "--out", str(results / dest), *seed_args.get(script, [])]))]
    lines = []
    if failures:
        lines.append(f"{len(failures)} run failure{'s' * (len(failures) > 1)}: " + "; ".join(failures)
                     + ". Everything else ran; the same command runs again what has no result (a lambda "
                     "that diverged in every selection run stays so)")
    if report:
        lines.append("report: " + "; ".join(report))
    if lines:
        raise SystemExit("[reproduce] stopped: " + "\n[reproduce] stopped: ".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
