"""P3: the exact charge recursions of heavy-ball momentum, coupled and decoupled weight decay
(:ref:`exact-identities`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ksbopt._src.theory.arguments import check_hyper

# [derived] P3. Both weight decays move the weights as w_{k+1} = decay w_k - eta v_{k+1}
# (coupled: decay = 1, lambda w inside the buffer; decoupled: decay = 1 - eta lambda), and the
# gradient is orthogonal to w on a scale group. So one overlap identity and one norm identity
# serve both; only the buffer's own lambda w term (coupled) differs.


def _overlap_before(overlap: ArrayLike, velocity_sq: ArrayLike, learning_rate, decay):
    """``<w_k, v_k>`` from ``P_{k-1} = <w_{k-1}, v_k>``: ``decay P_{k-1} - eta |v_k|^2``."""
    return decay * jnp.asarray(overlap) - learning_rate * jnp.asarray(velocity_sq)


def _charge_after(charge, new_overlap, new_velocity_sq, learning_rate, decay) -> jax.Array:
    """``x_{k+1} = |decay w_k - eta v_{k+1}|^2 = decay^2 x_k - 2 eta decay P_k + eta^2
    |v_{k+1}|^2``."""
    return (
        decay**2 * jnp.asarray(charge)
        - 2 * learning_rate * decay * new_overlap
        + learning_rate**2 * jnp.asarray(new_velocity_sq)
    )


def momentum_three_term(
    charge: ArrayLike, prev_charge: ArrayLike, momentum, rate, source: ArrayLike = 0.0
) -> jax.Array:
    """Heavy ball's three-term recursion of a charge, ``(1 + beta - rate) c_k - beta c_{k-1}
    + source``: the momentum carries ``beta (c_k - c_{k-1})``, weight decay takes ``rate c_k``
    (``2 eta lambda`` for a squared norm, ``eta lambda`` for a linear charge)."""
    return (
        (1 + momentum - rate) * jnp.asarray(charge) - momentum * jnp.asarray(prev_charge) + source
    )


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
    check_hyper(learning_rate, momentum, weight_decay)
    back = _overlap_before(overlap, velocity_sq, learning_rate, 1)
    new_overlap = momentum * back + weight_decay * jnp.asarray(charge)
    return new_overlap, _charge_after(charge, new_overlap, new_velocity_sq, learning_rate, 1)


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
    check_hyper(learning_rate, momentum, weight_decay)
    source = learning_rate**2 * (jnp.asarray(new_velocity_sq) + momentum * jnp.asarray(velocity_sq))
    rate = 2 * learning_rate * weight_decay
    return momentum_three_term(charge, prev_charge, momentum, rate, source)


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
    check_hyper(learning_rate, momentum, weight_decay)
    decay = 1 - learning_rate * weight_decay
    new_overlap = momentum * _overlap_before(overlap, momentum_sq, learning_rate, decay)
    return new_overlap, _charge_after(charge, new_overlap, new_momentum_sq, learning_rate, decay)
