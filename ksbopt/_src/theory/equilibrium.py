"""P7: the equilibrium of a scale group under weight decay: update ratio, angular update,
winding fixed point (:ref:`equilibrium`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ksbopt._src import checks
from ksbopt._src.numerics import safe_div
from ksbopt._src.theory.arguments import check_hyper


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
    check_hyper(learning_rate, momentum, weight_decay)
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
    check_hyper(learning_rate, momentum, weight_decay)
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
