"""User code in the harness: optimizers and tasks given as objects or ``module:attr`` paths.

A user optimizer is a factory ``lr -> optax transformation`` (it may also take ``task``, the
built :class:`~ksbopt.bench.tasks.Task`, e.g. for ``task.symmetries("scale")``, and keyword
hyperparameters of a grid). It becomes registry entries (one per point of its hyperparameter
grid) beside the built-in ones, so the suite's protocol, statistics, report and plots apply
unchanged. Its identity in every run record is ``origin``: the import path of the factory and
the SHA-256 of its source (:func:`origin`), so a changed factory is re-run, never reused.

A user task is data + an NNX model + a loss + a metric + symmetry declarations
(:func:`make_task`); undeclared symmetries are found with :func:`ksbopt.detect`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ksbopt.bench import registry
from ksbopt.bench.tasks import TASKS, SymDecl, Task, TaskSpec

__all__ = ["check_optimizer", "make_task", "origin", "register_optimizer", "register_task"]

_USER_TASKS: set[str] = set()
_SIMPLE = (int, float, complex, str, bytes, bool, type(None))


def resolve(path: str, what: str) -> Any:
    """The object at ``"package.module:attr.attr"``; a ValueError naming ``path`` otherwise."""
    mod, sep, attr = path.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(
            f"{what}: {path!r} is not an import path; write 'package.module:attribute', "
            "e.g. 'my_opts:make_lion'."
        )
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise ValueError(
            f"{what}: cannot import module {mod!r} of {path!r} ({e}); put it on PYTHONPATH or "
            "run from its folder."
        ) from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what}: module {mod!r} has no attribute {attr!r} (from {path!r}).")
        obj = getattr(obj, part)
    return obj


# ---- identity of user code -------------------------------------------------------------------


def _source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):  # defined in a REPL / exec: fall back to the code object
        code = getattr(obj, "__code__", None)
        return repr((code.co_code, code.co_consts)) if code is not None else repr(type(obj))


def _value(v, seen) -> str:
    """What of a closure cell, default or partial argument enters the hash: simple values by
    ``repr``; functions by their own digest; anything else by its type only (a repr with a
    memory address would make every run new)."""
    if isinstance(v, _SIMPLE):
        return repr(v)
    if isinstance(v, (tuple, list)) and all(isinstance(x, _SIMPLE) for x in v):
        return repr(v)
    if callable(v):
        return _digest(v, seen)
    return f"<{type(v).__module__}.{type(v).__qualname__}>"


def _digest(obj, seen: set) -> str:
    """Source of ``obj``, its defaults and closure, and (recursively) the module-level
    functions and classes of the same module that it names."""
    if id(obj) in seen:
        return ""
    seen.add(id(obj))
    if isinstance(obj, functools.partial):
        parts = [_digest(obj.func, seen), *(_value(a, seen) for a in obj.args)]
        parts += [f"{k}={_value(v, seen)}" for k, v in sorted(obj.keywords.items())]
        return "\n".join(parts)
    fn = obj if inspect.isfunction(obj) or inspect.isclass(obj) else type(obj)
    parts = [_source(fn)]
    for v in (getattr(fn, "__defaults__", None) or ()) + tuple(
        (getattr(fn, "__kwdefaults__", None) or {}).values()
    ):
        parts.append(_value(v, seen))
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            parts.append(_value(cell.cell_contents, seen))
        except ValueError:  # an empty cell
            parts.append("<empty>")
    code, glb = getattr(fn, "__code__", None), getattr(fn, "__globals__", {})
    for name in code.co_names if code is not None else ():
        ref = glb.get(name)
        if (inspect.isfunction(ref) or inspect.isclass(ref)) and ref.__module__ == fn.__module__:
            parts.append(_digest(ref, seen))
    return "\n".join(parts)


def origin(obj, path: str | None = None) -> dict:
    """``{"factory": "module:qualname", "source_sha256": ...}`` of a user factory.

    The hash covers the factory's source (``inspect.getsource``; for a lambda the lines that
    define it), its defaults and closure (numbers, strings and tuples of them by ``repr``,
    functions by their own source, other objects by their type only), and the sources of the
    functions and classes of its module that it calls by name, recursively.
    """
    target = obj.func if isinstance(obj, functools.partial) else obj
    name = path or (
        f"{getattr(target, '__module__', '?')}:"
        f"{getattr(target, '__qualname__', type(target).__qualname__)}"
    )
    digest = hashlib.sha256(_digest(obj, set()).encode()).hexdigest()
    return {"factory": name, "source_sha256": digest}


# ---- optimizers --------------------------------------------------------------------------------


def _build(name: str, factory: Callable, path: str, lr, task, hparams: Mapping):
    """``factory(lr[, task=task], **hparams)``, checked to be an optax transformation."""
    import optax

    kwargs = dict(hparams)
    try:
        takes_task = "task" in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or extension callable: lr only
        takes_task = False
    if takes_task:
        kwargs["task"] = task
    tx = factory(lr, **kwargs)
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(
            f"optimizer {name!r}: the factory {path} returned {tx!r} (type "
            f"{type(tx).__name__}), not an optax.GradientTransformation; return e.g. "
            "optax.chain(...) or optax.GradientTransformation(init, update)."
        )
    return tx


def _signature_problem(factory: Callable, path: str, hparams: Sequence[str]) -> str | None:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    ps = list(sig.parameters.values())
    positional = [p for p in ps if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional and not any(p.kind == p.VAR_POSITIONAL for p in ps):
        return f"the factory {path} takes no learning rate; write it as `def make(lr): ...`"
    supplied = {"task", *hparams}
    for p in ps[1:] if positional and ps[0] is positional[0] else ps:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            continue
        if p.name not in supplied:
            return (
                f"the factory {path} needs the argument {p.name!r}, which the harness does "
                f"not supply: it calls factory(lr), adding task=<Task> if the factory has a "
                f"`task` parameter and the grid's hyperparameters ({', '.join(hparams) or 'none'})"
                f"; give {p.name!r} a default, take it from `task`, or add it to the grid"
            )
    return None


def register_optimizer(
    name: str,
    factory: Callable | str,
    *,
    lrs: Sequence[float] | None = None,
    grid: Mapping[str, Sequence[Any]] | None = None,
    description: str = "",
) -> list[str]:
    """Adds a user optimizer to the registry; returns the entry names (one per grid point).

    ``factory`` is a callable or its import path ``"module:attr"`` (resolved now: a wrong path
    fails here, before any training). ``lrs``: its learning-rate grid (at least 5 points, the
    registry's tuning budget; default the Adam grid 1e-4 .. 1e-2). ``grid``: other
    hyperparameters, e.g. ``{"b1": (0.9, 0.95)}``: every combination is its own entry
    ``name[b1=0.9]`` tuned over ``lrs``.
    """
    path = factory if isinstance(factory, str) else None
    fn = resolve(factory, f"optimizer {name!r}") if path else factory
    if not callable(fn):
        raise TypeError(f"optimizer {name!r}: {factory!r} is not callable; give lr -> optax tx.")
    ident = origin(fn, path)
    path = ident["factory"]
    grid = {k: tuple(v) for k, v in (grid or {}).items()}
    if bad := [k for k, v in grid.items() if not v]:
        raise ValueError(f"optimizer {name!r}: grid {bad} has no values; give at least one.")
    names = []
    for combo in itertools.product(*grid.values()) if grid else [()]:
        hp = dict(zip(grid, combo))
        point = ",".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items()
        )
        entry = f"{name}[{point}]" if hp else name
        if entry in registry.REGISTRY and not registry.REGISTRY[entry].origin:
            raise ValueError(f"optimizer name {entry!r} is a built-in entry; choose another name.")
        registry.register(
            entry,
            functools.partial(_entry_factory, entry, fn, path),
            tuple(lrs) if lrs is not None else registry.ADAPTIVE_GRID,
            hparams=hp,
            tune=(),  # a user entry's grid is its own: the protocol tunes only its lr
            description=description or f"user optimizer {path}",
            origin={**ident, **({"hparams": hp} if hp else {})},
        )
        names.append(entry)
    return names


def _entry_factory(entry, fn, path, lr, task, **hp):
    return _build(entry, fn, path, lr, task, hp)


def check_optimizer(entry: str, task: Task) -> str | None:
    """Why the user entry ``entry`` cannot run on ``task`` (None: it builds and initialises).

    Catches, before training: a factory that raises, asks for an argument the harness does not
    supply, or returns something that is not an optax transformation.
    """
    import jax

    spec = registry.get(entry, check=False)
    if not spec.origin:
        return None
    fn = spec.factory.args[1]
    if why := _signature_problem(fn, spec.origin["factory"], list(spec.hparams)):
        return why
    try:
        from flax import nnx

        params = nnx.state(nnx.eval_shape(lambda: task.make_model(jax.random.key(0))), nnx.Param)
        tx = registry.make(entry, spec.lr_grid[0], task, **dict(spec.hparams))
        jax.eval_shape(tx.init, nnx.as_pure(params))
    except Exception as e:
        return f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return None


# ---- tasks -------------------------------------------------------------------------------------


def _named(kind: str, which: str) -> Callable:
    import jax.numpy as jnp
    import optax

    table = {
        ("loss", "cross_entropy"): optax.softmax_cross_entropy_with_integer_labels,
        ("loss", "mse"): lambda out, y: jnp.mean((out - y) ** 2, axis=-1),
        ("metric", "accuracy"): lambda out, y: (jnp.argmax(out, -1) == y).astype(jnp.float32),
        ("metric", "mse"): lambda out, y: jnp.mean((out - y) ** 2, axis=-1),
    }
    if (kind, which) not in table:
        valid = [w for k, w in table if k == kind]
        raise ValueError(f"{kind}={which!r} is not known; give one of {valid} or a callable.")
    return table[(kind, which)]


@dataclasses.dataclass
class UserTask(Task):
    """A :class:`Task` whose per-example loss and metric are ``fn(model(x), y)``."""

    loss_fn: Callable | None = None
    metric_fn: Callable | None = None

    def _per_example(self, model, batch):
        x, y = batch
        out = model(x)
        return self.loss_fn(out, y), self.metric_fn(out, y)


def _arrays(data, what: str, batches: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(x, y, batch size) from a pair of arrays (batch size 64 or all) or an iterable of
    (x, y) batches (the first batch's size)."""
    if isinstance(data, tuple) and len(data) == 2 and hasattr(data[0], "shape"):
        return np.asarray(data[0]), np.asarray(data[1]), min(64, len(data[0]))
    if not isinstance(data, Iterable):
        raise TypeError(f"{what}={data!r}: give (x, y) arrays or an iterable of (x, y) batches.")
    got = list(itertools.islice(iter(data), batches))
    if not got:
        raise ValueError(f"{what}: the batch iterator gave no batches.")
    x, y = (np.concatenate([np.asarray(b[i]) for b in got]) for i in (0, 1))
    return x, y, len(got[0][0])


def _model_factory(model) -> Callable:
    from flax import nnx

    if isinstance(model, nnx.Module):  # the same initial weights for every seed
        graph, state = nnx.split(model)
        return lambda key: nnx.merge(graph, state)
    if not callable(model):
        raise TypeError(f"model={model!r}: give an nnx.Module or a function rngs -> nnx.Module.")
    return lambda key: model(nnx.Rngs(key))


def _decls(symmetries) -> list[SymDecl]:
    from ksbopt._src.diagnostics.monitor import symmetry_labels

    if not symmetries:  # a task may declare none (the profile table then leaves it out)
        return []
    labels = [lab.split(":", 1)[1] for lab in symmetry_labels(symmetries)]  # kind: separate
    return [
        SymDecl(
            s.kind,
            (),
            {f.name: getattr(s, f.name) for f in dataclasses.fields(s)},
            label,
            type(s).__name__,
        )
        for s, label in zip(symmetries, labels)
    ]


def make_task(
    name: str,
    model,
    train,
    val,
    test=None,
    *,
    loss: str | Callable = "cross_entropy",
    metric: str | Callable = "accuracy",
    higher_is_better: bool | None = None,
    target: float | None = None,
    symmetries=None,
    steps: int = 200,
    batch_size: int | None = None,
    eval_every: int | None = None,
    train_batches: int | None = None,
    description: str = "",
) -> Task:
    """A benchmark task from your data, Flax NNX model, loss, metric and symmetries.

    The harness trains ``model`` on minibatches of ``train`` (epochs of permutations), reads
    the loss and metric on ``val`` and ``test``, and takes the symmetry declarations as the
    tasks of the registry do; an undeclared task has its symmetries found by
    :func:`ksbopt.detect` on two training batches. Pass the result to
    :func:`ksbopt.bench.compare` or name a function returning it with ``--task module:attr``.

    Args:
      name: the task's name in the report (not a built-in task's).
      model: an ``nnx.Module`` class or function ``rngs -> module`` (re-initialised per
        seed), or a module instance (the same initial weights for every seed).
      train: ``(x, y)`` arrays, or an iterable of ``(x, y)`` batches (the first
        ``train_batches`` are kept, then resampled in epochs).
      val: ``(x, y)`` arrays or a finite iterable of batches: chooses the learning rate.
      test: the same, for the reported metric (default ``val``).
      loss: ``"cross_entropy"`` (integer labels), ``"mse"`` or ``fn(outputs, y) ->
        per-example loss``.
      metric: ``"accuracy"``, ``"mse"`` or ``fn(outputs, y) -> per-example values`` (mean
        over the split).
      higher_is_better: whether a larger metric is better (default: True for accuracy,
        False for mse; required for a callable).
      target: validation metric that counts as reached (steps to target); None: none.
      symmetries: ksbopt declarations (``[]``: none); None detects them.
      steps: training steps per run.
      batch_size: minibatch size (default: the iterator's, or 64).
      eval_every: steps between evaluations (default ``steps // 10``).
      train_batches: how many batches to draw from a ``train`` iterator (default ``steps``).
      description: one line for the report.

    Returns:
      A task (a :class:`ksbopt.bench.tasks.Task`) whose record identity includes the source
      hashes of ``model``, ``loss`` and ``metric`` and the SHA-256 of the data.

    Example:
      >>> import numpy as np, ksbopt.bench
      >>> from flax import nnx
      >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype("f4")
      >>> y = (x[:, 0] > 0).astype("i4")
      >>> def mlp(rngs):
      ...     return nnx.Sequential(nnx.Linear(4, 8, rngs=rngs), nnx.relu,
      ...                           nnx.Linear(8, 2, rngs=rngs))
      >>> task = ksbopt.bench.make_task("doc_task", mlp, (x[:48], y[:48]), (x[48:], y[48:]),
      ...                               steps=20, batch_size=16)
      >>> task.kinds, task.batch_size, task.eval_every
      (('rescale', 'translation'), 16, 2)

    References:
      None: a container of user parts; :func:`ksbopt.detect` cites the papers it follows.
    """
    import jax
    from flax import nnx

    import ksbopt

    loss_fn = _named("loss", loss) if isinstance(loss, str) else loss
    metric_fn = _named("metric", metric) if isinstance(metric, str) else metric
    if higher_is_better is None:
        if not isinstance(metric, str):
            raise ValueError(
                f"task {name!r}: say whether the metric {metric!r} is better higher or lower: "
                "higher_is_better=True or False."
            )
        higher_is_better = metric == "accuracy"
    tx_, ty_, first = _arrays(train, f"task {name!r} train", train_batches or steps)
    vx, vy, _ = _arrays(val, f"task {name!r} val")
    sx, sy, _ = _arrays(test, f"task {name!r} test") if test is not None else (vx, vy, 0)
    batch_size = batch_size or first
    make = _model_factory(model)
    if symmetries is None:
        m = make(jax.random.key(0))
        graph, params, rest = nnx.split(m, nnx.Param, ...)
        xb, yb = tx_[: 2 * batch_size], ty_[: 2 * batch_size]

        def value(p, batch):
            return loss_fn(nnx.merge(graph, p, rest)(batch[0]), batch[1]).mean()

        batches = [(xb[:batch_size], yb[:batch_size]), (xb[batch_size:], yb[batch_size:])]
        symmetries, _ = ksbopt.detect(
            value, nnx.as_pure(params), *[b for b in batches if len(b[0])]
        )
    symmetries = list(symmetries) if isinstance(symmetries, (list, tuple)) else [symmetries]
    data = {"train_x": tx_, "train_y": ty_, "val_x": vx, "val_y": vy, "test_x": sx, "test_y": sy}
    h = hashlib.sha256()
    for k, a in data.items():
        h.update(k.encode() + str(a.shape).encode() + np.ascontiguousarray(a).tobytes())
    ident = {
        "model": origin(type(model) if isinstance(model, nnx.Module) else model),
        "loss": origin(loss_fn),
        "metric": origin(metric_fn),
        "data_sha256": h.hexdigest(),
    }
    return UserTask(
        name=name,
        description=description or f"user task {name}",
        metric=metric if isinstance(metric, str) else getattr(metric, "__name__", "metric"),
        higher_is_better=bool(higher_is_better),
        target=math.nan if target is None else float(target),
        steps=steps,
        batch_size=batch_size,
        eval_every=eval_every or max(1, steps // 10),
        make_model=make,
        arrays=data,
        kind="classification",  # (x, y) batches and the sampler over train_y
        decls=_decls(symmetries),
        config={"scale": "user", "origin": ident},
        data_info={"train": len(tx_), "val": len(vx), "test": len(sx)},
        loss_fn=loss_fn,
        metric_fn=metric_fn,
    )


def register_task(task: Task | str) -> str:
    """Adds a user task (or the import path of one, or of a function returning one) to the
    task table, so suites and the CLI can name it; returns its name."""
    from ksbopt.bench import runner

    if isinstance(task, str):
        obj = resolve(task, "--task")
        task = obj() if callable(obj) and not isinstance(obj, Task) else obj
    if not isinstance(task, Task):
        raise TypeError(f"task {task!r} is not a ksbopt.bench task; build it with make_task().")
    if task.name in TASKS and task.name not in _USER_TASKS:
        raise ValueError(f"task name {task.name!r} is a built-in task; choose another name.")
    runner.clear_caches()  # a redefined task of the same name must not reuse built objects

    def build(scale, cache_dir, task=task):
        cfg = {**task.config, "scale": scale or "user"}
        return dataclasses.replace(task, config=cfg)

    features = ("units",) if task.unit_decls else ()
    _USER_TASKS.add(task.name)
    TASKS[task.name] = TaskSpec(task.name, task.description, ("flax",), build, task.kinds, features)
    return task.name


# ---- the command line --------------------------------------------------------------------------


def parse_cli(optimizers: Sequence[str], grids: Sequence[str], tasks: Sequence[str]):
    """Registers ``--optimizer NAME=module:factory`` (with ``--grid NAME:KEY=V1,V2``; KEY
    ``lr`` sets the learning rates) and ``--task module:attr``; returns (entries, tasks).

    Every error is a ValueError naming the flag and its value (the CLI turns it into a usage
    error before any training).
    """
    spec: dict[str, dict[str, tuple]] = {}
    for g in grids:
        name, sep, rest = g.partition(":")
        key, sep2, vals = rest.partition("=")
        try:
            values = tuple(float(v) for v in vals.split(",") if v.strip())
        except ValueError:
            values = ()
        if not (sep and sep2 and name and key and values):
            raise ValueError(
                f"--grid {g!r}: write NAME:KEY=V1,V2 with numbers, e.g. mine:b1=0.9,0.95"
            )
        spec.setdefault(name.strip(), {})[key.strip()] = values
    entries, seen = [], set()
    for o in optimizers:
        name, sep, path = o.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(
                f"--optimizer {o!r}: write NAME=module:factory, e.g. mine=my_opts:make"
            )
        name = name.strip()
        grid = dict(spec.get(name, {}))
        lrs = grid.pop("lr", None)
        entries += register_optimizer(name, path.strip(), lrs=lrs, grid=grid)
        seen.add(name)
    if stray := set(spec) - seen:
        raise ValueError(f"--grid names {sorted(stray)} but no --optimizer NAME=... defines them")
    return entries, [register_task(t) for t in tasks]


def preflight(runs: Sequence, runner) -> tuple[list, list[str]]:
    """``runs`` without the (user optimizer, task) pairs that cannot start, and why not."""
    bad: dict[tuple[str, str], str] = {}
    for r in runs:
        key = (r.optimizer, r.task)
        if key not in bad and registry.get(r.optimizer, check=False).origin:
            bad[key] = check_optimizer(r.optimizer, runner.task(r.task, r.scale))
    notes = [f"FAILED before training: {o} on {t}: {why}" for (o, t), why in bad.items() if why]
    return [r for r in runs if not bad.get((r.optimizer, r.task))], notes
