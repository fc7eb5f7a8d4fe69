"""The multiplicative interpreter: scale, rescale and linear candidates.

The leaf's units are multiplied by positive factors ``f``; every value of the graph is
tracked as ``f^d`` times its old value (a :class:`~ksbopt._src.detection.values.Scaled`),
with the axes along which ``f`` varies. Normalisation cancels the degree
(``x * rsqrt(mean(x^2))``: 1 - 1 = 0), a positively homogeneous activation keeps it
(``max(x, 0)``, leaky ReLU through ``select_n``), a later linear map whose contraction meets
the labelled axes *absorbs* it (the rescale / GL(k) partner, an
:class:`~ksbopt._src.detection.findings.Absorber`), and a reduction over labelled axes forces
the factor to be uniform over them (LayerNorm: one factor for the whole layer; GroupNorm: one
per channel group), by restarting with a coarser factor
(:class:`~ksbopt._src.detection.findings.NeedUniform`).

:data:`MULTIPLICATIVE_RULES` maps each primitive to its rule.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from ksbopt._src.detection.axis_labels import (
    axis_leaf,
    broadcast_labels,
    dot_labels,
    free_atoms,
    gather_offset_axes,
    has_free_atom,
    initial_labels,
    labelled_axes,
    leaf_atoms,
    leaf_axes,
    merge_labels,
    partner_axes,
    relabel,
)
from ksbopt._src.detection.findings import Absorber, Ambiguous, Broken, NeedUniform
from ksbopt._src.detection.graph import Node
from ksbopt._src.detection.graph_facts import GraphFacts
from ksbopt._src.detection.interpreter import (
    Interpreter,
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
    POOL,
    display_name,
)
from ksbopt._src.detection.values import Scaled, as_fraction, with_labels


class MultiplicativeInterpreter(Interpreter):
    """The multiplicative action on the unit axes ``unit_axes`` of ``leaf``.

    ``uniform[ax]`` holds the (stride, size) ranges of the unit index along ``ax`` that the
    factor must not depend on (found by earlier restarts). With ``reach=True`` it follows the
    leaf's units as far as they stay linear (degree 1), skipping what it cannot read, to index
    the partners of later candidates.
    """

    def __init__(
        self, facts: GraphFacts, leaf: int, unit_axes=(), uniform=None, reach: bool = False
    ):
        uniform = uniform or {}
        shape = facts.graph.leaf_vars[leaf].shape
        super().__init__(
            facts, leaf, Scaled(Fraction(1), initial_labels(shape, set(unit_axes), uniform))
        )
        self.uniform = uniform
        self.reach = reach
        self.absorbers: list[Absorber] = []
        self.nonmix: set[int] = set()  # unit axes that only allow diagonal factors
        self.need: set = set()  # (leaf_axis, stride, size) ranges reduced over
        self.eps: list[float] = []  # constants added to scaled values
        self.acts: set[str] = set()  # positively homogeneous activations met
        self.centred = False  # a difference of scaled values (LayerNorm rather than RMSNorm)
        self.reduced_batch = False  # a sum over the leading (batch) axis (BatchNorm)
        self.weightnorm = False  # a norm of the weights themselves
        self.snap: dict[int, frozenset] = {}  # reach: non-mixable axes per value

    def fail(self, msg: str):
        if self.need:
            raise NeedUniform(self.need)
        raise Broken(msg)

    def run(self):
        out = super().run()
        if self.need:
            raise NeedUniform(self.need)
        return out

    def step(self, node: Node, vals: list) -> list | None:
        if not self.reach:
            return super().step(node, vals)
        before = (len(self.need), len(self.absorbers))
        saved = set(self.nonmix)
        try:
            outs = super().step(node, vals)
        except (Broken, Ambiguous, NeedUniform):
            self.nonmix = saved
            return None
        if (len(self.need), len(self.absorbers)) != before:
            self.nonmix = saved
            self.need.clear()
            self.absorbers.clear()
            return None
        if any(not isinstance(o, Scaled) or o.deg != 1 for o in outs):
            self.nonmix = saved
            return None
        for o in node.outs:
            self.snap[id(o)] = frozenset(self.nonmix)
        return outs

    # ------------------------------------------------------------------ state updates

    def mark_nonmix(self, labels, axes=None) -> None:
        """The unit axes on ``labels``' axes ``axes`` (all if None) allow only diagonal factors."""
        for k, atoms in enumerate(labels):
            if axes is None or k in axes:
                self.nonmix |= leaf_axes(atoms)

    def mark_nonmix_where_varies(self, labels, other, out_shape) -> None:
        """Multiplied by ``other``: diagonal only along the axes where ``other`` varies."""
        for k in labelled_axes(labels):
            if self.facts.varies(other, k, out_shape):
                self.mark_nonmix(labels, {k})

    def note_reduced(self, atoms) -> None:
        """The factor must not vary along the free atoms of one axis (reduced over): the run
        ends with a restart (:class:`NeedUniform`) unless it breaks first."""
        for a in leaf_atoms(atoms):
            if a[3]:
                self.need.add((a[0], a[1], a[2]))

    def restart_if_reduced(self, atoms_per_axis) -> None:
        """Note these axes as reduced, and restart now if any range was noted."""
        for atoms in atoms_per_axis:
            self.note_reduced(atoms)
        if self.need:
            raise NeedUniform(self.need)

    def join_bias(self, pview, labels, o_shape, out_shape) -> bool:
        """Co-scale a bias-like leaf added to the candidate (its axes must align)."""
        q, qlab = pview
        if q == self.leaf:
            return False
        mapping = partner_axes(labels, broadcast_labels(qlab, o_shape, out_shape))
        if mapping is None:
            return False
        old = self.members.get(q)
        if old is not None and old != mapping:
            return False
        self.members[q] = mapping
        return True

    def find_absorber(self, s_lab, s_contract, s_batch, other, o_contract, o_batch):
        """A partner whose inverse action cancels the candidate in this contraction."""
        cands = []
        pv = self.facts.pview.get(id(other))
        if pv is not None:
            cands.append((pv[0], pv[1], {}, frozenset()))
        cands.extend(self.facts.reach_index.get(id(other), ()))
        for q, qlab, joined, q_nonmix in cands:
            if q == self.leaf or q in self.members:
                continue
            contract = _unit_map(s_lab, qlab, zip(s_contract, o_contract, strict=False))
            batch = _unit_map(s_lab, qlab, zip(s_batch, o_batch, strict=False))
            if contract is None or batch is None or not contract[0]:
                continue
            for a, qa in list(contract[0].items()) + list(batch[0].items()):
                if qa in q_nonmix:
                    self.nonmix.add(a)
            return Absorber(q, contract[0], batch[0], dict(joined), contract[1] or batch[1])
        return None


def _unit_map(s_lab, qlab, pairs) -> tuple[dict, bool] | None:
    """Candidate leaf axis -> partner leaf axis along paired axes of a contraction, and
    whether the unit meets only a sub-range of the partner's axis (a flatten: a real partner,
    but not one unit per partner index); None where they do not line up."""
    mapping, partial = {}, False
    for ks, ko in pairs:
        sa = leaf_atoms(s_lab[ks])
        if not sa:
            continue
        ca, pa = axis_leaf(sa), axis_leaf(leaf_atoms(qlab[ko]))
        if ca is None or pa is None or pa[1] % ca[1]:
            return None
        partial = partial or ca[1] != pa[1]
        mapping[ca[0]] = pa[0]
    return mapping, partial


# --------------------------------------------------------------------------- rules
#
# Each rule returns the Scaled value of the node's output (None: it no longer scales), or
# raises Broken / Ambiguous / NeedUniform.


def _layout(run, node, vals):
    """Same degree; the labels follow the axes."""
    labels = relabel(node, vals[0].labels)
    if labels is None:
        raise Ambiguous(f"{node.prim} that splits the unit axis irregularly")
    return with_labels(vals[0], labels)


def _unchanged(run, node, vals):
    """``neg``: the same scaled value."""
    return vals[0]


def _abs(run, node, vals):
    """Same degree; diagonal factors only (a rotation changes magnitudes)."""
    run.mark_nonmix(vals[0].labels)
    return vals[0]


def _sign(run, node, vals):
    """No longer scales; diagonal factors only."""
    run.mark_nonmix(vals[0].labels)


def _constant(run, node, vals):
    """A value that no longer scales (``is_finite``)."""


_POWERS = {
    "square": Fraction(2),
    "sqrt": Fraction(1, 2),
    "rsqrt": Fraction(-1, 2),
    "cbrt": Fraction(1, 3),
}


def _power(run, node, vals):
    """Degree times the (constant) exponent; None where it cancels to 0."""
    v = vals[0]
    if not isinstance(v, Scaled) or (node.prim == "pow" and vals[1] is not None):
        run.fail(f"{node.prim} of a scaled exponent")
    if node.prim == "integer_pow":
        power = Fraction(node.params["y"])
    elif node.prim == "pow":
        c = run.facts.constval.get(id(node.ins[1]))
        if c is None:
            run.fail("pow with a non-constant exponent")
        power = as_fraction(c)
    else:
        power = _POWERS[node.prim]
    run.mark_nonmix(v.labels)
    deg = v.deg * power
    return Scaled(deg, v.labels) if deg != 0 else None


def _mul_div(run, node, vals):
    """Degrees add (``mul``) or subtract (``div``); None where they cancel."""
    (a, b), (va, vb) = node.ins, vals
    out = node.outs[0]
    div = node.prim == "div"
    la = broadcast_labels(va.labels, a.shape, out.shape) if isinstance(va, Scaled) else None
    lb = broadcast_labels(vb.labels, b.shape, out.shape) if isinstance(vb, Scaled) else None
    if lb is None:
        run.mark_nonmix_where_varies(la, b, out.shape)
        return Scaled(va.deg, la)
    if la is None:
        if div:
            run.mark_nonmix(lb)
        else:
            run.mark_nonmix_where_varies(lb, a, out.shape)
        return Scaled(-vb.deg if div else vb.deg, lb)
    if free_atoms(la) != free_atoms(lb):
        run.fail("multiplies values scaled along different axes")
    deg = va.deg - vb.deg if div else va.deg + vb.deg
    run.mark_nonmix(la)
    if deg == 0:
        run.cancelled = True
        return None
    return Scaled(deg, merge_labels(la, lb))


def _scaled_alike(run, node, vals, msg):
    """Labels of two scaled operands (the first's, and both merged); they must scale alike."""
    (a, b), (va, vb) = node.ins, vals
    out = node.outs[0]
    la = broadcast_labels(va.labels, a.shape, out.shape)
    lb = broadcast_labels(vb.labels, b.shape, out.shape)
    if va.deg != vb.deg or free_atoms(la) != free_atoms(lb):
        run.fail(msg)
    return la, merge_labels(la, lb)


def _both_scaled(vals) -> bool:
    return isinstance(vals[0], Scaled) and isinstance(vals[1], Scaled)


def _add(run, node, vals):
    """Terms that scale alike; or plus a constant (an epsilon); or plus a bias leaf that is
    co-scaled with the candidate."""
    if _both_scaled(vals):
        _, labels = _scaled_alike(run, node, vals, "adds values that scale differently")
        if node.prim == "sub":
            run.centred = True
        return with_labels(vals[0], labels)
    s, sv, o = active_operand(node, vals, isinstance(vals[0], Scaled))
    out = node.outs[0]
    labels = broadcast_labels(sv.labels, s.shape, out.shape)
    c = run.facts.constval.get(id(o))
    if c is not None:
        if c != 0:
            run.eps.append(float(c))
        return with_labels(sv, labels)
    pv = run.facts.pview.get(id(o))
    if pv is not None and sv.deg == 1 and run.join_bias(pv, labels, o.shape, out.shape):
        return with_labels(sv, labels)
    run.fail("adds a term that does not scale with it (a skip connection?)")


def _max_min(run, node, vals):
    """Positively homogeneous with a threshold of 0 (ReLU) or +-inf; diagonal factors only."""
    if _both_scaled(vals):
        la, labels = _scaled_alike(run, node, vals, f"{node.prim} of values that scale differently")
        run.mark_nonmix(la)
        return with_labels(vals[0], labels)
    s, sv, o = active_operand(node, vals, isinstance(vals[0], Scaled))
    c = run.facts.constval.get(id(o))
    if c is None or not (c == 0 or np.isinf(c)):
        run.fail(f"{node.prim} with a threshold that is not 0")
    labels = broadcast_labels(sv.labels, s.shape, node.outs[0].shape)
    run.mark_nonmix(labels)
    if c == 0:
        run.acts.add("ReLU")
    return with_labels(sv, labels)


def _compare(run, node, vals):
    """A predicate that no longer scales, if both sides scale alike or one is compared with
    0; diagonal factors only."""
    if _both_scaled(vals):
        la, _ = _scaled_alike(run, node, vals, "compares values that scale differently")
        run.mark_nonmix(la)
        return None
    _, sv, o = active_operand(node, vals, isinstance(vals[0], Scaled))
    if run.facts.constval.get(id(o)) != 0:
        run.fail("compares with a threshold that is not 0")
    run.mark_nonmix(sv.labels)
    return None


def _select(run, node, vals):
    """Cases that scale alike (or are 0), picked by a predicate that does not scale: a
    piecewise linear activation (leaky ReLU); diagonal factors only."""
    out = node.outs[0]
    if vals[0] is not None:
        run.fail("selects by a scaled predicate")
    deg, labels = None, None
    for x, v in zip(node.ins[1:], vals[1:], strict=False):
        if v is None:
            if run.facts.constval.get(id(x)) != 0:
                run.fail("selects between a scaled value and one that does not scale")
            continue
        lab = broadcast_labels(v.labels, x.shape, out.shape)
        if deg is not None and (v.deg != deg or free_atoms(lab) != free_atoms(labels)):
            run.fail("selects between values that scale differently")
        deg = v.deg
        labels = lab if labels is None else merge_labels(labels, lab)
    run.mark_nonmix(labels)
    run.acts.add("piecewise linear (leaky ReLU)")
    return Scaled(deg, labels)


def _reduced(run, node, vals):
    """The value without the reduced axes; the factor must be uniform over them."""
    v, axes = vals[0], tuple(node.params["axes"])
    for k in axes:
        run.note_reduced(v.labels[k])
    return with_labels(v, tuple(lab for k, lab in enumerate(v.labels) if k not in axes))


def _reduce_sum(run, node, vals):
    """Same degree over the kept axes (notes a sum over the batch, or over the weights)."""
    axes, x = tuple(node.params["axes"]), node.ins[0]
    out = _reduced(run, node, vals)
    if 0 in axes and len(x.shape) > 1:
        run.reduced_batch = True
    if id(x) in run.facts.param_only:
        run.weightnorm = True  # a norm of the weights themselves
    return out


def _reduce_extreme(run, node, vals):
    """``reduce_max`` / ``reduce_min``: as a sum, with diagonal factors only."""
    out = _reduced(run, node, vals)
    run.mark_nonmix(vals[0].labels)
    return out


def _arg_extreme(run, node, vals):
    """``argmax`` / ``argmin``: an index that does not scale (uniform over the axes)."""
    _reduced(run, node, vals)


def _cumulative(run, node, vals):
    """Same value; uniform along the scanned axis (diagonal only unless a ``cumsum``)."""
    v = vals[0]
    run.note_reduced(v.labels[node.params["axis"]])
    if node.prim != "cumsum":
        run.mark_nonmix(v.labels)
    return v


def _pool(run, node, vals):
    """Same value where windows never span a unit axis (diagonal only unless a sum)."""
    v, x, out = vals[0], node.ins[0], node.outs[0]
    for k, w in enumerate(node.params["window_dimensions"]):
        if v.labels[k] and (w != 1 or x.shape[k] != out.shape[k]):
            raise Ambiguous(f"{node.prim} over a unit axis")
    if node.prim != "reduce_window_sum":
        run.mark_nonmix(v.labels)
    return v


def _dot(run, node, vals):
    """A contraction over the unit axis: absorbed by a partner (rescale / linear), or the
    factor must be uniform over it; else the labels move to the output."""
    if _both_scaled(vals):
        raise Ambiguous("dot_general of two scaled values")
    d = dot_operands(node, vals, isinstance(vals[0], Scaled))
    sv, lab = d.value, d.value.labels
    contracted_free = [k for k in d.contract if has_free_atom(lab[k])]
    free_elsewhere = any(has_free_atom(lab[k]) for k in d.free)
    if contracted_free and not free_elsewhere and sv.deg == 1:
        absorber = run.find_absorber(
            lab, d.contract, d.batch, d.other, d.other_contract, d.other_batch
        )
        if absorber is not None:
            run.absorbers.append(absorber)
            return None
    if contracted_free:
        run.restart_if_reduced(lab[k] for k in contracted_free)
    run.mark_nonmix(lab, set(d.batch))
    return with_labels(sv, dot_labels(lab, d.contract, d.batch, d.n_other_free, d.is_lhs))


def _conv(run, node, vals):
    """A scaled kernel: its output features scale. A scaled input: its features are
    absorbed by the kernel, kept per channel by a depthwise convolution, or made uniform."""
    (lhs, rhs), (vl, vr) = node.ins, vals
    p = node.params
    ls, rs, os_ = p["dimension_numbers"]
    fgc = p["feature_group_count"]
    if p["batch_group_count"] != 1 or _both_scaled(vals):
        raise Ambiguous("conv_general_dilated")
    labels = [()] * len(node.outs[0].shape)
    if isinstance(vr, Scaled):
        run.restart_if_reduced(vr.labels[k] for k in rs[1:])
        labels[os_[1]] = vr.labels[rs[0]]
        return Scaled(vr.deg, tuple(labels))
    lab = vl.labels
    if any(lab[k] for k in ls[2:]):
        raise Ambiguous("conv_general_dilated over a labelled spatial axis")
    labels[os_[0]] = lab[ls[0]]
    feat = lab[ls[1]]
    if not has_free_atom(feat):
        return Scaled(vl.deg, tuple(labels))
    if fgc == 1:
        if vl.deg == 1 and not labels[os_[0]]:
            absorber = run.find_absorber(lab, (ls[1],), (), rhs, (rs[1],), ())
            if absorber is not None:
                run.absorbers.append(absorber)
                return None
        run.note_reduced(feat)
        raise NeedUniform(run.need)
    if fgc == lhs.shape[ls[1]] and rhs.shape[rs[1]] == 1 and rhs.shape[rs[0]] == fgc:
        labels[os_[1]] = feat
        run.mark_nonmix(lab)
        return Scaled(vl.deg, tuple(labels))
    raise Ambiguous("grouped convolution of a scaled input")


def _gather(run, node, vals):
    """Whole slices along unit axes keep their labels; picking entries along one breaks."""
    if vals[1] is not None:
        run.fail("gathers with scaled indices")
    v, x, out = vals[0], node.ins[0], node.outs[0]
    dn = node.params["dimension_numbers"]
    for k in set(dn.start_index_map) | set(dn.collapsed_slice_dims):
        if v.labels[k]:
            run.fail("picks entries along the unit axis (gather)")
    labels = [()] * len(out.shape)
    for k, d in gather_offset_axes(dn, len(x.shape)):
        if v.labels[k]:
            if node.params["slice_sizes"][k] != x.shape[k]:
                raise Ambiguous("gather of part of a unit axis")
            labels[d] = v.labels[k]
    for k in getattr(dn, "operand_batching_dims", ()):
        if v.labels[k]:
            raise Ambiguous("batched gather along a unit axis")
    return with_labels(v, tuple(labels))


def _slice(run, node, vals):
    """``pad`` (with 0), ``slice``, ``rev``, ``dynamic_slice`` of axes that are not unit axes."""
    v, x, out = vals[0], node.ins[0], node.outs[0]
    if any(w is not None for w in vals[1:]):
        raise Ambiguous(node.prim)
    if node.prim == "pad" and run.facts.constval.get(id(node.ins[1])) != 0:
        run.fail("pads with a non-zero value")
    if node.prim == "rev":
        if any(v.labels[k] for k in node.params["dimensions"]):
            raise Ambiguous("rev along a unit axis")
        return v
    for k, lab in enumerate(v.labels):
        if lab and x.shape[k] != out.shape[k]:
            raise Ambiguous(f"{node.prim} of part of a unit axis")
    return Scaled(
        v.deg,
        tuple(lab if x.shape[k] == out.shape[k] else () for k, lab in enumerate(v.labels)),
    )


def _not_homogeneous(run, node, vals):
    """Breaks the action: not positively homogeneous."""
    run.fail(f"{display_name(node.prim)} is not positively homogeneous")


MULTIPLICATIVE_RULES = rule_table(
    (LAYOUT, _layout),
    ("neg", _unchanged),
    ("abs", _abs),
    ("sign", _sign),
    ("is_finite", _constant),
    ((*_POWERS, "integer_pow", "pow"), _power),
    (("mul", "div"), _mul_div),
    (ADD, _add),
    (("max", "min"), _max_min),
    ("select_n", _select),
    (COMPARE, _compare),
    ("reduce_sum", _reduce_sum),
    (("reduce_max", "reduce_min"), _reduce_extreme),
    (("argmax", "argmin"), _arg_extreme),
    (CUMULATIVE, _cumulative),
    (POOL, _pool),
    ("dot_general", _dot),
    ("conv_general_dilated", _conv),
    ("gather", _gather),
    (("pad", "slice", "rev", "dynamic_slice"), _slice),
    (BREAKING, _not_homogeneous),
)
"""Primitive -> rule of the multiplicative interpreter. A rule returns the
:class:`~ksbopt._src.detection.values.Scaled` value of the output (None where it no longer
scales) and records on the interpreter what it meets (non-mixable axes, epsilons,
activations, partners); it raises Broken where the action changes the loss."""

MultiplicativeInterpreter.RULES = MULTIPLICATIVE_RULES
