"""Symmetry teleportation with optimizer-state transport: ``teleport``.

Every ``every`` steps the parameters jump along the declared orbits (which never changes the
loss) to a point chosen by an objective: the largest squared gradient norm (Zhao et al.
2022: faster descent from there) or the smallest sharpness proxy. The group elements are
optimised in log coordinates by a few jitted, monotone (trust-region) ascent steps, and the
state of the wrapped optimizer is carried along with the parameters
(:ref:`state transport <state-transport>`), so that training continues as if the coordinates
had always been the new ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ksbopt._src import checks
from ksbopt._src.numerics import all_finite
from ksbopt._src.symmetries import orbit
from ksbopt._src.symmetries.bound import BoundSymmetry
from ksbopt._src.symmetries.declarations import apply_moved
from ksbopt._src.transforms import transport

OBJECTIVES = ("grad_norm", "sharpness", "lookahead")
_RESERVED = ("value_fn", "value", "grad")
_OWNER = "ksbopt.teleport"


class TeleportState(NamedTuple):
    """State of :func:`teleport`.

    Attributes:
      count: steps taken.
      element: log coordinates of the group element of the last teleport, one array per
        symmetry (scale / rescale: log a per group; translation: the shift; linear: X with
        G = expm(X) per head). Zeros before the first teleport.
      objective_gain: objective after minus before the last teleport (>= 0; float32),
        ``gain = J(psi(theta, a*)) - J(theta)``; 0 when J is not finite at theta (no move).
      inner_state: the wrapped optimizer's state (transported at every teleport).

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> sym = ksbopt.Rescale(incoming="a", outgoing="b")
      >>> tx = ksbopt.teleport(optax.sgd(1e-3), sym, every=10, rho=1e-3)
      >>> state = tx.init({"a": jnp.ones((1, 2)), "b": jnp.ones((2, 1))})
      >>> int(state.count), state.element
      (0, (Array([0., 0.], dtype=float32),))

    References:
      Zhao, Dehmamy, Walters, Yu, "Symmetry Teleportation for Accelerated Optimization",
      NeurIPS 2022, https://arxiv.org/abs/2205.10637
    """

    count: jax.Array
    element: tuple
    objective_gain: jax.Array
    inner_state: Any


def _check_args(every, steps, step_size, rho, objective, value_fn) -> None:
    owner = _OWNER
    checks.check_positive_int(owner, "every", every, example=100)
    checks.check_positive_int(owner, "steps", steps, example=8)
    checks.check_positive(owner, "step_size", step_size, example=0.1)
    if not (objective in OBJECTIVES or callable(objective)):
        raise ValueError(
            f"{owner}: objective={objective!r} is not one of {OBJECTIVES}; write "
            "'grad_norm' (maximise |grad L|^2), 'sharpness' (minimise L(w + rho g / |g|)), "
            "'lookahead' (minimise L(w - rho g)) or "
            "a callable (loss, params) -> scalar to maximise."
        )
    if rho is None:
        if objective in ("lookahead", "sharpness"):
            raise ValueError(
                f"{owner}: objective={objective!r} needs rho, the length of the base's step "
                "from the new point; got rho=None. Pass rho=learning_rate (heavy-ball SGD "
                "with momentum b: learning_rate / (1 - b))."
            )
    else:
        checks.check_positive(owner, "rho", rho, example=0.1)
    if value_fn is not None and not callable(value_fn):
        raise TypeError(f"{owner}: value_fn={value_fn!r} must be a callable params -> loss.")


def _element(b: BoundSymmetry, s: jax.Array) -> jax.Array:
    """The group element from its log coordinates."""
    kind = b.symmetry.kind
    if kind == "translation":
        return s
    if kind == "linear":
        return jax.vmap(jax.scipy.linalg.expm)(s)
    return jnp.exp(s)


def _act(binding: orbit.Binding, flat: list, s: tuple) -> list:
    """psi(theta, a) for every symmetry in turn."""
    out = list(flat)
    for b, sb in zip(binding.bound, s):
        out = apply_moved(out, b.act(out, _element(b, sb)), add=False)
    return out


def _transport(binding: orbit.Binding, flat: list, s: tuple, power: int) -> list:
    """A first (power 1) or second (power 2) moment carried by the action (section 6).

    [derived] Gradients are covectors: under theta -> M theta they become M^-T g. Scale:
    g / a; rescale: (g_in / a, g_out a); translation: unchanged; linear (A G, G^-1 B):
    (G_A G^-T, G^T G_B). Elementwise squares of gradients (second moments) follow the
    diagonal actions squared: nu / a^2 (rescale: nu_in / a^2, nu_out a^2).
    """
    out = list(flat)
    for b, sb in zip(binding.bound, s):
        kind = b.symmetry.kind
        if kind == "translation":
            continue
        if kind == "linear":
            g = _element(b, sb)
            out = apply_moved(out, b.act(out, jnp.swapaxes(jnp.linalg.inv(g), -1, -2)), add=False)
            continue
        for _ in range(power):
            out = apply_moved(out, b.act(out, jnp.exp(-sb)), add=False)
    return out


def _loss_kwargs(fn: Callable, extra_args: dict) -> dict:
    """The extra arguments ``fn``'s signature names (optax line-search style), checked."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return {}
    params = list(sig.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        kwargs = {k: v for k, v in extra_args.items() if k not in _RESERVED}
    else:
        names = {p.name for p in params[1:]}
        kwargs = {k: v for k, v in extra_args.items() if k in names}
    missing = [
        p.name
        for p in params[1:]
        if p.default is inspect.Parameter.empty
        and p.name not in kwargs
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    if missing:
        raise TypeError(
            f"ksbopt.teleport: value_fn needs the argument(s) {missing}, which were not given "
            f"as extra arguments of update (got {sorted(extra_args)}). Call "
            "tx.update(grads, state, params, " + ", ".join(f"{m}=..." for m in missing) + ")."
        )
    return kwargs


def _split_static(kwargs: dict) -> tuple[dict, tuple]:
    """Array arguments (traced) and the others (static, part of the compilation key)."""
    dynamic, static = {}, []
    for k, v in kwargs.items():
        leaves = jax.tree.leaves(v)
        if leaves and all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves):
            dynamic[k] = v
        else:
            static.append((k, v))
    return dynamic, tuple(sorted(static, key=lambda kv: kv[0]))


def _search_impl(config, do, w, element, gain, step_size, rho, steps, dynamic):
    """Where to teleport: the group element's log coordinates and the objective's gain.

    ``lax.cond(do, ...)``: on the other steps the previous element and gain come back.
    """
    syms, treedef, dtypes, objective, fn, static = config

    def as_params(flat):
        return jax.tree.unflatten(treedef, [x.astype(d) for x, d in zip(flat, dtypes)])

    binding = orbit.bind(syms, as_params(w))

    def loss(p):
        return fn(p, **dynamic, **dict(static))

    def loss_flat(flat):
        return loss(as_params(flat))

    def objective_of(s):
        theta = _act(binding, w, s)
        if callable(objective):
            return jnp.asarray(objective(loss, as_params(theta)), theta[0].dtype)
        g = [x.astype(t.dtype) for x, t in zip(jax.grad(loss_flat)(theta), theta)]
        sq = sum(jnp.sum(jnp.square(x)) for x in g)
        if objective == "grad_norm":
            return sq
        if objective == "lookahead":
            return -loss_flat([t - rho * x for t, x in zip(theta, g)]).astype(sq.dtype)
        scale = rho * jax.lax.rsqrt(jnp.where(sq > 0, sq, 1))
        return -loss_flat([t + scale * x for t, x in zip(theta, g)]).astype(sq.dtype)

    value_and_grad = jax.value_and_grad(objective_of)

    def search(_):
        # One evaluation per iteration (the objective's second-order graph appears once):
        # iteration 0 evaluates the identity, each later one a trial step from the best point.
        zero = tuple(jnp.zeros_like(e) for e in element)
        dtype = w[0].dtype
        radius = jnp.asarray(step_size, dtype)
        inf = jnp.asarray(-jnp.inf, dtype)

        def body(i, carry):
            s, j, d, lr, trial, j0 = carry
            j_new, d_new = value_and_grad(trial)
            first = i == 0
            better = first | (jnp.isfinite(j_new) & (j_new > j))
            s = tuple(jnp.where(better, a, b) for a, b in zip(trial, s))
            d = tuple(jnp.where(better, a, b) for a, b in zip(d_new, d))
            j = jnp.where(better, j_new, j)
            j0 = jnp.where(first, j_new, j0)
            lr = jnp.where(first, radius, jnp.where(better, jnp.minimum(2 * lr, radius), lr / 2))
            norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in d))
            scale = jnp.where(norm > 0, lr / jnp.where(norm > 0, norm, 1), 0)
            trial = tuple(x + scale * y for x, y in zip(s, d))
            return s, j, d, lr, trial, j0

        init = (zero, inf, zero, radius, zero, inf)
        s, j, _, _, _, j0 = jax.lax.fori_loop(0, steps + 1, body, init)
        # An objective that is not finite at the current point (a loss that is NaN or inf
        # there) accepts no trial step: s stays at the identity and the gain is 0, not NaN.
        ok = jnp.isfinite(j0)
        s = tuple(jnp.where(ok, x, jnp.zeros_like(x)) for x in s)
        return s, jnp.where(ok, j - j0, 0).astype(jnp.float32)

    def skip(_):
        return element, gain

    return jax.lax.cond(do, search, skip, None)


_search = jax.jit(_search_impl, static_argnums=0)


def _check_base(base: Any, symmetries: Any) -> optax.GradientTransformationExtraArgs:
    """The wrapped optimizer (``None``: the identity), with extra-argument support."""
    if base is None:
        base = optax.identity()
    if isinstance(symmetries, optax.GradientTransformation):
        raise TypeError(
            f"{_OWNER}: symmetries={symmetries!r} is an optax GradientTransformation; the "
            "wrapped optimizer comes first, as in optax: teleport(base, symmetries, ...)."
        )
    if not isinstance(base, optax.GradientTransformation):
        raise TypeError(
            f"{_OWNER}: base={base!r} is not an optax GradientTransformation; pass "
            "an optimizer such as optax.sgd(0.1, momentum=0.9), or None."
        )
    return optax.with_extra_args_support(base)


def _check_inner_state(inner: Any, params: Any, table: dict, binding: orbit.Binding) -> None:
    """Every parameter-shaped field of the wrapped state has a known, exact transport."""
    unknown = transport.unknown_fields(inner, params, table)
    if unknown:
        raise ValueError(
            f"{_OWNER}: the wrapped optimizer's state holds parameter-shaped fields "
            f"{unknown} whose transport is unknown; declare them, e.g. moments="
            "{'<field name>': 'first'} for sums of gradients, 'second' for sums of squared "
            "gradients, 'none' to leave them."
        )
    kinds = {table.get(name) for name, _ in transport.parameter_fields(inner, params)}
    linear = [b.symmetry for b in binding.bound if b.symmetry.kind == "linear"]
    if "second" in kinds and linear:
        raise ValueError(
            f"{_OWNER}: the wrapped optimizer keeps second moments (e.g. Adam's nu), which "
            f"have no exact transport under {linear}: elementwise squares of G_A G^-T are "
            "not a function of nu. Use a first-order base (SGD, momentum) with Linear "
            "symmetries, or teleport along Scale / Rescale / Translation only."
        )


def _value_fn(extra_args: dict, default: Callable | None) -> Callable:
    """The loss: the extra argument ``value_fn`` of ``update``, else the factory's."""
    fn = extra_args.get("value_fn", default)
    if fn is None:
        raise ValueError(
            f"{_OWNER} needs the loss to choose where to move: pass value_fn=loss either to "
            "ksbopt.teleport(...) or as an extra argument of update, tx.update(grads, "
            f"state, params, value_fn=loss, batch=...); got extra arguments "
            f"{sorted(extra_args)}."
        )
    return fn


def _like(tree: Any, flat: list) -> Any:
    """``flat`` (promoted leaves) as a tree shaped and typed like ``tree``."""
    leaves = jax.tree.leaves(tree)
    return jax.tree.unflatten(
        jax.tree.structure(tree), [x.astype(y.dtype) for x, y in zip(flat, leaves)]
    )


def _transport_state(
    binding: orbit.Binding, inner_state: Any, params: Any, table: dict, s: tuple
) -> Any:
    """The wrapped optimizer's state carried along by the group element ``exp(s)``."""

    def moments(power):
        return lambda tree: _like(
            tree, _transport(binding, orbit.promote(jax.tree.leaves(tree)), s, power)
        )

    return transport.map_moments(
        inner_state, params, table, {"first": moments(1), "second": moments(2)}
    )


def teleport(
    base: optax.GradientTransformation | None,
    symmetries,
    every: int = 100,
    steps: int = 8,
    step_size: float = 0.1,
    rho: float | None = None,
    *,
    objective: str | Callable = "lookahead",
    value_fn: Callable | None = None,
    moments: dict[str, str] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Every ``every`` steps, teleport the parameters along the orbits and carry the state.

    At steps 0, every, 2 every, ... the parameters move to :math:`\psi(\theta, a^*)` where
    the group element :math:`a^*` (one per group) increases an objective J:

    - ``"grad_norm"``: :math:`J = \lVert\nabla L(\psi(\theta, a))\rVert^2` (Zhao et al.
      2022: steeper descent from the same loss value);
    - ``"sharpness"``: :math:`J = -L(\psi + \rho\, \nabla L / \lVert\nabla L\rVert)`, i.e. the
      one-step sharpness proxy :math:`L(\theta + \rho\, g/|g|) - L(\theta)` of SAM is
      minimised (the loss itself is the same everywhere on the orbit);
    - ``"lookahead"`` (the default): :math:`J = -L(\psi - \rho\, \nabla L(\psi))`, the loss
      after one gradient step of length ``rho`` from the new point (``rho``: the base's
      learning rate). To second order :math:`J = -L + \rho \lVert g\rVert^2 - \tfrac{\rho^2}{2}
      g^\top H g`: the gradient-norm gain of ``"grad_norm"`` minus the curvature along the
      step, so a teleport never moves to where the next step would be unstable;
    - a callable ``objective(loss, params) -> scalar``, maximised.

    The group element is optimised in log coordinates s (scale / rescale: a = exp(s);
    translation: the shift s; linear: G = expm(X)) starting from the identity, with
    ``steps`` jitted ascent steps along the normalised gradient of J: a step of length at
    most ``step_size`` (global L2 norm of s) is accepted only if it increases J, otherwise
    the length is halved; after a success it doubles again up to ``step_size``. So J never
    decreases and one teleport moves s by at most ``steps * step_size``.

    Transport (:ref:`state transport <state-transport>`, [derived]): the incoming gradient and
    the wrapped optimizer's first moments (state fields ``mu``, ``trace``, ...) become M^-T g
    (scale: g / a; rescale: (g_in / a, g_out a); linear: G_A G^-T, G^T G_B; translation: unchanged),
    its second moments (``nu``, ...) nu / a^2 (rescale: nu_in / a^2, nu_out a^2). Then
    ``base`` takes its step from the new point. For a true symmetry the transported gradient
    is the gradient at the new point exactly, so training continues as the base optimizer
    would run from the new coordinates with the transported state (tested in float64).

    Note that for a scale symmetry :math:`\lVert\nabla L\rVert^2` is proportional to 1 / a^2:
    ``"grad_norm"`` shrinks such groups (raising their effective learning rate, :ref:`P2 <p2>`)
    by the trust-region length every time; its optimum is interior for rescale and linear
    symmetries. On non-compact orbits (rescale chains, linear symmetries of deep linear or
    attention layers) raising the gradient norm also raises the sharpness without bound, so
    ``"grad_norm"`` with a fixed learning rate can teleport past the stability limit and
    diverge (a plain deep linear network does at every learning rate); that is why the
    default is ``"lookahead"``, which trains there.

    The loss is ``value_fn(params, **kw)``: given here or as the extra argument ``value_fn``
    of ``update`` (which wins), its other arguments (a batch) taken by name from the extra
    arguments, as in optax's line searches. Its gradient is taken in the parameters' dtype.
    The search is compiled once per declaration list, tree structure, objective and
    ``value_fn`` object (also when ``update`` runs eagerly): pass the same function every
    step and its data as extra arguments, not a fresh lambda per step.

    Args:
      base: the optimizer to wrap (first, as in ``optax.masked(inner, mask)``); its state is
        transported. ``None`` means no optimizer (the updates are passed on, transported):
        use it only in front of stateless transforms, a stateful one must be ``base``.
      symmetries: declarations of any kind (Scale, Rescale, Translation, Linear).
      every: teleport when the step count is a multiple of this (steps 0, every, ...).
      steps: ascent steps per teleport (each costs one gradient of J: a second-order
        derivative of the loss).
      step_size: largest step in log coordinates (trust-region length), > 0.
      rho: length of the lookahead gradient step (``objective="lookahead"``, the default:
        the base's learning rate, for heavy-ball SGD ``learning_rate / (1 - momentum)``) or
        radius of the sharpness proxy (``objective="sharpness"``), > 0; required by those
        two objectives (no default could match the base's step), unused by the others.
      objective: ``"grad_norm"``, ``"sharpness"``, ``"lookahead"`` or a callable
        (keyword-only).
      value_fn: the loss, ``value_fn(params, **extra) -> scalar`` (keyword-only).
      moments: extra state field names of ``base``: ``{"name": "first" | "second" |
        "none"}``; a parameter-shaped field with an unknown name is an error at ``init``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`TeleportState`; ``update``
      needs ``params`` and passes extra arguments on to ``base``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, ksbopt
      >>> def loss(p, x):
      ...     return jnp.sum((jnp.maximum(x @ p["a"], 0) @ p["b"] - 1.0) ** 2)
      >>> params = {"a": jnp.array([[1.0, 2.0]]), "b": jnp.array([[3.0], [0.5]])}
      >>> sym = ksbopt.Rescale(incoming="a", outgoing="b")
      >>> tx = ksbopt.teleport(
      ...     optax.sgd(1e-3, momentum=0.9), sym, every=10, rho=1e-2, value_fn=loss
      ... )
      >>> x = jnp.ones((4, 1))
      >>> g = jax.grad(loss)(params, x)
      >>> u, state = tx.update(g, tx.init(params), params, x=x)
      >>> bool(state.objective_gain > 0)
      True

    References:
      Zhao, Dehmamy, Walters, Yu, "Symmetry Teleportation for Accelerated Optimization",
      NeurIPS 2022, https://arxiv.org/abs/2205.10637; Foret et al., "Sharpness-Aware
      Minimization for Efficiently Improving Generalization", ICLR 2021,
      https://arxiv.org/abs/2010.01412 (the sharpness proxy); Stock et al.,
      "Equi-normalization of Neural Networks", ICLR 2019, https://arxiv.org/abs/1902.10416
      (rescaling momentum with the weights).
    """
    _check_args(every, steps, step_size, rho, objective, value_fn)
    base = _check_base(base, symmetries)
    syms = orbit.as_symmetries(symmetries)
    table = transport.check_moments(moments, owner=_OWNER)

    def init_fn(params):
        binding = orbit.bind(syms, params)
        inner = base.init(params)
        _check_inner_state(inner, params, table, binding)
        w = orbit.promote(jax.tree.leaves(params))
        element = tuple(jnp.zeros(b.charge_shape, w[b.leaves[0]].dtype) for b in binding.bound)
        return TeleportState(jnp.zeros((), jnp.int32), element, jnp.zeros((), jnp.float32), inner)

    def update_fn(updates, state, params=None, **extra_args):
        checks.require_params(params, _OWNER)
        fn = _value_fn(extra_args, value_fn)
        dynamic, static = _split_static(_loss_kwargs(fn, extra_args))
        binding = orbit.bind(syms, params)
        flat_p = jax.tree.leaves(params)
        flat_u = jax.tree.leaves(updates)
        w = orbit.promote(flat_p)
        config = (syms, jax.tree.structure(params), tuple(x.dtype for x in flat_p), objective)
        config += (fn, static)
        do = state.count % every == 0
        args = (do, w, state.element, state.objective_gain, step_size, rho, steps, dynamic)
        try:
            hash(config)
        except TypeError:  # an unhashable static argument of value_fn: trace it inline
            s, gain = _search_impl(config, *args)
        else:  # compiled once per configuration, also when update runs eagerly
            s, gain = _search(config, *args)

        def moved(_):
            inner = _transport_state(binding, state.inner_state, params, table, s)
            return _act(binding, w, s), _transport(binding, orbit.promote(flat_u), s, 1), inner

        def stay(_):
            return w, orbit.promote(flat_u), state.inner_state

        w_t, g_t, inner = jax.lax.cond(do, moved, stay, None)
        params_t = jax.tree.unflatten(
            jax.tree.structure(params), [x.astype(p.dtype) for x, p in zip(w_t, flat_p)]
        )
        steps_out, inner = base.update(_like(updates, g_t), inner, params_t, **extra_args)
        new = [
            (wt + s_) - x for wt, s_, x in zip(w_t, orbit.promote(jax.tree.leaves(steps_out)), w)
        ]
        # A non-finite gradient skips the step: zero updates, state unchanged.
        ok = all_finite(flat_u)
        out = _like(updates, [jnp.where(ok, n, 0) for n in new])
        new_state = TeleportState(optax.safe_increment(state.count), s, gain, inner)
        new_state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state, state)
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
