"""End-to-end tests of the benchmark harness (``ksbopt-bench``, package ``benchmarks``).

Everything runs at the ``tiny`` scale on CPU: a handful of steps of tiny models, so the numbers
are not benchmarks; the tests check that the harness records, reports and resumes them
faithfully, that bad input fails before training, and that the tasks' symmetry declarations are
real symmetries of their losses.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from flax import nnx
from support.bench_cli import run_cli

from ksbopt.bench import cli, compiled, diagnostics, host, registry, runner
from ksbopt.bench.report import fmt
from ksbopt.bench.tasks import TASKS, build_task

RETRACT = registry.REGISTRY["sgd+retract"].available
SMOKE_OPTS = ["sgd", "sgd+retract"] if RETRACT else ["sgd"]


_main = run_cli


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench_cache")


def _smoke_args(out, cache, seeds="1"):
    return [
        "--suite",
        "quick",
        "--scale",
        "tiny",
        "--tasks",
        "digits_cnn_bn",
        "--optimizers",
        ",".join(SMOKE_OPTS),
        "--lrs",
        "0.1",
        "--seeds",
        seeds,
        "--steps",
        "20",
        "--out",
        out,
        "--cache-dir",
        cache,
    ]


def _tiny_args(out, cache, *, tasks: str, optimizers: str, lrs: str, steps: int) -> list:
    """A one-seed grid run at the tiny scale, constant learning rate, no progress bars or plots."""
    return [
        "--schedules",
        "constant",
        "--scale",
        "tiny",
        "--tasks",
        tasks,
        "--optimizers",
        optimizers,
        "--lrs",
        lrs,
        "--seeds",
        "1",
        "--steps",
        str(steps),
        "--no-progress",
        "--no-plots",
        "--out",
        out,
        "--cache-dir",
        cache,
    ]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("smoke")
    rc, stdout, stderr = _main(_smoke_args(out, cache))
    assert rc == 0, stderr
    return out, stdout


def _records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def _row(report: str, optimizer: str) -> str:
    (row,) = [ln for ln in report.splitlines() if ln.startswith(f"| {optimizer} | 0.1 ")]
    return row


def test_smoke_writes_json_report_and_plots_with_the_run_numbers(smoke):
    out, stdout = smoke
    assert "jax devices:" in stdout
    recs = _records(out)
    assert sorted(r["config"]["optimizer"] for r in recs) == sorted(SMOKE_OPTS)
    report = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    # the scale the runs used, as a rebuild from the records states it (not the unset option)
    assert summary["meta"]["scale"] == "grid=tiny" and "- scale: `grid=tiny`;" in report
    # a run that changes its suite's plan says so (the quick suite's own plan is not this)
    label = "quick, customised by --tasks --optimizers --seeds --lrs --steps --scale"
    assert summary["meta"]["suite"] == label and f"suite `{label}`" in report
    for r in recs:
        opt = r["config"]["optimizer"]
        assert r["config"]["steps"] == 20 and r["config"]["scale"] == "tiny"
        # evaluated every step: at least every 2% of the run, at most the task's interval
        assert r["config"]["eval_every"] == 1 and r["curves"]["step"] == list(range(21))
        assert r["curves"]["time_s"][0] == 0 and np.all(np.diff(r["curves"]["time_s"]) > 0)
        assert r["config"]["schedule"] == "cosine"
        f = r["final"]
        assert f["test_metric"] == r["curves"]["test_metric"][-1]
        assert 0.0 <= f["test_metric"] <= 1.0
        # The report shows exactly the recorded final metrics (1 seed: std 0).
        row = _row(report, opt)
        assert f"{fmt(f['test_metric'])} ± {fmt(0.0)}" in row
        s = summary["grid"]["digits_cnn_bn"]["optimizers"][opt]
        assert s["val_mean"] == pytest.approx(f["val_metric"], rel=0, abs=1e-12)
        assert s["test_mean"] == pytest.approx(f["test_metric"], rel=0, abs=1e-12)
        assert s["best_lr"] == 0.1
        t = r["timing"]
        assert t["compile_s"] > 0 and t["step_ms_median"] > 0
        assert r["env"]["platform"] == jax.default_backend()
        assert r["env"]["allocator"] == host.setting()["allocator"]  # what the run had
    assert f"allocator {host.setting()['allocator']}" in report
    if RETRACT:  # the first of the report's four questions, with the recorded numbers
        sgd = next(r for r in recs if r["config"]["optimizer"] == "sgd")["final"]["test_metric"]
        assert "### 1. Does the implicit adaptivity of normalisation + SGD matter?" in report
        assert f"| digits_cnn_bn | {fmt(sgd)} ± {fmt(0.0)} (lr 0.1) |" in report
    for name in ("digits_cnn_bn_curves.png", "digits_cnn_bn_lr.png"):
        data = (out / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        assert f"plots/{name}" in report


@pytest.mark.skipif(not RETRACT, reason="ksbopt.retract not available")
def test_smoke_diagnostics_see_retract_conserve_the_filter_norm(smoke):
    out, _ = smoke
    recs = {r["config"]["optimizer"]: r for r in _records(out)}
    for label in ("conv1", "conv2"):
        q_free = recs["sgd"]["diagnostics"]["curves"][label]["charge"]
        q_con = recs["sgd+retract"]["diagnostics"]["curves"][label]["charge"]
        assert q_free[0] == pytest.approx(q_con[0], rel=1e-6)  # same seed, same init
        # retract keeps 1/2|w|^2 of every filter at its initial value (float32 rounding of a
        # mean over a few groups: 1e-5 relative); SGD's grows (P1 with lambda = 0).
        np.testing.assert_allclose(q_con, q_con[0], rtol=1e-5)
        assert q_free[-1] > q_free[0] * (1 + 1e-4)
    assert (out / "plots" / "digits_cnn_bn_charges.png").exists()


def test_rerun_skips_finished_runs_and_extends_seeds(smoke, cache, tmp_path, monkeypatch):
    out = tmp_path / "resume"
    shutil.copytree(smoke[0], out)
    real = runner.Runner._execute

    def refuse(self, cfg, full, position):
        raise AssertionError(f"{cfg.run_id} was trained again")

    monkeypatch.setattr(runner.Runner, "_execute", refuse)
    rc, stdout, err = _main(_smoke_args(out, cache))
    assert rc == 0, err
    assert stdout.count("kept from an earlier run") == len(SMOKE_OPTS)
    assert f"0 trained now, {len(SMOKE_OPTS)} reused" in (out / "report.md").read_text()

    calls = []

    def counting(self, cfg, full, position):
        calls.append(cfg.run_id)
        return real(self, cfg, full, position)

    monkeypatch.setattr(runner.Runner, "_execute", counting)
    # A record cut short (e.g. the machine died while writing) is not trusted: it reruns.
    (victim,) = (out / "runs").glob("*__sgd__*.json")
    victim.write_text(victim.read_text()[:100])
    args = _smoke_args(out, cache, seeds="2")
    args[args.index("--optimizers") + 1] = "sgd"
    rc, _, err = _main(args)
    assert rc == 0, err
    assert sorted(calls) == [
        "grid__digits_cnn_bn__sgd__lr0.1__s0__cosine",
        "grid__digits_cnn_bn__sgd__lr0.1__s1__cosine",
    ]
    summary = json.loads((out / "summary.json").read_text())
    tests = [r["final"]["test_metric"] for r in _records(out) if r["config"]["optimizer"] == "sgd"]
    s = summary["grid"]["digits_cnn_bn"]["optimizers"]["sgd"]
    assert len(tests) == 2 and s["seeds"] == 2
    assert s["test_mean"] == pytest.approx(np.mean(tests), abs=1e-12)
    assert s["test_std"] == pytest.approx(np.std(tests), abs=1e-12)


def test_interrupted_benchmark_keeps_finished_runs(tmp_path, cache, monkeypatch):
    args = _tiny_args(
        tmp_path, cache, tasks="teacher_relu", optimizers="sgd", lrs="0.01,0.03", steps=10
    )
    real = runner.Runner._execute
    calls = []

    def interrupt_second(self, cfg, full, position):
        calls.append(cfg.run_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, cfg, full, position)

    monkeypatch.setattr(runner.Runner, "_execute", interrupt_second)
    rc, _, err = _main(args)
    assert rc == 130 and "rerun the same command to resume" in err
    (kept,) = _records(tmp_path)
    assert kept["config"]["learning_rate"] == 0.01 and "final" in kept
    assert not (tmp_path / "report.md").exists()
    calls.clear()
    rc, _, err = _main(args)
    assert rc == 0, err
    assert len(calls) == 1 and calls[0].endswith("lr0.03__s0")
    assert len(_records(tmp_path)) == 2


def test_a_failing_optimizer_is_reported_and_the_suite_goes_on(tmp_path, cache, monkeypatch):
    real = runner.Runner._execute
    calls = []

    def broken_sgd(self, cfg, full, position):
        calls.append(cfg.run_id)
        if cfg.optimizer == "sgd":
            raise ValueError("deliberately broken")
        return real(self, cfg, full, position)

    monkeypatch.setattr(runner.Runner, "_execute", broken_sgd)
    args = _tiny_args(
        tmp_path, cache, tasks="teacher_relu", optimizers="sgd,sgd+wd", lrs="0.01,0.03", steps=10
    )
    rc, stdout, err = _main(args)
    assert rc == 1 and "FAILED, ValueError: deliberately broken" in err
    # The second learning rate of the broken combination is skipped, not compiled again.
    assert sum("__sgd__" in c for c in calls) == 1 and "skipped" in stdout
    assert {r["config"]["optimizer"] for r in _records(tmp_path)} == {"sgd+wd"}
    assert (
        "FAILED (no record; a rerun retries): sgd on teacher_relu"
        in (tmp_path / "report.md").read_text()
    )


def test_diverged_run_is_recorded_and_never_chosen(tmp_path, cache):
    rc, stdout, err = _main(
        _tiny_args(
            tmp_path, cache, tasks="teacher_relu", optimizers="sgd", lrs="0.01,1e4", steps=20
        )
    )
    assert rc == 0, err
    recs = {r["config"]["learning_rate"]: r for r in _records(tmp_path)}
    assert recs[1e4]["status"] == "diverged" and "DIVERGED" in stdout
    assert recs[1e4]["steps_done"] < 20  # stopped at the first chunk with a non-finite loss
    assert recs[0.01]["status"] == "ok"
    row = json.loads((tmp_path / "summary.json").read_text())["grid"]["teacher_relu"]["optimizers"][
        "sgd"
    ]
    assert row["best_lr"] == 0.01 and row["val_by_lr"]["10000.0"] is None


@pytest.mark.slow  # ~15 s; the default run's gpu-suite coverage is the planning test below
def test_gpu_suite_runs_tiny_on_cpu(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("KSBOPT_BENCH_SCALE", "tiny")
    opt = "sgd+retract" if RETRACT else "sgd"
    rc, _, err = _main(
        [
            "--suite",
            "gpu",
            "--tasks",
            "lm_stdlib_qknorm",
            "--optimizers",
            opt,
            "--lrs",
            "0.03",
            "--seeds",
            "1",
            "--no-progress",
            "--no-plots",
            "--out",
            tmp_path,
            "--cache-dir",
            cache,
        ]
    )
    assert rc == 0, err
    (rec,) = _records(tmp_path)
    assert rec["config"]["scale"] == "tiny" and rec["config"]["task_config"]["d"] == 32
    assert rec["task"]["metric"] == "bits_per_byte"
    bpb = rec["final"]["test_metric"]
    assert 0 < bpb < 9  # bits per byte of a barely trained byte model: below log2(256) + 1
    assert f"{fmt(bpb)} ± {fmt(0.0)}" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_whole_gpu_suite_runs_tiny_on_cpu(tmp_path, cache):
    """Every task of the gpu suite through the tuning protocol (one optimizer, one seed: the
    protocol's cost at the tiny scale is tested elsewhere)."""
    rc, _, err = _main(
        [
            "--suite",
            "gpu",
            "--scale",
            "tiny",
            "--optimizers",
            "sgd",
            "--seeds",
            "1",
            "--no-progress",
            "--out",
            tmp_path,
            "--cache-dir",
            cache,
        ]
    )
    assert rc == 0, err
    from ksbopt.bench.suites import SUITES

    assert {r["config"]["task"] for r in _records(tmp_path)} == set(SUITES["gpu"].tasks)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--tasks", "mnist1d_cnn_bn,nope"],
            ["unknown task(s) nope", "mnist1d_cnn_bn", "lm_stdlib_qknorm"],
        ),
        (["--optimizers", "sgd,nope"], ["unknown optimizer(s) nope", "adam", "rmsprop"]),
        (["--suite", "huge"], ["valid suites: quick, full, gpu"]),
        (["--seeds", "two"], ["--seeds='two'", "count"]),
        (["--seeds", "0"], ["at least 1"]),
        (["--lrs", "0.1,-1"], ["--lrs='0.1,-1'", "positive"]),
        (["--steps", "0"], ["--steps=0"]),
        (["--experiments", "grid,zoo"], ["unknown experiment(s) zoo", "nld"]),
    ],
)
def test_bad_input_fails_before_training(argv, expected, tmp_path, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(runner.Runner, "run", no_training)
    rc, _, err = _main([*argv, "--out", tmp_path / "o"])
    assert rc == 2
    for e in expected:
        assert e in err


def test_unwritable_out_missing_package_and_missing_feature(tmp_path, monkeypatch):
    monkeypatch.setattr(runner.Runner, "run", lambda *a, **k: pytest.fail("training started"))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc, _, err = _main(["--out", blocker / "sub"])
    assert rc == 2 and "is not a writable folder" in err and "--out DIR" in err

    monkeypatch.setattr(cli, "_installed", lambda m: m != "mnist1d")
    rc, _, err = _main(["--tasks", "mnist1d_cnn", "--out", tmp_path / "o"])
    assert rc == 2 and "'mnist1d'" in err and "pip install 'ksbopt[bench]'" in err
    monkeypatch.undo()

    monkeypatch.setattr(runner.Runner, "run", lambda *a, **k: pytest.fail("training started"))
    spec = registry.OptimizerSpec(
        "needs-missing",
        lambda lr, task: None,
        registry.SGD_GRID,
        (0.1,),
        needs=("no_such_feature",),
    )
    monkeypatch.setitem(registry.REGISTRY, "needs-missing", spec)
    rc, _, err = _main(["--optimizers", "needs-missing", "--out", tmp_path / "o"])
    assert rc == 2 and "ksbopt.no_such_feature" in err
    with pytest.raises(registry.FeatureUnavailable, match=r"ksbopt\.no_such_feature"):
        registry.get("needs-missing")
    with pytest.raises(KeyError, match=r"valid optimizers: sgd, sgd\+wd"):
        registry.get("nope")
    monkeypatch.setenv("KSBOPT_BENCH_SCALE", "enormous")
    rc, _, err = _main(["--out", tmp_path / "o"])
    assert rc == 2 and "'enormous'" in err


def test_missing_flax_is_reported_before_anything_imports_it(tmp_path):
    code = (
        "import sys; sys.modules['flax'] = None\n"
        "from ksbopt.bench import cli\n"
        f"sys.exit(cli.main(['--out', {str(tmp_path)!r}]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "'flax'" in proc.stderr and "pip install 'ksbopt[bench]'" in proc.stderr


def test_registry_entries_share_the_tuning_budget_and_inject_the_lr():
    task = build_task("digits_cnn_bn", "tiny")
    plain = build_task("digits_cnn", "tiny")  # no normalisation: rescale units, path norm
    params = _init(task)[1]
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
    sizes = {len(s.lr_grid) for s in registry.REGISTRY.values()}
    assert sizes == {5}  # the same number of learning rates for every optimizer
    for name, spec in registry.REGISTRY.items():
        g = np.asarray(spec.lr_grid)
        ratios = g[1:] / g[:-1]
        assert np.all((ratios > 2.5) & (ratios < 4)), (name, g)  # half-decade log grid
        assert set(spec.quick_lrs) <= set(spec.lr_grid)
        if not spec.available:
            continue
        (t,) = [x for x in (task, plain) if spec.applies_to(x)][:1]  # each applies to one
        tx = registry.make(name, 0.0123, t)
        state = tx.init(params if t is task else _init(plain)[1])
        assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.0123)
    if RETRACT:  # the entry that reads the task's symmetries: one step keeps filter norms
        tx = registry.make("sgd+retract", 0.1, task)
        updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        new = optax.apply_updates(params, updates)
        for name in ("conv1", "conv2"):
            w0, w1 = params[name]["kernel"], new[name]["kernel"]
            assert not np.allclose(w0, w1)
            # per output filter (last axis); float32 rounding of a norm of ~10 numbers
            np.testing.assert_allclose(
                jnp.linalg.norm(w1.reshape(-1, w1.shape[-1]), axis=0),
                jnp.linalg.norm(w0.reshape(-1, w0.shape[-1]), axis=0),
                rtol=1e-5,
            )
    with pytest.raises(TypeError, match="no hyperparameter"):
        registry.make("adam", 1e-3, task, momentum=0.5)


def _init(task):
    """(train graphdef, params, rest) of seed 0, initialised as the runner does."""
    graph, _, params, rest = compiled.init_model(task, 0)
    return graph, params, rest


def _act(params, decl, rng):
    """Applies one finite group element of a declaration to all its groups at once."""
    sel = lambda s: {s} if isinstance(s, str) else set(s)
    k = decl.kwargs
    if decl.kind == "scale":
        mult = {p: 2.0 for p in sel(decl.args[0])}
    elif decl.kind == "rescale":
        mult = {**{p: 2.0 for p in sel(k["incoming"])}, **{p: 0.5 for p in sel(k["outgoing"])}}
    elif decl.kind == "translation":
        add = sel(decl.args[0])
        return _map(params, lambda p, x: x + 0.7 if p in add else x)
    else:  # linear A -> A G, B -> G^-1 B for plain stacked kernels
        left, right = decl.args
        n = None

        def f(p, x):
            nonlocal n
            if p == left:
                n = x.shape[-1]
            return x

        _map(params, f)
        g = jnp.eye(n) + 0.3 * jnp.asarray(rng.normal(size=(n, n)), jnp.float32) / math.sqrt(n)
        gi = jnp.linalg.inv(g)
        return _map(params, lambda p, x: x @ g if p == left else gi @ x if p == right else x)
    return _map(params, lambda p, x: x * mult.get(p, 1.0))


def _map(params, fn):
    def f(path, x):
        return fn("/".join(str(getattr(q, "key", q)) for q in path), x)

    return jax.tree_util.tree_map_with_path(f, params)


# Variants that share a model and declarations with a task checked by default run with -m slow.
_SAME_AS_ANOTHER = {
    "mnist1d_large_cnn_bn",
    "mnist1d_large_cnn",
    "mnist1d_cnn_published",
    "mnist1d_mlp_published",
    "digits_cnn_bn",
    "digits_cnn",
    "lm_stdlib",
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in _SAME_AS_ANOTHER else n for n in TASKS]
)
def test_task_symmetry_declarations_leave_the_loss_unchanged(name, cache):
    task = build_task(name, "tiny", cache)
    assert {d.kind for d in task.decls} == set(TASKS[name].kinds)
    assert set(task.features) == set(TASKS[name].features)
    graph, params, rest = _init(task)
    arrays = {k: jnp.asarray(v) for k, v in task.arrays.items() if k.startswith("train_")}
    batch = task.batch(arrays, jnp.asarray(task.sampler(0).next(1)[0]))
    loss_c = (
        jax.jit(lambda p: task.loss(nnx.merge(graph, p, rest), batch))
        .lower(params)
        .compile(compiler_options={"xla_backend_optimization_level": 0})
    )  # one cheap compile per task
    loss = lambda p: float(loss_c(p))
    base = loss(params)
    rng = np.random.default_rng(0)
    checked = 0
    for d in task.decls:
        if d.constructor is not None:  # per-head attention GL(k): covered by ksbopt's tests
            continue
        moved = _act(params, d, rng)
        assert any(
            not np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(params))
        )
        # float32 forward passes; normalisers' epsilon (1e-5 BatchNorm, 1e-6 LayerNorm) against
        # O(1) variances bounds the symmetry breaking well below 1e-3 relative.
        assert loss(moved) == pytest.approx(base, rel=1e-3, abs=1e-4), (name, d.label)
        checked += 1
    assert checked >= 1


# ---- entries that need more than gradients, and the full suite's plan -------------------------

NEW_ENTRIES = [
    "sgd",
    "noether_rmsprop",
    "sgd+teleport",
    "path_sgd",
    "sgd+steer_eq",
    "adam+steer_nld",
]


@pytest.mark.skipif(
    not all(registry.REGISTRY[o].available for o in NEW_ENTRIES), reason="ksbopt features missing"
)
def test_entries_get_extra_args_units_and_path_norm_and_report_not_applicable(tmp_path, cache):
    rc, _, err = _main(
        _tiny_args(
            tmp_path,
            cache,
            tasks="teacher_relu,mnist1d_mlp_ln",
            optimizers=",".join(NEW_ENTRIES),
            lrs="0.01",
            steps=10,
        )
    )
    assert rc == 0, err
    recs = {(r["config"]["task"], r["config"]["optimizer"]): r for r in _records(tmp_path)}
    expected = {
        (t, o)
        for t in ("teacher_relu", "mnist1d_mlp_ln")
        for o in NEW_ENTRIES
        if registry.REGISTRY[o].applies_to(TASKS[t])
    }
    assert set(recs) == expected
    assert ("teacher_relu", "sgd+teleport") in expected and ("teacher_relu", "path_sgd") in expected
    assert ("mnist1d_mlp_ln", "adam+steer_nld") in expected  # needs the extra argument grad
    for r in recs.values():
        assert r["status"] == "ok" and math.isfinite(r["final"]["train_loss"]), r["id"]
    # Teleport moved along the rescale orbits (the charge 1/2(|w_in|^2 - |w_out|^2) jumps at
    # step 0), while plain SGD at lr 0.01 moves it only by O(lr^2 |g|^2) in 10 steps.
    q = {
        o: recs[("teacher_relu", o)]["diagnostics"]["curves"]["fc1>fc2"]["charge"]
        for o in ("sgd", "sgd+teleport")
    }
    assert q["sgd"][0] == pytest.approx(q["sgd+teleport"][0], rel=1e-6)  # same initialisation
    assert abs(q["sgd+teleport"][-1] - q["sgd+teleport"][0]) > 10 * abs(q["sgd"][-1] - q["sgd"][0])
    # Angular updates of the units are recorded, with a summary, for every run.
    for (task, _), r in recs.items():
        units = ["fc1 units", "fc2 units"] if task == "teacher_relu" else ["fc1", "fc2"]
        for u in units:
            a = r["diagnostics"]["curves"][u]["angular_update"]
            assert a[0] is None and len(a) == len(r["curves"]["step"]) and a[-1] > 0
            assert r["diagnostics"]["summary"][u]["angular_update"]["last"] == a[-1]
    report = (tmp_path / "report.md").read_text()
    (row,) = [ln for ln in report.splitlines() if ln.startswith("| teacher_relu (nmse) |")]
    header = next(ln for ln in report.splitlines() if ln.startswith("| task (metric) |"))
    cells = dict(zip(header.split("|")[2:-1], row.split("|")[2:-1]))
    assert cells[" sgd+steer_eq "].strip() == "n/a" and cells[" adam+steer_nld "].strip() == "n/a"
    assert "`path_sgd`: needs a ReLU or linear network without normalisation" in report


def test_full_suite_plans_its_fixed_experiments_at_the_published_sizes():
    """The NLD control and the baselines are planned in advance (the tuned grid is planned
    round by round; its first round is tested with the protocol)."""
    from ksbopt.bench.suites import SUITES, plan

    suite = SUITES["full"]
    assert set(suite.optimizers) == set(registry.REGISTRY)
    runs = plan(suite, tasks=suite.tasks, optimizers=suite.optimizers, seeds=suite.seeds)
    assert {r.experiment for r in runs} == {"nld", "baselines"}
    assert {(r.experiment, r.scale) for r in runs} == {("nld", "base"), ("baselines", "base")}
    assert len(runs) == len({r.run_id for r in runs})
    # a fixed learning-rate list trains exactly those rates, in every arm of the pair, untuned
    from ksbopt.bench.suites import arms_of

    fixed = plan(
        suite,
        tasks=("teacher_relu",),
        optimizers=("sgd",),
        seeds=(0,),
        lrs=(0.1, 0.5),
        experiments=("grid",),
    )
    assert {(r.learning_rate, r.schedule) for r in fixed} == {
        (lr, arm) for lr in (0.1, 0.5) for arm in arms_of(suite, "teacher_relu", "sgd")
    }
    both = plan(suite, tasks=("mnist1d_deep_mlp_ln",), optimizers=("sgd+wd",), seeds=(0,),
                lrs=(0.1,), experiments=("grid",))  # fmt: skip
    assert {r.schedule for r in both} == {"cosine", "constant"}  # the constant arm's scope


def test_angular_update_from_charges_matches_the_direct_angle():
    ks = pytest.importorskip("ksbopt")
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}
    updates = {"w": jnp.asarray(0.05 * rng.normal(size=(6, 4)), jnp.float32)}
    new = optax.apply_updates(params, updates)
    got = diagnostics.angular_updates([ks.Scale("w", axis=-1)], params, updates, new)
    w, v = np.asarray(params["w"], np.float64), np.asarray(new["w"], np.float64)
    cos = np.sum(w * v, 0) / np.linalg.norm(w, axis=0) / np.linalg.norm(v, axis=0)
    sin = np.sqrt(np.maximum(1 - cos**2, 0))
    # float32 charges of ~1 against float64: angles of ~0.05 rad agree to ~1e-5 relative.
    np.testing.assert_allclose(float(got[0]), np.mean(np.arctan2(sin, cos)), rtol=1e-4)


def test_path_norm_of_a_linear_net_is_the_product_of_squared_kernels(cache):
    task = build_task("teacher_linear", "tiny", cache)
    params = _init(task)[1]
    sq = jax.tree.map(jnp.square, params)
    got = float(task.path_norm_fn()(sq))
    depth = task.config["depth"]
    prod = np.ones((1, 32))
    for i in range(1, depth + 1):
        prod = prod @ np.asarray(sq[f"fc{i}"]["kernel"], np.float64)
    # A sum of ~16^3 positive float32 products: 1e-5 relative.
    assert got == pytest.approx(float(prod.sum()), rel=1e-5)
    assert task.path_norm_fn() is task.path_norm_fn()  # one object: one compilation
    with pytest.raises(ValueError, match="Path-SGD applies to ReLU networks"):
        build_task("digits_cnn_bn", "tiny").path_norm_fn()


def test_gpu_suite_plans_its_tasks_at_the_large_scale_with_its_step_budget(tmp_path, monkeypatch):
    from ksbopt.bench import cli
    from ksbopt.bench.suites import GPU_STEPS, SUITES
    from ksbopt.bench.tasks import GPU_TASKS

    got = {}

    def capture(plan):
        got.update(plan.grid_args, suite=plan.suite)
        return 0

    monkeypatch.setattr(cli, "_dry_run", capture)
    assert cli.main(["--suite", "gpu", "--dry-run", "--out", str(tmp_path)]) == 0
    assert got["tasks"] == GPU_TASKS and got["steps"] == GPU_STEPS
    assert got["suite"].scale_of("grid") == "large" and len(SUITES["gpu"].seeds) == 3
    # at another scale (the tests' tiny one) each task keeps its own step budget
    assert cli.main(["--suite", "gpu", "--scale", "tiny", "--dry-run", "--out", str(tmp_path)]) == 0
    assert got["steps"] is None
