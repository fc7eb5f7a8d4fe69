"""Training and evaluation of one benchmark run, and the per-run JSON record.

A run starts from its seed's model (the entry's ``prepare_params`` of it, when it has one) and
its optimizer's state, both from the compiled functions of :mod:`ksbopt.bench.compiled`. The
loop is functional: one jitted step (parameters, statistics and optimizer state donated) is
dispatched per step without waiting; the host syncs once per chunk of ``eval_every`` steps, to
read the losses and evaluate. (A ``lax.scan`` over the chunk was measured 2x slower per step on
CPU for the MNIST-1D CNN: XLA:CPU runs convolution gradients inside a loop body much slower.)

Records are written atomically (temporary file + rename) when a run ends: an interrupted
benchmark keeps every finished record, and a rerun skips runs whose record holds the same
config.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ksbopt.bench import compiled, diagnostics, host, profiles, registry, workers
from ksbopt.bench.compiled import MAX_EVAL_INTERVALS, clear_caches
from ksbopt.bench.diagnostics import finite_or_none
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


def environment() -> dict:
    """The software and machine a record was made on."""
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
        **host.setting(),
        **workers.setting(),
    }


class Runner:
    """Runs :class:`RunConfig` s; caches built tasks and compiled functions between runs."""

    def __init__(self, out: Path, *, cache_dir: Path | None = None, progress: bool = True):
        self.out = Path(out)
        self.cache_dir = cache_dir
        self.progress = progress
        host.reuse_large_buffers()  # before the first compilation: see ksbopt.bench.host
        # Built tasks are shared by every Runner of the process, as the compiled functions
        # are (:mod:`ksbopt.bench.compiled`).
        self._tasks: dict[tuple[str, str], Task] = compiled._CACHE["tasks"]
        self.env = environment()

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
        steps, every = compiled.run_length(cfg, task)
        schedule = schedule_definition(cfg.schedule) if compiled.scheduled(cfg) else None
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
        """Trains ``cfg`` (its ``full`` config) and returns its record."""
        t_start = time.perf_counter()
        task = self.task(cfg.task, cfg.scale)
        state = _start(cfg, task)
        sampler = task.sampler(cfg.seed)
        idx = sampler.next(full["eval_every"])
        train_compiled = compiled.train_compiled(cfg)
        train = compiled.train_step(
            cfg, task, state.tx, state.graph_train, *state.carry, state.arrays, idx[0]
        )
        eval_compiled = compiled.eval_compiled(task)
        evaluate = _evaluation(cfg, task, state)
        t_eval_c = time.perf_counter()
        first_eval = jax.device_get(evaluate(state, test=True))
        first_eval_s = time.perf_counter() - t_eval_c
        curves = _Curves(cfg, full["steps"])
        curves.log(0, float("nan"), first_eval, 0.0)
        loop = _Loop(cfg, task, train, evaluate, sampler, full, curves)
        loop.train(state, idx, position, self.progress)
        train.used = True
        timing = {
            "compiled_here": not train_compiled,
            "first_eval_s": first_eval_s,
            "eval_compile_s": compiled.eval_compile_s(task),
            "eval_compiled_here": not eval_compiled,
        }
        rec = _record(cfg, full, task, state.carry[0], curves, loop, train, timing, self.env)
        rec["timing"]["total_s"] = time.perf_counter() - t_start
        return rec


# ---- the steps of a run -----------------------------------------------------------------------


@dataclasses.dataclass
class _State:
    """What a run carries from step to step (``carry``: params, rest, optimizer state, all
    donated to the step) and what it was built from."""

    graph_train: object
    graph_eval: object
    tx: optax.GradientTransformation
    carry: tuple
    arrays: dict


def _start(cfg: RunConfig, task: Task) -> _State:
    """The seed's model (prepared by the entry, if it asks), the optimizer and its state."""
    graph_train, graph_eval, params, rest = compiled.init_model(task, cfg.seed)
    params = compiled.prepared(cfg, task, params)
    tx = registry.make(cfg.optimizer, cfg.learning_rate, task, **dict(cfg.hparams))
    opt_state = compiled.init_state(cfg, task, params)
    carry = compiled.distinct_buffers((params, rest, opt_state))
    return _State(graph_train, graph_eval, tx, carry, compiled.train_arrays(task))


def _evaluation(cfg: RunConfig, task: Task, state: _State):
    """``evaluate(state, test) -> {"val", ["test"], "diag", "param_norm"}`` at the entry's
    evaluation point of the state's current parameters."""
    params, rest, _ = state.carry
    eval_at = compiled.evaluator(task, state.graph_eval, params, rest)
    point = compiled.eval_point(cfg)

    def evaluate(state: _State, test: bool):
        params, rest, opt_state = state.carry
        return eval_at(point(params, opt_state), rest, test=test)

    return evaluate


class _Curves:
    """The record's curves of one run: one point per evaluation, per symmetry diagnostic too."""

    def __init__(self, cfg: RunConfig, steps: int):
        self.cfg, self.steps = cfg, steps
        self.curves: dict[str, list] = {
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
        self.diag: dict[str, dict[str, list]] = {}

    def log(self, step: int, train_loss: float, ev: dict, train_s: float) -> None:
        """One evaluation ``ev`` after ``step`` steps (``train_s`` seconds of training)."""
        cfg, curves = self.cfg, self.curves
        curves["step"].append(step)
        curves["time_s"].append(train_s)
        curves["train_loss"].append(finite_or_none(train_loss))
        for s in ("val", "test"):  # the test split only at the start and the end
            got = ev.get(s, {"loss": None, "metric": None})
            curves[f"{s}_loss"].append(finite_or_none(got["loss"]))
            curves[f"{s}_metric"].append(finite_or_none(got["metric"]))
        curves["param_norm"].append(finite_or_none(ev["param_norm"]))
        arm = cfg.schedule if compiled.scheduled(cfg) else "constant"
        lr_now = cfg.learning_rate * schedule_factor(arm, max(step - 1, 0), self.steps)
        for label, vals in ev["diag"].items():
            dc = self.diag.setdefault(label, {})
            for k, v in vals.items():
                if k == "inv_sqnorm":
                    dc.setdefault("eff_lr", []).append(finite_or_none(lr_now * float(v)))
                else:
                    dc.setdefault(k, []).append(finite_or_none(v))

    def log_angles(self, labels: list[str], angles: np.ndarray) -> None:
        """The units' angular updates of one chunk of steps (``angles``: steps x units)."""
        with np.errstate(all="ignore"):
            chunk_angles = angles.mean(0)
        for label, a in zip(labels, chunk_angles):
            self.diag.setdefault(label, {}).setdefault("angular_update", [None]).append(
                finite_or_none(a)
            )


class _Loop:
    """The train loop: chunks of ``eval_every`` steps dispatched without a host sync, an
    evaluation after each (the test split after the last), until the step budget is spent or
    the run diverges."""

    def __init__(self, cfg, task, train, evaluate, sampler, full: dict, curves: _Curves):
        self.cfg, self.task, self.train_fn, self.evaluate = cfg, task, train, evaluate
        self.sampler, self.curves = sampler, curves
        self.steps, self.chunk = full["steps"], full["eval_every"]
        self.peak_lr = jnp.float32(cfg.learning_rate)
        self.step, self.diverged, self.eval_s = 0, False, 0.0
        self.step_times: list[float] = []
        self.step_cpu: list[float] = []
        self.step_ratios: list[np.ndarray] = []

    def train(self, state: _State, idx: np.ndarray, position: str, progress: bool) -> None:
        from tqdm.auto import tqdm

        cfg, chunk = self.cfg, self.chunk
        _, unit_labels = compiled.unit_symmetries(self.task, state.carry[0])
        desc = f"{position}{cfg.task} {cfg.optimizer} lr={cfg.learning_rate:g} s{cfg.seed}"
        bar = tqdm(
            total=self.steps,
            desc=desc,
            leave=False,
            disable=not progress,
            file=sys.stderr,
            mininterval=0.5,
        )
        while self.step < self.steps:
            losses, angles = self._chunk(state, idx)
            if self.step < self.steps:
                idx = self.sampler.next(chunk)
            last = self.step >= self.steps or not np.all(np.isfinite(losses))
            t1 = time.perf_counter()
            ev = jax.device_get(self.evaluate(state, test=last))
            self.eval_s += time.perf_counter() - t1
            train_s = float(np.sum(self.step_times) * chunk)
            self.curves.log(self.step, float(losses.mean()), ev, train_s)
            self.curves.log_angles(unit_labels, angles)
            bar.update(chunk)
            # a non-finite loss, or parameters made non-finite by the chunk's last update
            if not np.all(np.isfinite(losses)) or not np.isfinite(ev["param_norm"]):
                self.diverged = True
                break
        bar.close()

    def _chunk(self, state: _State, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``eval_every`` steps, dispatched asynchronously; (losses, angular updates)."""
        t0, c0 = time.perf_counter(), time.process_time()
        losses, angles, ratios = [], [], []
        params, rest, opt_state = state.carry
        for i in range(self.chunk):  # no host sync per step
            params, rest, opt_state, loss, ang, rat = self.train_fn.fn(
                params, rest, opt_state, state.arrays, idx[i], self.peak_lr
            )
            losses.append(loss)
            angles.append(ang)
            ratios.append(rat)
        state.carry = (params, rest, opt_state)
        losses, angles, ratios = (np.asarray(x) for x in jax.device_get((losses, angles, ratios)))
        self.step_ratios.append(ratios)
        self.step_times.append((time.perf_counter() - t0) / self.chunk)
        self.step_cpu.append((time.process_time() - c0) / self.chunk)
        self.step += self.chunk
        return losses, angles


# ---- the record -------------------------------------------------------------------------------


def _record(cfg, full, task, params, curves: _Curves, loop: _Loop, train, timing, env) -> dict:
    """The run's JSON record; ``timing``: what the caller measured of compilation and the
    first evaluation (``total_s``, the run's wall time, the caller adds last)."""
    decls, diag_note = compiled.symmetries_with_charges(task)
    return {
        "schema": SCHEMA,
        "id": cfg.run_id,
        "config": full,
        "task": {
            "description": task.description,
            "metric": task.metric,
            "higher_is_better": task.higher_is_better,
            "target": task.target,
            "data": jsonable(task.data_info),
            "n_params": int(sum(x.size for x in jax.tree.leaves(params))),
        },
        "optimizer": {"description": registry.get(cfg.optimizer, check=False).description},
        "status": "diverged" if loop.diverged else "ok",
        "steps_done": loop.step,
        "final": {
            k: curves.curves[k][-1]
            for k in ("train_loss", "val_loss", "val_metric", "test_loss", "test_metric")
        },
        "steps_to_target": _steps_to_target(task, curves.curves),
        "curves": curves.curves,
        "diagnostics": {
            "curves": curves.diag,
            "summary": diagnostics.summary(curves.diag),
            "note": diag_note or None,
        },
        "timing": {
            **_step_times(loop),
            "compile_s": train.compile_s,
            "compile_cpu_s": train.compile_cpu_s,
            **timing,
            "eval_s": loop.eval_s,
        },
        "profile": profiles.summary(
            [f"{d.kind}:{d.label}" for d, _ in decls], loop.step_ratios, params
        ),
        "memory": _memory(train),
        "compiler_options": compiled.compiler_options(task),
        "env": env,
    }


def _steps_to_target(task: Task, curves: dict) -> int | None:
    """The first evaluated step whose validation metric reaches the task's target."""
    higher = task.higher_is_better
    for s, v in zip(curves["step"], curves["val_metric"]):
        if v is not None and (v >= task.target if higher else v <= task.target):
            return s
    return None


def _step_times(loop: _Loop) -> dict:
    """Wall and CPU milliseconds per step, the first chunk (warm-up) left out where others
    exist."""
    st = np.asarray(loop.step_times) * 1e3
    steady = st[1:] if st.size > 1 else st
    sc = np.asarray(loop.step_cpu) * 1e3
    sc = sc[1:] if sc.size > 1 else sc
    return {
        "step_ms_median": float(np.median(steady)),
        "step_ms_mean": float(np.mean(steady)),
        "step_cpu_ms_median": float(np.median(sc)),
    }


def _memory(train) -> dict:
    """The train executable's memory, the host's peak and the device's peak (if it says)."""
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
    return memory


def _name(fn) -> str:
    """A record's name of a registry hook (its module and qualified name)."""
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
