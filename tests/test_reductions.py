"""Tests of ksbopt._src.reductions: several per-group sums of a leaf in one pass.

- ``part_sums`` gives ``AxisPart.reduce`` of every product up to rounding, on leaves whose
  row count the split divides and on leaves with rows left over, with single-unit and
  multi-unit (``block``) groups, and reduces them in ONE variadic reduction;
- the split follows the leaf's axes where it can (the fast form on XLA:CPU);
- ``project`` takes that one-pass path on large leaves and stays exact (float64).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import support

import ksbopt
from ksbopt._src import reductions
from ksbopt._src.groups import AxisPart


def _variadic_reduces(fn, *args) -> int:
    jaxpr = jax.make_jaxpr(fn)(*args)
    return sum(1 for e in jaxpr.eqns if e.primitive.name == "reduce" and len(e.invars) > 2)


@pytest.mark.parametrize(
    "shape, block",
    [
        ((3, 3, 24, 16), 1),  # 216 rows: split 9 (blocks of 24 rows, along the axes)
        ((7, 13, 10), 1),  # 91 rows: split 7 (blocks of 13 rows)
        ((101, 12), 1),  # 101 rows, prime: split 8, the last 5 rows summed apart
        ((3, 3, 24, 16), 4),  # groups of 4 consecutive units
    ],
)
def test_part_sums_match_the_direct_sums(shape, block, x64):
    """Same sums as ``AxisPart.reduce``, another order: float64 sums of at most 10^3 terms
    agree to a few ulp of their size, 1e-13 relative to the largest sum."""
    rng = np.random.default_rng(0)
    w, u, g = (jnp.asarray(rng.normal(size=shape)) for _ in range(3))
    part = AxisPart(0, "w", shape, (len(shape) - 1,), block=block)
    products = [w * w, w * u, u * u, w * g, g * g]
    direct = [part.reduce(x) for x in products]
    fused = reductions.part_sums(part, products, min_size=0)
    support.assert_rel_close(fused, direct, 1e-13, f"{shape=}, {block=}")
    assert _variadic_reduces(lambda *p: reductions.part_sums(part, list(p), min_size=0), *products)


def test_small_leaves_and_leading_groups_take_the_direct_sums(x64):
    """Below ``min_size``, with a single product, or with groups on a leading axis: one
    ``AxisPart.reduce`` per product, bit for bit."""
    w = jnp.arange(24.0).reshape(6, 4)
    for part, min_size, products in (
        (AxisPart(0, "w", (6, 4), (1,)), 10**6, [w, w * w]),
        (AxisPart(0, "w", (6, 4), (1,)), 0, [w * w]),
        (AxisPart(0, "w", (6, 4), (0,)), 0, [w, w * w]),
    ):
        got = reductions.part_sums(part, products, min_size=min_size)
        support.assert_equal(got, [part.reduce(x) for x in products])


@pytest.mark.parametrize(
    "dims, want",
    [
        ((3, 3, 168), 9),  # not 12: blocks of 126 rows would cut across the 168 axis
        ((3, 3, 670), 9),
        ((670,), 10),  # one axis: every divisor follows it
        ((5, 5, 64), 10),  # no divisor in [6, 12] follows the axes: the largest one
        ((101,), 8),  # no divisor at all: 8 blocks and a remainder
    ],
)
def test_split_follows_the_axes(dims, want):
    assert reductions.split(dims) == want


def test_project_takes_one_pass_on_large_leaves_and_stays_exact(x64):
    """A kernel of >= 2^16 entries: both per-unit sums of ``project`` come from one variadic
    reduction, and the result is the exact projection u - w <w, u> / |w|^2 per unit (float64,
    sums of 3456 terms: 1e-12 relative), orthogonal to every unit's weights."""
    shape = (3, 3, 384, 20)  # 69120 entries, 3456 rows (split 9)
    assert math.prod(shape) >= reductions.FUSED_MIN_SIZE
    rng = np.random.default_rng(1)
    params = {"k": jnp.asarray(rng.normal(size=shape)), "b": jnp.asarray(rng.normal(size=20))}
    updates = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), params)
    tx = ksbopt.project(ksbopt.Scale(["k", "b"], axis=-1))
    state = tx.init(params)
    assert _variadic_reduces(lambda u: tx.update(u, state, params)[0], updates) == 1
    got, _ = jax.jit(tx.update)(updates, state, params)
    w, u = (np.concatenate([t["k"].reshape(-1, 20), t["b"][None]]) for t in (params, updates))
    want = u - w * (np.sum(w * u, axis=0) / np.sum(w * w, axis=0))
    got_m = np.concatenate([np.asarray(got["k"]).reshape(-1, 20), np.asarray(got["b"])[None]])
    support.assert_rel_close(got_m, want, 1e-12, "projection")
    assert np.max(np.abs(np.sum(w * got_m, axis=0))) <= 1e-12 * np.max(np.sum(w * w, axis=0))


@pytest.mark.parametrize("trusted", [True, False])
def test_unless_trusted_runs_the_careful_form_only_when_needed(trusted):
    """The closed form where it is trusted; otherwise the careful form, and only then (a
    host callback counts its evaluations)."""
    calls = []

    def careful():
        jax.debug.callback(lambda: calls.append(1))
        return {"a": jnp.full(3, 2.0), "b": jnp.ones(())}

    @jax.jit
    def pick(ok):
        fast = {"a": jnp.array([1.0, jnp.nan, 3.0]), "b": jnp.zeros(())}
        return reductions.unless_trusted(ok, fast, careful)

    out = jax.block_until_ready(pick(jnp.asarray(trusted)))
    if trusted:
        assert np.isnan(out["a"][1]) and float(out["b"]) == 0 and not calls
    else:
        np.testing.assert_array_equal(out["a"], [2.0, 2.0, 2.0])
        assert float(out["b"]) == 1 and calls == [1]
