"""Charge targets for :func:`ksbopt.steer`.

A target answers, for one bound symmetry and the current step, "which charge should each
group have?". Targets are validated against the declarations at ``init`` (a negative scale
charge, ``balanced()`` for a scale symmetry, ... are errors there, not silent no-ops).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ksbopt._src.symmetries.bound import BoundSymmetry


class Target(abc.ABC):
    r"""Base class of charge targets: ``charge_for`` gives the target of one symmetry.

    :func:`ksbopt.steer` asks the target for the charge :math:`T_g` each group g should have
    after this step and moves the parameters along the orbit so that
    :math:`Q_g \leftarrow Q_g + \mathrm{rate}\,(T_g - Q_g)`. A custom target overrides
    :meth:`charge_for` (and, if it keeps state, :meth:`init_state` and :meth:`step`);
    :meth:`check` may reject a symmetry it cannot serve at ``init``.

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> class Doubled(ksbopt.targets.Target):
      ...     def charge_for(self, bound, charge, initial, count):
      ...         return 2 * initial
      >>> params, sym = {"w": jnp.array([3.0, 4.0])}, ksbopt.Scale("w", axis=None)
      >>> tx = ksbopt.steer(sym, Doubled())
      >>> u, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
      >>> round(float(ksbopt.charges(optax.apply_updates(params, u), sym)[0][0]), 4)
      25.0

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716
    """

    def check(self, bound: BoundSymmetry) -> None:  # noqa: B027  (optional hook)
        """Raise ``ValueError`` at ``init`` if the target cannot apply to ``bound``."""

    @abc.abstractmethod
    def charge_for(
        self, bound: BoundSymmetry, charge: jax.Array, initial: jax.Array, count: jax.Array
    ) -> jax.Array:
        """Target charge (shaped like ``charge``) given the current and initial charges."""

    # Stateful targets (an EMA of a measured gradient, a simulated trajectory) override the
    # two methods below; their state lives in ``SteerState.target_state``, one entry per
    # symmetry. Stateless targets need neither.

    def init_state(self, bound: BoundSymmetry, flat: list) -> Any:
        """Per-symmetry state at ``init`` from the (promoted) parameter leaves; default none."""
        del bound, flat
        return ()

    def step(
        self,
        bound: BoundSymmetry,
        state: Any,
        *,
        params: list,
        updates: list,
        charge: jax.Array,
        initial: jax.Array,
        count: jax.Array,
        extra_args: dict,
    ) -> tuple[jax.Array, Any]:
        """Target charge and new state for one step.

        Args:
          bound: the symmetry.
          state: this target's state for ``bound``.
          params: the current parameter leaves (promoted to at least float32).
          updates: the incoming (base optimizer's) update leaves, promoted.
          charge: the charge after the base step, Q(params + updates).
          initial: the charge at ``init``.
          count: steps taken before this one.
          extra_args: the extra keyword arguments given to ``update``.

        The default calls :meth:`charge_for` and keeps the state.
        """
        del params, updates, extra_args
        return self.charge_for(bound, charge, initial, count), state


def _broadcast(bound: BoundSymmetry, v: Any, like: jax.Array) -> jax.Array:
    """A scalar (or per-group array) as a charge: for Linear a scalar v means v * I."""
    v = jnp.asarray(v, like.dtype)
    if bound.symmetry.kind == "linear" and v.ndim == 0:
        return v * jnp.broadcast_to(jnp.eye(like.shape[-1], dtype=like.dtype), like.shape)
    return jnp.broadcast_to(v, like.shape)


def _check_scale_value(bound: BoundSymmetry, value: Any, name: str) -> None:
    if isinstance(value, jax.core.Tracer):  # a traced hyperparameter: checked where concrete
        return
    # numpy, not jnp: under jit (tx.init inside jax.jit) jnp would stage the comparison.
    if bound.symmetry.kind == "scale" and bool(np.any(np.asarray(value) <= 0)):
        raise ValueError(
            f"{name}: a scale charge is 1/2 |w|^2 > 0, got value={value!r} for "
            f"{bound.symmetry!r}. Give a positive value, or 'initial' to hold the charge at init."
        )


@dataclasses.dataclass(frozen=True, eq=False)
class constant(Target):
    r"""Hold each charge at a constant.

    The target is :math:`T_g = v` for every step (:math:`T = v I` for a ``Linear``
    symmetry given a number), or :math:`T_g = Q_g(w_0)` for ``"initial"``, which with
    ``rate=1`` is what :func:`ksbopt.retract` does.

    Args:
      value: a number (the same charge for every group; for ``Linear`` a number v means
        v I), an array shaped like the charge, or ``"initial"``: the charge at ``init``.

    Example:
      >>> import ksbopt
      >>> ksbopt.targets.constant("initial")
      constant(value='initial')

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716
    """

    value: Any = "initial"

    def __post_init__(self):
        if isinstance(self.value, str) and self.value != "initial":
            raise ValueError(
                f"value={self.value!r} is not a charge; write a number, an array or 'initial'."
            )

    def check(self, bound: BoundSymmetry) -> None:
        if not isinstance(self.value, str):
            _check_scale_value(bound, self.value, "targets.constant")

    def charge_for(self, bound, charge, initial, count):
        if isinstance(self.value, str):
            return initial
        return _broadcast(bound, self.value, charge)


@dataclasses.dataclass(frozen=True)
class schedule(Target):
    """A charge that follows ``fn(step)`` (an optax schedule or any jit-able function).

    Args:
      fn: ``step -> charge``; the step counts from 0. The value broadcasts like a
        :class:`constant` value (a number for every group, or an array shaped like the
        charge).

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> sym = ksbopt.Scale("w", axis=None)
      >>> tx = ksbopt.steer(sym, ksbopt.targets.schedule(optax.linear_schedule(8.0, 2.0, 10)))
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> u, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
      >>> round(float(ksbopt.charges(optax.apply_updates(params, u), sym)[0][0]), 4)
      8.0

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716
    """

    fn: Callable[[jax.Array], Any]

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"fn={self.fn!r} must be callable: step -> charge value.")

    def charge_for(self, bound, charge, initial, count):
        return _broadcast(bound, self.fn(count), charge)


@dataclasses.dataclass(frozen=True)
class balanced(Target):
    r"""Balance rescale and linear symmetries: every charge goes to 0.

    For ``Rescale`` each unit gets ``|w_in| = |w_out|``; for ``Linear``
    :math:`A^\top A = B B^\top`, reached in closed form (:ref:`orbit-moves`) by

    .. math::

        G G^\top = P^{-1/2} (P^{1/2} R P^{1/2})^{1/2} P^{-1/2}, \qquad
        P = A^\top A, \quad R = B B^\top .

    This is the balancing of ENorm.

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> sym = ksbopt.Rescale(incoming="a", outgoing="b")
      >>> params = {"a": jnp.array([[4.0]]), "b": jnp.array([[1.0]])}
      >>> tx = ksbopt.steer(sym, ksbopt.targets.balanced())
      >>> zero = {"a": jnp.zeros((1, 1)), "b": jnp.zeros((1, 1))}
      >>> u, _ = tx.update(zero, tx.init(params), params)
      >>> new = optax.apply_updates(params, u)
      >>> round(float(new["a"][0, 0]), 4), round(float(new["b"][0, 0]), 4)
      (2.0, 2.0)

    References:
      Stock, Graham, Gribonval, Jegou, "Equi-normalization of Neural Networks", ICLR 2019,
      https://arxiv.org/abs/1902.10416
    """

    def check(self, bound: BoundSymmetry) -> None:
        if bound.symmetry.kind not in ("rescale", "linear"):
            raise ValueError(
                f"targets.balanced() applies to Rescale and Linear symmetries, not to "
                f"{bound.symmetry!r}; give that symmetry its own steer with targets.constant."
            )

    def charge_for(self, bound, charge, initial, count):
        return jnp.zeros_like(charge)


def as_target(target: Any) -> Target:
    """A Target from a Target, a number/array (constant) or a callable (schedule)."""
    if isinstance(target, Target):
        return target
    if isinstance(target, str):
        return constant(target)
    if callable(target):
        return schedule(target)
    try:
        jnp.asarray(target)
    except TypeError:
        raise TypeError(
            f"target={target!r} is not a charge target; write ksbopt.targets.constant(v), "
            "targets.schedule(fn), targets.balanced(), a number or a callable step -> value."
        ) from None
    return constant(target)
