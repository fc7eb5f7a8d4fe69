"""Nero, the neuronal rotator: per-unit relative updates on the space of balanced units.

Liu et al. (ICML 2021) constrain each unit's incoming weights to zero mean and unit norm
("balanced" units) and move them with a step whose size relative to the unit's norm is set
by the learning rate, normalised by a running average of that unit's squared gradient norm.
The result turns each unit by roughly ``learning_rate`` radians per step.

Flax layout: a unit is ``kernel[..., j]`` (the LAST axis), reduced over every other axis.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ksbopt._src import checks, reductions
from ksbopt._src import groups as groups_lib
from ksbopt._src.numerics import all_finite_values, compute_dtype, safe_div
from ksbopt._src.peers._common import (
    check_bool,
    check_range,
    is_kernel,
    map_leaves,
    one_minus_power,
    unit_norm,
    unit_sum,
)

__all__ = [
    "NeroRetractionState",
    "ScaleByNeroState",
    "balance_params",
    "balance_units",
    "nero",
    "nero_retraction",
    "scale_by_nero",
]

#: Step scale of a leaf whose initial scale is zero (Flax's default bias init), as in the
#: authors' code.
DEFAULT_SCALE = 0.01

_STEP_SCALES = ("initial_mean", "unit_norm")


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


def balance_params(params: Any) -> Any:
    """Puts every kernel of a parameter tree on Nero's constraint set, before training.

    Math [paper: Liu et al. 2021, Alg. 1]: each unit ``w_j = w[..., j]`` of every leaf with
    two or more dimensions becomes ``(w_j - mean(w_j)) / |w_j - mean(w_j)|`` (see
    :func:`balance_units`); other leaves (biases) are returned unchanged. Every leaf keeps
    its dtype.

    The authors' optimizer does this to the model's weights when it is created
    (https://github.com/jxbz/nero/blob/master/nero.py, ``Nero.__init__``), so its first
    gradient is taken at balanced weights. An optax transformation cannot change the
    parameters it is initialised with, so call this once on the initial parameters to
    reproduce the authors' runs with :func:`nero`; without it the first update balances the
    kernels instead (after a gradient taken at the unbalanced point). A unit that is
    constant (zero after centring) stays zero, where the authors' code divides by zero.

    Args:
      params: a tree of arrays (e.g. Flax ``variables["params"]``), kernels with their
        output units on the LAST axis.

    Returns:
      A tree like ``params`` with every kernel balanced.

    Example:
      >>> import jax, jax.numpy as jnp, ksbopt
      >>> params = {"kernel": jax.random.normal(jax.random.key(0), (4, 3)) + 1.0,
      ...           "bias": jnp.ones(3)}
      >>> balanced = ksbopt.peers.balance_params(params)
      >>> k = balanced["kernel"]
      >>> norms = jnp.linalg.norm(k, axis=0)
      >>> bool(jnp.allclose(k.mean(0), 0, atol=1e-6)), bool(jnp.allclose(norms, 1))
      (True, True)
      >>> bool(jnp.all(balanced["bias"] == params["bias"]))
      True

    References:
      Y. Liu, J. Bernstein, M. Meister, Y. Yue, "Learning by Turning: Neural Architecture
      Aware Optimisation", ICML 2021, https://arxiv.org/abs/2102.07227
    """

    def leaf(w):
        return balance_units(w).astype(w.dtype) if is_kernel(w) and w.size else w

    return jax.tree.map(leaf, params)


class ScaleByNeroState(NamedTuple):
    """State of :func:`scale_by_nero`.

    Attributes:
      count: number of updates done so far (int32 scalar).
      nu: running average of squared gradient norms: shape ``(units,)`` for a kernel (one
        number per unit), the leaf's own shape for a 1-D leaf (one per entry).
      scale: per-leaf scalar that multiplies the normalised step, fixed at ``init``: for
        a 1-D leaf ``sigma_b``, the mean absolute initial entry; for a kernel the mean of
        its initial unit norms without constraints, 1 with them (the norm of a balanced
        unit); 0.01 where that mean is 0 (see :func:`scale_by_nero`).

    The running average is ``nu_t = beta nu_{t-1} + (1 - beta) |g_j|^2`` per unit j.

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> params = {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}
      >>> state = ksbopt.peers.scale_by_nero().init(params)
      >>> state.nu["kernel"].shape, state.nu["bias"].shape
      ((2,), (2,))

    References:
      Liu, Bernstein, Meister, Yue, "Learning by Turning: Neural Architecture Aware
      Optimisation", ICML 2021, https://arxiv.org/abs/2102.07227
    """

    count: jax.Array
    nu: optax.Updates
    scale: optax.Updates


def scale_by_nero(
    beta: Any = 0.999,
    *,
    constraints: bool = True,
    debias: bool = True,
    step_scale: str = "initial_mean",
) -> optax.GradientTransformationExtraArgs:
    """Nero's per-unit normalised direction, without the learning rate and retraction.

    Math [paper: Liu et al. 2021, Alg. 1]. Kernels (``ndim >= 2``), per unit ``j``::

        nu_j <- beta nu_j + (1 - beta) |g_j|^2,   g_bar_j = sqrt(nu_j / (1 - beta^t))
        out_j = s * g_j / g_bar_j

    1-D leaves (biases): Nero treats every entry as its own unit with a scalar gradient, so
    the average is per entry, and biases are never constrained. A unit whose average is
    still zero gets a zero step (no NaN; the authors' code sets its NaN to 0).

    The scale ``s`` (``step_scale``):

    * ``"initial_mean"`` (default, the authors' code: ``state['scale'] =
      neuron_norm(p).mean()`` in ``Nero.__init__`` of
      https://github.com/jxbz/nero/blob/master/nero.py): ONE number per leaf, fixed at
      ``init``: the mean of the initial unit norms of a kernel, which is 1 with
      ``constraints`` (the norm of a balanced unit: the authors balance the weights before
      taking it), and for a 1-D leaf the mean absolute initial entry ``sigma_b``; 0.01 when
      that mean is 0 (Flax's zero-initialised biases).
    * ``"unit_norm"``: each kernel unit's CURRENT norm ``|w_j|``, the per-neuron relative
      step of the paper's Sec. 3 (the same under ``constraints``, where ``|w_j| = 1``; taken
      as 1 there, so that a still-zero unit can leave zero); 1-D leaves keep ``sigma_b``.

    ``debias=True`` divides the running average by ``1 - beta^t`` as Adam and the authors'
    code do; the paper's Algorithm 1 leaves it undebiased, which makes the first steps about
    ``1 / sqrt(1 - beta)`` (32 at ``beta = 0.999``) times larger; ``debias=False`` gives
    that literal rule.

    Args:
      beta: averaging constant in ``[0, 1)``.
      constraints: whether kernels live on the balanced set (sets ``s = 1`` for kernels;
        the retraction itself is :func:`nero_retraction`).
      debias: divide the running average by ``1 - beta^t``.
      step_scale: ``"initial_mean"`` (the authors' code) or ``"unit_norm"`` (the paper's
        per-unit relative step); only kernels without constraints differ.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`ScaleByNeroState`;
      ``update`` needs ``params`` with ``constraints=False, step_scale="unit_norm"``.

    Example:
      >>> import jax.numpy as jnp
      >>> from ksbopt.peers import scale_by_nero
      >>> params = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
      >>> tx = scale_by_nero(0.999)
      >>> state = tx.init(params)
      >>> out, state = tx.update({"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}, state, params)
      >>> k, s = out["kernel"][:, 0], state.scale["bias"]
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
    check_bool(owner, "constraints", constraints)
    check_bool(owner, "debias", debias)
    if step_scale not in _STEP_SCALES:
        raise ValueError(
            f"{owner}: {step_scale=} is not one of {_STEP_SCALES}; use 'initial_mean' (the "
            "authors' code) or 'unit_norm' (the paper's per-unit relative step)."
        )
    current_norm = step_scale == "unit_norm" and not constraints

    def init_fn(params):
        def nu0(w):
            cd = compute_dtype(w)
            return jnp.zeros(w.shape[-1:] if is_kernel(w) else jnp.shape(w), cd)

        def scale0(w):
            cd = compute_dtype(w)
            w = jnp.asarray(w, cd)
            if jnp.size(w) == 0 or (is_kernel(w) and constraints):
                return jnp.ones([], cd)
            s = jnp.mean(unit_norm(w)) if is_kernel(w) else jnp.mean(jnp.abs(w))
            return jnp.where(s > 0, s, jnp.asarray(DEFAULT_SCALE, cd))

        return ScaleByNeroState(
            count=jnp.zeros([], jnp.int32),
            nu=jax.tree.map(nu0, params),
            scale=jax.tree.map(scale0, params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if current_norm:
            checks.require_params(params, owner)
        count = optax.safe_increment(state.count)
        leaves_like = params if params is not None else updates

        def leaf(g, nu, s, w):
            cd = compute_dtype(g)
            gc = g.astype(cd)
            bc = one_minus_power(beta, count, cd) if debias else 1
            if is_kernel(g):
                nu_new = beta * nu + (1 - beta) * unit_sum(gc * gc)
                scale = unit_norm(w.astype(cd)) if current_norm else s
            else:
                nu_new = beta * nu + (1 - beta) * gc * gc
                scale = s
            out = scale * safe_div(gc, jnp.sqrt(nu_new / bc))
            return out.astype(g.dtype), nu_new.astype(nu.dtype)

        out, nu = map_leaves(leaf, updates, state.nu, state.scale, leaves_like, n_out=2)
        return out, ScaleByNeroState(count=count, nu=nu, scale=state.scale)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class NeroRetractionState(NamedTuple):
    """The (empty) state of :func:`nero_retraction`: the retraction needs only ``params``.

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> ksbopt.peers.nero_retraction().init({"kernel": jnp.ones((3, 2))})
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
      >>> from ksbopt.peers import nero_retraction
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
        checks.require_params(params, owner)

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
    step_scale: str = "initial_mean",
) -> optax.GradientTransformationExtraArgs:
    """Nero: per-unit relative steps on balanced units (zero mean, unit norm).

    Math [paper: Liu et al. 2021, Alg. 1]. For a kernel unit ``w_j = w[..., j]`` (Flax:
    the LAST axis) with gradient ``g_j``::

        nu_j <- beta nu_j + (1 - beta) |g_j|^2          (debiased by 1 - beta^t)
        w_j  <- w_j - lr * s * g_j / sqrt(nu_j)
        w_j  <- w_j - mean(w_j);  w_j <- w_j / |w_j|   (only with constraints=True)

    with ``s = 1`` under constraints (the norm of a balanced unit) and, without them, one
    number per kernel: the mean of its initial unit norms, as the authors' code does
    (https://github.com/jxbz/nero/blob/master/nero.py, ``state['scale']``);
    ``step_scale="unit_norm"`` uses each unit's current norm ``|w_j|`` instead, the paper's
    per-neuron relative step. A 1-D leaf (bias) is updated entry by entry,
    ``b_i <- b_i - lr * sigma_b * g_i / sqrt(nu_i)``, with ``sigma_b`` the mean absolute
    initial entry, or 0.01 if that is 0 (see :func:`scale_by_nero`).

    Initial balancing: the authors' optimizer balances the model's kernels when it is
    created, so its first gradient is taken at balanced weights. To reproduce that, call
    :func:`balance_params` on the initial parameters before training
    (``params = ksbopt.peers.balance_params(params)``). Without it the first update with
    constraints balances the kernels itself (:func:`nero_retraction` balances ``w`` before
    adding the step), after a gradient taken at the unbalanced point.

    Zero-norm units give no NaN: a zero unit with a non-zero gradient leaves zero under
    ``constraints=True``; without constraints a zero kernel gets the scale 0.01.

    Args:
      learning_rate: step size ``>= 0`` (about the angle in radians each unit turns per
        step; paper default 0.01) or an optax schedule.
      beta: averaging constant in ``[0, 1)`` (paper default 0.999).
      constraints: keep kernels balanced (zero mean, unit norm per unit).
      debias: debias the running average as Adam does (see :func:`scale_by_nero`).
      step_scale: ``"initial_mean"`` (the authors' code) or ``"unit_norm"`` (the paper's
        per-unit relative step); only kernels without constraints differ.

    Returns:
      ``optax.chain(scale_by_nero(...), optax.scale_by_learning_rate(learning_rate)[,
      nero_retraction()])``; ``update`` needs ``params``. With constraints the three run as
      one step (same state, same numbers to rounding): one pass of per-unit sums of ``g``
      and ``w`` per kernel, then the pass writing the step.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ksbopt.peers import nero
      >>> from ksbopt.peers import balance_params
      >>> params = {"kernel": jax.random.normal(jax.random.key(0), (4, 3)), "bias": jnp.zeros(3)}
      >>> params = balance_params(params)  # as the authors' optimizer does when created
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
    direction = scale_by_nero(beta, constraints=constraints, debias=debias, step_scale=step_scale)
    rate = optax.scale_by_learning_rate(learning_rate)
    if not constraints:
        return optax.chain(direction, rate)
    chained = optax.chain(direction, rate, nero_retraction())
    rule = _Rule(beta=beta, debias=debias, rate=rate)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        return _constrained_update(updates, state, params, rule)

    return optax.GradientTransformationExtraArgs(chained.init, update_fn)


@dataclasses.dataclass(frozen=True)
class _Rule:
    """What one fused step of :func:`nero` with constraints reads."""

    beta: Any
    debias: bool
    rate: optax.GradientTransformation  # the learning rate, as optax scales by it


#: The largest factor by which centring may shrink a sum of squares for the one-pass closed
#: form to be used (see :func:`_closed_form`).
_CANCELLATION = 64.0


def _constrained_update(updates, state, params, rule: _Rule):
    """``optax.chain(scale_by_nero, scale_by_learning_rate, nero_retraction)`` in two passes
    over each kernel: the per-unit sums of ``g`` and ``w`` (:func:`_unit_sums`), then the
    elementwise pass writing the step. The chain's state, updated as the chain would."""
    checks.require_params(params, "nero")
    nero_state, rate_state, retraction_state = state
    count = optax.safe_increment(nero_state.count)
    treedef = jax.tree.structure(updates)
    grads = treedef.flatten_up_to(updates)
    nus, scales = treedef.flatten_up_to(nero_state.nu), treedef.flatten_up_to(nero_state.scale)
    ws = treedef.flatten_up_to(params)
    sums, factors, new_nu = [], [], []
    for g, nu, s, w in zip(grads, nus, scales, ws, strict=True):
        cd = compute_dtype(g)
        bc = one_minus_power(rule.beta, count, cd) if rule.debias else 1
        gc = g.astype(cd)
        if is_kernel(g):  # per unit: the factor f of the step f g
            sums.append(_unit_sums(gc, w.astype(cd)))
            nu_new = rule.beta * nu + (1 - rule.beta) * sums[-1][1]
            factors.append(s * safe_div(1.0, jnp.sqrt(nu_new / bc)))
        else:  # per entry: the step itself
            sums.append(None)
            nu_new = rule.beta * nu + (1 - rule.beta) * gc * gc
            factors.append(s * safe_div(gc, jnp.sqrt(nu_new / bc)))
        new_nu.append(nu_new.astype(nu.dtype))
    # The learning rate (a schedule counts in its own state) scales the small factors.
    factors, rate_state = rule.rate.update(treedef.unflatten(factors), rate_state)
    out = [
        _balanced_step(g, w, f, sums_g) if sums_g is not None else f.astype(g.dtype)
        for g, w, f, sums_g in zip(grads, ws, treedef.flatten_up_to(factors), sums, strict=True)
    ]
    nero_state = ScaleByNeroState(count=count, nu=treedef.unflatten(new_nu), scale=nero_state.scale)
    return treedef.unflatten(out), (nero_state, rate_state, retraction_state)


def _unit_sums(g: jax.Array, w: jax.Array) -> list[jax.Array]:
    """``sum g``, ``|g|^2``, ``sum w``, ``|w|^2``, ``<w, g>`` per unit, in one pass."""
    part = groups_lib.AxisPart(leaf=0, path="", shape=g.shape, group_axes=(g.ndim - 1,))
    return reductions.part_sums(part, [g, g * g, w, w * w, w * g])


def _balanced_step(g, w, f, sums):
    """``C(C(w) + f g) - w`` for a kernel (``C`` :func:`balance_units`, ``f`` per unit) as
    ``A w + B g + D``: the closed form where its sums are trusted, else the elementwise one
    (computed only then)."""
    cd = compute_dtype(w)
    wc, gc = w.astype(cd), g.astype(cd)
    fast, ok = _closed_form(f, sums, count=math.prod(w.shape[:-1]))
    a, b, d = reductions.unless_trusted(ok, fast, lambda: _elementwise_form(wc, gc, f))
    return (a * wc + b * gc + d).astype(g.dtype)


def _closed_form(f, sums, *, count: int):
    """:func:`_balanced_step`'s coefficients from the per-unit sums, and whether to trust
    them.

    [derived] With ``N`` entries per unit, mean ``m_w`` and ``s_w = |w - m_w|``, the
    balanced unit is ``b = (w - m_w) / s_w`` (0 if ``s_w = 0``): ``sum b = 0``,
    ``|b|^2 = 1``, ``<b, g> = (<w, g> - m_w sum g) / s_w``. Then ``x = b + f g`` has mean
    ``f m_g`` and ``s_x^2 = |b|^2 + 2 f <b, g> + f^2 |g - m_g|^2``, and
    ``C(x) = (x - f m_g) / s_x``. Trusted: finite sums, centring and the last sum cancelling
    at most a factor ``_CANCELLATION``, ``s_w^2`` and ``s_x^2`` zero or normal floats.
    """
    sg, gg, sw, ww, wg = sums
    mw, mg = sw / count, sg / count
    sww, sgg = ww - count * mw * mw, gg - count * mg * mg  # centred sums of squares
    inv_sw = safe_div(1.0, jnp.sqrt(sww))
    bb = sww * inv_sw * inv_sw
    bg = (wg - mw * sg) * inv_sw
    sxx = bb + 2 * f * bg + f * f * sgg
    inv_sx = safe_div(1.0, jnp.sqrt(sxx))
    coefficients = (inv_sx * inv_sw - 1, inv_sx * f, -inv_sx * (mw * inv_sw + f * mg))
    tiny = jnp.finfo(sww.dtype).tiny / jnp.finfo(sww.dtype).eps
    # one scalar per per-unit array: the sums stay outputs of the one-pass reduction only
    ok = all_finite_values([jnp.sum(x) for x in (*sums, sxx, *coefficients)])
    ok &= jnp.all(
        (count * mw * mw <= _CANCELLATION * sww) & (count * mg * mg <= _CANCELLATION * sgg)
    )
    ok &= jnp.all(_CANCELLATION * sxx >= bb + f * f * sgg)
    ok &= jnp.all(((sww == 0) | (sww >= tiny)) & ((sxx == 0) | (sxx >= tiny)))
    return coefficients, ok


def _elementwise_form(w, g, f):
    """:func:`_closed_form`'s coefficients from elementwise centring and norms (as
    :func:`balance_units` computes them; several passes)."""
    axes = tuple(range(w.ndim - 1))
    mw = jnp.mean(w, axis=axes)
    inv_sw = safe_div(1.0, unit_norm(w - mw))
    x = (w - mw) * inv_sw + f * g
    mx = jnp.mean(x, axis=axes)
    inv_sx = safe_div(1.0, unit_norm(x - mx))
    return inv_sx * inv_sw - 1, inv_sx * f, -inv_sx * (mw * inv_sw + mx)
