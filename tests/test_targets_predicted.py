"""Tests of the dynamic charge targets targets.equilibrium and targets.nld (via steer)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import support

import ksbopt
from ksbopt._src import theory
from ksbopt._src.targets.predicted import equilibrium, nld

SYM = [ksbopt.Scale("w", axis=-1)]
_SCALES = np.array([0.1, 1.0, 10.0, 100.0])  # initial norms 1000x apart


def _noisy_loss(p, key):
    """A scale-invariant loss under minibatch noise (a random direction each step)."""
    w = p["w"]
    u = w / jnp.linalg.norm(w, axis=0)
    return jnp.sum(jax.random.normal(key, w.shape) * u) + 0.5 * jnp.sum(jnp.square(u[0]))


def _run(tx, steps, *, grad=False):
    """Angular update per step and unit, and the squared norms, along a noisy run."""
    p0 = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(32, 4)) * _SCALES)}

    def step(carry, key):
        p, s = carry
        g = jax.grad(_noisy_loss)(p, key)
        u, s = tx.update(g, s, p, grad=g) if grad else tx.update(g, s, p)
        new = optax.apply_updates(p, u)
        d0 = p["w"] / jnp.linalg.norm(p["w"], axis=0)
        d1 = new["w"] / jnp.linalg.norm(new["w"], axis=0)
        return (new, s), (jnp.linalg.norm(d1 - d0, axis=0), jnp.sum(new["w"] ** 2, axis=0))

    keys = jax.random.split(jax.random.PRNGKey(0), steps)
    out = support.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), keys)[1])(p0)
    return jax.tree.map(np.asarray, out)


# --------------------------------------------------------------------------- equilibrium


def test_equilibrium_holds_the_p7a_angular_update_from_the_start(x64):
    eta, lam, momentum = 0.05, 0.01, 0.9
    target = equilibrium(eta, lam, momentum)
    a_star = float(theory.equilibrium_angular_update(eta, lam, momentum))
    tx = optax.chain(optax.sgd(eta, momentum=momentum), ksbopt.steer(SYM, target))
    angles, _ = _run(tx, 400)
    # RMS angular update per unit over steps 20..400, relative to A*. Measured: within 4 %
    # for all four units (norms 1000x apart at init); the sampling error of the RMS of this
    # noise over 380 steps is ~2-3 %, so 10 % cannot be reached by chance, while without
    # the target the units differ by 10^6 in angular update.
    rms = np.sqrt(np.mean(angles[20:] ** 2, axis=0))
    np.testing.assert_allclose(rms / a_star, 1.0, atol=0.1)
    # ...and a plain heavy ball (no target) is nowhere near it at the same steps
    plain, _ = _run(optax.sgd(eta, momentum=momentum), 400)
    assert np.max(np.abs(np.sqrt(np.mean(plain[20:] ** 2, axis=0)) / a_star - 1)) > 0.9


def test_equilibrium_jumps_at_the_first_step(x64):
    """After one step the charge is x* / 2 = sqrt(|w|^2 |u_perp|^2) / (2 A*) exactly."""
    eta, lam = 0.1, 1e-3
    target = equilibrium(eta, lam, 0.0)
    params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)) * [1.0, 4.0, 9.0])}
    key = jax.random.PRNGKey(3)
    g = jax.grad(_noisy_loss)(params, key)
    tx = optax.chain(optax.sgd(eta), ksbopt.steer(SYM, target))
    u, _ = support.jit(tx.update)(g, tx.init(params), params)
    new = optax.apply_updates(params, u)
    w, gw = params["w"], g["w"]
    g_t = gw - w * jnp.sum(gw * w, 0) / jnp.sum(w * w, 0)
    x_star = jnp.sqrt(jnp.sum(w * w, 0) * jnp.sum((eta * g_t) ** 2, 0)) / target.angular_update()
    support.assert_rel_close(jnp.sum(new["w"] ** 2, 0), x_star, 1e-12, "x*")
    # the direction is the base step's
    d_new = new["w"] / jnp.linalg.norm(new["w"], axis=0)
    d_base = (w - eta * gw) / jnp.linalg.norm(w - eta * gw, axis=0)
    support.assert_rel_close(d_new, d_base, 1e-12, "direction")


def test_equilibrium_with_adam_converges(x64):
    """Adam's step does not scale with the gradient: the angular update converges to A*."""
    target = equilibrium(0.05, 0.01, 0.0)
    a_star = float(target.angular_update())
    tx = optax.chain(optax.adam(1e-2), ksbopt.steer(SYM, target, rate=1.0))
    angles, _ = _run(tx, 1500)
    early = np.sqrt(np.mean(angles[1:50] ** 2, axis=0)) / a_star
    late = np.sqrt(np.mean(angles[-300:] ** 2, axis=0)) / a_star
    # Measured: late 0.98, 0.95, 0.94, 0.82 (the unit that starts 1000x too large is the
    # slowest: the EMA lags the norm it changes). Every unit gets closer, all within 25 %.
    assert np.all(np.abs(late - 1) < np.abs(early - 1))
    np.testing.assert_allclose(late, 1.0, atol=0.25)


def _warmup_cosine(peak, steps, warmup):
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, steps, 0.0)


def test_equilibrium_under_a_schedule_holds_the_peak_equilibrium_norm(x64):
    """Warm-up from 0 + cosine decay to 0: the norms settle at the equilibrium of the peak
    rate and are held through the decay (no blow-up as eta_t -> 0), while the angular update
    falls with eta_t: A*(peak) eta_t / peak."""
    peak, lam, momentum, steps, warmup = 0.05, 0.01, 0.9, 600, 30
    sched = _warmup_cosine(peak, steps, warmup)
    target = equilibrium(sched, lam, momentum)
    tx = optax.chain(optax.sgd(sched, momentum=momentum), ksbopt.steer(SYM, target))
    angles, norms = _run(tx, steps)
    support.assert_finite((angles, norms))
    # the stationary noise gives a constant m, so the held norm is constant once the EMA
    # (decay 0.99) has forgotten the steps taken at the initial norms (1000x apart): from step
    # 250 to the last, measured within 6 % (the EMA's sampling noise over ~100 steps), where a
    # rule dividing the lagging EMA by A*(eta_t) -> 0 grows the norms without bound
    held = norms[250:] / norms[250]
    np.testing.assert_allclose(held, 1.0, atol=0.1)
    # angular update over the decay, relative to A*(peak) eta_t / peak (RMS over 100-step
    # windows: sampling error ~5 %); measured within 6 %
    eta = np.asarray([sched(k) for k in range(steps)])
    a_peak = float(theory.equilibrium_angular_update(peak, lam, momentum))
    for lo in (100, 250, 400):
        window = slice(lo, lo + 100)
        ratio = np.sqrt(np.mean(angles[window] ** 2, axis=0)) / np.sqrt(
            np.mean((a_peak * eta[window] / peak) ** 2)
        )
        np.testing.assert_allclose(ratio, 1.0, atol=0.15)


def test_equilibrium_given_the_rate_of_each_step_equals_the_schedule(x64):
    """``optax.inject_hyperparams`` rebuilds the target with each step's rate (a number):
    that is the same rule as giving the schedule."""
    peak, lam, steps = 0.05, 0.01, 60
    sched = _warmup_cosine(peak, steps, 10)
    by_schedule = optax.chain(
        optax.sgd(sched, momentum=0.9), ksbopt.steer(SYM, equilibrium(sched, lam, 0.9))
    )

    @optax.inject_hyperparams
    def injected(learning_rate):
        return optax.chain(
            optax.sgd(learning_rate, momentum=0.9),
            ksbopt.steer(SYM, equilibrium(learning_rate, lam, 0.9), rate=jnp.ones(())),
        )

    a, norms_a = _run(by_schedule, steps)
    b, norms_b = _run(injected(learning_rate=sched), steps)
    # the same arithmetic up to the order of float64 rounding in the two traces
    np.testing.assert_allclose(norms_b, norms_a, rtol=1e-10)
    np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-14)


def test_equilibrium_step_at_rate_zero_measures_nothing(x64):
    """The first step of a warm-up from 0 moves nothing and must not divide by 0."""
    sched = _warmup_cosine(0.05, 100, 10)  # sched(0) == 0
    tx = optax.chain(optax.sgd(sched), ksbopt.steer(SYM, equilibrium(sched, 0.01)))
    params = {"w": jnp.asarray(np.random.default_rng(2).normal(size=(8, 3)))}
    g = jax.grad(_noisy_loss)(params, jax.random.PRNGKey(0))
    u, state = support.jit(tx.update)(g, tx.init(params), params)
    support.assert_finite((u, state))
    assert float(jnp.max(jnp.abs(u["w"]))) == 0.0
    target_state = jax.tree.leaves(state[1].target_state)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in target_state)


def test_equilibrium_angular_update_of_a_schedule_needs_the_rate():
    target = equilibrium(_warmup_cosine(0.1, 100, 10), 5e-4, 0.9)
    with pytest.raises(TypeError, match=r"angular_update\(schedule\(step\)\)"):
        target.angular_update()
    np.testing.assert_allclose(
        float(target.angular_update(0.1)), float(theory.equilibrium_angular_update(0.1, 5e-4, 0.9))
    )


# --------------------------------------------------------------------------- nld


def test_nld_reproduces_sgd_with_weight_decay(x64):
    """Plain SGD at eta / (1 - eta lam) steered to targets.nld(eta, lam) IS SGD + weight decay:
    the direction of (1 - eta lam) w - eta g is that of w - eta / (1 - eta lam) g, and the
    target supplies the norm P1 predicts."""
    case = support.CASES_BY_NAME["scale_phi"]
    eta, lam = 0.05, 0.1
    ref = optax.chain(optax.add_decayed_weights(lam), optax.sgd(eta))
    tx = optax.chain(
        optax.sgd(eta / (1 - eta * lam)), ksbopt.steer(list(case.symmetries), nld(eta, lam))
    )

    @support.jit
    def run(params):
        def step(carry, _):
            (p_a, s_a), (p_b, s_b) = carry
            g_a = jax.grad(case.loss)(p_a)
            g_b = jax.grad(case.loss)(p_b)
            u_a, s_a = ref.update(g_a, s_a, p_a)
            u_b, s_b = tx.update(g_b, s_b, p_b, grad=g_b)
            return (
                (optax.apply_updates(p_a, u_a), s_a),
                (optax.apply_updates(p_b, u_b), s_b),
            ), None

        init = ((params, ref.init(params)), (params, tx.init(params)))
        ((p_a, _), (p_b, _)), _ = jax.lax.scan(step, init, None, length=60)
        return p_a, p_b

    p_a, p_b = run(case.params())
    # float64: the two runs agree to ~1e-15; 1e-10 is the bar.
    support.assert_rel_close(p_b, p_a, 1e-10, "params")
    assert support.rel_err(p_a, case.params()) > 0.05  # it moved


def test_nld_gives_adam_the_p1_charge(x64):
    """Whatever the base (here Adam), the charge after each step is P1 of the measured
    gradient: x_{k+1} = (1 - eta lam)^2 x_k + eta^2 |g_k|^2 (theory.scale_sgd_step)."""
    case = support.CASES_BY_NAME["scale_layernorm"]
    eta, lam = 1.0, 0.02
    tx = optax.chain(optax.adam(0.05), ksbopt.steer(list(case.symmetries), nld(eta, lam)))
    b = case.bind(case.params()).bound[0]

    @support.jit
    def run(params):
        def step(carry, _):
            p, s = carry
            g = jax.grad(case.loss)(p)
            u, s = tx.update(g, s, p, grad=g)
            flat, gf = jax.tree.leaves(p), jax.tree.leaves(g)
            return (optax.apply_updates(p, u), s), (b.norms(flat), b.norms(gf))

        return jax.lax.scan(step, (params, tx.init(params)), None, length=40)[1]

    x, g_sq = run(case.params())
    want = theory.scale_sgd_step(x[:-1], g_sq[:-1], eta, lam)
    support.assert_rel_close(x[1:], want, 1e-12, "P1")
    # the gradient term is not negligible next to the decay term (it is what P1 tests)
    assert float(jnp.max(eta**2 * g_sq / x)) > 1e-3


def test_nld_with_momentum_follows_heavy_ball_norms(x64):
    """Adam steered to nld(eta, lam, 0.9) on a noisy loss: its norms follow those of heavy ball
    + weight decay (normalisation-style growth and decay of the effective learning rate)."""
    eta, lam, beta = 0.05, 1e-3, 0.9
    _, x_ref = _run(optax.chain(optax.add_decayed_weights(lam), optax.sgd(eta, momentum=beta)), 600)
    _, x = _run(
        optax.chain(optax.adam(1e-2), ksbopt.steer(SYM, nld(eta, lam, beta))), 600, grad=True
    )
    _, x_adam = _run(optax.adam(1e-2), 600)
    steps = [1, 10, 100, 599]
    # Measured: within 4 % at every step listed (the radial dynamics are P3's; only the
    # correlation <v, g> of the buffer with the new gradient is modelled). The smallest
    # unit's norm grows 160x, so a wrong model is far off; 10 % leaves room for the noise.
    np.testing.assert_allclose(x[steps] / x_ref[steps], 1.0, atol=0.1)
    assert x_ref[-1, 0] > 100 * x_ref[0, 0]
    assert np.max(np.abs(x_adam[-1] / x_ref[-1] - 1)) > 0.5  # plain Adam does not


def test_nld_ignores_other_extra_args():
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)))}
    tx = optax.chain(optax.sgd(0.1), ksbopt.steer(SYM, nld(0.1, 1e-3, 0.9)))
    g = {"w": jnp.ones((3, 2))}
    state = tx.init(params)
    want = tx.update(g, state, params, grad=g)
    got = tx.update(g, state, params, grad=g, value=1.0, unknown_flag=True)
    support.assert_equal(got, want)


def test_nld_needs_the_gradient():
    params = {"w": jnp.ones((3, 2))}
    tx = ksbopt.steer(SYM, nld(0.1, 1e-3))
    g = {"w": jnp.ones((3, 2))}
    with pytest.raises(ValueError, match=r"grad=grads\).*got extra arguments \['gradient'\]"):
        tx.update(g, tx.init(params), params, gradient=g)
    with pytest.raises(ValueError, match="grad has 2 leaves"):
        tx.update(g, tx.init(params), params, grad={"a": g["w"], "b": g["w"]})


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: equilibrium(0.1, 0.0), "weight_decay=0.0 must be > 0"),
        (lambda: equilibrium(0.0, 1e-3), "learning_rate=0.0 must be > 0"),
        (lambda: equilibrium(0.1, 1e-3, 1.0), r"momentum=1.0 must be in \[0, 1\)"),
        (lambda: equilibrium(0.1, 1e-3, 0.9, decay=1.0), r"decay=1.0 must be in \[0, 1\)"),
        (lambda: nld(-0.1), "learning_rate=-0.1 must be > 0"),
        (lambda: nld(0.1, -1.0), "weight_decay=-1.0 must be >= 0"),
        (lambda: nld(0.1, 0.0, -0.5), "momentum=-0.5"),
    ],
)
def test_bad_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "target", [equilibrium(0.1, 1e-3), nld(0.1, 1e-3)], ids=["equilibrium", "nld"]
)
def test_scale_only(target):
    case = support.CASES_BY_NAME["rescale_mlp"]
    tx = ksbopt.steer(list(case.symmetries), target)
    with pytest.raises(ValueError, match=r"Scale symmetries only \(supported kinds: \('scale',\)"):
        tx.init(case.params())


@pytest.mark.parametrize(
    "target", [equilibrium(0.1, 1e-3, 0.9), nld(0.1, 1e-3, 0.9)], ids=["equilibrium", "nld"]
)
def test_zero_norm_unit_stays_zero_without_nan(target):
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 3))).at[:, 1].set(0.0)}
    tx = optax.chain(optax.sgd(0.1, momentum=0.9), ksbopt.steer(SYM, target))
    step = support.jit(tx.update)
    state = tx.init(params)
    g = {"w": jnp.ones((3, 3)).at[:, 1].set(0.0)}  # a scale-invariant loss has no gradient
    for _ in range(2):  # at w = 0 that could move it
        u, state = step(g, state, params, grad=g)
        params = optax.apply_updates(params, u)
    support.assert_finite((params, state))
    assert float(jnp.max(jnp.abs(params["w"][:, 1]))) == 0.0


def test_equilibrium_following_the_rate_turns_by_a_star_of_eta_t(x64):
    """follow="rate" under warm-up + cosine: the angular update is A*(eta_t), proportional to
    sqrt(eta_t) (not eta_t, as when the peak's equilibrium is held), and the norms shrink like
    eta_t^(1/4) (x* ~ sqrt(eta_t)) through the decay."""
    peak, lam, momentum, steps, warmup = 0.05, 0.01, 0.9, 600, 30
    sched = _warmup_cosine(peak, steps, warmup)
    target = equilibrium(sched, lam, momentum, follow="rate")
    tx = optax.chain(optax.sgd(sched, momentum=momentum), ksbopt.steer(SYM, target))
    angles, norms = _run(tx, steps)
    support.assert_finite((angles, norms))
    eta = np.asarray([sched(k) for k in range(steps)])
    a_t = np.asarray(theory.equilibrium_angular_update(eta, lam, momentum))
    # RMS over 100-step windows relative to A*(eta_t) (sampling error ~5 %, as in the test of
    # the held peak above): within 15 %; measured 0.88-1.00, 0.93-1.04 and 0.92-0.99 for the
    # four units. The held-peak rule measures 0.70-0.78 and 0.41-0.43 in the last two windows.
    for lo in (100, 250, 400):
        window = slice(lo, lo + 100)
        ratio = np.sqrt(np.mean(angles[window] ** 2, axis=0) / np.mean(a_t[window] ** 2))
        np.testing.assert_allclose(ratio, 1.0, atol=0.15)
    # the squared norm follows sqrt(eta_t): from step 250 to 500 eta falls 9x, the squared
    # norms by 0.31-0.33 against 1/sqrt(9.1) = 0.33 (the held-peak rule: 0.94-1.01)
    shrink = norms[500] / norms[250]
    want = np.sqrt(eta[500] / eta[250])
    np.testing.assert_allclose(shrink, want, rtol=0.15)


def test_equilibrium_follow_is_the_same_at_a_constant_rate(x64):
    """Without a schedule the current rate is the peak: the two rules are one."""
    runs = [
        _run(
            optax.chain(
                optax.sgd(0.05, momentum=0.9),
                ksbopt.steer(SYM, equilibrium(0.05, 0.01, 0.9, follow=follow)),
            ),
            100,
        )
        for follow in ("peak", "rate")
    ]
    # the same arithmetic; the two compiled traces round differently in the last bits
    # (measured 5e-15 relative after 100 steps), far below any difference between the rules
    # (a factor sqrt(peak / eta_t) under a schedule)
    np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=1e-12)
    np.testing.assert_allclose(runs[1][1], runs[0][1], rtol=1e-12)


def test_equilibrium_follow_must_be_peak_or_rate():
    with pytest.raises(ValueError, match=r"follow='current' is not 'peak'"):
        equilibrium(0.1, 5e-4, 0.9, follow="current")
