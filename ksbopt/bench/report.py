"""Markdown report, summary JSON and PNG plots from the per-run records.

The grid experiment's numbers (per schedule arm, task and optimizer: the setting chosen on the
VALIDATION split, TEST metric at that setting over its seeds, sensitivity, good band, targets,
paired-bootstrap verdicts) come from :mod:`ksbopt.bench.summary`; this module adds the NLD
control and the published baselines, writes ``summary.json`` and ``report.md`` (protocol,
the four questions, overview, one section per task and arm) and the plots.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ksbopt.bench import profiles

__all__ = ["fmt", "summarize", "write_report"]


def fmt(x, digits: int = 4) -> str:
    """How every metric appears in the report (``-`` for a missing or non-finite value)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def fmt_lr(x) -> str:
    return "-" if x is None else f"{x:g}"


def _mean_std(vals: Sequence) -> tuple[float | None, float | None, int]:
    v = [x for x in vals if x is not None]
    if not v or len(v) < len(vals):  # any diverged / missing seed spoils the mean
        return None, None, len(v)
    a = np.asarray(v, dtype=np.float64)
    return float(a.mean()), float(a.std()), len(v)


def _hp_key(rec) -> tuple:
    return tuple(sorted(rec["config"]["hparams"].items()))


def _grid_summary(recs: list[dict]) -> dict[str, dict]:
    """Schedule arm -> task -> rows (:func:`ksbopt.bench.summary.grid_summary`), with the data
    line and the symmetry diagnostics of the chosen runs added."""
    from ksbopt.bench.summary import grid_summary

    by_id = {r["id"]: r for r in recs}
    arms = grid_summary(recs)
    for tasks in arms.values():
        for t in tasks.values():
            t["data"] = _data_line(t["data"])
            for row in t["optimizers"].values():
                row.update(_diag_stats([by_id[i] for i in row["runs"]]))
    return arms


def _diag_stats(rs: list[dict]) -> dict:
    """Means over seeds and groups of the recorded diagnostics of the runs ``rs``.

    ``angle_first`` / ``angle_last``: angular update per step (radians) of the units in the
    first and the last chunk of steps; ``charge_growth``: last / first scale charge (mean over
    the scale groups). None where the runs recorded no such diagnostic.
    """
    first, last, growth = [], [], []
    for r in rs:
        summ = r.get("diagnostics", {}).get("summary") or {}
        a = [v["angular_update"] for v in summ.values() if "angular_update" in v]
        if a:
            first.append(np.mean([x["first"] for x in a]))
            last.append(np.mean([x["last"] for x in a]))
        q = [v["charge"] for v in summ.values() if "eff_lr" in v and v["charge"]["first"]]
        if q:
            growth.append(np.mean([x["last"] / x["first"] for x in q]))

    def mean(v):
        return float(np.mean(v)) if v else None

    return {"angle_first": mean(first), "angle_last": mean(last), "charge_growth": mean(growth)}


def _data_line(info: Mapping) -> str:
    sizes = info.get("sizes")
    if isinstance(sizes, Mapping):
        return "train/val/test = " + "/".join(str(sizes[k]) for k in ("train", "val", "test"))
    if isinstance(sizes, list):
        return "train/val/test = " + "/".join(map(str, sizes))
    if "bytes" in info:
        b = info["bytes"]
        return (
            f"train/val/test = {b['train']:,}/{b['val']:,}/{b['test']:,} bytes "
            f"(Python {info.get('python', '?')} stdlib)"
        )
    return ""


def _sort_key(row, higher):
    m = row["test_mean"]
    if m is None:
        return math.inf
    return -m if higher else m


def _nld_summary(recs: list[dict]) -> list[dict]:
    cells: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in recs:
        c = r["config"]
        key = (c["learning_rate"], c["hparams"]["momentum"], c["hparams"]["weight_decay"])
        cells[key][c["optimizer"]].append(r)
    rows = []
    for (lr, m, wd), by in sorted(cells.items()):
        row = {"learning_rate": lr, "momentum": m, "weight_decay": wd}
        for opt, label in (("sgd", "free"), ("sgd+retract", "constrained")):
            rs = by.get(opt, [])
            tm, ts, n = (
                _mean_std([x["final"]["test_metric"] for x in rs]) if rs else (None, None, 0)
            )
            row[label] = {"test_mean": tm, "test_std": ts, "seeds": len(rs), "finite": n}
        f, c = row["free"]["test_mean"], row["constrained"]["test_mean"]
        row["free_minus_constrained"] = None if f is None or c is None else f - c
        rows.append(row)
    return rows


def _baseline_summary(recs: list[dict], published: Mapping[str, float]) -> list[dict]:
    by: dict[str, list] = defaultdict(list)
    for r in recs:
        by[r["config"]["task"]].append(r)
    rows = []
    for task, rs in sorted(by.items()):
        tm, ts, _ = _mean_std([x["final"]["test_metric"] for x in rs])
        rows.append(
            {
                "task": task,
                "test_mean": tm,
                "test_std": ts,
                "seeds": len(rs),
                "published": published.get(task),
                "steps": rs[0]["config"]["steps"],
                "learning_rate": rs[0]["config"]["learning_rate"],
            }
        )
    return rows


def summarize(records: Sequence[dict], published: Mapping[str, float] | None = None) -> dict:
    """The numbers the report shows, per experiment."""
    by_exp: dict[str, list] = defaultdict(list)
    for r in records:
        by_exp[r["config"]["experiment"]].append(r)
    arms = _grid_summary(by_exp["grid"]) if by_exp["grid"] else {}
    return {
        # the first arm (warm-up + cosine when it ran) answers the questions; all arms in "arms"
        "grid": next(iter(arms.values())) if arms else {},
        "grid_arm": next(iter(arms), None),
        "arms": arms,
        "nld": _nld_summary(by_exp["nld"]) if by_exp["nld"] else [],
        "baselines": (
            _baseline_summary(by_exp["baselines"], published or {}) if by_exp["baselines"] else []
        ),
    }


# ---- plots ------------------------------------------------------------------------------------


def _stack(curves: list[list], n: int) -> np.ndarray:
    a = np.full((len(curves), n), np.nan)
    for i, c in enumerate(curves):
        a[i, : len(c)] = [np.nan if v is None else v for v in c]
    return a


def _mean_band(ax, steps, runs: list[list], label, style: Mapping | None = None):
    a = _stack(runs, len(steps))
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
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


def _plots(
    out: Path, summary: dict, by_id: Mapping[str, dict], nld_records: Sequence[dict] = ()
) -> dict[str, list[str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ksbopt.bench import plots

    pdir = out / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    made: dict[str, list[str]] = defaultdict(list)
    for task, t in summary["grid"].items():
        best = {o: [by_id[i] for i in row["runs"]] for o, row in t["optimizers"].items()}
        style = plots.styles(t["optimizers"])
        steps = max((r["curves"]["step"] for rs in best.values() for r in rs), key=len)
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
        plots.legend_outside(axes[1])
        fig.tight_layout()
        name = f"{task}_curves.png"
        fig.savefig(pdir / name, dpi=90, bbox_inches="tight")
        plt.close(fig)
        made[task].append(name)

        fig, ax = plt.subplots(figsize=(7, 4.5))
        plots.sensitivity(ax, task, t, style)
        fig.tight_layout()
        name = f"{task}_lr.png"
        fig.savefig(pdir / name, dpi=90, bbox_inches="tight")
        plt.close(fig)
        made[task].append(name)

        diag = {o: rs for o, rs in best.items() if rs[0]["diagnostics"]["curves"]}
        if diag:
            fig, axes = plt.subplots(1, 4, figsize=(20, 4))
            for o, rs in diag.items():
                for ax, key in zip(axes, ("charge", "eff_lr", "angular_update")):
                    select = "eff_lr" if key != "angular_update" else key  # scale groups / units
                    curves = [_group_mean(r, select, key, len(steps)) for r in rs]
                    if all(c is not None for c in curves):
                        _mean_band(ax, steps, curves, o)
                _mean_band(axes[3], steps, [r["curves"]["param_norm"] for r in rs], o)
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
                title="effective learning rate of SGD (THEORY P2)",
            )
            axes[2].set(
                xlabel="step",
                ylabel="angle turned per step, radians (mean over units)",
                yscale="log",
                title="angular update (the effective step of any optimizer)",
            )
            axes[3].set(xlabel="step", ylabel="global parameter norm", title="parameter norm")
            for ax in axes:
                if ax.lines:
                    ax.legend(fontsize=7)
            fig.tight_layout()
            name = f"{task}_charges.png"
            fig.savefig(pdir / name, dpi=90)
            plt.close(fig)
            made[task].append(name)

    if summary["nld"]:
        rows = summary["nld"]
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
        made["nld"].append("nld_control.png")
        if _nld_charge_plot(plt, pdir / "nld_effective_lr.png", nld_records):
            made["nld"].append("nld_effective_lr.png")
    return made


# ---- markdown ---------------------------------------------------------------------------------

# (task with normalisation, the same model without)
NORM_PAIRS = (
    ("mnist1d_cnn_bn", "mnist1d_cnn"),
    ("mnist1d_mlp_ln", "mnist1d_mlp"),
    ("mnist1d_large_cnn_bn", "mnist1d_large_cnn"),
    ("digits_cnn_bn", "digits_cnn"),
    ("lm_stdlib_qknorm", "lm_stdlib"),
)


def _overview(grid: Mapping) -> list[str]:
    """Cross-task tables: test metric per optimizer, free vs constrained norm, norm vs none."""
    if not grid:
        return []
    from ksbopt.bench.registry import REGISTRY

    order = {name: i for i, name in enumerate(REGISTRY)}
    opts = sorted(
        dict.fromkeys(o for t in grid.values() for o in t["optimizers"]),
        key=lambda o: (order.get(o, len(order)), o),
    )
    L = [
        "## Overview",
        "",
        "Test metric at the learning rate chosen on validation (mean over seeds); **bold** = "
        "best of the row.",
        "",
        "| task (metric) | " + " | ".join(opts) + " |",
        "|---|" + "---|" * len(opts),
    ]
    for task, t in grid.items():
        vals = {o: r["test_mean"] for o, r in t["optimizers"].items()}
        finite = {o: v for o, v in vals.items() if v is not None}
        best = (max if t["higher_is_better"] else min)(finite, key=finite.get) if finite else None
        cells = []
        for o in opts:
            if o not in vals:
                cells.append("n/a" if _not_applicable(o, task) else " ")
            elif vals[o] is None:
                cells.append("diverged")
            else:
                cells.append(f"**{fmt(vals[o])}**" if o == best else fmt(vals[o]))
        L.append(f"| {task} ({t['metric']}) | " + " | ".join(cells) + " |")
    L.append("")
    na: dict[str, set] = {}
    for task in grid:
        for o in opts:
            if o not in grid[task]["optimizers"] and (why := _not_applicable(o, task)):
                na.setdefault(o, set()).add(why)
    if na:
        L += [
            "n/a = not applicable, never run: "
            + "; ".join(f"`{o}`: {' / '.join(sorted(w))}" for o, w in na.items())
            + ".",
            "",
        ]
    rows = [(task, t) for task, t in grid.items() if {"sgd", "sgd+retract"} <= set(t["optimizers"])]
    if rows:
        L += [
            "Implicit adaptivity of normalisation + SGD: free norm (`sgd`) vs norm held at its "
            "initial value (`sgd+retract`), each at its own best learning rate:",
            "",
            "| task | sgd | sgd+retract | free - constrained |",
            "|---|---|---|---|",
        ]
        for task, t in rows:
            a, b = (t["optimizers"][o]["test_mean"] for o in ("sgd", "sgd+retract"))
            d = "-" if a is None or b is None else f"{a - b:+.4f}"
            L.append(f"| {task} | {fmt(a)} | {fmt(b)} | {d} |")
        L.append("")
    pairs = [(a, b) for a, b in NORM_PAIRS if a in grid and b in grid]
    if pairs:
        L += [
            "With vs without normalisation (same model otherwise), per optimizer:",
            "",
            "| tasks | optimizer | with | without |",
            "|---|---|---|---|",
        ]
        for a, b in pairs:
            for o in opts:
                if o in grid[a]["optimizers"] and o in grid[b]["optimizers"]:
                    L.append(
                        f"| {a} / {b} | {o} | {fmt(grid[a]['optimizers'][o]['test_mean'])}"
                        f" | {fmt(grid[b]['optimizers'][o]['test_mean'])} |"
                    )
        L.append("")
    return L


def _not_applicable(optimizer: str, task: str) -> str | None:
    """Why a registry entry does not apply to a task (from metadata), or None."""
    from ksbopt.bench.registry import REGISTRY
    from ksbopt.bench.tasks import TASKS

    if optimizer not in REGISTRY or task not in TASKS:
        return None
    return REGISTRY[optimizer].not_applicable(TASKS[task])


# ---- the four questions -----------------------------------------------------------------------


def _row(grid: Mapping, task: str, opt: str) -> Mapping | None:
    t = grid.get(task)
    return None if t is None else t["optimizers"].get(opt)


def _verdict(t: Mapping, a: Mapping | None, b: Mapping | None, names: tuple[str, str]) -> str:
    """``names[0]`` better / worse / tie against ``names[1]`` on the test metric.

    A paired bootstrap over the shared seeds (:func:`ksbopt.bench.stats.paired_bootstrap`):
    better or worse only when the 95% interval of the mean difference excludes 0.
    """
    from ksbopt.bench.stats import paired_bootstrap

    if a is None or b is None:
        return "-"
    ma, mb = a["test_mean"], b["test_mean"]
    if ma is None or mb is None:
        return f"{names[0] if ma is None else names[1]} diverged"
    p = paired_bootstrap(*({int(k): v for k, v in r["test_by_seed"].items()} for r in (a, b)))
    v = p.verdict(t["higher_is_better"])
    if v == "better":
        return f"{names[0]} better"
    if v == "worse":
        return f"{names[1]} better"
    return "tie" if v == "tie" else "too few seeds"


def _cell(r: Mapping | None) -> str:
    if r is None:
        return "-"
    return f"{_pm(r['test_mean'], r['test_std'])} (lr {fmt_lr(r['best_lr'])})"


def _best_of(t: Mapping, rows: Mapping[str, Mapping | None]) -> tuple[str, Mapping] | None:
    ok = {o: r for o, r in rows.items() if r is not None and r["test_mean"] is not None}
    if not ok:
        return None
    pick = max if t["higher_is_better"] else min
    o = pick(ok, key=lambda k: ok[k]["test_mean"])
    return o, ok[o]


def _tally(verdicts: list[str], name: str) -> str:
    wins = sum(v == f"{name} better" for v in verdicts)
    ties = sum(v == "tie" for v in verdicts)
    return f"{name} better on {wins}, tie on {ties}, worse on {len(verdicts) - wins - ties}"


def _versus_table(grid, tasks, name, others) -> list[str]:
    """Rows ``name`` vs each of ``others`` and a verdict against the best of ``others``."""
    L = [
        f"| task | {name} | " + " | ".join(others) + " | verdict vs the best of those |",
        "|---|---|" + "---|" * len(others) + "---|",
    ]
    vs = []
    for t in tasks:
        base = {o: _row(grid, t, o) for o in others}
        best = _best_of(grid[t], base)
        mine = _row(grid, t, name)
        v = "-" if best is None else _verdict(grid[t], mine, best[1], (name, best[0]))
        vs.append(v)
        cells = " | ".join(_cell(base[o]) for o in others)
        L.append(f"| {t} | {_cell(mine)} | {cells} | {v} |")
    L += ["", f"{_tally(vs, name)} of {len(vs)} tasks.", ""]
    return L


def _questions(summary: Mapping) -> list[str]:
    """The report's answers to the four questions of the benchmark, with this run's numbers."""
    from ksbopt.bench.tasks import TASKS

    grid, nld = summary["grid"], summary["nld"]
    if not grid and not nld:
        return []
    normalised = [t for t in grid if t in TASKS and "scale" in TASKS[t].kinds]
    plain = [t for t in grid if t in TASKS and "scale" not in TASKS[t].kinds]
    L = [
        "## The four questions",
        "",
        "Each answer uses the test metric at the setting chosen on validation (mean ± std "
        "over seeds). A difference counts only when the 95% paired-bootstrap interval of the "
        "mean per-seed difference excludes 0; otherwise it is called a tie.",
        "",
        "### 1. Does the implicit adaptivity of normalisation + SGD matter?",
        "",
        "Free filter norm (`sgd`, heavy ball 0.9) against the norm held at its initial value "
        "(`sgd+retract`, the control experiment of Tanaka & Kunin, arXiv 2105.02716).",
        "",
    ]
    if nld:
        L += ["NLD control (fixed learning rates, no tuning; test accuracy):", ""]
        for r in nld:
            d = r["free_minus_constrained"]
            f, c = r["free"], r["constrained"]
            if d is None:
                verdict = "-"
            else:
                tie = abs(d) <= (f["test_std"] or 0) + (c["test_std"] or 0)
                who = "tie" if tie else ("free" if d > 0 else "constrained") + " better"
                verdict = f"{d:+.4f} ({who})"
            L.append(
                f"- lr {fmt_lr(r['learning_rate'])}, momentum {r['momentum']:g}, weight decay "
                f"{r['weight_decay']:g}: free {_pm(f['test_mean'], f['test_std'])}, constrained "
                f"{_pm(c['test_mean'], c['test_std'])}: {verdict}"
            )
        L.append("")
    pairs = [t for t in normalised if {"sgd", "sgd+retract"} <= set(grid[t]["optimizers"])]
    if pairs:
        L += ["Tuned learning rates (the grid):", ""]
        L += _versus_table(grid, pairs, "sgd", ("sgd+retract",))

    L += [
        "### 2. Does the explicit version help networks without normalisation?",
        "",
        "`noether_rmsprop` (the implicit RMSProp of normalisation + SGD made explicit on the "
        "hidden units) against `sgd`, `sgd+wd` and `rmsprop` on networks without normalisation.",
        "",
    ]
    rows2 = [t for t in plain if "noether_rmsprop" in grid[t]["optimizers"]]
    if rows2:
        L += _versus_table(grid, rows2, "noether_rmsprop", ("sgd", "sgd+wd", "rmsprop"))
    else:
        L += ["(no task without normalisation ran `noether_rmsprop`)", ""]

    L += [
        "### 3. Does steering to equilibrium skip the warm-up transient?",
        "",
        "`sgd+steer_eq` (sgd+wd whose scale groups are put at the rotational equilibrium of its "
        "own heavy ball from the first step, P7a of docs/concepts/noether_charges.md) against "
        "`sgd+wd` (the same base) "
        "and `rotational` (REQ, the peer that imposes the equilibrium angular update). Steps to "
        "the validation target: median over the seeds that reached it (k/n), measured at the "
        "evaluation points. Angular update per step of the units in the first and the last "
        "chunk of steps, against A* = sqrt(2 lr wd / (1 + momentum)).",
        "",
    ]
    rows3 = [t for t in normalised if "sgd+steer_eq" in grid[t]["optimizers"]]
    if rows3:
        L += [
            "| task | optimizer | steps to target | angle/step first → last chunk | A* | test |",
            "|---|---|---|---|---|---|",
        ]
        faster = []
        for t in rows3:
            for o in ("sgd+wd", "sgd+steer_eq", "rotational"):
                r = _row(grid, t, o)
                if r is None:
                    continue
                stt = "-" if r["steps_to_target"] is None else f"{r['steps_to_target']:.0f}"
                ang = "-"
                if r["angle_first"] is not None:
                    ang = f"{r['angle_first']:.2e} → {r['angle_last']:.2e}"
                a_star = _a_star(r)
                L.append(
                    f"| {t} | {o} | {stt} ({r['reached']}/{r['seeds']}) | {ang} | "
                    f"{'-' if a_star is None else f'{a_star:.2e}'} | {_cell(r)} |"
                )
            faster.append(f"{t}: {_faster(_row(grid, t, 'sgd+steer_eq'), _row(grid, t, 'sgd+wd'))}")
        L += ["", "Steps to target, `sgd+steer_eq` vs `sgd+wd`: " + "; ".join(faster) + ".", ""]
    else:
        L += ["(`sgd+steer_eq` did not run on a normalised task)", ""]

    L += [
        "### 4. Does a symmetric kinetic energy beat Adam, AdamW and AdamP on normalised nets?",
        "",
        "`adam+symmetrize` (`ksbopt.symmetrize(optax.adam)`: Adam on the orbit-invariant "
        "coordinates) against `adam`, `adamw` and `adamp`.",
        "",
    ]
    rows4 = [t for t in normalised if "adam+symmetrize" in grid[t]["optimizers"]]
    if rows4:
        L += _versus_table(grid, rows4, "adam+symmetrize", ("adam", "adamw", "adamp"))
    else:
        L += ["(`adam+symmetrize` did not run on a normalised task)", ""]
    return L


def _a_star(row: Mapping) -> float | None:
    """A* = sqrt(2 lr wd / (1 + momentum)) of a row's runs (:ref:`P7a <p7a>`), if it has decay."""
    hp = row.get("hparams") or {}
    wd, m = hp.get("weight_decay"), hp.get("momentum")
    if not wd or m is None:
        return None
    return math.sqrt(2 * row["best_lr"] * wd / (1 + m))


def _faster(a: Mapping | None, b: Mapping | None) -> str:
    if a is None or b is None:
        return "-"
    sa, sb = a["steps_to_target"], b["steps_to_target"]
    if sa is None and sb is None:
        return "neither reached the target"
    if sb is None:
        return f"only sgd+steer_eq reached it ({sa:.0f} steps)"
    if sa is None:
        return f"only sgd+wd reached it ({sb:.0f} steps)"
    return f"{sa:.0f} vs {sb:.0f} steps ({sa / sb:.2f}x)"


def _pm(m, s, digits=4):
    if m is None:
        return "diverged"
    return f"{fmt(m, digits)} ± {fmt(s, digits)}"


def _protocol_lines(proto: Mapping | None, arm: str | None) -> list[str]:
    """How the numbers were made (the protocol of :mod:`ksbopt.bench.protocol`)."""
    from ksbopt.bench.stats import TARGET_FRACTION

    L = []
    if proto:
        _factors = ", ".join(f"{f:g}" for f in proto["wd_factors"])
        L.append(
            f"Protocol: learning rates on the half-decade lattice (…, 0.01, 0.03, 0.1, …), "
            f"a starting window of {proto['window']} points around the entry's grid, extended "
            f"(at most {proto['max_extensions']} more rates) until the best has a worse "
            f"neighbour on each side; weight decay x{{{_factors}}} "
            f"of the entry's default where the registry tunes it; tuned on the first "
            f"{proto['tuning_seeds']} seed(s), then the chosen setting on seeds "
            f"{', '.join(map(str, proto['seeds']))}; schedule arms "
            f"{', '.join(proto['schedules'])} (warm-up {proto['warmup_fraction']:.0%} of the "
            "steps, then cosine decay towards 0)"
            + "".join(
                f"; the {arm} arm only on {', '.join(t)} for {', '.join(o)}"
                for arm, (t, o) in proto.get("arm_scope", {}).items()
            )
            + "."
        )
    L.append(
        "Setting (learning rate, weight decay) chosen on the validation split (final value, "
        "mean over the tuning seeds); test metric at that setting, mean ± std over all its "
        "seeds. Δ vs reference: mean paired test difference against the best baseline (an "
        "entry using no ksbopt feature) with its 95% bootstrap interval; better / worse only "
        "when the interval excludes 0. Good band: learning rates whose validation metric is "
        "within 1 point (accuracy) or 1% (loss) of the best, width in decades. Edge: the "
        "chosen learning rate lacks a worse neighbour. Target: "
        f"{TARGET_FRACTION:g} x the best final validation metric of the task (1/{TARGET_FRACTION:g}"
        " x for a loss); steps and training seconds (compilation and evaluation excluded) to "
        "reach it, median over the seeds that did (k/n)."
        + (f" Main tables: schedule arm `{arm}`." if arm else "")
    )
    return L


def _delta(optimizer: str, r: Mapping, reference: str | None) -> str:
    if optimizer == reference:
        return "reference"
    p = r.get("paired")
    if not p or p["n"] == 0:
        return "-"
    return f"{p['mean']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}] {p['verdict']}"


def _task_section(task: str, t: Mapping, arm: str | None, level: str = "##") -> list[str]:
    arrow = "higher is better" if t["higher_is_better"] else "lower is better"
    se = [r["sampling_error"] for r in t["optimizers"].values() if r.get("sampling_error")]
    L = [
        f"{level} {task}" + (f" ({arm})" if level != "##" else ""),
        "",
        f"{t['description']}. Data: {t['data'] or 'see the run records'}. Metric: "
        f"{t['metric']} ({arrow}); target {fmt(t['target'])}; {t['steps']} steps, evaluated "
        f"every {t.get('eval_every') or '?'}; {t['n_params']:,} parameters."
        + (
            f" Sampling error of the test metric: at most {max(se):.4f} "
            f"({t['n_test']:,} test examples)."
            if se
            else ""
        ),
        "",
        f"| optimizer | lr | wd | test {t['metric']} | Δ vs {t.get('reference') or '-'} "
        f"[95% CI] | good band (decades) | steps to target | s to target | ms/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o, r in t["optimizers"].items():
        stt = "-" if r["steps_to_target"] is None else f"{r['steps_to_target']:.0f}"
        tt = "-" if r.get("time_to_target") is None else f"{r['time_to_target']:.1f}"
        div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
        band = r.get("band")
        bw = "-" if band is None else f"{band[2]:.1f} ({fmt_lr(band[0])}–{fmt_lr(band[1])})"
        wd = r["hparams"].get("weight_decay")
        L.append(
            f"| {o} | {fmt_lr(r['best_lr'])}{' **edge**' if r.get('edge') else ''} | "
            f"{'-' if wd is None else f'{wd:g}'} | {_pm(r['test_mean'], r['test_std'])}{div} "
            f"({r['seeds']} seeds) | {_delta(o, r, t.get('reference'))} | {bw} | "
            f"{stt} ({r['reached']}/{r['seeds']}) | {tt} | {r['step_ms']:.2f} |"
        )
    lrs = sorted({float(k) for r in t["optimizers"].values() for k in r["val_by_lr"]})
    L += [
        "",
        f"Validation {t['metric']} by learning rate at the chosen weight decay (mean over the "
        "tuning seeds):",
        "",
        "| optimizer | " + " | ".join(fmt_lr(x) for x in lrs) + " |",
        "|---|" + "---|" * len(lrs),
    ]
    for o, r in t["optimizers"].items():
        cells = {float(k): v for k, v in r["val_by_lr"].items()}
        L.append(
            f"| {o} | "
            + " | ".join(
                (fmt(cells[x]) if cells[x] is not None else "diverged") if x in cells else " "
                for x in lrs
            )
            + " |"
        )
    L.append("")
    return L


def write_report(
    out: str | os.PathLike,
    records: Sequence[dict],
    meta: Mapping,
    *,
    published: Mapping[str, float] | None = None,
    plots: bool = True,
) -> Path:
    """Writes ``report.md``, ``summary.json`` and ``plots/*.png`` under ``out``."""
    out = Path(out)
    summary = summarize(records, published)
    by_id = {r["id"]: r for r in records}
    nld_records = [r for r in records if r["config"]["experiment"] == "nld"]
    made = _plots(out, summary, by_id, nld_records) if plots and records else {}
    env = records[0]["env"] if records else {}
    L = [f"# ksbopt benchmark report: suite `{meta.get('suite')}`", ""]
    L += [
        f"- command: `{meta.get('command', '')}`",
        f"- date: {meta.get('date', datetime.datetime.now().isoformat(timespec='seconds'))}",
        f"- devices: {meta.get('devices', '')}",
        f"- machine: {env.get('machine', '?')}, {env.get('cpu_count', '?')} CPUs visible; "
        f"python {env.get('python', '?')}, jax {env.get('jax', '?')}, "
        f"optax {env.get('optax', '?')}",
        f"- scale: `{meta.get('scale')}`; runs: {len(records)} "
        f"({meta.get('trained', '?')} trained now, {meta.get('reused', '?')} reused from "
        "earlier records)",
    ]
    if meta.get("wall_s") is not None:
        L.append(f"- wall time of this invocation: {meta['wall_s']:.1f} s")
    for note in meta.get("notes", []):
        L.append(f"- note: {note}")
    L += ["", *_protocol_lines(meta.get("protocol"), summary.get("grid_arm")), ""]
    L += _questions(summary)
    L += _overview(summary["grid"])
    for task, t in summary["grid"].items():
        L += _task_section(task, t, summary.get("grid_arm"))
        L += profiles.report_lines(
            task,
            {
                o: [by_id[i].get("profile") for i in r["runs"] if i in by_id]
                for o, r in t["optimizers"].items()
            },
        )
        for name in made.get(task, []):
            L += [f"![{name}](plots/{name})", ""]
    for arm, tasks in list(summary.get("arms", {}).items())[1:]:
        L += [f"## Schedule arm `{arm}`", ""]
        for task, t in tasks.items():
            L += _task_section(task, t, arm, level="###")
    if summary["nld"]:
        L += [
            "## NLD control: constrained vs free filter norm",
            "",
            "Task `mnist1d_cnn_bn`, SGD with heavy-ball momentum and coupled weight decay; "
            "`constrained` = `sgd+retract` (every filter norm kept at its initial value), "
            "`free` = `sgd`. Test accuracy, mean ± std over seeds. Tanaka & Kunin report "
            "that the free norm wins clearly at a high learning rate and ties at a low one, "
            "that the benefit needs momentum ~0.9 and that weight decay helps both.",
            "",
            "| lr | momentum | weight decay | free | constrained | free - constrained |",
            "|---|---|---|---|---|---|",
        ]
        for r in summary["nld"]:
            d = r["free_minus_constrained"]
            L.append(
                f"| {fmt_lr(r['learning_rate'])} | {r['momentum']:g} | "
                f"{r['weight_decay']:g} | {_pm(r['free']['test_mean'], r['free']['test_std'])}"
                f" | {_pm(r['constrained']['test_mean'], r['constrained']['test_std'])} | "
                f"{'-' if d is None else f'{d:+.4f}'} |"
            )
        L.append("")
        for name in made.get("nld", []):
            L += [f"![{name}](plots/{name})", ""]
    if summary["baselines"]:
        L += [
            "## MNIST-1D published baselines (sanity check)",
            "",
            "Adam, batch 100, trained on all 4000 training examples, tested on the 1000 test "
            "examples of the standard split; published figures from Greydanus, "
            "arXiv 2011.14439 (PyTorch initialisation; ours is Flax's).",
            "",
            "| task | steps | lr | test accuracy (ours) | published |",
            "|---|---|---|---|---|",
        ]
        for r in summary["baselines"]:
            L.append(
                f"| {r['task']} | {r['steps']} | {fmt_lr(r['learning_rate'])} | "
                f"{_pm(r['test_mean'], r['test_std'])} | "
                f"{'-' if r['published'] is None else fmt(r['published'], 2)} |"
            )
        L.append("")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"meta": dict(meta), **summary}, indent=1))
    path = out / "report.md"
    path.write_text("\n".join(L) + "\n")
    return path
