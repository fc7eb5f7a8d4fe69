"""The hand-written floors of ``benchmarks/bench_transforms`` compute what their transforms do.

A floor is only a fair reference if it performs the same mathematics: each floor's update
(two steps, so that state carried over counts) is compared with its ksbopt transform's on
a small CNN tree in float64, where the two differ only by summation order and by closed
forms (norms of ``a w + b g`` from sums) in place of explicit vectors: 1e-9 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ksbopt
from benchmarks import bench_transforms as bench
from benchmarks import floors


@pytest.fixture(autouse=True)
def _float64(x64):
    """Every test of this file in float64 (scoped: the rest of the run stays in float32)."""
    yield


RTOL = 1e-9

# The floors are the benchmark's reference rows, not the library: their check (about 75 s on
# 2 cores, most of it compiling Adam-family transforms in float64) runs with the slow tests.
pytestmark = pytest.mark.slow


def _tree():
    layout = bench.LAYOUTS["cnn"](0.02)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), layout.params)
    # non-zero biases: the groups span kernel and bias
    params = jax.tree.map(lambda x: x + 0.01 if x.ndim == 1 else x, params)
    return layout, params


def _grads(params, seed):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten(
        [1e-2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )


def _two_steps(tx, params):
    # jitted: op-by-op dispatch of a per-leaf transform took 45 s on this tree
    state, update = tx.init(params), jax.jit(tx.update)
    outs = []
    for seed in (1, 2):
        u, state = update(_grads(params, seed), state, params)
        outs.append(u)
        params = optax.apply_updates(params, u)
    return outs


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=RTOL * float(jnp.max(jnp.abs(y))))


CASES = {
    "exact": (
        lambda lay: optax.chain(optax.sgd(0.1, 0.9), ksbopt.retract(lay.symmetries)),
        lambda lay: optax.chain(optax.sgd(0.1, 0.9), floors.exact_retraction(lay.units)),
    ),
    "noether_rmsprop": (
        lambda lay: ksbopt.noether_rmsprop(lay.symmetries, 1e-3),
        lambda lay: floors.noether_rmsprop(lay.units, 1e-3),
    ),
    "symmetrize_adam": (
        lambda lay: ksbopt.symmetrize(optax.adam(1e-3), lay.symmetries),
        lambda lay: floors.symmetrize_adam(lay.units, 1e-3),
    ),
    "sgdp": (lambda lay: ksbopt.peers.sgdp(0.1, 0.9), lambda lay: floors.sgdp(0.1, 0.9)),
    "adamp": (lambda lay: ksbopt.peers.adamp(1e-3), lambda lay: floors.adamp(1e-3)),
    "nero": (lambda lay: ksbopt.peers.nero(1e-3), lambda lay: floors.nero(1e-3)),
    "rotational": (
        lambda lay: ksbopt.peers.rotational(optax.trace(0.9), 0.1, 5e-4, 0.9),
        lambda lay: floors.rotational(0.1, 5e-4, 0.9),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_floor_matches_its_transform(name):
    layout, params = _tree()
    make_tx, make_floor = CASES[name]
    _close(_two_steps(make_floor(layout), params), _two_steps(make_tx(layout), params))


@pytest.mark.parametrize("shape", [(3, 3, 96, 80), (367, 200)], ids=["blocks", "leftover"])
def test_unit_sums_one_pass_equals_plain_sums(shape):
    """Blocks that follow the axes, and 367 rows (no divisor in [6, 12]: 8 blocks of 45 rows
    and 7 rows summed apart)."""
    x = jax.random.normal(jax.random.key(0), shape, jnp.float64)
    y = jnp.cos(x)
    got = floors.unit_sums(x * y, y * y)
    axes = tuple(range(len(shape) - 1))
    np.testing.assert_allclose(got[0], jnp.sum(x * y, axis=axes), rtol=1e-12)
    np.testing.assert_allclose(got[1], jnp.sum(y * y, axis=axes), rtol=1e-12)


def test_monitor_floor_sums_match_the_monitor_charges():
    layout, params = _tree()
    g = _grads(params, 1)
    sgd = optax.sgd(0.1, momentum=0.9)
    mon = ksbopt.monitor(sgd, layout.symmetries, learning_rate=0.1)
    _, state = mon.update(g, mon.init(params), params)
    floor = floors.monitor_sums(layout.units, 0.1, 0.9)
    u, (_, sums) = floor.update(g, floor.init(params), params)
    want, _ = sgd.update(g, sgd.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, u, want)  # the ordering changes no bit
    diag = optax.tree.get(state, "diagnostics")
    for q, (ww, wu, uu, *_) in zip(diag.charges, sums, strict=True):
        np.testing.assert_allclose(q, 0.5 * (ww + 2 * wu + uu), rtol=RTOL)
