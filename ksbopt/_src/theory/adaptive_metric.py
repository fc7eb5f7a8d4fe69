"""P6: the metric-weighted charge of an adaptive optimizer (RMSProp, Adam) and its exact
step (:ref:`exact-identities`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ksbopt._src.numerics import safe_div
from ksbopt._src.theory.arguments import check_hyper, reduce_axes


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
    return jnp.sum(jnp.asarray(preconditioner) * jnp.square(w), axis=reduce_axes(w.ndim, axis))


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
    check_hyper(learning_rate)
    g = jnp.asarray(grad)
    axes = reduce_axes(g.ndim, axis)
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
    check_hyper(learning_rate, momentum, weight_decay)
    charge = jnp.asarray(charge)
    dtype = jnp.result_type(charge, float)
    t = jnp.asarray(count, dtype)
    b1 = jnp.asarray(momentum, dtype)
    c = safe_div(jnp.asarray(learning_rate, dtype), 1 - b1**t)
    keep = 1 - learning_rate * weight_decay
    return keep**2 * charge - keep * c * b1 * jnp.asarray(overlap) + c**2 * jnp.asarray(quadratic)
