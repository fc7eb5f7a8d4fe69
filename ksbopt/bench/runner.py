"""Training and evaluation of one benchmark run, and the per-run JSON record.

The loop is functional: the NNX model is split once into ``(graphdef, params, rest)`` (params:
the ``nnx.Param`` state as pure arrays, the tree ``nnx.Optimizer(model, tx, wrt=nnx.Param)``
hands to optax; rest: BatchNorm statistics) and one jitted step (parameters, statistics and
optimizer state donated) is dispatched per step without waiting; the host syncs once per chunk
of ``eval_every`` steps, to read the losses and evaluate. (A ``lax.scan`` over the chunk was
measured 2x slower per step on CPU for the MNIST-1D CNN: XLA:CPU runs convolution gradients
inside a loop body much slower.) The learning rate lives in the optimizer state
(``optax.inject_hyperparams``), so the step is compiled once per (task, optimizer, other
hyperparameters; the tuned ones, e.g. the weight decay, live in the state too) with
ahead-of-time ``lower().compile()``, which also measures the compile
time, and reused for every learning rate and seed.

Records are written atomically (temporary file + rename) when a run ends: an interrupted
benchmark keeps every finished record, and a rerun skips runs whose record holds the same
config.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ksbopt.bench import profiles, registry
from ksbopt.bench.protocol import schedule_definition, schedule_factor
from ksbopt.bench.records import (
    SCHEMA,
    RunConfig,
    jsonable,
    load_record,
    record_path,
    write_atomic,
)
from ksbopt.bench.tasks import Task

__all__ = [
    "MAX_EVAL_INTERVALS",
    "RunConfig",
    "Runner",
    "clear_caches",
    "load_record",
    "record_path",
]

MAX_EVAL_INTERVALS = 50  # evaluations per run, at least: every <= 2% of the steps


def _finite_or_none(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def environment() -> dict:
    d = jax.devices()[0]
    return {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "optax": optax.__version__,
        "platform": d.platform,
        "device": getattr(d, "device_kind", str(d)),
        "device_count": jax.device_count(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


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


def _scheduled(cfg: RunConfig) -> bool:
    """Whether the suite's schedule multiplies the run's learning rate: not in the constant
    arm, and never for an entry that brings its own schedule (``own_schedule``)."""
    return cfg.schedule != "constant" and not registry.get(cfg.optimizer, check=False).own_schedule


def _train_key(cfg: RunConfig) -> tuple:
    spec = registry.get(cfg.optimizer, check=False)
    # the schedule and the step budget are compiled in (the cosine decays over the run); the
    # learning rate and the tuned hyperparameters live in the optimizer state (not compiled in)
    arm = (cfg.schedule, cfg.steps) if _scheduled(cfg) else ()
    fixed = tuple((k, v) for k, v in cfg.hparams if k not in spec.tune)
    return cfg.task, cfg.scale, cfg.optimizer, id(spec.factory), fixed, *arm


def _tuned(cfg: RunConfig) -> dict:
    """The run's values of its entry's tuned hyperparameters (defaults where not given)."""
    spec = registry.get(cfg.optimizer, check=False)
    hp = {**spec.hparams, **dict(cfg.hparams)}
    return {k: jnp.float32(hp[k]) for k in spec.tune}


def _tkey(task: Task) -> tuple[str, str]:
    return task.name, task.config["scale"]


_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _fast_compile() -> dict:
    """XLA:CPU options that compile ~2x faster and run ~10x slower (used on CPU only)."""
    return dict(_FAST_COMPILE) if jax.default_backend() == "cpu" else {}


def _compiler_options(task: Task) -> dict:
    """XLA options: the ``tiny`` scale (smoke tests) trades run speed for compile speed."""
    return _fast_compile() if task.config.get("scale") == "tiny" else {}


def _angular_updates(syms, params, updates, new_params) -> jax.Array:
    """Mean over groups of the angle (radians) each unit turned in this step, per symmetry.

    From three charges (1/2 |.|^2 per group) of ``ksbopt.charges``: with q_w, q_u, q_n those
    of w, u and w + u, <w, u> = q_n - q_w - q_u, |u_perp|^2 = 2 q_u - <w, u>^2 / (2 q_w) and
    the angle is atan2(|u_perp|, |w| + <w, u> / |w|) (no arccos: exact for small angles).
    """
    if not syms:
        return jnp.zeros((0,), jnp.float32)
    charges = registry.ksbopt_feature("charges")
    out = []
    for sym in syms:
        (q_w,) = charges(params, [sym])
        (q_u,) = charges(updates, [sym])
        (q_n,) = charges(new_params, [sym])
        q_w, q_u, q_n = (jnp.asarray(q, jnp.float32) for q in (q_w, q_u, q_n))
        pos = q_w > 0
        safe = jnp.where(pos, q_w, 1.0)
        wu = q_n - q_w - q_u
        perp = jnp.sqrt(jnp.maximum(2 * q_u - wu**2 / (2 * safe), 0.0))
        norm = jnp.sqrt(2 * safe)
        angle = jnp.where(pos, jnp.arctan2(perp, norm + wu / norm), 0.0)
        out.append(jnp.mean(angle))
    return jnp.stack(out)


def _distinct_buffers(tree):
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


class _Compiled:
    """Compiled train chunk of one (task, optimizer, hparams) combination."""

    def __init__(self, fn, compile_s: float, memory: dict):
        self.fn, self.compile_s, self.memory, self.used = fn, compile_s, memory, False
        self.compile_cpu_s = float("nan")


class Runner:
    """Runs :class:`RunConfig` s; caches built tasks and compiled functions between runs."""

    def __init__(self, out: Path, *, cache_dir: Path | None = None, progress: bool = True):
        self.out = Path(out)
        self.cache_dir = cache_dir
        self.progress = progress
        # Built tasks and compiled functions are shared by every Runner of the process (they
        # depend only on the task, its scale and the optimizer): a second invocation in the
        # same process (a notebook, the tests) neither reloads data nor recompiles.
        self._tasks: dict[tuple[str, str], Task] = _CACHE["tasks"]
        self._train: dict[tuple, _Compiled] = _CACHE["train"]
        self._eval: dict[tuple, Any] = _CACHE["eval"]
        self._arrays: dict[tuple, dict] = _CACHE["arrays"]
        self._eval_compile_s: dict[tuple, float] = _CACHE["eval_compile_s"]
        self._diag: dict[tuple, tuple[list, str]] = _CACHE["diag"]
        self._init: dict[tuple, tuple] = _CACHE["init"]
        self._units: dict[tuple, tuple[list, list[str]]] = _CACHE["units"]
        self._value: dict[tuple, Any] = _CACHE["value"]
        self.env = environment()

    # ---- building blocks --------------------------------------------------------------------
    def task(self, name: str, scale: str) -> Task:
        from ksbopt.bench.tasks import build_task

        key = (name, scale)
        if key not in self._tasks:
            self._tasks[key] = build_task(name, scale, self.cache_dir)
        return self._tasks[key]

    def full_config(self, cfg: RunConfig) -> dict:
        """Everything that determines a run's result (what a record must match to be reused)."""
        task = self.task(cfg.task, cfg.scale)
        spec = registry.get(cfg.optimizer, check=False)
        steps, every = self._steps(cfg, task)
        schedule = schedule_definition(cfg.schedule) if _scheduled(cfg) else None
        if spec.own_schedule:
            schedule = "the optimizer's own (the suite's schedule is not applied)"
        return jsonable(
            {
                **cfg.as_dict(),
                "steps": steps,
                "hparams": {**spec.hparams, **dict(cfg.hparams)},
                "batch_size": task.batch_size,
                "eval_every": every,
                "task_config": dict(task.config),
                "metric": task.metric,
                "target": task.target,
                **({"schedule_definition": schedule} if schedule else {}),
                **({"eval_params": _name(spec.eval_params)} if spec.eval_params else {}),
                **({"prepare_params": _name(spec.prepare_params)} if spec.prepare_params else {}),
                **({"origin": dict(spec.origin)} if spec.origin else {}),
            }
        )

    @staticmethod
    def _steps(cfg: RunConfig, task: Task) -> tuple[int, int]:
        """(steps, evaluation interval): an evaluation at least every 2% of the run (at most
        the task's ``eval_every``); the steps rounded up to whole intervals."""
        steps = cfg.steps or task.steps
        every = max(1, min(task.eval_every, -(-steps // MAX_EVAL_INTERVALS)))
        return -(-steps // every) * every, every

    def _train_arrays(self, task: Task) -> dict:
        key = (task.name, task.config.get("scale"))
        if key not in self._arrays:
            self._arrays[key] = {
                k: jnp.asarray(v) for k, v in task.arrays.items() if k.startswith("train_")
            }
        return self._arrays[key]

    def _split(self, task: Task, seed: int):
        """(graphdef in train mode, graphdef in eval mode, params, rest) of the seed's model.

        Parameters are initialised inside one jitted function from an ``rbg`` PRNG key: eager
        initialisation (or a threefry key) costs a separate, slow XLA compilation per
        initialiser on CPU.
        """
        key = _tkey(task)
        if key not in self._init:
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
            self._init[key] = (graph_train, graph_eval, fn)
        graph_train, graph_eval, fn = self._init[key]
        params, rest = fn(jnp.int32(seed))
        return graph_train, graph_eval, params, rest

    def _prepared(self, cfg: RunConfig, task: Task, params):
        """The parameters training starts from: the entry's ``prepare_params`` of the
        initialisation (compiled once per task and entry), or the initialisation itself."""
        spec = registry.get(cfg.optimizer, check=False)
        if spec.prepare_params is None:
            return params
        key = ("prepare", *_tkey(task), cfg.optimizer, id(spec.prepare_params))
        if key not in self._init:
            fn = jax.jit(spec.prepare_params)
            self._init[key] = fn.lower(params).compile(compiler_options=_fast_compile())
        return self._init[key](params)

    def _eval_point(self, cfg: RunConfig):
        """``(params, opt_state) -> the parameters to evaluate``: the entry's ``eval_params``
        (schedule-free AdamW's averaged iterate), jitted once per entry, else the iterate."""
        spec = registry.get(cfg.optimizer, check=False)
        if spec.eval_params is None:
            return lambda params, opt_state: params
        key = ("eval_params", cfg.optimizer, id(spec.eval_params))
        if key not in self._init:
            fn = jax.jit(spec.eval_params)
            self._init[key] = lambda params, opt_state: fn(opt_state, params)
        return self._init[key]

    def _diagnostics(self, task: Task, params) -> tuple[list, str]:
        """Symmetry declarations whose charges ``ksbopt.charges`` computes for this task."""
        tk = _tkey(task)
        if tk in self._diag:
            return self._diag[tk]
        try:
            charges = registry.ksbopt_feature("charges")
        except registry.FeatureUnavailable as e:
            self._diag[tk] = ([], f"no charges: {e}")
            return self._diag[tk]
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
        self._diag[tk] = (ok, note)
        return ok, note

    def _unit_syms(self, task: Task, params) -> tuple[list, list[str]]:
        """``ksbopt.Scale`` objects of the task's units and their labels (angular updates)."""
        tk = _tkey(task)
        if tk not in self._units:
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
            self._units[tk] = (syms, labels)
        return self._units[tk]

    def _value_fn(self, task: Task, graph_train):
        """``value_fn(params, batch, model_state) -> loss``: one object per task (teleport)."""
        tk = _tkey(task)
        if tk not in self._value:

            def value_fn(params, batch, model_state):
                return task.loss(nnx.merge(graph_train, params, model_state), batch)

            self._value[tk] = value_fn
        return self._value[tk]

    def _eval_fn(self, task: Task, graph_eval, params, rest):
        """``evaluate(params, rest) -> {"val", "test", "diag", "param_norm"}``, compiled once."""
        if _tkey(task) in self._eval:
            return self._eval[_tkey(task)]
        decls, _ = self._diagnostics(task, params)
        charges = registry.ksbopt_feature("charges") if decls else None
        sets = {k: tuple(jnp.asarray(a) for a in v) for k, v in task.eval_sets().items()}
        opts = _compiler_options(task)

        def metrics(params, rest, *data):
            return task.evaluate(nnx.merge(graph_eval, params, rest), *data)

        def diagnostics(params):
            diag = {}
            for d, sym in decls:
                (q,) = charges(params, [sym])
                q = jnp.asarray(q, jnp.float32)
                if d.kind == "linear":
                    diag[d.label] = {"charge_fro": jnp.sqrt(jnp.sum(q**2))}
                else:
                    diag[d.label] = {"charge": jnp.mean(q)}
                if d.kind == "scale":  # P2: eta_eff = eta / |w|^2 = eta / (2 Q), per group
                    diag[d.label]["inv_sqnorm"] = jnp.mean(
                        jnp.where(q > 0, 1.0 / jnp.where(q > 0, 2 * q, 1.0), 0.0)
                    )
            return {"diag": diag, "param_norm": optax.tree.norm(params)}

        t0 = time.perf_counter()
        m_c = {  # one executable per split shape (the validation split is the smaller)
            s: jax.jit(metrics).lower(params, rest, *sets[s]).compile(compiler_options=opts)
            for s in ("val", "test")
        }
        d_c = jax.jit(diagnostics).lower(params).compile(compiler_options=opts)
        self._eval_compile_s[_tkey(task)] = time.perf_counter() - t0

        def evaluate(params, rest, test=True):
            splits = ("val", "test") if test else ("val",)
            out = {s: m_c[s](params, rest, *sets[s]) for s in splits}
            return {**out, **d_c(params)}

        self._eval[_tkey(task)] = evaluate
        return evaluate

    def _init_state(self, cfg: RunConfig, task: Task, params):
        """The optimizer state at ``cfg.learning_rate``, from one compiled ``init`` per
        (task, optimizer, hyperparameters): eager ``init`` of the ksbopt transforms costs up
        to seconds of dispatch per run on CPU."""
        key = ("init_state", *_train_key(cfg))
        fixed = dict(_train_key(cfg)[4])
        if key not in self._init:

            def init(params, lr, tuned):
                return registry.make(cfg.optimizer, lr, task, **fixed, **tuned).init(params)

            lr0 = jnp.float32(cfg.learning_rate)
            self._init[key] = (
                jax.jit(init)
                .lower(params, lr0, _tuned(cfg))
                .compile(compiler_options=_fast_compile())
            )
        return self._init[key](params, jnp.float32(cfg.learning_rate), _tuned(cfg))

    def _train_fn(
        self, cfg: RunConfig, task: Task, tx, graph_train, params, rest, opt_state, arrays, idx
    ) -> _Compiled:
        key = _train_key(cfg)
        if key in self._train:
            return self._train[key]

        def loss_fn(params, rest, batch):
            model = nnx.merge(graph_train, params, rest)
            loss = task.loss(model, batch)
            return loss, nnx.as_pure(nnx.split(model, nnx.Param, ...)[2])

        spec = registry.get(cfg.optimizer, check=False)
        unit_syms, _ = self._unit_syms(task, params)
        value_fn = self._value_fn(task, graph_train) if "value_fn" in spec.extra_args else None
        profile_syms = [sym for _, sym in self._diagnostics(task, params)[0]]

        steps, _ = self._steps(cfg, task)

        scheduled = _scheduled(cfg)

        def step(params, rest, opt_state, arrays, idx, peak_lr):
            if scheduled:  # the learning rate of this step, in the state
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
            angles = _angular_updates(unit_syms, params, updates, new_params)
            ratios = profiles.step_ratios(profile_syms, params, grads, updates)
            return new_params, new_rest, opt_state, loss, angles, ratios

        t0, c0 = time.perf_counter(), time.process_time()
        compiled = (
            jax.jit(step, donate_argnums=(0, 1, 2))
            .lower(params, rest, opt_state, arrays, idx, jnp.float32(cfg.learning_rate))
            .compile(compiler_options=_compiler_options(task))
        )
        compile_s = time.perf_counter() - t0
        compile_cpu_s = time.process_time() - c0
        memory = {}
        try:
            m = compiled.memory_analysis()
            memory = {
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
            pass
        c = _Compiled(compiled, compile_s, memory)
        c.compile_cpu_s = compile_cpu_s
        self._train[key] = c
        return c

    # ---- one run ----------------------------------------------------------------------------
    def run(self, cfg: RunConfig, *, position: str = "") -> tuple[dict, bool]:
        """Runs ``cfg`` unless a matching record exists; returns (record, trained_now)."""
        full = self.full_config(cfg)
        path = record_path(self.out, cfg)
        rec = load_record(path, full)
        if rec is not None:
            return rec, False
        rec = self._execute(cfg, full, position)
        write_atomic(path, rec)
        return rec, True

    def _execute(self, cfg: RunConfig, full: dict, position: str) -> dict:
        from tqdm.auto import tqdm

        t_start = time.perf_counter()
        task = self.task(cfg.task, cfg.scale)
        steps = full["steps"]
        graph_train, graph_eval, params, rest = self._split(task, cfg.seed)
        params = self._prepared(cfg, task, params)
        tx = registry.make(cfg.optimizer, cfg.learning_rate, task, **dict(cfg.hparams))
        opt_state = self._init_state(cfg, task, params)
        params, rest, opt_state = _distinct_buffers((params, rest, opt_state))
        arrays = self._train_arrays(task)
        sampler = task.sampler(cfg.seed)
        chunk_steps = full["eval_every"]
        peak_lr = jnp.float32(cfg.learning_rate)
        idx = sampler.next(chunk_steps)

        was_compiled = _train_key(cfg) in self._train
        train = self._train_fn(cfg, task, tx, graph_train, params, rest, opt_state, arrays, idx[0])
        eval_compiled_here = _tkey(task) not in self._eval
        eval_at = self._eval_fn(task, graph_eval, params, rest)
        point = self._eval_point(cfg)

        def eval_fn(params, rest, test):
            return eval_at(point(params, opt_state), rest, test=test)

        t_eval_c = time.perf_counter()
        first_eval = jax.device_get(eval_fn(params, rest, test=True))
        first_eval_s = time.perf_counter() - t_eval_c

        curves: dict[str, list] = {
            k: []
            for k in (
                "step",
                "train_loss",
                "val_loss",
                "val_metric",
                "test_loss",
                "test_metric",
                "param_norm",
                "time_s",
            )
        }
        diag_curves: dict[str, dict[str, list]] = {}

        def log(step, train_loss, ev, train_s):
            curves["step"].append(step)
            curves["time_s"].append(train_s)
            curves["train_loss"].append(_finite_or_none(train_loss))
            for s in ("val", "test"):  # the test split only at the start and the end
                got = ev.get(s, {"loss": None, "metric": None})
                curves[f"{s}_loss"].append(_finite_or_none(got["loss"]))
                curves[f"{s}_metric"].append(_finite_or_none(got["metric"]))
            curves["param_norm"].append(_finite_or_none(ev["param_norm"]))
            arm = cfg.schedule if _scheduled(cfg) else "constant"
            lr_now = cfg.learning_rate * schedule_factor(arm, max(step - 1, 0), steps)
            for label, vals in ev["diag"].items():
                dc = diag_curves.setdefault(label, {})
                for k, v in vals.items():
                    if k == "inv_sqnorm":
                        dc.setdefault("eff_lr", []).append(_finite_or_none(lr_now * float(v)))
                    else:
                        dc.setdefault(k, []).append(_finite_or_none(v))

        log(0, float("nan"), first_eval, 0.0)
        _, unit_labels = self._unit_syms(task, params)
        step_times, eval_s, diverged, step_ratios = [], 0.0, False, []
        desc = f"{position}{cfg.task} {cfg.optimizer} lr={cfg.learning_rate:g} s{cfg.seed}"
        bar = tqdm(
            total=steps,
            desc=desc,
            leave=False,
            disable=not self.progress,
            file=sys.stderr,
            mininterval=0.5,
        )
        step = 0
        step_cpu = []
        while step < steps:
            t0, c0 = time.perf_counter(), time.process_time()
            losses, angles, ratios = [], [], []
            for i in range(chunk_steps):  # dispatched asynchronously; no host sync per step
                params, rest, opt_state, loss, ang, rat = train.fn(
                    params, rest, opt_state, arrays, idx[i], peak_lr
                )
                losses.append(loss)
                angles.append(ang)
                ratios.append(rat)
            losses, angles, ratios = (
                np.asarray(x) for x in jax.device_get((losses, angles, ratios))
            )
            step_ratios.append(ratios)
            step_times.append((time.perf_counter() - t0) / chunk_steps)
            step_cpu.append((time.process_time() - c0) / chunk_steps)
            step += chunk_steps
            if step < steps:
                idx = sampler.next(chunk_steps)
            last = step >= steps or not np.all(np.isfinite(losses))
            t1 = time.perf_counter()
            ev = jax.device_get(eval_fn(params, rest, test=last))
            eval_s += time.perf_counter() - t1
            train_s = float(np.sum(step_times) * chunk_steps)
            log(step, float(losses.mean()), ev, train_s)
            with np.errstate(all="ignore"):
                chunk_angles = angles.mean(0)
            for label, a in zip(unit_labels, chunk_angles):
                diag_curves.setdefault(label, {}).setdefault("angular_update", [None]).append(
                    _finite_or_none(a)
                )
            bar.update(chunk_steps)
            # a non-finite loss, or parameters made non-finite by the chunk's last update
            if not np.all(np.isfinite(losses)) or not np.isfinite(ev["param_norm"]):
                diverged = True
                break
        bar.close()
        compiled_here = not was_compiled
        train.used = True

        higher = task.higher_is_better
        vm = curves["val_metric"]
        reached = None
        for s, v in zip(curves["step"], vm):
            if v is not None and (v >= task.target if higher else v <= task.target):
                reached = s
                break
        final = {
            k: curves[k][-1]
            for k in ("train_loss", "val_loss", "val_metric", "test_loss", "test_metric")
        }
        memory = {
            "train_executable": train.memory,
            "host_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        try:
            ms = jax.devices()[0].memory_stats()
            if ms:
                memory["device_peak_bytes_in_use"] = int(ms.get("peak_bytes_in_use", 0))
        except Exception:
            pass
        st = np.asarray(step_times) * 1e3
        steady = st[1:] if st.size > 1 else st
        sc = np.asarray(step_cpu) * 1e3
        sc = sc[1:] if sc.size > 1 else sc
        _, diag_note = self._diag.get(_tkey(task), ([], ""))
        return {
            "schema": SCHEMA,
            "id": cfg.run_id,
            "config": full,
            "task": {
                "description": task.description,
                "metric": task.metric,
                "higher_is_better": higher,
                "target": task.target,
                "data": jsonable(task.data_info),
                "n_params": int(sum(x.size for x in jax.tree.leaves(params))),
            },
            "optimizer": {"description": registry.get(cfg.optimizer, check=False).description},
            "status": "diverged" if diverged else "ok",
            "steps_done": step,
            "final": final,
            "steps_to_target": reached,
            "curves": curves,
            "diagnostics": {
                "curves": diag_curves,
                "summary": _diag_summary(diag_curves),
                "note": diag_note or None,
            },
            "timing": {
                "step_ms_median": float(np.median(steady)),
                "step_ms_mean": float(np.mean(steady)),
                "step_cpu_ms_median": float(np.median(sc)),
                "compile_s": train.compile_s,
                "compile_cpu_s": train.compile_cpu_s,
                "compiled_here": compiled_here,
                "first_eval_s": first_eval_s,
                "eval_compile_s": self._eval_compile_s.get(_tkey(task)),
                "eval_compiled_here": eval_compiled_here,
                "eval_s": eval_s,
                "total_s": time.perf_counter() - t_start,
            },
            "profile": profiles.summary(
                [f"{d.kind}:{d.label}" for d, _ in self._diag.get(_tkey(task), ([], ""))[0]],
                step_ratios,
                params,
            ),
            "memory": memory,
            "compiler_options": _compiler_options(task),
            "env": self.env,
        }


def _name(fn) -> str:
    """A record's name of a registry hook (its module and qualified name)."""
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def _diag_summary(curves: dict[str, dict[str, list]]) -> dict:
    """Per symmetry and quantity: the first and last recorded value and the mean over time.

    Quantities: ``charge`` (mean over groups of the Noether charge), ``eff_lr`` (lr / |w|^2,
    :ref:`P2 <p2>`), ``angular_update`` (radians per step, mean over a chunk of steps).
    """
    out: dict[str, dict] = {}
    for label, qs in curves.items():
        for q, vals in qs.items():
            v = [x for x in vals if x is not None]
            if v:
                out.setdefault(label, {})[q] = {
                    "first": v[0],
                    "last": v[-1],
                    "mean": float(np.mean(v)),
                }
    return out
