"""Plot styling and the learning-rate sensitivity figure (matplotlib, the ``bench`` extra).

Readable with many optimizers: an optimizer *family* (the base method an entry modifies: SGD,
Adam, RMSProp, ...) shares a hue, entries within a family differ by line style and marker,
and legends sit outside the axes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

__all__ = ["family", "legend_outside", "sensitivity", "styles"]

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
