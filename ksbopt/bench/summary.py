"""The numbers the report shows (:func:`summarize`), most of them the grid experiment's:
chosen settings, sensitivity, targets and paired verdicts.

Per schedule arm, task and optimizer (the protocol is :mod:`ksbopt.bench.protocol`; the
statistics :mod:`ksbopt.bench.stats`):

- **setting**: the (learning rate, hyperparameters) with the best mean final validation metric
  over the seeds every setting of the optimizer shares (the tuning seeds); a setting where any
  of those seeds diverged is never chosen. Test metrics are reported at that setting over all
  its seeds (mean ± std, ddof 0).
- **sensitivity**: validation metric by learning rate at the chosen hyperparameters (mean,
  min and max over the tuning seeds), the good band (:func:`ksbopt.bench.stats.band`) with
  ``band_open`` (per side: the band reaches the last evaluated rate, so it may be wider) and
  ``edge`` (the chosen learning rate lacks an evaluated worse neighbour on some side).
- **targets**: one target per task and arm, :data:`~ksbopt.bench.stats.TARGET_FRACTION` of
  the best mean final validation metric of any optimizer, and a second one of the best of
  :data:`PRACTITIONERS` (``*_practitioners_target``); steps and training seconds
  (compilation and evaluation excluded) to reach it, median over the seeds that did; and
  ``cpu_to_target``, the steps times the run's median CPU seconds per step, which a loaded
  machine inflates far less than wall-clock.
- **paired verdicts**: the reference is the best *baseline* (an entry that uses no ksbopt
  feature) on validation; every other optimizer's test metric minus the reference's, paired by
  seed, with a 95% bootstrap interval (:func:`ksbopt.bench.stats.paired_bootstrap`).

Besides the grid: the NLD control (free against constrained norm, mean ± std over seeds per
learning rate, momentum and weight decay) and the published baselines.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from ksbopt.bench import stats

__all__ = ["ARMS_ORDER", "PRACTITIONERS", "grid_summary", "is_baseline", "summarize"]

ARMS_ORDER = ("cosine", "constant")
#: The optimizers a practitioner would pick without ksbopt (normalisation + SGD with weight
#: decay, RMSProp, AdamW): the references of :mod:`ksbopt.bench.advantage`.
PRACTITIONERS = ("sgd+wd", "rmsprop", "adamw")


def is_baseline(optimizer: str) -> bool:
    """A registry entry that uses no ksbopt feature (a user entry or unknown name: False)."""
    from ksbopt.bench.registry import REGISTRY

    spec = REGISTRY.get(optimizer)
    return spec is not None and not spec.needs and not spec.origin


def _setting(rec) -> tuple:
    c = rec["config"]
    return c["learning_rate"], tuple(sorted((c.get("hparams") or {}).items()))


def _val(rec):
    return None if rec["status"] == "diverged" else rec["final"]["val_metric"]


def _mean(vals):
    if not vals or any(v is None or not math.isfinite(v) for v in vals):
        return None
    return float(np.mean(vals))


def _n_test(info: Mapping) -> int | None:
    sizes = info.get("sizes")
    if isinstance(sizes, Mapping):
        return sizes.get("test")
    if isinstance(sizes, list) and len(sizes) == 3:
        return sizes[2]
    return None


def _choose(settings: Mapping[tuple, list[dict]], higher: bool):
    """(chosen setting, selection seeds, score per setting)."""
    seed_sets = [{r["config"]["seed"] for r in rs} for rs in settings.values()]
    shared = set.intersection(*seed_sets) if seed_sets else set()
    scores = {}
    for key, rs in settings.items():
        use = [r for r in rs if r["config"]["seed"] in shared] or rs
        scores[key] = _mean([_val(r) for r in use])
    finite = {k: v for k, v in scores.items() if v is not None}
    if finite:
        # ties: the lower learning rate, then the lower weight decay (as the lattice search)
        best = max(
            finite,
            key=lambda k: (
                finite[k] if higher else -finite[k],
                -k[0],
                -dict(k[1]).get("weight_decay", 0.0),
            ),
        )
    else:
        best = min(settings)
    return best, shared, scores


def _sensitivity(settings, best, shared, higher):
    """Validation by learning rate at the chosen hyperparameters: mean, min, max; band; edge."""
    curve, spread = {}, {}
    for (lr, hp), rs in sorted(settings.items()):
        if hp != best[1]:
            continue
        use = [r for r in rs if r["config"]["seed"] in shared] or rs
        vals = [_val(r) for r in use]
        curve[lr] = _mean(vals)
        ok = [v for v in vals if v is not None]
        spread[lr] = (curve[lr], min(ok), max(ok)) if curve[lr] is not None else (None,) * 3
    lrs = sorted(curve)
    i = lrs.index(best[0])
    top = curve[best[0]]

    def worse(j):
        if not 0 <= j < len(lrs):
            return False
        v = curve[lrs[j]]
        return v is None or (v < top if higher else v > top)

    edge = top is None or not (worse(i - 1) and worse(i + 1))
    band = stats.band(curve, higher)
    # a band that reaches the last evaluated rate on a side may go on: open on that side
    band_open = None if band is None else [band[0] == lrs[0], band[1] == lrs[-1]]
    return curve, spread, band, band_open, edge


def _arm_summary(recs: list[dict]) -> dict:
    by_task: dict[str, dict[str, dict[tuple, list]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for r in recs:
        by_task[r["config"]["task"]][r["config"]["optimizer"]][_setting(r)].append(r)
    out = {}
    for task, opts in by_task.items():
        any_rec = next(iter(next(iter(opts.values())).values()))[0]
        higher = any_rec["task"]["higher_is_better"]
        rows = {}
        for opt, settings in opts.items():
            best, shared, scores = _choose(settings, higher)
            rs = sorted(settings[best], key=lambda r: r["config"]["seed"])
            curve, spread, band, band_open, edge = _sensitivity(settings, best, shared, higher)
            test = {r["config"]["seed"]: r["final"]["test_metric"] for r in rs}
            tm = _mean(list(test.values()))
            vm = _mean([_val(r) for r in rs])
            finite_test = [v for v in test.values() if v is not None and math.isfinite(v)]
            rows[opt] = {
                "best_lr": best[0],
                "hparams": {**rs[0]["config"]["hparams"]},
                "val_mean": vm,
                "val_std": None if vm is None else float(np.std([_val(r) for r in rs])),
                "test_mean": tm,
                "test_std": float(np.std(finite_test)) if tm is not None else None,
                "test_by_seed": {str(s): v for s, v in test.items()},
                "seeds": len(rs),
                "finite_seeds": len(finite_test),
                "diverged": sum(r["status"] == "diverged" for r in rs),
                "tuning_seeds": sorted(shared),
                "settings_tried": len(settings),
                "val_by_lr": {str(lr): v for lr, v in curve.items()},
                "val_spread_by_lr": {str(lr): list(v) for lr, v in spread.items()},
                "band": None if band is None else list(band),
                "band_open": band_open,
                "edge": edge,
                "step_ms": float(np.median([r["timing"]["step_ms_median"] for r in rs])),
                "compile_s": max(r["timing"]["compile_s"] for r in rs),
                "runs": [r["id"] for r in rs],
                "scores": {f"{k[0]:g}{_hp_text(k[1])}": v for k, v in sorted(scores.items())},
            }
        _targets(rows, {o: settings for o, settings in opts.items()}, higher)
        n_test = _n_test(any_rec["task"].get("data", {}))
        for row in rows.values():
            row["sampling_error"] = (
                stats.sampling_error(row["test_mean"], n_test)
                if any_rec["task"]["metric"] == "accuracy"
                else None
            )
        ref = _paired(rows, higher)
        out[task] = {
            "metric": any_rec["task"]["metric"],
            "higher_is_better": higher,
            "description": any_rec["task"]["description"],
            "data": any_rec["task"].get("data", {}),
            "n_params": any_rec["task"]["n_params"],
            "n_test": n_test,
            "steps": any_rec["config"]["steps"],
            "eval_every": any_rec["config"].get("eval_every"),
            "target": rows and next(iter(rows.values())).get("target"),
            "reference": ref,
            "optimizers": dict(sorted(rows.items(), key=lambda kv: _sort_key(kv[1], higher))),
        }
    return out


def _hp_text(hp) -> str:
    return "".join(f" {k}={v:g}" if isinstance(v, float) else f" {k}={v}" for k, v in hp)


def _targets(rows: dict, opts: Mapping, higher: bool) -> None:
    """Steps and training seconds to the task's target and to the practitioners' target, per
    row (median over seeds).

    The task's target is set by the best optimizer of all; the practitioners' target by the
    best of :data:`PRACTITIONERS` only, so that one optimizer far ahead of everyone (Muon on the
    deep MLPs) does not put the target that the kinetic energies are timed against out of
    every other optimizer's reach (:mod:`ksbopt.bench.advantage`).
    """

    def target(names):
        vals = [rows[o]["val_mean"] for o in names if rows[o]["val_mean"] is not None]
        return stats.target_value((max if higher else min)(vals), higher) if vals else None

    task_target = target(rows)
    practitioners_target = target([o for o in rows if o in PRACTITIONERS])
    for opt, row in rows.items():
        runs = opts[opt][(row["best_lr"], tuple(sorted(row["hparams"].items())))]
        row["target"] = task_target
        row.update(_reach(runs, task_target, higher, "target"))
        row["practitioners_target"] = practitioners_target
        row.update(_reach(runs, practitioners_target, higher, "practitioners_target"))


def _reach(runs: list[dict], target: float | None, higher: bool, name: str) -> dict:
    """``steps_to_NAME``, ``time_to_NAME``, ``cpu_to_NAME`` (medians over the runs that reached
    ``target``) and ``reached`` (how many did; ``reached_NAME`` for any other target)."""
    steps, secs, cpu = [], [], []
    for r in runs if target is not None else []:
        c = r["curves"]
        s = stats.first_reach(c["step"], c["val_metric"], target, higher)
        if s is not None:
            steps.append(s)
            if "time_s" in c:
                secs.append(c["time_s"][c["step"].index(s)])
            if "step_cpu_ms_median" in r["timing"]:
                cpu.append(s * r["timing"]["step_cpu_ms_median"] / 1000)
    return {
        f"steps_to_{name}": float(np.median(steps)) if steps else None,
        f"time_to_{name}": float(np.median(secs)) if secs else None,
        # steps x CPU seconds per step: unlike wall-clock, it does not grow with whatever
        # else the machine runs (None unless every run that reached the target timed it)
        f"cpu_to_{name}": float(np.median(cpu)) if cpu and len(cpu) == len(steps) else None,
        "reached" if name == "target" else f"reached_{name}": len(steps),
    }


def _paired(rows: dict, higher: bool) -> str | None:
    """Adds each row's paired test difference against the best baseline; returns its name."""
    base = {o: r for o, r in rows.items() if is_baseline(o) and r["val_mean"] is not None}
    if not base:
        return None
    ref = max(base, key=lambda o: base[o]["val_mean"] if higher else -base[o]["val_mean"])

    def by_seed(row):
        return {int(s): v for s, v in row["test_by_seed"].items()}

    for o, row in rows.items():
        if o == ref:
            row["paired"] = None
            continue
        p = stats.paired_bootstrap(by_seed(row), by_seed(rows[ref]))
        row["paired"] = {
            "vs": ref,
            "mean": p.mean,
            "low": p.low,
            "high": p.high,
            "n": p.n,
            "verdict": p.verdict(higher),
        }
    return ref


def _sort_key(row, higher):
    m = row["test_mean"]
    if m is None:
        return math.inf
    return -m if higher else m


def grid_summary(records: Sequence[dict]) -> dict[str, dict]:
    """Schedule arm -> task -> the numbers above, for the grid experiment's records."""
    by_arm: dict[str, list] = defaultdict(list)
    for r in records:
        by_arm[r["config"].get("schedule", "constant")].append(r)
    order = {a: i for i, a in enumerate(ARMS_ORDER)}
    return {
        arm: _arm_summary(rs)
        for arm, rs in sorted(by_arm.items(), key=lambda kv: (order.get(kv[0], 99), kv[0]))
    }


# ---- every experiment's numbers, as the report shows them ---------------------------------


def summarize(records: Sequence[dict], published: Mapping[str, float] | None = None) -> dict:
    """The numbers the report shows, per experiment."""
    by_exp: dict[str, list] = defaultdict(list)
    for r in records:
        by_exp[r["config"]["experiment"]].append(r)
    arms = _grid_with_diagnostics(by_exp["grid"]) if by_exp["grid"] else {}
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


def _grid_with_diagnostics(recs: list[dict]) -> dict[str, dict]:
    """Schedule arm -> task -> rows (:func:`grid_summary`), with the data line and the
    symmetry diagnostics of the chosen runs added."""
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


def _mean_std(vals: Sequence) -> tuple[float | None, float | None, int]:
    v = [x for x in vals if x is not None]
    if not v or len(v) < len(vals):  # any diverged / missing seed spoils the mean
        return None, None, len(v)
    a = np.asarray(v, dtype=np.float64)
    return float(a.mean()), float(a.std()), len(v)


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
