"""Hydra glue shared by the entry points: resolvers, config -> plain dict, the `.hydra/`
record, exit codes."""
from __future__ import annotations

import argparse
import difflib
import functools
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from per import schema
from per.data.download import DatasetDamagedError, DatasetMissingError
from per.training.checks import DATASETS, RUNNER, ConfigMismatchError, ConfigValueError, protocol_of, validate
from per.training.image_task import build_image_experiment
from per.training.lm_task import build_lm_experiment
from per.training.records import RunLockedError
from per.training.run import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
HYDRA_RECORD = ".hydra"   # hydra.output_subdir is null: train() writes it once the run is accepted
ENTRY = {task: Path(script).stem for task, script in RUNNER.items()}   # task -> entry config and script
BUILD = {"cifar": build_image_experiment, "lm": build_lm_experiment}   # task -> builder
OmegaConf.register_new_resolver("valtag", lambda n: f"-val{n}" if int(n) > 0 else "", replace=True)


def remove_empty_folders(folder: Path, root: Path) -> None:
    """Remove `folder` while it is empty, then its empty parents up to, not including,
    `root` (a refused run's `<task>/<cell>/` folders; only `folder` where it is not under
    `root`). A symbolic link is left alone, with what it points to."""
    folder, root = Path(os.path.abspath(folder)), root.resolve()
    while not folder.is_symlink():
        try:
            folder.rmdir()
        except OSError:      # not empty (another run's), or gone
            return
        folder = folder.parent
        if root not in folder.resolve().parents:
            return


def compose_plain(config_name: str, overrides: list[str], run_dir: str | Path | None = None) -> dict:
    """The resolved config an entry point would see, outside Hydra's main (tests, demo).

    `run_dir` defaults to the directory `hydra.run.dir` names.
    """
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    default_dir = cfg.hydra.run.dir
    with open_dict(cfg):
        cfg.pop("hydra")
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["run_dir"] = str(run_dir if run_dir is not None else default_dir)
    return plain


def preset_names(pattern: str = "*") -> list[str]:
    """The presets (`configs/experiment/<name>.yaml`) whose name matches the glob `pattern`."""
    return sorted(p.stem for p in (CONFIGS / "experiment").glob(f"{pattern}.yaml"))


def unknown_preset(name: str) -> str:
    """The error message for a preset name that has no file, with the closest names."""
    by_lower = {n.lower(): n for n in preset_names()}       # `..._PER` finds `..._per`
    close = [by_lower[c] for c in difflib.get_close_matches(name.lower(), by_lower, n=3, cutoff=0.8)]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"unknown preset {name!r}; {hint}all presets: configs/experiment/*.yaml (`ls configs/experiment`)"


def check_command_line(config_name: str, argv: list[str]) -> None:
    """What the entry points check before Hydra starts: `check_presets`, then
    `check_multirun_jobs`."""
    check_presets(argv)
    check_multirun_jobs(config_name, argv)


def check_presets(argv: list[str]) -> None:
    """Exit with `USER_ERROR_EXIT` and `unknown_preset`'s message where an `experiment=`
    argument (each name of a multirun's choice list included) names no preset, before
    Hydra, whose own error lists all presets without the closest ones. Arguments are read
    with Hydra's override parser; what it cannot read here (a sweep function needing the
    config loader, a syntax error), other sweeps, and runs with another config directory,
    path or search path are left to Hydra."""
    if _elsewhere(argv):
        return
    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-") or arg.partition("=")[0].lstrip("+~").partition("@")[0] != "experiment":
            continue
        try:
            override = parser.parse_overrides([arg])[0]
            if override.is_delete() or (override.is_sweep_override() and not override.is_choice_sweep()):
                continue
            value = list(override.sweep_string_iterator()) if override.is_choice_sweep() else override.value()
        except Exception:      # glob(...) needs Hydra's config loader; a syntax error: Hydra reports both
            continue
        for name in value if isinstance(value, list) else [value]:
            if isinstance(name, str) and name and not (CONFIGS / "experiment" / f"{name}.yaml").exists():
                print(f"ValueError: {unknown_preset(name)}", file=sys.stderr)
                sys.exit(USER_ERROR_EXIT)


def group_choices(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """The overrides that choose a config group (`optim=he_bn`, `experiment=...`), not a value."""
    return [o for o in overrides if (CONFIGS / o.partition("=")[0].lstrip("+~").partition("@")[0]).is_dir()]


def check_multirun_jobs(config_name: str, argv: list[str]) -> None:
    """In a multirun (`-m`), check every job's config as `train` would before any job runs
    (a bad value in the last job surfaced after the others had trained): exit with
    `USER_ERROR_EXIT` and the message of the first job refused. The jobs are expanded with
    Hydra's basic sweeper from the command line; what cannot be expanded or composed here
    (glob sweeps, other sweepers or launchers' configs, another config directory) is left
    to Hydra and to each job's own check."""
    if not any(a in ("-m", "--multirun") for a in argv) or _elsewhere(argv) or any(
            a.partition("=")[0] in ("-cn", "--config-name") for a in argv):
        return
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
        if any(isinstance(o.value(), Glob) or o.is_interval_sweep() for o in overrides):
            return        # a glob needs Hydra's config loader; an interval, a sweeper that samples
        jobs = BasicSweeper.split_arguments(overrides, None)[0]
    except Exception:       # a syntax error: Hydra reports it
        return
    defaults: dict[tuple[str, ...], dict] = {}
    for num, job in enumerate(jobs):
        # as typed: the sweeper writes a removal `~key` back as `~key=null`
        job = [o.removesuffix("=null") if o.startswith("~") else o for o in job
               if not o.lstrip("+~").startswith("hydra")]
        groups = tuple(group_choices(job))
        try:
            if groups not in defaults:
                defaults[groups] = compose_plain(config_name, list(groups))
            validate(compose_plain(config_name, job), defaults[groups])
        except ConfigValueError as e:
            print(f"ConfigValueError: job #{num} ({' '.join(job)}) of the multirun, before any job ran: {e}",
                  file=sys.stderr)
            sys.exit(USER_ERROR_EXIT)
        except Exception:    # not composable here (a launcher plugin's config, say): Hydra decides
            return


def _elsewhere(argv: list[str]) -> bool:
    """Whether the command line composes from another config directory, path or search path
    (the checks before Hydra read this repository's configs only)."""
    elsewhere = ("-cd", "--config-dir", "-cp", "--config-path")
    return any(a.partition("=")[0] in elsewhere or a.lstrip("+").startswith("hydra.searchpath") for a in argv)


@functools.cache
def preset_task(name: str) -> str:
    """The task of preset `name`: the one whose builder loads the dataset the preset names."""
    if not (CONFIGS / "experiment" / f"{name}.yaml").exists():
        raise ValueError(unknown_preset(name))
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        dataset = compose(ENTRY["cifar"], overrides=[f"experiment={name}"]).data.name
    return next(task for task, names in DATASETS.items() if dataset in names)


@functools.cache
def suite_paths() -> dict:
    """The suite's folders and files (`configs/paths`: runs, tables, figures, step times,
    strength, data), resolved; the scripts take their defaults from here."""
    return compose_plain(ENTRY["cifar"], [])["paths"]


def add_run_source_arguments(ap: argparse.ArgumentParser) -> None:
    """`--runs` (default `paths.runs_dir`), `--wandb-project`, `--wandb-entity`: where a
    report (tables, figures) reads the runs (`per.analysis.wandb_source.collect_source`)."""
    ap.add_argument("--runs", default=suite_paths()["runs_dir"], help="root of the run directories (paths.runs_dir)")
    ap.add_argument("--wandb-project", help="read the runs from this W&B project instead")
    ap.add_argument("--wandb-entity", help="W&B entity (user or team) of the project")


def check_report_folder(runs: str | None, out: str, key: str) -> None:
    """Exit with `USER_ERROR_EXIT` where a report of other runs than the suite's (`runs`, not
    `paths.runs_dir`) would be written into the suite's own report folder (`paths.<key>`):
    `make tables RUNS=results/debug` puts `results/debug/../tables` = `results/tables`."""
    paths = suite_paths()
    if (runs is not None and Path(runs).resolve() != Path(paths["runs_dir"]).resolve()
            and Path(out).resolve() == Path(paths[key]).resolve()):
        print(f"refusing to write the report of {runs} into {out}, the reproduction's own folder "
              f"(paths.{key}): pass --out, or give RUNS a folder of its own (RUNS=<folder>/runs "
              "puts tables/ and figures/ in <folder>)", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)


def compose_preset(name: str, overrides: tuple[str, ...] = (), run_dir: str | Path | None = None) -> dict:
    """Preset `name` resolved as its runs see it, under its task's entry config (`run_dir`
    as in `compose_plain`)."""
    return compose_plain(ENTRY[preset_task(name)], [f"experiment={name}", *overrides], run_dir)


@functools.cache
def preset_protocol(name: str) -> dict | None:
    """The protocol of preset `name` as it is now (`checks.protocol_of` what it composes to
    alone, as `run_main` records it); None where no such preset exists, or it does not
    compose (named in a warning: its runs are then not judged)."""
    if not (CONFIGS / "experiment" / f"{name}.yaml").exists():
        return None
    try:
        return protocol_of(compose_preset(name))
    except Exception as e:      # a broken preset file must not stop a report
        warnings.warn(f"preset {name} does not compose ({type(e).__name__}: {e}); its runs are not "
                      "checked against it", stacklevel=2)
        return None


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain Python, with the run directory Hydra chose."""
    hydra_cfg = HydraConfig.get()
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["run_dir"] = hydra_cfg.runtime.output_dir
    gpus = plain["trainer"].get("gpus")
    if gpus and torch.cuda.is_available():   # multirun over several GPUs
        num = hydra_cfg.job.get("num", 0) or 0
        torch.cuda.set_device(int(gpus[num % len(gpus)]))
    return plain


def group_defaults(config_name: str, choices: dict[str, str | None]) -> dict:
    """The config that the chosen groups (model, method, experiment, ...) give without
    any command-line value: a key that an older run's config.yaml lacks is accepted at
    this value. Call inside Hydra's main (it composes with the app's search path)."""
    overrides = [f"{group}={choice}" for group, choice in choices.items()
                 if choice is not None and not group.startswith("hydra/")]
    return OmegaConf.to_container(compose(config_name, overrides=overrides), resolve=True)


def hydra_record(cfg: DictConfig) -> dict[str, str]:
    """Hydra's run record (config, hydra config, overrides), as Hydra would write it."""
    hydra_cfg = HydraConfig.get()
    return {f"{HYDRA_RECORD}/config.yaml": OmegaConf.to_yaml(cfg),
            f"{HYDRA_RECORD}/hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})),
            f"{HYDRA_RECORD}/overrides.yaml": OmegaConf.to_yaml(list(hydra_cfg.overrides.task))}


# Errors whose message names what to change (a config value, a run folder holding another
# config or locked by another process, a missing or damaged dataset): the entry points
# print that message alone and exit with USER_ERROR_EXIT.
USER_ERRORS = (ConfigValueError, ConfigMismatchError, RunLockedError, DatasetMissingError,
               DatasetDamagedError)
USER_ERROR_EXIT = 2


def run_main(cfg: DictConfig, build: Callable) -> dict:
    """Train; a stop signal exits with 128+signal so schedulers see the interruption, a
    `USER_ERRORS` error with `USER_ERROR_EXIT` after printing its message alone (in a
    multirun it is raised, so Hydra fails that job and goes on with the others).

    The run's protocol is what its preset (`experiment=`) composes to alone, so a group
    chosen on the command line (`optim=he_bn`) is a change of it; without a preset, what
    the chosen groups compose to."""
    hydra_cfg = HydraConfig.get()
    choices, name = dict(hydra_cfg.runtime.choices), hydra_cfg.job.config_name
    defaults = group_defaults(name, choices)
    preset = choices.get("experiment")
    try:
        summary = train(to_plain(cfg), build, records=hydra_record(cfg), defaults=defaults,
                        protocol=group_defaults(name, {"experiment": preset}) if preset else defaults)
    except USER_ERRORS as e:   # the message says what to change: no traceback
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise          # Hydra records the job as failed and runs the others
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    finally:   # a refused invocation leaves no empty run folder (a run's folder never is empty)
        remove_empty_folders(Path(hydra_cfg.runtime.output_dir), Path(cfg.paths.out_dir))
    if summary["status"] == schema.INTERRUPTED or summary.get("signal"):
        # A signal that came as the run finished still ends the process (and a multirun).
        sys.exit(128 + int(summary.get("signal") or 15))
    return summary
