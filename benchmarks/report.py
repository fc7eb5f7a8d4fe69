"""Markdown report, summary JSON and PNG plots from the per-run records.

Learning rates are chosen per (task, optimizer) on the VALIDATION split (the mean over seeds of
the final validation metric; a run that diverged counts as the worst) and results are reported
on the TEST split at that learning rate: mean +- standard deviation over seeds (ddof 0),
steps to the task's validation target (median over the seeds that reached it), the final
metric, time per step and compile time.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

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


def _grid_summary(recs: list[dict]) -> dict:
    by_task: dict[str, dict[str, dict[float, list]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for r in recs:
        c = r["config"]
        by_task[c["task"]][c["optimizer"]][c["learning_rate"]].append(r)
    out = {}
    for task, opts in by_task.items():
        any_rec = next(iter(next(iter(opts.values())).values()))[0]
        higher = any_rec["task"]["higher_is_better"]
        rows = {}
        for opt, lrs in opts.items():
            scores = {}
            for lr, rs in lrs.items():
                m, _, _ = _mean_std([x["final"]["val_metric"] for x in rs])
                # a learning rate at which any seed diverged is never chosen
                scores[lr] = None if any(x["status"] == "diverged" for x in rs) else m
            finite = {lr: s for lr, s in scores.items() if s is not None}
            if finite:
                best = (max if higher else min)(finite, key=finite.get)
            else:
                best = min(lrs)
            rs = lrs[best]
            tm, ts, n = _mean_std([x["final"]["test_metric"] for x in rs])
            vm, vs, _ = _mean_std([x["final"]["val_metric"] for x in rs])
            reached = [x["steps_to_target"] for x in rs if x["steps_to_target"] is not None]
            rows[opt] = {
                "best_lr": best,
                "test_mean": tm,
                "test_std": ts,
                "val_mean": vm,
                "val_std": vs,
                "seeds": len(rs),
                "finite_seeds": n,
                "diverged": sum(x["status"] == "diverged" for x in rs),
                "steps_to_target": float(np.median(reached)) if reached else None,
                "reached": len(reached),
                "step_ms": float(np.median([x["timing"]["step_ms_median"] for x in rs])),
                "compile_s": max(x["timing"]["compile_s"] for x in rs),
                "val_by_lr": {str(lr): s for lr, s in sorted(scores.items())},
                "runs": [x["id"] for x in rs],
            }
        out[task] = {
            "data": _data_line(any_rec["task"].get("data", {})),
            "metric": any_rec["task"]["metric"],
            "higher_is_better": higher,
            "target": any_rec["task"]["target"],
            "description": any_rec["task"]["description"],
            "n_params": any_rec["task"]["n_params"],
            "steps": any_rec["config"]["steps"],
            "optimizers": dict(sorted(rows.items(), key=lambda kv: _sort_key(kv[1], higher))),
        }
    return out


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
    return {
        "grid": _grid_summary(by_exp["grid"]) if by_exp["grid"] else {},
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


def _mean_band(ax, steps, runs: list[list], label):
    a = _stack(runs, len(steps))
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            m, lo, hi = np.nanmean(a, 0), np.nanmin(a, 0), np.nanmax(a, 0)
    (line,) = ax.plot(steps, m, label=label)
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

    pdir = out / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    made: dict[str, list[str]] = defaultdict(list)
    for task, t in summary["grid"].items():
        best = {o: [by_id[i] for i in row["runs"]] for o, row in t["optimizers"].items()}
        steps = max((r["curves"]["step"] for rs in best.values() for r in rs), key=len)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for o, rs in best.items():
            lab = f"{o} (lr={fmt_lr(t['optimizers'][o]['best_lr'])})"
            _mean_band(axes[0], steps, [r["curves"]["val_metric"] for r in rs], lab)
            _mean_band(axes[1], steps, [r["curves"]["train_loss"] for r in rs], lab)
        axes[0].set(xlabel="step", ylabel=f"validation {t['metric']}", title=task)
        if t["target"] is not None:
            axes[0].axhline(t["target"], color="gray", ls=":", lw=1)
        axes[1].set(
            xlabel="step",
            ylabel="train loss (chunk mean)",
            title="best learning rate per optimizer",
        )
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        name = f"{task}_curves.png"
        fig.savefig(pdir / name, dpi=90)
        plt.close(fig)
        made[task].append(name)

        fig, ax = plt.subplots(figsize=(5.5, 4))
        for o, row in t["optimizers"].items():
            lrs = [float(k) for k in row["val_by_lr"]]
            vals = [np.nan if v is None else v for v in row["val_by_lr"].values()]
            ax.plot(lrs, vals, marker="o", label=o)
        ax.set(
            xscale="log",
            xlabel="learning rate",
            ylabel=f"final validation {t['metric']}",
            title=f"{task}: learning-rate sensitivity",
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"{task}_lr.png"
        fig.savefig(pdir / name, dpi=90)
        plt.close(fig)
        made[task].append(name)

        diag = {o: rs for o, rs in best.items() if rs[0]["diagnostics"]["curves"]}
        if diag:
            fig, axes = plt.subplots(1, 3, figsize=(15, 4))
            for o, rs in diag.items():
                dc = rs[0]["diagnostics"]["curves"]
                scale_labels = [k for k, v in dc.items() if "eff_lr" in v]
                if scale_labels:
                    q = [
                        np.nanmean(
                            _stack(
                                [r["diagnostics"]["curves"][k]["charge"] for k in scale_labels],
                                len(steps),
                            ),
                            0,
                        )
                        for r in rs
                    ]
                    e = [
                        np.nanmean(
                            _stack(
                                [r["diagnostics"]["curves"][k]["eff_lr"] for k in scale_labels],
                                len(steps),
                            ),
                            0,
                        )
                        for r in rs
                    ]
                    _mean_band(axes[0], steps, [list(x) for x in q], o)
                    _mean_band(axes[1], steps, [list(x) for x in e], o)
                _mean_band(axes[2], steps, [r["curves"]["param_norm"] for r in rs], o)
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
                title="effective learning rate (THEORY P2)",
            )
            axes[2].set(xlabel="step", ylabel="global parameter norm", title="parameter norm")
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
    from benchmarks.registry import REGISTRY

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
                cells.append(" ")
            elif vals[o] is None:
                cells.append("diverged")
            else:
                cells.append(f"**{fmt(vals[o])}**" if o == best else fmt(vals[o]))
        L.append(f"| {task} ({t['metric']}) | " + " | ".join(cells) + " |")
    L.append("")
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


def _pm(m, s, digits=4):
    if m is None:
        return "diverged"
    return f"{fmt(m, digits)} ± {fmt(s, digits)}"


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
    L += [
        "",
        "Learning rate chosen on the validation split (final value, mean over seeds); "
        "test metric at that learning rate, mean ± std over seeds. Steps to target: median "
        "over the seeds whose validation metric reached the task's target (k/n reached). "
        "Time per step: median over chunks after the first, compile time excluded. Charge "
        "plots show the Noether charge 1/2|w|^2 of the scale groups and lr/|w|^2, the "
        "effective learning rate of SGD on a scale-invariant group (THEORY.md P2; not the "
        "effective step of Adam or RMSProp).",
        "",
    ]
    L += _overview(summary["grid"])
    for task, t in summary["grid"].items():
        arrow = "higher is better" if t["higher_is_better"] else "lower is better"
        L += [
            f"## {task}",
            "",
            f"{t['description']}. Data: {t['data'] or 'see the run records'}. Metric: "
            f"{t['metric']} ({arrow}); validation target {fmt(t['target'])}; {t['steps']} "
            f"steps; {t['n_params']:,} parameters.",
            "",
        ]
        L += [
            "| optimizer | best lr | test "
            + t["metric"]
            + " | val "
            + t["metric"]
            + " | steps to target | ms/step | compile s |",
            "|---|---|---|---|---|---|---|",
        ]
        for o, r in t["optimizers"].items():
            stt = "-" if r["steps_to_target"] is None else f"{r['steps_to_target']:.0f}"
            div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
            L.append(
                f"| {o} | {fmt_lr(r['best_lr'])} | {_pm(r['test_mean'], r['test_std'])}"
                f"{div} | {_pm(r['val_mean'], r['val_std'])} | {stt} "
                f"({r['reached']}/{r['seeds']}) | {r['step_ms']:.2f} | "
                f"{r['compile_s']:.1f} |"
            )
        lrs = sorted({float(k) for r in t["optimizers"].values() for k in r["val_by_lr"]})
        L += [
            "",
            "Validation " + t["metric"] + " by learning rate (mean over seeds):",
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
        for name in made.get(task, []):
            L += [f"![{name}](plots/{name})", ""]
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
