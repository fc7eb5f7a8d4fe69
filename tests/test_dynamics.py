"""ksbopt.dynamics: the descriptions of the learning rule a monitored optimizer follows.

What a description promises, checked here: its numbers are validated when it is made, it
is checked against the wrapped optimizer's state, and its metric P is the one optax divides
by, so that the monitor's metric-charge identities use optax's own step. The latter is a
float64 identity: optax's update equals -eta m_hat / P (Adam) or -eta g / P (RMSProp) to
rounding (a few ulps: one division and one square root apart, 1e-14 relative).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import support

from ksbopt import dynamics as D


def _params():
    """Float64 under the x64 fixture, float32 otherwise."""
    return {"w": jnp.arange(1.0, 7.0).reshape(3, 2), "b": jnp.array([0.5, -1.5])}


RTOL_F64 = 1e-14  # a division and a square root apart: a few float64 ulps


def _grads(k: int):
    return support.random_like(_params(), seed=10 + k)


def _steps(tx, n: int):
    """n updates of ``tx`` at fixed params; the last updates and state."""
    params = _params()
    state = tx.init(params)
    for k in range(n):
        u, state = tx.update(_grads(k), state, params)
    return u, state


# --------------------------------------------------------------------------- descriptions


def test_factories_fill_the_record():
    d = D.sgd(0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    assert (d.kind, d.learning_rate, d.momentum, d.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
    assert d.nesterov and not d.decoupled and not d.adaptive
    assert d.has_momentum and d.has_weight_decay
    r = D.rmsprop(1e-3, decay=0.95, eps=1e-6, eps_in_sqrt=False, bias_correction=True)
    assert (r.kind, r.decay, r.eps, r.eps_in_sqrt, r.bias_correction) == (
        "rmsprop",
        0.95,
        1e-6,
        False,
        True,
    )
    assert r.adaptive and not r.has_momentum and r.decoupled
    a = D.adam(1e-3, b1=0.8, b2=0.99, eps=1e-7, eps_root=1e-9, weight_decay=1e-4)
    assert (a.kind, a.momentum, a.decay, a.eps, a.eps_root) == ("adam", 0.8, 0.99, 1e-7, 1e-9)
    assert a.adaptive and a.bias_correction and a.decoupled
    assert not D.sgd(0.1).has_momentum and not D.sgd(0.1).has_weight_decay


def test_descriptions_are_hashable_values():
    """Frozen and hashable (the monitor keeps them as static configuration)."""
    assert D.adam(1e-3) == D.adam(1e-3) and hash(D.adam(1e-3)) == hash(D.adam(1e-3))
    assert D.adam(1e-3) != D.adam(2e-3)
    with pytest.raises(AttributeError):
        D.sgd(0.1).momentum = 0.5


def test_learning_rate_at_a_step():
    assert D.sgd(0.1).learning_rate_at(jnp.int32(7)) == 0.1
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    assert float(D.sgd(schedule).learning_rate_at(jnp.int32(5))) == pytest.approx(0.05)
    assert D.sgd(None).learning_rate_at(jnp.int32(5)) is None


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: D.Dynamics("lion"), ValueError, r"kind='lion' is not a known dynamics kind"),
        (lambda: D.sgd("0.1"), TypeError, r"learning_rate='0.1' \(type str\) is neither"),
        (lambda: D.sgd(-0.1), ValueError, r"learning_rate=-0.1 must be >= 0"),
        (lambda: D.sgd(0.1, momentum=1.0), ValueError, r"momentum=1.0 must be in \[0, 1\)"),
        (
            lambda: D.sgd(0.1, momentum="x"),
            TypeError,
            r"sgd: momentum='x' \(type str\) must be a number",
        ),
        (lambda: D.adam(0.1, b1=-0.1), ValueError, r"b1=-0.1 must be in \[0, 1\)"),
        (lambda: D.adam(0.1, b2=1.0), ValueError, r"b2=1.0 must be in \[0, 1\)"),
        (lambda: D.rmsprop(0.1, decay=1.5), ValueError, r"decay=1.5 must be in \[0, 1\)"),
        (lambda: D.sgd(0.1, weight_decay=-1.0), ValueError, r"weight_decay=-1.0 must be >= 0"),
        (lambda: D.adam(0.1, eps=-1e-8), ValueError, r"eps=-1e-08 must be >= 0"),
        (
            lambda: D.adam(0.1, eps_root=None),
            TypeError,
            r"eps_root=None \(type NoneType\) must be a number",
        ),
        (lambda: D.sgd(0.1, decoupled=1), TypeError, r"decoupled=1 must be True or False"),
        (
            lambda: D.Dynamics("adam", 0.1, nesterov=True),
            ValueError,
            r"nesterov=True is only described for sgd, not adam",
        ),
        (lambda: D.sgd(True), TypeError, r"learning_rate=True \(type bool\) is neither"),
    ],
)
def test_bad_numbers_fail_when_the_description_is_made(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_as_dynamics_takes_descriptions_only():
    from ksbopt._src.diagnostics.dynamics import as_dynamics

    assert as_dynamics(None) is None
    d = D.adam(1e-3)
    assert as_dynamics(d) is d
    with pytest.raises(TypeError, match=r"'adam' is a string.*ksbopt.dynamics.adam\("):
        as_dynamics("adam")
    with pytest.raises(TypeError, match=r"'lion' is a string.*ksbopt.dynamics.sgd\(\.\.\.\)"):
        as_dynamics("lion")
    with pytest.raises(TypeError, match=r"dynamics=3 \(type int\) is not a dynamics"):
        as_dynamics(3)


# --------------------------------------------------------------------------- state checks


@pytest.mark.parametrize(
    ("dyn", "tx"),
    [
        (D.sgd(0.1), optax.sgd(0.1)),
        (D.sgd(0.1, momentum=0.9), optax.sgd(0.1, momentum=0.9)),
        (D.sgd(0.1, 0.9, 1e-3), optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, 0.9))),
        (D.rmsprop(0.1), optax.rmsprop(0.1)),
        (D.adam(0.1), optax.adam(0.1)),
        (D.adam(0.1, weight_decay=1e-2), optax.adamw(0.1, weight_decay=1e-2)),
    ],
    ids=["sgd", "heavy_ball", "coupled_decay", "rmsprop", "adam", "adamw"],
)
def test_matching_states_pass(dyn, tx):
    dyn.check_state(tx.init(_params()), _params())


@pytest.mark.parametrize(
    ("dyn", "tx", "match"),
    [
        (D.sgd(0.1), optax.adam(0.1), "keeps a second moment 'nu', so it is adaptive"),
        (D.sgd(0.1, 0.9), optax.sgd(0.1), "momentum=0.9 needs exactly one momentum buffer"),
        (D.rmsprop(0.1), optax.sgd(0.1), "rmsprop reads one second moment 'nu'"),
        (D.rmsprop(0.1), optax.adam(0.1), "keeps a first moment 'mu' as Adam does"),
        (D.adam(0.1), optax.rmsprop(0.1), "adam reads the moments 'mu' and 'nu'"),
        (D.adam(0.1), optax.sgd(0.1, momentum=0.9), "adam reads the moments 'mu' and 'nu'"),
    ],
)
def test_mismatched_states_say_which_description_fits(dyn, tx, match):
    with pytest.raises(ValueError, match=match) as info:
        dyn.check_state(tx.init(_params()), _params(), what="my_tx")
    assert "does not match the wrapped optimizer my_tx" in str(info.value)
    assert "buffers found in its state" in str(info.value)


def test_buffers_must_be_shaped_like_the_parameters():
    other = {"w": jnp.ones((3, 2))}  # one leaf fewer than the parameters
    state = optax.sgd(0.1, momentum=0.9).init(other)
    with pytest.raises(ValueError, match="its buffer 'trace' is not shaped like the parameters"):
        D.sgd(0.1, momentum=0.9).check_state(state, _params())


# --------------------------------------------------------------------------- the metric


def test_adam_metric_is_the_one_optax_divides_by(x64):
    """u = -eta m_hat / P with m_hat = mu / (1 - b1^t) and P the description's metric of nu,
    for several steps (the bias corrections change with t)."""
    eta, b1, b2, eps, eps_root = 0.1, 0.8, 0.95, 1e-3, 1e-4
    dyn = D.adam(eta, b1, b2, eps, eps_root)
    tx = optax.adam(eta, b1, b2, eps, eps_root)
    for n in (1, 2, 5):
        u, state = _steps(tx, n)
        adam = state[0]
        t = int(dyn.adam_count(state))
        assert t == n
        metric = dyn.preconditioner(state)
        m_hat = jax.tree.map(lambda m, t=t: m / (1 - b1**t), adam.mu)
        want = jax.tree.map(lambda m, v, p=metric: -eta * m / p(v), m_hat, adam.nu)
        support.assert_close(u, want, rtol=RTOL_F64)


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_rmsprop_metric_is_the_one_optax_divides_by(x64, eps_in_sqrt, bias_correction):
    """u = -eta g / P with P = sqrt(nu_hat + eps) or sqrt(nu_hat) + eps, nu_hat bias-corrected
    with optax's count when ``bias_correction``."""
    eta, decay, eps = 0.1, 0.9, 1e-3
    dyn = D.rmsprop(eta, decay, eps, eps_in_sqrt=eps_in_sqrt, bias_correction=bias_correction)
    tx = optax.rmsprop(eta, decay, eps, eps_in_sqrt=eps_in_sqrt, bias_correction=bias_correction)
    for n in (1, 3):
        u, state = _steps(tx, n)
        nu = optax.tree.get(state, "nu")
        metric = dyn.preconditioner(state)
        want = jax.tree.map(lambda g, v, p=metric: -eta * g / p(v), _grads(n - 1), nu)
        support.assert_close(u, want, rtol=RTOL_F64)


def test_metric_before_the_first_step_is_finite(x64):
    """At init (count 0) the bias correction 1 - b2^0 is 0: the metric leaves nu as it is
    instead of dividing by zero."""
    dyn = D.adam(0.1, eps=1e-8)
    state = optax.adam(0.1).init(_params())
    p = jax.tree.map(dyn.preconditioner(state), optax.tree.get(state, "nu"))
    support.assert_finite(p)
    np.testing.assert_array_equal(p["w"], np.full((3, 2), 1e-8))
