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
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import common  # noqa: E402,F401  (config resolvers)

from per.analysis.collect import collect_runs  # noqa: E402
from per.analysis.tables import select_lambda  # noqa: E402
from per.data.corpus import EXPECTED_COUNTS  # noqa: E402

CIFAR_TRAIN = 50_000
ENTRY = {"cifar": "train_cifar", "lm": "train_lm"}
PREFIXES = {"cifar": ("t1_", "t2_"), "lm": ("t3_",)}
STEP_TIMES_DIR = ROOT / "results" / "step_times"   # <device slug>.json, written by scripts/step_times.py


@dataclass
class Preset:
    name: str
    task: str
    cfg: dict              # resolved config of the preset

    @property
    def grid(self) -> list[float]:
        return [float(x) for x in self.cfg["method"]["lam_grid"]]

    def steps_per_run(self, val_size: int) -> int:
        c = self.cfg
        if c["optim"].get("total_steps"):
            return int(c["optim"]["total_steps"])
        if self.task == "cifar":
            per_epoch = (CIFAR_TRAIN - val_size) // c["data"]["batch_size"]   # drop_last
        else:
            per_epoch = math.ceil((EXPECTED_COUNTS[c["data"]["name"]][1] // c["data"]["batch_size"] - 1)
                                  / c["data"]["bptt"])
        return per_epoch * int(c["trainer"]["epochs"])

    def key(self) -> str:
        """Step-time key: what decides the cost of one step."""
        c = self.cfg
        return "|".join(str(x) for x in (c["data"]["name"], c["model"]["name"], c["model"].get("norm", ""),
                                          c["method"]["name"], c["method"].get("layout", ""),
                                          c["method"].get("num_slices", "")))


def load_presets(names: list[str] | None = None, task: str | None = None,
                 overrides: tuple[str, ...] = ()) -> list[Preset]:
    """Compose each preset (resolved) exactly as its runs will see it."""
    exp_dir = ROOT / "configs" / "experiment"
    names = names or sorted(p.stem for p in exp_dir.glob("*.yaml") if p.stem.startswith(PREFIXES[task]))
    out = []
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for name in names:
            if not (exp_dir / f"{name}.yaml").exists():
                raise SystemExit(f"unknown preset {name!r}; see configs/experiment/")
            t = "lm" if name.startswith("t3_") else "cifar"
            cfg = compose(ENTRY[t], overrides=[f"experiment={name}", *overrides])
            out.append(Preset(name, t, OmegaConf.to_container(cfg, resolve=True)))
    return out


@dataclass
class Phase:
    """One Hydra multirun: a preset, lambdas and seeds, with or without a held-out split."""
    preset: Preset
    lams: list[float]
    seeds: list[int]
    val_size: int = 0
    extra: tuple[str, ...] = ()

    @property
    def n_runs(self) -> int:
        return len(self.lams) * len(self.seeds)

    def command(self, args) -> list[str]:
        cmd = [sys.executable, str(ROOT / "experiments" / f"{ENTRY[self.preset.task]}.py"), "-m",
               f"experiment={self.preset.name}", "method.lam=" + ",".join(f"{l:g}" for l in self.lams),
               "seed=" + ",".join(map(str, self.seeds)), f"paths.runs_dir={args.runs}", *self.extra,
               *args.override]
        if self.preset.task == "cifar":
            cmd.append(f"data.val_size={self.val_size}")
        gpus = args.gpus.split(",")
        if args.launcher == "joblib":
            cmd += ["launcher=joblib", f"hydra.launcher.n_jobs={len(gpus) * args.runs_per_gpu}",
                    "trainer.gpus=[" + ",".join(gpus) + "]"]
        elif args.launcher == "slurm":
            cmd.append("launcher=slurm")
        return cmd


def chosen_lambda(phase: Phase, args) -> float:
    """The lambda with the best validation score among the phase's finished runs."""
    cell_dir = Path(args.runs) / phase.preset.task / _run_name(phase)
    df, problems = collect_runs(cell_dir)
    for p in problems:
        print(f"[reproduce] skipped run: {p}", file=sys.stderr)
    if df.empty:
        raise SystemExit(f"no selection runs under {cell_dir}")
    chosen = select_lambda(df, phase.preset.task)
    lam = chosen.lam.iloc[0]
    if len(chosen) != 1 or math.isnan(lam):
        raise SystemExit(f"could not choose lambda from {cell_dir}:\n{chosen}")
    return float(lam)


def _run_name(phase: Phase) -> str:
    return phase.preset.cfg["run_name"] + (f"-val{phase.val_size}" if phase.val_size else "")


def plan(presets: list[Preset], seeds: list[int], select_seeds: list[int], val_size: int,
         lams: list[float] | None = None, extra: tuple[str, ...] = ()) -> list[tuple[Phase | None, Phase]]:
    """(selection phase or None, final phase) per preset; a final phase whose lambdas
    are unknown until selection has an empty `lams` (one lambda will be run)."""
    out = []
    for p in presets:
        grid = lams or p.grid
        if p.task == "lm":
            out.append((None, Phase(p, grid, seeds, extra=extra)))
        elif len(grid) == 1:
            out.append((None, Phase(p, grid, seeds, extra=extra)))
        else:
            out.append((Phase(p, grid, select_seeds, val_size, extra), Phase(p, [], seeds, extra=extra)))
    return out


def device_info(device_type: str | None = None) -> dict[str, str]:
    """This machine's device (the first GPU, else the CPU; `device_type` forces one):
    `name` (card, or CPU model with cores and torch threads) and `slug` (step-time table stem)."""
    import torch
    cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
    if cuda:
        name = torch.cuda.get_device_name()
        short = name
    else:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M) \
            if Path("/proc/cpuinfo").exists() else None
        short = found.group(1).strip() if found else (platform.processor() or platform.machine())
        name = f"{short} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    slug = re.sub(r"[^a-z0-9]+", "-", short.lower()).strip("-")
    return {"name": name, "slug": f"{'cuda' if cuda else 'cpu'}-{slug}"}


def step_time_table() -> tuple[dict | None, str]:
    """(table, label): the `results/step_times/` table of this machine's device, else one
    measured elsewhere (a GPU's first), labelled as such; (None, reason) when there is none."""
    tables = {p.stem: p for p in sorted(STEP_TIMES_DIR.glob("*.json"))}
    if not tables:
        return None, f"no tables in {STEP_TIMES_DIR.relative_to(ROOT)}; run `make step-times` on the device"
    here = device_info()
    if here["slug"] in tables:
        t = json.loads(tables[here["slug"]].read_text())
        return t, f"this machine's {t['device']} (torch {t.get('torch', '?')}, {t.get('recorded', '?')})"
    stem = sorted(tables, key=lambda k: (not k.startswith("cuda"), k))[0]
    t = json.loads(tables[stem].read_text())
    return t, (f"NOT this machine ({here['name']}): measured on {t['device']} "
               f"(torch {t.get('torch', '?')}, {t.get('recorded', '?')})")


def _estimate(times: dict[str, float], key: str) -> float | None:
    """A step time for an unmeasured `key` from a measured configuration of the same method:
    CIFAR-10 for CIFAR-100 (they differ in the classifier's width), the plain LSTM for its
    variants on the same corpus (tied embeddings, dropout), twice ResNet-56 for ResNet-110
    (54 blocks against 27)."""
    data, model, *rest = key.split("|")
    candidates = [(f"cifar10|{model}", 1.0)] if data.startswith("cifar") else [(f"{data}|lstm", 1.0)]
    if model == "resnet110":
        candidates.append((f"{data}|resnet56", 2.0))
        candidates.append(("cifar10|resnet56", 2.0))
    for prefix, factor in candidates:
        other = "|".join([prefix, *rest])
        if other in times:
            return factor * times[other]
    return None


def step_time(times: dict[str, float], key: str) -> tuple[float | None, bool]:
    """(seconds per step, estimated): `key`'s measured time, else `_estimate`, else None."""
    if key in times:
        return times[key], False
    s = _estimate(times, key)
    return s, s is not None


def print_plan(phases, title: str) -> None:
    table, label = step_time_table()
    times = table["s_per_step"] if table else {}
    rows, tot_runs, tot_steps, tot_s = [], 0, 0, 0.0
    unknown, substituted = set(), set()
    for select, final in phases:
        for ph in (select, final):
            if ph is None:
                continue
            n = ph.n_runs if ph.lams else len(ph.seeds)
            steps = n * ph.preset.steps_per_run(ph.val_size)
            key = ph.preset.key()
            s, approx = step_time(times, key)
            if s is None:
                unknown.add(key)
            else:
                tot_s += steps * s
                if approx:
                    substituted.add(key)
            hours = "?" if s is None else f"{'~' if approx else ''}{steps * s / 3600:,.1f}"
            tot_runs += n
            tot_steps += steps
            rows.append((ph.preset.name, "select" if ph.val_size else "final", n, steps, hours))
    print(f"== {title}: {tot_runs} runs, {tot_steps:,} optimizer steps")
    by_table: dict[str, list[int]] = {}
    for name, phase, n, steps, _ in rows:
        t = by_table.setdefault(name.split("_")[0].upper(), [0, 0])
        t[0] += n
        t[1] += steps
    for t, (n, steps) in sorted(by_table.items()):
        print(f"   {t}: {n} runs, {steps:,} steps")
    print(f"   step times: {label}")
    print(f"   {'preset':<34} {'phase':<6} {'runs':>8} {'steps':>16} {'device-hours':>13}")
    for name, phase, n, steps, hours in rows:
        print(f"   {name:<34} {phase:<6} {n:>3} runs {steps:>10,} steps {hours:>13}")
    if table is not None:
        print(f"   estimated total: {tot_s / 3600:,.1f} device-hours on {table['device']}"
              + (f"; ~ = estimated from a similar measured configuration ({len(substituted)})"
                 if substituted else "")
              + (f"; no step time for {len(unknown)} configurations (not counted)" if unknown else ""))


def execute(phases, args) -> None:
    for select, final in phases:
        if select is not None:
            _run(select.command(args))
            final.lams = [chosen_lambda(select, args)]
            print(f"[reproduce] {select.preset.name}: lambda = {final.lams[0]:g} (validation)")
        _run(final.command(args))


def _run(cmd: list[str]) -> None:
    print("[reproduce] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", choices=["cifar", "lm"])
    what.add_argument("--sweep", metavar="PRESET", help="one preset's lambda sweep")
    what.add_argument("--ablation", action="store_true", help="ResNet-56 PER layout and slices ablation")
    ap.add_argument("--lams", help="comma-separated lambdas (default: the preset's lam_grid)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the reported runs")
    ap.add_argument("--select-seeds", type=int, default=1, help="seeds per lambda on the 45k/5k split")
    ap.add_argument("--gpus", default="0", help="comma-separated GPU ids (joblib launcher)")
    ap.add_argument("--runs-per-gpu", type=int, default=1)
    ap.add_argument("--launcher", choices=["local", "joblib", "slurm"], default="local")
    ap.add_argument("--runs", default="results/runs",
                    help="root of the run directories; tables and figures go beside it")
    ap.add_argument("--val-size", type=int, default=5000, help="images held out for lambda selection")
    ap.add_argument("--override", action="append", default=[],
                    help="Hydra override passed to every run (repeatable), e.g. trainer.precision=bf16")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--no-report", action="store_true", help="skip tables and figures at the end")
    args = ap.parse_args(argv)
    args.runs = str(Path(args.runs).resolve())
    seeds, select_seeds = list(range(args.seeds)), list(range(args.select_seeds))
    lams = [float(x) for x in args.lams.split(",")] if args.lams else None

    over = tuple(args.override)
    if args.task:
        phases = plan(load_presets(task=args.task, overrides=over), seeds, select_seeds, args.val_size)
        title = f"reproduce-{args.task}"
    elif args.sweep:
        phases = plan(load_presets([args.sweep], overrides=over), seeds, select_seeds, args.val_size, lams)
        title = f"sweep {args.sweep}"
    else:
        phases = plan(load_presets(["ablation_resnet56_flatten"], overrides=over), seeds, select_seeds,
                      args.val_size)
        (slices,) = load_presets(["ablation_resnet56_slices"])
        for s in slices.cfg["method"]["slices_grid"]:
            extra = (f"method.num_slices={s}",)
            phases += plan(load_presets(["ablation_resnet56_slices"], overrides=(*extra, *over)), seeds,
                           select_seeds, args.val_size, extra=extra)
        title = "ablation"
    print_plan(phases, title)
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
