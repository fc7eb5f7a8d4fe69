"""Assertions of the test suite: what counts as close is decided here, once.

Every tolerance is an argument the caller must state (and justify next to the call).
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import numpy as np


def assert_close(actual: Any, expected: Any, *, rtol: float, atol: float = 0.0) -> None:
    """``chex.assert_trees_all_close`` with tolerances that every caller must state."""
    chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


def assert_equal(actual: Any, expected: Any) -> None:
    """Bitwise-equal trees (same structure, shapes and values)."""
    chex.assert_trees_all_equal(actual, expected)


def assert_finite(tree: Any) -> None:
    """No NaN and no infinity anywhere in ``tree``."""
    chex.assert_tree_all_finite(tree)


def assert_dtypes(tree: Any, like: Any) -> None:
    """Every leaf of ``tree`` has the dtype of the matching leaf of ``like``."""
    chex.assert_trees_all_equal_dtypes(tree, like)


def rel_err(actual: Any, expected: Any) -> float:
    """max |actual - expected| / max |expected| over a whole tree (inf-norm relative error).

    The denominator is the largest entry of ``expected``, not each entry: charges such as a
    translation group's sum can sit near zero for one group while the others are O(1), and
    the rounding error of every group is set by the size of the weights, not of its charge.
    """
    a = [np.asarray(x, np.float64) for x in jax.tree.leaves(actual)]
    e = [np.asarray(x, np.float64) for x in jax.tree.leaves(expected)]
    num = max(float(np.max(np.abs(x - y))) for x, y in zip(a, e))
    den = max(float(np.max(np.abs(y))) for y in e)
    return num / den if den > 0 else num


def assert_rel_close(actual: Any, expected: Any, tol: float, what: str = "") -> None:
    """``rel_err(actual, expected) <= tol`` with a readable failure message."""
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
