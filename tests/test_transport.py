"""The transport module: finding a wrapped optimizer's per-parameter moments by field name,
and mapping them (what teleport and symmetrize do to the state when the parameters move).

The orbit moves of the moments themselves are tested through teleport (test_teleport.py) and
symmetrize (test_symmetrize.py); here, the table, the search and the mapping.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import pytest
import support

from ksbopt._src.transforms import transport

PARAMS = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))}, "scale": jnp.ones(())}


def _trained_state(tx: optax.GradientTransformation):
    """The state after one step on a fixed gradient (moments away from zero)."""
    state = tx.init(PARAMS)
    grads = support.random_like(PARAMS, seed=0)
    _, state = tx.update(grads, state, PARAMS)
    return state


class BufferState(NamedTuple):
    """A user optimizer's state with a field name optax does not use."""

    count: jax.Array
    buffer: dict


def test_table_is_optax_names_updated_by_the_callers():
    table = transport.check_moments(None, owner="t")
    assert {table[n] for n in ("mu", "trace", "momentum", "acc_grads", "ema")} == {"first"}
    assert {table[n] for n in ("nu", "sum_of_squares", "nu_max")} == {"second"}
    custom = transport.check_moments({"buffer": "first", "mu": "none"}, owner="t")
    assert custom["buffer"] == "first" and custom["mu"] == "none" and custom["nu"] == "second"


@pytest.mark.parametrize(
    ("moments", "error", "match"),
    [
        (["mu"], TypeError, r"owner: moments=\['mu'\] must be a dict field name -> kind"),
        ({"buffer": "third"}, ValueError, r"owner: moments entry 'buffer': 'third' is not valid"),
        ({1: "first"}, ValueError, r"moments entry 1: 'first' is not valid; map a state field"),
    ],
)
def test_bad_tables_name_the_argument_and_the_fix(moments, error, match):
    with pytest.raises(error, match=match):
        transport.check_moments(moments, owner="owner")


@pytest.mark.parametrize(
    ("tx", "fields"),
    [
        (optax.sgd(0.1, momentum=0.9), ["trace"]),
        (optax.adam(0.1), ["mu", "nu"]),
        (optax.chain(optax.add_decayed_weights(1e-3), optax.rmsprop(0.1)), ["nu"]),
        (optax.adagrad(0.1), ["sum_of_squares"]),
        (optax.sgd(0.1), []),
    ],
    ids=["heavy_ball", "adam", "rmsprop", "adagrad", "sgd"],
)
def test_parameter_fields_are_the_parameter_shaped_trees(tx, fields):
    found = transport.parameter_fields(_trained_state(tx), PARAMS)
    assert [name for name, _ in found] == fields
    table = transport.check_moments(None, owner="t")
    assert transport.unknown_fields(_trained_state(tx), PARAMS, table) == []


def test_map_moments_applies_the_function_of_each_kind_and_nothing_else():
    """Adam: mu (first) negated, nu (second) doubled, the count and the tree structure kept,
    bit for bit."""
    state = _trained_state(optax.adam(0.1))
    table = transport.check_moments(None, owner="t")
    fns = {
        "first": lambda t: jax.tree.map(jnp.negative, t),
        "second": lambda t: jax.tree.map(lambda x: 2 * x, t),
    }
    out = transport.map_moments(state, PARAMS, table, fns)
    assert jax.tree.structure(out) == jax.tree.structure(state)
    adam, new = state[0], out[0]
    support.assert_equal(new.count, adam.count)
    support.assert_equal(new.mu, jax.tree.map(jnp.negative, adam.mu))
    support.assert_equal(new.nu, jax.tree.map(lambda x: 2 * x, adam.nu))
    # A kind without a function (or a field the table does not know) is left as it was.
    only_first = transport.map_moments(state, PARAMS, table, {"first": fns["first"]})
    support.assert_equal(only_first[0].nu, adam.nu)


def test_unknown_parameter_shaped_fields_are_listed_until_declared():
    state = (BufferState(jnp.zeros((), jnp.int32), support.random_like(PARAMS, seed=1)),)
    table = transport.check_moments(None, owner="t")
    assert transport.unknown_fields(state, PARAMS, table) == ["0/buffer"]
    declared = transport.check_moments({"buffer": "second"}, owner="t")
    assert transport.unknown_fields(state, PARAMS, declared) == []
    out = transport.map_moments(state, PARAMS, declared, {"second": lambda t: t})
    support.assert_equal(out, state)
    # Unknown fields are left unchanged by map_moments (callers refuse them beforehand).
    out = transport.map_moments(state, PARAMS, table, {"first": lambda t: None})
    support.assert_equal(out, state)


def test_a_state_that_is_the_parameter_tree_itself_is_unnamed():
    """A bare parameter-shaped state has no field name: it is reported as the whole state."""
    state = support.random_like(PARAMS, seed=2)
    table = transport.check_moments(None, owner="t")
    assert transport.parameter_fields(state, PARAMS) == [(None, ())]
    assert transport.unknown_fields(state, PARAMS, table) == ["<the whole state>"]


def test_trees_shaped_otherwise_are_not_moments():
    """Same structure with other leaf shapes (e.g. per-unit statistics), or another
    structure: not parameter-shaped, never mapped."""
    per_unit = {"dense": {"kernel": jnp.ones((2,)), "bias": jnp.ones((2,))}, "scale": jnp.ones(())}
    state = BufferState(jnp.zeros((), jnp.int32), per_unit)
    assert transport.parameter_fields(state, PARAMS) == []
    assert transport.parameter_fields((jnp.ones((3, 2)),), PARAMS) == []
