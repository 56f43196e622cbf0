"""W&B as one more sink behind `log(metrics, step)`; the local records stay the source
of truth. wandb is imported only when enabled; credentials come only from the
environment (WANDB_API_KEY), never from configs or records."""
from __future__ import annotations

from pathlib import Path

LOGGER_MODES = ("online", "offline", "disabled")


class WandbSink:
    """A W&B run in `mode` (offline needs no account); `run_id` (kept in the run
    directory) makes a resumed run continue the same W&B run."""

    def __init__(self, *, mode: str, project: str, entity: str | None, run_dir: Path, run_id: str,
                 name: str, group: str, tags: list[str], config: dict) -> None:
        if mode not in LOGGER_MODES:
            raise ValueError(f"unknown logger.mode {mode!r}; valid: {', '.join(LOGGER_MODES)}")
        self.run = None
        if mode == "disabled":
            return
        import wandb  # lazy: only when enabled

        self.run = wandb.init(mode=mode, project=project, entity=entity, dir=str(run_dir),
                              id=run_id, resume="allow", name=name, group=group, tags=tags,
                              config=config, settings=wandb.Settings(silent=True))

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def finish(self, summary: dict | None = None, exit_code: int = 0) -> None:
        if self.run is None:
            return
        if summary is not None:
            self.run.summary["summary"] = summary
        self.run.finish(exit_code=exit_code)
        self.run = None
