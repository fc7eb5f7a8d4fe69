"""Finding and verifying the symmetries of a loss: :func:`detect` and :func:`verify`.

:func:`detect` reads candidate groups off the computation graph of the loss
(:mod:`ksbopt._src.detection.analyser`), falls back to enumerating candidates from the
parameter tree where the graph cannot be read (:mod:`ksbopt._src.detection.candidates`), and
keeps the candidates that hold numerically on every batch given
(:mod:`ksbopt._src.detection.checker`). :func:`verify` runs the same numerical checks on a
hand-written declaration.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ksbopt._src.detection import candidates as candidates_lib
from ksbopt._src.detection import checker, compiled_loss, report
from ksbopt._src.detection.candidates import Candidate
from ksbopt._src.detection.report import SymmetryCheck, SymmetryReport
from ksbopt._src.symmetries import orbit
from ksbopt._src.symmetries.declarations import Symmetry

__all__ = ["detect", "verify"]


def _check_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating, np.integer)):
        raise TypeError(f"tol={tol!r} must be a positive float, e.g. tol=1e-3.")
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(
            f"tol={tol!r} must be a positive finite float (a relative violation "
            "such as 1e-3 for float32, 1e-8 for float64)."
        )
    return float(tol)


def detect(
    loss_fn: Callable,
    params: Any,
    *batches: Any,
    tol: float = 1e-3,
    has_aux: bool = False,
    enumerate_all: bool = False,
) -> tuple[list[Symmetry], SymmetryReport]:
    r"""Find the symmetries of a loss and verify each one on every batch.

    Candidates come from the computation graph (``jax.make_jaxpr`` of the loss): a linear map
    (``dot_general``, ``conv_general_dilated``) followed by a normalisation gives
    :class:`~ksbopt.Scale` (per unit for BatchNorm, whole layer for LayerNorm / RMSNorm, per
    channel group for GroupNorm, per head with QK-normalisation); a positively homogeneous
    activation (ReLU, leaky ReLU, identity) between two linear maps gives
    :class:`~ksbopt.Rescale`, or :class:`~ksbopt.Linear` (GL(k), per head for attention) when
    nothing nonlinear lies between them; logits feeding softmax / log-softmax / logsumexp and
    linear maps followed by mean-centring give :class:`~ksbopt.Translation`. Where the graph
    cannot be read (an unknown primitive, a loop), candidates are enumerated from the
    parameter tree, and the report says so. Every candidate is then verified on every batch
    (see :class:`SymmetryCheck` for the two numbers): the Lie derivative per group
    [paper: NM] and the finite action,

    .. math::

        \langle \nabla L(\theta), \xi_g(\theta) \rangle = 0, \qquad
        L(\psi(\theta, a)) = L(\theta).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (with ``has_aux=True``:
        ``(scalar, aux)``). For Flax models see :func:`ksbopt.flax.nnx_loss` and
        :func:`ksbopt.flax.linen_loss`.
      params: the parameter tree (dict, ``flax.linen`` params, ``nnx.State``). Integer and
        other non-differentiable leaves are skipped and listed in the report.
      *batches: one or more batches (each passed as ``loss_fn(params, batch)``).
      tol: largest relative violation accepted, for both checks (default 1e-3, for float32;
        exact symmetries measure ~1e-6, approximate ones such as BatchNorm with
        epsilon=1e-5 ~1e-5, broken ones ~1e-1).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      enumerate_all: also enumerate candidates from the parameter tree for every leaf.

    Returns:
      ``(symmetries, report)``: the verified declarations (a list that binds to ``params``
      and can be passed to every ksbopt transform) and a :class:`SymmetryReport`
      (``print(report)`` shows the table).

    Example:
      >>> import jax, jax.numpy as jnp, ksbopt
      >>> def loss_fn(p, batch):
      ...     x, y = batch
      ...     h = jax.nn.relu(x @ p["w1"])
      ...     return jnp.mean((h @ p["w2"] - y) ** 2)
      >>> params = {"w1": jnp.ones((3, 4)) + jnp.arange(12.0).reshape(3, 4) / 10,
      ...           "w2": jnp.ones((4, 2)) / 4}
      >>> batch = (jnp.linspace(-1, 1, 15).reshape(5, 3), jnp.ones((5, 2)))
      >>> syms, report = ksbopt.detect(loss_fn, params, batch)
      >>> syms
      [Rescale(incoming=('w1',), outgoing=('w2',), incoming_axis=-1, outgoing_axis=-2)]

    References:
      Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep
      Learning Dynamics", ICLR 2021, https://arxiv.org/abs/2012.04728
    """
    tol = _check_tol(tol)
    prob = compiled_loss.problem_of(loss_fn, params, batches, has_aux, "detect")
    proposed, notes = candidates_lib.propose(prob, enumerate_all)
    unique, unfit = candidates_lib.bind_unique(proposed, params)
    notes += unfit
    checker.run_checks(unique, prob, batches, tol)
    accepted, rejected = candidates_lib.select(unique, tol, params)
    shown = [c for c in rejected if c.source == "graph" and c.certain]
    quiet = len(rejected) - len(shown)
    if quiet:
        notes.append(
            f"{quiet} other candidate(s) (enumerated, or suggested by an "
            "inconclusive graph) did not hold and were dropped"
        )
    result = SymmetryReport(
        tuple(report.as_check(c, prob.paths, tol) for c in accepted),
        tuple(report.as_check(c, prob.paths, tol) for c in shown),
        tuple(prob.skipped),
        tuple(notes),
        tol,
        len(batches),
    )
    return [c.sym for c in accepted], result


def verify(
    symmetries: Any,
    loss_fn: Callable,
    params: Any,
    *batches: Any,
    tol: float = 1e-3,
    has_aux: bool = False,
) -> SymmetryReport:
    r"""Check that declared symmetries hold for a loss, group by group, on every batch.

    The same two checks as :func:`detect`: the per-group Lie derivative [paper: NM] and the
    finite action, for a in {0.5, 2},

    .. math::

        \frac{|\langle \nabla L, \xi_g \rangle|}{\lVert \nabla L|_g \rVert\,
        \lVert \xi_g \rVert} \le \mathrm{tol}, \qquad
        \frac{|L(\psi(\theta, a)) - L(\theta)|}{|L(\theta)|} \le \mathrm{tol}.

    A declaration that does not bind to ``params`` (no leaf matched, a wrong axis) is
    reported with status ``"invalid"``.

    Args:
      symmetries: a declaration or a list of them.
      loss_fn: ``loss_fn(params, batch) -> scalar`` (``(scalar, aux)`` with ``has_aux``).
      params: the parameter tree.
      *batches: one or more batches.
      tol: largest relative violation accepted (default 1e-3 for float32).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      A :class:`SymmetryReport`: ``report.ok`` is True when every declaration holds;
      ``report.failures`` lists the others, each with the groups that fail.

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> loss_fn = lambda p, x: jnp.sum(jnp.tanh(x @ p["w"]) ** 2)
      >>> params = {"w": jnp.array([[1.0, -0.5], [0.3, 0.8]])}
      >>> report = ksbopt.verify(ksbopt.Scale("w", axis=-1), loss_fn, params, jnp.eye(2))
      >>> report.ok, report.failures[0].bad_groups
      (False, ('w[:, 0]', 'w[:, 1]'))

    References:
      Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep
      Learning Dynamics", ICLR 2021, https://arxiv.org/abs/2012.04728
    """
    tol = _check_tol(tol)
    syms = orbit.as_symmetries(symmetries)
    prob = compiled_loss.problem_of(loss_fn, params, batches, has_aux, "verify")
    cands: list[Candidate] = []
    invalid: list[SymmetryCheck] = []
    floats = set(prob.float_idx)
    for s in syms:
        c = Candidate(s, "declared")
        try:
            c.bind(params)
        except (ValueError, TypeError) as exc:
            invalid.append(report.invalid(s, str(exc)))
            continue
        not_float = [prob.paths[i] for i in c.bound.leaves if i not in floats]
        if not_float:
            paths = tuple(prob.paths[i] for i in c.bound.leaves)
            why = f"acts on non-differentiable leaves {not_float}"
            invalid.append(report.invalid(s, why, paths, c.bound.n_groups))
            continue
        cands.append(c)
    checker.run_checks(cands, prob, batches, tol, every=True)
    checks = [report.as_check(c, prob.paths, tol) for c in cands]
    order = {s: k for k, s in enumerate(syms)}
    allc = sorted(checks + invalid, key=lambda c: order[c.symmetry])
    return SymmetryReport(tuple(allc), (), tuple(prob.skipped), (), tol, len(batches))
