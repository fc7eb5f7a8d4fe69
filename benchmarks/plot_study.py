"""Figures of a kinetic-energy study: learning-rate sensitivity per schedule arm, and the
angular update per step that explains it.

Reads a results folder written by ``ksbopt.bench`` (its ``summary.json`` and ``runs/``) and
writes, under ``FOLDER/plots``:

- ``arms_<task>.png``: final validation metric against the peak learning rate, one panel per
  schedule arm (``constant`` = no warm-up, no decay; ``cosine`` = warm-up + cosine decay),
  every optimizer of the task (mean over seeds, band from min to max);
- ``angles_<task>_<arm>_lr<lr>.png`` for each ``--angles ARM:LR``: the angular update per step
  of the scale groups (mean over groups and seeds) and the train loss against the step, for
  every optimizer that records it at that learning rate, with the equilibrium angular update
  A* = sqrt(2 lr wd / (1 + momentum)) of each SGD-family entry dashed.

Run:  python -m benchmarks.plot_study benchmarks/results/design-cpu --angles constant:0.3
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from ksbopt.bench import plots
from ksbopt.bench.tables import fmt_lr

_HEAVY_BALL_WD = ("rotational", "noether_rmsprop")


def _records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*.json"))]


def arms_figure(plt, summary: dict, task: str, style: dict, out: Path) -> str:
    """One sensitivity panel per schedule arm, on a shared metric axis."""
    arms = [a for a in ("constant", "cosine") if task in summary["arms"].get(a, {})]
    fig, axes = plt.subplots(1, len(arms), figsize=(6.5 * len(arms), 4.2), sharey=True)
    for ax, arm in zip(np.atleast_1d(axes), arms):
        plots.sensitivity(ax, task, summary["arms"][arm][task], style)
        ax.set_title(f"{task}, {arm} schedule")
        if ax is not np.atleast_1d(axes)[-1] and ax.get_legend():
            ax.get_legend().remove()
    fig.tight_layout()
    name = f"arms_{task}.png"
    fig.savefig(out / name, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return name


def _angles(rec: dict) -> np.ndarray | None:
    """Mean over the groups recording an angular update, per evaluation point."""
    curves = [
        [np.nan if x is None else x for x in c["angular_update"]]
        for c in rec["diagnostics"]["curves"].values()
        if "angular_update" in c
    ]
    return _nanmean(curves) if curves else None


def _nanmean(rows: list) -> np.ndarray:
    """The mean over rows, ignoring NaN (the first evaluation point records no step)."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.array(rows, float), 0)


def angles_figure(
    plt, records: list[dict], task: str, arm: str, lr: float, style: dict, out: Path
) -> str:
    """Angular update and train loss against the step at one learning rate and arm."""
    runs = defaultdict(list)
    for r in records:
        c = r["config"]
        if (c["task"], c["schedule"], c["learning_rate"]) == (task, arm, lr) and r["final"]:
            runs[c["optimizer"]].append(r)
    fig, (ax_a, ax_l) = plt.subplots(1, 2, figsize=(13, 4))
    for o, rs in runs.items():
        steps = rs[0]["curves"]["step"]
        kw = {k: v for k, v in style[o].items() if k != "marker"}
        angles = [a for a in map(_angles, rs) if a is not None]
        if angles:
            ax_a.plot(steps, _nanmean(angles), label=o, **kw)
            hp = rs[0]["config"]["hparams"]
            # the heavy ball + coupled weight decay whose equilibrium these entries share
            if plots.family(o) == "sgd" or o in _HEAVY_BALL_WD:
                a_star = np.sqrt(2 * lr * hp.get("weight_decay", 0.0) / (1 + hp.get("momentum", 0)))
                if a_star > 0:
                    ax_a.axhline(a_star, color=kw["color"], ls="--", lw=0.8)
        loss = [[np.nan if x is None else x for x in r["curves"]["train_loss"]] for r in rs]
        ax_l.plot(steps, _nanmean(loss), label=o, **kw)
    ax_a.set(
        xlabel="step",
        ylabel="angle turned per step, radians (mean over units)",
        yscale="log",
        title=f"{task}, {arm}, lr {fmt_lr(lr)}: angular update (dashed: A*)",
    )
    ax_l.set(xlabel="step", ylabel="train loss (chunk mean)", yscale="log", title="train loss")
    plots.legend_outside(ax_l)
    fig.tight_layout()
    name = f"angles_{task}_{arm}_lr{fmt_lr(lr)}.png"
    fig.savefig(out / name, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return name


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a ksbopt.bench results folder")
    ap.add_argument(
        "--angles",
        action="append",
        default=[],
        metavar="ARM:LR",
        help="also plot the angular updates of every task at this arm and learning rate",
    )
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = json.loads((args.folder / "summary.json").read_text())
    out = args.folder / "plots"
    out.mkdir(exist_ok=True)
    arms = summary["arms"].values()
    tasks = list(dict.fromkeys(t for arm in arms for t in arm))
    # one colour per optimizer in every figure
    style = plots.styles(sorted({o for arm in arms for t in arm.values() for o in t["optimizers"]}))
    made = [arms_figure(plt, summary, t, style, out) for t in tasks]
    records = _records(args.folder)
    for spec in args.angles:
        arm, lr = spec.split(":")
        made += [angles_figure(plt, records, t, arm, float(lr), style, out) for t in tasks]
    print("\n".join(str(out / m) for m in made))


if __name__ == "__main__":
    main()
