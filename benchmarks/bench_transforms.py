"""Per-step cost of ksbopt transforms as a ratio to the matching optax optimizer.

Each variant is one jitted step, ``updates = tx.update(grads, state, params)`` followed by
``optax.apply_updates``, on a parameter tree shaped like a CNN (conv and dense kernels with
biases; one Scale group per output unit, as BatchNorm gives). The baseline is
``optax.sgd(lr, momentum=0.9)`` alone; every ksbopt variant chains a transform after it.
Repeats are interleaved (baseline, variant, baseline, ...) so that machine noise hits all
variants alike; the table reports medians and the ratio of medians. A plain copy of the
parameter bytes is timed too: the memory-bound floor of any step that touches them.

Run:  python -m benchmarks.bench_transforms --sizes 10 --repeats 30
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import ksbopt


def cnn_tree(n_params_million: float, key=0) -> tuple[dict, list]:
    """A CNN-shaped parameter tree of about ``n_params_million`` million float32 numbers."""
    # Widths double every two conv layers, as in VGG/ResNet; a dense head of 1/5 of the total.
    base = [
        (3, 32),
        (32, 64),
        (64, 128),
        (128, 128),
        (128, 256),
        (256, 256),
        (256, 512),
        (512, 512),
    ]
    target = n_params_million * 1e6
    conv_size = sum(9 * i * o + o for i, o in base)
    width = math.sqrt(0.8 * target / conv_size)
    convs = [
        (max(1, round(i * width)) if j else 3, max(1, round(o * width)))
        for j, (i, o) in enumerate(base)
    ]
    convs = [(convs[j - 1][1] if j else 3, o) for j, (_, o) in enumerate(convs)]
    dense_in = convs[-1][1]
    dense_out = max(8, int(0.2 * target / dense_in))
    keys = iter(jax.random.split(jax.random.key(key), 2 * len(convs) + 4))
    params = {}
    for j, (i, o) in enumerate(convs):
        params[f"conv{j}"] = {
            "kernel": jax.random.normal(next(keys), (3, 3, i, o)) / math.sqrt(9 * i),
            "bias": jnp.zeros(o),
        }
    params["dense"] = {
        "kernel": jax.random.normal(next(keys), (dense_in, dense_out)) / math.sqrt(dense_in),
        "bias": jnp.zeros(dense_out),
    }
    params["head"] = {
        "kernel": jax.random.normal(next(keys), (dense_out, 10)) * 0.01,
        "bias": jnp.zeros(10),
    }
    symmetries = [
        ksbopt.Scale([f"conv{j}/kernel", f"conv{j}/bias"], axis=-1) for j in range(len(convs))
    ]
    symmetries.append(ksbopt.Scale(["dense/kernel", "dense/bias"], axis=-1))
    return params, symmetries


def variants(symmetries) -> dict[str, optax.GradientTransformation]:
    base = optax.sgd(0.01, momentum=0.9)
    return {
        "optax.sgd(momentum=0.9)": base,
        "+ ksbopt.project": optax.chain(base, ksbopt.project(symmetries)),
        "+ ksbopt.retract": optax.chain(base, ksbopt.retract(symmetries)),
        "+ ksbopt.steer(constant)": optax.chain(
            base, ksbopt.steer(symmetries, ksbopt.targets.constant("initial"), rate=0.5)
        ),
    }


def make_step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def copy_step(params, state, grads):
    del grads
    return jax.tree.map(lambda x: x + 0, params), state


def run(size: float, repeats: int, inner: int) -> dict:
    params, symmetries = cnn_tree(size)
    n = sum(x.size for x in jax.tree.leaves(params))
    grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)
    txs = variants(symmetries)
    runners = {name: (make_step(tx), tx) for name, tx in txs.items()}
    runners["plain copy of params"] = (jax.jit(copy_step, donate_argnums=(0,)), None)
    states = {}
    for name, (fn, tx) in runners.items():
        p = jax.tree.map(jnp.copy, params)
        s = tx.init(p) if tx is not None else ()
        t0 = time.perf_counter()
        p, s = fn(p, s, grads)
        jax.block_until_ready(p)
        states[name] = [p, s, time.perf_counter() - t0]
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, (fn, _) in runners.items():
            p, s, _ = states[name]
            t0 = time.perf_counter()
            for _ in range(inner):
                p, s = fn(p, s, grads)
            jax.block_until_ready(p)
            times[name].append((time.perf_counter() - t0) / inner)
            states[name][:2] = [p, s]
    base = statistics.median(times["optax.sgd(momentum=0.9)"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {
                "variant": name,
                "median_ms": 1e3 * med,
                "ratio": med / base,
                "compile_s": states[name][2],
                "GB_per_s_params": 4 * n / med / 1e9,
            }
        )
    return {"params": n, "rows": rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10", help="comma-separated sizes in millions")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--inner", type=int, default=3, help="steps per timed repeat")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    out = {
        "devices": [str(d) for d in jax.devices()],
        "machine": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "results": [],
    }
    print(f"devices: {out['devices']}")
    for size in (float(s) for s in args.sizes.split(",")):
        res = run(size, args.repeats, args.inner)
        out["results"].append(res)
        print(
            f"\n{res['params'] / 1e6:.1f}M parameters (median of {args.repeats} interleaved "
            f"repeats of {args.inner} steps)"
        )
        print(f"{'variant':<28} {'ms/step':>9} {'ratio':>7} {'GB/s':>7} {'compile s':>10}")
        for r in res["rows"]:
            print(
                f"{r['variant']:<28} {r['median_ms']:9.2f} {r['ratio']:7.2f} "
                f"{r['GB_per_s_params']:7.1f} {r['compile_s']:10.2f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
