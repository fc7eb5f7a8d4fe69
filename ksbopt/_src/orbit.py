"""Several symmetries at once: binding a declaration, joint projection, joint orbit moves.

:func:`bind` resolves a list of declarations against a parameter tree (once per tree
structure, cached) and finds which symmetries overlap on the same leaves. Symmetries that
share no leaf are handled group by group; overlapping ones are solved jointly:

- :func:`project` removes the component of a vector along the span of ALL generators by
  solving the Gram system (J^T J) c = J^T u, dense over the overlapping symmetries;
- :func:`move` applies group actions until every charge equals its target, sweeping over
  overlapping symmetries until the largest relative residual is below 64 eps.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ksbopt._src import groups as groups_lib
from ksbopt._src.symmetry import BoundSymmetry, Flat, Symmetry


def as_symmetries(symmetries: Any, *, what: str = "symmetries") -> tuple[Symmetry, ...]:
    """Validate a declaration list at construction time."""
    if isinstance(symmetries, Symmetry):
        symmetries = (symmetries,)
    if not isinstance(symmetries, (list, tuple)):
        raise TypeError(
            f"{what}={symmetries!r} must be a Symmetry or a list of them, e.g. "
            "[ksbopt.Scale('conv/kernel', axis=-1)]."
        )
    if not symmetries:
        raise ValueError(
            f"{what}=[] declares nothing; give at least one ksbopt.Scale, "
            "Rescale, Translation or Linear."
        )
    for s in symmetries:
        if not isinstance(s, Symmetry):
            raise TypeError(
                f"{what} holds {s!r} of type {type(s).__name__}; each entry must be "
                "a ksbopt.Scale, Rescale, Translation or Linear."
            )
    seen = set()
    for s in symmetries:
        if s in seen:
            raise ValueError(f"{what} declares {s!r} twice; declare each symmetry once.")
        seen.add(s)
    return tuple(symmetries)


@dataclasses.dataclass(frozen=True)
class Binding:
    """Declarations resolved against one tree structure."""

    bound: tuple[BoundSymmetry, ...]
    components: tuple[tuple[int, ...], ...]  # indices into ``bound`` that share leaves
    n_leaves: int


def _components(bound: Sequence[BoundSymmetry]) -> tuple[tuple[int, ...], ...]:
    parent = list(range(len(bound)))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(bound)):
        for j in range(i):
            if set(bound[i].leaves) & set(bound[j].leaves):
                parent[find(i)] = find(j)
    comps: dict[int, list[int]] = {}
    for i in range(len(bound)):
        comps.setdefault(find(i), []).append(i)
    return tuple(tuple(c) for c in comps.values())


def _check_conflicts(bound: Sequence[BoundSymmetry], paths: list[str]) -> None:
    scale = [b for b in bound if b.symmetry.kind == "scale"]
    for i, a in enumerate(scale):
        for b in scale[:i]:
            shared = sorted(set(a.leaves) & set(b.leaves))
            if shared:
                names = [paths[k] for k in shared]
                raise ValueError(
                    f"{b.symmetry!r} and {a.symmetry!r} both claim {names} as Scale groups. "
                    "One kernel has one normalisation: declare a single Scale per leaf (axis=-1 "
                    "per output unit for BatchNorm, axis=None for LayerNorm over the layer)."
                )


@functools.lru_cache(maxsize=256)
def _bind_cached(symmetries, treedef, shapes) -> Binding:
    leaves = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    bound = tuple(s.bind(params) for s in symmetries)
    _check_conflicts(bound, groups_lib.leaf_paths(params))
    return Binding(bound, _components(bound), len(leaves))


def bind(symmetries: tuple[Symmetry, ...], params: Any) -> Binding:
    """Resolve ``symmetries`` against the structure of ``params`` (cached per structure)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    shapes = tuple((tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves)
    return _bind_cached(symmetries, treedef, shapes)


def require_params(params: Any, name: str) -> None:
    if params is None:
        raise ValueError(
            f"ksbopt.{name} needs the current parameters: params=None was given. Call "
            f"tx.update(updates, state, params) (optax.apply_updates after it), or with flax "
            "nnx.Optimizer(model, tx, wrt=nnx.Param), which passes them."
        )


def promote(flat: Flat) -> Flat:
    """Leaves in their compute dtype (at least float32)."""
    return [jnp.asarray(x, groups_lib.compute_dtype(jnp.result_type(x))) for x in flat]


def charges(binding: Binding, flat: Flat) -> tuple[jax.Array, ...]:
    return tuple(b.charge(flat) for b in binding.bound)


def _apply(flat: Flat, moved: dict, sign: float = 1.0, add: bool = True) -> Flat:
    out = list(flat)
    for i, v in moved.items():
        out[i] = out[i] + sign * v if add else v
    return out


def _cross_gram(flat: Flat, a: BoundSymmetry, b: BoundSymmetry) -> jax.Array:
    """The block J_a^T J_b of the Gram matrix, by applying J_a^T J_b to each basis vector."""
    zeros = [jnp.zeros_like(x) for x in flat]

    def column(e):
        return a.reduce(flat, _apply(zeros, b.expand(flat, e), add=False)).reshape(-1)

    eye = jnp.eye(b.coef_size, dtype=flat[b.leaves[0]].dtype)
    return jax.lax.map(column, eye, batch_size=min(b.coef_size, 64)).T


def _pinv_solve(gram: jax.Array, r: jax.Array) -> jax.Array:
    lam, u = jnp.linalg.eigh(0.5 * (gram + gram.T))
    cutoff = gram.shape[0] * jnp.finfo(gram.dtype).eps * jnp.max(jnp.abs(lam))
    inv = jnp.where(lam > cutoff, 1 / jnp.where(lam > cutoff, lam, 1), 0)
    return u @ (inv * (u.T @ r))


def tangent_coefficients(binding: Binding, flat: Flat, u: Flat) -> list[jax.Array]:
    """Coefficients c with J c the orthogonal projection of ``u`` on span of the generators."""
    coefs: list[jax.Array] = [None] * len(binding.bound)  # type: ignore[list-item]
    for comp in binding.components:
        syms = [binding.bound[i] for i in comp]
        if len(syms) == 1:
            # The fast path: no Gram matrix, a closed form per group (one reduction per leaf
            # for Scale / Rescale / Translation, besides the norms).
            coefs[comp[0]] = syms[0].coefficients(flat, u)
            continue
        r = jnp.concatenate([s.reduce(flat, u).reshape(-1) for s in syms])
        gram = jnp.block(
            [[s.gram(flat) if s is t else _cross_gram(flat, s, t) for t in syms] for s in syms]
        )
        c = _pinv_solve(gram, r)
        start = 0
        for i, s in zip(comp, syms):
            coefs[i] = c[start : start + s.coef_size].reshape(s.charge_shape)
            start += s.coef_size
    return coefs


def project(binding: Binding, flat: Flat, u: Flat) -> tuple[Flat, list[jax.Array]]:
    """u minus its component along every generator of every group (jointly).

    Returns the projected leaves and the coefficients c of the removed component J c.
    """
    coefs = tangent_coefficients(binding, flat, u)
    out = list(u)
    for b, c in zip(binding.bound, coefs):
        out = _apply(out, b.expand(flat, c), sign=-1.0)
    return out, coefs


def move(
    binding: Binding,
    w: Flat,
    u: Flat,
    targets: Sequence[jax.Array],
    max_sweeps: int = 256,
    charges: Sequence[jax.Array] | None = None,
) -> tuple[Flat, jax.Array]:
    """Replace the step ``u`` by u' so that w + u' is on the orbit of w + u with the target
    charges.

    ``charges``, if given, are the charges Q(w + u) per symmetry that the caller computed
    already; closed-form moves use them instead of measuring them again.

    Returns the new update leaves and the largest relative residual |Q - target| / scale over
    the iterative solves (Linear, overlapping symmetries); closed-form moves are exact up to
    rounding and are not re-measured (that would cost a pass over the parameters).
    """
    out = list(u)
    measured = []
    for comp in binding.components:
        syms = [binding.bound[i] for i in comp]
        tgts = [targets[i] for i in comp]
        if len(syms) == 1:
            q = None if charges is None else charges[comp[0]]
            out = _apply(out, syms[0].step_to(w, u, tgts[0], charge=q), add=False)
            if not syms[0].closed_form_move:
                measured.append(comp[0])
            continue
        measured.extend(comp)
        leaves = sorted({i for s in syms for i in s.leaves})
        cand = [w[i] + u[i] if i in leaves else w[i] for i in range(len(w))]
        tol = 64 * jnp.finfo(cand[leaves[0]].dtype).eps

        def sweep(sub, syms=syms, tgts=tgts, leaves=leaves, cand=cand):
            cur = _apply(cand, dict(zip(leaves, sub)), add=False)
            for s, t in zip(syms, tgts):
                cur = _apply(cur, s.move_to(cur, t), add=False)
            return [cur[i] for i in leaves]

        def worst(sub, syms=syms, tgts=tgts, leaves=leaves, cand=cand):
            cur = _apply(cand, dict(zip(leaves, sub)), add=False)
            return jnp.max(jnp.stack([s.residual(cur, t) for s, t in zip(syms, tgts)]))

        def cond(state, worst=worst, tol=tol):
            it, sub = state
            return (it < max_sweeps) & (worst(sub) > tol)

        def body(state, sweep=sweep):
            it, sub = state
            return it + 1, sweep(sub)

        _, sub = jax.lax.while_loop(
            cond, body, (jnp.zeros((), jnp.int32), sweep([cand[i] for i in leaves]))
        )
        out = _apply(out, {i: v - w[i] for i, v in zip(leaves, sub)}, add=False)
    new_w = [w[i] + out[i] for i in range(len(w))] if measured else w
    residual = jnp.max(
        jnp.stack(
            [jnp.zeros((), jnp.float32)]
            + [binding.bound[i].residual(new_w, targets[i]).astype(jnp.float32) for i in measured]
        )
    )
    return out, residual
