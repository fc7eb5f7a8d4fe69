"""Edge cases of every public transform: docs/edge_cases.md, checked case by case.

The contract battery (tests/support/contract.py) already checks, per transform, a NaN / inf update
on one entry (``check_nonfinite``) and a NaN gradient inside ``optax.apply_if_finite``
(``check_apply_if_finite``); tests/test_transforms.py and the per-module files check
zero-norm groups. This file adds what they leave out, for every transform at once:

- the float32 range: parameters scaled by 1e-30 and 1e30 (charges that underflow to 0 and
  overflow to inf), gradients scaled by 1e-30 and 1e30;
- zero-norm groups, all-zero symmetric leaves, all-zero gradients, and a NaN / inf / -inf
  gradient entry, for the transforms outside the battery's ``check_nonfinite`` as well;
- scalar leaves, zero-size leaves, empty selections and declarations.

One scenario is (params, first gradient, second gradient). All scenarios of a transform are
stacked and run by a jitted ``vmap`` of ``init`` and of one update (called twice), so each
transform compiles twice. Transforms that skip a non-finite step on their own run as they
are; the peers and the monitor (whose updates are the wrapped optimizer's) run inside
``optax.apply_if_finite``, the documented tool for them. The checks:

1. no NaN anywhere in the parameters or the state, after init and after each step;
2. no infinity either, except in the state of the scenarios that leave the float32 range
   (a charge of 1e30-sized weights is inf; Adam-like second moments of 1e30 gradients are
   inf, as in ``optax.adam``);
3. a non-finite gradient skips the step: the state after it equals the state before, and
   the parameters it guards do not move;
4. the documented behaviour of project / retract / steer at the float32 range limits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import support
from support import registry

import ksbopt
from ksbopt._src.symmetries import orbit

# --------------------------------------------------------------------------- problems

# A BatchNorm-like Scale on a kernel and its bias, a scalar leaf that is its own scale group
# (axis=None), and a leaf no symmetry touches.
SCALE_SHAPES = {"k": (3, 4), "b": (4,), "s": (), "other": (2,)}
SCALE_SYMS = (ksbopt.Scale(["k", "b"], axis=-1), ksbopt.Scale("s", axis=None))
# Rescale of a ReLU layer into a softmax head that also carries a Translation (they overlap
# on head/kernel: joint solves), and a Linear pair.
MIXED_SHAPES = {
    "a": {"kernel": (3, 4), "bias": (4,)},
    "head": {"kernel": (4, 3), "bias": (3,)},
    "lin": {"A": (2, 3), "B": (3, 2)},
    "other": (2,),
}
MIXED_SYMS = (
    ksbopt.Rescale(incoming=["a/kernel", "a/bias"], outgoing="head/kernel"),
    ksbopt.Translation(["head/kernel", "head/bias"]),
    ksbopt.Linear(left="lin/A", right="lin/B"),
)

FINITE = (
    "random",
    "zero_group",
    "zero_params",
    "zero_grads",
    "tiny_params",
    "huge_params",
    "tiny_grads",
    "huge_grads",
)
NONFINITE = ("nan_grad", "inf_grad", "neg_inf_grad")
SCENARIOS = FINITE + NONFINITE
# Scenarios whose state may hold an infinity (never a NaN): see the module docstring.
OUT_OF_RANGE = ("huge_params", "huge_grads")


def _random_tree(shapes: dict, seed: int, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.normal(size=s), jnp.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _touched(params, syms) -> list[int]:
    """Indices of the leaves some symmetry acts on."""
    return sorted({i for b in orbit.bind(tuple(syms), params).bound for i in b.leaves})


def _zero_first_group(params, syms):
    """Zero the first group of every Scale / Rescale (and the first k-direction of Linear)."""
    treedef = jax.tree.structure(params)
    flat = jax.tree.leaves(params)
    for b in orbit.bind(tuple(syms), params).bound:
        if b.symmetry.kind == "translation":
            continue  # a translation group has no norm to vanish
        for part in b.parts:
            x = flat[part.leaf]
            idx = [slice(None)] * x.ndim
            if b.symmetry.kind == "linear":
                idx[part.k_axis] = 0
            else:
                for a in part.group_axes:
                    idx[a] = slice(0, part.block)
            flat[part.leaf] = x.at[tuple(idx)].set(0.0)
    return jax.tree.unflatten(treedef, flat)


def scenarios(shapes: dict, syms) -> dict[str, tuple]:
    """name -> (params, first gradient, second gradient), float32."""
    params = _random_tree(shapes, 0)
    g = _random_tree(shapes, 1, scale=0.1)
    touched = _touched(params, syms)
    treedef = jax.tree.structure(params)

    def on_touched(tree, fn):
        flat = jax.tree.leaves(tree)
        return jax.tree.unflatten(
            treedef, [fn(x) if i in touched else x for i, x in enumerate(flat)]
        )

    def scaled(tree, factor):
        return jax.tree.map(lambda x: x * factor, tree)

    def bad(value):  # one non-finite entry on a leaf a symmetry acts on
        flat = jax.tree.leaves(g)
        i = touched[0]
        flat[i] = flat[i].at[(0,) * flat[i].ndim].set(value)
        return jax.tree.unflatten(treedef, flat)

    zero_g = scaled(g, 0.0)
    out = {
        "random": (params, g, g),
        "zero_group": (_zero_first_group(params, syms), g, g),
        "zero_params": (on_touched(params, jnp.zeros_like), g, g),
        "zero_grads": (params, zero_g, zero_g),
        "tiny_params": (on_touched(params, lambda x: x * 1e-30), g, g),
        "huge_params": (on_touched(params, lambda x: x * 1e30), g, g),
        "tiny_grads": (params, scaled(g, 1e-30), scaled(g, 1e-30)),
        "huge_grads": (params, scaled(g, 1e30), scaled(g, 1e30)),
        "nan_grad": (params, g, bad(jnp.nan)),
        "inf_grad": (params, g, bad(jnp.inf)),
        "neg_inf_grad": (params, g, bad(-jnp.inf)),
    }
    assert tuple(out) == SCENARIOS
    return out


def _loss_scale(p):
    """Scale invariant in each column of k (NaN at a zero column: teleport must cope)."""
    k = p["k"]
    return jnp.sum(jnp.sin(3 * k / jnp.linalg.norm(k, axis=0))) + jnp.sum(jnp.square(p["other"]))


# --------------------------------------------------------------------------- transforms

# Every optimizer of the registry (building blocks left out). A non-finite gradient skips
# the step as its ``nonfinite`` says: "touched": zero updates on the leaves a symmetry acts
# on, others pass through, state kept (project / retract / steer); "all": zero updates
# everywhere, state kept; "wrapped": the transform runs inside optax.apply_if_finite (the
# peers, which follow optax in letting a NaN through, and the monitor, which returns the
# wrapped optimizer's updates unchanged).
SPECS = {spec.name: spec for spec in registry.optimizers()}
SLOW = pytest.mark.slow
# The second declaration family runs where the transform accepts Rescale / Translation /
# Linear; it adds the joint (overlapping) solves and the Newton retraction (slow to compile).
MIXED = tuple(n for n, s in SPECS.items() if s.declarations and s.accepts(MIXED_SYMS))
CORE = ("project", "retract", "steer")


def _build(name: str, syms):
    spec = SPECS[name]
    loss = _loss_mixed if syms is MIXED_SYMS else _loss_scale
    tx = spec.transform(syms, loss=loss)
    return (optax.apply_if_finite(tx, 10) if spec.nonfinite == "wrapped" else tx), spec.nonfinite


def _loss_mixed(p):
    x = jnp.arange(15.0).reshape(5, 3) / 15
    h = jax.nn.relu(x @ p["a"]["kernel"] + p["a"]["bias"])
    logits = h @ p["head"]["kernel"] + p["head"]["bias"]
    deep = x[:, :2] @ p["lin"]["A"] @ p["lin"]["B"]
    return -jnp.mean(jax.nn.log_softmax(logits)[:, 0]) + jnp.mean(jnp.square(deep))


def _run_all(name: str, shapes: dict, syms):
    """init + two updates of the transform on every scenario (vmapped)."""
    tx, skip = _build(name, syms)

    def step(g, state, params):
        u, state = tx.update(g, state, params)
        return u, state, optax.apply_updates(params, u)

    # Two programs, the step called twice: the state of the first step is materialised
    # before the second (as in training), so "state kept" can be checked bit for bit.
    init, step = support.jit(jax.vmap(tx.init)), support.jit(jax.vmap(step))
    sc = scenarios(shapes, syms)
    params, g1, g2 = jax.tree.map(lambda *xs: jnp.stack(xs), *sc.values())
    s0 = init(params)
    u1, s1, p1 = step(g1, s0, params)
    u2, s2, p2 = step(g2, s1, p1)
    out = (s0, u1, p1, s1, u2, p2, s2)
    results = {}
    for j, key in enumerate(sc):
        s0, u1, p1, s1, u2, p2, s2 = jax.tree.map(lambda x, j=j: np.asarray(x[j]), out)
        results[key] = {"in": sc[key], "s0": s0, "u1": u1, "p1": p1, "s1": s1}
        results[key] |= {"u2": u2, "p2": p2, "s2": s2}
    return results, skip


def _nonfinite_paths(tree, allow_inf: bool) -> list[str]:
    bad = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not jnp.issubdtype(np.asarray(x).dtype, np.inexact):
            continue
        x = np.asarray(x)
        if np.isnan(x).any() or (not allow_inf and np.isinf(x).any()):
            bad.append(jax.tree_util.keystr(path))
    return bad


def _inner(state, skip):
    """The state the transform keeps (inside apply_if_finite: its inner state)."""
    return state.inner_state if skip == "wrapped" else state


def _check(name: str, results: dict, skip: str, touched: list[int]) -> None:
    for key, r in results.items():
        where = f"{name} / {key}"
        # 1-2. no NaN anywhere; no inf in params, nor in the state unless out of range.
        assert not _nonfinite_paths((r["p1"], r["p2"]), allow_inf=False), where
        states = (r["s0"], r["s1"], r["s2"])
        bad = _nonfinite_paths(states, allow_inf=key in OUT_OF_RANGE)
        assert not bad, f"{where}: non-finite state at {bad}"
        if key not in NONFINITE:
            continue
        # 3. the non-finite second step is skipped: state kept, guarded leaves unmoved.
        support.assert_equal(_inner(r["s2"], skip), _inner(r["s1"], skip))
        p1, p2 = jax.tree.leaves(r["p1"]), jax.tree.leaves(r["p2"])
        guarded = touched if skip == "touched" else range(len(p1))
        for i in guarded:
            np.testing.assert_array_equal(p2[i], p1[i], err_msg=where)
        if skip == "wrapped":
            assert int(r["s2"].notfinite_count) == 1, where


def _scale_case_ids():
    return [pytest.param(n, marks=SLOW) if s.is_slow("edge") else n for n, s in SPECS.items()]


@pytest.mark.parametrize("name", _scale_case_ids())
def test_scale_groups_no_nan_and_skipped_steps(name):
    params = scenarios(SCALE_SHAPES, SCALE_SYMS)["random"][0]
    results, skip = _run_all(name, SCALE_SHAPES, SCALE_SYMS)
    _check(name, results, skip, _touched(params, SCALE_SYMS))


@SLOW
@pytest.mark.parametrize("name", MIXED)
def test_rescale_translation_linear_no_nan_and_skipped_steps(name):
    """The same on Rescale + Translation (overlapping) + Linear; out-of-range params are
    left to test_overflowing_charges_are_inf_not_nan (a known NaN, see there)."""
    params = scenarios(MIXED_SHAPES, MIXED_SYMS)["random"][0]
    results, skip = _run_all(name, MIXED_SHAPES, MIXED_SYMS)
    del results["huge_params"]
    _check(name, results, skip, _touched(params, MIXED_SYMS))


# --------------------------------------------------------------------------- documented


@pytest.fixture(scope="module")
def core_results():
    """project, retract and steer alone on the Scale scenarios (one compile each)."""
    return {name: _run_all(name, SCALE_SHAPES, SCALE_SYMS)[0] for name in CORE}


def _touched_leaves(tree):
    """k, b, s: the leaves of SCALE_SHAPES the symmetries act on (jax.tree order b, k, ...)."""
    return {k: tree[k] for k in ("k", "b", "s")}


def test_charges_at_the_float32_range_limits():
    """Charges underflow to 0 below |w| ~ 1e-19 and overflow to inf above ~1.8e19 in
    float32; exact and finite in float64."""
    sc = scenarios(SCALE_SHAPES, SCALE_SYMS)
    charges = support.jit(lambda p: ksbopt.charges(p, list(SCALE_SYMS)))
    for key in ("zero_params", "tiny_params"):
        for q in charges(sc[key][0]):
            np.testing.assert_array_equal(q, 0.0, err_msg=key)
    for q in charges(sc["huge_params"][0]):
        assert np.all(np.isposinf(q))
    q = charges(sc["zero_group"][0])[0]
    assert q[0] == 0 and np.all(q[1:] > 0)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), sc["random"][0])
        q64 = charges(p64)
        for factor in (1e-30, 1e30):
            scaled = charges(jax.tree.map(lambda x, f=factor: x * f, p64))
            # Scaling by f multiplies each charge by f^2 exactly up to rounding: a few ulps.
            support.assert_close(
                scaled, jax.tree.map(lambda q, f=factor: q * f**2, q64), rtol=1e-14
            )


def test_project_retract_steer_at_the_range_limits(core_results):
    """What docs/edge_cases.md says about tiny, huge and zero groups and zero gradients."""
    for name, results in core_results.items():
        # |w| = 1e30: the charges overflow to inf. retract and steer treat that as
        # non-finite input: zero update on every leaf the symmetries act on. project divides
        # by the overflowed |w|^2: coefficient 0, the update passes through as it came.
        # (Adding 0.1-sized updates to 1e30 weights rounds away anyway: the update itself is
        # what shows the behaviour.)
        r = results["huge_params"]
        got, sent = _touched_leaves(r["u1"]), _touched_leaves(r["in"][1])
        want = sent if name == "project" else jax.tree.map(jnp.zeros_like, sent)
        support.assert_equal(got, jax.tree.map(np.asarray, want))
        np.testing.assert_array_equal(r["u1"]["other"], r["in"][1]["other"])
        # |w| = 1e-30: the charges underflow to 0, so the groups count as zero-norm: project
        # and retract pass the update through as it came (steer moves towards its target).
        r = results["tiny_params"]
        if name in ("project", "retract"):
            got, sent = _touched_leaves(r["u1"]), _touched_leaves(r["in"][1])
            support.assert_equal(got, jax.tree.map(np.asarray, sent))
    # Zero gradients: project and retract return exact zeros (no drift from rounding).
    for name in ("project", "retract"):
        for leaf in jax.tree.leaves(core_results[name]["zero_grads"]["u1"]):
            np.testing.assert_array_equal(leaf, 0.0, err_msg=name)
    # steer moves a zero-gradient step to the target charge all the same (rate 0.5 of the
    # way: Q = Q0 + 0.5 (1.5 - Q0)), in float32 to 1e-5 relative.
    r = core_results["steer"]["zero_grads"]
    q0 = ksbopt.charges(r["in"][0], list(SCALE_SYMS))
    q1 = ksbopt.charges(jax.tree.map(jnp.asarray, r["p1"]), list(SCALE_SYMS))
    want = jax.tree.map(lambda q: q + 0.5 * (1.5 - q), q0)
    support.assert_rel_close(q1, want, 1e-5, "steer from a zero gradient")


def test_scalar_leaf_is_a_one_number_group(core_results):
    """Scale("s", axis=None) on a scalar: the generator spans the whole group, so project
    removes every update of it and retract keeps |s| (float32: 1 ulp of rounding)."""
    r = core_results["project"]["random"]
    assert r["u1"]["s"] == 0.0
    r = core_results["retract"]["random"]
    s0 = abs(float(r["in"][0]["s"]))
    for key in ("p1", "p2"):
        assert abs(abs(float(r[key]["s"])) - s0) <= 2 * np.finfo(np.float32).eps * s0


def test_scalar_leaf_with_a_unit_axis_is_a_clear_error():
    """A scalar has no unit axis: the error says so and proposes axis=None."""
    params = {"s": jnp.float32(2.0), "k": jnp.ones((2, 3))}
    for sym in (ksbopt.Scale("s", axis=-1), ksbopt.Translation("s")):
        with pytest.raises(ValueError, match=r"'s'.*shape \(\)") as err:
            ksbopt.charges(params, sym)
        assert "axis=None" in str(err.value) or "scalar" in str(err.value), str(err.value)


def test_empty_selections_and_declarations_fail_early():
    """An empty selector or declaration list: ValueError at construction; a selector that
    matches nothing: ValueError at init, naming the selector and the available paths."""
    for make in (
        lambda: ksbopt.Scale([]),
        lambda: ksbopt.Rescale([], "b"),
        lambda: ksbopt.Translation([]),
        lambda: ksbopt.Linear("a", []),
    ):
        with pytest.raises(ValueError, match=r"selector=\[\] selects nothing"):
            make()
    takes_declarations = [s for s in registry.TRANSFORMS if s.declarations]
    for make in (
        *(lambda syms, s=s: s.transform(syms, loss=_loss_scale) for s in takes_declarations),
        lambda s: ksbopt.charges({"w": jnp.ones(2)}, s),
    ):
        with pytest.raises(ValueError, match=r"symmetries=\[\] declares nothing"):
            make([])
    params = {"dense": {"kernel": jnp.ones((2, 3))}}
    with pytest.raises(ValueError, match=r"'conv/kernel' matches no leaf.*'dense/kernel'"):
        ksbopt.retract(ksbopt.Scale("conv/kernel")).init(params)


def test_zero_size_leaves_give_empty_or_zero_groups():
    """A leaf with a zero-length axis: no groups along it (charge shape (0,)), or groups
    with no entries (charge 0); every transform stays finite and moves nothing there."""
    params = {"k": jnp.ones((3, 0)), "b": jnp.ones((0,)), "e": jnp.ones((0, 4)), "w": jnp.ones(2)}
    syms = [ksbopt.Scale(["k", "b"]), ksbopt.Scale("e", axis=-1), ksbopt.Scale("w", axis=None)]
    q = ksbopt.charges(params, syms)
    assert [x.shape for x in q] == [(0,), (4,), (1,)]
    np.testing.assert_array_equal(q[1], 0.0)
    g = jax.tree.map(jnp.ones_like, params)
    txs = [
        ksbopt.project(syms),
        ksbopt.retract(syms),
        ksbopt.steer(syms, 1.0),
        ksbopt.monitor(optax.sgd(0.1), syms),
    ]

    @support.jit
    def run(params, g):
        return [tx.update(g, tx.init(params), params) for tx in txs]

    for u, state in run(params, g):
        support.assert_finite((u, state))
        assert u["e"].shape == (0, 4)


def test_channel_groups_of_a_zero_unit_leaf_are_a_value_error():
    """Scale(groups=G) on a leaf with 0 units along the axis: 0 units cannot be split into
    G groups of equal size, a ValueError like any count that G does not divide (found by
    tests/test_properties.py: it was a ZeroDivisionError at init).
    """
    params = {"conv": {"kernel": jnp.ones((3, 0)), "bias": jnp.ones((0,))}}
    with pytest.raises(ValueError, match=r"groups=2 does not divide the 0 units"):
        ksbopt.charges(params, ksbopt.Scale("conv/*", axis=-1, groups=2))


def test_float64_has_room_where_float32_overflows(x64):
    """The same 1e-30 and 1e30 weights in float64: retract keeps the charges to 1e-12
    relative (one closed-form move, a few ulps; the bar is THEORY.md's float64 one)."""
    sc = scenarios(SCALE_SHAPES, SCALE_SYMS)
    tx = ksbopt.retract(list(SCALE_SYMS))

    @support.jit
    def run(params, g):
        u, _ = tx.update(g, tx.init(params), params)
        new = optax.apply_updates(params, u)
        return ksbopt.charges(params, list(SCALE_SYMS)), ksbopt.charges(new, list(SCALE_SYMS))

    for key, factor in (("tiny_params", 1e-30), ("huge_params", 1e30)):
        params = jax.tree.map(lambda x: np.asarray(x, np.float64), sc[key][0])
        g = jax.tree.map(lambda x, f=factor: np.asarray(x, np.float64) * f, sc[key][1])
        q0, q1 = run(params, g)
        assert all(np.all(np.isfinite(q)) and np.all(q > 0) for q in q0), key
        support.assert_rel_close(q1, q0, 1e-12, key)


def test_overflowing_charges_are_inf_not_nan():
    """|w| = 1e30 in float32: a Rescale or Linear charge is a difference of two overflowing
    squared norms. Computed directly it is inf - inf = NaN; ksbopt recomputes it from the
    leaves scaled by a power of two (``without_overflow`` of the bound symmetries): +-inf or
    finite, never NaN.
    """
    params = scenarios(MIXED_SHAPES, MIXED_SYMS)["huge_params"][0]
    charges = support.jit(lambda p: ksbopt.charges(p, list(MIXED_SYMS)))(params)
    state = ksbopt.retract(list(MIXED_SYMS)).init(params)
    assert not _nonfinite_paths((charges, state), allow_inf=True), (charges, state)


def test_balanced_overflowing_rescale_skips_the_step():
    """|w_in| = |w_out| = 1e20 per unit in float32: both squared norms overflow, yet the
    guarded charge is finite (Q = m^2 Q(w / m) = 0). The move's own arithmetic (x_in, x_out)
    overflows, so retract and steer measure the candidate without the guard and skip the
    step on the symmetry's leaves (zero update, state unchanged) instead of passing an
    unretracted step through; the public charges keep the guard (exactly 0 here)."""
    # Two entries per unit on each side: |w_in|^2 = |w_out|^2 = 2e40 > 3.4e38.
    params = {"a": jnp.full((2, 4), 1e20, jnp.float32), "b": jnp.full((4, 2), 1e20, jnp.float32)}
    sym = ksbopt.Rescale("a", "b", incoming_axis=-1, outgoing_axis=0)
    grads = {"a": jnp.full((2, 4), 0.1, jnp.float32), "b": jnp.full((4, 2), -0.1, jnp.float32)}
    np.testing.assert_array_equal(ksbopt.charges(params, sym)[0], 0.0)
    for tx in (ksbopt.retract([sym]), ksbopt.steer([sym], "initial", rate=0.5)):
        state = tx.init(params)
        u, new_state = support.jit(tx.update)(grads, state, params)
        for leaf in jax.tree.leaves(u):
            np.testing.assert_array_equal(leaf, 0.0)
        support.assert_equal(new_state, state)
