"""ksbopt.profile: the per-step ratios against the monitor's exact decomposition (float64), and
the classification of rules whose effect on each symmetry is known from the theory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ksbopt
from ksbopt._src.diagnostics.symmetry_profile import classify, step_ratios, tolerance


def _net(dtype=jnp.float64):
    k = jax.random.split(jax.random.key(1), 4)
    params = {
        "w1": jax.random.normal(k[0], (6, 5), dtype),
        "w2": jax.random.normal(k[1], (5, 4), dtype),
        "w3": jax.random.normal(k[2], (4, 3), dtype),
    }
    x = jax.random.normal(k[3], (32, 6), dtype)
    y = jnp.arange(32) % 3

    def loss(p):
        h = x @ p["w1"]
        h = h / jnp.linalg.norm(h, axis=0, keepdims=True)  # columns of w1: scale-invariant
        h = jax.nn.relu(h @ p["w2"])  # w2 -> w3: rescale per hidden unit
        return optax.softmax_cross_entropy_with_integer_labels(h @ p["w3"], y).mean()

    syms = [
        ksbopt.Scale("w1", axis=-1),
        ksbopt.Rescale(incoming="w2", outgoing="w3"),
        ksbopt.Translation("w3", axis=-1),
    ]
    return params, loss, syms


def test_ratios_match_the_monitor_decomposition_and_the_charges(x64):
    params, loss, syms = _net()
    tx = optax.adam(0.05)
    g = jax.grad(loss)(params)
    u, _ = tx.update(g, tx.init(params), params)
    r = np.asarray(step_ratios(syms, params, g, u))
    mon = ksbopt.monitor(tx, syms)
    _, st = mon.update(g, mon.init(params), params)
    d = st.diagnostics
    w1, u1 = params["w1"], u["w1"]
    size = jnp.linalg.norm(w1, axis=0) * jnp.linalg.norm(u1, axis=0)  # |xi| |u| per column
    # Float64 sums of a few dozen terms: agreement to 1e-12 relative is rounding.
    np.testing.assert_allclose(r[0, 0], jnp.max(jnp.abs(d.first_order[0]) / size), rtol=1e-12)
    np.testing.assert_allclose(r[0, 1], jnp.max(jnp.abs(d.second_order[0]) / size), rtol=1e-12)
    new = optax.apply_updates(params, u)
    dq = ksbopt.charges(new, syms[0])[0] - ksbopt.charges(params, syms[0])[0]
    np.testing.assert_allclose(r[0, 2], jnp.max(jnp.abs(dq) / size), rtol=1e-9)
    np.testing.assert_allclose(r[0, 3], jnp.max(jnp.abs(d.violation[0])), atol=1e-12)
    np.testing.assert_allclose(
        r[0, 4], jnp.max(jnp.linalg.norm(w1, axis=0) / jnp.linalg.norm(u1, axis=0)), rtol=1e-12
    )


@pytest.mark.parametrize(
    "name, make, steps, expected",
    [
        # Euclidean step along -g: orthogonal to every generator; |u|^2 moves scale and
        # rescale charges (second order), translation's Q(u) is 0 (exact).
        ("sgd", lambda: optax.sgd(0.3), 1, ("second order", "second order", "exact")),
        # Momentum: past gradients are not orthogonal to the current w (first order), but the
        # translation generator is constant, so its charge is kept.
        ("momentum", lambda: optax.sgd(0.3, momentum=0.9), 4, ("first order",) * 2 + ("exact",)),
        # Weight decay moves every charge at first order.
        (
            "sgd+wd",
            lambda: optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.3)),
            1,
            ("first order",) * 3,
        ),
        # A diagonal metric breaks all three at first order.
        ("adam", lambda: optax.adam(0.05), 3, ("first order",) * 3),
    ],
)
def test_known_rules_are_classified_as_the_theory_says(x64, name, make, steps, expected):
    params, loss, syms = _net()
    prof = ksbopt.profile(make(), syms, params, loss, steps=steps)
    assert prof.classes == expected, f"{name}:\n{prof}"
    assert prof.ratios.shape == (steps, 3, 7)
    assert prof.tol == tolerance(np.float64)


def test_retract_and_project_keep_what_they_promise(x64):
    params, loss, syms = _net()
    held = ksbopt.profile(
        optax.chain(optax.adam(0.05), ksbopt.retract(syms[0])), syms, params, loss, steps=3
    )
    assert held.classes[0] == "exact", str(held)
    projected = ksbopt.profile(
        optax.chain(optax.adam(0.05), ksbopt.project(syms[0])), syms, params, loss, steps=3
    )
    assert projected.classes[0] == "second order", str(projected)


def test_a_gradient_tree_measures_one_step_from_the_given_state(x64):
    params, loss, syms = _net()
    g = jax.grad(loss)(params)
    tx = optax.sgd(0.3, momentum=0.9)
    fresh = ksbopt.profile(tx, syms, params, g)
    assert fresh.ratios.shape == (1, 3, 7) and fresh.classes[0] == "second order"
    # A momentum buffer from elsewhere makes the same gradient step first-order breaking.
    state = tx.update(g, tx.init(params))[1]
    moved = optax.apply_updates(params, jax.tree.map(lambda x: 0.3 * x, g))
    g2 = jax.grad(loss)(moved)  # orthogonal to the moved w; the buffer's g is not
    assert ksbopt.profile(tx, syms, moved, g2, state=state).classes[0] == "first order"


def test_classification_floors(x64):
    tol32 = tolerance(np.float32)
    assert tol32 == pytest.approx(np.sqrt(np.finfo(np.float32).eps))
    assert classify(0.5, 0.9) == "exact"
    assert classify(0.5, 3.0) == "second order"
    assert classify(2.0, 3.0) == "first order"
    assert classify(float("nan"), float("nan")) == "exact"
    # The floor is per group: group 0 has a healthy gradient and a first-order step, group 1
    # a gradient that is mostly rounding (its violation lifts only its own floor).
    params = {"w": jnp.array([[3.0, 1.0], [4.0, 1e-3]])}
    grads = {"w": jnp.array([[0.8, 0.3], [-0.6, 0.3]])}  # column 1: <w, g> / |w||g| ~ 0.7
    updates = {"w": jnp.array([[0.1, 0.0], [0.1, 0.1]])}  # column 0: <w, u> != 0
    r = np.asarray(step_ratios(ksbopt.Scale("w", axis=-1), params, grads, updates))[0]
    assert r[3] > 0.5  # the largest gradient violation, column 1's
    assert r[5] > 1 and classify(r[5], r[6]) == "first order"  # column 0 decides
    # A step much smaller than the weights: its rounding (eps |w| / |u|) lifts the floor.
    tiny = {"w": jnp.array([[0.0, 0.0], [0.0, 1e-12]])}
    r = np.asarray(step_ratios(ksbopt.Scale("w", axis=-1), params, grads, tiny))[0]
    assert r[4] > 1e9 and classify(r[5], r[6]) == "exact"


def test_bad_input():
    params, loss, syms = _net(jnp.float32)
    with pytest.raises(TypeError, match="not an optax transformation"):
        ksbopt.profile(lambda lr: optax.sgd(lr), syms, params, loss)
    with pytest.raises(ValueError, match="steps=0"):
        ksbopt.profile(optax.sgd(0.1), syms, params, loss, steps=0)
