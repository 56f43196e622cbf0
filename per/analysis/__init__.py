"""Run records -> pandas -> the paper's tables and figures.

`collect` reads run directories (`wandb_source` reads the same table from W&B),
`tables` chooses lambda on validation and builds the tables beside `paper`'s numbers,
`figures` draws them (imported on its own: it needs matplotlib).
"""
from per.analysis.collect import collect_runs, load_activations, load_metrics, load_run_metrics
from per.analysis.paper import load_paper_tables, paper_value
from per.analysis.tables import (all_results, cell_results, format_table, lambda_scores,
                                 select_lambda, write_tables)
from per.analysis.wandb_source import collect_wandb

__all__ = [
    "all_results", "cell_results", "collect_runs", "collect_wandb", "format_table",
    "lambda_scores", "load_activations", "load_metrics", "load_paper_tables",
    "load_run_metrics", "paper_value", "select_lambda", "write_tables",
]
