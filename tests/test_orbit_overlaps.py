"""The joint projection over overlapping symmetries against a dense reference (float64).

``orbit.project`` solves the normal equations of the generators of overlapping symmetries
matrix-free (preconditioned conjugate gradients). Here the generator matrix J of each
component is built densely (one column per group coefficient, by expanding basis vectors)
and the projection u - J J^+ u computed with numpy's least squares, on two realistic
overlaps: a ReLU rescale chain with a softmax head (Rescale x3 + Translation) and an
attention block (per-head Linear query-key and value-output, the LayerNorm Rescale into
the query / key / value kernels, the Translation of the output projection).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ksbopt
from ksbopt._src.symmetries import orbit


def _relu_chain(rng) -> tuple[dict, list]:
    dims = [6, 9, 8, 7, 4]
    params = {
        f"fc{i}": {
            "kernel": rng.standard_normal((dims[i], dims[i + 1])),
            "bias": rng.standard_normal(dims[i + 1]),
        }
        for i in range(len(dims) - 1)
    }
    syms = [ksbopt.Rescale([f"fc{i}/kernel", f"fc{i}/bias"], f"fc{i + 1}/kernel") for i in range(3)]
    syms.append(ksbopt.Translation(["fc3/kernel", "fc3/bias"]))
    return params, syms


def _attention(rng) -> tuple[dict, list]:
    d, heads, hd = 8, 2, 3

    def proj():
        return {
            "kernel": rng.standard_normal((d, heads, hd)),
            "bias": rng.standard_normal((heads, hd)),
        }

    params = {
        "ln": {"scale": 1 + 0.3 * rng.standard_normal(d), "bias": rng.standard_normal(d)},
        "attn": {
            "query": proj(),
            "key": proj(),
            "value": proj(),
            "out": {
                "kernel": rng.standard_normal((heads, hd, d)),
                "bias": rng.standard_normal(d),
            },
        },
    }
    syms = [
        ksbopt.Linear.query_key(["attn/query/kernel", "attn/query/bias"], ["attn/key/*"]),
        ksbopt.Linear.value_output(["attn/value/kernel", "attn/value/bias"], "attn/out/kernel"),
        ksbopt.Rescale(
            ["ln/scale", "ln/bias"],
            ["attn/query/kernel", "attn/key/kernel", "attn/value/kernel"],
            outgoing_axis=-3,
        ),
        ksbopt.Translation(["attn/out/kernel", "attn/out/bias"]),
    ]
    return params, syms


CASES = {"relu_chain_translation": _relu_chain, "attention_layernorm": _attention}


def _setup(name: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    params, syms = CASES[name](rng)
    params = jax.tree.map(jnp.asarray, params)
    u = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape)), params)
    binding = orbit.bind(tuple(syms), params)
    assert len(binding.components) == 1, "the case must be one overlapping component"
    return params, syms, u, binding


def _dense_generators(binding, w) -> list[np.ndarray]:
    """J_k for every symmetry k, as a dense (n_params, coef_size) float64 matrix."""
    out = []
    for b in binding.bound:
        cols = []
        for e in np.eye(b.coef_size):
            moved = b.expand(w, jnp.asarray(e).reshape(b.charge_shape))
            cols.append(
                np.concatenate(
                    [
                        np.ravel(moved[i]) if i in moved else np.zeros(x.size)
                        for i, x in enumerate(w)
                    ]
                )
            )
        out.append(np.stack(cols, axis=1))
    return out


def _vec(flat) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in flat])


def _project_ref(j: np.ndarray, u: np.ndarray) -> np.ndarray:
    c, *_ = np.linalg.lstsq(j, u, rcond=None)
    return u - j @ c


@pytest.mark.parametrize("name", sorted(CASES))
def test_joint_projection_equals_the_dense_solve(name, x64):
    params, _, u, binding = _setup(name)
    w, uf = jax.tree.leaves(params), jax.tree.leaves(u)
    js = _dense_generators(binding, w)
    j = np.concatenate(js, axis=1)
    want = _project_ref(j, _vec(uf))
    out, _, residual = jax.jit(lambda w, u: orbit.project(binding, w, u))(w, uf)
    got = _vec(out)
    # The CG stops once the generator component left is below 64 eps |u| (default tol);
    # the error in the removed component J c is then at most sqrt(cond) times that, with
    # cond the condition number of the block-preconditioned Gram matrix (measured below
    # ~1e4 on these cases), and the dense reference itself carries cond(J) eps |u|
    # (cond(J) ~1e2 here): 1e-11 |u| bounds both with a margin of ~10.
    assert np.linalg.cond(j[:, np.linalg.svd(j, compute_uv=False) > 0]) < 1e4
    scale = np.linalg.norm(_vec(uf))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-11 * scale)
    # Orthogonal to every generator: |J^T P u| <= 1e-12 |J| |u| (rounding of the last
    # reductions, ~eps |J| |u| times the number of terms, with a margin).
    assert np.max(np.abs(j.T @ got)) <= 1e-12 * np.linalg.norm(j, 2) * scale
    # And the solve did remove something: u had components along the generators.
    assert np.linalg.norm(got - _vec(uf)) > 0.1 * scale
    assert float(residual) <= 64 * np.finfo(np.float64).eps


@pytest.mark.parametrize("name", sorted(CASES))
def test_reported_residual_is_the_generator_component_left(name, x64):
    # Two iterations do not converge: the residual in the state is then the exact size of
    # what is left along the generators, sqrt(sum_k |P_k Pu|^2) / |u|, with P_k the
    # orthogonal projection on symmetry k's own generators.
    params, syms, u, _ = _setup(name)
    tx = ksbopt.project(syms, max_iter=2)
    pu, state = jax.jit(tx.update)(u, tx.init(params), params)
    js = _dense_generators(orbit.bind(tuple(syms), params), jax.tree.leaves(params))
    s = _vec(jax.tree.leaves(pu))
    left = [s - _project_ref(jk, s) for jk in js]
    want = np.sqrt(sum(np.sum(x**2) for x in left)) / np.linalg.norm(_vec(jax.tree.leaves(u)))
    assert want > 1e-6, "two iterations were expected not to converge"
    # float32 state; the float64 values agree to rounding of the float32 cast.
    np.testing.assert_allclose(float(state.residual), want, rtol=1e-6)
    # With the defaults the same update converges.
    full = ksbopt.project(syms)
    _, state = jax.jit(full.update)(u, full.init(params), params)
    assert float(state.residual) <= 64 * np.finfo(np.float64).eps


def test_project_matches_the_dense_solve_in_float32():
    # The default tolerance in float32 (64 eps ~ 7.6e-6 relative) gives a projection within
    # 1e-4 |u| of the float64 dense reference (float32 reductions over ~200 numbers).
    params, syms, u, binding = _setup("relu_chain_translation", seed=1)
    p32, u32 = jax.tree.map(lambda x: x.astype(jnp.float32), (params, u))
    tx = ksbopt.project(syms)
    out, state = jax.jit(tx.update)(u32, tx.init(p32), p32)
    with jax.enable_x64(True):
        js = _dense_generators(binding, jax.tree.leaves(jax.tree.map(np.float64, p32)))
    uv = _vec(jax.tree.leaves(u32)).astype(np.float64)
    want = _project_ref(np.concatenate(js, axis=1), uv)
    np.testing.assert_allclose(_vec(jax.tree.leaves(out)), want, atol=1e-4 * np.linalg.norm(uv))
    assert state.residual.dtype == jnp.float32
    assert float(state.residual) <= 64 * np.finfo(np.float32).eps


def test_nonfinite_update_keeps_the_residual(x64):
    params, syms, u, _ = _setup("attention_layernorm")
    tx = ksbopt.project(syms, max_iter=2)
    update = jax.jit(tx.update)
    _, state = update(u, tx.init(params), params)
    bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), u)
    out, state2 = update(bad, state, params)
    assert float(state2.residual) == float(state.residual) > 0
    for x in jax.tree.leaves(out):
        np.testing.assert_array_equal(np.asarray(x), 0.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_iter": 0}, "max_iter=0 must be a positive int"),
        ({"max_iter": 2.5}, "max_iter=2.5 must be a positive int"),
        ({"tol": 1.5}, "tol=1.5 must be a number in"),
        ({"tol": -1e-3}, "tol=-0.001 must be a number in"),
    ],
)
def test_solver_arguments_are_checked_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ksbopt.project(ksbopt.Scale("w"), **kwargs)


def test_coefficient_layout_of_a_component():
    """The solves' one-vector layout: split inverts join, per-symmetry sums, spread and flags
    land on exactly each symmetry's entries (the chain of unequal widths has no two alike)."""
    from ksbopt._src.symmetries import joint_solve

    params, syms = _relu_chain(np.random.default_rng(0))
    bound = orbit.bind(tuple(syms), params).bound
    lay = joint_solve._Layout(bound)
    parts = [
        jnp.arange(np.prod(b.charge_shape), dtype=jnp.float32) + 10 * k for k, b in enumerate(bound)
    ]
    v = lay.join(parts)
    # the Rescales' units (9, 8, 7), the Translation's rows of fc3's kernel and its bias (7 + 1)
    sizes = [9, 8, 7, 8]
    assert v.shape == (sum(sizes),)
    for a, b in zip(lay.split(v), parts, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(lay.sums(v), [float(np.sum(p)) for p in parts])
    np.testing.assert_array_equal(lay.spread(jnp.arange(4.0)), np.repeat(np.arange(4.0), sizes))
    np.testing.assert_array_equal(lay.flags([False, False, False, True]), np.arange(32) >= 24)


def _newton_loop_carries(params, syms) -> list[tuple[int, ...]]:
    """Shapes of the arrays that the joint move's Newton loop carries (its outer while)."""
    binding = orbit.bind(tuple(syms), params)
    w = [jnp.asarray(x, jnp.float32) for x in jax.tree.leaves(params)]
    u = [0.01 * x for x in w]
    targets = orbit.charges(binding, w)
    jaxpr = jax.make_jaxpr(lambda w, u: orbit.move(binding, w, u, targets))(w, u)
    loops = [e for e in jaxpr.eqns if e.primitive is jax.lax.while_p]
    assert len(loops) == 1, [e.primitive for e in jaxpr.eqns]
    p = loops[0].params
    return [v.aval.shape for v in loops[0].invars[p["cond_nconsts"] + p["body_nconsts"] :]]


def test_joint_move_carries_group_elements_not_multiplicative_leaves():
    """A leaf that only Rescales act on is not carried by the Newton loop (its accumulated
    group elements are; the leaf is formed where it is read): the carried leaf-sized arrays
    are the squares of the two leaves that two Rescales share (fc1, fc2 kernels) and the
    kernel that the Translation shifts too (fc3). Moving every leaf in the loop would carry
    fc0's kernel, fc1's and fc2's as well (and cost XLA:CPU a copy of each per step)."""
    params, syms = _relu_chain(np.random.default_rng(0))
    matrices = sorted(s for s in _newton_loop_carries(params, syms) if len(s) == 2)
    assert matrices == [(7, 4), (8, 7), (9, 8)]
