"""Facts about a flattened graph that every candidate run reads, computed in one pass.

Which node produces each value, which values are uniform constants (folded through
arithmetic, comparisons and ``select_n``), which values are views of a parameter leaf,
which are computed from parameters only (weight norms), and how each leaf first enters the
loss (the starting point of its candidates).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ksbopt._src.detection.axis_labels import Labels, relabel, whole_leaf_labels
from ksbopt._src.detection.graph import Graph, Node, Var
from ksbopt._src.detection.primitives import ADD, LAYOUT

# Constant folding: primitive -> numpy function of the folded inputs.
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
_LOGIC_CONST = {"not": lambda b: not b[0], "and": all, "or": any}
_CASTS = ("convert_element_type", "copy")
# How a leaf can start a multiplicative candidate (the first use decides).
MULTIPLICATIVE_STARTS = ("dot", "conv", "mul", "gather")


class GraphFacts:
    """Pre-computed facts about a graph, shared by all candidate runs on it.

    Attributes:
      graph: the graph.
      producer: id of a value -> the node that computes it.
      constval: id of a value -> its value, for uniform constants.
      pview: id of a value -> (leaf, labels) for views of a parameter leaf (layout changes).
      param_only: ids of values computed from parameters and constants only.
      reach_index: id of a value -> the leaves it is a linear image of (filled by
        :func:`ksbopt._src.detection.analyser.build_reach`).
    """

    def __init__(self, graph: Graph):
        self.graph = graph
        self.producer: dict[int, Node] = {}
        self.constval: dict[int, float] = {}
        self.pview: dict[int, tuple[int, Labels]] = {}
        self.reach_index: dict[int, list] = {}
        self._starts: dict[int, tuple[str, Any]] = {}  # leaf -> its first multiplicative use
        self._added: set[int] = set()  # leaves added to something (biases)
        self.param_only: set[int] = {id(v) for v in graph.leaf_vars}
        for i, v in enumerate(graph.leaf_vars):
            self.pview[id(v)] = (i, whole_leaf_labels(v.shape))
        for node in graph.nodes:
            for o in node.outs:
                self.producer[id(o)] = node
            for x in node.ins:
                if x.const is not None and id(x) not in self.constval:
                    c = np.asarray(x.const)
                    if c.size and c.dtype.kind in "biuf" and np.all(c == c.flat[0]):
                        self.constval[id(x)] = float(c.flat[0])
            self._fold_constant(node)
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

    # ------------------------------------------------------------------ constants

    def _fold_constant(self, node: Node) -> None:
        """Fold a node whose inputs are all known uniform constants (literals, closed-over
        constants and values computed from them only, also across inlined ``jit`` calls,
        e.g. ``jnp.var``'s ``N - ddof > 0``): arithmetic, comparisons, integer and boolean
        casts and ``select_n``."""
        ins = [self.constval.get(id(x)) for x in node.ins]
        if not node.outs or any(c is None for c in ins) or not ins:
            return
        try:
            with np.errstate(all="ignore"):
                val = self._folded(node, ins)
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            return
        if val is not None:
            self.constval[id(node.outs[0])] = val

    def _folded(self, node: Node, ins: list) -> float | None:
        """The value of ``node`` on constant inputs, None where it is not folded."""
        prim, out = node.prim, node.outs[0]
        if prim == "convert_element_type" and _kind(out) in "biu":
            return float(np.asarray(ins[0]).astype(out.dtype))
        if prim in LAYOUT:
            return ins[0]
        if prim in _COMPARE_CONST and len(ins) == 2:
            return float(_COMPARE_CONST[prim](ins[0], ins[1]))
        if prim in _LOGIC_CONST and _kind(out) == "b":
            return float(_LOGIC_CONST[prim]([bool(c) for c in ins]))
        if prim == "select_n":
            case = self.selected_case(node)
            return None if case is None else ins[1 + case]
        if prim in _UNARY_CONST:
            return float(_UNARY_CONST[prim](ins[0]))
        if prim == "integer_pow":
            return float(ins[0] ** node.params["y"])
        if prim in _BINARY_CONST and len(ins) == 2:
            return float(_BINARY_CONST[prim](ins[0], ins[1]))
        return None

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

    # ------------------------------------------------------------------ patterns

    def source(self, v: Var, skip=_CASTS) -> Node | None:
        """The node that computes ``v``, looking through the primitives in ``skip``."""
        node = self.producer.get(id(v))
        while node is not None and node.prim in skip:
            node = self.producer.get(id(node.ins[0]))
        return node

    def varies(self, x: Var, k: int, out_shape) -> bool:
        """Whether operand ``x`` of an elementwise op varies along output axis ``k``."""
        if len(x.shape) == 0 or x.shape[k] == 1 or id(x) in self.constval:
            return False
        node = self.source(x, skip=(*_CASTS, "stop_gradient"))
        if node is not None and node.prim == "broadcast_in_dim":
            dims = tuple(node.params["broadcast_dimensions"])
            src = node.ins[0]
            return k in dims and src.shape[dims.index(k)] != 1
        return True

    def mean_of(self, v: Var) -> tuple[Var, tuple] | None:
        """(base, axes) when v = reduce_sum(base, axes) / count."""
        node = self.source(v)
        if node is None or node.prim not in ("div", "mul"):
            return None
        c = self.constval.get(id(node.ins[1]))
        if c is None or c == 0:
            return None
        n = c if node.prim == "div" else 1 / c
        red = self.source(node.ins[0])
        if red is None or red.prim != "reduce_sum":
            return None
        axes = tuple(red.params["axes"])
        base = red.ins[0]
        if not math.isclose(math.prod(base.shape[k] for k in axes), n, rel_tol=1e-6):
            return None
        return base, axes

    def square_of(self, v: Var) -> Var | None:
        """x when v = x ** 2 (``square``, ``integer_pow`` 2 or ``x * x``)."""
        node = self.source(v)
        if node is None:
            return None
        if node.prim == "square" or (node.prim == "integer_pow" and node.params["y"] == 2):
            return node.ins[0]
        if node.prim == "mul" and node.ins[0] is node.ins[1]:
            return node.ins[0]
        return None

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
            if node.prim in ADD:
                self._added.add(leaf)
                continue
            self._starts[leaf] = _use(node, pos, lab)

    def start(self, leaf: int) -> tuple[str, Any]:
        """How a leaf enters the loss: ("dot"|"conv"|"mul"|"gather", unit axes), ("bias",
        None), ("unused", None) or ("ambiguous", primitive)."""
        if leaf in self._starts:
            return self._starts[leaf]
        return ("bias", None) if leaf in self._added else ("unused", None)


def _kind(v: Var) -> str:
    return np.dtype(v.dtype).kind


def _use(node: Node, pos: int, lab: Labels) -> tuple[str, Any]:
    """How a view of a leaf with labels ``lab`` enters ``node`` as its input ``pos``."""
    ndim = len(node.ins[pos].shape)

    def axes_of(ks):
        return frozenset(a[0] for k in ks for a in lab[k] if a[0] is not None)

    name = node.prim
    if name == "dot_general":
        (lc, rc), _ = node.params["dimension_numbers"]
        c = lc if pos == 0 else rc
        return "dot", axes_of([k for k in range(ndim) if k not in c])
    if name == "conv_general_dilated" and pos == 1:
        return "conv", axes_of([node.params["dimension_numbers"][1][0]])
    if name in ("mul", "div"):
        return "mul", axes_of(range(ndim))
    if name == "gather" and pos == 0:
        dn = node.params["dimension_numbers"]
        skip = set(dn.collapsed_slice_dims) | set(dn.start_index_map)
        return "gather", axes_of([k for k in range(ndim) if k not in skip])
    return "ambiguous", name
