"""The run-record vocabulary: one place for metric names, cell labels and statuses.

`summary.json` (DESIGN.md section 4) and `paper_tables.csv` share this vocabulary, so
aggregation can join our runs with the paper's numbers on
(`table`, `dataset`, `model`, `activation`, `method`).
"""
from __future__ import annotations

TASKS = ("cifar", "lm")

# Run statuses. A record left in `running` by a dead process is read as `interrupted`.
RUNNING, FINISHED, DIVERGED, FAILED, INTERRUPTED = (
    "running", "finished", "diverged", "failed", "interrupted")
STATUSES = (RUNNING, FINISHED, DIVERGED, FAILED, INTERRUPTED)

# Regularization methods (config group `method/`). `rbn` is the LM's recurrent BN cell.
METHODS = ("vanilla", "l1", "l2", "per", "vcl", "rbn")
NORMS = ("none", "bn")

# Metric names, per task. Image errors are in percent.
TRAIN_LOSS, VAL_ERROR, TEST_ERROR = "train_loss", "val_error", "test_error"
VAL_PPL, TEST_PPL = "val_ppl", "test_ppl"
SELECTION_METRIC = {"cifar": VAL_ERROR, "lm": VAL_PPL}   # lambda is chosen on this
REPORT_METRIC = {"cifar": TEST_ERROR, "lm": TEST_PPL}     # the table reports this
# Where the reported metric is read from: images report the final epoch, LMs the
# best-validation checkpoint (DESIGN.md section 4, honest selection).
REPORT_FROM = {"cifar": "final", "lm": "best"}

# Which paper table a model belongs to.
MODEL_TABLE = {
    "resnet20": "T1", "resnet56": "T1", "resnet110": "T1",
    "elu_cnn11": "T2",
    "lstm": "T3", "re_lstm": "T3", "vd_lstm": "T3", "re_vd_lstm": "T3",
}
# Activation label of models whose activation is fixed.
MODEL_ACTIVATION = {
    "resnet20": "relu", "resnet56": "relu", "resnet110": "relu",
    "lstm": "tanh", "re_lstm": "tanh", "vd_lstm": "tanh", "re_vd_lstm": "tanh",
}


def method_label(method: str, norm: str = "none") -> str:
    """Row label of a run in the paper's vocabulary.

    A BN model with no regularizer is `bn`; BN plus PER is `bn+per`; a model
    without normalization keeps the method name (`vanilla`, `per`, ...).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
    if norm == "bn":
        return "bn" if method == "vanilla" else f"bn+{method}"
    return method


def make_cell(dataset: str, model: str, method: str, norm: str = "none",
              activation: str | None = None, table: str | None = None) -> dict:
    """The `cell` block of `summary.json`: {table, dataset, model, activation, method}."""
    if activation is None:
        activation = MODEL_ACTIVATION.get(model)
        if activation is None:
            raise ValueError(f"model {model!r} needs an explicit activation")
    return {
        "table": table or MODEL_TABLE.get(model, "extra"),
        "dataset": dataset,
        "model": model,
        "activation": activation,
        "method": method_label(method, norm),
    }


CELL_KEYS = ("table", "dataset", "model", "activation", "method")
SUMMARY_KEYS = ("status", "task", "cell", "lam", "seed", "epochs_completed", "steps",
                "wall_time_s", "device", "code_version", "versions", "final", "best")
