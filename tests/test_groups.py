"""Tests of ksbopt._src.groups: leaf paths, selectors, unit axes and per-group reductions.

This is the one place that decides "which numbers form a group"; every selector form must
resolve the same way on plain dicts, ``flax.linen`` variable dicts and ``nnx.State`` trees.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import support

import ksbopt
from ksbopt._src import groups, numerics
from ksbopt._src.groups import AxisPart
from ksbopt._src.symmetries import orbit


def _tree():
    return {
        "params": {
            "Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
            "Dense_1": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)},
            "BatchNorm_0": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
        }
    }


PATHS = [
    "params/BatchNorm_0/bias",
    "params/BatchNorm_0/scale",
    "params/Dense_0/bias",
    "params/Dense_0/kernel",
    "params/Dense_1/bias",
    "params/Dense_1/kernel",
]


def test_leaf_paths_join_keys_with_slashes_in_leaf_order():
    assert groups.leaf_paths(_tree()) == PATHS
    seq = {"layers": [{"w": jnp.ones(2)}, {"w": jnp.ones(2)}], "t": (jnp.ones(1),)}
    assert groups.leaf_paths(seq) == ["layers/0/w", "layers/1/w", "t/0"]


SELECTORS = [
    ("glob", "Dense_*/kernel", ["params/Dense_0/kernel", "params/Dense_1/kernel"]),
    ("suffix", "kernel", ["params/Dense_0/kernel", "params/Dense_1/kernel"]),
    ("suffix_two_keys", "Dense_0/kernel", ["params/Dense_0/kernel"]),
    ("full_path_glob", "params/Dense_0/*", ["params/Dense_0/bias", "params/Dense_0/kernel"]),
    ("regex", re.compile(r"Dense_\d/bias$"), ["params/Dense_0/bias", "params/Dense_1/bias"]),
    (
        "callable",
        lambda path, leaf: leaf.ndim == 2,
        ["params/Dense_0/kernel", "params/Dense_1/kernel"],
    ),
    (
        "list",
        ["Dense_1/kernel", re.compile("BatchNorm"), "Dense_1/kernel"],
        ["params/BatchNorm_0/bias", "params/BatchNorm_0/scale", "params/Dense_1/kernel"],
    ),
]


@pytest.mark.parametrize(("name", "selector", "want"), SELECTORS, ids=[s[0] for s in SELECTORS])
def test_selector_forms(name, selector, want):
    tree = _tree()
    idx = groups.select(tree, groups.normalize_selector(selector), what="selection")
    assert idx == sorted(set(idx)), "indices are sorted and unique"
    assert [PATHS[i] for i in idx] == want


def test_suffix_matching_stops_at_slash_boundaries():
    # "ense_0/kernel" is a suffix of the string but not of the key path.
    with pytest.raises(ValueError, match="matches no leaf"):
        groups.select(_tree(), ("ense_0/kernel",), what="selection")
    # A glob still matches inside one key.
    idx = groups.select(_tree(), ("*ense_0/kernel",), what="selection")
    assert [PATHS[i] for i in idx] == ["params/Dense_0/kernel"]


def test_selector_matching_no_leaf_lists_available_paths():
    tree = {f"layer_{i}": {"kernel": jnp.ones((2, 2))} for i in range(10)}
    with pytest.raises(ValueError) as err:
        ksbopt.charges(tree, ksbopt.Scale("layer_10/kernel"))
    msg = str(err.value)
    assert "Scale selection='layer_10/kernel' matches no leaf" in msg
    # A few paths (8, then "..."), and what to write instead.
    assert "'layer_0/kernel', 'layer_1/kernel'" in msg and ", ..." in msg
    assert msg.count("'layer_") == 9  # the selector itself and 8 listed paths
    assert "Write a glob over these '/'-joined paths" in msg
    # Each item of a list must match: the message names the one that did not.
    with pytest.raises(ValueError, match=r"selection='nope' matches no leaf"):
        ksbopt.charges(tree, ksbopt.Scale(["layer_0/kernel", "nope"]))


@pytest.mark.parametrize(
    ("selector", "error", "match"),
    [
        (3, TypeError, r"selector item 3 has type int; write a glob string"),
        ([], ValueError, r"selector=\[\] selects nothing"),
        (["w", None], TypeError, r"selector item None has type NoneType"),
    ],
    ids=["int", "empty", "none_in_list"],
)
def test_bad_selector_types(selector, error, match):
    with pytest.raises(error, match=match):
        ksbopt.Scale(selector)


def test_normalize_axis():
    kw = {"what": "axis", "path": "w", "shape": (3, 4)}
    assert groups.normalize_axis(-1, 2, **kw) == 1
    assert groups.normalize_axis(np.int64(0), 2, **kw) == 0
    with pytest.raises(
        ValueError, match=r"axis=2 is out of range for leaf 'w' with shape \(3, 4\)"
    ):
        groups.normalize_axis(2, 2, **kw)
    with pytest.raises(ValueError, match=r"axis=-3 is out of range.*write an axis in \[-2, 1\]"):
        groups.normalize_axis(-3, 2, **kw)
    for bad in (1.0, True, "1"):
        with pytest.raises(TypeError, match=r"axis=.* must be an int"):
            groups.normalize_axis(bad, 2, **kw)


def test_compute_dtype_is_at_least_float32(x64):
    assert numerics.compute_dtype(jnp.bfloat16) == jnp.float32
    assert numerics.compute_dtype(jnp.float16) == jnp.float32
    assert numerics.compute_dtype(jnp.float32) == jnp.float32
    assert numerics.compute_dtype(jnp.float64) == jnp.float64


def test_axis_part_reduce_and_broadcast_are_adjoint():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 5))
    for group_axes in [(2,), (0, 2), (), (0, 1, 2)]:
        part = AxisPart(0, "w", x.shape, group_axes)
        reduce_axes = tuple(a for a in range(3) if a not in group_axes)
        assert part.reduce_axes == reduce_axes
        assert part.size * part.count == x.size
        r = np.asarray(part.reduce(jnp.asarray(x)))
        np.testing.assert_allclose(r, np.sum(x, axis=reduce_axes).reshape(-1), rtol=1e-6)
        c = rng.normal(size=part.size)
        b = np.broadcast_to(np.asarray(part.broadcast(jnp.asarray(c))), x.shape)
        # <reduce(x), c> = <x, broadcast(c)>: reduce is J^T, broadcast is J. float32: 1e-5.
        np.testing.assert_allclose(np.dot(r, c), np.sum(x * b), rtol=1e-5)
    with pytest.raises(ValueError, match="must be increasing"):
        AxisPart(0, "w", x.shape, (2, 0))


def test_scatter_groups_places_parts_at_their_offsets():
    parts = [AxisPart(0, "k", (2, 3), (0,), 0), AxisPart(1, "b", (3,), (), 2)]
    out = groups.scatter_groups(parts, [jnp.array([1.0, 2.0]), jnp.array([5.0])], 3)
    np.testing.assert_array_equal(out, [1.0, 2.0, 5.0])
    shared = [AxisPart(0, "k", (2, 3), (1,)), AxisPart(1, "b", (3,), (0,))]
    out = groups.scatter_groups(shared, [jnp.ones(3), jnp.arange(3.0)], 3)
    np.testing.assert_array_equal(out, [1.0, 2.0, 3.0])


# --------------------------------------------------------------------------- flax trees


def _bound_signature(binding: orbit.Binding) -> list:
    """What a binding decided: for each symmetry, which leaf paths, axes and offsets."""
    out = []
    for b in binding.bound:
        parts = getattr(b, "parts", ())
        out.append(
            sorted(
                (p.path, p.shape, getattr(p, "group_axes", None), getattr(p, "offset", None))
                for p in parts
            )
        )
    return out


def test_linen_variables_resolve_like_the_plain_dict():
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            h = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
            return nn.Dense(3)(nn.relu(h))

    variables = MLP().init(jax.random.key(0), jnp.ones((2, 3)))
    assert set(variables) == {"params", "batch_stats"}
    sym = [
        ksbopt.Scale(["Dense_0/kernel", "Dense_0/bias"], axis=-1),
        ksbopt.Rescale(incoming="BatchNorm_0/scale", outgoing="Dense_1/kernel"),
        ksbopt.Translation("Dense_1/*"),
    ]
    # The plain dict is the same numbers without the 'params' level and the batch stats.
    got = ksbopt.charges(variables, sym)
    want = ksbopt.charges(variables["params"], sym)
    support.assert_close(got, want, rtol=0)
    # "BatchNorm_0/scale" matches the parameter only: batch_stats has mean / var.
    paths = groups.leaf_paths(variables)
    leaves = orbit.bind(tuple(sym), variables).bound[1].leaves
    assert [paths[i] for i in leaves] == ["params/BatchNorm_0/scale", "params/Dense_1/kernel"]


def test_nnx_state_at_init_and_at_update_resolve_the_same_groups():
    # At init nnx.Optimizer passes nnx.State whose leaves sit under Variable(...).value; at
    # update it passes plain arrays. Both must give the same groups.
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.head = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.head(jax.nn.relu(self.bn(self.l1(x))))

    sym = (
        ksbopt.Scale("l1/*", axis=-1),
        ksbopt.Rescale(incoming=["bn/scale", "bn/bias"], outgoing="head/kernel"),
        ksbopt.Translation(["head/kernel", "head/bias"]),
    )
    seen = {}

    def recording(inner):
        def init_fn(params):
            q = ksbopt.charges(params, list(sym))
            seen["init"] = (params, _bound_signature(orbit.bind(sym, params)), q)
            return inner.init(params)

        def update_fn(updates, state, params=None, **extra):
            q = ksbopt.charges(params, list(sym))
            seen["update"] = (params, _bound_signature(orbit.bind(sym, params)), q)
            return inner.update(updates, state, params, **extra)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    model = MLP(nnx.Rngs(0))
    # (The transforms themselves under nnx.Optimizer: contract.check_nnx.)
    opt = nnx.Optimizer(model, recording(optax.identity()), wrt=nnx.Param)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
    opt.update(model, nnx.grad(lambda m: jnp.mean(jnp.square(m(x))))(model))
    # The two calls really saw the two forms of the tree...
    init_keys = jax.tree_util.tree_flatten_with_path(seen["init"][0])[0][0][0]
    update_keys = jax.tree_util.tree_flatten_with_path(seen["update"][0])[0][0][0]
    assert isinstance(init_keys[-1], jax.tree_util.GetAttrKey), init_keys
    assert not any(isinstance(k, jax.tree_util.GetAttrKey) for k in update_keys), update_keys
    # ... and resolved the same groups.
    assert seen["init"][1] == seen["update"][1]
    assert seen["init"][1][0] == [
        ("l1/bias", (4,), (0,), 0),
        ("l1/kernel", (3, 4), (1,), 0),
    ]
    # Same numbers too: both calls see the parameters before the first step.
    support.assert_close(seen["init"][2], seen["update"][2], rtol=0)
