"""Scale, Rescale and Translation bound to a tree: every entry belongs to exactly one group.

The generators of these kinds are diagonal per group (xi_g = w on the group's entries for the
multiplicative kinds, the all-ones vector for Translation), so charges, projections and orbit
moves are closed forms per group, computed from a few per-group sums.

Cost (every per-group reduction is a pass over the leaf): the leaf-sized arrays only ever
appear inside elementwise expressions that XLA fuses into the reductions and into the final
update; the generator's sign (Rescale's outgoing weights) and the per-group factors are
applied to the small per-group vectors, never to a leaf.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from ksbopt._src import groups as groups_lib
from ksbopt._src import reductions
from ksbopt._src.groups import AxisPart
from ksbopt._src.numerics import safe_div
from ksbopt._src.symmetries.bound import BoundSymmetry, Flat, Moved, without_overflow

if TYPE_CHECKING:
    from ksbopt._src.symmetries.declarations import Symmetry


class BoundAxis(BoundSymmetry):
    """Scale, Rescale and Translation: every entry belongs to exactly one group."""

    def __init__(self, symmetry: Symmetry, parts: tuple[AxisPart, ...], signs: tuple[int, ...]):
        self.symmetry = symmetry
        self.parts = parts
        self.signs = signs
        self._n = max(p.offset + p.size for p in parts)

    @property
    def leaves(self) -> tuple[int, ...]:
        return tuple(sorted({p.leaf for p in self.parts}))

    @property
    def charge_shape(self) -> tuple[int, ...]:
        return (self._n,)

    def _sum(self, per_part) -> jax.Array:
        return groups_lib.scatter_groups(self.parts, per_part, self._n)

    def _base(self, flat: Flat, part: AxisPart) -> jax.Array:
        """The generator's values on the part's leaf, up to the part's sign (xi = sign * base).

        The sign is applied to the small per-group vectors, never to the leaf, so that no
        extra leaf-sized array (such as -w) is formed.
        """
        return flat[part.leaf]

    def charge(self, flat: Flat) -> jax.Array:
        return 0.5 * self._sum(
            [s * p.reduce(jnp.square(flat[p.leaf])) for p, s in zip(self.parts, self.signs)]
        )

    def quadratic(self, flat: Flat) -> jax.Array:
        return self.charge(flat)

    def reduce(self, flat: Flat, v: Flat) -> jax.Array:
        return self._sum(
            [s * p.reduce(self._base(flat, p) * v[p.leaf]) for p, s in zip(self.parts, self.signs)]
        )

    def expand(self, flat: Flat, c: jax.Array) -> Moved:
        out: Moved = {}
        for p, s in zip(self.parts, self.signs):
            term = self._base(flat, p) * p.broadcast(s * self._slice(c, p))
            out[p.leaf] = out[p.leaf] + term if p.leaf in out else term
        return out

    def norms(self, flat: Flat) -> jax.Array:
        return self._sum([p.reduce(jnp.square(self._base(flat, p))) for p in self.parts])

    def gram(self, flat: Flat) -> jax.Array:
        return jnp.diag(self.norms(flat))

    def solve_gram(self, flat: Flat, r: jax.Array) -> jax.Array:
        return self._solve(self.norms(flat), r)

    def gram_solver(self, flat: Flat) -> Callable[[jax.Array], jax.Array]:
        norms = self.norms(flat)
        return lambda r: self._solve(norms, r)

    @staticmethod
    def _solve(n: jax.Array, r: jax.Array) -> jax.Array:
        # A zero-norm group has no generator: coefficient 0 * r, which is 0 for a finite r
        # but keeps a NaN / inf of r visible to the non-finite checks of the transforms.
        return jnp.where(n != 0, r / jnp.where(n != 0, n, 1), 0 * r)

    def measured(
        self, flat: Flat, squares: dict[int, jax.Array]
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(raw_charge, norms, charge_scale)`` at ``flat``, computed together; ``squares``
        holds x*x of some leaves (leaf index -> array), formed already, that the
        multiplicative kinds read instead of squaring the leaf again."""
        del squares
        return self.raw_charge(flat), self.norms(flat), self.charge_scale(flat)

    def coefficients(self, flat: Flat, v: Flat) -> jax.Array:
        # [derived] The groups of one symmetry are disjoint, so J^T J is diagonal and
        # c_g = <xi_g, v> / |xi_g|^2. Both sums of a large leaf come out of ONE pass over it
        # (reductions.part_sums: XLA:CPU reads a leaf once per reduction otherwise), with the
        # producer of ``v`` (e.g. -lr * momentum) fused into that pass instead of storing v.
        norms, inner = [], []
        for p, s in zip(self.parts, self.signs):
            base = self._base(flat, p)
            n, r = reductions.part_sums(p, [jnp.square(base), base * v[p.leaf]])
            norms.append(n)
            inner.append(s * r)
        return self._solve(self._sum(norms), self._sum(inner))

    @staticmethod
    def _slice(c: jax.Array, p: AxisPart) -> jax.Array:
        """The part's share of a per-group vector."""
        return c[p.offset : p.offset + p.size]

    def _map(self, flat: Flat, fn) -> Moved:
        out: Moved = {}
        for p, s in zip(self.parts, self.signs):
            out[p.leaf] = fn(flat[p.leaf], p, s)
        return out


class BoundMultiplicative(BoundAxis):
    """Scale and Rescale: the action multiplies each part by a per-group factor a^sign."""

    def _factors(self, flat: Flat, target: jax.Array, charge: jax.Array | None = None) -> jax.Array:
        """The group element a (one per group) that takes the charge to ``target``.

        ``charge`` is Q(flat) when the caller has it already (it is then not recomputed).
        """
        raise NotImplementedError

    def _part_factor(self, p: AxisPart, s: int, a: jax.Array) -> jax.Array:
        return p.broadcast(a[p.offset : p.offset + p.size]) ** s

    def act(self, flat: Flat, a: jax.Array) -> Moved:
        return self._map(flat, lambda w, p, s: w * self._part_factor(p, s, a))

    def measured(
        self, flat: Flat, squares: dict[int, jax.Array]
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        # One reduction per part gives both: Q = sum_p s_p |part|^2 / 2 and |xi|^2 =
        # sum_p |part|^2 per group; the charge scale is half the largest |xi|^2.
        sums = [
            p.reduce(squares[p.leaf] if p.leaf in squares else jnp.square(flat[p.leaf]))
            for p in self.parts
        ]
        norms = self._sum(sums)
        charge = 0.5 * self._sum([s * r for s, r in zip(self.signs, sums)])
        return charge, norms, 0.5 * jnp.max(norms)

    def move_to(self, flat: Flat, target: jax.Array) -> Moved:
        return self.act(flat, self._factors(flat, target))

    def step_to(
        self, w: Flat, u: Flat, target: jax.Array, charge: jax.Array | None = None
    ) -> Moved:
        # psi(w + u, a) - w = (f - 1) w + f u with f = a^sign: written so that w + u is never
        # stored (one fused pass), and exact where f = 1.
        cand = [w[i] + u[i] if i in self.leaves else None for i in range(len(w))]
        a = self._factors(cand, target, charge)
        out: Moved = {}
        for p, s in zip(self.parts, self.signs):
            f = self._part_factor(p, s, a)
            out[p.leaf] = (f - 1) * w[p.leaf] + f * u[p.leaf]
        return out


class BoundScale(BoundMultiplicative):
    def _factors(self, flat: Flat, target: jax.Array, charge: jax.Array | None = None) -> jax.Array:
        # [derived] psi(w, a) = a w multiplies the charge by a^2; a zero group has no orbit to
        # move along and stays where it is, as does a group asked for a non-positive charge.
        q = self.charge(flat) if charge is None else charge
        ok = (q > 0) & (target > 0)
        return jnp.where(ok, jnp.sqrt(jnp.where(ok, target, 1) / jnp.where(ok, q, 1)), 1)


class BoundRescale(BoundMultiplicative):
    def charge(self, flat: Flat) -> jax.Array:
        return without_overflow(self.raw_charge, flat, self.leaves)

    def raw_charge(self, flat: Flat) -> jax.Array:
        return super().charge(flat)

    def _squared_norms(self, flat: Flat, sign: int) -> jax.Array:
        """Per-group squared norm of the incoming (sign 1) or outgoing (sign -1) parts."""
        parts = [p for p, s in zip(self.parts, self.signs) if s == sign]
        return groups_lib.scatter_groups(
            parts, [p.reduce(jnp.square(flat[p.leaf])) for p in parts], self._n
        )

    def _factors(self, flat: Flat, target: jax.Array, charge: jax.Array | None = None) -> jax.Array:
        # [derived] with t = a^2: t^2 x_in - 2 q t - x_out = 0 (x = squared norms); take the
        # positive root in the form that avoids cancellation for either sign of q. (The
        # charge itself is not needed: x_in and x_out are, one reduction each per leaf.)
        del charge
        x_in = self._squared_norms(flat, 1)
        x_out = self._squared_norms(flat, -1)
        q = target
        disc = jnp.sqrt(q * q + x_in * x_out)
        t = jnp.where(q >= 0, safe_div(q + disc, x_in), safe_div(x_out, disc - q))
        return jnp.sqrt(jnp.where(t > 0, t, 1))


class BoundTranslation(BoundAxis):
    def _base(self, flat: Flat, part: AxisPart) -> jax.Array:
        return jnp.ones_like(flat[part.leaf])

    def charge(self, flat: Flat) -> jax.Array:
        return self._sum([p.reduce(flat[p.leaf]) for p in self.parts])

    def quadratic(self, flat: Flat) -> jax.Array:
        return jnp.zeros(self.charge_shape, flat[self.parts[0].leaf].dtype)

    def norms(self, flat: Flat) -> jax.Array:
        dtype = flat[self.parts[0].leaf].dtype
        counts = np.zeros(self._n)
        for p in self.parts:
            counts[p.offset : p.offset + p.size] += p.count
        return jnp.asarray(counts, dtype)

    def charge_scale(self, flat: Flat) -> jax.Array:
        return jnp.max(jnp.abs(self.charge(flat))) + jnp.sqrt(
            sum(jnp.sum(jnp.square(flat[i])) for i in self.leaves)
        )

    def act(self, flat: Flat, a: jax.Array) -> Moved:
        return self._map(flat, lambda w, p, s: w + p.broadcast(a[p.offset : p.offset + p.size]))

    def coefficients(self, flat: Flat, v: Flat) -> jax.Array:
        # |xi_g|^2 is the (static) number of entries of the group: the sum divided by it.
        return self.solve_gram(flat, self.reduce(flat, v))

    def _shift(self, flat: Flat, target: jax.Array, charge: jax.Array | None = None) -> jax.Array:
        # Shifting a group by a changes <1, w> by a * (number of entries): solve for a.
        q = self.charge(flat) if charge is None else charge
        return (target - q) / self.norms(flat)

    def move_to(self, flat: Flat, target: jax.Array) -> Moved:
        return self.act(flat, self._shift(flat, target))

    def step_to(
        self, w: Flat, u: Flat, target: jax.Array, charge: jax.Array | None = None
    ) -> Moved:
        cand = [w[i] + u[i] if i in self.leaves else None for i in range(len(w))]
        return self.act(u, self._shift(cand, target, charge))
