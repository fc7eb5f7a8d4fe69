"""Several symmetries at once: binding a declaration, projection and orbit moves.

:func:`bind` resolves a list of declarations against a parameter tree (once per tree
structure, cached) and finds which symmetries overlap on the same leaves. Symmetries that
share no leaf are handled group by group; overlapping ones are solved jointly:

- :func:`project` removes the component of a vector along the span of ALL generators: in
  closed form for a symmetry alone, by preconditioned conjugate gradients on the normal
  equations (J^T J) c = J^T u over overlapping symmetries (matrix-free: each iteration is
  one pass over their leaves, never a dense Gram matrix);
- :func:`move` applies group actions until every charge equals its target: in closed form
  for a symmetry alone, by Newton's method on the generator coefficients over overlapping
  Scale / Rescale / Translation symmetries (each Newton step one conjugate-gradient solve
  with the same Gram operator as the projection), by sweeps of each symmetry's own move
  where a Linear overlaps others; until the largest relative residual is below 64 eps.

The joint solvers of overlapping symmetries are :mod:`ksbopt._src.symmetries.joint_solve`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ksbopt._src import groups as groups_lib
from ksbopt._src import numerics, reductions
from ksbopt._src.numerics import default_tol
from ksbopt._src.symmetries import joint_solve
from ksbopt._src.symmetries.declarations import (
    BoundSymmetry,
    Flat,
    Symmetry,
    apply_moved,
)


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


def promote(flat: Flat) -> Flat:
    """Leaves in their compute dtype (at least float32)."""
    return [jnp.asarray(x, numerics.compute_dtype(jnp.result_type(x))) for x in flat]


def charges(binding: Binding, flat: Flat) -> tuple[jax.Array, ...]:
    return tuple(b.charge(flat) for b in binding.bound)


#: Default iteration cap of the joint projection (conjugate gradients).
PROJECT_MAX_ITER = 64


def project(
    binding: Binding,
    flat: Flat,
    u: Flat,
    *,
    max_iter=PROJECT_MAX_ITER,
    tol=None,
) -> tuple[Flat, list[jax.Array], jax.Array]:
    """u minus its component along every generator of every group (jointly).

    Symmetries that share no leaf with another are projected in closed form, one by one.
    Each connected component of overlapping symmetries is projected jointly by
    preconditioned conjugate gradients on its normal equations
    (:func:`ksbopt._src.symmetries.joint_solve.joint_project`) with at most ``max_iter``
    iterations and relative residual ``tol`` (default: 64 eps of the compute dtype).

    Returns the projected leaves, the coefficients c of the removed component J c (one array
    per symmetry) and the largest relative residual over the joint components (0 where
    every symmetry was projected in closed form; NaN for non-finite input).
    """
    out = list(u)
    coefs: list[jax.Array] = [None] * len(binding.bound)  # type: ignore[list-item]
    residuals = [jnp.zeros((), jnp.float32)]
    # The closed form per group: one reduction per leaf for Scale, Rescale and Translation
    # besides the norms; a Sylvester equation per head for Linear. The coefficients are
    # finished before the passes that apply them (else XLA redoes a group's sum over every
    # leaf it spans for every entry); non-finite ones stay in ``coefs`` for the caller's flag.
    alone = [comp[0] for comp in binding.components if len(comp) == 1]
    for i in alone:
        coefs[i] = binding.bound[i].coefficients(flat, u)
    applied = reductions.finished(numerics.all_finite_values([coefs[i] for i in alone]), coefs)
    for i in alone:
        out = apply_moved(out, binding.bound[i].expand(flat, applied[i]), sign=-1.0)
    for comp in (comp for comp in binding.components if len(comp) > 1):
        syms = [binding.bound[i] for i in comp]
        dtype = flat[syms[0].leaves[0]].dtype
        projected, cs, res = joint_solve.joint_project(
            syms, flat, u, max_iter, default_tol(dtype) if tol is None else tol
        )
        out = apply_moved(out, projected, add=False)
        for i, c in zip(comp, cs):
            coefs[i] = c
        residuals.append(res.astype(jnp.float32))
    return out, coefs, jnp.max(jnp.stack(residuals))


def move(
    binding: Binding,
    w: Flat,
    u: Flat,
    targets: Sequence[jax.Array],
    max_sweeps: int = 256,
    charges: Sequence[jax.Array] | None = None,
    max_iter: int = joint_solve.MOVE_MAX_ITER,
) -> tuple[Flat, jax.Array]:
    """Replace the step ``u`` by u' so that w + u' is on the orbit of w + u with the target
    charges.

    A symmetry alone moves in closed form (Scale, Rescale, Translation) or by its own Newton
    solve (Linear). Overlapping Scale, Rescale and Translation symmetries move jointly by
    Newton's method on their generator coefficients
    (:func:`ksbopt._src.symmetries.joint_solve.joint_move`, at most ``max_iter`` steps);
    overlapping symmetries with a Linear among them by sweeps of their own moves (at most
    ``max_sweeps``, :func:`ksbopt._src.symmetries.joint_solve.sweep_move`).

    ``charges``, if given, are the charges Q(w + u) per symmetry that the caller computed
    already; closed-form moves and the joint Newton solves use them instead of measuring
    them again.

    Returns the new update leaves and the largest relative residual |Q - target| / scale over
    the iterative solves (Linear, overlapping symmetries); closed-form moves are exact up to
    rounding and are not re-measured (that would cost a pass over the parameters).
    """
    out = list(u)
    measured, residuals = [], [jnp.zeros((), jnp.float32)]
    cand = None
    for comp in binding.components:
        syms = [binding.bound[i] for i in comp]
        tgts = [targets[i] for i in comp]
        if len(syms) == 1:
            q = None if charges is None else charges[comp[0]]
            out = apply_moved(out, syms[0].step_to(w, u, tgts[0], charge=q), add=False)
            if not syms[0].closed_form_move:
                measured.append(comp[0])
            continue
        if cand is None:
            cand = [a + b for a, b in zip(w, u)]
        if any(s.symmetry.kind == "linear" for s in syms):
            moved = joint_solve.sweep_move(syms, cand, tgts, max_sweeps)
            measured.extend(comp)
        else:
            qs = [s.charge(cand) for s in syms] if charges is None else [charges[i] for i in comp]
            dtype = cand[syms[0].leaves[0]].dtype
            moved, res = joint_solve.joint_move(syms, cand, tgts, qs, max_iter, default_tol(dtype))
            residuals.append(res.astype(jnp.float32))
        out = apply_moved(out, {i: v - w[i] for i, v in moved.items()}, add=False)
    if measured:
        new_w = [w[i] + out[i] for i in range(len(w))]
        residuals += [
            binding.bound[i].residual(new_w, targets[i]).astype(jnp.float32) for i in measured
        ]
    return out, jnp.max(jnp.stack(residuals))
