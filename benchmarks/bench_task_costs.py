"""Cost of one benchmark run per task: time per step, per evaluation, compile, projected run.

Trains each task for a few hundred steps with the benchmark CLI (one seed, one learning rate
per optimizer) and projects the cost of a whole run at the task's own step budget:
``compile + steps * step time + evaluations * evaluation time``. The suites are sized from
these numbers. Records the machine's load average, since the benchmarks share CPUs.

With ``--jobs N`` each measurement runs N times side by side, each copy in a worker process
pinned to one core (:mod:`ksbopt.bench.workers`), as ``ksbopt-bench --jobs N`` trains:
the file then holds the mean cost of one such run and ``"jobs": N``, and the suite's
estimate (:func:`ksbopt.bench.budget.load_costs`) counts each run 1/N of it.

Run:  python -m benchmarks.bench_task_costs [--scale small] [--tasks a,b]
      [--optimizers sgd+wd,adamw] [--steps 200] [--jobs 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from ksbopt.bench import cli, registry, workers
from ksbopt.bench.runner import MAX_EVAL_INTERVALS, environment
from ksbopt.bench.tasks import HEADLINE_TASKS, TASKS, build_task

# The learning rate of the measurement (the cost does not depend on it): the middle of each grid.
_MIDDLE = lambda name: registry.get(name).lr_grid[len(registry.get(name).lr_grid) // 2]


def measure(task: str, optimizer: str, scale: str, steps: int, cache: Path) -> dict:
    """One short run of ``task`` with ``optimizer``; its timings and the projected full run."""
    with tempfile.TemporaryDirectory() as out:
        argv = [
            *("--suite", "quick", "--experiments", "grid", "--scale", scale),
            *("--tasks", task, "--optimizers", optimizer, "--lrs", str(_MIDDLE(optimizer))),
            *("--seeds", "1", "--steps", str(steps), "--no-progress", "--no-plots"),
            *("--out", out, "--cache-dir", str(cache)),
        ]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = cli.main(argv)
        if rc != 0:
            raise RuntimeError(f"{task}/{optimizer}: the benchmark CLI exited with {rc}")
        (path,) = Path(out, "runs").glob("*.json")
        rec = json.loads(path.read_text())
    built = build_task(task, scale, cache)
    t = rec["timing"]
    # the evaluations after the first (timed apart): every eval_every steps of the short run
    n_evals = max(1, len(rec["curves"]["step"]) - 1)
    eval_each = t["eval_s"] / n_evals
    full_evals = math.ceil(
        built.steps / min(built.eval_every, math.ceil(built.steps / MAX_EVAL_INTERVALS))
    )
    run_s = built.steps * t["step_ms_median"] / 1e3 + full_evals * eval_each
    projected = t["compile_s"] + t["eval_compile_s"] + run_s
    return {
        "task": task,
        "optimizer": optimizer,
        "scale": scale,
        "n_params": rec["task"]["n_params"],
        "steps": built.steps,
        "batch": built.batch_size,
        "eval_every": built.eval_every,
        "measured_steps": rec["steps_done"],
        "step_ms_median": t["step_ms_median"],
        "eval_s_each": eval_each,
        "compile_s": t["compile_s"] + t["eval_compile_s"],
        "run_s": run_s,  # one run once its step is compiled (a suite compiles per search)
        "projected_run_s": projected,
    }


def _measure_args(args: tuple) -> dict:
    """:func:`measure` of one ``(task, optimizer, scale, steps, cache)`` (for the workers)."""
    return measure(*args)


def measure_side_by_side(pool, task, optimizer, scale, steps, cache: Path) -> dict:
    """:func:`measure` run ``pool.jobs`` times at once on ``pool``'s workers; the mean of
    their timings (each the cost of one run among ``pool.jobs`` side by side)."""
    build_task(task, scale, cache)  # the data generated once, before the copies start
    rows = pool.map(_measure_args, [(task, optimizer, scale, steps, cache)] * pool.jobs)
    timed = ("step_ms_median", "eval_s_each", "compile_s", "run_s", "projected_run_s")
    return {**rows[0], **{k: sum(r[k] for r in rows) / len(rows) for k in timed}}


def _utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", default="small", help="tiny | small | base | large")
    p.add_argument("--tasks", default=",".join(HEADLINE_TASKS))
    p.add_argument("--optimizers", default="sgd+wd,adamw")
    p.add_argument("--steps", type=int, default=200, help="steps measured per run")
    p.add_argument("--cache-dir", default=None, help="cache of generated data")
    p.add_argument(
        "--jobs", type=int, default=1, help="runs side by side, one core each (default 1)"
    )
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    names = [t for t in a.tasks.split(",") if t]
    if bad := [t for t in names if t not in TASKS]:
        p.error(f"unknown task(s) {bad}; valid: {', '.join(TASKS)}")
    try:
        workers.check_jobs(a.jobs)
    except ValueError as e:
        p.error(f"--jobs cannot be used: {e}")
    started = _utc_now()
    cache = Path(a.cache_dir or tempfile.mkdtemp(prefix="ksbopt_task_costs_"))
    rows = []
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(workers.Workers(a.jobs)) if a.jobs > 1 else None
        for task in names:
            for opt in a.optimizers.split(","):
                if pool is None:
                    row = measure(task, opt, a.scale, a.steps, cache)
                else:
                    row = measure_side_by_side(pool, task, opt, a.scale, a.steps, cache)
                rows.append(row)
                print(
                    f"{task:22s} {opt:10s} {row['n_params']:>10,d} params "
                    f"{row['step_ms_median']:8.2f} ms/step {row['eval_s_each']:6.3f} s/eval "
                    f"-> {row['projected_run_s']:7.1f} s per {row['steps']}-step run",
                    flush=True,
                )
    result = {
        "env": environment(),
        "jobs": a.jobs,
        "load_average": os.getloadavg(),
        "results": rows,
        "command": " ".join(["python3 -m benchmarks.bench_task_costs", *sys.argv[1:]]),
        "measured": f"{started} - {_utc_now()} UTC",
    }
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
