"""The numerics module: guarded division, finiteness of a tree, compute dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import support

from ksbopt._src.numerics import all_finite, compute_dtype, safe_div


def test_safe_div_is_the_division_where_it_exists(x64):
    num, den = jnp.array([1.0, -3.0, 2.0, 0.0]), jnp.array([4.0, 2.0, 0.0, 0.0])
    np.testing.assert_array_equal(safe_div(num, den), [0.25, -1.5, 0.0, 0.0])
    np.testing.assert_array_equal(safe_div(num, den, fill=jnp.inf), [0.25, -1.5, np.inf, np.inf])
    # Negative denominators divide (only an exact zero is guarded).
    assert float(safe_div(1.0, -2.0)) == -0.5


def test_safe_div_has_a_finite_gradient_at_zero():
    """The inner where: d/d(den) at den = 0 is 0, not NaN (the zero-norm group)."""
    g_num, g_den = jax.grad(lambda n, d: safe_div(n, d), argnums=(0, 1))(1.0, 0.0)
    assert (float(g_num), float(g_den)) == (0.0, 0.0)
    support.assert_finite(jax.grad(lambda d: jnp.sum(safe_div(jnp.ones(3), d)))(jnp.zeros(3)))


def test_all_finite_reads_every_floating_leaf():
    tree = {"a": jnp.ones((2, 3)), "b": [jnp.zeros(()), jnp.ones(4, jnp.bfloat16)]}
    assert bool(all_finite(tree))
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        assert not bool(all_finite({**tree, "a": tree["a"].at[1, 2].set(bad)}))
    # Integer leaves (counts) do not count; a tree without floating leaves is finite.
    assert bool(all_finite({"count": jnp.int32(2**31 - 1)}))
    assert bool(all_finite([]))
    # Under jit it is a traced boolean (used to skip a step with jnp.where).
    assert bool(jax.jit(all_finite)(tree))


@pytest.mark.parametrize(
    ("given", "want"),
    [
        (jnp.bfloat16, jnp.float32),
        (jnp.float16, jnp.float32),
        (jnp.float32, jnp.float32),
        (jnp.ones(2, jnp.bfloat16), jnp.float32),
        (jnp.ones(2), jnp.float32),
    ],
)
def test_compute_dtype_is_at_least_float32(given, want):
    assert compute_dtype(given) == want


def test_compute_dtype_keeps_float64(x64):
    assert compute_dtype(jnp.ones(2)) == jnp.float64
    assert compute_dtype(jnp.float64) == jnp.float64
