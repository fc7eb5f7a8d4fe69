"""What the exact recursions predict: which apply (:class:`Plan`) and one step of each.

Per declared symmetry, :func:`plan_for` decides from the dynamics which recursion predicts
its charge (P1, P3, P4, P10: :ref:`exact-identities`) and whether the metric-weighted charge
of RMSProp/Adam (:ref:`P6 <p6>`) or the equilibrium (:ref:`equilibrium`) applies;
:func:`advance` runs one step of the recursions (the cheap part, at every step) and
:class:`Metric` the metric-weighted charges.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from ksbopt._src import theory
from ksbopt._src.diagnostics import dynamics as dynamics_lib
from ksbopt._src.diagnostics.fused_sums import (
    Flat,
    Sums,
    group_dtype,
    group_inner,
    map_leaves,
    on_leaves,
)
from ksbopt._src.diagnostics.monitor_state import RecursionState
from ksbopt._src.numerics import all_finite_values, safe_div
from ksbopt._src.symmetries.declarations import BoundSymmetry

if TYPE_CHECKING:
    from ksbopt._src.diagnostics.monitor_step import StepContext


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which quantities apply to one symmetry under the given dynamics (static)."""

    kind: str
    recursion: str | None  # "sgd" | "hb" | "hbd" | "shift" | "shift_hb" | None
    metric: str | None  # "rmsprop" | "adam" | None
    equilibrium: bool
    effective_lr: bool


def plan_for(b: BoundSymmetry, dyn: dynamics_lib.Dynamics | None, lr_known: bool) -> Plan:
    kind = b.symmetry.kind
    recursion = metric = None
    equilibrium = False
    if dyn is not None and dyn.kind == "sgd":
        mom, wd = dyn.has_momentum, dyn.has_weight_decay
        if kind == "translation":
            if not mom or not wd or dyn.decoupled:
                recursion = "shift"  # P4: (1 - eta lam) s, or conserved
            elif not dyn.nesterov:
                recursion = "shift_hb"
        elif not mom:
            recursion = "sgd"  # P1 / P10
        elif not dyn.nesterov:
            recursion = "hbd" if dyn.decoupled else "hb"  # P3
        equilibrium = kind == "scale" and wd and not dyn.nesterov and (not mom or not dyn.decoupled)
    elif dyn is not None and dyn.adaptive:
        if kind != "linear" and (dyn.decoupled or not dyn.has_weight_decay):
            metric = dyn.kind
    return Plan(kind, recursion, metric, equilibrium, kind == "scale" and lr_known)


def with_recursion(values: Sequence, plans: Sequence[Plan], fn) -> tuple:
    """``fn(value, plan)`` for symmetries with a recursion, None for the others."""
    return tuple(fn(v, p) if p.recursion else None for v, p in zip(values, plans, strict=True))


def residual(b: BoundSymmetry, observed, predicted, scale) -> jax.Array:
    diff = observed - predicted
    if b.symmetry.kind == "linear":
        diff = jnp.max(jnp.abs(diff), axis=(-2, -1))
    return safe_div(diff, scale)


def linear_grads(b: BoundSymmetry, g: Flat) -> tuple[jax.Array, jax.Array]:
    """G_A (heads, d, k) and G_B (heads, k, o) of a Linear symmetry, for theory P10."""
    left = [p.to_matrix(g[p.leaf]) for p in b.parts if p.left]
    right = [p.to_matrix(g[p.leaf]) for p in b.parts if not p.left]
    return jnp.concatenate(left, axis=1), jnp.concatenate(right, axis=2)


def advance_requests(ctx: StepContext) -> dict:
    """Products the exact recursions read at every step (scale and rescale groups)."""
    out = {}
    for i, plan in enumerate(ctx.plans):
        if plan.kind in ("scale", "rescale"):
            if plan.recursion == "sgd":
                out[i] = ("gg",)
            elif plan.recursion in ("hb", "hbd"):
                out[i] = ("vv",)
    return out


def advance(ctx: StepContext, rec: RecursionState, sums: Sums) -> tuple[RecursionState, jax.Array]:
    """One step of every exact recursion (the cheap part: runs at every step)."""
    dyn = ctx.dyn
    out = {name: list(getattr(rec, name)) for name in RecursionState._fields}
    checks = []
    for i, (b, plan) in enumerate(zip(ctx.binding.bound, ctx.plans, strict=True)):
        if plan.recursion is None:
            continue
        dtype = group_dtype(b, ctx.w)
        lr = ctx.lr_as(dtype)
        lr_prev = rec.learning_rate_carry[i]
        wd, mom = dyn.weight_decay, dyn.momentum
        q = rec.predicted_carry[i]
        if plan.recursion == "sgd":
            if plan.kind == "linear":
                ga, gb = linear_grads(b, ctx.g)
                new = theory.linear_sgd_step(q, ga, gb, lr, wd)  # [derived] P10
            else:
                new = theory.scale_sgd_step(q, sums.quadratic(i, "g"), lr, wd)  # P1
            checks.append(jnp.sum(new))  # a non-finite gradient skips the step
        elif plan.recursion in ("hb", "hbd"):
            qv = sums.quadratic(i, "v")
            checks.append(jnp.sum(qv))
            ratio = safe_div(lr_prev, lr)  # carried norms refer to last step's eta
            if plan.recursion == "hb":  # [derived] P3, coupled weight decay
                overlap, new = theory.heavy_ball_step(
                    q, rec.overlap_carry[i], rec.velocity_carry[i] * ratio, qv, lr, mom, wd
                )
            else:  # [derived] P3, decoupled weight decay
                carried = rec.overlap_carry[i] * safe_div(1 - lr_prev * wd, 1 - lr * wd)
                overlap, new = theory.heavy_ball_decoupled_step(
                    q, carried, rec.velocity_carry[i] * ratio, qv, lr, mom, wd
                )
            out["overlap_carry"][i] = overlap
            out["velocity_carry"][i] = qv
        elif plan.recursion == "shift":
            new = theory.translation_sgd_step(q, lr, wd)  # [derived from NM] P4
        else:  # "shift_hb": P4 heavy ball, previous charge rescaled to this step's eta
            prev = q + safe_div(lr, lr_prev) * (rec.previous_carry[i] - q)
            new = theory.translation_heavy_ball_step(q, prev, lr, mom, wd)
            out["previous_carry"][i] = q
        out["predicted_carry"][i] = new.astype(dtype)
        out["learning_rate_carry"][i] = lr
    ok = all_finite_values(checks)
    return RecursionState(**{k: tuple(v) for k, v in out.items()}), ok


class Metric:
    """The diagonal metric P of an RMSProp/Adam step, read from the wrapped state."""

    def __init__(self, ctx: StepContext):
        self.ctx = ctx
        self.nu = ctx.buffer("nu")
        self.to_metric = ctx.dyn.preconditioner(ctx.inner_new)
        self._p: dict[int, jax.Array] = {}
        self.mu_old = self.mu_new = None
        if ctx.dyn.kind == "adam":
            self.mu_old = ctx.buffer("mu", old=True)
            self.mu_new = ctx.buffer("mu")
            self.count = ctx.dyn.adam_count(ctx.inner_new)

    def p(self, leaf: int) -> jax.Array:
        if leaf not in self._p:
            self._p[leaf] = self.to_metric(self.nu[leaf])
        return self._p[leaf]

    def charges(self, i: int, b: BoundSymmetry, plan: Plan, lr):
        ctx = self.ctx
        w, u, g = ctx.w, ctx.u, ctx.g
        dyn = ctx.dyn
        wd = dyn.weight_decay if dyn.decoupled else 0.0
        new_w = map_leaves(b, jnp.add, w, u)
        if plan.kind == "translation":
            scaled = lambda x: on_leaves(x, {j: self.p(j) * x[j] for j in b.leaves})
            m0, m1 = b.charge(scaled(w)), b.charge(scaled(new_w))
            pred = theory.translation_sgd_step(m0, lr, wd)  # [derived] P6: <P 1, u> = -a <P 1, w>
            pw = scaled(w)
            return m0, m1, pred, jnp.sqrt(b.norms(w) * group_inner(b, pw, pw))
        root = lambda x: on_leaves(x, {j: jnp.sqrt(self.p(j)) * x[j] for j in b.leaves})
        m0, m1 = b.charge(root(w)), b.charge(root(new_w))
        whiten = lambda x: on_leaves(x, {j: x[j] / jnp.sqrt(self.p(j)) for j in b.leaves})
        if plan.metric == "rmsprop":
            # [derived] P6 = P1 in the coordinates P^(1/2) w: SGD with gradient P^(-1/2) g.
            pred = theory.scale_sgd_step(m0, b.quadratic(whiten(g)), lr, wd)
        else:
            pred = theory.adam_metric_charge_step(
                m0,
                b.reduce(w, self.mu_old),
                b.quadratic(whiten(self.mu_new)),
                lr,
                dyn.momentum,
                wd,
                self.count,
            )
        scale = m1 if plan.kind == "scale" else 0.5 * b.norms(root(w))
        return m0, m1, pred, scale
