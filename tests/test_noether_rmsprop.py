"""Tests of ksbopt.noether_rmsprop and its block ksbopt.scale_by_noether_rmsprop: the implicit
adaptive optimizer of normalisation, explicit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import support

import ksbopt
from ksbopt._src import theory
from ksbopt._src.transforms.noether_rmsprop import (
    NoetherRmspropState,
    noether_rmsprop,
    scale_by_noether_rmsprop,
)


def _directions(case: support.Case, params):
    b = case.bind(params).bound[0]
    flat = jax.tree.leaves(params)
    moved = b.act(flat, 1 / jnp.sqrt(2 * b.charge(flat)))
    return [moved[i] for i in b.leaves]


def _sgd(eta, lam, beta):
    return optax.chain(optax.add_decayed_weights(lam), optax.sgd(eta, momentum=beta or None))


def _train_both(case, tx_a, tx_b, steps):
    """Two optimizers from the same start, in one compiled program."""

    @support.jit
    def run(params):
        def make_step(tx):
            def step(carry, _):
                p, s = carry
                loss, g = jax.value_and_grad(case.loss)(p)
                u, s = tx.update(g, s, p)
                return (optax.apply_updates(p, u), s), loss

            return step

        out = []
        for tx in (tx_a, tx_b):
            (p, s), losses = jax.lax.scan(
                make_step(tx), (params, tx.init(params)), None, length=steps
            )
            out.append((p, s, losses))
        return out

    return run(case.params())


@pytest.mark.parametrize(("name", "momentum"), [("scale_batchnorm", 0.0), ("scale_layernorm", 0.9)])
def test_exact_mode_is_sgd_with_weight_decay_on_a_normalised_layer(x64, name, momentum):
    """P2 (momentum 0) and P3 (heavy ball): same directions, same losses, step by step; the
    accumulator is the squared norm the SGD run has."""
    case = support.CASES_BY_NAME[name]
    eta, lam = 0.1, 0.05
    (p_sgd, _, loss_sgd), (p_nr, s_nr, loss_nr) = _train_both(
        case,
        _sgd(eta, lam, momentum),
        noether_rmsprop(list(case.symmetries), eta, lam, momentum),
        100,
    )
    # 1e-10 relative in float64 (the bar). Measured: ~1e-15 at momentum 0, ~1e-12 at
    # 0.9 (heavy ball's radial buffer carries rounding a little longer).
    support.assert_rel_close(loss_nr, loss_sgd, 1e-10, "losses")
    support.assert_rel_close(_directions(case, p_nr), _directions(case, p_sgd), 1e-10, "directions")
    support.assert_rel_close(p_nr["out"], p_sgd["out"], 1e-10, "ungrouped leaves")
    x_sgd = 2 * case.charges(p_sgd)[0]
    support.assert_rel_close(s_nr.accumulator[0], x_sgd, 1e-10, "accumulator = |w_sgd|^2")
    # while the weights' own norms never moved
    support.assert_rel_close(case.charges(p_nr), case.charges(case.params()), 1e-13, "norms held")


def test_exact_accumulator_follows_p1(x64):
    """x_{k+1} = (1 - eta lam)^2 x_k + eta^2 |g_hat_k|^2 / x_k (theory.scale_sgd_step)."""
    case = support.CASES_BY_NAME["scale_layernorm"]
    eta, lam = 1.0, 0.02
    tx = noether_rmsprop(list(case.symmetries), eta, lam)
    b = case.bind(case.params()).bound[0]

    def probe(p, g, s):
        flat, gf = jax.tree.leaves(p), jax.tree.leaves(g)
        g_hat_sq = b.norms(flat) * b.norms(gf)  # |w|^2 |g|^2 = |g_hat|^2 (g is tangent)
        return s.accumulator[0], g_hat_sq

    _, s, _, (x, g_hat_sq) = support.train(case, tx, case.params(), 30, probe=probe)
    x_next = jnp.concatenate([x[1:], s.accumulator[0][None]])
    want = theory.scale_sgd_step(x, g_hat_sq / x, eta, lam)
    support.assert_rel_close(x_next, want, 1e-12, "P1")
    # the gradient term is not negligible next to the decay term (it is what P1 tests)
    assert float(jnp.max(eta**2 * g_hat_sq / x**2)) > 1e-3


# ------------------------------------------------------------- the block and the chain


@pytest.mark.parametrize(
    ("name", "momentum", "mode"),
    [
        ("scale_batchnorm", 0.0, "exact"),
        ("scale_layernorm", 0.9, "exact"),
        ("scale_layernorm", 0.9, "nld"),
    ],
)
def test_block_then_learning_rate_is_the_optimizer(x64, name, momentum, mode):
    """optax.chain(scale_by_noether_rmsprop, scale_by_learning_rate) and noether_rmsprop: the
    same parameters, losses and state after 30 steps, bit for bit (the same arithmetic)."""
    case = support.CASES_BY_NAME[name]
    sym, eta, lam = list(case.symmetries), 0.1, 0.05
    chain = optax.chain(
        scale_by_noether_rmsprop(sym, eta, lam, momentum, mode=mode),
        optax.scale_by_learning_rate(eta),
    )
    full = noether_rmsprop(sym, eta, lam, momentum, mode=mode)
    p_chain, s_chain, loss_chain = support.train(case, chain, case.params(), 30)
    p_full, s_full, loss_full = support.train(case, full, case.params(), 30)
    support.assert_equal((p_full, s_full, loss_full), (p_chain, s_chain[0], loss_chain))
    assert float(jnp.max(jnp.abs(loss_full[-1] - loss_full[0]))) > 0  # it moved


def test_block_direction_is_the_step_per_unit_learning_rate(x64):
    """The block's output d: the optimizer's update is -eta d; on an ungrouped leaf d is heavy
    ball's buffer with coupled weight decay (optax.add_decayed_weights + optax.trace)."""
    case = support.CASES_BY_NAME["scale_layernorm"]
    sym, eta, lam, beta = list(case.symmetries), 0.1, 0.05, 0.9
    params, grads = case.params(), jax.grad(case.loss)(case.params())
    block = scale_by_noether_rmsprop(sym, eta, lam, beta)
    full = noether_rmsprop(sym, eta, lam, beta)
    heavy_ball = optax.chain(optax.add_decayed_weights(lam), optax.trace(beta))
    d, s_block = block.update(grads, block.init(params), params)
    u, s_full = full.update(grads, full.init(params), params)
    hb, _ = heavy_ball.update(grads, heavy_ball.init(params), params)
    support.assert_equal(u, jax.tree.map(lambda x: -eta * x, d))
    support.assert_equal(s_full, s_block)
    # the same sum in another order: a few ulps (1e-15 relative in float64)
    support.assert_rel_close(d["out"], hb["out"], 1e-15, "ungrouped leaf = heavy ball")
    # on the groups, -eta d keeps the norm (float64 rounding: 1e-13 relative)
    moved = optax.apply_updates(params, jax.tree.map(lambda x: -eta * x, d))
    support.assert_rel_close(case.charges(moved), case.charges(params), 1e-13, "norm held")
    assert support.rel_err(d["dense"], grads["dense"]) > 1e-3  # not the gradient itself


def test_state_is_unchanged_by_the_split():
    """noether_rmsprop's state is the block's NoetherRmspropState, with the fields it had
    (so checkpoints written before the block existed still restore)."""
    case = support.CASES_BY_NAME["scale_layernorm"]
    state = noether_rmsprop(list(case.symmetries), 0.1, 1e-2, 0.9).init(case.params())
    assert type(state) is NoetherRmspropState
    assert NoetherRmspropState._fields == ("accumulator", "momentum", "initial")
    block_state = scale_by_noether_rmsprop(list(case.symmetries), 0.1, 1e-2, 0.9).init(
        case.params()
    )
    support.assert_equal(state, block_state)


@pytest.mark.parametrize("mode", ["exact", "nld"])
def test_learning_rate_scheduled_to_zero_gives_zero_steps(mode):
    """inject_hyperparams with a schedule that reaches 0 (a traced learning rate of 0): the
    direction per unit learning rate is taken as 0 there, so the step is 0, not NaN."""
    case = support.CASES_BY_NAME["scale_layernorm"]
    tx = optax.inject_hyperparams(noether_rmsprop)(
        list(case.symmetries), optax.linear_schedule(0.1, 0.0, 1), 1e-2, 0.9, mode=mode
    )
    params = case.params()
    state = tx.init(params)
    step = support.jit(tx.update)
    grads = jax.grad(case.loss)(params)
    u, state = step(grads, state, params)  # learning rate 0.1
    params = optax.apply_updates(params, u)
    u, state = step(jax.grad(case.loss)(params), state, params)  # learning rate 0
    support.assert_finite((u, state))
    support.assert_equal(u, jax.tree.map(jnp.zeros_like, u))


# ------------------------------------------------------------------ nld mode: measured error

_D, _U = 24, 4
_SCALES = np.array([0.3, 1.0, 3.0, 10.0])  # initial norms across the units


def _noisy_loss(p, key):
    """A normalised layer under minibatch noise: a coherent pull plus a random direction."""
    w = p["w"]
    u = w / jnp.linalg.norm(w, axis=0)
    return jnp.sum(jax.random.normal(key, w.shape) * u) + 2.0 * jnp.sum(jnp.square(u[:4] - 0.5))


def _angles(tx, steps):
    p0 = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(_D, _U)) * _SCALES)}

    def step(carry, key):
        p, s = carry
        g = jax.grad(_noisy_loss)(p, key)
        u, s = tx.update(g, s, p)
        new = optax.apply_updates(p, u)
        d0 = p["w"] / jnp.linalg.norm(p["w"], axis=0)
        d1 = new["w"] / jnp.linalg.norm(new["w"], axis=0)
        return (new, s), jnp.linalg.norm(d1 - d0, axis=0)

    keys = jax.random.split(jax.random.PRNGKey(1), steps)
    return np.asarray(support.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), keys)[1])(p0))


def test_nld_mode_measured_error(x64):
    """The NLD mapping against heavy ball + weight decay on a normalised layer (the figures of
    the implicit-RMSProp concepts page come from this test)."""
    eta, lam, steps, window = 0.05, 5e-3, 1500, 100
    sym = [ksbopt.Scale("w", axis=-1)]
    ratios = {}
    for beta in (0.0, 0.9):
        ref = _angles(_sgd(eta, lam, beta), steps)
        got = _angles(noether_rmsprop(sym, eta, lam, beta, mode="nld"), steps)
        per_window = got.reshape(-1, window, _U).mean(1) / ref.reshape(-1, window, _U).mean(1)
        ratios[beta] = per_window
    # beta = 0: the NLD RMSProp is the first-order form of the exact recursion; measured
    # within 0.6 % per 100-step window and unit from the first window on.
    assert np.max(np.abs(ratios[0.0] - 1)) < 0.02, ratios[0.0]
    # beta = 0.9, second half (noise-dominated steady state): measured within ~5 % per window
    # (the sampling error of a 100-step mean of this noise is ~4 %); 12 % leaves room for it.
    assert np.max(np.abs(ratios[0.9][len(ratios[0.9]) // 2 :] - 1)) < 0.12, ratios[0.9]
    # During the transient of a large unit the gradient is coherent, heavy ball's momentum
    # amplifies it by 1 / (1 - beta) rather than 1 / sqrt(1 - beta^2), and the NLD RMSProp
    # turns slower, by at most sqrt((1 - beta) / (1 + beta)) = 0.23: measured ~0.4 in the
    # first windows of the unit that starts at 10x the norm.
    first = ratios[0.9][0, -1]
    assert np.sqrt(0.1 / 1.9) < first < 0.8, first


# ------------------------------------------------------------- without normalisation


def test_trains_a_network_without_normalisation():
    """Scale-style unit declarations on a plain ReLU MLP: it trains, norms are held."""
    case = support.CASES_BY_NAME["rescale_mlp"]
    sym = [ksbopt.Scale(["Dense_0/kernel", "Dense_0/bias"], axis=-1)]
    params = case.params()
    for mode, beta in (("exact", 0.9), ("nld", 0.9)):
        tx = noether_rmsprop(sym, 0.05, 1e-3, beta, mode=mode)
        end, state, losses = support.train(case, tx, params, 60)
        support.assert_finite((end, state))
        assert float(losses[-1]) < 0.7 * float(losses[0]), (mode, losses[0], losses[-1])
        support.assert_rel_close(
            ksbopt.charges(end, sym),
            ksbopt.charges(params, sym),
            1e-5,
            "norms held (float32 rounding)",
        )
        assert isinstance(state, NoetherRmspropState)


def test_zero_norm_unit_stays_zero_without_nan():
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 3))).at[:, 1].set(0.0)}
    sym = ksbopt.Scale("w", axis=-1)
    g = {"w": jnp.ones((3, 3))}
    for mode in ("exact", "nld"):
        tx = noether_rmsprop(sym, 0.1, 1e-2, 0.9, mode=mode)
        step = support.jit(tx.update)
        p, s = params, tx.init(params)
        for _ in range(2):
            u, s = step(g, s, p)
            p = optax.apply_updates(p, u)
        support.assert_finite((p, s))
        assert float(jnp.max(jnp.abs(p["w"][:, 1]))) == 0.0


def test_nonfinite_gradient_skips_the_step():
    case = support.CASES_BY_NAME["scale_batchnorm"]
    params = case.params()
    tx = noether_rmsprop(list(case.symmetries), 0.1, 1e-2, 0.9)
    step = support.jit(tx.update)
    u, state = step(jax.grad(case.loss)(params), tx.init(params), params)
    params = optax.apply_updates(params, u)
    bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), u)
    u_bad, state_bad = step(bad, state, params)
    support.assert_equal(u_bad, jax.tree.map(jnp.zeros_like, u))
    support.assert_equal(state_bad, state)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"learning_rate": 0.0}, ValueError, "learning_rate=0.0 must be > 0"),
        ({"learning_rate": -1.0}, ValueError, "learning_rate=-1.0"),
        ({"weight_decay": -1e-3}, ValueError, "weight_decay=-0.001 must be >= 0"),
        ({"momentum": 1.0}, ValueError, r"momentum=1.0 must be in \[0, 1\)"),
        ({"mode": "adam"}, ValueError, "mode='adam' is not one of"),
        ({"mode": "nld", "weight_decay": 0.0}, ValueError, "needs weight_decay=0.0 > 0"),
        ({"mode": "nld", "learning_rate": 30.0}, ValueError, "4 \\* learning_rate"),
        ({"learning_rate": optax.constant_schedule(0.1)}, TypeError, "inject_hyperparams"),
        ({"symmetries": ksbopt.Translation("w")}, ValueError, "kind 'scale' only"),
    ],
)
@pytest.mark.parametrize("factory", [noether_rmsprop, scale_by_noether_rmsprop])
def test_bad_input(kwargs, error, match, factory):
    """The factory and its block raise the same errors, each naming itself."""
    args = {
        "learning_rate": 0.1,
        "weight_decay": 1e-2,
        "momentum": 0.0,
        "symmetries": ksbopt.Scale("w"),
    } | kwargs
    with pytest.raises(error, match=match) as raised:
        factory(**args)
    assert f"ksbopt.{factory.__name__}" in str(raised.value)
