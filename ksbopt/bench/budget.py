"""The budget of a suite before it runs: how many runs it plans and how many hours they take.

The tuned grid's runs are not known in advance (the search extends itself), so the count is
the search of :func:`ksbopt.bench.protocol.search` replayed on a synthetic validation curve
with one optimum per entry: ``at_centre`` (the optimum at the centre of the starting window
and at the default weight decay, the fewest runs the protocol can train) and ``typical`` (the
optimum one lattice point outside the window and at a neighbouring weight decay, so one
extension and one move on the weight-decay grid; its curve is flat enough that the good band
spans the optimum's neighbours, so the band walk adds the rate two points above the optimum:
the one below is already in the window). Hours come from measured costs per run of
each task (``benchmarks/bench_task_costs.py`` writes them as JSON: seconds per whole run,
compilation and evaluations included, on the machine and load it records).

:func:`price_records` prices records already written the same way (what they would take in one
sitting); ``python -m ksbopt.bench.budget OUT --costs FILE`` prints it per task.

Example:
  >>> from ksbopt.bench import budget
  >>> budget.search_runs(window=3, wds=(), tuning_seeds=2, seeds=5, max_extensions=4)
  9
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path

from ksbopt.bench import protocol

__all__ = [
    "Estimate",
    "estimate",
    "estimate_plan",
    "grid_runs",
    "load_costs",
    "price_records",
    "search_runs",
]

CASES = ("at_centre", "typical")


def search_runs(
    *,
    window: int,
    wds: tuple[float, ...],
    tuning_seeds: int,
    seeds: int,
    max_extensions: int,
    case: str = "at_centre",
    wd0: float | None = None,
    band_reach: int = 1,
) -> int:
    """Runs of one search and its remaining seeds, for an optimum placed as ``case`` says."""
    if case not in CASES:
        raise ValueError(f"case={case!r} is not one of {CASES}")
    ks = tuple(range(window))
    centre = ks[(window - 1) // 2]
    best_k = centre if case == "at_centre" else ks[-1] + 1
    w0 = (wd0 if wd0 is not None else wds[len(wds) // 2]) if wds else None
    best_w = w0
    if wds and case == "typical":
        best_w = wds[min(wds.index(w0) + 1, len(wds) - 1)]

    # accuracy lost per lattice point: "typical" loses 0.6 point (its neighbours are in the
    # 1-point band, the next points are not); "at_centre" a whole unit (no band beyond it)
    slope = 1.0 if case == "at_centre" else 0.006

    def score(p):
        k, w = p
        off = 0.0 if w is None else abs(math.log10(w / best_w))
        return -slope * (abs(k - best_k) + 0.5 * off)

    s = protocol.search(
        ks,
        wds,
        score,
        higher_is_better=True,
        max_extensions=max_extensions,
        wd0=wd0,
        band_reach=band_reach,
    )
    n_tune = min(tuning_seeds, seeds)
    return len(s.scores) * n_tune + (seeds - n_tune)


def grid_runs(
    suite, *, tasks, optimizers, seeds, scale: str | None = None
) -> dict[str, dict[tuple[str, str], tuple[int, int]]]:
    """(runs, compilations) of the tuned grid experiment per case and (task, scale): every
    applicable (task, optimizer) pair in each of its schedule arms
    (:func:`ksbopt.bench.suites.arms_of`)."""
    from ksbopt.bench import registry
    from ksbopt.bench.suites import _wd_grid, arms_of
    from ksbopt.bench.tasks import TASKS

    proto = suite.protocol
    sc = scale or suite.scale_of("grid")
    out: dict[str, dict[tuple[str, str], tuple[int, int]]] = {c: {} for c in CASES}
    for t in tasks:
        for o in optimizers:
            spec = registry.get(o, check=False)
            if not spec.applies_to(TASKS[t]):
                continue
            wds = _wd_grid(spec, proto)
            for case in CASES:
                n = search_runs(
                    window=proto.window,
                    wds=wds,
                    tuning_seeds=proto.tuning_seeds,
                    seeds=len(seeds),
                    max_extensions=proto.max_extensions,
                    band_reach=proto.band_reach,
                    case=case,
                    wd0=_wd0(wds, proto),
                )
                arms = len(arms_of(suite, t, o))
                runs, compiles = out[case].get((t, sc), (0, 0))
                # one compilation per search: the learning rate and the tuned weight decay
                # live in the optimizer state
                out[case][(t, sc)] = (runs + n * arms, compiles + arms)
    return out


def _wd0(wds, proto) -> float | None:
    return wds[sorted(proto.wd_factors).index(1.0)] if wds else None


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Planned runs and hours of a suite: ``runs[case][(task, scale)]`` counts the runs,
    ``hours[case]`` prices those with a measured cost (``unknown`` lists the others)."""

    runs: Mapping[str, Mapping[tuple[str, str], int]]
    hours: Mapping[str, float]
    unknown: tuple[tuple[str, str], ...]  # (task, scale) pairs without a measured cost
    costs_note: str

    def lines(self) -> list[str]:
        out = []
        for case in CASES:
            n = sum(self.runs[case].values())
            h = self.hours[case]
            when = f"{h:.1f} h ({h * 60:.0f} min)"
            when += " + the runs without a measured cost" if self.unknown else ""
            out.append(f"estimate, optimum {case.replace('_', ' ')}: {n} runs, {when}")
        for (t, sc), n in sorted(self.runs["typical"].items()):
            out.append(f"  {t} ({sc}): {n} runs (typical)")
        if self.unknown:
            out.append(
                "no measured cost for "
                + ", ".join(f"{t} ({sc})" for t, sc in self.unknown)
                + ": measure it with python -m benchmarks.bench_task_costs --json FILE"
            )
        if self.costs_note:
            out.append(self.costs_note)
        return out


Costs = Mapping[tuple[str, str], tuple[float, float]]  # (task, scale) -> (run_s, compile_s)


def load_costs(
    path: str | Path, jobs: int | None = None
) -> tuple[dict[tuple[str, str], tuple[float, float]], str]:
    """Seconds of wall time per run and per compilation of each (task, scale) from a
    ``bench_task_costs`` JSON file (means over the optimizers it measured), and a note naming
    machine and load.

    A file measured with ``--jobs N`` (N runs side by side, one core each) holds each run's
    own seconds; N of them share that time, so they are divided by N here. ``jobs``: the
    setting of the suite to price (a ValueError if the file was measured with another;
    None: the file's).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        rows = [
            (r["task"], r["scale"], float(r["run_s"]), float(r["compile_s"]))
            for r in data["results"]
        ]
        measured_jobs = int(data.get("jobs", 1))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"costs file {str(path)!r} is not a bench_task_costs JSON ({type(e).__name__}: {e});"
            " write one with python -m benchmarks.bench_task_costs --json FILE"
        ) from e
    if jobs is not None and jobs != measured_jobs:
        raise ValueError(
            f"it was measured with --jobs {measured_jobs} and the suite runs with --jobs {jobs};"
            f" measure with python -m benchmarks.bench_task_costs --jobs {jobs} --json FILE"
        )
    by: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for t, sc, run_s, comp_s in rows:
        by.setdefault((t, sc), []).append((run_s / measured_jobs, comp_s / measured_jobs))
    env = data.get("env", {})
    load = data.get("load_average")
    note = (
        f"costs from {path.name}: {env.get('device', '?')}, {env.get('cpu_count', '?')} cores,"
        f" load average {', '.join(f'{x:.1f}' for x in load) if load else '?'} when measured"
    )
    if measured_jobs > 1:
        note += (
            f"; {measured_jobs} runs side by side, so each run counts 1/{measured_jobs} of its"
            " time (rounds that end with fewer runs than workers take longer)"
        )
    costs = {
        k: (sum(r for r, _ in v) / len(v), sum(c for _, c in v) / len(v)) for k, v in by.items()
    }
    return costs, note


def estimate(
    grid: Mapping[str, Mapping[tuple[str, str], tuple[int, int]]],
    fixed: Mapping[tuple[str, str], int],
    costs: Costs,
    costs_note: str = "",
) -> Estimate:
    """Adds the fixed runs (one compilation per task) to each case's grid runs and prices
    them with ``costs``."""
    runs: dict[str, dict[tuple[str, str], int]] = {}
    hours: dict[str, float] = {}
    unknown: set[tuple[str, str]] = set()
    for case in CASES:
        per = dict(grid.get(case, {}))
        for k, n in fixed.items():
            r, c = per.get(k, (0, 0))
            per[k] = (r + n, c + 1)
        runs[case] = {k: r for k, (r, _) in per.items()}
        missing = [k for k in per if k not in costs]
        unknown |= set(missing)
        total = sum(r * costs[k][0] + c * costs[k][1] for k, (r, c) in per.items() if k in costs)
        hours[case] = total / 3600
    return Estimate(runs, hours, tuple(sorted(unknown)), costs_note)


def estimate_plan(suite, fixed: list, grid_args: Mapping | None, costs) -> Estimate:
    """The planned runs and hours of a whole invocation: the ``fixed`` runs and, unless
    ``grid_args`` is None, the tuned grid (``grid_args``: its tasks, optimizers, seeds and
    scale); ``costs``: :func:`load_costs`'s (table, note), or None."""
    import collections

    grid = {}
    if grid_args is not None:
        keep = ("tasks", "optimizers", "seeds", "scale")
        grid = grid_runs(suite, **{k: grid_args[k] for k in keep})
    per_task = collections.Counter((r.task, r.scale) for r in fixed)
    table, note = costs if costs is not None else ({}, "")
    return estimate(grid, per_task, table, note)


def price_records(records, costs: Costs) -> dict:
    """What ``records`` (finished run records) would take in one sitting at ``costs``.

    Every run pays its task's ``run_s``; every compiled train step its task's ``compile_s``,
    once: runs with one :func:`ksbopt.bench.compiled.train_key` share a step (they differ only
    in learning rate, seed and tuned hyperparameters). Returns ``{"tasks": {(task, scale):
    {"runs", "compilations", "hours"}}, "hours": total, "unpriced": [(task, scale), ...]}``
    (runs of a task without a measured cost are counted, not priced). An optimizer the
    registry does not know (a user's entry) gets a compilation per hyperparameter setting, an
    upper bound.
    """
    from ksbopt.bench import registry
    from ksbopt.bench.compiled import train_key
    from ksbopt.bench.records import RunConfig

    runs: dict[tuple[str, str], int] = {}
    steps: dict[tuple[str, str], set] = {}
    for rec in records:
        c = rec["config"]
        key = (c["task"], c["scale"])
        cfg = RunConfig(
            **{k: c[k] for k in ("experiment", "task", "optimizer", "learning_rate", "seed")},
            scale=c["scale"],
            hparams=tuple(sorted(c["hparams"].items())),
            steps=c["steps"],
            schedule=c["schedule"],
        )
        known = c["optimizer"] in registry.REGISTRY
        runs[key] = runs.get(key, 0) + 1
        steps.setdefault(key, set()).add(train_key(cfg) if known else (cfg.schedule, cfg.hparams))
    tasks, total, unpriced = {}, 0.0, []
    for key in sorted(runs):
        n, k = runs[key], len(steps[key])
        hours = None
        if key in costs:
            hours = (n * costs[key][0] + k * costs[key][1]) / 3600
            total += hours
        else:
            unpriced.append(key)
        tasks[key] = {"runs": n, "compilations": k, "hours": hours}
    return {"tasks": tasks, "hours": total, "unpriced": unpriced}


def main(argv=None) -> dict:
    """``python -m ksbopt.bench.budget OUT --costs FILE [--costs FILE2]``: the hours of OUT's
    records in one sitting at the measured costs of FILE (``bench_task_costs`` JSON)."""
    import argparse

    from ksbopt.bench.records import load_record

    p = argparse.ArgumentParser(
        prog="python -m ksbopt.bench.budget",
        description="The hours of a benchmark folder's records in one sitting, at measured costs.",
    )
    p.add_argument("out", help="a benchmark output folder (its runs/ holds the records)")
    p.add_argument(
        "--costs",
        required=True,
        action="append",
        help="a bench_task_costs JSON file (repeat it for tasks measured apart, e.g. at "
        "another scale; a later file's (task, scale) replaces an earlier one's)",
    )
    a = p.parse_args(argv)
    paths = sorted(Path(a.out, "runs").glob("*.json"))
    records = [r for r in map(load_record, paths) if r is not None]
    if not records:
        p.error(f"no finished run records under {str(Path(a.out, 'runs'))!r}")
    costs, notes = {}, []
    for path in a.costs:
        try:
            table, note = load_costs(path)
        except ValueError as e:
            p.error(f"--costs {path!r} cannot price the records: {e}")
        costs.update(table)
        notes.append(note)
    note = "; ".join(notes)
    priced = price_records(records, costs)
    for (task, scale), t in priced["tasks"].items():
        hours = "no measured cost" if t["hours"] is None else f"{t['hours']:.2f} h"
        print(f"{task} ({scale}): {t['runs']} runs, {t['compilations']} compilations, {hours}")
    print(f"{len(records)} records: {priced['hours']:.2f} h in one sitting ({note})")
    return priced


if __name__ == "__main__":
    main()
