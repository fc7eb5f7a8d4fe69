"""Rotational wrapper: fixed unit norms and an angular update held at its equilibrium value.

Kosson et al. (ICML 2024) show that weight decay drives each scale-invariant unit to a
"rotational equilibrium" where its norm is steady and it turns by a fixed expected angle per
step, the same for every unit and layer. Their rotational variants reach that state from the
first step: the norm of every unit is frozen and its per-step rotation is set to the
equilibrium value predicted from the base optimizer's learning rate, weight decay and
momentum.

Flax layout: a unit is ``kernel[..., j]`` (the LAST axis) of every leaf with two or more
dimensions; leaves with fewer dimensions (biases, norm scales) are scale-sensitive and get
the base update with learning rate and weight decay.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ksbopt._src.peers._common import (
    check_range,
    compute_dtype,
    concrete_float,
    is_kernel,
    map_leaves,
    one_minus_power,
    require_params,
    safe_div,
    unit_norm,
    unit_sum,
)

__all__ = ["RotationalState", "equilibrium_angular_update", "rotational"]

_KINDS = ("sgdm", "adamw")


def _check_kind(owner: str, kind: Any) -> None:
    if kind not in _KINDS:
        raise ValueError(
            f"{owner}: {kind=} is not one of {_KINDS}; write kind='sgdm' for a heavy-ball base "
            "(optax.trace) or kind='adamw' for an Adam-like base (optax.scale_by_adam)."
        )


def equilibrium_angular_update(
    learning_rate: Any, weight_decay: Any, momentum: Any = 0.9, *, kind: str = "sgdm"
) -> Any:
    """Expected per-step rotation of a scale-invariant unit in rotational equilibrium.

    Math [paper: Kosson et al. 2024, Table 1; THEORY.md P7a for SGDM]:

    * ``kind="sgdm"`` (heavy ball with coupled L2 decay, momentum ``beta``):
      ``eta_r = sqrt(2 eta lambda / (1 + beta))``;
    * ``kind="adamw"`` (Adam-like normalised update, decoupled decay, ``beta = b1``):
      ``eta_r = sqrt(2 eta lambda (1 - beta) / (1 + beta))``.

    The AdamW value comes from the same random-walk balance: the decay removes
    ``2 eta lambda |w|^2`` per step and each normalised update adds ``eta^2 C`` (C entries
    per unit) over its lifetime, so ``|w|^2 = eta C / (2 lambda)``, while momentum averaging
    shrinks a single step to ``eta^2 C (1 - beta) / (1 + beta)``.

    Args:
      learning_rate: the base optimizer's learning rate ``eta >= 0`` (scalar or array).
      weight_decay: its weight decay ``lambda >= 0``.
      momentum: its momentum (``b1`` for Adam) in ``[0, 1)``.
      kind: ``"sgdm"`` or ``"adamw"``.

    Returns:
      ``eta_r`` (a float for float inputs, an array otherwise), in radians per step.

    Example:
      >>> from ksbopt._src.peers.rotational import equilibrium_angular_update
      >>> round(equilibrium_angular_update(0.1, 5e-4, 0.9), 6)
      0.007255
      >>> round(equilibrium_angular_update(1e-3, 0.1, 0.9, kind="adamw"), 6)
      0.003244

    References:
      A. Kosson, B. Messmer, M. Jaggi, "Rotational Equilibrium: How Weight Decay Balances
      Learning Across Neural Networks", ICML 2024, https://arxiv.org/abs/2305.17212
    """
    owner = "equilibrium_angular_update"
    _check_kind(owner, kind)
    _check_hparams(owner, learning_rate, weight_decay, momentum, 0.0)
    values = [concrete_float(v) for v in (learning_rate, weight_decay, momentum)]
    if None not in values:
        return math.sqrt(_eta_r_squared(*values, kind))
    return jnp.sqrt(_eta_r_squared(learning_rate, weight_decay, momentum, kind))


def _eta_r_squared(learning_rate, weight_decay, momentum, kind):
    """``eta_r**2`` without checks (used inside ``update``, where values may be traced)."""
    rate = 2 * learning_rate * weight_decay / (1 + momentum)  # THEORY.md P7a
    return rate * (1 - momentum) if kind == "adamw" else rate


def _check_hparams(owner, learning_rate, weight_decay, momentum, rms_decay) -> None:
    check_range(
        owner,
        "learning_rate",
        learning_rate,
        low=0.0,
        hint="Pass the base optimizer's positive learning rate.",
    )
    check_range(
        owner,
        "weight_decay",
        weight_decay,
        low=0.0,
        hint="Pass the weight decay whose equilibrium you want (e.g. 5e-4 for SGDM).",
    )
    check_range(
        owner,
        "momentum",
        momentum,
        low=0.0,
        high=1.0,
        high_open=True,
        hint="Pass the base's momentum (b1 for Adam), e.g. 0.9.",
    )
    check_range(
        owner,
        "rms_decay",
        rms_decay,
        low=0.0,
        high=1.0,
        high_open=True,
        hint="Use e.g. 0.99.",
    )


class RotationalState(NamedTuple):
    """State of :func:`rotational`.

    Attributes:
      count: number of updates done so far (int32 scalar).
      base_state: the wrapped base transform's state.
      rms: per-unit running average of the squared tangential base step, shape
        ``(units,)`` for kernels (a zero scalar placeholder for other leaves).
      target_norm: per-unit norm frozen at ``init``, shape ``(units,)`` for kernels (a zero
        scalar placeholder for other leaves).

    The rotation per step is set to the equilibrium angular update, for ``kind="sgdm"``
    ``A* = sqrt(2 eta lambda / (1 + beta))`` ([derived] THEORY.md P7a).

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> tx = ksbopt.rotational(optax.trace(0.9), learning_rate=0.1, weight_decay=5e-4)
      >>> state = tx.init({"kernel": jnp.array([[3.0, 0.0], [4.0, 2.0]])})
      >>> state.target_norm["kernel"]
      Array([5., 2.], dtype=float32)

    References:
      Kosson, Messmer, Jaggi, "Rotational Equilibrium: How Weight Decay Balances Learning
      Across Neural Networks", ICML 2024, https://arxiv.org/abs/2305.17212
    """

    count: jax.Array
    base_state: optax.OptState
    rms: optax.Updates
    target_norm: optax.Updates


def _unit_norm(x: jax.Array) -> jax.Array:
    """The norm of each unit ``x[..., j]``, computed as ``m |x / m|`` with ``m = max |x|``.

    Finite for every finite ``x``: a plain sum of squares overflows float32 once a unit's
    norm exceeds about 1.8e19, and the frozen norm would then be inf (docs/edge_cases.md).
    """
    m = jnp.max(jnp.abs(x), axis=tuple(range(x.ndim - 1)))
    return m * unit_norm(safe_div(x, m))


def rotational(
    base: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: Any,
    momentum: Any = 0.9,
    rms_decay: Any = 0.99,
    *,
    kind: str = "sgdm",
) -> optax.GradientTransformationExtraArgs:
    """Rotational wrapper (REQ): frozen unit norms, equilibrium angular update per step.

    Math [paper: Kosson et al. 2024, Sec. 5 "rotational variants"]. Let ``u`` be the
    base's step direction (``base`` must return a descent *direction* without learning
    rate and weight decay, e.g. ``optax.trace(momentum)`` or ``optax.scale_by_adam(b1)``)
    and ``eta_r`` = :func:`equilibrium_angular_update` of ``(learning_rate, weight_decay,
    momentum, kind)``. For every unit ``w_j = w[..., j]`` of a leaf with ``ndim >= 2``
    (Flax: the LAST axis) with frozen norm ``n_j = |w_j(0)|``::

        u_j   <- u_j - <u_j, w_hat_j> w_hat_j                 (tangential part)
        nu_j  <- rms_decay nu_j + (1 - rms_decay) |u_j|^2     (debiased by 1 - rms_decay^t)
        w_j   <- w_j - eta_r * n_j * u_j / sqrt(nu_j)
        w_j   <- n_j * w_j / |w_j|

    so each unit keeps its initial norm and turns by about ``eta_r`` radians per step on
    average, whatever the gradient scale. Leaves with ``ndim < 2`` are scale-sensitive and
    follow the base: ``kind="sgdm"`` adds the coupled decay ``lambda w`` to their gradient
    before the base and steps ``-eta u``; ``kind="adamw"`` steps ``-eta (u + lambda w)``
    (decoupled). Design choices, documented because the paper leaves them open or we could
    not check them line by line: the RMS average uses its own decay ``rms_decay`` with
    Adam-style debiasing; it tracks the tangential step (the radial part cannot rotate a
    unit whose norm is frozen); no centring of the update is done. A zero-norm unit stays
    zero (its frozen norm is 0) without NaN; initialise units non-zero or mask them out
    with ``optax.partition``.

    Args:
      base: the base direction, an ``optax.GradientTransformation`` without learning rate
        or weight decay (it gets the gradients, with the coupled decay on 1-D leaves when
        ``kind="sgdm"``, and ``params``).
      learning_rate: the base learning rate ``eta >= 0`` (scalar or optax schedule).
      weight_decay: the weight decay ``lambda >= 0`` whose equilibrium is imposed.
      momentum: the base's momentum (``b1`` for Adam) in ``[0, 1)``, used in ``eta_r``.
      rms_decay: decay in ``[0, 1)`` of the per-unit RMS average of the base step.
      kind: ``"sgdm"`` (``eta_r = sqrt(2 eta lambda / (1 + beta))``) or ``"adamw"``
        (``eta_r = sqrt(2 eta lambda (1 - beta) / (1 + beta))``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`RotationalState`;
      ``update`` needs ``params`` and forwards extra args to ``base``. With
      ``optax.inject_hyperparams`` the base is passed through unchanged (it is not a
      number).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ksbopt import rotational
      >>> params = {"kernel": jax.random.normal(jax.random.key(0), (8, 4)), "bias": jnp.zeros(4)}
      >>> tx = rotational(optax.scale_by_adam(b1=0.9), 1e-3, 0.1, momentum=0.9, kind="adamw")
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(lambda x: jnp.cos(x + 1.0), params)
      >>> updates, state = tx.update(grads, state, params)
      >>> new = optax.apply_updates(params, updates)
      >>> bool(jnp.allclose(jnp.linalg.norm(new["kernel"], axis=0),
      ...                   jnp.linalg.norm(params["kernel"], axis=0), rtol=1e-5))
      True

    References:
      A. Kosson, B. Messmer, M. Jaggi, "Rotational Equilibrium: How Weight Decay Balances
      Learning Across Neural Networks", ICML 2024, https://arxiv.org/abs/2305.17212
    """
    owner = "rotational"
    if not (hasattr(base, "init") and hasattr(base, "update")):
        raise TypeError(
            f"{owner}: base={base!r} is not an optax transformation; pass e.g. "
            "optax.trace(0.9) or optax.scale_by_adam()."
        )
    _check_kind(owner, kind)
    _check_hparams(owner, learning_rate, weight_decay, momentum, rms_decay)
    base = optax.with_extra_args_support(base)

    def init_fn(params):
        def zeros(w):
            cd = compute_dtype(w)
            return jnp.zeros(w.shape[-1:], cd) if is_kernel(w) else jnp.zeros([], cd)

        def norm0(w):
            return _unit_norm(w.astype(compute_dtype(w))) if is_kernel(w) else zeros(w)

        return RotationalState(
            count=jnp.zeros([], jnp.int32),
            base_state=base.init(params),
            rms=jax.tree.map(zeros, params),
            target_norm=jax.tree.map(norm0, params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        require_params(owner, params)
        count = optax.safe_increment(state.count)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        eta_r = jnp.sqrt(_eta_r_squared(lr, weight_decay, momentum, kind))
        if kind == "sgdm":

            def coupled(g, w):
                return g if is_kernel(w) else g + (weight_decay * w).astype(g.dtype)

            base_in = jax.tree.map(coupled, updates, params)
        else:
            base_in = updates
        directions, base_state = base.update(base_in, state.base_state, params, **extra_args)

        def leaf(u, nu, n, w):
            cd = compute_dtype(w)
            uc, wc = u.astype(cd), w.astype(cd)
            if not is_kernel(w):
                step = uc if kind == "sgdm" else uc + weight_decay * wc
                return (-lr * step).astype(u.dtype), nu
            w_hat = safe_div(wc, _unit_norm(wc))
            tangent = uc - unit_sum(uc * w_hat) * w_hat
            nu_new = rms_decay * nu + (1 - rms_decay) * unit_sum(tangent * tangent)
            rms = jnp.sqrt(nu_new / one_minus_power(rms_decay, count, cd))
            moved = wc - (eta_r * n) * safe_div(tangent, rms)
            new = n * safe_div(moved, _unit_norm(moved))
            return (new - wc).astype(u.dtype), nu_new.astype(nu.dtype)

        out, rms = map_leaves(leaf, directions, state.rms, state.target_norm, params, n_out=2)
        return out, RotationalState(
            count=count, base_state=base_state, rms=rms, target_norm=state.target_norm
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
