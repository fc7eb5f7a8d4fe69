"""ksbopt.monitor: exact charges, decomposition and predictions against THEORY.md; recorder.

Exactness tests run in float64 on the exactly symmetric toy losses of ``tests/support.py``
(normalisers with epsilon = 0) and on a Flax NNX model, for 200 steps. Tolerances:

- the decomposition ``Q(w) + <xi, u> + Q(u)`` against the charges of
  ``optax.apply_updates(params, u)`` computed independently: 1e-12 relative (one identity, a
  few roundings of 1e-16 each);
- predicted charges (open-loop recursions over 200 steps) against the observed ones: 1e-9
  relative (observed ~1e-14: rounding accumulates linearly in the number of steps);
- the violation cosine of a true symmetry in float64: below 1e-8 (observed <= 1e-10; the
  toy losses' invariance holds to rounding, but a cosine divides by |g|, which can be small).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import support

import ksbopt
from ksbopt import MonitorState, NoetherDiagnostics, Recorder, monitor, summarize
from ksbopt import dynamics as D
from ksbopt._src.diagnostics.recorder import find_diagnostics

RTOL_DECOMPOSITION = 1e-12
RTOL_PREDICTION = 1e-9
TOL_VIOLATION = 1e-8
STEPS = 200

# --------------------------------------------------------------------------- problems


def _prefixed(sym, prefix: str):
    """The declaration with every string selector moved under ``prefix/``."""

    def move(sel):
        return tuple(f"{prefix}/{s}" for s in sel)

    names = {
        "scale": ("selection",),
        "translation": ("selection",),
        "rescale": ("incoming", "outgoing"),
        "linear": ("left", "right"),
    }[sym.kind]
    return dataclasses.replace(sym, **{n: move(getattr(sym, n)) for n in names})


def combined(*names: str) -> support.Case:
    """Several toy problems side by side in one tree (one compilation covers them all)."""
    cases = [support.CASES_BY_NAME[n] for n in names]
    return support.Case(
        "+".join(names),
        lambda: {c.name: c.make_params() for c in cases},
        lambda p: sum(c.loss(p[c.name]) for c in cases),
        tuple(_prefixed(s, c.name) for c in cases for s in c.symmetries),
    )


SGD_CASE = combined("scale_batchnorm", "rescale_mlp", "translation_head", "linear_deep")
ADAPTIVE_CASE = combined("scale_layernorm", "rescale_mlp", "translation_head")


def run(case: support.Case, tx, steps: int = STEPS, params=None, jit=jax.jit):
    """``steps`` jitted steps; per step: the monitor's diagnostics and the true charges of
    the parameters before and after (computed independently with ksbopt.charges)."""
    params = case.params() if params is None else params
    sym = list(case.symmetries)
    state = tx.init(params)

    @jit
    def go(params, state):
        def step(carry, _):
            p, s = carry
            u, s = tx.update(jax.grad(case.loss)(p), s, p)
            new = optax.apply_updates(p, u)
            return (new, s), (find_diagnostics(s), ksbopt.charges(p, sym), ksbopt.charges(new, sym))

        return jax.lax.scan(step, (params, state), None, length=steps)

    (params, state), (diag, before, after) = go(params, state)
    return params, state, diag, before, after


def check_exact(
    diag: NoetherDiagnostics, before, after, *, predicted: bool = True, metric: bool = False
) -> None:
    for i in range(len(before)):
        # Charges before the step are the core's charges, exactly.
        support.assert_rel_close(diag.charges_before[i], before[i], 1e-15, f"sym {i} before")
        # The decomposition of section 3 sums to the independently observed change.
        total = diag.charges_before[i] + diag.first_order[i] + diag.second_order[i]
        support.assert_rel_close(total, after[i], RTOL_DECOMPOSITION, f"sym {i} decomposition")
        support.assert_rel_close(diag.charges[i], after[i], RTOL_DECOMPOSITION, f"sym {i} after")
        assert float(jnp.max(jnp.abs(diag.violation[i]))) < TOL_VIOLATION, i
        if predicted:
            support.assert_rel_close(
                diag.predicted_charges[i], after[i], RTOL_PREDICTION, f"sym {i} predicted"
            )
            assert float(jnp.max(jnp.abs(diag.prediction_error[i]))) < RTOL_PREDICTION, i
        if metric:
            support.assert_rel_close(
                diag.predicted_metric_charges[i],
                diag.metric_charges[i],
                RTOL_PREDICTION,
                f"sym {i} metric predicted",
            )
            assert float(jnp.max(jnp.abs(diag.metric_prediction_error[i]))) < RTOL_PREDICTION


# --------------------------------------------------------------------------- exactness

LR, LAM, BETA = 0.05, 0.01, 0.9
SCHEDULE = optax.linear_schedule(0.05, 0.02, STEPS)

SLOW = pytest.mark.slow  # the rest of the matrix: same machinery, more compilations
SGD_CONFIGS = {
    # [derived from NM] P1 (scale, rescale), [derived] P10 (linear), P4 (translation);
    # a decaying learning rate keeps the carried quantities honest.
    "P1_P4_P10": lambda: (
        optax.chain(optax.add_decayed_weights(LAM), optax.sgd(SCHEDULE)),
        D.sgd(SCHEDULE, 0.0, LAM),
    ),
    # [derived] P3 coupled and P4 heavy ball, eta read from an inject_hyperparams state.
    "P3_coupled": lambda: (
        optax.chain(
            optax.add_decayed_weights(LAM),
            optax.inject_hyperparams(optax.sgd)(learning_rate=SCHEDULE, momentum=BETA),
        ),
        D.sgd(None, BETA, LAM),
    ),
    # [derived] P3 decoupled (weight decay outside the momentum).
    "P3_decoupled": lambda: (
        optax.chain(
            optax.trace(BETA),
            optax.add_decayed_weights(LAM),
            optax.scale_by_learning_rate(SCHEDULE),
        ),
        D.sgd(SCHEDULE, BETA, LAM, decoupled=True),
    ),
}


@pytest.mark.parametrize(
    "config", [c if c != "P3_decoupled" else pytest.param(c, marks=SLOW) for c in SGD_CONFIGS]
)
def test_sgd_predictions_exact(x64, config):
    opt, dyn = SGD_CONFIGS[config]()
    tx = monitor(opt, list(SGD_CASE.symmetries), dynamics=dyn)
    _, _, diag, before, after = run(SGD_CASE, tx)
    check_exact(diag, before, after)
    # The charges did move (weight decay and the finite step break them): not a vacuous test.
    assert support.rel_err(after[0][-1], before[0][0]) > 1e-3


ADAPTIVE_CONFIGS = {
    # [derived] P6, RMSProp with decoupled weight decay.
    "rmsprop": lambda: (
        optax.chain(
            optax.scale_by_rms(), optax.add_decayed_weights(LAM), optax.scale_by_learning_rate(0.01)
        ),
        D.rmsprop(0.01, weight_decay=LAM),
    ),
    # [derived] P6 with Adam's momentum (AdamW), non-default epsilons.
    "adamw": lambda: (
        optax.adamw(0.01, eps=1e-4, eps_root=1e-6, weight_decay=LAM),
        D.adam(0.01, eps=1e-4, eps_root=1e-6, weight_decay=LAM),
    ),
}


@pytest.mark.parametrize(
    "config", [c if c != "rmsprop" else pytest.param(c, marks=SLOW) for c in ADAPTIVE_CONFIGS]
)
def test_adaptive_metric_charges_exact(x64, config):
    opt, dyn = ADAPTIVE_CONFIGS[config]()
    tx = monitor(opt, list(ADAPTIVE_CASE.symmetries), dynamics=dyn)
    _, _, diag, before, after = run(ADAPTIVE_CASE, tx)
    check_exact(diag, before, after, predicted=False, metric=True)
    # The Euclidean charge moves at FIRST order under the metric (P6): the first-order term
    # of the scale group is not small against the second-order one.
    first = np.abs(np.asarray(diag.first_order[0])).max()
    second = np.abs(np.asarray(diag.second_order[0])).max()
    assert first > 10 * second, (first, second)


@SLOW
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")  # flax BatchNorm
def test_flax_batchnorm_model_exact(x64):
    """A real flax.nnx model (Dense -> BatchNorm(epsilon=0) -> ReLU -> softmax head)."""
    nnx = pytest.importorskip("flax.nnx")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 5)))
    y = jnp.asarray(rng.integers(0, 3, size=16))
    f64 = {"dtype": jnp.float64, "param_dtype": jnp.float64}

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(5, 6, rngs=rngs, **f64)
            self.bn = nnx.BatchNorm(6, epsilon=0.0, rngs=rngs, **f64)
            self.head = nnx.Linear(6, 3, rngs=rngs, **f64)

        def __call__(self, x):
            return self.head(jax.nn.relu(self.bn(self.dense(x))))

    model = Net(nnx.Rngs(0))
    sym = [
        ksbopt.Scale(["dense/kernel", "dense/bias"]),
        ksbopt.Translation(["head/kernel", "head/bias"]),
    ]
    tx = monitor(
        optax.chain(optax.add_decayed_weights(LAM), optax.sgd(0.1, momentum=BETA)),
        sym,
        dynamics=D.sgd(0.1, BETA, LAM),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    @nnx.jit
    def step(model, optimizer):
        optimizer.update(model, nnx.grad(loss)(model))

    recorder = Recorder(sym, every=50)
    for k in range(STEPS):
        step(model, optimizer)
        recorder.record(k, optimizer.opt_state)
    diag = find_diagnostics(optimizer.opt_state)
    now = ksbopt.charges(nnx.state(model, nnx.Param), sym)
    for i in range(2):
        support.assert_rel_close(np.asarray(diag.charges[i]), now[i], RTOL_DECOMPOSITION, "after")
        support.assert_rel_close(
            np.asarray(diag.predicted_charges[i]), now[i], RTOL_PREDICTION, "predicted"
        )
        assert np.max(np.abs(np.asarray(diag.violation[i]))) < TOL_VIOLATION
    assert len(recorder) == 4
    assert recorder.max_abs("prediction_error") < RTOL_PREDICTION


@SLOW
def test_nesterov_translation_conserved(x64):
    """P4: Nesterov keeps the translation charge exactly without weight decay; no scale
    recursion is claimed for it (None)."""
    case = combined("relu_softmax")
    tx = monitor(
        optax.sgd(LR, momentum=BETA, nesterov=True),
        list(case.symmetries),
        dynamics=D.sgd(LR, BETA, nesterov=True),
    )
    _, _, diag, before, after = run(case, tx, steps=50)
    assert diag.predicted_charges[0] is None  # rescale: no recursion for Nesterov
    support.assert_rel_close(diag.predicted_charges[1], after[1], RTOL_PREDICTION, "P4")
    support.assert_rel_close(after[1][-1], before[1][0], RTOL_PREDICTION, "conserved")


def _fused_case():
    """Leaves shaped so that the one-pass reduction of the monitor takes each of its paths:
    a conv-like kernel (rows 3 * 4 * 10 = 120, cut into 12 blocks), a whole-leaf group of
    201 = 3 * 67 rows (no divisor in [6, 12]: 8 blocks and a remainder of 1 row), a rescale
    pair whose incoming kernel has 13 rows (8 blocks, remainder 5) and whose bias and
    outgoing kernel are too small or not grouped by trailing axes (direct sums)."""
    rng = np.random.default_rng(7)
    x = 0.3 * rng.normal(size=(8, 13))
    a_conv, a_leaf = rng.normal(size=(3, 4, 10, 5)), rng.normal(size=(67, 3))

    def make():
        return {
            "conv": rng.normal(size=(3, 4, 10, 5)),
            "leaf": rng.normal(size=(67, 3)),
            "Dense_0": {"kernel": rng.normal(size=(13, 6)), "bias": 0.5 * rng.normal(size=6)},
            "Dense_1": {"kernel": 0.3 * rng.normal(size=(6, 2))},
        }

    def loss(p):
        conv = p["conv"] / jnp.sqrt(jnp.sum(jnp.square(p["conv"]), axis=(0, 1, 2)))
        leaf = p["leaf"] / jnp.sqrt(jnp.sum(jnp.square(p["leaf"])))
        h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        out = h @ p["Dense_1"]["kernel"]
        return (
            jnp.sum(jnp.sin(3 * conv) * a_conv)
            + jnp.sum(jnp.cos(2 * leaf) * a_leaf)
            + jnp.mean(jnp.square(out - 1.0))
        )

    sym = (
        ksbopt.Scale("conv", axis=-1),
        ksbopt.Scale("leaf", axis=None),
        ksbopt.Rescale(["Dense_0/kernel", "Dense_0/bias"], "Dense_1/kernel"),
    )
    params = make()
    return support.Case("fused", lambda: params, loss, sym)


def test_one_pass_reduction_matches_direct_sums(x64, monkeypatch):
    """The per-leaf one-pass reduction (used on large leaves) gives the direct sums up to
    rounding, and keeps every exact identity. Forced on small leaves here.

    Tolerances: the two runs sum the same float64 products in two orders (at most 201 terms
    per group, errors of a few ulp per term): 1e-12 relative to the largest entry of each
    field; the identities as in ``check_exact`` (decomposition 1e-12, prediction 1e-9).
    """
    from ksbopt._src.diagnostics import fused_sums

    case = _fused_case()
    opt = optax.chain(optax.add_decayed_weights(LAM), optax.sgd(LR, momentum=BETA))
    tx = monitor(opt, list(case.symmetries), dynamics=D.sgd(LR, BETA, LAM))
    params = case.params()
    # support.jit: the test's own program compiles fast (IEEE semantics kept).
    _, _, direct, _, _ = run(case, tx, steps=20, jit=support.jit)
    monkeypatch.setattr(fused_sums, "FUSED_MIN_SIZE", 0)
    jaxpr = jax.make_jaxpr(tx.update)(jax.grad(case.loss)(params), tx.init(params), params)
    variadic = [e for e in jaxpr.eqns if e.primitive.name == "reduce" and len(e.invars) > 2]
    assert len(variadic) == 3, "conv, leaf and Dense_0/kernel each reduced in one pass"
    _, _, fused, before, after = run(case, tx, steps=20, jit=support.jit)
    # Fields that are pure rounding noise for a true symmetry (the violation, the residuals)
    # are compared with their tolerances below, not with each other.
    noise = ("violation", "prediction_error", "metric_prediction_error")
    for name in (f for f in NoetherDiagnostics._fields[1:] if f not in noise):
        for i, (a, b) in enumerate(zip(getattr(fused, name), getattr(direct, name))):
            if b is not None:
                # A step parallel to w (a dead ReLU unit: weight decay only) has angle 0, computed
                # as sqrt of a rounding residual: angles agree to sqrt(eps) ~ 1.5e-8, not 1e-12.
                tol = 1.5e-8 if name == "angular_update" else 1e-12
                support.assert_rel_close(a, b, tol, f"{name} {i}")
    for i in range(len(before)):
        total = fused.charges_before[i] + fused.first_order[i] + fused.second_order[i]
        support.assert_rel_close(total, after[i], RTOL_DECOMPOSITION, f"sym {i} decomposition")
        support.assert_rel_close(fused.predicted_charges[i], after[i], RTOL_PREDICTION, f"{i}")
        assert float(jnp.max(jnp.abs(fused.prediction_error[i]))) < RTOL_PREDICTION, i
        assert float(jnp.max(jnp.abs(fused.violation[i]))) < TOL_VIOLATION, i
        assert support.rel_err(after[i][-1], before[i][0]) > 1e-3  # the charges did move


def test_updates_are_passed_through_bit_for_bit(monkeypatch):
    """The monitor returns the wrapped optimizer's updates exactly (signed zeros too), also
    where it orders the parameter update after its reductions (large leaves, forced here)."""
    from ksbopt._src.diagnostics import fused_sums

    monkeypatch.setattr(fused_sums, "FUSED_MIN_SIZE", 0)
    params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.0, 1.0])}
    grads = {"w": jnp.array([[-0.0, 1e-30], [jnp.inf, -4.0]]), "b": jnp.array([-0.0, 0.0])}
    opt = optax.sgd(1.0)
    tx = monitor(opt, ksbopt.Scale(["w", "b"]), learning_rate=1.0)
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    ref, _ = opt.update(grads, opt.init(params), params)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.signbit(a), np.signbit(b))
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- violation


def test_wrong_declaration_shows_violation(x64):
    """A Scale on a layer with no normalisation after it is flagged; a true one is not."""
    case = combined("scale_batchnorm", "rescale_mlp")
    true, wrong = (
        ksbopt.Scale("scale_batchnorm/dense/*"),
        ksbopt.Scale(["rescale_mlp/Dense_0/kernel", "rescale_mlp/Dense_0/bias"]),
    )
    tx = monitor(optax.sgd(LR), [true, wrong])
    params = case.params()
    grads = jax.jit(jax.grad(case.loss))(params)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    v_true, v_wrong = optax.tree.get(state, "violation")
    assert float(jnp.max(jnp.abs(v_true))) < TOL_VIOLATION
    # A ReLU unit is rescale- but not scale-symmetric: |cos(g, w)| is O(0.1) for some unit.
    assert float(jnp.max(jnp.abs(v_wrong))) > 1e-2, v_wrong


# --------------------------------------------------------------------------- every=N


def test_every_n_keeps_recursions_exact_without_retracing(x64):
    case = combined("scale_batchnorm", "translation_head")
    sym = list(case.symmetries)
    opt = optax.chain(optax.add_decayed_weights(LAM), optax.sgd(LR, momentum=BETA))
    dyn = D.sgd(LR, BETA, LAM)
    every, dense = monitor(opt, sym, dynamics=dyn, every=5), monitor(opt, sym, dynamics=dyn)
    counter = support.TraceCounter(every.update)
    update = support.jit_max_traces(counter, n=1)
    dense_update = jax.jit(dense.update)
    params = case.params()
    s_every, s_dense = every.init(params), dense.init(params)
    grad = jax.jit(jax.grad(case.loss))
    for k in range(12):
        g = grad(params)
        u, s_every = update(g, s_every, params)
        _, s_dense = dense_update(g, s_dense, params)
        d = s_every.diagnostics
        assert int(d.step) == 5 * (k // 5), (k, int(d.step))  # refreshed every 5 steps only
        if k % 5 == 0:  # two compilations: the same arithmetic up to reassociation
            support.assert_rel_close(d, s_dense.diagnostics, 1e-12, f"step {k}")
        params = optax.apply_updates(params, u)
    assert counter.count == 1
    # The recursions advanced at every step: the carried prediction equals the dense one.
    support.assert_rel_close(s_every.recursion, s_dense.recursion, 1e-12, "recursion")
    assert int(s_every.monitor_count) == 12


# --------------------------------------------------------------------------- robustness


def test_zero_groups_and_nonfinite_gradients_give_no_nan():
    params = {"w": jnp.zeros((3, 2)).at[:, 1].set(1.0), "b": jnp.zeros(2)}
    sym = [ksbopt.Scale(["w", "b"]), ksbopt.Translation("w", axis=0)]
    tx = monitor(optax.sgd(0.1, momentum=0.9), sym, dynamics=D.sgd(0.1, 0.9, 1e-2))
    state = tx.init(params)
    update = jax.jit(tx.update)
    g = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    _, state = update(g, state, params)
    support.assert_finite(state)
    bad = {"w": jnp.full((3, 2), jnp.nan), "b": jnp.zeros(2)}
    _, bad_state = update(bad, state, params)
    # The monitor's own state is kept (the wrapped sgd's is not its business).
    support.assert_equal(
        (bad_state.diagnostics, bad_state.recursion, bad_state.monitor_count),
        (state.diagnostics, state.recursion, state.monitor_count),
    )


def test_bfloat16_params_float32_diagnostics():
    case = support.CASES_BY_NAME["scale_batchnorm"]
    params = case.params(jnp.bfloat16)
    tx = monitor(optax.sgd(0.1, momentum=0.9), list(case.symmetries), dynamics=D.sgd(0.1, 0.9))
    grads = jax.jit(jax.grad(case.loss))(params)
    u, state = jax.jit(tx.update)(grads, tx.init(params), params)
    support.assert_dtypes(u, params)
    floats = [
        x
        for x in jax.tree.leaves((state.diagnostics, state.recursion))
        if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    assert floats and all(x.dtype == jnp.float32 for x in floats)


# --------------------------------------------------------------------------- bad input


def _params():
    return {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}


SYM = ksbopt.Scale(["w", "b"])


def test_unknown_dynamics_kind():
    with pytest.raises(ValueError, match=r"kind='lion' is not a known dynamics kind"):
        D.Dynamics("lion", 0.1)
    with pytest.raises(TypeError, match=r"ksbopt\.dynamics\.adam\(learning_rate"):
        monitor(optax.adam(0.1), SYM, dynamics="adam")
    with pytest.raises(TypeError, match=r"dynamics=42 .* is not a dynamics description"):
        monitor(optax.adam(0.1), SYM, dynamics=42)


@pytest.mark.parametrize("bad", ["0.1", [0.1], {"lr": 0.1}])
def test_learning_rate_neither_number_nor_schedule(bad):
    with pytest.raises(TypeError, match=r"^ksbopt.dynamics: learning_rate=.* is neither a number"):
        D.sgd(bad)
    with pytest.raises(TypeError, match=r"^ksbopt.monitor: learning_rate=.* is neither a number"):
        monitor(optax.sgd(0.1), SYM, learning_rate=bad)


def test_monitor_negative_learning_rate_names_monitor():
    with pytest.raises(ValueError, match=r"^ksbopt.monitor: learning_rate=-0.1 must be >= 0"):
        monitor(optax.sgd(0.1), SYM, learning_rate=-0.1)


@pytest.mark.parametrize(
    ("opt", "dyn", "match"),
    [
        (optax.sgd(0.1), D.adam(0.1), r"adam reads the moments 'mu' and 'nu'"),
        (optax.sgd(0.1), D.sgd(0.1, momentum=0.9), r"needs exactly one momentum buffer 'trace'"),
        (optax.adam(0.1), D.sgd(0.1), r"second moment 'nu', so it is adaptive"),
        (optax.adam(0.1), D.rmsprop(0.1), r"first moment 'mu' as Adam does"),
        (optax.sgd(0.1), D.rmsprop(0.1), r"rmsprop reads one second moment 'nu'"),
    ],
)
def test_dynamics_not_matching_the_optimizer(opt, dyn, match):
    tx = monitor(opt, SYM, dynamics=dyn)
    with pytest.raises(ValueError, match=match):
        tx.init(_params())


def test_other_bad_arguments():
    with pytest.raises(ValueError, match=r"learning_rate=None .* no optax\.inject_hyperparams"):
        monitor(optax.sgd(0.1), SYM, dynamics=D.sgd()).init(_params())
    with pytest.raises(ValueError, match=r"given twice"):
        monitor(optax.sgd(0.1), SYM, learning_rate=0.1, dynamics=D.sgd(0.1))
    with pytest.raises(ValueError, match=r"every=0 must be a positive int"):
        monitor(optax.sgd(0.1), SYM, every=0)
    with pytest.raises(TypeError, match=r"is not an optax transformation"):
        monitor(lambda g: g, SYM)
    with pytest.raises(ValueError, match=r"momentum=1.5 must be in \[0, 1\)"):
        D.sgd(0.1, momentum=1.5)
    with pytest.raises(ValueError, match=r"weight_decay=-1 must be >= 0"):
        D.adam(0.1, weight_decay=-1)
    with pytest.raises(ValueError, match=r"matches no leaf"):
        monitor(optax.sgd(0.1), ksbopt.Scale("nope")).init(_params())


# --------------------------------------------------------------------------- reading out


def test_state_fields_readable_with_optax_tree_get():
    params = _params()
    tx = optax.chain(optax.clip(1.0), monitor(optax.adam(0.1), SYM, dynamics=D.adam(0.1)))
    g = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    u, state = jax.jit(tx.update)(g, tx.init(params), params)
    for name in NoetherDiagnostics._fields:
        optax.tree.get(state, name)  # unique: no KeyError
    assert isinstance(optax.tree.get(state, "MonitorState"), MonitorState)
    (q,) = optax.tree.get(state, "charges")
    support.assert_close(q, ksbopt.charges(optax.apply_updates(params, u), SYM)[0], rtol=1e-6)


def test_recorder_and_summary():
    case = support.CASES_BY_NAME["relu_softmax"]
    sym = list(case.symmetries)
    tx = monitor(optax.sgd(0.1, momentum=0.9), sym, dynamics=D.sgd(0.1, 0.9), every=3)
    params, state = case.params(), None
    state = tx.init(params)
    update = jax.jit(tx.update)
    every_step, every_two = Recorder(sym), Recorder(["relu", "head"], every=2)
    grad = jax.jit(jax.grad(case.loss))
    for k in range(7):
        u, state = update(grad(params), state, params)
        params = optax.apply_updates(params, u)
        every_step.record(k, state)
        every_two(k, state)
    # The monitor refreshed at steps 0, 3, 6: a recorder never stores a record twice, and
    # one that looks at steps 0, 2, 4, 6 finds the records of steps 0, 0 (skipped), 3, 6.
    np.testing.assert_array_equal(every_step.history().steps, [0, 3, 6])
    np.testing.assert_array_equal(every_two.history().steps, [0, 3, 6])
    assert len(Recorder(sym, every=7)) == 0
    h = every_step.history()
    assert h["charges"][1].shape == (3, 5)  # 4 head rows + the bias, per record
    assert h["effective_learning_rate"] == [None, None]  # no scale group here
    s = summarize(state, ["relu", "head"])
    q = np.asarray(state.diagnostics.charges[1])
    assert s["noether/head/charges/mean"] == pytest.approx(float(q.mean()), rel=1e-6)
    assert s["noether/head/charges/min"] == pytest.approx(float(q.min()), rel=1e-6)
    assert s["noether/step"] == 6.0
    assert all(isinstance(v, float) for v in s.values())
    assert every_step.summary() == summarize(state, sym)
    with pytest.raises(ValueError, match="3 labels for 2"):
        summarize(state, ["a", "b", "c"])
