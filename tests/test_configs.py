"""Every config composes, every preset names a real table cell and builds its model."""
from __future__ import annotations

import csv
import re
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from per import models, schema
from per.data.cifar import NORMALIZATIONS
from per.training.checks import config_differences
from per.training.run import build_regularizer, run_length
from runner_utils import ROOT, compose_config

PRESETS = sorted(p.stem for p in (ROOT / "configs/experiment").glob("*.yaml"))
PAPER = {tuple(r[k] for k in schema.CELL_KEYS)
         for r in csv.DictReader(open(ROOT / "results/paper/paper_tables.csv"))}


def test_presets_match_their_generator():
    out = subprocess.run([sys.executable, str(ROOT / "scripts/make_presets.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_one_preset_per_table_cell():
    t1 = [p for p in PRESETS if p.startswith("t1_")]
    t2 = [p for p in PRESETS if p.startswith("t2_")]
    t3 = [p for p in PRESETS if p.startswith("t3_")]
    assert (len(t1), len(t2), len(t3)) == (2 * 2 * 5, 2 * 3 * 4, 2 * 4 * 5)
    paper_cells = {c for c in PAPER}
    covered = set()
    for name in t1 + t2 + t3:
        cfg = compose_config("train_lm" if name.startswith("t3_") else "train_cifar",
                             [f"experiment={name}"], "unused")
        cell = schema.cell_of(cfg)
        covered.add(tuple(cell[k] for k in schema.CELL_KEYS))
    assert paper_cells <= covered, sorted(paper_cells - covered)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_builds(name):
    task = "lm" if name.startswith("t3_") else "cifar"
    cfg = compose_config(f"train_{task}", [f"experiment={name}"], "unused")
    assert cfg["preset"] == name
    method = cfg["method"]
    assert method["lam"] in method["lam_grid"]
    kwargs = {k: v for k, v in cfg["model"].items() if k != "name"}
    if task == "lm":
        assert kwargs["rbn"] == (method["name"] == "rbn")
        kwargs.update(vocab_size=50, hidden_size=8)
        model = models.create(cfg["model"]["name"], **kwargs)
    else:
        model = models.create(cfg["model"]["name"], **kwargs)
        assert cfg["data"]["normalize"] in NORMALIZATIONS
    reg = build_regularizer(model, method)
    assert (reg is None) == (method["name"] in ("vanilla", "rbn"))


@pytest.mark.parametrize("name", PRESETS)
def test_presets_only_override(name):
    """Every value a preset sets differs from what its groups give without it."""
    task = "lm" if name.startswith("t3_") else "cifar"
    preset = OmegaConf.to_container(OmegaConf.load(ROOT / f"configs/experiment/{name}.yaml"))
    groups = [entry.removeprefix("override /").replace(": ", "=")
              for entry in (f"{k}: {v}" for d in preset.pop("defaults") for k, v in d.items())]
    assert preset.pop("preset") == name
    without = compose_config(f"train_{task}", groups, "unused")
    for key, value in _flatten(preset).items():
        assert _get(without, key) != value, f"{name} restates {key}={value!r}"


def _flatten(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _get(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg.get(part, {}) if isinstance(cfg, dict) else {}
    return cfg


# Old run records (tests/old_configs/, composed before model.rbn, before l1/l2/vcl lost
# num_slices/share_directions and presets their `table`) and what composes that run now.
OLD_RUNS = {"t3_ptb_vd_lstm_l1": ("train_lm", ["experiment=t3_ptb_vd_lstm_l1"]),
            "t3_ptb_lstm_rbn": ("train_lm", ["experiment=t3_ptb_lstm_rbn"]),
            "t1_cifar100_resnet56_l2": ("train_cifar", ["experiment=t1_cifar100_resnet56_l2"]),
            "t2_cifar10_elu_vcl": ("train_cifar", ["experiment=t2_cifar10_elu_vcl"]),
            "cifar10-resnet56-none-relu-l1": ("train_cifar", ["method=l1"])}


# Fixup runs written before `optim.drop_last` dropped the last partial batch; the Fixup
# protocol now keeps it, so they are other runs (the VCL protocol still drops it).
DROP_LAST_CHANGED = ["data.drop_last: <absent: the run had True> -> False",
                     "optim.drop_last: <absent: the run had True> -> False"]


@pytest.mark.parametrize("old", sorted(OLD_RUNS))
def test_runs_stored_before_the_config_changes_are_the_same_runs(old):
    config_name, overrides = OLD_RUNS[old]
    stored = yaml.safe_load((ROOT / f"tests/old_configs/{old}.yaml").read_text())
    now = compose_config(config_name, overrides)
    assert now["run_dir"] == stored["run_dir"]
    fixup = now["optim"].get("drop_last") is False
    assert config_differences(stored, now, defaults=now) == (DROP_LAST_CHANGED if fixup else [])
    for key in ("data", "optim"):
        now[key].pop("drop_last", None)
    if "reduction" in stored["method"]:   # before `method.reduction`, runs took the 1/N mean
        del stored["method"]["reduction"]
        assert config_differences(stored, now, defaults=now) == [
            "method.reduction: <absent: the run had 'mean'> -> 'sum'"]
        stored["method"]["reduction"] = "sum"
    assert config_differences(stored, now, defaults=now) == []
    if stored["method"]["name"] in ("l1", "l2", "vcl"):   # a removed key counts at another value
        stored["method"]["num_slices"] = 64
        assert config_differences(stored, now, defaults=now) == ["method.num_slices: 64 -> <absent>"]


def test_method_rbn_sets_the_model_flag_and_lstm_configs_their_variant():
    for model, tied, dropout in (("lstm", False, 0.0), ("re_lstm", True, 0.0), ("vd_lstm", False, 0.5),
                                 ("re_vd_lstm", True, 0.5)):
        for method in ("vanilla", "rbn"):
            cfg = compose_config("train_lm", [f"model={model}", f"method={method}", "model.hidden_size=8"])
            kwargs = {k: v for k, v in cfg["model"].items() if k != "name"}
            net = models.create(model, vocab_size=20, **kwargs)
            assert (net.tied, net.drop.p, net.rbn) == (tied, dropout, method == "rbn")
            assert cfg["model"]["hidden_size"] == 8 and cfg["model"]["num_layers"] == 2


def test_trainer_epochs_shortens_a_step_protocol_only_below_its_epochs():
    """He et al.'s 64k steps set the epochs a split needs (164 of 391 batches, 182 of
    352); `trainer.epochs` below the protocol's 164 shortens the run, not silently ignored."""
    def length(overrides, batches):
        return run_length(compose_config("train_cifar", ["experiment=t1_cifar10_resnet56_bn", *overrides], "x"),
                          batches)
    assert length([], 391) == (164, 64000, 64000)
    assert length([], 352) == (182, 64000, 64000)            # a selection run on 45k images
    assert length(["trainer.epochs=2"], 391) == (2, 64000, 782)
    assert length(["trainer.epochs=2", "trainer.max_steps=100"], 391) == (2, 100, 100)
    assert length(["trainer.epochs=300"], 391) == (164, 64000, 64000)   # the steps cap it


def test_protocols_match_design():
    fixup = compose_config("train_cifar", ["experiment=t1_cifar10_resnet56_per"], "x")
    assert fixup["optim"]["schedule_args"]["milestones"] == [100, 150] and fixup["trainer"]["epochs"] == 200
    assert fixup["optim"]["bias_lr_mult"] == 0.1 and fixup["data"]["mixup_alpha"] == 0.0
    assert fixup["data"]["normalize"] == "channel"
    he = compose_config("train_cifar", ["experiment=t1_cifar10_resnet110_bn"], "x")
    assert he["optim"]["total_steps"] == 64000 and he["optim"]["schedule_args"]["warmup_steps"] == 400
    assert he["model"]["norm"] == "bn" and he["data"]["normalize"] == "pixel_mean"
    he56 = compose_config("train_cifar", ["experiment=t1_cifar10_resnet56_bn"], "x")
    assert he56["optim"]["schedule_args"]["warmup_steps"] == 0
    vcl = compose_config("train_cifar", ["experiment=t2_cifar100_elu_vcl"], "x")
    assert vcl["data"]["batch_size"] == 250 and vcl["optim"]["clip_mode"] == "per_param"
    assert vcl["method"]["lam"] == 0.01 and vcl["optim"]["nesterov"]
    assert vcl["data"]["normalize"] == "pixel_standardize"
    c100 = compose_config("train_cifar", ["experiment=t2_cifar100_relu_per"], "x")
    assert c100["method"]["lam_grid"] == [3e-6, 1e-6, 3e-7, 1e-7]
    lm = compose_config("train_lm", ["experiment=t3_ptb_vd_lstm_l2"], "x")
    assert lm["optim"]["clip_norm"] == 0.25 and lm["trainer"]["epochs"] == 60
    assert lm["model"]["dropout"] == 0.5 and lm["data"]["bptt"] == 35 and lm["data"]["batch_size"] == 20
    assert lm["method"]["lam_grid"][-1] == 1e-7


def test_run_directory_follows_design():
    cfg = compose_config("train_cifar", ["experiment=t1_cifar10_resnet56_per", "data.val_size=5000",
                                         "method.lam=3e-5", "seed=2", "paths.runs_dir=R"])
    assert cfg["run_dir"] == "R/cifar/t1_cifar10_resnet56_per-val5000/lam=3e-05,seed=2"
    cfg = compose_config("train_lm", ["experiment=t3_ptb_lstm_per", "paths.runs_dir=R"])
    assert cfg["run_dir"] == "R/lm/t3_ptb_lstm_per/lam=0.0001,seed=0"


def test_bad_method_names_valid_choices():
    with pytest.raises(ValueError, match="valid: vanilla, l1, l2, per, vcl, rbn"):
        build_regularizer(models.create("resnet20"), {"name": "dropout"})


def test_environment_yml_matches_pyproject():
    tomllib = pytest.importorskip("tomllib")     # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = meta["dependencies"] + meta["optional-dependencies"]["dev"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    norm = lambda spec: re.sub(r"\s+", "", spec.lower())
    assert {norm(s) for s in declared} == {norm(s) for s in pip if not s.startswith("-e")}


@pytest.mark.parametrize("launcher,target", [("joblib", "JoblibLauncher"), ("slurm", "SlurmLauncher")])
def test_launchers_compose(launcher, target):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train_cifar", [f"launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)


@pytest.mark.parametrize("arg, refused", [
    ("experiment=t1_cifar10_resnet56_pr", "t1_cifar10_resnet56_pr"),
    ("experiment='t1_cifar10_resnet56_pr'", "t1_cifar10_resnet56_pr"),            # quoted
    ("++experiment=t1_cifar10_resnet56_per, t1_cifar10_resnet56_pr", "t1_cifar10_resnet56_pr"),  # a multirun's
    ("experiment=choice(t3_ptb_lstm_per,t3_ptb_lstm_pr)", "t3_ptb_lstm_pr"),
    ("experiment=t1_cifar10_resnet56_per", None),
    ("experiment='t1_cifar10_resnet56_per'", None),
    ("experiment=[t1_cifar10_resnet56_per]", None),
    ("experiment=t1_cifar10_resnet56_per, t3_ptb_lstm_per", None),
    ("experiment=NULL", None), ("~experiment", None), ("experiment=glob(t1_*)", None),
    ("experiment=range(1,3)", None), ("model=resnet20", None),
])
def test_a_misspelt_preset_is_refused_and_valid_hydra_syntax_is_not(arg, refused, capsys):
    """`check_presets` reads arguments as Hydra does (quotes, lists, sweeps, NULL, deletion)."""
    from experiments.common import USER_ERROR_EXIT, check_presets
    if refused is None:
        check_presets(["-m", arg])
        return
    with pytest.raises(SystemExit) as exit_:
        check_presets([arg])
    assert exit_.value.code == USER_ERROR_EXIT
    assert f"unknown preset {refused!r}; did you mean " in capsys.readouterr().err


def test_each_job_of_a_multirun_is_checked_before_any_runs(capsys):
    from experiments.common import USER_ERROR_EXIT, check_multirun_jobs
    base = ["-m", "experiment=t1_cifar10_resnet56_per", "seed=range(0,2)"]
    for bad, message in (("method.lam=1e-8,abc", "job #1 (experiment=t1_cifar10_resnet56_per seed=0 method.lam=abc)"
                                                 " of the multirun, before any job ran: invalid config value:\n"
                                                 "  method.lam='abc'"),
                         ("~trainer.log_every", "job #0 "), ("+method.lamda=1,2", "job #0 ")):
        with pytest.raises(SystemExit) as exit_:
            check_multirun_jobs("train_cifar", [*base, bad])
        assert exit_.value.code == USER_ERROR_EXIT and message in capsys.readouterr().err, bad
    check_multirun_jobs("train_cifar", [*base, "method.lam=1e-4,3e-5", "hydra.launcher.n_jobs=2", "launcher=joblib"])
    with pytest.raises(SystemExit):                                           # composed with the launcher too
        check_multirun_jobs("train_cifar", [*base, "method.lam=abc", "hydra.launcher.n_jobs=2", "launcher=joblib"])
    assert "job #0 " in capsys.readouterr().err
    check_multirun_jobs("train_cifar", ["method.lam=abc"])                    # one run: train() checks it
    check_multirun_jobs("train_cifar", ["-m", "experiment=glob(t1_cifar10_resnet56_*)", "method.lam=abc"])  # Hydra's


def test_presets_are_not_checked_against_another_config_search_path():
    from experiments.common import check_presets
    for elsewhere in (["--config-dir", "/elsewhere"], ["-cp", "/elsewhere"], ["--config-path=/elsewhere"],
                      ["hydra.searchpath=[file:///elsewhere]"], ["++hydra.searchpath=[file:///elsewhere]"]):
        check_presets([*elsewhere, "experiment=my_own_preset"])
