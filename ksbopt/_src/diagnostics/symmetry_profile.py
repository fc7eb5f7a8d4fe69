"""The symmetry profile of a learning rule: :func:`profile` and the per-step ratios.

For every declared symmetry the exact decomposition of one step's charge change
``Q(w + u) = Q(w) + <xi(w), u> + Q(u)`` (the identity :func:`ksbopt.monitor` records) is
measured per group and made dimensionless with the natural size ``|xi(w)| |u|`` of the
first-order term; the rule is then classified as preserving the charge exactly, breaking it
only at second order (the finite step), or breaking it at first order (a metric, momentum,
weight decay). :func:`step_ratios` is the jit-able per-step part the benchmark harness also
records at every training step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ksbopt._src import checks
from ksbopt._src.diagnostics.monitor import symmetry_labels
from ksbopt._src.symmetries import orbit
from ksbopt._src.symmetries.bound import BoundSymmetry, Flat

__all__ = [
    "CLASSES",
    "RATIOS",
    "SymmetryProfile",
    "classify",
    "profile",
    "step_ratios",
    "tolerance",
]

#: The columns of :func:`step_ratios`, in order.
RATIOS = (
    "first_order",
    "second_order",
    "change",
    "gradient",
    "resolution",
    "first_excess",
    "change_excess",
)
#: The classes of :func:`classify`.
CLASSES = ("exact", "second order", "first order")

# The gradient's own component along the generator (nonzero only through rounding for a true
# symmetry) reaches the step through any rule; a step is not called first-order breaking
# unless its component exceeds GRADIENT_FLOOR times the gradient's (SGD's ratio is exactly 1).
GRADIENT_FLOOR = 10.0
# A step applied to w in precision eps (w + u rounded, or u = w_new - w as retractions form
# it) is rounded by at most eps/2 |w_i| per entry, which moves the charge by at most
# eps/2 |xi| |w|: relative to |xi| |u| at most eps |w| / |u| (eps times the "resolution"
# ratio), the floor of steps much smaller than the weights.


def tolerance(dtype) -> float:
    """``sqrt(eps)`` of ``dtype`` (float32: 3.5e-4; float64: 1.5e-8): the classification's
    rounding floor for a ratio of a per-group sum to its natural size.

    A gradient computed through a network in precision eps carries relative errors far above
    eps (each layer adds its own); half the digits, as in finite-difference checks, separates
    rounding from a real component: a learning rule's breaking (momentum, a metric, weight
    decay) gives ratios of 1e-3 to 1 on any network, rounding 1e-7 to 1e-5 in float32.
    """
    return float(np.sqrt(np.finfo(np.dtype(dtype)).eps))


def classify(first_excess: float, change_excess: float) -> str:
    """``"exact"``, ``"second order"`` or ``"first order"`` from the excesses of one symmetry.

    An excess is a ratio over its group's floor ``max(sqrt(eps), 10 |<xi, g>| / (|xi| |g|),
    eps |w| / |u|)``, largest over the groups (:func:`step_ratios`). Exact: no group's charge
    change exceeds its floor. Second order: some change does, but no first-order part
    ``<xi, u>`` does (the change is the finite step's ``Q(u)``). First order: some group's
    ``<xi, u>`` exceeds its floor.
    """
    if not (change_excess > 1):  # NaN (no step) counts as no change
        return "exact"
    return "second order" if first_excess <= 1 else "first order"


def _sqnorm(b: BoundSymmetry, flat: Flat) -> jax.Array:
    """|x|^2 restricted to each group (per head for Linear: |x_A|^2 + |x_B|^2)."""
    if hasattr(b, "_sum"):  # Scale, Rescale, Translation: every entry in exactly one group
        return b._sum([p.reduce(jnp.square(flat[p.leaf])) for p in b.parts])
    return b.norms(flat)


def _ratios_one(b: BoundSymmetry, w: Flat, g: Flat, u: Flat) -> jax.Array:
    """Largest over the groups of |<xi, u>|, |Q(u)|, |dQ| over |xi| |u|, |<xi, g>| / |xi||g|
    and |w| / |u|."""
    first = b.reduce(w, u)
    linear = first.ndim == 3
    if linear:  # the charge A^T A - B B^T moves by R + R^T at first order
        first = first + jnp.swapaxes(first, -1, -2)
    second = b.quadratic(u)
    grad = b.reduce(w, g)
    xi = jnp.sqrt(b.norms(w))
    size_w, size_u, size_g = (jnp.sqrt(_sqnorm(b, x)) for x in (w, u, g))
    if linear:  # |R + R^T| <= 2 |xi| |u| with |xi|^2 = |A|^2 + |B|^2 per head
        absval = lambda m: jnp.sqrt(jnp.sum(jnp.square(m), axis=(-2, -1)))
        first, second, change, grad = (
            absval(x) for x in (first, second, first + second, grad + jnp.swapaxes(grad, -1, -2))
        )
        xi = 2 * xi
    else:
        first, second, change, grad = (jnp.abs(x) for x in (first, second, first + second, grad))

    def ratio(num, den):  # per group; 0 where the group has no step (or no gradient)
        ok = den > 0
        return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)

    s = xi * size_u
    r1, r2, rc = ratio(first, s), ratio(second, s), ratio(change, s)
    rg, res = ratio(grad, xi * size_g), ratio(size_w, size_u)
    tol = tolerance(first.dtype)
    floor = jnp.maximum(jnp.maximum(tol, GRADIENT_FLOOR * rg), tol**2 * res)
    return jnp.stack([jnp.max(x) for x in (r1, r2, rc, rg, res, r1 / floor, rc / floor)])


def step_ratios(symmetries, params, grads, updates) -> jax.Array:
    """The :data:`RATIOS` of one step, shape ``(len(symmetries), 7)`` (jit-able).

    Per symmetry, the largest over its groups of ``|<xi, u>| / (|xi| |u|)``,
    ``|Q(u)| / (|xi| |u|)``, ``|Q(w + u) - Q(w)| / (|xi| |u|)``,
    ``|<xi, g>| / (|xi| |g|)`` and ``|w| / |u|`` (the resolution: a step far smaller than
    the weights is rounded when applied), with ``|w|``, ``|u|``, ``|g|`` the norms restricted
    to the group; then the first-order and change excesses, the largest over the groups of
    ``|<xi, u>| / (|xi| |u|)`` and ``|dQ| / (|xi| |u|)`` over the group's floor
    ``max(sqrt(eps), 10 |<xi, g>| / (|xi| |g|), eps |w| / |u|)`` (see :func:`classify`); in
    the compute dtype of the parameters (at least float32). A group without a step gives 0.
    """
    syms = orbit.as_symmetries(symmetries)
    binding = orbit.bind(syms, params)
    w, g, u = (orbit.promote(jax.tree.leaves(x)) for x in (params, grads, updates))
    return jnp.stack([_ratios_one(b, w, g, u) for b in binding.bound])


class SymmetryProfile(NamedTuple):
    """What a learning rule does to each symmetry; ``print(profile)`` shows the table.

    Attributes:
      labels: one name per symmetry (:func:`ksbopt._src.diagnostics.monitor.symmetry_labels`).
      ratios: array ``(steps, n_symmetries, 7)`` of :data:`RATIOS` per step.
      classes: per symmetry, ``"exact"``, ``"second order"`` or ``"first order"``, from the
        median over the steps of the two excesses (:func:`classify`).
      tol: the rounding floor :func:`tolerance` of the compute dtype.

    With the exact split ``Q(w + u) - Q(w) = <xi, u> + Q(u)`` of a step's charge change, the
    ratios of the step, per symmetry (largest over its groups), are
    ``|<xi, u>| / (|xi| |u|)``, ``|Q(u)| / (|xi| |u|)``, ``|Q(w + u) - Q(w)| / (|xi| |u|)``,
    ``|<xi, g>| / (|xi| |g|)`` and ``|w| / |u|``, then the two excesses of :func:`classify`.

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> params = {"w": jnp.array([[3.0, 1.0], [4.0, -2.0]])}
      >>> grads = {"w": jnp.array([[0.8, 0.2], [-0.6, 0.1]])}  # orthogonal to each column
      >>> prof = ksbopt.profile(optax.sgd(0.5), ksbopt.Scale("w", axis=-1), params, grads)
      >>> prof.labels, prof.classes, prof.ratios.shape
      (('scale:w',), ('second order',), (1, 1, 7))

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716
    """

    labels: tuple[str, ...]
    ratios: np.ndarray
    classes: tuple[str, ...]
    tol: float

    def __str__(self) -> str:
        med = np.median(self.ratios, axis=0)
        head = "<xi,u>  Q(u)    dQ      <xi,g>  |w|/|u| 1st/fl  dQ/fl"
        rows = [f"{'symmetry':28s} {'class':13s} {head}"]
        for label, c, r in zip(self.labels, self.classes, med):
            rows.append(f"{label:28s} {c:13s} " + " ".join(f"{x:7.1e}" for x in r))
        return "\n".join(rows)


def profile(
    tx: optax.GradientTransformation,
    symmetries,
    params: Any,
    grads_or_loss: Any,
    *batches: Any,
    state: Any = None,
    steps: int = 1,
    **extra_args: Any,
) -> SymmetryProfile:
    r"""Classify what ``tx`` does to each declared symmetry, from a few measured steps.

    Each step's charge change splits exactly ([derived] the decomposition of
    :func:`ksbopt.monitor`, docs/concepts) as

    .. math::

        Q(w + u) - Q(w) = \langle \xi(w), u \rangle + Q(u),

    measured per group relative to the first-order size :math:`|\xi(w)|\,|u|`. The rule
    *preserves* the charge exactly when the change is below the rounding floor; *breaks it at
    second order* when only :math:`Q(u)` (the finite step: SGD on a scale group, [paper: NLD])
    is above it; *breaks it at first order* when :math:`\langle\xi, u\rangle` is (a
    non-Euclidean metric such as Adam's, momentum, weight decay, [paper: NM]). The floor is
    ``max(sqrt(eps), 10 |<xi, g>| / (|xi| |g|), eps |w| / |u|)`` per group: the rounding
    floor :func:`tolerance` of the compute dtype, ten times the gradient's own violation of
    the symmetry (a loss that is only approximately symmetric, or a group whose gradient is
    mostly rounding, passes its violation to every rule), and the rounding of applying a step
    much smaller than the weights. A symmetry is exact when no group's change exceeds its
    floor and first-order broken when some group's ``<xi, u>`` does.

    Args:
      tx: the learning rule (any optax transformation; ``update`` gets ``params``).
      symmetries: a :class:`~ksbopt.Scale`, :class:`~ksbopt.Rescale`,
        :class:`~ksbopt.Translation`, :class:`~ksbopt.Linear` or a list of them.
      params: the parameters the steps start from.
      grads_or_loss: a gradient tree (one step, from ``state``), or ``loss(params, batch)``
        (``loss(params)`` without batches): then ``steps`` steps are taken and applied, the
        batches used in turn, so that momentum and adaptive statistics build up.
      *batches: the batches of ``loss`` (cycled).
      state: the optimizer state to start from (default ``tx.init(params)``).
      steps: how many steps to measure (with a loss; a gradient tree measures one).
      **extra_args: passed to ``tx.update`` (e.g. ``value_fn``).

    Returns:
      A :class:`SymmetryProfile`: per-step ratios, one class per symmetry (from the median
      over steps), the floor used.

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> params = {"w": jnp.array([[3.0, 1.0], [4.0, -2.0]])}
      >>> loss = lambda p: jnp.sum(jnp.tanh(p["w"][0] / jnp.linalg.norm(p["w"], axis=0)))
      >>> scale = ksbopt.Scale("w", axis=-1)
      >>> ksbopt.profile(optax.sgd(0.1), scale, params, loss, steps=3).classes
      ('second order',)
      >>> ksbopt.profile(optax.adam(0.1), scale, params, loss, steps=3).classes
      ('first order',)
      >>> ksbopt.profile(ksbopt.retract(scale), scale, params, loss).classes
      ('exact',)

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716; Kunin et al., "Neural
      Mechanics: Symmetry and Broken Conservation Laws in Deep Learning Dynamics", ICLR
      2021, https://arxiv.org/abs/2012.04728
    """
    checks.check_transformation(
        "ksbopt.profile",
        "tx",
        tx,
        example="ksbopt.profile(optax.adam(1e-3), symmetries, params, grads)",
    )
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer, e.g. steps=5.")
    syms = orbit.as_symmetries(symmetries)
    state = tx.init(params) if state is None else state
    if callable(grads_or_loss):
        loss = grads_or_loss
        grad_of: Callable = jax.grad(loss)
        inputs = [(b,) for b in batches] or [()]
    else:
        grad_of, inputs, steps = (lambda *_: grads_or_loss), [()], 1

    @jax.jit
    def one(params, state, args):
        g = grad_of(params, *args)
        u, state = tx.update(g, state, params, **extra_args)
        return optax.apply_updates(params, u), state, step_ratios(syms, params, g, u)

    rows = []
    for k in range(steps):
        params, state, r = one(params, state, inputs[k % len(inputs)])
        rows.append(np.asarray(r))
    ratios = np.stack(rows)
    dtype = orbit.promote(jax.tree.leaves(params)[:1])[0].dtype
    tol = tolerance(dtype)
    med = np.median(ratios, axis=0)
    classes = tuple(classify(r[5], r[6]) for r in med)
    return SymmetryProfile(tuple(symmetry_labels(syms)), ratios, classes, tol)
