"""Tests of ksbopt.symmetrize: any optimizer with a symmetric kinetic energy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import support
from support import contract

import ksbopt
from ksbopt._src.transforms.symmetrize import SymmetrizeState, symmetrize

STEPS = 40


def _act(case: support.Case, params, seed: int):
    """``params`` moved along the orbit of the case's first symmetry by a random element."""
    binding = case.bind(params)
    b = binding.bound[0]
    rng = np.random.default_rng(seed)
    if b.symmetry.kind == "scale":
        a = jnp.asarray(np.exp(rng.uniform(-1.5, 1.5, b.n_groups)))
    else:
        a = jnp.asarray(rng.uniform(-2.0, 2.0, b.n_groups))
    flat = jax.tree.leaves(params)
    for i, v in b.act(flat, a).items():
        flat[i] = v
    return jax.tree.unflatten(jax.tree.structure(params), flat)


def _invariant(case: support.Case, params):
    """Directions of the scale groups / sum-free parts of the translation groups."""
    b = case.bind(params).bound[0]
    flat = jax.tree.leaves(params)
    if b.symmetry.kind == "scale":
        moved = b.act(flat, 1 / jnp.sqrt(2 * b.charge(flat)))
    else:
        moved = b.act(flat, -b.charge(flat) / b.norms(flat))
    return [moved[i] for i in b.leaves]


# Adam is a nonlinear base: it turns O(eps) differences in its inputs into O(eps) differences
# in its steps, so the two runs agree to rounding (~1e-14 here). The BatchNorm case uses
# heavy ball: BatchNorm removes the bias, whose gradient is then rounding noise (~1e-17) that
# Adam (eps = 1e-8) would turn into steps of 1e-9 * lr differing between the runs.
EQUIVARIANCE_CASES = [
    ("scale_layernorm", lambda: optax.adam(0.05)),
    ("scale_batchnorm", lambda: optax.sgd(0.1, momentum=0.9)),
    ("translation_head", lambda: optax.adam(0.05)),
]


def train_pair(case: support.Case, tx, p_a, p_b, steps: int):
    """Both runs in one compiled program (vmap over the starting point)."""

    @support.jit
    def run(params):
        def step(carry, _):
            p, s = carry
            loss, g = jax.value_and_grad(case.loss)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        (p, _), losses = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
        return p, losses

    ends, losses = jax.vmap(run)(jax.tree.map(lambda a, b: jnp.stack([a, b]), p_a, p_b))
    end_a, end_b = (jax.tree.map(lambda x, i=i: x[i], ends) for i in range(2))
    return end_a, end_b, losses[0], losses[1]


@pytest.mark.parametrize(
    ("name", "base"), EQUIVARIANCE_CASES, ids=[c[0] for c in EQUIVARIANCE_CASES]
)
def test_runs_related_by_a_group_action_are_the_same_run(x64, name, base):
    case = support.CASES_BY_NAME[name]
    tx = symmetrize(base(), list(case.symmetries))
    p_a = case.params()
    p_b = _act(case, p_a, seed=3)
    assert support.rel_err(p_b, p_a) > 0.1  # really a different starting point
    end_a, end_b, loss_a, loss_b = train_pair(case, tx, p_a, p_b, STEPS)
    # 1e-10 relative in float64 (the bar); the runs agree to ~1e-14 (a few ulps per
    # step, 40 steps).
    support.assert_rel_close(loss_b, loss_a, 1e-10, "losses")
    support.assert_rel_close(_invariant(case, end_b), _invariant(case, end_a), 1e-10, "directions")
    assert float(loss_a[-1]) < float(loss_a[0])  # it trains
    # Charges conserved exactly: the retraction restores the initial charges each step, so
    # the error is rounding of one step (a few eps), never accumulated.
    for start, end in ((p_a, end_a), (p_b, end_b)):
        support.assert_rel_close(case.charges(end), case.charges(start), 1e-13, "charges")


def test_step_is_the_base_step_on_the_sphere(x64):
    """One SGD step: w' = |w| normalize(u - lr P_u(|w| g)), per unit (hand formula)."""
    case = support.CASES_BY_NAME["scale_batchnorm"]
    params = case.params()
    lr = 0.3
    g = jax.grad(case.loss)(params)
    tx = symmetrize(optax.sgd(lr), list(case.symmetries))
    u, _ = support.jit(tx.update)(g, tx.init(params), params)
    new = optax.apply_updates(params, u)
    # by hand: the group of unit j is (dense/kernel[:, j], dense/bias[j])
    w = jnp.concatenate([params["dense"]["kernel"], params["dense"]["bias"][None]], axis=0)
    gw = jnp.concatenate([g["dense"]["kernel"], g["dense"]["bias"][None]], axis=0)
    r = jnp.linalg.norm(w, axis=0)
    d = w / r
    gh = r * gw
    gh = gh - d * jnp.sum(gh * d, axis=0)
    step = d - lr * gh
    want = r * step / jnp.linalg.norm(step, axis=0)
    got = jnp.concatenate([new["dense"]["kernel"], new["dense"]["bias"][None]], axis=0)
    support.assert_rel_close(got, want, 1e-14, "sphere step")
    # untouched leaves: the plain base step
    support.assert_rel_close(
        new["out"],
        optax.apply_updates(params, jax.tree.map(lambda x: -lr * x, g))["out"],
        1e-15,
        "untouched leaves",
    )


def test_state_is_transported(x64):
    """Adam's first moment lies in the tangent space of the new point; nu is kept as is."""
    case = support.CASES_BY_NAME["scale_layernorm"]
    params = case.params()
    tx = symmetrize(optax.adam(0.1), list(case.symmetries))
    params, state, _ = support.train(case, tx, params, 3)
    assert isinstance(state, SymmetrizeState)
    mu = jax.tree.leaves(state.inner_state[0].mu)
    nu = jax.tree.leaves(state.inner_state[0].nu)
    b = case.bind(params).bound[0]
    flat = jax.tree.leaves(params)
    radial = b.reduce(flat, mu) / jnp.sqrt(b.norms(flat) * b.norms(mu))
    assert float(jnp.max(jnp.abs(radial))) < 1e-14  # cosine(mu, w): 0 up to rounding
    assert all(float(jnp.min(x)) >= 0 for x in nu)  # second moments not projected
    assert float(jnp.max(jnp.abs(state.residual))) < 1e-12


def test_extra_args_reach_the_base():
    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None, *, factor=1.0, **extra):
        return jax.tree.map(lambda g: -factor * g, updates), state

    base = optax.GradientTransformationExtraArgs(init, update)
    case = support.CASES_BY_NAME["scale_batchnorm"]
    params = case.params()
    tx = symmetrize(base, list(case.symmetries))
    g = jax.grad(case.loss)(params)
    u_half, _ = support.jit(tx.update)(g, tx.init(params), params, factor=0.5, unrelated=3.0)
    # on the leaves no symmetry touches the step is the base's: -factor * g
    support.assert_close(u_half["out"], jax.tree.map(lambda x: -0.5 * x, g["out"]), rtol=1e-6)


def test_nonfinite_gradient_skips_the_step():
    """A NaN or inf gradient: zero updates on every leaf and the state kept (a full optimizer,
    unlike the battery's pass-through transforms)."""
    case = support.CASES_BY_NAME["scale_batchnorm"]
    params = case.params()
    tx = symmetrize(optax.adam(0.05), list(case.symmetries))
    step = support.jit(tx.update)
    u, state = step(jax.grad(case.loss)(params), tx.init(params), params)
    params = optax.apply_updates(params, u)
    for bad_value in (jnp.nan, jnp.inf):
        bad = jax.tree.map(lambda x, v=bad_value: x.at[(0,) * x.ndim].set(v), u)
        u_bad, state_bad = step(bad, state, params)
        support.assert_equal(u_bad, jax.tree.map(jnp.zeros_like, u))
        support.assert_equal(state_bad, state)


def test_zero_norm_group_stays_zero_without_nan():
    case = support.CASES_BY_NAME["scale_batchnorm"]
    params = case.params()
    params["dense"]["kernel"] = params["dense"]["kernel"].at[:, 1].set(0.0)
    params["dense"]["bias"] = params["dense"]["bias"].at[1].set(0.0)
    tx = symmetrize(optax.adam(0.1), list(case.symmetries))
    step = support.jit(tx.update)
    state = tx.init(params)
    g = jax.tree.map(jnp.ones_like, params)  # BatchNorm's own gradient is NaN for a zero unit
    for _ in range(2):
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
    support.assert_finite((params, state))
    assert float(jnp.max(jnp.abs(params["dense"]["kernel"][:, 1]))) == 0.0


@pytest.mark.parametrize(
    "sym",
    [
        ksbopt.Rescale(incoming=["Dense_0/kernel", "Dense_0/bias"], outgoing="Dense_1/kernel"),
        ksbopt.Linear(left="Dense_0/kernel", right="Dense_1/kernel"),
    ],
    ids=["rescale", "linear"],
)
def test_unsupported_kinds_name_the_supported_ones(sym):
    with pytest.raises(ValueError, match=r"supports the symmetry kinds \('scale', 'translation'\)"):
        symmetrize(optax.adam(1e-3), [ksbopt.Scale("Dense_1/kernel"), sym])


def test_overlapping_declarations_are_refused():
    case = support.CASES_BY_NAME["translation_head"]
    tx = symmetrize(
        optax.sgd(0.1), [ksbopt.Translation("head/kernel"), ksbopt.Scale("head/kernel", axis=None)]
    )
    with pytest.raises(ValueError, match="act on the same leaves"):
        tx.init(case.params())


def test_bad_arguments():
    with pytest.raises(TypeError, match="base="):
        symmetrize("adam", ksbopt.Scale("w"))
    with pytest.raises(ValueError, match="moments entry"):
        symmetrize(optax.adam(1e-3), ksbopt.Scale("w"), moments={"mu": "third"})
    with pytest.raises(ValueError, match="matches no leaf"):
        symmetrize(optax.adam(1e-3), ksbopt.Scale("nope")).init({"w": jnp.ones((2, 2))})


# --------------------------------------------------------------------------- flax


def test_nnx_model_matches_plain_dict():
    """The battery's nnx check declares a Rescale; this one a Scale on the hidden units."""
    nnx = pytest.importorskip("flax.nnx")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(1).normal(size=(8, 2)), jnp.float32)

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 4, rngs=rngs)
            self.l2 = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    def loss_dict(p):
        h = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"])
        return jnp.mean(jnp.square(h @ p["l2"]["kernel"] + p["l2"]["bias"] - y))

    sym = [ksbopt.Scale(["l1/kernel", "l1/bias"], axis=-1)]
    model = MLP(nnx.Rngs(0))
    start = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, symmetrize(optax.adam(0.05), sym), wrt=nnx.Param)
    optimizer.update(model, nnx.grad(lambda m: jnp.mean(jnp.square(m(x) - y)))(model))
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = symmetrize(optax.adam(0.05), sym)
    u, _ = tx.update(jax.grad(loss_dict)(start), tx.init(start), start)
    p = optax.apply_updates(start, u)
    support.assert_close(got, p, rtol=contract.RTOL_SAME, atol=1e-6)
    assert support.rel_err(got, start) > 1e-3
