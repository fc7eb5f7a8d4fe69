"""The Neural Mechanics integral forms with momentum: damped-oscillator kernels and the
damped charges of scale and translation groups (:ref:`exact-identities`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ksbopt._src import checks
from ksbopt._src.theory.arguments import check_hyper


def _nm_rates(learning_rate, momentum, stiffness):
    """``gamma = mu / (2 m)`` and ``omega^2 = kappa / m`` with ``m = eta (1 + beta) / 2``."""
    mass = learning_rate * (1 + jnp.asarray(momentum)) / 2
    gamma = (1 - jnp.asarray(momentum)) / (2 * mass)
    omega_sq = jnp.asarray(stiffness) / mass
    return gamma, omega_sq


def nm_oscillator_kernels(
    time: ArrayLike,
    learning_rate: ArrayLike,
    momentum: ArrayLike,
    stiffness: ArrayLike,
) -> tuple[jax.Array, jax.Array]:
    """Free and impulse responses of NM's damped oscillator ``m y'' + mu y' + kappa y = f``.

    [paper: NM] Sec. 5 (modified equation of heavy ball, ``m = eta (1 + beta) / 2``,
    ``mu = 1 - beta``). With ``gamma = mu / (2 m)``, ``omega^2 = kappa / m`` and
    ``Omega^2 = gamma^2 - omega^2``:

    * overdamped (``Omega^2 > 0``): ``K(t) = exp(-gamma t) sinh(Omega t) / Omega``,
      ``h(t) = exp(-gamma t) (cosh(Omega t) + gamma sinh(Omega t) / Omega)``;
    * critical (``Omega = 0``): ``K(t) = t exp(-gamma t)``, ``h(t) = exp(-gamma t) (1 + gamma t)``;
    * underdamped: ``sinh, cosh -> sin, cos`` of ``sqrt(omega^2 - gamma^2) t``.

    ``h`` solves the free equation from ``y(0) = 1, y'(0) = 0``; ``K`` from ``y(0) = 0,
    y'(0) = 1`` and is the Green's function: ``y(t) = h(t) y(0) + K(t) y'(0) + integral_0^t
    K(t - tau) f(tau) / m dtau``. The regime is chosen per element with ``jnp.where``.
    Stiffness: ``kappa = 2 lambda`` for the scale / rescale charge, ``kappa = lambda`` for
    translation.

    Args:
        time: ``t = eta * step`` (any shape, >= 0).
        learning_rate: ``eta`` (> 0).
        momentum: ``beta``.
        stiffness: ``kappa``.

    Returns:
        ``(h(t), K(t))``.

    Example:
        >>> h, k = nm_oscillator_kernels(jnp.array([0.0, 1.0]), 0.1, 0.9, 0.0)
        >>> [round(v, 6) for v in h.tolist()], [round(v, 4) for v in k.tolist()]
        ([1.0, 1.0], [0.0, 0.6184])

    References:
        Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep Learning
        Dynamics", https://arxiv.org/abs/2012.04728
    """
    check_hyper(learning_rate, momentum, positive_lr=True)
    if (checks.concrete_value(stiffness) or 0.0) < 0:
        raise ValueError(
            f"{stiffness=} must be >= 0 (2 * weight_decay for scale, weight_decay for translation)."
        )
    t = jnp.asarray(time)
    gamma, omega_sq = _nm_rates(learning_rate, momentum, stiffness)
    disc = gamma**2 - omega_sq
    over = disc > 0
    under = disc < 0
    # overdamped, written with decaying exponentials only (no overflow for large t)
    om = jnp.sqrt(jnp.where(over, disc, 1))
    e_slow = jnp.exp((om - gamma) * t)
    k_over = e_slow * (-jnp.expm1(-2 * om * t)) / (2 * om)
    cosh_over = e_slow * (1 + jnp.exp(-2 * om * t)) / 2
    # underdamped
    ou = jnp.sqrt(jnp.where(under, -disc, 1))
    e_fast = jnp.exp(-gamma * t)
    k_under = e_fast * jnp.sin(ou * t) / ou
    cos_under = e_fast * jnp.cos(ou * t)
    # critical
    k_crit = t * e_fast
    kernel = jnp.where(over, k_over, jnp.where(under, k_under, k_crit))
    free = jnp.where(over, cosh_over, jnp.where(under, cos_under, e_fast)) + gamma * kernel
    return free, kernel


def nm_damped_scale_charge(
    initial_charge: ArrayLike,
    velocity_sq: ArrayLike,
    learning_rate: ArrayLike,
    momentum: ArrayLike,
    weight_decay: ArrayLike = 0.0,
    *,
    initial_rate: ArrayLike = 0.0,
) -> jax.Array:
    """NM integral form of the scale (or rescale) charge under heavy ball + coupled wd.

    [paper: NM] Sec. 5. The modified equation ``m q'' + mu q' = -g - lambda q`` with
    ``m = eta (1 + beta) / 2``, ``mu = 1 - beta``, ``t = eta * step`` and ``<g, q> = 0`` gives
    for ``x = |q|^2``::

        m x'' + mu x' + 2 lambda x = 2 m |q'|^2

    which is NLD's charge equation ``m dQ/dt + mu Q = m (d_s T - d_s V)`` for the charge
    ``Q = m <q', q> = m x' / 2``, with the kinetic source ``d_s T = m |q'|^2`` (KSB) and the
    weight-decay potential ``d_s V = lambda |q|^2``. Its solution::

        x(t) = h(t) x(0) + K(t) x'(0) + 2 integral_0^t K(t - tau) |q'(tau)|^2 dtau

    with the damped-oscillator kernels of :func:`nm_oscillator_kernels` (``kappa = 2 lambda``;
    overdamped or underdamped as the hyperparameters dictate) and ``|q'|^2 = |v|^2`` the
    squared momentum buffer (it includes the weight decay term). Rescale: in-minus-out
    differences. The free part is propagated exactly step by step; the source of step ``k``
    (``|v_{k+1}|^2``, the buffer that moved ``w_k`` to ``w_{k+1}``) acts at mid-step.

    An O(eta) approximation of the exact recursion :func:`heavy_ball_step` (use that one in
    diagnostics); its error is largest during the momentum transient after a start from rest
    (the first few damping times ``1 / gamma = 2 m / mu``).

    Args:
        initial_charge: ``x(0)`` per group.
        velocity_sq: ``|v_{k+1}|^2`` for steps ``k = 0 .. n-1``, shape ``(n, ...)``.
        learning_rate: ``eta`` (> 0).
        momentum: ``beta``.
        weight_decay: ``lambda`` (coupled).
        initial_rate: ``x'(0)`` (0 when starting from rest, ``v_0 = 0``).

    Returns:
        ``x`` after steps ``1 .. n``, shape ``(n, ...)``.

    Example:
        >>> x = nm_damped_scale_charge(1.0, jnp.ones(3), 0.1, 0.0, 0.0)
        >>> [round(v, 4) for v in x.tolist()]  # exact SGD: 1.01, 1.02, 1.03 (starts from rest)
        [1.0063, 1.0158, 1.0258]

    References:
        Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep Learning
        Dynamics", https://arxiv.org/abs/2012.04728
    """
    check_hyper(learning_rate, momentum, weight_decay, positive_lr=True)
    s = jnp.asarray(velocity_sq)
    if s.ndim == 0:
        raise ValueError(
            f"velocity_sq must have a time axis 0 (shape (n, ...)), got shape {s.shape}; pass "
            "the sequence of measured |v_{k+1}|^2."
        )
    stiffness = 2 * jnp.asarray(weight_decay)
    gamma, omega_sq = _nm_rates(learning_rate, momentum, stiffness)
    h1, k1 = nm_oscillator_kernels(learning_rate, learning_rate, momentum, stiffness)
    hh, kh = nm_oscillator_kernels(learning_rate / 2, learning_rate, momentum, stiffness)
    dk1 = h1 - 2 * gamma * k1  # K'(eta)
    dkh = hh - 2 * gamma * kh  # K'(eta / 2)
    dtype = jnp.result_type(s, h1)
    x0 = jnp.broadcast_to(jnp.asarray(initial_charge, dtype=dtype), s.shape[1:])
    y0 = jnp.broadcast_to(jnp.asarray(initial_rate, dtype=dtype), s.shape[1:])

    def body(carry, sk):
        x, y = carry
        src = 2 * learning_rate * sk  # 2 * |q'|^2 * dtau with dtau = eta
        x_new = (h1 * x + k1 * y + kh * src).astype(dtype)
        y_new = (-omega_sq * k1 * x + dk1 * y + dkh * src).astype(dtype)
        return (x_new, y_new), x_new

    _, out = jax.lax.scan(body, (x0, y0), s)
    return out


def nm_damped_translation_charge(
    initial_charge: ArrayLike,
    step: ArrayLike,
    learning_rate: ArrayLike,
    momentum: ArrayLike,
    weight_decay: ArrayLike = 0.0,
    *,
    initial_rate: ArrayLike = 0.0,
) -> jax.Array:
    """NM closed form of the translation charge under heavy ball + coupled weight decay.

    [paper: NM] Sec. 5. With ``<1, g> = 0`` the charge ``s = <1_A, q>`` obeys the free damped
    oscillator ``m s'' + mu s' + lambda s = 0`` (``m = eta (1 + beta) / 2``, ``mu = 1 - beta``)::

        s(t) = h(t) s(0) + K(t) s'(0),    t = eta * step

    with :func:`nm_oscillator_kernels` at ``kappa = lambda``. An O(eta) approximation of the
    exact :func:`translation_heavy_ball_step`.

    Args:
        initial_charge: ``s(0)``.
        step: step count(s) (any shape, broadcast against ``initial_charge``).
        learning_rate: ``eta`` (> 0).
        momentum: ``beta``.
        weight_decay: ``lambda`` (coupled).
        initial_rate: ``s'(0)`` (0 when starting from rest).

    Returns:
        ``s`` at ``t = eta * step``.

    Example:
        >>> s = nm_damped_translation_charge(1.0, jnp.array([0, 100]), 0.1, 0.9, 0.1)
        >>> [round(v, 4) for v in s.tolist()]  # exact recursion: 0.9487**100 = 0.0052 envelope
        [1.0, -0.0024]

    References:
        Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep Learning
        Dynamics", https://arxiv.org/abs/2012.04728
    """
    check_hyper(learning_rate, momentum, weight_decay, positive_lr=True)
    t = learning_rate * jnp.asarray(step)
    free, kernel = nm_oscillator_kernels(t, learning_rate, momentum, weight_decay)
    return free * jnp.asarray(initial_charge) + kernel * jnp.asarray(initial_rate)
