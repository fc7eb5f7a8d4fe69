"""The adaptive optimizer that normalisation + SGD runs implicitly, made explicit.

:ref:`implicit-rmsprop` (after NLD Eq. 15-18): on a scale-invariant group, SGD with weight decay
trains the unit direction with an effective learning rate eta / ((1 - eta lambda) |w|^2),
and |w|^2 is an accumulator of squared gradients, discounted by weight decay. That is an
RMSProp with ONE scalar accumulator per group. :func:`scale_by_noether_rmsprop` carries that
accumulator in its state, so the mechanism can be switched on where no normalisation layer
provides it (any group declared with :class:`~ksbopt.Scale`), while the weights' own norms
are held fixed (the constrained-norm control of NLD, with the adaptivity put back).
:func:`noether_rmsprop` is that block followed by the learning rate's scaling.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ksbopt._src import checks, reductions, theory
from ksbopt._src.numerics import all_finite_values, safe_div
from ksbopt._src.symmetries import orbit

MODES = ("exact", "nld")


class NoetherRmspropState(NamedTuple):
    """State of :func:`scale_by_noether_rmsprop` and :func:`noether_rmsprop` (the same one).

    The learning rate's scaling keeps no state, so the optimizer's state is the block's.

    In exact mode the accumulator follows the squared norm of the virtual normalised layer,
    ``x_{k+1} = (1 - eta lambda)^2 x_k + eta^2 |g_hat_k|^2 / x_k`` without momentum
    ([derived] :ref:`P1 <p1>`, :ref:`P2 <p2>`).

    Attributes:
      accumulator: one array per declared symmetry, one scalar per group: the virtual
        squared norm ``x = |w|^2`` of the normalised layer (``mode="exact"``) or RMSProp's
        accumulator G (``mode="nld"``).
      momentum: heavy-ball buffer shaped like the parameters (on grouped leaves in exact
        mode it is the buffer of the virtual normalised layer; unused on them in nld mode);
        ``()`` when ``momentum=0`` (a number): no step reads a buffer then.
      initial: the charges ``1/2 |w|^2`` at ``init``; the weights' norms are held there.

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> tx = ksbopt.noether_rmsprop(ksbopt.Scale("w", axis=-1), 0.1)
      >>> tx.init({"w": jnp.array([[3.0], [4.0]])}).accumulator
      (Array([25.], dtype=float32),)

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716 (Eq. 15-18)
    """

    accumulator: tuple
    momentum: Any
    initial: tuple


_PRODUCTS = {
    "ww": ("w", "w"),
    "wg": ("w", "g"),
    "gg": ("g", "g"),
    "wv": ("w", "v"),
    "gv": ("g", "v"),
    "vv": ("v", "v"),
}


def _products(names, w, g, v):
    """Per leaf index, the named products of the flat lists ``w``, ``g``, ``v``."""
    vectors = {"w": w, "g": g, "v": v}

    def product(name, i):
        a, b = _PRODUCTS[name]
        return vectors[a][i] * vectors[b][i]

    return lambda i: [product(n, i) for n in names]


def _is_static(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_hyperparameters(owner, learning_rate, weight_decay, momentum, mode) -> None:
    if callable(learning_rate):
        raise TypeError(
            f"{owner}: learning_rate={learning_rate!r} is callable; the accumulator recursion "
            f"needs the step size itself. Schedule it with optax.inject_hyperparams({owner})"
            "(learning_rate=schedule, ...)."
        )
    checks.check_positive(owner, "learning_rate", learning_rate, example=0.1)
    checks.check_nonnegative(owner, "weight_decay", weight_decay, example=5e-4)
    checks.check_unit_interval(owner, "momentum", momentum, example=0.9)
    if mode not in MODES:
        raise ValueError(
            f"{owner}: {mode=} is not one of {MODES}; write mode='exact' (the normalised "
            "layer's dynamics, step for step) or mode='nld' (the RMSProp of the NLD mapping)."
        )
    if mode == "nld" and all(_is_static(v) for v in (learning_rate, weight_decay, momentum)):
        if weight_decay <= 0:
            raise ValueError(
                f"{owner}: mode='nld' needs {weight_decay=} > 0: the NLD mapping's discount is "
                "rho = 1 - 4 eta lambda / (1 - beta) and its step sqrt(2 eta lambda / (1 + "
                "beta)), so lambda = 0 never learns. Use mode='exact' without weight decay."
            )
        if 4 * learning_rate * weight_decay >= 1 - momentum:
            raise ValueError(
                f"{owner}: mode='nld' needs 4 * learning_rate * weight_decay < 1 - momentum "
                f"(got {learning_rate=}, {weight_decay=}, {momentum=}): otherwise the "
                "discount rho = 1 - 4 eta lambda / (1 - beta) is not in (0, 1)."
            )


def _scale_symmetries(owner: str, symmetries) -> tuple:
    """The declarations as a tuple, each of kind ``scale``."""
    syms = orbit.as_symmetries(symmetries, what="symmetries")
    for s in syms:
        if s.kind != "scale":
            raise ValueError(
                f"{owner} supports the symmetry kind 'scale' only (ksbopt.Scale: one "
                f"accumulator per unit or layer); got {s!r} of kind {s.kind!r}. Declare the "
                "groups as ksbopt.Scale(selection, axis=-1) (per unit) or axis=None (per layer)."
            )
    return syms


def _exact_step(sums, acc, eta, lam, beta, with_buffer):
    """Exact mode, one group: the virtual layer ``w_v = (s / r) w`` (``s^2`` the accumulator,
    ``r = |w|``), its gradient ``g_v = (r / s) g_t`` (``g_t = g - c w`` the tangent part), its
    buffer ``v' = beta v + g_v + lam w_v`` and its step ``w_v - eta v' = A w + B g + C v``.

    Returns ``(A, B, C)`` and the buffer's coefficients on ``w`` and ``g``; the new
    accumulator is the squared norm of that step.
    """
    c = safe_div(sums["wg"], sums["ww"])  # g's radial part c w
    r, s = jnp.sqrt(sums["ww"]), jnp.sqrt(acc)
    s_over_r, r_over_s = safe_div(s, r), safe_div(r, s)
    buffer = {"buffer_w": lam * s_over_r - r_over_s * c, "buffer_g": r_over_s}
    a = s_over_r - eta * buffer["buffer_w"]
    cv = -eta * beta if with_buffer else jnp.zeros_like(a)
    return (a, -eta * r_over_s, cv), buffer


def _nld_step(sums, acc, eta, lam, beta):
    """nld mode, one group: RMSProp's accumulator ``G' = rho G + (1 - rho) |g_hat|^2`` and
    the direction step ``-eta_RMS g_hat / sqrt(G')``, written on ``w`` as ``A w + B g``.

    Returns ``(A, B, 0)`` and ``G'``.
    """
    ww, wg, gg = sums["ww"], sums["wg"], sums["gg"]
    c = safe_div(wg, ww)
    r = jnp.sqrt(ww)
    rho, eta_rms = theory.rmsprop_analogy(eta, lam, beta)
    acc_new = rho * acc + (1 - rho) * ww * jnp.maximum(gg - c * wg, 0)  # |g_hat|^2 = |r g_t|^2
    step = safe_div(eta_rms * r, jnp.sqrt(acc_new)) * r  # |w| times the direction's step
    return (1 + step * c, -step, jnp.zeros_like(ww)), acc_new


def _squared_norm(sums, a, bg, cv, with_buffer):
    """``|A w + B g + C v|^2`` per group, from the per-group sums of the products."""
    sq = a * a * sums["ww"] + 2 * a * bg * sums["wg"] + bg * bg * sums["gg"]
    if with_buffer:
        sq = sq + cv * (2 * a * sums["wv"] + 2 * bg * sums["gv"] + cv * sums["vv"])
    return sq


def _group_direction(sums, acc, q0, eta, lam, beta, mode, with_buffer):
    """One group's direction per unit learning rate, as coefficients on ``w``, ``g``, ``v``.

    The step ``A w + B g + C v`` is put back on the initial norm by the factor
    ``k = sqrt(2 q0) / |A w + B g + C v|``; the update ``k (A w + B g + C v) - w`` divided by
    ``-eta`` is the direction. Returns the coefficients (with the buffer's in exact mode),
    the new accumulator and the sums whose finiteness the step needs.
    """
    if mode == "exact":
        (a, bg, cv), coef = _exact_step(sums, acc, eta, lam, beta, with_buffer)
    else:
        (a, bg, cv), acc_new = _nld_step(sums, acc, eta, lam, beta)
        coef = {}
    cand_sq = _squared_norm(sums, a, bg, cv, with_buffer)
    if mode == "exact":
        acc_new = cand_sq
    norm = jnp.sqrt(cand_sq)
    k = safe_div(jnp.sqrt(2 * q0), norm)  # back to the initial norm
    per_lr = safe_div(-1.0, jnp.asarray(eta, norm.dtype))  # a traced eta of 0: no direction
    coef = {**coef, "w": (k * a - 1) * per_lr, "g": k * bg * per_lr}
    if with_buffer:
        coef["v"] = k * cv * per_lr
    finite = [jnp.sum(sums["ww"]), jnp.sum(sums["gg"]), jnp.sum(acc_new), jnp.sum(norm)]
    return coef, acc_new, finite


def _initial_state(syms, params, eta, lam, beta, mode, keeps_buffer) -> NoetherRmspropState:
    """The accumulators at ``init``: ``x_0 = |w_0|^2`` (exact) or NLD's ``G_0`` (nld)."""
    binding = orbit.bind(syms, params)
    w = orbit.promote(jax.tree.leaves(params))
    initial = orbit.charges(binding, w)
    if mode == "exact":
        acc = tuple(2 * q for q in initial)
    else:
        acc = tuple(2 * lam * (1 - beta) * jnp.square(2 * q) / eta for q in initial)
    # the buffer in the compute dtype of each leaf (float32 for bfloat16 parameters)
    zeros = [jnp.zeros_like(x) for x in w]
    buf = jax.tree.unflatten(jax.tree.structure(params), zeros) if keeps_buffer else ()
    return NoetherRmspropState(acc, buf, initial)


def _write_group(bound, coef, w, g, v, beta, directions, buffers) -> None:
    """Writes one group's direction (and, in exact mode, its buffer) into every leaf it
    spans: ``coef`` holds per-group coefficients on ``w``, ``g`` (and ``v``), applied in one
    elementwise pass per leaf."""
    for p in bound.parts:
        i = p.leaf

        def per(name, p=p):
            return p.broadcast(coef[name][p.offset : p.offset + p.size])

        d = per("w") * w[i] + per("g") * g[i]
        directions[i] = d + per("v") * v[i] if "v" in coef else d
        if "buffer_w" in coef:
            buffers[i] = beta * v[i] + per("buffer_g") * g[i] + per("buffer_w") * w[i]


def _block(owner, symmetries, learning_rate, weight_decay, momentum, mode):
    """The transformation of :func:`scale_by_noether_rmsprop`, its errors naming ``owner``."""
    _check_hyperparameters(owner, learning_rate, weight_decay, momentum, mode)
    syms = _scale_symmetries(owner, symmetries)
    eta, lam, beta = learning_rate, weight_decay, momentum
    # Without momentum (a static 0) no step reads a buffer: the state keeps none. With it,
    # the groups read theirs in exact mode only (nld mode keeps no buffer on the groups).
    keeps_buffer = not (_is_static(beta) and beta == 0)
    with_buffer = mode == "exact" and keeps_buffer
    names = ("ww", "wg", "gg") + (("wv", "gv", "vv") if with_buffer else ())

    def init_fn(params):
        return _initial_state(syms, params, eta, lam, beta, mode, keeps_buffer)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        checks.require_params(params, owner)
        binding = orbit.bind(syms, params)
        flat_u = jax.tree.leaves(updates)
        w, g = orbit.promote(jax.tree.leaves(params)), orbit.promote(flat_u)
        v = jax.tree.leaves(state.momentum) if keeps_buffer else [jnp.zeros((), x.dtype) for x in w]
        vc = orbit.promote(v)
        grouped = {i for b in binding.bound for i in b.leaves}
        # Ungrouped leaves: heavy ball with coupled weight decay; its buffer is the direction.
        buffers = [v[i] if i in grouped else beta * v[i] + g[i] + lam * w[i] for i in range(len(w))]
        directions = list(buffers)
        finite = [jnp.sum(g[i]) for i in range(len(w)) if i not in grouped]
        coefs, accs = [], []
        for b, acc, q0 in zip(binding.bound, state.accumulator, state.initial):
            # [derived] The step is a per-group combination of w, g (and v): all it needs of
            # the leaves are the per-group sums of their products, taken in ONE pass.
            sums = dict(zip(names, reductions.group_sums(b, _products(names, w, g, vc))))
            coef, acc, group_finite = _group_direction(
                sums, acc, q0, eta, lam, beta, mode, with_buffer
            )
            coefs.append(coef)
            accs.append(acc)
            finite += group_finite
        # A non-finite gradient skips the step: zero updates, state unchanged. So does a group
        # whose squared norm or accumulator is not finite (|w|^2 beyond the compute dtype's
        # range): its ratios would be inf / inf = NaN. The per-group sums hold every
        # non-finite entry of a grouped gradient.
        ok = all_finite_values(finite)
        for b, coef in zip(binding.bound, reductions.finished(ok, coefs)):
            _write_group(b, coef, w, g, vc, beta, directions, buffers)
        out = [jnp.where(ok, d, 0).astype(u.dtype) for d, u in zip(directions, flat_u)]
        buf = (
            [jnp.where(ok, n, o).astype(o.dtype) for n, o in zip(buffers, v)]
            if keeps_buffer
            else ()
        )
        return jax.tree.unflatten(jax.tree.structure(updates), out), NoetherRmspropState(
            tuple(jnp.where(ok, a, o) for a, o in zip(accs, state.accumulator)),
            jax.tree.unflatten(jax.tree.structure(state.momentum), buf) if keeps_buffer else (),
            state.initial,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _then_learning_rate(block, learning_rate) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(block, optax.scale_by_learning_rate(learning_rate))`` whose state is the
    block's alone (the scaling keeps an empty one), so that the optimizer's state is the
    block's :class:`NoetherRmspropState`."""
    scale = optax.scale_by_learning_rate(learning_rate)

    def update_fn(updates, state, params=None, **extra_args):
        direction, state = block.update(updates, state, params, **extra_args)
        step, _ = scale.update(direction, scale.init(params), params)
        return step, state

    return optax.GradientTransformationExtraArgs(block.init, update_fn)


def scale_by_noether_rmsprop(
    symmetries,
    learning_rate: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    *,
    mode: str = "exact",
) -> optax.GradientTransformationExtraArgs:
    r"""The preconditioning of :func:`noether_rmsprop`: its direction per unit learning rate.

    On every group declared by a :class:`~ksbopt.Scale` (a unit, a filter, a layer), the
    norm is held at its initial value and the direction :math:`u = w / \lVert w \rVert` is
    trained with the gradient at it, :math:`\hat g = \lVert w \rVert (g - \langle g,
    u\rangle u)`, by an RMSProp with one scalar accumulator per group. Every other leaf gets
    heavy ball with coupled weight decay, direction :math:`v \leftarrow \beta v + g + \lambda w`.

    ``mode="exact"`` [derived] :ref:`P1 <p1>`, :ref:`P2 <p2>`, :ref:`P3 <p3>`: the accumulator
    is the squared norm x the group WOULD have as a normalised layer trained by that SGD,
    :math:`x_0 = \lVert w_0 \rVert^2`; with v the buffer of the virtual layer
    :math:`\tilde w = \sqrt{x}\, u`,

    .. math::

        v \leftarrow \beta v + \hat g / \sqrt{x} + \lambda \tilde w, \qquad
        \tilde w \leftarrow \tilde w - \eta v, \qquad x \leftarrow \lVert\tilde w\rVert^2,
        \qquad u \leftarrow \tilde w / \lVert\tilde w\rVert .

    ``mode="nld"`` [paper: NLD Eq. 18 analogy; derived rates, :ref:`implicit-rmsprop`]:
    RMSProp with one scalar accumulator G per group, no buffer on the groups, and the NLD
    mapping of the hyperparameters (:func:`ksbopt.theory.rmsprop_analogy`),

    .. math::

        \rho = 1 - \frac{4\eta\lambda}{1 - \beta}, \quad
        \eta_{RMS} = \sqrt{\frac{2\eta\lambda}{1 + \beta}}, \quad
        G \leftarrow \rho G + (1 - \rho) \lVert\hat g\rVert^2, \quad
        u \leftarrow \mathrm{normalize}(u - \eta_{RMS}\, \hat g / \sqrt{G}),

    :math:`G_0 = 2 \lambda (1 - \beta) \lVert w_0 \rVert^4 / \eta` (NLD's r^4(0)): an
    approximation of heavy ball, measured on :ref:`noether-rmsprop-concept`.

    The output is :math:`d = -(w_{k+1} - w_k) / \eta`, the step per unit learning rate. Unlike
    Adam's, this preconditioner reads the learning rate (the accumulator is the norm of a
    layer trained with step :math:`\eta`, each group is put back on its initial sphere: the
    step is not linear in :math:`\eta`), so scale it by the same one. Zero-norm groups stay
    at zero (no NaN); a step with a non-finite gradient, norm or accumulator is skipped:
    zero updates, state unchanged (:doc:`/edge_cases`).

    Args:
      symmetries: the groups, :class:`~ksbopt.Scale` declarations; without normalisation
        the units, e.g. ``ksbopt.Scale(["Dense_0/kernel", "Dense_0/bias"], axis=-1)``.
      learning_rate: eta (> 0), a number (schedule it with ``optax.inject_hyperparams``).
      weight_decay: lambda (>= 0; > 0 for ``mode="nld"``).
      momentum: beta in [0, 1).
      mode: ``"exact"`` (default) or ``"nld"`` (keyword-only).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`NoetherRmspropState`. Feed it
      the loss gradient without weight decay; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> params = {"w": jnp.array([[3.0], [4.0]]), "b": jnp.array([1.0])}
      >>> g = {"w": jnp.array([[0.8], [-0.6]]), "b": jnp.array([2.0])}
      >>> block = ksbopt.scale_by_noether_rmsprop(ksbopt.Scale("w", axis=-1), 0.1, 1e-2)
      >>> d, _ = block.update(g, block.init(params), params)
      >>> round(float(d["b"][0]), 6), [round(float(x), 4) for x in d["w"][:, 0]]
      (2.01, [0.8066, -0.5925])
      >>> tx = optax.chain(block, optax.scale_by_learning_rate(0.1))  # = noether_rmsprop
      >>> u, _ = tx.update(g, tx.init(params), params)  # the norm of w is held at 5:
      >>> round(float(jnp.linalg.norm(optax.apply_updates(params, u)["w"])), 5)
      5.0

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716 (Eq. 15-18);
      Tieleman, Hinton, "Lecture 6.5 - RMSProp", Coursera, Neural Networks for ML, 2012.
    """
    owner = "ksbopt.scale_by_noether_rmsprop"
    return _block(owner, symmetries, learning_rate, weight_decay, momentum, mode)


def noether_rmsprop(
    symmetries,
    learning_rate: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    *,
    mode: str = "exact",
) -> optax.GradientTransformationExtraArgs:
    r"""The implicit adaptive optimizer of normalisation + SGD, as an explicit optimizer.

    :func:`scale_by_noether_rmsprop` followed by the learning rate's scaling,
    :math:`w \leftarrow w - \eta\, d`: on every :class:`~ksbopt.Scale` group the norm is held
    at its initial value and the direction trained by an RMSProp with one scalar accumulator
    per group; every other leaf gets ``optax.chain(optax.add_decayed_weights(weight_decay),
    optax.sgd(learning_rate, momentum))``, the optimizer whose implicit form this is.

    ``mode="exact"`` [derived] :ref:`P1 <p1>`, :ref:`P2 <p2>`, :ref:`P3 <p3>`: on a
    normalised layer it reproduces SGD (with momentum: heavy ball) + coupled weight decay
    direction by direction, step by step (tested to 1e-10 in float64); the accumulator is
    the squared norm that layer has. With ``momentum=0`` it is the scalar recursion of the
    implicit RMSProp,
    :math:`u_{k+1} = \mathrm{normalize}(u_k - \eta\,\hat g_k / ((1 - \eta\lambda) x_k))`,
    :math:`x_{k+1} = (1 - \eta\lambda)^2 x_k + \eta^2 \lVert\hat g_k\rVert^2 / x_k`.

    ``mode="nld"`` [paper: NLD Eq. 18 analogy]: RMSProp with the NLD mapping of the
    hyperparameters, an approximation of heavy ball whose measured error is on
    :ref:`noether-rmsprop-concept`. The math of both is on :func:`scale_by_noether_rmsprop`.

    Its state is the block's :class:`NoetherRmspropState` (the scaling keeps none), so
    ``optax.chain(scale_by_noether_rmsprop(...), optax.scale_by_learning_rate(eta))`` gives
    the same updates, with the state wrapped in the chain's tuple.

    Args:
      symmetries, learning_rate, weight_decay, momentum, mode: as for
        :func:`scale_by_noether_rmsprop`; ``learning_rate`` (eta > 0, a number) is both the
        step of the block's recursion and the scale of its direction.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is the block's
      :class:`NoetherRmspropState`; give it the gradient without weight decay, and ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> params = {"w": jnp.array([[3.0], [4.0]])}
      >>> tx = ksbopt.noether_rmsprop(ksbopt.Scale("w", axis=-1), 0.1, 1e-2)
      >>> state = tx.init(params)
      >>> u, state = tx.update({"w": jnp.array([[0.8], [-0.6]])}, state, params)
      >>> round(float(jnp.linalg.norm(optax.apply_updates(params, u)["w"])), 5)
      5.0
      >>> [round(float(x), 4) for x in state.accumulator[0]]  # (0.999**2) 25 + 0.01 * 25 / 25
      [24.96]

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716 (Eq. 15-18);
      Tieleman, Hinton, "Lecture 6.5 - RMSProp", COURSERA: Neural Networks for Machine
      Learning, 2012.
    """
    owner = "ksbopt.noether_rmsprop"
    block = _block(owner, symmetries, learning_rate, weight_decay, momentum, mode)
    return _then_learning_rate(block, learning_rate)
