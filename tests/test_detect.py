"""Tests of ksbopt.detect / ksbopt.verify on a zoo of small Flax models (NNX and Linen).

For every model the detected declarations must resolve to exactly the groups of the
hand-written ones (precision and recall 100%, compared group by group through orbit.bind and
the support of each generator, not by repr), and verify must flag a deliberately wrong
declaration. Models are built abstractly (nnx.eval_shape / jax.eval_shape) and filled with
numpy random values: no eager initialisers to compile, and no coincidental symmetries of an
identity-initialised BatchNorm scale or a zero bias.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import ksbopt
import ksbopt.flax as kflax
from ksbopt._src.detection import analyser
from ksbopt._src.detection import graph as graph_lib
from ksbopt._src.detection.detect import detect, verify
from ksbopt._src.symmetries import orbit

# --------------------------------------------------------------------------- helpers


def ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _fill(tree, seed):
    """Random values for parameters; BatchNorm statistics at mean 0, variance 1."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = jax.tree_util.keystr(path)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return np.zeros(x.shape, x.dtype)
        if "'var'" in name:
            return np.ones(x.shape, x.dtype)
        if "'mean'" in name:
            return np.zeros(x.shape, x.dtype)
        return (0.6 * rng.standard_normal(x.shape)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, tree)


def nnx_model(make, seed=0):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    model = nnx.merge(graphdef, _fill(state, seed))
    model.train()
    return model


def linen_variables(model, x, seed=0):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    return _fill(shapes, seed)


def batches(shape, n_cls=3, n=2, seed=0):
    rng = np.random.default_rng(100 + seed)
    return [
        (rng.standard_normal(shape).astype(np.float32), rng.integers(0, n_cls, shape[0]))
        for _ in range(n)
    ]


def canon(syms, params):
    """Each group as the support (and sign) of its generator: independent of how it is
    written (selectors, negative or positive axes, partner order)."""
    if not syms:
        return set()
    binding = orbit.bind(tuple(syms), params)
    rng = np.random.default_rng(7)
    flat = [
        jnp.asarray(rng.standard_normal(np.shape(x)) + 3.0, jnp.float32)
        for x in jax.tree.leaves(params)
    ]
    paths = ksbopt.flax.param_paths(params)
    out = set()
    for b in binding.bound:
        kind = b.symmetry.kind
        if kind == "linear":
            n, k = b.charge_shape[0], b.charge_shape[-1]
            basis = []
            for h in range(n):
                c = np.zeros(b.charge_shape)
                c[h] = np.eye(k)
                basis.append(c)
        else:
            basis = list(np.eye(b.n_groups))
        for c in basis:
            moved = b.expand(flat, jnp.asarray(c, jnp.float32))
            pos, neg = set(), set()
            for i, v in moved.items():
                ratio = np.asarray(v) / np.asarray(flat[i])
                for idx in zip(*np.nonzero(np.abs(ratio) > 1e-6), strict=False):
                    (pos if ratio[idx] > 0 or kind == "translation" else neg).add((paths[i], idx))
            sides = frozenset((frozenset(pos), frozenset(neg)))
            out.add((kind, sides, b.charge_shape[-1] if kind == "linear" else 0))
    return out


def assert_same_groups(found, expected, params):
    got, want = canon(found, params), canon(expected, params)
    missing, extra = want - got, got - want
    assert not missing and not extra, (
        f"missing {len(missing)} group(s), extra {len(extra)} group(s)\nfound: {found}\n"
        f"expected: {expected}"
    )


# --------------------------------------------------------------------------- the zoo


class MLP(nnx.Module):
    def __init__(self, rngs, norm=None, act=jax.nn.relu, d=5, h=8, c=3):
        self.fc1 = nnx.Linear(d, h, rngs=rngs)
        self.fc2 = nnx.Linear(h, h, rngs=rngs)
        self.head = nnx.Linear(h, c, rngs=rngs)
        self.norm, self.act = norm, act
        make = {"bn": nnx.BatchNorm, "ln": nnx.LayerNorm, "rms": nnx.RMSNorm}.get(norm)
        if make is not None:
            self.n1, self.n2 = make(h, rngs=rngs), make(h, rngs=rngs)

    def __call__(self, x):
        h = self.fc1(x)
        h = self.act(self.n1(h) if self.norm else h)
        h = self.fc2(h)
        h = self.act(self.n2(h) if self.norm else h)
        return self.head(h)


class CNN(nnx.Module):
    def __init__(self, rngs, norm="bn", ch=6, c=3):
        bias = norm != "bn"
        self.conv1 = nnx.Conv(3, ch, (3, 3), use_bias=bias, rngs=rngs)
        self.conv2 = nnx.Conv(ch, ch, (3, 3), use_bias=bias, rngs=rngs)
        if norm == "bn":
            self.n1, self.n2 = nnx.BatchNorm(ch, rngs=rngs), nnx.BatchNorm(ch, rngs=rngs)
        else:
            self.n1 = nnx.GroupNorm(ch, num_groups=2, rngs=rngs)
            self.n2 = nnx.GroupNorm(ch, num_groups=2, rngs=rngs)
        self.head = nnx.Linear(ch, c, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.n1(self.conv1(x)))
        h = jax.nn.relu(self.n2(self.conv2(h)))
        return self.head(h.mean((1, 2)))


class Residual(nnx.Module):
    def __init__(self, rngs, d=5, h=8, c=3):
        self.fc1 = nnx.Linear(d, h, rngs=rngs)
        self.fc2 = nnx.Linear(h, h, rngs=rngs)
        self.fc3 = nnx.Linear(h, h, rngs=rngs)
        self.head = nnx.Linear(h, c, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.fc1(x))
        z = h + self.fc3(jax.nn.relu(self.fc2(h)))  # the skip: no rescale of fc1 or fc3
        return self.head(jax.nn.relu(z))


class DeepLinear(nnx.Module):
    def __init__(self, rngs, d=5, h=4, o=3):
        self.l1 = nnx.Linear(d, h, rngs=rngs)
        self.l2 = nnx.Linear(h, h, rngs=rngs)
        self.l3 = nnx.Linear(h, o, rngs=rngs)

    def __call__(self, x):
        return self.l3(self.l2(self.l1(x)))


class Block(nnx.Module):
    """A pre-LayerNorm transformer block, mean-pooled into a softmax classifier."""

    def __init__(self, rngs, qk_norm=False, e=8, heads=2, c=3):
        self.ln1, self.ln2 = nnx.LayerNorm(e, rngs=rngs), nnx.LayerNorm(e, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, e, decode=False, normalize_qk=qk_norm, rngs=rngs)
        self.mlp_in = nnx.Linear(e, 2 * e, rngs=rngs)
        self.mlp_out = nnx.Linear(2 * e, e, rngs=rngs)
        self.head = nnx.Linear(e, c, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp_out(jax.nn.relu(self.mlp_in(self.ln2(x))))
        return self.head(x.mean(1))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        for _ in range(2):
            x = nn.Dense(8)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.relu(x)
        return nn.Dense(3)(x)


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        for _ in range(2):
            x = nn.Conv(6, (3, 3), use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.relu(x)
        return nn.Dense(3)(x.mean((1, 2)))


def _nnx_case(make, shape, loss=None):
    model = nnx_model(make)
    loss_fn, params = kflax.nnx_loss(model, loss or (lambda m, b: ce(m(b[0]), b[1])))
    return loss_fn, params, batches(shape)


def _linen_case(module, shape):
    bs = batches(shape)
    variables = linen_variables(module, bs[0][0])
    loss_fn, params = kflax.linen_loss(
        module.apply, variables, lambda f, b: ce(f(b[0], train=True), b[1])
    )
    return loss_fn, params, bs


S, R, T, L = ksbopt.Scale, ksbopt.Rescale, ksbopt.Translation, ksbopt.Linear
HEAD = T(["head/kernel", "head/bias"])


def _bn_mlp_expected(fc="fc", bn="n", head="head", first=1):
    a, b = first, first + 1
    return [
        S([f"{fc}{a}/kernel", f"{fc}{a}/bias"]),
        S([f"{fc}{b}/kernel", f"{fc}{b}/bias"]),
        R([f"{bn}{a}/scale", f"{bn}{a}/bias"], f"{fc}{b}/kernel"),
        R([f"{bn}{b}/scale", f"{bn}{b}/bias"], f"{head}/kernel"),
        T([f"{head}/kernel", f"{head}/bias"]),
    ]


ZOO = {
    # name: (build, expected declarations, a wrong declaration)
    "mlp_bn": (
        lambda: _nnx_case(lambda r: MLP(r, "bn"), (16, 5)),
        _bn_mlp_expected(),
        R(["fc1/kernel", "fc1/bias"], "fc2/kernel"),
    ),  # BatchNorm is in the way
    "cnn_bn": (
        lambda: _nnx_case(lambda r: CNN(r, "bn"), (8, 6, 6, 3)),
        [
            S("conv1/kernel"),
            S("conv2/kernel"),
            R(["n1/scale", "n1/bias"], "conv2/kernel"),
            R(["n2/scale", "n2/bias"], "head/kernel"),
            HEAD,
        ],
        S("head/kernel"),
    ),  # a softmax head is not scale invariant
    # LayerNorm: one group per layer, and mean-centring removes a shift of each kernel row.
    "mlp_ln": (
        lambda: _nnx_case(lambda r: MLP(r, "ln"), (16, 5)),
        [
            S(["fc1/kernel", "fc1/bias"], axis=None),
            T(["fc1/kernel", "fc1/bias"]),
            S(["fc2/kernel", "fc2/bias"], axis=None),
            T(["fc2/kernel", "fc2/bias"]),
            R(["n1/scale", "n1/bias"], "fc2/kernel"),
            R(["n2/scale", "n2/bias"], "head/kernel"),
            HEAD,
        ],
        S(["fc1/kernel", "fc1/bias"], axis=-1),
    ),  # per unit: LayerNorm mixes units
    "mlp_rms": (
        lambda: _nnx_case(lambda r: MLP(r, "rms"), (16, 5)),
        [
            S(["fc1/kernel", "fc1/bias"], axis=None),
            S(["fc2/kernel", "fc2/bias"], axis=None),
            R("n1/scale", "fc2/kernel"),
            R("n2/scale", "head/kernel"),
            HEAD,
        ],
        T(["fc1/kernel", "fc1/bias"]),
    ),  # RMSNorm does not centre
    "relu": (
        lambda: _nnx_case(lambda r: MLP(r), (16, 5)),
        [
            R(["fc1/kernel", "fc1/bias"], "fc2/kernel"),
            R(["fc2/kernel", "fc2/bias"], "head/kernel"),
            HEAD,
        ],
        L(["fc1/kernel", "fc1/bias"], "fc2/kernel"),
    ),  # only the diagonal survives ReLU
    "leaky_relu": (
        lambda: _nnx_case(lambda r: MLP(r, act=jax.nn.leaky_relu), (16, 5)),
        [
            R(["fc1/kernel", "fc1/bias"], "fc2/kernel"),
            R(["fc2/kernel", "fc2/bias"], "head/kernel"),
            HEAD,
        ],
        S(["fc1/kernel", "fc1/bias"]),
    ),
    "gelu": (
        lambda: _nnx_case(lambda r: MLP(r, act=jax.nn.gelu), (16, 5)),
        [HEAD],
        R(["fc1/kernel", "fc1/bias"], "fc2/kernel"),
    ),  # GELU breaks rescale
    "residual": (
        lambda: _nnx_case(Residual, (16, 5)),
        [R(["fc2/kernel", "fc2/bias"], "fc3/kernel"), HEAD],
        R(["fc1/kernel", "fc1/bias"], "fc2/kernel"),
    ),  # across the skip
    "softmax_head": (
        lambda: _nnx_case(
            lambda r: nnx.Linear(5, 4, rngs=r),
            (16, 5),
            lambda m, b: (
                -jnp.mean(jnp.sum(jax.nn.one_hot(b[1], 4) * jax.nn.log_softmax(m(b[0])), -1))
            ),
        ),
        [T(["kernel", "bias"])],
        T("kernel", axis=0),
    ),  # the class axis is the last one
    "deep_linear": (
        lambda: _nnx_case(DeepLinear, (16, 5), lambda m, b: jnp.mean((m(b[0]) - 1.0) ** 2)),
        [L(["l1/kernel", "l1/bias"], "l2/kernel"), L(["l2/kernel", "l2/bias"], "l3/kernel")],
        L(["l1/kernel", "l1/bias"], "l3/kernel"),
    ),  # not adjacent
    "block": (
        lambda: _nnx_case(Block, (4, 5, 8)),
        [
            R(
                ["ln1/scale", "ln1/bias"],
                ["attn/query/kernel", "attn/key/kernel", "attn/value/kernel"],
                outgoing_axis=-3,
            ),
            L.query_key(
                ["attn/query/kernel", "attn/query/bias"], ["attn/key/kernel", "attn/key/bias"]
            ),
            L.value_output(["attn/value/kernel", "attn/value/bias"], "attn/out/kernel"),
            R(["ln2/scale", "ln2/bias"], "mlp_in/kernel"),
            R(["mlp_in/kernel", "mlp_in/bias"], "mlp_out/kernel"),
            HEAD,
        ],
        L.query_key(
            ["attn/query/kernel", "attn/query/bias"], ["attn/value/kernel", "attn/value/bias"]
        ),
    ),
    # QK-LayerNorm (shared scale over the head dimension): scale per head and a shift along
    # the head dimension on query and key, a rescale between the two LayerNorm scales; the
    # GL(head_dim) of q.k is gone.
    "block_qk_norm": (
        lambda: _nnx_case(lambda r: Block(r, qk_norm=True), (4, 5, 8)),
        [
            R(
                ["ln1/scale", "ln1/bias"],
                ["attn/query/kernel", "attn/key/kernel", "attn/value/kernel"],
                outgoing_axis=-3,
            ),
            S(["attn/query/kernel", "attn/query/bias"], axis=-2),
            S(["attn/key/kernel", "attn/key/bias"], axis=-2),
            T(["attn/query/kernel", "attn/query/bias"]),
            T(["attn/key/kernel", "attn/key/bias"]),
            R("attn/query_ln/scale", "attn/key_ln/scale", outgoing_axis=-1),
            L.value_output(["attn/value/kernel", "attn/value/bias"], "attn/out/kernel"),
            R(["ln2/scale", "ln2/bias"], "mlp_in/kernel"),
            R(["mlp_in/kernel", "mlp_in/bias"], "mlp_out/kernel"),
            HEAD,
        ],
        L.query_key(["attn/query/kernel", "attn/query/bias"], ["attn/key/kernel", "attn/key/bias"]),
    ),
    "linen_mlp_bn": (
        lambda: _linen_case(LinenMLP(), (16, 5)),
        _bn_mlp_expected("Dense_", "BatchNorm_", "Dense_2", first=0),
        S("Dense_2/kernel"),
    ),
    "linen_cnn_bn": (
        lambda: _linen_case(LinenCNN(), (8, 6, 6, 3)),
        [
            S("Conv_0/kernel"),
            S("Conv_1/kernel"),
            R(["BatchNorm_0/scale", "BatchNorm_0/bias"], "Conv_1/kernel"),
            R(["BatchNorm_1/scale", "BatchNorm_1/bias"], "Dense_0/kernel"),
            T(["Dense_0/kernel", "Dense_0/bias"]),
        ],
        R(["Conv_0/kernel"], "Conv_1/kernel"),
    ),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_detects_exactly_the_hand_written_groups(name):
    build, expected, wrong = ZOO[name]
    loss_fn, params, bs = build()
    syms, report = detect(loss_fn, params, *bs)
    assert_same_groups(syms, expected, params)
    assert report.ok and len(report.checks) == len(syms)
    rep = verify(wrong, loss_fn, params, *bs)
    (bad,) = rep.checks
    assert not rep.ok and bad.status == "violated" and bad.bad_groups, str(rep)
    assert "fails on" in str(rep)


def test_verify_accepts_what_detect_found():
    build, _, _ = ZOO["mlp_bn"]
    loss_fn, params, bs = build()
    syms, _ = detect(loss_fn, params, *bs)
    rep = verify(syms, loss_fn, params, *bs)
    assert rep.ok and [c.symmetry for c in rep.checks] == syms
    assert all(c.source == "declared" and c.lie < rep.tol for c in rep.checks)


def test_groupnorm_scale_per_channel_group():
    loss_fn, params, bs = _nnx_case(lambda r: CNN(r, "gn"), (8, 6, 6, 3))
    syms, _report = detect(loss_fn, params, *bs)
    common = [
        R(["n1/scale", "n1/bias"], "conv2/kernel"),
        R(["n2/scale", "n2/bias"], "head/kernel"),
        HEAD,
    ]
    expected = [
        S(["conv1/kernel", "conv1/bias"], groups=2),
        S(["conv2/kernel", "conv2/bias"], groups=2),
        *common,
    ]
    assert_same_groups(syms, expected, params)
    wrong = S(["conv1/kernel", "conv1/bias"], axis=-1)  # per channel: GroupNorm mixes them
    rep = verify(wrong, loss_fn, params, *bs)
    assert not rep.ok and len(rep.failures[0].bad_groups) == 6


# --------------------------------------------------------------------------- the report


def test_report_lists_reasons_and_approximations():
    build, _, _ = ZOO["mlp_bn"]
    loss_fn, params, bs = build()
    syms, report = detect(loss_fn, params, *bs)
    text = str(report)
    by_kind = {(c.symmetry.kind, c.paths[0]): c for c in report.checks}
    bn = by_kind[("scale", "fc1/bias")]
    # Flax BatchNorm's epsilon=1e-5 makes the scale symmetry approximate, and says so.
    assert bn.status == "approximate" and "BatchNorm epsilon=1e-05" in bn.reason
    assert bn.n_groups == 8 and bn.source == "graph"
    assert by_kind[("translation", "head/bias")].status == "exact"
    assert "approximate: BatchNorm epsilon=1e-05" in text and "Rescale" in text
    # Every accepted check is below tol on both measures.
    assert all(c.lie <= report.tol and c.action <= report.tol for c in report.checks)
    assert report.symmetries == syms and report.n_batches == 2


@pytest.mark.filterwarnings("ignore::FutureWarning")  # Flax's float32 running averages
def test_epsilon_zero_is_exact_and_float64_tight(x64):
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(5, 6, rngs=rngs, param_dtype=jnp.float64)
            self.bn = nnx.BatchNorm(6, epsilon=0.0, rngs=rngs, param_dtype=jnp.float64)
            self.head = nnx.Linear(6, 3, rngs=rngs, param_dtype=jnp.float64)

        def __call__(self, x):
            return self.head(jax.nn.relu(self.bn(self.fc(x))))

    model = nnx_model(Model)
    loss_fn, params = kflax.nnx_loss(model, lambda m, b: ce(m(b[0]), b[1]))
    bs = [(x.astype(np.float64), y) for x, y in batches((16, 5))]
    _syms, report = detect(loss_fn, params, *bs, tol=1e-9)
    scale = next(c for c in report.checks if c.symmetry.kind == "scale")
    # epsilon = 0: an exact symmetry; in float64 its Lie derivative is rounding (~1e-15;
    # 1e-12 leaves room for the cancellations inside BatchNorm's backward pass).
    assert scale.status == "exact" and scale.lie < 1e-12 and scale.action < 1e-12


def test_verify_reports_each_failing_group():
    build, _, _ = ZOO["mlp_ln"]
    loss_fn, params, bs = build()
    # Units 0-7 of fc1 do not form per-unit groups under LayerNorm: all eight fail.
    rep = verify(S(["fc1/kernel", "fc1/bias"], axis=-1), loss_fn, params, *bs)
    (check,) = rep.failures
    assert check.bad_groups == tuple(f"fc1/bias[{j}]" for j in range(8))
    assert check.lie > 1e-2 and check.action > rep.tol
    assert "fails on: fc1/bias[0]" in str(rep)


def test_verify_on_a_loss_constant_in_the_group_is_not_a_violation():
    """sum(LN(x W)**2) is the same for every W (= the width per row): the gradient is pure
    rounding, whose cosine with the generator is noise (0.05-0.43 measured in float32). The
    Lie check reports 0 below its floor, 64 eps |L|; the finite action is exact anyway."""

    def layer_norm(h):
        c = h - jnp.mean(h, -1, keepdims=True)
        return c / jnp.sqrt(jnp.mean(c**2, -1, keepdims=True))

    def loss_fn(p, x):
        return jnp.mean(jnp.sum(layer_norm(x @ p["l1"]["kernel"]) ** 2, -1))

    keys = jax.random.split(jax.random.key(0))
    params = {"l1": {"kernel": jax.random.normal(keys[0], (64, 256))}}
    x = jax.random.normal(keys[1], (16, 64))
    grad = jax.grad(loss_fn)(params, x)["l1"]["kernel"]
    w = params["l1"]["kernel"]
    noise_cos = abs(float(jnp.sum(grad * w))) / float(jnp.linalg.norm(grad) * jnp.linalg.norm(w))
    assert noise_cos > 1e-3  # the raw cosine alone would fail tol = 1e-3
    rep = verify(S("l1/kernel", axis=None), loss_fn, params, x)
    (check,) = rep.checks
    assert check.status == "exact" and check.lie == 0.0 and check.action < 1e-6


def test_verify_invalid_declaration_is_a_report_line():
    build, _, _ = ZOO["relu"]
    loss_fn, params, bs = build()
    rep = verify(
        [S("no_such_leaf"), R(["fc1/kernel", "fc1/bias"], "fc2/kernel")], loss_fn, params, *bs
    )
    assert [c.status for c in rep.checks] == ["invalid", "exact"]
    assert "matches no leaf" in rep.checks[0].reason and not rep.ok


# --------------------------------------------------------------------------- bad input


def _tiny():
    params = {
        "w1": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
        "w2": np.random.default_rng(1).standard_normal((4, 2)).astype(np.float32),
    }
    x = np.random.default_rng(2).standard_normal((6, 3)).astype(np.float32)
    y = np.array([0, 1, 1, 0, 1, 0])

    def loss_fn(p, b):
        return ce(jax.nn.relu(b[0] @ p["w1"]) @ p["w2"], b[1])

    return loss_fn, params, (x, y)


def test_bad_inputs_raise_clear_errors():
    loss_fn, params, batch = _tiny()
    with pytest.raises(ValueError, match="at least one batch"):
        detect(loss_fn, params)
    with pytest.raises(ValueError, match=r"tol=0"):
        detect(loss_fn, params, batch, tol=0)
    with pytest.raises(ValueError, match=r"tol=-1"):
        verify(S("w1"), loss_fn, params, batch, tol=-1.0)
    with pytest.raises(TypeError, match="tol='a'"):
        detect(loss_fn, params, batch, tol="a")
    with pytest.raises(ValueError, match=r"scalar loss; it returned \(6, 2\)"):
        detect(lambda p, b: jax.nn.relu(b[0] @ p["w1"]) @ p["w2"], params, batch)
    with pytest.raises(ValueError, match="has_aux=True"):
        detect(lambda p, b: (loss_fn(p, b), 0.0), params, batch)
    with pytest.raises(TypeError, match="floating-point scalar"):
        detect(lambda p, b: jnp.sum(b[1]), params, batch)
    with pytest.raises(TypeError, match="loss_fn"):
        detect("not a function", params, batch)
    with pytest.raises(ValueError, match="no floating-point leaves"):
        detect(loss_fn, {"step": np.array(3)}, batch)


def test_has_aux_and_integer_leaves_are_skipped_and_listed():
    loss_fn, params, batch = _tiny()
    params = {**params, "step": np.array(7, np.int32), "mask": np.ones(4, bool)}
    syms, report = detect(lambda p, b: (loss_fn(p, b), {"acc": 0.0}), params, batch, has_aux=True)
    assert_same_groups(syms, [R("w1", "w2"), T("w2")], params)
    skipped = dict(report.skipped)
    assert set(skipped) == {"step", "mask"} and "int32" in skipped["step"]
    assert "skipped leaves" in str(report)


def test_unanalysable_graph_falls_back_to_the_parameter_tree():
    _loss_fn, params, batch = _tiny()

    def scanned(p, b):  # the head runs inside lax.scan: the graph cannot be followed
        h = jax.nn.relu(b[0] @ p["w1"])
        _, logits = jax.lax.scan(lambda c, _: (c, c @ p["w2"]), h, None, length=1)
        return ce(logits[0], b[1])

    syms, report = detect(scanned, params, batch, (batch[0][::-1], batch[1]))
    assert_same_groups(syms, [R("w1", "w2"), T("w2")], params)
    assert any("scan" in n for n in report.notes)
    assert all(c.source == "parameter tree" for c in report.checks)


def test_analysis_failure_is_reported_not_raised(monkeypatch):
    loss_fn, params, batch = _tiny()

    def broken(graph):
        raise RuntimeError("simulated")

    monkeypatch.setattr(analyser, "analyse", broken)
    syms, report = detect(loss_fn, params, batch)
    assert_same_groups(syms, [R("w1", "w2"), T("w2")], params)
    assert any("could not be analysed (RuntimeError: simulated)" in n for n in report.notes)


# --------------------------------------------------------------------------- graph reading


def test_analysis_reads_layouts_of_a_flattening_head():
    # conv -> ReLU -> flatten -> Dense: the rescale pairs a channel with rows c, c + C, ...
    # of the head, which Rescale cannot express: reported, not mis-declared.
    class M(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 3, (3,), rngs=rngs)
            self.head = nnx.Linear(12, 3, rngs=rngs)

        def __call__(self, x):
            h = jax.nn.relu(self.conv(x))
            return self.head(h.reshape(h.shape[0], -1))

    loss_fn, params, bs = _nnx_case(M, (8, 4, 2))
    syms, report = detect(loss_fn, params, *bs)
    assert_same_groups(syms, [T(["head/kernel", "head/bias"])], params)
    assert any("conv/kernel" in n and "cannot declare" in n for n in report.notes)


def test_selectors_are_exact_for_nested_names():
    # "Dense_0/kernel" is a suffix of "block/Dense_0/kernel": detect must not over-select.
    params = {
        "Dense_0": {"kernel": np.ones((3, 4), np.float32) / 3},
        "block": {"Dense_0": {"kernel": np.ones((4, 2), np.float32) / 4}},
    }

    def loss_fn(p, x):
        h = jax.nn.relu(x @ p["Dense_0"]["kernel"])
        return jnp.mean((h @ p["block"]["Dense_0"]["kernel"]) ** 2)

    x = np.linspace(-1, 1, 18, dtype=np.float32).reshape(6, 3)
    syms, _ = detect(loss_fn, params, x)
    (sym,) = syms
    assert isinstance(sym.incoming[0], re.Pattern)
    assert_same_groups(syms, [R(re.compile("^Dense_0/kernel$"), "block/Dense_0/kernel")], params)


def _hand_ln_case(norm):
    """Dense l1 -> a hand-written normalisation ``norm(h, x)`` -> Dense l2, squared error."""
    rng = np.random.default_rng(3)
    params = {
        "l1": {
            "kernel": rng.standard_normal((5, 8)).astype(np.float32),
            "bias": rng.standard_normal(8).astype(np.float32),
        },
        "l2": {"kernel": rng.standard_normal((8, 3)).astype(np.float32)},
    }
    batch = (
        rng.standard_normal((16, 5)).astype(np.float32),
        rng.standard_normal((16, 3)).astype(np.float32),
    )

    def loss_fn(p, b):
        h = norm(b[0] @ p["l1"]["kernel"] + p["l1"]["bias"], b[0])
        return jnp.mean((h @ p["l2"]["kernel"] - b[1]) ** 2)

    return loss_fn, params, batch


def _graph_of(loss_fn, params, batch):
    """The analysed graph, traced as detect traces it (parameter leaves first, then data)."""
    leaves, treedef = jax.tree.flatten(params)
    closed = jax.make_jaxpr(lambda ls, b: loss_fn(jax.tree.unflatten(treedef, ls), b))(
        leaves, batch
    )
    return analyser.analyse(graph_lib.build_graph(closed, len(leaves)))


def _centre(h):
    return h - h.mean(-1, keepdims=True)


@pytest.mark.parametrize(
    "norm",
    [
        pytest.param(lambda h, x: _centre(h) / jnp.sqrt(jnp.var(h, -1, keepdims=True)), id="var"),
        pytest.param(lambda h, x: _centre(h) / jnp.std(h, -1, keepdims=True), id="std"),
    ],
)
def test_layernorm_via_jnp_var_and_std_is_scale_invariant(norm):
    # jnp.var / jnp.std run an inner jit that takes ddof as a traced argument (a literal 0 at
    # the call site) and guard the result with select_n(N - ddof > 0, nan, var): a predicate
    # computed from literals only, which the analysis folds to the case it picks.
    loss_fn, params, batch = _hand_ln_case(norm)
    syms, report = detect(loss_fn, params, batch)
    layer = ["l1/kernel", "l1/bias"]
    assert_same_groups(syms, [S(layer, axis=None), T(layer)], params)
    scale = next(c for c in report.checks if c.symmetry.kind == "scale")
    assert scale.status == "exact" and scale.source == "graph", str(report)
    assert scale.reason == "LayerNorm"


@pytest.mark.parametrize(
    "gate",
    [
        # The predicate depends on the input: some rows skip the normalisation.
        pytest.param(lambda v, x: jnp.where(x[:, :1] > 0, v, 1.0), id="input-predicate"),
        # A constant predicate that picks the constant case: folding must pick that one.
        pytest.param(lambda v, x: jnp.where(np.float32(8) - 8 > 0, v, 1.0), id="const-false"),
    ],
)
def test_select_n_not_folded_into_a_symmetry_it_breaks(gate):
    loss_fn, params, batch = _hand_ln_case(
        lambda h, x: _centre(h) / jnp.sqrt(gate(jnp.var(h, -1, keepdims=True), x))
    )
    analysis = _graph_of(loss_fn, params, batch)
    kernel = 1  # leaves: l1/bias, l1/kernel, l2/kernel
    assert not any(f.kind == "scale" and f.leaf == kernel for f in analysis.findings)
    assert (kernel, "mult") in analysis.broken, analysis.broken
    syms, _ = detect(loss_fn, params, batch)
    assert_same_groups(syms, [T(["l1/kernel", "l1/bias"])], params)


# --------------------------------------------------------------------------- finite actions


class _SumOfActions:
    """A stand-in checker: the composed action of a set of candidates changes the loss by the
    sum of the members' own changes (rounding that adds up), counted per evaluation."""

    def __init__(self, own):
        self.own, self.masks = list(own), []

    def check(self, batch, loss0, grads, active):
        self.masks.append(tuple(active))
        return [], sum(v for v, on in zip(self.own, active, strict=True) if on)

    def actions(self, batch, loss0, moved):
        return self.check(batch, loss0, None, moved)[1]


def _settle(own, tol):
    from ksbopt._src.detection import checker as checker_lib
    from ksbopt._src.detection.candidates import Candidate

    live = [Candidate(ksbopt.Scale(f"w{i}"), "graph") for i in range(len(own))]
    fake = _SumOfActions(own)
    checker_lib._settle_actions(fake, live, list(range(len(own))), None, 1.0, None, tol)
    return [c.action for c in live], fake.masks


def test_composed_actions_that_pass_settle_every_candidate_in_one_evaluation():
    actions, masks = _settle([1e-5] * 20, tol=1e-3)
    assert len(masks) == 1 and actions == [pytest.approx(2e-4)] * 20


def test_rounding_that_adds_up_past_tol_halves_the_set_until_each_part_passes():
    # 20 candidates of 9e-5 each: together 1.8e-3 > tol, each half 9e-4 passes.
    actions, masks = _settle([9e-5] * 20, tol=1e-3)
    assert [sum(m) for m in masks] == [20, 10, 10]
    assert actions == [pytest.approx(9e-4)] * 20  # a bound on each one's own


def test_one_broken_candidate_is_isolated_in_log_n_evaluations():
    own = [0.0] * 32
    own[13] = 0.5  # not a symmetry
    actions, masks = _settle(own, tol=1e-3)
    assert actions[13] == 0.5 and max(a for i, a in enumerate(actions) if i != 13) == 0.0
    # halving 32 -> 1 along the failing path: 1 + 2 * log2(32) evaluations, not 32
    assert len(masks) == 1 + 2 * 5
