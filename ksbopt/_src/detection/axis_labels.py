"""Axis labels: which part of a parameter leaf's unit index each axis of a value carries.

An axis holds a row-major list of atoms ``(leaf_axis, stride, size, free)``: the unit index
along leaf axis ``leaf_axis`` contributes ``(u // stride) % size``. ``leaf_axis=None`` is an
unlabelled chunk. ``free=False`` marks a part of the unit index the factor must not depend on
(it was reduced over, e.g. the features of a LayerNorm, or the channels inside a group). The
shift interpreter also writes ``leaf_axis=BROADCAST`` on axes a value was broadcast along
(the shift is constant there, but they belong to no leaf axis).

This module is the algebra of labels: following them through layout changes, broadcasts and
contractions, comparing them, and lining them up with a partner leaf's.
"""

from __future__ import annotations

import itertools
import math

from ksbopt._src.detection.graph import Node
from ksbopt._src.detection.primitives import IDENTITY_LAYOUT

Atom = tuple  # (leaf_axis | None, stride, size, free)
Labels = tuple  # one tuple of atoms per axis of the value

BROADCAST = -1  # the leaf_axis of an axis a shifted value was broadcast along


def _canon_axis(atoms) -> tuple:
    """Drop size-1 atoms and merge neighbours that continue each other."""
    out: list = []
    for a in atoms:
        if a[2] == 1:
            continue
        if out:
            p = out[-1]
            if p[0] is None and a[0] is None:
                out[-1] = (None, 0, p[2] * a[2], False)
                continue
            if p[0] is not None and p[0] == a[0] and p[3] == a[3] and p[1] == a[1] * a[2]:
                out[-1] = (a[0], a[1], p[2] * a[2], a[3])
                continue
        out.append(a)
    if all(a[0] is None for a in out):
        return ()
    return tuple(out)


def _full(atoms, n) -> list:
    if not atoms:
        return [(None, 0, n, False)] if n != 1 else []
    return list(atoms)


def _split(a: Atom, outer: int) -> tuple[Atom, Atom]:
    inner = a[2] // outer
    if a[0] is None:
        return (None, 0, outer, False), (None, 0, inner, False)
    return (a[0], a[1] * inner, outer, a[3]), (a[0], a[1], inner, a[3])


def reshape_labels(labels: Labels, in_shape, out_shape) -> Labels | None:
    """Labels after a row-major reshape, or ``None`` where atoms do not line up.

    Splitting a unit axis of 4 in two gives the outer axis the unit index's stride-2 part:

    >>> reshape_labels((((1, 1, 4, True),),), (4,), (2, 2))
    (((1, 2, 2, True),), ((1, 1, 2, True),))
    """
    queue: list = []
    for atoms, n in zip(labels, in_shape, strict=False):
        queue.extend(_full(atoms, n))
    queue = [a for a in queue if a[2] != 1]
    out = []
    for n in out_shape:
        need, take = n, []
        while need > 1:
            if not queue:
                return None
            a = queue.pop(0)
            if need % a[2] == 0:
                take.append(a)
                need //= a[2]
            elif a[2] % need == 0:
                outer, inner = _split(a, need)
                take.append(outer)
                queue.insert(0, inner)
                need = 1
            else:
                return None
        out.append(_canon_axis(take))
    if queue:
        return None
    return tuple(out)


def free_atoms(labels: Labels) -> tuple:
    """The atoms the factor depends on, per axis (for comparing two values)."""
    return tuple(tuple(a[:3] for a in atoms if a[0] is not None and a[3]) for atoms in labels)


def labelled_axes(labels: Labels) -> list[int]:
    """The axes that carry part of a unit index."""
    return [k for k, atoms in enumerate(labels) if any(a[0] is not None for a in atoms)]


def leaf_atoms(atoms) -> list:
    """The atoms of one axis that come from a leaf axis (not unlabelled, not broadcast)."""
    return [a for a in atoms if a[0] is not None and a[0] >= 0]


def leaf_axes(atoms) -> set:
    """The leaf axes the atoms of one axis come from."""
    return {a[0] for a in leaf_atoms(atoms)}


def has_free_atom(atoms) -> bool:
    """Whether the factor varies along this axis."""
    return any(a[3] for a in atoms if a[0] is not None)


def axis_leaf(atoms) -> tuple[int, int] | None:
    """(leaf_axis, size) if the atoms of one axis cover it from one leaf axis, else None."""
    axes = {a[0] for a in atoms}
    if len(axes) != 1 or None in axes:
        return None
    return next(iter(axes)), math.prod(a[2] for a in atoms)


def merge_labels(a: Labels, b: Labels) -> Labels:
    """Per axis, the labels of ``a`` where it has any, else those of ``b``."""
    return tuple(x or y for x, y in zip(a, b, strict=False))


def initial_labels(shape, unit_axes, uniform: dict[int, set]) -> Labels:
    """Labels of a leaf whose units live on ``unit_axes``, with uniform parts split off.

    ``uniform[ax]`` holds (stride, size) ranges of the unit index along ``ax`` that the factor
    must not depend on. Eight units in groups of four (one factor per group, as a GroupNorm
    allows): the factor depends on ``u // 4`` only.

    >>> initial_labels((8,), {0}, {0: {(1, 4)}})
    (((0, 4, 2, True), (0, 1, 4, False)),)
    """
    out = []
    for ax, n in enumerate(shape):
        if ax not in unit_axes or n == 1:
            out.append(())
            continue
        ranges = uniform.get(ax, set())
        bounds = {1, n}
        for s, m in ranges:
            bounds.update((s, s * m))
        bounds = sorted(b for b in bounds if 1 <= b <= n)
        if any(b2 % b1 for b1, b2 in itertools.pairwise(bounds)):
            out.append(((ax, 1, n, False),))
            continue
        atoms = []
        for lo, hi in itertools.pairwise(bounds):
            uni = any(s <= lo and hi <= s * m for s, m in ranges)
            atoms.append((ax, lo, hi // lo, not uni))
        atoms.reverse()  # row-major: the largest stride first
        out.append(_canon_axis(atoms))
    return tuple(out)


def whole_leaf_labels(shape) -> Labels:
    """Labels of a leaf itself: every axis is its own (free) unit axis."""
    return tuple(((ax, 1, n, True),) if n > 1 else () for ax, n in enumerate(shape))


def relabel(node: Node, labels: Labels) -> Labels | None:
    """Labels of the output of a layout primitive (one array input), None if lost."""
    p, x, y = node.params, node.ins[0], node.outs[0]
    name = node.prim
    if name in IDENTITY_LAYOUT:
        return labels
    if name == "transpose":
        return tuple(labels[i] for i in p["permutation"])
    if name == "squeeze":
        drop = {d % len(x.shape) for d in p["dimensions"]}
        return tuple(lab for i, lab in enumerate(labels) if i not in drop)
    if name == "broadcast_in_dim":
        out = [()] * len(y.shape)
        for i, d in enumerate(p["broadcast_dimensions"]):
            if x.shape[i] == y.shape[d]:
                out[d] = labels[i]
        return tuple(out)
    if name == "reshape":
        if p.get("dimensions") not in (None, ()):
            return None
        return reshape_labels(labels, x.shape, y.shape)
    return None


def broadcast_labels(labels: Labels, shape, out_shape) -> Labels:
    """Labels of an operand of an elementwise op, aligned with the output."""
    if len(shape) == 0:
        return tuple(() for _ in out_shape)
    return tuple(lab if n == m else () for lab, n, m in zip(labels, shape, out_shape, strict=False))


def partner_axes(labels: Labels, partner: Labels) -> dict[int, int] | None:
    """Partner leaf axis -> candidate leaf axis, read axis by axis of one value labelled both
    ways; None where they do not line up (a free part of the unit meets no partner axis, a
    partner axis of another size, or one partner axis meeting two candidate axes)."""
    mapping: dict[int, int] = {}
    for atoms, theirs in zip(labels, partner, strict=False):
        mine = leaf_atoms(atoms)
        if not mine:
            continue
        their = leaf_atoms(theirs)
        if not their:
            if any(a[3] for a in mine):
                return None  # the partner is constant where the factor varies
            continue
        ca, pa = axis_leaf(mine), axis_leaf(their)
        if ca is None or pa is None or ca[1] != pa[1]:
            return None
        if mapping.get(pa[0], ca[0]) != ca[0]:
            return None
        mapping[pa[0]] = ca[0]
    return mapping


def dot_labels(labels: Labels, contract, batch, n_other_free: int, is_lhs: bool) -> Labels:
    """Labels of a ``dot_general`` output from those of one operand (the other unlabelled):
    batch axes, then the lhs' free axes, then the rhs' free axes."""
    batch_labels = [labels[k] for k in batch]
    free = [labels[k] for k in range(len(labels)) if k not in contract and k not in batch]
    pad = [()] * n_other_free
    return tuple(batch_labels + (free + pad if is_lhs else pad + free))


def gather_offset_axes(dimension_numbers, ndim: int) -> list[tuple[int, int]]:
    """(operand axis, output axis) of the slice axes a ``gather`` keeps."""
    dn = dimension_numbers
    skip = set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()))
    kept = [k for k in range(ndim) if k not in skip]
    return list(zip(kept, dn.offset_dims, strict=False))


# --------------------------------------------------------------------------- shift labels


def broadcast_axis(n: int) -> tuple:
    """The atoms of an axis of size ``n`` that a shifted value was broadcast along."""
    return ((BROADCAST, 0, n, True),) if n > 1 else ()


def constant_along(atoms, n: int) -> bool:
    """Whether a shift is constant along an axis of size ``n`` with these atoms."""
    return n == 1 or (
        bool(atoms) and all(x[0] is not None for x in atoms) and math.prod(x[2] for x in atoms) == n
    )


def shift_operand_labels(labels: Labels, shape, out_shape) -> Labels:
    """Labels of a shifted operand aligned with an elementwise output (broadcast = const)."""
    if len(shape) == 0:
        return tuple(broadcast_axis(n) for n in out_shape)
    return tuple(
        lab if n == m else broadcast_axis(m)
        for lab, n, m in zip(labels, shape, out_shape, strict=False)
    )


def meet(labels_list) -> Labels:
    """Axes along which all operands' shifts are constant."""
    out = []
    for atoms in zip(*labels_list, strict=False):
        if any(not a for a in atoms):
            out.append(())
            continue
        leafy = [a for a in atoms if leaf_atoms(a)]
        out.append(leafy[0] if leafy else atoms[0])
    return tuple(out)
