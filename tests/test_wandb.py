"""The W&B sink, run for real in offline mode (no account, no network)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from per import schema
from per.data.cifar import write_fake_cifar
from per.training import loggers
from per.training.checks import ConfigValueError
from per.training.image_task import build_image_experiment
from per.training.run import train
from runner_utils import CPU_SMOKE, compose_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, "cifar10", n_train=256, n_test=64, seed=0)
    return root


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty home folder: W&B must write nothing there."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "WANDB_API_KEY", "WANDB_DIR",
                *loggers.WANDB_FOLDERS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    return home


def _cfg(data_root, run_dir, *overrides):
    return compose_config("train_cifar", [
        *CPU_SMOKE, f"data.root={data_root}", "data.verify_checksums=false", "data.batch_size=32",
        "data.eval_batch_size=64", "data.probe_size=16", "++method.num_slices=16", "model=resnet20",
        "method=per", "trainer.log_every=2", "trainer.max_steps=4", "logger.mode=offline",
        *overrides], run_dir)


def _wandb_file(run_dir: Path) -> bytes:
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    return path.read_bytes()


def test_names_and_groups():
    cfg = {"run_name": "t1_cifar10_resnet56_per", "seed": 0, "data": {"val_size": 5000},
           "method": {"name": "per", "lam": 1e-4}}
    assert loggers.wandb_name(cfg) == "t1_cifar10_resnet56_per/select/lam=1e-4/seed=0"
    assert loggers.wandb_group(cfg) == "t1_cifar10_resnet56_per/select"
    final = {**cfg, "seed": 2, "data": {"val_size": 0}, "method": {"name": "per", "lam": 3e-05}}
    assert loggers.wandb_name(final) == "t1_cifar10_resnet56_per/final/lam=3e-5/seed=2"
    lm = {"run_name": "t3_ptb_lstm_vanilla", "seed": 1, "data": {"name": "ptb"},
          "method": {"name": "vanilla", "lam": 0.0}}
    assert loggers.wandb_name(lm) == "t3_ptb_lstm_vanilla/final/lam=0/seed=1"
    assert [loggers.format_lam(x) for x in (0.0003, 2.5e-7, 0.01, 1.0)] == ["3e-4", "2.5e-7", "1e-2", "1e0"]
    # A run off its preset's protocol never shares the protocol's group; its tags say how.
    changed = {**cfg, "protocol_changes": ["model.depth=20", "trainer.precision=bf16"]}
    group = loggers.wandb_group(changed)
    assert group.startswith("t1_cifar10_resnet56_per/select/changed-") and group != loggers.wandb_group(
        {**cfg, "protocol_changes": ["model.depth=20"]})
    assert loggers.wandb_name(changed) == f"{group}/lam=1e-4/seed=0"
    per = {**changed, "method": {"name": "per", "lam": 1e-4, "layout": "flatten", "reduction": "sum",
                                 "num_slices": 256, "path": "backward"}, "trainer": {"epochs": 200}}
    assert loggers.wandb_tags(per, {"table": "T1", "dataset": "cifar10"}) == [
        "T1", "cifar10", "layout=flatten", "reduction=sum", "num_slices=256", "epochs=200", "val=5000",
        "changed:model.depth=20", "changed:trainer.precision=bf16"]
    assert loggers.wandb_tags({**lm, "method": {"name": "vanilla", "layout": "channels"}}, {"m": "x" * 80}) == ["x" * 64]
    # Off the preset but within its protocol (another layout, a shorter run): a group of its
    # own too, so that W&B's grouped view does not average it with the protocol's runs.
    preset = {"method": {"name": "per", "layout": "channels", "reduction": "sum", "num_slices": 256},
              "trainer": {"epochs": 200, "max_steps": None}}
    run = {**cfg, "method": {**preset["method"], "lam": 1e-4, "layout": "flatten"},
           "trainer": {"epochs": 100, "max_steps": 400}}
    variant = loggers.run_variant(run, preset)
    assert variant == ["layout=flatten", "epochs=100", "max_steps=400"]
    assert loggers.wandb_name(run, variant) == (
        "t1_cifar10_resnet56_per/select/layout=flatten,epochs=100,max_steps=400/lam=1e-4/seed=0")
    assert loggers.run_variant({**run, "trainer": preset["trainer"], "method": {**preset["method"], "lam": 0}},
                               preset) == [] and loggers.run_variant(run, None) == []


def test_a_diverged_runs_wandb_summary_and_tags_say_so():
    """W&B's own state says finished for a diverged run (its result counts): the summary's
    top-level `status` and a tag carry it."""
    class Run:
        summary: dict = {}
        tags: tuple = ("T1",)
    run = Run()
    loggers._set_summary(run, {"status": schema.RUNNING})
    assert run.summary == {"summary": {"status": "running"}, "status": "running"} and run.tags == ("T1",)
    for _ in range(2):
        loggers._set_summary(run, {"status": schema.DIVERGED, "steps": 3})
    assert run.summary["status"] == "diverged" and run.tags == ("T1", "diverged")


def test_offline_run_names_steps_and_keeps_its_files(data_root, tmp_path, home, monkeypatch):
    steps: list[tuple[int, dict]] = []
    log_step = loggers.WandbSink.log_step

    def spy(self, metrics: dict, step: int) -> None:
        steps.append((step, metrics))
        log_step(self, metrics, step)
    monkeypatch.setattr(loggers.WandbSink, "log_step", spy)

    run_dirs = [tmp_path / "select", tmp_path / "final"]
    for run_dir, val in zip(run_dirs, (64, 0)):
        summary = train(_cfg(data_root, run_dir, f"data.val_size={val}"), build_image_experiment)
        assert summary["status"] == schema.FINISHED

    # Every `log_every` (2) steps: training loss and error so far, lr, throughput.
    assert [s for s, _ in steps] == [1, 3, 1, 3]
    assert set(steps[0][1]) == {"train_loss", "train_error", "lr", "images_per_s"}
    select = _wandb_file(run_dirs[0])
    name = b"cifar10-resnet20-none-relu-per/select/lam=1e-4/seed=0"
    assert name in select and b"step/train_loss" in select and b"step/images_per_s" in select
    assert b"cifar10-resnet20-none-relu-per/final/lam=1e-4/seed=0" in _wandb_file(run_dirs[1])

    # W&B's own files (its service's debug logs included) stay in each run's directory.
    assert [p for p in home.rglob("*") if p.is_file()] == []
    for run_dir in run_dirs:
        assert list((run_dir / "wandb" / "cache").rglob("core-debug-*.log"))
    assert not any(var in os.environ for var in loggers.WANDB_FOLDERS)


def test_a_failed_runs_wandb_copy_says_failed_and_why(data_root, tmp_path, home):
    """W&B holds the run's summary from its start (a killed run then reads back as
    interrupted) and, after a failure, the failed one with its error, as `summary.json`:
    `per.analysis.wandb_source` skipped such runs for want of a summary."""
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigValueError, match="unknown site nope"):    # raised once the W&B run is open
        train(_cfg(data_root, run_dir, "trainer.monitor.every=1", "trainer.monitor.sites=[nope]"),
              build_image_experiment)
    record = _wandb_file(run_dir)
    assert b'"status":"running"' in record and b'"status":"failed"' in record
    assert b"ConfigValueError: trainer.monitor.sites: unknown site nope" in record


def test_an_online_run_that_cannot_reach_wandb_logs_offline_and_goes_on(data_root, tmp_path, home,
                                                                       monkeypatch, caplog):
    import wandb
    real_init, modes = wandb.init, []

    def init(mode, **kwargs):
        modes.append(mode)
        if mode == "online":
            raise wandb.errors.CommError("Failed to get resume status: no network")
        return real_init(mode=mode, **kwargs)
    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    with caplog.at_level("WARNING", logger="per.training.loggers"):
        summary = train(_cfg(data_root, tmp_path / "run", "logger.mode=online"), build_image_experiment)
    assert summary["status"] == schema.FINISHED and modes == ["online", "offline"]
    assert "W&B online failed (CommError: Failed to get resume status: no network); logging offline" in caplog.text
    assert b'"status":"finished"' in _wandb_file(tmp_path / "run")


def test_an_online_run_talks_to_the_users_server_and_waits_as_configured(data_root, tmp_path, home, monkeypatch,
                                                                        caplog):
    """`wandb login --host` keeps the server in W&B's settings file, in the config folder the
    run moves into its own directory: the run passes it on as WANDB_BASE_URL (restored after)."""
    import wandb
    settings = home / ".config" / "wandb" / "settings"
    settings.parent.mkdir(parents=True)
    settings.write_text("[default]\nbase_url = https://wandb.mycorp.example\n")
    (home / ".netrc").write_text("machine wandb.mycorp.example\n  login user\n  password abc123\n")
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    real_init, seen = wandb.init, []

    def init(mode, **kwargs):
        seen.append((mode, os.environ.get("WANDB_BASE_URL"), kwargs["settings"].init_timeout))
        if mode == "online":
            raise wandb.errors.CommError("no network here")
        return real_init(mode=mode, **kwargs)
    monkeypatch.setattr(wandb, "init", init)
    with caplog.at_level("INFO", logger="per.training.loggers"):
        train(_cfg(data_root, tmp_path / "run", "logger.mode=online", "logger.init_timeout=7"), build_image_experiment)
    assert seen == [("online", "https://wandb.mycorp.example", 7.0), ("offline", "https://wandb.mycorp.example", 7.0)]
    assert "W&B: connecting to https://wandb.mycorp.example (up to 7 s, then the run logs offline)" in caplog.text
    assert "WANDB_BASE_URL" not in os.environ


def test_a_run_without_wandb_writes_no_wandb_id(data_root, tmp_path, home):
    train(_cfg(data_root, tmp_path / "run", "logger.mode=disabled"), build_image_experiment)
    assert not (tmp_path / "run" / "wandb_id.txt").exists() and not (tmp_path / "run" / "wandb").exists()


def test_a_bad_wandb_key_fails_the_run_rather_than_logging_offline(data_root, tmp_path, home, monkeypatch):
    import wandb
    real_init = wandb.init

    def init(mode, **kwargs):
        if mode == "online":
            raise wandb.errors.AuthenticationError("API key must have 40+ characters")
        return real_init(mode=mode, **kwargs)
    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_API_KEY", "short")
    with pytest.raises(wandb.errors.AuthenticationError):
        train(_cfg(data_root, tmp_path / "run", "logger.mode=online"), build_image_experiment)
