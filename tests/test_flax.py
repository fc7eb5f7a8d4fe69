"""Tests of ksbopt.flax: path conventions, loss builders, and training patterns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import ksbopt
import ksbopt.flax as kflax
from ksbopt._src.detection.detect import detect, verify


def ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _batch(n=16, d=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, 3, n)


def _model(make, seed=0):
    """An NNX model built abstractly and filled with numpy values (no initialiser compiles)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = jax.tree_util.keystr(path)
        if "'var'" in name:
            return jnp.ones(x.shape, x.dtype)
        if "'mean'" in name:
            return jnp.zeros(x.shape, x.dtype)
        return jnp.asarray(0.6 * rng.standard_normal(x.shape), x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


class BNMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(5, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.bn(self.fc(x))))


class LinenBNMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x)))
        return nn.Dense(3)(x)


def test_param_paths_nnx_and_linen():
    model = nnx.eval_shape(lambda: BNMLP(nnx.Rngs(0)))
    assert kflax.param_paths(nnx.state(model, nnx.Param)) == [
        "bn/bias",
        "bn/scale",
        "fc/bias",
        "fc/kernel",
        "head/bias",
        "head/kernel",
    ]
    x, _ = _batch()
    variables = jax.eval_shape(lambda: LinenBNMLP().init(jax.random.key(0), x))
    assert kflax.param_paths(variables["params"]) == [
        "BatchNorm_0/bias",
        "BatchNorm_0/scale",
        "Dense_0/bias",
        "Dense_0/kernel",
        "Dense_1/bias",
        "Dense_1/kernel",
    ]
    assert kflax.param_paths(variables)[0] == "batch_stats/BatchNorm_0/mean"


def test_nnx_optimizer_pattern_conserves_charges():
    model = _model(BNMLP)
    model.train()
    batch = _batch()
    loss_fn, params = kflax.nnx_loss(model, lambda m, b: ce(m(b[0]), b[1]))
    mean_before = np.array(model.bn.mean[...])
    syms, report = detect(loss_fn, params, batch, _batch(seed=1))
    # The running averages of the model passed in are untouched by the analysis.
    np.testing.assert_array_equal(np.array(model.bn.mean[...]), mean_before)
    kinds = sorted(s.kind for s in syms)
    assert kinds == ["rescale", "scale", "translation"], str(report)

    tx = optax.chain(optax.sgd(0.1, momentum=0.9), ksbopt.retract(syms))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    q0 = ksbopt.charges(nnx.state(model, nnx.Param), syms)

    @nnx.jit
    def step(model, optimizer, x, y):
        grads = nnx.grad(lambda m: ce(m(x), y))(model)
        optimizer.update(model, grads)

    for _ in range(3):
        step(model, optimizer, *batch)
    q1 = ksbopt.charges(nnx.state(model, nnx.Param), syms)
    for a, b in zip(q0, q1, strict=True):
        # retract restores every charge to float32 rounding (relative 64 eps ~ 1e-5).
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.array(model.fc.kernel[...]), np.asarray(params["fc"]["kernel"]))


def _variables(model, x, seed=0):
    """Linen variables built abstractly and filled with numpy values."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "'var'" in name:
            return jnp.ones(s.shape, s.dtype)
        if "'mean'" in name:
            return jnp.zeros(s.shape, s.dtype)
        return jnp.asarray(0.6 * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


class State(train_state.TrainState):
    batch_stats: dict


def test_linen_train_state_pattern_with_batch_stats():
    model = LinenBNMLP()
    batch = _batch()
    variables = _variables(model, batch[0])
    loss_fn, params = kflax.linen_loss(
        model.apply, variables, lambda f, b: ce(f(b[0], train=True), b[1])
    )
    syms, report = detect(loss_fn, params, batch, _batch(seed=1))
    assert sorted(s.kind for s in syms) == ["rescale", "scale", "translation"], str(report)
    scale = next(c for c in report.checks if c.symmetry.kind == "scale")
    assert scale.paths == ("Dense_0/bias", "Dense_0/kernel") and scale.n_groups == 8

    state = State.create(
        apply_fn=model.apply,
        params=params,
        tx=optax.chain(optax.sgd(0.1), ksbopt.retract(syms)),
        batch_stats=variables["batch_stats"],
    )

    @jax.jit
    def step(state, x, y):
        def loss(p):
            logits, upd = state.apply_fn(
                {"params": p, "batch_stats": state.batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return ce(logits, y), upd

        grads, upd = jax.grad(loss, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads, batch_stats=upd["batch_stats"])

    q0 = ksbopt.charges(state.params, syms)
    for _ in range(3):
        state = step(state, *batch)
    q1 = ksbopt.charges(state.params, syms)
    for a, b in zip(q0, q1, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
    assert not np.allclose(state.batch_stats["BatchNorm_0"]["mean"], 0.0)


def test_linen_loss_without_mutable_state_and_verify():
    model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(3)])
    x, y = _batch()
    variables = _variables(model, x, seed=1)
    loss_fn, params = kflax.linen_loss(
        model.apply, variables, lambda f, b: ce(f(b[0]), b[1]), mutable=False
    )
    rep = verify(
        [
            ksbopt.Rescale(["layers_0/kernel", "layers_0/bias"], "layers_2/kernel"),
            ksbopt.Scale("layers_2/kernel"),
        ],
        loss_fn,
        params,
        (x, y),
    )
    assert [c.holds for c in rep.checks] == [True, False]


def test_bad_inputs():
    with pytest.raises(TypeError, match=r"nnx\.Module"):
        kflax.nnx_loss(LinenBNMLP(), lambda m, b: 0.0)
    model = _model(BNMLP)
    with pytest.raises(TypeError, match="loss="):
        kflax.nnx_loss(model, "ce")
    with pytest.raises(ValueError, match="no 'params' collection"):
        kflax.linen_loss(LinenBNMLP().apply, {"batch_stats": {}}, lambda f, b: 0.0)
    with pytest.raises(TypeError, match="apply_fn"):
        kflax.linen_loss(None, {"params": {}}, lambda f, b: 0.0)
    with pytest.raises(TypeError, match="variables"):
        kflax.linen_loss(LinenBNMLP().apply, [1, 2], lambda f, b: 0.0)
    with pytest.raises(TypeError, match="loss="):
        kflax.linen_loss(LinenBNMLP().apply, {"params": {}}, None)


def test_nnx_loss_accepts_numpy_state_and_other_filters():
    model = _model(BNMLP)
    loss_fn, params = kflax.nnx_loss(
        model, lambda m, b: ce(m(b[0]), b[1]), wrt=nnx.All(nnx.Param, nnx.PathContains("head"))
    )
    assert kflax.param_paths(params) == ["head/bias", "head/kernel"]
    value = jax.jit(loss_fn)(params, _batch())
    assert value.shape == () and np.isfinite(value)
    assert jnp.issubdtype(value.dtype, jnp.floating)
