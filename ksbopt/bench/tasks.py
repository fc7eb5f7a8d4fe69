"""The built-in benchmark tasks: their sizes per scale, data, models and symmetries.

A task is looked up by name in :data:`TASKS`, which maps to a :class:`TaskSpec` (cheap: no
Flax import, no data) whose ``build(scale)`` makes the :class:`Task` (both defined in
:mod:`ksbopt.bench.task_types`). Scales (:data:`SCALES`):

- ``tiny``: a few seconds on CPU, for tests;
- ``small``: the CPU size of the quick and full suites (for the headline tasks, the size at
  which optimizers differ: at least 100k parameters, 2000 steps, thousands of held-out
  examples);
- ``base``: the published sizes of the reproductions (for the headline tasks, equal to
  ``small``);
- ``large``: the gpu suite's accelerator size (at least 10M parameters).

Each family of tasks has one table of sizes per scale (``_MNIST1D_HEADLINE_SIZES``,
``_LM_LONG``, ...): that table alone decides a task's model, data, steps, batch and evaluation
interval. The data come from :mod:`ksbopt.bench.data`, the models from
:mod:`ksbopt.bench.models`.
:data:`HEADLINE_TASKS` names the tasks whose results the report leads with; the others are
small smoke and reproduction tasks. :data:`GPU_TASKS` names the tasks of the gpu suite.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ksbopt.bench.task_types import Sampler, SymDecl, Task, TaskSpec, unit_decls

__all__ = [
    "GPU_TASKS",
    "HEADLINE_TASKS",
    "SCALES",
    "TASKS",
    "Sampler",
    "SymDecl",
    "Task",
    "TaskSpec",
    "build_task",
    "task_names",
    "unit_decls",
]

SCALES = ("tiny", "small", "base", "large")


# ---- the parts every builder shares ----------------------------------------------------------


def _model(name: str, *args, **kwargs) -> Callable[[Any], Any]:
    """``seed -> ksbopt.bench.models.<name>(*args, **kwargs, rngs=nnx.Rngs(seed))`` (a seed
    or a PRNG key)."""

    def make(seed):
        from flax import nnx

        from ksbopt.bench import models

        return getattr(models, name)(*args, **kwargs, rngs=nnx.Rngs(seed))

    return make


def _task(name: str, s: Mapping[str, Any], **fields) -> Task:
    """Task ``name`` with its registered description and the steps, batch and evaluation
    interval of its row ``s`` of a size table."""
    return Task(
        name=name,
        description=TASKS[name].description,
        steps=s["steps"],
        batch_size=s["batch"],
        eval_every=s["eval_every"],
        **fields,
    )


def _classification(name, s, split, make, decls, *, target, config, path_input_shape) -> Task:
    """An accuracy task on ``split``'s (x, y) arrays; the head's translation symmetry is
    declared after ``decls``."""
    return _task(
        name,
        s,
        metric="accuracy",
        higher_is_better=True,
        target=target,
        make_model=make,
        arrays=_classif_arrays(split),
        kind="classification",
        decls=[*decls, _head_translation()],
        config=config,
        data_info=split.info,
        path_input_shape=path_input_shape,
    )


def _classif_arrays(split) -> dict:
    out = {}
    for s in ("train", "val", "test"):
        d = getattr(split, s)
        out[f"{s}_x"], out[f"{s}_y"] = d["x"], d["y"]
    return out


# ---- symmetry declarations (Flax layout: the output unit is the last axis) ---------------------


def _filter_scales(convs: Sequence[str]) -> list[SymDecl]:
    """Each output filter of each conv (normalisation after it) is a scale group."""
    return [SymDecl("scale", (f"{c}/kernel",), {"axis": -1}, c) for c in convs]


def _layer_scales(layers: Sequence[str]) -> list[SymDecl]:
    """Each whole layer, kernel and bias (LayerNorm after it), is one scale group."""
    return [SymDecl("scale", ([f"{a}/kernel", f"{a}/bias"],), {"axis": None}, a) for a in layers]


def _head_translation() -> SymDecl:
    return SymDecl("translation", (["head/kernel", "head/bias"],), {"axis": -1}, "head")


def _rescale_chain(names: Sequence[str]) -> list[SymDecl]:
    """ReLU rescaling between consecutive layers: a hidden unit's incoming weights and bias
    against its outgoing weights."""
    out = []
    for a, b in itertools.pairwise(names):
        inc = [f"{a}/kernel", f"{a}/bias"]
        out.append(SymDecl("rescale", (), {"incoming": inc, "outgoing": f"{b}/kernel"}, f"{a}>{b}"))
    return out


def _attention_decls(layers: int, qk_norm: bool) -> list[SymDecl]:
    """Per attention block: the query-key symmetry and the value-output one."""
    decls = []
    for i in range(layers):
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
    return decls


# ---- MNIST-1D and digits: classification ------------------------------------------------------


_MNIST1D_SCALES = {
    # num_samples, val_size, channels/hidden multiplier, batch, steps, eval_every
    "tiny": dict(num_samples=1000, val_size=100, width=0.32, batch=32, steps=30, eval_every=10),
    "small": dict(num_samples=5000, val_size=500, width=1, batch=100, steps=800, eval_every=100),
    "base": dict(num_samples=5000, val_size=500, width=1, batch=100, steps=4000, eval_every=200),
    "large": dict(num_samples=5000, val_size=500, width=4, batch=256, steps=3000, eval_every=200),
}
_MNIST1D_LARGE_SAMPLES = {"tiny": 2000, "small": 20000, "base": 20000, "large": 40000}
_MNIST1D_TARGETS = {"cnn": 0.9, "mlp": 0.6}


def _mnist1d_sizes(scale: str, large: bool, published: bool) -> dict:
    """The row of :data:`_MNIST1D_SCALES`, for the larger set or the published setting."""
    s = dict(_MNIST1D_SCALES[scale])
    if published:  # the MNIST-1D paper's setting: all 4000 training examples, 6000 steps
        s.update(val_size=0, width=1)
        if scale != "tiny":
            s.update(num_samples=5000, batch=100, steps=6000, eval_every=500)
    if large:
        s["num_samples"] = _MNIST1D_LARGE_SAMPLES[scale]
        s["val_size"] = s["num_samples"] // 10
    return s


def _mnist1d(model: str, norm: bool, large: bool, published: bool = False):
    def build(scale: str, cache_dir) -> Task:
        from ksbopt.bench import data

        s = _mnist1d_sizes(scale, large, published)
        split = data.mnist1d(s["num_samples"], val_size=s["val_size"], cache_dir=cache_dir)
        if model == "cnn":
            channels = max(4, round(25 * s["width"]))
            make = _model("CNN1D", channels, batchnorm=norm)
            convs = ["conv1", "conv2", "conv3"]
            decls = _filter_scales(convs) if norm else _rescale_chain(convs)
            cfg = {"channels": channels}
        else:
            hidden = max(8, round(100 * s["width"]))
            make = _model("MLP", 40, hidden, 2, layernorm=norm)
            decls = (
                _layer_scales(["fc1", "fc2"]) if norm else _rescale_chain(["fc1", "fc2", "head"])
            )
            cfg = {"hidden": hidden}
        name = _mnist1d_name(model, norm, large) + ("_published" if published else "")
        return _classification(
            name,
            s,
            split,
            make,
            decls,
            target=_MNIST1D_TARGETS[model],
            config={**cfg, "scale": scale, **s},
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
        convs = ["conv1", "conv2"]
        return _classification(
            "digits_cnn_bn" if norm else "digits_cnn",
            s,
            split,
            _model("DigitsCNN", s["c1"], s["c2"], batchnorm=norm),
            _filter_scales(convs) if norm else _rescale_chain(convs),
            target=0.97,
            config={"scale": scale, **s},
            path_input_shape=None if norm else (1, 8, 8, 1),
        )

    return build


# The headline MNIST-1D tasks: a large generated set with harder noise (data.MNIST1D_HARD),
# 40000 training and 4000 validation examples, evaluated every 2% of the run. The ResNets test on
# 8000 examples (binomial sampling error at their accuracies in the full suite, 0.75-0.93: at
# most 0.49 points); the MLPs, less accurate (0.65-0.80), on the whole generated test part,
# 11000 examples (at most sqrt(0.5 * 0.5 / 11000) = 0.48 points at any accuracy; 8000 gave 0.53).
_HEADLINE_DATA = dict(num_samples=55000, val_size=4000, test_size=8000, mlp_test_size=11000)
_MNIST1D_HEADLINE_SIZES = {
    "tiny": dict(
        num_samples=1500, val_size=200, test_size=200, mlp_test_size=300, widths=(4, 8),
        blocks=1, mlp_width=16, mlp_depth=3, batch=32, steps=20, eval_every=10,
    ),
    "small": dict(
        **_HEADLINE_DATA, widths=(32, 64, 128), blocks=2, mlp_width=256, mlp_depth=5,
        batch=128, steps=2000, eval_every=40,
    ),
    "large": dict(
        num_samples=110000, val_size=8000, test_size=16000, mlp_test_size=22000,
        widths=(256, 512, 1024), blocks=2, mlp_width=2048, mlp_depth=5, batch=256, steps=2000,
        eval_every=40,
    ),
}  # fmt: skip
_MNIST1D_HEADLINE_SIZES["base"] = _MNIST1D_HEADLINE_SIZES["small"]
# Steps-to-target thresholds: a little below what a tuned optimizer reaches at the CPU scale.
_HEADLINE_TARGETS = {"resnet": 0.85, "mlp": 0.65}


def _mnist1d_headline(name: str, model: str, norm: bool):
    """A ResNet (``model="resnet"``) or deep MLP (``"mlp"``) on the harder, larger MNIST-1D."""

    def build(scale: str, cache_dir) -> Task:
        from ksbopt.bench import data

        s = dict(_MNIST1D_HEADLINE_SIZES[scale])
        mlp_test_size = s.pop("mlp_test_size")
        if model == "mlp":
            s["test_size"] = mlp_test_size
        split = data.mnist1d(
            s["num_samples"],
            val_size=s["val_size"],
            test_size=s["test_size"],
            noise=data.MNIST1D_HARD,
            cache_dir=cache_dir,
        )
        if model == "resnet":
            widths, blocks = tuple(s["widths"]), s["blocks"]
            make = _model("ResNet1D", widths, blocks=blocks, batchnorm=norm)
            convs = [f"s{i}b{j}" for i in range(len(widths)) for j in range(blocks)]
            if norm:
                decls = _filter_scales(["stem", *(f"{b}{ab}" for b in convs for ab in "ab")])
            else:  # the hidden channels of each residual branch
                decls = [d for b in convs for d in _rescale_chain([f"{b}a", f"{b}b"])]
            cfg = {"widths": widths, "blocks": blocks}
            path_shape = None  # average pooling: the path norm is not the net on squared weights
        else:
            width, depth = s["mlp_width"], s["mlp_depth"]
            make = _model("MLP", 40, width, depth, layernorm=norm)
            layers = [f"fc{i}" for i in range(1, depth + 1)]
            # LayerNorm after each hidden layer: the whole layer is one scale group
            decls = _layer_scales(layers) if norm else _rescale_chain([*layers, "head"])
            cfg = {"width": width, "depth": depth}
            path_shape = None if norm else (1, 40)
        return _classification(
            name,
            s,
            split,
            make,
            decls,
            target=_HEADLINE_TARGETS[model],
            config={**cfg, "scale": scale, **s},
            path_input_shape=path_shape,
        )

    return build


# ---- byte-level language model ----------------------------------------------------------------


_LM_SCALES = {
    "tiny": dict(
        d=32, layers=1, heads=2, seq_len=32, batch=8, steps=20, eval_every=10, eval_windows=16,
        max_train_bytes=200_000, target=6.0,
    ),
    # CPU sizes are small on purpose: a step costs about 23 us per token on 2 cores (d=32).
    "small": dict(
        d=32, layers=2, heads=4, seq_len=32, batch=8, steps=200, eval_every=50, eval_windows=64,
        max_train_bytes=None, target=4.0,
    ),
    "base": dict(
        d=32, layers=2, heads=4, seq_len=64, batch=16, steps=1000, eval_every=100,
        eval_windows=256, max_train_bytes=None, target=3.2,
    ),
    "large": dict(
        d=512, layers=8, heads=8, seq_len=256, batch=64, steps=800, eval_every=100,
        eval_windows=512, max_train_bytes=None, target=2.5,
    ),
}  # fmt: skip


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
        d=64, layers=2, heads=4, seq_len=128, batch=8, steps=2000, eval_every=40,
        eval_windows=256, max_train_bytes=None,
        target=2.6,  # AdamW at lr 3e-3 ends at 2.42 bits per byte
    ),
    "large": dict(
        d=512, layers=8, heads=8, seq_len=256, batch=64, steps=2000, eval_every=40,
        eval_windows=2048, max_train_bytes=None, target=2.0,
    ),
}  # fmt: skip
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
        make = _model(
            "TransformerLM",
            d=s["d"],
            layers=s["layers"],
            heads=s["heads"],
            seq_len=s["seq_len"],
            qk_norm=qk_norm,
        )
        return _task(
            name,
            s,
            metric="bits_per_byte",
            higher_is_better=False,
            target=s["target"],
            make_model=make,
            arrays=arrays,
            kind="lm",
            decls=[_head_translation(), *_attention_decls(s["layers"], qk_norm)],
            config={"scale": scale, **s},
            data_info=split.info,
            seq_len=s["seq_len"],
            eval_batch=64,
        )

    return build


# ---- teacher-student regression ---------------------------------------------------------------


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
        target_var = float(np.var(split.val["y"]))
        names = [f"fc{i}" for i in range(1, s["depth"] + 1)]
        if relu:
            decls = _rescale_chain(names)
        else:
            decls = [
                SymDecl("linear", (f"{a}/kernel", f"{b}/kernel"), {}, f"{a}>{b}")
                for a, b in itertools.pairwise(names)
            ]
        return _task(
            f"teacher_{kind}",
            s,
            metric="nmse",
            higher_is_better=False,
            target=0.2 if relu else 0.01,
            make_model=_model("DeepMLP", 32, 8, s["width"], s["depth"], relu=relu),
            arrays=_classif_arrays(split),
            kind="regression",
            decls=decls,
            config={"scale": scale, "target_var": target_var, **s},
            data_info=split.info,
            path_input_shape=(1, 32),
        )

    return build


# ---- the catalogue ----------------------------------------------------------------------------

_BASE = ("flax",)
_MNIST = (*_BASE, "mnist1d")
_SK = (*_BASE, "sklearn")
_N, _R, _T, _L = "scale", "rescale", "translation", "linear"
_U, _P = ("units",), ("units", "path_norm")  # features with / without normalisation
_STD = "MNIST-1D, standard 4000/1000 split"
_BIG = "larger generated MNIST-1D set"
_HARD = "harder MNIST-1D (40k/4k/8k train/val/test on CPU)"
_HARD_MLP = "harder MNIST-1D (40k/4k/11k train/val/test on CPU)"
_RESNET = "ResNet-1D (3 stages x 2 basic blocks)"
_LM = "pre-LN byte Transformer"

# name, description, packages it needs, builder, symmetry kinds, features (see TaskSpec)
# fmt: off
_CATALOGUE = (
    ("mnist1d_cnn_bn", f"1-D CNN with BatchNorm; {_STD}",
     _MNIST, _mnist1d("cnn", True, False), (_N, _T), _U),
    ("mnist1d_cnn", f"1-D CNN, no normalisation; {_STD}",
     _MNIST, _mnist1d("cnn", False, False), (_R, _T), _P),
    ("mnist1d_mlp_ln", f"MLP with LayerNorm; {_STD}",
     _MNIST, _mnist1d("mlp", True, False), (_N, _T), _U),
    ("mnist1d_mlp", f"MLP, no normalisation; {_STD}",
     _MNIST, _mnist1d("mlp", False, False), (_R, _T), _P),
    ("mnist1d_large_cnn_bn", f"1-D CNN with BatchNorm; {_BIG}",
     _MNIST, _mnist1d("cnn", True, True), (_N, _T), _U),
    ("mnist1d_large_cnn", f"1-D CNN, no normalisation; {_BIG}",
     _MNIST, _mnist1d("cnn", False, True), (_R, _T), _P),
    *(
        (f"mnist1d_{m}_published",
         f"MNIST-1D published {m.upper()} baseline: all 4000 training examples, 6000 steps, "
         "batch 100 (validation = test: no tuning)",
         _MNIST, _mnist1d(m, False, False, published=True), (_R, _T), _P)
        for m in ("mlp", "cnn")
    ),
    ("digits_cnn_bn", "small 2-D CNN with BatchNorm; sklearn digits",
     _SK, _digits(True), (_N, _T), _U),
    ("digits_cnn", "small 2-D CNN, no normalisation; sklearn digits",
     _SK, _digits(False), (_R, _T), _P),
    ("lm_stdlib", f"{_LM}; stdlib source; bits/byte",
     _BASE, _lm("lm_stdlib", False, _LM_SCALES), (_L, _T), ()),
    ("lm_stdlib_qknorm", f"{_LM} with QK-norm; stdlib source; bits/byte",
     _BASE, _lm("lm_stdlib_qknorm", True, _LM_SCALES), (_N, _L, _T), _U),
    ("mnist1d_resnet_bn", f"{_RESNET} with BatchNorm; {_HARD}",
     _MNIST, _mnist1d_headline("mnist1d_resnet_bn", "resnet", True), (_N, _T), _U),
    ("mnist1d_resnet", f"{_RESNET}, no normalisation; {_HARD}",
     _MNIST, _mnist1d_headline("mnist1d_resnet", "resnet", False), (_R, _T), _U),
    ("mnist1d_deep_mlp_ln", f"deep MLP (5 hidden layers) with LayerNorm; {_HARD_MLP}",
     _MNIST, _mnist1d_headline("mnist1d_deep_mlp_ln", "mlp", True), (_N, _T), _U),
    ("mnist1d_deep_mlp", f"deep ReLU MLP (5 hidden layers), no normalisation; {_HARD_MLP}",
     _MNIST, _mnist1d_headline("mnist1d_deep_mlp", "mlp", False), (_R, _T), _P),
    ("lm_stdlib_long",
     f"{_LM} with QK-norm, context >= 128; stdlib source split by file; bits/byte",
     _BASE, _lm("lm_stdlib_long", True, _LM_LONG), (_N, _L, _T), _U),
    ("teacher_relu", "deep ReLU MLP, teacher-student regression; test NMSE",
     _BASE, _teacher(True), (_R,), _P),
    ("teacher_linear", "deep linear net, teacher-student regression; test NMSE",
     _BASE, _teacher(False), (_L,), _P),
)
# fmt: on
TASKS: dict[str, TaskSpec] = {name: TaskSpec(name, *rest) for name, *rest in _CATALOGUE}


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
