"""The orbit module: declarations bound to a tree, the joint projection on the generators and
the joint orbit move, for single and overlapping symmetries.

In float64 on the exactly symmetric toy problems of :mod:`support.problems`:

- :func:`orbit.project` is the orthogonal projection off the span of all generators: the
  projected step has no component along any generator (J^T P u = 0, to rounding relative to
  |J^T u|), the removed part is J c with the returned coefficients, and projecting twice
  changes nothing;
- :func:`orbit.move` lands on the target charges (relative residual below the solver's
  64 eps) and stays on the orbit of w + u: the loss, invariant along the orbit, is unchanged
  to rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import support

import ksbopt
from ksbopt._src.symmetries import orbit

EPS64 = float(np.finfo(np.float64).eps)
# Orthogonality after a Gram solve in float64: the residual J^T P u is rounding of a sum over
# a few dozen entries relative to |J^T u|; 1e-12 (~5000 eps) leaves room for the Gram
# matrix's condition number on these problems (below 1e2) and nothing for a missed
# generator, which leaves an O(1) component.
RTOL_ORTHO = 1e-12
# Loss invariance along an orbit: the toy losses are exactly invariant, so the loss at the
# moved point differs from the loss at w + u by the rounding of both evaluations.
RTOL_LOSS = 1e-12


def _flat(tree):
    return jax.tree.leaves(tree)


def _unflatten(like, flat):
    return jax.tree.unflatten(jax.tree.structure(like), flat)


def _reduce_all(binding, flat, u):
    """J^T u per symmetry, as one vector."""
    return np.concatenate([np.ravel(b.reduce(flat, u)) for b in binding.bound])


# --------------------------------------------------------------------------- declarations


def test_as_symmetries_accepts_one_or_a_list():
    s = ksbopt.Scale("w")
    assert orbit.as_symmetries(s) == (s,)
    assert orbit.as_symmetries([s, ksbopt.Translation("b")]) == (s, ksbopt.Translation("b"))


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("w", TypeError, r"symmetries='w' must be a Symmetry or a list of them"),
        ([], ValueError, r"symmetries=\[\] declares nothing"),
        (["w"], TypeError, r"symmetries holds 'w' of type str; each entry must be"),
        ([ksbopt.Scale("w"), ksbopt.Scale("w")], ValueError, r"declares .* twice"),
    ],
)
def test_as_symmetries_rejects_with_the_fix(value, error, match):
    with pytest.raises(error, match=match):
        orbit.as_symmetries(value)


def test_bind_finds_the_overlapping_components_and_caches():
    # relu_softmax: a Rescale and a Translation that share head/kernel: one joint component.
    case = support.CASES_BY_NAME["relu_softmax"]
    binding = case.bind(case.params())
    assert binding.components == ((0, 1),)
    assert binding.n_leaves == len(_flat(case.params()))
    # The same structure binds to the very same (cached) binding.
    assert orbit.bind(tuple(case.symmetries), case.params()) is binding
    # Disjoint declarations: one component each.
    params = {"a": jnp.ones((2, 3)), "b": jnp.ones((3,))}
    two = orbit.bind((ksbopt.Scale("a"), ksbopt.Translation("b")), params)
    assert two.components == ((0,), (1,))


def test_two_scale_groups_on_one_leaf_are_a_conflict():
    params = {"k": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match=r"both claim \['k'\] as Scale groups"):
        orbit.bind((ksbopt.Scale("k", axis=-1), ksbopt.Scale("k", axis=None)), params)


def test_transforms_that_need_params_name_the_fix():
    tx = ksbopt.retract(ksbopt.Scale("w", axis=None))
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"ksbopt.retract needs the current parameters"):
        tx.update(params, tx.init(params))


# --------------------------------------------------------------------------- projection


@pytest.mark.parametrize("case", support.ALL_CASES, ids=repr)
def test_project_is_the_orthogonal_projection_off_the_generators(x64, case):
    params = case.params()
    binding = case.bind(params)
    w = _flat(params)
    u = _flat(support.random_like(params, seed=7))
    pu, coefs, _ = orbit.project(binding, w, u)
    # 1. nothing left along any generator
    before = np.max(np.abs(_reduce_all(binding, w, u)))
    after = np.max(np.abs(_reduce_all(binding, w, pu)))
    assert after <= RTOL_ORTHO * before, (after, before)
    # 2. what was removed is J c with the returned coefficients
    removed = [jnp.zeros_like(x) for x in w]
    for b, c in zip(binding.bound, coefs):
        for i, v in b.expand(w, c).items():
            removed[i] = removed[i] + v
    # (inf-norm relative over the tree: a few eps of the largest entry; measured <= 4e-16)
    support.assert_rel_close([a - b for a, b in zip(u, pu)], removed, 1e-13, "J c")
    # 3. a projection: applying it again changes nothing (to rounding)
    ppu, _, _ = orbit.project(binding, w, pu)
    # (what the second pass removes is the first one's rounding, cond(J^T J) eps |u|: the
    # Linear Gram matrices here have cond up to ~4e4 and the joint one of linear3 is worse,
    # so 1e-9 |u| as for ksbopt.project; measured <= 1e-11 |u|)
    u_max = max(float(jnp.max(jnp.abs(x))) for x in u)
    support.assert_close(ppu, pu, rtol=0.0, atol=1e-9 * u_max)
    # 4. leaves no symmetry touches pass through bit for bit
    touched = {i for b in binding.bound for i in b.leaves}
    for i in set(range(len(w))) - touched:
        np.testing.assert_array_equal(pu[i], u[i])


def test_tangent_coefficients_of_a_generator_are_its_coefficients(x64):
    """u = J c exactly along the generators: the projection recovers c and leaves 0."""
    case = support.CASES_BY_NAME["relu_softmax"]
    params = case.params()
    binding = case.bind(params)
    w = _flat(params)
    rng = np.random.default_rng(3)
    c0 = [jnp.asarray(rng.normal(size=b.charge_shape)) for b in binding.bound]
    u = [jnp.zeros_like(x) for x in w]
    for b, c in zip(binding.bound, c0):
        for i, v in b.expand(w, c).items():
            u[i] = u[i] + v
    pu, coefs, _ = orbit.project(binding, w, u)
    scale = max(float(jnp.max(jnp.abs(x))) for x in u)
    support.assert_close(pu, [jnp.zeros_like(x) for x in u], rtol=0.0, atol=1e-12 * scale)
    # The span is what is determined; the coefficients are when the generators are independent.
    support.assert_close(coefs, c0, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- moves


@pytest.mark.parametrize("case", support.ALL_CASES, ids=repr)
def test_move_lands_on_the_targets_on_the_same_orbit(x64, case):
    """Retract's use: w + u' has the charges of w, and the same loss as w + u.

    The step is SGD-sized (1% of the weights), where the joint solves (Newton; sweeps where a
    Linear overlaps) converge within their caps. Charges per symmetry, relative to its
    largest charge (Linear: to |A|^2 + |B|^2, the scale of the solver's tolerance): within the
    solver's 64 eps plus one rounding of w + u' (2 x 64 eps in all).
    """
    params = case.params()
    binding = case.bind(params)
    w = _flat(params)
    u = _flat(support.random_like(params, seed=8, scale=0.01))
    targets = orbit.charges(binding, w)
    new_u, residual = orbit.move(binding, w, u, targets)
    moved = [a + b for a, b in zip(w, new_u)]
    assert float(residual) <= 64 * EPS64
    errs = support.charge_errors(
        case,
        orbit.charges(binding, moved),
        targets,
        _unflatten(params, moved),
        linear_scale="weights",
    )
    assert max(errs) <= 2 * 64 * EPS64, (case.name, errs)
    stepped = _unflatten(params, [a + b for a, b in zip(w, u)])
    want = float(case.loss(stepped))
    got = float(case.loss(_unflatten(params, moved)))
    assert abs(got - want) <= RTOL_LOSS * abs(want), (got, want)
    # The move changed the step (the charges of w + u were not the targets).
    assert support.rel_err(new_u, u) > 0.1


def test_move_with_the_charges_it_already_has_keeps_the_step(x64):
    """Targets equal to the charges of w + u: the step is kept (to rounding)."""
    case = support.CASES_BY_NAME["mlp3"]
    params = case.params()
    binding = case.bind(params)
    w = _flat(params)
    u = _flat(support.random_like(params, seed=9, scale=0.1))
    targets = orbit.charges(binding, [a + b for a, b in zip(w, u)])
    new_u, _ = orbit.move(binding, w, u, targets)
    support.assert_close(new_u, u, rtol=1e-10, atol=1e-13)


def test_promote_gives_the_compute_dtype():
    flat = [jnp.ones(2, jnp.bfloat16), jnp.ones(2, jnp.float16), jnp.ones(2, jnp.float32)]
    assert [x.dtype for x in orbit.promote(flat)] == [jnp.float32] * 3


def test_joint_move_holds_a_group_that_cannot_reach_its_target(x64):
    """A Rescale group without outgoing weights only has positive charges: asked for a
    negative one inside an overlapping chain, it keeps its own scale (as the closed form of a
    symmetry alone does), the report shows the miss, and every other group lands exactly."""
    case = support.CASES_BY_NAME["mlp3"]
    params = case.params()
    params["Dense_2"]["kernel"] = params["Dense_2"]["kernel"].at[1].set(0.0)
    binding = case.bind(params)
    assert len(binding.components) == 1
    w = _flat(params)
    step = support.random_like(params, seed=8, scale=0.01)
    step["Dense_2"]["kernel"] = step["Dense_2"]["kernel"].at[1].set(0.0)
    u = _flat(step)
    targets = list(orbit.charges(binding, w))
    assert float(targets[1][1]) > 0
    targets[1] = targets[1].at[1].set(-1.0)  # unreachable: |incoming|^2 / 2 > 0 is all it has
    new_u, residual = jax.jit(lambda w, u, t: orbit.move(binding, w, u, t))(w, u, targets)
    moved = [a + b for a, b in zip(w, new_u)]
    q = orbit.charges(binding, moved)
    # The miss is reported (|Q - T| / scale of order 1), never hidden.
    assert float(residual) > 0.1
    # Every reachable group within 2 x 64 eps of its target (relative to the charge scale).
    for b, qk, tk in zip(binding.bound, q, targets):
        ok = np.ones(qk.shape, bool) if b is not binding.bound[1] else np.arange(4) != 1
        scale = float(b.charge_scale(moved))
        assert np.max(np.abs(np.asarray(qk - tk))[ok]) <= 2 * 64 * EPS64 * scale
    # The held group keeps its own factor: its bias (scaled by that factor only) is as in
    # w + u, to rounding.
    i_bias = next(p.leaf for p in binding.bound[1].parts if p.path.endswith("Dense_1/bias"))
    np.testing.assert_allclose(moved[i_bias][1], w[i_bias][1] + u[i_bias][1], rtol=1e-15)
    # On the orbit: the loss is that of w + u.
    stepped = _unflatten(params, [a + b for a, b in zip(w, u)])
    want = float(case.loss(stepped))
    assert abs(float(case.loss(_unflatten(params, moved))) - want) <= RTOL_LOSS * abs(want)
