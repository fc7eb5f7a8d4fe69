"""Numerical helpers shared by every module: guarded division, finiteness, compute dtype.

One place decides each of these, so that "no NaN from a zero-norm group", "a non-finite step
is skipped" and "charges are computed in at least float32" mean the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


def safe_div(num: jax.Array, den: jax.Array, fill: Any = 0.0) -> jax.Array:
    """``num / den`` where ``den != 0``, else ``fill``: no NaN from a zero-norm group.

    The inner ``where`` keeps the gradient finite as well (``d/d den`` of ``num / 1`` where
    ``den == 0``), so the division is safe under ``jax.grad`` too.

    Example:
      >>> import jax.numpy as jnp
      >>> from ksbopt._src.numerics import safe_div
      >>> safe_div(jnp.array([1.0, 1.0]), jnp.array([2.0, 0.0])).tolist()
      [0.5, 0.0]
    """
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), fill)


def all_finite(tree: Any) -> jax.Array:
    """Whether every floating entry of ``tree`` is finite (a scalar bool array; True if the
    tree has no floating leaf). Integer leaves (counts) are ignored.

    Example:
      >>> import jax.numpy as jnp
      >>> from ksbopt._src.numerics import all_finite
      >>> bool(all_finite({"a": jnp.ones(2), "n": jnp.int32(3)}))
      True
      >>> bool(all_finite([jnp.array([1.0, jnp.nan])]))
      False
    """
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)
    # XLA unrolls this and-reduction of per-leaf flags into a chain of scalar ands and copies
    # the chain into every consumer: for a tree of many small arrays (per-group values) use
    # all_finite_values, which compiles to one reduction.
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite_values(values: Sequence[Any]) -> jax.Array:
    """Whether every entry of a list of small arrays (per-group sums, scalar checks) is finite:
    one elementwise test and one reduction of their concatenation (True for an empty list).

    The per-value sums of a step already hold every non-finite entry of the leaves they reduce,
    so this flags a non-finite step without another pass over the parameters. Testing each
    value (not their sum) is what keeps it one reduction once compiled: XLA unrolls a sum of
    sums into a chain of scalar adds and copies that chain into every consumer of the flag.

    Example:
      >>> import jax.numpy as jnp
      >>> from ksbopt._src.numerics import all_finite_values
      >>> bool(all_finite_values([jnp.ones(3), jnp.float32(2.0)]))
      True
      >>> bool(all_finite_values([jnp.ones(3), jnp.float32(jnp.inf)]))
      False
    """
    if not values:
        return jnp.asarray(True)
    return jnp.all(jnp.isfinite(jnp.concatenate([jnp.ravel(jnp.asarray(v)) for v in values])))


def compute_dtype(x: Any) -> Any:
    """The dtype charges, norms and projections are computed in: at least float32.

    ``x`` is an array or a dtype; bfloat16 and float16 give float32, float64 stays float64.

    Example:
      >>> import jax.numpy as jnp
      >>> from ksbopt._src.numerics import compute_dtype
      >>> compute_dtype(jnp.bfloat16) == jnp.float32, compute_dtype(jnp.ones(2)) == jnp.float32
      (True, True)
    """
    return jnp.promote_types(getattr(x, "dtype", x), jnp.float32)


def default_tol(dtype) -> float:
    """Default relative residual of the iterative orbit solves: 64 eps of ``dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> default_tol(jnp.float32) == 64 * float(jnp.finfo(jnp.float32).eps)
      True
    """
    return float(64 * jnp.finfo(dtype).eps)
