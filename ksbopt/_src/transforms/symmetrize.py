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

from ksbopt._src import checks, reductions
from ksbopt._src.numerics import all_finite_values, safe_div
from ksbopt._src.symmetries import orbit
from ksbopt._src.symmetries.declarations import apply_moved
from ksbopt._src.transforms import transport

SUPPORTED_KINDS = ("scale", "translation")


class SymmetrizeState(NamedTuple):
    """State of :func:`symmetrize`.

    Attributes:
      initial: the charges at ``init``, one array per symmetry (the level set kept).
      residual: largest relative charge error after the last step (float32, ~eps),
        ``residual = max_g |Q_g - Q_g(w_0)| / scale_g``, of the closed-form retraction
        computed from the per-group sums (the new parameters are not measured again: that
        would take one more pass over them).
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

    [derived] :ref:`symmetries`, :ref:`orbit-moves`. Scale: u = w / |w| and g_hat = |w| g
    (the gradient of the loss at u, because L(a w) = L(w) gives grad L(a w) = grad L(w) / a).
    Translation: w - mean(w) 1 and g - mean(g) 1 per group. The gradient is also projected on
    the tangent space at the invariant point (a true symmetry makes that a no-op up to
    rounding).

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
            inv_w = apply_moved(inv_w, b.act(w, safe_div(jnp.ones_like(r), r)), add=False)
            if g is not None:
                inv_g = apply_moved(inv_g, b.act(g, r), add=False)
        else:
            radii.append(None)
            inv_w = apply_moved(inv_w, b.act(w, -b.charge(w) / b.norms(w)), add=False)
    if g is not None:
        inv_g = _project(binding, inv_w, inv_g)
    return inv_w, inv_g, radii


class _Group:
    """One declaration's groups inside a :func:`symmetrize` step, in two passes over memory.

    [derived] Every vector of the step is a per-group combination of the leaf-sized ``w``,
    ``g``, the base's step ``v`` and its first moments ``m``, so what the step needs of them
    are per-group sums of their products: ``|w|^2``, ``<w, g>`` (scale; ``sum w``, ``sum g``
    for a translation) before the base runs, ``<v, w>``, ``|v|^2``, ``<m, w>``, ``<m, v>``
    (``sum v``, ``sum m``) after it, each set in ONE pass (``reductions.group_sums``). The
    update and the transported moments are then written in one elementwise pass; no
    leaf-sized intermediate is stored. With ``r = |w|``, ``c = <w, g> / r^2``,
    ``t = <v, w> / r^2`` (scale):

    - invariant point ``w / r``, gradient there ``r (g - c w)``;
    - the step's tangent part mapped back, ``cand = w + r (v - t w)``, with
      ``|cand|^2 = r^2 + r^2 (|v|^2 - t <v, w>)`` (``v - t w`` is orthogonal to ``w``);
    - retraction ``a cand``, ``a = sqrt(2 Q_0 / |cand|^2)``, the closed form of
      ``Scale.move_to``; the residual reported is that of this closed form;
    - a first moment ``m`` projected on the tangent space at ``cand / |cand|``:
      ``m - (<m, cand> / |cand|^2) cand``.

    Translation: ``w - mean(w)``, ``g - mean(g)``, ``v - mean(v)`` shifted so that the sum
    returns to ``Q_0``, and ``m - mean(m)``.
    """

    def __init__(self, b, w: list, g: list):
        self.b = b
        self.scale = b.symmetry.kind == "scale"
        names = (("w", "w"), ("w", "g")) if self.scale else (("w",), ("g",))
        a, c = reductions.group_sums(b, _products(names, {"w": w, "g": g}))
        if self.scale:
            self.ww, self.wg = a, c
            self.r = jnp.sqrt(a)
            self.c = safe_div(c, a)
        else:
            self.count = b.norms(w)  # entries per group (static)
            self.sum_w, self.sum_g = a, c

    def _per(self, i: int, x: jax.Array) -> jax.Array:
        """Per-group values broadcast onto leaf ``i`` (the sum of its parts: one part per
        leaf for these declarations)."""
        (p,) = [p for p in self.b.parts if p.leaf == i]
        return p.broadcast(x[p.offset : p.offset + p.size])

    def invariant(self, i, w):
        if self.scale:
            return self._per(i, safe_div(jnp.ones_like(self.r), self.r)) * w
        return w - self._per(i, self.sum_w / self.count)

    def gradient(self, i, w, g):
        if self.scale:
            return self._per(i, self.r) * g - self._per(i, self.r * self.c) * w
        return g - self._per(i, self.sum_g / self.count)

    def measure_step(self, w: list, v: list, firsts: list) -> None:
        vectors = {"w": w, "v": v} | {f"m{k}": m for k, m in enumerate(firsts)}
        if self.scale:
            names = [("v", "w"), ("v", "v")]
            names += [(f"m{k}", x) for k in range(len(firsts)) for x in ("w", "v")]
        else:
            names = [("v",)] + [(f"m{k}",) for k in range(len(firsts))]
        sums = reductions.group_sums(self.b, _products(names, vectors))
        if self.scale:
            vw, vv = sums[0], sums[1]
            self.t = safe_div(vw, self.ww)
            self.cand_sq = self.ww + self.ww * (vv - self.t * vw)
            self.first_cand = [
                (1 - self.r * self.t) * mw + self.r * mv
                for mw, mv in zip(sums[2::2], sums[3::2], strict=True)
            ]
        else:
            self.mean_v = sums[0] / self.count
            self.mean_first = [s / self.count for s in sums[1:]]

    def retract_to(self, q0: jax.Array) -> None:
        if self.scale:
            q = 0.5 * self.cand_sq
            ok = (q > 0) & (q0 > 0)
            self.a = jnp.where(ok, jnp.sqrt(jnp.where(ok, q0, 1) / jnp.where(ok, q, 1)), 1)
            self.residual = safe_div(jnp.max(jnp.abs(self.a**2 * q - q0)), jnp.max(q0))
        else:
            self.shift = (q0 - self.sum_w) / self.count
            self.residual = jnp.zeros((), q0.dtype)

    def coefficients(self) -> dict:
        """The per-group numbers the last pass applies (see :meth:`update`,
        :meth:`transport`)."""
        if self.scale:
            a, r, t = self.a, self.r, self.t
            d = [safe_div(x, self.cand_sq) for x in self.first_cand]
            return {
                "w": a * (1 - r * t) - 1,
                "v": a * r,
                "mw": [x * (1 - r * t) for x in d],
                "mv": [x * r for x in d],
            }
        return {"v": self.shift - self.mean_v, "m": self.mean_first}

    def update(self, i, w, v, coefficients):
        if self.scale:
            return self._per(i, coefficients["w"]) * w + self._per(i, coefficients["v"]) * v
        return v + self._per(i, coefficients["v"])

    def transport(self, i, k, w, v, m, coefficients):
        if self.scale:
            mw, mv = coefficients["mw"][k], coefficients["mv"][k]
            return m - self._per(i, mw) * w - self._per(i, mv) * v
        return m - self._per(i, coefficients["m"][k])

    def checks(self) -> list:
        if self.scale:
            return [jnp.sum(self.wg), jnp.sum(self.cand_sq)] + [jnp.sum(x) for x in self.first_cand]
        return [jnp.sum(self.sum_g), jnp.sum(self.mean_v)] + [jnp.sum(x) for x in self.mean_first]


def _products(names, vectors):
    """``products(i)`` for :func:`reductions.group_sums`: the named products of leaf ``i``."""

    def products(i):
        out = []
        for name in names:
            x = vectors[name[0]][i]
            for other in name[1:]:
                x = x * vectors[other][i]
            out.append(x)
        return out

    return products


def _invariant_trees(groups: list, w: list, g: list, params: Any, updates: Any):
    """The parameters and the gradient in orbit-invariant coordinates, as trees of the
    caller's dtypes (what the base optimizer sees)."""
    inv_w, inv_g = list(w), list(g)
    for grp in groups:
        for i in grp.b.leaves:
            inv_w[i], inv_g[i] = grp.invariant(i, w[i]), grp.gradient(i, w[i], g[i])

    def like(xs, tree):
        leaves = jax.tree.leaves(tree)
        return jax.tree.unflatten(
            jax.tree.structure(tree), [x.astype(y.dtype) for x, y in zip(xs, leaves, strict=True)]
        )

    return like(inv_w, params), like(inv_g, updates)


def _first_moments(inner: Any, params: Any, table: dict) -> list:
    """The first-moment trees of the base state, as lists of promoted leaves."""
    firsts = []
    transport.map_moments(inner, params, table, {"first": lambda t: firsts.append(t) or t})
    return [orbit.promote(jax.tree.leaves(t)) for t in firsts]


def _checks(groups: list, g: list, v: list) -> list:
    """Scalars that are finite iff the gradient, the base's step and first moments are."""
    values = [x for grp in groups for x in grp.checks()]
    grouped = {i for grp in groups for i in grp.b.leaves}
    return values + [jnp.sum(g[i]) + jnp.sum(v[i]) for i in range(len(g)) if i not in grouped]


def _transport(inner, params, table, groups_and_coefficients, w, v, firsts):
    """The base state with every first moment projected on the tangent space at the new
    point (second moments and other fields kept)."""
    groups, coefficients = groups_and_coefficients
    moved = iter(range(len(firsts)))

    def project_first(tree):
        k = next(moved)
        out = list(firsts[k])
        for grp, c in zip(groups, coefficients, strict=True):
            for i in grp.b.leaves:
                out[i] = grp.transport(i, k, w[i], v[i], out[i], c)
        leaves = jax.tree.leaves(tree)
        return jax.tree.unflatten(
            jax.tree.structure(tree), [o.astype(x.dtype) for o, x in zip(out, leaves)]
        )

    return transport.map_moments(inner, params, table, {"first": project_first})


def symmetrize(
    base: optax.GradientTransformation,
    symmetries,
    *,
    moments: dict[str, str] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Run ``base`` with a kinetic energy invariant under the declared symmetries.

    The base optimizer sees orbit-invariant coordinates ([derived] :ref:`symmetries`,
    :ref:`orbit-moves`):

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
    scale group the effective learning rate no longer depends on the norm (:ref:`P2 <p2>`).
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
    checks.check_transformation(owner, "base", base, example="optax.adam(1e-3)")
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
        checks.require_params(params, "ksbopt.symmetrize")
        binding = _bind(syms, params, owner=owner)
        w = orbit.promote(jax.tree.leaves(params))
        g = orbit.promote(jax.tree.leaves(updates))
        groups = [_Group(b, w, g) for b in binding.bound]  # first pass: sums of w, g
        inv_params, inv_updates = _invariant_trees(groups, w, g, params, updates)
        steps, inner = base.update(inv_updates, state.inner_state, inv_params, **extra_args)
        v = orbit.promote(jax.tree.leaves(steps))
        firsts = _first_moments(inner, params, table)
        for grp, q0 in zip(groups, state.initial, strict=True):
            grp.measure_step(w, v, firsts)  # second pass: the step, the first moments
            grp.retract_to(q0)
        # A non-finite gradient, step or base state skips the step: zero updates, state kept.
        # Every such value reaches a per-group sum (or the sums of the ungrouped leaves).
        # One reduction of every check: its one scalar is what the elementwise passes below read.
        ok = all_finite_values(_checks(groups, g, v))
        coefficients = [grp.coefficients() for grp in groups]
        new = list(v)
        for grp, c in zip(groups, coefficients, strict=True):
            for i in grp.b.leaves:
                new[i] = grp.update(i, w[i], v[i], c)
        inner = _transport(inner, params, table, (groups, coefficients), w, v, firsts)
        residual = jnp.max(jnp.stack([grp.residual for grp in groups])).astype(jnp.float32)
        new = [jnp.where(ok, n, 0).astype(u.dtype) for n, u in zip(new, jax.tree.leaves(updates))]
        return (
            jax.tree.unflatten(jax.tree.structure(updates), new),
            SymmetrizeState(
                state.initial,
                jnp.where(ok, residual, state.residual),
                jax.tree.map(lambda a, b: jnp.where(ok, a, b), inner, state.inner_state),
            ),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
