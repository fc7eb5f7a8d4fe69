"""Descriptions of the learning rule a monitored optimizer follows: sgd, rmsprop, adam.

:func:`ksbopt.monitor` measures Noether charges whatever the optimizer; given a
:class:`Dynamics` it also predicts them from the exact recursions (:ref:`P1 <p1>`,
:ref:`P3 <p3>`, :ref:`P4 <p4>`, :ref:`P6 <p6>`, :ref:`P10 <p10>`) and compares. A description
is a frozen, hashable record of the optimizer's hyperparameters, checked when it is made
(unknown kind, a learning rate that is neither a number nor a schedule, a momentum outside
[0, 1), ...) and checked against the wrapped optimizer's state at ``init``
(:meth:`Dynamics.check_state`: e.g. ``adam`` needs the moments ``mu`` and ``nu`` that
``optax.adam`` keeps).

Conventions (the ones of :mod:`ksbopt._src.theory`): ``g`` is the loss gradient that enters
the wrapped optimizer, without weight decay; the step is ``u``, the new parameters ``w + u``.

- ``sgd``, coupled weight decay (``optax.chain(optax.add_decayed_weights(lam),
  optax.sgd(eta, momentum=beta))``): ``v <- beta v + g + lam w``, ``u = -eta v``.
- ``sgd``, decoupled (``optax.chain(optax.trace(beta), optax.add_decayed_weights(lam),
  optax.scale_by_learning_rate(eta))``): ``m <- beta m + g``, ``u = -eta (m + lam w)``.
- ``rmsprop`` (``optax.rmsprop``): ``u = -eta (g / P + lam w)`` with ``P = sqrt(nu + eps)``
  (``eps_in_sqrt``) or ``sqrt(nu) + eps``.
- ``adam`` (``optax.adam`` / ``optax.adamw``): ``u = -eta (m_hat / P + lam w)`` with
  ``P = sqrt(nu_hat + eps_root) + eps``.

Weight decay of the adaptive rules is decoupled (as in ``optax.adamw``); coupled weight decay
(``optax.add_decayed_weights`` before ``optax.adam``) can be described with
``decoupled=False``, but no exact metric-charge identity exists for it and the monitor then
predicts nothing for the metric charges.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

from ksbopt._src import checks

KINDS = ("sgd", "rmsprop", "adam")

_FACTORIES = "ksbopt.dynamics.sgd(...), ksbopt.dynamics.rmsprop(...) or ksbopt.dynamics.adam(...)"


def check_learning_rate(
    learning_rate: Any,
    *,
    name: str = "learning_rate",
    optional: bool = True,
    owner: str = "ksbopt.dynamics",
) -> None:
    """``TypeError`` unless ``learning_rate`` is a number, a schedule (callable) or None;
    ``ValueError`` if it is a negative number."""
    if learning_rate is None and optional:
        return
    if callable(learning_rate):
        return
    if not checks.is_number(learning_rate):
        raise TypeError(
            f"{owner}: {name}={learning_rate!r} (type {type(learning_rate).__name__}) is neither "
            "a number nor a schedule; write a float such as 0.1, a callable step -> learning "
            "rate such as optax.cosine_decay_schedule(0.1, 1000), or None to read it from an "
            "optax.inject_hyperparams state."
        )
    checks.check_nonnegative(owner, name, learning_rate, example=0.1)


def _check_unit(kind: str, value: Any, name: str) -> None:
    owner = f"ksbopt.dynamics.{kind}"
    checks.check_number(owner, name, value, example=0.9)
    checks.check_unit_interval(owner, name, value, example=0.9)


def _check_nonneg(kind: str, value: Any, name: str) -> None:
    owner = f"ksbopt.dynamics.{kind}"
    checks.check_number(owner, name, value, example=0.0)
    checks.check_nonnegative(owner, name, value, example=0.0)


@dataclasses.dataclass(frozen=True)
class Dynamics:
    """The learning rule a monitored optimizer follows, as :func:`ksbopt.monitor` reads it.

    Build it with :func:`sgd`, :func:`rmsprop` or :func:`adam`, which validate the numbers;
    the monitor reads it to choose the exact recursion of each charge.

    Attributes:
      kind: ``"sgd"``, ``"rmsprop"`` or ``"adam"``.
      learning_rate: eta: a number, a schedule ``step -> eta`` (step counts from 0), or None
        to read it from the wrapped optimizer's ``optax.inject_hyperparams`` state.
      momentum: beta of heavy ball (sgd) or b1 (adam); 0 for rmsprop.
      weight_decay: lambda.
      decoupled: True if the weight decay multiplies w outside the momentum/metric
        (``u = ... - eta lam w``), False if it is added to the gradient.
      nesterov: Nesterov momentum (sgd).
      decay: the second-moment decay (rmsprop ``decay``, adam ``b2``).
      eps: epsilon of the metric.
      eps_root: adam's epsilon inside the square root.
      eps_in_sqrt: rmsprop's placement of eps (optax's default True).
      bias_correction: whether the second moment is bias-corrected (always for adam).

    Example:
      >>> import ksbopt
      >>> d = ksbopt.dynamics.sgd(0.1, momentum=0.9, weight_decay=5e-4)
      >>> isinstance(d, ksbopt.dynamics.Dynamics), d.momentum, d.decoupled
      (True, 0.9, False)

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716
    """

    kind: str
    learning_rate: Any = None
    momentum: Any = 0.0
    weight_decay: Any = 0.0
    decoupled: bool = False
    nesterov: bool = False
    decay: Any = 0.0
    eps: Any = 0.0
    eps_root: Any = 0.0
    eps_in_sqrt: bool = True
    bias_correction: bool = False

    def __post_init__(self):
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise ValueError(
                f"kind={self.kind!r} is not a known dynamics kind; the kinds are {KINDS}. "
                f"Build a description with {_FACTORIES}."
            )
        check_learning_rate(self.learning_rate)
        _check_unit(self.kind, self.momentum, "momentum" if self.kind == "sgd" else "b1")
        _check_nonneg(self.kind, self.weight_decay, "weight_decay")
        _check_unit(self.kind, self.decay, "decay" if self.kind == "rmsprop" else "b2")
        _check_nonneg(self.kind, self.eps, "eps")
        _check_nonneg(self.kind, self.eps_root, "eps_root")
        for name in ("decoupled", "nesterov", "eps_in_sqrt", "bias_correction"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} must be True or False.")
        if self.nesterov and self.kind != "sgd":
            raise ValueError(
                f"nesterov=True is only described for sgd, not {self.kind}; write "
                "ksbopt.dynamics.sgd(learning_rate, momentum, nesterov=True) for optax.sgd with "
                f"nesterov=True, or leave nesterov=False for {self.kind}."
            )

    # ------------------------------------------------------------------ properties

    @property
    def adaptive(self) -> bool:
        """True for rmsprop and adam (a diagonal metric P from the second moment)."""
        return self.kind in ("rmsprop", "adam")

    @property
    def has_momentum(self) -> bool:
        """True if the rule keeps a first-moment / momentum buffer."""
        return not _is_zero(self.momentum)

    @property
    def has_weight_decay(self) -> bool:
        return not _is_zero(self.weight_decay)

    def learning_rate_at(self, step: jax.Array) -> Any:
        """eta at ``step`` (0-based) for a number or schedule; None if read from the state."""
        lr = self.learning_rate
        return lr(step) if callable(lr) else lr

    # ------------------------------------------------------------------ state checks

    def check_state(self, state: Any, params: Any, *, what: str = "tx") -> None:
        """``ValueError`` if the wrapped optimizer's state does not fit this description.

        sgd with momentum needs one momentum buffer ``trace``; no rule but rmsprop/adam may
        keep a second moment ``nu``; rmsprop needs ``nu`` and no first moment ``mu``; adam
        needs ``mu``, ``nu`` and a ``ScaleByAdamState`` (its step count). Buffers must be
        shaped like ``params``.
        """
        found = {key: _get_all(state, key) for key in ("trace", "mu", "nu")}
        have = ", ".join(f"{k} x{len(v)}" for k, v in found.items() if v) or "none of them"
        head = f"dynamics={self!r} does not match the wrapped optimizer {what}: "
        tail = f" (buffers found in its state: {have})."
        if self.kind == "sgd":
            if found["nu"]:
                raise ValueError(
                    head + "its state keeps a second moment 'nu', so it is adaptive; describe "
                    "it with ksbopt.dynamics.adam(...) or ksbopt.dynamics.rmsprop(...)" + tail
                )
            if self.has_momentum and len(found["trace"]) != 1:
                raise ValueError(
                    head + f"momentum={self.momentum} needs exactly one momentum buffer 'trace' "
                    "(as optax.sgd(lr, momentum=...) or optax.trace keep); give the momentum of "
                    "the wrapped optimizer, or momentum=0.0 for plain SGD" + tail
                )
        elif self.kind == "rmsprop":
            if len(found["nu"]) != 1:
                raise ValueError(
                    head + "rmsprop reads one second moment 'nu' from the state "
                    "(as optax.rmsprop keeps); wrap optax.rmsprop" + tail
                )
            if found["mu"]:
                raise ValueError(
                    head + "the state keeps a first moment 'mu' as Adam does; "
                    "describe it with ksbopt.dynamics.adam(...)" + tail
                )
        else:
            if (
                len(found["nu"]) != 1
                or len(found["mu"]) != 1
                or not _get_all(state, "ScaleByAdamState")
            ):
                raise ValueError(
                    head + "adam reads the moments 'mu' and 'nu' and the step count "
                    "of one optax.scale_by_adam state (optax.adam, optax.adamw); "
                    "wrap such an optimizer or describe the rule with "
                    "ksbopt.dynamics.sgd(...)" + tail
                )
        params_def = jax.tree.structure(params)
        for key, values in found.items():
            for value in values:
                if jax.tree.structure(value) != params_def:
                    raise ValueError(
                        head + f"its buffer {key!r} is not shaped like the parameters "
                        f"({jax.tree.structure(value)} vs {params_def}); the monitor needs "
                        "one buffer entry per parameter leaf" + tail
                    )

    def preconditioner(self, state: Any) -> Callable[[int, jax.Array], jax.Array]:
        """For adaptive rules: leaf index, nu leaf -> the diagonal metric P of this step.

        RMSProp: ``sqrt(nu_hat + eps)`` (``eps_in_sqrt``) or ``sqrt(nu_hat) + eps``; Adam:
        ``sqrt(nu_hat + eps_root) + eps``; ``nu_hat`` bias-corrected with the count kept in
        ``state`` (the state AFTER the update, whose ``nu`` the step used).
        """
        import jax.numpy as jnp

        if self.kind == "adam":
            count = optax.tree.get(state, "ScaleByAdamState").count
            correct = True
        else:
            counted = _get_all(state, "ScaleByRmsWithCountState")
            count = counted[0].count if counted else None
            correct = self.bias_correction and count is not None

        def metric(nu: jax.Array) -> jax.Array:
            if correct:
                t = jnp.asarray(count, nu.dtype)
                den = 1 - jnp.asarray(self.decay, nu.dtype) ** t  # 0 before the first step
                nu = jnp.where(den != 0, nu / jnp.where(den != 0, den, 1), nu)
            if self.kind == "adam":
                return jnp.sqrt(nu + self.eps_root) + self.eps
            if self.eps_in_sqrt:
                return jnp.sqrt(nu + self.eps)
            return jnp.sqrt(nu) + self.eps

        return metric

    def adam_count(self, state: Any) -> jax.Array:
        """Adam's step count t after the update (for the bias correction of m)."""
        return optax.tree.get(state, "ScaleByAdamState").count


def _is_zero(x: Any) -> bool:
    if isinstance(x, jax.core.Tracer):
        return False
    return float(x) == 0.0


def _get_all(tree: Any, key: str) -> list:
    """Every value stored under ``key`` (NamedTuple field, dict key or NamedTuple name)."""
    return [v for _, v in optax.tree.get_all_with_path(tree, key)]


# ---------------------------------------------------------------------- public factories


def sgd(
    learning_rate=None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    *,
    decoupled: bool = False,
    nesterov: bool = False,
) -> Dynamics:
    """Describe (heavy-ball / Nesterov) SGD with weight decay for :func:`ksbopt.monitor`.

    With this description the monitor predicts, per group, the charge after every step from
    the exact recursions of :ref:`exact-identities`, fed with measured gradient or momentum norms:

    - momentum 0: [derived from NM] P1 (scale, rescale)
      ``x_{k+1} = (1 - eta lam)^2 x_k + eta^2 |g_k|^2``, [derived] P10 (linear), [derived
      from NM] P4 (translation) ``s_{k+1} = (1 - eta lam) s_k``;
    - heavy ball: [derived] P3, coupled or decoupled, carrying the overlap ``<w_k, v_{k+1}>``
      (the momentum buffer ``trace`` is read from the wrapped optimizer's state), and P4;
    - Nesterov: P4 only (translation charges without coupled weight decay, or with decoupled
      weight decay); no exact scale recursion is stated for it, so none is predicted;
    - [derived] P7a: the equilibrium angular update ``sqrt(2 eta lam / (1 + beta))`` of scale
      groups (coupled weight decay, or no momentum).

    Args:
      learning_rate: eta, a number or a schedule ``step -> eta``; None reads it from an
        ``optax.inject_hyperparams`` state of the wrapped optimizer.
      momentum: beta in [0, 1) (0: plain SGD).
      weight_decay: lambda >= 0, the same for every parameter of a group.
      decoupled: weight decay outside the momentum (``u = -eta (m + lam w)``) instead of in
        the gradient (``optax.add_decayed_weights`` before ``optax.sgd``).
      nesterov: Nesterov momentum (``optax.sgd(..., nesterov=True)``).

    Returns:
      A :class:`Dynamics`.

    Example:
      >>> import ksbopt
      >>> ksbopt.dynamics.sgd(0.1, momentum=0.9, weight_decay=5e-4).kind
      'sgd'

    References:
      Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep
      Learning Dynamics", ICLR 2021, https://arxiv.org/abs/2012.04728
    """
    return Dynamics("sgd", learning_rate, momentum, weight_decay, decoupled, nesterov)


def rmsprop(
    learning_rate=None,
    decay: float = 0.9,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    decoupled: bool = True,
) -> Dynamics:
    """Describe RMSProp (``optax.rmsprop``) for :func:`ksbopt.monitor`.

    The monitor reads the second moment ``nu`` of the step from the wrapped optimizer's state,
    builds the metric ``P = sqrt(nu + eps)`` (or ``sqrt(nu) + eps``) and checks [derived] P6:
    ``w'^T P w' = w^T P w + eta^2 g^T P^-1 g`` per scale/rescale group (with decoupled weight
    decay: ``(1 - eta lam)^2 w^T P w + eta^2 g^T P^-1 g``, P1 in the coordinates
    ``P^(1/2) w``), and ``<P 1, w'> = (1 - eta lam) <P 1, w>`` per translation group.

    Args:
      learning_rate: eta, a number or a schedule, or None (read from the state).
      decay: the decay of ``nu`` (optax's ``decay``).
      eps: optax's ``eps``.
      weight_decay: lambda.
      eps_in_sqrt: optax's ``eps_in_sqrt`` (default True: ``P = sqrt(nu + eps)``).
      bias_correction: optax's ``bias_correction``.
      decoupled: weight decay outside the metric (``u = -eta (g / P + lam w)``).

    Returns:
      A :class:`Dynamics`.

    Example:
      >>> import ksbopt
      >>> ksbopt.dynamics.rmsprop(1e-3).kind
      'rmsprop'

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716
    """
    return Dynamics(
        "rmsprop",
        learning_rate,
        0.0,
        weight_decay,
        decoupled,
        False,
        decay,
        eps,
        0.0,
        eps_in_sqrt,
        bias_correction,
    )


def adam(
    learning_rate=None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    *,
    decoupled: bool = True,
) -> Dynamics:
    """Describe Adam / AdamW (``optax.adam``, ``optax.adamw``) for :func:`ksbopt.monitor`.

    The monitor reads ``mu``, ``nu`` and the count of the wrapped ``scale_by_adam`` state and
    checks the metric charge ``1/2 w^T P w`` (``P = sqrt(nu_hat + eps_root) + eps``) of every
    scale/rescale group after each step against [derived] P6 with momentum:

    ``1/2 w'^T P w' = (1 - a)^2 1/2 w^T P w - (1 - a) c b1 <w, m_k> + c^2 1/2 m^T P^-1 m``

    with ``a = eta lam``, ``c = eta / (1 - b1^t)`` and ``m = m_{k+1}``; the cross term uses
    ``<w_k, m_{k+1}> = b1 <w_k, m_k>`` (the gradient is orthogonal to the generator). Per
    translation group ``<P 1, w'> = (1 - a) <P 1, w>``. With ``b1 = 0`` this is RMSProp's P6.

    Args:
      learning_rate: eta, a number or a schedule, or None (read from the state).
      b1, b2, eps, eps_root: as in ``optax.adam``.
      weight_decay: lambda (``optax.adamw``'s ``weight_decay``).
      decoupled: True for AdamW (default).

    Returns:
      A :class:`Dynamics`.

    Example:
      >>> import ksbopt
      >>> ksbopt.dynamics.adam(1e-3, weight_decay=1e-4).decoupled
      True

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716
    """
    return Dynamics(
        "adam", learning_rate, b1, weight_decay, decoupled, False, b2, eps, eps_root, True, True
    )


def as_dynamics(dynamics: Any) -> Dynamics | None:
    """Validate the ``dynamics`` argument of :func:`ksbopt.monitor`."""
    if dynamics is None or isinstance(dynamics, Dynamics):
        return dynamics
    if isinstance(dynamics, str):
        hint = (
            f"ksbopt.dynamics.{dynamics}(learning_rate, ...)" if dynamics in KINDS else _FACTORIES
        )
        raise TypeError(f"dynamics={dynamics!r} is a string, not a description; write {hint}.")
    raise TypeError(
        f"dynamics={dynamics!r} (type {type(dynamics).__name__}) is not a dynamics description; "
        f"write {_FACTORIES}, or None to only measure."
    )
