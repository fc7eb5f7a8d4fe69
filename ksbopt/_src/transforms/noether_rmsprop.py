"""The adaptive optimizer that normalisation + SGD runs implicitly, made explicit.

:ref:`implicit-rmsprop` (after NLD Eq. 15-18): on a scale-invariant group, SGD with weight decay
trains the unit direction with an effective learning rate eta / ((1 - eta lambda) |w|^2),
and |w|^2 is an accumulator of squared gradients, discounted by weight decay. That is an
RMSProp with ONE scalar accumulator per group. :func:`noether_rmsprop` carries that
accumulator in its state, so the mechanism can be switched on where no normalisation layer
provides it (any group declared with :class:`~ksbopt.Scale`), while the weights' own norms
are held fixed (the constrained-norm control of NLD, with the adaptivity put back).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ksbopt._src import checks, reductions, theory
from ksbopt._src.numerics import safe_div
from ksbopt._src.symmetries import orbit

MODES = ("exact", "nld")


class NoetherRmspropState(NamedTuple):
    """State of :func:`noether_rmsprop`.

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


def _check_hyperparameters(learning_rate, weight_decay, momentum, mode) -> None:
    owner = "ksbopt.noether_rmsprop"
    if callable(learning_rate):
        raise TypeError(
            f"{owner}: learning_rate={learning_rate!r} is callable; the accumulator recursion "
            "needs the step size itself. Schedule it with optax.inject_hyperparams("
            "ksbopt.noether_rmsprop)(learning_rate=schedule, ...)."
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


def noether_rmsprop(
    symmetries,
    learning_rate: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    *,
    mode: str = "exact",
) -> optax.GradientTransformationExtraArgs:
    r"""The implicit adaptive optimizer of normalisation + SGD, as an explicit optimizer.

    On every group declared by a :class:`~ksbopt.Scale` (a unit, a filter, a layer), the
    weights' norm is held at its initial value and the unit direction
    :math:`u = w / \lVert w \rVert` is trained with the gradient at it,
    :math:`\hat g = \lVert w \rVert (g - \langle g, u\rangle u)`, by an RMSProp with one
    scalar accumulator per group. Every other leaf gets heavy-ball SGD with coupled weight
    decay (``optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate,
    momentum))``), the optimizer whose implicit form this is.

    ``mode="exact"`` [derived] :ref:`P1 <p1>`, :ref:`P2 <p2>`, :ref:`P3 <p3>`: the accumulator
    is the squared norm x that the group WOULD have if it were a normalised layer trained by that
    SGD. It starts at
    :math:`x_0 = \lVert w_0 \rVert^2` and, with v the heavy-ball buffer of the virtual layer
    :math:`\tilde w = \sqrt{x}\, u`,

    .. math::

        v \leftarrow \beta v + \hat g / \sqrt{x} + \lambda \tilde w, \qquad
        \tilde w \leftarrow \tilde w - \eta v, \qquad x \leftarrow \lVert\tilde w\rVert^2,
        \qquad u \leftarrow \tilde w / \lVert\tilde w\rVert .

    With ``momentum=0`` this is exactly the scalar recursion of the section-5 RMSProp,
    :math:`u_{k+1} = \mathrm{normalize}(u_k - \eta\,\hat g_k / ((1 - \eta\lambda) x_k))`,
    :math:`x_{k+1} = (1 - \eta\lambda)^2 x_k + \eta^2 \lVert\hat g_k\rVert^2 / x_k`, and on a
    normalised layer it reproduces SGD + weight decay direction by direction, step by step
    (tested to 1e-10 in float64). With momentum it reproduces heavy ball + coupled weight
    decay on a normalised layer, step by step, at the cost of a parameter-shaped buffer.

    ``mode="nld"`` [paper: NLD Eq. 18 analogy; derived rates, :ref:`implicit-rmsprop`]: plain
    RMSProp with one scalar accumulator G per group and the NLD mapping of the heavy-ball
    hyperparameters,

    .. math::

        \rho = 1 - \frac{4\eta\lambda}{1 - \beta}, \quad
        \eta_{RMS} = \sqrt{\frac{2\eta\lambda}{1 + \beta}}, \quad
        G \leftarrow \rho G + (1 - \rho) \lVert\hat g\rVert^2, \quad
        u \leftarrow \mathrm{normalize}(u - \eta_{RMS}\, \hat g / \sqrt{G}),

    with :math:`G_0 = 2 \lambda (1 - \beta) \lVert w_0 \rVert^4 / \eta` (NLD's r^4(0) as the
    epsilon, with the noise-dominated coefficient c_beta = 2 eta / (1 - beta)^2, see
    :func:`ksbopt.theory.nld_coefficient`). No momentum buffer on the groups. It is an
    APPROXIMATION of heavy ball on a normalised layer, matched to the stationary angular
    update sqrt(2 eta lambda / (1 + beta)) (P7a). Measured against SGD + momentum + weight
    decay on a normalised layer under minibatch noise, per unit and 100-step window of the
    mean angular update (eta = 0.05, lambda = 5e-3, 1500 steps, float64, units starting at
    0.3x to 10x the norm):

    - beta = 0: within 0.6 % from the first window on (it is the first-order form of the
      exact recursion);
    - beta = 0.9, noise-dominated steady state: within 5 % (the sampling error of such a
      window is about 4 %);
    - beta = 0.9, transients with coherent gradients (a unit far from its equilibrium norm):
      heavy ball's momentum amplifies a coherent gradient by 1 / (1 - beta), noise only by
      1 / sqrt(1 - beta^2), and the mapping assumes noise, so the NLD RMSProp turns slower,
      by at most sqrt((1 - beta) / (1 + beta)) = 0.23; measured 0.41 to 0.5 in the first
      300 steps of the units that start at 3x and 10x the norm.

    The directions themselves differ after a few steps: it is a different optimizer, not a
    re-parametrisation. Use ``mode="exact"`` to reproduce heavy ball exactly.

    Zero-norm groups stay at zero (no NaN). The update of a group is computed as a
    retraction onto its initial norm, so the norms do not drift over steps. A step whose
    gradient, group norms or accumulators are not finite (a NaN / inf gradient; ``|w|^2`` or
    the accumulator overflowing the compute dtype, e.g. ``|w| > 1.8e19`` in float32) is
    skipped: zero updates on every leaf, state unchanged (docs/edge_cases.md).

    Args:
      symmetries: the groups, :class:`~ksbopt.Scale` declarations (first, as in every ksbopt
        transform that wraps no optimizer). On a network without normalisation declare the
        units, e.g. ``ksbopt.Scale(["Dense_0/kernel", "Dense_0/bias"], axis=-1)`` for the
        hidden units of a ReLU layer (the next layer absorbs the fixed norms through the
        rescale symmetry).
      learning_rate: eta (> 0).
      weight_decay: lambda (>= 0; > 0 for ``mode="nld"``).
      momentum: beta in [0, 1).
      mode: ``"exact"`` (default) or ``"nld"`` (keyword-only).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`NoetherRmspropState`. Feed it
      the loss gradient without weight decay; ``update`` needs ``params``.

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
    _check_hyperparameters(learning_rate, weight_decay, momentum, mode)
    syms = orbit.as_symmetries(symmetries, what="symmetries")
    for s in syms:
        if s.kind != "scale":
            raise ValueError(
                f"{owner} supports the symmetry kind 'scale' only (ksbopt.Scale: one "
                f"accumulator per unit or layer); got {s!r} of kind {s.kind!r}. Declare the "
                "groups as ksbopt.Scale(selection, axis=-1) (per unit) or axis=None (per layer)."
            )
    eta, lam, beta = learning_rate, weight_decay, momentum

    def init_fn(params):
        binding = orbit.bind(syms, params)
        w = orbit.promote(jax.tree.leaves(params))
        initial = orbit.charges(binding, w)
        if mode == "exact":
            acc = tuple(2 * q for q in initial)
        else:
            acc = tuple(2 * lam * (1 - beta) * jnp.square(2 * q) / eta for q in initial)
        buf = (
            jax.tree.unflatten(jax.tree.structure(params), [jnp.zeros_like(x) for x in w])
            if keeps_buffer
            else ()
        )
        return NoetherRmspropState(acc, buf, initial)

    # The step reads the buffer v on the groups in exact mode with momentum (beta = 0: the
    # terms in v vanish; nld mode keeps no buffer on the groups).
    with_buffer = mode == "exact" and not (_is_static(beta) and beta == 0)
    # Without momentum (a static 0) no step reads a buffer: the state keeps none.
    keeps_buffer = not (_is_static(beta) and beta == 0)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        orbit.require_params(params, "noether_rmsprop")
        binding = orbit.bind(syms, params)
        flat_u = jax.tree.leaves(updates)
        w = orbit.promote(jax.tree.leaves(params))
        g = orbit.promote(flat_u)
        v = jax.tree.leaves(state.momentum) if keeps_buffer else [jnp.zeros((), x.dtype) for x in w]
        vc = orbit.promote(v)
        grouped = {i for b in binding.bound for i in b.leaves}
        # Ungrouped leaves: heavy ball with coupled weight decay.
        new_v = [
            beta * v[i] + g[i] + lam * w[i] if i not in grouped else v[i] for i in range(len(w))
        ]
        steps = [-eta * new_v[i] if i not in grouped else None for i in range(len(w))]
        checks = [jnp.sum(g[i]) for i in range(len(w)) if i not in grouped]
        accs, coefs = [], []
        for b, acc, q0 in zip(binding.bound, state.accumulator, state.initial):
            # [derived] Every vector of the step is a per-group combination of w, g (and the
            # buffer v), so all it needs of the leaves are the per-group sums of their
            # products, taken in ONE pass (reductions.group_sums); the step itself is then
            # written in one elementwise pass: no leaf-sized intermediate is stored.
            names = ("ww", "wg", "gg") + (("wv", "gv", "vv") if with_buffer else ())
            sums = dict(zip(names, reductions.group_sums(b, _products(names, w, g, vc))))
            ww, wg, gg = sums["ww"], sums["wg"], sums["gg"]
            r = jnp.sqrt(ww)
            c = safe_div(wg, ww)  # g's radial part c w: g_t = g - c w
            zero = jnp.zeros_like(ww)
            if mode == "exact":
                # virtual layer w_v = (s / r) w, its gradient g_v = (r / s) g_t, buffer
                # v' = beta v + g_v + lam w_v and step w_v - eta v' = A w + B g + C v.
                s_over_r, r_over_s = safe_div(jnp.sqrt(acc), r), safe_div(r, jnp.sqrt(acc))
                coef_v = {"w": lam * s_over_r - r_over_s * c, "g": r_over_s}
                a = s_over_r - eta * coef_v["w"]
                bg = -eta * r_over_s
                cv = -eta * beta if with_buffer else zero
            else:
                rho, eta_rms = theory.rmsprop_analogy(eta, lam, beta)
                g_hat_sq = ww * jnp.maximum(gg - c * wg, 0)  # |r g_t|^2
                acc_new = rho * acc + (1 - rho) * g_hat_sq
                # direction step -eta_rms g_hat / sqrt(G), i.e. |w| times that on w.
                step = safe_div(eta_rms * r, jnp.sqrt(acc_new)) * r
                a, bg, cv = 1 + step * c, -step, zero
            cand_sq = a * a * ww + 2 * a * bg * wg + bg * bg * gg
            if with_buffer:
                cand_sq = cand_sq + cv * (
                    2 * a * sums["wv"] + 2 * bg * sums["gv"] + cv * sums["vv"]
                )
            acc = cand_sq if mode == "exact" else acc_new
            norm = jnp.sqrt(cand_sq)
            k = safe_div(jnp.sqrt(2 * q0), norm)  # back to the initial norm
            coef = {"w": k * a - 1, "g": k * bg}
            if with_buffer:
                coef["v"] = k * cv
            if mode == "exact":
                coef["buffer_w"], coef["buffer_g"] = coef_v["w"], coef_v["g"]
            coefs.append(coef)
            accs.append(acc)
            checks += [jnp.sum(ww), jnp.sum(gg), jnp.sum(acc), jnp.sum(norm)]
        # A non-finite gradient skips the step: zero updates, state unchanged. So does a group
        # whose squared norm or accumulator is not finite (|w|^2 beyond the compute dtype's
        # range, e.g. |w| > 1.8e19 in float32): its ratios would be inf / inf = NaN. The
        # per-group sums above already hold every non-finite entry of a grouped gradient.
        ok = jnp.isfinite(sum(checks))
        coefs = reductions.finished(ok, coefs)
        for b, coef in zip(binding.bound, coefs):
            for p in b.parts:
                i = p.leaf

                def per(name, p=p, coef=coef):
                    return p.broadcast(coef[name][p.offset : p.offset + p.size])

                out = per("w") * w[i] + per("g") * g[i]
                if with_buffer:
                    out = out + per("v") * vc[i]
                steps[i] = out
                if mode == "exact":
                    new_v[i] = beta * vc[i] + per("buffer_g") * g[i] + per("buffer_w") * w[i]
        new = [jnp.where(ok, x, 0).astype(u.dtype) for x, u in zip(steps, flat_u)]
        out = jax.tree.unflatten(jax.tree.structure(updates), new)
        buf = (
            jax.tree.unflatten(
                jax.tree.structure(state.momentum),
                [jnp.where(ok, n, o).astype(o.dtype) for n, o in zip(new_v, v)],
            )
            if keeps_buffer
            else ()
        )
        accs = tuple(jnp.where(ok, a, o) for a, o in zip(accs, state.accumulator))
        return out, NoetherRmspropState(accs, buf, state.initial)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
