"""Wall time of ``ksbopt.detect`` on a ~10M-parameter Flax model with two batches.

``--model cnn`` (default) is a VGG-style NNX CNN (3x3 convolutions without bias, each followed by
BatchNorm and ReLU; stride 2 every other layer; global average pooling; a softmax head).
Its expected symmetries: one per-unit Scale per convolution (BatchNorm), one Rescale between
each BatchNorm's affine parameters and the next convolution (or the head), and the head's
Translation. The benchmark times one call of ``detect`` on two batches (the first call:
trace, graph analysis, compiles, one gradient per batch and the finite actions), checks that
the declarations found are the expected ones, and counts the gradient evaluations.
``--model transformer`` is the harness's byte-level pre-LayerNorm Transformer at width 512,
3 blocks, 8 heads (about 9.7M parameters; per-head Linear, LayerNorm Rescales and
Translations expected), on two batches of ``--batch`` sequences of ``--size`` bytes.

Run:  python -m benchmarks.bench_detect [--model cnn|transformer] [--batch 8] [--size 32]
      [--repeats 1] [--json out]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import ksbopt
import ksbopt.flax
from ksbopt._src.detection import compiled_loss
from ksbopt._src.detection import detect as detect_lib
from ksbopt.bench import host

WIDTHS = (64, 128, 256, 256, 384, 512, 512, 512, 512)


class CNN(nnx.Module):
    """Conv(3x3, no bias) -> BatchNorm -> ReLU blocks, global average pooling, a head."""

    def __init__(self, rngs: nnx.Rngs, widths=WIDTHS, classes: int = 10):
        cin = 3
        self.convs = nnx.List()
        self.norms = nnx.List()
        for w in widths:
            self.convs.append(nnx.Conv(cin, w, (3, 3), use_bias=False, rngs=rngs))
            self.norms.append(nnx.BatchNorm(w, rngs=rngs))
            cin = w
        self.head = nnx.Linear(cin, classes, rngs=rngs)

    def __call__(self, x):
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = jax.nn.relu(norm(conv(x)))
            if i % 2 == 1:
                x = x[:, ::2, ::2, :]  # stride 2 (subsampling keeps the graph simple)
        return self.head(x.mean((1, 2)))


def build(batch: int, size: int, seed: int = 0):
    """The model (filled with numpy values: no initialiser compiles), the loss, two batches."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CNN(nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = jax.tree_util.keystr(path)
        if "'var'" in name:
            return jnp.ones(x.shape, x.dtype)
        if "'mean'" in name:
            return jnp.zeros(x.shape, x.dtype)
        fan_in = int(np.prod(x.shape[:-1])) or 1
        return jnp.asarray(rng.standard_normal(x.shape) / np.sqrt(fan_in), x.dtype)

    model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))
    model.train()

    def loss(m, b):
        return optax.softmax_cross_entropy_with_integer_labels(m(b[0]), b[1]).mean()

    loss_fn, params = ksbopt.flax.nnx_loss(model, loss)
    batches = [
        (rng.standard_normal((batch, size, size, 3)).astype(np.float32), rng.integers(0, 10, batch))
        for _ in range(2)
    ]
    return loss_fn, params, batches


def build_transformer(batch: int, size: int, seed: int = 0):
    """The ~9.7M-parameter Transformer of the harness, its loss and two batches of bytes."""
    from ksbopt.bench.models import TransformerLM

    model = TransformerLM(d=512, layers=3, heads=8, seq_len=size, qk_norm=False, rngs=nnx.Rngs(0))

    def loss(m, b):
        logits = m(b[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[:, 1:]).mean()

    loss_fn, params = ksbopt.flax.nnx_loss(model, loss)
    rng = np.random.default_rng(seed)
    batches = [rng.integers(0, 256, (batch, size + 1)) for _ in range(2)]
    return loss_fn, params, batches


def expected(n: int) -> list:
    out = [ksbopt.Scale(f"convs/{i}/kernel") for i in range(n)]
    out += [
        ksbopt.Rescale([f"norms/{i}/scale", f"norms/{i}/bias"], f"convs/{i + 1}/kernel")
        for i in range(n - 1)
    ]
    out += [
        ksbopt.Rescale([f"norms/{n - 1}/scale", f"norms/{n - 1}/bias"], "head/kernel"),
        ksbopt.Translation(["head/kernel", "head/bias"]),
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("cnn", "transformer"), default="cnn")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="further calls (compiled functions are reused) after the first",
    )
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()
    host.reuse_large_buffers()  # see ksbopt.bench.host

    make = build if args.model == "cnn" else build_transformer
    loss_fn, params, batches = make(args.batch, args.size)
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    calls = {"gradient": 0, "loss": 0}
    originals = (compiled_loss.value_and_grad, compiled_loss.loss_value)

    def counting(fn, name):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)

        return wrapped

    compiled_loss.value_and_grad = counting(originals[0], "gradient")
    compiled_loss.loss_value = counting(originals[1], "loss")
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    syms, report = detect_lib.detect(loss_fn, params, *batches)
    first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
    counted = dict(calls)
    compiled_loss.value_and_grad, compiled_loss.loss_value = originals
    again = []
    for _ in range(args.repeats - 1):
        t0 = time.perf_counter()
        detect_lib.detect(loss_fn, params, *batches)
        again.append(time.perf_counter() - t0)

    same = _same_groups(syms, params) if args.model == "cnn" else None
    print(report)
    result = {
        "model": args.model,
        "parameters": n_params,
        "batches": (
            f"2 x {args.batch} x {args.size}x{args.size}x3"
            if args.model == "cnn"
            else f"2 x {args.batch} x {args.size + 1} bytes"
        ),
        "declarations by kind": {
            k: sum(s.kind == k for s in syms) for k in sorted({s.kind for s in syms})
        },
        "declarations": len(syms),
        "groups": sum(c.n_groups for c in report.checks),
        "expected groups found": same,
        "gradient evaluations": counted["gradient"],
        "forward evaluations (finite actions)": counted["loss"],
        "detect, first call (s)": round(first, 2),
        "detect, first call, CPU time of all threads (s)": round(first_cpu, 2),
        "load average before the call": round(load, 2),
        "cpu cores": os.cpu_count(),
        **host.setting(),
        "detect, later calls (s)": [round(t, 2) for t in again],
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "devices": [str(d) for d in jax.devices()],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def _same_groups(syms, params) -> bool:
    """Compare the groups of what was found with the expected declarations, group by group."""
    from ksbopt._src.symmetries import orbit

    def canon(decls):
        binding = orbit.bind(tuple(decls), params)
        return {(b.symmetry.kind, tuple(sorted(b.leaves)), b.charge_shape) for b in binding.bound}

    return canon(syms) == canon(expected(len(WIDTHS)))


if __name__ == "__main__":
    main()
