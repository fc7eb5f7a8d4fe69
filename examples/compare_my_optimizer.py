"""Compare your own optimizer with SGD, AdamW and a ksbopt kinetic energy, in a few lines.

The optimizer written here is a sign-of-momentum rule in the style of Lion (Chen et al. 2023,
https://arxiv.org/abs/2302.06675): the step is ``-lr sign(b1 m + (1 - b1) g)`` with the
momentum ``m`` updated at the slower rate ``b2``. It is an ordinary optax transformation; the
harness takes it as a factory ``lr -> transformation`` and runs it beside the registry's
``sgd+wd``, ``adamw`` and ``sgd+retract`` (SGD with the scale-group charges held, a ksbopt
kinetic energy) with the same learning-rate tuning, seeds, statistics, report and plots.

First the one-call symmetry profile (``ksbopt.profile``): what the rule does to each declared
symmetry of a small model, before any benchmark. Then ``ksbopt.bench.compare`` on the
MNIST-1D CNN with BatchNorm; the report (``OUT/report.md``) holds the accuracy table and, beside
it, the symmetry profile of every entry measured over the whole run.

Run:
    python examples/compare_my_optimizer.py            # quick size: 24 runs of 800 steps
    KSBOPT_EXAMPLE_TINY=1 python examples/compare_my_optimizer.py   # tiny (tests, docs gallery)
    python examples/compare_my_optimizer.py --tiny --out /tmp/compare   # the same, flags

Both take about half a minute on 2 CPU cores, mostly compilation. The tiny size (the
harness's ``tiny`` scale, 20 steps, one seed, no plots) is for smoke tests and the docs
gallery: its numbers mean nothing.

Needs the ``bench`` extra: ``pip install "ksbopt[bench]"``.
"""

from __future__ import annotations

import argparse
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import ksbopt


class SignMomentumState(NamedTuple):
    mu: optax.Updates


def scale_by_sign_momentum(b1: float = 0.9, b2: float = 0.99) -> optax.GradientTransformation:
    """The direction ``sign(b1 m + (1 - b1) g)``; ``m`` tracks ``g`` at rate ``b2``."""

    def init(params):
        return SignMomentumState(jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        direction = jax.tree.map(lambda m, g: jnp.sign(b1 * m + (1 - b1) * g), state.mu, updates)
        mu = jax.tree.map(lambda m, g: b2 * m + (1 - b2) * g, state.mu, updates)
        return direction, SignMomentumState(mu)

    return optax.GradientTransformation(init, update)


def my_optimizer(learning_rate, b1: float = 0.9, weight_decay: float = 1e-2):
    """The rule as the harness wants it: a factory ``lr -> optax transformation``."""
    return optax.chain(
        scale_by_sign_momentum(b1),
        optax.add_decayed_weights(weight_decay),
        optax.scale(-learning_rate),
    )


def profile_demo() -> None:
    """``ksbopt.profile`` on a two-layer net with a normalised hidden layer."""
    key1, key2, key3 = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(key1, (8, 16)), "w2": jax.random.normal(key2, (16, 3))}
    x = jax.random.normal(key3, (64, 8))
    y = jnp.arange(64) % 3

    def loss(p):
        h = x @ p["w1"]
        h = h / jnp.linalg.norm(h, axis=0, keepdims=True)  # the columns of w1: scale-invariant
        logits = jax.nn.relu(h) @ p["w2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    symmetries = [ksbopt.Scale("w1", axis=-1), ksbopt.Translation("w2", axis=-1)]
    for name, tx in [
        ("my_optimizer", my_optimizer(1e-3)),
        ("sgd", optax.sgd(1.0)),
        ("sgd+retract", optax.chain(optax.sgd(1.0, momentum=0.9), ksbopt.retract(symmetries[0]))),
    ]:
        print(f"--- {name}")
        print(ksbopt.profile(tx, symmetries, params, loss, steps=5))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny size (also KSBOPT_EXAMPLE_TINY=1)")
    p.add_argument("--out", default=None, help="output folder")
    a = p.parse_args()
    tiny = a.tiny or os.environ.get("KSBOPT_EXAMPLE_TINY") == "1"
    out = a.out or ("bench_results/compare_my_optimizer" + ("_tiny" if tiny else ""))

    profile_demo()

    import ksbopt.bench

    results = ksbopt.bench.compare(
        {
            # your rule, with its own learning-rate grid (5 points, the registry's budget)
            "sign_momentum": {"factory": my_optimizer, "lrs": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)},
            "sgd+wd": "sgd+wd",
            "adamw": "adamw",
            "sgd+retract": "sgd+retract",
        },
        tasks=["mnist1d_cnn_bn"],
        seeds=1 if tiny else 2,
        out=out,
        scale="tiny" if tiny else None,
        steps=20 if tiny else None,
        plots=not tiny,
    )
    print(f"\nreport: {results.report}")
    for name, row in results.best("mnist1d_cnn_bn").items():
        print(
            f"{name:14s} best lr {row['best_lr']:g}  test accuracy {row['test_mean']}  "
            f"profile {results.profile('mnist1d_cnn_bn', name)}"
        )
    for failure in results.failures:
        print(failure)


if __name__ == "__main__":
    main()
