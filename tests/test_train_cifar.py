"""End-to-end tests of the image-classification runner on generated CIFAR pickles."""
from __future__ import annotations

import functools
import json
import signal

import pytest
import torch

from per import schema
from per.data.cifar import write_fake_cifar
from per.data.download import DatasetMissingError
from per.training import run as run_mod
from per.training.image_task import build_image_experiment
from per.training.loop import fit
from per.training.run import ConfigMismatchError, train
from runner_utils import CPU_SMOKE, compose_config, metrics, without_timing


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, "cifar10", n_train=256, n_test=64, seed=0)
    write_fake_cifar(root, "cifar100", n_train=256, n_test=64, seed=1)
    return root


def _cfg(data_root, run_dir, *overrides):
    return compose_config("train_cifar", [
        *CPU_SMOKE, f"data.root={data_root}", "data.verify_checksums=false",
        "data.batch_size=32", "data.eval_batch_size=64", "data.probe_size=16",
        "++method.num_slices=16", "trainer.log_every=2", *overrides], run_dir)


MODELS = [("resnet20", "none", None), ("resnet20", "bn", None)] + [
    ("elu_cnn11", norm, act) for act in ("relu", "leaky_relu", "elu") for norm in ("none", "bn")]
METHODS = ["vanilla", "l1", "l2", "per", "vcl"]
QUICK = {("resnet20", "none", None, "per"), ("resnet20", "bn", None, "vanilla"),
         ("elu_cnn11", "none", "relu", "vcl")}
CASES = [pytest.param(*m, method, marks=() if (*m, method) in QUICK else pytest.mark.slow)
         for m in MODELS for method in METHODS]


@pytest.mark.parametrize("model,norm,act,method", CASES)
def test_every_model_and_method_trains(data_root, tmp_path, model, norm, act, method):
    overrides = [f"model={model}", f"model.norm={norm}", f"method={method}", "trainer.max_steps=2",
                 "trainer.epochs=1"]
    if act:
        overrides.append(f"model.activation={act}")
    summary = train(_cfg(data_root, tmp_path, *overrides), build_image_experiment)
    assert summary["status"] == schema.FINISHED
    assert summary["steps"] == 2
    assert summary["cell"]["method"] == schema.method_label(method, norm)
    assert summary["cell"]["activation"] == (act or "relu")
    assert 0.0 <= summary["final"]["test_error"] <= 100.0
    row = metrics(tmp_path)[0]
    if method == "vanilla":
        assert "penalty" not in row
    else:
        # Infinite (null) where the task gradient is exactly zero: Fixup's zero-init branches.
        ratios = [v for k, v in row.items() if k.startswith("grad_ratio/") and v is not None]
        assert ratios and all(r >= 0 for r in ratios)
        assert row["penalty"] > 0


def test_run_directory_contract(data_root, tmp_path):
    cfg = _cfg(data_root, tmp_path, "model=resnet20", "method=per", "trainer.epochs=2",
               "data.val_size=64", "trainer.monitor.every=4", "seed=3")
    summary = train(cfg, build_image_experiment)
    assert set(schema.SUMMARY_KEYS) <= set(summary)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["status"] == "finished" and on_disk["seed"] == 3 and on_disk["lam"] == 1e-4
    assert on_disk["cell"] == {"table": "T1", "dataset": "cifar10", "model": "resnet20",
                               "activation": "relu", "method": "per"}
    assert on_disk["epochs_completed"] == 2 and on_disk["steps"] == 12   # 192 train images / 32
    assert on_disk["best"]["epoch"] in (1, 2) and "val_error" in on_disk["best"]
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "checkpoints/last.pt").exists()
    rows = metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "penalty", "val_error", "test_error", "lr", "images_per_s"):
        assert key in rows[0]
    acts = [json.loads(l) for l in (tmp_path / "activations.jsonl").read_text().splitlines()]
    assert {a["step"] for a in acts} == {0, 4, 8, 12}
    assert all(len(a["q50"]) == len(a["units"]) == 4 and a["sw1"] > 0 for a in acts)
    # A finished run is skipped when invoked again.
    again = train(cfg, build_image_experiment)
    assert again == on_disk


@pytest.mark.slow
def test_resume_after_sigterm_mid_epoch_is_exact(data_root, tmp_path, monkeypatch):
    overrides = ["model=resnet20", "method=per", "trainer.epochs=2", "data.mixup_alpha=1.0"]
    ref = train(_cfg(data_root, tmp_path / "ref", *overrides), build_image_experiment)

    def kill_at(step):
        if step == 9:   # epoch 2, batch 3 of 6
            signal.raise_signal(signal.SIGTERM)
    monkeypatch.setattr(run_mod, "fit", functools.partial(fit, on_step=kill_at))
    cut = train(_cfg(data_root, tmp_path / "cut", *overrides), build_image_experiment)
    assert cut["status"] == schema.INTERRUPTED and cut["steps"] == 9
    assert (tmp_path / "cut/checkpoints/last.pt").exists()
    assert json.loads((tmp_path / "cut/summary.json").read_text())["status"] == "interrupted"
    monkeypatch.undo()
    resumed = train(_cfg(data_root, tmp_path / "cut", *overrides), build_image_experiment)
    assert resumed["status"] == schema.FINISHED and resumed["steps"] == ref["steps"]
    assert without_timing(resumed["final"]) == without_timing(ref["final"])
    assert [without_timing(r) for r in metrics(tmp_path / "cut")] == [without_timing(r) for r in metrics(tmp_path / "ref")]


def test_non_finite_loss_is_recorded_as_diverged(data_root, tmp_path):
    cfg = _cfg(data_root, tmp_path, "model=resnet20", "model.norm=bn", "optim.lr=1e12", "trainer.epochs=2")
    summary = train(cfg, build_image_experiment)
    assert summary["status"] == schema.DIVERGED
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["status"] == "diverged"
    assert train(cfg, build_image_experiment) == on_disk   # a divergence is a result: not re-run


def test_missing_dataset_gives_clear_error_and_failed_record(tmp_path):
    cfg = _cfg(tmp_path / "nowhere", tmp_path / "run", "model=resnet20")
    with pytest.raises(DatasetMissingError, match="data_batch_1"):
        train(cfg, build_image_experiment)
    assert json.loads((tmp_path / "run/summary.json").read_text())["status"] == "failed"


def test_changed_config_in_same_run_dir_is_refused(data_root, tmp_path):
    train(_cfg(data_root, tmp_path, "model=resnet20", "trainer.max_steps=1"), build_image_experiment)
    with pytest.raises(ConfigMismatchError, match="another configuration"):
        train(_cfg(data_root, tmp_path, "model=resnet20", "trainer.max_steps=1", "seed=5"),
              build_image_experiment)


def test_wandb_offline_writes_local_run(data_root, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(data_root, tmp_path, "model=resnet20", "trainer.max_steps=2", "logger.mode=offline")
    summary = train(cfg, build_image_experiment)
    assert summary["status"] == schema.FINISHED
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_bf16_autocast_run(data_root, tmp_path):
    summary = train(_cfg(data_root, tmp_path, "model=resnet20", "method=per", "trainer.precision=bf16",
                         "trainer.max_steps=2"), build_image_experiment)
    assert summary["status"] == schema.FINISHED and 0 <= summary["final"]["test_error"] <= 100


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_monitoring_does_not_change_training(data_root, tmp_path, norm):
    """Snapshots (train-mode BN on the probe batch) leave weights, BN running statistics,
    RNG streams (PER directions, mixup) and metrics exactly as without monitoring."""
    runs = [train(_cfg(data_root, tmp_path / str(every), "model=resnet20", f"model.norm={norm}",
                       "method=per", "data.mixup_alpha=1.0", "trainer.max_steps=4",
                       f"trainer.monitor.every={every}"), build_image_experiment)
            for every in (0, 2)]
    assert (tmp_path / "2/activations.jsonl").exists() and not (tmp_path / "0/activations.jsonl").exists()
    assert without_timing(runs[0]["final"]) == without_timing(runs[1]["final"])
    off, on = (torch.load(tmp_path / f"{every}/checkpoints/last.pt", weights_only=False)["model"]
               for every in (0, 2))
    assert off.keys() == on.keys() and all(torch.equal(off[k], on[k]) for k in off)


def test_finished_run_is_skipped_when_only_paths_or_launch_settings_change(data_root, tmp_path):
    first = train(_cfg(data_root, tmp_path, "model=resnet20", "trainer.max_steps=1"), build_image_experiment)
    again = train(_cfg(data_root, tmp_path, "model=resnet20", "trainer.max_steps=1", "paths.runs_dir=/elsewhere",
                       "trainer.gpus=[0,1]", "data.download=true"), build_image_experiment)
    assert again == json.loads((tmp_path / "summary.json").read_text())
    assert again["wall_time_s"] == first["wall_time_s"]
