"""The compiled functions of a run, built once per process and shared by every runner.

A task's model is split once into ``(graphdef, params, rest)`` (params: the ``nnx.Param``
state as pure arrays, the tree ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` hands to optax;
rest: BatchNorm statistics). The learning rate lives in the optimizer state
(``optax.inject_hyperparams``), so the train step is compiled once per (task, optimizer, other
hyperparameters; the tuned ones, e.g. the weight decay, live in the state too) with
ahead-of-time ``lower().compile()``, which also measures the compile time, and reused for every
learning rate and seed. The initialisation, the optimizer's ``init``, the evaluation and the
entries' hooks are compiled once per task (and entry) the same way.

The caches depend only on the task, its scale and the optimizer: a second invocation in the
same process (a notebook, the tests) neither reloads data nor recompiles;
:func:`clear_caches` forgets them.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ksbopt.bench import diagnostics, profiles, registry
from ksbopt.bench.protocol import schedule_factor
from ksbopt.bench.records import RunConfig
from ksbopt.bench.tasks import Task

__all__ = [
    "MAX_EVAL_INTERVALS",
    "Compiled",
    "clear_caches",
    "compiler_options",
    "distinct_buffers",
    "eval_compile_s",
    "eval_compiled",
    "eval_point",
    "evaluator",
    "init_model",
    "init_state",
    "prepared",
    "run_length",
    "scheduled",
    "symmetries_with_charges",
    "train_arrays",
    "train_compiled",
    "train_key",
    "train_step",
    "unit_symmetries",
]

MAX_EVAL_INTERVALS = 50  # evaluations per run, at least: every <= 2% of the steps

_CACHE: dict[str, dict] = {
    k: {}
    for k in (
        "tasks",
        "train",
        "eval",
        "arrays",
        "eval_compile_s",
        "diag",
        "init",
        "units",
        "value",
    )
}


def clear_caches() -> None:
    """Forgets the built tasks and compiled functions shared by all runners."""
    for d in _CACHE.values():
        d.clear()


# ---- what a compiled function depends on ------------------------------------------------------


def scheduled(cfg: RunConfig) -> bool:
    """Whether the suite's schedule multiplies the run's learning rate: not in the constant
    arm, and never for an entry that brings its own schedule (``own_schedule``)."""
    return cfg.schedule != "constant" and not registry.get(cfg.optimizer, check=False).own_schedule


def train_key(cfg: RunConfig) -> tuple:
    """What the compiled train step of ``cfg`` depends on (runs with one key share it)."""
    spec = registry.get(cfg.optimizer, check=False)
    # the schedule and the step budget are compiled in (the cosine decays over the run); the
    # learning rate and the tuned hyperparameters live in the optimizer state (not compiled in)
    arm = (cfg.schedule, cfg.steps) if scheduled(cfg) else ()
    fixed = tuple((k, v) for k, v in cfg.hparams if k not in spec.tune)
    return cfg.task, cfg.scale, cfg.optimizer, id(spec.factory), fixed, *arm


def _tuned(cfg: RunConfig) -> dict:
    """The run's values of its entry's tuned hyperparameters (defaults where not given)."""
    spec = registry.get(cfg.optimizer, check=False)
    hp = {**spec.hparams, **dict(cfg.hparams)}
    return {k: jnp.float32(hp[k]) for k in spec.tune}


def _tkey(task: Task) -> tuple[str, str]:
    return task.name, task.config["scale"]


def run_length(cfg: RunConfig, task: Task) -> tuple[int, int]:
    """(steps, evaluation interval): an evaluation at least every 2% of the run (at most
    the task's ``eval_every``); the steps rounded up to whole intervals."""
    steps = cfg.steps or task.steps
    every = max(1, min(task.eval_every, -(-steps // MAX_EVAL_INTERVALS)))
    return -(-steps // every) * every, every


_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _fast_compile() -> dict:
    """XLA:CPU options that compile ~2x faster and run ~10x slower (used on CPU only)."""
    return dict(_FAST_COMPILE) if jax.default_backend() == "cpu" else {}


def compiler_options(task: Task) -> dict:
    """XLA options: the ``tiny`` scale (smoke tests) trades run speed for compile speed."""
    return _fast_compile() if task.config.get("scale") == "tiny" else {}


# ---- the starting point -----------------------------------------------------------------------


def train_arrays(task: Task) -> dict:
    """The task's training arrays on the device, transferred once."""
    key = (task.name, task.config.get("scale"))
    arrays = _CACHE["arrays"]
    if key not in arrays:
        arrays[key] = {k: jnp.asarray(v) for k, v in task.arrays.items() if k.startswith("train_")}
    return arrays[key]


def init_model(task: Task, seed: int):
    """(graphdef in train mode, graphdef in eval mode, params, rest) of the seed's model.

    Parameters are initialised inside one jitted function from an ``rbg`` PRNG key: eager
    initialisation (or a threefry key) costs a separate, slow XLA compilation per
    initialiser on CPU.
    """
    key, cache = _tkey(task), _CACHE["init"]
    if key not in cache:
        abstract = nnx.eval_shape(lambda: task.make_model(jax.random.key(0, impl="rbg")))
        graph_train = nnx.split(abstract, nnx.Param, ...)[0]
        abstract.eval()
        graph_eval = nnx.split(abstract, nnx.Param, ...)[0]

        def init(seed):
            model = task.make_model(jax.random.key(seed, impl="rbg"))
            _, params, rest = nnx.split(model, nnx.Param, ...)
            return nnx.as_pure(params), nnx.as_pure(rest)

        fn = (
            jax.jit(init).lower(jnp.int32(0)).compile(compiler_options=_fast_compile())
        )  # runs once per run
        cache[key] = (graph_train, graph_eval, fn)
    graph_train, graph_eval, fn = cache[key]
    params, rest = fn(jnp.int32(seed))
    return graph_train, graph_eval, params, rest


def prepared(cfg: RunConfig, task: Task, params):
    """The parameters training starts from: the entry's ``prepare_params`` of the
    initialisation (compiled once per task and entry), or the initialisation itself."""
    spec = registry.get(cfg.optimizer, check=False)
    if spec.prepare_params is None:
        return params
    key, cache = ("prepare", *_tkey(task), cfg.optimizer, id(spec.prepare_params)), _CACHE["init"]
    if key not in cache:
        fn = jax.jit(spec.prepare_params)
        cache[key] = fn.lower(params).compile(compiler_options=_fast_compile())
    return cache[key](params)


def init_state(cfg: RunConfig, task: Task, params):
    """The optimizer state at ``cfg.learning_rate``, from one compiled ``init`` per
    (task, optimizer, hyperparameters): eager ``init`` of the ksbopt transforms costs up
    to seconds of dispatch per run on CPU."""
    key, cache = ("init_state", *train_key(cfg)), _CACHE["init"]
    fixed = dict(train_key(cfg)[4])
    if key not in cache:

        def init(params, lr, tuned):
            return registry.make(cfg.optimizer, lr, task, **fixed, **tuned).init(params)

        lr0 = jnp.float32(cfg.learning_rate)
        cache[key] = (
            jax.jit(init).lower(params, lr0, _tuned(cfg)).compile(compiler_options=_fast_compile())
        )
    return cache[key](params, jnp.float32(cfg.learning_rate), _tuned(cfg))


def distinct_buffers(tree):
    """``tree`` with every array that appears twice copied: the step donates its inputs, and
    an ``init`` that puts one array in two fields would donate the same buffer twice."""
    seen: set[int] = set()

    def one(x):
        if isinstance(x, jax.Array):
            if id(x) in seen:
                return jnp.array(x, copy=True)
            seen.add(id(x))
        return x

    return jax.tree.map(one, tree)


# ---- symmetries the diagnostics use -----------------------------------------------------------


def symmetries_with_charges(task: Task, params=None) -> tuple[list, str]:
    """``(declaration, symmetry)`` pairs whose charges ``ksbopt.charges`` computes for this
    task, and a note on those it cannot (once per task; without ``params``: what is known)."""
    tk, cache = _tkey(task), _CACHE["diag"]
    if tk in cache or params is None:
        return cache.get(tk, ([], ""))
    try:
        charges = registry.ksbopt_feature("charges")
    except registry.FeatureUnavailable as e:
        cache[tk] = ([], f"no charges: {e}")
        return cache[tk]
    ok, notes = [], []
    for d in task.decls:
        try:
            sym = d.build()
            jax.eval_shape(lambda p, s=sym: charges(p, [s]), params)
            ok.append((d, sym))
        except Exception as e:
            notes.append(f"{d.kind} {d.label}: {type(e).__name__}: {e}")
    note = "; ".join(notes)
    if notes:
        print(
            f"warning: charges unavailable for some declarations of {task.name}: {note}",
            file=sys.stderr,
        )
    cache[tk] = (ok, note)
    return ok, note


def unit_symmetries(task: Task, params) -> tuple[list, list[str]]:
    """``ksbopt.Scale`` objects of the task's units and their labels (angular updates)."""
    tk, cache = _tkey(task), _CACHE["units"]
    if tk not in cache:
        syms, labels = [], []
        try:
            charges = registry.ksbopt_feature("charges")
            for d in task.unit_decls:
                sym = d.build()
                jax.eval_shape(lambda p, s=sym: charges(p, [s]), params)
                syms.append(sym)
                labels.append(d.label)
        except Exception as e:  # diagnostics are optional; training goes on without them
            print(f"warning: no angular updates for {task.name}: {e}", file=sys.stderr)
            syms, labels = [], []
        cache[tk] = (syms, labels)
    return cache[tk]


# ---- evaluation -------------------------------------------------------------------------------


def eval_point(cfg: RunConfig):
    """``(params, opt_state) -> the parameters to evaluate``: the entry's ``eval_params``
    (schedule-free AdamW's averaged iterate), jitted once per entry, else the iterate."""
    spec = registry.get(cfg.optimizer, check=False)
    if spec.eval_params is None:
        return lambda params, opt_state: params
    key, cache = ("eval_params", cfg.optimizer, id(spec.eval_params)), _CACHE["init"]
    if key not in cache:
        fn = jax.jit(spec.eval_params)
        cache[key] = lambda params, opt_state: fn(opt_state, params)
    return cache[key]


def eval_compiled(task: Task) -> bool:
    """Whether the task's evaluation is compiled already (by an earlier run)."""
    return _tkey(task) in _CACHE["eval"]


def eval_compile_s(task: Task) -> float | None:
    """Seconds the task's evaluation took to compile (None: not compiled in this process)."""
    return _CACHE["eval_compile_s"].get(_tkey(task))


def evaluator(task: Task, graph_eval, params, rest):
    """``evaluate(params, rest) -> {"val", "test", "diag", "param_norm"}``, compiled once."""
    if _tkey(task) in _CACHE["eval"]:
        return _CACHE["eval"][_tkey(task)]
    decls, _ = symmetries_with_charges(task, params)
    charges = registry.ksbopt_feature("charges") if decls else None
    sets = {k: tuple(jnp.asarray(a) for a in v) for k, v in task.eval_sets().items()}
    opts = compiler_options(task)

    def metrics(params, rest, *data):
        return task.evaluate(nnx.merge(graph_eval, params, rest), *data)

    def diag(params):
        return diagnostics.at_evaluation(decls, charges, params)

    t0 = time.perf_counter()
    m_c = {  # one executable per split shape (the validation split is the smaller)
        s: jax.jit(metrics).lower(params, rest, *sets[s]).compile(compiler_options=opts)
        for s in ("val", "test")
    }
    d_c = jax.jit(diag).lower(params).compile(compiler_options=opts)
    _CACHE["eval_compile_s"][_tkey(task)] = time.perf_counter() - t0

    def evaluate(params, rest, test=True):
        splits = ("val", "test") if test else ("val",)
        out = {s: m_c[s](params, rest, *sets[s]) for s in splits}
        return {**out, **d_c(params)}

    _CACHE["eval"][_tkey(task)] = evaluate
    return evaluate


# ---- the train step ---------------------------------------------------------------------------


class Compiled:
    """Compiled train step of one (task, optimizer, hparams) combination."""

    def __init__(self, fn, compile_s: float, memory: dict):
        self.fn, self.compile_s, self.memory, self.used = fn, compile_s, memory, False
        self.compile_cpu_s = float("nan")


def train_compiled(cfg: RunConfig) -> bool:
    """Whether the train step of ``cfg`` is compiled already (by an earlier run)."""
    return train_key(cfg) in _CACHE["train"]


def _value_fn(task: Task, graph_train):
    """``value_fn(params, batch, model_state) -> loss``: one object per task (teleport)."""
    tk, cache = _tkey(task), _CACHE["value"]
    if tk not in cache:

        def value_fn(params, batch, model_state):
            return task.loss(nnx.merge(graph_train, params, model_state), batch)

        cache[tk] = value_fn
    return cache[tk]


def train_step(
    cfg: RunConfig, task: Task, tx, graph_train, params, rest, opt_state, arrays, idx
) -> Compiled:
    """The compiled step ``(params, rest, opt_state, arrays, idx, peak_lr) -> (params, rest,
    opt_state, loss, angular updates, profile ratios)`` of ``cfg`` (its inputs donated)."""
    key = train_key(cfg)
    if key in _CACHE["train"]:
        return _CACHE["train"][key]

    def loss_fn(params, rest, batch):
        model = nnx.merge(graph_train, params, rest)
        loss = task.loss(model, batch)
        return loss, nnx.as_pure(nnx.split(model, nnx.Param, ...)[2])

    spec = registry.get(cfg.optimizer, check=False)
    unit_syms, _ = unit_symmetries(task, params)
    value_fn = _value_fn(task, graph_train) if "value_fn" in spec.extra_args else None
    profile_syms = [sym for _, sym in symmetries_with_charges(task, params)[0]]

    steps, _ = run_length(cfg, task)

    is_scheduled = scheduled(cfg)

    def step(params, rest, opt_state, arrays, idx, peak_lr):
        if is_scheduled:  # the learning rate of this step, in the state
            hp = opt_state.hyperparams
            lr = peak_lr * schedule_factor(cfg.schedule, opt_state.count, steps, jnp)
            hp = {**hp, "learning_rate": jnp.asarray(lr, hp["learning_rate"].dtype)}
            opt_state = opt_state._replace(hyperparams=hp)
        batch = task.batch(arrays, idx)
        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, batch)
        supply = {"grad": grads, "batch": batch, "value_fn": value_fn, "model_state": rest}
        extra = {k: supply[k] for k in spec.extra_args}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        new_params = optax.apply_updates(params, updates)
        angles = diagnostics.angular_updates(unit_syms, params, updates, new_params)
        ratios = profiles.step_ratios(profile_syms, params, grads, updates)
        return new_params, new_rest, opt_state, loss, angles, ratios

    t0, c0 = time.perf_counter(), time.process_time()
    compiled = (
        jax.jit(step, donate_argnums=(0, 1, 2))
        .lower(params, rest, opt_state, arrays, idx, jnp.float32(cfg.learning_rate))
        .compile(compiler_options=compiler_options(task))
    )
    compile_s = time.perf_counter() - t0
    compile_cpu_s = time.process_time() - c0
    c = Compiled(compiled, compile_s, _memory(compiled))
    c.compile_cpu_s = compile_cpu_s
    _CACHE["train"][key] = c
    return c


def _memory(compiled) -> dict:
    """The executable's memory analysis (what the backend reports; empty if nothing)."""
    try:
        m = compiled.memory_analysis()
        return {
            k: int(getattr(m, k))
            for k in (
                "argument_size_in_bytes",
                "output_size_in_bytes",
                "temp_size_in_bytes",
                "generated_code_size_in_bytes",
            )
            if hasattr(m, k)
        }
    except Exception:
        return {}
