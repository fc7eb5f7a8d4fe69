"""Property-based tests (hypothesis) of the conservation claims, in float64.

Hypothesis draws whole problems: a parameter tree (random nesting, a list container, leaf
shapes, unit / class / k axes at random positions given as positive or negative ints,
selectors written as exact paths, suffixes, globs, regexes, callables or lists) with a
declaration of one of the four kinds, or of two overlapping ones (a ReLU layer into a
softmax head: Rescale + Translation; two Rescales of a 3-layer MLP; two Linears of x A B C),
together with a loss that is *exactly* invariant under it, written here independently of
ksbopt (normalised layer, ReLU network, softmax cross-entropy, deep linear network). Then:

- ``retract`` keeps every charge of every group (relative to the group's natural scale);
- ``project`` leaves updates orthogonal to every generator, the generators being the
  derivatives of the group action at the identity (not ksbopt's ``reduce``);
- orbit moves do not change the loss: the bound symmetries' ``act`` with random group
  elements, and the steps of ``retract`` and ``steer`` (which move along the orbit of
  ``w + u``);
- the declaration API, given random trees, selectors, axes and options, either works (and
  gives finite charges of the documented shapes) or raises ``ValueError`` / ``TypeError``
  with a message, never another exception.

Every example runs as one jitted program vmapped over a few random draws of the numbers
(the cost of an example is its compilation). ``derandomize=True`` and no example database
make the runs deterministic; the ``slow`` variants draw many more examples.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import support
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ksbopt
from ksbopt._src import groups as groups_lib
from ksbopt._src.symmetries import orbit
from ksbopt._src.symmetries.declarations import apply_moved

_COMMON = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    "print_blob": False,
}
# Per-test example counts: each float64 example compiles one small program (~0.5 s on CPU),
# so the default run stays under a minute in all; the slow variants draw ten times more.
FAST = settings(max_examples=6, **_COMMON)
FAST_API = settings(max_examples=60, **_COMMON)
MANY = settings(max_examples=60, **_COMMON)
MANY_API = settings(max_examples=600, **_COMMON)
DRAWS = 3  # random draws of the numbers per example (vmapped)

# --------------------------------------------------------------------------- tolerances

# Conservation under retract, relative to the group's natural scale (|xi_g|^2: the squared
# norm of a scale group, |w_in|^2 + |w_out|^2 of a rescale unit, |A|^2 + |B|^2 of a linear
# head; sum |w| of a translation group). Closed-form moves are exact up to a few ulps,
# iterated ones (Linear's Newton, sweeps over overlapping symmetries) stop at 64 eps =
# 1.4e-14, and apply_updates rounds once more: ~1e-14 in all. A wrong formula errs by
# O(|u|^2 / |w|^2) ~ 1e-2 here; 1e-10 sits between the two with 4 orders on either side.
# Measured over the 60 examples of the slow variant: at most 1.1e-14 (two Rescales, mlp3).
TOL_CONSERVE = 1e-10
# Orthogonality under project, |<xi_c, u'>| / (|xi_c| |u|) per generator: one (joint) Gram
# solve, whose rounding is eps times the Gram matrix's condition number (at most ~1e2 for
# these draws) times a few: ~1e-14. The bar is 1e-12. Measured (slow variant): at
# most 7e-15 (two overlapping Linears), 3e-16 for everything else.
TOL_ORTHO = 1e-12
# Loss invariance, |L(psi) - L| / max(|L|, |w| |grad L|): the move rounds every entry once
# (eps relative), and |w| |grad L| is the first-order size of such a perturbation, so the
# error is a few eps ~ 1e-15; 1e-10 is far below the change of a non-symmetric move (the
# same elements applied to the wrong axis change these losses by O(1)). Measured (slow
# variant): at most 1.7e-15.
TOL_LOSS = 1e-10

# --------------------------------------------------------------------------- problems


@dataclasses.dataclass(eq=False)
class Problem:
    """A parameter tree, declarations, and a loss exactly invariant under them."""

    family: str
    shapes: dict  # relative path -> shape, inside the family's dict
    prefix: tuple  # ("outer",) or ("layers", 1): where the family's dict sits
    syms: tuple
    loss_of_family: Callable[[dict], jax.Array]  # loss of the family's dict (flat paths)

    def tree(self, leaves: dict) -> dict:
        """The full parameter tree for ``leaves`` (relative path -> array)."""
        inner: dict = {}
        for path, x in leaves.items():
            node = inner
            *head, last = path.split("/")
            for key in head:
                node = node.setdefault(key, {})
            node[last] = x
        inner["other"] = leaves.get("other", jnp.zeros(2))
        if self.prefix[0] == "layers":
            return {"layers": [{"filler": jnp.ones(3)}, inner]}
        return {self.prefix[0]: inner}

    def family_leaves(self, params: dict) -> dict:
        inner = params["layers"][1] if self.prefix[0] == "layers" else params[self.prefix[0]]
        out = {}
        for path in self.shapes:
            node = inner
            for key in path.split("/"):
                node = node[key]
            out[path] = node
        return out

    def loss(self, params: dict) -> jax.Array:
        fam = self.family_leaves(params)
        other = params["layers"][1] if self.prefix[0] == "layers" else params[self.prefix[0]]
        return self.loss_of_family(fam) + 0.5 * jnp.sum(jnp.square(other["other"]))

    def params(self, seed) -> dict:
        """Random float64 parameters (per-leaf magnitudes between 0.5 and 2)."""
        key = jax.random.key(seed)
        leaves = {}
        for i, (path, shape) in enumerate(sorted(self.shapes.items())):
            k1, k2 = jax.random.split(jax.random.fold_in(key, i))
            scale = jnp.exp(jax.random.uniform(k2, (), minval=-0.7, maxval=0.7))
            leaves[path] = scale * jax.random.normal(k1, shape, jnp.float64)
        leaves["other"] = jax.random.normal(jax.random.fold_in(key, 99), (2,), jnp.float64)
        return self.tree(leaves)

    def __repr__(self) -> str:
        return f"Problem({self.family}, {self.shapes}, prefix={self.prefix}, syms={self.syms})"


def _full(prefix: tuple, rel: str) -> str:
    return "/".join(map(str, prefix)) + "/" + rel


@st.composite
def selectors(draw, prefix: tuple, rels: list[str], siblings: list[str]):
    """A selector that picks exactly the leaves ``rels`` (relative paths) of the family.

    ``siblings``: every relative path in the family (a glob ``dir/*`` is used only when it
    selects exactly ``rels``).
    """
    full = [_full(prefix, r) for r in rels]
    forms = ["exact", "suffix", "regex", "callable", "mixed"]
    dirs = {r.rsplit("/", 1)[0] for r in rels if "/" in r}
    if len(dirs) == 1:
        d = dirs.pop()
        if sorted(s for s in siblings if s.startswith(d + "/")) == sorted(rels):
            forms.append("glob")
    form = draw(st.sampled_from(forms))
    if form == "exact":
        sel = list(full)
    elif form == "suffix":  # relative paths match as '/'-boundary suffixes
        sel = list(rels)
    elif form == "glob":
        sel = _full(prefix, d) + "/*" if draw(st.booleans()) else d + "/*"
    elif form == "regex":
        sel = re.compile("(^|/)(" + "|".join(map(re.escape, rels)) + ")$")
    elif form == "callable":
        chosen = frozenset(full)
        sel = _PathIn(chosen)
    else:  # one entry per leaf, of mixed kinds
        sel = [full[0], *[re.compile(re.escape(f) + "$") for f in full[1:]]]
    if isinstance(sel, list) and len(sel) == 1 and draw(st.booleans()):
        sel = sel[0]
    return sel


@dataclasses.dataclass(frozen=True)
class _PathIn:
    """A hashable callable selector: ``(path, leaf) -> path in paths``."""

    paths: frozenset

    def __call__(self, path, leaf) -> bool:
        return path in self.paths


def _axis_arg(draw, pos: int, ndim: int) -> int:
    """The axis ``pos`` written as a positive or a negative int."""
    return pos if draw(st.booleans()) else pos - ndim


def _shape_with(draw, size: int, ndim: int, lo: int = 1) -> tuple[tuple, int]:
    """A shape of ``ndim`` axes with ``size`` at a random position (returned)."""
    pos = draw(st.integers(0, ndim - 1))
    rest = [draw(st.integers(lo, 3)) for _ in range(ndim - 1)]
    return (*rest[:pos], size, *rest[pos:]), pos


def _data(seed: int, *shape) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def _to_rows(x: jax.Array, axis: int | None, last: bool = True) -> jax.Array:
    """The leaf as a matrix with ``axis`` as its columns (``last``) or its rows."""
    if x.ndim == 0:
        return x.reshape(1, 1)
    x = jnp.moveaxis(x, axis, -1 if last else 0)
    return x.reshape(-1, x.shape[-1]) if last else x.reshape(x.shape[0], -1)


# ---- scale: phi(w / |w|) per group


@st.composite
def scale_family(draw):
    mode = draw(st.sampled_from(["unit", "unit_bias", "layer", "groups"]))
    units = draw(st.integers(1, 3))
    if mode == "unit":
        shape, pos = _shape_with(draw, units, draw(st.integers(1, 3)))
        shapes, axis = {"kernel": shape}, _axis_arg(draw, pos, len(shape))
        unit_axes = {"kernel": pos}
    elif mode == "layer":
        ndim = draw(st.integers(0, 3))
        shapes = {"kernel": tuple(draw(st.integers(1, 3)) for _ in range(ndim))}
        if draw(st.booleans()):
            shapes["bias"] = (draw(st.integers(1, 3)),)
        axis, unit_axes = None, dict.fromkeys(shapes)
    groups = draw(st.integers(1, 2)) if mode == "groups" else None
    if mode in ("unit_bias", "groups"):  # a Dense (or Conv) kernel with its bias
        units = units * (groups or 1)
        lead = (draw(st.integers(1, 3)),) + (draw(st.integers(1, 2)),) * draw(st.integers(0, 1))
        shapes = {"Dense/kernel": (*lead, units), "Dense/bias": (units,)}
        axis, unit_axes = -1, {"Dense/kernel": len(lead), "Dense/bias": 0}
    n_groups = 1 if axis is None else groups or units  # contiguous blocks of units

    def loss(fam):
        norms = 0.0
        mats = {}
        for path, x in fam.items():
            if axis is None:
                mats[path] = x.reshape(1, -1)
                norms = norms + jnp.sum(jnp.square(x))
            else:
                m = _to_rows(x, unit_axes[path]).reshape(-1, n_groups, units // n_groups)
                mats[path] = m
                norms = norms + jnp.sum(jnp.square(m), axis=(0, 2))
        total = 0.0
        for i, (_, m) in enumerate(sorted(mats.items())):
            if axis is None:
                v = m / jnp.sqrt(norms)
            else:
                v = m / jnp.sqrt(norms)[None, :, None]
            coef = _data(10 + i, *v.shape)
            total = total + jnp.sum(jnp.sin(3 * v) * coef) + jnp.sum(coef * v) ** 2
        return total

    def declare(prefix, draw=draw):
        sel = draw(selectors(prefix, sorted(shapes), sorted(shapes)))
        return (ksbopt.Scale(sel, axis=axis, groups=groups),)

    return "scale", shapes, declare, loss


# ---- rescale: a ReLU unit between two layers


@st.composite
def rescale_family(draw):
    h = draw(st.integers(1, 3))
    with_bias = draw(st.booleans())
    if with_bias:
        k_in = (draw(st.integers(1, 3)), h)
        pos_in, in_axis = 1, -1
    else:
        k_in, pos_in = _shape_with(draw, h, draw(st.integers(2, 3)))
        in_axis = _axis_arg(draw, pos_in, len(k_in))
    k_out, pos_out = _shape_with(draw, h, draw(st.integers(2, 3)))
    out_axis = _axis_arg(draw, pos_out, len(k_out))
    shapes = {"l0/kernel": k_in, "l1/kernel": k_out}
    if with_bias:
        shapes["l0/bias"] = (h,)
    incoming = sorted(p for p in shapes if p.startswith("l0/"))

    def loss(fam):
        w_in = _to_rows(fam["l0/kernel"], pos_in)
        x = _data(1, 5, w_in.shape[0])
        z = x @ w_in + (fam["l0/bias"] if with_bias else 0)
        y = jax.nn.relu(z) @ _to_rows(fam["l1/kernel"], pos_out, last=False)
        return jnp.mean(jnp.square(y - _data(2, *y.shape)))

    def declare(prefix, draw=draw):
        sel_in = draw(selectors(prefix, incoming, sorted(shapes)))
        sel_out = draw(selectors(prefix, ["l1/kernel"], sorted(shapes)))
        sym = ksbopt.Rescale(sel_in, sel_out, incoming_axis=in_axis, outgoing_axis=out_axis)
        return (sym,)

    return "rescale", shapes, declare, loss


# ---- translation: a softmax classifier's logits


@st.composite
def translation_family(draw):
    classes = draw(st.integers(2, 4))
    with_bias = draw(st.booleans())
    if with_bias:
        kernel, pos = (draw(st.integers(1, 3)), classes), 1
        axis = -1
    else:
        kernel, pos = _shape_with(draw, classes, draw(st.integers(1, 3)))
        axis = _axis_arg(draw, pos, len(kernel))
    shapes = {"head/kernel": kernel}
    if with_bias:
        shapes["head/bias"] = (classes,)

    def loss(fam):
        k = _to_rows(fam["head/kernel"], pos)
        x = jnp.tanh(_data(3, 6, k.shape[0]))
        logits = x @ k + (fam["head/bias"] if with_bias else 0)
        labels = np.random.default_rng(4).integers(0, classes, size=6)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    def declare(prefix, draw=draw):
        return (ksbopt.Translation(draw(selectors(prefix, sorted(shapes), sorted(shapes))), axis),)

    return "translation", shapes, declare, loss


# ---- linear: x A B, per head


def _linear_leaf(draw, k: int, heads: int | None, lo: int):
    """A leaf with a k axis, maybe a head axis, and rest axes of total size >= lo."""
    rest = [draw(st.integers(lo, 3))] + [
        draw(st.integers(1, 2)) for _ in range(draw(st.integers(0, 1)))
    ]
    axes = ["k"] + (["h"] if heads else []) + ["r"] * len(rest)
    order = draw(st.permutations(axes))
    sizes = iter(rest)
    shape = tuple(k if a == "k" else heads if a == "h" else next(sizes) for a in order)
    return shape, order.index("k"), (order.index("h") if heads else None)


@st.composite
def linear_family(draw):
    k = draw(st.integers(1, 3))
    heads = draw(st.sampled_from([None, 2]))
    a_shape, a_k, a_h = _linear_leaf(draw, k, heads, k)
    b_shape, b_k, b_h = _linear_leaf(draw, k, heads, 1)
    with_bias = heads is None and a_k == len(a_shape) - 1 and draw(st.booleans())
    shapes = {"A/kernel": a_shape, "B/kernel": b_shape}
    if with_bias:
        shapes["A/bias"] = (k,)
    left = sorted(p for p in shapes if p.startswith("A/"))
    ax = {
        "left_axis": -1 if with_bias else _axis_arg(draw, a_k, len(a_shape)),
        "right_axis": _axis_arg(draw, b_k, len(b_shape)),
    }
    if heads:
        ax["left_head_axis"] = _axis_arg(draw, a_h, len(a_shape))
        ax["right_head_axis"] = _axis_arg(draw, b_h, len(b_shape))

    def per_head(x, k_axis, h_axis, k_last):
        if h_axis is None:
            x, h_axis = x[None], 0
            k_axis += 1
        x = jnp.moveaxis(x, (h_axis, k_axis), (0, -1 if k_last else 1))
        return x.reshape(x.shape[0], -1, k) if k_last else x.reshape(x.shape[0], k, -1)

    def loss(fam):
        a = per_head(fam["A/kernel"], a_k, a_h, True)
        b = per_head(fam["B/kernel"], b_k, b_h, False)
        x = _data(5, 4, a.shape[1])
        z = jnp.einsum("tr,hrk->htk", x, a) + (fam["A/bias"] if with_bias else 0)
        y = jnp.einsum("htk,hkr->htr", z, b)
        return jnp.mean(jnp.square(y - _data(6, *y.shape)))

    def declare(prefix, draw=draw):
        sel_l = draw(selectors(prefix, left, sorted(shapes)))
        sel_r = draw(selectors(prefix, ["B/kernel"], sorted(shapes)))
        return (ksbopt.Linear(sel_l, sel_r, **ax),)

    return "linear", shapes, declare, loss


# ---- overlapping declarations


@st.composite
def overlap_family(draw):
    kind = draw(st.sampled_from(["relu_softmax", "mlp3", "linear3"]))
    d = [draw(st.integers(1, 3)) for _ in range(4)]
    if kind == "relu_softmax":
        c = max(d[2], 2)
        shapes = {"l0/kernel": (d[0], d[1]), "l0/bias": (d[1],)}
        shapes |= {"head/kernel": (d[1], c), "head/bias": (c,)}

        def loss(f):
            x = _data(7, 6, d[0])
            logits = jax.nn.relu(x @ f["l0/kernel"] + f["l0/bias"]) @ f["head/kernel"]
            labels = np.random.default_rng(8).integers(0, c, size=6)
            return jnp.mean(
                optax.softmax_cross_entropy_with_integer_labels(logits + f["head/bias"], labels)
            )

        def declare(prefix, draw=draw):
            s = lambda rels: draw(selectors(prefix, rels, sorted(shapes)))
            return (
                ksbopt.Rescale(s(["l0/bias", "l0/kernel"]), s(["head/kernel"])),
                ksbopt.Translation(s(["head/bias", "head/kernel"])),
            )

    elif kind == "mlp3":
        shapes = {f"l{i}/kernel": (d[i], d[i + 1]) for i in range(3)}
        shapes |= {f"l{i}/bias": (d[i + 1],) for i in range(2)}

        def loss(f):
            h = _data(9, 5, d[0])
            for i in range(2):
                h = jax.nn.relu(h @ f[f"l{i}/kernel"] + f[f"l{i}/bias"])
            y = h @ f["l2/kernel"]
            return jnp.mean(jnp.square(y - _data(10, *y.shape)))

        def declare(prefix, draw=draw):
            s = lambda rels: draw(selectors(prefix, rels, sorted(shapes)))
            return tuple(
                ksbopt.Rescale(s([f"l{i}/bias", f"l{i}/kernel"]), s([f"l{i + 1}/kernel"]))
                for i in range(2)
            )

    else:  # x A B C with the same k for both pairs
        k = d[1]
        shapes = {"A/kernel": (max(d[0], k), k), "A/bias": (k,)}
        shapes |= {"B/kernel": (k, k), "C/kernel": (k, d[3])}

        def loss(f):
            x = _data(11, 4, shapes["A/kernel"][0])
            y = (x @ f["A/kernel"] + f["A/bias"]) @ f["B/kernel"] @ f["C/kernel"]
            return jnp.mean(jnp.square(y - _data(12, *y.shape)))

        def declare(prefix, draw=draw):
            s = lambda rels: draw(selectors(prefix, rels, sorted(shapes)))
            return (
                ksbopt.Linear(s(["A/bias", "A/kernel"]), s(["B/kernel"])),
                ksbopt.Linear(s(["B/kernel"]), s(["C/kernel"])),
            )

    return kind, shapes, declare, loss


@st.composite
def problems(draw, families=("scale", "rescale", "translation", "linear", "overlap")):
    family = draw(st.sampled_from(families))
    strategy = {
        "scale": scale_family,
        "rescale": rescale_family,
        "translation": translation_family,
        "linear": linear_family,
        "overlap": overlap_family,
    }[family]
    name, shapes, declare, loss = draw(strategy())
    prefix = draw(st.sampled_from([("model",), ("layers", 1)]))
    return Problem(name, shapes, prefix, declare(prefix), loss)


# --------------------------------------------------------------------------- helpers


def _draws(problem: Problem, seed: int, step: float) -> tuple:
    """DRAWS parameter trees and updates (update ~ ``step`` times the weights' size)."""
    params = [problem.params(seed * 100 + i) for i in range(DRAWS)]
    ups = [
        jax.tree.map(lambda x: step * x, problem.params(seed * 100 + 50 + i)) for i in range(DRAWS)
    ]
    return tuple(jax.tree.map(lambda *xs: jnp.stack(xs), *t) for t in (params, ups))


def _identity(b) -> jax.Array:
    if b.symmetry.kind in ("scale", "rescale"):
        return jnp.ones(b.charge_shape)
    if b.symmetry.kind == "translation":
        return jnp.zeros(b.charge_shape)
    return jnp.broadcast_to(jnp.eye(b.charge_shape[-1]), b.charge_shape)


def _element(b, key) -> jax.Array:
    """A random group element far from the identity (every group moves by 30% or more)."""
    shape = b.charge_shape
    k1, k2 = jax.random.split(key)
    size = jax.random.uniform(k1, shape, minval=0.3, maxval=0.7)
    sign = jnp.where(jax.random.bernoulli(k2, 0.5, shape), 1.0, -1.0)
    if b.symmetry.kind in ("scale", "rescale"):
        return jnp.exp(sign * size)  # factors in [0.5, 0.74] or [1.35, 2]
    if b.symmetry.kind == "translation":
        return sign * (size + 0.2)  # shifts of 0.5 to 0.9
    return _identity(b) + 0.3 * jax.random.normal(key, shape)


def _natural_scale(b, flat: list) -> jax.Array:
    """The size a group's charge is measured against, per group (per head for Linear)."""
    if b.symmetry.kind == "translation":
        return b.charge([jnp.abs(x) for x in flat])
    return b.norms(flat)


def _per_group(b, q: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(q), axis=(-2, -1)) if b.symmetry.kind == "linear" else jnp.abs(q)


# --------------------------------------------------------------------------- properties


def _check_retract_conserves(problem: Problem, seed: int, step: float) -> None:
    syms = list(problem.syms)
    tx = ksbopt.retract(syms)

    @support.jit
    @jax.vmap
    def run(params, u):
        state = tx.init(params)
        moved, state = tx.update(u, state, params)
        new = optax.apply_updates(params, moved)
        binding = orbit.bind(tuple(syms), params)
        w, w_new = jax.tree.leaves(params), jax.tree.leaves(new)
        errs = []
        for b in binding.bound:
            scale = jnp.maximum(_natural_scale(b, w), _natural_scale(b, w_new))
            err = _per_group(b, b.charge(w_new) - b.charge(w))
            errs.append(jnp.max(jnp.where(scale > 0, err / jnp.where(scale > 0, scale, 1), err)))
        return jnp.max(jnp.stack(errs)), state.residual, utils_rel(new, params)

    err, residual, moved = run(*_draws(problem, seed, step))
    _measured("retract", problem, err)
    assert float(jnp.max(err)) <= TOL_CONSERVE, (problem, err, residual)
    assert float(jnp.max(residual)) <= TOL_CONSERVE, (problem, residual)
    assert float(jnp.min(moved)) > 1e-3 * step, "the step did not move the parameters"


def utils_rel(a, b) -> jax.Array:
    """|a - b| / |b| over whole trees (traceable)."""
    num = sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    den = sum(jnp.sum(jnp.square(y)) for y in jax.tree.leaves(b))
    return jnp.sqrt(num / den)


def _check_project_orthogonal(problem: Problem, seed: int) -> None:
    syms = list(problem.syms)
    tx = ksbopt.project(syms)

    @support.jit
    @jax.vmap
    def run(params, u):
        projected, _ = tx.update(u, tx.init(params), params)
        binding = orbit.bind(tuple(syms), params)
        flat, pu = jax.tree.leaves(params), jax.tree.leaves(projected)
        u_norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(u)))
        worst = []
        for b in binding.bound:
            ident = _identity(b)

            def act(a, b=b):
                moved = b.act(flat, a.reshape(b.charge_shape))
                return [moved[i] for i in b.leaves]

            # One generator per basis element c: d/dt psi(theta, identity + t e_c).
            def generator(e, act=act, ident=ident):
                return jax.jvp(act, (ident.reshape(-1),), (e,))[1]

            xis = jax.vmap(generator)(jnp.eye(ident.size))
            inner = sum(
                jnp.sum(x * pu[i], axis=tuple(range(1, x.ndim))) for x, i in zip(xis, b.leaves)
            )
            size = jnp.sqrt(sum(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))) for x in xis))
            worst.append(jnp.max(jnp.abs(inner) / jnp.where(size > 0, size * u_norm, 1)))
        return jnp.max(jnp.stack(worst)), utils_rel(projected, u)

    worst, changed = run(*_draws(problem, seed, 1.0))
    _measured("project", problem, worst)
    assert float(jnp.max(worst)) <= TOL_ORTHO, (problem, worst)
    assert float(jnp.min(changed)) > 0, "project removed nothing"


def _check_orbit_moves_keep_the_loss(problem: Problem, seed: int) -> None:
    syms = list(problem.syms)
    retract = ksbopt.retract(syms)
    kinds = {s.kind for s in syms}
    steer = ksbopt.steer(syms, 0.7, 0.5) if kinds <= {"scale", "translation"} else None

    @support.jit
    @jax.vmap
    def run(params, u, key):
        binding = orbit.bind(tuple(syms), params)
        treedef = jax.tree.structure(params)
        flat = jax.tree.leaves(params)
        value, grad = jax.value_and_grad(problem.loss)(params)
        size = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in flat)) * jnp.sqrt(
            sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(grad))
        )
        scale = jnp.maximum(jnp.abs(value), size)
        # 1. the group actions, one after the other, with random elements
        acted = list(flat)
        for i, b in enumerate(binding.bound):
            acted = apply_moved(
                acted, b.act(acted, _element(b, jax.random.fold_in(key, i))), add=False
            )
        errs = [jnp.abs(problem.loss(jax.tree.unflatten(treedef, acted)) - value) / scale]
        moved = [utils_rel(jax.tree.unflatten(treedef, acted), params)]
        # 2. retract / steer: w + u' is on the orbit of w + u
        stepped = optax.apply_updates(params, u)
        v_step = problem.loss(stepped)
        for tx in (t for t in (retract, steer) if t is not None):
            out, _ = tx.update(u, tx.init(params), params)
            errs.append(jnp.abs(problem.loss(optax.apply_updates(params, out)) - v_step) / scale)
        return jnp.max(jnp.stack(errs)), moved[0]

    params, u = _draws(problem, seed, 0.2)
    keys = jax.random.split(jax.random.key(seed), DRAWS)
    err, moved = run(params, u, keys)
    _measured("loss", problem, err)
    assert float(jnp.max(err)) <= TOL_LOSS, (problem, err)
    assert float(jnp.min(moved)) > 1e-3, "the group elements were (nearly) the identity"


#: The largest error seen per (property, family) in this process (printed by hand when
#: re-deriving the tolerances above).
MEASURED: dict[tuple[str, str], float] = {}


def _measured(prop: str, problem: Problem, err) -> None:
    key = (prop, problem.family)
    MEASURED[key] = max(MEASURED.get(key, 0.0), float(jnp.max(err)))


_SEEDS = st.integers(0, 2**16)


@given(problem=problems(), seed=_SEEDS, step=st.sampled_from([0.05, 0.3]))
@FAST
def test_retract_conserves_every_charge(x64, problem, seed, step):
    _check_retract_conserves(problem, seed, step)


@given(problem=problems(), seed=_SEEDS)
@FAST
def test_project_is_orthogonal_to_every_generator(x64, problem, seed):
    _check_project_orthogonal(problem, seed)


@given(problem=problems(), seed=_SEEDS)
@FAST
def test_orbit_moves_leave_the_loss_unchanged(x64, problem, seed):
    _check_orbit_moves_keep_the_loss(problem, seed)


@pytest.mark.slow
@given(problem=problems(), seed=_SEEDS, step=st.sampled_from([0.05, 0.3]))
@MANY
def test_retract_conserves_every_charge_many(x64, problem, seed, step):
    _check_retract_conserves(problem, seed, step)


@pytest.mark.slow
@given(problem=problems(), seed=_SEEDS)
@MANY
def test_project_is_orthogonal_to_every_generator_many(x64, problem, seed):
    _check_project_orthogonal(problem, seed)


@pytest.mark.slow
@given(problem=problems(), seed=_SEEDS)
@MANY
def test_orbit_moves_leave_the_loss_unchanged_many(x64, problem, seed):
    _check_orbit_moves_keep_the_loss(problem, seed)


# --------------------------------------------------------------------------- declaration API

_KEYS = ("Dense_0", "Dense_1", "conv", "head", "kernel", "bias", "w", "0")


@st.composite
def wild_trees(draw):
    """Nested dicts (maybe inside a list) of arrays of random shapes: scalars and zero-size
    axes included."""

    def node(depth):
        keys = draw(st.lists(st.sampled_from(_KEYS), min_size=1, max_size=3, unique=True))
        out = {}
        for key in keys:
            if depth < 2 and draw(st.integers(0, 2)) == 0:
                out[key] = node(depth + 1)
            else:
                out[key] = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        return out

    shapes = node(0)
    if draw(st.booleans()):
        shapes = {"layers": [shapes, {"w": (2,)}]}
    rng = np.random.default_rng(draw(st.integers(0, 100)))
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s), jnp.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _selector(paths: list[str], wild: bool):
    """A selector: plausible ones (existing paths, suffixes, globs, regexes, callables) and,
    if ``wild``, every kind of wrong one as well."""
    existing = st.sampled_from(paths)
    kinds = [
        existing,
        existing.map(lambda p: p.rsplit("/", 1)[-1]),
        st.sampled_from(["*", "*/kernel", "Dense_*", "*/*/*", "0/*"]),
        st.sampled_from([re.compile(".*"), re.compile("kernel$")]),
        st.just(_PathIn(frozenset(paths[:2]))),
    ]
    if wild:
        kinds += [
            st.sampled_from(["nope", "", "[", re.compile("^$"), _PathIn(frozenset())]),
            st.sampled_from([3, None, b"kernel", 1.5, object()]),
        ]
    leaf = st.one_of(*kinds)
    lists = st.lists(leaf, min_size=1, max_size=3)
    return st.one_of(leaf, lists, lists.map(tuple), *([st.just([])] if wild else []))


def _axis(wild: bool, none: bool = False):
    good = st.one_of(st.integers(-3, 3), *([st.none()] if none else []))
    if not wild:
        return good
    bad = st.one_of(
        st.none(),
        st.booleans(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=2),
        st.just(np.int64(-1)),
    )
    return st.one_of(good, bad)


@st.composite
def wild_declarations(draw, paths: list[str]):
    """One declaration (as a maker, so that construction errors are caught by the check):
    half of them plausible (right types, values that may or may not fit the tree), half of
    them wild (any type anywhere)."""
    wild = draw(st.booleans())
    sel = _selector(paths, wild)
    kind = draw(st.sampled_from(["scale", "rescale", "translation", "linear", "query_key"]))
    if kind == "scale":
        axis = draw(_axis(wild, none=True))
        groups = draw(
            st.one_of(st.none(), st.integers(1, 3))
            if not wild
            else st.one_of(st.integers(-1, 4), st.booleans(), st.just(2.0))
        )
        args = (draw(sel),)
        return lambda: ksbopt.Scale(*args, axis=axis, groups=groups)
    if kind == "rescale":
        args = (draw(sel), draw(sel))
        axes = {"incoming_axis": draw(_axis(wild)), "outgoing_axis": draw(_axis(wild))}
        return lambda: ksbopt.Rescale(*args, **axes)
    if kind == "translation":
        args = (draw(sel), draw(_axis(wild)))
        return lambda: ksbopt.Translation(*args)
    args = (draw(sel), draw(sel))
    max_iter = draw(st.just(32) if not wild else st.one_of(st.integers(-1, 40), st.just(2.5)))
    if kind == "query_key":
        return lambda: ksbopt.Linear.query_key(*args, max_iter=max_iter)
    axes = {name: draw(_axis(wild)) for name in ("left_axis", "right_axis")}
    axes |= {name: draw(_axis(wild, none=True)) for name in ("left_head_axis", "right_head_axis")}
    return lambda: ksbopt.Linear(*args, **axes, max_iter=max_iter)


def _check_declaration_api(params, makers) -> None:
    """Declarations either work or fail with a ValueError / TypeError that says something."""
    try:
        syms = [make() for make in makers]
        for s in syms:
            hash(s)  # declarations are hashable values (they key the binding cache)
        q = ksbopt.charges(params, syms)
        ksbopt.project(syms).init(params)
        state = ksbopt.retract(syms).init(params)
    except (ValueError, TypeError) as err:
        assert str(err).strip(), f"{type(err).__name__} without a message"
        return
    bound = orbit.bind(tuple(syms), params).bound
    assert len(q) == len(syms) == len(bound)
    for b, x in zip(bound, q):
        assert x.shape == b.charge_shape and x.dtype == jnp.float32, (b.symmetry, x)
        assert bool(jnp.all(jnp.isfinite(x))), (b.symmetry, x)
    support.assert_equal(state.initial, q)


@given(data=st.data())
@FAST_API
def test_declaration_api_works_or_raises_a_clear_error(data):
    params = data.draw(wild_trees())
    makers = data.draw(st.lists(wild_declarations(_leaf_paths(params)), min_size=1, max_size=2))
    _check_declaration_api(params, makers)


@pytest.mark.slow
@given(data=st.data())
@MANY_API
def test_declaration_api_works_or_raises_a_clear_error_many(data):
    params = data.draw(wild_trees())
    makers = data.draw(st.lists(wild_declarations(_leaf_paths(params)), min_size=1, max_size=2))
    _check_declaration_api(params, makers)


def _leaf_paths(params) -> list[str]:
    return groups_lib.leaf_paths(params)
