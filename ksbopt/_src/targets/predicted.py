"""Charge targets that follow the dynamics: ``equilibrium`` and ``nld``.

Both are deliberate kinetic symmetry breaking for any base optimizer: placed in
:func:`ksbopt.steer` after it, they move each scale group along its orbit (never changing the
loss) so that its norm, and with it the effective learning rate of its direction
(:ref:`P2 <p2>`), is the one that SGD + weight decay on a normalised layer would give.

They keep per-group state (an EMA, a simulated trajectory) in ``SteerState.target_state``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ksbopt._src import checks, theory
from ksbopt._src.numerics import safe_div
from ksbopt._src.symmetries import orbit
from ksbopt._src.symmetries.bound import BoundSymmetry
from ksbopt._src.symmetries.declarations import apply_moved
from ksbopt._src.targets.prescribed import Target


def _check(owner: str, learning_rate, weight_decay, momentum, *, positive_decay: bool) -> None:
    checks.check_positive(owner, "learning_rate", learning_rate, example=0.1)
    check_wd = checks.check_positive if positive_decay else checks.check_nonnegative
    check_wd(owner, "weight_decay", weight_decay, example=5e-4)
    checks.check_unit_interval(owner, "momentum", momentum, example=0.9)


def _check_scale(owner: str, bound: BoundSymmetry) -> None:
    if bound.symmetry.kind != "scale":
        raise ValueError(
            f"{owner} applies to Scale symmetries only (supported kinds: ('scale',)); got "
            f"{bound.symmetry!r} of kind {bound.symmetry.kind!r}. Give that symmetry its own "
            "ksbopt.steer with another target (targets.constant, targets.balanced)."
        )


def _tangent(b: BoundSymmetry, w: list, v: list) -> list:
    """``v`` minus its radial part <v, w> w / |w|^2 on the group's leaves."""
    coef = safe_div(b.reduce(w, v), b.norms(w))
    return apply_moved(v, b.expand(w, coef), sign=-1.0)


class EquilibriumState(NamedTuple):
    """Per-group state of :class:`equilibrium`: the EMA of the step per unit learning rate,
    the weight that EMA has accumulated (its debiasing), and the largest rate seen."""

    ema: jax.Array
    weight: jax.Array
    peak: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class equilibrium(Target):
    r"""Jump to, and hold, the rotational equilibrium of heavy ball + weight decay.

    [derived] :ref:`P7a <p7a>` / NLD Eq. 16: in the stationary regime of heavy ball with
    learning rate eta, momentum beta and coupled weight decay lambda, a scale group turns by

    .. math::

        A^* = \sqrt{2 \eta \lambda / (1 + \beta)}

    radians per step (:func:`ksbopt.theory.equilibrium_angular_update`). This target
    puts every group there from the first step on. It measures the tangent part u_perp of
    the base optimizer's step and keeps an EMA (bias-corrected) of
    :math:`m = \lVert w \rVert^2 \lVert u_\perp \rVert^2`, then sets

    .. math::

        \lVert w \rVert^2 = x^* = \sqrt{\hat m} / A^*, \qquad Q^* = x^* / 2 .

    For a base whose step scales like the gradient (SGD, heavy ball:
    :math:`u_\perp \sim 1 / \lVert w \rVert` on a scale-invariant loss) m does not depend on
    the norm, so the angular update
    :math:`\lVert u_\perp \rVert / \lVert w \rVert = \sqrt{m} / x^*` equals A* right after
    the jump, and the charge is the equilibrium of NLD Eq. 16: with
    :math:`u_\perp = \eta v_\perp`,
    :math:`x^{*2} = \eta \lVert \hat v \rVert^2 (1 + \beta) / (2 \lambda)`. For uncorrelated
    minibatch gradients (:math:`\lVert \hat v \rVert^2 = \lVert \hat g \rVert^2 / (1 - \beta^2)`)
    that is the steady state r^4 with the "noise" coefficient, for coherent ones
    (:math:`\lVert \hat v \rVert^2 = \lVert \hat g \rVert^2 / (1 - \beta)^2`) the one with the
    "printed" coefficient (:func:`ksbopt.theory.nld_steady_state_radius4`): the measured step
    picks the right
    one. Measured on a noisy scale-invariant loss with heavy ball (beta = 0.9, norms 1000x
    apart at init): RMS angular update within 4 % of A* for every unit from step 20 on.

    For a base whose step does not scale with the gradient (Adam) the target moves the norm
    by the square root of what is needed at each step, so the angular update approaches A*
    geometrically while the EMA lags behind the norm it changes: measured 0.82 to 0.98 of
    A* after 1500 steps (decay 0.99) for units that start 1000x apart.

    A group with no tangent step yet (or a zero-norm group) keeps its charge.

    **Under a learning-rate schedule** :math:`\eta_t` (a warm-up, a cosine decay) the step is
    measured per unit of the current rate, :math:`m_t = \lVert w \rVert^2
    \lVert u_\perp \rVert^2 / \eta_t^2` (debiased by the weight its EMA has accumulated; a
    step at :math:`\eta_t = 0` measures nothing), and the target is the equilibrium of the
    largest rate seen so far, :math:`\hat\eta_t = \max_{s \le t} \eta_s`:

    .. math::

        x^* = \hat\eta_t \sqrt{\hat m} / A^*(\hat\eta_t)
            = \sqrt{\hat\eta_t \hat m (1 + \beta) / (2 \lambda)} .

    During a warm-up the groups follow the rising equilibrium; during the decay their norms are
    held and the angular update falls in proportion to :math:`\eta_t`. That is what SGD +
    weight decay itself does once the rate decays: a norm relaxes to its equilibrium at a rate
    of order :math:`\eta_t \lambda` per step, which vanishes with the rate. Holding the
    equilibrium of the decayed rate instead would shrink every norm toward 0 at the end of a
    cosine, and a norm that moves in the last steps leaves BatchNorm's running statistics (the
    evaluation-mode normalisation) behind. At a constant rate all of this is the rule above.

    ``follow="rate"`` targets the equilibrium of the current rate instead,
    :math:`x^* = \sqrt{\eta_t \hat m (1 + \beta) / (2 \lambda)}`: the angular update stays
    :math:`A^*(\eta_t) \propto \sqrt{\eta_t}` through the decay, as in the rotational
    optimizers of Kosson et al., and the norms shrink like :math:`\eta_t^{1/4}` (a step at
    :math:`\eta_t = 0` keeps its charge). Only for layers whose evaluation does not depend on
    the norm (LayerNorm, weight normalisation): on a BatchNorm ResNet-1D it ends at chance
    accuracy in evaluation mode while its train loss is fine (see
    :doc:`/when_it_helps`).

    Args:
      learning_rate: eta of the heavy ball whose equilibrium is targeted (> 0): the base
        optimizer's learning rate, a number or an optax schedule (step count -> rate; the count
        is the steer's).
      weight_decay: its lambda (> 0).
      momentum: its beta in [0, 1).
      decay: EMA decay of the measured m, in [0, 1) (0: the last step only).
      follow: under a schedule, whose equilibrium to target: ``"peak"`` (default), the largest
        rate seen so far (norms held during the decay); ``"rate"``, the current one (angular
        update ~ sqrt(eta_t) during the decay; not for BatchNorm). The same at a constant rate.

    Example:
      >>> import optax, ksbopt
      >>> sym = ksbopt.Scale("w", axis=-1)
      >>> tx = optax.chain(optax.sgd(0.1, momentum=0.9),
      ...                  ksbopt.steer(sym, ksbopt.targets.equilibrium(0.1, 5e-4, 0.9)))

      Under a schedule, give the target the base optimizer's schedule:

      >>> lr = optax.warmup_cosine_decay_schedule(0.0, 0.1, 100, 1000)
      >>> target = ksbopt.targets.equilibrium(lr, 5e-4, 0.9)
      >>> tx = optax.chain(optax.sgd(lr, momentum=0.9), ksbopt.steer(sym, target))
      >>> round(float(target.angular_update(lr(100))), 6)  # A* at the peak rate
      0.007255

      On LayerNorm layers the target may follow the decaying rate's equilibrium instead (not
      with BatchNorm, whose running statistics cannot follow the shrinking norms):

      >>> target = ksbopt.targets.equilibrium(lr, 5e-4, 0.9, follow="rate")
      >>> tx = optax.chain(optax.sgd(lr, momentum=0.9), ksbopt.steer(sym, target))

    References:
      Kosson, Messmer, Jaggi, "Rotational Equilibrium: How Weight Decay Balances Learning
      Across Neural Networks", ICML 2024, https://arxiv.org/abs/2305.17212;
      Wan et al., "Spherical Motion Dynamics: Learning Dynamics of Neural Network with
      Normalization, Weight Decay, and SGD", https://arxiv.org/abs/2006.08419;
      Tanaka, Kunin, "Noether's Learning Dynamics", https://arxiv.org/abs/2105.02716
    """

    learning_rate: Any
    weight_decay: Any
    momentum: Any = 0.0
    decay: Any = 0.99
    follow: str = "peak"

    def __post_init__(self):
        owner = "targets.equilibrium"
        # a schedule's values are traced at each step: only a number is checked here
        lr = 1.0 if callable(self.learning_rate) else self.learning_rate
        _check(owner, lr, self.weight_decay, self.momentum, positive_decay=True)
        checks.check_unit_interval(owner, "decay", self.decay, example=0.99)
        if self.follow not in ("peak", "rate"):
            raise ValueError(
                f"{owner}: follow={self.follow!r} is not 'peak' (hold the equilibrium of the "
                "largest rate seen, the default) or 'rate' (follow the current rate's "
                "equilibrium through a decay)."
            )

    def check(self, bound: BoundSymmetry) -> None:
        _check_scale("targets.equilibrium", bound)

    def rate(self, count) -> jax.Array:
        """The learning rate eta_t at step ``count`` (the number, or the schedule's value)."""
        lr = self.learning_rate
        return jnp.asarray(lr(count) if callable(lr) else lr)

    def angular_update(self, learning_rate=None) -> jax.Array:
        """A* = sqrt(2 eta lambda / (1 + beta)), the target angular update per step, at
        ``learning_rate`` (default: the target's own, when it is a number)."""
        lr = self.learning_rate if learning_rate is None else learning_rate
        if callable(lr):
            raise TypeError(
                "targets.equilibrium.angular_update: the learning rate is a schedule; pass the "
                "rate to evaluate it at, e.g. angular_update(schedule(step))."
            )
        return theory.equilibrium_angular_update(lr, self.weight_decay, self.momentum)

    def charge_for(self, bound, charge, initial, count):
        raise TypeError(
            "targets.equilibrium is stateful: steer calls its step method, not charge_for; "
            "use it as ksbopt.steer(symmetries, ksbopt.targets.equilibrium(...))."
        )

    def init_state(self, bound, flat):
        dtype = flat[bound.leaves[0]].dtype
        zero = jnp.zeros((), dtype)
        return EquilibriumState(jnp.zeros(bound.charge_shape, dtype), zero, zero)

    def step(self, bound, state, *, params, updates, charge, initial, count, extra_args):
        del initial, extra_args
        dtype = state.ema.dtype
        eta = self.rate(count).astype(dtype)
        u_t = _tangent(bound, params, updates)
        # |w|^2 |u_perp|^2 / eta^2 per group: the step per unit of the current rate
        m = safe_div(bound.norms(params) * 2 * bound.charge(u_t), eta * eta)
        measured = eta > 0
        decay = jnp.asarray(self.decay, dtype)
        ema = jnp.where(measured, decay * state.ema + (1 - decay) * m, state.ema)
        weight = jnp.where(measured, decay * state.weight + (1 - decay), state.weight)
        peak = jnp.maximum(state.peak, eta)
        m_hat = safe_div(ema, weight)
        ref = peak if self.follow == "peak" else eta  # the rate whose equilibrium is targeted
        a_star = self.angular_update(ref).astype(dtype)
        x_star = safe_div(ref * jnp.sqrt(m_hat), a_star)
        target = jnp.where(x_star > 0, x_star / 2, charge)
        return target, EquilibriumState(ema, weight, peak)


@dataclasses.dataclass(frozen=True, eq=False)
class nld(Target):
    r"""The charge that SGD + weight decay on a normalised layer would have, step by step.

    [derived] :ref:`P1 <p1>` / :ref:`P3 <p3>`: this target simulates, per scale group, the
    squared norm x of a virtual normalised layer trained by heavy ball with coupled weight
    decay and fed the measured gradient. Its gradient is :math:`\tilde g = \hat g / \sqrt{x}` with
    :math:`\hat g = \lVert w\rVert (g - \langle g, u\rangle u)` the gradient at the unit
    direction u; with P the overlap <w, v> and v the heavy-ball buffer (P3),

    .. math::

        P_k = \beta (P_{k-1} - \eta \lVert v_k \rVert^2) + \lambda x_k, \qquad
        \lVert v_{k+1} \rVert^2 = \beta^2 \lVert v_k \rVert^2
        + 2\beta (c_k + \lambda (P_{k-1} - \eta \lVert v_k \rVert^2))
        + \lVert \tilde g_k \rVert^2 + \lambda^2 x_k,

    .. math::

        x_{k+1} = x_k - 2 \eta P_k + \eta^2 \lVert v_{k+1} \rVert^2, \qquad Q^* = x_{k+1} / 2,

    where c_k = <v_k, g~_k> is read from a buffer of the virtual tangent gradients kept in the
    group's own tangent space (transported by projection). At beta = 0 this is exactly P1,
    :math:`x_{k+1} = (1 - \eta \lambda)^2 x_k + \eta^2 \lVert \hat g_k \rVert^2 / x_k`
    (:func:`ksbopt.theory.scale_sgd_step`), whatever the base optimizer. With momentum
    the radial dynamics are P3's exactly and only c_k is approximate; measured on a noisy
    scale-invariant loss (beta = 0.9, 600 steps, norms 1000x apart at init), the steered
    norms of Adam, SGD or heavy ball follow those of heavy ball + weight decay to within 6 %.

    Steering any base optimizer to this target gives it the normalisation-style decay of its
    effective learning rate: the norm grows with the accumulated squared gradients and weight
    decay discounts them (the implicit RMSProp of :ref:`implicit-rmsprop`). The simulation starts
    from :math:`x_0 = \lVert w_0 \rVert^2` at rest.

    It needs the raw loss gradient: pass it as the extra argument ``grad`` (the name optax's
    line searches use), ``tx.update(grads, state, params, grad=grads)``.

    Args:
      learning_rate: eta of the simulated SGD (> 0).
      weight_decay: its lambda (>= 0).
      momentum: its beta in [0, 1).

    Example:
      >>> import jax.numpy as jnp, optax, ksbopt
      >>> sym = ksbopt.Scale("w", axis=-1)
      >>> tx = optax.chain(optax.adam(1e-2), ksbopt.steer(sym, ksbopt.targets.nld(0.1, 1e-2)))
      >>> params = {"w": jnp.array([[3.0], [4.0]])}
      >>> g = {"w": jnp.array([[0.8], [-0.6]])}
      >>> u, _ = tx.update(g, tx.init(params), params, grad=g)
      >>> w = optax.apply_updates(params, u)["w"]
      >>> round(float(jnp.sum(w**2)), 4)  # P1: 0.999**2 * 25 + 0.01 * 25 / 25
      24.96

    References:
      Tanaka, Kunin, "Noether's Learning Dynamics", NeurIPS 2021,
      https://arxiv.org/abs/2105.02716; Kunin et al., "Neural Mechanics", ICLR 2021,
      https://arxiv.org/abs/2012.04728
    """

    learning_rate: Any
    weight_decay: Any = 0.0
    momentum: Any = 0.0

    def __post_init__(self):
        _check(
            "targets.nld",
            self.learning_rate,
            self.weight_decay,
            self.momentum,
            positive_decay=False,
        )

    def check(self, bound: BoundSymmetry) -> None:
        _check_scale("targets.nld", bound)

    def charge_for(self, bound, charge, initial, count):
        raise TypeError(
            "targets.nld is stateful: steer calls its step method, not charge_for; use it "
            "as ksbopt.steer(symmetries, ksbopt.targets.nld(...))."
        )

    def init_state(self, bound, flat):
        x = 2 * bound.charge(flat)
        zero = jnp.zeros_like(x)
        return x, zero, zero, tuple(jnp.zeros_like(flat[i]) for i in bound.leaves)

    def step(self, bound, state, *, params, updates, charge, initial, count, extra_args):
        del updates, charge, initial, count
        if "grad" not in extra_args:
            raise ValueError(
                "targets.nld needs the raw loss gradient as the extra argument grad: call "
                "tx.update(grads, state, params, grad=grads) (got extra arguments "
                f"{sorted(extra_args)})."
            )
        grad = jax.tree.leaves(extra_args["grad"])
        if len(grad) != len(params):
            raise ValueError(
                f"targets.nld: grad has {len(grad)} leaves but the parameters have "
                f"{len(params)}; pass the gradient tree of the parameters, grad=grads."
            )
        eta, lam, beta = self.learning_rate, self.weight_decay, self.momentum
        x, overlap, v_sq, buf = state
        g_t = _tangent(bound, params, orbit.promote(grad))
        r = jnp.sqrt(bound.norms(params))
        g_v = bound.act(g_t, safe_div(r, jnp.sqrt(x)))  # gradient of the virtual layer
        g_v_flat = apply_moved(params, g_v, add=False)
        # tangent part of the virtual momentum, carried to the current tangent space
        m = _tangent(
            bound,
            params,
            apply_moved(params, dict(zip(bound.leaves, buf, strict=True)), add=False),
        )
        corr = bound.reduce(m, g_v_flat)  # <v_k, g_k> per group (only the tangent part counts)
        # |v_{k+1}|^2 of v_{k+1} = beta v_k + g_k + lam w_k, with <w_k, v_k> = P_{k-1} -
        # eta |v_k|^2 (the virtual layer moves along -v); then the charge by P3
        back = overlap - eta * v_sq
        g_sq = 2 * bound.charge(g_v_flat)
        new_v_sq = beta**2 * v_sq + 2 * beta * (corr + lam * back) + g_sq + lam**2 * x
        new_overlap, x_new = theory.heavy_ball_step(x, overlap, v_sq, new_v_sq, eta, beta, lam)
        new_buf = tuple(beta * m[i] + g_v[i] for i in bound.leaves)
        return x_new / 2, (x_new, new_overlap, new_v_sq, new_buf)
