"""ksbopt transforms inside optax's wrappers (docs/howto/wrappers.md).

What each combination does, tested on the tiny exactly symmetric problems of ``support``:

- ``optax.MultiSteps``: the inner chain (retract, steer, monitor included) acts once per
  outer step, on the mean gradient; between outer steps the parameters, the ksbopt states
  and the charges do not move. Placed OUTSIDE the accumulation a ksbopt transform acts on
  every micro-step instead (tested, documented as the wrong placement).
- ``optax.apply_if_finite``: a non-finite step leaves parameters and every state unchanged,
  whichever side of the monitor the wrapper sits on.
- ``optax.masked`` / ``optax.transforms.partition``: the transform sees only its leaves;
  selectors resolve against that sub-tree; a selector whose leaves are masked out raises.
- ``optax.inject_hyperparams``: the numeric hyperparameters of steer and monitor are
  schedulable; project and retract have none.
- ``jax.lax.cond`` around ``update``: init and update states have the same structure,
  shapes, dtypes, weak types and shardings, so both branches type-check.

Gradients of the toy losses are scaled per step by (1 + 0.8 sin k): that keeps them exactly
orthogonal to the generators (the symmetry holds) while making the micro-batches differ.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import support

import ksbopt

CASE = support.CASES_BY_NAME["scale_batchnorm"]
# float32 tolerances: two runs of the same float32 steps through different wrappers differ
# by reassociation only (a few ulps per step over <= 6 steps); the retraction lands within
# 64 eps_f32 = 7.6e-6 of the initial charges, plus one rounding of w + u (contract battery).
RTOL_SAME = 1e-5
RTOL_CHARGE = 1e-5


def _grad_fn(case):
    grad = support.jit(jax.grad(case.loss))

    def g(params, k):
        return jax.tree.map(lambda x: x * (1.0 + 0.8 * np.sin(k)), grad(params))

    return g


def _run(tx, case, params, n):
    """n jitted updates from ``params``; returns the list of params (n + 1) and the states."""
    grad, update = _grad_fn(case), support.jit(tx.update)
    state = tx.init(params)
    ps, states = [params], [state]
    for k in range(n):
        u, state = update(grad(params, k), state, params)
        params = optax.apply_updates(params, u)
        ps.append(params)
        states.append(state)
    return ps, states


def _assert_charges_held(case, params, reference, what):
    """Charges of ``params`` equal those of ``reference`` to RTOL_CHARGE, relative to the
    largest charge (Linear: to |A|^2 + |B|^2, the size float32 rounding is relative to)."""
    errs = support.charge_errors(
        case, case.charges(params), case.charges(reference), params, linear_scale="weights"
    )
    assert max(errs) <= RTOL_CHARGE, f"{what}: charge errors {errs}"


def _heavy_ball():
    return optax.sgd(0.1, momentum=0.9)


# --------------------------------------------------------------------------- MultiSteps


@pytest.mark.parametrize(
    "case",
    [
        CASE,
        support.CASES_BY_NAME["relu_softmax"],
        pytest.param(support.CASES_BY_NAME["linear_deep"], marks=pytest.mark.slow),
    ],
    ids=repr,
)
def test_multisteps_retract_acts_once_per_outer_step(case):
    """MultiSteps(chain(heavy ball, retract), 3): params, the retract state and the charges
    stay put on the first two micro-steps; the third applies one step of the chain on the
    mean of the three gradients and lands on the initial charges."""
    k = 3
    sym = list(case.symmetries)
    inner = optax.chain(_heavy_ball(), ksbopt.retract(sym))
    params = case.params()
    ps, states = _run(optax.MultiSteps(inner, every_k_schedule=k), case, params, 2 * k)
    for step in range(2 * k):
        emitted = (step + 1) % k == 0
        before, after = ps[step], ps[step + 1]
        if emitted:
            assert support.rel_err(after, before) > 1e-4, f"micro-step {step} did not move"
        else:
            support.assert_equal(after, before)
            support.assert_equal(states[step + 1].inner_opt_state, states[step].inner_opt_state)
        _assert_charges_held(case, after, params, f"micro-step {step}")
    # The outer steps are the plain chain's steps on the mean gradients.
    grad = _grad_fn(case)
    mean_grads = []
    for outer in range(2):
        gs = [grad(ps[outer * k], outer * k + i) for i in range(k)]
        mean_grads.append(jax.tree.map(lambda *x: sum(x) / k, *gs))
    p, state, update = params, inner.init(params), support.jit(inner.update)
    for g in mean_grads:
        u, state = update(g, state, p)
        p = optax.apply_updates(p, u)
    support.assert_close(ps[-1], p, rtol=RTOL_SAME, atol=1e-6)


def test_multisteps_steer_counts_outer_steps_and_outside_counts_micro_steps():
    """steer inside MultiSteps: its count (which drives targets.schedule) and its moves
    follow the outer steps. Outside it (chain(MultiSteps(base), steer)) it runs at every
    micro-step: it counts micro-steps and moves the parameters along the orbit while the
    base optimizer is still accumulating."""
    k, sym = 3, list(CASE.symmetries)
    params = CASE.params()
    inside = optax.MultiSteps(optax.chain(_heavy_ball(), ksbopt.steer(sym, 1.0, 0.5)), k)
    ps, states = _run(inside, CASE, params, 2 * k)
    assert int(states[-1].inner_opt_state[1].count) == 2
    support.assert_equal(ps[1], params)

    base = optax.MultiSteps(_heavy_ball(), k).gradient_transformation()
    outside = optax.chain(base, ksbopt.steer(sym, 1.0, 0.5))
    ps, states = _run(outside, CASE, params, 2 * k)
    assert int(states[-1][1].count) == 2 * k
    # The first micro-step: the base step is zero, the orbit move is not.
    assert support.rel_err(ps[1], params) > 1e-2


def test_multisteps_retract_outside_moves_only_by_rounding():
    """chain(MultiSteps(base), retract): on the micro-steps where the base step is zero the
    retraction still runs and re-projects w onto the initial charges: a rounding-level move
    (<= 64 eps_f32 relative), not an exact zero. Inside MultiSteps that move is exactly 0."""
    k, sym = 3, list(CASE.symmetries)
    params = CASE.params()
    base = optax.MultiSteps(_heavy_ball(), k).gradient_transformation()
    ps, _ = _run(optax.chain(base, ksbopt.retract(sym)), CASE, params, 2 * k)
    for step in (0, 1, 3, 4):
        assert support.rel_err(ps[step + 1], ps[step]) <= 64 * float(jnp.finfo(jnp.float32).eps)
    support.assert_rel_close(CASE.charges(ps[-1]), CASE.charges(params), RTOL_CHARGE, "outside")


def test_monitor_inside_multisteps_predicts_outside_does_not():
    """MultiSteps(monitor(tx), k): the monitor counts outer steps and sees the mean gradient,
    so the exact recursion (P3) holds to float32. monitor(MultiSteps(tx)) sees every
    micro-step (a zero step with a non-zero gradient): its recursion does not describe the
    run (documented as the wrong placement)."""
    k, sym = 3, list(CASE.symmetries)
    dyn = ksbopt.dynamics.sgd(0.1, momentum=0.9)
    params = CASE.params()
    inside = optax.MultiSteps(ksbopt.monitor(_heavy_ball(), sym, dynamics=dyn), k)
    ps, states = _run(inside, CASE, params, 2 * k)
    state = states[-1]
    assert int(state.inner_opt_state.monitor_count) == 2
    # P3 is exact; float32 open-loop recursion over 2 steps: a few eps_f32 relative.
    err = optax.tree.get(state, "prediction_error")
    assert float(jnp.max(jnp.abs(err[0]))) <= 1e-5, err
    # The monitor's charge after the step is the charge of the applied step.
    support.assert_rel_close(
        optax.tree.get(state, "charges"), CASE.charges(ps[-1]), RTOL_CHARGE, "inside"
    )

    base = optax.MultiSteps(_heavy_ball(), k).gradient_transformation()
    outside = ksbopt.monitor(base, sym, dynamics=dyn)
    _, states = _run(outside, CASE, params, 2 * k)
    assert int(states[-1].monitor_count) == 2 * k
    err = optax.tree.get(states[-1], "prediction_error")
    assert float(jnp.max(jnp.abs(err[0]))) > 1e-3, err


# --------------------------------------------------------------------------- apply_if_finite


@pytest.mark.parametrize("order", ["finite_outside", "monitor_outside"])
def test_apply_if_finite_with_monitor(order):
    """A NaN gradient leaves params, the retract state and the monitor state unchanged with
    apply_if_finite(monitor(tx)) and with monitor(apply_if_finite(tx))."""
    sym = list(CASE.symmetries)
    tx = optax.chain(_heavy_ball(), ksbopt.retract(sym))
    if order == "finite_outside":
        tx = optax.apply_if_finite(ksbopt.monitor(tx, sym), max_consecutive_errors=2)
    else:
        tx = ksbopt.monitor(optax.apply_if_finite(tx, max_consecutive_errors=2), sym)
    update = support.jit(tx.update)
    params = CASE.params()
    state = tx.init(params)
    u, state = update(_grad_fn(CASE)(params, 0), state, params)
    params = optax.apply_updates(params, u)
    bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), _grad_fn(CASE)(params, 1))
    u_bad, state_bad = update(bad, state, params)
    support.assert_equal(optax.apply_updates(params, u_bad), params)
    # The monitor's diagnostics, recursions and count and the retract state are unchanged
    # (only apply_if_finite's own counters move).
    for name in ("diagnostics", "recursion", "monitor_count", "initial", "residual"):
        support.assert_equal(optax.tree.get(state_bad, name), optax.tree.get(state, name))
    assert int(optax.tree.get(state_bad, "monitor_count")) == 1
    assert int(optax.tree.get(state_bad, "total_notfinite")) == 1


def test_apply_if_finite_after_max_errors_nan_reaches_untouched_leaves_only():
    """After ``max_consecutive_errors`` apply_if_finite lets the step through: retract turns
    the non-finite updates of the leaves it acts on into zeros (and keeps its state), the
    leaves no symmetry touches receive the NaN (optax's behaviour, documented)."""
    sym = list(CASE.symmetries)
    tx = optax.apply_if_finite(optax.chain(optax.sgd(0.1), ksbopt.retract(sym)), 0)
    params = CASE.params()
    state = tx.init(params)
    bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), _grad_fn(CASE)(params, 0))
    u, new_state = support.jit(tx.update)(bad, state, params)
    support.assert_finite(u["dense"])
    support.assert_equal(u["dense"], jax.tree.map(jnp.zeros_like, params["dense"]))
    assert bool(jnp.isnan(u["out"]["kernel"][0, 0]))
    support.assert_equal(new_state.inner_state[1], state.inner_state[1])


# --------------------------------------------------------------------------- masked, partition

_MASK = {"dense": {"kernel": True, "bias": True}, "out": {"kernel": False, "bias": False}}
_LABELS = {"dense": {"kernel": "sym", "bias": "sym"}, "out": {"kernel": "rest", "bias": "rest"}}


def test_masked_retract_acts_on_its_leaves_only():
    """chain(heavy ball, masked(retract, mask)): the selectors resolve on the masked
    sub-tree; masked-in leaves get the full chain's step; the others the base step only."""
    sym = list(CASE.symmetries)
    params = CASE.params()
    masked = optax.chain(_heavy_ball(), optax.masked(ksbopt.retract(sym), _MASK))
    plain = optax.chain(_heavy_ball(), ksbopt.retract(sym))
    got, _ = _run(masked, CASE, params, 3)
    want, _ = _run(plain, CASE, params, 3)
    # retract touches only 'dense/*' here, so masking 'out' changes nothing.
    support.assert_close(got[-1], want[-1], rtol=RTOL_SAME, atol=1e-6)
    support.assert_rel_close(CASE.charges(got[-1]), CASE.charges(params), RTOL_CHARGE, "masked")


def test_masked_out_selection_raises_at_init():
    """A selector whose leaves the mask hides matches nothing in the masked tree: a
    ValueError at init that names the selector and lists the visible paths."""
    sym = list(CASE.symmetries)
    hidden = jax.tree.map(lambda m: not m, _MASK)
    tx = optax.masked(ksbopt.retract(sym), hidden)
    with pytest.raises(ValueError, match=r"selection='dense/\*' matches no leaf.*'out/kernel'"):
        tx.init(CASE.params())
    # An explicit list names the missing member when the mask hides part of a group.
    explicit = [ksbopt.Scale(["dense/kernel", "dense/bias"], axis=-1)]
    partial = {"dense": {"kernel": True, "bias": False}, "out": {"kernel": True, "bias": True}}
    tx = optax.masked(ksbopt.retract(explicit), partial)
    with pytest.raises(ValueError, match=r"selection='dense/bias' matches no leaf"):
        tx.init(CASE.params())


def test_masked_glob_that_would_narrow_a_group_raises_at_init():
    """A glob that matches leaves the mask hides beside visible ones would silently make
    smaller groups (Scale('dense/*') without 'dense/bias' groups the kernel columns alone):
    a ValueError at init names the hidden leaf; with optax.transforms.partition too. The
    explicit path of the visible leaf is the documented way to mean the smaller group."""
    sym = list(CASE.symmetries)
    partial = {"dense": {"kernel": True, "bias": False}, "out": {"kernel": True, "bias": True}}
    params = CASE.params()
    match = r"selection='dense/\*' matches 'dense/bias', which an optax.masked"
    with pytest.raises(ValueError, match=match):
        optax.masked(ksbopt.retract(sym), partial).init(params)
    labels = jax.tree.map(lambda m: "sym" if m else "rest", partial)
    tx = optax.transforms.partition({"sym": ksbopt.retract(sym), "rest": optax.sgd(0.1)}, labels)
    with pytest.raises(ValueError, match=match):
        tx.init(params)
    narrowed = [ksbopt.Scale("dense/kernel", axis=-1)]
    state = optax.masked(ksbopt.retract(narrowed), partial).init(params)
    support.assert_equal(state.inner_state.initial, ksbopt.charges(params, narrowed))


def test_partition_matches_the_plain_chain_on_its_leaves():
    """partition({'sym': chain(heavy ball, retract), 'rest': adam}): at every step the
    symmetric leaves get the update of chain(heavy ball, retract) on the whole tree, the
    others adam's (each reference fed the same params and gradients)."""
    sym = list(CASE.symmetries)
    chain = optax.chain(_heavy_ball(), ksbopt.retract(sym))
    adam = optax.adam(1e-2)
    tx = optax.transforms.partition({"sym": chain, "rest": adam}, _LABELS)
    grad = _grad_fn(CASE)
    params = CASE.params()
    states = [t.init(params) for t in (tx, chain, adam)]
    start = params
    for k in range(3):
        g = grad(params, k)
        (u, s), (u_sym, s_sym), (u_rest, s_rest) = [
            support.jit(t.update)(g, st, params) for t, st in zip((tx, chain, adam), states)
        ]
        states = [s, s_sym, s_rest]
        support.assert_close(u["dense"], u_sym["dense"], rtol=RTOL_SAME, atol=1e-7)
        support.assert_close(u["out"], u_rest["out"], rtol=RTOL_SAME, atol=1e-7)
        params = optax.apply_updates(params, u)
    _assert_charges_held(CASE, params, start, "partition")
    assert isinstance(states[0].inner_states["sym"].inner_state[1], ksbopt.RetractState)


def test_partition_symmetry_across_labels_raises():
    """A Rescale whose incoming and outgoing leaves carry different labels cannot be seen
    by either transform: ValueError at init naming the selector that matches nothing."""
    case = support.CASES_BY_NAME["rescale_mlp"]
    labels = {"Dense_0": {"kernel": "a", "bias": "a"}, "Dense_1": {"kernel": "b", "bias": "b"}}
    tx = optax.transforms.partition(
        {"a": ksbopt.retract(list(case.symmetries)), "b": optax.sgd(0.1)}, labels
    )
    with pytest.raises(ValueError, match=r"Dense_1/kernel'? matches no leaf"):
        tx.init(case.params())


# --------------------------------------------------------------------------- inject_hyperparams


def test_inject_hyperparams_steer_schedule_runs_on_outer_steps():
    """inject_hyperparams(steer)(sym, target=schedule) inside MultiSteps: the injected
    target follows the outer step count (the schedule is evaluated on optax's own count,
    which advances only when the inner chain is applied)."""
    k, sym = 2, list(CASE.symmetries)
    schedule = optax.linear_schedule(1.0, 2.0, 4)
    steer = optax.inject_hyperparams(ksbopt.steer)(sym, target=schedule, rate=1.0)
    tx = optax.MultiSteps(optax.chain(_heavy_ball(), steer), k)
    ps, states = _run(tx, CASE, CASE.params(), 3 * k)
    targets = [float(s.inner_opt_state[1].hyperparams["target"]) for s in states[k::k]]
    np.testing.assert_allclose(targets, [schedule(i) for i in range(3)], rtol=1e-6)
    # rate 1 puts every group on the target of its outer step.
    for i, p in enumerate(ps[k::k]):
        support.assert_close(CASE.charges(p)[0], jnp.full((4,), schedule(i)), rtol=RTOL_CHARGE)


def test_inject_hyperparams_project_retract():
    """retract takes no numeric hyperparameters and project only its solver's iteration cap
    (``tol`` defaults to None, which is not injected): injected, the steps are the plain
    ones."""
    sym = list(CASE.symmetries)
    for factory, injected in ((ksbopt.project, {"max_iter"}), (ksbopt.retract, set())):
        tx = optax.inject_hyperparams(factory)(sym)
        state = tx.init(CASE.params())
        assert set(state.hyperparams) == injected
        got, _ = _run(optax.chain(_heavy_ball(), tx), CASE, CASE.params(), 2)
        want, _ = _run(optax.chain(_heavy_ball(), factory(sym)), CASE, CASE.params(), 2)
        support.assert_close(got[-1], want[-1], rtol=RTOL_SAME, atol=1e-6)


@pytest.mark.parametrize("every", [1, 2])
def test_inject_hyperparams_monitor(every):
    """inject_hyperparams(monitor)(tx, sym, learning_rate=schedule): the learning rate used
    for the effective learning rate is scheduled, ``every`` (an int that optax injects too)
    keeps working, and the result equals the plain monitor with the same schedule."""
    sym = list(CASE.symmetries)
    schedule = optax.linear_schedule(0.1, 0.2, 3)
    injected = optax.inject_hyperparams(ksbopt.monitor)(
        _heavy_ball(), sym, learning_rate=schedule, every=every
    )
    plain = ksbopt.monitor(_heavy_ball(), sym, learning_rate=schedule, every=every)
    counter = support.TraceCounter(injected.update)
    update = support.jit_max_traces(counter, n=1)
    grad, plain_update = _grad_fn(CASE), support.jit(plain.update)
    params = CASE.params()
    s_inj, s_plain = injected.init(params), plain.init(params)
    for k in range(3):
        g = grad(params, k)
        u, s_inj = update(g, s_inj, params)
        _, s_plain = plain_update(g, s_plain, params)
        params = optax.apply_updates(params, u)
        np.testing.assert_allclose(float(s_inj.hyperparams["learning_rate"]), schedule(k))
    assert counter.count == 1
    support.assert_close(s_inj.inner_state, s_plain, rtol=RTOL_SAME, atol=1e-7)
    # ... and with ``every`` kept static, as optax's static_args allows.
    static = optax.inject_hyperparams(ksbopt.monitor, static_args=("every",))(
        _heavy_ball(), sym, learning_rate=schedule, every=every
    )
    assert set(static.init(CASE.params()).hyperparams) == {"learning_rate"}


def test_monitor_every_injected_is_validated_at_init():
    """An injected ``every`` is checked when inject_hyperparams builds the monitor at init."""
    sym = list(CASE.symmetries)
    tx = optax.inject_hyperparams(ksbopt.monitor)(_heavy_ball(), sym, learning_rate=0.1, every=0)
    with pytest.raises(ValueError, match=r"every=0 must be a positive int"):
        tx.init(CASE.params())


# --------------------------------------------------------------------------- lax.cond


def _cond_transforms(sym):
    return {
        "project": optax.chain(ksbopt.project(sym), _heavy_ball()),
        "retract": optax.chain(_heavy_ball(), ksbopt.retract(sym)),
        "steer": optax.chain(_heavy_ball(), ksbopt.steer(sym, 1.5, 0.5)),
        "steer_injected": optax.chain(
            _heavy_ball(),
            optax.inject_hyperparams(ksbopt.steer)(sym, optax.linear_schedule(1.0, 2.0, 3), 0.5),
        ),
        "monitor": ksbopt.monitor(
            optax.chain(_heavy_ball(), ksbopt.retract(sym)),
            sym,
            dynamics=ksbopt.dynamics.sgd(0.1, momentum=0.9),
            every=2,
        ),
        "monitor_adam": ksbopt.monitor(optax.adam(1e-2), sym, dynamics=ksbopt.dynamics.adam(1e-2)),
        "multisteps": optax.MultiSteps(
            optax.chain(_heavy_ball(), ksbopt.retract(sym)), 2
        ).gradient_transformation(),
    }


def _weak_types(tree):
    return jax.tree.map(lambda x: getattr(x, "weak_type", None), tree)


def _shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def _cond_step(tx):
    def step(pred, g, s, p):
        skip = lambda: (jax.tree.map(jnp.zeros_like, g), s)
        return jax.lax.cond(pred, lambda: tx.update(g, s, p), skip)

    return step


def _assert_state_types_stable(tx, params, grads, name):
    """init and update states agree in structure, shapes, dtypes and weak types, and
    ``lax.cond(pred, update, skip)`` type-checks (tracing it compares the branch types)."""
    s0 = jax.eval_shape(tx.init, params)
    u1, s1 = jax.eval_shape(tx.update, grads, s0, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(s0, s1)
    assert _weak_types(s0) == _weak_types(s1), name
    chex.assert_trees_all_equal_shapes_and_dtypes(u1, params)
    _, s_cond = jax.eval_shape(_cond_step(tx), True, grads, s0, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(s_cond, s0)


_OVERLAP = support.CASES_BY_NAME["relu_softmax"]


@pytest.mark.parametrize(
    ("case", "dtype"),
    [
        (CASE, jnp.float32),
        (CASE, jnp.bfloat16),
        (CASE, jnp.float64),
        (_OVERLAP, jnp.float32),
        pytest.param(_OVERLAP, jnp.bfloat16, marks=pytest.mark.slow),
        pytest.param(_OVERLAP, jnp.float64, marks=pytest.mark.slow),
    ],
    ids=lambda x: getattr(x, "name", None) or jnp.dtype(x).name,
)
def test_lax_cond_state_types_stable(case, dtype):
    """For every transform (and monitor, inject_hyperparams, MultiSteps around them), in
    float32, bfloat16 and float64 (x64): state types are stable across init, update and
    both branches of a lax.cond."""
    with jax.enable_x64(dtype == jnp.float64):
        sym = list(case.symmetries)
        params = case.params(dtype)
        grads = support.random_like(params, seed=5, scale=0.1)
        for name, tx in _cond_transforms(sym).items():
            _assert_state_types_stable(tx, params, grads, name)


@pytest.mark.parametrize("name", ["retract", "monitor"])
def test_lax_cond_around_update_runs(name):
    """Compiled and run: the updating branch equals ``update``, the skipping branch returns
    the state unchanged, and the state keeps its (single-device) shardings; the mesh case is
    test_lax_cond_shardings_stable_on_a_mesh."""
    tx = _cond_transforms(list(CASE.symmetries))[name]
    params = CASE.params()
    g = _grad_fn(CASE)(params, 0)
    s0 = tx.init(params)
    u1, s1 = support.jit(tx.update)(g, s0, params)
    step = support.jit(_cond_step(tx))
    u, s_true = step(True, g, s0, params)
    support.assert_close((u, s_true), (u1, s1), rtol=RTOL_SAME, atol=1e-6)
    _, s_false = step(False, g, s_true, params)
    support.assert_equal(s_false, s_true)
    assert _shardings(s_true) == _shardings(s0)


_SHARDED_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax, chex
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import ksbopt
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": rng.normal(size=(6, 8)), "bias": rng.normal(size=(8,))},
              "out": {"kernel": rng.normal(size=(8, 4)), "bias": np.zeros(4)}}
    specs = {"dense": {"kernel": P("data", "model"), "bias": P("model")},
             "out": {"kernel": P("model", None), "bias": P()}}
    params = jax.tree.map(
        lambda x, s: jax.device_put(jnp.asarray(x, jnp.float32), NamedSharding(mesh, s)),
        params, specs)
    sym = [ksbopt.Scale(["dense/kernel", "dense/bias"], axis=-1)]
    base = lambda: optax.sgd(0.1, momentum=0.9)
    g = jax.tree.map(lambda x: 0.01 * x, params)

    def same(a, b):
        return a.sharding.is_equivalent_to(b.sharding, a.ndim)

    for tx in (optax.chain(base(), ksbopt.retract(sym)),
               optax.chain(base(), ksbopt.steer(sym, 1.5, 0.5)),
               ksbopt.monitor(optax.chain(base(), ksbopt.retract(sym)), sym, learning_rate=0.1,
                              every=2)):
        s0 = tx.init(params)  # eagerly: param-shaped leaves get the params' shardings

        @jax.jit
        def step(pred, g, s, p):
            skip = lambda: (jax.tree.map(jnp.zeros_like, g), s)
            return jax.lax.cond(pred, lambda: tx.update(g, s, p), skip)

        u, s1 = step(True, g, s0, params)
        _, s2 = step(False, g, s1, params)
        _, s3 = step(True, g, s2, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(s0, s1, s2, s3)
        # After the first step the shardings are a fixed point, whichever branch ran.
        for a, b, c in zip(*map(jax.tree.leaves, (s1, s2, s3))):
            assert same(a, b) and same(a, c), (a.sharding, b.sharding, c.sharding)
        # ... and equal those of init, except scalars: an eager scalar lives on one device,
        # jit replicates it (optax's own counters do the same).
        for a, b in zip(*map(jax.tree.leaves, (s0, s1))):
            assert same(a, b) or a.ndim == 0, (a.shape, a.sharding, b.sharding)
        for a, b in zip(*map(jax.tree.leaves, (u, params))):
            assert same(a, b), (a.sharding, b.sharding)
    print("OK")
    """
)


@pytest.mark.slow
def test_lax_cond_shardings_stable_on_a_mesh():
    """On a 2 x 2 mesh of CPU devices (own process), kernels sharded along both axes: the
    state shardings of a jitted ``lax.cond`` step are the same in both branches and on every
    step, equal those of an eager ``init`` (scalars aside), and the updates keep the
    parameters' shardings."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
