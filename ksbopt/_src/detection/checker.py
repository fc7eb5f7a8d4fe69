"""The numerical checks of candidate symmetries, per batch [paper: NM, :ref:`symmetries`].

- **Lie derivative**, per group: a symmetry's generator xi is orthogonal to every minibatch
  gradient, <grad L, xi> = 0. The violation of group g is the cosine
  |<g, xi_g>| / (|g restricted to the group| |xi_g|) (for GL(k): the Frobenius norm of
  A^T G_A - G_B B^T over the same product). One gradient evaluation per batch serves every
  group of every candidate. Where |g_g| |xi_g| <= 64 eps |L| (eps of the compute dtype) the
  gradient is rounding noise and the violation is 0: e.g. a loss that is constant in the
  group's parameters.
- **Finite action**: L(psi(theta, a)) = L(theta) for group elements a in {0.5, 2} (scale,
  rescale; alternating over the groups so that groups are moved independently), shifts of
  0.5 and 2 (translation) and G = a (I + N / 4 |N|) (linear). All candidates are applied
  at once (a composition of symmetries is a symmetry); a set whose composed action fails is
  halved until each part passes or is one candidate. The violation is
  |L(psi) - L| / max(|L|, tiny).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ksbopt._src import groups as groups_lib
from ksbopt._src import numerics
from ksbopt._src.detection import compiled_loss
from ksbopt._src.detection.candidates import Candidate
from ksbopt._src.detection.compiled_loss import Problem
from ksbopt._src.symmetries.declarations import BoundSymmetry

_PATTERNS = (0, 1)  # the two finite-action patterns: a_g = 0.5 / 2 alternating over groups
_FACTORS = (0.5, 2.0)


def _group_sq(b: BoundSymmetry, flat_g: list) -> jax.Array:
    """|g restricted to each group|^2."""
    if b.symmetry.kind == "translation":
        return groups_lib.scatter_groups(
            b.parts, [p.reduce(jnp.square(flat_g[p.leaf])) for p in b.parts], b.n_groups
        )
    return b.norms(flat_g)


def _lie(b: BoundSymmetry, flat: list, flat_g: list, floor: jax.Array) -> jax.Array:
    """Per-group cosine between the gradient and the generator; 0 where the product of
    their norms is at or below ``floor`` (the gradient is rounding noise there)."""
    r = b.reduce(flat, flat_g)
    if b.symmetry.kind == "linear":
        num = jnp.sqrt(jnp.sum(jnp.square(r), axis=(-2, -1)))
    else:
        num = jnp.abs(r)
    den = jnp.sqrt(_group_sq(b, flat_g) * b.norms(flat))
    return jnp.where(den > floor, num / jnp.where(den > floor, den, 1), 0)


def _coefs(b: BoundSymmetry, pattern: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Group elements of one finite-action pattern (and their inverses for GL(k))."""
    n = b.n_groups
    alt = np.where((np.arange(n) + pattern) % 2 == 0, _FACTORS[0], _FACTORS[1])
    if b.symmetry.kind == "linear":
        k = b.charge_shape[-1]
        noise = np.random.default_rng(1234 + pattern).standard_normal((n, k, k))
        noise /= np.linalg.norm(noise, ord=2, axis=(1, 2), keepdims=True)
        g = alt[:, None, None] * (np.eye(k) + 0.25 * noise)
        return g, np.linalg.inv(g)
    return alt, None


def _identity(b: BoundSymmetry) -> np.ndarray:
    if b.symmetry.kind == "linear":
        return np.broadcast_to(np.eye(b.charge_shape[-1]), b.charge_shape)
    if b.symmetry.kind == "translation":
        return np.zeros((b.n_groups,))
    return np.ones((b.n_groups,))


def _act(b: BoundSymmetry, flat: list, coef: jax.Array, inverse: jax.Array | None) -> dict:
    """The group action, with a precomputed inverse for GL(k) (no matrix inverse to compile)."""
    pair = getattr(b, "_act_pair", None)
    if inverse is not None and pair is not None:
        return pair(flat, coef, inverse)
    return b.act(flat, coef)


class _Checker:
    """Gradient, Lie derivatives and finite actions for a set of candidates.

    The model is compiled once per loss function (value and gradient), and reused by later
    calls with the same ``loss_fn``; the per-candidate arithmetic (Lie derivatives, group
    actions) is a separate, small compiled function.
    """

    def __init__(self, prob: Problem, bounds: Sequence[BoundSymmetry]):
        self.prob = prob
        self.bounds = list(bounds)
        dtypes = [jnp.result_type(x) for x in prob.float_leaves]
        work = [numerics.compute_dtype(d) for d in dtypes]
        pos = {i: k for k, i in enumerate(prob.float_idx)}
        n_leaves = len(prob.leaves)

        def full(float_leaves):
            out = [jnp.zeros((), jnp.float32)] * n_leaves
            for i, x, w in zip(prob.float_idx, float_leaves, work, strict=False):
                out[i] = x.astype(w)
            return out

        def leaf_dtype(b):
            return next((work[pos[i]] for i in b.leaves if i in pos), jnp.float32)

        def aux(float_leaves, grads, active, floor):
            flat, flat_g = full(float_leaves), full(grads)
            lie = [_lie(b, flat, flat_g, floor) for b in self.bounds]
            moved = []
            for coefs in self.coefs:
                cur = list(flat)
                for b, (c, c_inv), on, ident in zip(
                    self.bounds, coefs, active, self.idents, strict=False
                ):
                    dt = leaf_dtype(b)
                    c = jnp.where(on, jnp.asarray(c, dt), jnp.asarray(ident, dt))
                    if c_inv is not None:
                        c_inv = jnp.where(on, jnp.asarray(c_inv, dt), jnp.asarray(ident, dt))
                    for i, v in _act(b, cur, c, c_inv).items():
                        cur[i] = v
                moved.append(
                    [cur[i].astype(d) for i, d in zip(prob.float_idx, dtypes, strict=False)]
                )
            return lie, moved

        # Rounding floor of the Lie check: a loss L computed in precision eps has gradient
        # noise with |g_group| |xi_group| of a few eps |L| (measured: 1-8 eps |L| on a
        # LayerNorm layer whose loss is constant, 5x8 to 512x512); below 64 eps |L| the
        # cosine is noise and is reported as 0. A true violation that small would change
        # the loss under the finite action (a in {0.5, 2}) by less than 64 eps ln 2, far
        # below any tolerance, so the check stays sound.
        self.noise = 64 * max((float(jnp.finfo(w).eps) for w in work), default=0.0)
        self.idents = [_identity(b) for b in self.bounds]
        self.coefs = [[_coefs(b, p) for b in self.bounds] for p in _PATTERNS]
        self._aux = jax.jit(aux, compiler_options=compiled_loss.options(False))
        self._aux_compiled = None  # set by warm_gradient: the same program, compiled ahead

    def gradient(self, batch) -> tuple[float, list]:
        """The loss and its gradient on one batch (the one gradient evaluation per batch)."""
        p = self.prob
        loss, grads = compiled_loss.value_and_grad(p.float_leaves, p.array_leaves, batch, p.spec)
        return float(loss), grads

    def check(
        self, batch, loss0: float, grads, active: Sequence[bool] | None = None, action: bool = True
    ):
        """Per-group Lie violations, and (with ``action``) the largest relative loss change
        under the actions of the ``active`` candidates (all when None)."""
        lie, moved = self.lie_and_moved(loss0, grads, active)
        return lie, self.actions(batch, loss0, moved) if action else 0.0

    def lie_and_moved(self, loss0: float, grads, active: Sequence[bool] | None = None):
        """Per-group Lie violations of every candidate, and the parameters moved by the
        actions of the ``active`` ones (one set per finite-action pattern)."""
        p = self.prob
        active = [True] * len(self.bounds) if active is None else list(active)
        floor = jnp.asarray(self.noise * abs(loss0), jnp.float32)
        args = (p.float_leaves, grads, [jnp.asarray(a) for a in active], floor)
        try:
            lie, moved = (self._aux_compiled or self._aux)(*args)
        except TypeError:  # avals other than the ones compiled for (e.g. weak types)
            lie, moved = self._aux(*args)
        return [np.asarray(v) for v in lie], moved

    def actions(self, batch, loss0: float, moved) -> float:
        """The largest relative change of the loss over the moved parameter sets."""
        p = self.prob
        worst = 0.0
        tiny = float(np.finfo(np.float32).tiny) ** 0.5
        for leaves in moved:
            value = float(compiled_loss.loss_value(leaves, p.array_leaves, batch, p.spec))
            rel = abs(value - loss0) / max(abs(loss0), tiny)
            worst = max(worst, rel if np.isfinite(rel) else np.inf)
        return worst

    def _compile_aux(self, float_leaves, active) -> None:
        # The gradient has the avals of the parameters: compile for those, without running.
        floor = jnp.zeros((), jnp.float32)
        self._aux_compiled = self._aux.lower(float_leaves, float_leaves, active, floor).compile()

    def warm_gradient(self, batch) -> tuple[float, list]:
        """``gradient(batch)``, compiling the other functions meanwhile on other threads (XLA
        compiles with the GIL released: on two cores the compiles overlap)."""
        p = self.prob
        x64 = bool(jax.config.jax_enable_x64)  # configuration is per thread: pass it on

        def run(fn, *args):
            with jax.enable_x64(x64):
                return jax.block_until_ready(fn(*args))

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            active = [jnp.asarray(True)] * len(self.bounds)
            jobs = [pool.submit(run, self._compile_aux, p.float_leaves, active)]
            if compiled_loss.is_large(p.float_leaves):  # compiled only: the actions run it later
                jobs.append(
                    pool.submit(
                        run,
                        compiled_loss.compile_loss_value,
                        p.float_leaves,
                        p.array_leaves,
                        batch,
                        p.spec,
                    )
                )
            result = self.gradient(batch)
            for job in jobs:
                job.result()
        return result


def _group_names(b: BoundSymmetry, bad: np.ndarray) -> tuple[str, ...]:
    out = []
    for g in np.flatnonzero(bad):
        g = int(g)
        if b.symmetry.kind == "linear":
            out.append(f"head {g}")
            continue
        part = next((p for p in b.parts if p.offset <= g < p.offset + p.size), b.parts[0])
        idx = (
            np.unravel_index(g - part.offset, [part.shape[a] for a in part.group_axes])
            if part.group_axes
            else ()
        )
        sub = [":"] * len(part.shape)
        for a, i in zip(part.group_axes, idx, strict=False):
            sub[a] = str(int(i))
        out.append(f"{part.path}[{', '.join(sub)}]" if part.group_axes else part.path)
    return tuple(out)


def run_checks(
    cands: list[Candidate], prob: Problem, batches: tuple, tol: float, every: bool = False
) -> None:
    """Fill ``lie``, ``action`` and ``bad`` of every bound candidate.

    Per batch: one gradient (all Lie derivatives), then the actions of all candidates whose
    Lie derivatives pass, applied together (:func:`_settle_actions`: a set whose composed
    action changes the loss is halved until each part passes or is one candidate). With
    ``every``, candidates whose Lie derivative fails get their own action measured too
    (else their action is NaN).
    """
    live = [c for c in cands if c.bound is not None]
    if not live:
        return
    checker = _Checker(prob, [c.bound for c in live])
    for n, batch in enumerate(batches):
        loss0, grads = checker.warm_gradient(batch) if n == 0 else checker.gradient(batch)
        lie, moved = checker.lie_and_moved(loss0, grads)  # every candidate moved
        for c, v in zip(live, lie, strict=True):
            v = np.where(np.isfinite(v), v, np.inf)
            c.lie = max(c.lie, float(np.max(v)) if v.size else 0.0)
            bad = v > tol
            if np.any(bad):
                c.bad = tuple(dict.fromkeys(c.bad + _group_names(c.bound, bad)))
        passing = [j for j, c in enumerate(live) if c.lie <= tol]
        failing = [j for j, c in enumerate(live) if not c.lie <= tol]
        every_moved = moved if not failing else None
        _settle_actions(checker, live, passing, batch, loss0, grads, tol, every_moved)
        for j in failing:
            if every:  # measured alone
                mask = [i == j for i in range(len(live))]
                live[j].action = max(live[j].action, checker.check(batch, loss0, grads, mask)[1])
            else:
                live[j].action = np.nan  # not measured: its Lie derivative already fails


def _settle_actions(
    checker: _Checker,
    live: list[Candidate],
    members: list[int],
    batch,
    loss0: float,
    grads,
    tol: float,
    moved=None,
) -> None:
    """Record, for each candidate in ``members``, the finite-action violation of the first
    set of the halving below that contains it and passes ``tol``, or its own when none does.

    A composition of symmetries is a symmetry, so one evaluation usually settles every
    candidate at once. In float32 the rounding of many composed actions can add up past
    ``tol`` where each one alone stays under it (a pre-LN Transformer: shifting every
    residual branch at once); the set is then halved, recursively, so k failing or
    rounding-heavy candidates out of n cost O(k log n) loss evaluations instead of n.
    A singleton's value is its own action; a passing set's value bounds each member's.
    ``moved`` (optional) is the parameters already moved by exactly ``members``.
    """
    if not members:
        return
    if moved is not None:
        value = checker.actions(batch, loss0, moved)
    else:
        mask = [i in members for i in range(len(live))]
        value = checker.check(batch, loss0, grads, mask)[1]
    if value <= tol or len(members) == 1:
        for j in members:
            live[j].action = max(live[j].action, value)
        return
    half = len(members) // 2
    for part in (members[:half], members[half:]):
        _settle_actions(checker, live, part, batch, loss0, grads, tol)
