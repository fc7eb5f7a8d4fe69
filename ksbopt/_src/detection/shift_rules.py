"""The shift interpreter: translation candidates.

A kernel's rows are shifted along the unit axis; every value is tracked as ``x + c delta``
(a :class:`~ksbopt._src.detection.values.Shifted`) with ``delta`` constant along the unit
axis, its exponential as ``x * exp(c delta)`` (an
:class:`~ksbopt._src.detection.values.ExpShifted`). Softmax, log-softmax, logsumexp and
mean-centring cancel it. A polynomial of a shifted value is
:data:`~ksbopt._src.detection.values.UNCERTAIN`: it may still cancel (a variance
``E[x^2] - E[x]^2``), and is verified numerically.

:data:`SHIFT_RULES` maps each primitive to its rule; :func:`uncertain_rule` reads every node
with an uncertain input.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from ksbopt._src.detection.axis_labels import (
    broadcast_axis,
    broadcast_labels,
    constant_along,
    dot_labels,
    gather_offset_axes,
    leaf_atoms,
    meet,
    partner_axes,
    relabel,
    shift_operand_labels,
)
from ksbopt._src.detection.findings import Ambiguous
from ksbopt._src.detection.graph import Node, Var
from ksbopt._src.detection.graph_facts import GraphFacts
from ksbopt._src.detection.interpreter import (
    Interpreter,
    Rule,
    active_operand,
    dot_operands,
    rule_table,
)
from ksbopt._src.detection.primitives import (
    ADD,
    BREAKING,
    COMPARE,
    CUMULATIVE,
    LAYOUT,
    POLYNOMIAL,
    POOL,
    REDUCE,
    display_name,
)
from ksbopt._src.detection.values import UNCERTAIN, ExpShifted, Shifted, as_fraction, with_labels


class ShiftInterpreter(Interpreter):
    """The translation of ``leaf`` along its unit axis ``axis``."""

    def __init__(self, facts: GraphFacts, leaf: int, axis: int):
        shape = facts.graph.leaf_vars[leaf].shape
        labels = [()] * len(shape)
        labels[axis] = ((axis, 1, shape[axis], True),)
        super().__init__(facts, leaf, Shifted(Fraction(1), tuple(labels)))
        self.softmax = False  # an exponential summed (softmax, logsumexp)
        self.centring = False  # a difference cancelled the shift (mean-centring)

    def rule_for(self, node: Node, vals: list) -> Rule:
        if any(v is UNCERTAIN for v in vals):
            return uncertain_rule
        return super().rule_for(node, vals)

    def join_bias(self, pview, labels, o_shape, out_shape) -> None:
        """Co-shift a bias-like leaf added to the candidate where its axes align."""
        q, qlab = pview
        mapping = partner_axes(labels, broadcast_labels(qlab, o_shape, out_shape))
        if mapping and q not in self.members:
            self.members[q] = mapping

    def is_fast_variance(self, a: Var, b: Var) -> bool:
        """a - b == mean(x^2) - mean(x)^2 for a shifted x, constant along the mean's axes."""
        facts = self.facts
        ma = facts.mean_of(a)
        sq_b = facts.square_of(b)
        if ma is None or sq_b is None:
            return False
        x = facts.square_of(ma[0])
        mb = facts.mean_of(sq_b)
        if x is None or mb is None or mb[0] is not x or mb[1] != ma[1]:
            return False
        val = self.env.get(id(x))
        return isinstance(val, Shifted) and all(
            constant_along(val.labels[k], x.shape[k]) for k in ma[1]
        )


def _aligned(value, x: Var, out: Var):
    """Labels of the shifted operand ``x`` aligned with the elementwise output ``out``."""
    return shift_operand_labels(value.labels, x.shape, out.shape)


def _both_aligned(node: Node, vals: list):
    """Axes along which both operands' shifts are constant, aligned with the output."""
    (a, b), (va, vb), out = node.ins, vals, node.outs[0]
    return meet([_aligned(va, a, out), _aligned(vb, b, out)])


def _same_shift(va, vb) -> bool:
    return type(va) is type(vb) and va.coef == vb.coef


def uncertain_rule(run, node, vals):
    """A node with an UNCERTAIN input: polynomials of a shift may still cancel
    (E[x^2] - E[x]^2 gives None), so they stay UNCERTAIN; nonlinear maps break it."""
    name = node.prim
    if name == "sub" and run.is_fast_variance(*node.ins):
        run.centring = True
        return None
    if name == "div" and vals[1] is not None:
        run.fail("divides by a value that depends on the shift")
    if name in LAYOUT or name in POLYNOMIAL:
        return UNCERTAIN
    run.fail(f"{display_name(name)} of a value that depends on the shift nonlinearly")


# --------------------------------------------------------------------------- rules
#
# Each rule returns the Shifted / ExpShifted / UNCERTAIN value of the node's output (None:
# the shift cancelled), or raises Broken / Ambiguous.


def _broadcast(run, node, vals):
    """Same shift; the new axes are constant (broadcast)."""
    v, x, out = vals[0], node.ins[0], node.outs[0]
    labels = [broadcast_axis(n) for n in out.shape]
    for i, d in enumerate(node.params["broadcast_dimensions"]):
        if x.shape[i] == out.shape[d]:
            labels[d] = v.labels[i]
    return with_labels(v, tuple(labels))


def _layout(run, node, vals):
    """Same shift; the labels follow the axes."""
    v = vals[0]
    labels = relabel(node, v.labels)
    if labels is None:
        raise Ambiguous(node.prim)
    return with_labels(v, labels)


def _neg(run, node, vals):
    """The opposite shift."""
    v = vals[0]
    if not isinstance(v, Shifted):
        run.fail("neg of exp")
    return Shifted(-v.coef, v.labels)


def _constant(run, node, vals):
    """A value that no longer depends on the shift (``is_finite``)."""


def _breaks(run, node, vals):
    """Breaks the action: a nonlinear map (or a window or scan) of a shifted value."""
    run.fail(f"{display_name(node.prim)} of a shifted value")


def _exp(run, node, vals):
    """exp of a shift: an ExpShifted (a softmax may follow)."""
    v = vals[0]
    if not isinstance(v, Shifted):
        _breaks(run, node, vals)
    run.softmax = True
    return ExpShifted(v.coef, v.labels)


def _log(run, node, vals):
    """log of an ExpShifted: the shift again."""
    v = vals[0]
    if not isinstance(v, ExpShifted):
        _breaks(run, node, vals)
    return Shifted(v.coef, v.labels)


def _abs(run, node, vals):
    """abs of an ExpShifted (positive): itself."""
    if not isinstance(vals[0], ExpShifted):
        _breaks(run, node, vals)
    return vals[0]


_POWERS = {"square": 2, "sqrt": Fraction(1, 2), "rsqrt": Fraction(-1, 2)}


def _power(run, node, vals):
    """A power of an ExpShifted multiplies its coefficient; a non-negative integer power of a
    shift is UNCERTAIN (it may cancel later, a variance)."""
    v, name = vals[0], node.prim
    if isinstance(v, ExpShifted):
        power = _POWERS.get(name, node.params.get("y"))
        return ExpShifted(v.coef * Fraction(power), v.labels)
    if name == "square" or (name == "integer_pow" and node.params["y"] >= 0):
        return UNCERTAIN
    run.fail(f"{name} of a shifted value")


def _add(run, node, vals):
    """Coefficients add (cancel to None: mean-centring, or the log-sum of a softmax); plus a
    constant or a bias leaf (co-shifted where it aligns) keeps the shift."""
    (a, _), (va, vb), out = node.ins, vals, node.outs[0]
    sign = -1 if node.prim == "sub" else 1
    if va is not None and vb is not None:
        if type(va) is not type(vb):
            run.fail("adds a shifted value and an exponential")
        labels = _both_aligned(node, vals)
        if isinstance(va, ExpShifted):
            if va.coef != vb.coef:
                run.fail("adds exponentials of different shifts")
            return ExpShifted(va.coef, labels)
        coef = va.coef + sign * vb.coef
        if coef == 0:
            run.cancelled = True
            if not run.softmax:
                run.centring = True
            return None
        return Shifted(coef, labels)
    s, sv, o = active_operand(node, vals, va is not None)
    if isinstance(sv, ExpShifted):
        if run.facts.constval.get(id(o)) == 0:
            return sv
        run.fail("adds a constant to an exponential")
    coef = sv.coef if s is a else sign * sv.coef
    labels = _aligned(sv, s, out)
    pv = run.facts.pview.get(id(o))
    if pv is not None and pv[0] != run.leaf:
        run.join_bias(pv, labels, o.shape, out.shape)
    return Shifted(coef, labels)


def _mul_div(run, node, vals):
    """Products of exponentials add coefficients; a shift times a constant scales its
    coefficient; other products are UNCERTAIN; dividing by a shift breaks it."""
    (_, b), (va, vb), out = node.ins, vals, node.outs[0]
    div = node.prim == "div"
    if va is not None and vb is not None:
        if isinstance(va, ExpShifted) and isinstance(vb, ExpShifted):
            coef = va.coef - vb.coef if div else va.coef + vb.coef
            labels = _both_aligned(node, vals)
            if coef == 0:
                run.cancelled = True
                return None
            return ExpShifted(coef, labels)
        if div:
            run.fail("divides by a shifted value")
        return UNCERTAIN
    s, sv, o = active_operand(node, vals, va is not None)
    labels = _aligned(sv, s, out)
    if isinstance(sv, ExpShifted):
        coef = -sv.coef if (div and s is b) else sv.coef
        return ExpShifted(coef, labels)
    if div and s is b:
        run.fail("divides by a shifted value")
    c = run.facts.constval.get(id(o))
    if c is not None and c != 0:
        return Shifted(sv.coef * (as_fraction(1 / c) if div else as_fraction(c)), labels)
    return UNCERTAIN  # times a value that varies (e.g. one-hot labels): may still cancel


def _max_min(run, node, vals):
    """Of two values shifted alike, or with a threshold of +-inf (0 for an exponential)."""
    va, vb = vals
    if va is not None and vb is not None:
        if _same_shift(va, vb):
            return with_labels(va, _both_aligned(node, vals))
        run.fail(f"{node.prim} of values shifted differently")
    s, sv, o = active_operand(node, vals, va is not None)
    c = run.facts.constval.get(id(o))
    if c is None or not (np.isinf(c) or (isinstance(sv, ExpShifted) and c == 0)):
        run.fail(f"{node.prim} of a shifted value with a threshold")
    return with_labels(sv, _aligned(sv, s, node.outs[0]))


def _select(run, node, vals):
    """Cases shifted alike (or constants), picked by a predicate that does not shift."""
    if vals[0] is not None:
        run.fail("selects by a shifted predicate")
    cases = list(zip(node.ins[1:], vals[1:], strict=False))
    kept = [(x, w) for x, w in cases if w is not None]
    if len({(type(w), w.coef) for _, w in kept}) != 1:
        run.fail("selects between values shifted differently")
    for x, w in cases:
        if w is None and run.facts.constval.get(id(x)) is None:
            run.fail("selects between a shifted value and an unshifted one")
    first = kept[0][1]
    return with_labels(first, meet([_aligned(w, x, node.outs[0]) for x, w in kept]))


def _compare(run, node, vals):
    """A predicate that does not shift, if both sides are shifted alike."""
    va, vb = vals
    if va is not None and vb is not None and _same_shift(va, vb):
        return None
    run.fail("compares a shifted value with an unshifted one")


def _reduce(run, node, vals):
    """Over axes along which the shift is constant: a sum multiplies a shift's coefficient
    by the count; max, min (and sums of exponentials) keep it; arg-reductions drop it."""
    v, x, name = vals[0], node.ins[0], node.prim
    axes = tuple(node.params["axes"])
    for k in axes:
        if not constant_along(v.labels[k], x.shape[k]):
            run.fail("reduces over an axis along which the shift varies")
    if name in ("argmax", "argmin"):
        return None
    if name != "reduce_sum":
        run.softmax = True
    labels = tuple(lab for k, lab in enumerate(v.labels) if k not in axes)
    if name == "reduce_sum" and isinstance(v, Shifted):
        return Shifted(v.coef * math.prod(x.shape[k] for k in axes), labels)
    return with_labels(v, labels)


def _dot(run, node, vals):
    """A linear map that keeps the shift on a unit axis (an exponential only summed where
    its shift is constant); two shifted operands are UNCERTAIN."""
    if vals[0] is not None and vals[1] is not None:
        return UNCERTAIN
    d = dot_operands(node, vals, vals[0] is not None)
    sv = d.value
    if isinstance(sv, ExpShifted):
        for k in d.contract:
            if not constant_along(sv.labels[k], d.var.shape[k]):
                run.fail("sums an exponential over an axis where the shift varies")
    labels = dot_labels(sv.labels, d.contract, d.batch, d.n_other_free, d.is_lhs)
    if not any(leaf_atoms(atoms) for atoms in labels):
        run.fail("a linear map mixes the shift across the unit axis")
    return with_labels(sv, labels)


def _conv(run, node, vals):
    """A shifted kernel: the output features are shifted (as a dense layer's)."""
    vl, vr = vals
    _, rs, os_ = node.params["dimension_numbers"]
    if vl is None and isinstance(vr, Shifted) and vr.labels[rs[0]]:
        labels = [()] * len(node.outs[0].shape)
        labels[os_[1]] = vr.labels[rs[0]]
        return Shifted(vr.coef, tuple(labels))
    run.fail("convolution mixes the shift")


def _gather(run, node, vals):
    """Picks entries along axes where the shift is constant; whole slices keep labels."""
    if vals[1] is not None:
        run.fail("gathers with shifted indices")
    v, x, out = vals[0], node.ins[0], node.outs[0]
    dn = node.params["dimension_numbers"]
    for k in set(dn.start_index_map):
        if not constant_along(v.labels[k], x.shape[k]):
            run.fail("gathers along an axis where the shift varies")
    labels = [()] * len(out.shape)
    for k, d in gather_offset_axes(dn, len(x.shape)):
        if node.params["slice_sizes"][k] == x.shape[k]:
            labels[d] = v.labels[k]
    return with_labels(v, tuple(labels))


SHIFT_RULES = rule_table(
    ("broadcast_in_dim", _broadcast),
    (LAYOUT - {"broadcast_in_dim"}, _layout),
    ("neg", _neg),
    ("is_finite", _constant),
    ("exp", _exp),
    ("log", _log),
    ("abs", _abs),
    ((*_POWERS, "integer_pow"), _power),
    (ADD, _add),
    (("mul", "div"), _mul_div),
    (("max", "min"), _max_min),
    ("select_n", _select),
    (COMPARE, _compare),
    (REDUCE, _reduce),
    ("dot_general", _dot),
    ("conv_general_dilated", _conv),
    ("gather", _gather),
    (set(BREAKING) - {"exp", "log"} | {"sign"}, _breaks),
    (POOL | CUMULATIVE | {"pad", "slice", "rev"}, _breaks),
)
"""Primitive -> rule of the shift interpreter. A rule returns the
:class:`~ksbopt._src.detection.values.Shifted`,
:class:`~ksbopt._src.detection.values.ExpShifted` or
:data:`~ksbopt._src.detection.values.UNCERTAIN` value of the output (None where the shift
cancelled) and records on the interpreter what cancelled it (softmax, mean-centring); it
raises Broken where the action changes the loss."""

ShiftInterpreter.RULES = SHIFT_RULES
