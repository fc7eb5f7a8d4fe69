"""The primitive-rule tables of the graph analysis' two interpreters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ksbopt._src.detection import analyser
from ksbopt._src.detection import graph as graph_lib
from ksbopt._src.detection.multiplicative_rules import MULTIPLICATIVE_RULES
from ksbopt._src.detection.primitives import ADD, BREAKING, COMPARE, LAYOUT, REDUCE
from ksbopt._src.detection.shift_rules import SHIFT_RULES


@pytest.mark.parametrize("table", [MULTIPLICATIVE_RULES, SHIFT_RULES], ids=["mult", "shift"])
def test_both_interpreters_read_layout_arithmetic_and_nonlinear_maps(table):
    must = LAYOUT | ADD | COMPARE | REDUCE | set(BREAKING) - {"integer_pow_neg"}
    must |= {"mul", "div", "max", "min", "select_n", "dot_general", "gather"}
    assert must <= set(table), sorted(must - set(table))


def _analysis(loss_fn, params, x):
    leaves, treedef = jax.tree.flatten(params)
    closed = jax.make_jaxpr(lambda ls, b: loss_fn(jax.tree.unflatten(treedef, ls), b))(leaves, x)
    return analyser.analyse(graph_lib.build_graph(closed, len(leaves)))


def test_a_primitive_without_a_rule_makes_the_leaf_ambiguous_naming_it():
    params = {"w": np.ones((3, 4), np.float32)}
    x = np.ones((2, 3), np.float32)
    result = _analysis(lambda p, x: jnp.sum(jnp.sort(x @ p["w"], -1)[:, 0]), params, x)
    assert result.ambiguous == {0: "cannot follow its units through sort"}
    assert result.findings == []


def test_a_breaking_map_breaks_both_actions_with_its_name():
    params = {"w": np.ones((3, 4), np.float32)}
    x = np.ones((2, 3), np.float32)
    result = _analysis(lambda p, x: jnp.sum(jax.nn.sigmoid(x @ p["w"])), params, x)
    assert result.broken == {
        (0, "mult"): "sigmoid is not positively homogeneous",
        (0, "shift1"): "sigmoid of a shifted value",
    }
