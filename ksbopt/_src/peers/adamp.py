"""SGDP and AdamP: momentum optimizers that drop the radial part of their step.

Heo et al. (ICLR 2021) observe that momentum makes the norm of a scale-invariant weight grow
much faster than plain SGD does, which shrinks its effective step size early in training.
Their remedy removes the radial (norm-increasing) component of each step whenever the
weight looks scale-invariant, as judged by a cosine test between gradient and weight.

This module writes that rule for Flax layouts: the per-unit ("channel") view of a kernel
reduces over every axis but the LAST, never over axis 0.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ksbopt._src import checks, reductions
from ksbopt._src import groups as groups_lib
from ksbopt._src.numerics import compute_dtype, safe_div
from ksbopt._src.peers._common import (
    check_range,
    concrete_float,
    is_kernel,
    map_leaves,
    one_minus_power,
)

__all__ = [
    "ScaleByAdampState",
    "ScaleBySgdpState",
    "adamp",
    "radial_projection",
    "scale_by_adamp",
    "scale_by_sgdp",
    "sgdp",
]


def radial_projection(
    p: jax.Array, g: jax.Array, w: jax.Array, delta: Any, eps: Any
) -> tuple[jax.Array, jax.Array]:
    """Removes the radial part of ``p`` from a kernel that passes the cosine test.

    Math [paper: Heo et al. 2021, Sec. 3]: with ``Pi_w(x) = x - <w_hat, x> w_hat``,
    ``w_hat = w / (|w| + eps)`` (the authors' code adds ``eps`` to the norm here too,
    https://github.com/clovaai/AdamP/blob/master/adamp/sgdp.py, ``_projection``; the paper
    writes ``w / |w|``, the same up to ``eps / |w|``) and
    ``cos(a, b) = |<a, b>| / (|a| |b| + eps)``,

    1. channel view: if ``max_j cos(g_j, w_j) < delta / sqrt(d_unit)`` over the units
       ``w_j = w[..., j]`` (``d_unit`` = entries per unit), every unit is projected,
       ``q_j = Pi_{w_j}(p_j)``;
    2. otherwise layer view: if ``cos(g, w) < delta / sqrt(w.size)``, ``q = Pi_w(p)``;
    3. otherwise ``q = p``.

    A zero-norm unit (or layer) has cosine 0 and ``w_hat = 0``, so it passes the test and its
    step is left as it is: no NaN. The choice between the views is made with ``jnp.where``,
    never with a Python ``if``, so the function is ``jit``-safe.

    Args:
      p: the step to project (momentum or Adam direction), same shape as ``w``.
      g: the raw gradient used in the cosine test.
      w: the current weight, with at least two dimensions (units on the last axis).
      delta: threshold of the cosine test (``> 0``).
      eps: added to the cosine's denominator.

    Returns:
      ``(q, projected)``: the projected step (in ``p``'s compute dtype) and a boolean scalar
      saying whether a projection was applied.

    Example:
      >>> import jax.numpy as jnp
      >>> from ksbopt.peers import radial_projection
      >>> w = jnp.array([[3.0, 0.0], [4.0, 0.0]])   # unit 0 = (3, 4), unit 1 = 0
      >>> g = jnp.array([[4.0, 1.0], [-3.0, 1.0]])  # orthogonal to unit 0
      >>> q, projected = radial_projection(w, g, w, 0.1, 1e-8)
      >>> bool(projected), float(jnp.abs(q).max())
      (True, 0.0)

    References:
      B. Heo, S. Chun, S. J. Oh, D. Han, S. Yun, G. Kim, Y. Uh, J.-W. Ha, "AdamP: Slowing
      Down the Slowdown for Momentum Optimizers on Scale-invariant Weights", ICLR 2021,
      https://arxiv.org/abs/2006.08217
    """
    cd = compute_dtype(p)
    p, g, w = p.astype(cd), g.astype(cd), w.astype(cd)
    c, projected = _radial_coefficients(p, g, w, delta, eps)
    return p - c * w, projected


def _radial_coefficients(
    p: jax.Array, g: jax.Array, w: jax.Array, delta: Any, eps: Any
) -> tuple[jax.Array, jax.Array]:
    """The per-unit factor ``c`` (shape ``(units,)``) with ``radial_projection``'s step
    ``q = p - c * w``, and the ``projected`` flag; ``p``, ``g``, ``w`` in the compute dtype.

    ``<w_hat, p> w_hat = (<w, p> / (|w| + eps)^2) w`` (0 for a zero-norm unit), so the channel view
    needs ``|w_j|^2``, ``|g_j|^2``, ``<g_j, w_j>``, ``<w_j, p_j>`` per unit and the layer view
    the same four sums over the whole leaf, which are the sums of the per-unit ones. All four
    come out of ONE pass over the leaf (``reductions.part_sums``), and ``q = p - c w`` is
    formed inside the caller's elementwise pass that writes its output: no leaf-sized
    ``w_hat`` or ``q`` is stored and no norm is computed twice. Same numbers as the formulas
    of :func:`radial_projection` up to rounding (order of summation, ``<w, p> / (|w| +
    eps)^2`` in place of ``<w_hat, p>`` times ``w_hat``).
    """
    if w.size == 0:
        return jnp.zeros(w.shape[-1:], w.dtype), jnp.asarray(False)
    d_unit = math.prod(w.shape[:-1])
    part = groups_lib.AxisPart(leaf=0, path="", shape=w.shape, group_axes=(w.ndim - 1,))
    sums = reductions.part_sums(part, [w * w, g * g, g * w, w * p])
    # The barrier keeps XLA from folding the layer sums below (sums of these per-unit sums)
    # into fresh reductions of the leaf-sized partial sums of part_sums: one read fewer.
    ww, gg, gw, wp = jax.lax.optimization_barrier(sums)
    # Channel view: one unit per entry of the last axis.
    cos_unit = safe_div(jnp.abs(gw), jnp.sqrt(gg) * jnp.sqrt(ww) + eps)
    by_unit = jnp.max(cos_unit) < delta / math.sqrt(d_unit)
    c_unit = safe_div(wp, jnp.square(jnp.sqrt(ww) + eps))
    # Layer view: the whole leaf is one vector.
    ww_l, gg_l, gw_l, wp_l = jnp.sum(ww), jnp.sum(gg), jnp.sum(gw), jnp.sum(wp)
    cos_layer = safe_div(jnp.abs(gw_l), jnp.sqrt(gg_l) * jnp.sqrt(ww_l) + eps)
    by_layer = cos_layer < delta / math.sqrt(w.size)
    c_layer = safe_div(wp_l, jnp.square(jnp.sqrt(ww_l) + eps))
    c = jnp.where(by_unit, c_unit, jnp.where(by_layer, c_layer, jnp.zeros_like(c_unit)))
    # Hand the leaf-sized pass that applies ``c`` a finished vector, not the selects above
    # to redo per entry.
    return jax.lax.optimization_barrier((c, by_unit | by_layer))


def _check_common(owner: str, eps: Any, weight_decay: Any, delta: Any, wd_ratio: Any) -> None:
    check_range(owner, "eps", eps, low=0.0, hint="Use a small non-negative number such as 1e-8.")
    check_range(
        owner,
        "weight_decay",
        weight_decay,
        low=0.0,
        hint="Weight decay shrinks weights; use 0 to switch it off.",
    )
    check_range(
        owner, "delta", delta, low=0.0, low_open=True, hint="The paper's value is delta=0.1."
    )
    check_range(
        owner,
        "wd_ratio",
        wd_ratio,
        low=0.0,
        high=1.0,
        hint="It multiplies the weight decay of projected leaves; the paper's value is 0.1.",
    )


def _check_lr(owner: str, learning_rate: Any) -> None:
    check_range(
        owner,
        "learning_rate",
        learning_rate,
        low=0.0,
        hint="Pass the positive step size; the optimizer applies the minus sign itself.",
    )


class ScaleBySgdpState(NamedTuple):
    """State of :func:`scale_by_sgdp`.

    Attributes:
      momentum: the heavy-ball buffer ``b_t = momentum b_{t-1} + (1 - dampening) g_t`` of
        every leaf (shape and dtype of the leaf).

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> ksbopt.peers.scale_by_sgdp().init({"kernel": jnp.ones((2, 2))}).momentum["kernel"].shape
      (2, 2)

    References:
      Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
      Scale-invariant Weights", ICLR 2021, https://arxiv.org/abs/2006.08217
    """

    momentum: optax.Updates


def scale_by_sgdp(
    momentum: Any = 0.9,
    dampening: Any = 0.0,
    weight_decay: Any = 0.0,
    *,
    nesterov: bool = False,
    eps: Any = 1e-8,
    delta: Any = 0.1,
    wd_ratio: Any = 0.1,
    project_momentum: bool | None = None,
) -> optax.GradientTransformationExtraArgs:
    """SGDP's direction (heavy ball, radial projection, decoupled decay), without the lr.

    Math [paper: Heo et al. 2021, Alg. 1], per leaf with gradient ``g`` and weight ``w``::

        b_t = momentum * b_{t-1} + (1 - dampening) * g_t          (b_0 = 0)
        p_t = g_t + momentum * b_t  (nesterov)   or   b_t
        q_t, projected = radial_projection(p_t, g_t, w_t)          (leaves with ndim >= 2)
        b_t <- q_t  (project_momentum, without nesterov: the buffer is projected too)
        r_t = wd_ratio if projected else 1
        out = q_t + weight_decay * r_t / (1 - momentum) * w_t

    The buffer: in the authors' code (https://github.com/clovaai/AdamP/blob/master/adamp/
    sgdp.py, ``step``: ``d_p = buf`` then ``_projection`` subtracts from ``d_p`` in place)
    the step and the momentum buffer are one tensor when ``nesterov=False``, so the
    projection also removes the radial part of the buffer every step; with Nesterov the
    step is a new tensor and the buffer is left alone. ``project_momentum=None`` (default)
    does exactly that, so ``sgdp`` reproduces the code behind the paper's published results.
    ``project_momentum=False`` projects only the step, as the paper's Algorithm 1 writes it
    (and as ``pytorch-optimizer``'s SGDP does); ``project_momentum=True`` projects the
    buffer with Nesterov too (``b_t <- Pi(b_t)`` with the same test).

    :func:`sgdp` multiplies ``out`` by ``-learning_rate``. The weight decay is decoupled
    (applied to the weight, outside the momentum) and divided by ``1 - momentum``, so that
    ``weight_decay`` means the same as the coupled L2 decay of heavy-ball SGD, whose
    momentum sums a steady decay term to ``weight_decay * w / (1 - momentum)``; this is the
    convention of the authors' release. Leaves with fewer than two dimensions (biases) are
    never projected: a bias alone is not scale-invariant, and the paper applies the test to
    weight tensors.

    Args:
      momentum: heavy-ball coefficient in ``[0, 1)``.
      dampening: the gradient enters the buffer with weight ``1 - dampening``; in ``[0, 1]``.
      weight_decay: decoupled decay rate ``>= 0``.
      nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening = 0``).
      eps: added to the cosine's denominator (``>= 0``).
      delta: cosine-test threshold ``> 0``.
      wd_ratio: factor in ``[0, 1]`` on the decay of projected leaves.
      project_momentum: whether the projection also replaces the momentum buffer; ``None``
        follows the authors' code (``True`` without Nesterov, ``False`` with it), ``False``
        the paper's Algorithm 1.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is :class:`ScaleBySgdpState`;
      it needs ``params`` in ``update``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from ksbopt.peers import scale_by_sgdp
      >>> params = {"kernel": jnp.ones((2, 3))}
      >>> tx = scale_by_sgdp(momentum=0.9)
      >>> state = tx.init(params)
      >>> out, state = tx.update({"kernel": jnp.full((2, 3), 0.5)}, state, params)
      >>> out["kernel"].shape
      (2, 3)

    References:
      B. Heo, S. Chun, S. J. Oh, D. Han, S. Yun, G. Kim, Y. Uh, J.-W. Ha, "AdamP: Slowing
      Down the Slowdown for Momentum Optimizers on Scale-invariant Weights", ICLR 2021,
      https://arxiv.org/abs/2006.08217
    """
    owner = "scale_by_sgdp"
    check_range(
        owner,
        "momentum",
        momentum,
        low=0.0,
        high=1.0,
        high_open=True,
        hint="Use a value such as 0.9.",
    )
    check_range(owner, "dampening", dampening, low=0.0, high=1.0, hint="Use 0 (no dampening).")
    _check_common(owner, eps, weight_decay, delta, wd_ratio)
    if nesterov:
        m, d = concrete_float(momentum), concrete_float(dampening)
        if (m is not None and m <= 0) or (d is not None and d != 0):
            raise ValueError(
                f"{owner}: nesterov=True needs momentum > 0 and dampening = 0, got "
                f"{momentum=} and {dampening=}; set dampening=0 or nesterov=False."
            )

    if project_momentum not in (None, True, False):
        raise ValueError(
            f"{owner}: {project_momentum=} is not None, True or False; leave it None to "
            "follow the authors' code or pass False for the paper's step-only projection."
        )
    project_buffer = (not nesterov) if project_momentum is None else project_momentum

    def init_fn(params):
        return ScaleBySgdpState(momentum=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        checks.require_params(params, owner)

        def leaf(g, b, w):
            cd = compute_dtype(g)
            gc, wc = g.astype(cd), w.astype(cd)
            b_new = momentum * b.astype(cd) + (1 - dampening) * gc
            p = gc + momentum * b_new if nesterov else b_new
            if is_kernel(w):
                q, projected = radial_projection(p, gc, wc, delta, eps)
                if project_buffer:
                    b_new = q if not nesterov else radial_projection(b_new, gc, wc, delta, eps)[0]
            else:
                q, projected = p, jnp.asarray(False)
            ratio = jnp.where(projected, wd_ratio, 1.0)
            out = q + (weight_decay * ratio / (1 - momentum)) * wc
            return out.astype(g.dtype), b_new.astype(b.dtype)

        out, buf = map_leaves(leaf, updates, state.momentum, params, n_out=2)
        return out, ScaleBySgdpState(momentum=buf)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sgdp(
    learning_rate: optax.ScalarOrSchedule,
    momentum: Any = 0.9,
    dampening: Any = 0.0,
    weight_decay: Any = 0.0,
    *,
    nesterov: bool = False,
    eps: Any = 1e-8,
    delta: Any = 0.1,
    wd_ratio: Any = 0.1,
    project_momentum: bool | None = None,
) -> optax.GradientTransformationExtraArgs:
    """SGDP: heavy-ball SGD that projects out the radial step of scale-invariant kernels.

    Math [paper: Heo et al. 2021, Alg. 1]: ``w_{t+1} = w_t - lr * out_t`` with ``out_t``
    from :func:`scale_by_sgdp`: momentum ``b_t = momentum b_{t-1} + (1 - dampening) g_t``,
    step ``p_t = b_t`` (or ``g_t + momentum b_t`` with Nesterov), then for a kernel whose
    gradient is nearly orthogonal to its weight (``max_j |cos(g_j, w_j)| < delta /
    sqrt(d_unit)`` per output unit, else ``|cos(g, w)| < delta / sqrt(d)`` for the whole
    kernel) the radial part ``<w_hat, p> w_hat`` is removed per unit (or per kernel) and
    the decoupled decay ``weight_decay / (1 - momentum) * w`` is multiplied by ``wd_ratio``.
    By default the projected step also replaces the momentum buffer when ``nesterov=False``,
    as in the authors' code (https://github.com/clovaai/AdamP/blob/master/adamp/sgdp.py,
    where step and buffer are one tensor); ``project_momentum=False`` projects only the
    step, as the paper's Algorithm 1 (see :func:`scale_by_sgdp`).

    The unit is the LAST axis (Flax: Dense ``(in, out)``, Conv ``(..., in, out)``); biases
    and other 1-D leaves are never projected. Zero-norm units give no NaN.

    Args:
      learning_rate: step size ``>= 0`` or an optax schedule.
      momentum: heavy-ball coefficient in ``[0, 1)``.
      dampening: in ``[0, 1]``; the gradient enters the buffer as ``(1 - dampening) g``.
      weight_decay: decoupled decay ``>= 0`` (see :func:`scale_by_sgdp` for the scaling).
      nesterov: use Nesterov momentum.
      eps: added to the cosine's denominator.
      delta: cosine-test threshold ``> 0`` (paper: 0.1).
      wd_ratio: decay factor for projected leaves in ``[0, 1]`` (paper: 0.1).
      project_momentum: project the momentum buffer as well; ``None`` follows the authors'
        code (without Nesterov: yes), ``False`` the paper's Algorithm 1.

    Returns:
      ``optax.chain(scale_by_sgdp(...), optax.scale_by_learning_rate(learning_rate))``;
      ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ksbopt.peers import sgdp
      >>> params = {"kernel": jnp.array([[1.0, 2.0], [2.0, -1.0]]), "bias": jnp.zeros(2)}
      >>> unit = lambda k: k / jnp.linalg.norm(k, axis=0)  # scale-invariant per column
      >>> loss = lambda p: jnp.sum(jnp.tanh(unit(p["kernel"]) + p["bias"]))
      >>> tx = sgdp(0.1, momentum=0.9)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params)
      >>> # the step of each output unit is orthogonal to that unit's weight
      >>> radial = jnp.sum(params["kernel"] * updates["kernel"], axis=0)
      >>> bool(jnp.all(jnp.abs(radial) < 1e-6))
      True

    References:
      B. Heo, S. Chun, S. J. Oh, D. Han, S. Yun, G. Kim, Y. Uh, J.-W. Ha, "AdamP: Slowing
      Down the Slowdown for Momentum Optimizers on Scale-invariant Weights", ICLR 2021,
      https://arxiv.org/abs/2006.08217
    """
    _check_lr("sgdp", learning_rate)
    return optax.chain(
        scale_by_sgdp(
            momentum,
            dampening,
            weight_decay,
            nesterov=nesterov,
            eps=eps,
            delta=delta,
            wd_ratio=wd_ratio,
            project_momentum=project_momentum,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


class ScaleByAdampState(NamedTuple):
    """State of :func:`scale_by_adamp`.

    Attributes:
      count: number of updates done so far (int32 scalar).
      mu: first moment ``m_t = b1 m_{t-1} + (1 - b1) g_t`` per leaf.
      nu: second moment ``v_t = b2 v_{t-1} + (1 - b2) g_t^2`` per leaf.

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> state = ksbopt.peers.scale_by_adamp().init({"kernel": jnp.ones((2, 2))})
      >>> int(state.count), state.nu["kernel"].shape
      (0, (2, 2))

    References:
      Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
      Scale-invariant Weights", ICLR 2021, https://arxiv.org/abs/2006.08217
    """

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adamp(
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    *,
    delta: Any = 0.1,
    wd_ratio: Any = 0.1,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """AdamP's direction (Adam, radial projection, decoupled decay), without the lr.

    Math [paper: Heo et al. 2021, Alg. 2], per leaf with gradient ``g`` and weight ``w``,
    ``t = 1, 2, ...``::

        m_t = b1 m_{t-1} + (1 - b1) g_t,    v_t = b2 v_{t-1} + (1 - b2) g_t^2
        n_t = b1 m_t + (1 - b1) g_t  (nesterov)   or   m_t
        p_t = (n_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)
        q_t, projected = radial_projection(p_t, g_t, w_t)          (leaves with ndim >= 2)
        out = q_t + weight_decay * (wd_ratio if projected else 1) * w_t

    :func:`adamp` multiplies ``out`` by ``-learning_rate``. The moments are bias-corrected as
    in Adam (Kingma & Ba); the paper's Algorithm 2 writes the uncorrected moments for
    brevity. The weight decay is decoupled, as in AdamW. Leaves with fewer than two
    dimensions are never projected (a bias alone is not scale-invariant).

    Args:
      b1: first-moment decay in ``[0, 1)``.
      b2: second-moment decay in ``[0, 1)``.
      eps: added to ``sqrt(v_hat)`` and to the cosine's denominator (``>= 0``).
      weight_decay: decoupled decay ``>= 0``.
      delta: cosine-test threshold ``> 0``.
      wd_ratio: decay factor for projected leaves in ``[0, 1]``.
      nesterov: use the Nesterov first moment ``b1 m_t + (1 - b1) g_t``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is :class:`ScaleByAdampState`;
      it needs ``params`` in ``update``.

    Example:
      >>> import jax.numpy as jnp
      >>> from ksbopt.peers import scale_by_adamp
      >>> params = {"kernel": jnp.ones((2, 3))}
      >>> tx = scale_by_adamp()
      >>> state = tx.init(params)
      >>> out, state = tx.update({"kernel": jnp.full((2, 3), 0.5)}, state, params)
      >>> int(state.count)
      1

    References:
      B. Heo, S. Chun, S. J. Oh, D. Han, S. Yun, G. Kim, Y. Uh, J.-W. Ha, "AdamP: Slowing
      Down the Slowdown for Momentum Optimizers on Scale-invariant Weights", ICLR 2021,
      https://arxiv.org/abs/2006.08217
    """
    owner = "scale_by_adamp"
    check_range(owner, "b1", b1, low=0.0, high=1.0, high_open=True, hint="Use e.g. b1=0.9.")
    check_range(owner, "b2", b2, low=0.0, high=1.0, high_open=True, hint="Use e.g. b2=0.999.")
    _check_common(owner, eps, weight_decay, delta, wd_ratio)

    def init_fn(params):
        return ScaleByAdampState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=optax.tree.zeros_like(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        checks.require_params(params, owner)
        count = optax.safe_increment(state.count)

        def leaf(g, m, v, w):
            cd = compute_dtype(g)
            gc, wc = g.astype(cd), w.astype(cd)
            m_new = b1 * m.astype(cd) + (1 - b1) * gc
            v_new = b2 * v.astype(cd) + (1 - b2) * gc * gc
            first = b1 * m_new + (1 - b1) * gc if nesterov else m_new
            bc1, bc2 = one_minus_power(b1, count, cd), one_minus_power(b2, count, cd)
            p = (first / bc1) / (jnp.sqrt(v_new / bc2) + eps)
            if is_kernel(w):
                q, projected = radial_projection(p, gc, wc, delta, eps)
            else:
                q, projected = p, jnp.asarray(False)
            out = q + weight_decay * jnp.where(projected, wd_ratio, 1.0) * wc
            return out.astype(g.dtype), m_new.astype(m.dtype), v_new.astype(v.dtype)

        out, mu, nu = map_leaves(leaf, updates, state.mu, state.nu, params, n_out=3)
        return out, ScaleByAdampState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adamp(
    learning_rate: optax.ScalarOrSchedule,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    *,
    delta: Any = 0.1,
    wd_ratio: Any = 0.1,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """AdamP: Adam that projects out the radial step of scale-invariant kernels.

    Math [paper: Heo et al. 2021, Alg. 2]: ``w_{t+1} = w_t - lr * out_t`` with ``out_t``
    from :func:`scale_by_adamp`: the bias-corrected Adam direction
    ``p_t = m_hat_t / (sqrt(v_hat_t) + eps)``; for a kernel whose gradient is nearly
    orthogonal to its weight (``max_j |cos(g_j, w_j)| < delta / sqrt(d_unit)`` over output
    units, else ``|cos(g, w)| < delta / sqrt(d)`` for the whole kernel) the radial part
    ``<w_hat, p> w_hat`` is removed per unit (or per kernel), and the decoupled decay
    ``weight_decay * w`` is multiplied by ``wd_ratio``. The defaults are those of the
    authors' code (https://github.com/clovaai/AdamP/blob/master/adamp/adamp.py), which this
    reproduces step for step; the paper's Algorithm 2 is the same rule written without bias
    correction and with ``w / |w|`` for ``w / (|w| + eps)``.

    The unit is the LAST axis (Flax layout); biases and other 1-D leaves are never
    projected. Zero-norm units give no NaN.

    Args:
      learning_rate: step size ``>= 0`` or an optax schedule.
      b1: first-moment decay in ``[0, 1)``.
      b2: second-moment decay in ``[0, 1)``.
      eps: Adam's epsilon, also added to the cosine's denominator.
      weight_decay: decoupled decay ``>= 0``.
      delta: cosine-test threshold ``> 0`` (paper: 0.1).
      wd_ratio: decay factor for projected leaves in ``[0, 1]`` (paper: 0.1).
      nesterov: Nesterov first moment.

    Returns:
      ``optax.chain(scale_by_adamp(...), optax.scale_by_learning_rate(learning_rate))``;
      ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ksbopt.peers import adamp
      >>> params = {"kernel": jnp.array([[1.0, 2.0], [2.0, -1.0]]), "bias": jnp.zeros(2)}
      >>> tx = adamp(1e-2, weight_decay=1e-2)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> sorted(updates)
      ['bias', 'kernel']

    References:
      B. Heo, S. Chun, S. J. Oh, D. Han, S. Yun, G. Kim, Y. Uh, J.-W. Ha, "AdamP: Slowing
      Down the Slowdown for Momentum Optimizers on Scale-invariant Weights", ICLR 2021,
      https://arxiv.org/abs/2006.08217
    """
    _check_lr("adamp", learning_rate)
    return optax.chain(
        scale_by_adamp(
            b1,
            b2,
            eps,
            weight_decay,
            delta=delta,
            wd_ratio=wd_ratio,
            nesterov=nesterov,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
