"""Per-step cost of ksbopt transforms on the benchmarks' Transformer LM, sharded on a mesh.

The model is the byte-level pre-LayerNorm Transformer of the ``lm_stdlib_qknorm`` task
(:mod:`ksbopt.bench.tasks`, QK-normalisation: one Scale group per head of the query and key
kernels, a Linear (GL(head_dim)) symmetry per head between value and output kernels, a
Translation symmetry of the softmax head). Its parameters are laid out on a (data, model)
mesh Megatron-style (:func:`lm_spec`): attention heads, the first MLP kernel's units and the
vocabulary split over ``model``, the second MLP kernel along its input axis; the batch over
``data``. Every ksbopt group then lives on one device along its unit axis (a head, a unit),
so the per-group reductions are local or an all-reduce of per-group sums; no kernel moves
(see ``docs/howto/sharding.md``).

Each variant is one jitted training step (loss, gradients, optimizer update) with pinned
input and output shardings and donated buffers; the baseline is ``optax.adam`` alone.
Repeats are interleaved (baseline, variant, baseline, ...) so that machine noise hits all
variants alike; the table reports medians and the ratio of medians.

Run::

    python -m benchmarks.bench_sharded --mesh 2x4 --steps 20

On CPU the mesh's devices are simulated: when ``XLA_FLAGS`` does not set
``--xla_force_host_platform_device_count`` already, this module sets it to the mesh size
before jax starts (run as ``python -m``; imported after jax, it cannot).
"""

from __future__ import annotations

import os
import re
import sys


def parse_mesh(text: str) -> tuple[int, int]:
    """``"2x4"`` -> (2, 4): the sizes of the mesh's ``data`` and ``model`` axes."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", text)
    if not m or min(int(m[1]), int(m[2])) < 1:
        raise ValueError(f"--mesh {text!r} must be DATAxMODEL with positive sizes, e.g. 2x4.")
    return int(m[1]), int(m[2])


def mesh_from_argv(argv: list[str], default: str = "2x4") -> tuple[int, int]:
    """The ``--mesh`` value of a command line (read before argparse: jax is not yet loaded)."""
    for i, arg in enumerate(argv):
        if arg == "--mesh" and i + 1 < len(argv):
            return parse_mesh(argv[i + 1])
        if arg.startswith("--mesh="):
            return parse_mesh(arg.split("=", 1)[1])
    return parse_mesh(default)


def simulate_cpu_devices(n: int) -> None:
    """Ask XLA's CPU backend for ``n`` devices, unless ``XLA_FLAGS`` already says how many.

    Only effective before jax starts; it does not change GPU or TPU device counts.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


if __name__ == "__main__" and "jax" not in sys.modules:
    _data, _model = mesh_from_argv(sys.argv[1:])
    simulate_cpu_devices(_data * _model)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import ksbopt  # noqa: E402
from ksbopt.bench import host  # noqa: E402
from ksbopt.bench.tasks import Task, build_task  # noqa: E402

__all__ = [
    "LM_RULES",
    "LMSetup",
    "lm_setup",
    "lm_spec",
    "make_mesh",
    "make_step",
    "parse_mesh",
    "shardings_of",
    "variants",
]

# --------------------------------------------------------------------------- mesh and layout


def make_mesh(data: int, model: int) -> Mesh:
    """A (data, model) mesh with Auto axes: XLA propagates shardings inside ``jit``.

    (``jax.make_mesh`` makes Explicit axes by default in jax 0.10; ksbopt works under both,
    see docs/howto/sharding.md. Auto axes keep this benchmark's model code free of
    ``out_sharding=`` annotations.)
    """
    n = data * model
    if jax.device_count() < n:
        raise ValueError(
            f"a {data}x{model} mesh needs {n} devices, this process has {jax.device_count()}; "
            f"on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax starts."
        )
    return jax.make_mesh((data, model), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


# Megatron-style rules for ksbopt.bench.models.TransformerLM ("/"-joined parameter paths;
# Flax layout: query/key/value kernels (embed, heads, head_dim), out kernel (heads,
# head_dim, embed), Dense kernels (in, out)). First match wins; everything else (embeddings,
# LayerNorms, biases of the row-parallel layers) is replicated.
LM_RULES: tuple[tuple[str, P], ...] = (
    (r"attn/(query|key|value)/kernel$", P(None, "model", None)),  # heads
    (r"attn/(query|key|value)/bias$", P("model", None)),
    (r"attn/out/kernel$", P("model", None, None)),  # heads (input side)
    (r"fc1/kernel$", P(None, "model")),  # units (column parallel)
    (r"fc1/bias$", P("model")),
    (r"fc2/kernel$", P("model", None)),  # input axis (row parallel)
    (r"^head/kernel$", P(None, "model")),  # vocabulary
    (r"^head/bias$", P("model")),
)


def _path(path) -> str:
    keys = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                keys.append(str(getattr(k, attr)))
                break
    return "/".join(keys)


def lm_spec(path: str) -> P:
    """The partition spec of the LM parameter at ``path`` (see :data:`LM_RULES`)."""
    for pattern, spec in LM_RULES:
        if re.search(pattern, path):
            return spec
    return P()


def shardings_of(tree: Any, mesh: Mesh) -> Any:
    """The shardings of a tree of arrays; uncommitted leaves (no layout of their own, such as
    a step count that ``init`` made with ``jnp.zeros``) replicated, as ``jit`` lays them out."""
    return jax.tree.map(lambda x: x.sharding if x.committed else NamedSharding(mesh, P()), tree)


# --------------------------------------------------------------------------- model and step


class LMSetup:
    """The task, the split model and the sharded training pieces."""

    def __init__(self, task: Task, mesh: Mesh, seed: int = 0):
        self.task, self.mesh = task, mesh
        model = task.make_model(seed)
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        params = nnx.as_pure(params)
        self.param_shardings = jax.tree_util.tree_map_with_path(
            lambda p, x: NamedSharding(mesh, lm_spec(_path(p))), params
        )
        self.params = jax.device_put(params, self.param_shardings)
        self.batch_sharding = NamedSharding(mesh, P("data"))
        replicated = NamedSharding(mesh, P())
        corpus = {"train_bytes": jax.device_put(task.arrays["train_bytes"], replicated)}
        window = jax.jit(task.batch, out_shardings=self.batch_sharding)
        self.sampler = task.sampler(seed)
        self.next_batch = lambda: window(corpus, self.sampler.next(1)[0])

    def loss(self, params, batch):
        return self.task.loss(nnx.merge(self.graphdef, params, self.rest), batch)


def lm_setup(mesh: Mesh, scale: str = "small", seed: int = 0) -> LMSetup:
    """The ``lm_stdlib_qknorm`` task at ``scale``, its model sharded on ``mesh``."""
    task = build_task("lm_stdlib_qknorm", scale)
    heads = task.config["heads"]
    if heads % mesh.shape["model"]:
        raise ValueError(
            f"the model axis ({mesh.shape['model']}) must divide the {heads} attention heads "
            f"of the {scale!r} LM; choose --mesh with a model size in "
            f"{[m for m in range(1, heads + 1) if heads % m == 0]}."
        )
    return LMSetup(task, mesh, seed)


def variants(task: Task, learning_rate: float = 3e-3) -> dict[str, optax.GradientTransformation]:
    """Adam alone and with ksbopt transforms on the LM's symmetries."""
    held = task.symmetries(["scale", "linear"])  # QK-norm heads, value/output GL(head_dim)
    every = task.symmetries()  # and the softmax head's translation
    base = optax.adam(learning_rate)
    return {
        "optax.adam": base,
        "ksbopt.project + adam": optax.chain(ksbopt.project(held), base),
        "adam + ksbopt.retract": optax.chain(base, ksbopt.retract(held)),
        "ksbopt.monitor(adam + retract)": ksbopt.monitor(
            optax.chain(base, ksbopt.retract(held)), every, learning_rate=learning_rate
        ),
    }


def make_step(setup: LMSetup, tx: optax.GradientTransformation, state: Any) -> Callable:
    """One jitted training step ``(params, state, batch) -> (params, state, loss)``.

    Input and output shardings are pinned to those of ``params`` and ``state`` (uncommitted
    state leaves replicated), and both are donated: the loop runs one compiled program with
    one layout. The gradients are constrained to the parameters' layout before the update.
    """
    state_sh = shardings_of(state, setup.mesh)

    def step(params, state, batch):
        loss, grads = jax.value_and_grad(setup.loss)(params, batch)
        grads = jax.lax.with_sharding_constraint(grads, setup.param_shardings)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return jax.jit(
        step,
        in_shardings=(setup.param_shardings, state_sh, setup.batch_sharding),
        out_shardings=(setup.param_shardings, state_sh, NamedSharding(setup.mesh, P())),
        donate_argnums=(0, 1),
    )


# --------------------------------------------------------------------------- benchmark


def run(mesh: Mesh, scale: str, steps: int, repeats: int) -> dict:
    setup = lm_setup(mesh, scale)
    txs = variants(setup.task)
    batch = setup.next_batch()
    runners = {}
    for name, tx in txs.items():
        params = jax.tree.map(lambda x: x.copy(), setup.params)
        state = tx.init(params)
        state = jax.device_put(state, shardings_of(state, mesh))
        t0 = time.perf_counter()
        step = make_step(setup, tx, state).lower(params, state, batch).compile()
        compile_s = time.perf_counter() - t0
        params, state, loss = step(params, state, batch)  # warm-up
        jax.block_until_ready(loss)
        runners[name] = {"step": step, "carry": (params, state), "compile_s": compile_s}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, r in runners.items():
            params, state = r["carry"]
            t0 = time.perf_counter()
            for _ in range(steps):
                params, state, loss = r["step"](params, state, batch)
            jax.block_until_ready(loss)
            times[name].append((time.perf_counter() - t0) / steps)
            r["carry"] = (params, state)
    base = statistics.median(times["optax.adam"])
    n = sum(x.size for x in jax.tree.leaves(setup.params))
    return {
        "params": int(n),
        "config": {k: setup.task.config[k] for k in ("d", "layers", "heads", "seq_len", "batch")},
        "rows": [
            {
                "variant": name,
                "median_ms": 1e3 * statistics.median(ts),
                "ratio": statistics.median(ts) / base,
                "compile_s": runners[name]["compile_s"],
            }
            for name, ts in times.items()
        ],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mesh", default="2x4", help="DATAxMODEL device counts, e.g. 2x4")
    parser.add_argument("--scale", default="small", help="LM size: tiny, small, base, large")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    host.reuse_large_buffers()  # see ksbopt.bench.host
    data, model = parse_mesh(args.mesh)
    mesh = make_mesh(data, model)
    out = {
        "mesh": dict(mesh.shape),
        "devices": [str(d) for d in mesh.devices.flat],
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        **host.setting(),
        "jax": jax.__version__,
        "optax": optax.__version__,
    }
    print(f"mesh {dict(mesh.shape)} on {mesh.devices.size} {jax.devices()[0].platform} devices")
    out |= run(mesh, args.scale, args.steps, args.repeats)
    print(
        f"lm_stdlib_qknorm {args.scale} {out['config']}: {out['params']} parameters; median of "
        f"{args.repeats} interleaved repeats of {args.steps} steps"
    )
    print(f"{'variant':<32} {'ms/step':>9} {'ratio':>7} {'compile s':>10}")
    for r in out["rows"]:
        print(f"{r['variant']:<32} {r['median_ms']:9.2f} {r['ratio']:7.2f} {r['compile_s']:10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
