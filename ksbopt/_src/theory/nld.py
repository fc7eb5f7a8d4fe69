"""NLD Eq. 16-18: the radius of a scale group under weight decay and noise, and the implicit
adaptive-optimizer analogy (:doc:`/concepts/implicit_rmsprop`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ksbopt._src import checks
from ksbopt._src.numerics import safe_div
from ksbopt._src.theory.arguments import check_coefficient, check_hyper, one_minus_exp_over


def nld_coefficient(
    learning_rate: ArrayLike, momentum: ArrayLike = 0.0, *, coefficient: str
) -> jax.Array:
    """Source coefficient ``c_beta`` of NLD Eq. 17, in one of two versions.

    * ``"printed"`` [paper: NLD] Eq. 17 as printed: ``c_beta = 2 eta (1 + beta) / (1 - beta)^3``.
      Right for coherent gradients (e.g. full batch, a slowly turning ``g_hat``).
    * ``"noise"`` [derived] :ref:`implicit-rmsprop`: ``c_beta = 2 eta / (1 - beta)^2``. Right for
      noise-dominated minibatch SGD (gradient directions uncorrelated from step to step); it is
      consistent with P7a. The printed factor is ``(1 + beta) / (1 - beta)`` times larger
      (19x in ``r^4``, about 4.4x in ``|q|^2`` at ``beta = 0.9``).

    Both agree at ``beta = 0`` (``2 eta``). There is no default: say which one you use.

    Args:
        learning_rate: ``eta``.
        momentum: ``beta``.
        coefficient: ``"printed"`` or ``"noise"`` (keyword, required).

    Returns:
        ``c_beta``.

    Example:
        >>> round(float(nld_coefficient(0.1, 0.9, coefficient="printed")), 3)
        380.0
        >>> round(float(nld_coefficient(0.1, 0.9, coefficient="noise")), 3)
        20.0

    References:
        Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
        Networks", https://arxiv.org/abs/2105.02716
    """
    check_coefficient(coefficient)
    check_hyper(learning_rate, momentum)
    beta = jnp.asarray(momentum)
    if coefficient == "printed":
        return 2 * learning_rate * (1 + beta) / (1 - beta) ** 3
    return 2 * learning_rate / (1 - beta) ** 2


def nld_steady_state_radius4(
    g_hat_sq: ArrayLike,
    learning_rate: ArrayLike,
    weight_decay: ArrayLike,
    momentum: ArrayLike = 0.0,
    *,
    coefficient: str,
) -> jax.Array:
    """Steady state of NLD Eq. 16-17 for a constant ``|g_hat|^2``.

    In general ``r^4 = c_beta (1 - beta) |g_hat|^2 / (4 lambda)`` (see :func:`nld_coefficient`):

    * ``coefficient="printed"`` [paper: NLD] Eq. 16 steady state:
      ``r^4 = eta (1 + beta) |g_hat|^2 / (2 lambda (1 - beta)^2)``.
    * ``coefficient="noise"`` [derived] :ref:`implicit-rmsprop`:
      ``r^4 = eta |g_hat|^2 / (2 lambda (1 - beta))``.

    ``r = |q|`` is the norm of a scale group and ``g_hat`` the gradient at its unit direction.
    With ``lambda = 0`` there is no steady state: returns inf.

    Args:
        g_hat_sq: ``|g_hat|^2`` per group.
        learning_rate: ``eta``.
        weight_decay: ``lambda`` (NLD's ``k``).
        momentum: ``beta``.
        coefficient: ``"printed"`` or ``"noise"`` (see :func:`nld_coefficient`).

    Returns:
        ``r^4`` (= ``|q|^4``) per group.

    Example:
        >>> round(float(nld_steady_state_radius4(1.0, 0.1, 0.01, 0.0, coefficient="noise")), 6)
        5.0

    References:
        Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
        Networks", https://arxiv.org/abs/2105.02716
    """
    check_hyper(learning_rate, momentum, weight_decay)
    c = nld_coefficient(learning_rate, momentum, coefficient=coefficient)
    num = c * (1 - jnp.asarray(momentum)) * jnp.asarray(g_hat_sq)
    return safe_div(num, 4 * jnp.asarray(weight_decay), fill=jnp.inf)


def nld_radius4(
    initial_radius4: ArrayLike,
    g_hat_sq: ArrayLike,
    learning_rate: ArrayLike,
    weight_decay: ArrayLike,
    momentum: ArrayLike = 0.0,
    *,
    coefficient: str,
) -> jax.Array:
    """NLD Eq. 17: ``r^4(t)`` of a normalised group from a sequence of measured ``|g_hat|^2``.

    [paper: NLD] Eq. 17 (coefficient ``c_beta`` per :func:`nld_coefficient`)::

        r^4(t) = exp(-4 k t / (1 - beta)) r^4(0)
                 + c_beta * integral_0^t exp(-4 k (t - tau) / (1 - beta)) |g_hat(tau)|^2 dtau

    with ``k = lambda`` (coupled weight decay) and ``t = eta * step``. The integral is
    discretised with ``|g_hat|^2`` constant over each step and integrated exactly, i.e. per step::

        r^4_{k+1} = a r^4_k + c_beta eta (1 - a) / z |g_hat_k|^2,   z = 4 eta lambda / (1 - beta),
        a = exp(-z).

    A continuous approximation: its error against the exact dynamics is O(eta) (compare
    :func:`nld_exact_radius4_step`, exact at ``beta = 0``).

    Args:
        initial_radius4: ``r^4(0) = |q_0|^4`` per group.
        g_hat_sq: ``|g_hat_k|^2`` for steps ``k = 0 .. n-1``, time on axis 0: shape ``(n, ...)``.
        learning_rate: ``eta``.
        weight_decay: ``lambda``.
        momentum: ``beta``.
        coefficient: ``"printed"`` or ``"noise"`` (keyword, required).

    Returns:
        ``r^4`` after steps ``1 .. n``, shape ``(n, ...)`` (entry ``k`` used ``g_hat_sq[:k+1]``).

    Example:
        >>> r4 = nld_radius4(1.0, jnp.ones(3), 0.1, 0.0, coefficient="printed")
        >>> [round(v, 6) for v in r4.tolist()]
        [1.02, 1.04, 1.06]

    References:
        Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
        Networks", https://arxiv.org/abs/2105.02716
    """
    check_hyper(learning_rate, momentum, weight_decay)
    c = nld_coefficient(learning_rate, momentum, coefficient=coefficient)
    g = jnp.asarray(g_hat_sq)
    if g.ndim == 0:
        raise ValueError(
            f"g_hat_sq must have a time axis 0 (shape (n, ...)), got shape {g.shape}; pass the "
            "sequence of measured |g_hat|^2, e.g. jnp.stack(per_step_values)."
        )
    z = 4 * learning_rate * weight_decay / (1 - jnp.asarray(momentum))
    decay = jnp.exp(-z)
    weight = c * learning_rate * one_minus_exp_over(z)
    init = jnp.broadcast_to(jnp.asarray(initial_radius4, dtype=g.dtype), g.shape[1:])
    init = init.astype(jnp.result_type(init, decay, weight))

    def body(r4, gk):
        r4 = (decay * r4 + weight * gk).astype(r4.dtype)
        return r4, r4

    _, out = jax.lax.scan(body, init, g)
    return out


def nld_exact_radius4_step(
    radius4: ArrayLike, g_hat_sq: ArrayLike, learning_rate: ArrayLike, weight_decay: ArrayLike
) -> jax.Array:
    """Exact per-step form behind NLD Eq. 17 at ``beta = 0`` (SGD + weight decay).

    [derived] :ref:`implicit-rmsprop` (square of P1 with ``|g|^2 = |g_hat|^2 / x``)::

        x_{k+1}^2 = (1 - eta lambda)^4 x_k^2 + 2 (1 - eta lambda)^2 eta^2 |g_hat_k|^2
                    + eta^4 |g_hat_k|^4 / x_k^2,          x = |w|^2 = r^2

    Its first two terms are the one-step discretisation of Eq. 17; the last is the finite-step
    correction, small when the angular step ``eta |g_hat| / x`` is small. ``x_k = 0`` is treated
    as giving no correction (no NaN).

    Args:
        radius4: ``x_k^2 = r_k^4``.
        g_hat_sq: ``|g_hat_k|^2``.
        learning_rate: ``eta``.
        weight_decay: ``lambda``.

    Returns:
        ``x_{k+1}^2``.

    Example:
        >>> round(float(nld_exact_radius4_step(1.0, 1.0, 0.1, 0.0)), 6)
        1.0201

    References:
        Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
        Networks", https://arxiv.org/abs/2105.02716
    """
    check_hyper(learning_rate, weight_decay=weight_decay)
    y = jnp.asarray(radius4)
    g = jnp.asarray(g_hat_sq)
    d2 = (1 - learning_rate * weight_decay) ** 2
    return d2**2 * y + 2 * d2 * learning_rate**2 * g + learning_rate**4 * safe_div(jnp.square(g), y)


def rmsprop_analogy(
    learning_rate: ArrayLike, weight_decay: ArrayLike, momentum: ArrayLike = 0.0
) -> tuple[jax.Array, jax.Array]:
    """The RMSProp that SGD + weight decay on a normalised group implicitly runs.

    [paper: NLD] Eq. 18 analogy, with the [derived] rate of :ref:`implicit-rmsprop`.
    ``r^2 = |q|^2`` plays ``sqrt(G)``, ``|g_hat|^2`` plays ``|g|^2``, weight decay plays the
    discount::

        rho_eff = 1 - 4 eta lambda / (1 - beta)         (per step)
        eta_RMS = sqrt(2 eta lambda / (1 + beta))       (matched base rate)

    with ONE scalar accumulator per normalisation group. ``eta_RMS`` matches the RMS angular
    update of that RMSProp to the P7a equilibrium (:func:`equilibrium_angular_update`). Note
    ``rho_eff`` is negative when ``4 eta lambda > 1 - beta`` (no analogy then).

    Args:
        learning_rate: ``eta``.
        weight_decay: ``lambda`` (NLD's ``k``).
        momentum: ``beta``.

    Returns:
        ``(rho_eff, eta_RMS)``.

    Example:
        >>> rho, lr = rmsprop_analogy(0.1, 5e-4, 0.9)
        >>> round(float(rho), 6), round(float(lr), 6)
        (0.998, 0.007255)

    References:
        Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
        Networks", https://arxiv.org/abs/2105.02716
    """
    check_hyper(learning_rate, momentum, weight_decay)
    beta = jnp.asarray(momentum)
    rho = 1 - 4 * learning_rate * weight_decay / (1 - beta)
    eta_rms = jnp.sqrt(2 * learning_rate * weight_decay / (1 + beta))
    return rho, eta_rms


def rmsprop_sqrt_accumulator(
    grad_sq: ArrayLike, decay: ArrayLike, initial: ArrayLike = 0.0
) -> jax.Array:
    """NLD Eq. 18: ``sqrt(G(t))``, RMSProp's accumulator in continuous time.

    [paper: NLD] Eq. 18, with ``t = eta * step``::

        sqrt(G(t)) = sqrt( (1 - rho)/eta * integral_0^t exp(-(1 - rho)(t - tau)/eta) |g(tau)|^2 dtau
                           + exp(-(1 - rho) t / eta) G(0) )

    The learning rate cancels once ``t = eta * step``. Discretised with ``|g|^2`` constant over
    each step and integrated exactly: ``G_{k+1} = a G_k + (1 - a) |g_k|^2`` with
    ``a = exp(-(1 - rho))`` (RMSProp's own EMA has ``a = rho``; they agree to O((1 - rho)^2)
    per step). With ``rho = rho_eff`` of :func:`rmsprop_analogy` and ``G(0) = r^4(0) (1 - rho)
    / (c_beta eta)``, ``r^2(t) = sqrt(c_beta eta / (1 - rho)) sqrt(G(t))`` (NLD Eq. 17).

    Args:
        grad_sq: ``|g_k|^2`` for steps ``0 .. n-1``, shape ``(n, ...)``.
        decay: ``rho`` (RMSProp's discount), ``rho <= 1``.
        initial: ``G(0)``.

    Returns:
        ``sqrt(G)`` after steps ``1 .. n``, shape ``(n, ...)``.

    Example:
        >>> [round(v, 4) for v in rmsprop_sqrt_accumulator(jnp.full(2, 4.0), 0.0).tolist()]
        [1.5901, 1.8597]

    References:
        Tanaka & Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
        Networks", https://arxiv.org/abs/2105.02716
    """
    if (checks.concrete_value(decay) or 0.0) > 1:
        raise ValueError(f"{decay=} must be <= 1 (RMSProp's discount rho), e.g. decay=0.99.")
    g = jnp.asarray(grad_sq)
    if g.ndim == 0:
        raise ValueError(
            f"grad_sq must have a time axis 0 (shape (n, ...)), got shape {g.shape}; pass the "
            "sequence of |g|^2, e.g. jnp.stack(per_step_values)."
        )
    a = jnp.exp(-(1 - jnp.asarray(decay)))
    init = jnp.broadcast_to(jnp.asarray(initial, dtype=g.dtype), g.shape[1:])
    init = init.astype(jnp.result_type(init, a))

    def body(acc, gk):
        acc = (a * acc + (1 - a) * gk).astype(acc.dtype)
        return acc, acc

    _, out = jax.lax.scan(body, init, g)
    return jnp.sqrt(out)
