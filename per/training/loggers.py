"""W&B as one more sink behind `log(metrics, step)`; the local records stay the source
of truth. wandb is imported only when enabled; credentials come only from the
environment (WANDB_API_KEY), never from configs or records.

Everything W&B writes stays in the run directory's `wandb/` folder: the run itself
(`offline-run-*` / `run-*`), and W&B's own cache, config and staging folders (`cache/`,
`config/`, `data/`; by default `~/.cache/wandb` and `~/.config/wandb`), which also hold
its service's debug logs. The service reads these folders from the environment when it
starts, so each run starts its own service and stops it at `finish`.
"""
from __future__ import annotations

import configparser
import hashlib
import logging
import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

from per.schema import DIVERGED, METHOD_OPTIONS, WANDB_SUMMARY_KEY
from per.training.records import WANDB_DIR

LOGGER_MODES = ("online", "offline", "disabled")
# W&B's own folders (environment variable -> subfolder of `<run dir>/wandb/`).
WANDB_FOLDERS = {"WANDB_CACHE_DIR": "cache", "WANDB_CONFIG_DIR": "config", "WANDB_DATA_DIR": "data"}
STEP_PREFIX = "step/"   # per-`log_every` rows, apart from the per-epoch metrics of the same name

log = logging.getLogger(__name__)


LEGACY_HOST = "api.wandb.ai"   # the server before wandb 0.31, whose netrc entries wandb still reads


def default_base_url() -> str:
    """The W&B server wandb talks to without `WANDB_BASE_URL`: wandb's own default (0.31
    moved it from https://api.wandb.ai to CoreWeave's), or the old one where wandb is absent."""
    try:
        import wandb
        return str(wandb.Settings().base_url)
    except Exception:       # no wandb, or a version without the setting: its long-time default
        return f"https://{LEGACY_HOST}"


def _is_default_server(url: str) -> bool:
    """Whether `url` is W&B's own service under any of its names (CoreWeave's Forge proxy
    since 0.31), for which wandb reads an `api.wandb.ai` entry too."""
    hostname = urlsplit(url).hostname
    try:
        from wandb.sdk.lib.urls import forge_upstream_url
        hostname = urlsplit(forge_upstream_url(url)).hostname
    except Exception:   # wandb before 0.31: no Forge names
        pass
    return hostname == LEGACY_HOST


def user_base_url() -> str | None:
    """The W&B server the user chose: `WANDB_BASE_URL`, else `base_url` in W&B's settings
    file (`$WANDB_CONFIG_DIR/settings`, default `~/.config/wandb/settings`, where `wandb
    login --host` writes it); None for wandb's default. Read before a run moves W&B's
    config folder into its own directory (`WANDB_FOLDERS`), where wandb would not see it."""
    if base := os.environ.get("WANDB_BASE_URL"):
        return base
    folder = Path(os.environ.get("WANDB_CONFIG_DIR") or "~/.config/wandb").expanduser()
    settings = configparser.ConfigParser(interpolation=None)    # a URL may hold `%`
    try:
        settings.read(folder / "settings")
        return settings.get("default", "base_url", fallback=None) or None
    except configparser.Error:
        return None


def missing_credentials(mode: str) -> str | None:
    """Why `logger.mode=online` cannot log in, or None. As wandb looks: `WANDB_API_KEY` or
    `WANDB_IDENTITY_TOKEN_FILE` (not both), else a `.netrc` entry with a key for the
    server's `host[:port]` (`user_base_url`, else `default_base_url`, where an entry for
    `LEGACY_HOST` serves too; `wandb login` writes it; `NETRC` names another file)."""
    if mode != "online":
        return None
    key, token = os.environ.get("WANDB_API_KEY"), os.environ.get("WANDB_IDENTITY_TOKEN_FILE")
    if key and token:
        return "logger.mode='online' with both WANDB_API_KEY and WANDB_IDENTITY_TOKEN_FILE set; W&B takes one"
    if key or token:
        return None
    base = user_base_url()
    url = urlsplit(base or default_base_url())
    hosts = {url.netloc, url.hostname, *(() if base and not _is_default_server(base) else (LEGACY_HOST,))}
    path = Path(os.environ["NETRC"]).expanduser() if os.environ.get("NETRC") else next(
        (p for p in (Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()) if p.exists()),
        Path("~/.netrc").expanduser())
    try:
        entries = netrc.netrc(path)
        if any((entries.authenticators(m) or ("", "", ""))[2] for m in hosts if m):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return (f"logger.mode='online' without W&B credentials: set WANDB_API_KEY or run `wandb login` "
            f"(no key for {url.netloc or base!r} in {path}); or use "
            f"logger.mode=offline and `wandb sync` the run's wandb/ folder later")


def run_phase(cfg: dict) -> str:
    """`select` for a lambda-selection run (images held out: `data.val_size > 0`), else `final`."""
    return "select" if int(cfg["data"].get("val_size") or 0) > 0 else "final"


def format_lam(lam: float) -> str:
    """A short lambda label: 1e-4, 3e-05 -> 3e-5, 0.01 -> 1e-2, 0 -> 0."""
    if lam == 0:
        return "0"
    mantissa, exponent = f"{lam:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def wandb_group(cfg: dict, variant: list[str] | tuple[str, ...] = ()) -> str:
    """The W&B group: one per cell (`run_name`, the preset's name) and phase, plus the
    run's `variant` (`layout=flatten,max_steps=400`: what `run_variant` finds off the
    preset, as the tables keep such runs in rows of their own or mark them partial) and
    `/changed-<hash>` for a run that departs from its preset's protocol (its
    `protocol_changes`, which its tags list), so that W&B never averages them with the
    protocol's runs."""
    changes = cfg.get("protocol_changes") or []
    suffix = (f"/{','.join(variant)}" if variant else "") + (
        f"/changed-{hashlib.sha1('; '.join(changes).encode()).hexdigest()[:6]}" if changes else "")
    return f"{cfg['run_name']}/{run_phase(cfg)}{suffix}"


def run_variant(cfg: dict, preset: dict | None) -> list[str]:
    """How a run differs from its preset (`preset`: the config the preset composes to alone)
    where that is not a protocol change: the method's options (`layout=flatten`), and a
    shorter run (`epochs=<n>` below the preset's, `max_steps=<n>`); [] without `preset`."""
    if preset is None:
        return []
    method, theirs = cfg["method"], preset.get("method", {})
    out = [f"{opt}={method[opt]}" for opt in METHOD_OPTIONS if opt in method and opt in theirs
           and method[opt] != theirs[opt]]
    trainer, own = cfg.get("trainer", {}), preset.get("trainer", {})
    epochs, preset_epochs = trainer.get("epochs"), own.get("epochs")
    if isinstance(epochs, int) and isinstance(preset_epochs, int) and epochs < preset_epochs:
        out.append(f"epochs={epochs}")
    if trainer.get("max_steps"):
        out.append(f"max_steps={trainer['max_steps']}")
    return out


def wandb_tags(cfg: dict, cell: dict) -> list[str]:
    """The W&B tags of a run: its cell's values, the method's options (`layout=...`,
    `reduction=...`, `num_slices=...`), its epochs (`epochs=200`: a shorter run is
    partial), the held-out size of a selection run (`val=5000`) and each protocol change
    (`changed:<key>=<value>`), each cut to W&B's 64 characters."""
    method = cfg["method"]
    tags = [str(v) for v in cell.values()]
    tags += [f"{opt}={method[opt]}" for opt, methods in METHOD_OPTIONS.items()
             if method.get("name") in methods and opt in method]
    tags += [f"epochs={cfg['trainer']['epochs']}"] if "epochs" in cfg.get("trainer", {}) else []
    tags += [f"val={cfg['data']['val_size']}"] if run_phase(cfg) == "select" else []
    tags += [f"changed:{c}" for c in cfg.get("protocol_changes") or []]
    return [t[:64] for t in tags]


def wandb_name(cfg: dict, variant: list[str] | tuple[str, ...] = ()) -> str:
    """The W&B run name, its group's and the run's, e.g.
    `t1_cifar10_resnet56_per/select/lam=1e-4/seed=0`."""
    lam = float(cfg["method"].get("lam") or 0.0)
    return f"{wandb_group(cfg, variant)}/lam={format_lam(lam)}/seed={cfg['seed']}"


class WandbSink:
    """A W&B run in `mode` (offline needs no account); `run_id` (kept in the run
    directory) makes a resumed run continue the same W&B run. Where an online run cannot
    start (no network, W&B down), it logs offline instead, with a warning: the training
    run goes on, and `wandb sync` sends its record later. wandb reports a key or project
    the server refuses as a communication error too (it checks them only then): such a run
    also logs offline, warned with the error; a malformed key is raised."""

    def __init__(self, *, mode: str, project: str, entity: str | None, run_dir: Path, run_id: str | None,
                 name: str, group: str, tags: list[str], config: dict, init_timeout: float = 90.0) -> None:
        if mode not in LOGGER_MODES:
            raise ValueError(f"unknown logger.mode {mode!r}; valid: {', '.join(LOGGER_MODES)}")
        self.run = None
        self._saved_env: dict[str, str | None] = {}
        if mode == "disabled":
            return
        import wandb  # lazy: only when enabled

        root = Path(run_dir) / WANDB_DIR
        # The user's server (`wandb login --host`), which wandb reads from the config folder
        # that the run is about to move.
        run_env = {**{var: str(root / sub) for var, sub in WANDB_FOLDERS.items()},
                   **({"WANDB_BASE_URL": base} if (base := user_base_url()) else {})}
        for var, value in run_env.items():
            self._saved_env[var] = os.environ.get(var)
            os.environ[var] = value
        wandb.teardown()   # a service started for an earlier run would keep that run's folders
        init = dict(project=project, entity=entity, dir=str(run_dir), id=run_id, resume="allow", name=name,
                    group=group, tags=tags, config=config,
                    settings=wandb.Settings(silent=True, init_timeout=init_timeout))
        try:
            try:
                if mode == "online":
                    log.info("W&B: connecting to %s (up to %g s, then the run logs offline)",
                             base or default_base_url(), init_timeout)
                self.run = wandb.init(mode=mode, **init)
            except wandb.errors.CommError as e:    # W&B unreachable: the run goes on, offline
                if mode != "online" or isinstance(e, wandb.errors.AuthenticationError):   # a bad key: raised
                    raise
                log.warning("W&B online failed (%s: %s); logging offline into %s: `wandb sync` it "
                            "later, unless a later attempt of this run logged online (syncing would "
                            "overwrite that record)", type(e).__name__, e, root)
                wandb.teardown()
                self.run = wandb.init(mode="offline", **init)
        except BaseException:
            self._restore_env()
            raise

    def log(self, metrics: dict, step: int) -> None:
        """One per-epoch row (the keys of `metrics.jsonl`)."""
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def log_step(self, metrics: dict, step: int) -> None:
        """One per-`log_every` row (training loss so far in the epoch, lr, throughput),
        under `step/<key>`."""
        if self.run is not None:
            self.run.log({STEP_PREFIX + k: v for k, v in metrics.items() if v is not None}, step=step)

    def set_summary(self, summary: dict) -> None:
        """The run's `summary.json` dict as the W&B run's summary (`WANDB_SUMMARY_KEY`, what
        `per.analysis.wandb_source` reads): at the start (`running`: a killed run then reads
        back as interrupted) and at the end."""
        if self.run is not None:
            _set_summary(self.run, summary)

    def finish(self, summary: dict | None = None, exit_code: int = 0) -> None:
        """Finish the W&B run (once), with the run's summary (as `set_summary`); the
        environment is restored even when W&B fails."""
        if self.run is None:
            return
        import wandb

        run, self.run = self.run, None     # once: a failed finish is not retried on this run
        try:
            if summary is not None:
                _set_summary(run, summary)
            run.finish(exit_code=exit_code)
        finally:
            wandb.teardown()   # stop the service, whose logs live in this run's folder
            self._restore_env()

    def _restore_env(self) -> None:
        """Put back the environment variables the run set (`WANDB_FOLDERS`, `WANDB_BASE_URL`)."""
        for var, value in self._saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _set_summary(run, summary: dict) -> None:
    """`summary` under `WANDB_SUMMARY_KEY`, its status also as the summary's top-level
    `status` (a column of W&B's run table; W&B's own state says finished for a diverged
    run, which is a result) and, once diverged, as a tag."""
    run.summary[WANDB_SUMMARY_KEY] = summary
    run.summary["status"] = summary.get("status")
    tags = tuple(run.tags or ())      # None in older wandb for a run without tags
    if summary.get("status") == DIVERGED and DIVERGED not in tags:
        run.tags = (*tags, DIVERGED)
