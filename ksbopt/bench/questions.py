"""The report's answers to the benchmark's four questions, with the numbers of its runs.

1. Does the implicit adaptivity of normalisation + SGD matter (free against constrained norm)?
2. Does the explicit version (``noether_rmsprop``) help networks without normalisation?
3. Does steering to equilibrium skip the warm-up transient?
4. Does a symmetric kinetic energy beat Adam, AdamW and AdamP on normalised nets?

A difference counts only when the 95% paired-bootstrap interval of the mean per-seed
difference excludes 0 (:func:`ksbopt.bench.stats.paired_bootstrap`); otherwise it is a tie.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ksbopt.bench.tables import fmt_lr, pm

__all__ = ["lines"]


def lines(summary: Mapping) -> list[str]:
    """The report's answers to the four questions of the benchmark, with this run's numbers."""
    from ksbopt.bench.tasks import TASKS

    grid, nld = summary["grid"], summary["nld"]
    if not grid and not nld:
        return []
    normalised = [t for t in grid if t in TASKS and "scale" in TASKS[t].kinds]
    plain = [t for t in grid if t in TASKS and "scale" not in TASKS[t].kinds]
    return [
        "## The four questions",
        "",
        "Each answer uses the test metric at the setting chosen on validation (mean ± std "
        "over seeds). A difference counts only when the 95% paired-bootstrap interval of the "
        "mean per-seed difference excludes 0; otherwise it is called a tie.",
        "",
        *_implicit_adaptivity(grid, nld, normalised),
        *_explicit_version(grid, plain),
        *_steering(grid, normalised),
        *_symmetric_adam(grid, normalised),
    ]


def _implicit_adaptivity(grid: Mapping, nld: Sequence[Mapping], normalised: list) -> list[str]:
    """Question 1: the NLD control and the tuned ``sgd`` against ``sgd+retract``."""
    L = [
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
                f"{r['weight_decay']:g}: free {pm(f['test_mean'], f['test_std'])}, constrained "
                f"{pm(c['test_mean'], c['test_std'])}: {verdict}"
            )
        L.append("")
    pairs = [t for t in normalised if {"sgd", "sgd+retract"} <= set(grid[t]["optimizers"])]
    if pairs:
        L += ["Tuned learning rates (the grid):", ""]
        L += _versus_table(grid, pairs, "sgd", ("sgd+retract",))
    return L


def _explicit_version(grid: Mapping, plain: list) -> list[str]:
    """Question 2: ``noether_rmsprop`` against SGD and RMSProp without normalisation."""
    return _versus_question(
        grid,
        plain,
        [
            "### 2. Does the explicit version help networks without normalisation?",
            "",
            "`noether_rmsprop` (the implicit RMSProp of normalisation + SGD made explicit on the "
            "hidden units) against `sgd`, `sgd+wd` and `rmsprop` on networks without "
            "normalisation.",
        ],
        ("noether_rmsprop", ("sgd", "sgd+wd", "rmsprop")),
        "(no task without normalisation ran `noether_rmsprop`)",
    )


def _versus_question(grid, tasks, intro: list[str], versus: tuple, none_ran: str) -> list[str]:
    """A question answered by one optimizer against others (``versus``: the optimizer and
    the others) on the ``tasks`` it ran on; ``none_ran`` where it ran on none."""
    name, others = versus
    rows = [t for t in tasks if name in grid[t]["optimizers"]]
    if not rows:
        return [*intro, "", none_ran, ""]
    return [*intro, "", *_versus_table(grid, rows, name, others)]


def _steering(grid: Mapping, normalised: list) -> list[str]:
    """Question 3: steps to target and angular updates of ``sgd+steer_eq``, ``sgd+wd`` and
    ``rotational``."""
    L = [
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
    if not rows3:
        return [*L, "(`sgd+steer_eq` did not run on a normalised task)", ""]
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
    return [*L, "", "Steps to target, `sgd+steer_eq` vs `sgd+wd`: " + "; ".join(faster) + ".", ""]


def _symmetric_adam(grid: Mapping, normalised: list) -> list[str]:
    """Question 4: ``adam+symmetrize`` against Adam, AdamW and AdamP."""
    return _versus_question(
        grid,
        normalised,
        [
            "### 4. Does a symmetric kinetic energy beat Adam, AdamW and AdamP on normalised nets?",
            "",
            "`adam+symmetrize` (`ksbopt.symmetrize(optax.adam)`: Adam on the orbit-invariant "
            "coordinates) against `adam`, `adamw` and `adamp`.",
        ],
        ("adam+symmetrize", ("adam", "adamw", "adamp")),
        "(`adam+symmetrize` did not run on a normalised task)",
    )


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
    return f"{pm(r['test_mean'], r['test_std'])} (lr {fmt_lr(r['best_lr'])})"


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
