"""The run-record vocabulary: one place for split names, the keys of a `metrics.jsonl`
row (metrics, per-site diagnostics), the table cell and its labels, and run statuses.

`summary.json` (README, "What lands in a run directory") and `paper_tables.csv` share this vocabulary, so
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
REGULARIZED = ("l1", "l2", "per", "vcl")   # the methods with a lambda (`method.lam`, its grid)
NORMS = ("none", "bn")

# Splits. Run records and the corpus use these names; the corpus files on disk keep
# theirs (`ptb.valid.txt`, `wiki.valid.tokens`) and the paper's tables say `valid`.
TRAIN, VAL, TEST = "train", "val", "test"
SPLITS = (TRAIN, VAL, TEST)
PAPER_SPLIT = {VAL: "valid", TEST: "test"}   # split label in `paper_tables.csv` and our tables

# Per-split measures. Image errors are in percent; ppl = exp(mean token loss).
LOSS, ERROR, PPL = "loss", "error", "ppl"


def metric_key(split: str, measure: str) -> str:
    """The row key of a measure on a split: `metric_key(VAL, PPL) == "val_ppl"`."""
    return f"{split}_{measure}"


# Metric names, per task.
TRAIN_LOSS, TRAIN_ERROR, TRAIN_PPL = (metric_key(TRAIN, m) for m in (LOSS, ERROR, PPL))
VAL_ERROR, TEST_ERROR = metric_key(VAL, ERROR), metric_key(TEST, ERROR)
VAL_PPL, TEST_PPL = metric_key(VAL, PPL), metric_key(TEST, PPL)
# The metrics a run's summary and the run table keep at its final and best epochs (those
# of its task present), and its end or skip line shows.
HEADLINE_METRICS = (TRAIN_LOSS, VAL_ERROR, TEST_ERROR, VAL_PPL, TEST_PPL)

# The other keys of a `metrics.jsonl` row (one per epoch).
EPOCH, STEP, LR = "epoch", "step", "lr"
PENALTY = "penalty"             # sum over sites of the unscaled per-site penalty
EPOCH_TIME = "epoch_time_s"     # training seconds of the epoch (evaluation excluded)
EVAL_TIME = "eval_time_s"       # seconds of the epoch's evaluation (all splits)


def throughput_key(items: str) -> str:
    """Training items per second, named by the task's items: `images_per_s`, `tokens_per_s`."""
    return f"{items}_per_s"


# Per-site diagnostics: `<prefix><site>`, averaged over the tracked steps of an epoch.
PENALTY_PREFIX = "penalty/"         # the site's unscaled penalty L_site
GRAD_RATIO_PREFIX = "grad_ratio/"   # ||lam dL_site/dh|| / ||d(downstream loss)/dh||


def is_diagnostic(key: str) -> bool:
    """Whether a row key is a per-site diagnostic (it has a `/`). Diagnostics may be
    infinite legitimately and stay out of `final`, `best` and the console line."""
    return "/" in key

SELECTION_METRIC = {"cifar": VAL_ERROR, "lm": VAL_PPL}   # lambda is chosen on this
SELECTION_VAL_SIZE = 5000   # training images held out to choose lambda on (the protocol's 45k/5k)
REPORT_METRIC = {"cifar": TEST_ERROR, "lm": TEST_PPL}     # the table reports this
# Where the reported metric is read from: images report the final epoch, LMs the
# best-validation checkpoint (docs/protocols.md, "Selection and reporting").
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


# A table cell: the `cell` block of `summary.json`, the paper CSV's key columns.
CELL_KEYS = ("table", "dataset", "model", "activation", "method")
# A cell less its method: the setting whose methods a figure draws side by side.
SETTING_KEYS = CELL_KEYS[:-1]
# Method options that make ablation variants of a cell, and the methods they apply to
# (for other methods the option is None, so a default left in the config does not
# split their cells).
METHOD_OPTIONS = {"layout": ("l1", "l2", "per"), "reduction": ("l1", "l2", "per"),
                  "num_slices": ("per",)}
# The reduction of runs recorded before `method.reduction` existed (commit c36b08c): the
# 1/N mean of eq. 5/6 was the only one then.
REDUCTION_BEFORE_OPTION = "mean"
# A run's departures from its preset's protocol (`per.training.checks.protocol_changes`),
# ", "-joined; "" for none.
CHANGES = "changes"
# A cell plus its variant: what runs are grouped by to choose lambda and to report.
VARIANT_KEYS = (*CELL_KEYS, *METHOD_OPTIONS, CHANGES)


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


def cell_of(cfg: dict) -> dict:
    """The table cell of a run, from its resolved config as a plain dict (`data.name`,
    `model.{name, norm, activation}`, `method.name`, the preset's `table`)."""
    model = cfg["model"]
    return make_cell(cfg["data"]["name"], model["name"], cfg["method"]["name"],
                     norm=model.get("norm", "none"), activation=model.get("activation"),
                     table=cfg.get("table"))


def method_options(cfg: dict) -> dict:
    """The run's `METHOD_OPTIONS` values from its config; None where the option does
    not apply to the run's method."""
    method = cfg["method"]
    recorded = {"reduction": REDUCTION_BEFORE_OPTION, **method}
    return {opt: recorded.get(opt) if method["name"] in methods else None
            for opt, methods in METHOD_OPTIONS.items()}


SUMMARY_KEYS = ("status", "task", "cell", "lam", "seed", "epochs_completed", "steps",
                "wall_time_s", "device", "code_version", "versions", "final", "best")
# The W&B run summary's key holding the `summary.json` dict (written by the W&B sink,
# read by `per.analysis.wandb_source`).
WANDB_SUMMARY_KEY = "summary"
