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
  scale groups, ``effective_learning_rate`` eta / ((1 - eta lam) |w|^2) (:ref:`P2 <p2>`);
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
memory (one variadic reduction, see
:class:`~ksbopt._src.diagnostics.fused_sums.Sums`), since an optimizer step is bound by
memory traffic, not arithmetic.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ksbopt._src import checks
from ksbopt._src.diagnostics import dynamics as dynamics_lib
from ksbopt._src.diagnostics import fused_sums
from ksbopt._src.diagnostics.monitor_state import (
    MonitorState,
    NoetherDiagnostics,
    RecursionState,
    no_step,
    strong,
)
from ksbopt._src.diagnostics.monitor_step import StepContext, diagnose, diagnose_requests
from ksbopt._src.diagnostics.predictions import advance, advance_requests, plan_for, with_recursion
from ksbopt._src.numerics import all_finite_values
from ksbopt._src.symmetries import orbit

__all__ = ["MonitorState", "NoetherDiagnostics", "RecursionState", "monitor", "symmetry_labels"]

OWNER = "ksbopt.monitor"


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
    checks.check_transformation(
        "ksbopt.monitor", "tx", tx, example="ksbopt.monitor(optax.sgd(0.1), symmetries)"
    )
    syms = orbit.as_symmetries(symmetries)
    dyn = dynamics_lib.as_dynamics(dynamics)
    dynamics_lib.check_learning_rate(learning_rate, owner=OWNER)
    if dyn is not None and learning_rate is not None and dyn.learning_rate is not None:
        raise ValueError(
            f"ksbopt.monitor: learning_rate={learning_rate!r} is given twice (also "
            f"dynamics.learning_rate={dyn.learning_rate!r}); give it once, in the dynamics."
        )
    every = _check_every(every)
    inner = optax.with_extra_args_support(tx)
    explicit_lr = learning_rate if dyn is None or dyn.learning_rate is None else dyn.learning_rate
    setup = _Setup(syms, dyn, explicit_lr)
    # One compilation for init instead of hundreds of eager operations, shared by monitors
    # with the same declarations and dynamics (e.g. rebuilt by optax.inject_hyperparams).
    start_jit = _cached_jit(functools.partial(_start, setup), setup)

    def init_fn(params):
        inner_state = inner.init(params)
        source, _ = setup.check(orbit.bind(setup.syms, params), inner_state, params)  # eagerly
        lr = setup.learning_rate_at(source, jnp.zeros((), jnp.int32), inner_state)
        diagnostics, recursion = start_jit(params, inner_state, lr)
        return MonitorState(inner_state, jnp.zeros((), jnp.int32), diagnostics, recursion)

    def update_fn(updates, state, params=None, **extra_args):
        checks.require_params(params, "ksbopt.monitor")
        new_updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
        binding = orbit.bind(setup.syms, params)
        source, plans = setup.check(binding, state.inner, params)
        lr = setup.learning_rate_at(source, state.monitor_count, inner_state)
        leaves = lambda tree: orbit.promote(jax.tree.leaves(tree))
        ctx = StepContext(
            binding, plans, dyn, leaves(params), leaves(updates), leaves(new_updates),
            state.inner, inner_state, lr,
        )  # fmt: skip
        diagnostics, recursion, ok = _record(ctx, state, every)
        count = jnp.where(ok, optax.safe_increment(state.monitor_count), state.monitor_count)
        new_state = MonitorState(inner_state, count, diagnostics, recursion)
        return _ordered_after(new_updates, ok), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What one :func:`monitor` call fixed: the declarations, the dynamics and where the
    learning rate comes from (hashable when they are: it keys the compiled ``init``)."""

    syms: tuple
    dyn: dynamics_lib.Dynamics | None
    explicit_lr: Any

    def lr_source(self, state) -> str | None:
        """ "explicit" (given to the factory), "state" (an inject_hyperparams state) or None."""
        if self.explicit_lr is not None:
            return "explicit"
        if _state_learning_rates(state):
            return "state"
        return None

    def learning_rate_at(self, source, step, state):
        if source == "explicit":
            lr = self.explicit_lr
            return lr(step) if callable(lr) else lr
        if source == "state":
            return _state_learning_rates(state)[0]
        return None

    def check(self, binding, inner_state, params):
        """The learning-rate source and the plan of every symmetry; errors at ``init``."""
        source = self.lr_source(inner_state)
        if len(_state_learning_rates(inner_state)) > 1 and self.explicit_lr is None:
            raise ValueError(
                "the wrapped optimizer's state holds several 'learning_rate' hyperparameters; "
                "say which one the monitor uses: ksbopt.monitor(tx, symmetries, "
                "learning_rate=...) or dynamics=ksbopt.dynamics.sgd(learning_rate, ...)."
            )
        if self.dyn is not None:
            self.dyn.check_state(inner_state, params)
            if source is None:
                raise ValueError(
                    f"dynamics={self.dyn!r} has learning_rate=None and the wrapped optimizer "
                    "has no optax.inject_hyperparams state to read it from; give "
                    "ksbopt.dynamics.<kind>(learning_rate, ...)."
                )
        return source, [plan_for(b, self.dyn, source is not None) for b in binding.bound]


def _start(setup: _Setup, params, inner_state, lr):
    """The diagnostics and recursions at ``init`` (no step taken yet)."""
    binding = orbit.bind(setup.syms, params)
    _, plans = setup.check(binding, inner_state, params)
    w = orbit.promote(jax.tree.leaves(params))
    zeros = [jnp.zeros_like(x) for x in w]
    q0 = [b.charge(w) for b in binding.bound]
    hb = ("hb", "hbd")
    # Zeros computed from q (not jnp.zeros_like) so that under jit they inherit the
    # charges' sharding instead of coming out replicated.
    zero = lambda q, p: jnp.where(jnp.isfinite(q), 0 * q, 0) if p.recursion in hb else None
    recursion = RecursionState(
        predicted_carry=with_recursion(q0, plans, lambda q, p: q),
        overlap_carry=with_recursion(q0, plans, zero),
        velocity_carry=with_recursion(q0, plans, zero),
        previous_carry=with_recursion(
            q0, plans, lambda q, p: q if p.recursion == "shift_hb" else None
        ),
        learning_rate_carry=with_recursion(q0, plans, lambda q, p: jnp.zeros((), q.dtype)),
    )
    ctx = StepContext(binding, plans, setup.dyn, w, zeros, zeros, inner_state, inner_state, lr)
    sums = ctx.sums(diagnose_requests(ctx))
    diagnostics = no_step(diagnose(ctx, recursion, jnp.full((), -1, jnp.int32), sums))
    return strong((diagnostics, recursion))


def _finite(diagnostics) -> jax.Array:
    """Whether every floating diagnostic (small per-group arrays) is finite, in one reduction."""
    leaves = jax.tree.leaves(diagnostics)
    return all_finite_values([x for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)])


def _record(ctx: StepContext, state: MonitorState, every):
    """One step: the recursions always, the diagnostics every ``every`` steps; a step whose
    gradient (or diagnostics) is not finite keeps the old state. Returns the diagnostics,
    the recursions and whether the step counted."""
    step = state.monitor_count
    static_every = isinstance(every, int)
    if static_every and every == 1:
        # One pass over each leaf serves the recursions and the diagnostics.
        both = diagnose_requests(ctx)
        for i, names in advance_requests(ctx).items():
            both[i] = both[i] + names
        sums = ctx.sums(both)
    else:
        sums = ctx.sums(advance_requests(ctx))
    recursion, ok = advance(ctx, state.recursion, sums)
    recursion = strong(recursion)

    def compute(sums=None):
        sums = ctx.sums(diagnose_requests(ctx)) if sums is None else sums
        return strong(diagnose(ctx, recursion, step, sums))

    def keep(ok, new, old):
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    def compute_or_keep():
        new = compute()
        return keep(ok & _finite(new), new, state.diagnostics)

    if static_every and every == 1:
        diagnostics = compute(sums)
        ok = ok & _finite(diagnostics)
        diagnostics = keep(ok, diagnostics, state.diagnostics)
    else:
        record = (step % every) == 0
        diagnostics = jax.lax.cond(record, compute_or_keep, lambda: state.diagnostics)
        # On a recorded step the diagnostics say whether it was finite.
        ok = ok & (~record | (diagnostics.step == step))
    return diagnostics, keep(ok, recursion, state.recursion), ok


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
        if math.prod(jnp.shape(u)) < fused_sums.FUSED_MIN_SIZE:
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


_JIT_CACHE: dict = {}


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
