"""The computation graph of a loss, flattened: one list of primitive applications.

:func:`build_graph` takes the ``ClosedJaxpr`` of a loss, inlines nested calls (``jit``,
``custom_jvp``, ``custom_vjp``, ``checkpoint``) so that every value is one :class:`Var`,
and removes dead code (e.g. BatchNorm running-average updates): what is left is the list of
:class:`Node` that feed the loss, in order.
"""

from __future__ import annotations

import dataclasses

import jax.extend.core as jcore
import numpy as np


class Var:
    """A value of the flattened graph (a fresh object per value, also per inlined call)."""

    __slots__ = ("__weakref__", "const", "dtype", "shape")

    def __init__(self, shape, dtype, const=None):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.const = const  # numpy value for literals and closed-over constants

    def __repr__(self):
        return f"Var{self.shape}"


@dataclasses.dataclass
class Node:
    """One application of a primitive: ``outs = prim(*ins, **params)``."""

    prim: str
    params: dict
    ins: list
    outs: list


@dataclasses.dataclass
class Graph:
    """The live nodes of a loss, its parameter leaves and its output."""

    nodes: list[Node]
    leaf_vars: list[Var]
    out: Var
    opaque: list[str]  # loop / control-flow primitives found (on live paths)


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


def _aval_shape(x) -> tuple:
    aval = getattr(x, "aval", None)
    return tuple(getattr(aval, "shape", ()))


def _aval_dtype(x):
    return getattr(getattr(x, "aval", None), "dtype", None)


def _called_jaxpr(eqn):
    """The jaxpr a call primitive runs, or None for any other equation."""
    if eqn.primitive.name not in _CALL_PRIMS:
        return None
    for key in _CALL_KEYS:
        if key in eqn.params:
            return eqn.params[key]
    return None


def _inline(jaxpr, consts, in_atoms, nodes):
    """Append the nodes of ``jaxpr`` (called on ``in_atoms``) to ``nodes``; its outputs."""
    env: dict = {}
    for v, c in zip(jaxpr.constvars, consts, strict=False):
        env[v] = Var(np.shape(c), getattr(c, "dtype", None), np.asarray(c))
    for v, a in zip(jaxpr.invars, in_atoms, strict=False):
        env[v] = a

    def resolve(x):
        if isinstance(x, jcore.Literal):
            return Var(np.shape(x.val), _aval_dtype(x), np.asarray(x.val))
        return env[x]

    for eqn in jaxpr.eqns:
        ins = [resolve(x) for x in eqn.invars]
        sub = _called_jaxpr(eqn)
        if sub is None:
            outs = [Var(_aval_shape(o), _aval_dtype(o)) for o in eqn.outvars]
            nodes.append(Node(eqn.primitive.name, dict(eqn.params), ins, outs))
        elif isinstance(sub, jcore.ClosedJaxpr):
            outs = _inline(sub.jaxpr, sub.consts, ins, nodes)
        else:
            outs = _inline(sub, [], ins, nodes)
        for o, a in zip(eqn.outvars, outs, strict=False):
            env[o] = a
    return [resolve(x) for x in jaxpr.outvars]


def build_graph(closed, n_leaves: int) -> Graph:
    """Flatten a ``ClosedJaxpr`` whose first ``n_leaves`` invars are the parameter leaves."""
    nodes: list[Node] = []
    jaxpr = closed.jaxpr
    in_atoms = [Var(_aval_shape(v), _aval_dtype(v)) for v in jaxpr.invars]
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
