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

from ksbopt._src.symmetry import BoundSymmetry


class Target(abc.ABC):
    """Base class: ``charge_for`` gives the target charge of one symmetry at one step."""

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
    """Hold each charge at a constant.

    Args:
      value: a number (the same charge for every group; for ``Linear`` a number v means
        v I), an array shaped like the charge, or ``"initial"``: the charge at ``init``.

    Example:
      >>> import ksbopt
      >>> ksbopt.targets.constant("initial")
      constant(value='initial')
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

    Example:
      >>> import optax, ksbopt
      >>> t = ksbopt.targets.schedule(optax.linear_schedule(2.0, 1.0, 100))
    """

    fn: Callable[[jax.Array], Any]

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"fn={self.fn!r} must be callable: step -> charge value.")

    def charge_for(self, bound, charge, initial, count):
        return _broadcast(bound, self.fn(count), charge)


@dataclasses.dataclass(frozen=True)
class balanced(Target):
    """Balance rescale and linear symmetries: every charge goes to 0.

    For ``Rescale`` each unit gets |w_in| = |w_out|; for ``Linear`` A^T A = B B^T (the
    closed form of THEORY.md: G G^T = P^-1/2 (P^1/2 R P^1/2)^1/2 P^-1/2, P = A^T A,
    R = B B^T). This is the balancing of ENorm (Stock et al., "Equi-normalization of
    Neural Networks", ICLR 2019, https://arxiv.org/abs/1902.10416).

    Example:
      >>> import ksbopt
      >>> ksbopt.targets.balanced()
      balanced()
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
