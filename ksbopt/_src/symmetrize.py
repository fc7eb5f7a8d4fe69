"""Any optimizer with a kinetic energy that respects the declared symmetries: ``symmetrize``.

The base optimizer never sees a coordinate that the loss does not depend on. For a scale
group it sees the unit direction and the gradient there; for a translation group the
sum-free part and the sum-free gradient. Its step is mapped back along the tangent space of
the orbit quotient and retracted onto the level set of the initial charges, and its state is
carried to the new point. Two runs whose initial parameters differ by a group action are then
the same run: same losses, same directions, same base-optimizer state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ksbopt._src import orbit, transport
from ksbopt._src.symmetry import _safe_div

SUPPORTED_KINDS = ("scale", "translation")


class SymmetrizeState(NamedTuple):
    """State of :func:`symmetrize`.

    Attributes:
      initial: the charges at ``init``, one array per symmetry (the level set kept).
      residual: largest relative charge error after the last step (float32, ~eps),
        ``residual = max_g |Q_g - Q_g(w_0)| / scale_g``.
      inner_state: the base optimizer's state, in orbit-invariant coordinates.

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> tx = ksbopt.symmetrize(optax.adam(0.1), ksbopt.Scale("w", axis=None))
      >>> state = tx.init({"w": jnp.array([3.0, 4.0])})
      >>> state.initial, type(state.inner_state[0]).__name__
      ((Array([12.5], dtype=float32),), 'ScaleByAdamState')

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716
    """

    initial: tuple
    residual: jax.Array
    inner_state: Any


def _check_symmetries(syms: tuple, *, owner: str) -> None:
    for s in syms:
        if s.kind not in SUPPORTED_KINDS:
            raise ValueError(
                f"{owner} supports the symmetry kinds {SUPPORTED_KINDS} (ksbopt.Scale, "
                f"ksbopt.Translation); got {s!r} of kind {s.kind!r}. Keep a Rescale or Linear "
                "symmetry out of this list and handle it with ksbopt.project / ksbopt.retract / "
                "ksbopt.steer in the same chain."
            )


def _bind(syms: tuple, params: Any, *, owner: str) -> orbit.Binding:
    binding = orbit.bind(syms, params)
    for comp in binding.components:
        if len(comp) > 1:
            names = [binding.bound[i].symmetry for i in comp]
            raise ValueError(
                f"{owner}: the symmetries {names} act on the same leaves; each leaf may belong "
                "to one declaration only here. Declare the symmetries on disjoint leaves."
            )
    return binding


def _project(binding: orbit.Binding, flat: list, u: list) -> list:
    """``u`` minus its component along every generator at ``flat`` (jointly)."""
    return orbit.project(binding, flat, u)[0]


def invariant_coordinates(binding: orbit.Binding, w: list, g: list | None = None):
    """Orbit-invariant parameters (and gradient) of every declared group.

    [derived] THEORY.md section 1/6. Scale: u = w / |w| and g_hat = |w| g (the gradient of
    the loss at u, because L(a w) = L(w) gives grad L(a w) = grad L(w) / a). Translation:
    w - mean(w) 1 and g - mean(g) 1 per group. The gradient is also projected on the tangent
    space at the invariant point (a true symmetry makes that a no-op up to rounding).

    Returns:
      ``(inv_w, inv_g, radii)`` as flat lists (``inv_g`` is ``None`` without ``g``) and,
      per symmetry, the group norms |w| of a scale symmetry (``None`` for translation).
    """
    inv_w = list(w)
    inv_g = None if g is None else list(g)
    radii = []
    for b in binding.bound:
        if b.symmetry.kind == "scale":
            r = jnp.sqrt(2 * b.charge(w))
            radii.append(r)
            inv_w = orbit._apply(inv_w, b.act(w, _safe_div(jnp.ones_like(r), r)), add=False)
            if g is not None:
                inv_g = orbit._apply(inv_g, b.act(g, r), add=False)
        else:
            radii.append(None)
            inv_w = orbit._apply(inv_w, b.act(w, -b.charge(w) / b.norms(w)), add=False)
    if g is not None:
        inv_g = _project(binding, inv_w, inv_g)
    return inv_w, inv_g, radii


def symmetrize(
    base: optax.GradientTransformation,
    symmetries,
    *,
    moments: dict[str, str] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Run ``base`` with a kinetic energy invariant under the declared symmetries.

    The base optimizer sees orbit-invariant coordinates (THEORY.md sections 1, 6 [derived]):

    - scale group: the direction :math:`u = w / \lVert w \rVert` and the gradient at it,
      :math:`\hat g = \lVert w \rVert\, g` (projected on the tangent space,
      :math:`\hat g - \langle \hat g, u\rangle u`);
    - translation group: :math:`w - \bar w \mathbf 1` and :math:`g - \bar g \mathbf 1`;
    - every other leaf: itself.

    Its update :math:`v` is projected on the tangent space at the invariant point,
    :math:`v_\perp = v - J (J^\top J)^{-1} J^\top v`, mapped back (scale:
    :math:`w + \lVert w \rVert v_\perp`, translation: :math:`w + v_\perp`) and retracted onto
    the level set of the charges at ``init``, so the charges (squared norms, sums) are
    conserved exactly and rounding never accumulates. The base state is then transported:
    its first moments (fields ``mu``, ``trace``, ...) are projected on the tangent space at
    the new invariant point; second moments (``nu``, ...) are invariant and kept.

    The kinetic energy of the resulting learning rule is the base's, evaluated on the
    quotient by the orbits: it has the symmetry (no kinetic symmetry breaking), so for a
    scale group the effective learning rate no longer depends on the norm (THEORY.md P2).
    Consequence (property tested in float64): two runs whose initial parameters differ by a
    group action give the same losses and the same directions.

    Args:
      base: any optax optimizer (``GradientTransformation`` or ``...ExtraArgs``).
      symmetries: :class:`~ksbopt.Scale` and :class:`~ksbopt.Translation` declarations on
        disjoint leaves (other kinds raise ``ValueError``).
      moments: extra state field names of ``base`` that hold first moments (sums of
        gradients: ``"first"``, projected) or second moments (``"second"``, kept); optax's
        names are known already. A parameter-shaped field with another name is kept as is.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`SymmetrizeState`; its
      ``update`` needs ``params`` and passes extra arguments on to ``base``.

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> tx = ksbopt.symmetrize(optax.adam(0.1), ksbopt.Scale("w", axis=None))
      >>> u, _ = tx.update({"w": jnp.array([0.4, -0.3])}, tx.init(params), params)
      >>> round(float(jnp.linalg.norm(optax.apply_updates(params, u)["w"])), 5)
      5.0

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716 (kinetic symmetry breaking);
      Absil, Mahony, Sepulchre, "Optimization Algorithms on Matrix Manifolds", 2008
      (projection retraction and vector transport by projection).
    """
    owner = "ksbopt.symmetrize"
    if not isinstance(base, optax.GradientTransformation):
        raise TypeError(
            f"{owner}: base={base!r} is not an optax GradientTransformation; pass an optimizer "
            "such as optax.adam(1e-3)."
        )
    syms = orbit.as_symmetries(symmetries)
    _check_symmetries(syms, owner=owner)
    table = transport.check_moments(moments, owner=owner)
    base = optax.with_extra_args_support(base)

    def init_fn(params):
        binding = _bind(syms, params, owner=owner)
        flat = jax.tree.leaves(params)
        w = orbit.promote(flat)
        inv_w, _, _ = invariant_coordinates(binding, w)
        inv = jax.tree.unflatten(
            jax.tree.structure(params), [x.astype(p.dtype) for x, p in zip(inv_w, flat)]
        )
        initial = orbit.charges(binding, w)
        return SymmetrizeState(initial, jnp.zeros((), jnp.float32), base.init(inv))

    def update_fn(updates, state, params=None, **extra_args):
        orbit.require_params(params, "symmetrize")
        binding = _bind(syms, params, owner=owner)
        treedef = jax.tree.structure(params)
        flat_p = jax.tree.leaves(params)
        flat_u = jax.tree.leaves(updates)
        w = orbit.promote(flat_p)
        inv_w, inv_g, radii = invariant_coordinates(binding, w, orbit.promote(flat_u))
        inv_params = jax.tree.unflatten(treedef, [x.astype(p.dtype) for x, p in zip(inv_w, flat_p)])
        inv_updates = jax.tree.unflatten(
            jax.tree.structure(updates), [x.astype(u.dtype) for x, u in zip(inv_g, flat_u)]
        )
        steps, inner = base.update(inv_updates, state.inner_state, inv_params, **extra_args)
        v = orbit.promote(jax.tree.leaves(steps))
        v_t = _project(binding, inv_w, v)
        cand = [x + s for x, s in zip(w, v)]
        for b, r in zip(binding.bound, radii):
            mapped = b.act(v_t, r) if r is not None else {i: v_t[i] for i in b.leaves}
            cand = orbit._apply(cand, {i: w[i] + m for i, m in mapped.items()}, add=False)
        # retraction onto the initial charges (closed form: the groups are disjoint)
        moved = cand
        for b, q0 in zip(binding.bound, state.initial, strict=True):
            moved = orbit._apply(moved, b.move_to(moved, q0), add=False)
        residual = jnp.max(
            jnp.stack(
                [
                    b.residual(moved, q0).astype(jnp.float32)
                    for b, q0 in zip(binding.bound, state.initial, strict=True)
                ]
            )
        )
        new_inv, _, _ = invariant_coordinates(binding, moved)

        def project_first(tree):
            leaves = jax.tree.leaves(tree)
            out = _project(binding, new_inv, orbit.promote(leaves))
            return jax.tree.unflatten(
                jax.tree.structure(tree), [o.astype(x.dtype) for o, x in zip(out, leaves)]
            )

        inner = transport.map_moments(inner, params, table, {"first": project_first})
        new = [(m - x).astype(u.dtype) for m, x, u in zip(moved, w, flat_u)]
        ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in new + flat_u]))
        new = [jnp.where(ok, n, jnp.zeros_like(n)) for n in new]
        inner = jax.tree.map(lambda a, b: jnp.where(ok, a, b), inner, state.inner_state)
        residual = jnp.where(ok, residual, state.residual)
        return (
            jax.tree.unflatten(jax.tree.structure(updates), new),
            SymmetrizeState(state.initial, residual, inner),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
