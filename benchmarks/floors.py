"""Hand-written floors: the cheapest plain-``jnp`` step of each family's mathematics.

Each floor computes the same numbers as the transform it stands beside (tested on small
trees), with no ksbopt code, in as few passes over memory as XLA:CPU allows: every per-unit
sum a step needs is taken in ONE reduction over the leaf (:func:`unit_sums`, several
products at once), every per-unit factor is applied inside the single elementwise pass that
writes the result, and nothing leaf-sized is stored that the step does not return. A
transform's time over its floor's is what its implementation costs beyond the mathematics.

The unit of every floor is the LAST axis of a leaf (Flax's output unit); ``units`` lists the
groups of leaves that share units (a kernel and its bias), as a layout declares them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

Units = list[tuple[str, ...]]  # each entry: "/"-joined leaf paths that share output units

# Leaves with at least this many entries get the one-pass sums and the update ordering (below):
# on smaller ones the extra operations cost more than the pass or the copy they save.
LARGE = 1 << 16


def _blocks(dims: tuple[int, ...]) -> int:
    """How many blocks of rows to sum at once: a number in [6, 12] that follows the leading
    axes (``3 * 3`` for a 3x3 convolution kernel, a divisor of the first axis), else any
    divisor of the row count there, else 8 (the rows left over are then summed apart).
    XLA:CPU unrolls a reduction over so few blocks into vector code; blocks that cut across
    the axes compile to index arithmetic several times slower."""
    prefixes = [math.prod(dims[: k + 1]) for k in range(len(dims))]
    rows = math.prod(dims)
    for fits in (
        [p for p in prefixes if 6 <= p <= 12],
        [d for d in range(12, 5, -1) if dims and dims[0] % d == 0],
        [d for d in range(12, 5, -1) if rows % d == 0],
    ):
        if fits:
            return fits[0]
    return 8


def unit_sums(*products: jax.Array) -> list[jax.Array]:
    """Per-unit sums (over all axes but the last) of every product, in one pass.

    One product: ``jnp.sum``. Several: one variadic ``lax.reduce`` over a few blocks of rows
    (:func:`_blocks`), then small sums over the rows of a block (and over the rows left over
    by the blocks). Leaves too small for that are summed product by product.
    """
    x = products[0]
    axes = tuple(range(x.ndim - 1))
    rows, units = math.prod(x.shape[:-1]), x.shape[-1]
    s = _blocks(x.shape[:-1])
    if len(products) == 1 or rows < s or x.size < LARGE:
        return [jnp.sum(p, axis=axes) for p in products]
    mats = [p.reshape(rows, units) for p in products]
    cut = rows // s * s
    blocks = tuple(m[:cut].reshape(s, rows // s, units) for m in mats)
    zeros = tuple(jnp.zeros((), p.dtype) for p in products)
    partial = jax.lax.reduce(blocks, zeros, lambda a, b: tuple(i + j for i, j in zip(a, b)), (0,))
    sums = [jnp.sum(p, axis=0) for p in partial]
    if cut < rows:
        sums = [t + jnp.sum(m[cut:], axis=0) for t, m in zip(sums, mats)]
    return sums


def _get(tree: dict, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _set(tree: dict, path: str, value) -> None:
    *head, last = path.split("/")
    for key in head:
        tree = tree[key]
    tree[last] = value


def _copy(tree: dict) -> dict:
    return jax.tree.map(lambda x: x, tree)


def _group_sums(units: Units, fn, *trees) -> list[list[jax.Array]]:
    """Per group: the element-wise sum over its leaves of ``unit_sums(*fn(*leaves))``."""
    out = []
    for paths in units:
        total = None
        for path in paths:
            sums = unit_sums(*fn(*[_get(t, path) for t in trees]))
            total = sums if total is None else [a + b for a, b in zip(total, sums)]
        out.append(total)
    return out


def _after(updates: dict, small) -> dict:
    """``updates``, bit for bit, ordered after the per-unit values ``small``: an exact zero
    derived from them is subtracted from every large leaf. The step's reductions read the
    old parameters; without this order XLA may schedule one after ``apply_updates`` writes
    the donated parameters in place, and copies the parameters to keep it (a full pass)."""
    zero = jnp.isfinite(sum(jnp.sum(x) for x in jax.tree.leaves(small))) * 0.0

    def after(u):
        return u - zero.astype(u.dtype) if u.size >= LARGE else u

    return jax.tree.map(after, updates)


def _safe_div(num, den):
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


# ------------------------------------------------------------------ exact: retract, steer, project


def exact_retraction(units: Units) -> optax.GradientTransformation:
    """``u -> a (w + u) - w`` with ``a = |w_0| / |w + u|`` per unit: one sum of
    ``(w + u)**2`` per unit, then one pass writing ``(a - 1) w + a u``."""

    def sq(params, updates):
        return [s[0] for s in _group_sums(units, lambda w, u: [jnp.square(w + u)], params, updates)]

    def init_fn(params):
        return sq(params, jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params):
        out = _copy(updates)
        for paths, q0, q in zip(units, state, sq(params, updates)):
            a = jnp.sqrt(_safe_div(q0, q))
            for path in paths:
                w, u = _get(params, path), _get(updates, path)
                _set(out, path, (a - 1) * w + a * u)
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------------------------------ monitor


def monitor_sums(units: Units, lr: float, momentum: float) -> optax.GradientTransformation:
    """SGD with heavy ball, and the per-unit sums a monitor of it reads (Scale groups, no
    ``dynamics``): ``w w``, ``w u``, ``u u``, ``w g``, ``g g`` (``u = -lr v``, ``v`` the new
    momentum buffer), all in one pass, ordered before the parameters are written
    (:func:`_after`); the sums are kept in the state (so that they are computed)."""
    sgd = optax.sgd(lr, momentum=momentum)

    def init_fn(params):
        zeros = [jnp.zeros(_get(params, p[0]).shape[-1:]) for p in units]
        return sgd.init(params), [[z] * 5 for z in zeros]

    def update_fn(grads, state, params):
        inner, _ = state
        (trace,) = [s for s in inner if isinstance(s, optax.TraceState)]
        v = jax.tree.map(lambda g, t: g + momentum * t, grads, trace.trace)
        u = jax.tree.map(lambda x: -lr * x, v)

        def products(w, u, g):
            return [w * w, w * u, u * u, w * g, g * g]

        sums = _group_sums(units, products, params, u, grads)
        return _after(u, sums), ((optax.TraceState(trace=v), optax.EmptyState()), sums)

    return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------------------ noether_rmsprop


def noether_rmsprop(units: Units, lr: float) -> optax.GradientTransformation:
    """The exact mode without momentum or weight decay, per unit: ``x`` the accumulator,
    ``r = |w|``, ``c = <w, g> / r^2``; the virtual layer's step ``A w + B g`` with
    ``A = sqrt(x) / r + lr c r / sqrt(x)``, ``B = -lr r / sqrt(x)``; ``x <- |A w + B g|^2``
    (from ``|w|^2``, ``<w, g>``, ``|g|^2``: one pass) and the new weights
    ``|w_0| (A w + B g) / sqrt(x)`` (one pass). Other leaves: SGD."""

    def sums(w, g):
        return _group_sums(units, lambda a, b: [a * a, a * b, b * b], w, g)

    def init_fn(params):
        ww = [s[0] for s in sums(params, params)]
        return ww, ww  # accumulator, |w_0|^2

    def update_fn(grads, state, params):
        acc, ww0 = state
        out = jax.tree.map(lambda g: -lr * g, grads)
        new_acc = []
        for paths, x, x0, (ww, wg, gg) in zip(units, acc, ww0, sums(params, grads)):
            r, s = jnp.sqrt(ww), jnp.sqrt(x)
            a = _safe_div(s, r) + lr * _safe_div(wg, ww) * _safe_div(r, s)
            b = -lr * _safe_div(r, s)
            x_new = a * a * ww + 2 * a * b * wg + b * b * gg
            k = jnp.sqrt(_safe_div(x0, x_new))
            for path in paths:
                _set(out, path, (k * a - 1) * _get(params, path) + k * b * _get(grads, path))
            new_acc.append(x_new)
        return out, (new_acc, ww0)

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------- symmetrize(adam)


def symmetrize_adam(units: Units, lr: float, b1=0.9, b2=0.999, eps=1e-8):
    """Adam on the unit directions of every group, per unit (``r = |w|``, ``c = <w,g>/r^2``):
    the gradient at the direction ``r (g - c w)``; Adam's step ``v`` from it; ``v``'s
    tangent part mapped back, ``cand = w + r (v - (<v, w> / r^2) w)``, and retracted to
    ``|w_0|``; the first moment projected on the tangent space at ``cand / |cand|``. Three
    passes: sums ``w w``, ``w g``; sums ``v w``, ``v v``, ``m w``, ``m v`` (``v`` and the
    new first moment ``m`` computed on the fly); the pass writing the step and the moments.
    Other leaves: Adam."""
    grouped = {p for paths in units for p in paths}

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        ww0 = [s[0] for s in _group_sums(units, lambda w: [w * w], params)]
        return jnp.zeros([], jnp.int32), zeros, zeros, ww0

    def update_fn(grads, state, params):
        count, mu, nu, ww0 = state
        count = optax.safe_increment(count)
        bc1 = 1 - b1 ** _as_float(count, grads)
        bc2 = 1 - b2 ** _as_float(count, grads)

        def adam(g, m, n):
            m = b1 * m + (1 - b1) * g
            n = b2 * n + (1 - b2) * g * g
            return m, n, -lr * (m / bc1) / (jnp.sqrt(n / bc2) + eps)

        new_mu, new_nu, out = _copy(mu), _copy(nu), _copy(grads)
        for path, g in zip(_paths(grads), jax.tree.leaves(grads)):
            if path not in grouped:
                m, n, v = adam(g, _get(mu, path), _get(nu, path))
                _set(new_mu, path, m), _set(new_nu, path, n), _set(out, path, v)
        first = _group_sums(units, lambda w, g: [w * w, w * g], params, grads)
        for paths, x0, (ww, wg) in zip(units, ww0, first):
            r, c = jnp.sqrt(ww), _safe_div(wg, ww)

            def moments(w, g, m, n, r=r, c=c):
                return adam(r * (g - c * w), m, n)

            def products(w, g, m, n, moments=moments):
                m, _, v = moments(w, g, m, n)
                return [v * w, v * v, m * w, m * v]

            vw, vv, mw, mv = _group_sums([paths], products, params, grads, mu, nu)[0]
            t = _safe_div(vw, ww)
            cc = ww + r * r * (vv - vw * t)  # |cand|^2, v - t w orthogonal to w
            a = jnp.sqrt(_safe_div(x0, cc))
            d = _safe_div(mw * (1 - r * t) + r * mv, cc)  # <m, cand> / |cand|^2
            for path in paths:
                w, g = _get(params, path), _get(grads, path)
                m, n, v = moments(w, g, _get(mu, path), _get(nu, path))
                _set(out, path, (a - 1 - a * r * t) * w + a * r * v)
                _set(new_mu, path, m - d * (1 - r * t) * w - d * r * v)
                _set(new_nu, path, n)
        return out, (count, new_mu, new_nu, ww0)

    return optax.GradientTransformation(init_fn, update_fn)


def _as_float(count, tree):
    """The step count in the dtype of the first leaf (bias corrections in float64 there)."""
    return count.astype(jax.tree.leaves(tree)[0].dtype)


def _paths(tree) -> list[str]:
    return [
        "/".join(str(k.key) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


# ----------------------------------------------------------------- peers: SGDP / AdamP


def _radial(p, g, w, delta=0.1, eps=1e-8):
    """AdamP's projection of ``p`` on a kernel: ``p - c w`` with ``c = <w, p> / (|w| +
    eps)^2`` per unit (channel view), for the whole leaf (layer view) or 0, from ONE pass of
    four sums."""
    ww, gg, gw, wp = unit_sums(w * w, g * g, g * w, w * p)
    cos_unit = _safe_div(jnp.abs(gw), jnp.sqrt(gg) * jnp.sqrt(ww) + eps)
    by_unit = jnp.max(cos_unit) < delta / math.sqrt(math.prod(w.shape[:-1]))
    lw, lg, lgw, lwp = (jnp.sum(x) for x in (ww, gg, gw, wp))
    by_layer = _safe_div(jnp.abs(lgw), jnp.sqrt(lg) * jnp.sqrt(lw) + eps) < delta / math.sqrt(
        w.size
    )
    c_unit = _safe_div(wp, jnp.square(jnp.sqrt(ww) + eps))
    c_layer = _safe_div(lwp, jnp.square(jnp.sqrt(lw) + eps))
    return jnp.where(by_unit, c_unit, jnp.where(by_layer, c_layer, 0.0))


def sgdp(lr: float, momentum: float) -> optax.GradientTransformation:
    """SGDP without weight decay: heavy ball, then on every kernel the radial projection,
    which also replaces the momentum buffer (the reference default without Nesterov)."""

    def init_fn(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update_fn(grads, buf, params):
        def leaf(g, b, w):
            b = momentum * b + g
            if w.ndim < 2:
                return -lr * b, b
            q = b - _radial(b, g, w) * w
            return -lr * q, q

        return _two(leaf, grads, buf, params)

    return optax.GradientTransformation(init_fn, update_fn)


def _two(leaf, grads, *trees):
    outs = [leaf(*xs) for xs in zip(jax.tree.leaves(grads), *map(jax.tree.leaves, trees))]
    treedef = jax.tree.structure(grads)
    return (
        jax.tree.unflatten(treedef, [o[0] for o in outs]),
        jax.tree.unflatten(treedef, [o[1] for o in outs]),
    )


def adamp(lr: float, b1=0.9, b2=0.999, eps=1e-8) -> optax.GradientTransformation:
    """AdamP without weight decay: Adam's step, then on every kernel the radial projection."""

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return jnp.zeros([], jnp.int32), zeros, zeros

    def update_fn(grads, state, params):
        count, mu, nu = state
        count = optax.safe_increment(count)
        bc1 = 1 - b1 ** _as_float(count, grads)
        bc2 = 1 - b2 ** _as_float(count, grads)

        def leaf(g, m, n, w):
            m = b1 * m + (1 - b1) * g
            n = b2 * n + (1 - b2) * g * g
            p = (m / bc1) / (jnp.sqrt(n / bc2) + eps)
            out = p if w.ndim < 2 else p - _radial(p, g, w) * w
            return -lr * out, (m, n)

        out, mn = _two(leaf, grads, mu, nu, params)
        treedef = jax.tree.structure(grads)
        leaves = treedef.flatten_up_to(mn)
        mu = jax.tree.unflatten(treedef, [x[0] for x in leaves])
        nu = jax.tree.unflatten(treedef, [x[1] for x in leaves])
        return out, (count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------- Nero


def nero(lr: float, beta=0.999, bias_scale=0.01) -> optax.GradientTransformation:
    """Nero with constraints: per unit ``nu <- beta nu + (1 - beta) |g|^2``, the step
    ``k g`` with ``k = -lr / sqrt(nu / (1 - beta^t))``, and the balanced (zero-mean,
    unit-norm) projection of ``balance(w) + k g``, all from ONE pass of five sums
    (``sum g``, ``sum g^2``, ``sum w``, ``sum w^2``, ``sum w g``) and the output pass.
    Biases: per-entry RMS steps scaled by their initial mean magnitude."""

    def init_fn(params):
        def nu0(w):
            return jnp.zeros(w.shape[-1:] if w.ndim >= 2 else w.shape)

        def scale0(w):
            s = jnp.mean(jnp.abs(w)) if w.ndim < 2 and w.size else 1.0
            return jnp.where(s > 0, s, bias_scale)

        return jnp.zeros([], jnp.int32), jax.tree.map(nu0, params), jax.tree.map(scale0, params)

    def update_fn(grads, state, params):
        count, nu, scales = state
        count = optax.safe_increment(count)
        bc = 1 - beta ** _as_float(count, grads)

        def leaf(g, n, s, w):
            if w.ndim < 2:
                n = beta * n + (1 - beta) * g * g
                return -lr * s * _safe_div(g, jnp.sqrt(n / bc)), n
            size = math.prod(w.shape[:-1])
            sg, gg, sw, ww, wg = unit_sums(g, g * g, w, w * w, w * g)
            n = beta * n + (1 - beta) * gg
            k = -lr * _safe_div(1.0, jnp.sqrt(n / bc))
            mw = sw / size
            sd = jnp.sqrt(jnp.maximum(ww - size * mw * mw, 0))  # |w - mean w|
            bb = jnp.where(sd > 0, 1.0, 0.0)  # |balance(w)|^2
            bg = _safe_div(wg - mw * sg, sd)  # <balance(w), g>
            mx = k * sg / size
            sx = jnp.sqrt(jnp.maximum(bb + 2 * k * bg + k * k * gg - size * mx * mx, 0))
            new = _safe_div(_safe_div(w - mw, sd) + k * g - mx, sx)
            return new - w, n

        out, nu = _two(leaf, grads, nu, scales, params)
        return out, (count, nu, scales)

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------- rotational


def rotational(lr: float, weight_decay: float, momentum: float, rms_decay=0.9, eps=1e-8):
    """The rotational wrapper of heavy ball (``kind="sgdm"``) with the reference defaults:
    on every kernel unit, ``w`` and the momentum step ``u`` centred, the tangent part of
    ``u`` RMS-normalised per unit (``sqrt`` of the debiased average plus ``eps``) and scaled
    by the equilibrium angular update turns the centred ``w`` at its initial norm. ONE pass
    of five sums (``w``, ``u``, ``w w``, ``u w``, ``u u``; the centred sums follow from
    them) and the output pass; other leaves: heavy ball with coupled decay."""
    eta_r = math.sqrt(2 * lr * weight_decay / (1 + momentum))

    def init_fn(params):
        def norm0(w):
            return jnp.sqrt(unit_sums(w * w)[0]) if w.ndim >= 2 else jnp.zeros([])

        def zeros(w):
            return jnp.zeros(w.shape[-1:]) if w.ndim >= 2 else jnp.zeros([])

        trace = jax.tree.map(jnp.zeros_like, params)
        return (
            jnp.zeros([], jnp.int32),
            trace,
            jax.tree.map(zeros, params),
            jax.tree.map(norm0, params),
        )

    def update_fn(grads, state, params):
        count, trace, rms, norms = state
        count = optax.safe_increment(count)
        bc = 1 - rms_decay ** _as_float(count, grads)

        def leaf(g, t, nu, n, w):
            if w.ndim < 2:
                t = momentum * t + g + weight_decay * w
                return (-lr * t, (t, nu))
            t = momentum * t + g
            size = math.prod(w.shape[:-1])
            sw, su, ww, uw, uu = unit_sums(w, t, w * w, t * w, t * t)
            mw, mu = sw / size, su / size
            ww, uw, uu = ww - size * mw * mw, uw - size * mw * mu, uu - size * mu * mu  # centred
            c = _safe_div(uw, ww)
            nu = rms_decay * nu + (1 - rms_decay) * jnp.maximum(uu - c * uw, 0)
            h = eta_r * n / (jnp.sqrt(nu / bc) + eps)
            a, b = 1 + h * c, -h  # moved = a (w - mw) + b (t - mu)
            mm = a * a * ww + 2 * a * b * uw + b * b * uu
            k = n * _safe_div(1.0, jnp.sqrt(mm))
            return ((k * a - 1) * w + k * b * t - k * (a * mw + b * mu), (t, nu))

        treedef = jax.tree.structure(grads)
        outs = [
            leaf(*xs)
            for xs in zip(*(treedef.flatten_up_to(x) for x in (grads, trace, rms, norms, params)))
        ]
        out = treedef.unflatten([o[0] for o in outs])
        trace = treedef.unflatten([o[1][0] for o in outs])
        rms = treedef.unflatten([o[1][1] for o in outs])
        return out, (count, trace, rms, norms)

    return optax.GradientTransformation(init_fn, update_fn)
