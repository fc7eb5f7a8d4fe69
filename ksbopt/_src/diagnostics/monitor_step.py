"""One recorded step of :func:`ksbopt.monitor`: charges, decomposition, violation, angles.

:class:`StepContext` holds what one step reads; :func:`diagnose` computes the expensive
diagnostics of :class:`~ksbopt._src.diagnostics.monitor_state.NoetherDiagnostics` from the
per-group sums (:mod:`~ksbopt._src.diagnostics.fused_sums`) and the recursions' predictions
(:mod:`~ksbopt._src.diagnostics.predictions`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ksbopt._src import theory
from ksbopt._src.diagnostics import dynamics as dynamics_lib
from ksbopt._src.diagnostics.fused_sums import DIAGNOSE_PRODUCTS, Flat, Sums, group_dtype
from ksbopt._src.diagnostics.monitor_state import NoetherDiagnostics, RecursionState
from ksbopt._src.diagnostics.predictions import Metric, residual
from ksbopt._src.numerics import safe_div
from ksbopt._src.symmetries import orbit


@dataclasses.dataclass
class StepContext:
    """Everything one step of the monitor reads (leaves promoted to the compute dtype)."""

    binding: orbit.Binding
    plans: list
    dyn: dynamics_lib.Dynamics | None
    w: Flat
    g: Flat
    u: Flat
    inner_old: Any
    inner_new: Any
    lr: Any

    def lr_as(self, dtype):
        return jnp.asarray(self.lr, dtype)

    @property
    def weight_decay(self):
        return 0.0 if self.dyn is None else self.dyn.weight_decay

    def buffer(self, key: str, *, old: bool = False) -> Flat:
        state = self.inner_old if old else self.inner_new
        return orbit.promote(jax.tree.leaves(optax.tree.get(state, key)))

    def sums(self, requests: dict) -> Sums:
        """Per-group sums of the products in ``requests`` (symmetry index -> names)."""
        vectors = {"w": self.w, "u": self.u, "g": self.g}
        if any("v" in name for names in requests.values() for name in names):
            vectors["v"] = self.buffer("trace")
        return Sums(self.binding, vectors, requests)


def diagnose_requests(ctx: StepContext) -> dict:
    """Products the expensive diagnostics read."""
    return {i: DIAGNOSE_PRODUCTS[b.symmetry.kind] for i, b in enumerate(ctx.binding.bound)}


_METRIC_FIELDS = (
    "metric_charges_before",
    "metric_charges",
    "predicted_metric_charges",
    "metric_prediction_error",
)


def diagnose(
    ctx: StepContext, rec: RecursionState, step: jax.Array, sums: Sums
) -> NoetherDiagnostics:
    """The expensive part: charges, decomposition, violation, angles, metric identities."""
    fields = {name: [] for name in NoetherDiagnostics._fields if name != "step"}
    metric = Metric(ctx) if any(p.metric for p in ctx.plans) else None
    for i in range(len(ctx.plans)):
        for name, value in _diagnose_symmetry(ctx, rec, sums, metric, i).items():
            fields[name].append(value)
    return NoetherDiagnostics(
        step=jnp.asarray(step, jnp.int32), **{k: tuple(v) for k, v in fields.items()}
    )


def _diagnose_symmetry(ctx: StepContext, rec: RecursionState, sums: Sums, metric, i: int) -> dict:
    """Every field of :class:`NoetherDiagnostics` for symmetry ``i`` (None where it does not
    apply)."""
    b, plan = ctx.binding.bound[i], ctx.plans[i]
    dtype = group_dtype(b, ctx.w)
    kind = plan.kind
    q0 = sums.charge(i, "w")
    first = sums.reduce(i, "w", "u")
    if kind == "linear":
        first = first + jnp.swapaxes(first, -1, -2)
    second = sums.quadratic(i, "u")
    q1 = q0 + first + second
    out = {"charges_before": q0, "charges": q1, "first_order": first, "second_order": second}
    out["violation"] = _violation(ctx, sums, i)
    ww, geometry = _step_geometry(sums, i, kind, q0, first, second)
    out.update(geometry)

    lr = None if ctx.lr is None else ctx.lr_as(dtype)
    sgd_wd = ctx.weight_decay if ctx.dyn is not None and ctx.dyn.kind == "sgd" else 0.0
    out["effective_learning_rate"] = (
        theory.effective_learning_rate(2 * q0, lr, sgd_wd) if plan.effective_lr else None
    )
    out["weight_decay_term"] = None
    if ctx.dyn is not None:
        keep = 1 - lr * ctx.weight_decay
        out["weight_decay_term"] = (keep - 1) * q0 if kind == "translation" else (keep**2 - 1) * q0

    out["predicted_charges"] = out["prediction_error"] = None
    if plan.recursion is not None:
        pred = rec.predicted_carry[i]
        scale = {
            "scale": q0,
            "rescale": 0.5 * ww,
            "translation": jnp.sqrt(sums.norms(i, "w") * ww),
            "linear": ww,
        }[kind]
        out["predicted_charges"] = pred
        out["prediction_error"] = residual(b, q1, pred, scale)

    out.update(dict.fromkeys(_METRIC_FIELDS))
    if plan.metric is not None:
        m0, m1, mpred, mscale = metric.charges(i, b, plan, lr)
        out.update(zip(_METRIC_FIELDS, (m0, m1, mpred, residual(b, m1, mpred, mscale))))

    out["equilibrium_angular_update"] = (
        theory.equilibrium_angular_update(lr, ctx.weight_decay, ctx.dyn.momentum).astype(dtype)
        if plan.equilibrium
        else None
    )
    return out


def _violation(ctx: StepContext, sums: Sums, i: int) -> jax.Array:
    """Symmetry violation of the gradient: ``<xi, g> / (|xi| |g|)`` per group (for Linear,
    the norm of the gradient's projection on the generators relative to ``|g|``)."""
    b = ctx.binding.bound[i]
    kind = b.symmetry.kind
    r = sums.reduce(i, "w", "g")
    gg = sums.inner(i, "g", "g") if kind == "translation" else sums.norms(i, "g")
    if kind == "linear":
        proj = jnp.sum(b.solve_gram(ctx.w, r) * r, axis=(-2, -1))
        return jnp.sqrt(safe_div(jnp.maximum(proj, 0), gg))
    return safe_div(r, jnp.sqrt(sums.norms(i, "w") * gg))


def _step_geometry(sums: Sums, i: int, kind: str, q0, first, second) -> tuple[jax.Array, dict]:
    """``|w|^2`` per group and the angle and relative size of the step (unsigned inner
    products)."""
    if kind == "scale":
        ww, uu, wu = 2 * q0, 2 * second, first
    elif kind == "translation":
        ww, uu, wu = sums.inner(i, "w", "w"), sums.inner(i, "u", "u"), sums.inner(i, "w", "u")
    else:
        ww, uu, wu = sums.norms(i, "w"), sums.norms(i, "u"), sums.inner(i, "w", "u")
    cross = jnp.sqrt(jnp.maximum(ww * uu - wu * wu, 0))
    return ww, {
        "angular_update": jnp.arctan2(cross, ww + wu),
        "relative_update": jnp.sqrt(safe_div(uu, ww)),
    }
