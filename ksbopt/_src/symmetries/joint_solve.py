"""Joint solves over overlapping symmetries: the Gram operator, conjugate gradients, Newton.

Symmetries that share leaves (a chain of rescales, LayerNorm rescales and translations, a
Transformer's heads) form a connected component; :mod:`ksbopt._src.symmetries.orbit` hands
each component here:

- :func:`joint_project` removes the component of a vector along the span of all its
  generators by preconditioned conjugate gradients on the normal equations (J^T J) c = J^T u
  (matrix-free: each iteration is one pass over the component's leaves, never a dense Gram
  matrix; block-Jacobi preconditioner plus an exact coarse solve on one vector per symmetry);
- :func:`joint_move` moves overlapping Scale / Rescale / Translation symmetries to their
  target charges by Newton's method on the generator coefficients (each Newton step one
  conjugate-gradient solve with the same Gram operator, trust region, unreachable groups
  held);
- :func:`sweep_move` moves a component with a Linear symmetry among them by sweeps of each
  symmetry's own move (block Gauss-Seidel on the charges).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ksbopt._src import groups as groups_lib
from ksbopt._src import reductions
from ksbopt._src.numerics import default_tol, safe_div
from ksbopt._src.symmetries.declarations import BoundSymmetry, Flat, Moved, apply_moved


def _component_leaves(syms: Sequence[BoundSymmetry]) -> list[int]:
    return sorted({i for s in syms for i in s.leaves})


def _expand_all(syms: Sequence[BoundSymmetry], flat: Flat, coefs: Sequence[jax.Array]) -> Moved:
    """J c = sum over the symmetries of their tangent vectors, as leaf index -> array."""
    out: Moved = {}
    for s, c in zip(syms, coefs):
        for i, t in s.expand(flat, c).items():
            out[i] = out[i] + t if i in out else t
    return out


def _is_axis(sym: BoundSymmetry) -> bool:
    """Scale, Rescale and Translation: every entry belongs to exactly one group."""
    return sym.symmetry.kind in ("scale", "rescale", "translation")


class _Layout:
    """The coefficient arrays of a component's symmetries laid end to end in one vector.

    The iterative solves work on that vector: every per-group operation of the iteration
    (masks, residuals, the diagonal preconditioner, the trust region, the group elements) is
    one operation for the whole component instead of one per symmetry, which keeps the
    compiled program (and its compile time) from growing with the number of symmetries.
    """

    def __init__(self, syms: Sequence[BoundSymmetry]):
        self.shapes = [tuple(s.charge_shape) for s in syms]
        sizes = [math.prod(sh) for sh in self.shapes]
        self.starts = [0, *itertools.accumulate(sizes)][:-1]
        self.n = len(syms)
        self.segment = np.repeat(np.arange(len(syms), dtype=np.int32), sizes)

    def join(self, vs: Sequence[jax.Array]) -> jax.Array:
        return jnp.concatenate([jnp.ravel(v) for v in vs])

    def split(self, v: jax.Array) -> list[jax.Array]:
        return [v[a : a + math.prod(sh)].reshape(sh) for a, sh in zip(self.starts, self.shapes)]

    def flags(self, per_symmetry: Sequence[bool]) -> np.ndarray:
        """A static boolean per entry: its symmetry's flag."""
        return np.asarray(per_symmetry, bool)[self.segment]

    def spread(self, per_symmetry: jax.Array) -> jax.Array:
        """One value per symmetry, repeated over its entries."""
        return per_symmetry[self.segment]

    def sums(self, v: jax.Array) -> jax.Array:
        """The sum of each symmetry's entries (one value per symmetry)."""
        return jax.ops.segment_sum(v, self.segment, self.n, indices_are_sorted=True)


def _contract(m: jax.Array, p: groups_lib.AxisPart, c: jax.Array, q: groups_lib.AxisPart):
    """``q.reduce(m * p.broadcast(c))`` as one contraction (a matrix-vector product)."""
    ax = "abcdefghijklmnopqrstuvwxyz"[: m.ndim]
    c = jnp.repeat(c, p.block) if p.block > 1 else c
    c = c.reshape([p.shape[a] for a in p.group_axes])
    spec = f"{ax},{''.join(ax[a] for a in p.group_axes)}->{''.join(ax[a] for a in q.group_axes)}"
    return jnp.sum(jnp.einsum(spec, m, c).reshape(q.size, q.block), axis=1)


def _parts_by_leaf(syms: Sequence[BoundSymmetry]) -> dict[int, list]:
    """leaf index -> [(symmetry index, part, sign, kind)] of Scale / Rescale / Translation."""
    by_leaf: dict[int, list] = {}
    for k, s in enumerate(syms):
        for part, sign in zip(s.parts, s.signs):
            by_leaf.setdefault(part.leaf, []).append((k, part, sign, s.symmetry.kind))
    return by_leaf


def _squares(syms: Sequence[BoundSymmetry], flat: Flat) -> dict[int, jax.Array]:
    """x*x of every leaf that two multiplicative symmetries share (the operand of their
    coupling in :func:`_axis_gram`), as the charges and norms compute it (one array)."""
    out = {}
    for i, entries in _parts_by_leaf(syms).items():
        if len({k for k, _, _, kind in entries if kind != "translation"}) > 1:
            out[i] = jnp.square(flat[i])
    return out


def _axis_gram(
    syms: Sequence[BoundSymmetry],
    lay: _Layout,
    flat: Flat,
    norms: jax.Array,
    squares: dict[int, jax.Array],
):
    """J^T J of overlapping Scale / Rescale / Translation symmetries as contractions, on the
    component's coefficient vector (``norms``: the squared generator norms, laid out alike).

    [derived] Groups of one symmetry are disjoint, so its own block of J^T J is diagonal
    (the squared generator norms). Two symmetries k, l that share a leaf couple through it:
    for their parts p and q there, <xi_k c, xi_l> summed over q's groups is a contraction of
    the leaf-sized array x*x (two multiplicative parts), x (one of them a Translation) or 1
    with c spread over p's group axes: a matrix-vector product, which reads x*x once and
    runs at the speed of the matrix libraries (a reduction over the leading axes of a leaf
    does not on XLA:CPU). x*x is formed once per leaf and point (``squares``, shared with the
    charges and norms measured there), then reused by every product.
    """
    # (p's slice, p, q's slice, q, sign, operand, k, j): symmetry k's part p acts on j's q
    couplings = []
    for i, entries in _parts_by_leaf(syms).items():
        for k, p, sp, kind_p in entries:
            for j, q, sq, kind_q in entries:
                if k == j:
                    continue
                power = (kind_p != "translation") + (kind_q != "translation")
                x = flat[i]
                operand = (jnp.ones_like(x), x, squares[i] if power == 2 else None)[power]
                src = slice(lay.starts[k] + p.offset, lay.starts[k] + p.offset + p.size)
                dst = slice(lay.starts[j] + q.offset, lay.starts[j] + q.offset + q.size)
                couplings.append((src, p, dst, q, sp * sq, operand, k, j))

    def matvec(c: jax.Array) -> jax.Array:
        # The terms landing on the same groups are summed first: one indexed add per range
        # (a chain's symmetry receives both neighbours' terms on all its groups).
        terms: dict[tuple[int, int], jax.Array] = {}
        for src, p, dst, q, sign, m, _, _ in couplings:
            term = sign * _contract(m, p, c[src], q)
            key = (dst.start, dst.stop)
            terms[key] = terms[key] + term if key in terms else term
        out = norms * c
        for (start, stop), term in terms.items():
            out = out.at[start:stop].add(term)
        return out

    def coarse(e: jax.Array) -> jax.Array:
        """E^T (J^T J) E for E with one column per symmetry, column k ``e`` on k's entries."""
        a = jnp.diag(lay.sums(e * norms * e))
        if couplings:
            terms = [
                sign * jnp.sum(e[dst] * _contract(m, p, e[src], q))
                for src, p, dst, q, sign, m, _, _ in couplings
            ]
            rows = np.asarray([j for *_, k, j in couplings])
            cols = np.asarray([k for *_, k, j in couplings])
            a = a.at[rows, cols].add(jnp.stack(terms))
        return 0.5 * (a + a.T)

    return matvec, coarse


def _normal_equations(
    syms: Sequence[BoundSymmetry], lay: _Layout, flat: Flat, mask=None, point=None
):
    """The Gram operator J^T J of overlapping symmetries at ``flat``, matrix-free, on the
    component's coefficient vector (:class:`_Layout`).

    Returns ``(matvec, solve, own, reduce)``: ``matvec`` applies J^T J (:func:`_axis_gram`
    for Scale, Rescale and Translation; J^T (J p) otherwise, one pass over the component's
    leaves that reads the parameters and writes nothing leaf-sized); ``own`` the
    block-diagonal part's (pseudo-)inverse, each symmetry's own Gram operator solved in
    closed form; ``solve`` the conjugate gradients' preconditioner (``own``, plus a coarse
    correction for Scale, Rescale and Translation); ``reduce`` maps leaves (leaf index ->
    array) to J^T v. With ``mask`` (0/1 per coefficient) the masked coefficients are held at
    zero: the operators act on the other groups only. ``point``, for Scale, Rescale and
    Translation, is ``(norms, squares)`` at ``flat`` already computed (the norms laid out as
    the coefficients; see :func:`_squares`).
    """

    def reduce(sub: Moved) -> jax.Array:
        full: Flat = [None] * len(flat)
        for i, v in sub.items():
            full[i] = v
        return lay.join([s.reduce(flat, full) for s in syms])

    def masked(c: jax.Array) -> jax.Array:
        return c if mask is None else mask * c

    sharded = any(
        groups_lib.explicit_sharding(flat[i]) is not None for i in _component_leaves(syms)
    )

    if all(map(_is_axis, syms)) and not sharded:
        norms, squares = point or (lay.join([s.norms(flat) for s in syms]), _squares(syms, flat))
        gram, coarse = _axis_gram(syms, lay, flat, norms, squares)

        def block_jacobi(r: jax.Array) -> jax.Array:
            # Each symmetry's own Gram operator is diagonal: r / |xi_g|^2, 0 * r for a
            # zero-norm group (0 for finite r, a NaN kept visible otherwise).
            return jnp.where(norms != 0, r / jnp.where(norms != 0, norms, 1), 0 * r)

        # [derived] Two-level preconditioner: block Jacobi plus the exact solve on the span
        # of one vector per symmetry (its coefficients all alike, masked). The slowest modes
        # of block Jacobi on a chain are such layer-wide moves, coupled only to neighbours,
        # which the small coarse system resolves at once.
        basis = jnp.ones_like(norms) if mask is None else mask
        coarse_inv = _pinv(coarse(basis))

        def preconditioner(r: jax.Array) -> jax.Array:
            return block_jacobi(r) + lay.spread(coarse_inv @ lay.sums(basis * r)) * basis

    else:

        def gram(p: jax.Array) -> jax.Array:
            return reduce(_expand_all(syms, flat, lay.split(p)))

        precond = [s.gram_solver(flat) for s in syms]

        def block_jacobi(r: jax.Array) -> jax.Array:
            return lay.join([m(x) for m, x in zip(precond, lay.split(r))])

        preconditioner = block_jacobi

    def matvec(p: jax.Array) -> jax.Array:
        return masked(gram(masked(p)))

    def solve(r: jax.Array) -> jax.Array:
        return masked(preconditioner(masked(r)))

    def own(r: jax.Array) -> jax.Array:
        return masked(block_jacobi(masked(r)))

    return matvec, solve, own, reduce


def _pinv(a: jax.Array) -> jax.Array:
    """Pseudo-inverse of a small symmetric positive semi-definite matrix (eigenvalues below
    64 eps of the largest are dropped)."""
    lam, v = jnp.linalg.eigh(a)
    keep = lam > default_tol(a.dtype) * jnp.max(lam)
    inv = jnp.where(keep, 1 / jnp.where(keep, lam, 1), 0)
    return (v * inv) @ v.T


def _pcg(matvec, solve, b: jax.Array, max_iter, stop) -> tuple[jax.Array, jax.Array]:
    """Preconditioned conjugate gradients for A x = b (A symmetric positive semi-definite).

    ``matvec`` applies A, ``solve`` the preconditioner's (pseudo-)inverse M^+; both act on
    the coefficient vector. Iterates while ``stop(r^T M^+ r, b^T M^+ b)`` is false, at most
    ``max_iter`` times.
    Rounding-robust choices: the step length is the exact line search <r, p> / <p, A p> for
    the current residual (equal to r^T M^+ r / <p, A p> in exact arithmetic, and never
    increasing the A-norm of the error) and beta is Polak-Ribiere's, clipped at 0 (a restart
    whenever rounding has cost the directions their conjugacy). Returns x and r^T M^+ r.
    """
    z = solve(b)
    rz0 = jnp.maximum(jnp.vdot(b, z), 0)

    def cond(state):
        it, _, _, _, rz = state
        return (it < max_iter) & ~stop(rz, rz0)

    def dots(*pairs):
        """Inner products, as one reduction (each would be a reduction of its own)."""
        return jnp.sum(jnp.stack([a * b for a, b in pairs]), axis=1)

    def body(state):
        it, x, r, p, rz = state
        ap = matvec(p)
        rp, pap = dots((r, p), (p, ap))
        alpha = safe_div(rp, pap)
        x = x + alpha * p
        r_new = r - alpha * ap
        z = solve(r_new)
        rz_new, rz_old = dots((r_new, z), (r, z))
        rz_new = jnp.maximum(rz_new, 0)
        beta = jnp.maximum(safe_div(rz_new - rz_old, rz), 0)
        return it + 1, x, r_new, z + beta * p, rz_new

    state = (jnp.zeros((), jnp.int32), jnp.zeros_like(b), b, z, rz0)
    _, x, _, _, rz = jax.lax.while_loop(cond, body, state)
    return x, rz


def joint_project(
    syms: Sequence[BoundSymmetry], flat: Flat, u: Flat, max_iter, tol
) -> tuple[Moved, list[jax.Array], jax.Array]:
    """Project ``u`` on the orthogonal complement of the span of overlapping symmetries.

    [derived] The coefficients solve the normal equations (J^T J) c = J^T u of
    min_c |u - J c|^2, here by preconditioned conjugate gradients without ever forming
    J^T J (:func:`_normal_equations`). M is the block diagonal of J^T J: each symmetry's own
    Gram operator, solved in closed form (diagonal for Scale / Rescale / Translation, a
    Sylvester equation per head for Linear); the solver's preconditioner is M, plus a
    coarse correction for Scale / Rescale / Translation (which only adds to its measure of
    the residual below, so stopping on it is conservative).

    Iterations stop when the relative residual rho = sqrt(r^T M^+ r) / |u|,
    r = J^T (u - J c), is below ``tol`` or after ``max_iter`` iterations. Since
    r^T M^+ r = sum_k |P_k s|^2 for s = u - J c and P_k the orthogonal projection on
    symmetry k's own generators, rho is the generator component left in the result relative
    to the size of u (a gradient already orthogonal to the generators stops at once). The
    rho returned is measured again on the result (not the solver's running estimate), so it
    is the orthogonality actually achieved.

    Returns the projected leaves, the coefficients per symmetry and rho (NaN if ``u`` is not
    finite on the component).
    """
    leaves = _component_leaves(syms)
    lay = _Layout(syms)
    matvec, solve, own, reduce = _normal_equations(syms, lay, flat)

    def left(r: jax.Array) -> jax.Array:
        return jnp.maximum(jnp.vdot(r, own(r)), 0)

    sub = {i: u[i] for i in leaves}
    uu = sum(jnp.sum(jnp.square(x)) for x in sub.values())
    tol = jnp.asarray(tol, uu.dtype)
    c, _ = _pcg(matvec, solve, reduce(sub), max_iter, lambda rz, _: rz <= tol * tol * uu)
    c = lay.split(c)
    removed = _expand_all(syms, flat, c)
    out = {i: v - removed[i] if i in removed else v for i, v in sub.items()}
    # NaN when u is not finite: the NaN reaches the caller's checks.
    residual = jnp.sqrt(safe_div(left(reduce(out)), uu)) + 0 * uu
    return out, c, residual


#: Default cap of Newton steps of a joint orbit move.
MOVE_MAX_ITER = 32

#: Cap of conjugate-gradient iterations per Newton step of a joint orbit move.
MOVE_CG_MAX_ITER = 64


def _movable(
    q: jax.Array, norms: jax.Array, target: jax.Array, shift: np.ndarray, no_out: np.ndarray
) -> jax.Array:
    """1 where the group can reach ``target`` along its own orbit, else 0 (float mask), for
    the coefficient vector of a component (``shift``: Translation entries, ``no_out``: Scale
    entries, static).

    [derived] Along exp(c), a multiplicative group's charge is
    (e^{2c} x_+ - e^{-2c} x_-) / 2 with x_+ = |incoming|^2 = N/2 + Q and
    x_- = |outgoing|^2 = N/2 - Q (N = |xi|^2; Scale has no outgoing part): it covers the
    reals if both are positive, only positive values without outgoing weights, only negative
    ones without incoming weights and nothing for a zero group. A Translation group reaches
    every value. A group that cannot reach its target stays where it is, as in the closed
    form of a symmetry alone.
    """
    x_in = 0.5 * norms + q
    x_out = jnp.where(no_out, 0, 0.5 * norms - q)
    ok = ((x_in > 0) | (target < 0)) & ((x_out > 0) | (target > 0)) & (norms > 0)
    return (ok | shift).astype(q.dtype)


def joint_move(
    syms: Sequence[BoundSymmetry],
    cand: Flat,
    targets: Sequence[jax.Array],
    charges: Sequence[jax.Array],
    max_iter: int,
    tol: float,
) -> tuple[Moved, jax.Array]:
    """Move ``cand`` along the orbits of overlapping Scale / Rescale / Translation symmetries
    until every charge equals its target: Newton's method on the generator coefficients.

    [derived] The charges are moment maps of the group actions: the gradient of Q_k is the
    generator field xi_k, so along psi(theta, exp(c)) the Jacobian of the charges is
    dQ_k / dc_l = <xi_k, xi_l>, the Gram operator J^T J of the generators that
    :func:`project` solves with. Each Newton step solves J^T J c = T - Q(theta) by the same
    matrix-free preconditioned conjugate gradients (:func:`_normal_equations`) and applies
    the group elements exp(c) exactly, so every iterate is on the orbit of ``cand``. The
    linear solves are inexact (forcing terms in the manner of Eisenstat and Walker): each
    stops once its relative residual is below min(max(tol / (16 rho), rho), 0.1) for the
    current charge residual rho, enough for the step to land well below ``tol`` when rho is
    small (the solver's norm and the largest relative charge error differ by a small factor)
    and no more work than the quadratic convergence can use when it is not. A trust region keeps
    every multiplicative factor within e^(+-1) per step (large steered moves). Groups that
    cannot reach their target are held where they are (:func:`_movable`).

    [derived] What the loop carries: the actions of Scale and Rescale commute and compose
    by multiplying their group elements, so a leaf that only they act on is ``cand`` times
    the product of each symmetry's accumulated elements (one number per group). The loop
    carries those and forms such a leaf only where it is read: in the squares of shared
    leaves (formed once per step, for the charges measured at the new point and for the
    next step's Gram operator, so they are carried too) and once at the end. A leaf that a
    Translation also shifts is carried and moved step by step. Moving each leaf in the loop
    instead costs a read and a write of it per step, and on XLA:CPU a copy as well: XLA fuses
    the move into each reader of the moved leaf, so the carried buffer it would overwrite
    in place is still read after the write.

    Takes at least one step and stops when the largest relative residual |Q - T| / scale over
    the movable groups is below ``tol`` or after ``max_iter`` steps. Returns the moved leaves
    and the largest relative residual over all groups, measured on the result (NaN for
    non-finite input).
    """
    leaves = _component_leaves(syms)
    lay = _Layout(syms)
    shift = lay.flags([s.symmetry.kind == "translation" for s in syms])
    no_out = lay.flags([s.symmetry.kind == "scale" for s in syms])
    target = lay.join(targets)
    target_size = jnp.stack([jnp.max(jnp.abs(t)) for t in targets])
    # A leaf that only Scale / Rescale symmetries act on is cand times the product of their
    # accumulated group elements (``acc``, one per group): the loop carries those, not the
    # leaf. A leaf that a Translation shifts too is carried and moved step by step.
    shifted = {p.leaf for s in syms if s.symmetry.kind == "translation" for p in s.parts}
    carried = [i for i in leaves if i in shifted]
    derived = [i for i in leaves if i not in shifted]

    def with_carried(sub: Sequence[jax.Array]) -> Flat:
        return apply_moved(cand, dict(zip(carried, sub)), add=False)

    def acted(full: Flat, s: BoundSymmetry, a: jax.Array, keep: Sequence[int]) -> Flat:
        """``full`` with ``s`` acting by ``a`` on the leaves ``keep`` (only)."""
        moved = s.act(full, a)
        return apply_moved(full, {i: moved[i] for i in keep if i in moved}, add=False)

    def view(acc: jax.Array, sub: Sequence[jax.Array]) -> Flat:
        """The leaves at accumulated elements ``acc`` and carried leaves ``sub``."""
        full = with_carried(sub)
        for s, a in zip(syms, lay.split(acc)):
            if s.symmetry.kind != "translation":
                full = acted(full, s, a, derived)
        return full

    def measure(cur: Flat, q: jax.Array | None = None):
        """The state of the loop at ``cur``: the squares of shared leaves and the squared
        generator norms (the Gram operator's), the charge errors, the movable groups, the
        largest relative error and the largest one over the movable groups (``q``: the
        charges, if known)."""
        squares = _squares(syms, cur)
        measured = [s.measured(cur, squares) for s in syms]
        q = lay.join([m[0] for m in measured]) if q is None else q
        norms = lay.join([m[1] for m in measured])
        err = target - q
        mask = _movable(q, norms, target, shift, no_out)
        scales = jnp.maximum(target_size, jnp.stack([m[2] for m in measured]))
        rel = safe_div(jnp.abs(err), lay.spread(scales))
        worst = jnp.max(rel)
        # NaN (non-finite input) stops the loop at once and is reported.
        moving = jnp.max(rel * mask) + 0 * worst
        return (norms, squares), err, mask, worst, moving

    def cond(state):
        # At least one step (as a closed-form move, which is exact to rounding, would make):
        # a charge already within tol of its target is still brought well below it.
        it, _, _, _, _, _, _, moving = state
        return (it < max_iter) & ((moving > tol) | ((it == 0) & jnp.isfinite(moving)))

    def body(state):
        it, acc, sub, point, err, mask, _, moving = state
        cur = view(acc, sub)
        matvec, solve, _, _ = _normal_equations(syms, lay, cur, mask, point)
        eta = jnp.minimum(jnp.maximum(tol / (16 * moving), moving), 0.1)
        c, _ = _pcg(
            matvec, solve, mask * err, MOVE_CG_MAX_ITER, lambda rz, rz0: rz <= eta * eta * rz0
        )
        big = jnp.max(jnp.where(shift, 0, jnp.abs(c)))
        shrink = jnp.where(big > 1, 1 / jnp.where(big > 1, big, 1), 1)
        # This step's group elements exp(c) (the shift c itself for a Translation) and the
        # accumulated ones, computed once (not redone for every entry of the leaves).
        step = jnp.where(shift, shrink * c, jnp.exp(shrink * c))
        acc = acc * jnp.where(shift, 1, step)
        step, acc = reductions.finished(jnp.isfinite(moving), (step, acc))
        moved = with_carried(sub)
        for s, a in zip(syms, lay.split(step)):
            moved = acted(moved, s, a, carried)
        sub = [moved[i] for i in carried]
        return it + 1, acc, sub, *measure(view(acc, sub))

    start = measure(cand, lay.join(charges))
    state = (jnp.zeros((), jnp.int32), jnp.ones_like(target), [cand[i] for i in carried], *start)
    _, acc, sub, _, _, _, worst, _ = jax.lax.while_loop(cond, body, state)
    out = view(acc, sub)
    return {i: out[i] for i in leaves}, worst


def sweep_move(
    syms: Sequence[BoundSymmetry], cand: Flat, targets: Sequence[jax.Array], max_sweeps: int
) -> Moved:
    """Move ``cand`` to the targets of overlapping symmetries, one Linear among them, by
    sweeps of each symmetry's own move in turn (block Gauss-Seidel on the charges) until the
    largest relative residual is below 64 eps or after ``max_sweeps`` sweeps."""
    leaves = _component_leaves(syms)
    tol = 64 * jnp.finfo(cand[leaves[0]].dtype).eps

    def view(sub):
        return apply_moved(cand, dict(zip(leaves, sub)), add=False)

    def sweep(sub):
        cur = view(sub)
        for s, t in zip(syms, targets):
            cur = apply_moved(cur, s.move_to(cur, t), add=False)
        return [cur[i] for i in leaves]

    def worst(sub):
        cur = view(sub)
        return jnp.max(jnp.stack([s.residual(cur, t) for s, t in zip(syms, targets)]))

    def cond(state):
        it, _, res = state
        return (it < max_sweeps) & (res > tol)

    def body(state):
        it, sub, _ = state
        sub = sweep(sub)
        return it + 1, sub, worst(sub)

    # At least one sweep (the candidate is not measured): the residual starts at infinity.
    state = (jnp.zeros((), jnp.int32), [cand[i] for i in leaves], jnp.asarray(jnp.inf, tol.dtype))
    _, sub, _ = jax.lax.while_loop(cond, body, state)
    return dict(zip(leaves, sub))
