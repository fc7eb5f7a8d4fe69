"""Tests of the symmetry vocabulary (THEORY.md section 1): action, generator, charge.

For every single-symmetry toy problem of tests/support.py, in float64:

- the finite group action psi(theta, a) leaves the loss unchanged (1e-12 relative);
- the generator is the derivative of the action at the identity (jvp, 1e-12);
- ``reduce`` (J^T) is the adjoint of ``expand`` (J) (1e-12);
- minibatch gradients are orthogonal to every generator [paper: NM];
- Q(w + u) = Q(w) + <xi(w), u> + Q(u) exactly [derived, section 3];
- ``move_to`` reaches a target charge on the orbit, and the loss does not change;

plus the charge formulas against explicit numpy, and the declarations' bad input.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import support

import ksbopt

CASES = support.ALL_CASES
# The per-symmetry algebra (action, generator, adjoint, split, move_to) runs on the
# single-symmetry cases; joint behaviour of overlapping ones is test_transforms.py's job.
SINGLE = support.SINGLE_CASES

# float64 tolerances. Every identity below is exact algebra evaluated once (no iteration,
# no accumulation): rounding leaves ~1e-15 relative; 1e-12 leaves a margin of ~1e3 for the
# few-hundred-term sums. Newton's move_to (Linear) stops at 64 eps relative: also < 1e-12.
TOL = 1e-12


def _group_element(b, rng: np.random.Generator):
    """A random group element for bound symmetry ``b``, far from the identity."""
    n = b.n_groups
    if b.symmetry.kind in ("scale", "rescale"):
        return np.exp(rng.uniform(-0.7, 0.7, size=n))  # factors in [0.5, 2]
    if b.symmetry.kind == "translation":
        return rng.normal(size=n)
    heads, k, _ = b.charge_shape
    x = 0.3 * rng.normal(size=(heads, k, k))
    return np.eye(k) + x  # generic, invertible


def _spd_element(b, rng: np.random.Generator):
    """For Linear: a symmetric positive definite G (the part of GL(k) move_to searches)."""
    heads, k, _ = b.charge_shape
    x = 0.3 * rng.normal(size=(heads, k, k))
    lam, u = np.linalg.eigh(x + np.swapaxes(x, -1, -2))
    return np.einsum("hij,hj,hkj->hik", u, np.exp(lam), u)


def _identity(b):
    if b.symmetry.kind in ("scale", "rescale"):
        return np.ones(b.n_groups)
    if b.symmetry.kind == "translation":
        return np.zeros(b.n_groups)
    return np.broadcast_to(np.eye(b.charge_shape[-1]), b.charge_shape).copy()


def _apply(flat, moved):
    out = list(flat)
    for i, v in moved.items():
        out[i] = v
    return out


@functools.cache
def _report(name: str) -> dict:
    """All float64 quantities of this file for one case, from one jitted program."""
    case = support.CASES_BY_NAME[name]
    params = case.params()
    flat, treedef = jax.tree.flatten(params)
    bound = case.bind(params).bound
    rng = np.random.default_rng(123)
    inputs = []
    for b in bound:
        inputs.append(
            {
                "a": _group_element(b, rng),
                "target_a": _spd_element(b, rng)
                if b.symmetry.kind == "linear"
                else _group_element(b, rng),
                "c": rng.normal(size=b.charge_shape),
                "v": [rng.normal(size=x.shape) for x in flat],
            }
        )
    u = [0.3 * rng.normal(size=x.shape) for x in flat]

    def loss_of(leaves):
        return case.loss(jax.tree.unflatten(treedef, leaves))

    @support.jit
    def run(flat, inputs, u):
        g = jax.grad(loss_of)(flat)
        out = {"loss": loss_of(flat), "sym": []}
        for b, inp in zip(bound, inputs):
            r = {}
            acted = _apply(flat, b.act(flat, inp["a"]))
            r["loss_acted"] = loss_of(acted)
            r["moved_by_act"] = sum(jnp.sum(jnp.square(x - y)) for x, y in zip(acted, flat))
            # Generator = d/dt psi(theta, a(t)) at the identity along c.
            ident = jnp.asarray(_identity(b))
            c = inp["c"]

            def along(t, b=b, ident=ident, c=c):
                moved = b.act(flat, ident + t * c)
                return [moved[i] for i in b.leaves]

            r["jvp"] = jax.jvp(along, (0.0,), (1.0,))[1]
            expanded = b.expand(flat, c)
            r["expand"] = [expanded[i] for i in b.leaves]
            # Adjoint: <J c, v> and <c, J^T v>.
            r["jc_v"] = sum(jnp.vdot(expanded[i], inp["v"][i]) for i in b.leaves)
            r["c_jtv"] = jnp.vdot(c, b.reduce(flat, inp["v"]))
            # [paper: NM] <g, xi_g> = 0 for every group.
            r["xi_g"] = b.reduce(flat, g)
            # [derived] Q(w + u) = Q(w) + <xi(w), u> + Q(u) (Linear: M + M^T).
            first = b.reduce(flat, u)
            if b.symmetry.kind == "linear":
                first = first + jnp.swapaxes(first, -1, -2)
            r["q"] = b.charge(flat)
            r["q_plus"] = b.charge([x + y for x, y in zip(flat, u)])
            r["q_split"] = r["q"] + first + b.quadratic(u)
            # move_to a charge that is on the orbit by construction.
            target = b.charge(_apply(flat, b.act(flat, inp["target_a"])))
            moved = _apply(flat, b.move_to(flat, target))
            r["target"], r["q_moved"] = target, b.charge(moved)
            r["loss_moved"] = loss_of(moved)
            if b.symmetry.kind == "linear":  # the closed-form balancing of targets.balanced
                balanced = _apply(flat, b.balance(flat))
                r["q_balanced"], r["loss_balanced"] = b.charge(balanced), loss_of(balanced)
                r["p"], r["r"] = b._pr(flat)
            out["sym"].append(r)
        out["g"] = g
        return out

    out = jax.tree.map(np.asarray, run(flat, inputs, u))
    return {**out, "params": params, "u": u}


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.parametrize("case", SINGLE, ids=repr)
def test_group_action_leaves_the_loss_unchanged(case, x64):
    r = _report(case.name)
    for sym, s in zip(case.symmetries, r["sym"]):
        assert _rel(s["loss_acted"], r["loss"]) <= TOL, (sym, s["loss_acted"], r["loss"])
        assert s["moved_by_act"] > 1e-2, "the group element was (nearly) the identity"


@pytest.mark.parametrize("case", SINGLE, ids=repr)
def test_generator_is_the_derivative_of_the_action(case, x64):
    r = _report(case.name)
    for sym, s in zip(case.symmetries, r["sym"]):
        for got, want in zip(s["jvp"], s["expand"]):
            assert _rel(got, want) <= TOL, sym


@pytest.mark.parametrize("case", SINGLE, ids=repr)
def test_reduce_is_the_adjoint_of_expand(case, x64):
    r = _report(case.name)
    for sym, s in zip(case.symmetries, r["sym"]):
        assert _rel(s["c_jtv"], s["jc_v"]) <= TOL, sym


@pytest.mark.parametrize("case", SINGLE, ids=repr)
def test_gradients_are_orthogonal_to_every_generator(case, x64):
    # [paper: NM] <g, xi(theta)> = 0 for a true symmetry, per group. Scale: |xi_g| <= |w|
    # (+ sqrt(n) for translation), so the bound is TOL * (|w| + sqrt(n)) * |g|.
    r = _report(case.name)
    w = jax.tree.leaves(r["params"])
    norm_w = np.sqrt(sum(np.sum(np.square(x)) for x in w))
    norm_g = np.sqrt(sum(np.sum(np.square(x)) for x in r["g"]))
    size = sum(x.size for x in w)
    for sym, s in zip(case.symmetries, r["sym"]):
        assert np.max(np.abs(s["xi_g"])) <= TOL * (norm_w + np.sqrt(size)) * norm_g, sym


@pytest.mark.parametrize("case", SINGLE, ids=repr)
def test_charge_splits_into_first_and_second_order_parts(case, x64):
    r = _report(case.name)
    for sym, s in zip(case.symmetries, r["sym"]):
        # Relative to the size of the terms (|Q(w)| + |Q(u)| + |<xi, u>|, all O(1) here).
        assert _rel(s["q_split"], s["q_plus"]) <= TOL, sym
        assert _rel(s["q_plus"], s["q"]) > 1e-3, "u did change the charge"


@pytest.mark.parametrize("case", SINGLE, ids=repr)
def test_move_to_reaches_a_target_on_the_orbit(case, x64):
    r = _report(case.name)
    for sym, s in zip(case.symmetries, r["sym"]):
        assert _rel(s["q_moved"], s["target"]) <= TOL, (sym, s["q_moved"], s["target"])
        assert _rel(s["target"], s["q"]) > 1e-2, "the target was the current charge"
        assert _rel(s["loss_moved"], r["loss"]) <= TOL, sym
        if sym.kind == "linear":
            # Closed-form balancing G = M^(1/2), M P M = R. C = 0 needs G P G and
            # G^-1 R G^-1 of equal rank: with P = A^T A and R = B B^T both full rank, C = 0
            # to rounding (TOL of |C0| + 1). When one is rank deficient (a 4-wide hidden
            # layer feeding 2 outputs: rank R = 2), C = 0 lies on the boundary of the orbit
            # and is only approached (M has eigenvalues ~eps, G ~sqrt(eps)): C to within
            # 10 sqrt(eps) of |C0| + 1. The loss is unchanged to rounding (TOL); near the
            # boundary G has condition ~1/eps and the loss keeps only ~sqrt(eps) (measured:
            # 7e-10 relative).
            scale = np.max(np.abs(s["q"])) + 1.0
            ranks = [np.linalg.matrix_rank(m, tol=1e-10 * np.max(np.abs(m))) for m in s["p"]]
            ranks += [np.linalg.matrix_rank(m, tol=1e-10 * np.max(np.abs(m))) for m in s["r"]]
            full = min(ranks) == s["q"].shape[-1]
            tol = TOL if full else 10 * np.sqrt(np.finfo(np.float64).eps)
            assert np.max(np.abs(s["q_balanced"])) <= tol * scale, (min(ranks), s["q_balanced"])
            loss_tol = TOL if full else np.sqrt(np.finfo(np.float64).eps)
            assert _rel(s["loss_balanced"], r["loss"]) <= loss_tol, sym


# --------------------------------------------------------------------------- charges


def _expected_charges(name: str, p: dict) -> list[np.ndarray]:
    """THEORY.md section 1 written out in numpy, Flax layout (output unit = last axis)."""
    p = jax.tree.map(np.asarray, p)
    sq = np.square
    if name == "scale_batchnorm":  # column j of the kernel with bias[j]
        return [0.5 * (sq(p["dense"]["kernel"]).sum(0) + sq(p["dense"]["bias"]))]
    if name == "scale_layernorm":  # the whole layer
        return [0.5 * np.array([sq(p["dense"]["kernel"]).sum() + sq(p["dense"]["bias"]).sum()])]
    if name in ("rescale_mlp", "mlp3"):
        out = []
        for i in range(len(p) - 1):
            a, b = p[f"Dense_{i}"], p[f"Dense_{i + 1}"]
            x_in = sq(a["kernel"]).sum(0) + sq(a["bias"])
            x_out = sq(b["kernel"]).sum(1)  # axis -2 of the next kernel
            out.append(0.5 * (x_in - x_out))
        return out
    if name == "translation_head":
        # Groups are laid out in leaf order (jax.tree.leaves sorts dict keys): the bias
        # group first, then one group per kernel row.
        k, b = p["head"]["kernel"], p["head"]["bias"]
        return [np.r_[b.sum(), k.sum(1)]]
    if name in ("linear_deep", "linear3"):
        a = np.concatenate([p["A"]["kernel"], p["A"]["bias"][None]], axis=0)
        cs = [a.T @ a - p["B"]["kernel"] @ p["B"]["kernel"].T]
        if "C" in p:
            cs.append(p["B"]["kernel"].T @ p["B"]["kernel"] - p["C"]["kernel"] @ p["C"]["kernel"].T)
        return [c[None] for c in cs]
    if name == "linear_attention":  # per head: W_q^T W_q - W_k^T W_k (biases included)
        q = np.concatenate([p["query"]["kernel"], p["query"]["bias"][None]], axis=0)
        k = np.concatenate([p["key"]["kernel"], p["key"]["bias"][None]], axis=0)
        return [np.einsum("ehi,ehj->hij", q, q) - np.einsum("ehi,ehj->hij", k, k)]
    if name == "relu_softmax":
        a, h = p["Dense_0"], p["head"]
        x_in = sq(a["kernel"]).sum(0) + sq(a["bias"])
        return [0.5 * (x_in - sq(h["kernel"]).sum(1)), np.r_[h["bias"].sum(), h["kernel"].sum(1)]]
    if name == "scale_phi":
        return [0.5 * sq(p["w"]).sum(0)]
    raise KeyError(name)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_charges_match_the_formulas(case, x64):
    params = case.params()
    got = case.charges(params)
    want = _expected_charges(case.name, params)
    assert len(got) == len(want) == len(case.symmetries)
    for g, w in zip(got, want):
        assert g.shape == w.shape, (g.shape, w.shape)
        np.testing.assert_allclose(np.asarray(g), w, rtol=TOL, atol=TOL * np.max(np.abs(w)))


def test_charges_are_float32_for_low_precision_params():
    params = {"w": jnp.arange(1.0, 7.0, dtype=jnp.bfloat16).reshape(2, 3)}
    (q,) = ksbopt.charges(params, ksbopt.Scale("w", axis=-1))
    assert q.dtype == jnp.float32
    # 1/2 (1 + 16), 1/2 (4 + 25), 1/2 (9 + 36): exact in float32.
    np.testing.assert_array_equal(np.asarray(q), [8.5, 14.5, 22.5])


# --------------------------------------------------------------------------- declarations


def test_declarations_are_hashable_values():
    a = ksbopt.Scale(["k", "b"], axis=-1)
    assert a == ksbopt.Scale(("k", "b"), axis=-1) and hash(a) == hash(ksbopt.Scale(["k", "b"]))
    assert a != ksbopt.Scale(["k", "b"], axis=None)
    assert ksbopt.Rescale("a", "b") == ksbopt.Rescale(["a"], ["b"])
    assert ksbopt.Linear.query_key("q", "k").left_head_axis == -2


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: ksbopt.Scale("w", axis=1.0), TypeError, r"axis=1\.0 must be an int"),
        (lambda: ksbopt.Scale("w", axis=True), TypeError, r"axis=True must be an int"),
        (
            lambda: ksbopt.Rescale("a", "b", incoming_axis=None),
            TypeError,
            r"incoming_axis=None is not allowed for Rescale",
        ),
        (
            lambda: ksbopt.Rescale("a", "b", outgoing_axis="x"),
            TypeError,
            r"outgoing_axis='x' must be an int",
        ),
        (
            lambda: ksbopt.Translation("w", axis=None),
            TypeError,
            r"axis=None is not allowed for Translation; give the class axis",
        ),
        (
            lambda: ksbopt.Linear("a", "b", left_axis=None),
            TypeError,
            r"left_axis=None is not allowed",
        ),
        (
            lambda: ksbopt.Linear("a", "b", max_iter=0),
            ValueError,
            r"max_iter=0 must be a positive int",
        ),
    ],
    ids=[
        "scale_float_axis",
        "scale_bool_axis",
        "rescale_none",
        "rescale_str",
        "translation_none",
        "linear_none",
        "linear_max_iter",
    ],
)
def test_bad_declarations_fail_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


def _tree():
    return {
        "a": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
        "b": {"kernel": jnp.ones((4, 2))},
        "q": {"kernel": jnp.ones((6, 2, 3))},
        "k": {"kernel": jnp.ones((6, 3, 3))},
    }


@pytest.mark.parametrize(
    ("sym", "match"),
    [
        (
            ksbopt.Rescale("a/kernel", ["a/kernel", "b/kernel"]),
            r"leaves \['a/kernel'\] are selected on both sides",
        ),
        (
            ksbopt.Linear("a/kernel", ["b/kernel", "a/kernel"]),
            r"leaves \['a/kernel'\] are selected on both sides",
        ),
        (
            ksbopt.Linear("q/kernel", "q/kernel", left_head_axis=-1),
            r"left_head_axis=-1 and left_axis=-1 name the same axis of 'q/kernel'",
        ),
        (
            ksbopt.Linear.query_key("q/kernel", "k/kernel"),
            r"number of heads differs between leaves \(\{'q/kernel': 2, 'k/kernel': 3\}\)",
        ),
        (
            ksbopt.Scale(["a/kernel", "b/kernel"]),
            r"'a/kernel' shape \(3, 4\) -> 4 units; 'b/kernel' shape \(4, 2\) -> 2 units",
        ),
        (
            ksbopt.Translation("a/kernel", axis=-3),
            r"Translation axis=-3 is out of range for leaf 'a/kernel' with shape \(3, 4\)",
        ),
    ],
    ids=[
        "rescale_both_sides",
        "linear_both_sides",
        "head_is_k",
        "heads_differ",
        "scale_units",
        "translation_axis",
    ],
)
def test_declarations_that_do_not_fit_the_tree(sym, match):
    with pytest.raises(ValueError, match=match):
        ksbopt.charges(_tree(), sym)


def test_value_output_heads_keep_their_value_to_output_map(x64):
    # Flax MultiHeadAttention layout: value kernel (embed, heads, dim), output kernel
    # (heads, dim, embed). Per head, W_v -> W_v G and W_o -> G^-1 W_o keep W_v W_o.
    rng = np.random.default_rng(7)
    params = {
        "value": {"kernel": rng.normal(size=(5, 2, 3)), "bias": rng.normal(size=(2, 3))},
        "out": {"kernel": rng.normal(size=(2, 3, 5))},
    }
    params = jax.tree.map(jnp.asarray, params)
    sym = ksbopt.Linear.value_output(["value/kernel", "value/bias"], "out/kernel")
    (c,) = ksbopt.charges(params, sym)
    v = np.concatenate([params["value"]["kernel"], params["value"]["bias"][None]], axis=0)
    o = np.asarray(params["out"]["kernel"])
    want = np.einsum("ehi,ehj->hij", v, v) - np.einsum("hie,hje->hij", o, o)
    np.testing.assert_allclose(c, want, rtol=TOL, atol=TOL * np.max(np.abs(want)))
    b = sym.bind(params)
    flat = jax.tree.leaves(params)
    g = np.eye(3) + 0.3 * rng.normal(size=(2, 3, 3))
    moved = _apply(flat, b.act(flat, jnp.asarray(g)))
    new = jax.tree.unflatten(jax.tree.structure(params), moved)

    def head_maps(p):
        return np.einsum("ehd,hdf->hef", p["value"]["kernel"], p["out"]["kernel"])

    np.testing.assert_allclose(head_maps(new), head_maps(params), rtol=1e-12, atol=1e-12)
    assert np.max(np.abs(np.asarray(new["value"]["kernel"]) - params["value"]["kernel"])) > 0.1


def test_scale_groups_sum_contiguous_units_and_reject_bad_counts():
    # GroupNorm layout: Scale(groups=G) makes G contiguous blocks of units along the axis; its
    # charge is the sum of the per-unit charges of each block (exact: same float32 sums).
    params = {"c": {"kernel": jnp.arange(24.0).reshape(2, 3, 4), "bias": jnp.ones(4)}}
    per_unit = ksbopt.charges(params, ksbopt.Scale("c/*"))[0]
    grouped = ksbopt.charges(params, ksbopt.Scale("c/*", groups=2))[0]
    np.testing.assert_allclose(grouped, per_unit.reshape(2, 2).sum(1), rtol=1e-6)
    with pytest.raises(ValueError, match=r"groups=3 does not divide the 4 units"):
        ksbopt.charges(params, ksbopt.Scale("c/*", groups=3))
    with pytest.raises(ValueError, match=r"groups=0 must be a positive int"):
        ksbopt.Scale("c/*", groups=0)
    with pytest.raises(ValueError, match=r"needs a unit axis"):
        ksbopt.Scale("c/*", axis=None, groups=2)
