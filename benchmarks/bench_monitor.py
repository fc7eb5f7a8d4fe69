"""Per-step cost of ``ksbopt.monitor`` (all diagnostics) as a ratio to the unmonitored step.

Two workloads, each a jitted step timed with interleaved repeats (baseline, variant,
baseline, ...) so that machine noise hits all variants alike; medians and the ratio of
medians are reported, the minima (less sensitive to other processes on the machine) and the
median CPU time of the process per step (all threads; on a shared machine the wall time
also counts the time other jobs hold the cores):

1. optimizer step only (``tx.update`` + ``optax.apply_updates``) on the CNN-shaped tree of
   ``bench_transforms.py`` (~10M float32 parameters; conv and dense kernels, one Scale group
   per output unit);
2. a full train step (forward, backward, update) of the MNIST-1D CNN of
   ``ksbopt/bench/models.py`` with BatchNorm (three Scale symmetries + the head's Translation),
   batch 100, synthetic inputs of MNIST-1D's shape.

The baseline is ``optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(lr, momentum=0.9))``;
the variants wrap it in ``ksbopt.monitor`` with ``dynamics=ksbopt.dynamics.sgd(...)`` (every
diagnostic and the P3/P4 predictions), computed every step (``every=1``) or every 10 steps
(``every=10``; the exact recursions still advance at every step).

Run:  python -m benchmarks.bench_monitor --size 10 --repeats 20
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ksbopt
from benchmarks.bench_transforms import cnn_tree
from ksbopt._src.diagnostics import dynamics as dynamics_lib
from ksbopt._src.diagnostics.monitor import monitor
from ksbopt.bench import host

LR, MOMENTUM, WD = 0.01, 0.9, 5e-4


def base_tx(lr: float = LR) -> optax.GradientTransformation:
    return optax.chain(optax.add_decayed_weights(WD), optax.sgd(lr, momentum=MOMENTUM))


def variants(symmetries, lr: float = LR) -> dict[str, optax.GradientTransformation]:
    dyn = dynamics_lib.sgd(lr, MOMENTUM, WD)
    return {
        "bare sgd(momentum) + wd": base_tx(lr),
        "monitor every=1": monitor(base_tx(lr), symmetries, dynamics=dyn),
        "monitor every=10": monitor(base_tx(lr), symmetries, dynamics=dyn, every=10),
        "monitor every=1, no dynamics": monitor(base_tx(lr), symmetries, learning_rate=lr),
    }


def interleaved(runners: dict, repeats: int, inner: int) -> tuple[dict, dict]:
    """runners: name -> (step, carry); step(carry) -> carry. Seconds per step, per repeat:
    wall time, and the CPU time of the process (all threads), which a machine shared with
    other jobs disturbs less than the wall time."""
    carries = {}
    for name, (step, carry) in runners.items():
        carry = step(carry)  # compile and warm up
        jax.block_until_ready(carry)
        carries[name] = carry
    times = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    for _ in range(repeats):
        for name, (step, _) in runners.items():
            carry = carries[name]
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(inner):
                carry = step(carry)
            jax.block_until_ready(carry)
            times[name].append((time.perf_counter() - t0) / inner)
            cpu[name].append((time.process_time() - c0) / inner)
            carries[name] = carry
    return times, cpu


def table(times: dict[str, list[float]], cpu: dict[str, list[float]], base: str) -> list[dict]:
    b_med, b_min = statistics.median(times[base]), min(times[base])
    b_cpu = statistics.median(cpu[base])
    return [
        {
            "variant": name,
            "median_ms": 1e3 * statistics.median(ts),
            "min_ms": 1e3 * min(ts),
            "cpu_median_ms": 1e3 * statistics.median(cpu[name]),
            "ratio_median": statistics.median(ts) / b_med,
            "ratio_min": min(ts) / b_min,
            "ratio_cpu": statistics.median(cpu[name]) / b_cpu,
        }
        for name, ts in times.items()
    ]


def optimizer_workload(size: float, repeats: int, inner: int, donate: bool = True) -> dict:
    params, symmetries = cnn_tree(size)
    n = sum(x.size for x in jax.tree.leaves(params))
    grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)
    runners = {}
    for name, tx in variants(symmetries).items():

        def step(carry, g, tx=tx):
            p, s = carry
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        p = jax.tree.map(jnp.copy, params)
        fn = jax.jit(step, donate_argnums=0) if donate else jax.jit(step)
        runners[name] = (functools.partial(fn, g=grads), (p, tx.init(p)))
    times, cpu = interleaved(runners, repeats, inner)
    kind = "donated" if donate else "not donated"
    return {
        "workload": f"optimizer step, {n / 1e6:.1f}M params ({kind})",
        "rows": table(times, cpu, "bare sgd(momentum) + wd"),
    }


def train_workload(repeats: int, inner: int, batch: int = 100, steps_per_call: int = 10) -> dict:
    """The MNIST-1D CNN with BatchNorm: forward + backward + update, ``steps_per_call`` steps
    per jitted call (a lax.scan, as a real training loop does), timed per step."""
    from flax import nnx

    from ksbopt.bench.models import CNN1D

    symmetries = [ksbopt.Scale(f"conv{i}/kernel", axis=-1) for i in (1, 2, 3)] + [
        ksbopt.Translation(["head/kernel", "head/bias"])
    ]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(steps_per_call, batch, 40)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=(steps_per_call, batch)), jnp.int32)

    def loss_fn(m, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

    runners = {}
    for name, tx in variants(symmetries, lr=0.05).items():
        model = CNN1D(25, batchnorm=True, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        graphdef, state = nnx.split((model, optimizer))

        def call(state, graphdef=graphdef):
            def body(state, batch):
                m, opt = nnx.merge(graphdef, state)
                grads = nnx.grad(loss_fn)(m, *batch)
                opt.update(m, grads)
                return nnx.state((m, opt)), None

            return jax.lax.scan(body, state, (x, y))[0]

        runners[name] = (jax.jit(call, donate_argnums=0), state)
    times, cpu = interleaved(runners, repeats, max(1, inner // steps_per_call))
    times = {k: [t / steps_per_call for t in v] for k, v in times.items()}
    cpu = {k: [t / steps_per_call for t in v] for k, v in cpu.items()}
    return {
        "workload": f"MNIST-1D CNN train step (batch {batch})",
        "rows": table(times, cpu, "bare sgd(momentum) + wd"),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=float, default=10.0, help="tree size in millions")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--inner", type=int, default=3, help="optimizer steps per repeat")
    parser.add_argument("--train-inner", type=int, default=50, help="train steps per repeat")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument(
        "--no-donate",
        action="store_true",
        help="also time the optimizer step without donating params/state",
    )
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    host.reuse_large_buffers()  # see ksbopt.bench.host
    out = {
        "devices": [str(d) for d in jax.devices()],
        "machine": platform.processor() or platform.machine(),
        **host.setting(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "results": [],
    }
    out["load_average"] = os.getloadavg()
    print(f"devices: {out['devices']}, load average {out['load_average'][0]:.2f}")
    out["results"].append(optimizer_workload(args.size, args.repeats, args.inner))
    if args.no_donate:
        out["results"].append(optimizer_workload(args.size, args.repeats, args.inner, False))
    if not args.skip_train:
        out["results"].append(train_workload(args.repeats, args.train_inner))
    for res in out["results"]:
        print(f"\n{res['workload']} (median and min of {args.repeats} interleaved repeats)")
        print(
            f"{'variant':<30} {'median ms':>10} {'ratio':>6} {'min ms':>9} {'ratio':>6} "
            f"{'cpu ms':>9} {'ratio':>6}"
        )
        for r in res["rows"]:
            print(
                f"{r['variant']:<30} {r['median_ms']:10.3f} {r['ratio_median']:6.2f} "
                f"{r['min_ms']:9.3f} {r['ratio_min']:6.2f} "
                f"{r['cpu_median_ms']:9.3f} {r['ratio_cpu']:6.2f}"
            )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
