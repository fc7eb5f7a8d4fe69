"""``ksbopt-bench --jobs N``: runs trained on worker processes, one CPU core each
(:mod:`ksbopt.bench.workers`)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("flax")

from support.bench_cli import run_cli

from ksbopt.bench import budget, runner, workers

needs_two_cores = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(workers.cores()) < 2,
    reason="workers are pinned to cores: Linux with at least 2 cores",
)


_main = run_cli


def _records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))}


def _tiny(out, cache, optimizers: str, lrs: str, seeds: str = "1", steps: int = 10) -> list:
    return [
        *("--suite", "quick", "--scale", "tiny", "--schedules", "constant"),
        *("--tasks", "teacher_relu", "--optimizers", optimizers, "--lrs", lrs),
        *("--seeds", seeds, "--steps", str(steps), "--no-progress", "--no-plots"),
        *("--out", out, "--cache-dir", cache),
    ]


def test_check_jobs_names_the_value_and_the_fix():
    workers.check_jobs(1)
    workers.check_jobs(1, "gpu")
    for jobs, platform, fix in [
        (0, "cpu", "jobs=0: give a positive number"),
        (-3, "cpu", "jobs=-3: give a positive number"),
        (len(workers.cores()) + 1, "cpu", f"give at most --jobs {len(workers.cores())}"),
        (2, "gpu", "jobs=2: worker processes split CPU cores; on the gpu"),
    ]:
        with pytest.raises(ValueError, match=re.escape(fix)):
            workers.check_jobs(jobs, platform)
    with pytest.raises(ValueError, match="jobs=0"):
        workers.Workers(0)


@pytest.mark.parametrize("jobs, expected", [("0", "positive"), ("100000", "give at most")])
def test_bad_jobs_fail_before_training(jobs, expected, tmp_path, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(runner.Runner, "run", no_training)
    rc, _, err = _main(["--jobs", jobs, "--out", tmp_path / "o"])
    assert rc == 2 and f"--jobs cannot be used: jobs={jobs}" in err and expected in err


def test_costs_measured_side_by_side_count_a_share_of_their_time(tmp_path):
    row = {"task": "teacher_relu", "scale": "tiny", "run_s": 360.0, "compile_s": 6.0}
    two = tmp_path / "two.json"
    two.write_text(json.dumps({"env": {}, "jobs": 2, "load_average": [2.0], "results": [row]}))
    costs, note = budget.load_costs(two, jobs=2)
    assert costs[("teacher_relu", "tiny")] == (180.0, 3.0) and "2 runs side by side" in note
    assert budget.load_costs(two)[0] == costs  # None: the file's own setting
    with pytest.raises(ValueError, match="measured with --jobs 2 and the suite runs with --jobs 1"):
        budget.load_costs(two, jobs=1)
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"env": {}, "results": [row]}))  # written before --jobs existed
    assert budget.load_costs(one, jobs=1)[0][("teacher_relu", "tiny")] == (360.0, 6.0)


@needs_two_cores
def test_map_keeps_the_order_and_reports_a_failing_call():
    with workers.Workers(2) as pool:
        assert pool.map(math.sqrt, [0.0, 1.0, 4.0, 9.0]) == [0.0, 1.0, 2.0, 3.0]
        with pytest.raises(
            RuntimeError, match=r"call sqrt\(-1.0\) failed: ValueError: math domain error"
        ):
            pool.map(math.sqrt, [-1.0])
        assert pool.map(math.sqrt, [16.0]) == [4.0]  # the pool still works


_ENTRIES = """
    import os
    import optax
    from ksbopt.bench import workers

    def breaks_in_a_worker(lr):
        if workers.setting()["jobs"] > 1:  # the preflight here passes, the worker raises
            raise ValueError("deliberately broken in a worker")
        return optax.sgd(lr)

    def kills_its_worker(lr):
        if workers.setting()["jobs"] > 1:
            os._exit(3)
        return optax.sgd(lr)
"""


@needs_two_cores
def test_jobs_train_every_run_and_survive_failing_and_dying_workers(tmp_path, monkeypatch):
    (tmp_path / "worker_entries.py").write_text(textwrap.dedent(_ENTRIES))
    monkeypatch.syspath_prepend(str(tmp_path))  # the workers inherit the parent's sys.path
    out = tmp_path / "out"
    argv = _tiny(out, tmp_path / "cache", "sgd,sgd+wd", "0.01,0.03")
    argv += ["--optimizer", "broken=worker_entries:breaks_in_a_worker"]
    argv += ["--optimizer", "dead=worker_entries:kills_its_worker", "--jobs", "2"]
    rc, stdout, err = _main(argv)
    assert rc == 1  # two entries failed; the others trained
    assert "2 worker processes, one CPU core each" in stdout
    assert "FAILED, ValueError: deliberately broken in a worker" in err
    assert "skipped, ValueError: deliberately broken in a worker" in stdout  # its 2nd rate
    assert "FAILED, WorkerDied" in err and "died twice" in err
    recs = _records(out)
    assert {r["config"]["optimizer"] for r in recs.values()} == {"sgd", "sgd+wd"}
    assert len(recs) == 4 and all(r["status"] == "ok" for r in recs.values())
    assert {r["env"]["jobs"] for r in recs.values()} == {2}
    assert {r["env"]["core"] for r in recs.values()} <= set(workers.cores()[:2])
    report = (out / "report.md").read_text()
    assert "4 of the runs were trained 2 at a time, each pinned to one CPU core" in report
    assert "FAILED (no record; a rerun retries): broken on teacher_relu" in report
    assert "FAILED (no record; a rerun retries): dead on teacher_relu" in report
    # Each setting's step was compiled once, by the worker that trained its unit.
    assert sum(r["timing"]["compiled_here"] for r in recs.values()) == 2


@pytest.mark.slow  # two small suites, ~30 s
@needs_two_cores
def test_jobs_give_the_records_of_one_process_on_one_core_bit_for_bit(tmp_path):
    cache = tmp_path / "cache"
    args = _tiny(tmp_path / "seq", cache, "sgd+wd,adam", "0.01,0.1", seeds="2", steps=30)
    pinned = (
        f"import os, sys; os.sched_setaffinity(0, {{{workers.cores()[0]}}}); "
        "from ksbopt.bench import cli; sys.exit(cli.main(sys.argv[1:]))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-c", pinned, *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rc, _, err = _main(
        [*_tiny(tmp_path / "par", cache, "sgd+wd,adam", "0.01,0.1", "2", 30), "--jobs", "2"]
    )
    assert rc == 0, err
    seq, par = _records(tmp_path / "seq"), _records(tmp_path / "par")
    assert len(seq) == 8 and seq.keys() == par.keys()
    for k in seq:
        assert seq[k]["final"] == par[k]["final"], k
        for name, curve in seq[k]["curves"].items():
            if name != "time_s":
                assert curve == par[k]["curves"][name], (k, name)
    assert {r["env"]["jobs"] for r in par.values()} == {2}


@pytest.mark.slow  # ~15 s
@needs_two_cores
def test_task_costs_measured_side_by_side_price_the_suite_per_worker(tmp_path):
    from benchmarks import bench_task_costs

    path = tmp_path / "costs.json"
    argv = ["--scale", "tiny", "--tasks", "teacher_relu", "--optimizers", "sgd", "--steps", "20"]
    argv += ["--jobs", "2", "--cache-dir", str(tmp_path / "cache"), "--json", str(path)]
    with contextlib.redirect_stdout(io.StringIO()):
        result = bench_task_costs.main(argv)
    assert json.loads(path.read_text())["jobs"] == 2
    (row,) = result["results"]
    assert row["task"] == "teacher_relu" and row["run_s"] > 0 and row["step_ms_median"] > 0
    costs, note = budget.load_costs(path, jobs=2)
    assert costs[("teacher_relu", "tiny")][0] == pytest.approx(row["run_s"] / 2)
    assert "2 runs side by side" in note
