"""Gradient transformations that preserve or steer Noether charges: project, retract, steer.

Each factory returns an ``optax.GradientTransformationExtraArgs``. The declarations are
validated when the factory is called and resolved against the parameter tree at ``init``
(a selector that matches nothing, a wrong axis, ... raise there). ``update`` needs
``params``.

Non-finite input: when the incoming updates hold a NaN or an infinity on a leaf that a
symmetry acts on, these transforms return zero updates on every such leaf and leave their
state unchanged; updates of leaves no symmetry touches pass through as they came (wrap the
whole chain in ``optax.apply_if_finite`` to skip the step everywhere, base optimizer state
included). A zero-norm group has no orbit to move along: it is left as it is.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ksbopt._src import checks, reductions
from ksbopt._src.numerics import all_finite_values
from ksbopt._src.symmetries import orbit
from ksbopt._src.targets import prescribed as targets_lib


def _flat(tree: Any) -> list:
    return jax.tree.leaves(tree)


def _unflatten_like(updates: Any, flat: list) -> Any:
    return jax.tree.unflatten(jax.tree.structure(updates), flat)


def _new_updates(ok: jax.Array, binding: orbit.Binding, flat_u: list, new: list) -> list:
    """The new updates on the leaves a symmetry touched (zero if ``ok`` is false), the
    incoming updates elsewhere."""
    touched = {i for b in binding.bound for i in b.leaves}
    return [
        jnp.where(ok, new[i], 0).astype(u.dtype) if i in touched else u
        for i, u in enumerate(flat_u)
    ]


class ProjectState(NamedTuple):
    r"""State of :func:`project`: the exactness of the last joint projection.

    Attributes:
      residual: the largest relative residual of the last step's joint solves (float32),
        over the connected components of overlapping symmetries,

        .. math::

            \rho = \frac{\bigl(\sum_k \lVert P_k\, \tilde u \rVert^2\bigr)^{1/2}}
                         {\lVert u \rVert},

        with :math:`u` the incoming update on the component's leaves, :math:`\tilde u` the
        projected one and :math:`P_k` the orthogonal projection on the generators of
        symmetry k alone: the generator component left in the update, relative to the
        update's size (a gradient already orthogonal to the generators gives ~eps). 0 when no
        symmetry overlaps another (each is then projected in closed form); ~eps for a
        converged solve; a value near ``tol`` or above reports a solve stopped by
        ``max_iter``.

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> ksbopt.project(ksbopt.Scale("w", axis=None)).init({"w": jnp.ones(2)})
      ProjectState(residual=Array(0., dtype=float32))

    References:
      Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep
      Learning Dynamics", ICLR 2021, https://arxiv.org/abs/2012.04728 (the generators);
      Hestenes, Stiefel, "Methods of Conjugate Gradients for Solving Linear Systems", J. Res.
      Nat. Bur. Standards 49 (1952), https://doi.org/10.6028/jres.049.044 (the solver whose
      residual this is).
    """

    residual: jax.Array


def _check_solver_args(max_iter, tol) -> None:
    """Validate the joint solver's arguments where they are concrete numbers (under
    ``optax.inject_hyperparams`` they may be traced)."""
    if not isinstance(max_iter, jax.core.Tracer):
        m = np.asarray(max_iter)
        if m.ndim or m.dtype.kind not in "iuf" or m != np.floor(m) or m < 1:
            raise ValueError(
                f"{max_iter=} must be a positive int: the most conjugate-gradient iterations "
                "of a joint solve, e.g. 64."
            )
    if tol is not None and not isinstance(tol, jax.core.Tracer):
        t = np.asarray(tol)
        if t.ndim or t.dtype.kind not in "iuf" or not 0 <= t < 1:
            raise ValueError(
                f"{tol=} must be a number in [0, 1): the relative residual at which a joint "
                "solve stops (None: 64 eps of the compute dtype)."
            )


def project(
    symmetries, *, max_iter: int = orbit.PROJECT_MAX_ITER, tol: float | None = None
) -> optax.GradientTransformationExtraArgs:
    r"""Remove from the updates their component along every symmetry generator.

    .. math::

        u \mapsto u - J (J^\top J)^{+} J^\top u, \qquad J c = \sum_g c_g\, \xi_g(\theta),

    the Euclidean projection on the orthogonal complement of the span of all generators of
    all groups. Groups of one symmetry are disjoint and are projected in closed form, one by
    one. Where generators of different symmetries overlap on the same numbers (a chain of
    ReLU rescales, a ReLU layer feeding a softmax head, attention heads with a LayerNorm
    before them) the normal equations :math:`J^\top J c = J^\top u` of the whole connected
    component are solved jointly, matrix-free, by conjugate gradients preconditioned with
    each symmetry's own Gram operator: every iteration is one pass over the component's
    parameters (never a dense Gram matrix), and the result is orthogonal to every generator
    at once up to the relative residual reported in :class:`ProjectState` (``tol``).

    Placed before the base optimizer it projects gradients (which for a true symmetry are
    already orthogonal, up to weight decay); placed after it, it projects the final step:
    the charges then change only at second order, by Q(u) (see
    :doc:`/concepts/noether_charges`).

    Args:
      symmetries: a :class:`~ksbopt.Scale`, :class:`~ksbopt.Rescale`,
        :class:`~ksbopt.Translation`, :class:`~ksbopt.Linear` or a list of them.
      max_iter: most conjugate-gradient iterations per joint solve (default 64); unused
        when no two symmetries overlap.
      tol: relative residual at which a joint solve stops (default ``None``: 64 eps of the
        compute dtype, i.e. about 7.6e-6 in float32 and 1.4e-14 in float64).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`ProjectState`, whose
      ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> tx = ksbopt.project(ksbopt.Scale("w", axis=None))
      >>> u, _ = tx.update({"w": jnp.array([1.0, 0.0])}, tx.init(params), params)
      >>> float(jnp.dot(u["w"], params["w"]))
      0.0

    References:
      Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
      Scale-invariant Weights", ICLR 2021, https://arxiv.org/abs/2006.08217 (the radial
      projection for scale groups); Kunin et al., "Neural Mechanics", ICLR 2021,
      https://arxiv.org/abs/2012.04728 (the generators); Paige, Saunders, "LSQR: An
      Algorithm for Sparse Linear Equations and Sparse Least Squares", ACM TOMS 8 (1982),
      https://doi.org/10.1145/355984.355989 (conjugate gradients on least squares).
    """
    syms = orbit.as_symmetries(symmetries)
    _check_solver_args(max_iter, tol)

    def init_fn(params):
        orbit.bind(syms, params)
        return ProjectState(jnp.zeros((), jnp.float32))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        checks.require_params(params, "ksbopt.project")
        binding = orbit.bind(syms, params)
        flat_u = _flat(updates)
        w = orbit.promote(_flat(params))
        u = orbit.promote(flat_u)
        projected, coefs, residual = orbit.project(binding, w, u, max_iter=max_iter, tol=tol)
        ok = all_finite_values([*coefs, residual])
        new = _new_updates(ok, binding, flat_u, projected)
        return _unflatten_like(updates, new), ProjectState(jnp.where(ok, residual, state.residual))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class RetractState(NamedTuple):
    r"""State of :func:`retract`.

    Attributes:
      initial: the charges at ``init``, one array per symmetry: the level set kept.
      residual: the largest relative charge error after the last step, over all groups
        (float32), :math:`\max_g |Q_g - Q_g(w_0)| / \mathrm{scale}_g`. It is at most 64 eps
        for converged moves; a value far above that reports an iterative solve (a Linear
        symmetry, overlapping symmetries) that did not converge or a group that cannot reach
        its charge.

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> tx = ksbopt.retract(ksbopt.Scale("w", axis=None))
      >>> tx.init({"w": jnp.array([3.0, 4.0])}).initial
      (Array([12.5], dtype=float32),)

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716
    """

    initial: tuple
    residual: jax.Array


def retract(symmetries) -> optax.GradientTransformationExtraArgs:
    r"""Keep every Noether charge exactly where it was: a retraction onto the charge level set.

    Placed LAST in a chain, it replaces the step u by psi(w + u, a) - w where the group
    element a (one per group) is chosen so that the charge returns to its value at ``init``
    (holding the initial charge rather than the previous one means rounding errors never
    accumulate over steps):

    .. math::

        u \mapsto \psi(w + u, a) - w, \qquad Q(\psi(w + u, a)) = Q(w_0);

    - scale: :math:`a = \lVert w_0 \rVert / \lVert w + u \rVert` (restore the norm; the
      constrained-filter-norm control experiment of Tanaka & Kunin, :ref:`implicit-rmsprop`);
    - rescale: a^2 solves a^4 x_in - 2 Q a^2 - x_out = 0;
    - translation: shift by (Q(w_0) - Q(w + u)) / n;
    - linear: G from Newton's method on symmetric G = exp(X) (see :class:`~ksbopt.Linear`).

    Overlapping Scale, Rescale and Translation symmetries (a ReLU chain, a normalised layer
    feeding a softmax head) are retracted jointly by Newton's method on the group elements,
    each step one conjugate-gradient solve with the generators' Gram operator (the one
    :func:`project` uses; cost linear in the parameters); overlaps with a Linear by sweeps of
    each symmetry's own move. Both stop once every charge is within 64 eps.
    The move is along the orbit, so the loss is unchanged by it (exactly, for a true
    symmetry). Charges are computed in float32 or wider whatever the parameter dtype.

    Args:
      symmetries: a declaration or a list of them.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`RetractState`.

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> tx = optax.chain(optax.sgd(0.5), ksbopt.retract(ksbopt.Scale("w", axis=None)))
      >>> u, _ = tx.update({"w": jnp.array([1.0, 1.0])}, tx.init(params), params)
      >>> float(jnp.linalg.norm(optax.apply_updates(params, u)["w"]))
      5.0

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716
    """
    syms = orbit.as_symmetries(symmetries)
    return _orbit_move(syms, targets_lib.constant("initial"), rate=1.0, name="retract")


class SteerState(NamedTuple):
    r"""State of :func:`steer`.

    Attributes:
      count: steps taken (drives ``targets.schedule``).
      initial: the charges at ``init``, one array per symmetry.
      residual: largest relative distance of the charges from this step's targets T
        (float32), :math:`\max_g |Q_g - T_g| / \mathrm{scale}_g`.
      target_state: the target's own state, one entry per symmetry (``()`` for stateless
        targets such as ``constant``; e.g. an EMA for ``targets.equilibrium``).

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> tx = ksbopt.steer(ksbopt.Scale("w", axis=None), 2.0)
      >>> state = tx.init({"w": jnp.array([3.0, 4.0])})
      >>> int(state.count), state.initial
      (0, (Array([12.5], dtype=float32),))

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716
    """

    count: jax.Array
    initial: tuple
    residual: jax.Array
    target_state: tuple = ()


def steer(symmetries, target, rate: float = 1.0) -> optax.GradientTransformationExtraArgs:
    r"""Move along the orbits so that each charge approaches a target by ``rate`` per step.

    Placed LAST in a chain. With Q = Q(w + u) the charge after the base step and T the
    target, the step is replaced by psi(w + u, a) - w with a chosen so that

    .. math::

        Q(\psi(w + u, a)) = Q + \text{rate}\,(T - Q).

    Orbit moves never change the loss; they change the kinetic state the next steps see
    (e.g. the effective learning rate :math:`\eta / \lVert w \rVert^2` of a scale group,
    [derived] :ref:`P2 <p2>`).

    Args:
      symmetries: a declaration or a list of them.
      target: a :mod:`ksbopt.targets` object (``constant``, ``schedule``, ``balanced``),
        a number or array (a constant charge; for ``Linear`` a number v means v I), or a
        callable step -> value (a schedule). A numeric target can be scheduled with
        ``optax.inject_hyperparams``.
      rate: fraction of the distance to the target covered each step, in (0, 1].

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`SteerState`.

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> tx = ksbopt.steer(ksbopt.Scale("w", axis=None), ksbopt.targets.constant(2.0))
      >>> u, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
      >>> q = ksbopt.charges(optax.apply_updates(params, u), ksbopt.Scale("w", axis=None))[0]
      >>> round(float(q[0]), 5)
      2.0

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics: Role of Symmetry Breaking in Neural
      Networks", NeurIPS 2021, https://arxiv.org/abs/2105.02716
    """
    syms = orbit.as_symmetries(symmetries)
    if not isinstance(rate, jax.core.Tracer) and not 0 < float(jnp.asarray(rate)) <= 1:
        raise ValueError(
            f"{rate=} must be in (0, 1]: the fraction of the distance to the "
            "target covered per step (1 jumps to the target)."
        )
    return _orbit_move(syms, targets_lib.as_target(target), rate=rate, name="steer")


def _orbit_move(syms, target: targets_lib.Target, *, rate, name: str):
    """One implementation for retract (steer to the initial charges at rate 1) and steer."""
    is_retract = name == "retract"

    def init_fn(params):
        binding = orbit.bind(syms, params)
        for b in binding.bound:
            target.check(b)
        w = orbit.promote(_flat(params))
        initial = orbit.charges(binding, w)
        residual = jnp.zeros((), jnp.float32)
        if is_retract:
            return RetractState(initial, residual)
        target_state = tuple(target.init_state(b, w) for b in binding.bound)
        return SteerState(jnp.zeros((), jnp.int32), initial, residual, target_state)

    def update_fn(updates, state, params=None, **extra_args):
        checks.require_params(params, f"ksbopt.{name}")
        binding = orbit.bind(syms, params)
        flat_u = _flat(updates)
        w = orbit.promote(_flat(params))
        u = orbit.promote(flat_u)
        cand = [x + v for x, v in zip(w, u)]
        count = getattr(state, "count", None)
        t_states = getattr(state, "target_state", None) or ((),) * len(binding.bound)
        goals, charges, new_t_states = [], [], []
        for b, q0, ts in zip(binding.bound, state.initial, t_states):
            # Unguarded (raw_charge): a candidate whose squared norms overflow cannot be
            # moved (the move's own arithmetic overflows), so the step is skipped below.
            q = b.raw_charge(cand)
            charges.append(q)
            t, ts = target.step(
                b, ts, params=w, updates=u, charge=q, initial=q0, count=count, extra_args=extra_args
            )
            new_t_states.append(ts)
            goals.append(q + rate * (t - q))
        ok = all_finite_values(charges)
        charges, goals = reductions.finished(ok, (charges, goals))
        stepped, residual = orbit.move(binding, w, u, goals, charges=charges)
        new = _new_updates(ok, binding, flat_u, stepped)
        residual = jnp.where(ok, residual, state.residual)
        if is_retract:
            return _unflatten_like(updates, new), RetractState(state.initial, residual)
        count = jnp.where(ok, optax.safe_increment(count), count)
        new_t_states = jax.tree.map(
            lambda a, b: jnp.where(ok, a, b), tuple(new_t_states), tuple(t_states)
        )
        return _unflatten_like(updates, new), SteerState(
            count, state.initial, residual, new_t_states
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
