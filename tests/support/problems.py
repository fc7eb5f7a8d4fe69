"""Exactly symmetric toy problems: which toy problem carries which symmetry, decided once.

Toy problems (:class:`Case`) are tiny (a few dozen parameters) so that a 1000-step
``lax.scan`` compiles and runs in about a second. Each loss is *exactly* invariant under the
declared group actions in exact arithmetic (normalisers use epsilon = 0; the actions are
defined in ``docs/concepts/symmetries.md``), so in float64 the invariance holds to rounding
(~1e-15 relative).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ksbopt
from ksbopt._src.symmetries import orbit

from .compiling import jit

# --------------------------------------------------------------------------- toy problems


def _data(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


def _like(x: np.ndarray, ref: jax.Array) -> jax.Array:
    """Data in the compute dtype of the parameters (float32 for bfloat16 parameters)."""
    return jnp.asarray(x, jnp.promote_types(ref.dtype, jnp.float32))


def _f(x: jax.Array) -> jax.Array:
    """Parameters promoted to at least float32 inside a loss (bfloat16 stays trainable)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(pred - target))


def _ce(logits: jax.Array, labels: np.ndarray) -> jax.Array:
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels)))


def _dense(p: dict, x: jax.Array) -> jax.Array:
    out = x @ _f(p["kernel"])
    return out + _f(p["bias"]) if "bias" in p else out


def _dense_params(seed: int, n_in: int, n_out: int, *, bias: bool = True, gain: float = 1.0):
    rng = np.random.default_rng(seed)
    p = {"kernel": gain * rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)}
    if bias:
        p["bias"] = 0.1 * gain * rng.normal(size=(n_out,))
    return p


# Inputs shared by the toy losses (fixed, small, deterministic).
_X = _data(0, 8, 3)
_Y = _data(1, 8, 2)
_LABELS = np.random.default_rng(2).integers(0, 3, size=8)


def loss_scale_phi(p):
    """L(w) = sum_j phi(w_j / |w_j|) per column j: scale-invariant per output unit."""
    w = _f(p["w"])
    v = w / jnp.linalg.norm(w, axis=0, keepdims=True)
    a = _like(_data(3, *w.shape), w)
    return jnp.sum(jnp.sin(3 * v) * a) + jnp.sum(jnp.square(jnp.sum(a * v, axis=0)))


def loss_batchnorm(p):
    """Dense -> BatchNorm (batch statistics, epsilon = 0) -> tanh -> Dense, MSE."""
    x = _like(_X, p["dense"]["kernel"])
    h = _dense(p["dense"], x)
    h = (h - h.mean(0)) / jnp.sqrt(jnp.mean(jnp.square(h - h.mean(0)), axis=0))
    return _mse(_dense(p["out"], jnp.tanh(h)), _like(_Y, h))


def loss_layernorm(p):
    """Dense -> LayerNorm over features (epsilon = 0) -> tanh -> Dense, MSE."""
    x = _like(_X, p["dense"]["kernel"])
    h = _dense(p["dense"], x)
    c = h - h.mean(-1, keepdims=True)
    h = c / jnp.sqrt(jnp.mean(jnp.square(c), axis=-1, keepdims=True))
    return _mse(_dense(p["out"], jnp.tanh(h)), _like(_Y, h))


def loss_relu_mlp(p):
    """Dense_0 -> ReLU -> Dense_1 (-> ReLU -> Dense_2 when present), MSE."""
    x = _like(_X, p["Dense_0"]["kernel"])
    h = _dense(p["Dense_1"], jax.nn.relu(_dense(p["Dense_0"], x)))
    if "Dense_2" in p:
        h = _dense(p["Dense_2"], jax.nn.relu(h))
    return _mse(h, _like(_Y, h))


def loss_softmax_head(p):
    """A softmax cross-entropy head on fixed features: translation symmetric per row."""
    x = jnp.tanh(_like(_data(4, 8, 4), p["head"]["kernel"]))
    return _ce(_dense(p["head"], x), _LABELS)


def loss_relu_softmax(p):
    """Dense_0 -> ReLU -> softmax head: rescale (hidden units) and translation (head rows)."""
    x = _like(_X, p["Dense_0"]["kernel"])
    return _ce(_dense(p["head"], jax.nn.relu(_dense(p["Dense_0"], x))), _LABELS)


def loss_deep_linear(p):
    """Deep linear regression x A B (A with a bias) or x A B C."""
    x = _like(_X, p["A"]["kernel"])
    h = _dense(p["B"], _dense(p["A"], x))
    if "C" in p:
        h = _dense(p["C"], h)
    return _mse(h, _like(_Y, h))


def loss_attention(p):
    """Multi-head attention scores from Flax-layout query/key kernels (embed, heads, dim).

    Only the scores q k^T enter the loss, and they are invariant under
    W_q -> W_q G, W_k -> W_k G^-T per head (biases included).
    """
    x = _like(_data(5, 5, 6), p["query"]["kernel"])
    q = jnp.einsum("te,ehd->thd", x, _f(p["query"]["kernel"])) + _f(p["query"]["bias"])
    k = jnp.einsum("te,ehd->thd", x, _f(p["key"]["kernel"])) + _f(p["key"]["bias"])
    att = jax.nn.softmax(jnp.einsum("thd,shd->hts", q, k), axis=-1)
    v = jnp.einsum("te,ehf->thf", x, _like(_data(6, 6, 2, 3), x))
    out = jnp.einsum("hts,shf->tf", att, v)
    return _mse(out, _like(_data(7, 5, 3), out))


def _params_scale_phi():
    return {"w": _data(10, 4, 3)}


def _params_norm():
    return {"dense": _dense_params(11, 3, 4, gain=2.0), "out": _dense_params(12, 4, 2)}


def _params_mlp(depth: int):
    # Incoming weights larger than outgoing ones: rescale charges are O(1), not near 0.
    sizes = [3, *[4] * (depth - 1), 2]
    return {
        f"Dense_{i}": _dense_params(20 + i, sizes[i], sizes[i + 1], gain=2.0 if i == 0 else 1.0)
        for i in range(depth)
    }


def _params_head():
    p = _dense_params(30, 4, 3)
    return {"head": {"kernel": p["kernel"] + 0.5, "bias": p["bias"] + 0.3}}


def _params_relu_softmax():
    return {"Dense_0": _dense_params(31, 3, 4, gain=2.0), "head": _dense_params(32, 4, 3)}


def _params_linear(depth: int):
    sizes = [3, *[4] * (depth - 1), 2]
    names = "ABC"
    p = {names[i]: _dense_params(40 + i, sizes[i], sizes[i + 1], bias=False) for i in range(depth)}
    p["A"]["kernel"] = 1.5 * p["A"]["kernel"]
    p["A"]["bias"] = 0.1 * _data(45, sizes[1])
    return p


def _params_attention():
    rng = np.random.default_rng(50)
    return {
        name: {"kernel": rng.normal(size=(6, 2, 3)) / 2, "bias": 0.1 * rng.normal(size=(2, 3))}
        for name in ("query", "key")
    }


@functools.cache
def _jitted_charges(symmetries: tuple) -> Callable:
    # Plain jax.jit: compiler options are only allowed on a top-level jit, and Case.charges
    # is also called inside jitted test programs.
    return jax.jit(lambda params: ksbopt.charges(params, list(symmetries)))


@dataclasses.dataclass(frozen=True)
class Case:
    """An exactly symmetric toy problem: parameters, loss and the declared symmetries."""

    name: str
    make_params: Callable[[], dict]
    loss: Callable[[Any], jax.Array]
    symmetries: tuple

    def params(self, dtype: Any = None) -> dict:
        """Fresh parameters in ``dtype`` (default: float64 under x64, float32 otherwise)."""
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        return jax.tree.map(lambda x: jnp.asarray(x, dtype), self.make_params())

    def charges(self, params: Any) -> tuple:
        """``ksbopt.charges`` of the case's symmetries (jitted: one small compile per tree
        structure and dtype, instead of one per primitive when called eagerly)."""
        return _jitted_charges(self.symmetries)(params)

    def bind(self, params: Any) -> orbit.Binding:
        return orbit.bind(tuple(self.symmetries), params)

    def __repr__(self) -> str:  # pytest ids
        return self.name


_RESCALE_0 = ksbopt.Rescale(incoming=["Dense_0/kernel", "Dense_0/bias"], outgoing="Dense_1/kernel")

SINGLE_CASES = (
    Case("scale_phi", _params_scale_phi, loss_scale_phi, (ksbopt.Scale("w", axis=-1),)),
    Case("scale_batchnorm", _params_norm, loss_batchnorm, (ksbopt.Scale("dense/*", axis=-1),)),
    Case("scale_layernorm", _params_norm, loss_layernorm, (ksbopt.Scale("dense/*", axis=None),)),
    Case("rescale_mlp", lambda: _params_mlp(2), loss_relu_mlp, (_RESCALE_0,)),
    Case(
        "translation_head",
        _params_head,
        loss_softmax_head,
        (ksbopt.Translation(["head/kernel", "head/bias"]),),
    ),
    Case(
        "linear_deep",
        lambda: _params_linear(2),
        loss_deep_linear,
        (ksbopt.Linear(left=["A/kernel", "A/bias"], right="B/kernel"),),
    ),
    Case(
        "linear_attention",
        _params_attention,
        loss_attention,
        (ksbopt.Linear.query_key(["query/kernel", "query/bias"], ["key/kernel", "key/bias"]),),
    ),
)

OVERLAP_CASES = (
    Case(
        "relu_softmax",
        _params_relu_softmax,
        loss_relu_softmax,
        (
            ksbopt.Rescale(incoming=["Dense_0/kernel", "Dense_0/bias"], outgoing="head/kernel"),
            ksbopt.Translation(["head/kernel", "head/bias"]),
        ),
    ),
    Case(
        "mlp3",
        lambda: _params_mlp(3),
        loss_relu_mlp,
        (
            _RESCALE_0,
            ksbopt.Rescale(incoming=["Dense_1/kernel", "Dense_1/bias"], outgoing="Dense_2/kernel"),
        ),
    ),
    Case(
        "linear3",
        lambda: _params_linear(3),
        loss_deep_linear,
        (
            ksbopt.Linear(left=["A/kernel", "A/bias"], right="B/kernel"),
            ksbopt.Linear(left="B/kernel", right="C/kernel"),
        ),
    ),
)

ALL_CASES = SINGLE_CASES + OVERLAP_CASES
CASES_BY_NAME = {c.name: c for c in ALL_CASES}


def symmetry_leaves(case: Case, params: Any) -> list[list[jax.Array]]:
    """For each declared symmetry, the parameter leaves it acts on."""
    flat = jax.tree.leaves(params)
    return [[flat[i] for i in b.leaves] for b in case.bind(params).bound]


def charge_errors(case: Case, q: tuple, q0: tuple, params: Any, *, linear_scale: str) -> list:
    """Relative charge error per symmetry: max_g |Q_g - Q0_g| / scale.

    ``scale`` is max_g |Q0_g| (inf-norm relative) for every kind, except for ``Linear`` when
    ``linear_scale="weights"``: then it is |A|^2 + |B|^2 (the squared Frobenius norms of the
    symmetry's leaves at ``params``). C = A^T A - B B^T is a difference of two terms of that
    size, so rounding A and B to the working precision moves C by eps * (|A|^2 + |B|^2),
    however small C itself is: in float32 no computation can keep C closer than that.
    """
    errs = []
    for sym, a, b, leaves in zip(case.symmetries, q, q0, symmetry_leaves(case, params)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        num = float(np.max(np.abs(a - b)))
        if sym.kind == "linear" and linear_scale == "weights":
            scale = sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in leaves)
        else:
            scale = float(np.max(np.abs(b)))
        errs.append(num / scale)
    return errs


def random_like(tree: Any, seed: int, scale: float = 1.0) -> Any:
    """A deterministic random tree shaped like ``tree`` (same dtypes)."""
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        treedef, [jnp.asarray(scale * rng.normal(size=np.shape(x)), x.dtype) for x in leaves]
    )


def train(case: Case, tx: optax.GradientTransformation, params: Any, steps: int, probe=None):
    """``steps`` jitted steps of ``tx`` on ``case.loss`` in one ``lax.scan``.

    Returns the final parameters, the final state, the loss at every step and, if ``probe``
    is given, ``probe(params, grads, state)`` at every step (before the update).
    """

    @jit
    def run(params):
        def step(carry, _):
            p, s = carry
            loss, g = jax.value_and_grad(case.loss)(p)
            aux = None if probe is None else probe(p, g, s)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), (loss, aux)

        (p, s), (losses, aux) = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
        return p, s, losses, aux

    p, s, losses, aux = run(params)
    return (p, s, losses) if probe is None else (p, s, losses, aux)
