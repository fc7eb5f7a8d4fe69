"""Bound symmetries: a declaration resolved against one parameter tree.

A bound symmetry knows the groups and implements, on the flat list of leaves, the mathematics
of :doc:`/concepts/symmetries` for every group at once:

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

This module holds the interface and what every kind shares; the kinds live in
:mod:`~ksbopt._src.symmetries.axis_groups` (Scale, Rescale, Translation) and
:mod:`~ksbopt._src.symmetries.linear_groups` (Linear).

All arithmetic happens in the dtype of the leaves passed in; callers pass leaves already
promoted to at least float32 (see :func:`ksbopt._src.numerics.compute_dtype`).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from ksbopt._src.numerics import safe_div

if TYPE_CHECKING:
    from ksbopt._src.symmetries.declarations import Symmetry


Flat = list  # the leaves of a parameter tree, in jax.tree.leaves order
Moved = dict  # leaf index -> new leaf value


def finfo_tol(x: jax.Array) -> float:
    """The relative tolerance of the iterative solves and rank cuts: 64 eps of ``x``'s dtype."""
    return float(64 * jnp.finfo(x.dtype).eps)


def without_overflow(charge: Callable[[Flat], jax.Array], flat: Flat, leaves) -> jax.Array:
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

    def raw_charge(self, flat: Flat) -> jax.Array:
        """The charge without the overflow guard of :func:`without_overflow` (the same value
        wherever the squared norms are finite). The iterative solves measure their residuals
        with it: their own arithmetic (the norms, the Gram operator) overflows at the same
        magnitudes, and the guard's second copy of the charge would be compiled into every
        loop."""
        return self.charge(flat)

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
        """Largest relative distance of the charge from ``target``, a scalar (NaN where the
        squared norms overflow: see :meth:`raw_charge`)."""
        return self._relative_error(self.raw_charge(flat), self.charge_scale(flat), target)

    @staticmethod
    def _relative_error(q: jax.Array, scale: jax.Array, target: jax.Array) -> jax.Array:
        """max |q - target| / max(|target|, scale): the residual of :meth:`residual`."""
        scale = jnp.maximum(jnp.max(jnp.abs(target)), scale)
        return safe_div(jnp.max(jnp.abs(q - target)), scale)

    def charge_scale(self, flat: Flat) -> jax.Array:
        """A natural size for the charge (for relative residuals): max of the squared norms."""
        return 0.5 * jnp.max(self.norms(flat))

    def norms(self, flat: Flat) -> jax.Array:
        """|xi_g|^2 per group (or its analogue): the scale of the charge per group."""
        return jnp.diagonal(self.gram(flat)).reshape(-1)
