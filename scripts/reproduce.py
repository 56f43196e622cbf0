"""Reproduce the paper's tables: plan and launch the runs, choose lambda honestly,
then write tables and figures.

Images (Tables 1-2): every lambda of a cell's grid is trained on 45k images with 5k
held out (`data.val_size=5000`); the lambda with the lowest mean final validation
error is then trained on all 50k with `--seeds` seeds, and the table reports their
final-epoch test error. Language models (Table 3): every lambda x seed; lambda is
chosen on validation perplexity and the table reports the test perplexity of the
best-validation checkpoint. Runs go through Hydra multirun (basic, joblib or
submitit launcher); finished runs are skipped and interrupted ones resume.

    python scripts/reproduce.py --task cifar [--dry-run]
    python scripts/reproduce.py --sweep t1_cifar10_resnet56_per --lams 1e-4,3e-5
    python scripts/reproduce.py --ablation

The planner is `per.sweep`; presets are composed by `experiments.common`.
"""
from __future__ import annotations

import argparse
import functools
import math
import re
import subprocess
import sys
from pathlib import Path

from experiments.common import ENTRY, compose_plain, compose_preset, preset_names, preset_task
from per import sweep
from per.training.checks import validate

ROOT = Path(__file__).resolve().parents[1]
PATHS = compose_plain("train_cifar", [])["paths"]
STEP_TIMES_DIR = ROOT / PATHS["step_times_dir"]   # <device slug>.json, written by scripts/step_times.py
TABLE_PRESET = re.compile(r"t\d+_")                 # t1_..., t2_..., t3_...: the paper's table cells


def compose(name: str, overrides: tuple[str, ...]) -> sweep.Preset:
    """Preset `name` with `overrides`, every value checked as a run would check it (so a
    bad value stops a `DRY_RUN` plan too); an error exits naming it."""
    try:
        cfg = compose_preset(name, overrides)
        validate(cfg)
        return sweep.Preset(name, cfg)
    except ValueError as e:
        raise SystemExit(f"{name}: {e}") from None


def command(phase: sweep.Phase, args) -> list[str]:
    cmd = [sys.executable, str(ROOT / "experiments" / f"{ENTRY[phase.preset.task]}.py"), "-m",
           *phase.hydra_args()]
    gpus = args.gpus.split(",")
    if args.launcher == "joblib":
        cmd += ["launcher=joblib", f"hydra.launcher.n_jobs={len(gpus) * runs_per_gpu(args, phase.preset.task)}",
                "trainer.gpus=[" + ",".join(gpus) + "]"]
    elif args.launcher == "slurm":
        cmd.append("launcher=slurm")
    return cmd


def _lams_arg(text: str) -> list[float]:
    try:
        lams = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 1e-4,3e-5; got {text!r}") from None
    if not all(math.isfinite(lam) and lam >= 0 for lam in lams):
        raise argparse.ArgumentTypeError(f"lambdas must be finite numbers >= 0; got {text!r}")
    return lams


def runs_per_gpu(args, task: str) -> int:
    """`--runs-per-gpu`, or for "auto" the best measured count for `task` on this machine's
    device (`per.sweep.best_runs_per_device`; 1 without a measurement), said once per task."""
    if args.runs_per_gpu != "auto":
        return int(args.runs_per_gpu)
    return _auto_runs_per_gpu(task)


@functools.lru_cache(maxsize=None)
def _auto_runs_per_gpu(task: str) -> int:
    k, why = sweep.best_runs_per_device(sweep.device_table(STEP_TIMES_DIR), task)
    print(f"[reproduce] runs per GPU for {task}: {k} ({why})", flush=True)
    return k


def _runs_per_gpu_arg(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {value!r}")
    return value


def execute(phases: list, args) -> None:
    for select, final in phases:
        if select is not None:
            _launch(select, args)
            final.lams = [sweep.chosen_lambda(select)]
            print(f"[reproduce] {select.preset.name}: lambda = {final.lams[0]:g} (validation)")
        _launch(final, args)


def _launch(phase: sweep.Phase, args) -> None:
    """Run the phase's runs that hold no result yet (a relaunch queues no finished run)."""
    todo = phase.pending()
    done = phase.n_runs - sum(p.n_runs for p in todo)
    if done:
        print(f"[reproduce] {phase.preset.name} ({'select' if phase.selection else 'final'}): "
              f"{done} of {phase.n_runs} runs done already", flush=True)
    for part in todo:
        _run(command(part, args), "the same command resumes (finished runs are not run again)")


def _unknown_gpus(gpus: str) -> list[str]:
    """Ids in `gpus` that name no CUDA device of this machine (none checked without CUDA:
    runs there take the CPU)."""
    import torch   # here: --help and DRY_RUN need no torch
    if not torch.cuda.is_available():
        return []
    return [g for g in gpus.split(",") if not (g.isdigit() and int(g) < torch.cuda.device_count())]


def _run(cmd: list[str], then: str = "its output above says why") -> None:
    """Run `cmd`; a failure stops with one line (the command's own output says why)."""
    print("[reproduce] " + " ".join(cmd), flush=True)
    if (code := subprocess.run(cmd, cwd=ROOT).returncode) != 0:
        raise SystemExit(f"[reproduce] stopped: {Path(cmd[1]).name} exited with {code}; {then}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", choices=["cifar", "lm"])
    what.add_argument("--sweep", metavar="PRESET", help="one preset's lambda sweep")
    what.add_argument("--ablation", action="store_true", help="ResNet-56 PER: layout x reduction, then slices")
    ap.add_argument("--lams", type=_lams_arg,
                    help="comma-separated lambdas (default: the preset's lam_grid)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the reported runs")
    ap.add_argument("--select-seeds", type=int, default=1, help="seeds per lambda on the 45k/5k split")
    ap.add_argument("--gpus", default="0", help="comma-separated GPU ids (joblib launcher)")
    ap.add_argument("--runs-per-gpu", type=_runs_per_gpu_arg, default="auto",
                    help="runs at once per GPU (joblib launcher); auto: the best count measured "
                         "on this device by `scripts/step_times.py --concurrency`, else 1")
    ap.add_argument("--launcher", choices=["local", "joblib", "slurm"], default="local")
    ap.add_argument("--runs", default=PATHS["runs_dir"],
                    help="root of the run directories; tables and figures go beside it")
    ap.add_argument("--val-size", type=int, default=5000, help="images held out for lambda selection")
    ap.add_argument("--override", action="append", default=[],
                    help="Hydra override passed to every run (repeatable), e.g. trainer.precision=bf16")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--step-table", default=None, metavar="NAME",
                    help="device-hours from results/step_times/NAME.json (e.g. cuda-nvidia-h200) "
                         "instead of this machine's device's table")
    ap.add_argument("--no-report", action="store_true", help="skip tables and figures at the end")
    args = ap.parse_args(argv)
    if args.launcher == "joblib" and (bad := _unknown_gpus(args.gpus)):
        import torch
        ap.error(f"--gpus {args.gpus}: no GPU {', '.join(bad)} here; valid: "
                 f"{', '.join(map(str, range(torch.cuda.device_count())))}")
    args.runs = str(Path(args.runs).resolve())
    seeds, select_seeds = list(range(args.seeds)), list(range(args.select_seeds))
    lams = args.lams

    over = (f"paths.runs_dir={args.runs}", *args.override)
    plan_args = (seeds, select_seeds, args.val_size)
    if args.task:
        names = [n for n in preset_names() if TABLE_PRESET.match(n) and preset_task(n) == args.task]
        phases = sweep.plan(names, compose, *plan_args, overrides=over)
        title = f"reproduce-{args.task}"
    elif args.sweep:
        phases = sweep.plan([args.sweep], compose, *plan_args, lams, overrides=over)
        title = f"sweep {args.sweep}"
    else:
        phases = sweep.plan_ablation(compose, preset_names(), *plan_args, overrides=over)
        title = "ablation"
    try:
        sweep.print_plan(phases, title, STEP_TIMES_DIR, args.step_table)
    except ValueError as e:
        ap.error(str(e))
    if args.dry_run:
        return 0
    execute(phases, args)
    if not args.no_report:
        results = Path(args.runs).parent     # results/runs -> results/{tables,figures}
        for script, dest in (("aggregate.py", "tables"), ("figures.py", "figures")):
            _run([sys.executable, str(ROOT / "scripts" / script), "--runs", args.runs,
                  "--out", str(results / dest)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
