"""Sharding checks of the ksbopt transforms on 8 simulated CPU devices, in their own process.

``tests/test_sharding.py`` runs this script with ``sys.executable`` and reads the JSON it
prints as the last line of stdout; run it by hand to see the numbers::

    python tests/support/sharding_check.py --runs retract:unit,monitor:unit --hlo retract:axis:unit

JAX fixes its device count when it starts, so ``--xla_force_host_platform_device_count=8``
must be in ``XLA_FLAGS`` before ``import jax``: run as a script, this module adds it when it
is missing, which is why the checks cannot run inside the pytest process (whose JAX has one
CPU device). Imported (e.g. by pytest's doctest collection) it changes nothing.

``--runs NAME:CASE,...`` trains the optimizer ``NAME`` of :data:`TRANSFORMS` (see :func:`build`)
for ``STEPS``
jitted steps twice from the same start: once with the parameters, the batch and the
optimizer state sharded over a (data=2, model=4) mesh as :data:`CASES` says, once on a
single device. For each run it reports

- ``param_errs`` (per leaf) and ``charge_errs`` (per symmetry): relative differences between
  the sharded and the single-device run (``monitor_charge_errs`` too for ``monitor``);
- ``mismatches``: every parameter or optimizer-state leaf whose sharding after a step is not
  equivalent (``Sharding.is_equivalent_to``) to its sharding before that step;
- ``param_specs`` / ``state_specs``: the layouts the run had;
- ``error``: the traceback when the run raised.

``--hlo NAME:SYMS:CASE[:pinned],...`` compiles the update of one transform alone (gradients,
state and parameters in; updates and state out) on sharded inputs and lists the collectives
of the compiled HLO (``pinned``: with ``out_shardings`` equal to the input shardings).

``--explicit SYMS:CASE,...`` runs ``retract``'s update on a mesh with Explicit axes (what
``jax.make_mesh`` gives by default). ``--multiprocess ID:N:PORT`` is one of N cooperating
processes (8 / N CPU devices each) joined by ``jax.distributed.initialize`` on localhost.
"""

from __future__ import annotations

import os
import sys

DEVICE_FLAG = "--xla_force_host_platform_device_count=8"


def _force_devices() -> None:
    """Ask XLA for the CPU devices of DEVICE_FLAG; only possible before jax is imported."""
    if DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + DEVICE_FLAG).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


if __name__ == "__main__" and "jax" not in sys.modules:
    if "--multiprocess" in sys.argv:  # 8 devices over the processes: 8 // n each
        _n = int(sys.argv[sys.argv.index("--multiprocess") + 1].split(":")[1])
        DEVICE_FLAG = f"--xla_force_host_platform_device_count={8 // _n}"
    _force_devices()

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import ksbopt  # noqa: E402
import support  # noqa: E402
from support import registry  # noqa: E402

STEPS = 3
BATCH = 16
LENGTH, CHANNELS = 8, 4
CLASSES = 12
LR = 0.05

# --------------------------------------------------------------------------- the model

# A 1-D CNN with BatchNorm, a ReLU MLP, a deep-linear pair and a softmax head (Flax layout:
# the output unit is the last axis). Every axis is a multiple of the model axis (4); the
# kernel sizes differ from each other (192, 256, 128, 160, 240), so the HLO test can tell
# which kernel a collective moves, and every per-group vector (at most 21 numbers) and the
# 8 x 8 Linear charge are smaller than any kernel.
SHAPES = {
    "conv": {"kernel": (3, CHANNELS, 16)},  # no bias: BatchNorm removes it (its gradient is 0)
    "fc1": {"kernel": (16, 16), "bias": (16,)},
    "fc2": {"kernel": (16, 16), "bias": (16,)},
    "A": {"kernel": (16, 8)},
    "B": {"kernel": (8, 20)},
    "head": {"kernel": (20, CLASSES), "bias": (CLASSES,)},
}

SCALE = ksbopt.Scale("conv/kernel", axis=-1)  # BatchNorm per output channel
RESCALE = ksbopt.Rescale(incoming=["fc1/kernel", "fc1/bias"], outgoing="fc2/kernel")  # ReLU
LINEAR = ksbopt.Linear(left="A/kernel", right="B/kernel")  # x A B, nothing in between
TRANSLATION = ksbopt.Translation(["head/kernel", "head/bias"])  # softmax over the classes
SYMS = [SCALE, RESCALE, LINEAR, TRANSLATION]
AXIS_SYMS = [SCALE, RESCALE, TRANSLATION]  # one group per unit: sharded reductions suffice
LINEAR_LEAVES = ("['A']['kernel']", "['B']['kernel']")


def init_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def leaf(shape):
        scale = 1 / np.sqrt(np.prod(shape[:-1])) if len(shape) > 1 else 0.1
        return jnp.asarray(scale * rng.normal(size=shape), jnp.float32)

    return {k: {n: leaf(s) for n, s in v.items()} for k, v in SHAPES.items()}


def make_batch(step: int) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(1000 + step)
    x = jnp.asarray(rng.normal(size=(BATCH, LENGTH, CHANNELS)), jnp.float32)
    y = jnp.asarray(rng.integers(0, CLASSES, size=BATCH), jnp.int32)
    return x, y


def loss_fn(params: dict, batch: tuple) -> jax.Array:
    """conv -> BatchNorm (batch statistics) -> ReLU -> mean pool -> fc1 -> ReLU -> fc2 ->
    tanh -> A -> B -> ReLU -> head -> softmax cross-entropy."""
    x, y = batch
    h = jax.lax.conv_general_dilated(
        x, params["conv"]["kernel"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
    )
    mu = jnp.mean(h, axis=(0, 1))
    var = jnp.mean(jnp.square(h - mu), axis=(0, 1))
    h = jax.nn.relu((h - mu) * jax.lax.rsqrt(var + 1e-5)).mean(axis=1)
    h = jax.nn.relu(h @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    h = jnp.tanh(h @ params["fc2"]["kernel"] + params["fc2"]["bias"])
    h = jax.nn.relu(h @ params["A"]["kernel"] @ params["B"]["kernel"])
    logits = h @ params["head"]["kernel"] + params["head"]["bias"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def path_norm(sq: dict) -> jax.Array:
    """Path-SGD's squared path norm of the dense part (fc1 ... head) on squared weights, plus
    the squared conv weights (which Path-SGD then treats as a single layer)."""
    h = jnp.ones((1, 16))
    for name in ("fc1", "fc2", "A", "B", "head"):
        h = h @ sq[name]["kernel"] + sq[name].get("bias", 0.0)
    return jnp.sum(h) + jnp.sum(sq["conv"]["kernel"])


# --------------------------------------------------------------------------- transforms


def _sgd():
    return optax.sgd(LR, momentum=0.9)


# Every optimizer of the registry (building blocks left out), by name.
TRANSFORMS: tuple[str, ...] = tuple(spec.name for spec in registry.optimizers())


def build(name: str) -> tuple[optax.GradientTransformation, bool]:
    """The complete optimizer ``name`` of the registry on this problem (next to heavy-ball
    SGD where it is a single step), on the declarations of :data:`SYMS` it takes; and
    whether its update takes the loss's batch (when it evaluates the loss)."""
    spec = registry.get(name)
    syms = [s for s in SYMS if spec.accepts([s])]
    tx = spec.chain(syms, base=_sgd(), loss=loss_fn, path_norm=path_norm)
    return tx, "value_fn" in spec.problem_args


# Transforms that move along Linear orbits with the iterative (Newton) solve.
NEWTON = ("retract", "steer", "monitor_retract")
# Transforms that search the orbit by gradient steps on an objective made of the loss's
# gradients: the search amplifies the rounding of those sums, so their run is compared with
# the spread that another summation order gives on one device (``reorder_errs``).
SEARCH = ("teleport",)
# Row orders of each batch for that spread (the loss is a mean over the rows: the same numbers
# summed in another order).
REORDERS = 3

# --------------------------------------------------------------------------- shardings

CASES = {
    "data": "data parallel: parameters replicated, batch over all 8 devices",
    "unit": "model parallel: kernels and biases sharded along the unit (last) axis over "
    "'model' (4 devices), batch over 'data' (2)",
    "input": "model parallel: kernels sharded along the input axis (-2) over 'model', biases "
    "replicated, batch over 'data'",
    # (HLO checks only) the Linear pair sharded along the axes its GL(k) does not act on.
    "k_local": "as 'unit', except the Linear factors: A along its input axis, B along its "
    "output axis (k, the axis GL(k) mixes, stays whole on every device)",
}


def make_mesh(axis_type: str = "auto") -> Mesh:
    """The (data=2, model=4) mesh. ``jax.make_mesh`` makes Explicit axes by default (jax
    0.10: sharding in types); the training runs use Auto axes (XLA propagates shardings)."""
    kind = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}[axis_type]
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind))


def spec(path: str, shape: tuple[int, ...], case: str) -> P:
    """Partition spec of the parameter leaf at ``path`` (a ``keystr``) in a sharding case."""
    nd = len(shape)
    unit = P(*([None] * (nd - 1)), "model")
    other = P(*([None] * (nd - 2)), "model", None) if nd >= 2 else P()
    if case == "data":
        return P()
    if case == "unit":
        return unit
    if case == "input":
        return other
    if case == "k_local":
        return other if path == "['A']['kernel']" else unit
    raise ValueError(f"unknown sharding case {case!r}; write one of {sorted(CASES)}")


def param_shardings(mesh: Mesh, params: Any, case: str) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, spec(jax.tree_util.keystr(p), x.shape, case)), params
    )


def batch_sharding(mesh: Mesh, case: str) -> NamedSharding:
    return NamedSharding(mesh, P(("data", "model") if case == "data" else "data"))


# --------------------------------------------------------------------------- comparisons


def paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _rel(x: Any, y: Any, scale: float | None = None) -> float:
    """max |x - y| / scale, with scale = max |y| by default (inf-norm relative)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size == 0:
        return 0.0
    num = float(np.max(np.abs(x - y)))
    den = float(np.max(np.abs(y))) if scale is None else scale
    return num / den if den else num


def _leaf_errs(a: Any, b: Any) -> dict[str, float]:
    """Per leaf (by path): inf-norm relative difference of ``a`` from ``b``."""
    return {
        path: _rel(x, y)
        for path, x, y in zip(paths(b), jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    }


_charges = jax.jit(lambda p: ksbopt.charges(p, SYMS))


def _charge_scales(ref: dict) -> list[float | None]:
    """Per symmetry, the scale of its charge errors: max |Q| (None), except for the charges
    that are differences of two squared norms, whose rounding is eps times the norms however
    small the difference (``support.charge_errors``): Rescale, 1/2 (|w_in|^2 + |w_out|^2) of
    the largest group; Linear, |A|^2 + |B|^2 (C = A^T A - B B^T).
    """
    sq = jax.tree.map(lambda x: np.square(np.asarray(x, np.float64)), ref)
    x_in = sq["fc1"]["kernel"].sum(0) + sq["fc1"]["bias"]
    x_out = sq["fc2"]["kernel"].sum(1)
    rescale = float(np.max(0.5 * (x_in + x_out)))
    linear = float(sq["A"]["kernel"].sum() + sq["B"]["kernel"].sum())
    return [{"rescale": rescale, "linear": linear}.get(s.kind) for s in SYMS]


def _charge_errs(q: tuple, q_ref: tuple, scales: list) -> dict[str, float]:
    return {
        type(s).__name__: _rel(x, y, c) for s, x, y, c in zip(SYMS, q, q_ref, scales, strict=True)
    }


def _describe(s: jax.sharding.Sharding) -> str:
    return str(s.spec) if isinstance(s, NamedSharding) else type(s).__name__


def _mismatches(before: Any, after: Any, what: str, step: int) -> list[dict]:
    """Leaves whose sharding after a step is not equivalent to the one before it.

    An uncommitted input (made by ``init`` without reference to the parameters, such as
    optax's ``jnp.zeros([], jnp.int32)`` step counts) has no layout of its own: ``jit`` lays
    it out, so only committed inputs are compared at the first step; from the second step on
    every leaf is an output of the step and must come back as it went in.
    """
    out = []
    for path, x, y in zip(paths(before), jax.tree.leaves(before), jax.tree.leaves(after)):
        if x.committed and not y.sharding.is_equivalent_to(x.sharding, x.ndim):
            out.append(
                {
                    "step": step,
                    "leaf": f"{what}{path}",
                    "shape": list(x.shape),
                    "in": _describe(x.sharding),
                    "out": _describe(y.sharding),
                    "in_replicated": x.sharding.is_fully_replicated,
                    "out_replicated": y.sharding.is_fully_replicated,
                }
            )
    return out


# --------------------------------------------------------------------------- training runs


def _step_fn(tx: optax.GradientTransformation, with_batch: bool, shardings: Any) -> Callable:
    """One jitted training step, its shardings left to XLA's propagation (no pins).

    The gradients are constrained to the parameters' layout, as in a sharded training loop:
    the backward pass alone may lay them out otherwise (the gradient of a replicated bias
    comes out sharded like its kernel's input axis), and the transforms are under test here.
    """

    def step(params, state, batch):
        grads = jax.grad(loss_fn)(params, batch)
        if shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, shardings)
        extra = {"batch": batch} if with_batch else {}
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    return support.jit(step)


def _train(tx, step, params, batches, *, check: bool) -> tuple[Any, Any, Any, list[dict]]:
    """STEPS steps from ``tx.init(params)`` (eager, as optax users write it)."""
    state = tx.init(params)
    mismatches, first = [], None
    for k, batch in enumerate(batches):
        new_params, new_state = step(params, state, batch)
        if check:
            mismatches += _mismatches(params, new_params, "params", k)
            mismatches += _mismatches(state, new_state, "state", k)
        params, state = new_params, new_state
        first = state if k == 0 else first
    return params, state, first, mismatches


def _reorder_errs(tx, with_batch, params0, batches, p_ref, dev) -> dict[str, float]:
    """Per leaf and per charge, the largest difference from the single-device run ``p_ref`` of
    single-device runs whose batches differ only in the order of their rows."""
    step, scales, q_ref = _step_fn(tx, with_batch, None), _charge_scales(p_ref), _charges(p_ref)
    worst: dict[str, float] = {}
    for seed in range(REORDERS):
        order = np.random.default_rng(seed).permutation(BATCH)
        shuffled = [jax.tree.map(lambda x, o=order: x[o], b) for b in batches]
        p, _, _, _ = _train(
            tx, step, jax.device_put(params0, dev), jax.device_put(shuffled, dev), check=False
        )
        errs = {f"params{k}": v for k, v in _leaf_errs(p, p_ref).items()}
        errs |= {f"charges {k}": v for k, v in _charge_errs(_charges(p), q_ref, scales).items()}
        worst = {k: max(v, worst.get(k, 0.0)) for k, v in errs.items()}
    return worst


def run(name: str, case: str, mesh: Mesh, reference: dict) -> dict:
    """Train ``name`` sharded as ``case`` and on one device; compare (see module doc)."""
    tx, with_batch = build(name)
    params0 = init_params()
    batches = [make_batch(k) for k in range(STEPS)]
    if name not in reference:  # the single-device run, on device 0
        dev = jax.devices()[0]
        p, s, _, _ = _train(
            tx,
            _step_fn(tx, with_batch, None),
            jax.device_put(params0, dev),
            jax.device_put(batches, dev),
            check=False,
        )
        reference[name] = (p, s, _charges(p))
        if name in SEARCH:
            reference[name + ":reorder"] = _reorder_errs(tx, with_batch, params0, batches, p, dev)
    p_ref, s_ref, q_ref = reference[name]
    shardings = param_shardings(mesh, params0, case)
    params = jax.device_put(params0, shardings)
    batches = [jax.device_put(b, batch_sharding(mesh, case)) for b in batches]
    p, s, first, mismatches = _train(
        tx, _step_fn(tx, with_batch, shardings), params, batches, check=True
    )
    scales = _charge_scales(p_ref)
    out = {
        "param_errs": _leaf_errs(p, p_ref),
        "charge_errs": _charge_errs(_charges(p), q_ref, scales),
        "mismatches": mismatches,
        "input_specs": {
            k: _describe(x.sharding) for k, x in zip(paths(params), jax.tree.leaves(params))
        },
        "param_specs": {k: _describe(x.sharding) for k, x in zip(paths(p), jax.tree.leaves(p))},
        "state_specs": {
            k: f"{tuple(x.shape)} {_describe(x.sharding)}"
            for k, x in zip(paths(first), jax.tree.leaves(first))
        },
        "n_devices": len(p["conv"]["kernel"].sharding.device_set),
    }
    if name in SEARCH:
        out["reorder_errs"] = reference[name + ":reorder"]
    if name.startswith("monitor"):
        out["monitor_charge_errs"] = _charge_errs(
            optax.tree.get(s, "charges"), optax.tree.get(s_ref, "charges"), scales
        )
    return out


# --------------------------------------------------------------------------- HLO

_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.+?)\s+"
    r"(?P<op>all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
    r"(?:-start)?\(",
    re.M,
)
_ARRAY = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def collectives(hlo: str) -> list[dict]:
    """The collectives of a compiled HLO module: op, result type, element count per result."""
    out = []
    for m in _COLLECTIVE.finditer(hlo):
        sizes = [
            int(np.prod([int(d) for d in dims.split(",")])) if dims else 1
            for dims in _ARRAY.findall(m.group("type"))
        ]
        out.append({"op": m.group("op"), "type": m.group("type"), "sizes": sizes})
    return out


def hlo(name: str, syms_name: str, case: str, mesh: Mesh, pinned: bool = False) -> dict:
    """Collectives of the compiled update of ``name`` alone, on ``syms_name`` symmetries."""
    syms = {"axis": AXIS_SYMS, "all": SYMS, "linear": [LINEAR]}[syms_name]
    params = init_params()
    shardings = param_shardings(mesh, params, case)
    params = jax.device_put(params, shardings)
    grads = jax.tree.map(lambda x: 0.01 * x, params)
    if name == "charges":
        args, fn = (params,), jax.jit(lambda p: ksbopt.charges(p, syms))
    else:
        tx = registry.get(name).transform(syms)
        state = tx.init(params)
        # Uncommitted leaves of the state laid out as jit lays them out: replicated.
        state_sh = jax.tree.map(
            lambda x: x.sharding if x.committed else NamedSharding(mesh, P()), state
        )
        state = jax.device_put(state, state_sh)
        kw = {"out_shardings": (shardings, state_sh)} if pinned else {}
        args, fn = (grads, state, params), jax.jit(lambda g, s, p: tx.update(g, s, p), **kw)
    compiled = fn.lower(*args).compile()
    result = compiled(*args)
    mism = []
    if name != "charges":
        mism = _mismatches(grads, result[0], "updates", 0) + _mismatches(
            args[1], result[1], "state", 0
        )
    kernels = {k: int(np.prod(x.shape)) for k, x in zip(paths(params), jax.tree.leaves(params))}
    return {
        "collectives": collectives(compiled.as_text()),
        "kernel_sizes": {k: v for k, v in kernels.items() if "kernel" in k},
        "mismatches": mism,
    }


# --------------------------------------------------------------------------- explicit axes


def explicit(syms_name: str, case: str) -> dict:
    """``retract`` on an Explicit-axes mesh (sharding in types), the update alone.

    ``jax.make_mesh`` gives Explicit axes by default, and then every operation must say how
    its result is sharded when its operands disagree. Compares ``params + updates`` with the
    single-device update and the updates' shardings with the gradients', and lists the
    collectives of the compiled update (as :func:`hlo` does).
    """
    syms = {"scale": [SCALE], "rescale": [RESCALE], "translation": [TRANSLATION]}.get(
        syms_name, [LINEAR]
    )
    tx = ksbopt.retract(syms)
    params0 = init_params()
    grads0 = jax.tree.map(lambda x: 0.01 * x + 0.001, params0)
    u_ref, _ = jax.jit(tx.update)(grads0, tx.init(params0), params0)
    mesh = make_mesh("explicit")
    with jax.set_mesh(mesh):
        shardings = param_shardings(mesh, params0, case)
        params = jax.device_put(params0, shardings)
        grads = jax.device_put(grads0, shardings)
        args = (grads, tx.init(params), params)
        compiled = jax.jit(tx.update).lower(*args).compile()
        u, _ = compiled(*args)
    return {
        "param_errs": _leaf_errs(
            optax.apply_updates(params0, jax.device_get(u)), optax.apply_updates(params0, u_ref)
        ),
        "mismatches": _mismatches(grads, u, "updates", 0),
        "collectives": collectives(compiled.as_text()),
        "kernel_sizes": {
            k: int(np.prod(x.shape))
            for k, x in zip(paths(params0), jax.tree.leaves(params0))
            if "kernel" in k
        },
    }


# --------------------------------------------------------------------------- several processes


def multiprocess(process_id: int, num_processes: int, port: int) -> dict:
    """``monitor(sgd + retract)`` trained by ``num_processes`` cooperating processes.

    Each process holds 8 / num_processes CPU devices; ``jax.distributed.initialize`` joins
    them into one 8-device mesh (the ``data`` axis across processes, ``model`` inside each,
    as ``jax.make_mesh`` orders them) and every process runs this same program: parameters
    created by a jitted function with the unit-axis layout, each process's share of the
    batch made global with ``jax.make_array_from_process_local_data``, the same ``tx.init``
    and jitted step as on one host. Compares with a single-device run in each process.
    """
    jax.distributed.initialize(f"localhost:{port}", num_processes, process_id)
    from jax.experimental import multihost_utils

    mesh = make_mesh()
    params0 = init_params()
    shardings = param_shardings(mesh, params0, "unit")
    params = jax.jit(lambda: params0, out_shardings=shardings)()
    batch_sh = batch_sharding(mesh, "unit")
    share = slice(process_id * BATCH // num_processes, (process_id + 1) * BATCH // num_processes)

    def global_batch(k):
        return tuple(
            jax.make_array_from_process_local_data(batch_sh, np.asarray(a)[share])
            for a in make_batch(k)
        )

    tx, _ = build("monitor_retract")
    state = tx.init(params)
    step = _step_fn(tx, False, shardings)
    for k in range(STEPS):
        params, state = step(params, state, global_batch(k))
    gather = functools.partial(multihost_utils.process_allgather, tiled=True)
    dev = jax.local_devices()[0]
    p_ref, s_ref, _, _ = _train(
        tx,
        _step_fn(tx, False, None),
        jax.device_put(params0, dev),
        jax.device_put([make_batch(k) for k in range(STEPS)], dev),
        check=False,
    )
    scales = _charge_scales(p_ref)
    p = gather(params)
    return {
        "process": process_id,
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "mesh": [[d.id for d in row] for row in mesh.devices],
        "fully_addressable": params["fc1"]["kernel"].is_fully_addressable,
        "param_errs": _leaf_errs(p, p_ref),
        "charge_errs": _charge_errs(_charges(p), _charges(p_ref), scales),
        "monitor_charge_errs": _charge_errs(
            gather(optax.tree.get(state, "charges")), optax.tree.get(s_ref, "charges"), scales
        ),
    }


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="", help="NAME:CASE,... (e.g. retract:unit)")
    parser.add_argument("--hlo", default="", help="NAME:SYMS:CASE[:pinned],...")
    parser.add_argument("--explicit", default="", help="SYMS:CASE,... (retract, Explicit axes)")
    parser.add_argument("--multiprocess", default="", help="PROCESS_ID:NUM_PROCESSES:PORT")
    args = parser.parse_args(argv)
    if args.multiprocess:
        print("\n" + json.dumps(multiprocess(*map(int, args.multiprocess.split(":")))))
        return
    if jax.device_count() != 8:
        raise SystemExit(
            f"need 8 devices, got {jax.devices()}; set XLA_FLAGS={DEVICE_FLAG} before jax starts"
        )
    mesh = make_mesh()
    out: dict = {"runs": {}, "hlo": {}, "devices": jax.device_count(), "jax": jax.__version__}
    reference: dict = {}
    for item in filter(None, args.runs.split(",")):
        start, cpu = time.perf_counter(), time.process_time()
        try:
            out["runs"][item] = run(*item.split(":"), mesh, reference)
        except Exception:  # reported to the test, which fails with it
            out["runs"][item] = {"error": traceback.format_exc()}
        out["runs"][item]["seconds"] = time.perf_counter() - start
        out["runs"][item]["cpu_seconds"] = time.process_time() - cpu
    for item in filter(None, args.hlo.split(",")):
        name, syms, case, *rest = item.split(":")
        try:
            out["hlo"][item] = hlo(name, syms, case, mesh, pinned=rest == ["pinned"])
        except Exception:
            out["hlo"][item] = {"error": traceback.format_exc()}
    out["explicit"] = {}
    for item in filter(None, args.explicit.split(",")):
        try:
            out["explicit"][item] = explicit(*item.split(":"))
        except Exception as e:
            out["explicit"][item] = {"error": traceback.format_exc(), "message": str(e)}
    print("\n" + json.dumps(out))  # the last line of stdout


if __name__ == "__main__":
    main()
