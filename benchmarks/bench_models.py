"""Whole train steps of realistic Flax models with every ksbopt transform, against the base.

Models (each at two sizes, ``small`` and ``large``; the symmetries are those ``ksbopt.detect``
finds on two batches, so the benchmark sees what a new user would pass):

- ``transformer``: the byte-level pre-LayerNorm Transformer of the harness (flax.nnx
  ``MultiHeadAttention``, ``LayerNorm``, GELU MLP): per-head Linear query-key and
  value-output symmetries, LayerNorm-scale Rescales, Translations; 2 blocks of width 64
  and 3 blocks of width 128, 4 heads, context 32;
- ``relu_mlp``: a deep ReLU MLP without normalisation and a softmax head (the rescale chain
  between its layers and the head's translation): width 128 depth 4, width 512 depth 8;
- ``bn_cnn``: the MNIST-1D CNN with BatchNorm (a per-channel Scale per convolution, the
  BatchNorm affine Rescales, the head's translation), 32 and 128 channels.

Batches: 16 sequences of 32 bytes for the Transformer, 128 examples for the others.

Rows per model and size, for each base (``adam``, ``sgd`` with momentum): the base alone;
``chain(base, retract(syms))``; ``chain(base, steer(syms, initial charges, rate 0.5))``;
``chain(base, project(syms))``; ``monitor(base, syms)``. One row is one jitted train step
(forward, backward, update, ``optax.apply_updates``; parameters and optimizer state donated).
``compile_s`` is the time of ``jit(...).lower(...).compile()``; ``step_ms`` the median over
``--repeats`` timings of ``--inner`` steps each, the variants of one model interleaved
(each once per repeat, order rotated); ratios are to the base of the same model, size and
run, with their range over the repeats (a repeat's ratio compares times taken moments apart,
so the range shows how far the machine's noise moves the median). ``residual`` is the
largest residual a ksbopt state reports after the last step (the exactness of the joint
solves). The load average is recorded: on a shared machine compare
ratios.

Run:  python -m benchmarks.bench_models [--models transformer,relu_mlp,bn_cnn]
      [--sizes small,large] [--bases adam,sgd] [--variants retract,steer,project,monitor]
      [--repeats 5] [--inner 5]
      [--out benchmarks/results/models-cpu]

Writes ``bench_models_<models>.json`` and the same figures as markdown tables (``.md``);
``--report FILE.json`` rewrites the tables of a record without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import ksbopt
import ksbopt.flax
from ksbopt.bench import host
from ksbopt.bench import models as bench_models

SIZES = {
    "transformer": {"small": dict(d=64, layers=2), "large": dict(d=128, layers=3)},
    "relu_mlp": {"small": dict(width=128, depth=4), "large": dict(width=512, depth=8)},
    "bn_cnn": {"small": dict(channels=32), "large": dict(channels=128)},
}
BATCH = {"transformer": 16, "relu_mlp": 128, "bn_cnn": 128}  # sequences / examples
SEQ = 32


def build(model: str, size: str, seed: int = 0):
    """The model, its loss ``loss(model, batch)`` and two batches (numpy, fixed seed)."""
    cfg = SIZES[model][size]
    rngs = nnx.Rngs(seed)
    rng = np.random.default_rng(seed)
    if model == "transformer":
        net = bench_models.TransformerLM(
            d=cfg["d"], layers=cfg["layers"], heads=4, seq_len=SEQ, qk_norm=False, rngs=rngs
        )

        def loss(m, b):
            logits = m(b[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, b[:, 1:]).mean()

        batches = [rng.integers(0, 256, (BATCH[model], SEQ + 1)) for _ in range(2)]
        return net, loss, batches
    if model == "relu_mlp":
        net = bench_models.DeepMLP(40, 10, cfg["width"], cfg["depth"], relu=True, rngs=rngs)
    elif model == "bn_cnn":
        net = bench_models.CNN1D(cfg["channels"], batchnorm=True, rngs=rngs)
        net.train()
    else:
        raise ValueError(f"model={model!r}; choose from {sorted(SIZES)}")

    def loss(m, b):
        return optax.softmax_cross_entropy_with_integer_labels(m(b[0]), b[1]).mean()

    batches = [
        (
            rng.standard_normal((BATCH[model], 40)).astype(np.float32),
            rng.integers(0, 10, BATCH[model]),
        )
        for _ in range(2)
    ]
    return net, loss, batches


def bases() -> dict:
    return {"adam": optax.adam(1e-3), "sgd": optax.sgd(1e-2, momentum=0.9)}


#: The variants of every model (``--variants`` picks some; the base always runs).
VARIANTS = ("retract", "steer", "project", "monitor")


def variants(base, syms, names=VARIANTS) -> dict:
    every = {
        "+ retract": lambda: optax.chain(base, ksbopt.retract(syms)),
        "+ steer": lambda: optax.chain(base, ksbopt.steer(syms, "initial", rate=0.5)),
        "+ project": lambda: optax.chain(base, ksbopt.project(syms)),
        "monitor(base)": lambda: ksbopt.monitor(base, syms),
    }
    chosen = {k: make() for (k, make), name in zip(every.items(), VARIANTS) if name in names}
    return {"base": base, **chosen}


def train_step_fn(graphdef, loss, tx):
    """One train step on pure arrays: the non-parameter state (BatchNorm's running
    averages) comes back updated, as ``nnx.Optimizer`` with a BatchNorm model does."""

    def step(params, rest, opt_state, batch):
        def f(p):
            model = nnx.merge(graphdef, p, rest)
            value = loss(model, batch)
            return value, nnx.as_pure(nnx.split(model, nnx.Param, ...)[2])

        (value, rest), grads = jax.value_and_grad(f, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, value

    return jax.jit(step, donate_argnums=(0, 2))


class _Compiled:
    """One variant's compiled train step and its running parameters and state."""

    def __init__(self, graphdef, params, rest, loss, tx, batch):
        self.params = jax.tree.map(jnp.copy, params)
        self.opt_state = tx.init(self.params)
        self.rest, self.batch = rest, batch
        jitted = train_step_fn(graphdef, loss, tx)
        t0 = time.perf_counter()
        self.step = jitted.lower(self.params, rest, self.opt_state, batch).compile()
        self.compile_s = time.perf_counter() - t0
        self.run(1)

    def run(self, n: int) -> float:
        """Seconds per step over ``n`` steps."""
        t0 = time.perf_counter()
        for _ in range(n):
            self.params, self.rest, self.opt_state, self.value = self.step(
                self.params, self.rest, self.opt_state, self.batch
            )
        jax.block_until_ready((self.params, self.value))
        return (time.perf_counter() - t0) / n

    def residual(self) -> float | None:
        """The largest ``residual`` field of a ksbopt state inside the optimizer state."""
        found = [
            float(jnp.max(x))
            for x in jax.tree.leaves(optax.tree.get_all_with_path(self.opt_state, "residual"))
            if hasattr(x, "dtype")
        ]
        return max(found) if found else None


def time_variants(graphdef, params, rest, loss, txs: dict, batch, repeats, inner) -> dict:
    """Compile every variant, then time them interleaved (every variant once per repeat,
    the order rotated) so that machine noise hits all alike; medians per variant."""
    compiled = {k: _Compiled(graphdef, params, rest, loss, tx, batch) for k, tx in txs.items()}
    times: dict[str, list[float]] = {k: [] for k in compiled}
    names = list(compiled)
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            times[k].append(compiled[k].run(inner))
    out = {}
    for k, c in compiled.items():
        row = {
            "compile_s": round(c.compile_s, 3),
            "step_ms": round(1e3 * statistics.median(times[k]), 3),
            "step_ms_repeats": [round(1e3 * t, 3) for t in times[k]],
            "finite": bool(np.isfinite(float(c.value))),
        }
        if c.residual() is not None:
            row["residual"] = c.residual()
        out[k] = row
    return out


def run_model(
    model: str, size: str, base_names, repeats: int, inner: int, variant_names=VARIANTS
) -> dict:
    net, loss, batches = build(model, size)
    loss_fn, params = ksbopt.flax.nnx_loss(net, loss)
    t0 = time.perf_counter()
    syms, _ = ksbopt.detect(loss_fn, params, *batches)
    detect_s = time.perf_counter() - t0
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    batch = jax.tree.map(jnp.asarray, batches[0])
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    kinds: dict[str, int] = {}
    for s in syms:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    out = {
        "model": model,
        "size": size,
        "config": SIZES[model][size],
        "batch": BATCH[model],
        "parameters": n_params,
        "symmetries": kinds,
        "detect_s": round(detect_s, 2),
        "load_before": round(os.getloadavg()[0], 2),
        "rows": [],
    }
    all_bases = bases()
    for bname in base_names:
        txs = variants(all_bases[bname], syms, variant_names)
        rows = time_variants(graphdef, params, rest, loss, txs, batch, repeats, inner)
        ref = rows["base"]
        for vname, r in rows.items():
            r["step_ratio"] = round(r["step_ms"] / ref["step_ms"], 3)
            # the spread of the ratio over the repeats (each repeat times every variant once)
            each = [t / b for t, b in zip(r["step_ms_repeats"], ref["step_ms_repeats"])]
            r["step_ratio_range"] = [round(min(each), 3), round(max(each), 3)]
            r["compile_ratio"] = round(r["compile_s"] / ref["compile_s"], 3)
            out["rows"].append({"base": bname, "variant": vname, **r})
            print(
                f"{model:11s} {size:5s} {n_params:>9d} {bname:4s} {vname:14s} "
                f"{r['step_ms']:9.2f} ms x{r['step_ratio']:5.2f}  compile "
                f"{r['compile_s']:6.2f} s x{r['compile_ratio']:5.2f}"
                + (f"  residual {r['residual']:.1e}" if "residual" in r else ""),
                flush=True,
            )
    out["load_after"] = round(os.getloadavg()[0], 2)
    return out


def markdown(record: dict, json_path: str) -> str:
    """The tables of a run, generated from its record (nothing copied by hand)."""
    lines = [
        f"Generated by `{record['command']}` from `{json_path}`; {record['cpu_cores']} CPU "
        f"cores ({record['machine']}), jax {record['versions']['jax']}. Ratios are to the base "
        "optimizer's whole train step in the same run (variants interleaved); 'ratio per "
        "repeat' is the range of the ratio over the repeats, each of which times every "
        "variant once.",
        "",
    ]
    for res in record["results"]:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(res["symmetries"].items()))
        lines += [
            f"**{res['model']} {res['size']}** ({res['config']}, batch {res['batch']}): "
            f"{res['parameters']:,} parameters; symmetries found by `detect` in "
            f"{res['detect_s']} s: {kinds}; load average {res['load_before']} before, "
            f"{res['load_after']} after.",
            "",
            "| base | variant | step ms | ratio | ratio per repeat | compile s | compile ratio "
            "| residual |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            residual = f"{r['residual']:.1e}" if "residual" in r else ""
            lo, hi = r.get("step_ratio_range", (None, None))
            spread = f"{lo:.2f}-{hi:.2f}" if lo is not None else ""
            lines.append(
                f"| {r['base']} | {r['variant']} | {r['step_ms']:.2f} | {r['step_ratio']:.2f} | "
                f"{spread} | {r['compile_s']:.2f} | {r['compile_ratio']:.2f} | {residual} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="transformer,relu_mlp,bn_cnn")
    parser.add_argument("--sizes", default="small,large")
    parser.add_argument("--bases", default="adam,sgd")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"which of {','.join(VARIANTS)} to run beside the base (default all)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/models-cpu")
    parser.add_argument(
        "--report", default=None, help="only rewrite the .md tables of this JSON record"
    )
    args = parser.parse_args()
    host.reuse_large_buffers()  # see ksbopt.bench.host
    if args.report:
        with open(args.report) as f:
            record = json.load(f)
        with open(args.report[: -len(".json")] + ".md", "w") as f:
            f.write(markdown(record, args.report))
        return
    models = args.models.split(",")
    for m in models:
        if m not in SIZES:
            raise SystemExit(f"--models: {m!r} is not one of {sorted(SIZES)}")
    chosen = args.variants.split(",")
    for v in chosen:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: {v!r} is not one of {list(VARIANTS)}")
    results = []
    for model in models:
        for size in args.sizes.split(","):
            if size not in SIZES[model]:
                raise SystemExit(f"--sizes: {size!r} is not one of {sorted(SIZES[model])}")
            results.append(
                run_model(model, size, args.bases.split(","), args.repeats, args.inner, chosen)
            )
    record = {
        "command": "python -m benchmarks.bench_models "
        f"--models {args.models} --sizes {args.sizes} --bases {args.bases} "
        f"--variants {args.variants} "
        f"--repeats {args.repeats} --inner {args.inner} --out {args.out}",
        "cpu_cores": os.cpu_count(),
        **host.setting(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "devices": [str(d) for d in jax.devices()],
        "versions": {"jax": jax.__version__, "optax": optax.__version__},
        "results": results,
    }
    os.makedirs(args.out, exist_ok=True)
    name = "bench_models_" + "_".join(models) + ".json"
    path = os.path.join(args.out, name)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    with open(path[: -len(".json")] + ".md", "w") as f:
        f.write(markdown(record, path))
    print(f"wrote {path} and its .md tables")


if __name__ == "__main__":
    main()
