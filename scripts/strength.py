"""Does each lambda of the paper's grids do anything? (`make strength`)

For each model family of the tables, at initialization and after a few hundred
unregularized training steps under the family's protocol (the real runner, real data
when present under the data root, generated data otherwise), and for each lambda of
the family's preset grids: the median and range over sites of `grad_ratio` (the
penalty's gradient norm over the downstream gradient's at each site: the task's plus
later sites' penalties, what every run logs) and the
penalty's share of the parameter-gradient norm, for both reductions and both conv
layouts. Batches are the protocols' (128 for the ResNets, 250 for the deep ELU net,
20 x 35 tokens for the LSTMs): under `reduction=sum` the ratios grow with the batch.

Writes results/strength/strength.{csv,md} and results/strength/ablation_grids.json
(the ablation's lambda grids, derived from the measured ratios; scripts/make_presets.py
reads it).

    python scripts/strength.py [--steps 300] [--families "LSTM" "VD-LSTM"] [--data-root data]
        [--override-cifar data.batch_size=32] [--override-lm model.hidden_size=200]
"""
from __future__ import annotations

import argparse
import json
import contextlib
import sys
from pathlib import Path

import pandas as pd
import torch

from experiments.common import BUILD, compose_preset, preset_task, suite_paths
from per.analysis.strength import (ABLATION_GRIDS_JSON, FAMILIES, STRENGTH_CSV, Family, ablation_grids, markdown,
                                   summary)
from per.data.cifar import write_fake_cifar
from per.data.corpus import write_fake_corpus
from per.functional import LAYOUTS, REDUCTIONS
from per.strength import measure_strength
from per.training import runtime
from per.training.records import CHECKPOINT
from per.training.run import train

ROOT = Path(__file__).resolve().parents[1]


def _data_root(task: str, root: Path, work: Path) -> tuple[Path, str]:
    """(root, "real" | "generated"): the real files when present, else generated ones."""
    if task == "cifar" and (root / "cifar-10-batches-py").is_dir():
        return root, "real"
    if task == "lm" and any((root / "ptb").glob("ptb.train.txt*")):
        return root, "real"
    gen = work / "generated"
    if task == "cifar" and not (gen / "cifar-10-batches-py").is_dir():
        write_fake_cifar(gen, "cifar10", n_train=2000, n_test=256, seed=0, noise=150.0)
    if task == "lm" and not (gen / "ptb").is_dir():
        write_fake_corpus(gen, "ptb", n_train_lines=4000, vocab_size=1000)
    return gen, "generated"


def _config(preset: str, root: Path, run_dir: Path, steps: int, overrides: list[str]) -> dict:
    return compose_preset(preset, (
        f"data.root={root}", "data.verify_checksums=false", "trainer.device=cpu", "trainer.progress=false",
        "trainer.monitor.every=0", "logger.mode=disabled", f"trainer.max_steps={steps}", *overrides), run_dir)


def _rows(fam: Family, cfg: dict, build, when: str, data: str, model_state: dict | None,
          overrides: list[str], root: Path, run_dir: Path) -> list[dict]:
    """Measure every (kind, layout, reduction, lambda) of `fam` on one fixed training batch."""
    runtime.seed_everything(cfg["seed"])
    exp = build(cfg, torch.device("cpu"), contextlib.nullcontext)
    model, task = exp.model, exp.task
    if model_state is not None:
        model.load_state_dict(model_state)
    model.train()
    batch = next(iter(task.train_batches(0, 0)))
    hidden = getattr(task, "hidden", None)

    def loss_fn() -> torch.Tensor:
        if hidden is not None:
            task.hidden = hidden      # every pass starts from the same LM state
        return task.train_step(model, batch)[0]

    conv = preset_task(fam.base) == "cifar"
    out = []
    for kind, preset in fam.grids.items():
        method = _config(preset, root, run_dir, 1, overrides)["method"]
        grid = method["lam_grid"]
        for layout in (LAYOUTS if conv else ("channels",)):
            for reduction in REDUCTIONS:
                results = measure_strength(model, loss_fn, kind, grid, layout=layout,
                                           reduction=reduction, seed=cfg["seed"])
                for lam, s in zip(grid, results):
                    r, task_r = pd.Series(s.site_ratios), pd.Series(s.task_site_ratios)
                    out.append({"family": fam.name, "kind": kind,
                                "layout": layout if conv else "-", "reduction": reduction,
                                "lam": lam, "middle": lam == method["lam"],
                                "when": when, "data": data, "sites": len(r),
                                "ratio_median": r.median(), "ratio_min": r.min(),
                                "ratio_max": r.max(), "param_share": s.param_share,
                                "task_ratio_median": task_r.median(), "task_ratio_min": task_r.min(),
                                "task_ratio_max": task_r.max()})
    return out


def measure_family(fam: Family, steps: int, root: Path, work: Path,
                   overrides: list[str]) -> list[dict]:
    """Rows at initialization and after `steps` unregularized steps of `fam.base`."""
    task = preset_task(fam.base)
    build = BUILD[task]
    data_root, data = _data_root(task, root, work)
    run_dir = work / "runs" / fam.base
    cfg = _config(fam.base, data_root, run_dir, steps, overrides)
    rows = _rows(fam, cfg, build, "init", data, None, overrides, data_root, run_dir)
    summary = train(cfg, build)          # the real runner; a finished run is reused
    ckpt = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)
    rows += _rows(fam, cfg, build, f"step {summary['steps']}", data, ckpt["model"], overrides,
                  data_root, run_dir)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="unregularized training steps before the "
                    "second measurement")
    ap.add_argument("--families", nargs="*", default=[f.name for f in FAMILIES],
                    help="subset of: " + ", ".join(f.name for f in FAMILIES))
    ap.add_argument("--data-root", default=None, help="default: $PER_DATA_ROOT or data/")
    ap.add_argument("--out", default=str(ROOT / suite_paths()["strength_dir"]))
    ap.add_argument("--work", default=None, help="training runs and generated data "
                    "(default: <out>/work, not committed)")
    for task in BUILD:
        ap.add_argument(f"--override-{task}", action="append", default=[], metavar="KEY=VALUE",
                        help=f"Hydra override for every {task} configuration (repeatable)")
    args = ap.parse_args()
    unknown = set(args.families) - {f.name for f in FAMILIES}
    if unknown:
        ap.error(f"unknown families {sorted(unknown)}; valid: {', '.join(f.name for f in FAMILIES)}")
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    root = Path(args.data_root or suite_paths()["data_root"]).resolve()
    csv = out / STRENGTH_CSV
    df = pd.read_csv(csv) if csv.exists() else pd.DataFrame(columns=["family"])
    by_name = {f.name: f for f in FAMILIES}
    for fam in (by_name[name] for name in args.families):   # in the order given
        print(f"[strength] {fam.name} ({fam.base})", flush=True)
        overrides = getattr(args, f"override_{preset_task(fam.base)}")
        rows = pd.DataFrame(measure_family(fam, args.steps, root, work.resolve(), overrides))
        df = pd.concat([df[df.family != fam.name], rows], ignore_index=True)
        write(df, out)       # after each family, so a killed job keeps what it measured
    if not args.families:    # `--families` alone re-renders the records from the CSV
        write(df, out)
    print(markdown(df))
    return 0


def write(df: pd.DataFrame, out: Path) -> None:
    """strength.csv, strength.md and (with Fixup ResNet-56 rows) ablation_grids.json."""
    df["middle"] = df.middle.astype(bool)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / STRENGTH_CSV, index=False)
    (out / "strength.md").write_text(
        "At each preset's own lambda (method.lam), reduction=sum, channels layout:\n\n" + summary(df)
        + "\nEvery layout and reduction at that lambda (every lambda: strength.csv):\n\n"
        + markdown(df))
    if grids := ablation_grids(df):
        (out / ABLATION_GRIDS_JSON).write_text(json.dumps(grids, indent=1) + "\n")
    print(f"[strength] wrote {out}/strength.{{csv,md}}" + (", ablation_grids.json" if grids else ""),
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
