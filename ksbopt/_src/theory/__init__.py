"""Closed forms and exact recursions of Noether's learning dynamics.

The formulas are presented on the concepts pages (:doc:`/concepts/noether_charges`,
:doc:`/concepts/implicit_rmsprop`).

Every function here is pure and jit-able: it takes arrays (any shape, one entry per symmetry
group, broadcasting as usual) and returns arrays, in the floating dtype it is given (float32 or
float64). Hyperparameters may be numbers or arrays; concrete numbers (Python, NumPy or 0-d
arrays) are validated eagerly (``ValueError`` naming the argument), traced values and arrays
with axes are not inspected.

Conventions (those of :ref:`exact-identities`):

* ``charge`` of a scale group is ``x_k = |w_k|^2``; of a rescale group the in-minus-out difference
  ``|w_in|^2 - |w_out|^2``; of a translation group ``s_k = <1_A, w_k>``; of a linear group the
  ``k x k`` matrix ``C = A^T A - B B^T``.
* ``g_k`` is the minibatch gradient WITHOUT weight decay, ``d_k = g_k + lambda w_k`` with it.
* Heavy ball (coupled weight decay): ``v_{k+1} = beta v_k + d_k``, ``w_{k+1} = w_k - eta v_{k+1}``,
  ``v_0 = 0`` (this is ``optax.chain(optax.add_decayed_weights(lam), optax.sgd(eta, beta))``).
* Heavy ball (decoupled weight decay): ``m_{k+1} = beta m_k + g_k``,
  ``w_{k+1} = (1 - eta lambda) w_k - eta m_{k+1}`` (``optax.chain(optax.trace(beta),
  optax.add_decayed_weights(lam), optax.scale(-eta))``).
* Continuous time is ``t = eta * step``.

Tags: [paper: NLD] / [paper: NM] are stated in the papers, [derived] follows from them by algebra
(:doc:`/concepts/index`). The exact recursions hold for any step size, batch and data, given the
symmetry; the continuous (NM / NLD integral) forms are approximations with error O(eta).

References:
    Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
    Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716 ([NLD]).

    Kunin, Sagastuy-Brena, Ganguli, Yamins & Tanaka, "Neural Mechanics: Symmetry and Broken
    Conservation Laws in Deep Learning Dynamics", ICLR 2021, https://arxiv.org/abs/2012.04728
    ([NM]).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ksbopt._src import checks
from ksbopt._src.numerics import safe_div

__all__ = [
    "NLD_COEFFICIENTS",
    "adam_metric_charge_step",
    "direction_step",
    "effective_learning_rate",
    "equilibrium_angular_update",
    "equilibrium_update_ratio",
    "heavy_ball_decoupled_step",
    "heavy_ball_second_order_step",
    "heavy_ball_step",
    "linear_sgd_step",
    "metric_charge",
    "metric_charge_step",
    "nld_coefficient",
    "nld_exact_radius4_step",
    "nld_radius4",
    "nld_steady_state_radius4",
    "nm_damped_scale_charge",
    "nm_damped_translation_charge",
    "nm_oscillator_kernels",
    "rmsprop_analogy",
    "rmsprop_sqrt_accumulator",
    "scale_sgd_step",
    "translation_heavy_ball_step",
    "translation_sgd_step",
    "winding_fixed_point",
]

#: Names accepted by the ``coefficient`` keyword of the NLD Eq. 16-17 functions.
NLD_COEFFICIENTS = ("printed", "noise")

# --------------------------------------------------------------------------------------------
# validation and small numerics
# --------------------------------------------------------------------------------------------


_OWNER = "ksbopt.theory"


def _check_hyper(learning_rate, momentum=None, weight_decay=None, *, positive_lr=False) -> None:
    """The step size eta (>= 0, or > 0), the heavy-ball beta in [0, 1), lambda >= 0."""
    check_lr = checks.check_positive if positive_lr else checks.check_nonnegative
    check_lr(_OWNER, "learning_rate", learning_rate, example=0.1)
    if momentum is not None:
        checks.check_unit_interval(_OWNER, "momentum", momentum, example=0.9)
    if weight_decay is not None:
        checks.check_nonnegative(_OWNER, "weight_decay", weight_decay, example=5e-4)


def _check_coefficient(coefficient) -> str:
    if not isinstance(coefficient, str):
        raise TypeError(
            f"{coefficient=} must be a string, one of {NLD_COEFFICIENTS}: 'printed' for "
            "NLD Eq. 17 as printed (coherent gradients) or 'noise' for noise-dominated SGD."
        )
    if coefficient not in NLD_COEFFICIENTS:
        raise ValueError(
            f"{coefficient=} is not a known NLD coefficient; write one of "
            f"{NLD_COEFFICIENTS}: 'printed' = 2 eta (1+beta)/(1-beta)^3 (NLD Eq. 17) or "
            "'noise' = 2 eta/(1-beta)^2 (noise-dominated minibatch SGD)."
        )
    return coefficient


def _one_minus_exp_over(z: jax.Array) -> jax.Array:
    """``(1 - exp(-z)) / z`` for ``z >= 0``, equal to 1 at ``z = 0`` (stable for small z)."""
    ok = z != 0
    zs = jnp.where(ok, z, 1)
    return jnp.where(ok, -jnp.expm1(-zs) / zs, 1)


def _reduce_axes(ndim: int, axis: int | Sequence[int] | None) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not isinstance(a, int) or not -ndim <= a < ndim:
            raise ValueError(
                f"{axis=} does not fit an array with {ndim} dimensions; pass axes in "
                f"[-{ndim}, {ndim}) or axis=None for the whole array."
            )
        out.append(a % ndim)
    return tuple(sorted(set(out)))


# --------------------------------------------------------------------------------------------
# P1, P2: scale / rescale under SGD + weight decay
# --------------------------------------------------------------------------------------------


def scale_sgd_step(
    charge: ArrayLike,
    grad_sq: ArrayLike,
    learning_rate: ArrayLike,
    weight_decay: ArrayLike = 0.0,
) -> jax.Array:
    """One exact step of the scale (or rescale) charge under SGD + weight decay.

    [derived from NM] :ref:`P1 <p1>`::

        x_{k+1} = (1 - eta lambda)^2 x_k + eta^2 |g_k|^2

    for a scale group (``x = |w|^2``, ``<g, w> = 0``). Coupled (``g + lambda w`` in the gradient)
    and decoupled (``(1 - eta lambda) w - eta g``) weight decay give the same step without
    momentum, so this covers both. With ``weight_decay = 0`` the norm never decreases.

    Rescale (ReLU unit between two layers): the same formula with ``x = |w_in|^2 - |w_out|^2``
    and ``|g|^2 -> |g_in|^2 - |g_out|^2`` (the cross terms cancel because
    ``<g_in, w_in> = <g_out, w_out>``), provided both sides share the weight decay.

    Args:
        charge: ``x_k``, one entry per group (any shape).
        grad_sq: ``|g_k|^2`` per group (rescale: the in-minus-out difference), gradient without
            weight decay.
        learning_rate: ``eta``.
        weight_decay: ``lambda`` (coupled or decoupled).

    Returns:
        ``x_{k+1}``, broadcast shape of the inputs.

    Example:
        >>> x = scale_sgd_step(jnp.array([1.0, 4.0]), jnp.array([0.5, 2.0]), 0.1, 0.1)
        >>> [round(float(v), 6) for v in x]
        [0.9851, 3.9404]

    References:
        Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep Learning
        Dynamics", https://arxiv.org/abs/2012.04728
    """
    _check_hyper(learning_rate, weight_decay=weight_decay)
    decay = 1 - learning_rate * weight_decay
    return decay**2 * jnp.asarray(charge) + learning_rate**2 * jnp.asarray(grad_sq)


def effective_learning_rate(
    charge: ArrayLike, learning_rate: ArrayLike, weight_decay: ArrayLike = 0.0
) -> jax.Array:
    """Effective learning rate of the direction of a scale group under SGD + weight decay.

    [derived] :ref:`P2 <p2>`::

        eta_eff,k = eta / ((1 - eta lambda) x_k),     x_k = |w_k|^2

    The direction ``w_hat = w / |w|`` follows ``w_hat_{k+1} = normalize(w_hat_k - eta_eff,k
    g_hat_k)`` with ``g_hat_k = |w_k| g_k`` the gradient at the unit direction (see
    :func:`direction_step`): SGD on a normalised layer is an adaptive optimiser on the sphere whose
    scalar "second moment" is ``x_k``, updated by :func:`scale_sgd_step`. A group with
    ``x_k = 0`` (or ``eta lambda = 1``) gets 0 instead of inf.

    Args:
        charge: ``x_k = |w_k|^2`` per group.
        learning_rate: ``eta``.
        weight_decay: ``lambda``.

    Returns:
        ``eta_eff,k`` per group.

    Example:
        >>> round(float(effective_learning_rate(4.0, 0.1, 0.5)), 6)
        0.026316

    References:
        Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
        Networks", https://arxiv.org/abs/2105.02716
    """
    _check_hyper(learning_rate, weight_decay=weight_decay)
    den = (1 - learning_rate * weight_decay) * jnp.asarray(charge)
    return safe_div(jnp.asarray(learning_rate, dtype=den.dtype), den)


def direction_step(
    direction: ArrayLike,
    direction_grad: ArrayLike,
    effective_lr: ArrayLike,
    *,
    axis: int | Sequence[int] | None = None,
) -> jax.Array:
    """One step of the unit direction of a scale group: a normalised gradient step.

    [derived] :ref:`P2 <p2>`::

        w_hat_{k+1} = normalize(w_hat_k - eta_eff,k * g_hat_k)

    with ``eta_eff,k`` from :func:`effective_learning_rate` and ``g_hat_k = |w_k| g_k``. For SGD +
    weight decay this reproduces ``w_{k+1} / |w_{k+1}|`` exactly. A group whose new vector is 0
    gets 0 (no NaN).

    Args:
        direction: ``w_hat_k``, unit along the reduced ``axis``.
        direction_grad: ``g_hat_k``, same shape.
        effective_lr: ``eta_eff,k`` per group: either broadcastable against ``direction`` or with
            the shape of ``direction`` minus the reduced axes (it is then expanded).
        axis: axes that one group spans (``None``: the whole array is one group). For a Flax
            Dense kernel ``(in, out)`` with one group per output unit use ``axis=0``.

    Returns:
        ``w_hat_{k+1}``, same shape as ``direction``.

    Example:
        >>> w = jnp.array([[1.0, 0.0], [0.0, 1.0]])  # two groups (columns)
        >>> g = jnp.array([[0.0, 1.0], [1.0, 0.0]])
        >>> new = direction_step(w, g, jnp.array([1.0, 1.0]), axis=0)
        >>> [[round(v, 4) for v in row] for row in new.tolist()]
        [[0.7071, -0.7071], [-0.7071, 0.7071]]

    References:
        Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
        Networks", https://arxiv.org/abs/2105.02716
    """
    direction = jnp.asarray(direction)
    direction_grad = jnp.asarray(direction_grad)
    eff = jnp.asarray(effective_lr)
    axes = _reduce_axes(direction.ndim, axis)
    if 0 < eff.ndim == direction.ndim - len(axes):
        eff = jnp.expand_dims(eff, axes)
    u = direction - eff * direction_grad
    norm = jnp.sqrt(jnp.sum(jnp.square(u), axis=axes, keepdims=True))
    return safe_div(u, norm)


# --------------------------------------------------------------------------------------------
# P3: heavy ball
# --------------------------------------------------------------------------------------------


def heavy_ball_step(
    charge: ArrayLike,
    overlap: ArrayLike,
    velocity_sq: ArrayLike,
    new_velocity_sq: ArrayLike,
    learning_rate: ArrayLike,
    momentum: ArrayLike,
    weight_decay: ArrayLike = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """One exact step of the scale (or rescale) charge under heavy ball + coupled weight decay.

    [derived] :ref:`P3 <p3>`. With ``v_{k+1} = beta v_k + g_k + lambda w_k``,
    ``w_{k+1} = w_k - eta v_{k+1}``, ``v_0 = 0`` and the overlap ``P_k = <w_k, v_{k+1}>``
    (``P_{-1} = 0``)::

        P_k     = beta (P_{k-1} - eta |v_k|^2) + lambda x_k
        x_{k+1} = x_k - 2 eta P_k + eta^2 |v_{k+1}|^2

    Rescale: replace ``x``, ``P`` and the squared norms by in-minus-out differences
    (``P = <w_in, v_in> - <w_out, v_out>``). All inputs broadcast, so a diagnostic can call it
    every step with per-group arrays, carrying ``P`` in its state (start with 0).

    Args:
        charge: ``x_k`` per group.
        overlap: ``P_{k-1}`` (0 at the first step).
        velocity_sq: ``|v_k|^2``, the momentum buffer before this step (0 at the first step).
        new_velocity_sq: ``|v_{k+1}|^2``, the buffer used by this step.
        learning_rate: ``eta``.
        momentum: ``beta`` in [0, 1).
        weight_decay: ``lambda`` (coupled: added to the gradient before the momentum).

    Returns:
        ``(P_k, x_{k+1})``.

    Example:
        >>> p, x = heavy_ball_step(1.0, 0.0, 0.0, 0.25, 0.1, 0.9, 0.1)  # first step
        >>> round(float(p), 6), round(float(x), 6)
        (0.1, 0.9825)

    References:
        Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
        Networks", https://arxiv.org/abs/2105.02716
    """
    _check_hyper(learning_rate, momentum, weight_decay)
    charge = jnp.asarray(charge)
    new_overlap = (
        momentum * (jnp.asarray(overlap) - learning_rate * jnp.asarray(velocity_sq))
        + weight_decay * charge
    )
    new_charge = (
        charge - 2 * learning_rate * new_overlap + learning_rate**2 * jnp.asarray(new_velocity_sq)
    )
    return new_overlap, new_charge


def heavy_ball_second_order_step(
    charge: ArrayLike,
    prev_charge: ArrayLike,
    velocity_sq: ArrayLike,
    new_velocity_sq: ArrayLike,
    learning_rate: ArrayLike,
    momentum: ArrayLike,
    weight_decay: ArrayLike = 0.0,
) -> jax.Array:
    """The heavy-ball charge recursion written without the overlap (three-term form).

    [derived] :ref:`P3 <p3>` (equivalent form)::

        x_{k+1} = (1 + beta - 2 eta lambda) x_k - beta x_{k-1}
                  + eta^2 (|v_{k+1}|^2 + beta |v_k|^2)

    It is the exact discrete counterpart of NLD's damped oscillator for ``|q|^2``. At the first
    step pass ``prev_charge = charge`` and ``velocity_sq = 0``.

    Args:
        charge: ``x_k``.
        prev_charge: ``x_{k-1}``.
        velocity_sq: ``|v_k|^2``.
        new_velocity_sq: ``|v_{k+1}|^2``.
        learning_rate: ``eta``.
        momentum: ``beta``.
        weight_decay: ``lambda`` (coupled).

    Returns:
        ``x_{k+1}``.

    Example:
        >>> round(float(heavy_ball_second_order_step(1.0, 1.0, 0.0, 0.25, 0.1, 0.9, 0.1)), 6)
        0.9825

    References:
        Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
        Networks", https://arxiv.org/abs/2105.02716
    """
    _check_hyper(learning_rate, momentum, weight_decay)
    return (
        (1 + momentum - 2 * learning_rate * weight_decay) * jnp.asarray(charge)
        - momentum * jnp.asarray(prev_charge)
        + learning_rate**2 * (jnp.asarray(new_velocity_sq) + momentum * jnp.asarray(velocity_sq))
    )


def heavy_ball_decoupled_step(
    charge: ArrayLike,
    overlap: ArrayLike,
    momentum_sq: ArrayLike,
    new_momentum_sq: ArrayLike,
    learning_rate: ArrayLike,
    momentum: ArrayLike,
    weight_decay: ArrayLike = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """One exact step of the scale (or rescale) charge under heavy ball + decoupled weight decay.

    [derived] :ref:`P3 <p3>` (decoupled). With ``m_{k+1} = beta m_k + g_k`` and
    ``w_{k+1} = (1 - eta lambda) w_k - eta m_{k+1}``, ``m_0 = 0``, ``P_k = <w_k, m_{k+1}>``::

        P_k     = beta ((1 - eta lambda) P_{k-1} - eta |m_k|^2)
        x_{k+1} = (1 - eta lambda)^2 x_k - 2 eta (1 - eta lambda) P_k + eta^2 |m_{k+1}|^2

    Rescale: in-minus-out differences as in :func:`heavy_ball_step`.

    Args:
        charge: ``x_k`` per group.
        overlap: ``P_{k-1}`` (0 at the first step).
        momentum_sq: ``|m_k|^2`` (0 at the first step).
        new_momentum_sq: ``|m_{k+1}|^2``.
        learning_rate: ``eta``.
        momentum: ``beta`` in [0, 1).
        weight_decay: ``lambda`` (decoupled).

    Returns:
        ``(P_k, x_{k+1})``.

    Example:
        >>> p, x = heavy_ball_decoupled_step(1.0, 0.0, 0.0, 0.25, 0.1, 0.9, 0.1)
        >>> round(float(p), 6), round(float(x), 6)
        (0.0, 0.9826)

    References:
        Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
        Networks", https://arxiv.org/abs/2105.02716
    """
    _check_hyper(learning_rate, momentum, weight_decay)
    decay = 1 - learning_rate * weight_decay
    new_overlap = momentum * (
        decay * jnp.asarray(overlap) - learning_rate * jnp.asarray(momentum_sq)
    )
    new_charge = (
        decay**2 * jnp.asarray(charge)
        - 2 * learning_rate * decay * new_overlap
        + learning_rate**2 * jnp.asarray(new_momentum_sq)
    )
    return new_overlap, new_charge


# --------------------------------------------------------------------------------------------
# P4: translation; P10: linear; P6: adaptive metric
# --------------------------------------------------------------------------------------------


def translation_sgd_step(
    charge: ArrayLike, learning_rate: ArrayLike, weight_decay: ArrayLike = 0.0
) -> jax.Array:
    """One exact step of the translation charge under SGD + weight decay.

    [derived from NM] :ref:`P4 <p4>`::

        s_{k+1} = (1 - eta lambda) s_k,      s = <1_A, w>

    (the gradient sums to 0 over a softmax's class axis). It also holds for heavy ball with
    DECOUPLED weight decay, whose momentum buffer has ``<1, m> = 0``. With ``lambda = 0`` the
    charge is exactly conserved.

    Args:
        charge: ``s_k`` per group.
        learning_rate: ``eta``.
        weight_decay: ``lambda``.

    Returns:
        ``s_{k+1}``.

    Example:
        >>> round(float(translation_sgd_step(2.0, 0.1, 0.5)), 6)
        1.9

    References:
        Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep Learning
        Dynamics", https://arxiv.org/abs/2012.04728
    """
    _check_hyper(learning_rate, weight_decay=weight_decay)
    return (1 - learning_rate * weight_decay) * jnp.asarray(charge)


def translation_heavy_ball_step(
    charge: ArrayLike,
    prev_charge: ArrayLike,
    learning_rate: ArrayLike,
    momentum: ArrayLike,
    weight_decay: ArrayLike = 0.0,
) -> jax.Array:
    """One exact step of the translation charge under heavy ball + coupled weight decay.

    [derived from NM] :ref:`P4 <p4>`::

        s_{k+1} = (1 + beta - eta lambda) s_k - beta s_{k-1},    s_1 = (1 - eta lambda) s_0

    so at the first step pass ``prev_charge = charge`` (``v_0 = 0``).

    Args:
        charge: ``s_k``.
        prev_charge: ``s_{k-1}``.
        learning_rate: ``eta``.
        momentum: ``beta``.
        weight_decay: ``lambda`` (coupled).

    Returns:
        ``s_{k+1}``.

    Example:
        >>> round(float(translation_heavy_ball_step(2.0, 2.0, 0.1, 0.9, 0.5)), 6)
        1.9

    References:
        Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep Learning
        Dynamics", https://arxiv.org/abs/2012.04728
    """
    _check_hyper(learning_rate, momentum, weight_decay)
    return (1 + momentum - learning_rate * weight_decay) * jnp.asarray(
        charge
    ) - momentum * jnp.asarray(prev_charge)


def linear_sgd_step(
    charge: ArrayLike,
    grad_left: ArrayLike,
    grad_right: ArrayLike,
    learning_rate: ArrayLike,
    weight_decay: ArrayLike = 0.0,
) -> jax.Array:
    """One exact step of the GL(k) charge ``C = A^T A - B B^T`` under SGD + weight decay.

    [derived] :ref:`P10 <p10>`, for two stacked linear maps ``x A B``::

        C_{k+1} = (1 - eta lambda)^2 C_k + eta^2 (G_A^T G_A - G_B G_B^T)

    (the cross terms cancel because ``A^T G_A = G_B B^T``). Batched over leading axes, e.g. one
    ``k x k`` charge per attention head.

    Args:
        charge: ``C_k``, shape ``(..., k, k)``.
        grad_left: ``G_A``, shape ``(..., d, k)`` (gradient of ``A`` without weight decay).
        grad_right: ``G_B``, shape ``(..., k, o)``.
        learning_rate: ``eta``.
        weight_decay: ``lambda`` (the same on ``A`` and ``B``).

    Returns:
        ``C_{k+1}``, shape ``(..., k, k)``.

    Example:
        >>> c = linear_sgd_step(jnp.zeros((2, 2)), jnp.eye(2), 2 * jnp.eye(2), 0.1)
        >>> [[round(v, 6) for v in row] for row in c.tolist()]
        [[-0.03, 0.0], [0.0, -0.03]]

    References:
        Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep Learning
        Dynamics", https://arxiv.org/abs/2012.04728
    """
    _check_hyper(learning_rate, weight_decay=weight_decay)
    ga = jnp.asarray(grad_left)
    gb = jnp.asarray(grad_right)
    gram = jnp.swapaxes(ga, -1, -2) @ ga - gb @ jnp.swapaxes(gb, -1, -2)
    return (1 - learning_rate * weight_decay) ** 2 * jnp.asarray(charge) + learning_rate**2 * gram


def metric_charge(
    params: ArrayLike, preconditioner: ArrayLike, *, axis: int | Sequence[int] | None = None
) -> jax.Array:
    """The scale charge measured in a diagonal metric: ``w^T P w`` per group.

    [derived] :ref:`P6 <p6>`: the kinetic energy of a preconditioned rule ``w' = w - eta P^-1 g``
    is ``m/2 w'^T P w'``; its scale charge is ``w^T P w`` (see :func:`metric_charge_step`).

    Args:
        params: ``w``.
        preconditioner: the diagonal of ``P`` (same shape as ``w``, or broadcastable).
        axis: axes that one group spans (``None``: the whole array).

    Returns:
        ``sum(P w^2)`` over ``axis``.

    Example:
        >>> float(metric_charge(jnp.array([1.0, 2.0]), jnp.array([3.0, 0.5])))
        5.0

    References:
        Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
        Networks", https://arxiv.org/abs/2105.02716
    """
    w = jnp.asarray(params)
    return jnp.sum(jnp.asarray(preconditioner) * jnp.square(w), axis=_reduce_axes(w.ndim, axis))


def metric_charge_step(
    charge: ArrayLike,
    grad: ArrayLike,
    preconditioner: ArrayLike,
    learning_rate: ArrayLike,
    *,
    axis: int | Sequence[int] | None = None,
) -> jax.Array:
    """One exact step of the metric-weighted scale charge under a diagonal preconditioner.

    [derived] :ref:`P6 <p6>`. One step ``w' = w - eta P^-1 g`` with a diagonal SPD ``P`` (RMSProp:
    ``P = diag(sqrt(nu) + eps)`` with ``nu`` after its update) on a scale group gives::

        w'^T P w' = w^T P w + eta^2 g^T P^-1 g

    (``P`` is the one used by the step; it changes between steps). The Euclidean ``|w|^2``
    changes at FIRST order (``2 <w, w' - w> != 0``): that cross term is NLD's metric KSB. For a
    translation group the same step keeps ``<P 1, w>``: ``<P 1, w' - w> = -eta <1, g> = 0``.

    Args:
        charge: ``w^T P w`` per group (see :func:`metric_charge`).
        grad: ``g`` (same shape as the parameters).
        preconditioner: diagonal of ``P`` (positive), same shape as ``grad`` or broadcastable.
        learning_rate: ``eta``.
        axis: axes that one group spans (``None``: the whole array).

    Returns:
        ``w'^T P w'`` per group.

    Example:
        >>> g = jnp.array([1.0, -1.0])
        >>> round(float(metric_charge_step(5.0, g, jnp.array([2.0, 0.5]), 0.1)), 6)
        5.025

    References:
        Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
        Networks", https://arxiv.org/abs/2105.02716
    """
    _check_hyper(learning_rate)
    g = jnp.asarray(grad)
    axes = _reduce_axes(g.ndim, axis)
    quad = jnp.sum(safe_div(jnp.square(g), jnp.asarray(preconditioner)), axis=axes)
    return jnp.asarray(charge) + learning_rate**2 * quad


def adam_metric_charge_step(
    charge: ArrayLike,
    overlap: ArrayLike,
    quadratic: ArrayLike,
    learning_rate: ArrayLike,
    momentum: ArrayLike,
    weight_decay: ArrayLike,
    count: ArrayLike,
) -> jax.Array:
    """One exact step of the metric-weighted scale charge under Adam(W) (P6 with momentum).

    [derived] :ref:`P6 <p6>` extended to Adam's first moment. One AdamW step on a scale group,
    with ``P`` the diagonal metric of the step (``sqrt(nu_hat + eps_root) + eps``), bias
    correction ``c = eta / (1 - beta1^t)``, ``a = eta lambda`` (decoupled weight decay) and
    ``w' = (1 - a) w - c P^-1 m_{k+1}``, expands exactly to::

        w'^T P w' = (1 - a)^2 w^T P w - 2 (1 - a) c <w_k, m_{k+1}> + c^2 m_{k+1}^T P^-1 m_{k+1}

    and ``<w_k, m_{k+1}> = beta1 <w_k, m_k>`` because ``m_{k+1} = beta1 m_k + (1 - beta1) g_k``
    and ``<w, g> = 0`` on a scale group. With ``beta1 = 0`` it is RMSProp's
    :func:`metric_charge_step` (plus decoupled weight decay). For a rescale group the same
    holds with in-minus-out differences. The formula is homogeneous: with the
    ``1/2 w^T P w`` convention of :func:`ksbopt.charges` pass ``<w_k, m_k>`` and
    ``1/2 m^T P^-1 m`` instead.

    Args:
        charge: ``w_k^T P w_k`` per group (``P`` the metric of this step).
        overlap: ``2 <w_k, m_k>`` per group, with the first moment BEFORE this step's update.
        quadratic: ``m_{k+1}^T P^-1 m_{k+1}`` per group, with the first moment AFTER it.
        learning_rate: ``eta``.
        momentum: Adam's ``beta1``.
        weight_decay: ``lambda`` of decoupled weight decay (0 for plain Adam).
        count: ``t``, the step count after the update (1 at the first step), for the bias
            correction ``1 - beta1^t``.

    Returns:
        ``w_{k+1}^T P w_{k+1}`` per group.

    Example:
        >>> c = adam_metric_charge_step(5.0, 1.0, 2.0, 0.1, 0.9, 0.0, 1)  # c = 0.1 / 0.1 = 1
        >>> round(float(c), 4)  # 5 - 0.9 * 1 + 1 * 2 (float32)
        6.1

    References:
        Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
        Networks", https://arxiv.org/abs/2105.02716; Kingma & Ba, "Adam: A Method for
        Stochastic Optimization", https://arxiv.org/abs/1412.6980
    """
    _check_hyper(learning_rate, momentum, weight_decay)
    charge = jnp.asarray(charge)
    dtype = jnp.result_type(charge, float)
    t = jnp.asarray(count, dtype)
    b1 = jnp.asarray(momentum, dtype)
    c = safe_div(jnp.asarray(learning_rate, dtype), 1 - b1**t)
    keep = 1 - learning_rate * weight_decay
    return keep**2 * charge - keep * c * b1 * jnp.asarray(overlap) + c**2 * jnp.asarray(quadratic)


# --------------------------------------------------------------------------------------------
# P7: equilibrium
# --------------------------------------------------------------------------------------------


def equilibrium_update_ratio(
    learning_rate: ArrayLike, weight_decay: ArrayLike, momentum: ArrayLike = 0.0
) -> jax.Array:
    """Stationary ratio of the squared step to the squared norm (heavy ball + coupled wd).

    [derived] :ref:`P7a <p7a>`, for a scale group in the stationary regime, any noise::

        E|w_{k+1} - w_k|^2 / E|w_k|^2 = 2 eta lambda / (1 + beta)

    It follows from the three-term recursion (:func:`heavy_ball_second_order_step`) with
    ``E x_{k+1} = E x_k``.

    Args:
        learning_rate: ``eta``.
        weight_decay: ``lambda`` (coupled).
        momentum: ``beta``.

    Returns:
        The ratio.

    Example:
        >>> round(float(equilibrium_update_ratio(0.1, 5e-4, 0.9)), 9)
        5.2632e-05

    References:
        Wan et al., "Spherical Motion Dynamics: Learning Dynamics of Neural Network with
        Normalization, Weight Decay, and SGD", https://arxiv.org/abs/2006.08419

        Kosson et al., "Rotational Equilibrium: How Weight Decay Balances Learning Across
        Neural Networks", https://arxiv.org/abs/2305.17212
    """
    _check_hyper(learning_rate, momentum, weight_decay)
    return jnp.asarray(2 * learning_rate * weight_decay / (1 + momentum))


def equilibrium_angular_update(
    learning_rate: ArrayLike, weight_decay: ArrayLike, momentum: ArrayLike = 0.0
) -> jax.Array:
    """Equilibrium angular update per step of a scale group (heavy ball + coupled wd).

    [derived] :ref:`P7a <p7a>`: ``A* = sqrt(2 eta lambda / (1 + beta))`` radians per step, the
    square root of :func:`equilibrium_update_ratio` (small-angle approximation of the rotation). It
    matches the spherical-motion (Wan et al.) and rotational-equilibrium (Kosson et al.) results.

    Args:
        learning_rate: ``eta``.
        weight_decay: ``lambda`` (coupled).
        momentum: ``beta``.

    Returns:
        The angular update in radians.

    Example:
        >>> round(float(equilibrium_angular_update(0.1, 5e-4, 0.9)), 6)
        0.007255

    References:
        Wan et al., "Spherical Motion Dynamics: Learning Dynamics of Neural Network with
        Normalization, Weight Decay, and SGD", https://arxiv.org/abs/2006.08419

        Kosson et al., "Rotational Equilibrium: How Weight Decay Balances Learning Across
        Neural Networks", https://arxiv.org/abs/2305.17212
    """
    return jnp.sqrt(equilibrium_update_ratio(learning_rate, weight_decay, momentum))


def winding_fixed_point(
    strength: ArrayLike,
    learning_rate: ArrayLike,
    weight_decay: ArrayLike,
    momentum: ArrayLike = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Exact fixed point of heavy ball + coupled wd on the winding loss ``c atan2(w2, w1)``.

    [derived] :ref:`P7b <p7b>`. The loss is scale invariant and its gradient
    ``c (-w2, w1) / |w|^2`` is tangent, so the iterate settles on a uniform rotation::

        Delta = arccos(1 - eta lambda / (1 + beta))       (rotation angle per step)
        |w|^2 = eta |c| / ((1 - beta) sin Delta)

    With ``lambda = 0`` there is no fixed point (the norm grows forever): ``|w|^2 = inf``.

    Args:
        strength: ``c`` (its sign only sets the sense of rotation).
        learning_rate: ``eta``.
        weight_decay: ``lambda`` (coupled), with ``eta lambda <= 2 (1 + beta)``.
        momentum: ``beta``.

    Returns:
        ``(Delta, |w|^2)``.

    Example:
        >>> angle, radius_sq = winding_fixed_point(1.0, 0.1, 0.5, 0.5)
        >>> round(float(angle), 6), round(float(radius_sq), 6)
        (0.258922, 0.781133)

    References:
        Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
        Networks", https://arxiv.org/abs/2105.02716
    """
    _check_hyper(learning_rate, momentum, weight_decay)
    lr, wd, beta = (checks.concrete_value(x) for x in (learning_rate, weight_decay, momentum))
    if None not in (lr, wd, beta) and lr * wd > 2 * (1 + beta):
        raise ValueError(
            f"{learning_rate=} * {weight_decay=} exceeds 2 (1 + momentum) = {2 * (1 + momentum)}: "
            "the iteration is unstable and has no rotating fixed point; use a smaller step."
        )
    cos = 1 - learning_rate * weight_decay / (1 + jnp.asarray(momentum))
    angle = jnp.arccos(jnp.clip(cos, -1, 1))
    sin = jnp.sin(angle)
    radius_sq = safe_div(
        learning_rate * jnp.abs(jnp.asarray(strength)), (1 - momentum) * sin, fill=jnp.inf
    )
    return angle, radius_sq


# --------------------------------------------------------------------------------------------
# NLD Eq. 16-18 and the implicit RMSProp
# --------------------------------------------------------------------------------------------


def nld_coefficient(
    learning_rate: ArrayLike, momentum: ArrayLike = 0.0, *, coefficient: str
) -> jax.Array:
    """Source coefficient ``c_beta`` of NLD Eq. 17, in one of two versions.

    * ``"printed"`` [paper: NLD] Eq. 17 as printed: ``c_beta = 2 eta (1 + beta) / (1 - beta)^3``.
      Right for coherent gradients (e.g. full batch, a slowly turning ``g_hat``).
    * ``"noise"`` [derived] :ref:`implicit-rmsprop`: ``c_beta = 2 eta / (1 - beta)^2``. Right for
      noise-dominated minibatch SGD (gradient directions uncorrelated from step to step); it is
      consistent with P7a. The printed factor is ``(1 + beta) / (1 - beta)`` times larger
      (19x in ``r^4``, about 4.4x in ``|q|^2`` at ``beta = 0.9``).

    Both agree at ``beta = 0`` (``2 eta``). There is no default: say which one you use.

    Args:
        learning_rate: ``eta``.
        momentum: ``beta``.
        coefficient: ``"printed"`` or ``"noise"`` (keyword, required).

    Returns:
        ``c_beta``.

    Example:
        >>> round(float(nld_coefficient(0.1, 0.9, coefficient="printed")), 3)
        380.0
        >>> round(float(nld_coefficient(0.1, 0.9, coefficient="noise")), 3)
        20.0

    References:
        Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
        Networks", https://arxiv.org/abs/2105.02716
    """
    _check_coefficient(coefficient)
    _check_hyper(learning_rate, momentum)
    beta = jnp.asarray(momentum)
    if coefficient == "printed":
        return 2 * learning_rate * (1 + beta) / (1 - beta) ** 3
    return 2 * learning_rate / (1 - beta) ** 2


def nld_steady_state_radius4(
    g_hat_sq: ArrayLike,
    learning_rate: ArrayLike,
    weight_decay: ArrayLike,
    momentum: ArrayLike = 0.0,
    *,
    coefficient: str,
) -> jax.Array:
    """Steady state of NLD Eq. 16-17 for a constant ``|g_hat|^2``.

    In general ``r^4 = c_beta (1 - beta) |g_hat|^2 / (4 lambda)`` (see :func:`nld_coefficient`):

    * ``coefficient="printed"`` [paper: NLD] Eq. 16 steady state:
      ``r^4 = eta (1 + beta) |g_hat|^2 / (2 lambda (1 - beta)^2)``.
    * ``coefficient="noise"`` [derived] :ref:`implicit-rmsprop`:
      ``r^4 = eta |g_hat|^2 / (2 lambda (1 - beta))``.

    ``r = |q|`` is the norm of a scale group and ``g_hat`` the gradient at its unit direction.
    With ``lambda = 0`` there is no steady state: returns inf.

    Args:
        g_hat_sq: ``|g_hat|^2`` per group.
        learning_rate: ``eta``.
        weight_decay: ``lambda`` (NLD's ``k``).
        momentum: ``beta``.
        coefficient: ``"printed"`` or ``"noise"`` (see :func:`nld_coefficient`).

    Returns:
        ``r^4`` (= ``|q|^4``) per group.

    Example:
        >>> round(float(nld_steady_state_radius4(1.0, 0.1, 0.01, 0.0, coefficient="noise")), 6)
        5.0

    References:
        Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
        Networks", https://arxiv.org/abs/2105.02716
    """
    _check_hyper(learning_rate, momentum, weight_decay)
    c = nld_coefficient(learning_rate, momentum, coefficient=coefficient)
    num = c * (1 - jnp.asarray(momentum)) * jnp.asarray(g_hat_sq)
    return safe_div(num, 4 * jnp.asarray(weight_decay), fill=jnp.inf)


def nld_radius4(
    initial_radius4: ArrayLike,
    g_hat_sq: ArrayLike,
    learning_rate: ArrayLike,
    weight_decay: ArrayLike,
    momentum: ArrayLike = 0.0,
    *,
    coefficient: str,
) -> jax.Array:
    """NLD Eq. 17: ``r^4(t)`` of a normalised group from a sequence of measured ``|g_hat|^2``.

    [paper: NLD] Eq. 17 (coefficient ``c_beta`` per :func:`nld_coefficient`)::

        r^4(t) = exp(-4 k t / (1 - beta)) r^4(0)
                 + c_beta * integral_0^t exp(-4 k (t - tau) / (1 - beta)) |g_hat(tau)|^2 dtau

    with ``k = lambda`` (coupled weight decay) and ``t = eta * step``. The integral is
    discretised with ``|g_hat|^2`` constant over each step and integrated exactly, i.e. per step::

        r^4_{k+1} = a r^4_k + c_beta eta (1 - a) / z |g_hat_k|^2,   z = 4 eta lambda / (1 - beta),
        a = exp(-z).

    A continuous approximation: its error against the exact dynamics is O(eta) (compare
    :func:`nld_exact_radius4_step`, exact at ``beta = 0``).

    Args:
        initial_radius4: ``r^4(0) = |q_0|^4`` per group.
        g_hat_sq: ``|g_hat_k|^2`` for steps ``k = 0 .. n-1``, time on axis 0: shape ``(n, ...)``.
        learning_rate: ``eta``.
        weight_decay: ``lambda``.
        momentum: ``beta``.
        coefficient: ``"printed"`` or ``"noise"`` (keyword, required).

    Returns:
        ``r^4`` after steps ``1 .. n``, shape ``(n, ...)`` (entry ``k`` used ``g_hat_sq[:k+1]``).

    Example:
        >>> r4 = nld_radius4(1.0, jnp.ones(3), 0.1, 0.0, coefficient="printed")
        >>> [round(v, 6) for v in r4.tolist()]
        [1.02, 1.04, 1.06]

    References:
        Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
        Networks", https://arxiv.org/abs/2105.02716
    """
    _check_hyper(learning_rate, momentum, weight_decay)
    c = nld_coefficient(learning_rate, momentum, coefficient=coefficient)
    g = jnp.asarray(g_hat_sq)
    if g.ndim == 0:
        raise ValueError(
            f"g_hat_sq must have a time axis 0 (shape (n, ...)), got shape {g.shape}; pass the "
            "sequence of measured |g_hat|^2, e.g. jnp.stack(per_step_values)."
        )
    z = 4 * learning_rate * weight_decay / (1 - jnp.asarray(momentum))
    decay = jnp.exp(-z)
    weight = c * learning_rate * _one_minus_exp_over(z)
    init = jnp.broadcast_to(jnp.asarray(initial_radius4, dtype=g.dtype), g.shape[1:])
    init = init.astype(jnp.result_type(init, decay, weight))

    def body(r4, gk):
        r4 = (decay * r4 + weight * gk).astype(r4.dtype)
        return r4, r4

    _, out = jax.lax.scan(body, init, g)
    return out


def nld_exact_radius4_step(
    radius4: ArrayLike, g_hat_sq: ArrayLike, learning_rate: ArrayLike, weight_decay: ArrayLike
) -> jax.Array:
    """Exact per-step form behind NLD Eq. 17 at ``beta = 0`` (SGD + weight decay).

    [derived] :ref:`implicit-rmsprop` (square of P1 with ``|g|^2 = |g_hat|^2 / x``)::

        x_{k+1}^2 = (1 - eta lambda)^4 x_k^2 + 2 (1 - eta lambda)^2 eta^2 |g_hat_k|^2
                    + eta^4 |g_hat_k|^4 / x_k^2,          x = |w|^2 = r^2

    Its first two terms are the one-step discretisation of Eq. 17; the last is the finite-step
    correction, small when the angular step ``eta |g_hat| / x`` is small. ``x_k = 0`` is treated
    as giving no correction (no NaN).

    Args:
        radius4: ``x_k^2 = r_k^4``.
        g_hat_sq: ``|g_hat_k|^2``.
        learning_rate: ``eta``.
        weight_decay: ``lambda``.

    Returns:
        ``x_{k+1}^2``.

    Example:
        >>> round(float(nld_exact_radius4_step(1.0, 1.0, 0.1, 0.0)), 6)
        1.0201

    References:
        Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
        Networks", https://arxiv.org/abs/2105.02716
    """
    _check_hyper(learning_rate, weight_decay=weight_decay)
    y = jnp.asarray(radius4)
    g = jnp.asarray(g_hat_sq)
    d2 = (1 - learning_rate * weight_decay) ** 2
    return d2**2 * y + 2 * d2 * learning_rate**2 * g + learning_rate**4 * safe_div(jnp.square(g), y)


def rmsprop_analogy(
    learning_rate: ArrayLike, weight_decay: ArrayLike, momentum: ArrayLike = 0.0
) -> tuple[jax.Array, jax.Array]:
    """The RMSProp that SGD + weight decay on a normalised group implicitly runs.

    [paper: NLD] Eq. 18 analogy, with the [derived] rate of :ref:`implicit-rmsprop`.
    ``r^2 = |q|^2`` plays ``sqrt(G)``, ``|g_hat|^2`` plays ``|g|^2``, weight decay plays the
    discount::

        rho_eff = 1 - 4 eta lambda / (1 - beta)         (per step)
        eta_RMS = sqrt(2 eta lambda / (1 + beta))       (matched base rate)

    with ONE scalar accumulator per normalisation group. ``eta_RMS`` matches the RMS angular
    update of that RMSProp to the P7a equilibrium (:func:`equilibrium_angular_update`). Note
    ``rho_eff`` is negative when ``4 eta lambda > 1 - beta`` (no analogy then).

    Args:
        learning_rate: ``eta``.
        weight_decay: ``lambda`` (NLD's ``k``).
        momentum: ``beta``.

    Returns:
        ``(rho_eff, eta_RMS)``.

    Example:
        >>> rho, lr = rmsprop_analogy(0.1, 5e-4, 0.9)
        >>> round(float(rho), 6), round(float(lr), 6)
        (0.998, 0.007255)

    References:
        Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
        Networks", https://arxiv.org/abs/2105.02716
    """
    _check_hyper(learning_rate, momentum, weight_decay)
    beta = jnp.asarray(momentum)
    rho = 1 - 4 * learning_rate * weight_decay / (1 - beta)
    eta_rms = jnp.sqrt(2 * learning_rate * weight_decay / (1 + beta))
    return rho, eta_rms


def rmsprop_sqrt_accumulator(
    grad_sq: ArrayLike, decay: ArrayLike, initial: ArrayLike = 0.0
) -> jax.Array:
    """NLD Eq. 18: ``sqrt(G(t))``, RMSProp's accumulator in continuous time.

    [paper: NLD] Eq. 18, with ``t = eta * step``::

        sqrt(G(t)) = sqrt( (1 - rho)/eta * integral_0^t exp(-(1 - rho)(t - tau)/eta) |g(tau)|^2 dtau
                           + exp(-(1 - rho) t / eta) G(0) )

    The learning rate cancels once ``t = eta * step``. Discretised with ``|g|^2`` constant over
    each step and integrated exactly: ``G_{k+1} = a G_k + (1 - a) |g_k|^2`` with
    ``a = exp(-(1 - rho))`` (RMSProp's own EMA has ``a = rho``; they agree to O((1 - rho)^2)
    per step). With ``rho = rho_eff`` of :func:`rmsprop_analogy` and ``G(0) = r^4(0) (1 - rho)
    / (c_beta eta)``, ``r^2(t) = sqrt(c_beta eta / (1 - rho)) sqrt(G(t))`` (NLD Eq. 17).

    Args:
        grad_sq: ``|g_k|^2`` for steps ``0 .. n-1``, shape ``(n, ...)``.
        decay: ``rho`` (RMSProp's discount), ``rho <= 1``.
        initial: ``G(0)``.

    Returns:
        ``sqrt(G)`` after steps ``1 .. n``, shape ``(n, ...)``.

    Example:
        >>> [round(v, 4) for v in rmsprop_sqrt_accumulator(jnp.full(2, 4.0), 0.0).tolist()]
        [1.5901, 1.8597]

    References:
        Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
        Networks", https://arxiv.org/abs/2105.02716
    """
    if (checks.concrete_value(decay) or 0.0) > 1:
        raise ValueError(f"{decay=} must be <= 1 (RMSProp's discount rho), e.g. decay=0.99.")
    g = jnp.asarray(grad_sq)
    if g.ndim == 0:
        raise ValueError(
            f"grad_sq must have a time axis 0 (shape (n, ...)), got shape {g.shape}; pass the "
            "sequence of |g|^2, e.g. jnp.stack(per_step_values)."
        )
    a = jnp.exp(-(1 - jnp.asarray(decay)))
    init = jnp.broadcast_to(jnp.asarray(initial, dtype=g.dtype), g.shape[1:])
    init = init.astype(jnp.result_type(init, a))

    def body(acc, gk):
        acc = (a * acc + (1 - a) * gk).astype(acc.dtype)
        return acc, acc

    _, out = jax.lax.scan(body, init, g)
    return jnp.sqrt(out)


# --------------------------------------------------------------------------------------------
# NM integral forms with momentum: damped oscillator kernels
# --------------------------------------------------------------------------------------------


def _nm_rates(learning_rate, momentum, stiffness):
    """``gamma = mu / (2 m)`` and ``omega^2 = kappa / m`` with ``m = eta (1 + beta) / 2``."""
    mass = learning_rate * (1 + jnp.asarray(momentum)) / 2
    gamma = (1 - jnp.asarray(momentum)) / (2 * mass)
    omega_sq = jnp.asarray(stiffness) / mass
    return gamma, omega_sq


def nm_oscillator_kernels(
    time: ArrayLike,
    learning_rate: ArrayLike,
    momentum: ArrayLike,
    stiffness: ArrayLike,
) -> tuple[jax.Array, jax.Array]:
    """Free and impulse responses of NM's damped oscillator ``m y'' + mu y' + kappa y = f``.

    [paper: NM] Sec. 5 (modified equation of heavy ball, ``m = eta (1 + beta) / 2``,
    ``mu = 1 - beta``). With ``gamma = mu / (2 m)``, ``omega^2 = kappa / m`` and
    ``Omega^2 = gamma^2 - omega^2``:

    * overdamped (``Omega^2 > 0``): ``K(t) = exp(-gamma t) sinh(Omega t) / Omega``,
      ``h(t) = exp(-gamma t) (cosh(Omega t) + gamma sinh(Omega t) / Omega)``;
    * critical (``Omega = 0``): ``K(t) = t exp(-gamma t)``, ``h(t) = exp(-gamma t) (1 + gamma t)``;
    * underdamped: ``sinh, cosh -> sin, cos`` of ``sqrt(omega^2 - gamma^2) t``.

    ``h`` solves the free equation from ``y(0) = 1, y'(0) = 0``; ``K`` from ``y(0) = 0,
    y'(0) = 1`` and is the Green's function: ``y(t) = h(t) y(0) + K(t) y'(0) + integral_0^t
    K(t - tau) f(tau) / m dtau``. The regime is chosen per element with ``jnp.where``.
    Stiffness: ``kappa = 2 lambda`` for the scale / rescale charge, ``kappa = lambda`` for
    translation.

    Args:
        time: ``t = eta * step`` (any shape, >= 0).
        learning_rate: ``eta`` (> 0).
        momentum: ``beta``.
        stiffness: ``kappa``.

    Returns:
        ``(h(t), K(t))``.

    Example:
        >>> h, k = nm_oscillator_kernels(jnp.array([0.0, 1.0]), 0.1, 0.9, 0.0)
        >>> [round(v, 6) for v in h.tolist()], [round(v, 4) for v in k.tolist()]
        ([1.0, 1.0], [0.0, 0.6184])

    References:
        Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep Learning
        Dynamics", https://arxiv.org/abs/2012.04728
    """
    _check_hyper(learning_rate, momentum, positive_lr=True)
    if (checks.concrete_value(stiffness) or 0.0) < 0:
        raise ValueError(
            f"{stiffness=} must be >= 0 (2 * weight_decay for scale, weight_decay for translation)."
        )
    t = jnp.asarray(time)
    gamma, omega_sq = _nm_rates(learning_rate, momentum, stiffness)
    disc = gamma**2 - omega_sq
    over = disc > 0
    under = disc < 0
    # overdamped, written with decaying exponentials only (no overflow for large t)
    om = jnp.sqrt(jnp.where(over, disc, 1))
    e_slow = jnp.exp((om - gamma) * t)
    k_over = e_slow * (-jnp.expm1(-2 * om * t)) / (2 * om)
    cosh_over = e_slow * (1 + jnp.exp(-2 * om * t)) / 2
    # underdamped
    ou = jnp.sqrt(jnp.where(under, -disc, 1))
    e_fast = jnp.exp(-gamma * t)
    k_under = e_fast * jnp.sin(ou * t) / ou
    cos_under = e_fast * jnp.cos(ou * t)
    # critical
    k_crit = t * e_fast
    kernel = jnp.where(over, k_over, jnp.where(under, k_under, k_crit))
    free = jnp.where(over, cosh_over, jnp.where(under, cos_under, e_fast)) + gamma * kernel
    return free, kernel


def nm_damped_scale_charge(
    initial_charge: ArrayLike,
    velocity_sq: ArrayLike,
    learning_rate: ArrayLike,
    momentum: ArrayLike,
    weight_decay: ArrayLike = 0.0,
    *,
    initial_rate: ArrayLike = 0.0,
) -> jax.Array:
    """NM integral form of the scale (or rescale) charge under heavy ball + coupled wd.

    [paper: NM] Sec. 5. The modified equation ``m q'' + mu q' = -g - lambda q`` with
    ``m = eta (1 + beta) / 2``, ``mu = 1 - beta``, ``t = eta * step`` and ``<g, q> = 0`` gives
    for ``x = |q|^2``::

        m x'' + mu x' + 2 lambda x = 2 m |q'|^2

    which is NLD's charge equation ``m dQ/dt + mu Q = m (d_s T - d_s V)`` for the charge
    ``Q = m <q', q> = m x' / 2``, with the kinetic source ``d_s T = m |q'|^2`` (KSB) and the
    weight-decay potential ``d_s V = lambda |q|^2``. Its solution::

        x(t) = h(t) x(0) + K(t) x'(0) + 2 integral_0^t K(t - tau) |q'(tau)|^2 dtau

    with the damped-oscillator kernels of :func:`nm_oscillator_kernels` (``kappa = 2 lambda``;
    overdamped or underdamped as the hyperparameters dictate) and ``|q'|^2 = |v|^2`` the
    squared momentum buffer (it includes the weight decay term). Rescale: in-minus-out
    differences. The free part is propagated exactly step by step; the source of step ``k``
    (``|v_{k+1}|^2``, the buffer that moved ``w_k`` to ``w_{k+1}``) acts at mid-step.

    An O(eta) approximation of the exact recursion :func:`heavy_ball_step` (use that one in
    diagnostics); its error is largest during the momentum transient after a start from rest
    (the first few damping times ``1 / gamma = 2 m / mu``).

    Args:
        initial_charge: ``x(0)`` per group.
        velocity_sq: ``|v_{k+1}|^2`` for steps ``k = 0 .. n-1``, shape ``(n, ...)``.
        learning_rate: ``eta`` (> 0).
        momentum: ``beta``.
        weight_decay: ``lambda`` (coupled).
        initial_rate: ``x'(0)`` (0 when starting from rest, ``v_0 = 0``).

    Returns:
        ``x`` after steps ``1 .. n``, shape ``(n, ...)``.

    Example:
        >>> x = nm_damped_scale_charge(1.0, jnp.ones(3), 0.1, 0.0, 0.0)
        >>> [round(v, 4) for v in x.tolist()]  # exact SGD: 1.01, 1.02, 1.03 (starts from rest)
        [1.0063, 1.0158, 1.0258]

    References:
        Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep Learning
        Dynamics", https://arxiv.org/abs/2012.04728
    """
    _check_hyper(learning_rate, momentum, weight_decay, positive_lr=True)
    s = jnp.asarray(velocity_sq)
    if s.ndim == 0:
        raise ValueError(
            f"velocity_sq must have a time axis 0 (shape (n, ...)), got shape {s.shape}; pass "
            "the sequence of measured |v_{k+1}|^2."
        )
    stiffness = 2 * jnp.asarray(weight_decay)
    gamma, omega_sq = _nm_rates(learning_rate, momentum, stiffness)
    h1, k1 = nm_oscillator_kernels(learning_rate, learning_rate, momentum, stiffness)
    hh, kh = nm_oscillator_kernels(learning_rate / 2, learning_rate, momentum, stiffness)
    dk1 = h1 - 2 * gamma * k1  # K'(eta)
    dkh = hh - 2 * gamma * kh  # K'(eta / 2)
    dtype = jnp.result_type(s, h1)
    x0 = jnp.broadcast_to(jnp.asarray(initial_charge, dtype=dtype), s.shape[1:])
    y0 = jnp.broadcast_to(jnp.asarray(initial_rate, dtype=dtype), s.shape[1:])

    def body(carry, sk):
        x, y = carry
        src = 2 * learning_rate * sk  # 2 * |q'|^2 * dtau with dtau = eta
        x_new = (h1 * x + k1 * y + kh * src).astype(dtype)
        y_new = (-omega_sq * k1 * x + dk1 * y + dkh * src).astype(dtype)
        return (x_new, y_new), x_new

    _, out = jax.lax.scan(body, (x0, y0), s)
    return out


def nm_damped_translation_charge(
    initial_charge: ArrayLike,
    step: ArrayLike,
    learning_rate: ArrayLike,
    momentum: ArrayLike,
    weight_decay: ArrayLike = 0.0,
    *,
    initial_rate: ArrayLike = 0.0,
) -> jax.Array:
    """NM closed form of the translation charge under heavy ball + coupled weight decay.

    [paper: NM] Sec. 5. With ``<1, g> = 0`` the charge ``s = <1_A, q>`` obeys the free damped
    oscillator ``m s'' + mu s' + lambda s = 0`` (``m = eta (1 + beta) / 2``, ``mu = 1 - beta``)::

        s(t) = h(t) s(0) + K(t) s'(0),    t = eta * step

    with :func:`nm_oscillator_kernels` at ``kappa = lambda``. An O(eta) approximation of the
    exact :func:`translation_heavy_ball_step`.

    Args:
        initial_charge: ``s(0)``.
        step: step count(s) (any shape, broadcast against ``initial_charge``).
        learning_rate: ``eta`` (> 0).
        momentum: ``beta``.
        weight_decay: ``lambda`` (coupled).
        initial_rate: ``s'(0)`` (0 when starting from rest).

    Returns:
        ``s`` at ``t = eta * step``.

    Example:
        >>> s = nm_damped_translation_charge(1.0, jnp.array([0, 100]), 0.1, 0.9, 0.1)
        >>> [round(v, 4) for v in s.tolist()]  # exact recursion: 0.9487**100 = 0.0052 envelope
        [1.0, -0.0024]

    References:
        Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep Learning
        Dynamics", https://arxiv.org/abs/2012.04728
    """
    _check_hyper(learning_rate, momentum, weight_decay, positive_lr=True)
    t = learning_rate * jnp.asarray(step)
    free, kernel = nm_oscillator_kernels(t, learning_rate, momentum, weight_decay)
    return free * jnp.asarray(initial_charge) + kernel * jnp.asarray(initial_rate)
