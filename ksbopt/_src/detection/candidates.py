"""The candidate symmetries of :func:`~ksbopt.detect`: where they come from, which are kept.

Candidates are read off the graph findings of :mod:`ksbopt._src.detection.analyser`
(:class:`_Builder` turns each finding into a declaration, or into a note saying why it cannot
be declared), or enumerated from the parameter tree where the graph cannot be read
(:func:`_enumerate`). :func:`bind_unique` binds them to the parameters and drops duplicates;
after the numerical checks, :func:`select` keeps the verified ones that do not overlap.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

import numpy as np

from ksbopt._src.detection import analyser, findings
from ksbopt._src.detection import graph as graph_lib
from ksbopt._src.detection.compiled_loss import Problem
from ksbopt._src.symmetries import orbit
from ksbopt._src.symmetries.declarations import (
    BoundSymmetry,
    Linear,
    Rescale,
    Scale,
    Symmetry,
    Translation,
)


@dataclasses.dataclass
class Candidate:
    """A declaration to check, where it came from, and (once checked) its two numbers."""

    sym: Symmetry
    source: str  # "graph", "parameter tree" or "declared"
    reason: str = ""  # why it is expected to hold (e.g. "BatchNorm epsilon=1e-05")
    approximate: bool = False
    key: Any = None  # identity of its groups (see _key), set by bind_unique
    priority: int = 0  # among candidates of one source: lower is preferred
    certain: bool = True  # False: suggested by an inconclusive graph
    bound: BoundSymmetry | None = None
    lie: float = 0.0
    action: float = 0.0
    bad: tuple = ()  # descriptions of the groups whose Lie derivative fails

    def bind(self, params: Any) -> None:
        """Bind the declaration to ``params`` (raises what :func:`orbit.bind` raises)."""
        self.bound = orbit.bind((self.sym,), params).bound[0]


def partner_leaves(b: BoundSymmetry) -> tuple[list[int], list[int]] | None:
    """The leaves of the two partners of a Rescale or a Linear; None for the other kinds."""
    kind = b.symmetry.kind
    if kind == "rescale":
        signed = list(zip(b.parts, b.signs, strict=True))
        return [p.leaf for p, s in signed if s > 0], [p.leaf for p, s in signed if s < 0]
    if kind == "linear":
        return [p.leaf for p in b.parts if p.left], [p.leaf for p in b.parts if not p.left]
    return None


def _key(b: BoundSymmetry) -> tuple:
    """Identity of a candidate's groups (the order of the two partners does not matter)."""
    sides = partner_leaves(b)
    if sides is not None:
        return (b.symmetry.kind, frozenset(frozenset(side) for side in sides), b.charge_shape)
    axes = tuple(sorted((p.leaf, p.group_axes) for p in b.parts))
    return (b.symmetry.kind, frozenset(b.leaves), axes)


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


# --------------------------------------------------------------------------- from the graph


class _Builder:
    """Turns graph findings into declarations (or notes saying why they cannot be)."""

    def __init__(self, prob: Problem):
        self.prob = prob
        self.paths = prob.paths
        self.notes: list[str] = []

    def leaf(self, j: int) -> int:  # analysis index -> tree index
        return self.prob.float_idx[j]

    def ndim(self, i: int) -> int:
        return len(np.shape(self.prob.leaves[i]))

    def names(self, leaves: list[int]) -> list:
        return _selector(self.paths, leaves)

    def what(self, f: findings.Finding) -> str:
        return f"{f.kind} of {self.paths[self.leaf(f.leaf)]}"

    def skip(self, what: str, why: str) -> None:
        self.notes.append(f"found {what} but cannot declare it: {why}")
        return None

    def build_all(self, found: list[findings.Finding]) -> list[Candidate]:
        """The declarations of the findings that can be declared (notes for the others)."""
        out = []
        for f in found:
            try:
                c = self.build(f)
            except (ValueError, TypeError) as exc:
                self.skip(self.what(f), str(exc))
                continue
            if c is not None:
                c.certain = f.certain
                c.priority = 0 if f.certain else 1
                out.append(c)
        return out

    def build(self, f: findings.Finding) -> Candidate | None:
        """The declaration of one finding, or None (with a note saying why not)."""
        if f.kind == "scale":
            return self._scale(f)
        if f.kind == "translation":
            return self._translation(f)
        return self._pair(f)

    def _found(self, f: findings.Finding, sym: Symmetry) -> Candidate:
        return Candidate(sym, "graph", f.reason, f.approximate)

    def _whole_axes(self, f: findings.Finding) -> dict:
        """The free blocks that make one group per unit, for each unit axis of the finding."""
        shape = self.prob.leaves[self.leaf(f.leaf)].shape
        return {a: ((1, shape[a]),) for a in f.unit_axes}

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

    def _partner_side(self, f: findings.Finding, cand_axis: int):
        """The leaves of the partners and their common negative axis matching ``cand_axis``."""
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

    def _scale(self, f: findings.Finding) -> Candidate | None:
        """A Scale: one group per unit of an axis, per block of units, or the whole layer."""
        shape = self.prob.leaves[self.leaf(f.leaf)].shape
        full = self._whole_axes(f)
        per_unit = [a for a in f.unit_axes if f.free.get(a) == full[a]]
        partial = [a for a in f.unit_axes if f.free.get(a) and f.free.get(a) != full[a]]
        if partial:
            a = partial[0]
            blocks = f.free[a]
            one_block_axis = len(partial) == 1 and not per_unit and len(blocks) == 1
            if not (one_block_axis and blocks[0][0] * blocks[0][1] == shape[a]):
                return self.skip(self.what(f), "its groups are not contiguous blocks of one axis")
            side = self._side(f.members, a)
            if side is None:
                return self.skip(self.what(f), "its leaves do not share the unit axis")
            return self._found(f, Scale(self.names(side[0]), axis=side[1], groups=blocks[0][1]))
        if len(per_unit) > 1:
            return self.skip(self.what(f), "one group per unit of several axes")
        side = self._side(f.members, per_unit[0] if per_unit else None)
        if side is None:
            return self.skip(self.what(f), "its leaves do not share the unit axis")
        axis = side[1] if per_unit else None
        return self._found(f, Scale(self.names(side[0]), axis=axis))

    def _translation(self, f: findings.Finding) -> Candidate | None:
        (a,) = f.unit_axes
        side = self._side(f.members, a)
        if side is None:
            return self.skip(self.what(f), "its leaves do not share the class axis")
        return self._found(f, Translation(self.names(side[0]), axis=side[1]))

    def _pair(self, f: findings.Finding) -> Candidate | None:
        """A Linear or a Rescale: the finding's leaf and its partners (the absorbers)."""
        partial = [b for b in f.absorbers if b.partial]
        if partial:
            partner = self.paths[self.leaf(partial[0].leaf)]
            return self.skip(
                self.what(f),
                f"each unit meets several entries of {partner} (e.g. "
                "after a flatten), not one per unit",
            )
        contract = set().union(*(set(b.contract) for b in f.absorbers))
        heads = set().union(*(set(b.heads) for b in f.absorbers))
        if any(set(b.contract) != contract or set(b.heads) != heads for b in f.absorbers):
            return self.skip(self.what(f), "its partners contract different axes")
        if f.kind == "linear":
            return self._linear(f, contract, heads)
        return self._rescale(f, contract, heads)

    def _linear(self, f: findings.Finding, contract: set, heads: set) -> Candidate | None:
        full = self._whole_axes(f)
        (k,) = contract - f.nonmix
        hs = (contract & f.nonmix) | heads
        h = next(iter(hs)) if hs else None
        need = [k] + ([h] if h is not None else [])
        if any(f.free.get(a) != full[a] for a in need) or any(
            f.free.get(a) for a in f.unit_axes if a not in need
        ):
            return self.skip(self.what(f), "the factor is not per unit of the shared axis")
        left = self._side(f.members, k)
        left_h = self._side(f.members, h) if h is not None else (None, None)
        right = self._partner_side(f, k)
        right_h = self._partner_side(f, h) if h is not None else (None, None)
        if None in (left, left_h, right, right_h):
            return self.skip(self.what(f), "its leaves do not share the k / head axes")
        sym = Linear(
            self.names(left[0]),
            self.names(right[0]),
            left_axis=left[1],
            right_axis=right[1],
            left_head_axis=left_h[1],
            right_head_axis=right_h[1],
        )
        return self._found(f, sym)

    def _rescale(self, f: findings.Finding, contract: set, heads: set) -> Candidate | None:
        if len(contract) != 1 or heads:
            return self.skip(self.what(f), "a rescale over several unit axes")
        (a,) = contract
        full = self._whole_axes(f)
        if f.free.get(a) != full[a] or any(f.free.get(b) for b in f.unit_axes if b != a):
            return self.skip(self.what(f), "the factor is not per unit")
        inc = self._side(f.members, a)
        out = self._partner_side(f, a)
        if inc is None or out is None:
            return self.skip(self.what(f), "its leaves do not share the unit axis")
        sym = Rescale(
            self.names(inc[0]), self.names(out[0]), incoming_axis=inc[1], outgoing_axis=out[1]
        )
        return self._found(f, sym)


# --------------------------------------------------------------------------- enumeration


def _natural(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _enumerate(prob: Problem, leaves: set[int]) -> list[Candidate]:
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

    out: list[Candidate] = []
    src, why = "parameter tree", "enumerated from the parameter tree"
    for pos, i in enumerate(kernels):
        if i not in leaves:
            continue
        n = shapes[i][-1]
        b = sibling(i, "bias", n)
        group = [i] + ([b] if b is not None else [])
        out.append(Candidate(Scale(names(group), axis=-1), src, why, priority=0))
        out.append(Candidate(Scale(names(group), axis=None), src, why, priority=1))
        out.append(Candidate(Translation(names(group), axis=-1), src, why))
        for j in kernels[pos + 1 : pos + 4]:
            if shapes[j][-2] == n and len(shapes[i]) == 2 and len(shapes[j]) >= 2:
                out.append(Candidate(Linear(names(group), names([j])), src, why, priority=0))
                out.append(Candidate(Rescale(names(group), names([j])), src, why, priority=1))
                break
        if len(shapes[i]) == 3:
            for j in kernels:
                if j != i and shapes[j] == shapes[i] and paths[j] > paths[i]:
                    out.append(Candidate(Linear.query_key(names([i]), names([j])), src, why))
                if shapes[j] == (shapes[i][1], shapes[i][2], shapes[i][0]):
                    out.append(Candidate(Linear.value_output(names([i]), names([j])), src, why))
    for i in order:
        if i in leaves and len(shapes[i]) == 1 and paths[i].endswith("scale"):
            b = sibling(i, "bias", shapes[i][0])
            group = [i] + ([b] if b is not None else [])
            for j in kernels:
                if shapes[j][-2] == shapes[i][0] and _natural(paths[j]) > _natural(paths[i]):
                    out.append(Candidate(Rescale(names(group), names([j])), src, why))
                    break
    return out


# --------------------------------------------------------------------------- detect's list


def propose(prob: Problem, enumerate_all: bool) -> tuple[list[Candidate], list[str]]:
    """The candidates of the graph (enumerated where it cannot be read), and notes."""
    notes: list[str] = []
    builder = _Builder(prob)
    cands: list[Candidate] = []
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
        cands += builder.build_all(analysis.findings)
        notes += builder.notes
    if enum_leaves:
        cands += _enumerate(prob, enum_leaves)
    return cands, notes


def bind_unique(cands: list[Candidate], params: Any) -> tuple[list[Candidate], list[str]]:
    """The candidates bound to ``params``, one per set of groups, and notes on those that
    do not fit the tree."""
    notes: list[str] = []
    seen: set[tuple] = set()
    unique: list[Candidate] = []
    for c in cands:
        try:
            c.bind(params)
            c.key = _key(c.bound)
        except (ValueError, TypeError) as exc:
            notes.append(f"candidate {c.sym!r} does not fit the parameter tree: {exc}")
            continue
        if c.key in seen:
            continue
        seen.add(c.key)
        unique.append(c)
    return unique, notes


def select(
    cands: list[Candidate], tol: float, params: Any
) -> tuple[list[Candidate], list[Candidate]]:
    """Keep the verified candidates: one Scale per leaf (the finest), Linear over Rescale."""
    ok = [c for c in cands if c.lie <= tol and c.action <= tol]
    bad = [c for c in cands if c not in ok]
    ok.sort(key=lambda c: (c.source != "graph", c.priority))
    accepted: list[Candidate] = []
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
