"""Shared helpers of the peer optimizers: hyperparameter checks and per-unit reductions.

Flax layout: a kernel of shape ``(..., in, out)`` has its output units on the LAST axis, so a
"unit" (a neuron, a channel, a filter) is the slice ``x[..., j]`` and every per-unit reduction
runs over all axes but the last. Leaves with fewer than two dimensions (biases, scales,
scalars) have no unit axis; each optimizer documents what it does with them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "check_bool",
    "check_range",
    "concrete_float",
    "is_kernel",
    "map_leaves",
    "one_minus_power",
    "unit_norm",
    "unit_sum",
]


def concrete_float(value: Any) -> float | None:
    """Returns ``float(value)`` for a concrete real scalar, else ``None``.

    ``None`` comes back for schedules (callables), tracers (``inject_hyperparams`` calls the
    factory inside ``jit``), arrays with more than one element and non-numbers: those cannot
    be checked at construction time and are left alone.
    """
    if value is None or callable(value):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):  # tracers raise a TypeError subclass
        return None


def check_range(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> None:
    """Raises ``ValueError`` when a concrete hyperparameter lies outside its interval.

    Args:
      owner: the public factory doing the check (named in the message).
      name: the argument's name.
      value: its value; non-concrete values (schedules, tracers) are not checked.
      low: lower bound or ``None``.
      high: upper bound or ``None``.
      low_open: whether ``low`` itself is excluded.
      high_open: whether ``high`` itself is excluded.
      hint: what to write instead, appended to the message.
    """
    v = concrete_float(value)
    if v is None:
        return
    bad = math.isnan(v)
    if low is not None:
        bad = bad or (v <= low if low_open else v < low)
    if high is not None:
        bad = bad or (v >= high if high_open else v > high)
    if bad:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        interval = f"{left}{lo}, {hi}{right}"
        raise ValueError(f"{owner}: {name}={value!r} is outside {interval}. {hint}".rstrip())


def check_bool(owner: str, name: str, value: Any) -> None:
    """Raises ``ValueError`` when a switch is not a Python (or NumPy) bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f"{owner}: {name}={value!r} is not True or False; pass a Python bool (with "
            f"optax.inject_hyperparams, list {name!r} in static_args)."
        )


def is_kernel(x: jax.Array) -> bool:
    """Whether a leaf has a unit axis (two or more dimensions)."""
    return jnp.ndim(x) >= 2


def unit_sum(x: jax.Array) -> jax.Array:
    """Sums over all axes but the last: one number per output unit, shape ``(units,)``."""
    return jnp.sum(x, axis=tuple(range(x.ndim - 1)))


def unit_norm(x: jax.Array) -> jax.Array:
    """Euclidean norm of each unit ``x[..., j]``, shape ``(units,)``."""
    return jnp.sqrt(unit_sum(jnp.square(x)))


def map_leaves(fn, tree: Any, *rest: Any, n_out: int) -> tuple[Any, ...]:
    """Maps ``fn`` over the leaves of ``tree`` and matching leaves of ``rest``.

    ``fn`` returns a tuple of ``n_out`` arrays per leaf; the result is a tuple of ``n_out``
    trees shaped like ``tree``. The other trees must have ``tree``'s structure (or a
    structure ``tree`` is a prefix of).
    """
    leaves, treedef = jax.tree.flatten(tree)
    others = [treedef.flatten_up_to(r) for r in rest]
    results = [fn(*args) for args in zip(leaves, *others, strict=True)]
    return tuple(treedef.unflatten([r[i] for r in results]) for i in range(n_out))


def one_minus_power(decay: Any, t: jax.Array, dtype: Any) -> jax.Array:
    """``1 - decay**t`` computed as ``-expm1(t * log1p(-(1 - decay)))`` in ``dtype``.

    For a Python-float ``decay`` near 1 the difference ``1 - decay`` is formed in double
    precision first, so the bias correction of a running average keeps full float32
    accuracy (``1 - 0.999**t`` in float32 is off by about 1e-5 relative). ``decay = 0``
    gives 1.
    """
    one_minus = jnp.asarray(1 - decay, dtype)
    return -jnp.expm1(jnp.asarray(t, dtype) * jnp.log1p(-one_minus))
