"""What a benchmark task is: data + Flax NNX model + loss + metric + symmetry declarations.

A :class:`TaskSpec` (cheap: no Flax import, no data) names a task and how to build it at a
scale; its ``build`` makes the :class:`Task`, which holds the data as NumPy arrays, makes the
model per seed, and defines the minibatches (:class:`Sampler`), the loss and the evaluation as
pure JAX functions. The catalogue of built-in tasks is :mod:`ksbopt.bench.tasks`.

Each task declares its parameter symmetries as plain data (:class:`SymDecl`); they turn into
``ksbopt`` objects only when an optimizer or a diagnostic asks for them, so tasks work while a
``ksbopt`` feature is still missing. Grouping follows :doc:`/concepts/symmetries` with Flax's
layout (the output unit is the last axis).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["Sampler", "SymDecl", "Task", "TaskSpec", "unit_decls"]


@dataclasses.dataclass(frozen=True)
class SymDecl:
    """One symmetry declaration as data: ``kind`` in scale/rescale/translation/linear."""

    kind: str
    args: tuple
    kwargs: Mapping[str, Any]
    label: str
    constructor: str | None = None  # e.g. "Linear.query_key"; default: the kind's class

    def build(self):
        """The ``ksbopt`` object, e.g. ``ksbopt.Scale(*args, **kwargs)``."""
        from ksbopt.bench.registry import ksbopt_feature

        name = (
            self.constructor
            or {
                "scale": "Scale",
                "rescale": "Rescale",
                "translation": "Translation",
                "linear": "Linear",
            }[self.kind]
        )
        return ksbopt_feature(name)(*self.args, **self.kwargs)


class Sampler:
    """Deterministic minibatch indices: epochs of permutations, or random window starts."""

    def __init__(self, n: int, batch: int, seed: int, *, windows: bool = False):
        self.n, self.batch, self.windows = n, batch, windows
        self.rng = np.random.default_rng(seed)
        self.buf = np.zeros(0, np.int32)

    def next(self, steps: int) -> np.ndarray:
        """Indices of shape (steps, batch), int32."""
        need = steps * self.batch
        if self.windows:
            return self.rng.integers(0, self.n, size=(steps, self.batch), dtype=np.int32)
        while self.buf.size < need:
            self.buf = np.concatenate([self.buf, self.rng.permutation(self.n).astype(np.int32)])
        out, self.buf = self.buf[:need], self.buf[need:]
        return out.reshape(steps, self.batch)


@dataclasses.dataclass
class Task:
    """A built task. ``loss``/``evaluate``/``batch`` are pure JAX functions of their inputs."""

    name: str
    description: str
    metric: str
    higher_is_better: bool
    target: float
    steps: int
    batch_size: int
    eval_every: int
    make_model: Callable[[Any], Any]  # seed (int or PRNG key) -> nnx.Module
    arrays: Mapping[str, np.ndarray]
    kind: str
    decls: Sequence[SymDecl]
    config: Mapping[str, Any]
    data_info: Mapping[str, Any]
    seq_len: int = 0
    eval_batch: int = 1024
    path_input_shape: tuple[int, ...] | None = None  # ReLU nets without normalisation
    _path_fn: Any = dataclasses.field(default=None, repr=False, compare=False)

    # ---- symmetries -------------------------------------------------------------------------
    @property
    def kinds(self) -> tuple[str, ...]:
        """The symmetry kinds this task declares."""
        return tuple(dict.fromkeys(d.kind for d in self.decls))

    @property
    def features(self) -> tuple[str, ...]:
        """What optimizers may need besides symmetries: ``units``, ``path_norm``."""
        return (
            *(("units",) if self.unit_decls else ()),
            *(("path_norm",) if self.path_input_shape else ()),
        )

    @property
    def unit_decls(self) -> list[SymDecl]:
        """The units (see :func:`unit_decls`) as ``scale`` declarations."""
        return unit_decls(self.decls)

    def has_symmetry(self, kind: str) -> bool:
        return any(d.kind == kind for d in self.decls)

    def symmetries(self, kind: str | Sequence[str] | None = None) -> list:
        """``ksbopt`` symmetry objects of the given kind(s) (all kinds when ``None``)."""
        kinds = None if kind is None else {kind} if isinstance(kind, str) else set(kind)
        return [d.build() for d in self.decls if kinds is None or d.kind in kinds]

    def unit_symmetries(self) -> list:
        """``ksbopt.Scale`` objects of the units (:attr:`unit_decls`)."""
        return [d.build() for d in self.unit_decls]

    def path_norm_fn(self) -> Callable:
        """``sq -> squared l2 path norm``: the net without ReLUs on squared weights, ones in.

        The function Path-SGD needs (:func:`ksbopt.peers.path_sgd`); built once per task, so every
        optimizer made for this task gets the same object.
        """
        if self.path_input_shape is None:
            raise ValueError(
                f"task {self.name!r} has no path norm (it has normalisation layers, non-ReLU "
                "activations or average pooling); Path-SGD applies to ReLU networks without "
                "normalisation or pooling, e.g. mnist1d_deep_mlp, mnist1d_cnn or teacher_relu."
            )
        if self._path_fn is None:
            import jax
            import jax.numpy as jnp
            from flax import nnx

            abstract = nnx.eval_shape(lambda: self.make_model(jax.random.key(0, impl="rbg")))
            graph, _, rest = nnx.split(abstract, nnx.Param, ...)
            if jax.tree.leaves(rest):  # pragma: no cover - path tasks have no model state
                raise ValueError(f"task {self.name!r}: the path norm needs a stateless model.")
            shape = self.path_input_shape

            def path_norm(sq):
                out = nnx.merge(graph, sq, rest)(jnp.ones(shape, jnp.float32), linear=True)
                return jnp.sum(out)

            self._path_fn = path_norm
        return self._path_fn

    # ---- data -------------------------------------------------------------------------------
    def sampler(self, seed: int) -> Sampler:
        if self.kind == "lm":
            n = int(self.arrays["train_bytes"].size) - self.seq_len - 1
            return Sampler(n, self.batch_size, seed, windows=True)
        return Sampler(int(self.arrays["train_y"].shape[0]), self.batch_size, seed)

    def batch(self, arrays, idx):
        import jax
        import jax.numpy as jnp

        if self.kind == "lm":
            win = jax.vmap(
                lambda s: jax.lax.dynamic_slice(arrays["train_bytes"], (s,), (self.seq_len + 1,))
            )(idx)
            return win.astype(jnp.int32)
        return arrays["train_x"][idx], arrays["train_y"][idx]

    # ---- loss and metric --------------------------------------------------------------------
    def _per_example(self, model, batch):
        """Per-example (loss, metric numerator) of a batch."""
        import jax.numpy as jnp
        import optax

        if self.kind == "lm":
            logits = model(batch[:, :-1])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])
            return ce.mean(-1), ce.mean(-1) / math.log(2.0)
        x, y = batch
        out = model(x)
        if self.kind == "classification":
            ce = optax.softmax_cross_entropy_with_integer_labels(out, y)
            return ce, (jnp.argmax(out, -1) == y).astype(jnp.float32)
        se = jnp.mean((out - y) ** 2, axis=-1)
        return se, se / self.config["target_var"]

    def loss(self, model, batch):
        return self._per_example(model, batch)[0].mean()

    def eval_sets(self) -> dict[str, tuple[np.ndarray, ...]]:
        """Validation and test data as (chunks, chunk, ...) arrays plus a mask.

        Both splits share the chunk size and are zero-padded to whole chunks of their own
        length: the validation split, evaluated every 2% of a run, is not padded to the
        (larger) test split's, which is evaluated only at the start and the end.
        """
        if self.kind == "lm":
            raw = {s: (self.arrays[f"{s}_windows"].astype(np.int32),) for s in ("val", "test")}
        else:
            raw = {s: (self.arrays[f"{s}_x"], self.arrays[f"{s}_y"]) for s in ("val", "test")}
        n_max = max(d[0].shape[0] for d in raw.values())
        chunk = min(n_max, self.eval_batch)
        out = {}
        for s, data in raw.items():
            n = data[0].shape[0]
            n_chunks = max(1, -(-n // chunk))
            total = n_chunks * chunk
            padded = [
                np.concatenate([a, np.zeros((total - n, *a.shape[1:]), a.dtype)]).reshape(
                    n_chunks, chunk, *a.shape[1:]
                )
                for a in data
            ]
            mask = (np.arange(total) < n).reshape(n_chunks, chunk)
            out[s] = (*padded, mask)
        return out

    def evaluate(self, model, *data) -> dict:
        """Mean loss and metric over one split given as :meth:`eval_sets` arrays."""
        import jax
        import jax.numpy as jnp

        *xs, mask = data

        def one(args):
            *xs, m = args
            b = xs[0] if self.kind == "lm" else tuple(xs)
            lo, me = self._per_example(model, b)
            return jnp.sum(jnp.where(m, lo, 0.0)), jnp.sum(jnp.where(m, me, 0.0))

        lo, me = jax.lax.map(one, (*xs, mask))
        n = jnp.sum(mask)
        return {"loss": lo.sum() / n, "metric": me.sum() / n}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task's name, what it needs installed, and how to build it at a scale.

    ``kinds`` and ``features`` repeat what the built task declares (a test checks it), so
    that a suite can tell which optimizers apply without building anything.
    """

    name: str
    description: str
    requires: tuple[str, ...]
    build: Callable[[str, Any], Task]
    kinds: tuple[str, ...] = ()  # symmetry kinds the built task declares
    features: tuple[str, ...] = ()  # "units", "path_norm" (see Task.features)


def unit_decls(decls: Sequence[SymDecl]) -> list[SymDecl]:
    """The units of a network as ``scale`` declarations, for :func:`ksbopt.noether_rmsprop`.

    With normalisation: the scale groups themselves. Without: the incoming weights of every
    hidden unit whose norm the next layer can absorb (the incoming side of each rescale
    group, the left factor of each plain linear pair: the diagonal of GL(k)), per output unit
    (axis -1). These are not symmetries of the loss on their own: an optimizer that holds
    their norms fixed loses nothing, because the rescale symmetry moves the norm to the next
    layer (:doc:`/concepts/symmetries`).
    """
    scale = [d for d in decls if d.kind == "scale"]
    if scale:
        return scale
    out = []
    for d in decls:
        if d.kind == "rescale":
            inc = d.kwargs["incoming"]
        elif d.kind == "linear" and d.constructor is None:
            inc = d.args[0]
        else:
            continue
        out.append(SymDecl("scale", (inc,), {"axis": -1}, f"{d.label.split('>')[0]} units"))
    return out
