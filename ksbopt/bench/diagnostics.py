"""The symmetry diagnostics a run records: charges at every evaluation, angular updates per step.

At each evaluation, per declared symmetry whose charges ``ksbopt.charges`` computes: the mean
charge over its groups (a ``linear`` symmetry: the Frobenius norm of its charge matrices) and,
for a scale symmetry, the mean of 1 / |w|^2 (the record turns it into the effective learning
rate lr / |w|^2, :ref:`P2 <p2>`). Per step, the angle each unit turned. The record keeps these
curves and their :func:`summary`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ksbopt.bench import registry

__all__ = ["angular_updates", "at_evaluation", "finite_or_none", "summary"]


def finite_or_none(x):
    """``x`` as a float, None where it is missing or not finite (how records store values)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def angular_updates(syms, params, updates, new_params) -> jax.Array:
    """Mean over groups of the angle (radians) each unit turned in this step, per symmetry.

    From three charges (1/2 |.|^2 per group) of ``ksbopt.charges``: with q_w, q_u, q_n those
    of w, u and w + u, <w, u> = q_n - q_w - q_u, |u_perp|^2 = 2 q_u - <w, u>^2 / (2 q_w) and
    the angle is atan2(|u_perp|, |w| + <w, u> / |w|) (no arccos: exact for small angles).
    """
    if not syms:
        return jnp.zeros((0,), jnp.float32)
    charges = registry.ksbopt_feature("charges")
    out = []
    for sym in syms:
        (q_w,) = charges(params, [sym])
        (q_u,) = charges(updates, [sym])
        (q_n,) = charges(new_params, [sym])
        q_w, q_u, q_n = (jnp.asarray(q, jnp.float32) for q in (q_w, q_u, q_n))
        pos = q_w > 0
        safe = jnp.where(pos, q_w, 1.0)
        wu = q_n - q_w - q_u
        perp = jnp.sqrt(jnp.maximum(2 * q_u - wu**2 / (2 * safe), 0.0))
        norm = jnp.sqrt(2 * safe)
        angle = jnp.where(pos, jnp.arctan2(perp, norm + wu / norm), 0.0)
        out.append(jnp.mean(angle))
    return jnp.stack(out)


def at_evaluation(decls, charges, params) -> dict:
    """``{"diag": {label: {quantity: value}}, "param_norm": ...}`` of ``params``, for the
    ``(declaration, symmetry)`` pairs ``decls`` (a pure JAX function, compiled by the caller)."""
    diag = {}
    for d, sym in decls:
        (q,) = charges(params, [sym])
        q = jnp.asarray(q, jnp.float32)
        if d.kind == "linear":
            diag[d.label] = {"charge_fro": jnp.sqrt(jnp.sum(q**2))}
        else:
            diag[d.label] = {"charge": jnp.mean(q)}
        if d.kind == "scale":  # P2: eta_eff = eta / |w|^2 = eta / (2 Q), per group
            diag[d.label]["inv_sqnorm"] = jnp.mean(
                jnp.where(q > 0, 1.0 / jnp.where(q > 0, 2 * q, 1.0), 0.0)
            )
    return {"diag": diag, "param_norm": optax.tree.norm(params)}


def summary(curves: dict[str, dict[str, list]]) -> dict:
    """Per symmetry and quantity: the first and last recorded value and the mean over time.

    Quantities: ``charge`` (mean over groups of the Noether charge), ``eff_lr`` (lr / |w|^2,
    :ref:`P2 <p2>`), ``angular_update`` (radians per step, mean over a chunk of steps).
    """
    out: dict[str, dict] = {}
    for label, qs in curves.items():
        for q, vals in qs.items():
            v = [x for x in vals if x is not None]
            if v:
                out.setdefault(label, {})[q] = {
                    "first": v[0],
                    "last": v[-1],
                    "mean": float(np.mean(v)),
                }
    return out
