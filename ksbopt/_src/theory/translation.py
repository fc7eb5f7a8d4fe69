"""P4: the charge of a translation group under SGD and heavy ball (:ref:`exact-identities`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ksbopt._src.theory.arguments import check_hyper
from ksbopt._src.theory.heavy_ball import momentum_three_term


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
    check_hyper(learning_rate, weight_decay=weight_decay)
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
    check_hyper(learning_rate, momentum, weight_decay)
    return momentum_three_term(charge, prev_charge, momentum, learning_rate * weight_decay)
