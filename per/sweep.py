"""The sweep planner behind `scripts/reproduce.py`: presets, phases, run counts, step counts
and device-hour estimates, lambda selection from finished runs.

Images (Tables 1-2): every lambda of a cell's grid is trained with a held-out split
(`data.val_size`); the lambda with the lowest mean final validation error is then trained
on all training images with the reported seeds. Language models (Table 3): every
lambda x seed, lambda chosen afterwards on validation perplexity. Presets arrive composed
(`compose(name, overrides)`, the Hydra glue in `experiments/common.py`): their task and run
directory are those of the composed config; nothing here imports Hydra.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from per.analysis.collect import collect_runs, lam_text, without_off_grid
from per.analysis.tables import select_lambda
from per.schema import CHANGES, DIVERGED, FINISHED, REGULARIZED
from per.data.cifar import TEST_SIZE, TRAIN_SIZE, num_batches
from per.data.corpus import EXPECTED_COUNTS, num_windows
from per.models.elu_cnn import ACTIVATIONS
from per.training import runtime
from per.training.checks import config_differences
from per.training.records import RunDir
from per.training.run import run_length

log = logging.getLogger(__name__)   # warnings and notes of planning and lambda choice

# Seeds of a reproduction unless the command line says otherwise: of each reported row, and
# of each lambda of an image cell's selection on the held-out split (`make reproduce-*`, `make tables`).
DEFAULT_SEEDS, DEFAULT_SELECT_SEEDS = 3, 1

# The ablation (ResNet-56, CIFAR-10, PER): layout x reduction, the first shared with Table 1,
# then the slices preset once per value of its `slices_grid`.
ABLATION_PRESETS = ("t1_cifar10_resnet56_per", "ablation_resnet56_channels_mean",
                    "ablation_resnet56_flatten_sum", "ablation_resnet56_flatten_mean")
ABLATION_SLICES = "ablation_resnet56_slices"


def batches_per_epoch(cfg: dict) -> int:
    """Training batches per epoch of the config's task on the full dataset (no files read):
    the CIFAR training loader's count, or the BPTT windows of the batchified corpus."""
    data = cfg["data"]
    if cfg["task"] == "cifar":
        return num_batches(TRAIN_SIZE - data["val_size"], data["batch_size"], data["drop_last"])
    return num_windows(EXPECTED_COUNTS[data["name"]][1], data["batch_size"], data["bptt"])


def eval_batches_per_epoch(cfg: dict) -> int:
    """Evaluation batches at the end of each epoch on the full dataset (no files read): the
    held-out training images (if any) and the test images at `data.eval_batch_size`, or the
    BPTT windows of the validation and test streams batchified into that many columns;
    at most `trainer.limit_eval_batches` per split."""
    data, limit = cfg["data"], cfg["trainer"].get("limit_eval_batches")
    if cfg["task"] == "cifar":
        splits = [num_batches(n, data["eval_batch_size"], drop_last=False) for n in (data["val_size"], TEST_SIZE)]
    else:
        _, _, val_tokens, test_tokens = EXPECTED_COUNTS[data["name"]]
        splits = [num_windows(n, data["eval_batch_size"], data["bptt"]) for n in (val_tokens, test_tokens)]
    return sum(min(n, limit) if limit else n for n in splits)


def evals_per_run(cfg: dict) -> int:
    """Evaluation batches one run of `cfg` takes: one evaluation per epoch it trains in (a
    `trainer.max_steps` run stops in an early epoch, evaluated)."""
    per_epoch = batches_per_epoch(cfg)
    epochs, _, planned = run_length(cfg, per_epoch)
    return min(epochs, -(-planned // per_epoch)) * eval_batches_per_epoch(cfg)


def steps_per_run(cfg: dict) -> int:
    """Optimizer steps one run of `cfg` takes (as `per.training.run.train` plans them)."""
    return run_length(cfg, batches_per_epoch(cfg))[2]


def step_time_key(cfg: dict) -> str:
    """What decides the cost of one step: the key of a step-time table,
    `data|model|norm|method|layout|slices`, and `|activation` for a model that has one
    (the deep ELU net: an ELU step costs more than a ReLU one)."""
    m, method = cfg["model"], cfg["method"]
    fields = [cfg["data"]["name"], m["name"], m.get("norm", ""), method["name"], method.get("layout", ""),
              method.get("num_slices", "")] + ([m["activation"]] if "activation" in m else [])
    return "|".join(map(str, fields))


@dataclass
class Preset:
    """A preset as its runs see it: the resolved config, with `run_dir` (of `method.lam`, `seed`);
    `alone`: makes the preset composed without command-line values (what a resume accepts a
    key missing from an older run's config at; called only where a run folder exists), or None."""
    name: str
    cfg: dict
    alone: Callable[[], dict] | None = None

    @property
    def task(self) -> str:
        return self.cfg["task"]

    @property
    def grid(self) -> list[float]:
        return [float(x) for x in self.cfg["method"]["lam_grid"]]

    @property
    def cell_dir(self) -> Path:
        """The folder of the cell's runs (`<runs>/<task>/<run name>`)."""
        return Path(self.cfg["run_dir"]).parent


Compose = Callable[[str, tuple[str, ...]], Preset]


@dataclass
class Phase:
    """One Hydra multirun: a preset composed with `overrides`, its lambdas and seeds."""
    preset: Preset
    overrides: tuple[str, ...]
    lams: list[float]          # empty until the selection phase before it has chosen one
    seeds: list[int]
    selection: bool = False    # runs on the held-out split that choose lambda

    @property
    def n_runs(self) -> int:
        return max(len(self.lams), 1) * len(self.seeds)

    def hydra_args(self) -> list[str]:
        """The entry point's multirun overrides."""
        return [f"experiment={self.preset.name}", "method.lam=" + ",".join(map(lam_text, self.lams)),
                "seed=" + ",".join(map(str, self.seeds)), *self.overrides]

    def run_dir(self, lam: float, seed: int) -> Path:
        """Where the run of (`lam`, `seed`) writes (configs/hydra/default.yaml's `lam=...,seed=...`,
        with the value Hydra parses from `lam_text`: `0` is an int there, `1e-04` a float)."""
        arg = lam_text(lam)
        value = int(arg) if arg.lstrip("+-").isdigit() else float(arg)
        return self.preset.cell_dir / f"lam={value},seed={seed}"

    def done(self) -> set[tuple[float, int]]:
        """The (lam, seed) runs that hold a result already (finished or diverged) of this very
        config: a launch would only skip them. With `resume=never`, or where the stored config
        differs from the phase's (`checks.config_differences`), none: the entry point decides
        (it runs again, or refuses naming the differences)."""
        if self.preset.cfg.get("resume") == "never":
            return set()
        out = set()
        for lam in self.lams:
            for seed in self.seeds:
                run_dir = self.run_dir(lam, seed)
                summary = RunDir(run_dir).read_summary()          # None: absent, or cut short by a kill
                if summary is None or summary.get("status") not in (FINISHED, DIVERGED):
                    continue
                if self.holds_own_run(run_dir, lam, seed):
                    out.add((lam, seed))
        return out

    def foreign(self) -> list[Path]:
        """The folders of this phase's runs that hold a run of another config (another
        `OVERRIDES`, a trial run with `trainer.max_steps`, an older preset): a launch would
        refuse them, naming the differences (unless `resume=never`, which starts them over)."""
        if self.preset.cfg.get("resume") == "never":
            return []
        return [d for lam in self.lams for seed in self.seeds
                if RunDir(d := self.run_dir(lam, seed)).read_config() is not None
                and not self.holds_own_run(d, lam, seed)]

    def holds_own_run(self, run_dir: str | Path, lam: float, seed: int) -> bool:
        """Whether `run_dir` holds a run of this phase's config at (`lam`, `seed`): its stored
        config differs from it on nothing that decides the result (`checks.config_differences`,
        with the preset alone as defaults, as the runner compares)."""
        expected = {**self.preset.cfg, "seed": int(seed), "method": {**self.preset.cfg["method"], "lam": lam}}
        return not config_differences(RunDir(run_dir).read_config() or {}, expected,
                                      self.preset.alone() if self.preset.alone else None)

    def pending(self) -> list["Phase"]:
        """This phase less its done runs, as few multiruns as the rest allows (lambdas that
        lack the same seeds share one); [] when every run is done."""
        done = self.done()
        by_seeds: dict[tuple[int, ...], list[float]] = {}
        for lam in self.lams:
            seeds = tuple(s for s in self.seeds if (lam, s) not in done)
            if seeds:
                by_seeds.setdefault(seeds, []).append(lam)
        return [dataclasses.replace(self, lams=lams, seeds=list(seeds)) for seeds, lams in by_seeds.items()]


def plan(names: list[str], compose: Compose, seeds: list[int], select_seeds: list[int], val_size: int,
         lams: list[float] | None = None, overrides: tuple[str, ...] = ()) -> list[tuple[Phase | None, Phase]]:
    """(selection phase or None, final phase) per preset. An image preset with several
    lambdas first trains each on a `val_size` held-out split with `select_seeds`.

    Raises:
        ValueError: `lams` given for a preset whose method has no lambda (vanilla, rbn)."""
    out = []
    for name in names:
        preset = compose(name, overrides)
        if lams and (method := preset.cfg["method"]["name"]) not in REGULARIZED:
            raise ValueError(f"{name}: method {method!r} has no lambda to sweep (methods with one: "
                             f"{', '.join(REGULARIZED)})")
        grid = lams or preset.grid
        if preset.task != "cifar":
            out.append((None, Phase(preset, overrides, grid, seeds)))
            continue
        final = (*overrides, "data.val_size=0")
        if len(grid) == 1:
            out.append((None, Phase(compose(name, final), final, grid, seeds)))
            continue
        select = (*overrides, f"data.val_size={val_size}")
        out.append((Phase(compose(name, select), select, grid, select_seeds, selection=True),
                    Phase(compose(name, final), final, [], seeds)))
    return out


def plan_ablation(compose: Compose, available: list[str], seeds: list[int], select_seeds: list[int],
                  val_size: int, overrides: tuple[str, ...] = (),
                  presets: tuple[str, ...] = ABLATION_PRESETS) -> list[tuple[Phase | None, Phase]]:
    """`plan` of the ablation: `presets` (those in `available`; the others are named in a
    warning), then `ABLATION_SLICES` once per value of its `slices_grid`, except a value
    whose runs are those of one of `presets` (s = 256: Table 1's PER cell), which are
    trained once and read for both."""
    names = [n for n in presets if n in available]
    if missing := [n for n in presets if n not in available]:
        log.warning("ablation presets not generated yet (scripts/make_presets.py): %s", ", ".join(missing))
    phases = plan(names, compose, seeds, select_seeds, val_size, overrides=overrides)
    planned = [compose(n, overrides) for n in names]
    for s in compose(ABLATION_SLICES, overrides).cfg["method"]["slices_grid"]:
        with_s = (f"method.num_slices={s}", *overrides)
        slices = compose(ABLATION_SLICES, with_s)
        same = [p.name for p in planned if p.grid == slices.grid and not config_differences(p.cfg, slices.cfg)]
        if same:
            log.info("%s at %s slices: the runs of %s", ABLATION_SLICES, s, same[0])
            continue
        phases += plan([ABLATION_SLICES], compose, seeds, select_seeds, val_size, overrides=with_s)
    return phases


def with_settled_choices(phases: list[tuple[Phase | None, Phase]]) -> list[tuple[Phase | None, Phase]]:
    """`phases` with each final phase whose selection has every run's result already given
    the lambda that selection chooses (`chosen_lambda`), so a plan counts its final runs
    that hold a result; the others as they are (their lambda is chosen later, and the
    launch reports what keeps it from being chosen: here nothing is logged or raised)."""
    out = []
    quiet, log.disabled = log.disabled, True
    try:
        for select, final in phases:
            if select is not None and not final.lams and not select.pending():
                with contextlib.suppress(SelectionError, ValueError, TypeError, KeyError, OSError):
                    final = dataclasses.replace(final, lams=[chosen_lambda(select)])
            out.append((select, final))
    finally:
        log.disabled = quiet
    return out


class SelectionError(RuntimeError):
    """A selection phase that cannot give a lambda (runs missing, or all diverged); the
    message says which and what to do."""


def chosen_lambda(phase: Phase) -> float:
    """The lambda with the best validation score among the selection phase's runs, once
    every (lambda, seed) of the phase has a finished or diverged run. Only runs of the phase's own
    config count, by the rule `Phase.done` applies, at any seed in the folder: runs of
    other lambdas (earlier `--lams` sweeps) and runs of another config (an older version
    of the preset) take no part; the latter are named.

    Raises:
        SelectionError: a (lambda, seed) of the phase has no finished or diverged run, or
            every run of the best lambda diverged."""
    cell_dir = phase.preset.cell_dir
    df, problems = collect_runs(cell_dir) if cell_dir.is_dir() else (None, [])
    for p in problems:
        log.warning("%s", p)
    grid = set(phase.lams)     # `lam_text` launched them exactly (hydra_args)
    if df is not None:   # the phase's lambdas are its grid, in the preset's grid or not
        df = df[df.lam.isin(grid)]
        other = [d for d, lam, seed in zip(df.run_dir, df.lam, df.seed) if not phase.holds_own_run(d, lam, seed)]
        for d in other:
            log.warning("%s: another config than this selection's; not used to choose lambda (move it "
                        "away, or OVERRIDES=resume=never to run it again)", d)
        df = df[~df.run_dir.isin(other)].assign(**{CHANGES: lambda d: d[CHANGES].map(without_off_grid)})
    if df is None or df.empty:
        raise SelectionError(f"no selection runs under {cell_dir}")
    settled = df[df.status.isin((FINISHED, DIVERGED))]
    if missing := sorted({(lam, seed) for lam in grid for seed in phase.seeds} - set(zip(settled.lam, settled.seed))):
        raise SelectionError(f"no finished or diverged selection run under {cell_dir} at "
                             + ", ".join(f"lambda {lam_text(lam)} seed {seed}" for lam, seed in missing)
                             + "; the same command resumes them")
    chosen = select_lambda(df, phase.preset.task)
    lam = chosen.lam.iloc[0]
    if len(chosen) != 1 or math.isnan(lam):
        raise SelectionError(f"could not choose lambda from {cell_dir}:\n{chosen}")
    if chosen.n.iloc[0] == 0 and chosen.n_diverged.iloc[0] > 0:   # a lone lambda that diverged
        raise SelectionError(f"lambda {lam:g} diverged in every selection run under {cell_dir}; "
                         "no final runs at it")
    return float(lam)


def device_table(directory: Path) -> dict | None:
    """The step-time table of this machine's device in `directory`, or None."""
    path = directory / f"{runtime.device_info(runtime.resolve_device('auto'))['slug']}.json"
    return json.loads(path.read_text()) if path.exists() else None


def step_time_table(directory: Path, name: str | None = None) -> tuple[dict | None, str]:
    """(table, label): the step-time table `directory/<name>.json` when `name` is given (a
    ValueError naming the tables there if it is missing), else this machine's device's (its
    label gives both names where they differ: a CPU's holds its cores and torch threads), else
    one measured elsewhere on a device of this machine's kind (CPU or GPU) if any, labelled
    as such; (None, reason) when there is none."""
    tables = {p.stem: p for p in sorted(directory.glob("*.json"))}
    if name is not None:
        if name not in tables:
            raise ValueError(f"no step-time table {name!r} in {directory}; valid: {', '.join(tables) or 'none'}")
        t = json.loads(tables[name].read_text())
        return t, f"chosen table {name}: {t['device']} ({_measured_with(t)})"
    if not tables:
        return None, f"no tables in {directory}; run `make step-times` on the device"
    t = device_table(directory)
    here = runtime.device_info(runtime.resolve_device("auto"))
    if t is not None:
        if t["device"] != here["name"]:     # a CPU's name holds its cores and torch threads
            return t, (f"this machine's model, measured as {t['device']} ({_measured_with(t)}); "
                       f"here: {here['name']}")
        return t, f"this machine's {t['device']} ({_measured_with(t)})"
    kind = here["slug"].split("-")[0] + "-"                       # "cpu-" or "cuda-"
    stem = sorted(tables, key=lambda k: (not k.startswith(kind), k))[0]
    t = json.loads(tables[stem].read_text())
    return t, f"NOT this machine ({here['name']}): measured on {t['device']} ({_measured_with(t)})"


def _measured_with(table: dict) -> str:
    """The versions a table was measured with, for its label (and, on a GPU, the products'
    mode of PER's fused kernel then, which decides the PER rows)."""
    kernel = f", PER kernel products {table['per_kernel_products']}" if "per_kernel_products" in table else ""
    return f"torch {table.get('torch', '?')}, {table.get('recorded', '?')}{kernel}"


# A larger count must beat the smaller ones' runs per hour by this factor to be chosen:
# more runs at once cost memory and make each run slower, so near-ties go to fewer.
RUNS_PER_DEVICE_MARGIN = 1.05


def runs_per_hour(table: dict | None, task: str) -> dict[int, float]:
    """{runs at once: runs per hour} for `task` ("cifar" or "lm") in a step-time table's
    `runs_per_hour` (`scripts/step_times.py --concurrency`: one preset per task; where a
    table holds several, the first measured), {} without a measurement."""
    return next(({int(n): v for n, v in r.items() if n.isdigit()}
                 for r in (table or {}).get("runs_per_hour", {}).values() if r["task"] == task), {})


def best_runs_per_device(table: dict | None, task: str) -> tuple[int, str]:
    """(k, why): the number of runs at once with the most runs per hour for `task`
    (`runs_per_hour`), the smallest one within `RUNS_PER_DEVICE_MARGIN` of the best;
    (1, why) when the table has no such measurement."""
    rates = runs_per_hour(table, task)
    if not rates:
        return 1, f"no runs-per-hour measurement for {task}; run `scripts/step_times.py --concurrency 1,2,4,8`"
    top = max(rates.values())
    k = min(k for k, v in rates.items() if v * RUNS_PER_DEVICE_MARGIN >= top)
    shown = ", ".join(f"{n}: {v:.3g}" for n, v in sorted(rates.items()))
    return k, f"measured runs/hour by runs at once on {table['device']}: {shown}"


def _estimate(times: dict[str, float], key: str) -> tuple[float, str] | None:
    """(step time, the key it is from) for an unmeasured `key`, from a measured configuration of the same method:
    the deep ELU net with another activation (the same layers, another pointwise function),
    CIFAR-10 for CIFAR-100 (they differ in the classifier's width), the plain LSTM for its
    variants on the same corpus (tied embeddings, dropout), twice ResNet-56 for ResNet-110
    (54 blocks against 27)."""
    data, model, *rest = key.split("|")
    candidates = [(f"{data}|{model}", 1.0)]
    candidates.append((f"cifar10|{model}", 1.0) if data.startswith("cifar") else (f"{data}|lstm", 1.0))
    if model == "resnet110":
        candidates.append((f"{data}|resnet56", 2.0))
        candidates.append(("cifar10|resnet56", 2.0))
    tails = [rest]
    if len(rest) == 5:      # the key names an activation
        tails += [[*rest[:-1], a] for a in ACTIVATIONS if a != rest[-1]]
    for prefix, factor in candidates:
        for tail in tails:
            other = "|".join([prefix, *tail])
            if other != key and other in times:
                return factor * times[other], other
    return None


def step_time(times: dict[str, float], key: str) -> tuple[float | None, bool]:
    """(seconds per step, estimated): `key`'s measured time, else `_estimate`, else None."""
    if key in times:
        return times[key], False
    estimate = _estimate(times, key)
    return (estimate[0], True) if estimate else (None, False)


def stale_source(table: dict, key: str) -> str | None:
    """The key whose step time `key` takes (its own, or `_estimate`'s) where the table marks
    that row stale (`stale`: key -> why, for rows measured before a change of the code they
    time; `scripts/step_times.py` clears a row's mark when it measures it again); else None."""
    times = table.get("s_per_step", {})
    source = key if key in times else (_estimate(times, key) or (None, None))[1]
    return source if source in table.get("stale", {}) else None


def phase_seconds(ph: Phase, table: dict) -> tuple[float | None, bool, bool]:
    """(device seconds, estimated, evaluation counted) of a phase from a step-time table:
    its optimizer steps times `s_per_step`, plus its evaluation batches times
    `s_per_eval_batch` where the table has them. None when the step time is unknown."""
    cfg = ph.preset.cfg
    key = step_time_key(cfg)
    s, approx = step_time(table.get("s_per_step", {}), key)
    if s is None:
        return None, False, False
    e, e_approx = step_time(table.get("s_per_eval_batch", {}), key)
    total = ph.n_runs * steps_per_run(cfg) * s + (ph.n_runs * evals_per_run(cfg) * e if e is not None else 0.0)
    return total, approx or e_approx, e is not None


def unit_seconds(table: dict | None) -> Callable[[Phase], float]:
    """Expected device seconds of a phase (`phase_seconds`); where `table` cannot time its
    configuration, or there is no table, its steps at the table's median step time (1 s
    without one): an order of the phases, not an estimate."""
    times = sorted((table or {}).get("s_per_step", {}).values())
    fallback = times[len(times) // 2] if times else 1.0

    def seconds(ph: Phase) -> float:
        s = phase_seconds(ph, table or {})[0]
        return s if s is not None else ph.n_runs * steps_per_run(ph.preset.cfg) * fallback
    return seconds


def concurrency_slowdown(table: dict | None, task: str, k: int) -> tuple[float | None, str]:
    """(factor, how): how much longer one run takes with `k` runs at once on a device than
    alone, `k` x the runs per hour of 1 over those of `k` (`scripts/step_times.py
    --concurrency`). Where `k` was not measured, the largest smaller count that was, with no
    gain in runs per hour assumed beyond it; None where `task` has no measurement at all."""
    if k == 1:
        return 1.0, ""
    rates = runs_per_hour(table, task)
    below = [m for m in rates if m <= k]
    if 1 not in rates or not below:
        return None, f"no runs-per-hour measurement for {task}"
    m = max(below)
    factor = k * rates[1] / rates[m]
    if m == k:
        return factor, f"{k} runs at once per GPU: each {factor:.2f}x slower, measured"
    return factor, (f"{k} runs at once per GPU: each {factor:.2f}x slower, from {m} at once measured "
                    f"and no gain assumed beyond")


# Overrides that change the cost of a step but not `step_time_key` (the tables time each
# preset's own settings): DRY_RUN says its hours are rough when a plan has them.
STEP_COST_OVERRIDES = ("trainer.precision", "trainer.compile", "trainer.channels_last", "data.batch_size",
                       "optim.batch_size", "data.bptt", "model.")


def print_plan(phases: list[tuple[Phase | None, Phase]], title: str, step_times_dir: Path,
               table_name: str | None = None) -> None:
    """Runs and optimizer steps per phase, per table and in total, with device-hours (training
    steps and evaluation) from the step-time table `table_name`, else this machine's device's
    (or another one, labelled)."""
    table, label = step_time_table(step_times_dir, table_name)
    rows, tot_runs, tot_steps, tot_s, tot_done = [], 0, 0, 0.0, 0
    unknown, substituted, no_eval, foreign, stale, timed = set(), set(), set(), [], set(), 0
    for select, final in phases:     # a final phase's lambda will be one of its selection's
        if select is not None and not final.lams:
            foreign += dataclasses.replace(final, lams=select.lams).foreign()
    for ph in (ph for pair in phases for ph in pair if ph is not None):
        foreign += ph.foreign()
        steps = ph.n_runs * steps_per_run(ph.preset.cfg)
        key = step_time_key(ph.preset.cfg)
        s, approx, with_eval = phase_seconds(ph, table or {})
        done = len(ph.done())          # a final phase whose lambda is not chosen yet: 0
        if s is None:
            unknown.add(key)
        else:
            timed += 1
            tot_s += s * (ph.n_runs - done) / ph.n_runs if ph.n_runs else 0.0   # what is left
            if approx:
                substituted.add(key)
            if not with_eval:
                no_eval.add(key)
        mark = "~" if approx else ""
        if s is not None and (source := stale_source(table or {}, key)):
            stale.add(source)
            mark = "!" + mark
        hours = "?" if s is None else f"{mark}{s / 3600:,.1f}"
        per_run = "?" if s is None or not ph.n_runs else f"{mark}{s / ph.n_runs / 3600:,.2f}"
        tot_runs += ph.n_runs
        tot_steps += steps
        tot_done += done
        name = ph.preset.cfg.get("run_name") or ph.preset.name     # the slices preset: one per count
        lams = ",".join(map(lam_text, ph.lams)) if ph.lams else "chosen in select"
        rows.append((name, "select" if ph.selection else "final", ph.n_runs, steps, hours, per_run, done, lams))
    print(f"== {title}: {tot_runs} runs, {tot_steps:,} optimizer steps"
          + (f"; {tot_done} runs hold a result already (skipped, not launched)" if tot_done else ""))
    by_table: dict[str, list[int]] = {}
    for name, _, n, steps, *_ in rows:
        t = by_table.setdefault(name.split("_")[0].upper(), [0, 0])
        t[0] += n
        t[1] += steps
    for t, (n, steps) in sorted(by_table.items()):
        print(f"   {t}: {n} runs, {steps:,} steps")
    if foreign:
        shown = ", ".join(str(d) for d in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        print(f"   WARNING: {len(foreign)} run folders hold a run of another config, which a launch refuses "
              f"(e.g. trial runs with other OVERRIDES): {shown}. Move them away, launch with "
              "OVERRIDES=resume=never to start them over, or use another RUNS folder")
    print(f"   step times: {label}")
    print(f"   {'preset':<34} {'phase':<6} {'runs':>8} {'steps':>16} {'device-hours':>13} {'per run':>8}"
          f" {'done':>5}  lambdas")
    for name, phase, n, steps, hours, per_run, done, lams in rows:
        print(f"   {name:<34} {phase:<6} {n:>3} runs {steps:>10,} steps {hours:>13} {per_run:>8} {done:>5}  {lams}")
    costly = sorted({o for pair in phases for ph in pair if ph is not None for o in ph.overrides
                     if o.lstrip("+~").startswith(STEP_COST_OVERRIDES)})
    if table is not None and costly:
        print(f"   note: {', '.join(costly)} change what a step costs; the table's times are of the "
              f"presets' own settings ({table.get('precision', 'fp32')}), so these hours are rough")
    if table is not None:
        total = f"{tot_s / 3600:,.1f}" if timed else "?"
        print(f"   estimated total: {total} device-hours on {table['device']}"
              + (" for the runs without a result" if tot_done else "")
              + (f"; ~ = estimated from a similar measured configuration ({len(substituted)})"
                 if substituted else "")
              + (f"; no step time for {len(unknown)} configurations (not counted)" if unknown else "")
              + (f"; evaluation not measured for {len(no_eval)} configurations (training steps only)"
                 if no_eval else "")
              + ("; ! = from step times the table marks stale (below)" if stale else ""))
        for source in sorted(stale):
            print(f"   ! = from a step time the table marks stale, {source}: {table['stale'][source]}")
