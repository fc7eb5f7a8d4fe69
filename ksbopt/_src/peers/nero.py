"""Nero, the neuronal rotator: per-unit relative updates on the space of balanced units.

Liu et al. (ICML 2021) constrain each unit's incoming weights to zero mean and unit norm
("balanced" units) and move them with a step whose size relative to the unit's norm is set
by the learning rate, normalised by a running average of that unit's squared gradient norm.
The result turns each unit by roughly ``learning_rate`` radians per step.

Flax layout: a unit is ``kernel[..., j]`` (the LAST axis), reduced over every other axis.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ksbopt._src.peers._common import (
    check_range,
    compute_dtype,
    is_kernel,
    map_leaves,
    one_minus_power,
    require_params,
    safe_div,
    unit_norm,
    unit_sum,
)

__all__ = [
    "NeroRetractionState",
    "ScaleByNeroState",
    "balance_units",
    "nero",
    "nero_retraction",
    "scale_by_nero",
]

#: Step scale of a 1-D leaf whose initial entries are all zero (Flax's default bias init).
DEFAULT_BIAS_SCALE = 0.01


def balance_units(w: jax.Array) -> jax.Array:
    """Projects every unit of a kernel to zero mean and unit norm (Nero's constraint set).

    Math [paper: Liu et al. 2021, Alg. 1, last two lines]: for each unit
    ``w_j = w[..., j]`` with ``n`` entries, ``w_j <- w_j - mean(w_j)`` then
    ``w_j <- w_j / |w_j|``. A unit that is zero after centring stays zero (no NaN).

    Args:
      w: a kernel with at least two dimensions, units on the last axis.

    Returns:
      The balanced kernel, in ``w``'s compute dtype (at least float32).

    Example:
      >>> import jax.numpy as jnp
      >>> from ksbopt._src.peers.nero import balance_units
      >>> b = balance_units(jnp.array([[1.0, 2.0], [3.0, 2.0]]))
      >>> [round(float(x), 4) for x in b[:, 0]], [float(x) for x in b[:, 1]]
      ([-0.7071, 0.7071], [0.0, 0.0])

    References:
      Y. Liu, J. Bernstein, M. Meister, Y. Yue, "Learning by Turning: Neural Architecture
      Aware Optimisation", ICML 2021, https://arxiv.org/abs/2102.07227
    """
    w = w.astype(compute_dtype(w))
    centred = w - jnp.mean(w, axis=tuple(range(w.ndim - 1)))
    return safe_div(centred, unit_norm(centred))


class ScaleByNeroState(NamedTuple):
    """State of :func:`scale_by_nero`.

    Attributes:
      count: number of updates done so far (int32 scalar).
      nu: running average of squared gradient norms: shape ``(units,)`` for a kernel (one
        number per unit), the leaf's own shape for a 1-D leaf (one per entry).
      bias_scale: per-leaf scalar ``sigma_b`` that sets the step of 1-D leaves (1 for
        kernels, where it is not used).

    The running average is ``nu_t = beta nu_{t-1} + (1 - beta) |g_j|^2`` per unit j.

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> state = ksbopt.scale_by_nero().init({"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)})
      >>> state.nu["kernel"].shape, state.nu["bias"].shape
      ((2,), (2,))

    References:
      Liu, Bernstein, Meister, Yue, "Learning by Turning: Neural Architecture Aware
      Optimisation", ICML 2021, https://arxiv.org/abs/2102.07227
    """

    count: jax.Array
    nu: optax.Updates
    bias_scale: optax.Updates


def scale_by_nero(
    beta: Any = 0.999,
    *,
    constraints: bool = True,
    debias: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Nero's per-unit normalised direction, without the learning rate and retraction.

    Math [paper: Liu et al. 2021, Alg. 1]. Kernels (``ndim >= 2``), per unit ``j``::

        nu_j <- beta nu_j + (1 - beta) |g_j|^2,   g_bar_j = sqrt(nu_j / (1 - beta^t))
        out_j = s_j * g_j / g_bar_j

    with ``s_j = 1`` under ``constraints=True`` (the norm of a balanced unit; a unit that
    is still zero can then leave zero) and ``s_j = |w_j|`` without constraints (the
    paper's relative step; a zero unit then stays zero). 1-D leaves (biases): Nero treats
    every entry as its own unit with a scalar gradient, so the average is per entry and
    the step scale is the leaf's initialisation scale ``sigma_b``, the mean absolute
    initial entry, or 0.01 when the leaf starts at zero (the rule of the authors'
    reference implementation); biases are never constrained. A unit whose average is still
    zero gets a zero step (no NaN).

    ``debias=True`` divides the running average by ``1 - beta^t`` as Adam and the
    authors' reference implementation do; the paper's Algorithm 1 leaves it undebiased,
    which makes the first steps about ``1 / sqrt(1 - beta)`` (32 at ``beta = 0.999``)
    times larger; ``debias=False`` gives that literal rule.

    Args:
      beta: averaging constant in ``[0, 1)``.
      constraints: whether kernels live on the balanced set (changes ``s_j``; the
        retraction itself is :func:`nero_retraction`).
      debias: divide the running average by ``1 - beta^t``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`ScaleByNeroState`;
      ``update`` needs ``params`` when ``constraints=False``.

    Example:
      >>> import jax.numpy as jnp
      >>> from ksbopt import scale_by_nero
      >>> params = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
      >>> tx = scale_by_nero(0.999)
      >>> state = tx.init(params)
      >>> out, state = tx.update({"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}, state, params)
      >>> k, s = out["kernel"][:, 0], state.bias_scale["bias"]
      >>> round(float(jnp.linalg.norm(k)), 5), round(float(s), 6)
      (1.0, 0.01)

    References:
      Y. Liu, J. Bernstein, M. Meister, Y. Yue, "Learning by Turning: Neural Architecture
      Aware Optimisation", ICML 2021, https://arxiv.org/abs/2102.07227
    """
    owner = "scale_by_nero"
    check_range(
        owner, "beta", beta, low=0.0, high=1.0, high_open=True, hint="The paper uses 0.999."
    )

    def init_fn(params):
        def nu0(w):
            cd = compute_dtype(w)
            return jnp.zeros(w.shape[-1:] if is_kernel(w) else jnp.shape(w), cd)

        def scale0(w):
            cd = compute_dtype(w)
            if is_kernel(w) or jnp.size(w) == 0:
                return jnp.ones([], cd)
            s = jnp.mean(jnp.abs(jnp.asarray(w, cd)))
            return jnp.where(s > 0, s, jnp.asarray(DEFAULT_BIAS_SCALE, cd))

        return ScaleByNeroState(
            count=jnp.zeros([], jnp.int32),
            nu=jax.tree.map(nu0, params),
            bias_scale=jax.tree.map(scale0, params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if not constraints:
            require_params(owner, params)
        count = optax.safe_increment(state.count)
        leaves_like = params if params is not None else updates

        def leaf(g, nu, s, w):
            cd = compute_dtype(g)
            gc = g.astype(cd)
            bc = one_minus_power(beta, count, cd) if debias else 1
            if is_kernel(g):
                nu_new = beta * nu + (1 - beta) * unit_sum(gc * gc)
                scale = 1 if constraints else unit_norm(w.astype(cd))
            else:
                nu_new = beta * nu + (1 - beta) * gc * gc
                scale = s
            out = scale * safe_div(gc, jnp.sqrt(nu_new / bc))
            return out.astype(g.dtype), nu_new.astype(nu.dtype)

        out, nu = map_leaves(leaf, updates, state.nu, state.bias_scale, leaves_like, n_out=2)
        return out, ScaleByNeroState(count=count, nu=nu, bias_scale=state.bias_scale)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class NeroRetractionState(NamedTuple):
    """The (empty) state of :func:`nero_retraction`: the retraction needs only ``params``.

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> ksbopt.nero_retraction().init({"kernel": jnp.ones((3, 2))})
      NeroRetractionState()

    References:
      Liu, Bernstein, Meister, Yue, "Learning by Turning: Neural Architecture Aware
      Optimisation", ICML 2021, https://arxiv.org/abs/2102.07227
    """


def nero_retraction() -> optax.GradientTransformationExtraArgs:
    """Turns a step into one that lands on the balanced set (zero mean, unit norm per unit).

    Math [paper: Liu et al. 2021, Alg. 1]: for a kernel ``w`` and an incoming update
    ``u``, the outgoing update is ``C(C(w) + u) - w`` with the per-unit balancing
    ``C(w)_j = (w_j - mean(w_j)) / |w_j - mean(w_j)|`` (unit j is ``w[..., j]``), so
    ``w + update`` is balanced. Balancing ``w`` first (``C`` is idempotent) puts
    parameters that were not initialised on the constraint set there on the first step,
    as Nero's reference implementation does when the optimizer is created. 1-D leaves pass
    through unchanged (Nero does not constrain biases).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with empty state
      :class:`NeroRetractionState`; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from ksbopt import nero_retraction
      >>> params = {"kernel": jnp.array([[1.0, 0.0], [0.0, 3.0], [2.0, 1.0]])}
      >>> tx = nero_retraction()
      >>> u, _ = tx.update({"kernel": jnp.zeros((3, 2))}, tx.init(params), params)
      >>> new = optax.apply_updates(params, u)["kernel"]
      >>> [round(float(x), 6) for x in jnp.linalg.norm(new, axis=0)]
      [1.0, 1.0]

    References:
      Y. Liu, J. Bernstein, M. Meister, Y. Yue, "Learning by Turning: Neural Architecture
      Aware Optimisation", ICML 2021, https://arxiv.org/abs/2102.07227
    """
    owner = "nero_retraction"

    def init_fn(params):
        del params
        return NeroRetractionState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        require_params(owner, params)

        def leaf(u, w):
            if not is_kernel(w):
                return (u,)
            cd = compute_dtype(w)
            new = balance_units(balance_units(w) + u.astype(cd))
            return ((new - w.astype(cd)).astype(u.dtype),)

        (out,) = map_leaves(leaf, updates, params, n_out=1)
        return out, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def nero(
    learning_rate: optax.ScalarOrSchedule,
    beta: Any = 0.999,
    *,
    constraints: bool = True,
    debias: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Nero: per-unit relative steps on balanced units (zero mean, unit norm).

    Math [paper: Liu et al. 2021, Alg. 1]. For a kernel unit ``w_j = w[..., j]`` (Flax:
    the LAST axis) with gradient ``g_j``::

        nu_j <- beta nu_j + (1 - beta) |g_j|^2          (debiased by 1 - beta^t)
        w_j  <- w_j - lr * |w_j| * g_j / sqrt(nu_j)    (|w_j| = 1 on the balanced set)
        w_j  <- w_j - mean(w_j);  w_j <- w_j / |w_j|   (only with constraints=True)

    A 1-D leaf (bias) is updated entry by entry, ``b_i <- b_i - lr * sigma_b * g_i /
    sqrt(nu_i)``, with ``sigma_b`` its initialisation scale (see :func:`scale_by_nero`).
    With constraints the first update also balances the initial kernel (the reference
    implementation does that at construction). Zero-norm units give no NaN: a zero unit
    with a non-zero gradient leaves zero under ``constraints=True`` and stays zero (its
    relative step is zero) under ``constraints=False``.

    Args:
      learning_rate: step size ``>= 0`` (about the angle in radians each unit turns per
        step; paper default 0.01) or an optax schedule.
      beta: averaging constant in ``[0, 1)`` (paper default 0.999).
      constraints: keep kernels balanced (zero mean, unit norm per unit).
      debias: debias the running average as Adam does (see :func:`scale_by_nero`).

    Returns:
      ``optax.chain(scale_by_nero(...), optax.scale_by_learning_rate(learning_rate)[,
      nero_retraction()])``; ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ksbopt import nero
      >>> params = {"kernel": jax.random.normal(jax.random.key(0), (4, 3)), "bias": jnp.zeros(3)}
      >>> tx = nero(0.01)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> k = optax.apply_updates(params, updates)["kernel"]
      >>> norms = jnp.linalg.norm(k, axis=0)
      >>> bool(jnp.allclose(k.mean(0), 0, atol=1e-6)), bool(jnp.allclose(norms, 1))
      (True, True)

    References:
      Y. Liu, J. Bernstein, M. Meister, Y. Yue, "Learning by Turning: Neural Architecture
      Aware Optimisation", ICML 2021, https://arxiv.org/abs/2102.07227
    """
    check_range(
        "nero",
        "learning_rate",
        learning_rate,
        low=0.0,
        hint="Pass the positive step size (paper default 0.01).",
    )
    parts = [
        scale_by_nero(beta, constraints=constraints, debias=debias),
        optax.scale_by_learning_rate(learning_rate),
    ]
    if constraints:
        parts.append(nero_retraction())
    return optax.chain(*parts)
