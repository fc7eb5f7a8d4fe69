"""The benchmark's headline tasks, their data and models, and the optimizer roster.

Training runs at the ``tiny`` scale (a handful of steps of tiny models); the sizes of the CPU
and GPU scales are checked from their tables and abstract models, without training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax")
pytest.importorskip("mnist1d")

from flax import nnx
from support.bench_cli import run_cli

from ksbopt.bench import compiled, data, registry, runner, tasks
from ksbopt.bench.suites import SUITES, arms_of
from ksbopt.bench.tasks import GPU_TASKS, HEADLINE_TASKS, TASKS, build_task


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tasks_cache")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails: the data must come from packages or generators."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a benchmark task tried to use the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _params(task, seed=0):
    return compiled.init_model(task, seed)[2]


def _n_params(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ---- tasks ------------------------------------------------------------------------------------


def test_headline_and_gpu_tasks_are_registered_tasks():
    assert set(HEADLINE_TASKS) <= set(TASKS) and set(GPU_TASKS) <= set(HEADLINE_TASKS)
    for name in HEADLINE_TASKS:  # the unnormalised variants are there too
        assert TASKS[name].description


@pytest.mark.parametrize("name", HEADLINE_TASKS)
def test_headline_task_is_deterministic_per_seed_and_offline(name, cache, no_network):
    a, b = build_task(name, "tiny", cache), build_task(name, "tiny", cache)
    assert a.arrays.keys() == b.arrays.keys()
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    np.testing.assert_array_equal(a.sampler(3).next(4), b.sampler(3).next(4))
    assert not np.array_equal(a.sampler(3).next(4), a.sampler(4).next(4))
    p0, p0b, p1 = _params(a, 0), _params(b, 0), _params(a, 1)
    for x, y in zip(jax.tree.leaves(p0), jax.tree.leaves(p0b)):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)))
    assert a.eval_every <= a.steps and {d.kind for d in a.decls} == set(TASKS[name].kinds)


def test_headline_mnist1d_splits_are_disjoint_and_sized(cache):
    task = build_task("mnist1d_resnet_bn", "tiny", cache)
    s = tasks._MNIST1D_HEADLINE_SIZES["tiny"]
    n_train = int(s["num_samples"] * 0.8) - s["val_size"]
    assert task.arrays["train_x"].shape == (n_train, 40)
    assert task.arrays["val_x"].shape == (s["val_size"], 40)
    assert task.arrays["test_x"].shape == (s["test_size"], 40)
    rows = lambda k: {r.tobytes() for r in task.arrays[k]}
    train, val, test = rows("train_x"), rows("val_x"), rows("test_x")
    assert not (train & val) and not (train & test) and not (val & test)
    assert task.data_info["config"]["iid_noise_scale"] == data.MNIST1D_HARD["iid_noise_scale"]
    mlp = build_task("mnist1d_deep_mlp", "tiny", cache)  # the MLPs test on more examples
    np.testing.assert_array_equal(mlp.arrays["train_x"], task.arrays["train_x"])
    np.testing.assert_array_equal(mlp.arrays["val_x"], task.arrays["val_x"])
    assert mlp.arrays["test_x"].shape == (s["mlp_test_size"], 40) != task.arrays["test_x"].shape
    np.testing.assert_array_equal(mlp.arrays["test_x"][: s["test_size"]], task.arrays["test_x"])


def test_lm_splits_are_by_file():
    split = data.stdlib_bytes()
    assert split.info["bytes"]["train"] >= 2_000_000  # the corpus the issue of scale asks for
    files = data.stdlib_files()
    assert sum(split.info["files"].values()) == len(files)
    # a held-out window never occurs in the training bytes (different files)
    task_val = tasks._eval_windows(split.val["bytes"], 128, 4)
    train = split.train["bytes"].tobytes()
    assert all(w.tobytes() not in train for w in task_val)


def test_mnist1d_rejects_bad_noise_and_sizes(cache):
    with pytest.raises(ValueError, match="not MNIST-1D noise settings"):
        data.mnist1d(200, val_size=10, noise={"noise": 1.0}, cache_dir=cache)
    with pytest.raises(ValueError, match="test_size=0"):
        data.mnist1d(200, val_size=10, test_size=0, cache_dir=cache)


def _abstract(make):
    return nnx.eval_shape(lambda: make(jax.random.key(0)))


@pytest.mark.parametrize("scale", ["small", "large"])
def test_scales_have_the_promised_sizes(scale):
    """CPU scale: >= 100k parameters and >= 2000 steps; GPU: >= 10M (LM >= 25M) parameters."""
    from ksbopt.bench.models import MLP, ResNet1D, TransformerLM

    floor = 100_000 if scale == "small" else 10_000_000
    s = tasks._MNIST1D_HEADLINE_SIZES[scale]
    for bn in (True, False):
        n = _n_params(
            _abstract(
                lambda k, bn=bn: ResNet1D(
                    s["widths"], blocks=s["blocks"], batchnorm=bn, rngs=nnx.Rngs(k)
                )
            )
        )
        assert n >= floor, (scale, "resnet", n)
        n = _n_params(
            _abstract(
                lambda k, bn=bn: MLP(
                    40, s["mlp_width"], s["mlp_depth"], layernorm=bn, rngs=nnx.Rngs(k)
                )
            )
        )
        assert n >= floor, (scale, "mlp", n)
    lm = tasks._LM_LONG[scale]
    n = _n_params(
        _abstract(
            lambda k: TransformerLM(
                d=lm["d"], layers=lm["layers"], heads=lm["heads"], seq_len=lm["seq_len"],
                qk_norm=True, rngs=nnx.Rngs(k),
            )
        )
    )  # fmt: skip
    assert n >= (floor if scale == "small" else 25_000_000), (scale, "lm", n)
    assert lm["seq_len"] >= 128
    for sizes in (s, lm):
        assert sizes["steps"] >= 2000
        assert sizes["eval_every"] <= 0.02 * sizes["steps"]  # evaluation every <= 2% of a run
    if scale == "small":
        assert s["val_size"] >= 4000 and s["test_size"] >= 8000
        # sampling error <= 0.5 points: the ResNets at their lowest accuracy in the full suite
        # (0.75), the MLPs at any accuracy (theirs are 0.65-0.75)
        assert math.sqrt(0.75 * 0.25 / s["test_size"]) <= 0.005
        assert math.sqrt(0.5 * 0.5 / s["mlp_test_size"]) <= 0.005
        assert s["mlp_test_size"] <= s["num_samples"] - int(s["num_samples"] * 0.8)
        assert int(s["num_samples"] * 0.8) - s["val_size"] >= 40_000
    assert tasks._MNIST1D_HEADLINE_SIZES["base"] is tasks._MNIST1D_HEADLINE_SIZES["small"]
    assert tasks._LM_LONG["base"] is tasks._LM_LONG["small"]


# ---- the roster -------------------------------------------------------------------------------

ROSTER = ("sgd+wd", "rmsprop", "adam", "adamw", "lion", "muon", "sf_adamw")


def test_roster_resolves_and_tunes_weight_decay():
    for name in ROSTER:
        spec = registry.get(name)
        assert len(spec.lr_grid) >= 5 and set(spec.tune) <= set(spec.hparams)
    for name, spec in registry.REGISTRY.items():
        if "weight_decay" in spec.hparams and name not in ("sgd", "sgd+retract", "adam+steer_nld"):
            assert "weight_decay" in spec.tune, name
    assert registry.get("rmsprop").hparams["momentum"] == registry.get("sgd+wd").hparams["momentum"]
    assert registry.get("sf_adamw").own_schedule and registry.get("sf_adamw").eval_params
    with pytest.raises(ValueError, match="tune="):
        registry.register("bad", lambda lr, task: optax.sgd(lr), registry.SGD_GRID, tune=("wd",))
    assert "bad" not in registry.REGISTRY


def test_rmsprop_weight_decay_is_decoupled(cache):
    """With a zero gradient RMSProp's own step is 0, so the update is exactly -lr * wd * w."""
    task = build_task("mnist1d_deep_mlp", "tiny", cache)
    params = _params(task)
    tx = registry.make("rmsprop", 0.01, task, weight_decay=0.1)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for u, w in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
        np.testing.assert_allclose(u, -0.01 * 0.1 * w, rtol=1e-6, atol=1e-12)


def test_muon_orthogonalises_hidden_matrices_only(cache):
    from optax.contrib import MuonDimensionNumbers as D

    task = build_task("lm_stdlib_long", "tiny", cache)
    dims = registry._muon_dims(_params(task))
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): d
        for path, d in jax.tree_util.tree_flatten_with_path(
            dims, is_leaf=lambda x: x is None or isinstance(x, D)
        )[0]
    }
    assert flat["head/kernel"] is None and flat["embed/embedding"] is None
    assert flat["blocks/0/attn/query/kernel"] == D(0, (1, 2))
    assert flat["blocks/0/attn/out/kernel"] == D((0, 1), 2)
    assert flat["blocks/0/fc1/kernel"] == D((0,), 1)
    assert flat["blocks/0/ln1/scale"] is None
    conv = registry._muon_dims(_params(build_task("mnist1d_resnet_bn", "tiny", cache)))
    assert conv["s0b0a"]["kernel"] == D((0, 1), 2)  # (width, in, out): a (3 in) x out matrix


def test_schedule_free_is_evaluated_at_its_average(cache):
    task = build_task("mnist1d_deep_mlp_ln", "tiny", cache)
    params = _params(task)
    spec = registry.get("sf_adamw")
    tx = registry.make("sf_adamw", 1e-2, task)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    x = spec.eval_params(state, params)
    inner = state.inner_state
    b1 = float(inner.b1)
    for xi, yi, zi in zip(jax.tree.leaves(x), jax.tree.leaves(params), jax.tree.leaves(inner.z)):
        np.testing.assert_allclose(xi, (yi - (1 - b1) * zi) / b1, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(params)))


# ---- training at the tiny scale ---------------------------------------------------------------


def _main(argv) -> tuple[int, str]:
    rc, _, err = run_cli(argv)
    return rc, err


def _records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


@pytest.mark.parametrize(
    ("suite", "names", "optimizers"),
    [
        ("quick", HEADLINE_TASKS, "adamw"),
        ("gpu", GPU_TASKS[:1], "sgd+wd,rmsprop,lion,muon,sf_adamw"),
        pytest.param("full", HEADLINE_TASKS, ",".join(ROSTER), marks=pytest.mark.slow),
    ],
)
def test_tasks_train_at_the_tiny_scale(suite, names, optimizers, tmp_path, cache, no_network):
    rc, err = _main(
        [
            "--suite", suite, "--experiments", "grid", "--scale", "tiny",
            "--tasks", ",".join(names),
            "--optimizers", optimizers, "--lrs", "0.001", "--seeds", "1", "--steps", "4",
            "--no-progress", "--no-plots", "--out", tmp_path, "--cache-dir", cache,
        ]
    )  # fmt: skip
    assert rc == 0, err
    recs = _records(tmp_path)
    # every pair the suite trains (suites.arms_of decides: the full suite runs a subset of the
    # roster on the byte LM), and only those
    expected = {
        (t, o) for t in names for o in optimizers.split(",") if arms_of(SUITES[suite], t, o)
    }
    assert len(expected) >= len(names)
    assert {(r["config"]["task"], r["config"]["optimizer"]) for r in recs} == expected
    for r in recs:
        assert r["status"] == "ok", (r["config"], r["status"])
        assert r["config"]["scale"] == "tiny" and r["steps_done"] >= 4
        assert math.isfinite(r["final"]["test_metric"])


@pytest.mark.slow
@pytest.mark.parametrize("name", GPU_TASKS)
def test_gpu_tasks_build_at_the_large_scale(name, cache):
    """Everything but the training of a gpu-suite task, on CPU: data, shapes, an abstract loss."""
    task = build_task(name, "large", cache)
    model = _abstract(task.make_model)
    assert _n_params(model) >= (25_000_000 if task.kind == "lm" else 10_000_000)
    arrays = {k: jnp.asarray(v) for k, v in task.arrays.items() if k.startswith("train_")}
    idx = task.sampler(0).next(1)[0]
    assert idx.shape == (task.batch_size,)
    batch = task.batch(arrays, jnp.asarray(idx))
    loss = jax.eval_shape(lambda: task.loss(task.make_model(0), batch))
    assert loss.shape == () and loss.dtype == jnp.float32
    for split, (*_, mask) in task.eval_sets().items():
        assert mask.sum() >= (2000 if task.kind == "lm" else 8000), split


# ---- the runner acts on the registry's hooks --------------------------------------------------


@pytest.mark.parametrize(
    ("name", "feature"), [("nero", "balance_params"), ("rotational", "center_params")]
)
def test_runner_starts_from_the_entrys_prepared_parameters(cache, name, feature):
    """Nero starts from balanced kernels, rotational SGDM from centred ones, as their authors'
    optimizers make them at construction; the others from the initialisation itself."""
    import ksbopt
    from ksbopt.bench.records import RunConfig

    task = build_task("mnist1d_deep_mlp_ln", "tiny", cache)
    r = runner.Runner(Path("unused"), progress=False)
    params = _params(task)
    cfg = RunConfig("grid", task.name, name, 0.01, 0, "tiny")
    got = compiled.prepared(cfg, task, params)
    want = getattr(ksbopt.peers, feature)(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(g, p) for g, p in zip(jax.tree.leaves(got), jax.tree.leaves(params)))
    assert r.full_config(cfg)["prepare_params"].endswith(registry.get(name).prepare_params.__name__)
    plain = RunConfig("grid", task.name, "sgd+wd", 0.01, 0, "tiny")
    assert compiled.prepared(plain, task, params) is params
    assert "prepare_params" not in r.full_config(plain)


def test_schedule_free_runs_without_the_suites_schedule_and_is_evaluated_at_x(cache, tmp_path):
    from ksbopt.bench.records import RunConfig

    task = build_task("mnist1d_deep_mlp_ln", "tiny", cache)
    r = runner.Runner(tmp_path, progress=False)
    sf = RunConfig("grid", task.name, "sf_adamw", 1e-2, 0, "tiny", (), None, "cosine")
    full = r.full_config(sf)
    assert "own" in full["schedule_definition"] and "eval_params" in full
    assert not compiled.scheduled(sf) and compiled.scheduled(
        dataclasses.replace(sf, optimizer="adamw")
    )
    assert compiled.train_key(sf) == compiled.train_key(
        dataclasses.replace(sf, schedule="constant")
    )
    # the evaluation point is the averaged iterate x, not the training iterate y
    params = _params(task)
    tx = registry.make("sf_adamw", 1e-2, task)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    x = compiled.eval_point(sf)(params, state)
    want = registry.get("sf_adamw").eval_params(state, params)
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    rec, _ = r.run(sf)
    assert rec["status"] == "ok" and rec["config"]["schedule"] == "cosine"


def test_tuned_weight_decay_is_injected_one_compilation_serves_every_value(cache, tmp_path):
    """The tuned weight decay lives in the optimizer state (as the learning rate does): runs
    at two weight decays share one compiled step, and each trains at its own decay."""
    from ksbopt.bench.records import RunConfig

    compiled.clear_caches()  # an earlier test may have compiled this step: count from zero
    task = build_task("mnist1d_deep_mlp_ln", "tiny", cache)
    r = runner.Runner(tmp_path, progress=False)
    a = RunConfig("grid", task.name, "sgd+wd", 0.1, 0, "tiny", (("weight_decay", 5e-5),))
    b = dataclasses.replace(a, hparams=(("weight_decay", 0.5),))
    assert compiled.train_key(a) == compiled.train_key(b)
    rec_a, _ = r.run(a)
    rec_b, _ = r.run(b)
    assert rec_a["timing"]["compiled_here"] and not rec_b["timing"]["compiled_here"]
    assert rec_b["config"]["hparams"]["weight_decay"] == 0.5
    # a 10^4 times larger coupled decay shrinks the weights: the decay is the run's own
    assert rec_b["curves"]["param_norm"][-1] < rec_a["curves"]["param_norm"][-1]
    # an untuned hyperparameter (sgd+wd's momentum) is still compiled in
    c = dataclasses.replace(a, hparams=(("momentum", 0.5), ("weight_decay", 5e-5)))
    assert compiled.train_key(c) != compiled.train_key(a)
