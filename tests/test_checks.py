"""Config checks: every preset passes `validate`; `config_differences` compares what decides the result."""
from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
import torch

from per.training import checks, loggers, runtime
from per.training.checks import ConfigValueError, config_differences, validate
from runner_utils import ROOT, compose_config

PRESETS = sorted(p.stem for p in (ROOT / "configs/experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_and_its_smoke_run_pass_validation(name):
    config = "train_lm" if name.startswith("t3_") else "train_cifar"
    validate(compose_config(config, [f"experiment={name}"], "unused"))
    validate(compose_config(config, [f"experiment={name}", "debug=smoke"], "unused"))


def test_validation_lists_every_bad_value():
    cfg = compose_config("train_lm", ["method=per", "method.lam=-1", "data.bptt=0", "trainer.device=tpu",
                                      "trainer.progress=maybe"], "unused")
    with pytest.raises(ConfigValueError) as err:
        validate(cfg)
    lines = str(err.value).splitlines()[1:]
    assert lines == ["  method.lam=-1: expected a finite number >= 0", "  data.bptt=0: expected an integer >= 1",
                     "  trainer.device='tpu': expected one of auto, cpu, cuda",
                     "  trainer.progress='maybe': expected null or true or false"]


@pytest.mark.parametrize("config, overrides, message", [
    ("train_cifar", ["data.normalize=pixel_mean_"],
     "data.normalize='pixel_mean_': expected one of channel, pixel_mean, pixel_standardize"),
    ("train_cifar", ["data=ptb"], "data.name='ptb': not for task 'cifar' (this runner; another task's: "
                                  "experiments/train_lm.py); expected one of cifar10, cifar100"),
    ("train_cifar", ["method=rbn"], "method.name='rbn': not for task 'cifar'"),
    ("train_lm", ["model=resnet20"], "model.name='resnet20': not for task 'lm' (this runner; another task's: "
                                     "experiments/train_cifar.py); expected one of lstm, re_lstm, re_vd_lstm, "
                                     "vd_lstm"),
    ("train_lm", ["method=vcl"], "method.name='vcl': not for task 'lm'"),
    ("train_cifar", ["method=vanilla", "method.lam=1e-4"],
     "method.lam=0.0001: method 'vanilla' has no penalty to weigh; leave it at 0 (methods with a lambda: "
     "l1, l2, per, vcl)"),
    ("train_lm", ["method=rbn", "method.lam=1e-4"], "method 'rbn' has no penalty to weigh"),
])
def test_values_of_another_task_are_refused_before_the_run(config, overrides, message):
    """Caught by `validate`, i.e. before the run directory is written (the runner calls it
    first), so the corrected command is not refused as a different run."""
    with pytest.raises(ConfigValueError, match=re.escape(message)):
        validate(compose_config(config, overrides, "unused"))


@pytest.mark.parametrize("config, overrides, message", [
    ("train_lm", ["optim.schedule_args.metric=val_pplx"],
     "optim.schedule_args (plateau): unknown plateau metric 'val_pplx'; valid: val_ppl, val_loss, val_error"),
    ("train_lm", ["optim.schedule_args.factor=-4"], "factor must be a finite number >= 1"),
    ("train_lm", ["optim.schedule_args.factor=0"], "factor must be a finite number >= 1"),
    ("train_lm", ["+optim.schedule_args.metricc=val_ppl"],
     "unknown plateau schedule argument metricc; valid: lr, factor, metric"),
    ("train_cifar", ["optim.schedule_args.milestones=[150,100]"], "milestones must be increasing integers >= 0"),
    ("train_cifar", ["optim.schedule_args.unit=epochs"], "unknown schedule unit 'epochs'; valid: epoch, step"),
    ("train_cifar", ["optim.schedule_args.gamma=[0.1]"], "gamma must be one number or one per milestone (2)"),
    ("train_cifar", ["optim.schedule_args.gamma=0"], "gamma must be a finite number > 0"),
    ("train_cifar", ["optim=he_bn", "optim.schedule_args.warmup_steps=-1"],
     "warmup_steps must be an integer >= 0"),
])
def test_schedule_arguments_are_checked_before_the_run(config, overrides, message):
    """A misspelt plateau metric would never decay the lr, a negative factor would make it
    negative, unsorted milestones would skip a stage: refused before the run directory is
    written, each naming what is allowed."""
    with pytest.raises(ConfigValueError, match=re.escape(message)):
        validate(compose_config(config, overrides, "unused"))


@pytest.mark.parametrize("added, message", [
    ("+method.lamda=1e-3", "method.lamda=0.001: not a key of this config (added on the command line; nothing "
                           "reads it); did you mean method.lam,"),
    ("+model.dropout=0.5", "model.dropout=0.5: not a key of this config"),     # an LSTM's key on a ResNet
    ("++trainer.monitor.site=[block1]", "trainer.monitor.site=['block1']: not a key of this config (added on "
                                        "the command line; nothing reads it); did you mean trainer.monitor.sites"),
])
def test_a_key_added_on_the_command_line_that_nothing_reads_is_refused(added, message):
    """Hydra answers a misspelt key with "use +method.lamda=..."; the run would ignore it."""
    base = ["experiment=t1_cifar10_resnet56_per"]
    with pytest.raises(ConfigValueError, match=re.escape(message)):
        validate(compose_config("train_cifar", [*base, added], "unused"), compose_config("train_cifar", base, "unused"))


@pytest.mark.parametrize("removed, message", [
    ("~trainer.log_every", "trainer.log_every: removed on the command line (~trainer.log_every); the run needs "
                           "it: set a value instead (its config's: 50)"),
    ("~trainer.monitor", "trainer.monitor.every: removed on the command line"),
])
def test_a_key_removed_on_the_command_line_is_refused(removed, message):
    """The runner read it once the run's folder was written: a KeyError and a failed run."""
    base = ["experiment=t1_cifar10_resnet56_per"]
    with pytest.raises(ConfigValueError, match=re.escape(message)):
        validate(compose_config("train_cifar", [*base, removed], "unused"), compose_config("train_cifar", base, "unused"))


def test_keys_that_may_be_added_may_be_removed():
    """A schedule's arguments (switching to `plateau` drops the milestones) and the planners'
    grids; the review found the switch refused once removals were checked."""
    base = ["experiment=t1_cifar10_resnet56_per"]
    switch = ["optim.schedule=plateau", "~optim.schedule_args.milestones", "~optim.schedule_args.gamma",
              "~optim.schedule_args.unit", "+optim.schedule_args.factor=4.0", "+optim.schedule_args.metric=val_error"]
    for edits in (switch, ["~method.lam_grid"], ["~method.num_slices"]):
        validate(compose_config("train_cifar", [*base, *edits], "unused"), compose_config("train_cifar", base, "unused"))


@pytest.mark.parametrize("base, added", [
    (["experiment=t1_cifar10_resnet56_per"], ["+optim.schedule_args.warmup_steps=4",
                                              "+optim.schedule_args.warmup_lr=0.01"]),   # checked by the schedule
    (["experiment=t1_cifar10_resnet56_l2"], ["++method.num_slices=16"]),    # an option l2 leaves out
    (["experiment=t2_cifar10_elu_vanilla"], ["+method.layout=flatten"]),    # one override for a whole plan
])
def test_keys_that_are_read_may_be_added(base, added):
    validate(compose_config("train_cifar", [*base, *added], "unused"), compose_config("train_cifar", base, "unused"))


@pytest.mark.parametrize("overrides, message", [
    (["method=per", "method.sampling=subspace", "method.path=autograd"], "path='autograd'"),
    (["method=per", "method.sampling=subspace", "method.share_directions=true"], "share_directions=True"),
    (["method=l2", "++method.sampling=subspace"], "kind='l2'"),
])
def test_subspace_sampling_where_it_cannot_serve_is_refused_before_the_run(overrides, message):
    with pytest.raises(ConfigValueError, match=r"method.sampling='subspace': .*" + re.escape(message)):
        validate(compose_config("train_cifar", overrides, "unused"))
    validate(compose_config("train_cifar", ["method=per", "method.sampling=subspace"], "unused"))


def test_a_bad_path_beside_subspace_sampling_is_reported_once():
    cfg = compose_config("train_cifar", ["method=per", "method.sampling=subspace", "method.path=foo"],
                         "unused")
    with pytest.raises(ConfigValueError) as err:
        validate(cfg)
    assert str(err.value).splitlines()[1:] == ["  method.path='foo': expected one of backward, autograd"]


def test_an_unknown_name_is_one_line_naming_every_choice():
    cfg = compose_config("train_cifar", ["model.name=resnet21", "data.name=cifar11"], "unused")
    with pytest.raises(ConfigValueError) as err:
        validate(cfg)
    assert str(err.value).splitlines()[1:] == [
        "  model.name='resnet21': expected one of elu_cnn11, lstm, re_lstm, re_vd_lstm, resnet110, resnet20, "
        "resnet56, vd_lstm",
        "  data.name='cifar11': expected one of cifar10, cifar100, ptb, wikitext2"]


@pytest.mark.parametrize("value", [False, True, "default", "reduce-overhead", "max-autotune"])
def test_trainer_compile_takes_a_bool_or_a_torch_compile_mode(value):
    validate(compose_config("train_cifar", [f"trainer.compile={str(value).lower()}"], "unused"))


def test_a_bad_trainer_compile_names_the_choices():
    with pytest.raises(ConfigValueError, match="trainer.compile='fast': expected true, false or one of "
                                               "default, reduce-overhead, max-autotune"):
        validate(compose_config("train_cifar", ["trainer.compile=fast"], "unused"))
    with pytest.raises(ValueError, match="valid: false, true, default"):
        runtime.compile_model(torch.nn.Linear(1, 1), "fast")
    model = torch.nn.Linear(1, 1)
    assert runtime.compile_model(model, False) is model


def test_compiling_a_model_that_calls_nn_lstm_says_its_forward_runs_eagerly(caplog):
    from per.models.lstm import LSTMLanguageModel
    model = LSTMLanguageModel(vocab_size=10, hidden_size=4, num_layers=2, dropout=0.0)
    with caplog.at_level("WARNING", logger="per.training.runtime"):
        runtime.compile_model(model, True)
    assert "torch.compile does not trace LSTM" in caplog.text
    assert "LSTMLanguageModel's forward runs eagerly" in caplog.text
    caplog.clear()
    rbn = LSTMLanguageModel(vocab_size=10, hidden_size=4, num_layers=2, dropout=0.0, rbn=True)
    with caplog.at_level("WARNING", logger="per.training.runtime"):
        runtime.compile_model(rbn, True)
    assert caplog.text == ""


def test_differences_ignore_volatile_keys_and_new_keys_at_their_default():
    stored = {"seed": 0, "method": {"lam": 1e-4, "lam_grid": [1e-4]}, "trainer": {"device": "cpu"},
              "data": {"root": "a"}}
    new = {"seed": 0, "method": {"lam": 1e-4, "lam_grid": [3e-4], "path": "backward"},
           "trainer": {"device": "cuda", "limit_eval_batches": 2}, "data": {"root": "b"}}
    defaults = {"method": {"path": "backward"}, "trainer": {"limit_eval_batches": None}}
    assert config_differences(stored, new, defaults) == ["trainer.limit_eval_batches: <absent> -> 2"]
    assert config_differences(stored, {**new, "seed": 1}, defaults)[0] == "seed: 0 -> 1"
    assert config_differences({**stored, "old_key": 1}, new, defaults)[0] == "old_key: 1 -> <absent>"


def test_protocol_changes_name_command_line_values_that_change_the_protocol():
    defaults = {"seed": 0, "data": {"val_size": 0, "root": "data", "batch_size": 128},
                "method": {"name": "per", "lam": 0.0, "num_slices": 256},
                "optim": {"epochs": 200, "lr": 0.1}, "paths": {"runs_dir": "results/runs"},
                "trainer": {"epochs": None, "max_steps": None, "precision": "fp32", "device": "auto"}}
    same = {"seed": 3, "preset": "t1_cifar10_resnet56_per", "data": {"val_size": 5000, "root": "/data", "batch_size": 128},
            "method": {"name": "per", "lam": 1e-4, "num_slices": 256},
            "optim": {"epochs": 200, "lr": 0.1}, "paths": {"runs_dir": "/scratch/runs"},
            "trainer": {"epochs": 2, "max_steps": 10, "precision": "fp32", "device": "cuda"}}
    assert checks.protocol_changes(defaults, same) == []
    changed = {**same, "optim": {"epochs": 30, "lr": 0.1},
               "trainer": {**same["trainer"], "precision": "bf16"}}
    assert checks.protocol_changes(defaults, changed) == ["optim.epochs=30", "trainer.precision=bf16"]
    # The slice ablation's counts are a variant of the cell (a row key), not a change.
    slices = {**same, "method": {**same["method"], "num_slices": 16}}
    assert checks.protocol_changes(defaults, slices) == []
    # Drawing PER's directions another way draws the same distribution: not a change.
    defaults["method"]["sampling"] = "explicit"
    sampled = {**same, "method": {**same["method"], "sampling": "subspace"}}
    assert checks.protocol_changes(defaults, sampled) == []
    # Training past the protocol's epochs is a change; a step protocol caps the steps.
    longer = {**same, "trainer": {**same["trainer"], "epochs": 300}}
    assert checks.protocol_changes(defaults, longer) == ["trainer.epochs=300"]
    steps = {**longer, "optim": {**same["optim"], "total_steps": 64000}}
    assert checks.protocol_changes({**defaults, "optim": {**defaults["optim"], "total_steps": 64000}}, steps) == []
    # Without a preset the groups were chosen by hand: never the cell's protocol.
    no_preset = {k: v for k, v in changed.items() if k != "preset"}
    assert checks.protocol_changes(defaults, no_preset) == ["(no preset)", "optim.epochs=30", "trainer.precision=bf16"]


@pytest.mark.parametrize("preset, change", [
    ("t1_cifar10_resnet56_per", []),                            # the same images, in other batches
    ("t3_ptb_lstm_per", ["data.eval_batch_size=20"]),          # other tokens scored, other context
])
def test_an_evaluation_batch_is_a_protocol_change_for_the_language_models_only(preset, change):
    config = "train_lm" if preset.startswith("t3_") else "train_cifar"
    alone = compose_config(config, [f"experiment={preset}"], "unused")
    other = compose_config(config, [f"experiment={preset}", "data.eval_batch_size=20"], "unused")
    assert checks.protocol_changes(alone, other) == change
    assert ("data.eval_batch_size" in checks.protocol_of(alone)) == bool(change)


def test_online_logging_without_credentials_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))             # absent
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb"))  # no settings file
    cfg = compose_config("train_cifar", ["logger.mode=online"], "unused")
    default = urlsplit(loggers.default_base_url()).netloc         # wandb's own default server
    with pytest.raises(ConfigValueError, match=r"logger.mode='online' without W&B credentials: set "
                                               rf"WANDB_API_KEY or run `wandb login` \(no key for '{default}'"):
        validate(cfg)
    validate(compose_config("train_cifar", ["logger.mode=offline"], "unused"))   # offline needs none
    netrc_file = tmp_path / "netrc"
    for host in {default, "api.wandb.ai"}:     # `wandb login`'s entry, now and before wandb 0.31
        netrc_file.write_text(f"machine {host}\n  login user\n  password abc123\n")
        validate(cfg)
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    monkeypatch.setenv("WANDB_BASE_URL", loggers.default_base_url())     # W&B's server named explicitly
    validate(cfg)
    monkeypatch.setenv("WANDB_BASE_URL", "http://localhost:8080")  # `wandb server`: host and port
    with pytest.raises(ConfigValueError, match="no key for 'localhost:8080'"):
        validate(cfg)                                              # an entry for another host
    netrc_file.write_text("machine localhost:8080\n  login user\n  password abc123\n")
    validate(cfg)
    # `wandb login --host`: the server in W&B's settings file, WANDB_BASE_URL unset.
    monkeypatch.delenv("WANDB_BASE_URL")
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "settings").write_text("[default]\nbase_url = https://wandb.mycorp.example\n"
                                                 "note = 100%\n")          # no interpolation
    with pytest.raises(ConfigValueError, match="no key for 'wandb.mycorp.example'"):
        validate(cfg)
    netrc_file.write_text("machine wandb.mycorp.example\n  login user\n  password abc123\n")
    validate(cfg)
    monkeypatch.setenv("WANDB_BASE_URL", "http://localhost:8080")    # the environment goes first
    with pytest.raises(ConfigValueError, match="no key for 'localhost:8080'"):
        validate(cfg)
    netrc_file.write_text("machine localhost:8080\n  login user\n  password \"\"\n")
    with pytest.raises(ConfigValueError, match="without W&B credentials"):
        validate(cfg)                                              # an entry without a key
    monkeypatch.setenv("WANDB_API_KEY", "abc123")
    validate(cfg)
    monkeypatch.setenv("WANDB_IDENTITY_TOKEN_FILE", str(tmp_path / "token"))
    with pytest.raises(ConfigValueError, match="both WANDB_API_KEY and WANDB_IDENTITY_TOKEN_FILE"):
        validate(cfg)
