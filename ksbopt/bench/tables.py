"""The report's Markdown tables and how every number in them is written.

The cross-task overview (test metric per optimizer; free against constrained norm; with
against without normalisation), the protocol paragraph, one section per task (results and
validation metric by learning rate), the NLD control and the published baselines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = [
    "NORM_PAIRS",
    "baselines_section",
    "fmt",
    "fmt_lr",
    "nld_section",
    "overview",
    "pm",
    "protocol_lines",
    "task_section",
]


def fmt(x, digits: int = 4) -> str:
    """How every metric appears in the report (``-`` for a missing or non-finite value)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def fmt_lr(x) -> str:
    return "-" if x is None else f"{x:g}"


def pm(m, s, digits=4) -> str:
    """``mean ± std`` (``diverged`` where the mean is missing)."""
    if m is None:
        return "diverged"
    return f"{fmt(m, digits)} ± {fmt(s, digits)}"


# (task with normalisation, the same model without)
NORM_PAIRS = (
    ("mnist1d_cnn_bn", "mnist1d_cnn"),
    ("mnist1d_mlp_ln", "mnist1d_mlp"),
    ("mnist1d_large_cnn_bn", "mnist1d_large_cnn"),
    ("digits_cnn_bn", "digits_cnn"),
    ("lm_stdlib_qknorm", "lm_stdlib"),
)


def overview(grid: Mapping) -> list[str]:
    """Cross-task tables: test metric per optimizer, free vs constrained norm, norm vs none."""
    if not grid:
        return []
    from ksbopt.bench.registry import REGISTRY

    order = {name: i for i, name in enumerate(REGISTRY)}
    opts = sorted(
        dict.fromkeys(o for t in grid.values() for o in t["optimizers"]),
        key=lambda o: (order.get(o, len(order)), o),
    )
    return [*_test_table(grid, opts), *_retract_table(grid), *_norm_pairs_table(grid, opts)]


def _test_table(grid: Mapping, opts: Sequence[str]) -> list[str]:
    """Test metric per task and optimizer, the best of each row in bold, and why the cells of
    optimizers that do not apply are empty."""
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
                cells.append("n/a" if not_applicable(o, task) else " ")
            elif vals[o] is None:
                cells.append("diverged")
            else:
                cells.append(f"**{fmt(vals[o])}**" if o == best else fmt(vals[o]))
        L.append(f"| {task} ({t['metric']}) | " + " | ".join(cells) + " |")
    L.append("")
    na: dict[str, set] = {}
    for task in grid:
        for o in opts:
            if o not in grid[task]["optimizers"] and (why := not_applicable(o, task)):
                na.setdefault(o, set()).add(why)
    if na:
        L += [
            "n/a = not applicable, never run: "
            + "; ".join(f"`{o}`: {' / '.join(sorted(w))}" for o, w in na.items())
            + ".",
            "",
        ]
    return L


def _retract_table(grid: Mapping) -> list[str]:
    """``sgd`` against ``sgd+retract`` on every task that ran both."""
    rows = [(task, t) for task, t in grid.items() if {"sgd", "sgd+retract"} <= set(t["optimizers"])]
    if not rows:
        return []
    L = [
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
    return L


def _norm_pairs_table(grid: Mapping, opts: Sequence[str]) -> list[str]:
    """Each optimizer on a task with normalisation and on the same model without."""
    pairs = [(a, b) for a, b in NORM_PAIRS if a in grid and b in grid]
    if not pairs:
        return []
    L = [
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


def not_applicable(optimizer: str, task: str) -> str | None:
    """Why a registry entry does not apply to a task (from metadata), or None."""
    from ksbopt.bench.registry import REGISTRY
    from ksbopt.bench.tasks import TASKS

    if optimizer not in REGISTRY or task not in TASKS:
        return None
    return REGISTRY[optimizer].not_applicable(TASKS[task])


def protocol_lines(proto: Mapping | None, arm: str | None) -> list[str]:
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


def task_section(task: str, t: Mapping, arm: str | None, level: str = "##") -> list[str]:
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
            f"{'-' if wd is None else f'{wd:g}'} | {pm(r['test_mean'], r['test_std'])}{div} "
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


def nld_section(rows: Sequence[Mapping], figures: Sequence[str]) -> list[str]:
    """The NLD control: free against constrained filter norm per setting, and its figures."""
    L = [
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
    for r in rows:
        d = r["free_minus_constrained"]
        L.append(
            f"| {fmt_lr(r['learning_rate'])} | {r['momentum']:g} | "
            f"{r['weight_decay']:g} | {pm(r['free']['test_mean'], r['free']['test_std'])}"
            f" | {pm(r['constrained']['test_mean'], r['constrained']['test_std'])} | "
            f"{'-' if d is None else f'{d:+.4f}'} |"
        )
    L.append("")
    for name in figures:
        L += [f"![{name}](plots/{name})", ""]
    return L


def baselines_section(rows: Sequence[Mapping]) -> list[str]:
    """Our MNIST-1D baselines against the published figures."""
    L = [
        "## MNIST-1D published baselines (sanity check)",
        "",
        "Adam, batch 100, trained on all 4000 training examples, tested on the 1000 test "
        "examples of the standard split; published figures from Greydanus, "
        "arXiv 2011.14439 (PyTorch initialisation; ours is Flax's).",
        "",
        "| task | steps | lr | test accuracy (ours) | published |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        L.append(
            f"| {r['task']} | {r['steps']} | {fmt_lr(r['learning_rate'])} | "
            f"{pm(r['test_mean'], r['test_std'])} | "
            f"{'-' if r['published'] is None else fmt(r['published'], 2)} |"
        )
    L.append("")
    return L
