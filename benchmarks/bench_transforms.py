"""Per-step cost of ksbopt transforms as a ratio to the matching optax optimizer.

Each variant is one jitted step, ``updates = tx.update(grads, state, params)`` followed by
``optax.apply_updates``, params and state donated, on a parameter tree shaped like a CNN
(conv and dense kernels with biases; one Scale group per output unit, as BatchNorm gives).
Variants come in groups, each timed against the optax optimizer it modifies or replaces:

- ``optax.sgd(0.1, momentum=0.9)``: ``project``, ``retract``, ``steer`` chained after it
  (issue 2: each <= 1.3x on CPU is the target), ``monitor`` wrapped around it, ``sgdp``, and
  a reference without ksbopt code, ``jnp sgd + one per-unit reduction``: the same step
  followed by the cheapest hand-written exact scale retraction (one sum of ``(w + u)**2``
  per output unit, then ``w + u`` rescaled to its norm at ``init``). An exact retraction
  or projection must measure the new step, and XLA:CPU fuses a reduction neither with the
  elementwise pass that makes the step nor with the one that applies it: one more read of
  ``w`` and the step, whatever the code. This row is that floor for ``retract``, ``steer``
  and ``project`` on the machine at hand (``monitor`` reads the gradient too);
- ``optax.adam``: ``symmetrize(adam)``, ``adamp``, ``nero``;
- ``optax.rmsprop``: ``noether_rmsprop``;
- ``optax.sgd`` with weight decay: ``rotational`` (REQ).

Repeats are interleaved within a group (every variant once per repeat, the order rotated)
so that machine noise hits all variants alike; the table reports medians and the ratio of
medians to the group's optax optimizer. A negation of every parameter (a real read and
write of the same bytes, donated) is timed with the first group: the memory-bound floor of
any step that updates the parameters; ``copies`` is a step's time in units of it and its
row gives the bandwidth achieved. The load average of the machine is printed with each
size: on a shared machine compare ratios, not milliseconds.

Run:  python -m benchmarks.bench_transforms --sizes 1,10,50 --repeats 9 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
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


LR = 0.1  # optax.sgd(0.1, momentum=0.9): the baseline of issue 2
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
ADAM_LR = 1e-3


def variants(symmetries) -> dict[str, optax.GradientTransformation]:
    """The transforms of issue 2 chained after ``optax.sgd(0.1, momentum=0.9)``, and it alone."""
    base = optax.sgd(LR, momentum=MOMENTUM)
    return {
        "optax.sgd(momentum=0.9)": base,
        "+ ksbopt.project": optax.chain(base, ksbopt.project(symmetries)),
        "+ ksbopt.retract": optax.chain(base, ksbopt.retract(symmetries)),
        "+ ksbopt.steer(constant)": optax.chain(
            base, ksbopt.steer(symmetries, ksbopt.targets.constant("initial"), rate=0.5)
        ),
    }


FLOOR = "jnp sgd + one per-unit reduction"


def floor_retraction(symmetries) -> optax.GradientTransformation:
    """Plain jnp, no ksbopt code: ``u -> a (w + u) - w``, ``a = |w_0| / |w + u|`` per unit.

    One sum of ``(w + u)**2`` over each output unit (the last axis) of the kernel and bias
    of each layer the ``Scale`` declarations of :func:`cnn_tree` name: the cheapest exact
    retraction, the reference the ksbopt rows are read against.
    """
    layers = [s.selection[0].split("/")[0] for s in symmetries]

    def unit_sum(w, u):
        return jnp.sum(jnp.square(w + u), axis=tuple(range(w.ndim - 1)))

    def sq_norms(params, updates):
        return {
            k: sum(jax.tree.leaves(jax.tree.map(unit_sum, params[k], updates[k]))) for k in layers
        }

    def init_fn(params):
        return sq_norms(params, jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params):
        scale = jax.tree.map(lambda q0, q: jnp.sqrt(q0 / q), state, sq_norms(params, updates))
        out = dict(updates)
        for k in layers:
            # a (w + u) - w, written so that XLA does not store w + u (one pass fewer).
            out[k] = jax.tree.map(
                lambda w, u, a=scale[k]: (a - 1) * w + a * u, params[k], updates[k]
            )
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)


GROUPS = ("sgd", "adam", "rmsprop", "sgd+wd")  # the names of the groups below, in order


def groups(symmetries) -> dict[str, dict[str, optax.GradientTransformation]]:
    """Each group: the optax optimizer first (the baseline of the ratios), then its variants.

    Every ksbopt transform, ``monitor`` and every peer optimizer is timed against the optax
    optimizer it modifies or replaces.
    """
    sgd = variants(symmetries)
    sgd["ksbopt.monitor(sgd)"] = ksbopt.monitor(
        optax.sgd(LR, momentum=MOMENTUM), symmetries, learning_rate=LR
    )
    sgd["ksbopt.sgdp"] = ksbopt.sgdp(LR, MOMENTUM)
    sgd[FLOOR] = optax.chain(optax.sgd(LR, momentum=MOMENTUM), floor_retraction(symmetries))
    built = (
        sgd,
        {
            "optax.adam": optax.adam(ADAM_LR),
            "ksbopt.symmetrize(adam)": ksbopt.symmetrize(optax.adam(ADAM_LR), symmetries),
            "ksbopt.adamp": ksbopt.adamp(ADAM_LR),
            "ksbopt.nero": ksbopt.nero(ADAM_LR),
        },
        {
            "optax.rmsprop": optax.rmsprop(ADAM_LR),
            "ksbopt.noether_rmsprop": ksbopt.noether_rmsprop(ADAM_LR, symmetries=symmetries),
        },
        {
            "optax.sgd(momentum) + wd": optax.chain(
                optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM)
            ),
            "ksbopt.rotational(trace)": ksbopt.rotational(
                optax.trace(MOMENTUM), LR, WEIGHT_DECAY, MOMENTUM
            ),
        },
    )
    return dict(zip(GROUPS, built, strict=True))


COPY = "copy of the parameters (floor)"


def make_step(tx):
    """One jitted optimizer step, params and state donated (updated in place)."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def _negate(params, state, grads):
    # A real read and write of every parameter byte that XLA cannot elide (unlike x + 0, or
    # a copy into a donated buffer): the memory-bound floor of any step that updates the
    # parameters. Negation is exact, so repeating it never drifts.
    del grads
    return jax.tree.map(jnp.negative, params), state


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def time_group(runners: dict, params, grads, repeats: int, inner: int, baseline: str) -> list[dict]:
    """Median seconds per step of each runner, repeats interleaved (order rotated each time)."""
    states, compile_s = {}, {}
    for name, (fn, tx) in runners.items():
        p = jax.tree.map(jnp.copy, params)
        s = tx.init(p) if tx is not None else ()
        t0 = time.perf_counter()
        p, s = fn(p, s, grads)
        jax.block_until_ready(p)
        compile_s[name] = time.perf_counter() - t0
        states[name] = [p, s]
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = runners[name][0]
            p, s = states[name]
            t0 = time.perf_counter()
            for _ in range(inner):
                p, s = fn(p, s, grads)
            jax.block_until_ready(p)
            times[name].append((time.perf_counter() - t0) / inner)
            states[name] = [p, s]
    base = _median(times[baseline])
    copy = _median(times.get(COPY, []))
    return [
        {
            "variant": name,
            "baseline": baseline,
            "median_ms": 1e3 * _median(ts),
            "min_ms": 1e3 * min(ts),
            "ratio": _median(ts) / base,
            "copies": _median(ts) / copy if COPY in times else None,
            "compile_s": compile_s[name],
        }
        for name, ts in times.items()
    ]


def run(size: float, repeats: int, inner: int, only: tuple[str, ...] | None = None) -> dict:
    """Time every group on the CNN-shaped tree of ``size`` million parameters."""
    params, symmetries = cnn_tree(size)
    leaves = jax.tree.leaves(params)
    n = sum(x.size for x in leaves)
    nbytes = sum(x.size * x.dtype.itemsize for x in leaves)
    keys = iter(jax.random.split(jax.random.key(1), len(leaves)))
    grads = jax.tree.map(lambda x: 1e-3 * jax.random.normal(next(keys), x.shape, x.dtype), params)
    rows, loads = [], []
    for group, txs in groups(symmetries).items():
        if only and group not in only:
            continue
        runners = {name: (make_step(tx), tx) for name, tx in txs.items()}
        if group == "sgd":
            runners[COPY] = (jax.jit(_negate, donate_argnums=(0,)), None)
        loads.append(os.getloadavg()[0])
        rows += time_group(runners, params, grads, repeats, inner, baseline=next(iter(txs)))
        del runners
    for row in rows:
        if row["variant"] == COPY:
            # Read and write of every parameter byte.
            row["GB_per_s"] = 2 * nbytes / (row["median_ms"] * 1e-3) / 1e9
    return {"params": n, "bytes": nbytes, "load_average": loads, "rows": rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,10,50", help="comma-separated sizes in millions")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats")
    parser.add_argument("--inner", type=int, default=2, help="steps per timed repeat")
    parser.add_argument(
        "--groups", default=None, help="comma-separated subset of: sgd, adam, rmsprop, sgd+wd"
    )
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    only = tuple(args.groups.split(",")) if args.groups else None
    if only and set(only) - set(GROUPS):
        parser.error(f"--groups={args.groups!r} names unknown groups; choose from {GROUPS}.")
    out = {
        "command": "python -m benchmarks.bench_transforms " + " ".join(argv or sys.argv[1:]),
        "devices": [str(d) for d in jax.devices()],
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": [],
    }
    print(f"devices: {out['devices']}  cpus: {out['cpu_count']}")
    for size in (float(s) for s in args.sizes.split(",")):
        res = run(size, args.repeats, args.inner, only)
        out["results"].append(res)
        loads = ", ".join(f"{x:.1f}" for x in res["load_average"])
        print(
            f"\n{res['params'] / 1e6:.1f}M parameters, {res['bytes'] / 1e6:.1f} MB (median of "
            f"{args.repeats} interleaved repeats of {args.inner} steps; load average {loads})"
        )
        print(f"{'variant':<32} {'ms/step':>9} {'ratio':>6} {'copies':>7} {'compile s':>10}")
        for r in res["rows"]:
            if r["variant"] == r["baseline"]:
                print(f"{'':-<32}")
            copies = "" if r["copies"] is None else f"{r['copies']:7.2f}"
            extra = f"   {r['GB_per_s']:.1f} GB/s" if "GB_per_s" in r else ""
            print(
                f"{r['variant']:<32} {r['median_ms']:9.2f} {r['ratio']:6.2f} {copies:>7} "
                f"{r['compile_s']:10.2f}{extra}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
