"""Several per-group sums of one leaf in one pass over memory.

An optimizer step is bound by memory traffic, not arithmetic. XLA:CPU emits one loop per
reduction, each reading its operands from memory, and fuses neither sibling reductions nor a
reduction with the elementwise passes around it: the sums ``sum(w * w)`` and ``sum(w * u)``
of one leaf cost a pass each. :func:`part_sums` reduces them together, in one variadic
``lax.reduce`` that computes the products on the fly. The monitor's diagnostics (five sums
of ``w``, ``u``, ``g`` per leaf) and the projection coefficients of Scale and Rescale groups
(``|w|^2`` and ``<w, u>``) use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ksbopt._src import groups as groups_lib

#: Leaves with fewer entries are reduced product by product (``AxisPart.reduce``): there the
#: saved pass costs less than the extra operations of the one-pass form.
FUSED_MIN_SIZE = 1 << 16


def _nests(dims: Sequence[int], block: int) -> bool:
    """Whether ``block`` consecutive rows of a row-major array with leading ``dims`` are a
    whole number of trailing sub-blocks: ``block = prod(dims[j:]) * c`` with ``c`` dividing
    ``dims[j - 1]``."""
    inner = 1
    for d in reversed(dims):
        if block % (inner * d):
            return (inner * d) % block == 0
        inner *= d
    return True


def split(dims: Sequence[int]) -> int:
    """How many row blocks the one-pass reduction sums at once, for leading axes ``dims``.

    A divisor of the row count in [6, 12] for which the row blocks follow the axes
    (:func:`_nests`; 9 for a 3 x 3 convolution kernel), else any divisor there, else 8 (the
    last ``rows % 8`` rows are then summed apart). XLA:CPU unrolls a reduction over so few
    elements into straight-line vector code; from about 15 on it emits a loop per output
    element, several times slower. Measured on XLA:CPU (jax 0.10): blocks that cut across
    the axes (12 blocks of 126 rows of a (3, 3, 168, units) kernel) compile to scalar index
    arithmetic, 3 to 6 times slower than 9 blocks of 168 rows.
    """
    rows = math.prod(dims)
    fits = [d for d in range(6, 13) if rows % d == 0] if rows else []
    nested = [d for d in fits if _nests(dims, rows // d)]
    return max(nested or fits or [8])


def part_sums(
    part: groups_lib.AxisPart, products: Sequence[jax.Array], *, min_size: int = FUSED_MIN_SIZE
) -> list[jax.Array]:
    """``part.reduce(x)`` for every x in ``products``, in one pass over memory where it pays.

    A leaf of at least ``min_size`` entries whose groups are its trailing axes (Flax's output
    unit; a whole leaf) is viewed as ``(s, rows / s, units)`` and all products are summed
    over the first axis by ONE variadic reduction (one pass, the products computed on the
    fly from the leaves they are made of), then over the remaining ``rows / s`` rows by small
    ordinary reductions. Same sums, another summation order (within rounding of
    ``part.reduce``). Other leaves, and leaves typed with Explicit mesh axes (whose small
    results ``part.reduce`` pins replicated), are reduced product by product.
    """
    ndim = len(part.shape)
    k = ndim - len(part.group_axes)
    rows = math.prod(part.shape[:k])
    s = split(part.shape[:k])
    if (
        len(products) < 2
        or part.group_axes != tuple(range(k, ndim))
        or rows < s
        or math.prod(part.shape) < min_size
        or any(groups_lib.explicit_sharding(x) is not None for x in products)
    ):
        return [part.reduce(x) for x in products]
    units = math.prod(part.shape[k:])
    block = rows // s
    mats = [jnp.reshape(x, (rows, units)) for x in products]
    xs = tuple(m[: s * block].reshape(s, block, units) for m in mats)
    zeros = tuple(jnp.zeros((), x.dtype) for x in xs)
    partial = jax.lax.reduce(
        xs, zeros, lambda a, b: tuple(x + y for x, y in zip(a, b, strict=True)), (0,)
    )
    sums = []
    for m, x in zip(mats, partial, strict=True):
        total = jnp.sum(x, axis=0)
        if rows > s * block:  # the rows left over by the split
            total = total + jnp.sum(m[s * block :], axis=0)
        sums.append(jnp.sum(total.reshape(part.size, part.block), axis=1))
    return sums


def group_sums(bound, products) -> list[jax.Array]:
    """Per-group sums of several products over the groups of an axis symmetry, one pass per
    leaf.

    ``bound`` is a bound Scale, Rescale or Translation (its ``parts`` and ``signs``);
    ``products(i)`` the list of leaf-shaped products of leaf ``i`` (computed on the fly
    inside the reduction, not stored). Returns one vector per product, of length
    ``bound.n_groups``: the unsigned sums over every part (a kernel column and its bias
    entry add into one group), as :meth:`~groups.AxisPart.reduce` would give product by
    product.
    """
    per_part = [part_sums(p, products(p.leaf)) for p in bound.parts]
    return [
        groups_lib.scatter_groups(bound.parts, [s[j] for s in per_part], bound.n_groups)
        for j in range(len(per_part[0]))
    ]


def finished(ok: jax.Array, small):
    """The per-group values ``small`` (a pytree), computed before the leaf-sized passes
    that use them.

    XLA fuses small per-group arithmetic (the sum of a group's partial sums over every leaf
    it spans, the divisions and square roots of a closed form, the guards of zero-norm
    groups) into the elementwise pass over a leaf that applies it, where it is redone for
    every entry. A conditional is not fused into its consumers, so its results are computed
    once. ``ok`` is the step's finiteness flag: the branch not taken (a skipped step, whose
    updates are zeroed anyway) returns zeros. (``lax.optimization_barrier`` does not reach
    XLA:CPU's fusion passes.)
    """
    return jax.lax.cond(ok, lambda x: x, lambda x: jax.tree.map(jnp.zeros_like, x), small)


def unless_trusted(ok: jax.Array, fast, fallback):
    """``fast`` (a pytree of small per-group values) where ``ok``, else ``fallback()``,
    which is evaluated only when ``ok`` is false.

    For a closed form computed from one-pass sums with a slower, more careful form for the
    rare inputs it cannot be trusted with (overflow, cancellation). Only the careful form is
    inside the conditional, which returns zeros when ``ok``; a select then picks, so the
    closed form stays outside the conditional, where XLA schedules it with the rest of the
    step. Under ``vmap`` the conditional becomes a select and both forms are computed.
    """
    zeros = jax.tree.map(jnp.zeros_like, fast)
    careful = jax.lax.cond(ok, lambda: zeros, fallback)
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), fast, careful)
