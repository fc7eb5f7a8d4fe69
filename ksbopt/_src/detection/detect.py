"""Finding and verifying the symmetries of a loss: :func:`detect` and :func:`verify`.

:func:`detect` reads candidate groups off the computation graph of the loss
(:mod:`ksbopt._src.detection.analyser`), falls back to enumerating candidates from the
parameter tree where the graph cannot be read, and keeps the candidates that hold numerically
on every batch given. :func:`verify` runs the same numerical checks on a hand-written declaration.

Two checks, per batch [paper: NM, :ref:`symmetries`]:

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
  at once (a composition of symmetries is a symmetry); only when that fails is each one
  checked on its own. The violation is |L(psi) - L| / max(|L|, tiny).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from ksbopt._src import groups as groups_lib
from ksbopt._src import numerics
from ksbopt._src.detection import analyser, findings
from ksbopt._src.detection import graph as graph_lib
from ksbopt._src.symmetries import orbit
from ksbopt._src.symmetries.declarations import (
    BoundSymmetry,
    Linear,
    Rescale,
    Scale,
    Symmetry,
    Translation,
)

__all__ = ["SymmetryCheck", "SymmetryReport", "detect", "verify"]

_PATTERNS = (0, 1)  # the two finite-action patterns: a_g = 0.5 / 2 alternating over groups
_FACTORS = (0.5, 2.0)


# --------------------------------------------------------------------------- the report


@dataclasses.dataclass(frozen=True)
class SymmetryCheck:
    r"""The verification of one declaration.

    The two numbers are the worst cases, over groups g, group elements a and batches, of

    .. math::

        \mathrm{lie} = \max \frac{|\langle \nabla L, \xi_g \rangle|}
        {\lVert \nabla L|_g \rVert\, \lVert \xi_g \rVert}, \qquad
        \mathrm{action} = \max \frac{|L(\psi(\theta, a)) - L(\theta)|}{|L(\theta)|},

    both 0 for an exact symmetry (the gradient is orthogonal to every generator [paper: NM]).

    Attributes:
      symmetry: the declaration checked.
      paths: the leaves it acts on.
      n_groups: number of groups (heads for :class:`~ksbopt.Linear`).
      lie: largest per-group ``|<grad L, xi>| / (|grad L| |xi|)`` over groups and batches.
      action: largest ``|L(psi(theta, a)) - L(theta)| / |L(theta)|`` over the actions and
        batches.
      status: ``"exact"``, ``"approximate"`` or ``"violated"`` (``"invalid"`` when the
        declaration does not fit the parameter tree).
      reason: why it holds (e.g. ``"BatchNorm epsilon=1e-05"``) or how it fails.
      source: ``"graph"`` (read off the jaxpr), ``"parameter tree"`` (enumerated) or
        ``"declared"`` (given to :func:`verify`).
      bad_groups: descriptions of the groups whose Lie derivative exceeds the tolerance.
      layout: the leaves as the report's table shows them (e.g. ``"incoming -> outgoing"``).

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> loss_fn = lambda p, x: jnp.sum((x @ (p["w"] / jnp.linalg.norm(p["w"]))) ** 2)
      >>> params, x = {"w": jnp.array([1.0, 2.0])}, jnp.array([[1.0, 0.0]])
      >>> check = ksbopt.verify(ksbopt.Scale("w", axis=None), loss_fn, params, x).checks[0]
      >>> check.status, check.source, check.paths, check.lie < 1e-5
      ('exact', 'declared', ('w',), True)

    References:
      Kunin et al., "Neural Mechanics: Symmetry and Broken Conservation Laws in Deep
      Learning Dynamics", ICLR 2021, https://arxiv.org/abs/2012.04728
    """

    symmetry: Symmetry | None
    paths: tuple[str, ...]
    n_groups: int
    lie: float
    action: float
    status: str
    reason: str
    source: str
    bad_groups: tuple[str, ...] = ()
    layout: str = ""  # the leaves as the table shows them ("incoming -> outgoing")

    @property
    def holds(self) -> bool:
        return self.status in ("exact", "approximate")


@dataclasses.dataclass(frozen=True)
class SymmetryReport:
    """What :func:`detect` found or :func:`verify` checked; ``print(report)`` shows a table.

    Attributes:
      checks: one :class:`SymmetryCheck` per declaration (detect: the accepted ones).
      rejected: detect only: candidates that failed verification, with their numbers.
      skipped: ``(path, why)`` of leaves that were not analysed (integer, boolean, ...).
      notes: fallbacks and other remarks (an unreadable graph, a group not expressible).
      tol: the tolerance used.
      n_batches: number of batches every check ran on.

    Example:
      >>> import jax.numpy as jnp, ksbopt
      >>> loss_fn = lambda p, x: jnp.sum((x @ (p["w"] / jnp.linalg.norm(p["w"]))) ** 2)
      >>> params, x = {"w": jnp.array([1.0, 2.0])}, jnp.array([[1.0, 0.0]])
      >>> report = ksbopt.verify(ksbopt.Scale("w", axis=None), loss_fn, params, x)
      >>> report.ok, report.symmetries, report.n_batches
      (True, [Scale(selection=('w',), axis=None, groups=None)], 1)

    References:
      None: a record of the checks; :class:`SymmetryCheck` and :func:`detect` cite the
      paper behind them.
    """

    checks: tuple[SymmetryCheck, ...]
    rejected: tuple[SymmetryCheck, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()
    tol: float = 0.0
    n_batches: int = 0

    @property
    def symmetries(self) -> list[Symmetry]:
        """The declarations that hold."""
        return [c.symmetry for c in self.checks if c.holds]

    @property
    def ok(self) -> bool:
        """True when every declaration holds."""
        return all(c.holds for c in self.checks)

    @property
    def failures(self) -> tuple[SymmetryCheck, ...]:
        """The declarations that do not hold."""
        return tuple(c for c in self.checks if not c.holds)

    def __str__(self) -> str:
        head = (
            f"ksbopt symmetry report: {len(self.checks)} declaration(s), "
            f"tol={self.tol:g}, {self.n_batches} batch(es)"
        )
        lines = [head]
        lines += _table(self.checks)
        for c in self.checks:
            if c.bad_groups:
                shown = ", ".join(c.bad_groups[:8]) + (" ..." if len(c.bad_groups) > 8 else "")
                lines.append(f"  {describe(c.symmetry)} fails on: {shown}")
        if self.rejected:
            lines.append(f"rejected candidates ({len(self.rejected)}):")
            lines += ["  " + line for line in _table(self.rejected)]
        if self.skipped:
            lines.append("skipped leaves:")
            lines += [f"  {p}: {why}" for p, why in self.skipped]
        if self.notes:
            lines.append("notes:")
            lines += [f"  - {n}" for n in self.notes]
        return "\n".join(lines)


def describe(sym: Symmetry | None) -> str:
    """A short description of a declaration (its kind and axes)."""
    if sym is None:
        return "-"
    if isinstance(sym, Scale):
        extra = f", groups={sym.groups}" if getattr(sym, "groups", None) else ""
        return f"Scale(axis={sym.axis}{extra})"
    if isinstance(sym, Rescale):
        return f"Rescale(in_axis={sym.incoming_axis}, out_axis={sym.outgoing_axis})"
    if isinstance(sym, Translation):
        return f"Translation(axis={sym.axis})"
    if isinstance(sym, Linear):
        heads = (
            ""
            if sym.left_head_axis is None
            else f", heads={sym.left_head_axis}/{sym.right_head_axis}"
        )
        return f"Linear(k={sym.left_axis}/{sym.right_axis}{heads})"
    return type(sym).__name__


def _fmt(x: float) -> str:
    return "-" if not np.isfinite(x) else f"{x:.1e}"


def _table(checks: Sequence[SymmetryCheck]) -> list[str]:
    rows = [("symmetry", "leaves", "groups", "max <g,xi>", "max dL/L", "status")]
    for c in checks:
        leaves = c.layout or ", ".join(c.paths)
        if len(leaves) > 60:
            leaves = leaves[:57] + "..."
        status = c.status + (f": {c.reason}" if c.reason else "")
        rows.append(
            (describe(c.symmetry), leaves, str(c.n_groups), _fmt(c.lie), _fmt(c.action), status)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return ["  " + "  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5] for r in rows]


# --------------------------------------------------------------------------- inputs


def _check_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating, np.integer)):
        raise TypeError(f"tol={tol!r} must be a positive float, e.g. tol=1e-3.")
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(
            f"tol={tol!r} must be a positive finite float (a relative violation "
            "such as 1e-3 for float32, 1e-8 for float64)."
        )
    return float(tol)


def _check_batches(batches: tuple, name: str) -> None:
    if not batches:
        raise ValueError(
            f"ksbopt.{name} needs at least one batch: call ksbopt.{name}(..., loss_fn, params, "
            "batch) with loss_fn(params, batch) -> scalar; pass several batches to check the "
            "symmetry on each (a symmetry holds for every minibatch)."
        )


@dataclasses.dataclass(frozen=True, eq=False)
class _Spec:
    """Everything static about the loss (hashable: compiled functions are reused)."""

    loss_fn: Callable
    treedef: Any
    float_idx: tuple[int, ...]
    array_idx: tuple[int, ...]  # non-float array leaves, passed as arguments
    fixed: tuple[tuple[int, Any], ...]  # non-array leaves, held as they are
    has_aux: bool
    traced: dict = dataclasses.field(default_factory=dict)  # input avals -> ClosedJaxpr

    def _key(self):
        return (
            self.loss_fn,
            self.treedef,
            self.float_idx,
            self.array_idx,
            tuple((i, id(x)) for i, x in self.fixed),
            self.has_aux,
        )

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, _Spec) and self._key() == other._key()

    def call(self, float_leaves, array_leaves, batch):
        full: list = [None] * (len(self.float_idx) + len(self.array_idx) + len(self.fixed))
        for i, x in zip(self.float_idx, float_leaves, strict=False):
            full[i] = x
        for i, x in zip(self.array_idx, array_leaves, strict=False):
            full[i] = x
        for i, x in self.fixed:
            full[i] = x
        out = self.loss_fn(jax.tree_util.tree_unflatten(self.treedef, full), batch)
        if self.has_aux:
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise TypeError(
                    f"has_aux=True needs loss_fn to return (loss, aux); got {type(out).__name__}."
                )
            out = out[0]
        return out

    def call_traced(self, float_leaves, array_leaves, batch):
        """``call``, replaying the jaxpr already traced for these shapes when there is one
        (a Flax model is then traced once per detect, not once per compiled function)."""
        flat = jax.tree_util.tree_leaves((float_leaves, array_leaves, batch))
        closed = self.traced.get(_signature(flat))
        if closed is None:
            return self.call(float_leaves, array_leaves, batch)
        return jcore.jaxpr_as_fun(closed)(*flat)[0]


def _signature(flat: Sequence[Any]) -> tuple:
    return tuple((tuple(np.shape(x)), jnp.result_type(x)) for x in flat)


# Verification evaluates each compiled function a handful of times, so compile time counts
# as much as run time. On XLA:CPU, the MLIR fusion emitters and the full LLVM optimisation
# cost most of the compile time of a network's gradient (about 5.7 s of CPU for the 10M
# parameter CNN of benchmarks/bench_detect.py, against 2.8 s with the classic emitters at
# -O1, which run as fast there). Small models (compile time is all that counts) use -O0;
# from LARGE parameters on, -O1, with a separate forward-only function for the finite
# actions. An option that this XLA does not know is dropped (see :func:`_options`).
_FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
_LARGE_CPU = {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False}
LARGE = 1 << 20


@functools.cache
def _options(large: bool) -> dict | None:
    """The compiler options for a small or LARGE model, as far as this XLA accepts them."""
    if large and jax.default_backend() != "cpu":
        return None  # accelerators: XLA's defaults
    wanted = _LARGE_CPU if large else _FAST
    level = {"xla_backend_optimization_level": wanted["xla_backend_optimization_level"]}
    for options in (wanted, level):
        try:
            jax.jit(lambda x: x + 1).lower(1.0).compile(options)
        except Exception:  # an option unknown to this XLA version or backend
            continue
        return options
    return None


def _vg(float_leaves, array_leaves, batch, spec: _Spec):
    return jax.value_and_grad(spec.call_traced)(float_leaves, array_leaves, batch)


def _value(float_leaves, array_leaves, batch, spec: _Spec):
    return spec.call_traced(float_leaves, array_leaves, batch)


@functools.cache
def _jitted(fn: Callable, large: bool) -> Callable:
    return jax.jit(fn, static_argnames=("spec",), compiler_options=_options(large))


def _is_large(float_leaves) -> bool:
    return sum(int(np.size(x)) for x in float_leaves) >= LARGE


def _value_and_grad(float_leaves, array_leaves, batch, spec: _Spec):
    """The loss and its gradient (the one model evaluation per batch that the Lie check needs)."""
    fn = _jitted(_vg, _is_large(float_leaves))
    return fn(float_leaves, array_leaves, batch, spec=spec)


def _loss_value(float_leaves, array_leaves, batch, spec: _Spec):
    """The loss alone: a forward pass for large models, the gradient's function for small ones
    (one compile instead of two)."""
    if _is_large(float_leaves):
        return _jitted(_value, True)(float_leaves, array_leaves, batch, spec=spec)
    return _value_and_grad(float_leaves, array_leaves, batch, spec)[0]


def _compile_loss_value(float_leaves, array_leaves, batch, spec: _Spec) -> None:
    """Compile what :func:`_loss_value` will run, without running it."""
    if _is_large(float_leaves):
        _jitted(_value, True).lower(float_leaves, array_leaves, batch, spec=spec).compile()


@dataclasses.dataclass
class _Problem:
    """The loss as a function of the differentiable leaves."""

    leaves: list
    paths: list[str]
    float_idx: list[int]
    skipped: list[tuple[str, str]]
    spec: _Spec
    closed: Any  # the jaxpr traced on the first batch

    @property
    def float_leaves(self) -> list:
        return [self.leaves[i] for i in self.float_idx]

    @property
    def array_leaves(self) -> list:
        return [self.leaves[i] for i in self.spec.array_idx]

    def fn(self, float_leaves, batch):
        return self.spec.call(float_leaves, self.array_leaves, batch)


def _problem(loss_fn: Callable, params: Any, batches: tuple, has_aux: bool, name: str) -> _Problem:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn={loss_fn!r} must be a callable loss_fn(params, batch) -> scalar.")
    _check_batches(batches, name)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [groups_lib.path_str(p) for p, _ in flat]
    leaves = [x for _, x in flat]
    float_idx, array_idx, fixed, skipped = [], [], [], []
    for i, (p, x) in enumerate(zip(paths, leaves, strict=False)):
        dtype = getattr(x, "dtype", None)
        if dtype is None or not hasattr(x, "shape"):
            skipped.append((p, f"{type(x).__name__} leaf (not an array)"))
            fixed.append((i, x))
            continue
        if not jnp.issubdtype(dtype, jnp.floating):
            skipped.append((p, f"{dtype} leaf (not differentiable)"))
        elif np.size(x) == 0:
            skipped.append((p, "empty array"))
        else:
            float_idx.append(i)
            continue
        array_idx.append(i)
    if not float_idx:
        raise ValueError(
            f"params has no floating-point leaves to analyse (leaves: {paths}); "
            "pass the trainable parameters, e.g. variables['params'] or "
            "nnx.state(model, nnx.Param)."
        )
    spec = _Spec(loss_fn, treedef, tuple(float_idx), tuple(array_idx), tuple(fixed), has_aux)
    float_leaves = [leaves[i] for i in float_idx]
    arrays = [leaves[i] for i in array_idx]
    closed = jax.make_jaxpr(spec.call)(float_leaves, arrays, batches[0])
    spec.traced[_signature(jax.tree_util.tree_leaves((float_leaves, arrays, batches[0])))] = closed
    out = closed.out_avals[0] if len(closed.out_avals) == 1 else None
    if out is None or tuple(out.shape) != ():
        got = tuple(out.shape) if out is not None else f"{len(closed.out_avals)} outputs"
        hint = (
            " It returned several values: pass has_aux=True if it is (loss, aux)."
            if out is None
            else ""
        )
        raise ValueError(
            f"loss_fn must return a scalar loss; it returned {got}. Reduce it "
            f"(e.g. .mean()) inside loss_fn.{hint}"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"loss_fn must return a floating-point scalar; it returned {out.dtype}.")
    return _Problem(leaves, paths, float_idx, skipped, spec, closed)


# --------------------------------------------------------------------------- numerics


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

    def __init__(self, prob: _Problem, bounds: Sequence[BoundSymmetry]):
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
        self._aux = jax.jit(aux, compiler_options=_options(False))
        self._aux_compiled = None  # set by warm_gradient: the same program, compiled ahead

    def gradient(self, batch) -> tuple[float, list]:
        """The loss and its gradient on one batch (the one gradient evaluation per batch)."""
        p = self.prob
        loss, grads = _value_and_grad(p.float_leaves, p.array_leaves, batch, p.spec)
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
            value = float(_loss_value(leaves, p.array_leaves, batch, p.spec))
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
            if _is_large(p.float_leaves):  # compiled only: the actions run it later
                jobs.append(
                    pool.submit(
                        run, _compile_loss_value, p.float_leaves, p.array_leaves, batch, p.spec
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


@dataclasses.dataclass
class _Cand:
    sym: Symmetry
    source: str
    reason: str = ""
    approximate: bool = False
    key: Any = None
    priority: int = 0
    certain: bool = True
    bound: BoundSymmetry | None = None
    lie: float = 0.0
    action: float = 0.0
    bad: tuple = ()


def _run_checks(
    cands: list[_Cand], prob: _Problem, batches: tuple, tol: float, every: bool = False
) -> None:
    """Fill ``lie``, ``action`` and ``bad`` of every bound candidate.

    Per batch: one gradient (all Lie derivatives), then the actions of all candidates whose
    Lie derivatives pass, applied together; only if that composition changes the loss is
    each candidate's action checked on its own. With ``every``, candidates whose Lie
    derivative fails get their own action measured too (else their action is NaN).
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
        passing = [c.lie <= tol for c in live]
        if all(passing):
            together = checker.actions(batch, loss0, moved)
        elif any(passing):
            together = checker.check(batch, loss0, grads, passing)[1]
        else:
            together = 0.0
        if together <= tol:
            for c, on in zip(live, passing, strict=True):
                if on:
                    c.action = max(c.action, together)
            alone = [j for j, on in enumerate(passing) if not on and every]
        else:
            alone = [j for j, on in enumerate(passing) if on or every]
        for j in alone:
            mask = [i == j for i in range(len(live))]
            live[j].action = max(live[j].action, checker.check(batch, loss0, grads, mask)[1])
        if not every:
            for c, on in zip(live, passing, strict=True):
                if not on:
                    c.action = np.nan  # not measured: its Lie derivative already fails


# --------------------------------------------------------------------------- declarations


def _selector(paths: list[str], chosen: list[int]) -> list:
    """Exact selectors for ``chosen`` leaves: the path when it matches only itself."""
    out = []
    for i in chosen:
        p = paths[i]
        plain = not any(ch in p for ch in "*?[]")
        clash = any(j != i and (q == p or q.endswith("/" + p)) for j, q in enumerate(paths))
        if plain and not clash:
            out.append(p)
        else:
            out.append(re.compile("^" + re.escape(p) + "$"))
    return out


def _neg(ax: int, ndim: int) -> int:
    return ax - ndim


class _Builder:
    """Turns graph findings into declarations (or notes saying why they cannot be)."""

    def __init__(self, prob: _Problem):
        self.prob = prob
        self.paths = prob.paths
        self.notes: list[str] = []

    def leaf(self, j: int) -> int:  # analysis index -> tree index
        return self.prob.float_idx[j]

    def ndim(self, i: int) -> int:
        return len(np.shape(self.prob.leaves[i]))

    def shape(self, i: int) -> tuple:
        return tuple(np.shape(self.prob.leaves[i]))

    def _side(self, members: dict, cand_axis: int | None) -> tuple[list[int], int | None] | None:
        """Tree leaves and the common negative axis matching ``cand_axis`` (None: any)."""
        leaves, axes = [], set()
        for j, m in sorted(members.items()):
            i = self.leaf(j)
            leaves.append(i)
            if cand_axis is None:
                continue
            hits = [a for a, c in m.items() if c == cand_axis]
            if len(hits) != 1:
                return None
            axes.add(_neg(hits[0], self.ndim(i)))
        if len(axes) > 1:
            return None
        return leaves, (next(iter(axes)) if axes else None)

    def names(self, leaves: list[int]) -> list:
        return _selector(self.paths, leaves)

    def build(self, f: findings.Finding) -> _Cand | None:
        shape = self.prob.leaves[self.leaf(f.leaf)].shape
        full = {a: ((1, shape[a]),) for a in f.unit_axes}
        per_unit = [a for a in f.unit_axes if f.free.get(a) == full[a]]
        partial = [a for a in f.unit_axes if f.free.get(a) and f.free.get(a) != full[a]]
        what = f"{f.kind} of {self.paths[self.leaf(f.leaf)]}"
        if f.kind == "scale":
            if partial:
                a = partial[0]
                blocks = f.free[a]
                if (
                    len(partial) == 1
                    and not per_unit
                    and len(blocks) == 1
                    and blocks[0][0] * blocks[0][1] == shape[a]
                ):
                    side = self._side(f.members, a)
                    if side is None:
                        return self._skip(what, "its leaves do not share the unit axis")
                    sym = Scale(self.names(side[0]), axis=side[1], groups=blocks[0][1])
                    return _Cand(sym, "graph", f.reason, f.approximate)
                return self._skip(what, "its groups are not contiguous blocks of one axis")
            if len(per_unit) > 1:
                return self._skip(what, "one group per unit of several axes")
            side = self._side(f.members, per_unit[0] if per_unit else None)
            if side is None:
                return self._skip(what, "its leaves do not share the unit axis")
            axis = side[1] if per_unit else None
            return _Cand(Scale(self.names(side[0]), axis=axis), "graph", f.reason, f.approximate)
        if f.kind == "translation":
            (a,) = f.unit_axes
            side = self._side(f.members, a)
            if side is None:
                return self._skip(what, "its leaves do not share the class axis")
            return _Cand(
                Translation(self.names(side[0]), axis=side[1]), "graph", f.reason, f.approximate
            )
        partial = [b for b in f.absorbers if b.partial]
        if partial:
            partner = self.paths[self.leaf(partial[0].leaf)]
            return self._skip(
                what,
                f"each unit meets several entries of {partner} (e.g. "
                "after a flatten), not one per unit",
            )
        contract = set().union(*(set(b.contract) for b in f.absorbers))
        heads = set().union(*(set(b.heads) for b in f.absorbers))
        if any(set(b.contract) != contract or set(b.heads) != heads for b in f.absorbers):
            return self._skip(what, "its partners contract different axes")
        if f.kind == "linear":
            (k,) = contract - f.nonmix
            hs = (contract & f.nonmix) | heads
            h = next(iter(hs)) if hs else None
            need = [k] + ([h] if h is not None else [])
            if any(f.free.get(a) != full[a] for a in need) or any(
                f.free.get(a) for a in f.unit_axes if a not in need
            ):
                return self._skip(what, "the factor is not per unit of the shared axis")
            left = self._side(f.members, k)
            left_h = self._side(f.members, h) if h is not None else (None, None)
            right = self._partner_side(f, k)
            right_h = self._partner_side(f, h) if h is not None else (None, None)
            if None in (left, left_h, right, right_h):
                return self._skip(what, "its leaves do not share the k / head axes")
            sym = Linear(
                self.names(left[0]),
                self.names(right[0]),
                left_axis=left[1],
                right_axis=right[1],
                left_head_axis=left_h[1],
                right_head_axis=right_h[1],
            )
            return _Cand(sym, "graph", f.reason, f.approximate)
        if len(contract) != 1 or heads:
            return self._skip(what, "a rescale over several unit axes")
        (a,) = contract
        if f.free.get(a) != full[a] or any(f.free.get(b) for b in f.unit_axes if b != a):
            return self._skip(what, "the factor is not per unit")
        inc = self._side(f.members, a)
        out = self._partner_side(f, a)
        if inc is None or out is None:
            return self._skip(what, "its leaves do not share the unit axis")
        sym = Rescale(
            self.names(inc[0]), self.names(out[0]), incoming_axis=inc[1], outgoing_axis=out[1]
        )
        return _Cand(sym, "graph", f.reason, f.approximate)

    def _partner_side(self, f: findings.Finding, cand_axis: int):
        leaves, axes = [], set()
        for b in f.absorbers:
            q_ax = b.contract.get(cand_axis, b.heads.get(cand_axis))
            if q_ax is None:
                return None
            group = {b.leaf: q_ax}
            for j, m in b.joined.items():
                hits = [a for a, c in m.items() if c == q_ax]
                if len(hits) != 1:
                    return None
                group[j] = hits[0]
            for j, ax in group.items():
                i = self.leaf(j)
                if i not in leaves:
                    leaves.append(i)
                    axes.add(_neg(ax, self.ndim(i)))
        if len(axes) != 1:
            return None
        return sorted(leaves), next(iter(axes))

    def _skip(self, what: str, why: str) -> None:
        self.notes.append(f"found {what} but cannot declare it: {why}")
        return None


def _key(b: BoundSymmetry) -> tuple:
    """Identity of a candidate's groups (the order of the two partners does not matter)."""
    kind = b.symmetry.kind
    if kind == "rescale":
        left = frozenset(p.leaf for p, s in zip(b.parts, b.signs, strict=True) if s > 0)
        right = frozenset(p.leaf for p, s in zip(b.parts, b.signs, strict=True) if s < 0)
        return (kind, frozenset((left, right)), b.charge_shape)
    if kind == "linear":
        left = frozenset(p.leaf for p in b.parts if p.left)
        right = frozenset(p.leaf for p in b.parts if not p.left)
        return (kind, frozenset((left, right)), b.charge_shape)
    axes = tuple(sorted((p.leaf, p.group_axes) for p in b.parts))
    return (kind, frozenset(b.leaves), axes)


# --------------------------------------------------------------------------- enumeration


def _natural(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _enumerate(prob: _Problem, leaves: set[int]) -> list[_Cand]:
    """Candidates from the parameter tree alone, for leaves the graph could not explain."""
    paths, shapes = prob.paths, {i: tuple(np.shape(prob.leaves[i])) for i in prob.float_idx}
    order = sorted(prob.float_idx, key=lambda i: _natural(paths[i]))
    kernels = [i for i in order if len(shapes[i]) >= 2]

    def sibling(i: int, name: str, n: int) -> int | None:
        parent = paths[i].rsplit("/", 1)[0] if "/" in paths[i] else ""
        want = f"{parent}/{name}" if parent else name
        for j in prob.float_idx:
            if paths[j] == want and shapes[j] == (n,):
                return j
        return None

    def names(ids):
        return _selector(paths, [i for i in ids if i is not None])

    out: list[_Cand] = []
    src, why = "parameter tree", "enumerated from the parameter tree"
    for pos, i in enumerate(kernels):
        if i not in leaves:
            continue
        n = shapes[i][-1]
        b = sibling(i, "bias", n)
        group = [i] + ([b] if b is not None else [])
        out.append(_Cand(Scale(names(group), axis=-1), src, why, priority=0))
        out.append(_Cand(Scale(names(group), axis=None), src, why, priority=1))
        out.append(_Cand(Translation(names(group), axis=-1), src, why))
        for j in kernels[pos + 1 : pos + 4]:
            if shapes[j][-2] == n and len(shapes[i]) == 2 and len(shapes[j]) >= 2:
                out.append(_Cand(Linear(names(group), names([j])), src, why, priority=0))
                out.append(_Cand(Rescale(names(group), names([j])), src, why, priority=1))
                break
        if len(shapes[i]) == 3:
            for j in kernels:
                if j != i and shapes[j] == shapes[i] and paths[j] > paths[i]:
                    out.append(_Cand(Linear.query_key(names([i]), names([j])), src, why))
                if shapes[j] == (shapes[i][1], shapes[i][2], shapes[i][0]):
                    out.append(_Cand(Linear.value_output(names([i]), names([j])), src, why))
    for i in order:
        if i in leaves and len(shapes[i]) == 1 and paths[i].endswith("scale"):
            b = sibling(i, "bias", shapes[i][0])
            group = [i] + ([b] if b is not None else [])
            for j in kernels:
                if shapes[j][-2] == shapes[i][0] and _natural(paths[j]) > _natural(paths[i]):
                    out.append(_Cand(Rescale(names(group), names([j])), src, why))
                    break
    return out


# --------------------------------------------------------------------------- public API


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
    prob = _problem(loss_fn, params, batches, has_aux, "detect")
    notes: list[str] = []
    builder = _Builder(prob)
    cands: list[_Cand] = []
    enum_leaves: set[int] = set(prob.float_idx) if enumerate_all else set()
    try:
        graph = graph_lib.build_graph(prob.closed, len(prob.float_idx))
        analysis = analyser.analyse(graph)
    except Exception as exc:
        notes.append(
            f"the graph of the loss could not be analysed ({type(exc).__name__}: "
            f"{exc}); all candidates are enumerated from the parameter tree"
        )
        enum_leaves = set(prob.float_idx)
    else:
        notes += analysis.notes
        for j, why in sorted(analysis.ambiguous.items()):
            i = prob.float_idx[j]
            notes.append(f"{prob.paths[i]}: {why}; candidates enumerated from the parameter tree")
            enum_leaves.add(i)
        for f in analysis.findings:
            try:
                c = builder.build(f)
            except (ValueError, TypeError) as exc:
                builder._skip(f"{f.kind} of {prob.paths[prob.float_idx[f.leaf]]}", str(exc))
                continue
            if c is not None:
                c.certain = f.certain
                c.priority = 0 if f.certain else 1
                cands.append(c)
    notes += builder.notes
    if enum_leaves:
        cands += _enumerate(prob, enum_leaves)
    # Bind and deduplicate.
    seen: dict[tuple, _Cand] = {}
    unique: list[_Cand] = []
    for c in cands:
        try:
            c.bound = orbit.bind((c.sym,), params).bound[0]
            c.key = _key(c.bound)
        except (ValueError, TypeError) as exc:
            notes.append(f"candidate {c.sym!r} does not fit the parameter tree: {exc}")
            continue
        if c.key in seen:
            continue
        seen[c.key] = c
        unique.append(c)
    _run_checks(unique, prob, batches, tol)
    accepted, rejected = _select(unique, tol, params)
    shown = [c for c in rejected if c.source == "graph" and c.certain]
    quiet = len(rejected) - len(shown)
    if quiet:
        notes.append(
            f"{quiet} other candidate(s) (enumerated, or suggested by an "
            "inconclusive graph) did not hold and were dropped"
        )
    rejected = shown
    checks = tuple(_as_check(c, prob, tol) for c in accepted)
    report = SymmetryReport(
        checks,
        tuple(_as_check(c, prob, tol) for c in rejected),
        tuple(prob.skipped),
        tuple(notes),
        tol,
        len(batches),
    )
    return [c.sym for c in accepted], report


def _select(cands: list[_Cand], tol: float, params: Any) -> tuple[list[_Cand], list[_Cand]]:
    """Keep the verified candidates: one Scale per leaf (the finest), Linear over Rescale."""
    ok = [c for c in cands if c.lie <= tol and c.action <= tol]
    bad = [c for c in cands if c not in ok]
    ok.sort(key=lambda c: (c.source != "graph", c.priority))
    accepted: list[_Cand] = []
    scaled: set[int] = set()
    pairs: set = set()
    for c in ok:
        leaves = set(c.bound.leaves)
        if c.sym.kind == "scale":
            if leaves & scaled:
                continue
            scaled |= leaves
        if c.sym.kind in ("linear", "rescale"):
            if c.key[1] in pairs:
                continue
            pairs.add(c.key[1])
        accepted.append(c)
    # Order: graph findings in parameter order.
    accepted.sort(key=lambda c: (min(c.bound.leaves), c.sym.kind))
    try:
        orbit.bind(tuple(c.sym for c in accepted), params)
    except ValueError as exc:  # pragma: no cover - guarded by the selection above
        warnings.warn(f"detected symmetries conflict: {exc}", stacklevel=3)
    return accepted, bad


def _layout(b: BoundSymmetry, paths: list[str]) -> str:
    """The leaves of a declaration, partners separated by an arrow."""
    kind = b.symmetry.kind
    if kind == "rescale":
        sides = [
            [p.leaf for p, s in zip(b.parts, b.signs, strict=True) if s > 0],
            [p.leaf for p, s in zip(b.parts, b.signs, strict=True) if s < 0],
        ]
    elif kind == "linear":
        sides = [[p.leaf for p in b.parts if p.left], [p.leaf for p in b.parts if not p.left]]
    else:
        return ", ".join(paths[i] for i in b.leaves)
    return " -> ".join(", ".join(paths[i] for i in sorted(set(side))) for side in sides)


def _as_check(c: _Cand, prob: _Problem, tol: float) -> SymmetryCheck:
    paths = tuple(prob.paths[i] for i in c.bound.leaves) if c.bound is not None else ()
    layout = _layout(c.bound, prob.paths) if c.bound is not None else ""
    n = c.bound.n_groups if c.bound is not None else 0
    holds = c.lie <= tol and c.action <= tol
    if not holds:
        status = "violated"
        why = ("Lie derivative" if c.lie > tol else "finite action") + " above tol"
        reason = f"{why}; expected: {c.reason}" if c.reason else why
    elif c.approximate:
        status, reason = "approximate", c.reason
    else:
        status, reason = "exact", c.reason
    return SymmetryCheck(c.sym, paths, n, c.lie, c.action, status, reason, c.source, c.bad, layout)


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
    prob = _problem(loss_fn, params, batches, has_aux, "verify")
    cands: list[_Cand] = []
    invalid: list[SymmetryCheck] = []
    floats = set(prob.float_idx)
    for s in syms:
        c = _Cand(s, "declared")
        try:
            c.bound = orbit.bind((s,), params).bound[0]
        except (ValueError, TypeError) as exc:
            invalid.append(SymmetryCheck(s, (), 0, np.nan, np.nan, "invalid", str(exc), "declared"))
            continue
        not_float = [prob.paths[i] for i in c.bound.leaves if i not in floats]
        if not_float:
            invalid.append(
                SymmetryCheck(
                    s,
                    tuple(prob.paths[i] for i in c.bound.leaves),
                    c.bound.n_groups,
                    np.nan,
                    np.nan,
                    "invalid",
                    f"acts on non-differentiable leaves {not_float}",
                    "declared",
                )
            )
            continue
        cands.append(c)
    _run_checks(cands, prob, batches, tol, every=True)
    checks = [_as_check(c, prob, tol) for c in cands]
    order = {s: k for k, s in enumerate(syms)}
    allc = sorted(checks + invalid, key=lambda c: order[c.symmetry])
    return SymmetryReport(tuple(allc), (), tuple(prob.skipped), (), tol, len(batches))
