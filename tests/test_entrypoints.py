"""The Hydra entry points as a user runs them: subprocesses, signals, bad overrides."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from experiments.common import preset_protocol
from per.data.cifar import write_fake_cifar
from runner_utils import ROOT, without_timing

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, "cifar10", n_train=640, n_test=64, seed=0, noise=150.0)
    return root


def _cmd(data_root, run_dir, *overrides):
    return [sys.executable, str(ROOT / "experiments/train_cifar.py"), "trainer.device=cpu",
            "logger.mode=disabled", f"data.root={data_root}", "data.verify_checksums=false",
            "model=resnet20", "method=per", "method.num_slices=16", "data.batch_size=32",
            "trainer.deterministic=true", "trainer.epochs=2", f"hydra.run.dir={run_dir}", *overrides]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _start_and_wait_for_checkpoint(cmd, run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints/last.pt").exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() < deadline, "no checkpoint after 240 s"
        time.sleep(0.05)
    return proc


def test_sigterm_writes_checkpoint_and_kill_resumes_to_same_result(data_root, tmp_path):
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(_cmd(data_root, ref_dir), env=_env(), check=True, capture_output=True)
    ref = json.loads((ref_dir / "summary.json").read_text())
    assert ref["status"] == "finished"

    # SIGKILL during epoch 2 (no chance to save): resume from the epoch-1 checkpoint.
    proc = _start_and_wait_for_checkpoint(_cmd(data_root, cut_dir), cut_dir)
    proc.kill()
    proc.wait()
    assert json.loads((cut_dir / "summary.json").read_text())["status"] == "running"
    # SIGTERM during the resumed run: a checkpoint is written and the exit code says so.
    mtime = (cut_dir / "checkpoints/last.pt").stat().st_mtime
    proc = subprocess.Popen(_cmd(data_root, cut_dir), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "resuming" in line:
            proc.send_signal(signal.SIGTERM)
            break
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in proc.stdout.read()
    summary = json.loads((cut_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["steps"] < ref["steps"]
    assert (cut_dir / "checkpoints/last.pt").stat().st_mtime > mtime
    subprocess.run(_cmd(data_root, cut_dir), env=_env(), check=True, capture_output=True)
    done = json.loads((cut_dir / "summary.json").read_text())
    assert done["status"] == "finished" and done["steps"] == ref["steps"]
    assert without_timing(done["final"]) == without_timing(ref["final"])


def test_unknown_group_value_names_valid_choices(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "experiments/train_cifar.py"), "method=foo",
                          f"hydra.run.dir={tmp_path}"], env=_env(), capture_output=True, text=True)
    assert out.returncode != 0
    assert "per" in out.stderr and "vanilla" in out.stderr and "foo" in out.stderr


@pytest.mark.parametrize("runner, args", [
    ("train_cifar", ["experiment=t1_cifar10_resnet56_pr"]),
    ("train_lm", ["-m", "++experiment=t3_ptb_lstm_per,t1_cifar10_resnet56_pr"]),   # one of a multirun's
])
def test_a_misspelt_preset_is_named_with_the_closest_ones(tmp_path, runner, args):
    """Hydra's own error lists all 88 presets; ours names the closest and exits before any job."""
    out = subprocess.run([sys.executable, str(ROOT / f"experiments/{runner}.py"), *args,
                          f"hydra.run.dir={tmp_path}", f"hydra.sweep.dir={tmp_path}"],
                         env=_env(), capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith("ValueError: unknown preset 't1_cifar10_resnet56_pr'; did you mean "
                                 "t1_cifar10_resnet56_per"), out.stderr[-2000:]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("runner,overrides,message", [
    ("train_cifar", ["experiment=t3_ptb_lstm_per"], "model.name='lstm': not for task 'cifar'"),
    ("train_cifar", ["model=lstm"], "model.name='lstm': not for task 'cifar'"),
    ("train_lm", ["data=cifar10"], "data.name='cifar10': not for task 'lm'"),
])
def test_a_config_for_the_other_runner_is_named(tmp_path, runner, overrides, message):
    """Not an interpolation error from the run directory's name or the data group."""
    out = subprocess.run([sys.executable, str(ROOT / f"experiments/{runner}.py"), *overrides,
                          f"hydra.run.dir={tmp_path}"], env=_env(), capture_output=True, text=True)
    assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]
    assert "InterpolationKeyError" not in out.stderr


def test_unknown_layout_names_valid_choices(data_root, tmp_path):
    out = subprocess.run(_cmd(data_root, tmp_path, "method.layout=diagonal", "trainer.max_steps=1"),
                         env=_env(), capture_output=True, text=True)
    assert out.returncode != 0
    assert "channels" in out.stderr and "flatten" in out.stderr


def test_a_pre_activation_site_can_be_monitored(data_root, tmp_path):
    """VCL's sites (role "pre") are sites of the model too."""
    cmd = [sys.executable, str(ROOT / "experiments/train_cifar.py"), "trainer.device=cpu", "logger.mode=disabled",
           f"data.root={data_root}", "data.verify_checksums=false", "model=elu_cnn11", "method=vcl",
           "data.batch_size=32", "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}",
           "trainer.monitor.every=1", "trainer.monitor.sites=[layer1.pre_site]"]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("override, message", [
    ("trainer.monitor.sites=[nope]", "trainer.monitor.sites: unknown site nope; valid: "),
    ("data.val_size=100000", "data.val_size=100000: expected fewer than the "),
])
def test_values_checked_against_the_model_or_data_end_the_run_with_their_message(data_root, tmp_path,
                                                                                 override, message):
    """Known only once the model or the data are built: the run is recorded as failed, and
    the message alone is printed, with the user-error exit code."""
    out = subprocess.run(_cmd(data_root, tmp_path / "run", override, "trainer.max_steps=1"), env=_env(),
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"ConfigValueError: {message}" in out.stderr and "Traceback" not in out.stderr


def test_a_dataset_file_that_is_not_the_official_one_ends_the_run_with_its_message(data_root, tmp_path):
    # The generated files fail the official md5s.
    out = subprocess.run(_cmd(data_root, tmp_path / "run", "data.verify_checksums=true", "trainer.max_steps=1"),
                         env=_env(), capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "DatasetDamagedError: checksum mismatch for " in out.stderr and "Traceback" not in out.stderr
    assert "data.verify_checksums=false" in out.stderr


def test_output_sent_to_a_file_shows_start_epoch_and_end_lines(data_root, tmp_path):
    run_dir = tmp_path / "run"
    with open(tmp_path / "out.txt", "w") as out:   # as under SLURM or nohup: not a TTY
        subprocess.run(_cmd(data_root, run_dir, "trainer.epochs=1", "trainer.max_steps=3"), env=_env(),
                       check=True, stdout=out, stderr=subprocess.STDOUT)
    for text in ((tmp_path / "out.txt").read_text(), (run_dir / "train_cifar.log").read_text()):
        assert f"run {run_dir} | device " in text and "torch threads) |" in text and "3 steps planned" in text
        assert "epoch 1/1 step 3 | lr=" in text and f"finished {run_dir} | train_loss=" in text
    # Command-line values that change the protocol are recorded (where and how the run
    # runs, its length and method options are not; without a preset, group choices such
    # as model=resnet20 are not changes of the composed config, but the run is marked as
    # having no preset: its table rows are its own).
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["protocol_changes"] == ["(no preset)", "data.batch_size=32", "trainer.deterministic=True"]


def test_a_group_chosen_over_a_presets_is_a_protocol_change(data_root, tmp_path):
    cmd = [*_cmd(data_root, tmp_path / "run"), "experiment=t1_cifar10_resnet56_per", "trainer.max_steps=1"]
    subprocess.run(cmd, env=_env(), check=True, capture_output=True)
    config = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    changes = config["protocol_changes"]
    # model=resnet20 replaces the preset's resnet56; method=per is the preset's own group.
    assert "model.name=resnet20" in changes and "data.batch_size=32" in changes
    assert not any(c.startswith("method.") for c in changes)
    # The run records its preset's protocol as the tables compose it now (not the changes).
    assert config["protocol"] == preset_protocol("t1_cifar10_resnet56_per")
    assert config["protocol"]["model.name"] == "resnet56" and "seed" not in config["protocol"]
    assert preset_protocol("t1_cifar10_resnet110_per")["model.name"] == "resnet110"


def test_plain_python_call_shows_lines(data_root, tmp_path):
    code = ("import sys; from experiments.common import compose_plain; "
            "from per.training.run import train; from per.training.image_task import build_image_experiment; "
            f"train(compose_plain('train_cifar', sys.argv[1:], {str(tmp_path / 'run')!r}), build_image_experiment)")
    out = subprocess.run([sys.executable, "-c", code, *_cmd(data_root, tmp_path)[2:-1], "trainer.max_steps=2"],
                         env=_env(), cwd=ROOT, check=True, capture_output=True, text=True)
    assert "steps planned" in out.stderr and "finished" in out.stderr and out.stdout == ""


def test_refused_invocation_changes_nothing_in_the_run_directory(data_root, tmp_path):
    subprocess.run(_cmd(data_root, tmp_path, "trainer.max_steps=2"), env=_env(), check=True, capture_output=True)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".log"}
    assert tmp_path / ".hydra/overrides.yaml" in before
    for bad in ("optim.lr=0.5", "method.lam=abc"):
        out = subprocess.run(_cmd(data_root, tmp_path, "trainer.max_steps=2", bad), env=_env(),
                             capture_output=True, text=True)
        assert out.returncode != 0
        assert ("optim.lr: 0.1 -> 0.5" if bad == "optim.lr=0.5" else "method.lam='abc'") in out.stderr
        assert {p: p.read_bytes() for p in tmp_path.rglob("*")
                if p.is_file() and p.suffix != ".log"} == before


def test_refused_invocation_in_a_new_folder_leaves_nothing(data_root, tmp_path):
    run_dir = tmp_path / "runs/new"
    out = subprocess.run(_cmd(data_root, run_dir, "method.layout=diagonal"), env=_env(), capture_output=True, text=True)
    assert out.returncode == 2 and "method.layout='diagonal'" in out.stderr
    assert out.stderr.startswith("ConfigValueError: ") and "Traceback" not in out.stderr   # the message alone
    assert not run_dir.exists()                    # no folder holding an empty job log
    # An unresolvable value, a misspelt key added with `+`, and Hydra's other job-logging
    # choices are refused the same way.
    for extra in (["trainer.epochs=${oops}"], ["+method.lamda=1e-3"],
                  ["method.layout=diagonal", "hydra/job_logging=disabled"]):
        out = subprocess.run(_cmd(data_root, run_dir, *extra), env=_env(), capture_output=True, text=True)
        assert out.returncode != 0 and "Unable to configure handler" not in out.stderr
        assert not run_dir.exists()
    # In the suite's layout (`<runs>/<task>/<cell>/lam=...`): no empty cell folder either.
    runs = tmp_path / "suite"
    cmd = [c for c in _cmd(data_root, run_dir, "method.lam=abc") if not c.startswith("hydra.run.dir")]
    out = subprocess.run([*cmd, f"paths.runs_dir={runs}"], env=_env(), capture_output=True, text=True)
    assert out.returncode == 2 and "method.lam='abc'" in out.stderr
    assert not list(runs.iterdir()) if runs.exists() else True


def test_second_process_on_the_same_run_directory_exits_naming_the_holder(data_root, tmp_path):
    first = subprocess.Popen(_cmd(data_root, tmp_path), env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (tmp_path / "summary.json").exists():   # written once the lock is held
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    second = subprocess.run(_cmd(data_root, tmp_path), env=_env(), capture_output=True, text=True, timeout=120)
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=120)
    assert second.returncode != 0
    assert f"is in use by process {first.pid}" in second.stderr


def test_debug_smoke_writes_under_the_debug_root(data_root, tmp_path):
    env = {**_env(), "PER_RUNS_DIR": str(tmp_path / "runs"), "PER_DEBUG_DIR": str(tmp_path / "debug")}
    cmd = [c for c in _cmd(data_root, tmp_path) if not c.startswith("hydra.run.dir=")]
    subprocess.run([*cmd, "debug=smoke"], env=env, check=True, capture_output=True)
    summaries = list((tmp_path / "debug").rglob("summary.json"))
    assert len(summaries) == 1 and json.loads(summaries[0].read_text())["steps"] == 4
    assert not (tmp_path / "runs").exists()


def test_a_multirun_with_a_bad_value_in_any_job_is_refused_before_any_job_runs(data_root, tmp_path):
    """Every job's config is checked up front: a bad value in the last job surfaced after
    the others had trained."""
    cmd = [c for c in _cmd(data_root, tmp_path) if not c.startswith("hydra.run.dir=")]
    out = subprocess.run([*cmd[:2], "-m", *cmd[2:], "method.layout=channels,diagonal", "trainer.max_steps=2",
                          "trainer.epochs=1", f"paths.runs_dir={tmp_path / 'runs'}"],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "job #1 (" in out.stderr and "method.layout=diagonal" in out.stderr and "before any job ran" in out.stderr
    assert not (tmp_path / "runs/cifar").exists()


def test_a_job_refused_once_its_data_is_built_leaves_the_others_running(data_root, tmp_path):
    """What only the built data shows (a held-out split as large as the training set) fails
    its own job (Hydra goes on, then exits non-zero); a single run prints it and exits 2
    (`test_refused_invocation_...`)."""
    cmd = [c for c in _cmd(data_root, tmp_path) if not c.startswith("hydra.run.dir=")]
    out = subprocess.run([*cmd[:2], "-m", *cmd[2:], "data.val_size=100000,0", "trainer.max_steps=2",
                          "trainer.epochs=1", f"paths.runs_dir={tmp_path / 'runs'}"],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "val_size" in out.stderr
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "runs/cifar").rglob("summary.json")]
    assert sorted(s["status"] for s in summaries) == ["failed", "finished"]   # the second job ran after it


def test_a_joblib_multirun_writes_one_run_folder_per_job(data_root, tmp_path):
    """A user's own sweep (`-m launcher=joblib`), outside `reproduce.py`: each job in the
    folder Hydra names after its lambda and seed, as `per.sweep.Phase.run_dir` expects."""
    cmd = [c for c in _cmd(data_root, tmp_path) if not c.startswith("hydra.run.dir=")]
    out = subprocess.run([*cmd[:2], "-m", *cmd[2:], "launcher=joblib", "method.lam=1e-2,0", "seed=0", "trainer.max_steps=2",
                          "trainer.epochs=1", f"paths.runs_dir={tmp_path / 'runs'}"],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p.parent.name for p in (tmp_path / "runs/cifar").rglob("summary.json"))
    assert runs == ["lam=0,seed=0", "lam=0.01,seed=0"]


def test_removing_a_refused_runs_folders_leaves_links_and_their_targets(tmp_path):
    from experiments.common import remove_empty_folders
    root, target = tmp_path / "runs", tmp_path / "elsewhere"
    (root / "cifar/cell").mkdir(parents=True)
    target.mkdir()
    link = root / "cifar/cell/lam=0,seed=0"
    link.symlink_to(target)
    remove_empty_folders(link, root)
    assert link.is_symlink() and target.is_dir()
    (root / "cifar/other/lam=1,seed=0").mkdir(parents=True)
    remove_empty_folders(root / "cifar/other/lam=1,seed=0", root)
    assert not (root / "cifar/other").exists() and (root / "cifar/cell").is_dir() and root.is_dir()
