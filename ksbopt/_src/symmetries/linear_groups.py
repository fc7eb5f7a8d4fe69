"""Linear bound to a tree: the GL(k) symmetry of a product A B (per head), charge A^T A - B B^T.

The charge is a ``k x k`` matrix per head; the Gram operator is a Kronecker sum solved by
eigendecomposition, and the orbit move to a target charge is a Newton solve on the group
element, whose residual is measured (``closed_form_move = False``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from ksbopt._src import groups as groups_lib
from ksbopt._src.symmetries.bound import BoundSymmetry, Flat, Moved, finfo_tol, without_overflow

if TYPE_CHECKING:
    from ksbopt._src.symmetries.declarations import Symmetry


@dataclasses.dataclass(frozen=True)
class LinearPart:
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


def _eigh(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues and eigenvectors of a batch (heads, k, k) of symmetric matrices, one
    matrix after the other.

    ``jnp.linalg.eigh`` on a batch runs, on CPU, as one LAPACK call that splits the batch
    over XLA's intra-op thread pool and waits for the parts; several such calls that XLA
    runs at once (the Gram solves of independent attention blocks) can occupy every thread
    of a small pool while waiting, and the program never finishes (seen with jax 0.10 on 2
    cores). A loop over the matrices makes each call a single matrix, which never waits on
    the pool; the matrices are k x k per head, so the loop costs little.
    """
    if m.ndim == 2:
        return jnp.linalg.eigh(m)
    return jax.lax.map(jnp.linalg.eigh, m)


def _eigh_fn(m: jax.Array, *fns) -> jax.Array | tuple[jax.Array, ...]:
    """Each of ``fns`` applied to the eigenvalues of a batch of symmetric matrices, from one
    eigendecomposition (a matrix function and its inverse share it)."""
    lam, u = _eigh(_sym(m))
    out = tuple(jnp.einsum("...ij,...j,...kj->...ik", u, fn(lam), u) for fn in fns)
    return out[0] if len(out) == 1 else out


def _sqrt(v: jax.Array) -> jax.Array:
    """Square root of eigenvalues, negative rounding clipped to 0."""
    return jnp.sqrt(jnp.maximum(v, 0))


def _inv_sqrt(v: jax.Array) -> jax.Array:
    """Pseudo-inverse square root of eigenvalues (0 where not positive)."""
    return jnp.where(v > 0, 1 / jnp.sqrt(jnp.where(v > 0, v, 1)), 0)


class BoundLinear(BoundSymmetry):
    """GL(k) acting on x A B: (A, B) -> (A G, G^-1 B), per head."""

    closed_form_move = False

    def __init__(
        self, symmetry: Symmetry, parts: tuple[LinearPart, ...], heads: int, k: int, max_iter: int
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
        return without_overflow(self.raw_charge, flat, self.leaves)

    def raw_charge(self, flat: Flat) -> jax.Array:
        p, r = self._pr(flat)
        return p - r

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
        lp, up = _eigh(p)
        lr, ur = _eigh(rr)
        den = lp[:, :, None] + lr[:, None, :]
        tol = finfo_tol(den) * jnp.max(jnp.abs(den), axis=(1, 2), keepdims=True)
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
        tol = finfo_tol(jnp.zeros((), dtype))
        sub = {i: flat[i] for i in self.leaves}

        def view(s):
            full = list(flat)
            for i, v in s.items():
                full[i] = v
            return full

        def measured(s):
            # P and R at the point, and its residual (as :meth:`residual`, from the same P, R).
            p, r = self._pr(view(s))
            scale = jnp.max(jnp.trace(p + r, axis1=-2, axis2=-1))
            return p, r, self._relative_error(p - r, scale, target)

        def cond(state):
            it, _, _, _, res = state
            return (it < self.max_iter) & (res > tol)

        def body(state):
            it, s, p, r, _ = state
            cur = view(s)
            e = target - (p - r)
            lam, u = _eigh(p + r)
            et = jnp.einsum("hai,hab,hbj->hij", u, e, u)
            den = lam[:, :, None] + lam[:, None, :]
            ok = den > finfo_tol(den) * jnp.max(jnp.abs(den), axis=(1, 2), keepdims=True)
            xt = jnp.where(ok, et / jnp.where(ok, den, 1), 0)
            # Trust region: a Newton step never rotates by more than exp(+-1) at once.
            scale = jnp.minimum(1.0, 1.0 / jnp.maximum(jnp.max(jnp.abs(xt)), 1e-30))
            xt = xt * scale
            x = jnp.einsum("hia,hab,hjb->hij", u, xt, u)
            g, g_inv = _eigh_fn(x, jnp.exp, lambda v: jnp.exp(-v))
            moved = self._act_pair(cur, g, g_inv)
            return it + 1, moved, *measured(moved)

        state = (jnp.zeros((), jnp.int32), sub, *measured(sub))
        _, sub, _, _, _ = jax.lax.while_loop(cond, body, state)
        return sub

    def balance(self, flat: Flat) -> Moved:
        """The closed-form balancing move to C = 0 (:ref:`orbit-moves`; the balancing of ENorm).

        [derived] With P = A^T A and R = B B^T (P positive definite), G = M^(1/2) for
        M = P^-1/2 (P^1/2 R P^1/2)^1/2 P^-1/2 gives G P G = G^-1 R G^-1, i.e. C = 0.
        """
        p, r = self._pr(flat)
        ph, pih = _eigh_fn(p, _sqrt, _inv_sqrt)
        m = pih @ _eigh_fn(ph @ r @ ph, _sqrt) @ pih
        # G = M^(1/2) (G^2 P G^2 = M P M = R), not M^(1/4).
        g, g_inv = _eigh_fn(m, _sqrt, _inv_sqrt)
        return self._act_pair(flat, g, g_inv)
