"""Benchmark tasks: data + Flax NNX model + loss + metric + symmetry declarations.

A task is looked up by name in :data:`TASKS`, which maps to a :class:`TaskSpec` (cheap: no
Flax import, no data) whose ``build(scale)`` makes the :class:`Task`. Scales (:data:`SCALES`):

- ``tiny``: a few seconds on CPU, for tests;
- ``small``: the CPU size of the quick and full suites (for the headline tasks, the size at
  which optimizers differ: at least 100k parameters, 2000 steps, thousands of held-out
  examples);
- ``base``: the published sizes of the reproductions (for the headline tasks, equal to
  ``small``);
- ``large``: the gpu suite's accelerator size (at least 10M parameters).

Each family of tasks has one table of sizes per scale (``_MNIST1D_HEADLINE_SIZES``,
``_LM_LONG``, ...): that table alone decides a task's model, data, steps, batch and evaluation
interval.
:data:`HEADLINE_TASKS` names the tasks whose results the report leads with; the others are
small smoke and reproduction tasks. :data:`GPU_TASKS` names the tasks of the gpu suite.

Each task declares its parameter symmetries as plain data (:class:`SymDecl`); they turn into
``ksbopt`` objects only when an optimizer or a diagnostic asks for them, so tasks work while a
``ksbopt`` feature is still missing. Grouping follows :doc:`/concepts/symmetries` with Flax's
layout (the output unit is the last axis).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "GPU_TASKS",
    "HEADLINE_TASKS",
    "SCALES",
    "TASKS",
    "SymDecl",
    "Task",
    "TaskSpec",
    "build_task",
    "task_names",
    "unit_decls",
]

SCALES = ("tiny", "small", "base", "large")


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


# ---- builders ---------------------------------------------------------------------------------


def _classif_arrays(split) -> dict:
    out = {}
    for s in ("train", "val", "test"):
        d = getattr(split, s)
        out[f"{s}_x"], out[f"{s}_y"] = d["x"], d["y"]
    return out


def _cnn_scale_decls(n_conv: int) -> list[SymDecl]:
    return [
        SymDecl("scale", (f"conv{i}/kernel",), {"axis": -1}, f"conv{i}")
        for i in range(1, n_conv + 1)
    ]


def _head_translation() -> SymDecl:
    return SymDecl("translation", (["head/kernel", "head/bias"],), {"axis": -1}, "head")


def _rescale_chain(names: Sequence[str], *, bias: bool = True) -> list[SymDecl]:
    out = []
    for a, b in itertools.pairwise(names):
        inc = [f"{a}/kernel", f"{a}/bias"] if bias else f"{a}/kernel"
        out.append(SymDecl("rescale", (), {"incoming": inc, "outgoing": f"{b}/kernel"}, f"{a}>{b}"))
    return out


_MNIST1D_SCALES = {
    # num_samples, val_size, channels/hidden multiplier, batch, steps, eval_every
    "tiny": dict(num_samples=1000, val_size=100, width=0.32, batch=32, steps=30, eval_every=10),
    "small": dict(num_samples=5000, val_size=500, width=1, batch=100, steps=800, eval_every=100),
    "base": dict(num_samples=5000, val_size=500, width=1, batch=100, steps=4000, eval_every=200),
    "large": dict(num_samples=5000, val_size=500, width=4, batch=256, steps=3000, eval_every=200),
}
_MNIST1D_LARGE_SAMPLES = {"tiny": 2000, "small": 20000, "base": 20000, "large": 40000}
_MNIST1D_TARGETS = {"cnn": 0.9, "mlp": 0.6}


def _mnist1d(model: str, norm: bool, large: bool, published: bool = False):
    def build(scale: str, cache_dir) -> Task:
        from ksbopt.bench import data

        s = dict(_MNIST1D_SCALES[scale])
        if published:  # the MNIST-1D paper's setting: all 4000 training examples, 6000 steps
            s.update(val_size=0, width=1)
            if scale != "tiny":
                s.update(num_samples=5000, batch=100, steps=6000, eval_every=500)
        if large:
            s["num_samples"] = _MNIST1D_LARGE_SAMPLES[scale]
            s["val_size"] = s["num_samples"] // 10
        split = data.mnist1d(s["num_samples"], val_size=s["val_size"], cache_dir=cache_dir)
        if model == "cnn":
            channels = max(4, round(25 * s["width"]))

            def make(seed):
                from flax import nnx

                from ksbopt.bench.models import CNN1D

                return CNN1D(channels, batchnorm=norm, rngs=nnx.Rngs(seed))

            decls = _cnn_scale_decls(3) if norm else _rescale_chain(["conv1", "conv2", "conv3"])
            cfg = {"channels": channels}
        else:
            hidden = max(8, round(100 * s["width"]))

            def make(seed):
                from flax import nnx

                from ksbopt.bench.models import MLP

                return MLP(40, hidden, 2, layernorm=norm, rngs=nnx.Rngs(seed))

            if norm:
                decls = [
                    SymDecl("scale", ([f"fc{i}/kernel", f"fc{i}/bias"],), {"axis": None}, f"fc{i}")
                    for i in (1, 2)
                ]
            else:
                decls = _rescale_chain(["fc1", "fc2", "head"])
            cfg = {"hidden": hidden}
        decls = [*decls, _head_translation()]
        name = _mnist1d_name(model, norm, large) + ("_published" if published else "")
        return Task(
            name=name,
            description=TASKS[name].description,
            metric="accuracy",
            higher_is_better=True,
            target=_MNIST1D_TARGETS[model],
            steps=s["steps"],
            batch_size=s["batch"],
            eval_every=s["eval_every"],
            make_model=make,
            arrays=_classif_arrays(split),
            kind="classification",
            decls=decls,
            config={**cfg, "scale": scale, **s},
            data_info=split.info,
            path_input_shape=None if norm else (1, 40),
        )

    return build


def _mnist1d_name(model, norm, large):
    suffix = {
        ("cnn", True): "cnn_bn",
        ("cnn", False): "cnn",
        ("mlp", True): "mlp_ln",
        ("mlp", False): "mlp",
    }[(model, norm)]
    return f"mnist1d_{'large_' if large else ''}{suffix}"


_DIGITS_SCALES = {
    "tiny": dict(c1=4, c2=8, batch=32, steps=30, eval_every=10),
    "small": dict(c1=16, c2=32, batch=64, steps=300, eval_every=50),
    "base": dict(c1=16, c2=32, batch=64, steps=2000, eval_every=100),
    "large": dict(c1=64, c2=128, batch=256, steps=2000, eval_every=200),
}


def _digits(norm: bool):
    def build(scale: str, cache_dir) -> Task:
        from ksbopt.bench import data

        s = _DIGITS_SCALES[scale]
        split = data.digits()

        def make(seed):
            from flax import nnx

            from ksbopt.bench.models import DigitsCNN

            return DigitsCNN(s["c1"], s["c2"], batchnorm=norm, rngs=nnx.Rngs(seed))

        decls = _cnn_scale_decls(2) if norm else []
        if not norm:
            decls = _rescale_chain(["conv1", "conv2"])
        name = "digits_cnn_bn" if norm else "digits_cnn"
        return Task(
            name=name,
            description=TASKS[name].description,
            metric="accuracy",
            higher_is_better=True,
            target=0.97,
            steps=s["steps"],
            batch_size=s["batch"],
            eval_every=s["eval_every"],
            make_model=make,
            arrays=_classif_arrays(split),
            kind="classification",
            decls=[*decls, _head_translation()],
            config={"scale": scale, **s},
            data_info=split.info,
            path_input_shape=None if norm else (1, 8, 8, 1),
        )

    return build


# The headline MNIST-1D tasks: a large generated set with harder noise (data.MNIST1D_HARD),
# 40000 training, 4000 validation and 8000 test examples (sampling error of an accuracy near 0.9:
# sqrt(0.9 * 0.1 / 8000) = 0.34 points), evaluated every 2% of the run.
_HEADLINE_DATA = dict(num_samples=55000, val_size=4000, test_size=8000)
_MNIST1D_HEADLINE_SIZES = {
    "tiny": dict(
        num_samples=1500, val_size=200, test_size=200, widths=(4, 8), blocks=1, mlp_width=16,
        mlp_depth=3, batch=32, steps=20, eval_every=10,
    ),
    "small": dict(
        **_HEADLINE_DATA, widths=(32, 64, 128), blocks=2, mlp_width=256, mlp_depth=5,
        batch=128, steps=2000, eval_every=40,
    ),
    "large": dict(
        num_samples=110000, val_size=8000, test_size=16000, widths=(256, 512, 1024), blocks=2,
        mlp_width=2048, mlp_depth=5, batch=256, steps=2000, eval_every=40,
    ),
}  # fmt: skip
_MNIST1D_HEADLINE_SIZES["base"] = _MNIST1D_HEADLINE_SIZES["small"]
# Steps-to-target thresholds: a little below what a tuned optimizer reaches at the CPU scale.
_HEADLINE_TARGETS = {"resnet": 0.85, "mlp": 0.65}


def _mnist1d_headline(name: str, model: str, norm: bool):
    """A ResNet (``model="resnet"``) or deep MLP (``"mlp"``) on the harder, larger MNIST-1D."""

    def build(scale: str, cache_dir) -> Task:
        from ksbopt.bench import data

        s = _MNIST1D_HEADLINE_SIZES[scale]
        split = data.mnist1d(
            s["num_samples"],
            val_size=s["val_size"],
            test_size=s["test_size"],
            noise=data.MNIST1D_HARD,
            cache_dir=cache_dir,
        )
        if model == "resnet":
            widths, blocks = tuple(s["widths"]), s["blocks"]

            def make(seed):
                from flax import nnx

                from ksbopt.bench.models import ResNet1D

                return ResNet1D(widths, blocks=blocks, batchnorm=norm, rngs=nnx.Rngs(seed))

            convs = [f"s{i}b{j}" for i in range(len(widths)) for j in range(blocks)]
            if norm:
                decls = [
                    SymDecl("scale", (f"{c}/kernel",), {"axis": -1}, c)
                    for c in ["stem", *(f"{b}{ab}" for b in convs for ab in "ab")]
                ]
            else:  # the hidden channels of each residual branch
                decls = [
                    SymDecl(
                        "rescale",
                        (),
                        {"incoming": [f"{b}a/kernel", f"{b}a/bias"], "outgoing": f"{b}b/kernel"},
                        f"{b}a>{b}b",
                    )
                    for b in convs
                ]
            cfg = {"widths": widths, "blocks": blocks}
            path_shape = None  # average pooling: the path norm is not the net on squared weights
        else:
            width, depth = s["mlp_width"], s["mlp_depth"]

            def make(seed):
                from flax import nnx

                from ksbopt.bench.models import MLP

                return MLP(40, width, depth, layernorm=norm, rngs=nnx.Rngs(seed))

            layers = [f"fc{i}" for i in range(1, depth + 1)]
            if norm:  # LayerNorm after each hidden layer: the whole layer is one scale group
                decls = [
                    SymDecl("scale", ([f"{a}/kernel", f"{a}/bias"],), {"axis": None}, a)
                    for a in layers
                ]
            else:
                decls = _rescale_chain([*layers, "head"])
            cfg = {"width": width, "depth": depth}
            path_shape = None if norm else (1, 40)
        return Task(
            name=name,
            description=TASKS[name].description,
            metric="accuracy",
            higher_is_better=True,
            target=_HEADLINE_TARGETS[model],
            steps=s["steps"],
            batch_size=s["batch"],
            eval_every=s["eval_every"],
            make_model=make,
            arrays=_classif_arrays(split),
            kind="classification",
            decls=[*decls, _head_translation()],
            config={**cfg, "scale": scale, **s},
            data_info=split.info,
            path_input_shape=path_shape,
        )

    return build


_LM_SCALES = {
    "tiny": dict(
        d=32,
        layers=1,
        heads=2,
        seq_len=32,
        batch=8,
        steps=20,
        eval_every=10,
        eval_windows=16,
        max_train_bytes=200_000,
        target=6.0,
    ),
    # CPU sizes are small on purpose: a step costs about 23 us per token on 2 cores (d=32).
    "small": dict(
        d=32,
        layers=2,
        heads=4,
        seq_len=32,
        batch=8,
        steps=200,
        eval_every=50,
        eval_windows=64,
        max_train_bytes=None,
        target=4.0,
    ),
    "base": dict(
        d=32,
        layers=2,
        heads=4,
        seq_len=64,
        batch=16,
        steps=1000,
        eval_every=100,
        eval_windows=256,
        max_train_bytes=None,
        target=3.2,
    ),
    "large": dict(
        d=512,
        layers=8,
        heads=8,
        seq_len=256,
        batch=64,
        steps=800,
        eval_every=100,
        eval_windows=512,
        max_train_bytes=None,
        target=2.5,
    ),
}


def _eval_windows(b: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """``count`` evenly spaced non-overlapping windows of ``seq_len + 1`` bytes."""
    n_all = (b.size - 1) // seq_len
    if n_all < 1:
        raise ValueError(f"held-out split of {b.size} bytes is shorter than {seq_len=}.")
    starts = np.linspace(0, n_all - 1, min(count, n_all)).round().astype(np.int64) * seq_len
    return np.stack([b[s : s + seq_len + 1] for s in starts])


# The headline language model: context 128 and 2000 steps on CPU, ~25M parameters on a GPU.
_LM_LONG = {
    "tiny": _LM_SCALES["tiny"],
    "small": dict(
        d=64,
        layers=2,
        heads=4,
        seq_len=128,
        batch=8,
        steps=2000,
        eval_every=40,
        eval_windows=256,
        max_train_bytes=None,
        target=2.6,  # AdamW at lr 3e-3 ends at 2.42 bits per byte
    ),
    "large": dict(
        d=512,
        layers=8,
        heads=8,
        seq_len=256,
        batch=64,
        steps=2000,
        eval_every=40,
        eval_windows=2048,
        max_train_bytes=None,
        target=2.0,
    ),
}
_LM_LONG["base"] = _LM_LONG["small"]


def _lm(name: str, qk_norm: bool, sizes: Mapping[str, Mapping[str, Any]]):
    def build(scale: str, cache_dir) -> Task:
        from ksbopt.bench import data

        s = sizes[scale]
        split = data.stdlib_bytes(max_train_bytes=s["max_train_bytes"])
        arrays = {"train_bytes": split.train["bytes"]}
        for sp in ("val", "test"):
            arrays[f"{sp}_windows"] = _eval_windows(
                getattr(split, sp)["bytes"], s["seq_len"], s["eval_windows"]
            )

        def make(seed):
            from flax import nnx

            from ksbopt.bench.models import TransformerLM

            return TransformerLM(
                d=s["d"],
                layers=s["layers"],
                heads=s["heads"],
                seq_len=s["seq_len"],
                qk_norm=qk_norm,
                rngs=nnx.Rngs(seed),
            )

        decls = [_head_translation()]
        for i in range(s["layers"]):
            p = f"blocks/{i}/attn"
            kb = {n: [f"{p}/{n}/kernel", f"{p}/{n}/bias"] for n in ("query", "key", "value")}
            if qk_norm:  # LayerNorm over the head dim: one scale group per head (axis -2)
                decls += [
                    SymDecl("scale", (kb[n],), {"axis": -2}, f"b{i}.{n}") for n in ("query", "key")
                ]
            else:  # q k^T is unchanged by W_q -> W_q G, W_k -> W_k G^-T, per head
                decls.append(
                    SymDecl("linear", (kb["query"], kb["key"]), {}, f"b{i}.qk", "Linear.query_key")
                )
            decls.append(
                SymDecl(
                    "linear",
                    (kb["value"], f"{p}/out/kernel"),
                    {},
                    f"b{i}.vo",
                    "Linear.value_output",
                )
            )
        return Task(
            name=name,
            description=TASKS[name].description,
            metric="bits_per_byte",
            higher_is_better=False,
            target=s["target"],
            steps=s["steps"],
            batch_size=s["batch"],
            eval_every=s["eval_every"],
            make_model=make,
            arrays=arrays,
            kind="lm",
            decls=decls,
            config={"scale": scale, **s},
            data_info=split.info,
            seq_len=s["seq_len"],
            eval_batch=64,
        )

    return build


_TEACHER_SCALES = {
    "tiny": dict(width=16, depth=3, n_train=256, batch=32, steps=30, eval_every=10),
    "small": dict(width=64, depth=4, n_train=4096, batch=128, steps=800, eval_every=100),
    "base": dict(width=64, depth=4, n_train=4096, batch=128, steps=3000, eval_every=200),
    "large": dict(width=512, depth=6, n_train=65536, batch=1024, steps=3000, eval_every=200),
}


def _teacher(relu: bool):
    def build(scale: str, cache_dir) -> Task:
        from ksbopt.bench import data

        s = _TEACHER_SCALES[scale]
        kind = "relu" if relu else "linear"
        split = data.teacher_student(
            kind=kind, depth=s["depth"], width=max(8, s["width"] // 2), n_train=s["n_train"]
        )
        arrays = _classif_arrays(split)
        target_var = float(np.var(split.val["y"]))

        def make(seed):
            from flax import nnx

            from ksbopt.bench.models import DeepMLP

            return DeepMLP(32, 8, s["width"], s["depth"], relu=relu, rngs=nnx.Rngs(seed))

        names = [f"fc{i}" for i in range(1, s["depth"] + 1)]
        if relu:
            decls = _rescale_chain(names)
        else:
            decls = [
                SymDecl("linear", (f"{a}/kernel", f"{b}/kernel"), {}, f"{a}>{b}")
                for a, b in itertools.pairwise(names)
            ]
        name = f"teacher_{kind}"
        return Task(
            name=name,
            description=TASKS[name].description,
            metric="nmse",
            higher_is_better=False,
            target=0.2 if relu else 0.01,
            steps=s["steps"],
            batch_size=s["batch"],
            eval_every=s["eval_every"],
            make_model=make,
            arrays=arrays,
            kind="regression",
            decls=decls,
            config={"scale": scale, "target_var": target_var, **s},
            data_info=split.info,
            path_input_shape=(1, 32),
        )

    return build


_BASE = ("flax",)
_MNIST = (*_BASE, "mnist1d")
_SK = (*_BASE, "sklearn")
_N, _R, _T, _L = "scale", "rescale", "translation", "linear"
TASKS: dict[str, TaskSpec] = {}


def _add(name, description, requires, build, kinds, features=()):
    TASKS[name] = TaskSpec(name, description, requires, build, kinds, features)


_STD = "MNIST-1D, standard 4000/1000 split"
_BIG = "larger generated MNIST-1D set"
_U, _P = ("units",), ("units", "path_norm")  # features with / without normalisation
_add(
    "mnist1d_cnn_bn",
    f"1-D CNN with BatchNorm; {_STD}",
    _MNIST,
    _mnist1d("cnn", True, False),
    (_N, _T),
    _U,
)
_add(
    "mnist1d_cnn",
    f"1-D CNN, no normalisation; {_STD}",
    _MNIST,
    _mnist1d("cnn", False, False),
    (_R, _T),
    _P,
)
_add(
    "mnist1d_mlp_ln",
    f"MLP with LayerNorm; {_STD}",
    _MNIST,
    _mnist1d("mlp", True, False),
    (_N, _T),
    _U,
)
_add(
    "mnist1d_mlp",
    f"MLP, no normalisation; {_STD}",
    _MNIST,
    _mnist1d("mlp", False, False),
    (_R, _T),
    _P,
)
_add(
    "mnist1d_large_cnn_bn",
    f"1-D CNN with BatchNorm; {_BIG}",
    _MNIST,
    _mnist1d("cnn", True, True),
    (_N, _T),
    _U,
)
_add(
    "mnist1d_large_cnn",
    f"1-D CNN, no normalisation; {_BIG}",
    _MNIST,
    _mnist1d("cnn", False, True),
    (_R, _T),
    _P,
)
for _model in ("mlp", "cnn"):
    _add(
        f"mnist1d_{_model}_published",
        f"MNIST-1D published {_model.upper()} baseline: all 4000 training examples, 6000 steps, "
        "batch 100 (validation = test: no tuning)",
        _MNIST,
        _mnist1d(_model, False, False, published=True),
        (_R, _T),
        _P,
    )
_add(
    "digits_cnn_bn",
    "small 2-D CNN with BatchNorm; sklearn digits",
    _SK,
    _digits(True),
    (_N, _T),
    _U,
)
_add(
    "digits_cnn",
    "small 2-D CNN, no normalisation; sklearn digits",
    _SK,
    _digits(False),
    (_R, _T),
    _P,
)
_add(
    "lm_stdlib",
    "pre-LN byte Transformer; stdlib source; bits/byte",
    _BASE,
    _lm("lm_stdlib", False, _LM_SCALES),
    (_L, _T),
)
_add(
    "lm_stdlib_qknorm",
    "pre-LN byte Transformer with QK-norm; stdlib source; bits/byte",
    _BASE,
    _lm("lm_stdlib_qknorm", True, _LM_SCALES),
    (_N, _L, _T),
    _U,
)
_HARD = "harder MNIST-1D (40k/4k/8k train/val/test on CPU)"
_add(
    "mnist1d_resnet_bn",
    f"ResNet-1D (3 stages x 2 basic blocks) with BatchNorm; {_HARD}",
    _MNIST,
    _mnist1d_headline("mnist1d_resnet_bn", "resnet", True),
    (_N, _T),
    _U,
)
_add(
    "mnist1d_resnet",
    f"ResNet-1D (3 stages x 2 basic blocks), no normalisation; {_HARD}",
    _MNIST,
    _mnist1d_headline("mnist1d_resnet", "resnet", False),
    (_R, _T),
    _U,
)
_add(
    "mnist1d_deep_mlp_ln",
    f"deep MLP (5 hidden layers) with LayerNorm; {_HARD}",
    _MNIST,
    _mnist1d_headline("mnist1d_deep_mlp_ln", "mlp", True),
    (_N, _T),
    _U,
)
_add(
    "mnist1d_deep_mlp",
    f"deep ReLU MLP (5 hidden layers), no normalisation; {_HARD}",
    _MNIST,
    _mnist1d_headline("mnist1d_deep_mlp", "mlp", False),
    (_R, _T),
    _P,
)
_add(
    "lm_stdlib_long",
    "pre-LN byte Transformer with QK-norm, context >= 128; stdlib source split by file; bits/byte",
    _BASE,
    _lm("lm_stdlib_long", True, _LM_LONG),
    (_N, _L, _T),
    _U,
)
_add(
    "teacher_relu",
    "deep ReLU MLP, teacher-student regression; test NMSE",
    _BASE,
    _teacher(True),
    (_R,),
    _P,
)
_add(
    "teacher_linear",
    "deep linear net, teacher-student regression; test NMSE",
    _BASE,
    _teacher(False),
    (_L,),
    _P,
)


# The tasks the report leads with (sizes above: every one at least 100k parameters and 2000
# steps at the CPU scale), and the tasks of the gpu suite (run at the ``large`` scale).
HEADLINE_TASKS = (
    "mnist1d_resnet_bn",
    "mnist1d_resnet",
    "mnist1d_deep_mlp_ln",
    "mnist1d_deep_mlp",
    "lm_stdlib_long",
)
GPU_TASKS = ("mnist1d_resnet_bn", "mnist1d_resnet", "lm_stdlib_long")


def task_names() -> list[str]:
    return list(TASKS)


def build_task(name: str, scale: str, cache_dir=None) -> Task:
    """Builds task ``name`` at ``scale`` (data loaded here, model made per seed later)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    if scale not in SCALES:
        raise ValueError(f"{scale=} must be one of {SCALES}")
    return TASKS[name].build(scale, cache_dir)
