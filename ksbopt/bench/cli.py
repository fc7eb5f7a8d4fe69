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
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

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
    p.add_argument("--out", help="output folder (default bench_results/<suite>)")
    p.add_argument("--cache-dir", help="cache of generated data (default OUT/cache)")
    p.add_argument("--no-progress", action="store_true", help="no per-run progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--list", action="store_true", help="list tasks, optimizers, suites; exit")
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
    from ksbopt.bench import registry
    from ksbopt.bench.suites import EXPERIMENTS, SUITES, plan
    from ksbopt.bench.tasks import SCALES, TASKS

    argv = list(sys.argv[1:] if argv is None else argv)
    p = _parser()
    a = p.parse_args(argv)
    if a.list:
        _list()
        return 0
    if a.report_only:
        return _report_only(p, a, argv)

    # ---- validate everything before any training ----
    if a.suite not in SUITES:
        p.error(f"--suite={a.suite!r} is not a suite; valid suites: {', '.join(SUITES)}")
    suite = SUITES[a.suite]
    scale = a.scale or os.environ.get("KSBOPT_BENCH_SCALE") or None  # None: the suite's
    if scale is not None and scale not in SCALES:
        p.error(f"scale {scale!r} (from KSBOPT_BENCH_SCALE) is not one of {', '.join(SCALES)}")
    from ksbopt.bench import user

    try:
        user_opts, user_tasks = user.parse_cli(a.optimizer, a.grid, a.task)
    except (ValueError, TypeError) as e:
        p.error(f"--optimizer, --grid or --task: {e}")
    tasks = (*(_csv(a.tasks) if a.tasks else suite.tasks), *user_tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        p.error(
            f"unknown task(s) {', '.join(bad) or '(none given)'}; valid tasks: {', '.join(TASKS)}"
        )
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
    opts = (*opts, *user_opts)
    seeds = _seeds(p, a.seeds, suite.seeds)
    lrs = None
    if a.lrs:
        try:
            lrs = tuple(float(x) for x in _csv(a.lrs))
        except ValueError:
            p.error(f"--lrs={a.lrs!r}: write positive numbers separated by commas, e.g. 0.01,0.1")
        if not lrs or any(not x > 0 for x in lrs):
            p.error(f"--lrs={a.lrs!r}: learning rates must be positive, e.g. --lrs 0.01,0.1")
    if a.steps is not None and a.steps < 1:
        p.error(f"--steps={a.steps}: must be a positive integer")
    experiments = tuple(_csv(a.experiments)) if a.experiments else suite.experiments
    bad = [e for e in experiments if e not in EXPERIMENTS]
    if bad or not experiments:
        p.error(
            f"unknown experiment(s) {', '.join(bad) or '(none)'}; valid: {', '.join(EXPERIMENTS)}"
        )
    for e, need in (("nld", "sgd+retract"),):
        if e in experiments and (miss := registry.REGISTRY[need].missing()):
            p.error(f"experiment {e!r} needs {', '.join(miss)}, which this ksbopt lacks")
    runs = plan(
        suite,
        tasks=tasks,
        optimizers=opts,
        seeds=seeds,
        scale=scale,
        lrs=lrs,
        steps=a.steps,
        experiments=experiments,
    )
    if not runs:
        p.error(
            "nothing to run: no optimizer applies to the chosen tasks (e.g. sgd+retract "
            "needs a task with a scale symmetry such as mnist1d_cnn_bn)"
        )
    needed = {"flax", "tqdm"} | ({"matplotlib"} if not a.no_plots else set())
    for r in runs:
        needed |= set(TASKS[r.task].requires)
    for m in sorted(needed):
        if not _installed(m):
            p.error(
                f"the package {_PACKAGES.get(m, m)!r} is needed by this suite but is not "
                f"installed: {EXTRA_HINT}"
            )
    out = Path(a.out or f"bench_results/{a.suite}")
    _check_out(p, out)

    # ---- run ----
    import jax

    from ksbopt.bench.report import write_report
    from ksbopt.bench.runner import Runner
    from ksbopt.bench.suites import PUBLISHED

    t0 = time.perf_counter()
    scale = ", ".join(f"{e}={s}" for e, s in dict.fromkeys((r.experiment, r.scale) for r in runs))
    print(f"ksbopt-bench: suite={a.suite} scale: {scale}; runs={len(runs)} out={out}", flush=True)
    print(f"jax devices: {jax.devices()}", flush=True)
    for n in notes:
        print(f"note: {n}", flush=True)
    cache = Path(a.cache_dir) if a.cache_dir else out / "cache"
    runner = Runner(out, cache_dir=cache, progress=not a.no_progress)
    runs, user_failed = user.preflight(runs, runner)
    notes += user_failed
    for n in user_failed:
        print(n, file=sys.stderr, flush=True)
    records, trained, failed = [], 0, {}
    try:
        for i, cfg in enumerate(runs, 1):
            pos = f"[{i}/{len(runs)}] "
            combo = (cfg.experiment, cfg.task, cfg.scale, cfg.optimizer, cfg.hparams)
            if combo in failed:  # the same error again: do not pay its compilation 15 times
                print(f"{pos}{cfg.run_id}: skipped, {failed[combo]}", flush=True)
                continue
            try:
                rec, new = runner.run(cfg, position=pos)
            except Exception as e:  # one broken optimizer must not stop a long suite
                failed[combo] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                print(f"{pos}{cfg.run_id}: FAILED, {failed[combo]}", file=sys.stderr, flush=True)
                traceback.print_exc()
                continue
            trained += new
            records.append(rec)
            f = rec["final"]
            how = (
                f"{rec['timing']['total_s']:.1f}s, {rec['timing']['step_ms_median']:.2f} ms/step"
                if new
                else "kept from an earlier run"
            )
            print(
                f"{pos}{cfg.experiment} {cfg.task} {cfg.optimizer}"
                f"{''.join(f' {k}={v:g}' for k, v in cfg.hparams)} lr={cfg.learning_rate:g} "
                f"seed={cfg.seed}: val {rec['task']['metric']} {_f(f['val_metric'])}, test "
                f"{_f(f['test_metric'])}{' DIVERGED' if rec['status'] == 'diverged' else ''} "
                f"({how})",
                flush=True,
            )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: {len(records)} finished runs are saved under {out / 'runs'}; "
            "rerun the same command to resume.",
            file=sys.stderr,
        )
        return 130
    meta = {
        "suite": a.suite,
        "scale": scale,
        "command": "ksbopt-bench " + shlex.join(argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "devices": str(jax.devices()),
        "trained": trained,
        "reused": len(records) - trained,
        "wall_s": time.perf_counter() - t0,
        "notes": notes
        + [
            f"FAILED (no record; a rerun retries): {c[3]} on {c[1]} ({c[0]}): {why}"
            for c, why in failed.items()
        ],
    }
    path = write_report(out, records, meta, published=PUBLISHED, plots=not a.no_plots)
    print(f"report: {path} ({time.perf_counter() - t0:.1f} s in all)", flush=True)
    if failed or user_failed:
        n = len(failed) + len(user_failed)
        print(f"{n} optimizer/task combinations failed; see the report", file=sys.stderr)
        return 1
    return 0


def _report_only(p, a, argv) -> int:
    from ksbopt.bench.records import load_record
    from ksbopt.bench.report import write_report
    from ksbopt.bench.suites import PUBLISHED

    out = Path(a.out or f"bench_results/{a.suite}")
    paths = sorted((out / "runs").glob("*.json"))
    records = [r for r in map(load_record, paths) if r is not None]
    if not records:
        p.error(f"--report-only: no finished run records under {str(out / 'runs')!r}")
    _check_out(p, out)
    meta = {
        "suite": a.suite,
        "scale": ", ".join(
            f"{e}={s}"
            for e, s in dict.fromkeys(
                (r["config"]["experiment"], r["config"]["scale"]) for r in records
            )
        ),
        "command": "ksbopt-bench " + shlex.join(argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "devices": records[0]["env"].get("device", "?"),
        "trained": 0,
        "reused": len(records),
        "wall_s": None,
        "notes": [f"rebuilt from {len(records)} records in {out / 'runs'}"],
    }
    path = write_report(out, records, meta, published=PUBLISHED, plots=not a.no_plots)
    print(f"report: {path}")
    return 0


def _f(x) -> str:
    return "-" if x is None else f"{x:.4f}"


if __name__ == "__main__":
    sys.exit(main())
