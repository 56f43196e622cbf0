"""The run-record vocabulary: names on disk, diagnostics, the table cell."""
from __future__ import annotations

import pytest

from per import schema


def test_metric_names_on_disk() -> None:
    """metrics.jsonl / summary.json keys are on-disk formats: these strings must not change."""
    assert schema.metric_key(schema.VAL, schema.PPL) == schema.VAL_PPL == "val_ppl"
    names = (schema.TRAIN_LOSS, schema.TRAIN_ERROR, schema.TRAIN_PPL, schema.VAL_ERROR,
             schema.TEST_ERROR, schema.TEST_PPL, schema.EPOCH_TIME, schema.EVAL_TIME, schema.throughput_key("images"))
    assert names == ("train_loss", "train_error", "train_ppl", "val_error", "test_error",
                     "test_ppl", "epoch_time_s", "eval_time_s", "images_per_s")
    assert schema.SELECTION_METRIC == {"cifar": "val_error", "lm": "val_ppl"}
    assert schema.PAPER_SPLIT == {"val": "valid", "test": "test"}


def test_is_diagnostic() -> None:
    for prefix in (schema.PENALTY_PREFIX, schema.GRAD_RATIO_PREFIX):
        assert schema.is_diagnostic(prefix + "layers.0.site")
    for key in (schema.PENALTY, schema.TRAIN_LOSS, schema.VAL_PPL, schema.EPOCH, schema.LR):
        assert not schema.is_diagnostic(key)


def test_method_labels_are_distinct_and_bad_names_are_refused() -> None:
    labels = [schema.method_label(m, n) for m in schema.METHODS for n in schema.NORMS]
    assert len(set(labels)) == len(labels)
    assert [schema.method_label(m, "bn") for m in ("vanilla", "per")] == ["bn", "bn+per"]
    assert [schema.method_label(m) for m in ("vanilla", "per")] == ["vanilla", "per"]
    with pytest.raises(ValueError, match="valid: none, bn"):
        schema.method_label("per", "ln")
    with pytest.raises(ValueError, match="unknown method 'dropout'"):
        schema.method_label("dropout")


def test_cell_of_a_plain_config() -> None:
    cfg = {"data": {"name": "cifar10"}, "model": {"name": "elu_cnn11", "activation": "relu", "norm": "bn"},
           "method": {"name": "vanilla"}, "table": "T2"}
    cell = schema.cell_of(cfg)
    assert tuple(cell) == schema.CELL_KEYS
    assert cell == {"table": "T2", "dataset": "cifar10", "model": "elu_cnn11", "activation": "relu",
                    "method": "bn"}
    lm = schema.cell_of({"data": {"name": "ptb"}, "model": {"name": "re_lstm"}, "method": {"name": "rbn"}})
    assert lm == {"table": "T3", "dataset": "ptb", "model": "re_lstm", "activation": "tanh", "method": "rbn"}
    with pytest.raises(ValueError, match="needs an explicit activation"):
        schema.cell_of({"data": {"name": "cifar10"}, "model": {"name": "elu_cnn11"}, "method": {"name": "per"}})


def test_method_options_apply_only_to_their_methods() -> None:
    options = {"layout": "flatten", "reduction": "sum", "num_slices": 64}
    assert schema.method_options({"method": {"name": "per", **options}}) == options
    assert schema.method_options({"method": {"name": "l2", **options}}) == {
        "layout": "flatten", "reduction": "sum", "num_slices": None}
    assert schema.method_options({"method": {"name": "vanilla", **options}}) == {
        "layout": None, "reduction": None, "num_slices": None}
    # Runs recorded before `method.reduction` existed used the 1/N mean.
    assert schema.method_options({"method": {"name": "per", "layout": "channels"}})["reduction"] == "mean"
    assert schema.VARIANT_KEYS == (*schema.CELL_KEYS, *schema.METHOD_OPTIONS, schema.CHANGES)
    assert schema.SETTING_KEYS == schema.CELL_KEYS[:-1]
