"""Noether diagnostics inside ``jit``: :func:`monitor` and its state.

:func:`monitor` wraps any optax transformation. It never changes the updates; it reads the
incoming gradient ``g``, the parameters ``w`` and the final step ``u`` of the wrapped
optimizer, and keeps in its state, per declared symmetry and per group (fixed shapes, read
with ``optax.tree.get(state, name)``):

- the charges before and after the step and their exact decomposition (:ref:`charge-decomposition`)
  ``Q(w + u) = Q(w) + <xi(w), u> + Q(u)``: ``first_order`` (metric, momentum and weight-decay
  breaking) and ``second_order`` (the finite-step kinetic breaking);
- ``violation``: the cosine between the gradient and the generator, 0 for a true symmetry;
- ``angular_update`` (the angle between w and w + u), ``relative_update`` |u| / |w| and, for
  scale groups, ``effective_learning_rate`` eta / ((1 - eta lam) |w|^2) (:ref:`p2`);
- with a :class:`~ksbopt._src.diagnostics.dynamics.Dynamics`: ``weight_decay_term``, the charge
  the exact recursions predict (``predicted_charges``) and the normalised residual
  (``prediction_error``); for RMSProp/Adam the metric-weighted charges of P6 and their
  prediction; the equilibrium angular update of P7a.

Cost model: the charges, decomposition, violation, angles and metric identities are the
*expensive* part (per-group sums of ``w w``, ``w u``, ``u u``, ``w g``, ``g g`` over the
symmetric leaves); with ``every=N`` they are computed every N steps under ``lax.cond`` (one
compiled program). The exact recursions need a few measured norms at *every* step (``|g|^2``
per group for P1/P10, ``|v|^2`` of the momentum buffer for P3): that *cheap* part always
runs, so the predictions stay exact. Each per-group product is reduced once per step, shared
by every quantity that uses it; on a large leaf all of them are reduced in one pass over
memory (one variadic reduction, see :class:`_Sums`), since an optimizer step is bound by
memory traffic, not arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ksbopt._src import groups as groups_lib
from ksbopt._src import reductions, theory
from ksbopt._src.diagnostics import dynamics as dynamics_lib
from ksbopt._src.numerics import all_finite, safe_div
from ksbopt._src.symmetries import orbit
from ksbopt._src.symmetries.declarations import BoundSymmetry

__all__ = ["MonitorState", "NoetherDiagnostics", "RecursionState", "monitor", "symmetry_labels"]

Flat = list


class NoetherDiagnostics(NamedTuple):
    """Diagnostics of the last recorded step: each field a tuple with one entry per symmetry.

    An entry is an array with one value per group (shape ``(n_groups,)``; ``(heads, k, k)``
    for the charges of a :class:`~ksbopt.Linear` symmetry, ``(heads,)`` for its per-group
    scalars), or None where the quantity does not apply (e.g. the effective learning rate of
    a rescale group, or any prediction without ``dynamics``). Charges follow
    :func:`ksbopt.charges`: ``1/2 |w|^2`` (scale), ``1/2 (|w_in|^2 - |w_out|^2)`` (rescale),
    ``<1, w>`` (translation), ``A^T A - B B^T`` (linear).

    Attributes:
      step: index (from 0) of the step these describe; -1 at ``init``.
      charges_before: Q(w) before the step.
      charges: Q(w + u) after it, from the exact identity
        ``Q(w + u) = Q(w) + first_order + second_order`` in the compute dtype (the charge of
        ``optax.apply_updates(params, updates)`` up to its rounding to the parameter dtype).
      first_order: ``<xi(w), u>`` (for Linear ``R + R^T`` with ``R = A^T U_A - U_B B^T``).
      second_order: ``Q(u)`` (0 for translation).
      weight_decay_term: ``Q((1 - eta lam) w) - Q(w)``, the part of the change that the decay
        factor of one step makes on its own (known dynamics only). It is contained in
        ``first_order + second_order``.
      violation: cosine between the incoming gradient g and the generator,
        ``<xi, g> / (|xi| |g|)`` per group (signed); for Linear the cosine between g and its
        projection on the generators of the head (>= 0). 0 for a true symmetry; a loss with
        L2 regularisation inside it shows the regulariser here.
      angular_update: angle in radians between the group's vector w and w + u.
      relative_update: ``|u| / |w|`` per group.
      effective_learning_rate: ``eta / ((1 - eta lam) |w|^2)`` of scale groups (:ref:`p2`;
        lam = 0 unless the dynamics are SGD), when the learning rate is known.
      predicted_charges: the charge after the step predicted by the exact recursion (P1, P3,
        P4, P10), run open-loop from the charges at ``init`` with the measured gradient or
        momentum norms of every step.
      prediction_error: ``(charges - predicted_charges) / scale`` per group, with scale the
        charge's natural size (``1/2 |w|^2`` for scale and rescale groups,
        ``sqrt(n) |w|`` for translation, ``|A|^2 + |B|^2`` per head for linear, where the
        error is the largest entry of the k x k difference).
      metric_charges_before: RMSProp/Adam: ``1/2 w^T P w`` (scale, rescale) or ``<P 1, w>``
        (translation) with the metric P of this step, before the step.
      metric_charges: the same after the step.
      predicted_metric_charges: the metric charge after the step by [derived] P6 (Adam: with
        its momentum term).
      metric_prediction_error: normalised residual of the metric charges.
      equilibrium_angular_update: [derived] P7a ``sqrt(2 eta lam / (1 + beta))`` for scale
        groups under SGD with coupled weight decay (a scalar per symmetry).

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> tx = ksbopt.monitor(optax.sgd(0.1), ksbopt.Scale("w", axis=None))
      >>> u, state = tx.update({"w": jnp.array([4.0, -3.0])}, tx.init(params), params)
      >>> d = state.diagnostics  # Q(w + u) = Q(w) + <w, u> + |u|^2 / 2
      >>> [float(a[0][0]) for a in (d.charges_before, d.first_order, d.second_order, d.charges)]
      [12.5, 0.0, 0.125, 12.625]

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716; Kunin et al., "Neural
      Mechanics: Symmetry and Broken Conservation Laws in Deep Learning Dynamics", ICLR
      2021, https://arxiv.org/abs/2012.04728
    """

    step: jax.Array
    charges_before: tuple
    charges: tuple
    first_order: tuple
    second_order: tuple
    weight_decay_term: tuple
    violation: tuple
    angular_update: tuple
    relative_update: tuple
    effective_learning_rate: tuple
    predicted_charges: tuple
    prediction_error: tuple
    metric_charges_before: tuple
    metric_charges: tuple
    predicted_metric_charges: tuple
    metric_prediction_error: tuple
    equilibrium_angular_update: tuple


class RecursionState(NamedTuple):
    """What the exact recursions carry from step to step (one entry per symmetry or None).

    The ``recursion`` field of :class:`MonitorState`. For heavy ball on a scale group the
    prediction needs the charge, the overlap and the buffer's kinetic term of the step before,
    e.g. ``x_{k+1} = x_k - 2 eta <w_k, v_{k+1}> + eta^2 |v_{k+1}|^2`` (:ref:`exact-identities`).

    Attributes:
      predicted_carry: the predicted charge after the last step (open loop).
      overlap_carry: P3's overlap ``<xi(w_k), v_{k+1}>`` in charge units.
      velocity_carry: ``Q(v_k)`` of the momentum buffer of the last step.
      previous_carry: the predicted charge one step earlier (P4 heavy ball).
      learning_rate_carry: eta of the last step (exact recursions under a schedule).

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> tx = ksbopt.monitor(optax.sgd(0.1, momentum=0.9), ksbopt.Scale("w"))
      >>> state = tx.init({"w": jnp.ones((3, 2))})
      >>> isinstance(state.recursion, ksbopt.RecursionState)
      True

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716
    """

    predicted_carry: tuple
    overlap_carry: tuple
    velocity_carry: tuple
    previous_carry: tuple
    learning_rate_carry: tuple


class MonitorState(NamedTuple):
    """State of :func:`monitor`.

    The predictions are open-loop runs of the exact recursions of the charges, e.g. for SGD
    with weight decay on a scale group ``x_{k+1} = (1 - eta lam)^2 x_k + eta^2 |g_k|^2``
    ([derived] :ref:`p1`), fed with the measured norms of every step.

    Attributes:
      inner: the wrapped optimizer's state.
      monitor_count: steps seen (a step whose gradient is not finite is not counted).
      diagnostics: :class:`NoetherDiagnostics` of the last recorded step.
      recursion: what the exact recursions carry from step to step, one entry per symmetry
        (the predicted charge, the heavy-ball overlap ``<xi(w_k), v_{k+1}>`` of P3, the
        charge of the momentum buffer, the previous prediction and learning rate).

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> tx = ksbopt.monitor(optax.sgd(0.1), ksbopt.Scale("w", axis=None))
      >>> state = tx.init(params)
      >>> int(state.monitor_count), int(state.diagnostics.step)
      (0, -1)

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716
    """

    inner: Any
    monitor_count: jax.Array
    diagnostics: NoetherDiagnostics
    recursion: RecursionState


# --------------------------------------------------------------------------- small numerics


def _strong(tree):
    """Arrays without weak types (a jitted step must return the types ``init`` made)."""
    return jax.tree.map(lambda x: jax.lax.convert_element_type(x, jnp.result_type(x)), tree)


def _dtype(b: BoundSymmetry, flat: Flat):
    return jnp.result_type(*[flat[i] for i in b.leaves])


def _partial(flat_like: Flat, values: dict) -> Flat:
    """A flat list with ``values`` at their leaf indices (None elsewhere, never read)."""
    out = [None] * len(flat_like)
    for i, v in values.items():
        out[i] = v
    return out


def _map_leaves(b: BoundSymmetry, fn, *flats) -> Flat:
    """``fn`` applied leaf-wise on the symmetry's leaves only."""
    return _partial(flats[0], {i: fn(*(f[i] for f in flats)) for i in b.leaves})


# ----------------------------------------------------------------- per-group building blocks


def _group_inner(b: BoundSymmetry, x: Flat, y: Flat) -> jax.Array:
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
_FUSED_MIN_SIZE = reductions.FUSED_MIN_SIZE

#: Per-group products the expensive diagnostics read, per symmetry kind ("1": the entries
#: themselves, e.g. "w1" = sum of w). Linear symmetries use their own matrix reductions.
_DIAGNOSE_PRODUCTS = {
    "scale": ("ww", "wu", "uu", "wg", "gg"),
    "rescale": ("ww", "wu", "uu", "wg", "gg"),
    "translation": ("w1", "u1", "g1", "ww", "uu", "wu", "gg"),
    "linear": (),
}


def _part_sums(part: groups_lib.AxisPart, products: Sequence[jax.Array]) -> list[jax.Array]:
    """``part.reduce(x)`` for every x in ``products``, on a large leaf in one pass over
    memory (:func:`ksbopt._src.reductions.part_sums`): the products of one leaf (w w, w u,
    u u, w g, g g, ...) would otherwise cost one pass each."""
    return reductions.part_sums(part, products, min_size=_FUSED_MIN_SIZE)


class _Sums:
    """Per-group sums of products of the monitored vectors, each reduced once per step.

    ``vectors`` maps a name to a flat list of leaves: ``w`` (params), ``u`` (final update),
    ``g`` (incoming gradient), ``v`` (momentum buffer). ``requests`` maps a symmetry index to
    the product names it will read ("wu" = sum of w * u per group, "w1" = sum of w); all of
    one leaf are reduced together (:func:`_part_sums`), a product asked later is reduced on
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
            sums = _part_sums(part, [self._product(part.leaf, n) for n in names])
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
            return _group_inner(b, self._flat(x), self._flat(y))
        return self._sum(i, x + y, False)


def _residual(b: BoundSymmetry, observed, predicted, scale) -> jax.Array:
    diff = observed - predicted
    if b.symmetry.kind == "linear":
        diff = jnp.max(jnp.abs(diff), axis=(-2, -1))
    return safe_div(diff, scale)


def _linear_grads(b: BoundSymmetry, g: Flat) -> tuple[jax.Array, jax.Array]:
    """G_A (heads, d, k) and G_B (heads, k, o) of a Linear symmetry, for theory P10."""
    left = [p.to_matrix(g[p.leaf]) for p in b.parts if p.left]
    right = [p.to_matrix(g[p.leaf]) for p in b.parts if not p.left]
    return jnp.concatenate(left, axis=1), jnp.concatenate(right, axis=2)


# --------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Which quantities apply to one symmetry under the given dynamics (static)."""

    kind: str
    recursion: str | None  # "sgd" | "hb" | "hbd" | "shift" | "shift_hb" | None
    metric: str | None  # "rmsprop" | "adam" | None
    equilibrium: bool
    effective_lr: bool


def _plan(b: BoundSymmetry, dyn: dynamics_lib.Dynamics | None, lr_known: bool) -> _Plan:
    kind = b.symmetry.kind
    recursion = metric = None
    equilibrium = False
    if dyn is not None and dyn.kind == "sgd":
        mom, wd = dyn.has_momentum, dyn.has_weight_decay
        if kind == "translation":
            if not mom or not wd or dyn.decoupled:
                recursion = "shift"  # P4: (1 - eta lam) s, or conserved
            elif not dyn.nesterov:
                recursion = "shift_hb"
        elif not mom:
            recursion = "sgd"  # P1 / P10
        elif not dyn.nesterov:
            recursion = "hbd" if dyn.decoupled else "hb"  # P3
        equilibrium = kind == "scale" and wd and not dyn.nesterov and (not mom or not dyn.decoupled)
    elif dyn is not None and dyn.adaptive:
        if kind != "linear" and (dyn.decoupled or not dyn.has_weight_decay):
            metric = dyn.kind
    return _Plan(kind, recursion, metric, equilibrium, kind == "scale" and lr_known)


def _some(values: Sequence, plans: Sequence[_Plan], fn) -> tuple:
    """``fn(value, plan)`` for symmetries with a recursion, None for the others."""
    return tuple(fn(v, p) if p.recursion else None for v, p in zip(values, plans, strict=True))


# --------------------------------------------------------------------------- the monitor


def symmetry_labels(symmetries) -> list[str]:
    """Short unique names of declarations, e.g. ``"scale:conv1/kernel"`` (for logs, plots)."""
    syms = orbit.as_symmetries(symmetries)
    labels = []
    for i, s in enumerate(syms):
        sel = (
            getattr(s, "selection", None)
            or getattr(s, "incoming", None)
            or getattr(s, "left", None)
        )
        first = sel[0] if sel else None
        name = first if isinstance(first, str) else str(i)
        label = f"{s.kind}:{name}"
        if label in labels:
            label = f"{label}#{i}"
        labels.append(label)
    return labels


def monitor(
    tx: optax.GradientTransformation,
    symmetries,
    *,
    dynamics: dynamics_lib.Dynamics | None = None,
    every: int = 1,
    learning_rate=None,
) -> optax.GradientTransformationExtraArgs:
    r"""Wrap any optax transformation and record Noether diagnostics in its state.

    The updates are those of ``tx``, unchanged. Per declared symmetry and group the state
    holds (see :class:`NoetherDiagnostics`) the exact per-step decomposition of the charge,
    [derived] :ref:`charge-decomposition`,

    .. math::

        Q(w + u) = Q(w) + \langle \xi(w), u \rangle + Q(u),

    the symmetry violation ``<xi, g> / (|xi| |g|)`` of the gradient, the angular and relative
    update, the effective learning rate ``eta / ((1 - eta lam) |w|^2)`` of scale groups
    ([derived] P2), and with ``dynamics`` the charges predicted by the exact recursions
    (P1, P3, P4, P10; P6 for RMSProp/Adam; the P7a equilibrium) and the residuals. Read them
    with ``optax.tree.get(state, "charges")``, ``optax.tree.get(state, "prediction_error")``,
    ... (each a tuple with one array per symmetry), or with :class:`ksbopt.Recorder`.

    Let ``optax.MultiSteps`` / ``optax.apply_if_finite`` wrap the monitor, not the other way
    round, so that it sees only the steps actually applied and the mean gradient
    (``optax.MultiSteps(ksbopt.monitor(tx, sym), k)``; docs/howto/wrappers.md). The
    incoming updates must be the loss gradient: weight decay belongs inside ``tx``
    (``optax.add_decayed_weights``, ``optax.adamw``); an L2 term inside the loss shows up as
    a symmetry violation. A step whose gradient is not finite leaves the diagnostics and the
    recursions as they were.

    Args:
      tx: the optimizer to monitor (any ``optax.GradientTransformation``).
      symmetries: a :class:`~ksbopt.Scale`, :class:`~ksbopt.Rescale`,
        :class:`~ksbopt.Translation`, :class:`~ksbopt.Linear` or a list of them.
      learning_rate: eta, for the effective learning rate when no ``dynamics`` give it: a
        number or a schedule ``step -> eta``; None reads it from an
        ``optax.inject_hyperparams`` state inside ``tx`` if there is one.
      dynamics: a description of ``tx`` (:func:`ksbopt.dynamics.sgd`,
        :func:`~ksbopt.dynamics.rmsprop`, :func:`~ksbopt.dynamics.adam`) to predict charges.
      every: compute the expensive diagnostics every ``every`` steps (``lax.cond``, no
        recompilation); the recursions still advance every step and stay exact.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`MonitorState`; its
      ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> sym = ksbopt.Scale("w", axis=None)
      >>> tx = ksbopt.monitor(optax.sgd(0.1), sym, dynamics=ksbopt.dynamics.sgd(0.1))
      >>> state = tx.init(params)
      >>> u, state = tx.update({"w": jnp.array([4.0, -3.0])}, state, params)
      >>> optax.tree.get(state, "charges")[0], optax.tree.get(state, "predicted_charges")[0]
      (Array([12.625], dtype=float32), Array([12.625], dtype=float32))

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716; Kunin et al., "Neural
      Mechanics: Symmetry and Broken Conservation Laws in Deep Learning Dynamics", ICLR
      2021, https://arxiv.org/abs/2012.04728
    """
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(
            f"tx={tx!r} (type {type(tx).__name__}) is not an optax transformation; pass the "
            "optimizer to monitor, e.g. ksbopt.monitor(optax.sgd(0.1), symmetries)."
        )
    syms = orbit.as_symmetries(symmetries)
    dyn = dynamics_lib.as_dynamics(dynamics)
    dynamics_lib.check_learning_rate(learning_rate, owner="ksbopt.monitor")
    if dyn is not None and learning_rate is not None and dyn.learning_rate is not None:
        raise ValueError(
            f"ksbopt.monitor: learning_rate={learning_rate!r} is given twice (also "
            f"dynamics.learning_rate={dyn.learning_rate!r}); give it once, in the dynamics."
        )
    every = _check_every(every)
    inner = optax.with_extra_args_support(tx)
    explicit_lr = learning_rate if dyn is None or dyn.learning_rate is None else dyn.learning_rate

    def lr_source(state) -> str | None:
        if explicit_lr is not None:
            return "explicit"
        if _state_learning_rates(state):
            return "state"
        return None

    def learning_rate_at(source, step, state):
        if source == "explicit":
            return explicit_lr(step) if callable(explicit_lr) else explicit_lr
        if source == "state":
            return _state_learning_rates(state)[0]
        return None

    def check(binding, inner_state, params):
        source = lr_source(inner_state)
        if len(_state_learning_rates(inner_state)) > 1 and explicit_lr is None:
            raise ValueError(
                "the wrapped optimizer's state holds several 'learning_rate' hyperparameters; "
                "say which one the monitor uses: ksbopt.monitor(tx, symmetries, "
                "learning_rate=...) or dynamics=ksbopt.dynamics.sgd(learning_rate, ...)."
            )
        if dyn is not None:
            dyn.check_state(inner_state, params)
            if source is None:
                raise ValueError(
                    f"dynamics={dyn!r} has learning_rate=None and the wrapped optimizer has no "
                    "optax.inject_hyperparams state to read it from; give "
                    "ksbopt.dynamics.<kind>(learning_rate, ...)."
                )
        return source, [_plan(b, dyn, source is not None) for b in binding.bound]

    def start(params, inner_state, lr):
        binding = orbit.bind(syms, params)
        _, plans = check(binding, inner_state, params)
        w = orbit.promote(jax.tree.leaves(params))
        zeros = [jnp.zeros_like(x) for x in w]
        q0 = [b.charge(w) for b in binding.bound]
        hb = ("hb", "hbd")
        # Zeros computed from q (not jnp.zeros_like) so that under jit they inherit the
        # charges' sharding instead of coming out replicated.
        zero = lambda q, p: jnp.where(jnp.isfinite(q), 0 * q, 0) if p.recursion in hb else None
        recursion = RecursionState(
            predicted_carry=_some(q0, plans, lambda q, p: q),
            overlap_carry=_some(q0, plans, zero),
            velocity_carry=_some(q0, plans, zero),
            previous_carry=_some(q0, plans, lambda q, p: q if p.recursion == "shift_hb" else None),
            learning_rate_carry=_some(q0, plans, lambda q, p: jnp.zeros((), q.dtype)),
        )
        ctx = _Context(binding, plans, dyn, w, zeros, zeros, inner_state, inner_state, lr)
        sums = ctx.sums(_diagnose_requests(ctx))
        diagnostics = _no_step(_diagnose(ctx, recursion, jnp.full((), -1, jnp.int32), sums))
        return _strong((diagnostics, recursion))

    # One compilation for init instead of hundreds of eager operations, shared by monitors
    # with the same declarations and dynamics (e.g. rebuilt by optax.inject_hyperparams).
    start_jit = _cached_jit(start, (syms, dyn, explicit_lr))

    def init_fn(params):
        inner_state = inner.init(params)
        binding = orbit.bind(syms, params)
        source, _ = check(binding, inner_state, params)  # errors here, eagerly
        lr = learning_rate_at(source, jnp.zeros((), jnp.int32), inner_state)
        diagnostics, recursion = start_jit(params, inner_state, lr)
        return MonitorState(inner_state, jnp.zeros((), jnp.int32), diagnostics, recursion)

    def update_fn(updates, state, params=None, **extra_args):
        orbit.require_params(params, "monitor")
        new_updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
        binding = orbit.bind(syms, params)
        source, plans = check(binding, state.inner, params)
        step = state.monitor_count
        lr = learning_rate_at(source, step, inner_state)
        ctx = _Context(
            binding,
            plans,
            dyn,
            orbit.promote(jax.tree.leaves(params)),
            orbit.promote(jax.tree.leaves(updates)),
            orbit.promote(jax.tree.leaves(new_updates)),
            state.inner,
            inner_state,
            lr,
        )
        static_every = isinstance(every, int)
        if static_every and every == 1:
            # One pass over each leaf serves the recursions and the diagnostics.
            both = _diagnose_requests(ctx)
            for i, names in _advance_requests(ctx).items():
                both[i] = both[i] + names
            sums = ctx.sums(both)
        else:
            sums = ctx.sums(_advance_requests(ctx))
        recursion, ok = _advance(ctx, state.recursion, sums)
        recursion = _strong(recursion)

        def compute(sums=None):
            sums = ctx.sums(_diagnose_requests(ctx)) if sums is None else sums
            return _strong(_diagnose(ctx, recursion, step, sums))

        # A step whose gradient (or diagnostics) is not finite keeps the old state.
        def keep(ok, new, old):
            return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

        def compute_or_keep():
            new = compute()
            return keep(ok & all_finite(new), new, state.diagnostics)

        if static_every and every == 1:
            diagnostics = compute(sums)
            ok = ok & all_finite(diagnostics)
            diagnostics = keep(ok, diagnostics, state.diagnostics)
        else:
            record = (step % every) == 0
            diagnostics = jax.lax.cond(record, compute_or_keep, lambda: state.diagnostics)
            # On a recorded step the diagnostics say whether it was finite.
            ok = ok & (~record | (diagnostics.step == step))
        recursion = keep(ok, recursion, state.recursion)
        count = jnp.where(ok, optax.safe_increment(step), step)
        new_state = MonitorState(inner_state, count, diagnostics, recursion)
        return _ordered_after(new_updates, ok), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _ordered_after(updates, flag: jax.Array):
    """``updates``, bit for bit, made to depend on ``flag`` (computed from the diagnostics).

    With donated buffers, ``optax.apply_updates(params, updates)`` writes the new parameters
    over the old ones. Every reduction of the monitor reads the old parameters; when XLA
    cannot see from the data flow that they all run before that write, it copies the
    parameters first (a full extra pass over memory). Subtracting an exact zero derived from
    ``flag`` orders the write after the diagnostics at no cost (the subtraction fuses into
    the parameter update): ``x - (+0.0)`` is ``x`` for every float, signed zeros, infinities
    and NaN included. Only large leaves are ordered: copying a small one costs less than
    making its update wait for every diagnostic.
    """
    zero = jnp.asarray(flag).astype(jnp.float32) * 0.0  # +0.0 whatever the flag

    def after(u):
        if u is None or not jnp.issubdtype(jnp.result_type(u), jnp.inexact):
            return u
        if math.prod(jnp.shape(u)) < _FUSED_MIN_SIZE:
            return u
        return u - zero.astype(jnp.result_type(u))

    return jax.tree.map(after, updates)


def _check_every(every):
    """``every`` as a Python int, or as a traced integer scalar.

    ``optax.inject_hyperparams(ksbopt.monitor)`` injects every int argument, ``every``
    included even when left at its default, as an array that is traced inside ``update``: a
    traced value takes the ``lax.cond`` path (the same diagnostics as the int).
    """
    if (
        isinstance(every, jax.Array)
        and jnp.ndim(every) == 0
        and jnp.issubdtype(every.dtype, jnp.integer)
    ):
        if isinstance(every, jax.core.Tracer):
            return every  # validated when inject_hyperparams' init built it concretely
        every = int(every)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(
            f"{every=} must be a positive int: compute the diagnostics every "
            "`every` steps (1: every step)."
        )
    return every


#: Fields of :class:`NoetherDiagnostics` that describe a step (0 when no step was taken).
_STEP_FIELDS = (
    "first_order",
    "second_order",
    "weight_decay_term",
    "violation",
    "angular_update",
    "relative_update",
    "prediction_error",
    "metric_prediction_error",
)


def _no_step(d: NoetherDiagnostics) -> NoetherDiagnostics:
    """The record at ``init``: no step was taken (g = u = 0), so the step fields are 0.

    They are computed as for any step, which gives 0 except where a charge overflowed the
    compute dtype (|w| > 1.8e19 in float32): there 0 * inf is NaN, and the definition (0)
    is written instead, so that no NaN enters the state (docs/edge_cases.md).
    """

    def zero_nan(x):
        return None if x is None else jnp.where(jnp.isnan(x), jnp.zeros_like(x), x)

    return d._replace(**{f: tuple(map(zero_nan, getattr(d, f))) for f in _STEP_FIELDS})


_JIT_CACHE: dict = {}


def _cached_jit(fn, key):
    """``jax.jit(fn)``, reused for an equal ``key`` when the key is hashable."""
    try:
        hash(key)
    except TypeError:
        return jax.jit(fn)
    if key not in _JIT_CACHE:
        if len(_JIT_CACHE) > 64:
            _JIT_CACHE.clear()
        _JIT_CACHE[key] = jax.jit(fn)
    return _JIT_CACHE[key]


def _state_learning_rates(state) -> list:
    found = optax.tree.get_all_with_path(state, "learning_rate")
    return [v for _, v in found if hasattr(v, "dtype") and jnp.ndim(v) == 0]


# --------------------------------------------------------------------------- one step


@dataclasses.dataclass
class _Context:
    """Everything one step of the monitor reads (leaves promoted to the compute dtype)."""

    binding: orbit.Binding
    plans: list
    dyn: dynamics_lib.Dynamics | None
    w: Flat
    g: Flat
    u: Flat
    inner_old: Any
    inner_new: Any
    lr: Any

    def lr_as(self, dtype):
        return jnp.asarray(self.lr, dtype)

    @property
    def weight_decay(self):
        return 0.0 if self.dyn is None else self.dyn.weight_decay

    def buffer(self, key: str, *, old: bool = False) -> Flat:
        state = self.inner_old if old else self.inner_new
        return orbit.promote(jax.tree.leaves(optax.tree.get(state, key)))

    def sums(self, requests: dict) -> _Sums:
        """Per-group sums of the products in ``requests`` (symmetry index -> names)."""
        vectors = {"w": self.w, "u": self.u, "g": self.g}
        if any("v" in name for names in requests.values() for name in names):
            vectors["v"] = self.buffer("trace")
        return _Sums(self.binding, vectors, requests)


def _advance_requests(ctx: _Context) -> dict:
    """Products the exact recursions read at every step (scale and rescale groups)."""
    out = {}
    for i, plan in enumerate(ctx.plans):
        if plan.kind in ("scale", "rescale"):
            if plan.recursion == "sgd":
                out[i] = ("gg",)
            elif plan.recursion in ("hb", "hbd"):
                out[i] = ("vv",)
    return out


def _diagnose_requests(ctx: _Context) -> dict:
    """Products the expensive diagnostics read."""
    return {i: _DIAGNOSE_PRODUCTS[b.symmetry.kind] for i, b in enumerate(ctx.binding.bound)}


def _advance(ctx: _Context, rec: RecursionState, sums: _Sums) -> tuple[RecursionState, jax.Array]:
    """One step of every exact recursion (the cheap part: runs at every step)."""
    dyn = ctx.dyn
    out = {name: list(getattr(rec, name)) for name in RecursionState._fields}
    checks = []
    for i, (b, plan) in enumerate(zip(ctx.binding.bound, ctx.plans, strict=True)):
        if plan.recursion is None:
            continue
        dtype = _dtype(b, ctx.w)
        lr = ctx.lr_as(dtype)
        lr_prev = rec.learning_rate_carry[i]
        wd, mom = dyn.weight_decay, dyn.momentum
        q = rec.predicted_carry[i]
        if plan.recursion == "sgd":
            if plan.kind == "linear":
                ga, gb = _linear_grads(b, ctx.g)
                new = theory.linear_sgd_step(q, ga, gb, lr, wd)  # [derived] P10
            else:
                new = theory.scale_sgd_step(q, sums.quadratic(i, "g"), lr, wd)  # P1
            checks.append(jnp.sum(new))  # a non-finite gradient skips the step
        elif plan.recursion in ("hb", "hbd"):
            qv = sums.quadratic(i, "v")
            checks.append(jnp.sum(qv))
            ratio = safe_div(lr_prev, lr)  # carried norms refer to last step's eta
            if plan.recursion == "hb":  # [derived] P3, coupled weight decay
                overlap, new = theory.heavy_ball_step(
                    q, rec.overlap_carry[i], rec.velocity_carry[i] * ratio, qv, lr, mom, wd
                )
            else:  # [derived] P3, decoupled weight decay
                carried = rec.overlap_carry[i] * safe_div(1 - lr_prev * wd, 1 - lr * wd)
                overlap, new = theory.heavy_ball_decoupled_step(
                    q, carried, rec.velocity_carry[i] * ratio, qv, lr, mom, wd
                )
            out["overlap_carry"][i] = overlap
            out["velocity_carry"][i] = qv
        elif plan.recursion == "shift":
            new = theory.translation_sgd_step(q, lr, wd)  # [derived from NM] P4
        else:  # "shift_hb": P4 heavy ball, previous charge rescaled to this step's eta
            prev = q + safe_div(lr, lr_prev) * (rec.previous_carry[i] - q)
            new = theory.translation_heavy_ball_step(q, prev, lr, mom, wd)
            out["previous_carry"][i] = q
        out["predicted_carry"][i] = new.astype(dtype)
        out["learning_rate_carry"][i] = lr
    ok = jnp.isfinite(sum(checks)) if checks else jnp.asarray(True)
    return RecursionState(**{k: tuple(v) for k, v in out.items()}), ok


def _diagnose(
    ctx: _Context, rec: RecursionState, step: jax.Array, sums: _Sums
) -> NoetherDiagnostics:
    """The expensive part: charges, decomposition, violation, angles, metric identities."""
    fields = {name: [] for name in NoetherDiagnostics._fields if name != "step"}
    metric = _Metric(ctx) if any(p.metric for p in ctx.plans) else None
    for i, (b, plan) in enumerate(zip(ctx.binding.bound, ctx.plans, strict=True)):
        dtype = _dtype(b, ctx.w)
        kind = plan.kind
        q0 = sums.charge(i, "w")
        first = sums.reduce(i, "w", "u")
        if kind == "linear":
            first = first + jnp.swapaxes(first, -1, -2)
        second = sums.quadratic(i, "u")
        q1 = q0 + first + second
        fields["charges_before"].append(q0)
        fields["charges"].append(q1)
        fields["first_order"].append(first)
        fields["second_order"].append(second)

        # Symmetry violation of the gradient.
        r = sums.reduce(i, "w", "g")
        gg = sums.inner(i, "g", "g") if kind == "translation" else sums.norms(i, "g")
        if kind == "linear":
            proj = jnp.sum(b.solve_gram(ctx.w, r) * r, axis=(-2, -1))
            violation = jnp.sqrt(safe_div(jnp.maximum(proj, 0), gg))
        else:
            violation = safe_div(r, jnp.sqrt(sums.norms(i, "w") * gg))
        fields["violation"].append(violation)

        # Angles and sizes of the step, per group (unsigned inner products).
        if kind == "scale":
            ww, uu, wu = 2 * q0, 2 * second, first
        elif kind == "translation":
            ww, uu, wu = sums.inner(i, "w", "w"), sums.inner(i, "u", "u"), sums.inner(i, "w", "u")
        else:
            ww, uu, wu = sums.norms(i, "w"), sums.norms(i, "u"), sums.inner(i, "w", "u")
        cross = jnp.sqrt(jnp.maximum(ww * uu - wu * wu, 0))
        fields["angular_update"].append(jnp.arctan2(cross, ww + wu))
        fields["relative_update"].append(jnp.sqrt(safe_div(uu, ww)))

        lr = None if ctx.lr is None else ctx.lr_as(dtype)
        sgd_wd = ctx.weight_decay if ctx.dyn is not None and ctx.dyn.kind == "sgd" else 0.0
        fields["effective_learning_rate"].append(
            theory.effective_learning_rate(2 * q0, lr, sgd_wd) if plan.effective_lr else None
        )
        if ctx.dyn is not None:
            keep = 1 - lr * ctx.weight_decay
            decay = (keep - 1) * q0 if kind == "translation" else (keep**2 - 1) * q0
            fields["weight_decay_term"].append(decay)
        else:
            fields["weight_decay_term"].append(None)

        if plan.recursion is not None:
            pred = rec.predicted_carry[i]
            fields["predicted_charges"].append(pred)
            scale = {
                "scale": q0,
                "rescale": 0.5 * ww,
                "translation": jnp.sqrt(sums.norms(i, "w") * ww),
                "linear": ww,
            }[kind]
            fields["prediction_error"].append(_residual(b, q1, pred, scale))
        else:
            fields["predicted_charges"].append(None)
            fields["prediction_error"].append(None)

        if plan.metric is not None:
            m0, m1, mpred, mscale = metric.charges(i, b, plan, lr)
            fields["metric_charges_before"].append(m0)
            fields["metric_charges"].append(m1)
            fields["predicted_metric_charges"].append(mpred)
            fields["metric_prediction_error"].append(_residual(b, m1, mpred, mscale))
        else:
            for name in (
                "metric_charges_before",
                "metric_charges",
                "predicted_metric_charges",
                "metric_prediction_error",
            ):
                fields[name].append(None)

        fields["equilibrium_angular_update"].append(
            theory.equilibrium_angular_update(lr, ctx.weight_decay, ctx.dyn.momentum).astype(dtype)
            if plan.equilibrium
            else None
        )
    return NoetherDiagnostics(
        step=jnp.asarray(step, jnp.int32), **{k: tuple(v) for k, v in fields.items()}
    )


class _Metric:
    """The diagonal metric P of an RMSProp/Adam step, read from the wrapped state."""

    def __init__(self, ctx: _Context):
        self.ctx = ctx
        self.nu = ctx.buffer("nu")
        self.to_metric = ctx.dyn.preconditioner(ctx.inner_new)
        self._p: dict[int, jax.Array] = {}
        self.mu_old = self.mu_new = None
        if ctx.dyn.kind == "adam":
            self.mu_old = ctx.buffer("mu", old=True)
            self.mu_new = ctx.buffer("mu")
            self.count = ctx.dyn.adam_count(ctx.inner_new)

    def p(self, leaf: int) -> jax.Array:
        if leaf not in self._p:
            self._p[leaf] = self.to_metric(self.nu[leaf])
        return self._p[leaf]

    def charges(self, i: int, b: BoundSymmetry, plan: _Plan, lr):
        ctx = self.ctx
        w, u, g = ctx.w, ctx.u, ctx.g
        dyn = ctx.dyn
        wd = dyn.weight_decay if dyn.decoupled else 0.0
        new_w = _map_leaves(b, jnp.add, w, u)
        if plan.kind == "translation":
            scaled = lambda x: _partial(x, {j: self.p(j) * x[j] for j in b.leaves})
            m0, m1 = b.charge(scaled(w)), b.charge(scaled(new_w))
            pred = theory.translation_sgd_step(m0, lr, wd)  # [derived] P6: <P 1, u> = -a <P 1, w>
            pw = scaled(w)
            return m0, m1, pred, jnp.sqrt(b.norms(w) * _group_inner(b, pw, pw))
        root = lambda x: _partial(x, {j: jnp.sqrt(self.p(j)) * x[j] for j in b.leaves})
        m0, m1 = b.charge(root(w)), b.charge(root(new_w))
        whiten = lambda x: _partial(x, {j: x[j] / jnp.sqrt(self.p(j)) for j in b.leaves})
        if plan.metric == "rmsprop":
            # [derived] P6 = P1 in the coordinates P^(1/2) w: SGD with gradient P^(-1/2) g.
            pred = theory.scale_sgd_step(m0, b.quadratic(whiten(g)), lr, wd)
        else:
            pred = theory.adam_metric_charge_step(
                m0,
                b.reduce(w, self.mu_old),
                b.quadratic(whiten(self.mu_new)),
                lr,
                dyn.momentum,
                wd,
                self.count,
            )
        scale = m1 if plan.kind == "scale" else 0.5 * b.norms(root(w))
        return m0, m1, pred, scale
