"""What :func:`~ksbopt.detect` and :func:`~ksbopt.verify` return: the records of the checks
and the table that ``print(report)`` shows."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ksbopt._src.detection.candidates import Candidate, partner_leaves
from ksbopt._src.symmetries.declarations import (
    BoundSymmetry,
    Linear,
    Rescale,
    Scale,
    Symmetry,
    Translation,
)

__all__ = ["SymmetryCheck", "SymmetryReport"]


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
        batches, where psi applies this declaration together with the other accepted ones
        (a composition of symmetries is a symmetry); a set whose composed action exceeds
        ``tol`` is halved until its parts pass, so the figure is this declaration's own
        violation or a bound on it set by a passing set that contains it.
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


def layout(b: BoundSymmetry, paths: list[str]) -> str:
    """The leaves of a declaration, partners separated by an arrow."""
    sides = partner_leaves(b)
    if sides is None:
        return ", ".join(paths[i] for i in b.leaves)
    return " -> ".join(", ".join(paths[i] for i in sorted(set(side))) for side in sides)


def as_check(c: Candidate, paths: list[str], tol: float) -> SymmetryCheck:
    """The record of a checked candidate: it holds when both numbers are within ``tol``."""
    leaves = tuple(paths[i] for i in c.bound.leaves) if c.bound is not None else ()
    shown = layout(c.bound, paths) if c.bound is not None else ""
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
    return SymmetryCheck(c.sym, leaves, n, c.lie, c.action, status, reason, c.source, c.bad, shown)


def invalid(sym: Symmetry, reason: str, paths: tuple[str, ...] = (), n_groups: int = 0):
    """The record of a declaration that cannot be checked (it does not fit the tree)."""
    return SymmetryCheck(sym, paths, n_groups, np.nan, np.nan, "invalid", reason, "declared")
