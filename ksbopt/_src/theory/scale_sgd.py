"""P1, P2: the charge of a scale (or rescale) group under SGD with weight decay, the
effective learning rate and the step of the direction (:ref:`exact-identities`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ksbopt._src.numerics import safe_div
from ksbopt._src.theory.arguments import check_hyper, reduce_axes


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
    check_hyper(learning_rate, weight_decay=weight_decay)
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
    check_hyper(learning_rate, weight_decay=weight_decay)
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
    axes = reduce_axes(direction.ndim, axis)
    if 0 < eff.ndim == direction.ndim - len(axes):
        eff = jnp.expand_dims(eff, axes)
    u = direction - eff * direction_grad
    norm = jnp.sqrt(jnp.sum(jnp.square(u), axis=axes, keepdims=True))
    return safe_div(u, norm)
