"""Rotational wrapper: fixed unit norms and an angular update held at its equilibrium value.

Kosson et al. (ICML 2024) show that weight decay drives each scale-invariant unit to a
"rotational equilibrium" where its norm is steady and it turns by a fixed expected angle per
step, the same for every unit and layer. Their rotational variants reach that state from the
first step: the norm of every unit is frozen and its per-step rotation is set to the
equilibrium value predicted from the base optimizer's learning rate, weight decay and
momentum.

Flax layout: a unit is ``kernel[..., j]`` (the LAST axis) of every leaf with two or more
dimensions (or the whole leaf, per layer); leaves with fewer dimensions (biases, norm
scales) are scale-sensitive and get the base update with learning rate and weight decay.
The defaults follow the authors' code, https://github.com/epfml/REQ
(``shared/optimizers/common.py``, ``rotational_sgd.py``, ``rotational_adamw.py``).
"""

from __future__ import annotations

import dataclasses
import functools
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
    concrete_float,
    is_kernel,
    map_leaves,
    one_minus_power,
)

__all__ = ["RotationalState", "center_params", "equilibrium_angular_update", "rotational"]

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

    Math [paper: Kosson et al. 2024, Table 1; Sec. 3 for SGDM]:

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
    rate = 2 * learning_rate * weight_decay / (1 + momentum)
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
        hint="Use e.g. 0.9 (the authors' update_norm_decay_factor).",
    )


def _axes(x: jax.Array, per_neuron: bool) -> tuple[int, ...]:
    """The axes a "unit" spans: all but the last (one unit per output), or all (the layer)."""
    return tuple(range(x.ndim - 1)) if per_neuron else tuple(range(x.ndim))


def _sum(x: jax.Array, per_neuron: bool) -> jax.Array:
    """Sum over each unit: shape ``(units,)`` per neuron, ``()`` per layer; broadcasts."""
    return jnp.sum(x, axis=_axes(x, per_neuron))


def _norm(x: jax.Array, per_neuron: bool) -> jax.Array:
    """The norm of each unit, computed as ``m |x / m|`` with ``m = max |x|`` over the unit.

    Finite for every finite ``x``: a plain sum of squares overflows float32 once a unit's
    norm exceeds about 1.8e19, and the frozen norm would then be inf (:doc:`/edge_cases`).
    """
    m = jnp.max(jnp.abs(x), axis=_axes(x, per_neuron))
    return m * jnp.sqrt(_sum(jnp.square(safe_div(x, m)), per_neuron))


def _centre(x: jax.Array, per_neuron: bool) -> jax.Array:
    """``x`` minus the mean of each unit (per neuron) or of the whole leaf (per layer)."""
    return x - jnp.mean(x, axis=_axes(x, per_neuron))


def center_params(params: Any, *, per_neuron: bool = True) -> Any:
    """Centres every kernel of a parameter tree, keeping each unit's norm, before training.

    Math [code: REQ, ``center_rotational_weights`` in
    https://github.com/epfml/REQ/blob/main/shared/optimizers/common.py]: each unit
    ``w_j = w[..., j]`` (Flax: the LAST axis; the whole leaf with ``per_neuron=False``) of
    every leaf with two or more dimensions becomes ``|w_j| c_j / |c_j|`` with
    ``c_j = w_j - mean(w_j)``; other leaves are returned unchanged, every leaf in its dtype.

    The authors' rotational optimizers do this to the model's weights when they are created
    (``zero_mean=True``, for the leaves they treat as rotational: two or more dimensions and
    ``weight_decay != 0``), so their first gradient is taken at centred weights. An optax
    transformation cannot change the parameters it is initialised with, so call this once
    on the initial parameters to reproduce their runs with :func:`rotational` (with a
    non-zero weight decay); without it the first update centres the kernels itself. A unit
    that is constant (zero after centring) stays zero, where the authors' code divides by
    zero.

    Args:
      params: a tree of arrays, kernels with their output units on the LAST axis.
      per_neuron: centre each unit (``True``) or each whole kernel (``False``), as the
        ``per_neuron`` argument of :func:`rotational`.

    Returns:
      A tree like ``params`` with every kernel centred and its unit norms kept.

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> params = {"kernel": jnp.array([[3.0, 1.0], [1.0, 1.0]]), "bias": jnp.ones(2)}
      >>> out = ksbopt.peers.center_params(params)["kernel"]
      >>> [round(float(x), 4) for x in out[:, 0]], [round(float(x), 4) for x in out[:, 1]]
      ([2.2361, -2.2361], [0.0, 0.0])

    References:
      A. Kosson, B. Messmer, M. Jaggi, "Rotational Equilibrium: How Weight Decay Balances
      Learning Across Neural Networks", ICML 2024, https://arxiv.org/abs/2305.17212
    """

    def leaf(w):
        if not is_kernel(w) or not w.size:
            return w
        wc = w.astype(compute_dtype(w))
        c = _centre(wc, per_neuron)
        return (_norm(wc, per_neuron) * safe_div(c, _norm(c, per_neuron))).astype(w.dtype)

    return jax.tree.map(leaf, params)


class RotationalState(NamedTuple):
    """State of :func:`rotational`.

    Attributes:
      count: number of updates done so far (int32 scalar).
      base_state: the wrapped base transform's state.
      rms: running average of the squared norm of the (centred) tangential base step, one
        number per unit of a kernel (one per kernel with ``per_neuron=False``; a zero
        scalar placeholder for other leaves).
      target_norm: the norm of each unit (or kernel) frozen at ``init``, ``n_j = |w_j(0)|``
        (a zero scalar placeholder for other leaves).

    The rotation per step is set to the equilibrium angular update, for ``kind="sgdm"``
    ``eta_r = sqrt(2 eta lambda / (1 + beta))``.

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> tx = ksbopt.peers.rotational(optax.trace(0.9), learning_rate=0.1, weight_decay=5e-4)
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


def _pick(flag: Any, a: Any, b: Any) -> Any:
    """``a`` where ``flag`` else ``b`` (pytrees alike): a Python choice for a Python bool,
    else ``where`` leaf by leaf."""
    if isinstance(flag, bool):
        return a if flag else b
    return jax.tree.map(lambda x, y: jnp.where(flag, x, y), a, b)


@dataclasses.dataclass(frozen=True)
class _Rule:
    """The hyperparameters one step of :func:`rotational` reads (checked by the factory)."""

    weight_decay: Any
    momentum: Any
    rms_decay: Any
    kind: str
    eps: Any
    zero_mean: bool
    per_neuron: bool


#: The largest factor by which centring or the tangent projection may shrink a sum of squares
#: for the one-pass closed form to be used (see :func:`_closed_form`).
_CANCELLATION = 64.0


def _unit_sums(w: jax.Array, u: jax.Array, rule: _Rule) -> list[jax.Array]:
    """``[sum w, sum u,] |w|^2, <u, w>, |u|^2`` per unit (or per kernel), in one pass."""
    ndim = w.ndim
    part = groups_lib.AxisPart(
        leaf=0, path="", shape=w.shape, group_axes=(ndim - 1,) if rule.per_neuron else ()
    )
    products = [w * w, u * w, u * u]
    if rule.zero_mean:
        products = [w, u, *products]
    shape = w.shape[-1:] if rule.per_neuron else ()
    return [jnp.reshape(x, shape) for x in reductions.part_sums(part, products)]


def _closed_form(w, u, nu, n, eta_r, bc, rule: _Rule):
    """The rotational step of one kernel as per-unit coefficients, from one pass of sums.

    [derived] With ``N`` entries per unit, ``w_c = w - mean(w)``, ``u_c = u - mean(u)``
    (``zero_mean``; else ``w``, ``u``), ``c = <u_c, w_c> / |w_c|^2`` and the tangent
    ``u_c - c w_c`` (``|.|^2 = |u_c|^2 - c <u_c, w_c>``), the moved unit is
    ``moved = (1 + h c) w_c - h u_c`` with ``h = eta_r n / (sqrt(nu / bc) + eps)`` and
    ``|moved|^2 = |w_c|^2 + h^2 |tangent|^2`` (the tangent is orthogonal to ``w_c``); the
    new unit is ``k moved``, ``k = n / |moved|``. The update ``A w + B u + C`` has
    ``A = k (1 + h c) - 1``, ``B = -k h``, ``C = -k ((1 + h c) mean(w) - h mean(u))``.

    Returns ``(A, B, C)``, the new running average, and whether the sums are trusted:
    finite, clear of float underflow, and cancelling at most a factor ``_CANCELLATION`` in
    the centring (``N mean^2`` against ``|w_c|^2``, ``|u_c|^2``) or the tangent
    (``|tangent|^2`` against ``|u_c|^2``), so that their rounding error stays within a few
    dozen ulps, as the elementwise form's. Otherwise :func:`_elementwise_form` decides.
    """
    sums = _unit_sums(w, u, rule)
    ww, uw, uu = sums[-3:]
    count = math.prod(w.shape[:-1] if rule.per_neuron else w.shape)
    # one scalar per per-unit array: the sums stay outputs of the one-pass reduction only
    ok = all_finite_values([jnp.sum(x) for x in sums])
    if rule.zero_mean:
        mw, mu = sums[0] / count, sums[1] / count
        lost_w, lost_u = count * mw * mw, count * mu * mu
        ww, uw, uu = ww - lost_w, uw - count * mw * mu, uu - lost_u
        ok &= jnp.all((lost_w <= _CANCELLATION * ww) & (lost_u <= _CANCELLATION * uu))
    c = safe_div(uw, ww)
    tt = jnp.maximum(uu - c * uw, 0)
    nu_new = rule.rms_decay * nu + (1 - rule.rms_decay) * tt
    h = (eta_r * n) * safe_div(1.0, jnp.sqrt(nu_new / bc) + rule.eps)
    mm = ww + h * h * tt
    k = n * safe_div(1.0, jnp.sqrt(mm))
    a = 1 + h * c
    shift = -k * (a * mw - h * mu) if rule.zero_mean else jnp.zeros_like(k)
    coefficients = (k * a - 1, -k * h, shift)
    # A unit of frozen norm 0 is mapped to 0 whatever its sums; any other needs sums of
    # squares in the normal float range (a kernel of 1e-30 entries has |w|^2 = 0 in float32).
    tiny = jnp.finfo(ww.dtype).tiny / jnp.finfo(ww.dtype).eps
    ok &= jnp.all(_CANCELLATION * tt >= uu) & jnp.all((n == 0) | ((ww >= tiny) & (mm >= tiny)))
    ok &= all_finite_values([jnp.sum(x) for x in (mm, *coefficients)])
    return coefficients, nu_new, ok


def _elementwise_form(w, u, nu, n, eta_r, bc, rule: _Rule):
    """:func:`_closed_form`'s coefficients and running average from elementwise centring,
    tangent and max-scaled norm (several passes: finite for every finite kernel)."""
    per_neuron = rule.per_neuron
    mw = jnp.mean(w, axis=_axes(w, per_neuron)) if rule.zero_mean else jnp.zeros_like(nu)
    mu = jnp.mean(u, axis=_axes(u, per_neuron)) if rule.zero_mean else jnp.zeros_like(nu)
    wc, uc = w - mw, u - mu
    c = safe_div(_sum(uc * wc, per_neuron), _sum(wc * wc, per_neuron))
    tangent = uc - c * wc
    nu_new = rule.rms_decay * nu + (1 - rule.rms_decay) * _sum(tangent * tangent, per_neuron)
    h = (eta_r * n) * safe_div(1.0, jnp.sqrt(nu_new / bc) + rule.eps)
    a = 1 + h * c
    k = n * safe_div(1.0, _norm(a * wc - h * uc, per_neuron))
    return (k * a - 1, -k * h, -k * (a * mw - h * mu)), nu_new


def _kernel_coefficients(w, u, nu, n, eta_r, bc, rule: _Rule):
    """The turned kernel's coefficients ``(A, B, C)`` and running average: the one-pass
    closed form where its sums are trusted, else the elementwise form (computed only
    then)."""
    fast, nu_fast, ok = _closed_form(w, u, nu, n, eta_r, bc, rule)
    return reductions.unless_trusted(
        ok, (fast, nu_fast), lambda: _elementwise_form(w, u, nu, n, eta_r, bc, rule)
    )


def _leaf_update(u, nu, n, w, *, lr, eta_r, count, rotating, rule: _Rule):
    """One leaf's update and running average: the base step ``-lr u`` (plus the decoupled
    decay for ``kind="adamw"``) on leaves that follow the base, the turn on kernels."""
    cd = compute_dtype(w)
    uc, wc = u.astype(cd), w.astype(cd)
    decay = 0.0 if rule.kind == "sgdm" else lr * rule.weight_decay
    if not is_kernel(w):
        return (-lr * uc - decay * wc).astype(u.dtype), nu
    bc = one_minus_power(rule.rms_decay, count, cd)
    turn, nu_new = _kernel_coefficients(wc, uc, nu.astype(cd), n, eta_r, bc, rule)
    plain = (-decay * jnp.ones_like(nu_new), -lr * jnp.ones_like(nu_new), jnp.zeros_like(nu_new))
    (a, b, shift), nu_new = _pick(rotating, (turn, nu_new), (plain, nu.astype(cd)))
    return (a * wc + b * uc + shift).astype(u.dtype), nu_new.astype(nu.dtype)


def _check_arguments(owner, base, learning_rate, rule: _Rule) -> None:
    checks.check_transformation(
        owner, "base", base, example="optax.trace(0.9) or optax.scale_by_adam()"
    )
    _check_kind(owner, rule.kind)
    _check_hparams(owner, learning_rate, rule.weight_decay, rule.momentum, rule.rms_decay)
    check_range(owner, "eps", rule.eps, low=0.0, hint="Use a small non-negative number, e.g. 1e-8.")
    check_bool(owner, "zero_mean", rule.zero_mean)
    check_bool(owner, "per_neuron", rule.per_neuron)


def rotational(
    base: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: Any,
    momentum: Any = 0.9,
    rms_decay: Any = 0.9,
    *,
    kind: str = "sgdm",
    eps: Any = 1e-8,
    zero_mean: bool = True,
    per_neuron: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Rotational wrapper (REQ): frozen unit norms, equilibrium angular update per step.

    Math [paper: Kosson et al. 2024, Sec. 5 "rotational variants"; code: REQ
    ``perform_rotational_update`` in
    https://github.com/epfml/REQ/blob/main/shared/optimizers/common.py]. Let ``u`` be the
    base's step direction (``base`` must return a descent *direction* without learning
    rate and weight decay, e.g. ``optax.trace(momentum)`` for the authors'
    ``RotationalSGD`` or ``optax.scale_by_adam(b1, b2, eps)`` for ``RotationalAdamW``) and
    ``eta_r`` = :func:`equilibrium_angular_update` of ``(learning_rate, weight_decay,
    momentum, kind)``. Every unit ``w_j = w[..., j]`` (Flax: the LAST axis; the whole leaf
    with ``per_neuron=False``) of a leaf with ``ndim >= 2``, when ``weight_decay != 0``, is
    rotational, with frozen norm ``n_j = |w_j(0)|``::

        w_j   <- w_j - mean(w_j)                               (zero_mean)
        u_j   <- u_j - mean(u_j)                               (zero_mean)
        u_j   <- u_j - <u_j, w_j> w_j / |w_j|^2                (tangential part)
        nu_j  <- rms_decay nu_j + (1 - rms_decay) |u_j|^2     (debiased by 1 - rms_decay^t)
        w_j   <- w_j - eta_r * n_j * u_j / (sqrt(nu_j) + eps)
        w_j   <- n_j * w_j / |w_j|

    so each unit keeps its initial norm and turns by about ``eta_r`` radians per step on
    average, whatever the gradient scale. The defaults are those of the authors' code:
    centring (``zero_mean=True``), ``rms_decay=0.9`` (their ``update_norm_decay_factor``),
    ``eps=1e-8`` (their ``rotational_eps``), per-neuron control. The first line is an
    identity once the weights are centred: the authors centre them when the optimizer is
    created, so call :func:`center_params` on the initial parameters to reproduce their
    runs; without it the first update centres them.

    Other leaves follow the base, as in the authors' code: leaves with ``ndim < 2``
    (biases, gains) and, at ``weight_decay = 0``, EVERY leaf (the authors treat a leaf as
    rotational only if ``weight_decay != 0 and dim > 1``: a zero equilibrium angle would
    freeze it). ``kind="sgdm"`` adds the coupled decay ``lambda w`` to their gradient
    before the base and steps ``-eta u``; ``kind="adamw"`` steps ``-eta (u + lambda w)``
    (decoupled). A zero-norm unit stays zero (its frozen norm is 0) without NaN; the
    authors' code divides by that zero norm.

    Args:
      base: the base direction, an ``optax.GradientTransformation`` without learning rate
        or weight decay (it gets the gradients, with the coupled decay on 1-D leaves when
        ``kind="sgdm"``, and ``params``).
      learning_rate: the base learning rate ``eta >= 0`` (scalar or optax schedule).
      weight_decay: the weight decay ``lambda >= 0`` whose equilibrium is imposed; 0 trains
        every leaf with the base.
      momentum: the base's momentum (``b1`` for Adam) in ``[0, 1)``, used in ``eta_r``.
      rms_decay: decay in ``[0, 1)`` of the running average of the squared update norm
        (the authors' ``update_norm_decay_factor``; 0 holds every step at ``eta_r``).
      kind: ``"sgdm"`` (``eta_r = sqrt(2 eta lambda / (1 + beta))``) or ``"adamw"``
        (``eta_r = sqrt(2 eta lambda (1 - beta) / (1 + beta))``).
      eps: added to the root of the running average (``>= 0``).
      zero_mean: centre the rotational weights and their updates (the authors' default).
      per_neuron: control the norm and rotation of each unit (``True``) or of each whole
        kernel (``False``, the authors' per-layer mode).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`RotationalState`;
      ``update`` needs ``params`` and forwards extra args to ``base``. With
      ``optax.inject_hyperparams`` the base is passed through unchanged (it is not a
      number).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ksbopt.peers import center_params, rotational
      >>> params = {"kernel": jax.random.normal(jax.random.key(0), (8, 4)), "bias": jnp.zeros(4)}
      >>> params = center_params(params)  # as the authors' optimizer does when created
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
    rule = _Rule(weight_decay, momentum, rms_decay, kind, eps, zero_mean, per_neuron)
    _check_arguments(owner, base, learning_rate, rule)
    base = optax.with_extra_args_support(base)
    wd = concrete_float(weight_decay)
    # Python bool where the weight decay is known now, a traced flag otherwise.
    rotating = (wd != 0) if wd is not None else (jnp.asarray(weight_decay) != 0)

    def init_fn(params):
        return RotationalState(
            count=jnp.zeros([], jnp.int32),
            base_state=base.init(params),
            rms=jax.tree.map(lambda w: _zeros_per_unit(w, per_neuron), params),
            target_norm=jax.tree.map(lambda w: _initial_norm(w, per_neuron), params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        checks.require_params(params, owner)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        base_in = _with_coupled_decay(updates, params, rule) if kind == "sgdm" else updates
        directions, base_state = base.update(base_in, state.base_state, params, **extra_args)
        leaf = functools.partial(
            _leaf_update,
            lr=lr,
            eta_r=jnp.sqrt(_eta_r_squared(lr, weight_decay, momentum, kind)),
            count=optax.safe_increment(state.count),
            rotating=rotating,
            rule=rule,
        )
        out, rms = map_leaves(leaf, directions, state.rms, state.target_norm, params, n_out=2)
        return out, RotationalState(
            count=optax.safe_increment(state.count),
            base_state=base_state,
            rms=rms,
            target_norm=state.target_norm,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _zeros_per_unit(w: jax.Array, per_neuron: bool) -> jax.Array:
    """A zero running average: one number per unit of a kernel (per kernel), else one."""
    shape = w.shape[-1:] if per_neuron else ()
    return jnp.zeros(shape if is_kernel(w) else (), compute_dtype(w))


def _initial_norm(w: jax.Array, per_neuron: bool) -> jax.Array:
    """The frozen norm of each unit (or kernel); a zero placeholder for other leaves."""
    if not is_kernel(w):
        return _zeros_per_unit(w, per_neuron)
    return _norm(w.astype(compute_dtype(w)), per_neuron)


def _with_coupled_decay(grads: Any, params: Any, rule: _Rule) -> Any:
    """The gradient plus ``lambda w`` on the leaves that follow the base (``kind="sgdm"``);
    on a kernel the decay is either not wanted (rotational) or zero, so kernels get ``g``."""

    def leaf(g, w):
        return g if is_kernel(w) else g + (rule.weight_decay * w).astype(g.dtype)

    return jax.tree.map(leaf, grads, params)
