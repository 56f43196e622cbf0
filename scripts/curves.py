"""Per-epoch curves of a few runs side by side, with the paper's numbers beside them.

    python scripts/curves.py --run vanilla=results/runs/lm/t3_ptb_lstm/lam=0.0,seed=0 \
        --run per=... --metrics val_ppl test_ppl grad_ratio --out results/evidence/ptb_lstm
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from per.analysis.curves import curves_markdown, epoch_curves, paper_numbers
from per.training.records import METRICS_FILE, RunDir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, metavar="LABEL=RUN_DIR")
    ap.add_argument("--metrics", nargs="+", default=["val_ppl", "test_ppl"],
                    help="row keys, or a per-site prefix (grad_ratio, penalty) for its median")
    ap.add_argument("--out", required=True, help="writes OUT.csv and OUT.md")
    args = ap.parse_args()
    bad = [r for r in args.run if "=" not in r]
    if bad:
        ap.error(f"--run takes LABEL=RUN_DIR, got {bad}")
    runs = dict(r.split("=", 1) for r in args.run)
    if empty := [f"{label}={path}" for label, path in runs.items()
                 if not RunDir(path).read_jsonl(METRICS_FILE)]:
        ap.error(f"no {METRICS_FILE} rows in {', '.join(empty)} (not a run folder, or no epoch finished)")
    curves = epoch_curves(runs, args.metrics)
    text = curves_markdown(curves, paper_numbers(runs, args.metrics))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    curves.to_csv(out.with_suffix(".csv"))
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
