"""The abstract interpretation of a candidate action over a graph, shared by both kinds.

An :class:`Interpreter` walks the nodes in order and gives each value that depends on the
candidate leaf an abstract value (see :mod:`ksbopt._src.detection.values`), by the rule its
primitive has in the interpreter's table. A rule is a function ``rule(run, node, vals)`` of
the interpreter, the node and the abstract values of its inputs (``None`` for inputs that do
not depend on the leaf); it returns the abstract value of the output (``None``: no longer
depends on the action), raises :class:`~ksbopt._src.detection.findings.Broken` (the action
changes the loss) or :class:`~ksbopt._src.detection.findings.Ambiguous` (cannot tell). A
primitive without a rule is ambiguous.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from ksbopt._src.detection.findings import Ambiguous, Broken
from ksbopt._src.detection.graph import Node, Var
from ksbopt._src.detection.graph_facts import GraphFacts

Rule = Callable[[Any, Node, list], Any]


def rule_table(*entries: tuple[str | Iterable[str], Rule]) -> dict[str, Rule]:
    """Primitive name -> rule, from (primitive names, rule) pairs; one rule per primitive."""
    table: dict[str, Rule] = {}
    for prims, rule in entries:
        for prim in [prims] if isinstance(prims, str) else sorted(prims):
            assert prim not in table, f"two rules for {prim}"
            table[prim] = rule
    return table


class Interpreter:
    """One abstract interpretation of a candidate action on ``leaf`` over the graph.

    Subclasses set :attr:`RULES` and the abstract value of the leaf itself.
    """

    RULES: ClassVar[dict[str, Rule]] = {}

    def __init__(self, facts: GraphFacts, leaf: int, start: Any):
        self.facts = facts
        self.leaf = leaf
        leaf_var = facts.graph.leaf_vars[leaf]
        # Co-transformed leaves: leaf -> {its axis: axis of ``leaf``}.
        self.members: dict[int, dict[int, int]] = {leaf: {a: a for a in range(len(leaf_var.shape))}}
        self.cancelled = False  # two dependent terms cancelled the action
        self.env: dict[int, Any] = {id(leaf_var): start}

    def fail(self, msg: str):
        """The action changes the loss."""
        raise Broken(msg)

    def run(self):
        """The abstract value of the loss (``None``: the loss does not change)."""
        graph = self.facts.graph
        for node in graph.nodes:
            vals = [self.env.get(id(x)) for x in node.ins]
            if all(v is None for v in vals):
                continue
            outs = self.step(node, vals)
            if outs is None:
                continue
            for o, val in zip(node.outs, outs, strict=False):
                if val is not None:
                    self.env[id(o)] = val
        return self.env.get(id(graph.out))

    def step(self, node: Node, vals: list) -> list | None:
        """The abstract values of the outputs of ``node`` (None: leave them unset)."""
        case = self.facts.selected_case(node)
        if case is not None:
            return [vals[1 + case]]  # an input-independent predicate: the case it picks
        return [self.rule_for(node, vals)(self, node, vals)]

    def rule_for(self, node: Node, vals: list) -> Rule:
        """The rule that reads ``node``."""
        return self.RULES.get(node.prim, _ambiguous)


def _ambiguous(run: Interpreter, node: Node, vals: list):
    raise Ambiguous(node.prim)


def active_operand(node: Node, vals: list, lhs_active: bool) -> tuple[Var, Any, Var]:
    """(operand, its value, the other operand) of a binary node, the active one first."""
    (a, b), (va, vb) = node.ins, vals
    return (a, va, b) if lhs_active else (b, vb, a)


@dataclasses.dataclass(frozen=True)
class DotOperands:
    """The two operands of a ``dot_general``: the one that carries the action, the other."""

    var: Var
    value: Any
    contract: tuple
    batch: tuple
    other: Var
    other_contract: tuple
    other_batch: tuple
    is_lhs: bool

    @property
    def free(self) -> list[int]:
        """The active operand's axes that are neither contracted nor batched."""
        skip = set(self.contract) | set(self.batch)
        return [k for k in range(len(self.var.shape)) if k not in skip]

    @property
    def n_other_free(self) -> int:
        return len(self.other.shape) - len(self.other_contract) - len(self.other_batch)


def dot_operands(node: Node, vals: list, lhs_active: bool) -> DotOperands:
    """Split a ``dot_general`` into its active operand and the other."""
    (lhs, rhs), (vl, vr) = node.ins, vals
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    if lhs_active:
        return DotOperands(lhs, vl, lc, lb, rhs, rc, rb, True)
    return DotOperands(rhs, vr, rc, rb, lhs, lc, lb, False)
