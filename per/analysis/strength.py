"""Reports of `make strength` (scripts/strength.py): the model families it measures, the
Markdown table a reader needs, the ablation's lambda grids derived from the measured
ratios, and where a preset's lambda leaves the band (`off_band`: the plan's warnings).

Input: the DataFrame of `strength.csv`, one row per (family, kind, layout, reduction,
lambda, when) with `ratio_median`, `ratio_min`, `ratio_max` (site grad_ratio) and
`param_share`, and `middle` marking each preset's own lambda (its `method.lam`, which
single runs take; the column's name is kept on disk).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from per.models.elu_cnn import ACTIVATIONS
from per.strength import BAND

# The files of `make strength` in `paths.strength_dir`.
STRENGTH_CSV = "strength.csv"                 # every measurement (the plan's warnings read it)
ABLATION_GRIDS_JSON = "ablation_grids.json"   # the ablation presets' grids (scripts/make_presets.py)


@dataclass(frozen=True)
class Family:
    """A model family `make strength` measures (scripts/strength.py)."""
    name: str
    base: str                 # unregularized preset: model, protocol, batch, training steps
    grids: dict[str, str]     # kind -> preset whose lam_grid is measured (its lam: `middle`)


FAMILIES = [
    Family("Fixup ResNet-56", "t1_cifar10_resnet56_vanilla",
           {k: f"t1_cifar10_resnet56_{k}" for k in ("per", "l1", "l2")}),
    Family("BN ResNet-56", "t1_cifar10_resnet56_bn", {"per": "t1_cifar10_resnet56_per"}),
    *[Family(f"deep ELU net, {act}", f"t2_cifar10_{act}_vanilla", {"per": f"t2_cifar10_{act}_per"})
      for act in ACTIVATIONS],
    Family("LSTM", "t3_ptb_lstm_vanilla", {k: f"t3_ptb_lstm_{k}" for k in ("per", "l1", "l2")}),
    Family("VD-LSTM", "t3_ptb_vd_lstm_vanilla", {k: f"t3_ptb_vd_lstm_{k}" for k in ("per", "l1", "l2")}),
]


def _fmt(x: float) -> str:
    return "nan" if x != x else f"{x:.1e}"


def markdown(df: pd.DataFrame) -> str:
    """The table a reader needs: each family at its preset's own lambda (`method.lam`), with
    a flag when the median site ratio leaves `BAND`."""
    lines = ["| family | kind | layout | reduction | lambda | when | data | site grad_ratio: "
             "median [min, max] | param-grad share | in 1e-3..1 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for _, r in df[df.middle].iterrows():
        ok = BAND[0] <= r.ratio_median <= BAND[1]
        lines.append(f"| {r.family} | {r.kind} | {r.layout} | {r.reduction} | {r.lam:g} | "
                     f"{r.when} | {r.data} | {_fmt(r.ratio_median)} [{_fmt(r.ratio_min)}, "
                     f"{_fmt(r.ratio_max)}] | {_fmt(r.param_share)} | {'yes' if ok else '**no**'} |")
    return "\n".join(lines) + "\n"


def round_1_3(x: float) -> float:
    """Nearest value of the form {1, 3} x 10^k on a log scale."""
    k = math.floor(math.log10(x))
    cands = [float(f"{m}e{e}") for e in (k - 1, k, k + 1) for m in (1, 3)]   # exact decimals
    return min(cands, key=lambda c: abs(math.log(c / x)))


def ablation_grids(df: pd.DataFrame) -> dict:
    """Grids for Fixup ResNet-56 + PER under each (layout, reduction): the paper's grid
    (channels, sum) scaled so the median site ratio matches it, after training."""
    fam = df[(df.family == "Fixup ResNet-56") & (df.kind == "per") & (df.when != "init")]
    if fam.empty:
        return {}
    mid = fam[fam.middle].set_index(["layout", "reduction"]).ratio_median
    ref = mid["channels", "sum"]
    paper = sorted(fam[(fam.layout == "channels") & (fam.reduction == "sum")].lam.unique(),
                   reverse=True)
    out = {"source": "scripts/strength.py: median site grad_ratio of Fixup ResNet-56 + PER at "
                     f"{fam.when.iloc[0]}, {fam.data.iloc[0]} data", "grids": {}}
    for (layout, reduction), ratio in mid.items():
        scale = ref / ratio
        out["grids"][f"{layout}_{reduction}"] = {
            "scale": float(scale), "lam_grid": [round_1_3(lam * scale) for lam in paper]}
    return out


def summary(df: pd.DataFrame) -> str:
    """The README's table: each family and kind at its preset's own lambda under the defaults
    (`reduction=sum`, `channels` layout), at initialization and after training."""
    d = df[(df.reduction == "sum") & df.middle & df.layout.isin(["channels", "-"])]
    lines = ["| family (steps trained) | kind | site grad_ratio at init: median | after training: "
             "median [min, max] | param-grad share after training | median in 1e-3..1 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (family, kind), g in d.groupby(["family", "kind"], sort=False):
        init, trained = g[g["when"] == "init"].iloc[0], g[g["when"] != "init"].iloc[0]
        ok = BAND[0] <= trained.ratio_median <= BAND[1]
        lines.append(f"| {family} ({trained['when']}) | {kind} | {_fmt(init.ratio_median)} | "
                     f"{_fmt(trained.ratio_median)} [{_fmt(trained.ratio_min)}, "
                     f"{_fmt(trained.ratio_max)}] | {_fmt(trained.param_share)} | "
                     f"{'yes' if ok else '**no**'} |")
    return "\n".join(lines) + "\n"


def off_band(df: pd.DataFrame, family: str, kind: str, layout: str, reduction: str, lam: float) -> str | None:
    """Where the measured median site grad_ratio of (`family`, `kind`, `layout`, `reduction`)
    at `lam` leaves `BAND`, at initialization or after training, as one phrase, with the
    measurements inside the band in parentheses (`inf`: the task's gradient is zero at most
    sites there, so the penalty alone moves them); None where every one stays inside, or
    where `df` has no such row (`layout` "-" for the LSTMs). An unmeasured `lam` below a
    measured lambda whose ratios all fall below the band (or above one whose ratios all
    exceed it) is named with that bound: the ratio grows with lambda (in proportion, at
    initialization)."""
    combo = df[(df.family == family) & (df.kind == kind) & (df.layout == layout) & (df.reduction == reduction)]
    rows = combo[combo.lam.map(lambda v: math.isclose(v, lam, rel_tol=1e-9))]
    if rows.empty:
        return _bound(combo, lam)
    inside = rows.ratio_median.between(*BAND)
    if inside.all():
        return None
    out = ", ".join(map(_measured, rows[~inside].itertuples()))
    return out + (f" (inside: {', '.join(map(_measured, rows[inside].itertuples()))})" if inside.any() else "")


def _measured(r) -> str:
    return f"{r.ratio_median:.3g} {'at init' if r.when == 'init' else 'after ' + r.when}"


def _bound(combo: pd.DataFrame, lam: float) -> str | None:
    """`off_band`'s phrase for an unmeasured `lam` from the nearest measured lambda on the
    far side of it whose every ratio is out of the band on that side; None without one."""
    by_lam = combo.groupby("lam").ratio_median
    below = [m for m, r in by_lam if m > lam and (r < BAND[0]).all()]
    above = [m for m, r in by_lam if m < lam and (r > BAND[1]).all()]
    if below or above:
        ref = min(below) if below else max(above)
        side = f"below {BAND[0]:g}" if below else f"above {BAND[1]:g}"
        shown = ", ".join(map(_measured, combo[combo.lam == ref].itertuples()))
        return f"not measured; {side}, as at λ={ref:g} ({'larger' if below else 'smaller'}, measured): {shown}"
    return None
