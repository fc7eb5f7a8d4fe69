"""P10: the matrix charge of a linear (GL(k)) symmetry under SGD (:ref:`exact-identities`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ksbopt._src.theory.arguments import check_hyper


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
    check_hyper(learning_rate, weight_decay=weight_decay)
    ga = jnp.asarray(grad_left)
    gb = jnp.asarray(grad_right)
    gram = jnp.swapaxes(ga, -1, -2) @ ga - gb @ jnp.swapaxes(gb, -1, -2)
    return (1 - learning_rate * weight_decay) ** 2 * jnp.asarray(charge) + learning_rate**2 * gram
