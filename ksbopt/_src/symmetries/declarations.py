"""The symmetry vocabulary: Scale, Rescale, Translation, Linear.

A declaration (the public classes) is a hashable description: which leaves, which axes.
:meth:`Symmetry.bind` resolves it against a parameter tree into a *bound* symmetry, which
knows the groups and implements, on the flat list of leaves, the mathematics of
:doc:`/concepts/symmetries` for every group at once:

- ``charge``: the Noether charge Q per group;
- ``reduce`` / ``expand``: the generator as a linear map J from group coefficients to the
  parameter space (``expand`` is J c, ``reduce`` is J^T v, i.e. <xi_g, v> per group);
- ``gram``: the Gram operator J^T J of the symmetry's own groups (dense, for joint solves)
  and ``solve_gram``, its (pseudo-)inverse applied to a vector;
- ``coefficients``: the projection coefficients (J^T J)^+ J^T v in one step (for Scale,
  Rescale and Translation a closed form per group, no Gram matrix);
- ``act``: the finite group action psi(theta, a);
- ``move_to``: the group element whose action takes the charge to a target, and its result;
  ``step_to`` the same expressed as a replacement of the step u (one fused pass).

All arithmetic happens in the dtype of the leaves passed in; callers pass leaves already
promoted to at least float32 (see :func:`ksbopt._src.numerics.compute_dtype`).

Cost (every per-group reduction is a pass over the leaf): the leaf-sized arrays only ever
appear inside elementwise expressions that XLA fuses into the reductions and into the final
update; the generator's sign (Rescale's outgoing weights) and the per-group factors are
applied to the small per-group vectors, never to a leaf.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ksbopt._src import groups as groups_lib
from ksbopt._src import reductions
from ksbopt._src.groups import AxisPart
from ksbopt._src.numerics import safe_div as _safe_div  # (also imported by implicit, symmetrize)

Flat = list  # the leaves of a parameter tree, in jax.tree.leaves order
Moved = dict  # leaf index -> new leaf value


def _finfo_tol(x: jax.Array) -> float:
    return float(64 * jnp.finfo(x.dtype).eps)


def _without_overflow(charge: Callable[[Flat], jax.Array], flat: Flat, leaves) -> jax.Array:
    """``charge(flat)`` of a mixed-sign charge, with overflowing squared norms resolved.

    A Rescale or Linear charge is a difference of squared norms; in float32 entries of size
    ~1e20 overflow both to inf and their difference to NaN. The charge is homogeneous of
    degree 2, Q(w) = m^2 Q(w / m), so where it came out NaN it is computed again from the
    leaves divided by a power of two m (an exact division), giving a finite value or +-inf.
    The rescaled branch only runs (``lax.cond``) when a NaN appeared.
    """
    q = charge(flat)

    def rescaled(_):
        top = jnp.max(jnp.stack([jnp.max(jnp.abs(flat[i]), initial=0) for i in leaves]))
        ok = jnp.isfinite(top) & (top > 0)
        m = jnp.where(ok, jnp.exp2(jnp.floor(jnp.log2(jnp.where(ok, top, 1)))), 1).astype(q.dtype)
        scaled = list(flat)
        for i in leaves:
            scaled[i] = flat[i] / m
        return (charge(scaled) * m) * m

    return jax.lax.cond(jnp.any(jnp.isnan(q)), rescaled, lambda _: q, None)


class Symmetry(abc.ABC):
    r"""Base class of the symmetry declarations.

    A declaration names a group action :math:`\psi(\theta, a)` on some leaves with
    :math:`L(\psi(\theta, a)) = L(\theta)`; its generator is
    :math:`\xi = \partial_a \psi |_{a = e}` and its Noether charge is the quantity a
    learning rule's kinetic energy conserves or breaks (:ref:`symmetry-generator-charge`). The
    concrete declarations are :class:`Scale`, :class:`Rescale`, :class:`Translation` and
    :class:`Linear`; every ksbopt function that takes ``symmetries`` accepts any of them or
    a list.

    Example:
      >>> import ksbopt
      >>> isinstance(ksbopt.Scale("conv/kernel"), ksbopt.Symmetry)
      True

    References:
      Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep
      Learning Dynamics", ICLR 2021, https://arxiv.org/abs/2012.04728
    """

    kind: str = ""

    @abc.abstractmethod
    def bind(self, params: Any) -> BoundSymmetry:
        """Resolve the declaration against ``params``; ``ValueError`` if it does not fit."""


class BoundSymmetry(abc.ABC):
    """A symmetry resolved against one parameter tree structure."""

    symmetry: Symmetry
    #: Whether :meth:`move_to` is a closed form (exact up to rounding) or an iterative solve
    #: whose residual must be measured and reported.
    closed_form_move: bool = True

    @property
    @abc.abstractmethod
    def leaves(self) -> tuple[int, ...]:
        """Indices of the leaves the symmetry acts on."""

    @property
    @abc.abstractmethod
    def charge_shape(self) -> tuple[int, ...]:
        """Shape of the charge array: ``(n_groups,)`` or ``(heads, k, k)``."""

    @property
    def n_groups(self) -> int:
        return self.charge_shape[0]

    @property
    def coef_size(self) -> int:
        """Dimension of the generator space (all groups together)."""
        return math.prod(self.charge_shape)

    @abc.abstractmethod
    def charge(self, flat: Flat) -> jax.Array: ...

    @abc.abstractmethod
    def quadratic(self, flat: Flat) -> jax.Array:
        """The second-order part Q(u) of Q(w + u) = Q(w) + <xi(w), u> + Q(u) (section 3)."""

    @abc.abstractmethod
    def reduce(self, flat: Flat, v: Flat) -> jax.Array:
        """J^T v: the inner products of ``v`` with every generator, shaped like the charge."""

    @abc.abstractmethod
    def expand(self, flat: Flat, c: jax.Array) -> Moved:
        """J c: the tangent vector sum_g c_g xi_g, as leaf index -> array."""

    @abc.abstractmethod
    def gram(self, flat: Flat) -> jax.Array:
        """J^T J as a dense (coef_size, coef_size) matrix."""

    @abc.abstractmethod
    def solve_gram(self, flat: Flat, r: jax.Array) -> jax.Array:
        """(J^T J)^+ r for this symmetry's own groups (block diagonal, cheap)."""

    def gram_solver(self, flat: Flat) -> Callable[[jax.Array], jax.Array]:
        """``r -> solve_gram(flat, r)`` with everything that depends on ``flat`` only (norms,
        eigendecompositions) computed once: for repeated solves at the same point."""
        return lambda r: self.solve_gram(flat, r)

    def coefficients(self, flat: Flat, v: Flat) -> jax.Array:
        """(J^T J)^+ J^T v: the coefficients of the projection of ``v`` on the generators.

        Equal to ``solve_gram(flat, reduce(flat, v))``; subclasses may fuse the two.
        """
        return self.solve_gram(flat, self.reduce(flat, v))

    @abc.abstractmethod
    def act(self, flat: Flat, a: jax.Array) -> Moved:
        """The group action psi(theta, a), one group element per group."""

    @abc.abstractmethod
    def move_to(self, flat: Flat, target: jax.Array) -> Moved:
        """Move along the orbit so that the charge equals ``target`` (where reachable)."""

    def step_to(
        self, w: Flat, u: Flat, target: jax.Array, charge: jax.Array | None = None
    ) -> Moved:
        """The update u' with Q(w + u') = target and w + u' on the orbit of w + u.

        ``charge``, if given, is Q(w + u) already computed by the caller (not recomputed).
        """
        del charge  # the generic move measures what it needs itself
        cand = [w[i] + u[i] if i in self.leaves else w[i] for i in range(len(w))]
        return {i: v - w[i] for i, v in self.move_to(cand, target).items()}

    def residual(self, flat: Flat, target: jax.Array) -> jax.Array:
        """Largest relative distance of the charge from ``target``, a scalar."""
        q = self.charge(flat)
        scale = jnp.maximum(jnp.max(jnp.abs(target)), self.charge_scale(flat))
        return _safe_div(jnp.max(jnp.abs(q - target)), scale)

    def charge_scale(self, flat: Flat) -> jax.Array:
        """A natural size for the charge (for relative residuals): max of the squared norms."""
        return 0.5 * jnp.max(self.norms(flat))

    def norms(self, flat: Flat) -> jax.Array:
        """|xi_g|^2 per group (or its analogue): the scale of the charge per group."""
        return jnp.diagonal(self.gram(flat)).reshape(-1)


# --------------------------------------------------------------------------- axis symmetries


class _BoundAxis(BoundSymmetry):
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


class _BoundMultiplicative(_BoundAxis):
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


class _BoundScale(_BoundMultiplicative):
    def _factors(self, flat: Flat, target: jax.Array, charge: jax.Array | None = None) -> jax.Array:
        # [derived] psi(w, a) = a w multiplies the charge by a^2; a zero group has no orbit to
        # move along and stays where it is, as does a group asked for a non-positive charge.
        q = self.charge(flat) if charge is None else charge
        ok = (q > 0) & (target > 0)
        return jnp.where(ok, jnp.sqrt(jnp.where(ok, target, 1) / jnp.where(ok, q, 1)), 1)


class _BoundRescale(_BoundMultiplicative):
    def charge(self, flat: Flat) -> jax.Array:
        return _without_overflow(super().charge, flat, self.leaves)

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
        t = jnp.where(q >= 0, _safe_div(q + disc, x_in), _safe_div(x_out, disc - q))
        return jnp.sqrt(jnp.where(t > 0, t, 1))


class _BoundTranslation(_BoundAxis):
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


# --------------------------------------------------------------------------- linear symmetry


@dataclasses.dataclass(frozen=True)
class _LinearPart:
    leaf: int
    path: str
    shape: tuple[int, ...]
    k_axis: int
    head_axis: int | None
    left: bool  # left factor A (A -> A G) or right factor B (B -> G^-1 B)

    @property
    def perm(self) -> tuple[int, ...]:
        """Axis order (head, rest..., k) for left, (head, k, rest...) for right."""
        rest = [a for a in range(len(self.shape)) if a not in (self.k_axis, self.head_axis)]
        head = [] if self.head_axis is None else [self.head_axis]
        return tuple(head + rest + [self.k_axis] if self.left else [*head, self.k_axis, *rest])

    def to_matrix(self, x: jax.Array) -> jax.Array:
        """The leaf as a batch of matrices: (H, rest, k) for left, (H, k, rest) for right."""
        y = jnp.transpose(x, self.perm)
        heads = 1 if self.head_axis is None else self.shape[self.head_axis]
        k = self.shape[self.k_axis]
        return y.reshape((heads, -1, k) if self.left else (heads, k, -1))

    def from_matrix(self, m: jax.Array) -> jax.Array:
        y = m.reshape(tuple(self.shape[a] for a in self.perm))
        return jnp.transpose(y, np.argsort(self.perm))


def _sym(m: jax.Array) -> jax.Array:
    return 0.5 * (m + jnp.swapaxes(m, -1, -2))


def _eigh_fn(m: jax.Array, fn) -> jax.Array:
    """fn applied to the eigenvalues of a batch of symmetric matrices."""
    lam, u = jnp.linalg.eigh(_sym(m))
    return jnp.einsum("...ij,...j,...kj->...ik", u, fn(lam), u)


class _BoundLinear(BoundSymmetry):
    """GL(k) acting on x A B: (A, B) -> (A G, G^-1 B), per head."""

    closed_form_move = False

    def __init__(
        self, symmetry: Symmetry, parts: tuple[_LinearPart, ...], heads: int, k: int, max_iter: int
    ):
        self.symmetry = symmetry
        self.parts = parts
        self.heads = heads
        self.k = k
        self.max_iter = max_iter

    @property
    def leaves(self) -> tuple[int, ...]:
        return tuple(sorted({p.leaf for p in self.parts}))

    @property
    def charge_shape(self) -> tuple[int, ...]:
        return (self.heads, self.k, self.k)

    def _pr(self, flat: Flat) -> tuple[jax.Array, jax.Array]:
        """P = sum A^T A over left parts and R = sum B B^T over right parts, per head."""
        dtype = flat[self.parts[0].leaf].dtype
        p = jnp.zeros(self.charge_shape, dtype)
        r = jnp.zeros(self.charge_shape, dtype)
        for part in self.parts:
            m = part.to_matrix(flat[part.leaf])
            pin = groups_lib.explicit_sharding(m)  # k x k: replicated under Explicit axes
            if part.left:
                p = p + jnp.einsum("hri,hrj->hij", m, m, out_sharding=pin)
            else:
                r = r + jnp.einsum("hir,hjr->hij", m, m, out_sharding=pin)
        return p, r

    def charge(self, flat: Flat) -> jax.Array:
        def difference(f: Flat) -> jax.Array:
            p, r = self._pr(f)
            return p - r

        return _without_overflow(difference, flat, self.leaves)

    def quadratic(self, flat: Flat) -> jax.Array:
        return self.charge(flat)

    def norms(self, flat: Flat) -> jax.Array:
        p, r = self._pr(flat)
        return jnp.trace(p, axis1=-2, axis2=-1) + jnp.trace(r, axis1=-2, axis2=-1)

    def charge_scale(self, flat: Flat) -> jax.Array:
        return jnp.max(self.norms(flat))

    def reduce(self, flat: Flat, v: Flat) -> jax.Array:
        # <(A X, -X B), (vA, vB)> = <X, A^T vA - vB B^T>.
        out = jnp.zeros(self.charge_shape, flat[self.parts[0].leaf].dtype)
        for part in self.parts:
            m, dv = part.to_matrix(flat[part.leaf]), part.to_matrix(v[part.leaf])
            pin = groups_lib.explicit_sharding(m)  # k x k: replicated under Explicit axes
            if part.left:
                out = out + jnp.einsum("hri,hrj->hij", m, dv, out_sharding=pin)
            else:
                out = out - jnp.einsum("hir,hjr->hij", dv, m, out_sharding=pin)
        return out

    def expand(self, flat: Flat, c: jax.Array) -> Moved:
        c = c.reshape(self.charge_shape)
        out: Moved = {}
        for part in self.parts:
            m = part.to_matrix(flat[part.leaf])
            pin = groups_lib.explicit_sharding(m, own=True)  # laid out like the leaf
            if part.left:
                term = part.from_matrix(jnp.einsum("hri,hij->hrj", m, c, out_sharding=pin))
            else:
                term = part.from_matrix(-jnp.einsum("hij,hjr->hir", c, m, out_sharding=pin))
            out[part.leaf] = out[part.leaf] + term if part.leaf in out else term
        return out

    def gram(self, flat: Flat) -> jax.Array:
        # J^T J X = P X + X R; in row-major vec: (P kron I + I kron R^T).
        p, r = self._pr(flat)
        eye = jnp.eye(self.k, dtype=p.dtype)
        blocks = jax.vmap(lambda ph, rh: jnp.kron(ph, eye) + jnp.kron(eye, rh.T))(p, r)
        return jax.scipy.linalg.block_diag(*blocks)

    def solve_gram(self, flat: Flat, r: jax.Array) -> jax.Array:
        return self.gram_solver(flat)(r)

    def gram_solver(self, flat: Flat) -> Callable[[jax.Array], jax.Array]:
        # Sylvester equation P X + X R = M through the eigenbases of P and R.
        p, rr = self._pr(flat)
        lp, up = jnp.linalg.eigh(p)
        lr, ur = jnp.linalg.eigh(rr)
        den = lp[:, :, None] + lr[:, None, :]
        tol = _finfo_tol(den) * jnp.max(jnp.abs(den), axis=(1, 2), keepdims=True)
        ok = den > tol
        inv = jnp.where(ok, 1 / jnp.where(ok, den, 1), 0)

        def solve(r: jax.Array) -> jax.Array:
            m = jnp.einsum("hai,hab,hbj->hij", up, r.reshape(self.charge_shape), ur)
            # 0 * m where the system is singular: 0 for finite m, NaN kept visible otherwise.
            x = jnp.where(ok, m * inv, 0 * m)
            return jnp.einsum("hia,hab,hjb->hij", up, x, ur)

        return solve

    def act(self, flat: Flat, g: jax.Array) -> Moved:
        """(A, B) -> (A G, G^-1 B) with one invertible G per head."""
        g_inv = jnp.linalg.inv(g)
        return self._act_pair(flat, g, g_inv)

    def _act_pair(self, flat: Flat, g: jax.Array, g_inv: jax.Array) -> Moved:
        out: Moved = {}
        for part in self.parts:
            m = part.to_matrix(flat[part.leaf])
            pin = groups_lib.explicit_sharding(m, own=True)  # laid out like the leaf
            if part.left:
                out[part.leaf] = part.from_matrix(
                    jnp.einsum("hri,hij->hrj", m, g, out_sharding=pin)
                )
            else:
                out[part.leaf] = part.from_matrix(
                    jnp.einsum("hij,hjr->hir", g_inv, m, out_sharding=pin)
                )
        return out

    def move_to(self, flat: Flat, target: jax.Array) -> Moved:
        """Newton's method on symmetric G = exp(X), starting from the identity.

        [derived] With G = exp(X), X symmetric, the charge C = G P G - G^-1 R G^-1 changes to
        first order by X S + S X with S = P + R: each step solves that Lyapunov equation in
        the eigenbasis of S and applies exp(X) (exactly invertible: exp(-X)). It stops when the
        relative residual is below 64 eps or after ``max_iter`` steps; callers report the
        residual (a retraction that did not converge is visible, never silent).
        """
        target = target.reshape(self.charge_shape)
        dtype = flat[self.parts[0].leaf].dtype
        tol = _finfo_tol(jnp.zeros((), dtype))
        sub = {i: flat[i] for i in self.leaves}

        def view(s):
            full = list(flat)
            for i, v in s.items():
                full[i] = v
            return full

        def cond(state):
            it, s = state
            return (it < self.max_iter) & (self.residual(view(s), target) > tol)

        def body(state):
            it, s = state
            cur = view(s)
            p, r = self._pr(cur)
            e = target - (p - r)
            lam, u = jnp.linalg.eigh(p + r)
            et = jnp.einsum("hai,hab,hbj->hij", u, e, u)
            den = lam[:, :, None] + lam[:, None, :]
            ok = den > _finfo_tol(den) * jnp.max(jnp.abs(den), axis=(1, 2), keepdims=True)
            xt = jnp.where(ok, et / jnp.where(ok, den, 1), 0)
            # Trust region: a Newton step never rotates by more than exp(+-1) at once.
            scale = jnp.minimum(1.0, 1.0 / jnp.maximum(jnp.max(jnp.abs(xt)), 1e-30))
            xt = xt * scale
            x = jnp.einsum("hia,hab,hjb->hij", u, xt, u)
            g = _eigh_fn(x, jnp.exp)
            g_inv = _eigh_fn(x, lambda v: jnp.exp(-v))
            return it + 1, self._act_pair(cur, g, g_inv)

        _, sub = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), sub))
        return sub

    def balance(self, flat: Flat) -> Moved:
        """The closed-form balancing move to C = 0 (:ref:`orbit-moves`; the balancing of ENorm).

        [derived] With P = A^T A and R = B B^T (P positive definite), G = M^(1/2) for
        M = P^-1/2 (P^1/2 R P^1/2)^1/2 P^-1/2 gives G P G = G^-1 R G^-1, i.e. C = 0.
        """
        p, r = self._pr(flat)
        ph = _eigh_fn(p, jnp.sqrt)
        pih = _eigh_fn(p, lambda v: jnp.where(v > 0, 1 / jnp.sqrt(jnp.where(v > 0, v, 1)), 0))
        m = pih @ _eigh_fn(ph @ r @ ph, lambda v: jnp.sqrt(jnp.maximum(v, 0))) @ pih
        # G = M^(1/2) (G^2 P G^2 = M P M = R), not M^(1/4).
        g = _eigh_fn(m, lambda v: jnp.sqrt(jnp.maximum(v, 0)))
        g_inv = _eigh_fn(m, lambda v: jnp.where(v > 0, 1 / jnp.sqrt(jnp.where(v > 0, v, 1)), 0))
        return self._act_pair(flat, g, g_inv)


# --------------------------------------------------------------------------- declarations


def _leaves_with_paths(params: Any) -> tuple[list[str], list[Any]]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [groups_lib.path_str(p) for p, _ in flat], [leaf for _, leaf in flat]


def _shape(leaf: Any, path: str) -> tuple[int, ...]:
    shape = getattr(leaf, "shape", None)
    if shape is None:
        raise TypeError(
            f"leaf {path!r} of type {type(leaf).__name__} has no shape; symmetries act on array "
            "leaves (pass the parameter tree, e.g. nnx.state(model, nnx.Param))."
        )
    return tuple(shape)


def _unit_parts(
    params: Any,
    selection: tuple,
    axis: int | None,
    *,
    what: str,
    sign: int = 1,
    groups: int | None = None,
) -> tuple[list[AxisPart], list[int]]:
    """Parts of a per-unit declaration (Scale, one side of Rescale): shared groups."""
    paths, leaves = _leaves_with_paths(params)
    idx = groups_lib.select(params, selection, what=what)
    parts = []
    for i in idx:
        shape = _shape(leaves[i], paths[i])
        axes = (
            ()
            if axis is None
            else (
                groups_lib.normalize_axis(
                    axis, len(shape), what=f"{what} axis", path=paths[i], shape=shape
                ),
            )
        )
        block = 1
        if groups is not None:
            n = shape[axes[0]]
            if n % groups or n < groups:
                raise ValueError(
                    f"{groups=} does not divide the {n} units of {paths[i]!r} (shape {shape}) "
                    "into equal contiguous groups; give the normalisation's number of groups "
                    "(e.g. GroupNorm(num_groups=...))."
                )
            block = n // groups
        parts.append(AxisPart(i, paths[i], shape, axes, block=block))
    return parts, [sign] * len(parts)


def _check_units(parts: list[AxisPart], *, what: str) -> None:
    sizes = {p.path: (p.shape, p.size) for p in parts}
    if len({s for _, s in sizes.values()}) > 1:
        listing = "; ".join(
            f"{path!r} shape {shape} -> {n} units" for path, (shape, n) in sizes.items()
        )
        raise ValueError(
            f"{what}: the selected leaves disagree on the number of units along the unit axis "
            f"({listing}). Every leaf of one declaration must have the same number of units; "
            "select a kernel together with its own bias only, or set the axis per declaration."
        )


def _check_disjoint(a: list, b: list, *, what: str) -> None:
    both = sorted({p.path for p in a} & {p.path for p in b})
    if both:
        raise ValueError(
            f"{what}: leaves {both} are selected on both sides; each leaf belongs to one side only."
        )


@dataclasses.dataclass(frozen=True, init=False)
class Scale(Symmetry):
    r"""Scale symmetry w -> a w (a > 0) of a group of weights, as from a normalisation layer.

    A linear map followed by BatchNorm, LayerNorm, RMSNorm, GroupNorm or weight
    normalisation computes the same loss after its weights are multiplied by any a > 0.

    .. math::

        \psi(w, a) = a w, \qquad \xi(w) = w, \qquad Q(w) = \tfrac12 \lVert w \rVert^2 .

    Every minibatch gradient is orthogonal to the generator, <g, w> = 0 [paper: NM]; with
    plain SGD the squared norm only grows,
    :math:`x_{k+1} = x_k + \eta^2 \lVert g_k \rVert^2` ([derived] :ref:`P1 <p1>`).

    Args:
      selection: which leaves form the groups: a glob over the "/"-joined key path (also
        matched against every suffix at a "/" boundary), a compiled regex, a callable
        ``(path, leaf) -> bool``, or a list of these.
      axis: the unit axis. With the Flax layout the output unit is the LAST axis
        (``axis=-1``: BatchNorm, one group per output unit made of ``kernel[..., j]`` and
        ``bias[j]``). ``axis=None``: the whole selection is one group (LayerNorm / RMSNorm
        over the features of a Dense layer).
      groups: split the units along ``axis`` into this many contiguous groups of equal
        size (GroupNorm with ``num_groups=groups``); default ``None``, one group per unit.

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> params = {"conv": {"kernel": jnp.ones((3, 2, 4)), "bias": jnp.zeros(4)}}
      >>> ksbopt.charges(params, [ksbopt.Scale("conv/*", axis=-1)])[0]
      Array([3., 3., 3., 3.], dtype=float32)

    References:
      Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep
      Learning Dynamics", ICLR 2021, https://arxiv.org/abs/2012.04728
    """

    selection: tuple
    axis: int | None
    groups: int | None

    kind = "scale"

    def __init__(self, selection, axis: int | None = -1, groups: int | None = None):
        object.__setattr__(self, "selection", groups_lib.normalize_selector(selection))
        object.__setattr__(self, "axis", _check_axis_arg(axis, "axis"))
        if groups is not None:
            if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
                raise ValueError(
                    f"{groups=} must be a positive int (the number of channel "
                    "groups, as GroupNorm's num_groups) or None."
                )
            if axis is None:
                raise ValueError(
                    f"{groups=} needs a unit axis to split; got axis=None. Write "
                    "axis=-1 (the output unit of a Flax kernel)."
                )
            groups = int(groups)
        object.__setattr__(self, "groups", groups)

    def bind(self, params: Any) -> BoundSymmetry:
        parts, signs = _unit_parts(
            params, self.selection, self.axis, what="Scale selection", groups=self.groups
        )
        _check_units(parts, what=f"Scale({self.selection!r}, axis={self.axis})")
        return _BoundScale(self, tuple(parts), tuple(signs))


@dataclasses.dataclass(frozen=True, init=False)
class Rescale(Symmetry):
    r"""Rescale symmetry of a positively homogeneous unit between two layers.

    For a ReLU (leaky ReLU, identity) unit j between layers A and B, scaling its incoming
    weights by a > 0 and its outgoing weights by 1/a leaves the network unchanged:

    .. math::

        \psi = (a\, w_{in}, w_{out} / a), \quad \xi = (w_{in}, -w_{out}), \quad
        Q = \tfrac12 (\lVert w_{in} \rVert^2 - \lVert w_{out} \rVert^2).

    Rescale is the diagonal case of :class:`Linear`. GELU, SiLU, tanh and sigmoid break it,
    and so does a residual connection around the unit.

    Args:
      incoming: leaves holding the incoming weights, e.g. ``["Dense_0/kernel",
        "Dense_0/bias"]``; unit j is ``kernel[..., j]`` and ``bias[j]``.
      outgoing: leaves holding the outgoing weights, e.g. ``"Dense_1/kernel"``; unit j is
        ``kernel[..., j, :]`` (axis -2, also for a Conv kernel).
      incoming_axis: unit axis of the incoming leaves (default -1).
      outgoing_axis: unit axis of the outgoing leaves (default -2).

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> params = {"Dense_0": {"kernel": 2 * jnp.ones((3, 2))},
      ...           "Dense_1": {"kernel": jnp.ones((2, 5))}}
      >>> sym = ksbopt.Rescale(incoming="Dense_0/kernel", outgoing="Dense_1/kernel")
      >>> ksbopt.charges(params, [sym])[0]
      Array([3.5, 3.5], dtype=float32)

    References:
      Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep
      Learning Dynamics", ICLR 2021, https://arxiv.org/abs/2012.04728
    """

    incoming: tuple
    outgoing: tuple
    incoming_axis: int
    outgoing_axis: int

    kind = "rescale"

    def __init__(self, incoming, outgoing, *, incoming_axis: int = -1, outgoing_axis: int = -2):
        object.__setattr__(self, "incoming", groups_lib.normalize_selector(incoming))
        object.__setattr__(self, "outgoing", groups_lib.normalize_selector(outgoing))
        for name, value in (("incoming_axis", incoming_axis), ("outgoing_axis", outgoing_axis)):
            if value is None:
                raise TypeError(
                    f"{name}=None is not allowed for Rescale; the unit axis must be "
                    "an int (default incoming_axis=-1, outgoing_axis=-2)."
                )
            object.__setattr__(self, name, _check_axis_arg(value, name))

    def bind(self, params: Any) -> BoundSymmetry:
        p_in, s_in = _unit_parts(params, self.incoming, self.incoming_axis, what="Rescale incoming")
        p_out, s_out = _unit_parts(
            params, self.outgoing, self.outgoing_axis, what="Rescale outgoing", sign=-1
        )
        what = f"Rescale(incoming={self.incoming!r}, outgoing={self.outgoing!r})"
        _check_disjoint(p_in, p_out, what=what)
        _check_units(p_in + p_out, what=what)
        return _BoundRescale(self, tuple(p_in + p_out), tuple(s_in + s_out))


@dataclasses.dataclass(frozen=True, init=False)
class Translation(Symmetry):
    r"""Translation symmetry w -> w + a 1 of the logits' weights under softmax.

    Softmax cross-entropy is unchanged when every logit is shifted by the same amount, so
    each row ``kernel[i, :]`` of a classifier head (class axis last) and its bias form
    groups that can be shifted along the class axis:

    .. math::

        \psi(w, a) = w + a\,\mathbf 1, \qquad \xi = \mathbf 1, \qquad
        Q(w) = \langle \mathbf 1, w \rangle .

    SGD and heavy ball conserve Q exactly without weight decay; RMSProp and Adam do not
    (:ref:`P4 <p4>`, :ref:`P6 <p6>`).

    Args:
      selection: the head's leaves, e.g. ``["head/kernel", "head/bias"]``.
      axis: the class axis (default -1). Every position along the other axes is one group:
        a (h, C) kernel gives h groups and a (C,) bias one.

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> params = {"head": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}}
      >>> ksbopt.charges(params, [ksbopt.Translation("head/*")])[0]
      Array([ 3.,  3., 12.], dtype=float32)

    References:
      Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep
      Learning Dynamics", ICLR 2021, https://arxiv.org/abs/2012.04728
    """

    selection: tuple
    axis: int

    kind = "translation"

    def __init__(self, selection, axis: int = -1):
        object.__setattr__(self, "selection", groups_lib.normalize_selector(selection))
        if axis is None:
            raise TypeError(
                "axis=None is not allowed for Translation; give the class axis (default -1)."
            )
        object.__setattr__(self, "axis", _check_axis_arg(axis, "axis"))

    def bind(self, params: Any) -> BoundSymmetry:
        paths, leaves = _leaves_with_paths(params)
        parts, offset = [], 0
        for i in groups_lib.select(params, self.selection, what="Translation selection"):
            shape = _shape(leaves[i], paths[i])
            ax = groups_lib.normalize_axis(
                self.axis, len(shape), what="Translation axis", path=paths[i], shape=shape
            )
            part = AxisPart(
                i, paths[i], shape, tuple(a for a in range(len(shape)) if a != ax), offset
            )
            parts.append(part)
            offset += part.size
        return _BoundTranslation(self, tuple(parts), (1,) * len(parts))


@dataclasses.dataclass(frozen=True, init=False)
class Linear(Symmetry):
    r"""Linear (GL(k)) symmetry of two stacked linear maps x A B, optionally per head.

    .. math::

        \psi(A, B; G) = (A G, G^{-1} B), \quad \xi_X = (A X, -X B)\ (X \in gl(k)), \quad
        C = A^\top A - B B^\top \ (k \times k).

    Under gradient flow C is conserved; SGD with weight decay moves it by
    C_{k+1} = (1 - eta lam)^2 C_k + eta^2 (G_A^T G_A - G_B G_B^T) (:ref:`P10 <p10>`).

    ``left`` leaves transform as A -> A G along ``left_axis`` (their other axes are summed
    in A^T A), ``right`` leaves as B -> G^{-1} B along ``right_axis``. With a head axis, each
    head has its own G. Biases of the left map belong to ``left`` (x A + b -> (x A + b) G).

    Args:
      left: leaves of A (and its bias), e.g. ``["Dense_0/kernel", "Dense_0/bias"]``.
      right: leaves of B, e.g. ``"Dense_1/kernel"``.
      left_axis: the shared k axis in the left leaves (default -1, a Flax output unit).
      right_axis: the shared k axis in the right leaves (default -2, a Flax input axis).
      left_head_axis: the head axis of the left leaves (default None: one group).
      right_head_axis: the head axis of the right leaves (default None: one group).
      max_iter: Newton steps allowed when moving to a target charge.

    Use :meth:`query_key` and :meth:`value_output` for Flax ``MultiHeadAttention`` kernels.

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> params = {"A": {"kernel": jnp.eye(3, 2)}, "B": {"kernel": jnp.ones((2, 4))}}
      >>> ksbopt.charges(params, [ksbopt.Linear(left="A/kernel", right="B/kernel")])[0]
      Array([[[-3., -4.],
              [-4., -3.]]], dtype=float32)

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716
    """

    left: tuple
    right: tuple
    left_axis: int
    right_axis: int
    left_head_axis: int | None
    right_head_axis: int | None
    max_iter: int

    kind = "linear"

    def __init__(
        self,
        left,
        right,
        *,
        left_axis: int = -1,
        right_axis: int = -2,
        left_head_axis: int | None = None,
        right_head_axis: int | None = None,
        max_iter: int = 32,
    ):
        object.__setattr__(self, "left", groups_lib.normalize_selector(left))
        object.__setattr__(self, "right", groups_lib.normalize_selector(right))
        for name, value in (("left_axis", left_axis), ("right_axis", right_axis)):
            if value is None:
                raise TypeError(f"{name}=None is not allowed; give the shared k axis as an int.")
            object.__setattr__(self, name, _check_axis_arg(value, name))
        object.__setattr__(
            self, "left_head_axis", _check_axis_arg(left_head_axis, "left_head_axis")
        )
        object.__setattr__(
            self, "right_head_axis", _check_axis_arg(right_head_axis, "right_head_axis")
        )
        if not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"{max_iter=} must be a positive int (Newton steps), e.g. 32.")
        object.__setattr__(self, "max_iter", max_iter)

    @classmethod
    def query_key(cls, query, key, **kwargs) -> Linear:
        """Per-head GL(head_dim) of Flax attention: W_q -> W_q G, W_k -> W_k G^-T.

        Flax ``MultiHeadAttention`` query/key kernels are (embed, heads, head_dim) and their
        biases (heads, head_dim); the scores q k^T are unchanged. Without QK-normalisation
        this is an exact symmetry of the attention logits.
        """
        return cls(
            query, key, left_axis=-1, right_axis=-1, left_head_axis=-2, right_head_axis=-2, **kwargs
        )

    @classmethod
    def value_output(cls, value, output, **kwargs) -> Linear:
        """Per-head GL(head_dim) of Flax attention: W_v -> W_v G, W_o -> G^-1 W_o.

        Value kernel (embed, heads, head_dim) and bias (heads, head_dim); output kernel
        (heads, head_dim, embed).
        """
        return cls(
            value,
            output,
            left_axis=-1,
            right_axis=-2,
            left_head_axis=-2,
            right_head_axis=-3,
            **kwargs,
        )

    def bind(self, params: Any) -> BoundSymmetry:
        paths, leaves = _leaves_with_paths(params)
        parts = []
        for side, sel, axis, head in (
            ("left", self.left, self.left_axis, self.left_head_axis),
            ("right", self.right, self.right_axis, self.right_head_axis),
        ):
            for i in groups_lib.select(params, sel, what=f"Linear {side}"):
                shape = _shape(leaves[i], paths[i])
                k_ax = groups_lib.normalize_axis(
                    axis, len(shape), what=f"{side}_axis", path=paths[i], shape=shape
                )
                h_ax = (
                    None
                    if head is None
                    else groups_lib.normalize_axis(
                        head, len(shape), what=f"{side}_head_axis", path=paths[i], shape=shape
                    )
                )
                if h_ax == k_ax:
                    raise ValueError(
                        f"{side}_head_axis={head} and {side}_axis={axis} name the "
                        f"same axis of {paths[i]!r} with shape {shape}."
                    )
                parts.append(_LinearPart(i, paths[i], shape, k_ax, h_ax, side == "left"))
        what = f"Linear(left={self.left!r}, right={self.right!r})"
        _check_disjoint([p for p in parts if p.left], [p for p in parts if not p.left], what=what)
        ks = {p.path: p.shape[p.k_axis] for p in parts}
        if len(set(ks.values())) > 1:
            raise ValueError(
                f"{what}: the shared dimension k differs between leaves ({ks}); "
                "the left map's output size must equal the right map's input size. "
                "Check left_axis / right_axis."
            )
        hs = {p.path: 1 if p.head_axis is None else p.shape[p.head_axis] for p in parts}
        if len(set(hs.values())) > 1:
            raise ValueError(
                f"{what}: the number of heads differs between leaves ({hs}); set "
                "left_head_axis / right_head_axis to the heads axis of every leaf."
            )
        return _BoundLinear(
            self, tuple(parts), next(iter(hs.values())), next(iter(ks.values())), self.max_iter
        )


def _check_axis_arg(value, name):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}={value!r} must be an int (negative counts from the end).")
    return int(value)
