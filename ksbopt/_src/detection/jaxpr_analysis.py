"""Reading candidate symmetries off the computation graph of a loss.

:func:`analyse` traces a loss to a jaxpr, inlines nested calls (``jit``, ``custom_jvp``,
``custom_vjp``, ``checkpoint``), removes dead code (e.g. BatchNorm running-average updates)
and runs, for every parameter leaf that enters the loss multiplicatively, a small abstract
interpretation of the group action:

- **multiplicative** (scale, rescale, linear): the leaf's units are multiplied by positive
  factors ``f``; every value of the graph is tracked as ``f^d`` times its old value, with the
  axes along which ``f`` varies. Normalisation cancels the degree (``x * rsqrt(mean(x^2))``:
  1 - 1 = 0), a positively homogeneous activation keeps it (``max(x, 0)``, leaky ReLU through
  ``select_n``), a later linear map whose contraction meets the labelled axes *absorbs* it (the
  rescale / GL(k) partner), and a reduction over labelled axes forces the factor to be uniform
  over them (LayerNorm: one factor for the whole layer; GroupNorm: one per channel group).
- A ``select_n`` whose predicate is a constant (computed from literals only, e.g. the
  ``N - ddof > 0`` guard of ``jnp.var`` / ``jnp.std``) is read as the case it picks, in both
  modes; a predicate that depends on the inputs is never folded.
- **additive** (translation): a kernel's rows are shifted along the unit axis; the value is
  tracked as ``x + c delta`` with ``delta`` constant along the unit axis. Softmax, log-softmax,
  logsumexp and mean-centring cancel it.

The result is a list of :class:`Finding` (candidate groups, with the reason they should hold,
e.g. "BatchNorm epsilon=1e-05") and the leaves whose graph could not be read (an unknown
primitive, a loop), for which the caller enumerates candidates from the parameter tree. The
analysis only *proposes*: every candidate is then verified numerically by
:mod:`ksbopt._src.detection.detect`.

Group structure follows :ref:`symmetries` (Flax layout: the output unit is the last axis).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from fractions import Fraction
from typing import Any

import jax.extend.core as jcore
import numpy as np

# --------------------------------------------------------------------------- the graph


class V:
    """A value of the flattened graph (a fresh object per value, also per inlined call)."""

    __slots__ = ("__weakref__", "const", "dtype", "shape")

    def __init__(self, shape, dtype, const=None):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.const = const  # numpy value for literals and closed-over constants

    def __repr__(self):
        return f"V{self.shape}"


@dataclasses.dataclass
class Node:
    prim: str
    params: dict
    ins: list
    outs: list


_CALL_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
_CALL_PRIMS = {
    "pjit",
    "jit",
    "closed_call",
    "core_call",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
    "checkpoint",
    "remat",
    "remat2",
    "custom_lin",
}
_LOOP_PRIMS = {"scan", "while", "cond", "switch", "fori_loop", "map", "shard_map", "xla_pmap"}


@dataclasses.dataclass
class Graph:
    nodes: list[Node]
    leaf_vars: list[V]
    out: V
    opaque: list[str]  # loop / control-flow primitives found (on live paths)


def _aval_shape(x) -> tuple:
    aval = getattr(x, "aval", None)
    return tuple(getattr(aval, "shape", ()))


def _aval_dtype(x):
    return getattr(getattr(x, "aval", None), "dtype", None)


def _inline(jaxpr, consts, in_atoms, nodes):
    env: dict = {}
    for v, c in zip(jaxpr.constvars, consts, strict=False):
        env[v] = V(np.shape(c), getattr(c, "dtype", None), np.asarray(c))
    for v, a in zip(jaxpr.invars, in_atoms, strict=False):
        env[v] = a

    def resolve(x):
        if isinstance(x, jcore.Literal):
            return V(np.shape(x.val), _aval_dtype(x), np.asarray(x.val))
        return env[x]

    for eqn in jaxpr.eqns:
        ins = [resolve(x) for x in eqn.invars]
        name = eqn.primitive.name
        sub = None
        if name in _CALL_PRIMS:
            for key in _CALL_KEYS:
                if key in eqn.params:
                    sub = eqn.params[key]
                    break
        if sub is not None:
            if isinstance(sub, jcore.ClosedJaxpr):
                outs = _inline(sub.jaxpr, sub.consts, ins, nodes)
            else:
                outs = _inline(sub, [], ins, nodes)
            for o, a in zip(eqn.outvars, outs, strict=False):
                env[o] = a
            continue
        outs = [V(_aval_shape(o), _aval_dtype(o)) for o in eqn.outvars]
        for o, a in zip(eqn.outvars, outs, strict=False):
            env[o] = a
        nodes.append(Node(name, dict(eqn.params), ins, outs))
    return [resolve(x) for x in jaxpr.outvars]


def build_graph(closed, n_leaves: int) -> Graph:
    """Flatten a ``ClosedJaxpr`` whose first ``n_leaves`` invars are the parameter leaves."""
    nodes: list[Node] = []
    jaxpr = closed.jaxpr
    in_atoms = [V(_aval_shape(v), _aval_dtype(v)) for v in jaxpr.invars]
    outs = _inline(jaxpr, closed.consts, in_atoms, nodes)
    out = outs[0]
    # Dead-code elimination: keep nodes that feed the loss (BatchNorm running averages,
    # aux outputs and debugging values are dropped).
    live = {id(out)}
    kept = []
    for node in reversed(nodes):
        if any(id(o) in live for o in node.outs):
            kept.append(node)
            live.update(id(i) for i in node.ins)
    kept.reverse()
    opaque = sorted({n.prim for n in kept if n.prim in _LOOP_PRIMS})
    return Graph(kept, in_atoms[:n_leaves], out, opaque)


# --------------------------------------------------------------------------- axis labels
#
# A label says which part of a parameter leaf's unit index an axis of a value carries. An
# axis holds a row-major list of atoms (leaf_axis, stride, size, free): the unit index along
# leaf axis ``leaf_axis`` contributes ``(u // stride) % size``. ``leaf_axis=None`` is an
# unlabelled chunk. ``free=False`` marks a part of the unit index the factor must not depend
# on (it was reduced over, e.g. the features of a LayerNorm, or the channels inside a group).

Atom = tuple  # (leaf_axis | None, stride, size, free)
Labels = tuple  # one tuple of atoms per axis of the value


def _canon_axis(atoms) -> tuple:
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
    """Labels after a row-major reshape, or ``None`` where atoms do not line up."""
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


def has_free(labels: Labels) -> bool:
    return any(atoms for atoms in free_atoms(labels))


def labelled_axes(labels: Labels) -> list[int]:
    return [k for k, atoms in enumerate(labels) if any(a[0] is not None for a in atoms)]


def _axis_leaf(atoms) -> tuple[int, int] | None:
    """(leaf_axis, size) if the atoms of one axis cover it from one leaf axis, else None."""
    axes = {a[0] for a in atoms}
    if len(axes) != 1 or None in axes:
        return None
    return next(iter(axes)), math.prod(a[2] for a in atoms)


def initial_labels(shape, unit_axes, uniform: dict[int, set]) -> Labels:
    """Labels of a leaf whose units live on ``unit_axes``, with uniform parts split off.

    ``uniform[ax]`` holds (stride, size) ranges of the unit index along ``ax`` that the factor
    must not depend on.
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


# --------------------------------------------------------------------------- layout ops

LAYOUT = {
    "reshape",
    "transpose",
    "broadcast_in_dim",
    "squeeze",
    "convert_element_type",
    "copy",
    "copy_p",
    "reduce_precision",
    "stop_gradient",
}


def relabel(node: Node, labels: Labels) -> Labels | None:
    """Labels of the output of a layout primitive (one array input), None if lost."""
    p, x, y = node.params, node.ins[0], node.outs[0]
    name = node.prim
    if name in ("convert_element_type", "copy", "copy_p", "reduce_precision", "stop_gradient"):
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


def _bcast_labels(labels: Labels, shape, out_shape) -> Labels:
    """Labels of an operand of an elementwise op, aligned with the output."""
    if len(shape) == 0:
        return tuple(() for _ in out_shape)
    return tuple(lab if n == m else () for lab, n, m in zip(labels, shape, out_shape, strict=False))


# --------------------------------------------------------------------------- results


class Broken(Exception):
    """The candidate action changes the loss (with a reason)."""


class Ambiguous(Exception):
    """The graph cannot be read for this candidate (with the primitive)."""


class NeedUniform(Exception):
    """Restart with a coarser factor: these (leaf_axis, stride, size) ranges are reduced."""

    def __init__(self, ranges):
        super().__init__(ranges)
        self.ranges = ranges


@dataclasses.dataclass
class Absorber:
    """A partner whose inverse action compensates the candidate (rescale / linear)."""

    leaf: int
    contract: dict  # candidate leaf axis -> partner leaf axis (the shared unit axis)
    heads: dict  # candidate leaf axis -> partner leaf axis (batched, never mixed)
    joined: dict  # partner's own co-transformed leaves: leaf -> {leaf axis: partner axis}
    partial: bool = False  # the unit meets several entries of the partner's axis


@dataclasses.dataclass
class Finding:
    """A candidate symmetry read off the graph.

    Attributes:
      kind: "scale", "rescale", "linear" or "translation".
      leaf: the leaf the candidate starts from (a kernel, a normalisation scale, ...).
      unit_axes: the leaf's unit axes.
      members: co-transformed leaves (the leaf itself and its biases): leaf -> {leaf axis:
        axis of ``leaf``}.
      free: per unit axis of ``leaf``, the atoms the factor depends on, ((stride, size), ...).
      absorbers: partners (rescale / linear).
      nonmix: unit axes of ``leaf`` that only allow diagonal (per unit) factors.
      reason: why it should hold, e.g. "BatchNorm epsilon=1e-05".
      approximate: True when a constant (epsilon) makes it hold only approximately.
      certain: False when the graph suggests but does not establish it (verified anyway).
    """

    kind: str
    leaf: int
    unit_axes: tuple
    members: dict
    free: dict
    absorbers: list
    nonmix: frozenset
    reason: str
    approximate: bool
    certain: bool = True


@dataclasses.dataclass
class Analysis:
    findings: list[Finding]
    ambiguous: dict  # leaf -> reason (candidates for it come from the parameter tree)
    broken: dict  # (leaf, kind) -> reason
    notes: list[str]
    starts: dict  # leaf -> unit axes of its first multiplicative use


# --------------------------------------------------------------------------- abstract values


@dataclasses.dataclass(frozen=True)
class Sc:
    """Multiplied by f^deg, f varying along the free atoms of ``labels``."""

    deg: Fraction
    labels: Labels


@dataclasses.dataclass(frozen=True)
class Sh:
    """Shifted by coef * delta; delta is constant along the atoms of ``labels``."""

    coef: Fraction
    labels: Labels


@dataclasses.dataclass(frozen=True)
class Mu:
    """Multiplied by exp(coef * delta) (the exponential of a shift)."""

    coef: Fraction
    labels: Labels


class _Uncertain:
    """Might still be invariant (e.g. E[x^2] - E[x]^2 of a shifted x): verify numerically."""

    labels = None

    def __repr__(self):
        return "U"


U = _Uncertain()

_BREAKING = {
    "exp": "exp",
    "exp2": "exp",
    "log": "log",
    "log1p": "log1p",
    "expm1": "expm1",
    "tanh": "tanh",
    "logistic": "sigmoid",
    "erf": "erf (GELU)",
    "erfc": "erfc",
    "erf_inv": "erf_inv",
    "sin": "sin",
    "cos": "cos",
    "tan": "tan",
    "atan": "atan",
    "asin": "asin",
    "acos": "acos",
    "sinh": "sinh",
    "cosh": "cosh",
    "asinh": "asinh",
    "acosh": "acosh",
    "atanh": "atanh",
    "lgamma": "lgamma",
    "digamma": "digamma",
    "floor": "floor",
    "ceil": "ceil",
    "round": "round",
    "atan2": "atan2",
    "rem": "rem",
    "logaddexp": "logaddexp",
    "reduce_prod": "reduce_prod",
    "cumprod": "cumprod",
    "clamp": "clamp",
    "nextafter": "nextafter",
    "integer_pow_neg": "pow",
}
_COMPARE = {"gt", "ge", "lt", "le", "eq", "ne"}
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "argmax", "argmin"}
_CUMULATIVE = {"cumsum", "cummax", "cummin", "cumlogsumexp"}
_POOL = {"reduce_window_sum", "reduce_window_max", "reduce_window_min"}
_UNARY_CONST = {
    "neg": np.negative,
    "sqrt": np.sqrt,
    "rsqrt": lambda x: 1 / np.sqrt(x),
    "exp": np.exp,
    "log": np.log,
    "abs": np.abs,
    "square": np.square,
}
_BINARY_CONST = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "max": np.maximum,
    "min": np.minimum,
}
_COMPARE_CONST = {
    "gt": np.greater,
    "ge": np.greater_equal,
    "lt": np.less,
    "le": np.less_equal,
    "eq": np.equal,
    "ne": np.not_equal,
}
_SKIP_CONST = LAYOUT | {"broadcast_in_dim"}
_LINEARISH = {
    "add",
    "sub",
    "add_any",
    "neg",
    "reduce_sum",
    "mul",
    "div",
    "dot_general",
    "square",
    "integer_pow",
    "copy",
    "copy_p",
    "conv_general_dilated",
}


def _frac(x) -> Fraction:
    return Fraction(x).limit_denominator(1 << 16)


class _Run:
    """One abstract interpretation of a candidate action over the graph."""

    def __init__(
        self,
        an: Analyzer,
        leaf: int,
        mode: str,
        unit_axes=(),
        uniform=None,
        axis: int | None = None,
        reach: bool = False,
    ):
        self.an = an
        self.leaf = leaf
        self.mode = mode  # "mult" or "shift"
        self.reach = reach
        self.uniform = uniform or {}
        shape = an.graph.leaf_vars[leaf].shape
        self.members: dict[int, dict[int, int]] = {leaf: {a: a for a in range(len(shape))}}
        self.absorbers: list[Absorber] = []
        self.nonmix: set[int] = set()
        self.need: set = set()
        self.eps: list[float] = []
        self.acts: set[str] = set()
        self.centred = False
        self.cancelled = False
        self.reduced_batch = False
        self.weightnorm = False
        self.softmax = False
        self.centring = False
        self.env: dict[int, Any] = {}
        lv = an.graph.leaf_vars[leaf]
        if mode == "mult":
            self.env[id(lv)] = Sc(Fraction(1), initial_labels(shape, set(unit_axes), self.uniform))
        else:
            labels = [()] * len(shape)
            labels[axis] = ((axis, 1, shape[axis], True),)
            self.env[id(lv)] = Sh(Fraction(1), tuple(labels))
        self.snap: dict[int, frozenset] = {}  # reach mode: non-mixable axes per value

    # ------------------------------------------------------------------ helpers

    def _break(self, msg):
        if self.need:
            raise NeedUniform(self.need)
        raise Broken(msg)

    def _cand_axes(self, atoms) -> set:
        return {a[0] for a in atoms if a[0] is not None and a[0] >= 0}

    def _mark_nonmix(self, labels, axes=None):
        for k, atoms in enumerate(labels):
            if axes is None or k in axes:
                self.nonmix |= self._cand_axes(atoms)

    def _need_from(self, atoms):
        for a in atoms:
            if a[0] is not None and a[0] >= 0 and a[3]:
                self.need.add((a[0], a[1], a[2]))

    def run(self):
        graph = self.an.graph
        for node in graph.nodes:
            vals = [self.env.get(id(x)) for x in node.ins]
            if all(v is None for v in vals):
                continue
            if self.reach:
                before = (len(self.need), len(self.absorbers))
                saved = set(self.nonmix)
                try:
                    outs = self.rule(node, vals)
                except (Broken, Ambiguous, NeedUniform):
                    self.nonmix = saved
                    continue
                if (len(self.need), len(self.absorbers)) != before:
                    self.nonmix = saved
                    self.need.clear()
                    del self.absorbers[:]
                    continue
                if any(not isinstance(o, Sc) or o.deg != 1 for o in outs):
                    self.nonmix = saved
                    continue
                for o in node.outs:
                    self.snap[id(o)] = frozenset(self.nonmix)
            else:
                outs = self.rule(node, vals)
            for o, val in zip(node.outs, outs, strict=False):
                if val is not None:
                    self.env[id(o)] = val
        if self.need:
            raise NeedUniform(self.need)
        return self.env.get(id(graph.out))

    def rule(self, node: Node, vals) -> list:
        case = self.an.selected_case(node)
        if case is not None:
            return [vals[1 + case]]  # an input-independent predicate: the case it picks
        if self.mode == "mult":
            return [self._mult(node, vals)]
        if any(v is U for v in vals):
            return [self._uncertain(node, vals)]
        return [self._shift(node, vals)]

    def _uncertain(self, node: Node, vals):
        """Polynomials of a shift may still cancel (E[x^2] - E[x]^2); nonlinear maps do not."""
        name = node.prim
        if name == "sub" and self._fast_variance(*node.ins):
            self.centring = True
            return None
        if name in ("div",) and vals[1] is not None:
            self._break("divides by a value that depends on the shift")
        if name in LAYOUT or name in _LINEARISH:
            return U
        self._break(f"{_BREAKING.get(name, name)} of a value that depends on the shift nonlinearly")

    def _source(self, v: V):
        node = self.an.producer.get(id(v))
        while node is not None and node.prim in ("convert_element_type", "copy"):
            node = self.an.producer.get(id(node.ins[0]))
        return node

    def _mean_base(self, v: V):
        """(base, axes) when v = reduce_sum(base, axes) / count."""
        node = self._source(v)
        if node is None or node.prim not in ("div", "mul"):
            return None
        c = self.an.constval.get(id(node.ins[1]))
        if c is None or c == 0:
            return None
        n = c if node.prim == "div" else 1 / c
        red = self._source(node.ins[0])
        if red is None or red.prim != "reduce_sum":
            return None
        axes = tuple(red.params["axes"])
        base = red.ins[0]
        if not math.isclose(math.prod(base.shape[k] for k in axes), n, rel_tol=1e-6):
            return None
        return base, axes

    def _square_base(self, v: V):
        node = self._source(v)
        if node is None:
            return None
        if node.prim == "square" or (node.prim == "integer_pow" and node.params["y"] == 2):
            return node.ins[0]
        if node.prim == "mul" and node.ins[0] is node.ins[1]:
            return node.ins[0]
        return None

    def _fast_variance(self, a: V, b: V) -> bool:
        """a - b == mean(x^2) - mean(x)^2 for a shifted x, constant along the mean's axes."""
        ma = self._mean_base(a)
        sq_b = self._square_base(b)
        if ma is None or sq_b is None:
            return False
        x = self._square_base(ma[0])
        mb = self._mean_base(sq_b)
        if x is None or mb is None or mb[0] is not x or mb[1] != ma[1]:
            return False
        val = self.env.get(id(x))
        return isinstance(val, Sh) and all(
            self._const_along(val.labels[k], x.shape[k]) for k in ma[1]
        )

    # ------------------------------------------------------------------ multiplicative

    def _mult(self, node: Node, vals):
        name, ins = node.prim, node.ins
        out = node.outs[0]
        an = self.an
        if name in LAYOUT:
            v = vals[0]
            labels = relabel(node, v.labels)
            if labels is None:
                raise Ambiguous(f"{name} that splits the unit axis irregularly")
            return Sc(v.deg, labels)
        if name in ("neg", "reduce_precision", "copy"):
            return vals[0]
        if name == "abs":
            self._mark_nonmix(vals[0].labels)
            return vals[0]
        if name == "sign":
            self._mark_nonmix(vals[0].labels)
            return None
        if name == "is_finite":
            return None
        if name in ("square", "integer_pow", "sqrt", "rsqrt", "cbrt", "pow"):
            v = vals[0]
            if not isinstance(v, Sc) or (name == "pow" and vals[1] is not None):
                self._break(f"{name} of a scaled exponent")
            power = {
                "square": Fraction(2),
                "sqrt": Fraction(1, 2),
                "rsqrt": Fraction(-1, 2),
                "cbrt": Fraction(1, 3),
            }.get(name)
            if name == "integer_pow":
                power = Fraction(node.params["y"])
            if name == "pow":
                c = an.constval.get(id(ins[1]))
                if c is None:
                    self._break("pow with a non-constant exponent")
                power = _frac(c)
            self._mark_nonmix(v.labels)
            deg = v.deg * power
            return Sc(deg, v.labels) if deg != 0 else None
        if name in ("mul", "div"):
            return self._mult_muldiv(node, vals)
        if name in ("add", "sub", "add_any"):
            return self._mult_add(node, vals)
        if name in ("max", "min"):
            return self._mult_max(node, vals)
        if name == "select_n":
            return self._mult_select(node, vals)
        if name in _COMPARE:
            return self._mult_compare(node, vals)
        if name in _REDUCE:
            v = vals[0]
            axes = tuple(node.params["axes"])
            for k in axes:
                self._need_from(v.labels[k])
            if name in ("argmax", "argmin"):
                return None
            if name == "reduce_sum":
                if 0 in axes and len(ins[0].shape) > 1:
                    self.reduced_batch = True
                if id(ins[0]) in an.param_only:
                    self.weightnorm = True  # a norm of the weights themselves
            if name != "reduce_sum":
                self._mark_nonmix(v.labels)
            return Sc(v.deg, tuple(lab for k, lab in enumerate(v.labels) if k not in axes))
        if name in _CUMULATIVE:
            v = vals[0]
            k = node.params["axis"]
            self._need_from(v.labels[k])
            if name != "cumsum":
                self._mark_nonmix(v.labels)
            return v
        if name in _POOL:
            v = vals[0]
            dims = node.params["window_dimensions"]
            for k, w in enumerate(dims):
                if v.labels[k] and (w != 1 or ins[0].shape[k] != out.shape[k]):
                    raise Ambiguous(f"{name} over a unit axis")
            if name != "reduce_window_sum":
                self._mark_nonmix(v.labels)
            return Sc(v.deg, v.labels)
        if name == "dot_general":
            return self._mult_dot(node, vals)
        if name == "conv_general_dilated":
            return self._mult_conv(node, vals)
        if name == "gather":
            return self._mult_gather(node, vals)
        if name in ("pad", "slice", "rev", "dynamic_slice"):
            return self._mult_slice(node, vals)
        if name in _BREAKING:
            self._break(f"{_BREAKING[name]} is not positively homogeneous")
        raise Ambiguous(name)

    def _mult_muldiv(self, node, vals):
        (a, b), (va, vb) = node.ins, vals
        out = node.outs[0]
        div = node.prim == "div"
        la = _bcast_labels(va.labels, a.shape, out.shape) if isinstance(va, Sc) else None
        lb = _bcast_labels(vb.labels, b.shape, out.shape) if isinstance(vb, Sc) else None
        if la is not None and lb is None:
            for k in labelled_axes(la):
                if self.an.varies(b, k, out.shape):
                    self._mark_nonmix(la, {k})
            return Sc(va.deg, la)
        if la is None and lb is not None:
            if div:
                self._mark_nonmix(lb)
            else:
                for k in labelled_axes(lb):
                    if self.an.varies(a, k, out.shape):
                        self._mark_nonmix(lb, {k})
            return Sc(-vb.deg if div else vb.deg, lb)
        if free_atoms(la) != free_atoms(lb):
            self._break("multiplies values scaled along different axes")
        deg = va.deg - vb.deg if div else va.deg + vb.deg
        self._mark_nonmix(la)
        if deg == 0:
            self.cancelled = True
            return None
        return Sc(deg, tuple(x or y for x, y in zip(la, lb, strict=False)))

    def _mult_add(self, node, vals):
        (a, b), (va, vb) = node.ins, vals
        out = node.outs[0]
        if isinstance(va, Sc) and isinstance(vb, Sc):
            la = _bcast_labels(va.labels, a.shape, out.shape)
            lb = _bcast_labels(vb.labels, b.shape, out.shape)
            if va.deg != vb.deg or free_atoms(la) != free_atoms(lb):
                self._break("adds values that scale differently")
            if node.prim == "sub":
                self.centred = True
            return Sc(va.deg, tuple(x or y for x, y in zip(la, lb, strict=False)))
        s, sv, o = (a, va, b) if isinstance(va, Sc) else (b, vb, a)
        labels = _bcast_labels(sv.labels, s.shape, out.shape)
        c = self.an.constval.get(id(o))
        if c is not None:
            if c != 0:
                self.eps.append(float(c))
            return Sc(sv.deg, labels)
        pv = self.an.pview.get(id(o))
        if pv is not None and sv.deg == 1 and self._join(pv, labels, o.shape, out.shape):
            return Sc(sv.deg, labels)
        self._break("adds a term that does not scale with it (a skip connection?)")

    def _join(self, pv, labels, o_shape, out_shape) -> bool:
        """Co-scale a bias-like leaf added to the candidate (its axes must align)."""
        q, qlab = pv
        if q == self.leaf:
            return False
        qlab = _bcast_labels(qlab, o_shape, out_shape)
        mapping: dict[int, int] = {}
        for k, atoms in enumerate(labels):
            cand = [x for x in atoms if x[0] is not None and x[0] >= 0]
            mine = [x for x in qlab[k] if x[0] is not None]
            if not cand:
                continue
            if not mine:
                if any(x[3] for x in cand):
                    return False  # the bias is constant where the factor varies
                continue
            ca, pa = _axis_leaf(cand), _axis_leaf(mine)
            if ca is None or pa is None or ca[1] != pa[1]:
                return False
            if mapping.get(pa[0], ca[0]) != ca[0]:
                return False
            mapping[pa[0]] = ca[0]
        old = self.members.get(q)
        if old is not None and old != mapping:
            return False
        self.members[q] = mapping
        return True

    def _mult_max(self, node, vals):
        (a, b), (va, vb) = node.ins, vals
        out = node.outs[0]
        if isinstance(va, Sc) and isinstance(vb, Sc):
            la = _bcast_labels(va.labels, a.shape, out.shape)
            lb = _bcast_labels(vb.labels, b.shape, out.shape)
            if va.deg != vb.deg or free_atoms(la) != free_atoms(lb):
                self._break(f"{node.prim} of values that scale differently")
            self._mark_nonmix(la)
            return Sc(va.deg, tuple(x or y for x, y in zip(la, lb, strict=False)))
        s, sv, o = (a, va, b) if isinstance(va, Sc) else (b, vb, a)
        c = self.an.constval.get(id(o))
        if c is None or not (c == 0 or np.isinf(c)):
            self._break(f"{node.prim} with a threshold that is not 0")
        labels = _bcast_labels(sv.labels, s.shape, out.shape)
        self._mark_nonmix(labels)
        if c == 0:
            self.acts.add("ReLU")
        return Sc(sv.deg, labels)

    def _mult_select(self, node, vals):
        out = node.outs[0]
        if vals[0] is not None:
            self._break("selects by a scaled predicate")
        deg, labels = None, None
        for x, v in zip(node.ins[1:], vals[1:], strict=False):
            if v is None:
                if self.an.constval.get(id(x)) != 0:
                    self._break("selects between a scaled value and one that does not scale")
                continue
            lab = _bcast_labels(v.labels, x.shape, out.shape)
            if deg is not None and (v.deg != deg or free_atoms(lab) != free_atoms(labels)):
                self._break("selects between values that scale differently")
            deg = v.deg
            labels = (
                lab if labels is None else tuple(p or q for p, q in zip(labels, lab, strict=False))
            )
        self._mark_nonmix(labels)
        self.acts.add("piecewise linear (leaky ReLU)")
        return Sc(deg, labels)

    def _mult_compare(self, node, vals):
        (a, b), (va, vb) = node.ins, vals
        out = node.outs[0]
        if isinstance(va, Sc) and isinstance(vb, Sc):
            la = _bcast_labels(va.labels, a.shape, out.shape)
            lb = _bcast_labels(vb.labels, b.shape, out.shape)
            if va.deg != vb.deg or free_atoms(la) != free_atoms(lb):
                self._break("compares values that scale differently")
            self._mark_nonmix(la)
            return None
        _s, sv, o = (a, va, b) if isinstance(va, Sc) else (b, vb, a)
        if self.an.constval.get(id(o)) != 0:
            self._break("compares with a threshold that is not 0")
        self._mark_nonmix(sv.labels)
        return None

    def _mult_gather(self, node, vals):
        if vals[1] is not None:
            self._break("gathers with scaled indices")
        v, x, out = vals[0], node.ins[0], node.outs[0]
        dn = node.params["dimension_numbers"]
        sizes = node.params["slice_sizes"]
        for k in set(dn.start_index_map) | set(dn.collapsed_slice_dims):
            if v.labels[k]:
                self._break("picks entries along the unit axis (gather)")
        skip = set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()))
        kept = [k for k in range(len(x.shape)) if k not in skip]
        labels = [()] * len(out.shape)
        for k, d in zip(kept, dn.offset_dims, strict=False):
            if v.labels[k]:
                if sizes[k] != x.shape[k]:
                    raise Ambiguous("gather of part of a unit axis")
                labels[d] = v.labels[k]
        for k in getattr(dn, "operand_batching_dims", ()):
            if v.labels[k]:
                raise Ambiguous("batched gather along a unit axis")
        return Sc(v.deg, tuple(labels))

    def _mult_slice(self, node, vals):
        v, x, out = vals[0], node.ins[0], node.outs[0]
        if any(w is not None for w in vals[1:]):
            raise Ambiguous(node.prim)
        if node.prim == "pad" and self.an.constval.get(id(node.ins[1])) != 0:
            self._break("pads with a non-zero value")
        if node.prim == "rev":
            if any(v.labels[k] for k in node.params["dimensions"]):
                raise Ambiguous("rev along a unit axis")
            return v
        for k, lab in enumerate(v.labels):
            if lab and x.shape[k] != out.shape[k]:
                raise Ambiguous(f"{node.prim} of part of a unit axis")
        return Sc(
            v.deg,
            tuple(lab if x.shape[k] == out.shape[k] else () for k, lab in enumerate(v.labels)),
        )

    def _absorb(self, s_lab, s_contract, s_batch, other, o_contract, o_batch):
        """A partner whose inverse action cancels the candidate in this contraction."""
        cands = []
        pv = self.an.pview.get(id(other))
        if pv is not None:
            cands.append((pv[0], pv[1], {}, frozenset()))
        cands.extend(self.an.reach_index.get(id(other), ()))
        for q, qlab, joined, q_nonmix in cands:
            if q == self.leaf or q in self.members:
                continue
            maps = []
            ok, partial = True, False
            for pairs in (
                zip(s_contract, o_contract, strict=False),
                zip(s_batch, o_batch, strict=False),
            ):
                m: dict[int, int] = {}
                for ks, ko in pairs:
                    sa = [x for x in s_lab[ks] if x[0] is not None and x[0] >= 0]
                    if not sa:
                        continue
                    oa = [x for x in qlab[ko] if x[0] is not None]
                    ca, pa = _axis_leaf(sa), _axis_leaf(oa)
                    if ca is None or pa is None:
                        ok = False
                        break
                    if ca[1] != pa[1]:
                        # The unit meets a sub-range of the partner's axis (a flatten):
                        # a real partner, but not one unit per partner index.
                        if pa[1] % ca[1]:
                            ok = False
                            break
                        partial = True
                    m[ca[0]] = pa[0]
                maps.append(m)
                if not ok:
                    break
            if ok and maps[0]:
                for a, qa in list(maps[0].items()) + list(maps[1].items()):
                    if qa in q_nonmix:
                        self.nonmix.add(a)
                return Absorber(q, maps[0], maps[1], dict(joined), partial)
        return None

    def _mult_dot(self, node, vals):
        (lhs, rhs), (vl, vr) = node.ins, vals
        (lc, rc), (lb, rb) = node.params["dimension_numbers"]
        if isinstance(vl, Sc) and isinstance(vr, Sc):
            raise Ambiguous("dot_general of two scaled values")
        if isinstance(vl, Sc):
            s, sv, o, sc, sb, oc, ob = lhs, vl, rhs, lc, lb, rc, rb
        else:
            s, sv, o, sc, sb, oc, ob = rhs, vr, lhs, rc, rb, lc, lb
        lab = sv.labels
        s_free = [k for k in range(len(s.shape)) if k not in sc and k not in sb]
        n_o_free = len(o.shape) - len(oc) - len(ob)
        contracted_free = [k for k in sc if any(x[3] for x in lab[k] if x[0] is not None)]
        free_elsewhere = any(any(x[3] for x in lab[k] if x[0] is not None) for k in s_free)
        if contracted_free and not free_elsewhere and sv.deg == 1:
            absorber = self._absorb(lab, sc, sb, o, oc, ob)
            if absorber is not None:
                self.absorbers.append(absorber)
                return None
        if contracted_free:
            for k in contracted_free:
                self._need_from(lab[k])
            if self.need:
                raise NeedUniform(self.need)
        batch_labels = [lab[k] for k in sb]
        self._mark_nonmix(lab, set(sb))
        free_labels = [lab[k] for k in s_free]
        if s is lhs:
            labels = batch_labels + free_labels + [()] * n_o_free
        else:
            labels = batch_labels + [()] * n_o_free + free_labels
        return Sc(sv.deg, tuple(labels))

    def _mult_conv(self, node, vals):
        (lhs, rhs), (vl, vr) = node.ins, vals
        p = node.params
        ls, rs, os_ = p["dimension_numbers"]
        fgc, bgc = p["feature_group_count"], p["batch_group_count"]
        out = node.outs[0]
        if bgc != 1 or (isinstance(vl, Sc) and isinstance(vr, Sc)):
            raise Ambiguous("conv_general_dilated")
        labels = [()] * len(out.shape)
        if isinstance(vr, Sc):
            for k in rs[1:]:
                self._need_from(vr.labels[k])
            if self.need:
                raise NeedUniform(self.need)
            labels[os_[1]] = vr.labels[rs[0]]
            return Sc(vr.deg, tuple(labels))
        lab = vl.labels
        if any(lab[k] for k in ls[2:]):
            raise Ambiguous("conv_general_dilated over a labelled spatial axis")
        labels[os_[0]] = lab[ls[0]]
        feat = lab[ls[1]]
        if any(x[3] for x in feat if x[0] is not None):
            if fgc == 1:
                if vl.deg == 1 and not labels[os_[0]]:
                    absorber = self._absorb(lab, (ls[1],), (), rhs, (rs[1],), ())
                    if absorber is not None:
                        self.absorbers.append(absorber)
                        return None
                self._need_from(feat)
                raise NeedUniform(self.need)
            if fgc == lhs.shape[ls[1]] and rhs.shape[rs[1]] == 1 and rhs.shape[rs[0]] == fgc:
                labels[os_[1]] = feat
                self._mark_nonmix(lab)
                return Sc(vl.deg, tuple(labels))
            raise Ambiguous("grouped convolution of a scaled input")
        return Sc(vl.deg, tuple(labels))

    # ------------------------------------------------------------------ additive

    def _const_along(self, atoms, n) -> bool:
        return n == 1 or (
            bool(atoms)
            and all(x[0] is not None for x in atoms)
            and math.prod(x[2] for x in atoms) == n
        )

    def _shift_labels(self, v, x, out_shape) -> Labels:
        """Labels of a shifted operand aligned with an elementwise output (broadcast = const)."""
        if len(x.shape) == 0:
            return tuple(((-1, 0, n, True),) if n > 1 else () for n in out_shape)
        return tuple(
            lab if n == m else (((-1, 0, m, True),) if m > 1 else ())
            for lab, n, m in zip(v.labels, x.shape, out_shape, strict=False)
        )

    def _shift(self, node: Node, vals):
        name, ins, out = node.prim, node.ins, node.outs[0]
        an = self.an
        v = vals[0]
        if name in LAYOUT:
            if name == "broadcast_in_dim":
                x = ins[0]
                labels = [((-1, 0, n, True),) if n > 1 else () for n in out.shape]
                for i, d in enumerate(node.params["broadcast_dimensions"]):
                    if x.shape[i] == out.shape[d]:
                        labels[d] = v.labels[i]
                return type(v)(v.coef, tuple(labels))
            labels = relabel(node, v.labels)
            if labels is None:
                raise Ambiguous(name)
            return type(v)(v.coef, labels)
        if name == "neg":
            return Sh(-v.coef, v.labels) if isinstance(v, Sh) else self._break("neg of exp")
        if name == "is_finite":
            return None
        if name == "exp" and isinstance(v, Sh):
            self.softmax = True
            return Mu(v.coef, v.labels)
        if name == "log" and isinstance(v, Mu):
            return Sh(v.coef, v.labels)
        if name == "abs" and isinstance(v, Mu):
            return v
        if name in ("square", "integer_pow", "sqrt", "rsqrt"):
            if isinstance(v, Mu):
                power = {"square": 2, "sqrt": Fraction(1, 2), "rsqrt": Fraction(-1, 2)}.get(
                    name, node.params.get("y")
                )
                return Mu(v.coef * Fraction(power), v.labels)
            if name == "square" or (name == "integer_pow" and node.params["y"] >= 0):
                return U  # a polynomial of the shift: may cancel later (a variance)
            self._break(f"{name} of a shifted value")
        if name in ("add", "sub", "add_any"):
            return self._shift_add(node, vals)
        if name in ("mul", "div"):
            return self._shift_mul(node, vals)
        if name in ("max", "min"):
            return self._shift_max(node, vals)
        if name == "select_n":
            if vals[0] is not None:
                self._break("selects by a shifted predicate")
            kept = [(x, w) for x, w in zip(ins[1:], vals[1:], strict=False) if w is not None]
            types = {(type(w), w.coef) for _, w in kept}
            if len(types) != 1:
                self._break("selects between values shifted differently")
            for x, w in zip(ins[1:], vals[1:], strict=False):
                if w is None and an.constval.get(id(x)) is None:
                    self._break("selects between a shifted value and an unshifted one")
            labels = self._meet([self._shift_labels(w, x, out.shape) for x, w in kept])
            return type(kept[0][1])(kept[0][1].coef, labels)
        if name in _COMPARE:
            (_a, _b), (va, vb) = ins, vals
            if va is not None and vb is not None and type(va) is type(vb) and va.coef == vb.coef:
                return None
            self._break("compares a shifted value with an unshifted one")
        if name in _REDUCE:
            axes = tuple(node.params["axes"])
            x = ins[0]
            for k in axes:
                if not self._const_along(v.labels[k], x.shape[k]):
                    self._break("reduces over an axis along which the shift varies")
            if name in ("argmax", "argmin"):
                return None
            if name != "reduce_sum":
                self.softmax = True
            labels = tuple(lab for k, lab in enumerate(v.labels) if k not in axes)
            if name == "reduce_sum" and isinstance(v, Sh):
                return Sh(v.coef * math.prod(x.shape[k] for k in axes), labels)
            return type(v)(v.coef, labels)
        if name == "dot_general":
            return self._shift_dot(node, vals)
        if name == "conv_general_dilated":
            (vl, vr) = vals
            _ls, rs, os_ = node.params["dimension_numbers"]
            if vl is None and isinstance(vr, Sh) and vr.labels[rs[0]]:
                labels = [()] * len(out.shape)
                labels[os_[1]] = vr.labels[rs[0]]
                return Sh(vr.coef, tuple(labels))
            self._break("convolution mixes the shift")
        if name == "gather":
            if vals[1] is not None:
                self._break("gathers with shifted indices")
            x = ins[0]
            dn = node.params["dimension_numbers"]
            for k in set(dn.start_index_map):
                if not self._const_along(v.labels[k], x.shape[k]):
                    self._break("gathers along an axis where the shift varies")
            skip = set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()))
            kept = [k for k in range(len(x.shape)) if k not in skip]
            labels = [()] * len(out.shape)
            for k, d in zip(kept, dn.offset_dims, strict=False):
                if node.params["slice_sizes"][k] == x.shape[k]:
                    labels[d] = v.labels[k]
            return type(v)(v.coef, tuple(labels))
        if name in ("copy", "copy_p", "reduce_precision"):
            return v
        if name in _BREAKING or name in ("sign", "abs", "logistic"):
            self._break(f"{_BREAKING.get(name, name)} of a shifted value")
        if name in _POOL or name in _CUMULATIVE or name in ("pad", "slice", "rev"):
            self._break(f"{name} of a shifted value")
        raise Ambiguous(name)

    def _meet(self, labels_list) -> Labels:
        """Axes along which all operands' shifts are constant."""
        out = []
        for atoms in zip(*labels_list, strict=False):
            if any(not a for a in atoms):
                out.append(())
                continue
            leafy = [a for a in atoms if any(x[0] is not None and x[0] >= 0 for x in a)]
            out.append(leafy[0] if leafy else atoms[0])
        return tuple(out)

    def _shift_add(self, node, vals):
        (a, b), (va, vb) = node.ins, vals
        out = node.outs[0]
        sign = -1 if node.prim == "sub" else 1
        if va is not None and vb is not None:
            if type(va) is not type(vb):
                self._break("adds a shifted value and an exponential")
            la = self._shift_labels(va, a, out.shape)
            lb = self._shift_labels(vb, b, out.shape)
            if isinstance(va, Mu):
                if va.coef != vb.coef:
                    self._break("adds exponentials of different shifts")
                return Mu(va.coef, self._meet([la, lb]))
            coef = va.coef + sign * vb.coef
            if coef == 0:
                self.cancelled = True
                if not self.softmax:
                    self.centring = True
                return None
            return Sh(coef, self._meet([la, lb]))
        s, sv, o = (a, va, b) if va is not None else (b, vb, a)
        if isinstance(sv, Mu):
            if self.an.constval.get(id(o)) == 0:
                return sv
            self._break("adds a constant to an exponential")
        coef = sv.coef if s is a else sign * sv.coef
        labels = self._shift_labels(sv, s, out.shape)
        pv = self.an.pview.get(id(o))
        if pv is not None and pv[0] != self.leaf:
            self._join_shift(pv, labels, o.shape, out.shape)
        return Sh(coef, labels)

    def _join_shift(self, pv, labels, o_shape, out_shape):
        q, qlab = pv
        qlab = _bcast_labels(qlab, o_shape, out_shape)
        mapping = {}
        for k, atoms in enumerate(labels):
            cand = [x for x in atoms if x[0] is not None and x[0] >= 0]
            if not cand:
                continue
            mine = [x for x in qlab[k] if x[0] is not None]
            ca, pa = _axis_leaf(cand), _axis_leaf(mine) if mine else None
            if ca is None or pa is None or ca[1] != pa[1]:
                return
            mapping[pa[0]] = ca[0]
        if mapping and q not in self.members:
            self.members[q] = mapping

    def _shift_mul(self, node, vals):
        (a, b), (va, vb) = node.ins, vals
        out = node.outs[0]
        div = node.prim == "div"
        if va is not None and vb is not None:
            if isinstance(va, Mu) and isinstance(vb, Mu):
                coef = va.coef - vb.coef if div else va.coef + vb.coef
                labels = self._meet(
                    [self._shift_labels(va, a, out.shape), self._shift_labels(vb, b, out.shape)]
                )
                if coef == 0:
                    self.cancelled = True
                    return None
                return Mu(coef, labels)
            if div:
                self._break("divides by a shifted value")
            return U
        s, sv, o = (a, va, b) if va is not None else (b, vb, a)
        labels = self._shift_labels(sv, s, out.shape)
        if isinstance(sv, Mu):
            coef = -sv.coef if (div and s is b) else sv.coef
            return Mu(coef, labels)
        if div and s is b:
            self._break("divides by a shifted value")
        c = self.an.constval.get(id(o))
        if c is not None and c != 0:
            return Sh(sv.coef * (_frac(1 / c) if div else _frac(c)), labels)
        return U  # times a value that varies (e.g. one-hot labels): may still cancel

    def _shift_max(self, node, vals):
        (a, b), (va, vb) = node.ins, vals
        out = node.outs[0]
        if va is not None and vb is not None:
            if type(va) is type(vb) and va.coef == vb.coef:
                return type(va)(
                    va.coef,
                    self._meet(
                        [self._shift_labels(va, a, out.shape), self._shift_labels(vb, b, out.shape)]
                    ),
                )
            self._break(f"{node.prim} of values shifted differently")
        s, sv, o = (a, va, b) if va is not None else (b, vb, a)
        c = self.an.constval.get(id(o))
        ok = c is not None and (np.isinf(c) or (isinstance(sv, Mu) and c == 0))
        if not ok:
            self._break(f"{node.prim} of a shifted value with a threshold")
        return type(sv)(sv.coef, self._shift_labels(sv, s, out.shape))

    def _shift_dot(self, node, vals):
        (lhs, rhs), (vl, vr) = node.ins, vals
        (lc, rc), (lb, rb) = node.params["dimension_numbers"]
        if vl is not None and vr is not None:
            return U
        if vl is not None:
            s, sv, sc, sb, o, oc, ob = lhs, vl, lc, lb, rhs, rc, rb
        else:
            s, sv, sc, sb, o, oc, ob = rhs, vr, rc, rb, lhs, lc, lb
        if isinstance(sv, Mu):
            for k in sc:
                if not self._const_along(sv.labels[k], s.shape[k]):
                    self._break("sums an exponential over an axis where the shift varies")
        s_free = [k for k in range(len(s.shape)) if k not in sc and k not in sb]
        n_o_free = len(o.shape) - len(oc) - len(ob)
        batch = [sv.labels[k] for k in sb]
        free = [sv.labels[k] for k in s_free]
        labels = batch + (free + [()] * n_o_free if s is lhs else [()] * n_o_free + free)
        if not any(any(x[0] is not None and x[0] >= 0 for x in atoms) for atoms in labels):
            self._break("a linear map mixes the shift across the unit axis")
        return type(sv)(sv.coef, tuple(labels))


# --------------------------------------------------------------------------- the analyzer


class Analyzer:
    """Pre-computed facts about a graph, and the candidate runs on it."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.producer: dict[int, Node] = {}
        self.constval: dict[int, float] = {}
        self.pview: dict[int, tuple[int, Labels]] = {}
        self.reach_index: dict[int, list] = {}
        self._starts: dict[int, tuple[str, Any]] = {}  # leaf -> its first multiplicative use
        self._added: set[int] = set()  # leaves added to something (biases)
        # Values computed from parameters and constants only (no data): weight norms.
        self.param_only: set[int] = {id(v) for v in graph.leaf_vars}
        for i, v in enumerate(graph.leaf_vars):
            self.pview[id(v)] = (
                i,
                tuple(((ax, 1, n, True),) if n > 1 else () for ax, n in enumerate(v.shape)),
            )
        for node in graph.nodes:
            for o in node.outs:
                self.producer[id(o)] = node
            for x in node.ins:
                if x.const is not None and id(x) not in self.constval:
                    c = np.asarray(x.const)
                    if c.size and c.dtype.kind in "biuf" and np.all(c == c.flat[0]):
                        self.constval[id(x)] = float(c.flat[0])
            self._const_step(node)
            if all(
                id(x) in self.param_only or x.const is not None or id(x) in self.constval
                for x in node.ins
            ):
                self.param_only.update(id(o) for o in node.outs)
            if node.prim in LAYOUT and id(node.ins[0]) in self.pview:
                leaf, lab = self.pview[id(node.ins[0])]
                new = relabel(node, lab)
                if new is not None:
                    self.pview[id(node.outs[0])] = (leaf, new)
            self._note_uses(node)

    def _const_step(self, node: Node) -> None:
        """Fold a node whose inputs are all known uniform constants (literals, closed-over
        constants and values computed from them only, also across inlined ``jit`` calls,
        e.g. ``jnp.var``'s ``N - ddof > 0``): arithmetic, comparisons, integer and boolean
        casts and ``select_n``."""
        ins = [self.constval.get(id(x)) for x in node.ins]
        if not node.outs or any(c is None for c in ins) or not ins:
            return
        out = node.outs[0]
        try:
            with np.errstate(all="ignore"):
                if node.prim == "convert_element_type" and np.dtype(out.dtype).kind in "biu":
                    val = float(np.asarray(ins[0]).astype(out.dtype))
                elif node.prim in _SKIP_CONST:
                    val = ins[0]
                elif node.prim in _COMPARE_CONST and len(ins) == 2:
                    val = float(_COMPARE_CONST[node.prim](ins[0], ins[1]))
                elif node.prim in ("and", "or", "not") and np.dtype(out.dtype).kind == "b":
                    bits = [bool(c) for c in ins]
                    logic = {"not": lambda b: not b[0], "and": all, "or": any}[node.prim]
                    val = float(logic(bits))
                elif node.prim == "select_n":
                    case = self.selected_case(node)
                    if case is None:
                        return
                    val = ins[1 + case]
                elif node.prim in _UNARY_CONST:
                    val = float(_UNARY_CONST[node.prim](ins[0]))
                elif node.prim == "integer_pow":
                    val = float(ins[0] ** node.params["y"])
                elif node.prim in _BINARY_CONST and len(ins) == 2:
                    val = float(_BINARY_CONST[node.prim](ins[0], ins[1]))
                else:
                    return
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            return
        self.constval[id(out)] = val

    def selected_case(self, node: Node) -> int | None:
        """For ``select_n`` with a constant predicate (one computed from literals only), the
        index of the case it always picks; else None (a predicate that depends on the inputs
        is never folded)."""
        if node.prim != "select_n":
            return None
        c = self.constval.get(id(node.ins[0]))
        if c is None or not float(c).is_integer() or not 0 <= c < len(node.ins) - 1:
            return None
        return int(c)

    def varies(self, x: V, k: int, out_shape) -> bool:
        """Whether operand ``x`` of an elementwise op varies along output axis ``k``."""
        if len(x.shape) == 0 or x.shape[k] == 1 or id(x) in self.constval:
            return False
        node = self.producer.get(id(x))
        while node is not None and node.prim in ("convert_element_type", "copy", "stop_gradient"):
            node = self.producer.get(id(node.ins[0]))
        if node is not None and node.prim == "broadcast_in_dim":
            dims = tuple(node.params["broadcast_dimensions"])
            src = node.ins[0]
            return k in dims and src.shape[dims.index(k)] != 1
        return True

    # ------------------------------------------------------------------ starts

    def _note_uses(self, node: Node) -> None:
        """Record how leaves enter ``node`` (part of the one pass of ``__init__``): the first
        use of a leaf that is neither a layout change nor an addition decides :meth:`start`."""
        if node.prim in LAYOUT and node.outs and id(node.outs[0]) in self.pview:
            return  # a view of the leaf, followed further on
        for pos, x in enumerate(node.ins):
            pv = self.pview.get(id(x))
            if pv is None or pv[0] in self._starts:
                continue
            leaf, lab = pv

            def axes_of(ks, lab=lab):
                return frozenset(a[0] for k in ks for a in lab[k] if a[0] is not None)

            name = node.prim
            if name == "dot_general":
                (lc, rc), _ = node.params["dimension_numbers"]
                c = lc if pos == 0 else rc
                use = "dot", axes_of([k for k in range(len(x.shape)) if k not in c])
            elif name == "conv_general_dilated" and pos == 1:
                use = "conv", axes_of([node.params["dimension_numbers"][1][0]])
            elif name in ("mul", "div"):
                use = "mul", axes_of(range(len(x.shape)))
            elif name == "gather" and pos == 0:
                dn = node.params["dimension_numbers"]
                skip = set(dn.collapsed_slice_dims) | set(dn.start_index_map)
                use = "gather", axes_of([k for k in range(len(x.shape)) if k not in skip])
            elif name in ("add", "sub", "add_any"):
                self._added.add(leaf)
                continue
            else:
                use = "ambiguous", name
            self._starts[leaf] = use

    def start(self, leaf: int) -> tuple[str, Any]:
        """How a leaf enters the loss: ("dot"|"conv"|"mul"|"gather", unit axes), ("bias",
        None), ("unused", None) or ("ambiguous", primitive)."""
        if leaf in self._starts:
            return self._starts[leaf]
        return ("bias", None) if leaf in self._added else ("unused", None)

    # ------------------------------------------------------------------ runs

    def run(self, leaf: int, mode: str, unit_axes=(), axis=None) -> tuple[_Run, Any]:
        uniform: dict[int, set] = {}
        for _ in range(16):
            r = _Run(self, leaf, mode, unit_axes, uniform, axis)
            try:
                return r, r.run()
            except NeedUniform as e:
                changed = False
                for ax, s, m in e.ranges:
                    if (s, m) not in uniform.setdefault(ax, set()):
                        uniform[ax].add((s, m))
                        changed = True
                if not changed:
                    raise Broken("reductions over the unit axis that no factor survives") from None
        raise Ambiguous("too many coarsening restarts")

    def build_reach(self, starts: dict) -> None:
        """Values that are linear images of each leaf's units (partners for q.k products)."""
        for leaf, (kind, axes) in starts.items():
            if kind not in ("dot", "conv", "mul", "gather"):
                continue
            r = _Run(self, leaf, "mult", axes, reach=True)
            try:
                r.run()
            except (Broken, Ambiguous, NeedUniform):
                pass
            joined = {q: m for q, m in r.members.items() if q != leaf}
            for vid, val in r.env.items():
                if isinstance(val, Sc) and val.deg == 1:
                    self.reach_index.setdefault(vid, []).append(
                        (leaf, val.labels, joined, r.snap.get(vid, frozenset()))
                    )


def _norm_name(r: _Run, free: dict) -> str:
    if r.weightnorm:
        return "weight normalisation"
    parts = list(free.values())
    if all(not f for f in parts):
        return "LayerNorm" if r.centred else "RMSNorm"
    if any(f and len(f) == 1 and f[0][0] != 1 for f in parts):
        return "GroupNorm"
    if any(not f for f in parts):
        return ("LayerNorm" if r.centred else "RMSNorm") + " per head"
    return "BatchNorm" if r.reduced_batch else "normalisation over non-unit axes"


def _eps_text(eps: list[float]) -> str:
    return ", ".join(f"epsilon={e:g}" for e in sorted(set(eps)))


def _mult_finding(r: _Run, leaf: int, unit_axes) -> Finding:
    shape = r.an.graph.leaf_vars[leaf].shape
    labels0 = initial_labels(shape, set(unit_axes), r.uniform)
    free = {ax: tuple((a[1], a[2]) for a in labels0[ax] if a[3]) for ax in unit_axes}
    members = {q: dict(m) for q, m in r.members.items()}
    members[leaf] = {a: a for a in unit_axes}
    if not r.absorbers:
        name = _norm_name(r, free) if r.cancelled else "the loss does not depend on its size"
        reason = f"{name} {_eps_text(r.eps)}" if r.eps else name
        return Finding(
            "scale",
            leaf,
            tuple(unit_axes),
            members,
            free,
            [],
            frozenset(r.nonmix),
            reason,
            bool(r.eps),
        )
    contract = set().union(*(set(a.contract) for a in r.absorbers))
    heads = set().union(*(set(a.heads) for a in r.absorbers))
    mixable = contract - r.nonmix
    if len(mixable) == 1 and len((contract & r.nonmix) | heads) <= 1:
        kind = "linear"
        reason = "no nonlinearity between the two maps"
        if (contract & r.nonmix) | heads:
            reason += " (per head)"
    else:
        kind = "rescale"
        acts = sorted(r.acts) or ["identity"]
        reason = "positively homogeneous: " + ", ".join(acts)
    if r.eps:
        reason += f" ({_eps_text(r.eps)})"
    return Finding(
        kind,
        leaf,
        tuple(unit_axes),
        members,
        free,
        list(r.absorbers),
        frozenset(r.nonmix),
        reason,
        bool(r.eps),
    )


def analyse(graph: Graph) -> Analysis:
    """Candidate symmetries of every leaf of ``graph`` (see the module docstring)."""
    an = Analyzer(graph)
    findings: list[Finding] = []
    ambiguous: dict[int, str] = {}
    broken: dict[tuple[int, str], str] = {}
    notes: list[str] = []
    if graph.opaque:
        notes.append(
            "the loss contains " + ", ".join(graph.opaque) + "; leaves used inside "
            "them are enumerated from the parameter tree"
        )
    starts = {i: an.start(i) for i in range(len(graph.leaf_vars))}
    an.build_reach(starts)
    for leaf, (kind, axes) in starts.items():
        if kind == "ambiguous":
            ambiguous[leaf] = f"enters the loss through {axes}"
            continue
        if kind not in ("dot", "conv", "mul", "gather"):
            continue
        try:
            r, out = an.run(leaf, "mult", axes)
            if out is None:
                findings.append(_mult_finding(r, leaf, axes))
            else:
                broken[(leaf, "mult")] = "the loss changes with the unit's size"
        except Broken as e:
            broken[(leaf, "mult")] = str(e)
        except Ambiguous as e:
            ambiguous[leaf] = f"cannot follow its units through {e}"
        if kind not in ("dot", "conv"):
            continue
        for axis in sorted(axes):
            try:
                r, out = an.run(leaf, "shift", axis=axis)
            except Broken as e:
                broken[(leaf, f"shift{axis}")] = str(e)
                continue
            except Ambiguous as e:
                ambiguous.setdefault(leaf, f"cannot follow a shift through {e}")
                continue
            if out is None or out is U:
                reason = (
                    "softmax over the class axis"
                    if r.softmax
                    else "mean-centring normalisation"
                    if r.centring
                    else "the graph suggests the shift cancels"
                )
                members = {q: dict(m) for q, m in r.members.items() if q != leaf}
                members[leaf] = {axis: axis}
                findings.append(
                    Finding(
                        "translation",
                        leaf,
                        (axis,),
                        members,
                        {axis: ((1, graph.leaf_vars[leaf].shape[axis]),)},
                        [],
                        frozenset(),
                        reason,
                        False,
                        certain=out is None,
                    )
                )
            else:
                broken[(leaf, f"shift{axis}")] = "the loss changes with the shift"
    return Analysis(findings, ambiguous, broken, notes, starts)
