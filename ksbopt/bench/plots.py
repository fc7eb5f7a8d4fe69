"""The report's figures (matplotlib, the ``bench`` extra) and their styling.

:func:`write` makes, per task, the learning curves of each optimizer's chosen setting, the
learning-rate sensitivity and the symmetry diagnostics (Noether charges, effective learning
rate, angular update, parameter norm), and the NLD control's figures.

Readable with many optimizers: an optimizer *family* (the base method an entry modifies: SGD,
Adam, RMSProp, ...) shares a hue, entries within a family differ by line style and marker,
and legends sit outside the axes.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ksbopt.bench.tables import fmt_lr

__all__ = ["family", "legend_outside", "sensitivity", "styles", "write"]

_FAMILIES = ("adam", "sgd", "rmsprop", "lion", "muon", "lars", "nero", "schedule_free")
_LINES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")


def family(optimizer: str) -> str:
    """The family of an entry: the known base method its name starts with, else its name
    before any ``+`` (``adamw`` -> ``adam``, ``sgd+retract`` -> ``sgd``).

    Example:
      >>> [family(o) for o in ("adamw", "sgd+retract", "noether_rmsprop", "lion")]
      ['adam', 'sgd', 'noether_rmsprop', 'lion']
    """
    base = optimizer.split("+")[0].split("[")[0]
    return next((f for f in _FAMILIES if base.startswith(f)), base)


def styles(optimizers: Iterable[str]) -> dict[str, dict]:
    """Matplotlib keyword arguments per optimizer: a hue per family, a line style and marker
    per member.

    Example:
      >>> s = styles(["sgd", "sgd+wd", "adam"])
      >>> s["sgd"]["color"] == s["sgd+wd"]["color"] != s["adam"]["color"]
      True
    """
    import matplotlib

    names = list(dict.fromkeys(optimizers))
    fams = list(dict.fromkeys(family(o) for o in names))
    cmap = matplotlib.colormaps["tab10" if len(fams) <= 10 else "tab20"]
    seen: dict[str, int] = {}
    out = {}
    for o in names:
        f = family(o)
        i = seen[f] = seen.get(f, -1) + 1
        out[o] = {
            "color": cmap(fams.index(f) % cmap.N),
            "linestyle": _LINES[i % len(_LINES)],
            "marker": _MARKERS[i % len(_MARKERS)],
        }
    return out


def legend_outside(ax, fontsize: int = 7) -> None:
    """The legend to the right of the axes (``savefig(bbox_inches="tight")`` keeps it)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def sensitivity(ax, task: str, t: Mapping, style: Mapping[str, dict]) -> None:
    """Final validation metric against learning rate: mean over the tuning seeds, band from
    min to max, the chosen point circled, at each optimizer's chosen weight decay."""
    for o, row in t["optimizers"].items():
        spread = row.get("val_spread_by_lr") or {k: [v, v, v] for k, v in row["val_by_lr"].items()}
        lrs = np.array([float(k) for k in spread])
        m, lo, hi = (
            np.array([np.nan if x[i] is None else x[i] for x in spread.values()]) for i in range(3)
        )
        kw = style[o]
        ax.plot(
            lrs, m, label=o, color=kw["color"], linestyle=kw["linestyle"], marker=kw["marker"], ms=3
        )
        ax.fill_between(lrs, lo, hi, color=kw["color"], alpha=0.12, lw=0)
        if row["best_lr"] is not None and row["val_mean"] is not None:
            best = spread.get(str(row["best_lr"]), [None])[0]
            if best is not None:
                ax.plot([row["best_lr"]], [best], marker="o", ms=8, mfc="none", color=kw["color"])
    ax.set(
        xscale="log",
        xlabel="peak learning rate",
        ylabel=f"final validation {t['metric']}",
        title=f"{task}: learning-rate sensitivity",
    )
    legend_outside(ax)


# ---- the report's figures ---------------------------------------------------------------------


def write(
    out: Path, summary: Mapping, by_id: Mapping[str, dict], nld_records: Sequence[dict] = ()
) -> dict[str, list[str]]:
    """Writes the figures of a :func:`ksbopt.bench.summary.summarize` under ``out/plots``;
    returns the file names per task (and ``nld``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pdir = out / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    made: dict[str, list[str]] = defaultdict(list)
    for task, t in summary["grid"].items():
        made[task] += _task_figures(plt, pdir, task, t, by_id)
    if summary["nld"]:
        made["nld"].append(_nld_figure(plt, pdir, summary["nld"]))
        if _nld_charge_plot(plt, pdir / "nld_effective_lr.png", nld_records):
            made["nld"].append("nld_effective_lr.png")
    return made


def _task_figures(plt, pdir: Path, task: str, t: Mapping, by_id: Mapping[str, dict]) -> list:
    """The curves, sensitivity and (where recorded) diagnostics figures of one task."""
    best = {o: [by_id[i] for i in row["runs"]] for o, row in t["optimizers"].items()}
    style = styles(t["optimizers"])
    steps = max((r["curves"]["step"] for rs in best.values() for r in rs), key=len)
    made = [_curves_figure(plt, pdir, task, t, best, style, steps)]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sensitivity(ax, task, t, style)
    fig.tight_layout()
    name = f"{task}_lr.png"
    fig.savefig(pdir / name, dpi=90, bbox_inches="tight")
    plt.close(fig)
    made.append(name)

    diag = {o: rs for o, rs in best.items() if rs[0]["diagnostics"]["curves"]}
    if diag:
        made.append(_charges_figure(plt, pdir, task, diag, steps, style))
    return made


def _curves_figure(plt, pdir, task, t, best, style, steps) -> str:
    """Validation metric and train loss against steps, mean and band over the seeds."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for o, rs in best.items():
        lab = f"{o} (lr={fmt_lr(t['optimizers'][o]['best_lr'])})"
        _mean_band(axes[0], steps, [r["curves"]["val_metric"] for r in rs], lab, style[o])
        _mean_band(axes[1], steps, [r["curves"]["train_loss"] for r in rs], lab, style[o])
    axes[0].set(xlabel="step", ylabel=f"validation {t['metric']}", title=task)
    if t["target"] is not None:
        axes[0].axhline(t["target"], color="gray", ls=":", lw=1)
    axes[1].set(
        xlabel="step",
        ylabel="train loss (chunk mean)",
        title="best learning rate per optimizer",
    )
    legend_outside(axes[1])
    fig.tight_layout()
    name = f"{task}_curves.png"
    fig.savefig(pdir / name, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return name


def _charges_figure(plt, pdir, task, diag, steps, style) -> str:
    """Scale charge, effective learning rate, angular update and parameter norm; one legend,
    outside the last panel."""
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for o, rs in diag.items():
        for ax, key in zip(axes, ("charge", "eff_lr", "angular_update")):
            select = "eff_lr" if key != "angular_update" else key  # scale groups / units
            curves = [_group_mean(r, select, key, len(steps)) for r in rs]
            if all(c is not None for c in curves):
                _mean_band(ax, steps, curves, o, style[o])
        _mean_band(axes[3], steps, [r["curves"]["param_norm"] for r in rs], o, style[o])
    axes[0].set(
        xlabel="step",
        ylabel="scale charge 1/2|w|^2 (mean over groups)",
        yscale="log",
        title=f"{task}: Noether charges",
    )
    axes[1].set(
        xlabel="step",
        ylabel="effective lr = lr/|w|^2 (mean over groups)",
        yscale="log",
        title="effective learning rate of SGD (P2)",
    )
    axes[2].set(
        xlabel="step",
        ylabel="angle turned per step, radians (mean over units)",
        yscale="log",
        title="angular update (the effective step of any optimizer)",
    )
    axes[3].set(xlabel="step", ylabel="global parameter norm", title="parameter norm")
    legend_outside(axes[3])
    fig.tight_layout()
    name = f"{task}_charges.png"
    fig.savefig(pdir / name, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return name


def _nld_figure(plt, pdir: Path, rows: Sequence[Mapping]) -> str:
    """Test accuracy of the free and the constrained norm per NLD setting (bars, std)."""
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    x = np.arange(len(rows))
    for j, (label, off) in enumerate((("free", -0.2), ("constrained", 0.2))):
        m = [np.nan if r[label]["test_mean"] is None else r[label]["test_mean"] for r in rows]
        s = [0 if r[label]["test_std"] is None else r[label]["test_std"] for r in rows]
        ax.bar(x + off, m, 0.4, yerr=s, label=f"{label} filter norm", color=f"C{j}")
    ax.set_xticks(
        x,
        [
            f"lr={fmt_lr(r['learning_rate'])}\nm={r['momentum']:g}\nwd={r['weight_decay']:g}"
            for r in rows
        ],
        fontsize=7,
    )
    ax.set(ylabel="test accuracy", title="NLD control: free vs constrained filter norm")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(pdir / "nld_control.png", dpi=90)
    plt.close(fig)
    return "nld_control.png"


def _nld_charge_plot(plt, path: Path, recs: Sequence[dict]) -> bool:
    """Effective learning rate lr/|w|^2 (mean over filters) of the momentum-0.9, no-decay runs."""
    sel = [
        r
        for r in recs
        if r["config"]["hparams"].get("momentum") == 0.9
        and r["config"]["hparams"].get("weight_decay") == 0.0
        and _scale_mean(r, "eff_lr")
    ]
    if not sel:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[tuple, list] = defaultdict(list)
    for r in sel:
        groups[(r["config"]["optimizer"], r["config"]["learning_rate"])].append(r)
    for (opt, lr), rs in sorted(groups.items()):
        steps = rs[0]["curves"]["step"]
        label = f"{'constrained' if opt == 'sgd+retract' else 'free'} norm, lr={fmt_lr(lr)}"
        _mean_band(ax, steps, [_scale_mean(r, "eff_lr") for r in rs], label)
    ax.set(
        xlabel="step",
        ylabel="effective lr = lr / |w|^2 (mean over filters)",
        yscale="log",
        title="NLD control: effective learning rate, free vs constrained norm",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _stack(curves: list[list], n: int) -> np.ndarray:
    a = np.full((len(curves), n), np.nan)
    for i, c in enumerate(curves):
        a[i, : len(c)] = [np.nan if v is None else v for v in c]
    return a


def _mean_band(ax, steps, runs: list[list], label, style: Mapping | None = None):
    a = _stack(runs, len(steps))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m, lo, hi = np.nanmean(a, 0), np.nanmin(a, 0), np.nanmax(a, 0)
    kw = {k: v for k, v in (style or {}).items() if k != "marker"}
    (line,) = ax.plot(steps, m, label=label, **kw)
    if len(runs) > 1:
        ax.fill_between(steps, lo, hi, alpha=0.2, color=line.get_color())


def _scale_mean(rec: dict, key: str) -> list | None:
    """Mean over the scale groups' curves ``key`` ("charge" or "eff_lr") of one record."""
    dc = rec["diagnostics"]["curves"]
    labels = [k for k, v in dc.items() if "eff_lr" in v]
    if not labels:
        return None
    a = _stack([dc[k][key] for k in labels], len(rec["curves"]["step"]))
    return list(np.nanmean(a, 0))


def _group_mean(rec: dict, select: str, key: str, n: int) -> list | None:
    """Mean over the groups that record ``select`` of their curve ``key`` (None if none)."""
    dc = rec["diagnostics"]["curves"]
    labels = [k for k, v in dc.items() if select in v and key in v]
    if not labels:
        return None
    a = _stack([dc[k][key] for k in labels], n)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return list(np.nanmean(a, 0))
