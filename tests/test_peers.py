"""Tests of the peer optimizers against NumPy references written from their papers.

Every optimizer runs ~20 jitted steps on a small Flax-layout tree (a Conv kernel
(3, 3, in, out) with one zero-initialised unit, a Dense kernel (in, out), a head kernel and
two biases) and is compared after EVERY step with ``support/peer_reference.py`` (float64 NumPy,
explicit loops over units). The gradients come from a deterministic NumPy oracle evaluated at
each trajectory's own parameters, shaped so that AdamP's three branches (per-unit
projection, per-layer projection, no projection) are all taken at every step.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import support
from support import peer_reference as ref

from ksbopt import peers
from ksbopt._src.peers import rotational as rotational_lib

STEPS = 20

# Tolerances on the error relative to the largest weight (max_error below). float64: the
# implementation and the reference do the same arithmetic in a different order, so they
# agree to a few ulps after 20 steps (measured at most 1.3e-15); 1e-12 leaves room for other
# BLAS/XLA builds without hiding a wrong formula (those differ at 1e-3 or more).
TOL64 = 1e-12
# float32 (the brief's requirement): the unit roundoff is 6e-8, and each step adds a few
# roundings of the weights to the error; 20 steps stay below 1e-6 relative (measured at
# most 3.4e-7, AdamP with Nesterov).
TOL32 = 1e-6

SHAPES = {
    "conv/kernel": (3, 3, 2, 4),
    "conv/bias": (4,),
    "dense/kernel": (4, 5),
    "dense/bias": (5,),
    "head/kernel": (5, 3),
}


def initial_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    p = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    p["conv/kernel"][..., 0] = 0.0  # the zero-initialised unit
    p["conv/bias"] *= 0.1
    return p


def _tangent_per_unit(r: np.ndarray, w: np.ndarray) -> np.ndarray:
    rows, ws = ref.units_of(r), ref.units_of(w)
    out = []
    for a, b in zip(rows, ws, strict=True):
        n = np.linalg.norm(b)
        out.append(a - (a @ b) / n**2 * b if n > 0 else a)
    return ref.from_units(np.stack(out), w.shape)


def _tangent_to_layer(r: np.ndarray, w: np.ndarray) -> np.ndarray:
    n2 = np.sum(w * w)
    return r - np.sum(r * w) / n2 * w if n2 > 0 else r


def oracle(params: dict[str, np.ndarray], t: int) -> dict[str, np.ndarray]:
    """Deterministic gradients: per-unit tangential on the conv kernel (AdamP projects per
    unit), tangential to the whole dense kernel only (per layer), with a radial part on the
    head kernel (no projection), random on the biases."""
    rng = np.random.default_rng(1000 + t)
    r = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    w = params
    return {
        "conv/kernel": _tangent_per_unit(r["conv/kernel"], w["conv/kernel"]),
        "conv/bias": r["conv/bias"],
        "dense/kernel": _tangent_to_layer(r["dense/kernel"], w["dense/kernel"]),
        "dense/bias": r["dense/bias"],
        "head/kernel": _tangent_to_layer(r["head/kernel"], w["head/kernel"])
        + 0.5 * w["head/kernel"],
    }


def to_tree(flat: dict[str, np.ndarray], dtype) -> dict:
    tree: dict = {}
    for k, v in flat.items():
        outer, inner = k.split("/")
        tree.setdefault(outer, {})[inner] = jnp.asarray(v, dtype)
    return tree


def from_tree(tree: dict) -> dict[str, np.ndarray]:
    return {
        f"{o}/{i}": np.asarray(v, np.float64) for o, sub in tree.items() for i, v in sub.items()
    }


class FastCompiled:
    """``jax.jit(fn)``, compiled ahead of time with XLA's backend optimisation level 0.

    XLA compilation dominates this file's run time; level 0 compiles about a third faster
    and does not change float semantics (no fast-math). One executable per input signature.
    """

    def __init__(self, fn):
        self.jitted = jax.jit(fn)
        self.executables: dict = {}

    def __call__(self, *args):
        leaves, treedef = jax.tree.flatten(args)
        key = (treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves))
        if key not in self.executables:
            lowered = self.jitted.lower(*args)
            self.executables[key] = lowered.compile({"xla_backend_optimization_level": 0})
        return self.executables[key](*args)


_STEPS_CACHE: dict = {}


def make(key: str, factory, *args, **kwargs):
    """``(tx, jax.jit(tx.update))`` built once per key, so that tests sharing a configuration
    share one compilation (XLA compilation dominates the run time of this file)."""
    if key not in _STEPS_CACHE:
        tx = factory(*args, **kwargs)
        _STEPS_CACHE[key] = (tx, FastCompiled(tx.update))
    return _STEPS_CACHE[key]


def run(tx_step, flat0, grad_fn, steps, dtype):
    """Jitted steps of ``tx``; returns the flat float64 parameters after every step.

    ``tx_step`` is a transformation or a ``(tx, jitted update)`` pair from :func:`make`.
    """
    tx, step = (tx_step, FastCompiled(tx_step.update)) if hasattr(tx_step, "init") else tx_step
    params = to_tree(flat0, dtype)
    state = tx.init(params)
    out = []
    for t in range(steps):
        grads = to_tree(grad_fn(from_tree(params), t), dtype)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(from_tree(params))
    return out


def max_error(a: list[dict], b: list[dict]) -> float:
    """Worst step of ``support.rel_err``: max |a - b| over the tree / max |b| over the tree."""
    assert len(a) == len(b)
    return max(support.rel_err(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(params=["float32", "float64"])
def dtype_tol(request):
    """Runs the test once in float32 and once in float64 (x64 enabled)."""
    if request.param == "float64":
        with jax.enable_x64(True):
            yield jnp.float64, TOL64
    else:
        yield jnp.float32, TOL32


def unit_norms(w: np.ndarray) -> np.ndarray:
    return np.linalg.norm(ref.units_of(w), axis=1)


# ------------------------------------------------------------------- SGDP and AdamP


def _check_projected_steps_orthogonal(got, p0, lr, weight_decay, wd_ratio, decay_scale, tol):
    """On the projected kernels the step minus the decay is orthogonal to the weight, so
    |w_{t+1}|^2 = |a w_t|^2 + |w_{t+1} - a w_t|^2 with a = 1 - lr wd wd_ratio (Pythagoras),
    per unit for the conv kernel and for the whole dense kernel."""
    a = 1 - lr * weight_decay * wd_ratio * decay_scale
    prev = p0
    for cur in got:
        for k, per_unit in (("conv/kernel", True), ("dense/kernel", False)):
            step = cur[k] - a * prev[k]
            if per_unit:
                lhs, rhs = (
                    unit_norms(cur[k]) ** 2,
                    unit_norms(a * prev[k]) ** 2 + unit_norms(step) ** 2,
                )
            else:
                lhs, rhs = np.sum(cur[k] ** 2), np.sum((a * prev[k]) ** 2) + np.sum(step**2)
            np.testing.assert_allclose(lhs, rhs, rtol=tol, atol=tol)
        prev = cur


# The authors' projection divides by (|w| + eps)^2, so with the default eps = 1e-8 a step
# keeps a radial part of relative size ~2 eps / |w|; these checks use eps = 1e-30, which makes
# the projection exact to rounding (the Pythagoras identity below). The default eps is
# checked against the authors' code by the parity fixtures.
TINY_EPS = 1e-30


def _check_sgdp(key, hp, dtype, tol):
    hp = {"eps": TINY_EPS, **hp}
    p0 = initial_params()
    expected, views = ref.sgdp_run(p0, oracle, STEPS, lr=0.05, **hp)
    # The oracle must exercise every branch of the cosine test at every step.
    for v in views:
        assert (v["conv/kernel"], v["dense/kernel"], v["head/kernel"]) == ("unit", "layer", "none")
    got = run(make(key, peers.sgdp, 0.05, **hp), p0, oracle, STEPS, dtype)
    assert max_error(got, expected) <= tol
    scale = 1 / (1 - hp["momentum"])
    _check_projected_steps_orthogonal(
        got, p0, 0.05, hp["weight_decay"], hp.get("wd_ratio", 0.1), scale, 100 * tol
    )


def test_sgdp_matches_reference(dtype_tol):
    hp = dict(momentum=0.8, dampening=0.3, weight_decay=5e-2, wd_ratio=0.3)
    _check_sgdp(f"sgdp-{dtype_tol[0].__name__}", hp, *dtype_tol)


@pytest.mark.parametrize("project_momentum", [False, True])
def test_sgdp_buffer_options_match_reference(project_momentum, x64):
    """The paper's step-only projection (False), and the buffer projected under Nesterov."""
    hp = dict(momentum=0.9, weight_decay=1e-2, nesterov=project_momentum)
    hp["project_momentum"] = project_momentum
    _check_sgdp(f"sgdp-project-{project_momentum}", hp, jnp.float64, TOL64)


def test_sgdp_default_projects_the_buffer_without_nesterov(x64):
    """After one step on a per-unit tangential gradient plus a radial part, the default
    buffer has no radial part left; with project_momentum=False it keeps it."""
    w = jnp.array([[3.0, 1.0], [4.0, -1.0]])
    g = jnp.array([[4.0, 1.0], [-3.0, 1.0]]) * 1e-3 + 1e-9 * w
    for project, radial_left in ((None, False), (False, True)):
        tx = peers.scale_by_sgdp(momentum=0.9, project_momentum=project)
        _, state = tx.update(g, tx.init(w), w)
        radial = jnp.abs(jnp.sum(state.momentum * w, axis=0))
        assert bool(jnp.all(radial > 1e-12)) == radial_left


@pytest.mark.slow
def test_sgdp_nesterov_matches_reference(x64):
    hp = dict(momentum=0.9, weight_decay=1e-2, nesterov=True)
    _check_sgdp("sgdp-nesterov", hp, jnp.float64, TOL64)


def _check_adamp(key, nesterov, dtype, tol):
    p0 = initial_params()
    hp = dict(b1=0.9, b2=0.999, eps=TINY_EPS, weight_decay=1e-2, wd_ratio=0.2, nesterov=nesterov)
    expected, views = ref.adamp_run(p0, oracle, STEPS, lr=0.01, **hp)
    for v in views:
        assert (v["conv/kernel"], v["dense/kernel"], v["head/kernel"]) == ("unit", "layer", "none")
    got = run(make(key, peers.adamp, 0.01, **hp), p0, oracle, STEPS, dtype)
    assert max_error(got, expected) <= tol
    _check_projected_steps_orthogonal(got, p0, 0.01, 1e-2, 0.2, 1.0, 100 * tol)


def test_adamp_matches_reference(dtype_tol):
    _check_adamp(f"adamp-{dtype_tol[0].__name__}", False, *dtype_tol)


@pytest.mark.slow
def test_adamp_nesterov_matches_reference(x64):
    _check_adamp("adamp-nesterov", True, jnp.float64, TOL64)


# ------------------------------------------------------------------------------ Nero


def balanced_initial_params() -> dict[str, np.ndarray]:
    """Nero starts on its constraint set (the paper initialises balanced networks)."""
    return {k: ref.balance(v) if v.ndim >= 2 else v for k, v in initial_params().items()}


def _check_nero(key, constraints, debias, dtype, tol):
    p0 = balanced_initial_params() if constraints else initial_params()
    hp = dict(beta=0.999, constraints=constraints, debias=debias)
    expected = ref.nero_run(p0, oracle, STEPS, lr=0.01, **hp)
    got = run(make(key, peers.nero, 0.01, **hp), p0, oracle, STEPS, dtype)
    assert max_error(got, expected) <= tol
    zero_unit = got[-1]["conv/kernel"][..., 0]
    if constraints:  # the zero unit left zero and is balanced like the others
        assert abs(np.linalg.norm(zero_unit) - 1) < 1e-5
    else:  # the layer's scale (mean initial unit norm) moves it too, as the authors' code
        assert np.all(np.abs(zero_unit) > 0)


def test_nero_matches_reference(dtype_tol):
    _check_nero(f"nero-{dtype_tol[0].__name__}", True, True, *dtype_tol)


@pytest.mark.slow
@pytest.mark.parametrize("constraints,debias", [(True, False), (False, True)], ids=str)
def test_nero_variants_match_reference(constraints, debias, x64):
    _check_nero(f"nero-{constraints}-{debias}", constraints, debias, jnp.float64, TOL64)


def test_nero_unit_norm_scale_matches_reference(x64):
    """The paper's per-unit relative step: a zero unit's step is zero, it stays zero."""
    p0 = initial_params()
    hp = dict(beta=0.999, constraints=False, step_scale="unit_norm")
    expected = ref.nero_run(p0, oracle, STEPS, lr=0.01, **hp)
    got = run(peers.nero(0.01, **hp), p0, oracle, STEPS, jnp.float64)
    assert max_error(got, expected) <= TOL64
    assert np.all(got[-1]["conv/kernel"][..., 0] == 0)


def test_balance_params_puts_kernels_on_the_constraint_set(x64):
    p0 = to_tree(initial_params(), jnp.float64)
    out = from_tree(peers.balance_params(p0))
    for k, v in initial_params().items():
        expected = ref.balance(v) if v.ndim >= 2 else v
        np.testing.assert_allclose(out[k], expected, rtol=1e-14, atol=1e-15)


def test_nero_first_update_balances_unbalanced_kernels():
    p0 = initial_params()
    tx = make("nero-float32", peers.nero, 0.01, beta=0.999, constraints=True, debias=True)
    out = run(tx, p0, oracle, 1, jnp.float32)[-1]
    for k in ("conv/kernel", "dense/kernel", "head/kernel"):
        rows = ref.units_of(out[k])
        np.testing.assert_allclose(rows.mean(1), 0, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1, rtol=1e-6)
    # Biases are not constrained: their first step is lr * sigma_b * sign(g) (debiased).
    g = oracle(p0, 0)["dense/bias"]
    sigma = np.mean(np.abs(p0["dense/bias"]))
    np.testing.assert_allclose(
        out["dense/bias"], p0["dense/bias"] - 0.01 * sigma * np.sign(g), rtol=1e-6
    )


# ------------------------------------------------------------ rotational equilibrium


def centred_initial_params() -> dict[str, np.ndarray]:
    """Where REQ's constructor puts the weights (zero_mean): kernels centred, norms kept."""
    return {k: ref.center(v) if v.ndim >= 2 else v for k, v in initial_params().items()}


def _check_rotational(kind, dtype, tol):
    p0 = centred_initial_params()
    lr, wd = (0.1, 5e-3) if kind == "sgdm" else (3e-3, 0.1)
    base = optax.trace(decay=0.9) if kind == "sgdm" else optax.scale_by_adam(b1=0.9, b2=0.999)
    # eps=0: the first step turns every unit by exactly atan(eta_r) (checked below).
    # AdamW without centring: Adam's first direction is g / (|g| + eps), about sign(g), and
    # a unit whose gradient entries share one sign is then constant up to eps / |g|, so its
    # centred direction is rounding noise (both implementations are right, and differ by
    # 1e-10 in float64). The centred AdamW is checked against the authors' code on a real
    # loss by the parity fixtures.
    zero_mean = kind == "sgdm"
    hp = dict(weight_decay=wd, momentum=0.9, rms_decay=0.99, kind=kind, eps=0.0)
    hp["zero_mean"] = zero_mean
    expected = ref.rotational_run(p0, oracle, STEPS, lr=lr, **hp)
    tx = peers.rotational(base, lr, **hp)
    got = run(tx, p0, oracle, STEPS, dtype)
    assert max_error(got, expected) <= tol
    # Per-unit norms never move; the zero unit stays exactly zero.
    for k in ("conv/kernel", "dense/kernel", "head/kernel"):
        np.testing.assert_allclose(unit_norms(got[-1][k]), unit_norms(p0[k]), rtol=10 * tol)
    assert np.all(got[-1]["conv/kernel"][..., 0] == 0)
    # Step 1: the debiased RMS is |u_tangent| itself, so every unit turns by atan(eta_r).
    eta_r = rotational_lib.equilibrium_angular_update(lr, wd, 0.9, kind=kind)
    w0, w1 = ref.units_of(p0["dense/kernel"]), ref.units_of(got[0]["dense/kernel"])
    w0_hat = w0 / np.linalg.norm(w0, axis=1, keepdims=True)
    ortho = w1 - np.sum(w1 * w0_hat, axis=1, keepdims=True) * w0_hat
    sin = np.linalg.norm(ortho, axis=1) / np.linalg.norm(w1, axis=1)
    # float32: the orthogonal part (~eta_r |w|) carries the ~1e-7 |w| rounding of w1.
    np.testing.assert_allclose(np.arcsin(sin), np.arctan(eta_r), rtol=1e-9 if tol < 1e-9 else 1e-3)


def _in_dtype(dtype_name, check):
    if dtype_name == "float64":
        with jax.enable_x64(True):
            check(jnp.float64, TOL64)
    else:
        check(jnp.float32, TOL32)


@pytest.mark.parametrize("kind,dtype_name", [("sgdm", "float64"), ("adamw", "float32")])
def test_rotational_matches_reference(kind, dtype_name):
    _in_dtype(dtype_name, lambda dtype, tol: _check_rotational(kind, dtype, tol))


@pytest.mark.slow
@pytest.mark.parametrize("kind,dtype_name", [("sgdm", "float32"), ("adamw", "float64")])
def test_rotational_matches_reference_other_dtype(kind, dtype_name):
    _in_dtype(dtype_name, lambda dtype, tol: _check_rotational(kind, dtype, tol))


def test_center_params_matches_reference(x64):
    out = from_tree(peers.center_params(to_tree(initial_params(), jnp.float64)))
    for k, v in centred_initial_params().items():
        np.testing.assert_allclose(out[k], v, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("kind", ["sgdm", "adamw"])
def test_rotational_without_weight_decay_trains_every_leaf_with_the_base(kind, x64):
    """weight_decay=0: nothing is frozen; every leaf takes the base step (as REQ)."""
    p0 = initial_params()
    base = optax.trace(decay=0.9) if kind == "sgdm" else optax.scale_by_adam()
    got = run(peers.rotational(base, 0.05, 0.0, kind=kind), p0, oracle, 5, jnp.float64)
    expected = ref.rotational_run(p0, oracle, 5, lr=0.05, weight_decay=0.0, kind=kind)
    assert max_error(got, expected) <= TOL64
    plain = optax.sgd(0.05, momentum=0.9) if kind == "sgdm" else optax.adam(0.05)
    assert max_error(got, run(plain, p0, oracle, 5, jnp.float64)) <= TOL64
    assert np.max(np.abs(got[-1]["dense/kernel"] - p0["dense/kernel"])) > 1e-2


@pytest.mark.parametrize("weight_decay", [0.0, 5e-3])
def test_rotational_with_injected_weight_decay_matches_the_static_one(weight_decay, x64):
    """A traced weight decay (inject_hyperparams) picks rotational or base per step, as a
    concrete one does at construction."""
    p0 = centred_initial_params()
    static = peers.rotational(optax.trace(0.9), 0.1, weight_decay)
    injected = optax.inject_hyperparams(peers.rotational)(
        base=optax.trace(0.9), learning_rate=0.1, weight_decay=weight_decay
    )
    got = run(injected, p0, oracle, 3, jnp.float64)
    assert max_error(got, run(static, p0, oracle, 3, jnp.float64)) <= TOL64


def test_equilibrium_angular_update_formulas():
    eta, lam, beta = 0.1, 5e-4, 0.9
    assert rotational_lib.equilibrium_angular_update(eta, lam, beta) == pytest.approx(
        np.sqrt(2 * eta * lam / (1 + beta)), rel=1e-15
    )
    assert rotational_lib.equilibrium_angular_update(eta, lam, beta, kind="adamw") == pytest.approx(
        np.sqrt(2 * eta * lam * (1 - beta) / (1 + beta)), rel=1e-15
    )


@pytest.mark.slow
def test_rotational_follows_a_learning_rate_schedule():
    """A schedule changes eta and eta_r every step, exactly as in the reference."""
    p0 = initial_params()
    schedule = optax.linear_schedule(3e-3, 1e-3, transition_steps=5)
    tx = peers.rotational(optax.scale_by_adam(), schedule, 0.1, kind="adamw", zero_mean=False)
    got = run(tx, p0, oracle, 6, jnp.float32)
    expected = ref.rotational_run(
        p0,
        oracle,
        6,
        lr=lambda t: float(schedule(t)),
        weight_decay=0.1,
        kind="adamw",
        zero_mean=False,
    )
    assert max_error(got, expected) <= TOL32


# ---------------------------------------------------------------------------- Path-SGD
# The SHAPES tree is a network: conv 3x3 VALID on a 3x3x2 image -> ReLU -> dense -> ReLU ->
# head (no bias). Its zero conv unit (kernel and bias zero) is dead: kappa = 0 on its outgoing
# edges and every gradient through it is 0.

_X, _Y = (
    np.random.default_rng(7).normal(size=(8, 3, 3, 2)),
    np.random.default_rng(8).normal(size=(8, 3)),
)


def path_params() -> dict[str, np.ndarray]:
    p = {k: 0.5 * v for k, v in initial_params().items()}
    p["conv/bias"][0] = 0.0
    return p


def path_grads(w: dict[str, np.ndarray], t: int) -> dict[str, np.ndarray]:
    return ref.conv_mlp_loss_grad(w, _X, _Y)[1]


def conv_mlp_apply(p, x, act=jax.nn.relu):
    z = jnp.einsum("nijc,ijca->na", x, p["conv"]["kernel"]) + p["conv"]["bias"]
    z = act(z) @ p["dense"]["kernel"] + p["dense"]["bias"]
    return act(z) @ p["head"]["kernel"]


def conv_mlp_path_norm(sq):
    """Squared path norm: the net without ReLUs, squared weights, all-ones input."""
    ones = jnp.ones((1, 3, 3, 2), sq["conv"]["kernel"].dtype)
    return jnp.sum(conv_mlp_apply(sq, ones, act=lambda z: z))


def test_path_sgd_matches_reference(dtype_tol):
    dtype, tol = dtype_tol
    p0 = path_params()
    expected = ref.path_sgd_run(p0, path_grads, STEPS, lr=0.5)
    got = run(peers.path_sgd(0.5, path_norm_fn=conv_mlp_path_norm), p0, path_grads, STEPS, dtype)
    assert max_error(got, expected) <= tol
    start = np.asarray(jnp.asarray(p0["dense/kernel"][0], dtype), np.float64)
    assert np.all(got[-1]["dense/kernel"][0] == start)  # the dead unit's outputs never move
    # It trains: the loss went down.
    assert ref.conv_mlp_loss_grad(got[-1], _X, _Y)[0] < ref.conv_mlp_loss_grad(p0, _X, _Y)[0]


def test_path_preconditioner_on_a_flax_model(x64):
    """With a Flax Conv/Dense model: kappa from ONE gradient of the squared-weight network
    equals the paper's gamma_in * gamma_out recursion, and the reference's hand-written
    gradient is the Flax model's gradient (so the reference network is this model)."""
    nn = pytest.importorskip("flax.linen")

    class ConvMLP(nn.Module):
        act: object = nn.relu

        @nn.compact
        def __call__(self, x):
            x = self.act(nn.Conv(4, (3, 3), padding="VALID")(x))
            x = self.act(nn.Dense(5)(x.reshape(x.shape[0], -1)))
            return nn.Dense(3, use_bias=False)(x)

    names = {"conv": "Conv_0", "dense": "Dense_0", "head": "Dense_1"}
    p0 = path_params()
    params = {
        names[o]: {i: jnp.asarray(p0[f"{o}/{i}"]) for i in ("kernel", "bias") if f"{o}/{i}" in p0}
        for o in names
    }
    flat = lambda tree: {
        f"{o}/{i}": np.asarray(v) for o, m in names.items() for i, v in tree[m].items()
    }
    linear = ConvMLP(act=lambda z: z)

    def pi(sq):
        return jnp.sum(linear.apply({"params": sq}, jnp.ones((1, 3, 3, 2))))

    kappa = flat(peers.path_preconditioner(pi, params))
    expected = ref.conv_mlp_kappa(p0)
    for k in expected:
        np.testing.assert_allclose(kappa[k], expected[k], rtol=1e-13, atol=0)
    assert np.all(expected["dense/kernel"][0] == 0)  # the dead unit's outgoing edges
    assert np.all(expected["conv/kernel"][..., 0] > 0)  # its incoming edges still count

    def loss(p):
        out = ConvMLP().apply({"params": p}, jnp.asarray(_X))
        return 0.5 * jnp.sum((out - _Y) ** 2) / _X.shape[0]

    g, g_ref = flat(jax.grad(loss)(params)), path_grads(p0, 0)
    for k in g_ref:
        np.testing.assert_allclose(g[k], g_ref[k], rtol=1e-12, atol=1e-15)


def test_path_sgd_rejects_non_scalar_path_norm():
    tx = peers.path_sgd(0.1, path_norm_fn=lambda sq: sq["a"])
    params = {"a": jnp.ones(3)}
    with pytest.raises(ValueError, match="path_norm_fn must return a scalar"):
        tx.update(params, tx.init(params), params)


# ----------------------------------------------------------- contract-style checks
# One entry per optimizer: (factory, its other arguments, initial parameters, gradient oracle,
# reference run).

BASE = optax.trace(0.9)
CASES = {
    "sgdp": (
        peers.sgdp,
        dict(momentum=0.9, weight_decay=1e-2),
        initial_params,
        oracle,
        lambda p0, lr, n: ref.sgdp_run(p0, oracle, n, lr=lr, momentum=0.9, weight_decay=1e-2)[0],
    ),
    "adamp": (
        peers.adamp,
        dict(weight_decay=1e-2),
        initial_params,
        oracle,
        lambda p0, lr, n: ref.adamp_run(p0, oracle, n, lr=lr, weight_decay=1e-2)[0],
    ),
    "nero": (
        peers.nero,
        dict(beta=0.99),
        balanced_initial_params,
        oracle,
        lambda p0, lr, n: ref.nero_run(p0, oracle, n, lr=lr, beta=0.99),
    ),
    "rotational": (
        peers.rotational,
        dict(base=BASE, weight_decay=5e-3, momentum=0.9),
        initial_params,
        oracle,
        lambda p0, lr, n: ref.rotational_run(p0, oracle, n, lr=lr, weight_decay=5e-3),
    ),
    "path_sgd": (
        peers.path_sgd,
        dict(path_norm_fn=conv_mlp_path_norm),
        path_params,
        path_grads,
        lambda p0, lr, n: ref.path_sgd_run(p0, path_grads, n, lr=lr),
    ),
}


def _make(name, lr=0.1):
    factory, kwargs, _, _, _ = CASES[name]
    return factory(learning_rate=lr, **kwargs)


@pytest.mark.parametrize("name", list(CASES))
def test_inject_hyperparams_jit_once_and_zero_units(name):
    """One compiled step of ``optax.inject_hyperparams(factory)`` (traced only once):

    1. the learning rate is a hyperparameter in the state: changing it every step gives
       the reference trajectory with that learning-rate sequence, with no retracing;
    2. on all-zero parameters (every unit has zero norm), two steps with random gradients
       and one with zero gradients give finite updates and state: AdamP's cosine test on
       zero weights, Nero's normalisation of zero units, the rotational wrapper's frozen
       zero norm and Path-SGD's kappa = 0 make no NaN.
    """
    factory, kwargs, make_params, grad_fn, reference = CASES[name]
    static = ("path_norm_fn",) if name == "path_sgd" else ()
    tx = optax.inject_hyperparams(factory, static_args=static)(learning_rate=0.1, **kwargs)
    step = support.jit_max_traces(tx.update, n=1)
    rates = [0.1, 0.03, 0.06]
    p0 = make_params()
    params = to_tree(p0, jnp.float32)
    state = tx.init(params)
    got = []
    for t, lr in enumerate(rates):
        state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
        grads = to_tree(grad_fn(from_tree(params), t), jnp.float32)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        got.append(from_tree(params))
    assert max_error(got, reference(p0, lambda t: rates[t], len(rates))) <= TOL32

    zeros = to_tree({k: np.zeros(s) for k, s in SHAPES.items()}, jnp.float32)
    state, params = tx.init(zeros), zeros
    for t in range(3):
        g = {k: v if t < 2 else 0 * v for k, v in oracle(from_tree(params), t).items()}
        updates, state = step(to_tree(g, jnp.float32), state, params)
        support.assert_finite((updates, state))
        params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("name", list(CASES))
def test_params_none_is_an_error(name):
    tx = _make(name)
    params = to_tree(initial_params(), jnp.float32)
    with pytest.raises(ValueError, match=re.escape("params=None")):
        jax.jit(tx.update)(params, tx.init(params), None)  # raised while tracing


def _pn(sq):
    return jnp.sum(sq["a"])


BAD = [
    (lambda: peers.sgdp(-0.1), "learning_rate=-0.1"),
    (lambda: peers.adamp(-1.0), "learning_rate=-1.0"),
    (lambda: peers.nero(-0.01), "learning_rate=-0.01"),
    (lambda: peers.rotational(BASE, -0.1, 1e-4), "learning_rate=-0.1"),
    (lambda: peers.path_sgd(-0.1, path_norm_fn=_pn), "learning_rate=-0.1"),
    (lambda: peers.sgdp(0.1, delta=0.0), "delta=0.0"),
    (lambda: peers.adamp(0.1, delta=-0.1), "delta=-0.1"),
    (lambda: peers.nero(0.01, beta=1.0), "beta=1.0"),
    (lambda: peers.nero(0.01, beta=-0.1), "beta=-0.1"),
    (lambda: peers.adamp(0.1, b1=1.0), "b1=1.0"),
    (lambda: peers.adamp(0.1, b2=1.5), "b2=1.5"),
    (lambda: peers.sgdp(0.1, momentum=1.0), "momentum=1.0"),
    (lambda: peers.sgdp(0.1, wd_ratio=2.0), "wd_ratio=2.0"),
    (lambda: peers.sgdp(0.1, weight_decay=-1e-4), "weight_decay=-0.0001"),
    (lambda: peers.sgdp(0.1, dampening=0.5, nesterov=True), "dampening=0.5"),
    (lambda: peers.rotational(BASE, 0.1, 1e-4, momentum=1.0), "momentum=1.0"),
    (lambda: peers.rotational(BASE, 0.1, 1e-4, rms_decay=-0.5), "rms_decay=-0.5"),
    (lambda: peers.rotational(BASE, 0.1, -1e-4), "weight_decay=-0.0001"),
    (lambda: peers.rotational(BASE, 0.1, 1e-4, kind="lion"), "kind='lion'"),
    (lambda: peers.rotational(BASE, 0.1, 1e-4, eps=-1e-8), "eps=-1e-08"),
    (lambda: peers.sgdp(0.1, project_momentum="yes"), "project_momentum='yes'"),
    (lambda: peers.nero(0.01, step_scale="current"), "step_scale='current'"),
    (lambda: peers.adamp(0.1, eps=-1.0), "eps=-1.0"),
    (lambda: peers.sgdp(0.1, dampening=1.5), "dampening=1.5"),
    (lambda: peers.rotational(BASE, 0.1, 1e-4, zero_mean="yes"), "zero_mean='yes'"),
    (lambda: peers.rotational(BASE, 0.1, 1e-4, per_neuron=None), "per_neuron=None"),
    (lambda: peers.nero(0.01, constraints=1.0), "constraints=1.0"),
]


@pytest.mark.parametrize("make,text", BAD, ids=[t for _, t in BAD])
def test_bad_hyperparameters_raise(make, text):
    with pytest.raises(ValueError, match=re.escape(text)):
        make()


def test_bad_callables_raise_type_error():
    with pytest.raises(TypeError, match="path_norm_fn=3"):
        peers.path_sgd(0.1, path_norm_fn=3)
    with pytest.raises(TypeError, match="base="):
        peers.rotational(0.1, 0.1, 1e-4)
