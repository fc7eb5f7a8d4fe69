"""The shared contract battery that every public ksbopt transform passes.

A transform enters the battery as one :class:`Spec` (how to build it, its numeric
hyperparameters, where it sits in a chain); every check in :data:`CHECKS` then runs on it.
``tests/test_contract.py`` runs every entry of :data:`support.registry.TRANSFORMS` through
the checks that apply to it (:func:`applicable`); a new transform is one more entry there.

The checks:

- ``jit``: jitted, the second and third updates reuse the first trace (no recompilation);
- ``extra_args``: unknown keyword arguments are accepted and ignored (alone and in a chain);
- ``inject_hyperparams``: numeric hyperparameters can be injected and scheduled;
- ``multi_steps``: inside ``optax.MultiSteps`` the update equals one step on the mean gradient;
- ``apply_if_finite``: a NaN gradient leaves parameters and the whole state unchanged;
- ``nonfinite``: given NaN / inf updates directly, no NaN reaches the updates or the state;
- ``params_none``: ``update`` without ``params`` is a ``ValueError`` that says what to pass;
- ``bfloat16``: bfloat16 params keep their dtype; charges and state are float32;
- ``nnx``: a ``flax.nnx`` model trained through ``nnx.Optimizer(model, tx, wrt=nnx.Param)``
  matches the same steps on a plain parameter dict;
- ``linen``: a ``flax.linen`` ``{'params': ...}`` variable dict matches the plain dict too.

All checks run in float32 (the default dtype), on tiny problems from :mod:`support.problems`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ksbopt
import support
from support.registry import Spec

# The battery's default problem: BatchNorm-like Scale groups (a kernel column with its bias
# entry) next to a layer no symmetry touches, so "untouched leaves pass through" is checked
# too. The overlap and Linear numerics are covered in test_transforms.py.
CASE = support.CASES_BY_NAME["scale_batchnorm"]

# float32 tolerances of the battery. Two runs of the same float32 computation through
# different wrappers (jit vs eager, inject_hyperparams vs plain, nnx vs dict) differ only by
# reassociation in XLA: a few ulps per step, far below 1e-5 relative over 3 steps.
RTOL_SAME = 1e-5
# Charges kept by a conserving transform in float32: the retraction restores them to 64 eps
# (7.6e-6) relative and the final params + updates rounds once more.
RTOL_CHARGE_F32 = 1e-5


# --------------------------------------------------------------------------- helpers


def _grads(case: support.Case, params: Any, k: int = 0) -> Any:
    """The loss gradient, plus a deterministic perturbation for step ``k`` > 0."""
    g = jax.grad(case.loss)(params)
    if k == 0:
        return g
    noise = support.random_like(params, seed=100 + k, scale=0.05)
    return jax.tree.map(lambda a, b: (a + b).astype(a.dtype), g, noise)


def _steps(tx, case: support.Case, params: Any, n: int, update=None):
    """n steps of ``tx`` from ``params``; returns (params, state, list of updates)."""
    update = tx.update if update is None else update
    state = tx.init(params)
    out = []
    for k in range(n):
        u, state = update(_grads(case, params, k), state, params)
        out.append(u)
        params = optax.apply_updates(params, u)
    return params, state, out


def _ksb_states(state: Any) -> list:
    """The ksbopt states (ProjectState, RetractState, SteerState) inside any optax state."""
    kinds = (ksbopt.ProjectState, ksbopt.RetractState, ksbopt.SteerState)
    return [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kinds))
        if isinstance(s, kinds)
    ]


# --------------------------------------------------------------------------- the checks


def check_jit(spec: Spec, case: support.Case = CASE) -> None:
    """Jitted updates: traced once, then reused (no recompilation on later steps)."""
    params = case.params()
    tx = spec.chain(case.symmetries, loss=case.loss)
    counter = support.TraceCounter(tx.update)
    update = support.jit_max_traces(counter, n=1)
    new, _, _ = _steps(tx, case, params, 3, update=update)
    assert counter.count == 1, f"{spec.name}: traced {counter.count} times in 3 jitted updates"
    # The jitted steps are the eager steps.
    eager, _, _ = _steps(tx, case, params, 3)
    support.assert_close(new, eager, rtol=RTOL_SAME, atol=1e-6)


def check_extra_args(spec: Spec, case: support.Case = CASE) -> None:
    """Unknown keyword arguments are accepted and ignored, alone and inside a chain."""
    params = case.params()
    g = _grads(case, params)
    extra = {"value": jnp.float32(1.0), "grad": g, "unknown_flag": True}
    for tx in (
        spec.transform(case.symmetries, loss=case.loss),
        spec.chain(case.symmetries, loss=case.loss),
    ):
        state = tx.init(params)
        plain = tx.update(g, state, params)
        with_extra = tx.update(g, state, params, **extra)
        support.assert_close(with_extra, plain, rtol=0.0)


def check_inject_hyperparams(spec: Spec, case: support.Case = CASE) -> None:
    """``optax.inject_hyperparams`` accepts the numeric hyperparameters and schedules them."""
    params = case.params()
    sym = list(case.symmetries)
    # 1. Injected constants give the plain transform's steps.
    injected = optax.inject_hyperparams(spec.factory_for(case.loss))(sym, **spec.hyperparams)
    state = injected.init(params)
    # (inject_hyperparams also injects numeric arguments left at their defaults.)
    assert set(spec.hyperparams) <= set(state.hyperparams), state.hyperparams
    got, _, _ = _steps(spec.chain(sym, tx=injected, loss=case.loss), case, params, 2, update=None)
    want, _, _ = _steps(spec.chain(sym, loss=case.loss), case, params, 2)
    support.assert_close(got, want, rtol=RTOL_SAME, atol=1e-6)
    if not spec.schedules:
        return
    # 2. Scheduled: step k uses schedule(k), exactly as a transform built with those numbers.
    scheduled = optax.inject_hyperparams(spec.factory_for(case.loss))(sym, **spec.schedules)
    update = support.jit(scheduled.update)
    state = scheduled.init(params)
    for k in range(3):
        g = _grads(case, params, k)
        fixed = spec.transform(
            sym, loss=case.loss, **{n: float(f(k)) for n, f in spec.schedules.items()}
        )
        want_u, want_s = fixed.update(g, state.inner_state, params)
        u, state = update(g, state, params)
        for name, fn in spec.schedules.items():
            support.assert_close(state.hyperparams[name], jnp.float32(fn(k)), rtol=1e-7)
        support.assert_close((u, state.inner_state), (want_u, want_s), rtol=RTOL_SAME, atol=1e-6)
        params = optax.apply_updates(params, u)


def check_multi_steps(spec: Spec, case: support.Case = CASE) -> None:
    """Inside ``optax.MultiSteps(tx, 2)``: zero on the first micro-step, then one step of tx
    on the mean of the two gradients."""
    params = case.params()
    tx = spec.chain(case.symmetries, loss=case.loss)
    multi = optax.MultiSteps(tx, every_k_schedule=2)
    update = support.jit(multi.update)
    g0, g1 = _grads(case, params, 0), _grads(case, params, 1)
    state = multi.init(params)
    u0, state = update(g0, state, params)
    support.assert_equal(u0, jax.tree.map(jnp.zeros_like, params))
    u1, state = update(g1, state, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g0, g1)
    want, _ = tx.update(mean, tx.init(params), params)
    support.assert_close(u1, want, rtol=RTOL_SAME, atol=1e-6)
    if spec.conserves:
        support.assert_rel_close(
            case.charges(optax.apply_updates(params, u1)),
            case.charges(params),
            RTOL_CHARGE_F32,
            f"{spec.name} in MultiSteps",
        )


def check_apply_if_finite(spec: Spec, case: support.Case = CASE) -> None:
    """Inside ``optax.apply_if_finite``: a NaN gradient leaves params and state unchanged."""
    params = case.params()
    tx = optax.apply_if_finite(
        spec.chain(case.symmetries, loss=case.loss), max_consecutive_errors=3
    )
    update = support.jit(tx.update)
    state = tx.init(params)
    u, state = update(_grads(case, params), state, params)  # one good step first
    params = optax.apply_updates(params, u)
    bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), _grads(case, params, 1))
    u_bad, state_bad = update(bad, state, params)
    support.assert_equal(optax.apply_updates(params, u_bad), params)
    support.assert_equal(state_bad.inner_state, state.inner_state)
    assert int(state_bad.notfinite_count) == 1
    assert int(state_bad.total_notfinite) == 1
    # ... and training goes on from there.
    u, state = update(_grads(case, params, 2), state_bad, params)
    support.assert_finite((u, state))
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(u)) > 0


def check_nonfinite(spec: Spec, case: support.Case = CASE) -> None:
    """NaN or inf updates given to the transform itself: no NaN or inf reaches the leaves the
    symmetries act on or the state; those leaves get a zero update and the state is kept.

    Leaves no symmetry touches pass through as they came (sanitising them is the job of
    ``optax.apply_if_finite``, see ``check_apply_if_finite``).
    """
    params = case.params()
    tx = spec.transform(case.symmetries, loss=case.loss)
    update = support.jit(tx.update)
    state = tx.init(params)
    u, state = update(_grads(case, params), state, params)
    params = optax.apply_updates(params, u)
    if spec.nonfinite == "all":
        touched = set(range(len(jax.tree.leaves(params))))
    else:
        touched = {i for b in case.bind(params).bound for i in b.leaves}
    for bad_value in (jnp.nan, jnp.inf, -jnp.inf):
        bad = jax.tree.map(lambda x, v=bad_value: x.at[(0,) * x.ndim].set(v), u)
        u_bad, state_bad = update(bad, state, params)
        support.assert_finite(state_bad)
        support.assert_equal(state_bad, state)
        for i, (got, sent) in enumerate(zip(jax.tree.leaves(u_bad), jax.tree.leaves(bad))):
            if i in touched:
                support.assert_equal(got, jnp.zeros_like(sent))
            else:
                support.assert_equal(got, sent)


def check_params_none(spec: Spec, case: support.Case = CASE) -> None:
    """A transform that needs params says so when ``params`` is missing."""
    if not spec.needs_params:
        pytest.skip(f"{spec.name} does not need params")
    params = case.params()
    tx = spec.transform(case.symmetries, loss=case.loss)
    state = tx.init(params)
    g = _grads(case, params)
    # (The exact wording for project / retract / steer: test_transforms.py.)
    for call in (lambda: tx.update(g, state), lambda: tx.update(g, state, None)):
        with pytest.raises(ValueError, match=r"params=None"):
            call()


def check_bfloat16(spec: Spec, case: support.Case = CASE) -> None:
    """bfloat16 params keep their dtype; charges and ksbopt state are float32."""
    params = case.params(jnp.bfloat16)
    tx = spec.chain(case.symmetries, loss=case.loss)
    update = support.jit(tx.update)
    new, state, updates = _steps(tx, case, params, 2, update=update)
    for u in updates:
        support.assert_dtypes(u, params)
    support.assert_dtypes(new, params)
    support.assert_finite((new, state))
    q = case.charges(new)
    assert all(x.dtype == jnp.float32 for x in q), [x.dtype for x in q]
    # Charges of bfloat16 params are exact: the promotion to float32 loses nothing.
    as_f32 = jax.tree.map(lambda x: x.astype(jnp.float32), new)
    support.assert_equal(q, case.charges(as_f32))
    for s in _ksb_states(state):
        for leaf in jax.tree.leaves(s):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert leaf.dtype == jnp.float32, (spec.name, s)
    if spec.conserves:
        # The retraction is exact in float32; storing the result in bfloat16 (8 significant
        # bits) rounds each entry by <= 2^-9 relative, so a sum of squares moves by
        # <= 2 * 2^-9 ~ 4e-3 relative; 2^-6 leaves room for the two steps' rounding of w.
        support.assert_rel_close(q, case.charges(params), 2.0**-6, f"{spec.name} bfloat16")


# ---- flax models: the same MLP as nnx, linen and a plain dict

_X = np.random.default_rng(60).normal(size=(8, 3)).astype(np.float32)
_Y = np.random.default_rng(61).normal(size=(8, 2)).astype(np.float32)


def _mlp_loss(p: Mapping) -> jax.Array:
    h = jax.nn.relu(_X @ p["l1"]["kernel"] + p["l1"]["bias"])
    return jnp.mean(jnp.square(h @ p["l2"]["kernel"] + p["l2"]["bias"] - _Y))


_MLP_CASE = support.Case(
    "mlp_dict",
    lambda: {},
    _mlp_loss,
    (ksbopt.Rescale(incoming=["l1/kernel", "l1/bias"], outgoing="l2/kernel"),),
)


def _flax_loss(p: Mapping) -> jax.Array:
    """The MLP's loss on a plain, linen (``{'params': ...}``) or nnx parameter tree."""
    return _mlp_loss(p["params"] if "params" in p else p)


def _flax_symmetries(spec: Spec) -> tuple:
    return _MLP_CASE.symmetries if spec.flax_symmetries is None else tuple(spec.flax_symmetries)


def _reference_steps(spec: Spec, params: Mapping, n: int) -> Mapping:
    """n steps of the chain on the plain-dict twin of the flax models."""
    tx = spec.chain(_flax_symmetries(spec), loss=_flax_loss)
    state = tx.init(params)
    for _ in range(n):
        u, state = tx.update(jax.grad(_mlp_loss)(params), state, params)
        params = optax.apply_updates(params, u)
    return params


def check_nnx(spec: Spec, case: support.Case = CASE) -> None:
    """``nnx.Optimizer(model, tx, wrt=nnx.Param)`` trains like the plain dict does."""
    del case
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 4, rngs=rngs)
            self.l2 = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    model = MLP(nnx.Rngs(0))
    start = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    syms = _flax_symmetries(spec)
    optimizer = nnx.Optimizer(model, spec.chain(syms, loss=_flax_loss), wrt=nnx.Param)

    def loss(m):
        return jnp.mean(jnp.square(m(_X) - _Y))

    for _ in range(3):
        optimizer.update(model, nnx.grad(loss)(model))
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    want = _reference_steps(spec, start, 3)
    support.assert_close(got, want, rtol=RTOL_SAME, atol=1e-6)
    assert support.rel_err(got, start) > 1e-3, "the nnx model did not move"
    if spec.conserves:
        support.assert_rel_close(
            ksbopt.charges(got, list(syms)),
            ksbopt.charges(start, list(syms)),
            RTOL_CHARGE_F32,
            "nnx",
        )


def check_linen(spec: Spec, case: support.Case = CASE) -> None:
    """A ``flax.linen`` ``{'params': {...}}`` dict: same steps as the plain dict."""
    del case
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="l2")(jax.nn.relu(nn.Dense(4, name="l1")(x)))

    model = MLP()
    variables = model.init(jax.random.key(0), _X)
    assert set(variables) == {"params"}

    def loss(v):
        return jnp.mean(jnp.square(model.apply(v, _X) - _Y))

    syms = _flax_symmetries(spec)
    tx = spec.chain(syms, loss=_flax_loss)
    update = support.jit(tx.update)
    v, state = variables, tx.init(variables)
    for _ in range(3):
        u, state = update(jax.grad(loss)(v), state, v)
        v = optax.apply_updates(v, u)
    want = _reference_steps(spec, variables["params"], 3)
    support.assert_close(v["params"], want, rtol=RTOL_SAME, atol=1e-6)
    if spec.conserves:
        support.assert_rel_close(
            ksbopt.charges(v, list(syms)),
            ksbopt.charges(variables, list(syms)),
            RTOL_CHARGE_F32,
            "linen",
        )


CHECKS: tuple[Callable[[Spec], None], ...] = (
    check_jit,
    check_extra_args,
    check_inject_hyperparams,
    check_multi_steps,
    check_apply_if_finite,
    check_nonfinite,
    check_params_none,
    check_bfloat16,
    check_nnx,
    check_linen,
)


def applicable(spec: Spec) -> tuple[Callable[[Spec], None], ...]:
    """The checks that apply to ``spec``.

    Left out: ``check_nonfinite`` where non-finite updates are passed on (``nonfinite ==
    "wrapped"``: ``check_apply_if_finite`` covers them); ``check_nnx`` / ``check_linen``
    where the transform does not take the flax MLP's declarations (a Rescale); every check
    not in ``spec.contract_checks`` when that is given.
    """
    names = {c.__name__ for c in CHECKS} if spec.contract_checks is None else spec.contract_checks
    out = []
    for check in CHECKS:
        name = check.__name__
        if name not in names:
            continue
        if name == "check_nonfinite" and spec.nonfinite == "wrapped":
            continue
        if name in ("check_nnx", "check_linen") and not spec.accepts(_flax_symmetries(spec)):
            continue
        out.append(check)
    return tuple(out)


def run_battery(spec: Spec, case: support.Case = CASE) -> None:
    """Run every applicable check on one transform (outside pytest parametrisation)."""
    for check in applicable(spec):
        check(spec, case)
