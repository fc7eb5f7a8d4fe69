"""Tests of ksbopt.teleport: orbit moves chosen by an objective, with state transport."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import support

import ksbopt
from ksbopt._src.transforms.teleport import TeleportState, teleport


def _grad_sq(case, params):
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(jax.grad(case.loss)(params)))


def _sharpness(case, params, rho):
    g = jax.grad(case.loss)(params)
    n = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(g)))
    return case.loss(jax.tree.map(lambda p, x: p + rho * x / n, params, g)) - case.loss(params)


def _move(case, objective, **kw):
    """One teleport (base step zero): the params after it and the state."""
    tx = teleport(
        optax.set_to_zero(), list(case.symmetries), objective=objective, value_fn=case.loss, **kw
    )
    params = case.params()
    u, state = support.jit(tx.update)(jax.grad(case.loss)(params), tx.init(params), params)
    return params, optax.apply_updates(params, u), state


# one per kind of group element (diagonal log-scale, GL(k) through expm), and an overlap of
# a rescale with a translation on the same head rows
MOVE_CASES = ["rescale_mlp", "scale_batchnorm", "linear_deep", "relu_softmax"]


@pytest.mark.parametrize("name", MOVE_CASES)
def test_move_keeps_the_loss_and_raises_the_gradient_norm(x64, name):
    case = support.CASES_BY_NAME[name]
    before, after, state = _move(case, "grad_norm")
    assert isinstance(state, TeleportState)
    # The loss is invariant along the orbit: 1e-10 relative in float64 (measured ~1e-15).
    support.assert_rel_close(case.loss(after), case.loss(before), 1e-10, "loss")
    j0, j1 = float(_grad_sq(case, before)), float(_grad_sq(case, after))
    assert j1 > j0 * (1 + 1e-3), (j0, j1)
    # the state reports the gain (float32)
    np.testing.assert_allclose(float(state.objective_gain), j1 - j0, rtol=1e-5)
    assert support.rel_err(after, before) > 1e-3


def test_sharpness_objective_lowers_the_sharpness_proxy(x64):
    case = support.CASES_BY_NAME["linear_deep"]
    before, after, state = _move(case, "sharpness", rho=0.1)
    support.assert_rel_close(case.loss(after), case.loss(before), 1e-10, "loss")
    s0, s1 = float(_sharpness(case, before, 0.1)), float(_sharpness(case, after, 0.1))
    assert s1 < s0 - 1e-6, (s0, s1)
    np.testing.assert_allclose(float(state.objective_gain), s0 - s1, rtol=1e-4)


def _lookahead(case, params, lr):
    """The loss after one plain gradient step of length lr."""
    g = jax.grad(case.loss)(params)
    return case.loss(jax.tree.map(lambda p, x: p - lr * x, params, g))


def test_lookahead_objective_lowers_the_loss_after_one_step(x64):
    case = support.CASES_BY_NAME["linear_deep"]
    before, after, state = _move(case, "lookahead", rho=0.05)
    support.assert_rel_close(case.loss(after), case.loss(before), 1e-10, "loss")
    l0, l1 = float(_lookahead(case, before, 0.05)), float(_lookahead(case, after, 0.05))
    assert l1 < l0 - 1e-6, (l0, l1)
    # the gain is J(after) - J(before) with J = -L(theta - rho g), reported in float32
    np.testing.assert_allclose(float(state.objective_gain), l0 - l1, rtol=1e-4)


def test_lookahead_keeps_a_deep_linear_network_stable_where_grad_norm_diverges():
    """SGD on a depth-4 linear teacher, teleported every 10 steps along its GL orbits: to the
    largest gradient norm it leaves the stable region and diverges; to the best one-step
    descent of its own learning rate it keeps training (the loss falls)."""
    dims = [8, 8, 8, 8, 4]
    keys = jax.random.split(jax.random.key(0), 6)
    params = {
        f"w{i}": jax.random.normal(keys[i], (dims[i], dims[i + 1])) / jnp.sqrt(dims[i])
        for i in range(4)
    }
    x = jax.random.normal(keys[4], (64, dims[0]))
    y = x @ jax.random.normal(keys[5], (dims[0], dims[-1])) / jnp.sqrt(dims[0])

    def loss(p):
        h = x
        for i in range(4):
            h = h @ p[f"w{i}"]
        return jnp.mean(jnp.square(h - y))

    syms = [ksbopt.Linear(f"w{i}", f"w{i + 1}") for i in range(3)]
    lr = 0.05

    def train(objective):
        tx = teleport(optax.sgd(lr, momentum=0.9), syms, every=10, objective=objective, rho=lr)
        p, state = params, tx.init(params)
        step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p, value_fn=loss))
        for _ in range(60):
            u, state = step(p, state)
            p = optax.apply_updates(p, u)
        return float(loss(p))

    start = float(loss(params))
    steepest, lookahead = train("grad_norm"), train("lookahead")
    assert not np.isfinite(steepest) or steepest > start, (start, steepest)
    assert lookahead < 0.5 * start, (start, lookahead)


def test_callable_objective(x64):
    case = support.CASES_BY_NAME["rescale_mlp"]

    def neg_weight_norm(loss, params):  # maximise -|w|^2: balance the layers
        return -sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(params))

    before, after, _ = _move(case, neg_weight_norm, steps=20)

    def norm(p):
        return float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(p)))

    assert norm(after) < norm(before)
    support.assert_rel_close(case.loss(after), case.loss(before), 1e-10, "loss")


# ------------------------------------------------------ continuing after a move: state transport


def _hand_transport(case, tree, s, power: int):
    """THEORY.md section 6 written out per case: m -> m / a (scale), (m_in / a, m_out a)
    (rescale), G_A -> G_A G^-T, G_B -> G^T G_B (linear); power 2: the diagonal factors squared."""
    t = jax.tree.map(lambda x: x, tree)
    sym = case.symmetries[0]
    if sym.kind == "scale":  # dense/kernel[:, j], dense/bias[j]
        a = jnp.exp(s[0]) ** power
        t["dense"] = {"kernel": tree["dense"]["kernel"] / a, "bias": tree["dense"]["bias"] / a}
    elif sym.kind == "rescale":  # Dense_0 kernel[:, j], bias[j] in; Dense_1 kernel[j, :] out
        a = jnp.exp(s[0]) ** power
        t["Dense_0"] = {
            "kernel": tree["Dense_0"]["kernel"] / a,
            "bias": tree["Dense_0"]["bias"] / a,
        }
        t["Dense_1"] = {**tree["Dense_1"], "kernel": tree["Dense_1"]["kernel"] * a[:, None]}
    else:  # linear: A (with bias) -> A G, B -> G^-1 B
        g = jax.scipy.linalg.expm(s[0][0])
        g_inv_t = jnp.linalg.inv(g).T
        t["A"] = {"kernel": tree["A"]["kernel"] @ g_inv_t, "bias": tree["A"]["bias"] @ g_inv_t}
        t["B"] = {"kernel": g.T @ tree["B"]["kernel"]}
    return t


def _hand_act(case, params, s):
    """psi(theta, a) written out per case."""
    p = jax.tree.map(lambda x: x, params)
    sym = case.symmetries[0]
    if sym.kind in ("scale", "rescale"):
        return _hand_transport(case, params, tuple(-x for x in s), 1)
    g = jax.scipy.linalg.expm(s[0][0])
    p["A"] = {"kernel": params["A"]["kernel"] @ g, "bias": params["A"]["bias"] @ g}
    p["B"] = {"kernel": jnp.linalg.solve(g, params["B"]["kernel"])}
    return p


CONTINUE_CASES = [
    ("scale_batchnorm", "sgd"),
    ("linear_deep", "sgd"),
    ("rescale_mlp", "adam"),
]


@pytest.mark.parametrize(
    ("name", "base"), CONTINUE_CASES, ids=[f"{n}-{b}" for n, b in CONTINUE_CASES]
)
def test_training_continues_as_in_the_transformed_coordinates(x64, name, base):
    """Teleport every 3 steps around SGD + momentum (or Adam) = the same optimizer run, after
    each move, from psi(theta, a) with its state transported by hand (THEORY.md section 6)."""
    case = support.CASES_BY_NAME[name]
    make = (lambda: optax.sgd(0.05, momentum=0.9)) if base == "sgd" else (lambda: optax.adam(0.02))
    tx = teleport(
        make(),
        list(case.symmetries),
        every=3,
        steps=4,
        step_size=0.3,
        objective="grad_norm",  # moves far on these orbits: a strong test of the transport
        value_fn=case.loss,
    )
    ref = make()

    @support.jit
    def run(params):
        def step(carry, k):
            (p, s), (q, r) = carry
            u, s = tx.update(jax.grad(case.loss)(p), s, p)
            p = optax.apply_updates(p, u)
            # the reference: move and transport by hand at the same steps, with the same element
            moved = k % 3 == 0
            el = s.element
            q = jax.tree.map(lambda a, b: jnp.where(moved, a, b), _hand_act(case, q, el), q)
            fields = {}
            for name_, power in (("trace", 1), ("mu", 1), ("nu", 2)):
                if hasattr(r[0], name_):
                    old = getattr(r[0], name_)
                    new = _hand_transport(case, old, el, power)
                    fields[name_] = jax.tree.map(lambda a, b: jnp.where(moved, a, b), new, old)
            r = (r[0]._replace(**fields), *r[1:])
            v, r = ref.update(jax.grad(case.loss)(q), r, q)
            q = optax.apply_updates(q, v)
            return ((p, s), (q, r)), (p, q, s.objective_gain)

        init = ((params, tx.init(params)), (params, ref.init(params)))
        return jax.lax.scan(step, init, jnp.arange(7))[1]

    ps, qs, gains = run(case.params())
    # float64: agree to ~1e-14 (a true symmetry makes the transported gradient the gradient
    # at the new point); 1e-10 is the bar.
    support.assert_rel_close(ps, qs, 1e-10, "teleported run vs run in the new coordinates")
    assert float(jnp.min(gains[jnp.array([0, 3, 6])])) > 0  # it did move at each teleport
    support.assert_rel_close(gains[1], gains[0], 0.0, "no move between teleports")


# --------------------------------------------------------------------------- extra args


def test_loss_with_a_batch_as_extra_argument(x64):
    case = support.CASES_BY_NAME["rescale_mlp"]
    params = case.params()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)))

    def value_fn(p, batch, *, scale=1.0):
        h = jax.nn.relu(batch @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return scale * jnp.mean(jnp.square(h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]))

    g = jax.grad(value_fn)(params, x)
    at_init = teleport(optax.set_to_zero(), list(case.symmetries), rho=0.1, value_fn=value_fn)
    as_arg = teleport(optax.set_to_zero(), list(case.symmetries), rho=0.1)
    u1, _ = at_init.update(g, at_init.init(params), params, batch=x, other=1)
    u2, _ = as_arg.update(g, as_arg.init(params), params, value_fn=value_fn, batch=x)
    support.assert_close(u1, u2, rtol=0.0)
    new = optax.apply_updates(params, u1)
    support.assert_rel_close(value_fn(new, x), value_fn(params, x), 1e-10, "loss")
    assert support.rel_err(new, params) > 1e-3


# --------------------------------------------------------------------------- bad input


def test_missing_or_misnamed_loss_is_a_clear_error():
    case = support.CASES_BY_NAME["rescale_mlp"]
    params = case.params()
    tx = teleport(optax.sgd(0.1), list(case.symmetries), rho=0.1)
    g = jax.grad(case.loss)(params)
    missing = r"needs the loss.*value_fn=loss.*got extra arguments \[\]"
    with pytest.raises(ValueError, match=missing):
        tx.update(g, tx.init(params), params)
    with pytest.raises(ValueError, match=r"got extra arguments \['loss_fn'\]"):
        tx.update(g, tx.init(params), params, loss_fn=case.loss)

    def value_fn(p, batch):
        return case.loss(p)

    misnamed = r"needs the argument\(s\) \['batch'\].*got \[.batc., .value_fn.\]"
    with pytest.raises(TypeError, match=misnamed):
        tx.update(g, tx.init(params), params, value_fn=value_fn, batc=1.0)
    with pytest.raises(ValueError, match=r"params=None"):
        tx.update(g, tx.init(params), value_fn=case.loss)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every": 0}, ValueError, "every=0 must be a positive integer"),
        ({"every": 2.5}, ValueError, "every=2.5"),
        ({"steps": -1}, ValueError, "steps=-1"),
        ({"step_size": 0.0}, ValueError, "step_size=0.0 must be > 0"),
        ({"rho": -0.1}, ValueError, "rho=-0.1 must be > 0"),
        ({"rho": None}, ValueError, r"objective=.lookahead. needs rho.*rho=learning_rate"),
        ({"rho": None, "objective": "sharpness"}, ValueError, "needs rho"),
        ({"objective": "hessian"}, ValueError, "objective='hessian' is not one of"),
        ({"value_fn": "loss"}, TypeError, "value_fn='loss' must be a callable"),
        ({"base": "sgd"}, TypeError, "base='sgd' is not an optax"),
        ({"base": ksbopt.Scale("w"), "symmetries": optax.sgd(0.1)}, TypeError, "comes first"),
        ({"moments": {"mu": "third"}}, ValueError, "moments entry"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        teleport(**{"base": optax.sgd(0.1), "symmetries": ksbopt.Scale("w"), "rho": 0.1, **kwargs})


class _BufferState(NamedTuple):
    buffer: dict


def _with_buffer():
    return optax.GradientTransformation(
        lambda p: _BufferState(jax.tree.map(jnp.zeros_like, p)),
        lambda u, s, p=None: (u, _BufferState(u)),
    )


def test_unknown_state_fields_must_be_declared():
    case = support.CASES_BY_NAME["rescale_mlp"]
    params = case.params()
    with pytest.raises(ValueError, match=r"\['0/buffer'\].*moments="):
        teleport(optax.chain(_with_buffer()), list(case.symmetries), rho=0.1).init(params)
    tx = teleport(
        optax.chain(_with_buffer()), list(case.symmetries), rho=0.1, moments={"buffer": "first"}
    )
    tx.init(params)


def test_second_moments_under_linear_are_refused():
    case = support.CASES_BY_NAME["linear_deep"]
    with pytest.raises(ValueError, match="no exact transport under"):
        teleport(optax.adam(1e-3), list(case.symmetries), rho=1e-3).init(case.params())


def test_zero_norm_unit_without_nan():
    case = support.CASES_BY_NAME["rescale_mlp"]
    params = case.params()
    params["Dense_0"]["kernel"] = params["Dense_0"]["kernel"].at[:, 1].set(0.0)
    params["Dense_0"]["bias"] = params["Dense_0"]["bias"].at[1].set(0.0)
    tx = teleport(
        optax.sgd(0.1, momentum=0.9), list(case.symmetries), every=1, rho=1.0, value_fn=case.loss
    )
    step = support.jit(tx.update)
    state = tx.init(params)
    for _ in range(2):
        u, state = step(jax.grad(case.loss)(params), state, params)
        params = optax.apply_updates(params, u)
    support.assert_finite((params, state))


def _balance(loss, params):
    """A cheap first-order objective (the battery tests mechanics, not the search)."""
    return -sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(params))


def test_nonfinite_gradient_skips_the_step():
    case = support.CASES_BY_NAME["rescale_mlp"]
    params = case.params()
    tx = teleport(
        optax.sgd(0.1, momentum=0.9),
        list(case.symmetries),
        every=1,
        value_fn=case.loss,
        objective=_balance,
    )
    step = support.jit(tx.update)
    u, state = step(jax.grad(case.loss)(params), tx.init(params), params)
    params = optax.apply_updates(params, u)
    bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), u)
    u_bad, state_bad = step(bad, state, params)
    support.assert_equal(u_bad, jax.tree.map(jnp.zeros_like, u))
    support.assert_equal(state_bad, state)
