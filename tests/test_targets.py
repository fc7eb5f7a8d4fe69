"""Tests of ksbopt.targets (constant, schedule, balanced) and of steering towards them."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import support

import ksbopt
from ksbopt import targets
from ksbopt._src.targets.prescribed import as_target

# float64, closed-form moves (and Newton to 64 eps for Linear): charges land on their goals
# to ~1e-15 relative; 1e-12 leaves a margin of ~1e3.
TOL = 1e-12


def _bound(kind: str):
    params = {
        "a": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
        "b": {"kernel": jnp.ones((4, 2))},
    }
    sym = {
        "scale": ksbopt.Scale("a/*"),
        "rescale": ksbopt.Rescale("a/*", "b/kernel"),
        "translation": ksbopt.Translation("b/kernel"),
        "linear": ksbopt.Linear("a/kernel", "b/kernel"),
    }[kind]
    return sym.bind(params)


def test_constant_initial_returns_the_charge_at_init():
    b = _bound("scale")
    q, q0 = jnp.arange(4.0), jnp.ones(4)
    np.testing.assert_array_equal(targets.constant("initial").charge_for(b, q, q0, 0), q0)
    np.testing.assert_array_equal(targets.constant().charge_for(b, q, q0, 0), q0)


def test_constant_number_broadcasts_and_means_v_identity_for_linear():
    b = _bound("scale")
    np.testing.assert_array_equal(
        targets.constant(2.0).charge_for(b, jnp.zeros(4), None, 0), np.full(4, 2.0)
    )
    per_group = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(
        targets.constant(per_group).charge_for(b, jnp.zeros(4), None, 0), per_group
    )
    lin = _bound("linear")
    c = targets.constant(0.5).charge_for(lin, jnp.zeros((1, 4, 4)), None, 0)
    np.testing.assert_array_equal(c, 0.5 * np.eye(4)[None])


def test_schedule_and_balanced_values():
    b = _bound("rescale")
    t = targets.schedule(lambda step: 1.0 + step)
    np.testing.assert_array_equal(t.charge_for(b, jnp.zeros(4), None, jnp.asarray(3)), 4.0)
    np.testing.assert_array_equal(targets.balanced().charge_for(b, jnp.ones(4), None, 0), 0.0)


def test_as_target_accepts_targets_numbers_strings_and_callables():
    t = targets.balanced()
    assert as_target(t) is t
    assert isinstance(as_target("initial"), targets.constant)
    assert isinstance(as_target(1.5), targets.constant)
    assert isinstance(as_target(np.ones(3)), targets.constant)
    assert isinstance(as_target(lambda step: 1.0), targets.schedule)
    assert isinstance(as_target(optax.linear_schedule(1.0, 2.0, 10)), targets.schedule)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (
            lambda: targets.constant("final"),
            ValueError,
            r"value='final' is not a charge; write a number, an array or 'initial'",
        ),
        (lambda: targets.schedule(3.0), TypeError, r"fn=3\.0 must be callable"),
        (
            lambda: as_target(object()),
            TypeError,
            r"target=<object object at .*> is not a charge target; write "
            r"ksbopt\.targets\.constant\(v\)",
        ),
        (lambda: ksbopt.steer(ksbopt.Scale("w"), {"a": 1}), TypeError, r"is not a charge target"),
    ],
    ids=["constant_bad_string", "schedule_not_callable", "as_target_object", "steer_dict"],
)
def test_bad_targets_fail_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("kind", ["scale", "translation"])
def test_balanced_applies_only_to_rescale_and_linear(kind):
    with pytest.raises(
        ValueError, match=r"targets\.balanced\(\) applies to Rescale and Linear symmetries"
    ):
        targets.balanced().check(_bound(kind))
    targets.balanced().check(_bound("rescale"))
    targets.balanced().check(_bound("linear"))


@pytest.mark.parametrize("value", [0.0, -1.0, [1.0, 0.0, 1.0, 1.0]])
def test_non_positive_scale_charge_is_rejected(value):
    with pytest.raises(ValueError, match=rf"got value={re.escape(repr(value))}.*Give a positive"):
        targets.constant(value).check(_bound("scale"))
    # The same numbers are fine charges for the other kinds.
    targets.constant(value if np.ndim(value) == 0 else 0.0).check(_bound("rescale"))


def test_steer_init_checks_targets_under_jit():
    # optax users often jit tx.init: the target check must not touch traced values.
    params = {"w": jnp.ones((3, 2))}
    state = jax.jit(ksbopt.steer(ksbopt.Scale("w"), 2.0).init)(params)
    np.testing.assert_array_equal(state.initial[0], [1.5, 1.5])


# --------------------------------------------------------------------------- steering


def _linear_schedule(start, stop, steps):
    return lambda count: start + (stop - start) * jnp.minimum(count, steps) / steps


STEERED = [
    ("scale_layernorm", targets.schedule(optax.linear_schedule(2.0, 5.0, 3))),
    ("translation_head", targets.schedule(_linear_schedule(-1.0, 1.0, 4))),
    ("linear_attention", targets.schedule(optax.linear_schedule(0.2, 0.8, 3))),
    ("rescale_mlp", lambda count: 0.25 * count),  # a plain callable is a schedule
    ("rescale_mlp", targets.balanced()),
    ("linear_attention", targets.balanced()),
]


def _goal(target, step, q):
    """The charge the target asks for at ``step`` (count before the update)."""
    if isinstance(target, targets.balanced):
        return np.zeros_like(q)
    fn = target.fn if isinstance(target, targets.schedule) else target
    # SteerState.count is int32, so an optax schedule computes in float32 even under x64.
    v = float(fn(jnp.asarray(step, jnp.int32)))
    return v * np.eye(q.shape[-1])[None] if q.ndim == 3 else np.full_like(q, v)


@pytest.mark.parametrize(
    ("name", "target"), STEERED, ids=[f"{n}-{type(t).__name__}" for n, t in STEERED]
)
def test_steer_at_rate_one_lands_on_the_target_every_step(name, target, x64):
    case = support.CASES_BY_NAME[name]
    params = case.params()
    steer = ksbopt.steer(list(case.symmetries), target)
    steps = 4

    @support.jit
    def run(params):
        def step(carry, _):
            p, s = carry
            u = jax.tree.map(lambda g: -0.05 * g, jax.grad(case.loss)(p))
            u, s = steer.update(u, s, p)
            p = optax.apply_updates(p, u)
            return (p, s), (case.charges(p), case.loss(p), s.count)

        return jax.lax.scan(step, (params, steer.init(params)), None, length=steps)[1]

    charges, losses, counts = run(params)
    np.testing.assert_array_equal(counts, np.arange(1, steps + 1))
    for k in range(steps):
        for q in charges:
            want = _goal(target, k, np.asarray(q[k]))
            scale = max(np.max(np.abs(want)), np.max(np.abs(np.asarray(q[0]))), 1.0)
            assert np.max(np.abs(np.asarray(q[k]) - want)) <= TOL * scale, (k, q[k], want)
    support.assert_finite(losses)


def test_inject_hyperparams_schedules_target_and_rate(x64):
    case = support.CASES_BY_NAME["scale_batchnorm"]
    params = case.params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    sym = list(case.symmetries)
    q0 = np.asarray(case.charges(params)[0])

    # 1. Numeric target and rate, changed by hand mid-run (as a user's schedule would).
    tx = optax.inject_hyperparams(ksbopt.steer)(sym, target=2.0, rate=0.5)
    update = support.jit(tx.update)
    state = tx.init(params)
    assert set(state.hyperparams) == {"target", "rate"}
    p, q = params, q0
    for k, (target, rate) in enumerate([(2.0, 0.5), (2.0, 0.5), (3.0, 0.25), (3.0, 1.0)]):
        state.hyperparams["target"] = jnp.asarray(target)
        state.hyperparams["rate"] = jnp.asarray(rate)
        u, state = update(zeros, state, p)
        p = optax.apply_updates(p, u)
        want = q + rate * (target - q)
        q = np.asarray(case.charges(p)[0])
        np.testing.assert_allclose(q, want, rtol=TOL, err_msg=f"step {k}")
    np.testing.assert_allclose(q, 3.0, rtol=TOL)

    # 2. rate given as a schedule: the distance shrinks by prod_j (1 - rate_j).
    sched = optax.linear_schedule(0.2, 0.8, 3)
    tx = optax.inject_hyperparams(ksbopt.steer)(sym, target=1.0, rate=sched)
    update = support.jit(tx.update)
    state, p, factor = tx.init(params), params, 1.0
    for k in range(4):
        u, state = update(zeros, state, p)
        p = optax.apply_updates(p, u)
        factor *= 1 - float(sched(jnp.asarray(k, jnp.int32)))  # inject's count is int32
        q = np.asarray(case.charges(p)[0])
        np.testing.assert_allclose(q - 1.0, factor * (q0 - 1.0), rtol=1e-10, atol=TOL)
