"""Argument checks shared by every public factory: one function, and one message, per kind.

Every message names the owner (the public function that was called), the argument, its value
and the fix, in one wording per kind of error, so that the same mistake reads the same
wherever it is made (and ``docs/errors.md`` documents it once). Range checks apply to
concrete numbers only: schedules, arrays with axes and traced values are left to the code
that uses them.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import numpy as np
import optax


def is_number(value: Any) -> bool:
    """A real number: a Python or NumPy scalar, or a 0-d array (traced or not); not a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Real):
        return True
    return isinstance(value, (jax.Array, np.ndarray, np.generic)) and np.ndim(value) == 0


def concrete_value(value: Any) -> float | None:
    """``float(value)`` for a concrete number (see :func:`is_number`), else None (a schedule,
    an array with axes, a traced value)."""
    if not is_number(value) or isinstance(value, jax.core.Tracer):
        return None
    return float(value)


def check_number(owner: str, name: str, value: Any, *, example: Any) -> None:
    """``TypeError`` unless ``value`` is a number (:func:`is_number`)."""
    if not is_number(value):
        raise TypeError(
            f"{owner}: {name}={value!r} (type {type(value).__name__}) must be a number, "
            f"e.g. {name}={example}."
        )


def check_positive(owner: str, name: str, value: Any, *, example: Any) -> None:
    """``ValueError`` if a concrete ``value`` is not > 0 (NaN included)."""
    v = concrete_value(value)
    if v is not None and not v > 0:
        raise ValueError(f"{owner}: {name}={value!r} must be > 0, e.g. {name}={example}.")


def check_nonnegative(owner: str, name: str, value: Any, *, example: Any) -> None:
    """``ValueError`` if a concrete ``value`` is not >= 0 (NaN included)."""
    v = concrete_value(value)
    if v is not None and not v >= 0:
        raise ValueError(f"{owner}: {name}={value!r} must be >= 0, e.g. {name}={example}.")


def check_unit_interval(owner: str, name: str, value: Any, *, example: Any = 0.9) -> None:
    """``ValueError`` if a concrete ``value`` is not in [0, 1) (a momentum, a decay rate)."""
    v = concrete_value(value)
    if v is not None and not 0 <= v < 1:
        raise ValueError(f"{owner}: {name}={value!r} must be in [0, 1), e.g. {name}={example}.")


def check_positive_int(owner: str, name: str, value: Any, *, example: int) -> None:
    """``ValueError`` if a concrete ``value`` is not a whole number >= 1."""
    v = concrete_value(value)
    if v is not None and not (v >= 1 and v == int(v)):
        raise ValueError(
            f"{owner}: {name}={value!r} must be a positive integer, e.g. {name}={example}."
        )


def check_transformation(owner: str, name: str, value: Any, *, example: str) -> None:
    """``TypeError`` unless ``value`` is an ``optax.GradientTransformation`` (a factory such as
    ``optax.adam`` or ``lambda lr: ...`` is the usual mistake)."""
    if not isinstance(value, optax.GradientTransformation):
        raise TypeError(
            f"{owner}: {name}={value!r} (type {type(value).__name__}) is not an optax "
            f"transformation; build one first and pass it, e.g. {example}."
        )


def require_params(params: Any, owner: str) -> None:
    """``ValueError`` when a transform that needs the current parameters got none."""
    if params is None:
        raise ValueError(
            f"{owner} needs the current parameters: params=None was given. Call "
            "tx.update(updates, state, params) (optax.apply_updates after it), or with flax "
            "nnx.Optimizer(model, tx, wrt=nnx.Param), which passes them."
        )
