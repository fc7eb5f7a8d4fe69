"""Per-group sums of products of the monitored vectors, each reduced once per step.

One step of :func:`ksbopt.monitor` reads sums such as ``sum(w u)`` or ``sum(g g)`` per group
for many quantities. :class:`Sums` reduces each product once and shares it; on a large leaf
all products are reduced in one pass over memory (:func:`ksbopt._src.reductions.part_sums`),
since an optimizer step is bound by memory traffic, not arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ksbopt._src import groups as groups_lib
from ksbopt._src import reductions
from ksbopt._src.symmetries import orbit
from ksbopt._src.symmetries.declarations import BoundSymmetry

#: A flat list of leaves (``jax.tree.leaves`` of parameters, updates or a buffer).
Flat = list


def group_dtype(b: BoundSymmetry, flat: Flat):
    return jnp.result_type(*[flat[i] for i in b.leaves])


def on_leaves(flat_like: Flat, values: dict) -> Flat:
    """A flat list with ``values`` at their leaf indices (None elsewhere, never read)."""
    out = [None] * len(flat_like)
    for i, v in values.items():
        out[i] = v
    return out


def map_leaves(b: BoundSymmetry, fn, *flats) -> Flat:
    """``fn`` applied leaf-wise on the symmetry's leaves only."""
    return on_leaves(flats[0], {i: fn(*(f[i] for f in flats)) for i in b.leaves})


def group_inner(b: BoundSymmetry, x: Flat, y: Flat) -> jax.Array:
    """Unsigned per-group sum of x * y over the group's entries (the core's own grouping)."""
    if b.symmetry.kind == "linear":
        total = None
        for part in b.parts:
            s = jnp.sum(part.to_matrix(x[part.leaf] * y[part.leaf]), axis=(1, 2))
            total = s if total is None else total + s
        return total
    return groups_lib.scatter_groups(
        b.parts, [p.reduce(x[p.leaf] * y[p.leaf]) for p in b.parts], b.n_groups
    )


# Leaves with at least this many entries have all their per-group products reduced in one
# pass over memory; smaller ones use one reduction per product (the core's own, bit for bit).
FUSED_MIN_SIZE = reductions.FUSED_MIN_SIZE

#: Per-group products the expensive diagnostics read, per symmetry kind ("1": the entries
#: themselves, e.g. "w1" = sum of w). Linear symmetries use their own matrix reductions.
DIAGNOSE_PRODUCTS = {
    "scale": ("ww", "wu", "uu", "wg", "gg"),
    "rescale": ("ww", "wu", "uu", "wg", "gg"),
    "translation": ("w1", "u1", "g1", "ww", "uu", "wu", "gg"),
    "linear": (),
}


def part_sums(part: groups_lib.AxisPart, products: Sequence[jax.Array]) -> list[jax.Array]:
    """``part.reduce(x)`` for every x in ``products``, on a large leaf in one pass over
    memory (:func:`ksbopt._src.reductions.part_sums`): the products of one leaf (w w, w u,
    u u, w g, g g, ...) would otherwise cost one pass each."""
    return reductions.part_sums(part, products, min_size=FUSED_MIN_SIZE)


class Sums:
    """Per-group sums of products of the monitored vectors, each reduced once per step.

    ``vectors`` maps a name to a flat list of leaves: ``w`` (params), ``u`` (final update),
    ``g`` (incoming gradient), ``v`` (momentum buffer). ``requests`` maps a symmetry index to
    the product names it will read ("wu" = sum of w * u per group, "w1" = sum of w); all of
    one leaf are reduced together (:func:`part_sums`), a product asked later is reduced on
    its own. The accessors follow the core's definitions (:class:`BoundSymmetry`) for scale,
    rescale and translation; Linear symmetries go through the core directly.
    """

    def __init__(self, binding: orbit.Binding, vectors: dict, requests: dict):
        self.bound = binding.bound
        self.vectors = vectors
        self.table: dict = {}
        wanted: dict = {}
        for i, names in requests.items():
            if not names:
                continue
            for p in self.bound[i].parts:
                entry = wanted.setdefault(self._key(p), (p, {}))
                entry[1].update(dict.fromkeys(names))
        for key, (part, names) in wanted.items():
            names = list(names)
            sums = part_sums(part, [self._product(part.leaf, n) for n in names])
            self.table.update({(key, n): v for n, v in zip(names, sums, strict=True)})

    @staticmethod
    def _key(part: groups_lib.AxisPart):
        return part.leaf, part.shape, part.group_axes, part.block

    def _product(self, leaf: int, name: str) -> jax.Array:
        a, b = name
        x = self.vectors[a][leaf]
        if b == "1":
            return x
        return jnp.square(x) if a == b else x * self.vectors[b][leaf]

    def _sum(self, i: int, name: str, signed: bool) -> jax.Array:
        b = self.bound[i]
        vals = []
        for p, sign in zip(b.parts, b.signs, strict=True):
            key = (self._key(p), name)
            if key not in self.table:
                self.table[key] = p.reduce(self._product(p.leaf, name))
            vals.append(sign * self.table[key] if signed else self.table[key])
        return groups_lib.scatter_groups(b.parts, vals, b.n_groups)

    def _flat(self, name: str) -> Flat:
        return self.vectors[name]

    def charge(self, i: int, x: str) -> jax.Array:
        """Q(x) per group (:meth:`BoundSymmetry.charge`)."""
        b = self.bound[i]
        if b.symmetry.kind == "linear":
            return b.charge(self._flat(x))
        if b.symmetry.kind == "translation":
            return self._sum(i, x + "1", False)
        return 0.5 * self._sum(i, x + x, True)

    def quadratic(self, i: int, x: str) -> jax.Array:
        """The second-order part Q(x) of the decomposition (0 for translation)."""
        b = self.bound[i]
        if b.symmetry.kind == "translation":
            return b.quadratic(self._flat(x))
        return self.charge(i, x)

    def reduce(self, i: int, x: str, y: str) -> jax.Array:
        """<xi(x), y> per group (:meth:`BoundSymmetry.reduce`)."""
        b = self.bound[i]
        if b.symmetry.kind == "linear":
            return b.reduce(self._flat(x), self._flat(y))
        if b.symmetry.kind == "translation":
            return self._sum(i, y + "1", False)
        return self._sum(i, x + y, True)

    def norms(self, i: int, x: str) -> jax.Array:
        """|xi(x)|^2 per group (:meth:`BoundSymmetry.norms`)."""
        b = self.bound[i]
        if b.symmetry.kind in ("linear", "translation"):
            return b.norms(self._flat(x))
        return self._sum(i, x + x, False)

    def inner(self, i: int, x: str, y: str) -> jax.Array:
        """Unsigned per-group sum of x * y (Linear: over each head's entries)."""
        b = self.bound[i]
        if b.symmetry.kind == "linear":
            return group_inner(b, self._flat(x), self._flat(y))
        return self._sum(i, x + y, False)
