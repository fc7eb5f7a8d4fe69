"""Per-step cost of ksbopt transforms as a ratio to the matching optax optimizer.

Each variant is one jitted step, ``updates = tx.update(grads, state, params)`` followed by
``optax.apply_updates``, params and state donated, on a parameter tree shaped like a CNN
(conv and dense kernels with biases; one Scale group per output unit, as BatchNorm gives).
Variants come in groups, each timed against the optax optimizer it modifies or replaces:

- ``optax.sgd(0.1, momentum=0.9)``: ``project``, ``retract``, ``steer`` chained after it
  (the target is at most 1.3x on CPU each), ``monitor`` wrapped around it, ``sgdp``, and
  ``floor: exact retraction``, a reference without ksbopt code: the same step followed by
  the cheapest hand-written exact scale retraction (one sum of ``(w + u)**2`` per output
  unit, then ``w + u`` rescaled to its norm at ``init``). An exact retraction or
  projection must measure the new step, and XLA:CPU fuses a reduction neither with the
  elementwise pass that makes the step nor with the one that applies it: one more read of
  ``w`` and the step, whatever the code. This row is that floor for ``retract``, ``steer``
  and ``project`` on the machine at hand (``monitor`` reads the gradient too);
- ``optax.adam``: ``symmetrize(adam)``, ``adamp``, ``nero``;
- ``optax.rmsprop``: ``noether_rmsprop``;
- ``optax.sgd`` with weight decay: ``rotational`` (REQ).

Every other ksbopt row has its own ``floor:`` row (``benchmarks/floors.py``), the cheapest
plain-``jnp`` step of the same mathematics. The peers (``ksbopt.peers.*``) run at their
defaults, which follow their authors' reference code.

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
import dataclasses
import gc
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
from benchmarks import floors
from ksbopt.bench import host


@dataclasses.dataclass(frozen=True)
class Layout:
    """A parameter tree, its symmetry declarations, and the groups the floors act on.

    ``units``: per group of leaves that share output units (the last axis), their paths;
    ``None`` where the declarations overlap (no hand-written floor: exact rows are read
    against the optax base only).
    """

    name: str
    params: dict
    symmetries: list
    units: list[tuple[str, ...]] | None


def _normal(key, shape, fan_in):
    return jax.random.normal(key, shape) / math.sqrt(fan_in)


def _cnn(size: float, *, bias: bool = True, overlap: bool = False, key=0) -> tuple[dict, list]:
    """Conv kernels (widths doubling every two layers, as in VGG/ResNet) and a dense layer."""
    base = [(3, 32), (32, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512)]
    base.append((512, 512))
    target = size * 1e6
    conv_share = 0.98 if overlap else 0.8
    conv_size = sum(9 * i * o + o for i, o in base)
    width = math.sqrt(conv_share * target / conv_size)
    outs = [max(1, round(o * width)) for _, o in base]
    convs = list(zip([3, *outs[:-1]], outs, strict=True))
    dense_in = convs[-1][1]
    dense_out = 256 if overlap else max(8, int(0.2 * target / dense_in))
    keys = iter(jax.random.split(jax.random.key(key), 2 * len(convs) + 4))
    params = {}
    for j, (i, o) in enumerate(convs):
        params[f"conv{j}"] = {"kernel": _normal(next(keys), (3, 3, i, o), 9 * i)}
    params["dense"] = {"kernel": _normal(next(keys), (dense_in, dense_out), dense_in)}
    params["head"] = {"kernel": 0.01 * jax.random.normal(next(keys), (dense_out, 10))}
    if bias:
        for layer in params.values():
            layer["bias"] = jnp.zeros(layer["kernel"].shape[-1])
    return params, [f"conv{j}" for j in range(len(convs))]


def cnn_tree(size: float, key=0) -> tuple[dict, list]:
    """A CNN-shaped tree of about ``size`` million float32 numbers, kernels and biases; one
    Scale group per output unit of every conv and the dense layer (as BatchNorm gives)."""
    params, convs = _cnn(size, key=key)
    symmetries = [ksbopt.Scale([f"{c}/kernel", f"{c}/bias"], axis=-1) for c in convs]
    symmetries.append(ksbopt.Scale(["dense/kernel", "dense/bias"], axis=-1))
    return params, symmetries


def _layout_cnn(size):
    params, symmetries = cnn_tree(size)
    layers = [*(s.selection[0].split("/")[0] for s in symmetries)]
    return Layout("cnn", params, symmetries, [(f"{k}/kernel", f"{k}/bias") for k in layers])


def _layout_cnn_nobias(size):
    """Kernels only; each layer's Scale is a glob (``conv3/*``) over its leaves."""
    params, convs = _cnn(size, bias=False)
    layers = [*convs, "dense"]
    symmetries = [ksbopt.Scale(f"{k}/*", axis=-1) for k in layers]
    return Layout("cnn_nobias", params, symmetries, [(f"{k}/kernel",) for k in layers])


def _layout_shared_glob(size, depth=16):
    """``depth`` square kernels of one width, no biases; ONE Scale whose glob covers every
    kernel: unit j of every layer is one group (groups spanning many leaves)."""
    width = round(math.sqrt(size * 1e6 / depth))
    keys = jax.random.split(jax.random.key(0), depth)
    params = {
        f"block{i}": {"kernel": _normal(keys[i], (width, width), width)} for i in range(depth)
    }
    paths = tuple(f"block{i}/kernel" for i in range(depth))
    return Layout("shared_glob", params, [ksbopt.Scale("block*/kernel", axis=-1)], [paths])


def _layout_many_small(size, depth=128):
    """``depth`` small square layers with biases, one Scale per layer: many small leaves."""
    width = round(math.sqrt(size * 1e6 / depth))
    keys = jax.random.split(jax.random.key(0), depth)
    params = {
        f"layer{i:03d}": {
            "kernel": _normal(keys[i], (width, width), width),
            "bias": jnp.zeros(width),
        }
        for i in range(depth)
    }
    symmetries = [ksbopt.Scale([f"{k}/kernel", f"{k}/bias"], axis=-1) for k in params]
    return Layout("many_small", params, symmetries, [(f"{k}/kernel", f"{k}/bias") for k in params])


def _layout_few_large(size):
    """A Transformer-style MLP block pair: four kernels (d, 4d), (4d, d), with biases."""
    d = round(math.sqrt(size * 1e6 / 16))
    keys = jax.random.split(jax.random.key(0), 4)
    shapes = {"fc1a": (d, 4 * d), "fc2a": (4 * d, d), "fc1b": (d, 4 * d), "fc2b": (4 * d, d)}
    params = {
        k: {"kernel": _normal(keys[i], s, s[0]), "bias": jnp.zeros(s[1])}
        for i, (k, s) in enumerate(shapes.items())
    }
    symmetries = [ksbopt.Scale([f"{k}/kernel", f"{k}/bias"], axis=-1) for k in params]
    return Layout("few_large", params, symmetries, [(f"{k}/kernel", f"{k}/bias") for k in params])


def _layout_overlap(size):
    """The CNN with a 256-unit ReLU dense layer before the head: per-unit Scale on the convs,
    Rescale between the dense layer and the head, and the head's Translation (softmax), which
    shares the head kernel with the Rescale: overlapping symmetries."""
    params, convs = _cnn(size, overlap=True)
    symmetries = [ksbopt.Scale([f"{c}/kernel", f"{c}/bias"], axis=-1) for c in convs]
    symmetries.append(ksbopt.Rescale(["dense/kernel", "dense/bias"], "head/kernel"))
    symmetries.append(ksbopt.Translation(["head/kernel", "head/bias"]))
    return Layout("overlap", params, symmetries, None)


LAYOUTS = {
    "cnn": _layout_cnn,
    "cnn_nobias": _layout_cnn_nobias,
    "shared_glob": _layout_shared_glob,
    "many_small": _layout_many_small,
    "few_large": _layout_few_large,
    "overlap": _layout_overlap,
}


LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
ADAM_LR = 1e-3

EXACT_FLOOR = "floor: exact retraction"
GROUPS = ("sgd", "adam", "rmsprop", "sgd+wd")  # the names of the groups below, in order


def groups(layout: Layout) -> dict[str, dict[str, tuple]]:
    """Each group: ``{name: (transformation, floor row name or None)}``, the optax optimizer
    first (the baseline of the ratios), then its variants and their hand-written floors.

    Transforms that need non-overlapping Scale groups (``symmetrize``, ``noether_rmsprop``)
    and every floor of a ksbopt transform are left out where the declarations overlap.
    """
    syms, units = layout.symmetries, layout.units
    sgd = optax.sgd(LR, momentum=MOMENTUM)
    exact = None if units is None else EXACT_FLOOR
    out = {
        "sgd": {
            "optax.sgd(momentum=0.9)": (sgd, None),
            "+ ksbopt.project": (optax.chain(sgd, ksbopt.project(syms)), exact),
            "+ ksbopt.retract": (optax.chain(sgd, ksbopt.retract(syms)), exact),
            "+ ksbopt.steer(constant)": (
                optax.chain(sgd, ksbopt.steer(syms, ksbopt.targets.constant("initial"), 0.5)),
                exact,
            ),
            "ksbopt.monitor(sgd)": (
                ksbopt.monitor(sgd, syms, learning_rate=LR),
                None if units is None else "floor: monitor(sgd) sums",
            ),
            "ksbopt.peers.sgdp": (ksbopt.peers.sgdp(LR, MOMENTUM), "floor: sgdp"),
            "floor: sgdp": (floors.sgdp(LR, MOMENTUM), None),
        },
        "adam": {
            "optax.adam": (optax.adam(ADAM_LR), None),
            "ksbopt.peers.adamp": (ksbopt.peers.adamp(ADAM_LR), "floor: adamp"),
            "ksbopt.peers.nero": (ksbopt.peers.nero(ADAM_LR), "floor: nero"),
            "floor: adamp": (floors.adamp(ADAM_LR), None),
            "floor: nero": (floors.nero(ADAM_LR), None),
        },
        "rmsprop": {"optax.rmsprop": (optax.rmsprop(ADAM_LR), None)},
        "sgd+wd": {
            "optax.sgd(momentum) + wd": (
                optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), sgd),
                None,
            ),
            "ksbopt.peers.rotational(trace)": (
                ksbopt.peers.rotational(optax.trace(MOMENTUM), LR, WEIGHT_DECAY, MOMENTUM),
                "floor: rotational",
            ),
            "floor: rotational": (floors.rotational(LR, WEIGHT_DECAY, MOMENTUM), None),
        },
    }
    if units is not None:
        out["sgd"][EXACT_FLOOR] = (optax.chain(sgd, floors.exact_retraction(units)), None)
        out["sgd"]["floor: monitor(sgd) sums"] = (floors.monitor_sums(units, LR, MOMENTUM), None)
        out["adam"]["ksbopt.symmetrize(adam)"] = (
            ksbopt.symmetrize(optax.adam(ADAM_LR), syms),
            "floor: symmetrize(adam)",
        )
        out["adam"]["floor: symmetrize(adam)"] = (floors.symmetrize_adam(units, ADAM_LR), None)
        out["rmsprop"]["ksbopt.noether_rmsprop"] = (
            ksbopt.noether_rmsprop(syms, ADAM_LR),
            "floor: noether_rmsprop",
        )
        out["rmsprop"]["floor: noether_rmsprop"] = (floors.noether_rmsprop(units, ADAM_LR), None)
    return out


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


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _peak_bytes(compiled) -> int:
    """Peak memory of one step from the compiled executable's memory analysis: arguments,
    outputs not aliased to donated arguments, and temporaries."""
    m = compiled.memory_analysis()
    peak = getattr(m, "peak_memory_in_bytes", 0)
    if peak:
        return int(peak)
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def time_group(runners: dict, params, grads, repeats: int, inner: int, baseline: str) -> list[dict]:
    """Median seconds per step of each runner, repeats interleaved (order rotated each time).

    ``runners``: name -> (jitted step, transformation or None, floor row name or None).
    """
    states, compile_s, peaks, state_bytes = {}, {}, {}, {}
    fns = {}
    for name, (fn, tx, _) in runners.items():
        p = jax.tree.map(jnp.copy, params)
        # copied: a state may hold one array twice, and every leaf is donated
        s = jax.tree.map(jnp.copy, tx.init(p)) if tx is not None else ()
        state_bytes[name] = _nbytes(s)
        t0 = time.perf_counter()
        compiled = fn.lower(p, s, grads).compile()
        compile_s[name] = time.perf_counter() - t0
        peaks[name] = _peak_bytes(compiled)
        fns[name] = compiled
        p, s = compiled(p, s, grads)
        jax.block_until_ready(p)
        states[name] = [p, s]
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[name]
            p, s = states[name]
            t0 = time.perf_counter()
            for _ in range(inner):
                p, s = fn(p, s, grads)
            jax.block_until_ready(p)
            times[name].append((time.perf_counter() - t0) / inner)
            states[name] = [p, s]
    med = {name: _median(ts) for name, ts in times.items()}
    copy = med.get(COPY)
    rows = []
    for name, ts in times.items():
        floor = runners[name][2]
        rows.append(
            {
                "variant": name,
                "baseline": baseline,
                "floor": floor,
                "median_ms": 1e3 * med[name],
                "min_ms": 1e3 * min(ts),
                "ratio": med[name] / med[baseline],
                "ratio_floor": med[name] / med[floor] if floor in med else None,
                "copies": med[name] / copy if copy else None,
                "compile_s": compile_s[name],
                "peak_bytes": peaks[name],
                "peak_ratio": peaks[name] / peaks[baseline],
                "state_bytes": state_bytes[name],
                "state_ratio": (
                    state_bytes[name] / state_bytes[baseline] if state_bytes[baseline] else None
                ),
            }
        )
    return rows


def run(
    size: float, layout_name: str, group_names: tuple[str, ...], repeats: int, inner: int
) -> dict:
    """Time the given groups on one layout of ``size`` million parameters."""
    layout = LAYOUTS[layout_name](size)
    params = layout.params
    leaves = jax.tree.leaves(params)
    keys = iter(jax.random.split(jax.random.key(1), len(leaves)))
    grads = jax.tree.map(lambda x: 1e-3 * jax.random.normal(next(keys), x.shape, x.dtype), params)
    rows, loads = [], []
    for group, txs in groups(layout).items():
        if group not in group_names:
            continue
        runners = {name: (make_step(tx), tx, floor) for name, (tx, floor) in txs.items()}
        if group == "sgd":
            runners[COPY] = (jax.jit(_negate, donate_argnums=(0,)), None, None)
        loads.append(os.getloadavg()[0])
        group_rows = time_group(runners, params, grads, repeats, inner, baseline=next(iter(txs)))
        for row in group_rows:
            row["group"] = group
        rows += group_rows
        del runners
    nbytes = _nbytes(params)
    for row in rows:
        if row["variant"] == COPY:
            row["GB_per_s"] = 2 * nbytes / (row["median_ms"] * 1e-3) / 1e9  # read + write
    return {
        "layout": layout_name,
        "size": size,
        "params": sum(x.size for x in leaves),
        "leaves": len(leaves),
        "bytes": nbytes,
        "load_average": loads,
        "rows": rows,
    }


def _print(res: dict, repeats: int, inner: int) -> None:
    loads = ", ".join(f"{x:.1f}" for x in res["load_average"])
    print(
        f"\n{res['layout']}: {res['params'] / 1e6:.1f}M parameters in {res['leaves']} leaves, "
        f"{res['bytes'] / 1e6:.1f} MB (median of {repeats} interleaved repeats of {inner} "
        f"steps; load average {loads})"
    )
    head = ("variant", "ms/step", "ratio", "/floor", "copies", "compile s", "peak", "state")
    print(f"{head[0]:<32} " + " ".join(f"{h:>9}" for h in head[1:]))

    def num(x, fmt="9.2f"):
        return f"{x:{fmt}}" if x is not None else " " * 9

    for r in res["rows"]:
        if r["variant"] == r["baseline"]:
            print("-" * 32)
        extra = f"   {r['GB_per_s']:.1f} GB/s" if "GB_per_s" in r else ""
        print(
            f"{r['variant']:<32} {num(r['median_ms'])} {num(r['ratio'])} "
            f"{num(r['ratio_floor'])} {num(r['copies'])} {num(r['compile_s'])} "
            f"{num(r['peak_ratio'])} {num(r['state_ratio'])}{extra}"
        )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10", help="comma-separated sizes in millions")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats")
    parser.add_argument("--inner", type=int, default=2, help="steps per timed repeat")
    parser.add_argument(
        "--layouts", default=",".join(LAYOUTS), help=f"comma-separated subset of {list(LAYOUTS)}"
    )
    parser.add_argument(
        "--groups", default=",".join(GROUPS), help=f"comma-separated subset of {list(GROUPS)}"
    )
    parser.add_argument(
        "--family-layouts",
        default="cnn",
        help="layouts on which the groups other than sgd run (the sgd group, with the exact "
        "transforms, runs on every layout); 'all' for every layout",
    )
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    host.reuse_large_buffers()  # see ksbopt.bench.host
    group_names = tuple(args.groups.split(","))
    layouts = tuple(args.layouts.split(","))
    family = (
        tuple(LAYOUTS) if args.family_layouts == "all" else tuple(args.family_layouts.split(","))
    )
    for what, got, known in (("groups", group_names, GROUPS), ("layouts", layouts, LAYOUTS)):
        if set(got) - set(known):
            parser.error(
                f"--{what}={','.join(got)} names unknown {what}; choose from {list(known)}."
            )
    out = {
        "command": "python -m benchmarks.bench_transforms "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "devices": [str(d) for d in jax.devices()],
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        **host.setting(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "results": [],
    }
    print(f"devices: {out['devices']}  cpus: {out['cpu_count']}")
    for size in (float(s) for s in args.sizes.split(",")):
        for layout in layouts:
            chosen = tuple(g for g in group_names if g == "sgd" or layout in family)
            if not chosen:
                continue
            res = run(size, layout, chosen, args.repeats, args.inner)
            out["results"].append(res)
            _print(res, args.repeats, args.inner)
            # every layout compiles its own steps: drop the last one's executables and
            # buffers, or a 50M run holds all six layouts' at once (24 GB, killed for memory)
            jax.clear_caches()
            gc.collect()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
