"""End-to-end tests of the image-classification runner on generated CIFAR pickles."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import runpy
import signal
import stat
from pathlib import Path

import pytest
import torch
import yaml

import per.regularizers
from per import schema
from per.data.cifar import write_fake_cifar
from per.data.download import DatasetMissingError
from per.training import run as run_mod
from per.training import runtime
from per.training.checks import ConfigValueError
from per.training.image_task import build_image_experiment
from per.training.loop import fit
from per.training.records import BEST_CHECKPOINT, CheckpointError, RunDir, RunLockedError
from per.training.run import ConfigMismatchError, train
from runner_utils import CPU_SMOKE, ROOT, compose_config, metrics, without_timing


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


def _wrong_test_images(test_error: float) -> float:
    """The test images (64 in `data_root`) a test error in percent counts as wrong."""
    return test_error * 64 / 100


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
    row = metrics(tmp_path)[0]
    assert summary["final"]["test_error"] == row["test_error"]
    assert row["epoch_time_s"] > 0 and row["eval_time_s"] > 0
    wrong = _wrong_test_images(row["test_error"])   # percent of the 64 test images
    assert wrong == pytest.approx(round(wrong))
    if method == "vanilla":
        assert "penalty" not in row
    else:
        # Infinite (null) where the task gradient is exactly zero: Fixup's zero-init branches.
        ratios = [v for k, v in row.items() if k.startswith("grad_ratio/") and v is not None]
        assert ratios and all(r >= 0 for r in ratios)
        assert row["penalty"] > 0


def test_an_epoch_without_a_tracked_step_records_no_penalty_rather_than_zero(data_root, tmp_path):
    # 8 steps per epoch, tracked at steps 0 and 20: the second epoch has none.
    train(_cfg(data_root, tmp_path, "model=resnet20", "method=per", "trainer.epochs=3",
               "trainer.log_every=20"), build_image_experiment)
    penalties = [row["penalty"] for row in metrics(tmp_path)]
    assert penalties[0] > 0 and penalties[1] is None and penalties[2] > 0


def test_flatten_layout_with_subspace_sampling_trains(data_root, tmp_path, monkeypatch):
    implicit = []
    monkeypatch.setattr(per.regularizers, "per_grad_subspace",
                        lambda x, *a, **k: implicit.append(x.shape) or per.per_grad_subspace(x, *a, **k))
    # Batch 4 with 16 slices: N = 4 <= s / 4, so the sites take the implicit route.
    summary = train(_cfg(data_root, tmp_path, "model=resnet20", "method=per", "method.layout=flatten",
                         "method.sampling=subspace", "data.batch_size=4", "trainer.max_steps=2",
                         "trainer.epochs=1"), build_image_experiment)
    assert summary["status"] == schema.FINISHED and summary["steps"] == 2
    assert len(implicit) == 2 * 19 and all(shape[0] == 4 for shape in implicit)   # 19 sites
    row = metrics(tmp_path)[0]
    assert row["penalty"] > 0 and any(k.startswith("grad_ratio/") and v for k, v in row.items())


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


def test_a_kill_between_last_and_best_checkpoint_is_repaired_on_resume(data_root, tmp_path, monkeypatch,
                                                                      caplog):
    """best.pt is written after last.pt; a resume from the end of the best epoch writes the
    best.pt that the kill prevented, from the restored (that epoch's) weights."""
    from per.training import records
    save = records.RunDir.save_checkpoint

    def killed_at_best(self, state, name=records.CHECKPOINT):
        if name == records.BEST_CHECKPOINT:
            raise KeyboardInterrupt("killed between last.pt and best.pt")
        save(self, state, name)
    monkeypatch.setattr(records.RunDir, "save_checkpoint", killed_at_best)
    cfg = _cfg(data_root, tmp_path, "model=resnet20", "trainer.epochs=2", "data.val_size=64")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, build_image_experiment)
    assert (tmp_path / "checkpoints/last.pt").exists() and not (tmp_path / "checkpoints/best.pt").exists()
    monkeypatch.undo()
    weights_after_epoch_1 = torch.load(tmp_path / "checkpoints/last.pt", weights_only=False)["model"]
    with caplog.at_level(logging.INFO, logger="per.training.loop"):
        done = _relaunch_unfinished(cfg, tmp_path)
    assert done["status"] == schema.FINISHED
    assert "writing checkpoints/best.pt for epoch 1" in caplog.text   # the first epoch is always best
    best = torch.load(tmp_path / "checkpoints/best.pt", weights_only=False)
    assert best["epoch"] == done["best"]["epoch"]
    if best["epoch"] == 1:
        assert all(torch.equal(best["model"][k], v) for k, v in weights_after_epoch_1.items())


def test_a_second_stop_signal_stops_at_once_and_the_run_resumes(data_root, tmp_path, monkeypatch):
    from per.training.loop import ForcedStop

    def twice_at(step):
        if step == 9:     # epoch 2 of 6-step epochs: the second signal comes before any checkpoint
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
    monkeypatch.setattr(run_mod, "fit", functools.partial(fit, on_step=twice_at))
    cfg = _cfg(data_root, tmp_path, "model=resnet20", "trainer.epochs=2", "data.val_size=64")
    with pytest.raises(ForcedStop) as stop:
        train(cfg, build_image_experiment)
    assert stop.value.code == 128 + signal.SIGTERM
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == schema.INTERRUPTED
    monkeypatch.undo()
    resumed = train(cfg, build_image_experiment)           # from the end of epoch 1
    assert resumed["status"] == schema.FINISHED and resumed["steps"] == 12


@pytest.mark.parametrize("kill_step,status,steps", [(12, schema.FINISHED, 12),    # last step: finishes
                                                     (6, schema.INTERRUPTED, 6)])  # end of epoch 1
def test_a_stop_at_the_end_of_the_last_epoch_finishes_the_run(data_root, tmp_path, monkeypatch,
                                                             kill_step, status, steps):
    """The last epoch's evaluation still runs: its records are complete (it was `interrupted`,
    and a relaunch rebuilt everything only to say `finished`)."""
    def kill_at(step):
        if step == kill_step:
            signal.raise_signal(signal.SIGTERM)
    monkeypatch.setattr(run_mod, "fit", functools.partial(fit, on_step=kill_at))
    out = train(_cfg(data_root, tmp_path, "model=resnet20", "trainer.epochs=2", "data.val_size=64"),
                build_image_experiment)                      # 6 steps per epoch
    assert out["status"] == status and out["steps"] == steps
    assert out["signal"] == signal.SIGTERM     # run_main exits 128 + 15 either way
    assert len(metrics(tmp_path)) == steps // 6


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
    assert on_disk["wall_time_s"] > 0          # a mid-epoch divergence keeps the epoch's time
    assert train(cfg, build_image_experiment) == on_disk   # a divergence is a result: not re-run


@pytest.mark.parametrize("stdout,stderr,bar", [(True, True, True), (False, True, False),
                                              (True, False, False), (False, False, False)])
def test_a_bar_only_where_both_streams_are_a_terminal(monkeypatch, stdout, stderr, bar):
    """`> run.log` from a terminal: the log lines go to the file, so progress lines must too."""
    from per.training import run as run_mod
    monkeypatch.setattr(run_mod.sys, "stdout", type("S", (), {"isatty": lambda self: stdout})())
    monkeypatch.setattr(run_mod.sys, "stderr", type("S", (), {"isatty": lambda self: stderr})())
    assert run_mod._on_terminal() is bar


def test_missing_dataset_gives_clear_error_and_failed_record(tmp_path):
    cfg = _cfg(tmp_path / "nowhere", tmp_path / "run", "model=resnet20")
    with pytest.raises(DatasetMissingError, match="data_batch_1"):
        train(cfg, build_image_experiment)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("DatasetMissingError: ")
    assert "data_batch_1" in summary["error"] and "\n" not in summary["error"]


def test_a_failed_runs_error_is_one_line_of_bounded_length():
    """A multi-line message (a `ConfigValueError` listing keys) on one line, a huge one cut."""
    assert run_mod.error_text(ValueError("bad values:\n  a=1\n  b=2")) == "ValueError: bad values: a=1 b=2"
    long = run_mod.error_text(RuntimeError("x" * 1000))
    assert len(long) == 500 and long.startswith("RuntimeError: xxx") and long.endswith("...")


def test_a_batch_larger_than_the_data_is_named_and_the_fixed_command_runs(data_root, tmp_path):
    """The error names the sizes; the failed attempt left no checkpoint, so the corrected
    command starts the run over in the same directory instead of being refused."""
    with pytest.raises(ValueError, match=r"less than one training batch \(data.batch_size=512"):
        train(_cfg(data_root, tmp_path, "model=resnet20", "data.batch_size=512", "data.drop_last=true"),
              build_image_experiment)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"
    summary = train(_cfg(data_root, tmp_path, "model=resnet20", "trainer.max_steps=1"), build_image_experiment)
    assert summary["status"] == "finished" and summary["steps"] == 1 and "error" not in summary
    assert "error" not in json.loads((tmp_path / "summary.json").read_text())


def test_the_last_partial_batch_trains_as_its_protocol_says(data_root, tmp_path):
    """Fixup's protocol keeps the last partial batch (a DataLoader default: 391 batches of
    50k at 128), the VCL protocol drops it (floor(N / batch))."""
    fixup = train(_cfg(data_root, tmp_path / "fixup", "model=resnet20", "method=per", "data.batch_size=48",
                       "trainer.epochs=1"),
                  build_image_experiment)
    assert fixup["steps"] == 6                       # 256 images: 5 x 48 + 16
    vcl = train(_cfg(data_root, tmp_path / "vcl", "experiment=t2_cifar10_elu_vcl", "data.batch_size=48",
                     "trainer.epochs=1"), build_image_experiment)
    assert vcl["steps"] == 5


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


@pytest.mark.slow   # compiles ResNet-20 on CPU
def test_a_compiled_run_monitors_its_sites(data_root, tmp_path):
    """The monitor captures the sites of the model itself (a compiled model names them
    `_orig_mod.<site>`): every monitored run stopped at step 0 with `trainer.compile` on."""
    rows = {}
    for compiled in ("false", "true"):
        train(_cfg(data_root, tmp_path / compiled, "model=resnet20", "method=per", "trainer.max_steps=2",
                   "trainer.monitor.every=1", f"trainer.compile={compiled}"), build_image_experiment)
        rows[compiled] = RunDir(tmp_path / compiled).read_jsonl("activations.jsonl")
    steps = [r["step"] for r in rows["true"]]
    assert steps == [r["step"] for r in rows["false"]] and set(steps) == {0, 1, 2}
    assert [r for r in rows["true"] if r["step"] == 0] == [r for r in rows["false"] if r["step"] == 0]   # same weights


def test_finished_run_is_skipped_when_only_paths_or_launch_settings_change(data_root, tmp_path):
    first = train(_cfg(data_root, tmp_path, "model=resnet20", "trainer.max_steps=1"), build_image_experiment)
    again = train(_cfg(data_root, tmp_path, "model=resnet20", "trainer.max_steps=1", "paths.runs_dir=/elsewhere",
                       "trainer.gpus=[0,1]", "data.download=true"), build_image_experiment)
    assert again == json.loads((tmp_path / "summary.json").read_text())
    assert again["wall_time_s"] == first["wall_time_s"]


def test_console_lines_go_through_logging(data_root, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="per")
    cfg = _cfg(data_root, tmp_path, "model=resnet20", "trainer.epochs=2")
    train(cfg, build_image_experiment)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("per")]
    assert lines[0].startswith(f"run {tmp_path} | device {runtime.device_info(torch.device('cpu'))['name']} |")
    assert "parameters | 16 steps planned (2 epochs of 8 batches)" in lines[0]
    assert [l.split(" |")[0] for l in lines[1:3]] == ["epoch 1/2 step 8", "epoch 2/2 step 16"]
    assert "test_error=" in lines[1] and "train_loss=" in lines[1]
    assert lines[3].startswith(f"finished {tmp_path} | train_loss=") and "wall" in lines[3]
    caplog.clear()
    train(cfg, build_image_experiment)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [f"skipping {tmp_path}"]


def test_a_lambda_off_the_band_is_warned_after_the_second_and_the_last_epoch(data_root, tmp_path, caplog):
    """The run's own site gradient ratios say whether its lambda acts (`per.strength.BAND`).
    Not after the first epoch: there Fixup's zero-initialized layers make most ratios
    infinite whatever lambda is (measured: median inf at 1e-12, 2e-9 in the second epoch)."""
    caplog.set_level(logging.INFO, logger="per")
    train(_cfg(data_root, tmp_path / "weak", "model=resnet20", "method=per", "method.lam=1e-12",
               "trainer.epochs=3"), build_image_experiment)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [w.split(":")[0] for w in warned] == ["epoch 2", "epoch 3"]
    assert all("below 0.001: the penalty barely acts (PER at lambda=1e-12)" in w for w in warned)
    caplog.clear()
    train(_cfg(data_root, tmp_path / "plain", "model=resnet20", "trainer.epochs=1"), build_image_experiment)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]          # no penalty, no ratio


def test_without_a_bar_progress_lines_are_logged(data_root, tmp_path, caplog, monkeypatch):
    """Output to a file (no bar): the host reads log progress lines, here every read
    (`PROGRESS_LINE_S` = 0; 60 s by default)."""
    import per.training.loop as loop
    monkeypatch.setattr(loop, "PROGRESS_LINE_S", 0.0)
    caplog.set_level(logging.INFO, logger="per")
    train(_cfg(data_root, tmp_path, "model=resnet20", "trainer.epochs=1"), build_image_experiment)
    lines = [r.getMessage() for r in caplog.records if " batch " in r.getMessage()]
    # Reads before steps 1, 3, 5, 7 (log_every 2) and at the epoch's last batch.
    assert [l.split(" |")[0] for l in lines] == [f"epoch 1/1 batch {b}/8 step {b}" for b in (1, 3, 5, 7, 8)]
    assert all("train_loss=" in l and "images/s" in l and "epoch ends in about " in l for l in lines)


def test_divergence_says_so(data_root, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="per")
    train(_cfg(data_root, tmp_path, "model=resnet20", "model.norm=bn", "optim.lr=1e12", "trainer.epochs=2"),
          build_image_experiment)
    assert any(r.getMessage().startswith("diverged: non-finite") for r in caplog.records)
    assert caplog.records[-1].getMessage().startswith(f"diverged {tmp_path}")


def test_progress_bar_counts_the_steps_that_run_and_evaluation(data_root, tmp_path, capsys):
    train(_cfg(data_root, tmp_path, "model=resnet20", "trainer.max_steps=4", "trainer.progress=true"),
          build_image_experiment)
    err = capsys.readouterr().err
    assert "0/4" in err and "/8 " not in err       # 4 of the epoch's 8 batches run
    assert re.search(r"epoch 1/200 eval: .*[01]/1 ", err)   # the test split: one batch of 64


def test_limit_eval_batches(data_root, tmp_path):
    cfg = _cfg(data_root, tmp_path, "model=resnet20", "data.eval_batch_size=16", "data.val_size=64",
               "trainer.limit_eval_batches=2")
    task = build_image_experiment(cfg, torch.device("cpu"), contextlib.nullcontext).task
    model = build_image_experiment(cfg, torch.device("cpu"), contextlib.nullcontext).model
    seen = []
    task.evaluate(model, on_batch=lambda: seen.append(1))
    assert task.eval_batches() == len(seen) == 4       # 2 of 4 batches in each of val and test


@pytest.mark.parametrize("override,allowed", [
    ("method.lam=abc", "a finite number >= 0"), ("data.batch_size=0", "an integer >= 1"),
    ("trainer.max_steps=-1", "null or an integer >= 1"), ("trainer.epochs=-2", "an integer >= 1"),
    ("method.layout=foo", "one of channels, flatten"), ("trainer.limit_eval_batches=0", "null or an integer"),
    ("method.sampling=foo", "one of explicit, subspace")])
def test_bad_values_are_refused_before_anything_is_written(data_root, tmp_path, override, allowed):
    key, value = override.split("=")
    cfg = _cfg(data_root, tmp_path / "run", "model=resnet20", "method=per", override)
    with pytest.raises(ConfigValueError) as err:
        train(cfg, build_image_experiment)
    assert key in str(err.value) and value in str(err.value) and allowed in str(err.value)
    assert not (tmp_path / "run").exists()


def test_refusal_names_each_differing_key_and_changes_nothing(data_root, tmp_path):
    train(_cfg(data_root, tmp_path, "model=resnet20", "trainer.max_steps=1"), build_image_experiment)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigMismatchError) as err:
        train(_cfg(data_root, tmp_path, "model=resnet20", "trainer.max_steps=1", "seed=5", "optim.momentum=0.5",
                   "resume=auto"), build_image_experiment)
    assert "seed: 0 -> 5" in str(err.value) and "optim.momentum: 0.9 -> 0.5" in str(err.value)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_sweep_settings_and_new_keys_at_their_default_do_not_refuse(data_root, tmp_path):
    overrides = ["model=resnet20", "method=per", "trainer.max_steps=1"]
    first = train(_cfg(data_root, tmp_path, *overrides), build_image_experiment)
    stored = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del stored["method"]["path"], stored["trainer"]["limit_eval_batches"]   # as if written before they existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    defaults = compose_config("train_cifar", ["model=resnet20", "method=per"], tmp_path)
    again = train(_cfg(data_root, tmp_path, *overrides, "++method.lam_grid=[1e-3]"), build_image_experiment,
                  defaults=defaults)
    assert again == first
    with pytest.raises(ConfigMismatchError, match=r"method.path: <absent> -> 'autograd'"):
        train(_cfg(data_root, tmp_path, *overrides, "method.path=autograd"), build_image_experiment,
              defaults=defaults)
    # A key that changed what runs do is compared at what the stored run did.
    del stored["method"]["reduction"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    with pytest.raises(ConfigMismatchError, match=r"method.reduction: <absent: the run had 'mean'> -> 'sum'"):
        train(_cfg(data_root, tmp_path, *overrides), build_image_experiment, defaults=defaults)


def test_locked_run_directory_is_refused_naming_the_holder(data_root, tmp_path):
    holder = RunDir(tmp_path)
    holder.lock()
    try:
        with pytest.raises(RunLockedError, match=f"in use by process {os.getpid()}"):
            train(_cfg(data_root, tmp_path, "model=resnet20", "trainer.max_steps=1"), build_image_experiment)
    finally:
        holder.unlock()
    assert not (tmp_path / "config.yaml").exists()
    assert train(_cfg(data_root, tmp_path, "model=resnet20", "trainer.max_steps=1"),
                 build_image_experiment)["status"] == schema.FINISHED


def test_damaged_last_checkpoint_resumes_from_the_previous_one(data_root, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="per")
    cfg = _cfg(data_root, tmp_path, "model=resnet20", "trainer.epochs=2")
    monkeypatch.setattr(runtime, "code_version", lambda: "v1")
    ref = train(cfg, build_image_experiment)
    ckpts = tmp_path / "checkpoints"
    assert torch.load(ckpts / "prev.pt", weights_only=False)["train_state"]["epoch"] == 1
    # As if killed in epoch 2 while last.pt was being copied elsewhere and cut short.
    summary = json.loads((tmp_path / "summary.json").read_text())
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    (ckpts / "last.pt").write_bytes((ckpts / "last.pt").read_bytes()[:1000])
    monkeypatch.setattr(runtime, "code_version", lambda: "v2")
    resumed = train(cfg, build_image_experiment)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"checkpoint {ckpts / 'last.pt'} is damaged") for m in messages)
    assert any(m.startswith(f"resuming {tmp_path} from checkpoints/prev.pt in epoch 2 after batch 0")
               for m in messages)
    assert resumed["status"] == schema.FINISHED and resumed["steps"] == ref["steps"]
    assert without_timing(resumed["final"]) == without_timing(ref["final"])
    assert [a["code_version"] for a in resumed["attempts"]] == ["v1", "v2"] and resumed["code_version"] == "v2"
    assert resumed["attempts"][0]["resumed_from"] is None
    assert resumed["attempts"][1]["resumed_from"] == {"checkpoint": "checkpoints/prev.pt", "epoch": 1,
                                                      "batch": 0, "step": 8}
    assert [r["epoch"] for r in metrics(tmp_path)] == [1, 2]
    assert (ckpts / "last.pt.damaged").exists()


def test_unreadable_checkpoints_keep_refusing_until_resume_never(data_root, tmp_path):
    """Both checkpoints damaged: every relaunch says so and still checks its config (they
    used to be renamed away, so the second relaunch started over with any config)."""
    cfg = _cfg(data_root, tmp_path, "model=resnet20", "trainer.epochs=2")
    train(cfg, build_image_experiment)
    ckpts = tmp_path / "checkpoints"
    for name in ("last.pt", "prev.pt"):
        (ckpts / name).write_bytes((ckpts / name).read_bytes()[:1000])
    for _ in range(2):
        with pytest.raises(CheckpointError, match="no readable checkpoint .* resume=never"):
            _relaunch_unfinished(cfg, tmp_path)
    with pytest.raises(ConfigMismatchError, match="optim.lr"):
        train(_cfg(data_root, tmp_path, "model=resnet20", "trainer.epochs=2", "optim.lr=1"), build_image_experiment)
    assert train({**cfg, "resume": "never"}, build_image_experiment)["status"] == schema.FINISHED


def _relaunch_unfinished(cfg: dict, run_dir) -> dict:
    """Relaunch `cfg` as after a kill: the summary says running."""
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    return train(cfg, build_image_experiment)


def test_a_kill_between_checkpoint_renames_resumes_from_the_newer_one(tmp_path):
    run = RunDir(tmp_path)
    run.save_checkpoint({"epoch": 1})
    run.save_checkpoint({"epoch": 2})        # last.pt = 2, prev.pt = 1
    (tmp_path / "checkpoints/last.pt").rename(tmp_path / "checkpoints/last.pt.new")   # killed mid-rotation
    ckpt, name = run.load_checkpoint()
    assert ckpt == {"epoch": 2} and name == "checkpoints/last.pt.new"
    # ... and finishes the rotation: a run resumed after its last save writes no other
    # checkpoint, and `last.pt` is what users and scripts/strength.py read.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt", "prev.pt"]
    assert run.load_checkpoint() == ({"epoch": 2}, "checkpoints/last.pt")


def test_a_kill_before_the_checkpoint_renames_resumes_from_the_complete_new_one(tmp_path):
    run = RunDir(tmp_path)
    for epoch in (1, 2):
        run.save_checkpoint({"epoch": epoch})   # last.pt = 2, prev.pt = 1
    (tmp_path / "checkpoints/last.pt.new").write_bytes((tmp_path / "checkpoints/last.pt").read_bytes())
    torch.save({"epoch": 3}, tmp_path / "checkpoints/last.pt.new")   # written, not yet rotated in
    assert run.load_checkpoint() == ({"epoch": 3}, "checkpoints/last.pt.new")
    assert run.load_checkpoint() == ({"epoch": 3}, "checkpoints/last.pt")   # the rotation is finished
    assert torch.load(tmp_path / "checkpoints/prev.pt") == {"epoch": 2}


@pytest.mark.parametrize("killed_at", range(1, 9))
def test_a_kill_while_clearing_never_leaves_a_result_without_its_history(tmp_path, monkeypatch, killed_at):
    """resume=never clears the earlier attempt; a kill after any deletion leaves a run that
    either resumes or is done with its metric history, or holds nothing to resume."""
    run = RunDir(tmp_path)
    for epoch in (1, 2):
        run.save_checkpoint({"epoch": epoch})
    run.save_checkpoint({"epoch": 2}, BEST_CHECKPOINT)
    (tmp_path / "summary.json").write_text(json.dumps({"status": "finished"}))
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    deleted, unlink = [], Path.unlink

    def kill_after(path, missing_ok=False):
        unlink(path, missing_ok=missing_ok)
        deleted.append(path.name)
        if len(deleted) == killed_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(Path, "unlink", kill_after)
    with contextlib.suppress(KeyboardInterrupt):
        run.clear()
    monkeypatch.undo()
    if run.holds_result_or_progress():
        assert run.read_jsonl("metrics.jsonl") == [{"epoch": 1}, {"epoch": 2}]


def test_writes_cut_short_by_a_kill_leave_no_temporary_files(tmp_path):
    run = RunDir(tmp_path)
    run.save_checkpoint({"epoch": 1})
    for leftover in (".last.pt.new.x1.tmp", ".best.pt.x2.tmp"):   # as `_atomic_write_bytes` names them
        (tmp_path / "checkpoints" / leftover).write_bytes(b"partial")
    (tmp_path / ".summary.json.x4.tmp").write_text("{")              # a text record cut short
    wandb_run = tmp_path / "wandb" / "offline-run-20260101_000000-abc"
    wandb_run.mkdir(parents=True)
    assert run.load_checkpoint() == ({"epoch": 1}, "checkpoints/last.pt")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt"]
    assert not list(tmp_path.glob(".*.tmp"))
    assert wandb_run.is_dir()                        # a resume keeps the W&B run's files
    (tmp_path / "checkpoints" / ".last.pt.x3.tmp").write_bytes(b"partial")
    run.clear()                                      # resume=never
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_read_jsonl_skips_a_line_cut_short_by_a_kill(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2, "tra')
    assert run.read_jsonl("metrics.jsonl") == [{"epoch": 1}]


def test_a_fresh_start_removes_the_earlier_attempts_files(tmp_path):
    """W&B runs, a rotation's leftover last.pt.new and set-aside damaged checkpoints:
    none may be taken for the new attempt's (the .new one would be resumed from)."""
    old = tmp_path / "wandb" / "offline-run-20260101_000000-abc"
    old.mkdir(parents=True)
    (tmp_path / "wandb" / "cache").mkdir()
    run = RunDir(tmp_path)
    run.save_checkpoint({"epoch": 1})
    (tmp_path / "checkpoints/last.pt").rename(tmp_path / "checkpoints/last.pt.new")
    (tmp_path / "checkpoints/prev.pt.damaged").write_bytes(b"x")
    assert run.holds_result_or_progress()            # the .new checkpoint is progress
    run.clear()
    assert not old.exists() and (tmp_path / "wandb" / "cache").exists()
    assert list((tmp_path / "checkpoints").iterdir()) == [] and run.load_checkpoint() is None


def test_wandb_is_finished_before_the_summary_says_finished_and_resumes_replay_rows(
        data_root, tmp_path, monkeypatch):
    from per.training import loggers
    events = []
    monkeypatch.setattr(loggers.WandbSink, "finish", lambda self, summary=None, exit_code=0: events.append(
        ("finish", json.loads((tmp_path / "summary.json").read_text())["status"])))
    monkeypatch.setattr(loggers.WandbSink, "log", lambda self, row, step: events.append(("log", row["epoch"], step)))
    cfg = _cfg(data_root, tmp_path, "model=resnet20", "trainer.epochs=2")
    ref = train(cfg, build_image_experiment)
    assert events == [("log", 1, 8), ("log", 2, 16), ("finish", schema.RUNNING)]
    # Killed in epoch 2 (last.pt lost): the resume sends epoch 1's row again, then trains on.
    (tmp_path / "checkpoints/last.pt").unlink()
    events.clear()
    resumed = _relaunch_unfinished(cfg, tmp_path)
    assert events == [("log", 1, 8), ("log", 2, 16), ("finish", schema.RUNNING)]
    assert without_timing(resumed["final"]) == without_timing(ref["final"])


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_records_are_readable_as_the_umask_allows(data_root, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        train(_cfg(data_root, tmp_path, "model=resnet20", "trainer.epochs=2", "data.val_size=64"),
              build_image_experiment)
    finally:
        os.umask(old)
    for name in ("summary.json", "config.yaml", "metrics.jsonl", ".lock",
                 "checkpoints/last.pt", "checkpoints/prev.pt", "checkpoints/best.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_damaged_pickle_is_named(tmp_path):
    root = tmp_path / "data"
    folder = write_fake_cifar(root, "cifar10", n_train=64, n_test=16, seed=0)
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(ValueError, match="cannot read .*data_batch_3 .*damaged"):
        train(_cfg(root, tmp_path / "run", "model=resnet20"), build_image_experiment)
    assert json.loads((tmp_path / "run/summary.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("config,preset", [("train_cifar", "t2_cifar10_elu_per"), ("train_lm", "t3_ptb_lstm_per")])
def test_debug_smoke_lands_outside_the_runs_tree(config, preset):
    real = compose_config(config, [f"experiment={preset}"])
    smoke = compose_config(config, [f"experiment={preset}", "debug=smoke"])
    task = real["task"]
    assert real["run_dir"].startswith(f"results/runs/{task}/{preset}/")
    assert smoke["run_dir"] == real["run_dir"].replace("results/runs/", "results/debug/", 1)
    assert smoke["trainer"]["max_steps"] == 4 and smoke["trainer"]["limit_eval_batches"] == 2
    assert smoke["logger"]["mode"] == "disabled"


def test_fixup_reference_loop_runs_on_the_same_files(data_root, capsys):
    """scripts/fixup_reference.py (the side-by-side check's other side) reads our files
    through torchvision and prints the numbers our epoch line prints."""
    main = runpy.run_path(str(ROOT / "scripts/fixup_reference.py"))["main"]
    assert main(["--root", str(data_root), "--max-steps", "2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("reference epoch 1 step 2 | train_loss=") and "test_error=" in line
