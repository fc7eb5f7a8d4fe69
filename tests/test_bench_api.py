"""ksbopt.bench as a library and the CLI's user code: user optimizers and tasks beside the
registry's, their identity in the run records (re-run when changed), bad factories reported
while the rest completes, and the example at the tiny size. Tiny models, a few steps: the
numbers are not benchmarks."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from flax import nnx

import ksbopt.bench
from ksbopt.bench import cli, registry, tasks, user

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_tables():
    """User entries are registered process-wide; leave the tables as the other tests see them."""
    reg, tab = dict(registry.REGISTRY), dict(tasks.TASKS)
    yield
    registry.REGISTRY.clear()
    registry.REGISTRY.update(reg)
    tasks.TASKS.clear()
    tasks.TASKS.update(tab)
    user._USER_TASKS.clear()


class Net(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1)).astype(np.int32)
    return x, y


def toy_task(**kw):
    x, y = _data()
    return ksbopt.bench.make_task(
        "toy", Net, (x[:300], y[:300]), (x[300:], y[300:]), steps=20, eval_every=10, **kw
    )


def _lion(b1):
    return lambda lr: optax.lion(lr, b1=b1)


def _compare(opts, out, **kw):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return ksbopt.bench.compare(opts, tasks=[toy_task()], seeds=1, out=out, plots=False, **kw)


def test_compare_puts_user_entries_beside_the_registry_and_reruns_a_changed_factory(tmp_path):
    res = _compare({"mine": _lion(0.9), "sgd": "sgd"}, tmp_path)
    assert res.status == 0 and not res.failures
    rows = res.best("toy")
    assert set(rows) == {"mine", "sgd"}
    assert all(r["test_mean"] is not None and r["seeds"] == 1 for r in rows.values())
    report = res.report.read_text()
    assert "| mine |" in report and "Symmetry profile on `toy`" in report
    # Detected (not declared): the ReLU rescale between fc1 and fc2, the softmax translation.
    prof = res.profile("toy", "sgd")
    assert sorted(k.split(":")[0] for k in prof) == ["rescale", "translation"]
    assert prof[next(k for k in prof if k.startswith("translation"))] == "exact"
    assert res.profile("toy", "mine")[next(k for k in prof if k.startswith("rescale"))] == (
        "first order"
    )
    rec = next(r for r in res.records if r["config"]["optimizer"] == "mine")
    origin = rec["config"]["origin"]
    assert origin["factory"].endswith("_lion.<locals>.<lambda>")
    assert len(origin["source_sha256"]) == 64
    assert rec["profile"]["labels"] == list(prof)

    again = _compare({"mine": _lion(0.9), "sgd": "sgd"}, tmp_path)
    n_mine = sum(r["config"]["optimizer"] == "mine" for r in res.records)
    assert again.summary["meta"]["trained"] == 0
    assert again.summary["meta"]["reused"] == len(res.records)
    changed = _compare({"mine": _lion(0.8), "sgd": "sgd"}, tmp_path)  # another closure value
    # mine's search again from its starting window (the same lattice points), not sgd's runs
    assert changed.summary["meta"]["trained"] >= 3 and changed.summary["meta"]["reused"] == (
        len(res.records) - n_mine
    )


def test_bad_factories_are_reported_and_the_rest_completes(tmp_path):
    def raises(lr):
        raise RuntimeError("my bug")

    def needs_params(lr, params):
        return optax.sgd(lr)

    res = _compare(
        {
            "raises": raises,
            "not_tx": lambda lr: "sgd",
            "needs_params": needs_params,
            "nan": lambda lr: optax.scale(jnp.nan),
            "sgd": "sgd",
        },
        tmp_path,
    )
    assert res.status == 1
    why = "\n".join(res.failures)
    assert "raises on toy: RuntimeError: my bug" in why
    assert "not_tx on toy: TypeError" in why and "not an optax.GradientTransformation" in why
    assert "needs the argument 'params'" in why
    rows = res.best("toy")
    assert set(rows) == {"nan", "sgd"}
    assert rows["nan"]["diverged"] == 1  # the report marks the row "(1 diverged)"
    nan_runs = [r for r in res.records if r["config"]["optimizer"] == "nan"]
    # the search walks down the lattice: the starting window, then the 4 extensions
    assert len(nan_runs) == 3 + 4 and all(r["status"] == "diverged" for r in nan_runs)
    assert "no finite point: nan on toy" in res.report.read_text()
    assert rows["sgd"]["test_mean"] is not None
    assert "FAILED before training: raises on toy" in res.report.read_text()


def test_cli_takes_optimizers_grids_and_tasks_by_import_path(tmp_path, monkeypatch):
    mod = tmp_path / "my_bench_code.py"
    mod.write_text(
        textwrap.dedent(
            """
            import optax
            from test_bench_api import toy_task

            def make(lr, b1=0.9):
                return optax.lion(lr, b1=b1)

            def task():
                return toy_task(symmetries=[])
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tmp_path / "out"
    argv = ["--suite", "quick", "--tasks", "teacher_relu", "--scale", "tiny", "--steps", "10"]
    argv += ["--optimizers", "sgd", "--optimizer", "mine=my_bench_code:make", "--seeds", "1"]
    argv += ["--grid", "mine:b1=0.8,0.9", "--grid", "mine:lr=1e-4,3e-4,1e-3,3e-3,1e-2"]
    argv += ["--task", "my_bench_code:task", "--out", str(out), "--no-plots", "--no-progress"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    for t in ("teacher_relu", "toy"):
        assert set(summary["grid"][t]["optimizers"]) == {"sgd", "mine[b1=0.8]", "mine[b1=0.9]"}
    rec = json.loads(next((out / "runs").glob("*mine[[]b1=0.8]*lr0.003__*")).read_text())
    assert rec["config"]["origin"]["factory"] == "my_bench_code:make"
    assert rec["config"]["hparams"] == {"b1": 0.8}


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--optimizer", "x=no_such_module:make", "cannot import module 'no_such_module'"),
        ("--optimizer", "x=optax:no_such_factory", "has no attribute 'no_such_factory'"),
        ("--optimizer", "x=optax", "is not an import path"),
        ("--task", "no_such_module:task", "cannot import module 'no_such_module'"),
        ("--grid", "y:b1=0.9", "no --optimizer NAME=... defines them"),
    ],
)
def test_an_unresolvable_path_fails_before_training(tmp_path, flag, value, message):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        cli.main(["--suite", "quick", "--scale", "tiny", flag, value, "--out", str(tmp_path)])
    assert e.value.code == 2 and message in err.getvalue()
    assert not (tmp_path / "runs").exists()


def test_origin_hash_follows_source_closure_and_called_helpers():
    a, b, c = _lion(0.9), _lion(0.9), _lion(0.95)
    assert user.origin(a) == user.origin(b) != user.origin(c)
    assert user.origin(toy_task)["factory"] == "test_bench_api:toy_task"
    ns: dict = {"__name__": "scratch"}
    exec("def helper(lr): return lr\ndef make(lr): return helper(lr)", ns)
    first = user.origin(ns["make"])
    exec("def helper(lr): return 2 * lr", ns)  # only the helper changes
    assert user.origin(ns["make"]) != first


@pytest.mark.slow  # ~20 s in a subprocess; compare's own tests above run by default
@pytest.mark.skipif(
    not registry.REGISTRY["sgd+retract"].available, reason="the example uses sgd+retract"
)
def test_example_runs_at_the_tiny_size(tmp_path):
    pytest.importorskip("mnist1d")
    env = {**os.environ, "KSBOPT_EXAMPLE_TINY": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "compare_my_optimizer.py"), "--out", tmp_path],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "second order" in p.stdout and "first order" in p.stdout  # the profile demo
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = summary["grid"]["mnist1d_cnn_bn"]["optimizers"]
    assert set(rows) == {"sign_momentum", "sgd+wd", "adamw", "sgd+retract"}
    assert "Symmetry profile on `mnist1d_cnn_bn`" in (tmp_path / "report.md").read_text()


def test_make_task_takes_a_module_instance_and_a_batch_iterator():
    x, y = _data()

    def batches():
        for i in range(0, 100, 20):  # exactly train_batches batches
            yield x[i : i + 20], y[i : i + 20]

    model = Net(nnx.Rngs(3))
    task = ksbopt.bench.make_task(
        "toy_iter", model, batches(), (x[300:], y[300:]), steps=10, train_batches=5
    )
    assert task.batch_size == 20 and task.arrays["train_x"].shape == (100, 8)
    assert task.kinds == ("rescale", "translation")  # detected
    a, b = (nnx.state(task.make_model(k), nnx.Param) for k in (None, None))
    np.testing.assert_array_equal(a["fc1"]["kernel"][...], model.fc1.kernel[...])
    np.testing.assert_array_equal(b["fc1"]["kernel"][...], model.fc1.kernel[...])
    with pytest.raises(ValueError, match="gave no batches"):
        ksbopt.bench.make_task("empty", model, iter([]), (x, y))
