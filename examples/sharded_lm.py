"""Sharded training: the benchmarks' byte-level Transformer LM on a (data, model) mesh.

The model, data and symmetry declarations are those of the ``lm_stdlib_qknorm`` benchmark
task (a pre-LayerNorm Transformer with QK-normalisation, trained on the Python standard
library's source, one byte per token). Its parameters are laid out Megatron-style on a
(data=2, model=4) mesh: attention heads, the first MLP kernel's units and the vocabulary
over ``model``, the second MLP kernel along its input axis, the batch over ``data``
(``benchmarks.bench_sharded.LM_RULES``). The optimizer is Adam followed by ``ksbopt.retract``
on the QK-norm Scale groups (the norm of every head's query and key weights) and the
per-head Linear (GL(head_dim)) symmetries between value and output kernels, wrapped in
``ksbopt.monitor`` for the charges of every symmetry, the softmax head's included.

Nothing in ksbopt is told about the mesh: the transforms run inside the jitted step and XLA
shards them like the parameters. Each group sits on one device along its unit axis (a
head), so its charges and retraction are computed where its weights are.

On CPU the 8 devices are simulated (``XLA_FLAGS=--xla_force_host_platform_device_count=8``,
set below before jax starts unless ``XLA_FLAGS`` already sets a device count).

Run:  python examples/sharded_lm.py              (about two minutes on 2 CPU cores)
      python examples/sharded_lm.py --mesh 4x2 --steps 200
"""

from __future__ import annotations

import math
import os
import sys

# The device count is fixed when jax starts: ask for the mesh's devices first (CPU only;
# GPUs and TPUs are what they are). Kept free of imports that would start jax.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    _argv = " ".join(sys.argv[1:]).replace("=", " ").split()
    _mesh = _argv[_argv.index("--mesh") + 1] if "--mesh" in _argv[:-1] else "2x4"
    try:
        _n = math.prod(int(v) for v in _mesh.lower().split("x"))  # "2x4" -> 8
    except ValueError:
        _n = 8  # parse_mesh below says what is wrong with --mesh
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_n}"
    ).strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[0]))))

import argparse
import time

import jax
import numpy as np
import optax

import ksbopt
from benchmarks.bench_sharded import (
    lm_setup,
    make_mesh,
    make_step,
    parse_mesh,
    shardings_of,
)


def _spec(x) -> str:
    s = x.sharding
    return str(s.spec) if hasattr(s, "spec") else type(s).__name__


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--mesh", default="2x4", help="DATAxMODEL device counts, e.g. 2x4")
    parser.add_argument("--scale", default="small", help="LM size: tiny, small, base, large")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    args = parser.parse_args(argv)

    mesh = make_mesh(*parse_mesh(args.mesh))
    print(f"mesh: {dict(mesh.shape)}, axis types {mesh.axis_types}")
    print(mesh.devices)
    setup = lm_setup(mesh, args.scale)
    task, params = setup.task, setup.params
    cfg = {k: task.config[k] for k in ("d", "layers", "heads", "seq_len", "batch")}
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"\nlm_stdlib_qknorm ({args.scale}): {cfg}, {n} parameters")
    print(f"batch sharding: {setup.batch_sharding.spec}")

    print("\nparameter shardings (block 0 and the head):")
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        if "['blocks']" not in name or "['blocks'][0]" in name:
            print(f"  {name:<48} {x.shape!s:<14} {_spec(x)}")

    held = task.symmetries(["scale", "linear"])
    every = task.symmetries()
    print(f"\nretracted: {len(held)} symmetries (QK-norm heads, value/output GL(head_dim));")
    print(f"monitored: {len(every)} (and the softmax head's translation)")
    tx = ksbopt.monitor(
        optax.chain(optax.adam(args.learning_rate), ksbopt.retract(held)),
        every,
        learning_rate=args.learning_rate,
    )
    state = tx.init(params)
    state = jax.device_put(state, shardings_of(state, mesh))
    retract_state = state.inner[1]
    print("\nshardings of the retraction's state (the charges kept, one entry per symmetry):")
    for sym, q in zip(held, retract_state.initial):
        print(f"  {sym!r:.70}  {q.shape!s:<10} {_spec(q)}")

    step = make_step(setup, tx, state)
    t0 = time.perf_counter()
    step = step.lower(params, state, setup.next_batch()).compile()
    print(f"\ncompiled the step in {time.perf_counter() - t0:.1f} s")
    q0 = ksbopt.charges(params, held)

    t0 = time.perf_counter()
    for k in range(1, args.steps + 1):
        params, state, loss = step(params, state, setup.next_batch())
        if k == 1 or k % 25 == 0 or k == args.steps:
            bits = float(loss) / math.log(2.0)
            print(f"step {k:4d}  loss {float(loss):.4f}  ({bits:.3f} bits/byte)")
    dt = (time.perf_counter() - t0) / args.steps
    print(f"{1e3 * dt:.1f} ms/step")

    q = ksbopt.charges(params, held)
    drift = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
        for a, b in zip(q, q0)
    )
    print(f"\nlargest relative drift of a retracted charge over {args.steps} steps: {drift:.1e}")
    print("params after training still laid out as before:", end=" ")
    same = all(
        a.sharding.is_equivalent_to(b, a.ndim)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(setup.param_shardings))
    )
    print(same)
    charges = optax.tree.get(state, "charges")
    label = {
        "scale": "|W|^2/2 per head",
        "linear": "max |C| per head",
        "translation": "sum per row",
    }
    print("monitor: charges after the last step (first few groups):")
    for sym, c in zip(every, charges):
        c = np.asarray(c).reshape(np.shape(c)[0], -1)
        vals = np.max(np.abs(c), axis=1) if sym.kind == "linear" else c[:, 0]
        print(f"  {sym.kind:<12} {label[sym.kind]:<18} {np.round(vals[:4], 3)}")


if __name__ == "__main__":
    main()
