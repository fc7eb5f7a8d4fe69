"""What the formulas of :mod:`ksbopt.theory` share: argument checks, the ``axis`` argument and
one guarded series (``(1 - exp(-z)) / z``)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ksbopt._src import checks

OWNER = "ksbopt.theory"

#: Names accepted by the ``coefficient`` keyword of the NLD Eq. 16-17 functions.
NLD_COEFFICIENTS = ("printed", "noise")


def check_hyper(learning_rate, momentum=None, weight_decay=None, *, positive_lr=False) -> None:
    """The step size eta (>= 0, or > 0), the heavy-ball beta in [0, 1), lambda >= 0."""
    check_lr = checks.check_positive if positive_lr else checks.check_nonnegative
    check_lr(OWNER, "learning_rate", learning_rate, example=0.1)
    if momentum is not None:
        checks.check_unit_interval(OWNER, "momentum", momentum, example=0.9)
    if weight_decay is not None:
        checks.check_nonnegative(OWNER, "weight_decay", weight_decay, example=5e-4)


def check_coefficient(coefficient) -> str:
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


def one_minus_exp_over(z: jax.Array) -> jax.Array:
    """``(1 - exp(-z)) / z`` for ``z >= 0``, equal to 1 at ``z = 0`` (stable for small z)."""
    ok = z != 0
    zs = jnp.where(ok, z, 1)
    return jnp.where(ok, -jnp.expm1(-zs) / zs, 1)


def reduce_axes(ndim: int, axis: int | Sequence[int] | None) -> tuple[int, ...]:
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
