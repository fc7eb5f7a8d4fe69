"""The states of :func:`ksbopt.monitor`: the recorded diagnostics and the recursions' carry.

:class:`NoetherDiagnostics` is what one recorded step measured, :class:`RecursionState` what
the exact recursions carry from step to step, :class:`MonitorState` both plus the wrapped
optimizer's own state. The module also says what a record without a step looks like
(:func:`no_step`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["MonitorState", "NoetherDiagnostics", "RecursionState"]


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
      effective_learning_rate: ``eta / ((1 - eta lam) |w|^2)`` of scale groups (:ref:`P2 <p2>`;
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
    ([derived] :ref:`P1 <p1>`), fed with the measured norms of every step.

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


def strong(tree):
    """Arrays without weak types (a jitted step must return the types ``init`` made)."""
    return jax.tree.map(lambda x: jax.lax.convert_element_type(x, jnp.result_type(x)), tree)


#: Fields of :class:`NoetherDiagnostics` that describe a step (0 when no step was taken).
STEP_FIELDS = (
    "first_order",
    "second_order",
    "weight_decay_term",
    "violation",
    "angular_update",
    "relative_update",
    "prediction_error",
    "metric_prediction_error",
)


def no_step(d: NoetherDiagnostics) -> NoetherDiagnostics:
    """The record at ``init``: no step was taken (g = u = 0), so the step fields are 0.

    They are computed as for any step, which gives 0 except where a charge overflowed the
    compute dtype (|w| > 1.8e19 in float32): there 0 * inf is NaN, and the definition (0)
    is written instead, so that no NaN enters the state (docs/edge_cases.md).
    """

    def zero_nan(x):
        return None if x is None else jnp.where(jnp.isnan(x), jnp.zeros_like(x), x)

    return d._replace(**{f: tuple(map(zero_nan, getattr(d, f))) for f in STEP_FIELDS})
