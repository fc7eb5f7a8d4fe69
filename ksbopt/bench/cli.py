"""``ksbopt-bench``: run a benchmark suite and write per-run JSON, a Markdown report and plots.

Examples::

    ksbopt-bench --suite quick --out bench_results/quick
    python -m ksbopt.bench.cli --suite full --tasks mnist1d_cnn_bn,digits_cnn_bn --seeds 3
    ksbopt-bench --suite gpu --scale tiny --out /tmp/gpu_tiny   # the gpu suite, tiny, on CPU
    ksbopt-bench --list

Every input is checked before training starts. Finished runs are kept as JSON under
``OUT/runs``; rerunning the same command skips them (resume after an interruption). A run that
raises is reported (stderr, the report's notes, exit status 1) and the suite goes on without
the rest of that optimizer/task combination; a rerun retries it.

:func:`main` reads the arguments, checks them and plans the runs (``_plan``), then takes one
action: list, report only, dry run, or run (the training session is
:mod:`ksbopt.bench.session`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

EXTRA_HINT = "pip install 'ksbopt[bench]'"
# import name -> distribution name, for the error message
_PACKAGES = {
    "flax": "flax",
    "mnist1d": "mnist1d",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
}


def _installed(module: str) -> bool:
    if module in sys.modules:  # also catches a module blocked with sys.modules[name] = None
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    from ksbopt.bench.tasks import SCALES

    p = argparse.ArgumentParser(
        prog="ksbopt-bench",
        description="Benchmark ksbopt's kinetic energies against normalisation + SGD, RMSProp, "
        "Adam and peers on Flax models (MNIST-1D, digits, byte LM, teacher-student).",
    )
    p.add_argument("--suite", default="quick", help="quick | full | gpu (default quick)")
    p.add_argument("--tasks", help="comma-separated task names (default: the suite's)")
    p.add_argument("--optimizers", help="comma-separated optimizer names (default: the suite's)")
    p.add_argument("--seeds", help="a count N (seeds 0..N-1) or a comma list like 0,3,7")
    p.add_argument("--lrs", help="comma-separated learning rates replacing every grid")
    p.add_argument("--steps", type=int, help="training steps per run (default: the task's)")
    p.add_argument(
        "--scale",
        choices=SCALES,
        help="model/data size; default: the suite's (env KSBOPT_BENCH_SCALE too)",
    )
    p.add_argument(
        "--schedules",
        help="comma list of schedule arms, cosine (warm-up + cosine) and/or constant "
        "(default: the suite's)",
    )
    p.add_argument("--experiments", help="comma list of grid,nld,baselines (default: the suite's)")
    p.add_argument(
        "--optimizer",
        action="append",
        default=[],
        metavar="NAME=MODULE:FACTORY",
        help="your optimizer: factory(lr) -> optax transformation (repeatable; beside "
        "--optimizers or the suite's)",
    )
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="NAME:KEY=V1,V2",
        help="a hyperparameter grid of a --optimizer (repeatable); KEY lr: its learning rates",
    )
    p.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="MODULE:ATTR",
        help="your task (ksbopt.bench.make_task(...) or a function returning one; repeatable)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="train N runs at a time, each in a worker process pinned to one CPU core (CPU only; "
        "at most one per core; default 1: one run at a time on every core)",
    )
    p.add_argument("--out", help="output folder (default bench_results/<suite>)")
    p.add_argument("--cache-dir", help="cache of generated data (default OUT/cache)")
    p.add_argument("--no-progress", action="store_true", help="no per-run progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--list", action="store_true", help="list tasks, optimizers, suites; exit")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the runs the next round would train (from the records under OUT) and "
        "exit; later rounds of the tuning depend on the results",
    )
    p.add_argument(
        "--costs",
        metavar="FILE",
        help="measured costs per run (JSON of python -m benchmarks.bench_task_costs): "
        "--dry-run then estimates the suite's hours",
    )
    p.add_argument(
        "--max-hours",
        type=float,
        metavar="H",
        help="refuse to start when the estimate from --costs (optimum one lattice point "
        "outside the starting window) exceeds H hours",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="no training: rebuild the report from every record under OUT/runs",
    )
    return p


def _seeds(p, s: str | None, default) -> tuple[int, ...]:
    if s is None:
        return tuple(default)
    try:
        vals = [int(x) for x in _csv(s)]
    except ValueError:
        p.error(f"--seeds={s!r}: write a count (e.g. 3) or a comma list of integers (0,1,2)")
    if not vals or any(v < 0 for v in vals):
        p.error(f"--seeds={s!r}: seeds must be non-negative integers, e.g. --seeds 3")
    if len(vals) == 1 and "," not in s:
        if vals[0] < 1:
            p.error(f"--seeds={s!r}: a count must be at least 1")
        return tuple(range(vals[0]))
    return tuple(dict.fromkeys(vals))


def _list(out=sys.stdout) -> None:
    from ksbopt.bench import registry
    from ksbopt.bench.suites import SUITES
    from ksbopt.bench.tasks import TASKS

    print("tasks:", file=out)
    for t in TASKS.values():
        print(f"  {t.name:24s} {t.description}", file=out)
    print("optimizers:", file=out)
    for o in registry.REGISTRY.values():
        miss = o.missing()
        state = f"  [unavailable: needs {', '.join(miss)}]" if miss else ""
        print(f"  {o.name:24s} {o.description}{state}", file=out)
    print("suites:", file=out)
    for s in SUITES.values():
        print(f"  {s.name:8s} scale={s.scale:6s} {s.description}", file=out)
        for e, sc in s.experiment_scales.items():
            print(f"  {'':8s}   {e} at scale {sc}", file=out)


def _check_out(p, out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        p.error(
            f"--out={str(out)!r} is not a writable folder ({e.strerror or e}); "
            "choose another folder with --out DIR"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ksbopt-bench``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _parser()
    a = p.parse_args(argv)
    if a.list:
        _list()
        return 0
    if a.report_only:
        return _report_only(p, a, argv)
    plan = _plan(p, a)  # every input checked before any training
    if a.dry_run:
        return _dry_run(plan)
    if a.max_hours is not None and (plan.estimate.hours["typical"] or 0.0) > a.max_hours:
        print("\n".join(plan.estimate.lines()), file=sys.stderr)
        p.error(
            f"--max-hours={a.max_hours:g}: the suite is estimated at "
            f"{plan.estimate.hours['typical']:.1f} h; give fewer tasks, optimizers or seeds, or "
            "raise it"
        )
    return _run(plan, a, argv)


# ---- what to run ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Plan:
    """The checked inputs of one invocation and the runs they make."""

    suite: Any  # ksbopt.bench.suites.Suite, its schedules replaced by --schedules
    scale: str | None  # None: the suite's
    seeds: tuple[int, ...]
    fixed: list  # the RunConfigs of the fixed experiments
    grid_args: dict | None  # the tuned grid's arguments of suites.tuning_round; None: no tuning
    out: Path
    estimate: Any  # ksbopt.bench.budget.Estimate
    notes: list[str]


def _plan(p, a) -> _Plan:
    """Checks every input (``p.error`` on the first that is wrong) and plans the runs."""
    from ksbopt.bench import budget, registry, user
    from ksbopt.bench.suites import plan
    from ksbopt.bench.tasks import TASKS

    suite, scale = _suite_and_scale(p, a)
    try:
        user_opts, user_tasks = user.parse_cli(a.optimizer, a.grid, a.task)
    except (ValueError, TypeError) as e:
        p.error(f"--optimizer, --grid or --task: {e}")
    tasks = _tasks(p, a, suite, user_tasks)
    opts, notes = _optimizers(p, a, suite, user_opts)
    seeds = _seeds(p, a.seeds, suite.seeds)
    lrs = _lrs(p, a.lrs)
    if a.steps is not None and a.steps < 1:
        p.error(f"--steps={a.steps}: must be a positive integer")
    steps = a.steps
    if steps is None and (scale or suite.scale) == suite.scale:
        steps = suite.steps  # the suite's step budget holds at its own scale only
    _jobs(p, a)
    costs = _costs(p, a)
    suite = _schedules(p, a, suite)
    experiments = _experiments(p, a, suite)
    fixed = plan(
        suite,
        tasks=tasks,
        optimizers=opts,
        seeds=seeds,
        scale=scale,
        lrs=lrs,
        steps=steps,
        experiments=experiments,
    )
    tuned = "grid" in experiments and not lrs
    pairs = [
        (t, o) for t in tasks for o in opts if registry.get(o, check=False).applies_to(TASKS[t])
    ]
    if not fixed and not (tuned and pairs):
        p.error(
            "nothing to run: no optimizer applies to the chosen tasks (e.g. sgd+retract "
            "needs a task with a scale symmetry such as mnist1d_cnn_bn)"
        )
    used = {r.task for r in fixed} | ({t for t, _ in pairs} if tuned else set())
    _check_packages(p, a, used)
    out = Path(a.out or f"bench_results/{a.suite}")
    _check_out(p, out)
    grid_args = dict(tasks=tasks, optimizers=opts, seeds=seeds, scale=scale, steps=steps)
    grid_args = grid_args if tuned else None
    est = budget.estimate_plan(suite, fixed, grid_args, costs)
    return _Plan(suite, scale, seeds, fixed, grid_args, out, est, notes)


def _suite_and_scale(p, a):
    """The suite named by ``--suite`` and the scale of ``--scale`` or the environment (None:
    the suite's)."""
    from ksbopt.bench.suites import SUITES
    from ksbopt.bench.tasks import SCALES

    if a.suite not in SUITES:
        p.error(f"--suite={a.suite!r} is not a suite; valid suites: {', '.join(SUITES)}")
    scale = a.scale or os.environ.get("KSBOPT_BENCH_SCALE") or None  # None: the suite's
    if scale is not None and scale not in SCALES:
        p.error(f"scale {scale!r} (from KSBOPT_BENCH_SCALE) is not one of {', '.join(SCALES)}")
    return SUITES[a.suite], scale


def _tasks(p, a, suite, user_tasks) -> tuple[str, ...]:
    from ksbopt.bench.tasks import TASKS

    tasks = (*(_csv(a.tasks) if a.tasks else suite.tasks), *user_tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        p.error(
            f"unknown task(s) {', '.join(bad) or '(none given)'}; valid tasks: {', '.join(TASKS)}"
        )
    return tasks


def _optimizers(p, a, suite, user_opts) -> tuple[tuple[str, ...], list[str]]:
    """The optimizers of ``--optimizers`` (each must be available) or the suite's available
    ones (a note for each left out), then the user's; and the notes."""
    from ksbopt.bench import registry

    notes = []
    if a.optimizers:
        opts = tuple(_csv(a.optimizers))
        bad = [o for o in opts if o not in registry.REGISTRY]
        if bad or not opts:
            p.error(
                f"unknown optimizer(s) {', '.join(bad) or '(none given)'}; valid optimizers: "
                f"{', '.join(registry.REGISTRY)}"
            )
        for o in opts:
            if miss := registry.REGISTRY[o].missing():
                p.error(
                    f"optimizer {o!r} needs {', '.join(miss)}, which this ksbopt does not "
                    "provide; update ksbopt or leave it out of --optimizers"
                )
    else:
        opts = []
        for o in suite.optimizers:
            if miss := registry.REGISTRY[o].missing():
                notes.append(f"{o} left out: needs {', '.join(miss)}")
            else:
                opts.append(o)
        opts = tuple(opts)
    return (*opts, *user_opts), notes


def _lrs(p, s: str | None) -> tuple[float, ...] | None:
    if not s:
        return None
    try:
        lrs = tuple(float(x) for x in _csv(s))
    except ValueError:
        p.error(f"--lrs={s!r}: write positive numbers separated by commas, e.g. 0.01,0.1")
    if not lrs or any(not x > 0 for x in lrs):
        p.error(f"--lrs={s!r}: learning rates must be positive, e.g. --lrs 0.01,0.1")
    return lrs


def _jobs(p, a) -> None:
    """``--jobs``: worker processes this machine can run (one CPU core each)."""
    if a.jobs != 1:
        import jax

        from ksbopt.bench import workers

        try:
            workers.check_jobs(a.jobs, jax.default_backend())
        except ValueError as e:
            p.error(f"--jobs cannot be used: {e}")


def _costs(p, a):
    """The measured costs of ``--costs`` (None without it); ``--max-hours`` needs them."""
    if a.max_hours is not None and (not a.costs or not a.max_hours > 0):
        p.error(f"--max-hours={a.max_hours}: give a positive number and --costs FILE")
    if not a.costs:
        return None
    from ksbopt.bench import budget

    try:
        return budget.load_costs(a.costs, jobs=a.jobs)
    except ValueError as e:
        p.error(f"--costs={a.costs!r} cannot be used: {e}")


def _schedules(p, a, suite):
    """The suite with the schedule arms of ``--schedules`` (the suite itself without it)."""
    if not a.schedules:
        return suite
    from ksbopt.bench.protocol import SCHEDULES

    arms = tuple(dict.fromkeys(_csv(a.schedules)))
    if not arms or any(x not in SCHEDULES for x in arms):
        p.error(f"--schedules={a.schedules!r}: valid arms are {', '.join(SCHEDULES)}")
    return dataclasses.replace(suite, schedules=arms)


def _experiments(p, a, suite) -> tuple[str, ...]:
    from ksbopt.bench import registry
    from ksbopt.bench.suites import EXPERIMENTS

    experiments = tuple(_csv(a.experiments)) if a.experiments else suite.experiments
    bad = [e for e in experiments if e not in EXPERIMENTS]
    if bad or not experiments:
        p.error(
            f"unknown experiment(s) {', '.join(bad) or '(none)'}; valid: {', '.join(EXPERIMENTS)}"
        )
    for e, need in (("nld", "sgd+retract"),):
        if e in experiments and (miss := registry.REGISTRY[need].missing()):
            p.error(f"experiment {e!r} needs {', '.join(miss)}, which this ksbopt lacks")
    return experiments


def _check_packages(p, a, tasks) -> None:
    """Every package the runs of ``tasks`` (and the plots) import is installed."""
    from ksbopt.bench.tasks import TASKS

    needed = {"flax", "tqdm"} | ({"matplotlib"} if not a.no_plots else set())
    for t in tasks:
        needed |= set(TASKS[t].requires)
    for m in sorted(needed):
        if not _installed(m):
            p.error(
                f"the package {_PACKAGES.get(m, m)!r} is needed by this suite but is not "
                f"installed: {EXTRA_HINT}"
            )


# ---- actions ----------------------------------------------------------------------------------


def _run(plan: _Plan, a, argv) -> int:
    """Trains the planned runs (the fixed ones, then the tuning rounds) and writes the report."""
    import jax

    from ksbopt.bench.runner import Runner
    from ksbopt.bench.session import Session, protocol_meta, search_notes
    from ksbopt.bench.workers import Workers

    t0 = time.perf_counter()
    suite, grid_args, notes = plan.suite, plan.grid_args, list(plan.notes)
    tuned = grid_args is not None
    scales = {r.scale for r in plan.fixed} | (
        {plan.scale or suite.scale_of("grid")} if tuned else set()
    )
    print(
        f"ksbopt-bench: suite={a.suite} scale: {', '.join(sorted(scales))}; "
        f"{len(plan.fixed)} fixed runs{', tuned grid in rounds' if tuned else ''}; out={plan.out}",
        flush=True,
    )
    print(f"jax devices: {jax.devices()}", flush=True)
    for n in notes:
        print(f"note: {n}", flush=True)
    cache = Path(a.cache_dir) if a.cache_dir else plan.out / "cache"
    session = Session(Runner(plan.out, cache_dir=cache, progress=not a.no_progress))
    try:
        with contextlib.ExitStack() as stack:
            if a.jobs > 1:
                user_args = (a.optimizer, a.grid, a.task)
                session.workers = stack.enter_context(Workers(a.jobs, user_args))
                print(f"{a.jobs} worker processes, one CPU core each", flush=True)
            user_failed = _train(plan, session)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: {len(session.records)} finished runs are saved under "
            f"{plan.out / 'runs'}; rerun the same command to resume.",
            file=sys.stderr,
        )
        return 130
    notes += user_failed
    records = list(session.records.values())
    if tuned:
        notes += search_notes(suite, session, grid_args)
    failed = [
        f"FAILED (no record; a rerun retries): {c[3]} on {c[1]} ({c[0]}): {why}"
        for c, why in session.failed.items()
    ]
    meta = _meta(
        a,
        argv,
        scale=_scales(records),
        devices=str(jax.devices()),
        trained=session.trained,
        reused=len(records) - session.trained,
        protocol=protocol_meta(suite, plan.seeds) if tuned else None,
        wall_s=time.perf_counter() - t0,
        notes=notes + failed,
    )
    path = _write_report(plan.out, records, meta, a)
    print(f"report: {path} ({time.perf_counter() - t0:.1f} s in all)", flush=True)
    if session.failed or user_failed:
        n = len(session.failed) + len(user_failed)
        print(f"{n} optimizer/task combinations failed; see the report", file=sys.stderr)
        return 1
    return 0


def _train(plan: _Plan, session) -> list[str]:
    """The user's entries' preflight, the fixed runs, then tuning rounds until the protocol
    asks for no more runs; returns the notes of the user's entries that failed preflight."""
    from ksbopt.bench import user
    from ksbopt.bench.session import tuning_round

    suite, grid_args = plan.suite, plan.grid_args
    first = tuning_round(suite, session, grid_args)[0] if grid_args is not None else []
    checked, user_failed = user.preflight([*first, *plan.fixed], session.runner)
    for n in user_failed:
        print(n, file=sys.stderr, flush=True)
    session.excluded |= {(r.optimizer, r.task) for r in [*first, *plan.fixed]} - {
        (r.optimizer, r.task) for r in checked
    }
    session.train([r for r in plan.fixed if r in checked], "fixed runs")
    rnd = 1
    while grid_args is not None:
        todo = tuning_round(suite, session, grid_args)[0]
        if not todo:
            break
        session.train(todo, f"tuning round {rnd}")
        rnd += 1
    return user_failed


def _scales(records: list) -> str:
    """The scale of each experiment the records ran, e.g. ``grid=small, nld=base``."""
    scales = dict.fromkeys((r["config"]["experiment"], r["config"]["scale"]) for r in records)
    return ", ".join(f"{e}={s}" for e, s in scales)


# Options that make a run differ from its suite's plan (the report then says so).
_CUSTOMISING = (
    "tasks", "optimizers", "seeds", "lrs", "steps", "scale", "schedules", "experiments",
    "optimizer", "grid", "task",
)  # fmt: skip


def _suite_label(a) -> str:
    """``quick``, or ``quick, customised by --tasks --lrs`` when options changed its plan."""
    given = [f"--{k}" for k in _CUSTOMISING if getattr(a, k, None)]
    return f"{a.suite}, customised by {' '.join(given)}" if given else a.suite


def _meta(a, argv, *, scale, devices, trained, reused, **more) -> dict:
    """The report's metadata of this invocation; ``more`` (in order) after the common keys."""
    return {
        "suite": _suite_label(a),
        "scale": scale,
        "command": "ksbopt-bench " + shlex.join(argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "devices": devices,
        "trained": trained,
        "reused": reused,
        **more,
    }


def _write_report(out: Path, records: list, meta: dict, a) -> Path:
    from ksbopt.bench.report import write_report
    from ksbopt.bench.suites import PUBLISHED

    return write_report(out, records, meta, published=PUBLISHED, plots=not a.no_plots)


def _report_only(p, a, argv) -> int:
    """Rebuilds the report from every record under ``OUT/runs``; trains nothing."""
    from ksbopt.bench.records import load_record
    from ksbopt.bench.suites import SUITES

    out = Path(a.out or f"bench_results/{a.suite}")
    paths = sorted((out / "runs").glob("*.json"))
    records = [r for r in map(load_record, paths) if r is not None]
    if not records:
        p.error(f"--report-only: no finished run records under {str(out / 'runs')!r}")
    _check_out(p, out)
    # the report of the invocation that trained them, if any, says how they were made
    previous = _previous_meta(out)
    made_by = previous.get("made_by") or previous.get("command")
    made_in_s = previous.get("made_in_s") or previous.get("wall_s")
    # tasks in the order the invocation would run them (--tasks, else the suite's)
    names = a.tasks.split(",") if a.tasks else SUITES[a.suite].tasks if a.suite in SUITES else ()
    order = {t: i for i, t in enumerate(names)}
    records.sort(key=lambda r: order.get(r["config"]["task"], len(order)))
    meta = _meta(
        a,
        argv,
        scale=_scales(records),
        devices=previous.get("devices") or records[0]["env"].get("device", "?"),
        trained=0,
        reused=len(records),
        protocol=previous.get("protocol"),
        made_by=made_by,
        made_in_s=made_in_s,
        wall_s=None,
        notes=[
            f"rebuilt from {len(records)} records in {out / 'runs'}"
            + (f"; the last invocation that trained them: `{made_by}`" if made_by else "")
            + (f" ({made_in_s:.0f} s)" if made_in_s else "")
        ],
    )
    path = _write_report(out, records, meta, a)
    print(f"report: {path}")
    return 0


def _previous_meta(out: Path) -> dict:
    """The metadata of the summary in ``out`` (empty if there is none or it cannot be read)."""
    try:
        return json.loads((out / "summary.json").read_text()).get("meta") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def _direction(out: Path, task: str) -> bool:
    """Whether ``task``'s metric is higher-is-better, from a record (True if none yet: the
    direction only matters once results exist)."""
    from ksbopt.bench.records import load_record

    for path in (out / "runs").glob(f"grid__{task}__*.json"):
        if (rec := load_record(path)) is not None:
            return rec["task"]["higher_is_better"]
    return True


def _dry_run(plan: _Plan) -> int:
    """Prints the runs the next invocation would train first and the estimate of the whole
    suite; trains nothing."""
    from ksbopt.bench.protocol import MISSING
    from ksbopt.bench.records import load_record, record_path
    from ksbopt.bench.suites import tuning_round

    suite, out, fixed, grid_args = plan.suite, plan.out, plan.fixed, plan.grid_args

    def result(cfg):
        rec = load_record(record_path(out, cfg))
        if rec is None:
            return MISSING
        return None if rec["status"] == "diverged" else rec["final"]["val_metric"]

    todo = [r for r in fixed if load_record(record_path(out, r)) is None]
    searches = {}
    if grid_args is not None:
        runs, searches = tuning_round(
            suite,
            **grid_args,
            result=result,
            higher_is_better=lambda t: _direction(out, t),
        )
        todo += runs
    for r in todo:
        print(r.run_id)
    over = sum(1 for s in searches.values() if s.done)
    print(
        f"dry run: {len(todo)} runs next ({len(fixed)} fixed, {len(searches)} searches, "
        f"{over} of them over); later rounds depend on the results",
        flush=True,
    )
    print("\n".join(plan.estimate.lines()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
