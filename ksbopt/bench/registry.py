"""The one optimizer registry of the benchmarks.

An entry maps a name to ``factory(learning_rate, task, **hparams) -> optax transformation``,
its learning-rate grid (log-spaced, at least five points, the same size for every optimizer:
the same tuning budget), the smaller grid of the quick suite, the other hyperparameters at their
published defaults, the ``ksbopt`` features it needs, what the task must offer for the entry to
apply (``symmetry``: any of these symmetry kinds; ``task_features``: all of these, e.g.
``"path_norm"``) and the extra arguments its ``update`` needs (``extra_args``, supplied by the
runner: ``grad`` the loss gradient, ``batch`` the minibatch, ``value_fn`` the loss
``value_fn(params, batch, model_state)``, ``model_state`` the model's non-parameter state).
A task that lacks what an entry needs is reported as "not applicable" for it, never run.

Tuning: ``tune`` names the hyperparameters besides the learning rate that the tuning protocol
tunes (by default ``weight_decay`` wherever an entry has one; the value in ``hparams`` is the
published default the grid is centred on; :func:`make` injects them into the optimizer state
like the learning rate, so a factory must accept them as arrays). ``own_schedule`` marks
entries that bring their own learning-rate schedule (schedule-free AdamW), which must not be
given the warm-up + cosine schedule; ``eval_params(opt_state, params)`` maps the training
iterate to the parameters to evaluate (schedule-free AdamW evaluates its averaged sequence),
``None`` for the others.
``prepare_params(params)`` maps the initial parameters to those training starts from, where
the authors' optimizer changes the model's weights when it is constructed (Nero balances
every kernel, :func:`ksbopt.peers.balance_params`; rotational optimizers centre them,
:func:`ksbopt.peers.center_params`), ``None`` for the others: an optax transformation cannot
change the parameters it is initialised with, so the runner applies it once per run.

Adding an optimizer is one line::

    register("nero", lambda lr, task: ks("peers.nero")(lr), NERO_GRID, needs=("peers.nero",))

An entry whose ``ksbopt`` feature is missing stays listed; looking it up with :func:`get`
raises :class:`FeatureUnavailable` naming the feature (nothing is faked or stubbed).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
import optax.contrib

__all__ = [
    "ADAPTIVE_GRID",
    "EXTRA_ARGS",
    "LARS_GRID",
    "LION_GRID",
    "NERO_GRID",
    "REGISTRY",
    "SGD_GRID",
    "FeatureUnavailable",
    "OptimizerSpec",
    "get",
    "ks",
    "ksbopt_feature",
    "make",
    "names",
    "register",
]


class FeatureUnavailable(ImportError):
    """A registry entry or task needs a ``ksbopt`` feature this installation lacks."""


def ksbopt_feature(name: str):
    """``ksbopt.<name>`` (dotted names allowed, e.g. ``"targets.constant"``), or a clear error."""
    try:
        obj = importlib.import_module("ksbopt")
    except ImportError as e:  # pragma: no cover - the package is installed with the benchmarks
        raise FeatureUnavailable(f"ksbopt is not importable ({e}); install the package.") from e
    for part in name.split("."):
        if not hasattr(obj, part):
            raise FeatureUnavailable(
                f"ksbopt.{name} is not available in this version of ksbopt "
                f"(from {getattr(importlib.import_module('ksbopt'), '__path__', '?')}); "
                "update ksbopt or leave out the optimizers that need it."
            )
        obj = getattr(obj, part)
    return obj


ks = ksbopt_feature


# Log grids in half-decade steps (1, 3, 10, ...), five points each: the same tuning budget.
SGD_GRID = (0.003, 0.01, 0.03, 0.1, 0.3)
ADAPTIVE_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
LARS_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)  # LARS's relative step is lr * trust coefficient 1e-3
NERO_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # Nero's lr is about the angle turned per step
# Lion's sign update has unit size per coordinate: its lr is 3-10x smaller than AdamW's.
LION_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)

# The extra arguments of ``update`` that the runner can supply (see the module docstring).
EXTRA_ARGS = ("grad", "batch", "value_fn", "model_state")

# What a task feature means, for "not applicable" notes.
_FEATURE_TEXT = {
    "units": "hidden units whose norm can be held (normalised groups or ReLU units)",
    "path_norm": "a ReLU or linear network without normalisation (path norm)",
}


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """One registry entry; see the module docstring."""

    name: str
    factory: Callable[..., optax.GradientTransformation]
    lr_grid: tuple[float, ...]
    quick_lrs: tuple[float, ...]
    hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    needs: tuple[str, ...] = ()
    symmetry: str | tuple[str, ...] | None = None
    description: str = ""
    task_features: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    # user entries: {"factory": "module:qualname", "source_sha256": ...} (part of a run's
    # identity, so that a changed factory is re-run; see ksbopt/bench/user.py)
    origin: Mapping[str, Any] | None = None
    tune: tuple[str, ...] = ()  # hyperparameters the tuning protocol tunes besides the lr
    own_schedule: bool = False  # True: never wrap the lr in the suite's schedule
    eval_params: Callable[[Any, Any], Any] | None = None  # (opt_state, params) -> params
    prepare_params: Callable[[Any], Any] | None = None  # initial params -> params to train

    def missing(self) -> list[str]:
        """The ``ksbopt`` features this entry needs and that are not importable."""
        out = []
        for n in self.needs:
            try:
                ksbopt_feature(n)
            except FeatureUnavailable:
                out.append(f"ksbopt.{n}")
        return out

    @property
    def available(self) -> bool:
        return not self.missing()

    @property
    def symmetries(self) -> tuple[str, ...]:
        """The symmetry kinds of which the task must declare at least one (empty: any task)."""
        if self.symmetry is None:
            return ()
        return (self.symmetry,) if isinstance(self.symmetry, str) else tuple(self.symmetry)

    def not_applicable(self, task) -> str | None:
        """Why the entry does not apply to ``task`` (a Task or TaskSpec), or None if it does."""
        kinds, features = set(task.kinds), set(task.features)
        if self.symmetries and not kinds & set(self.symmetries):
            return f"no {' or '.join(self.symmetries)} symmetry"
        for f in self.task_features:
            if f not in features:
                return f"needs {_FEATURE_TEXT.get(f, f)}"
        return None

    def applies_to(self, task) -> bool:
        """Whether ``task`` (a Task or TaskSpec) offers what this entry acts on."""
        return self.not_applicable(task) is None


REGISTRY: dict[str, OptimizerSpec] = {}


def register(
    name: str,
    factory: Callable[..., optax.GradientTransformation],
    grid: tuple[float, ...],
    *,
    quick: tuple[float, ...] | None = None,
    hparams: Mapping[str, Any] | None = None,
    needs: tuple[str, ...] = (),
    symmetry: str | tuple[str, ...] | None = None,
    task_features: tuple[str, ...] = (),
    extra_args: tuple[str, ...] = (),
    description: str = "",
    origin: Mapping[str, Any] | None = None,
    tune: tuple[str, ...] | None = None,
    own_schedule: bool = False,
    eval_params: Callable[[Any, Any], Any] | None = None,
    prepare_params: Callable[[Any], Any] | None = None,
) -> OptimizerSpec:
    """Adds (or replaces) a registry entry; ``quick`` defaults to grid points 2, 4 and 5.

    ``tune`` defaults to ``("weight_decay",)`` when ``hparams`` has a weight decay, else ``()``.
    """
    hparams = dict(hparams or {})
    tune = tuple(tune) if tune is not None else tuple(k for k in ("weight_decay",) if k in hparams)
    if bad := [k for k in tune if k not in hparams]:
        raise ValueError(f"{name}: tune={tune} names {bad}, which are not in {sorted(hparams)}")
    if len(grid) < 5:
        raise ValueError(f"{name}: {grid=} needs at least 5 learning rates (equal tuning budget).")
    if bad := [a for a in extra_args if a not in EXTRA_ARGS]:
        raise ValueError(
            f"{name}: extra_args {bad} unknown to the runner; it supplies {EXTRA_ARGS}"
        )
    quick = tuple(quick) if quick is not None else (grid[1], grid[3], grid[4])
    spec = OptimizerSpec(
        name,
        factory,
        tuple(grid),
        quick,
        hparams,
        tuple(needs),
        symmetry,
        description,
        tuple(task_features),
        tuple(extra_args),
        dict(origin) if origin else None,
        tune,
        own_schedule,
        eval_params,
        prepare_params,
    )
    REGISTRY[name] = spec
    return spec


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str, *, check: bool = True) -> OptimizerSpec:
    """The entry ``name``; unknown names list the valid ones, missing features are named."""
    if name not in REGISTRY:
        raise KeyError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(REGISTRY)}")
    spec = REGISTRY[name]
    if check and (missing := spec.missing()):
        raise FeatureUnavailable(
            f"optimizer {name!r} needs {', '.join(missing)}, which this ksbopt does not provide."
        )
    return spec


def make(name: str, learning_rate: float, task, **overrides) -> optax.GradientTransformation:
    """The transformation of entry ``name``, its learning rate and tuned hyperparameters
    (``OptimizerSpec.tune``) injected as state hyperparameters.

    They live in the optimizer state (``optax.inject_hyperparams``), so one compiled training
    step serves every learning rate and weight decay of the search.
    """
    spec = get(name)
    unknown = set(overrides) - set(spec.hparams)
    if unknown:
        raise TypeError(
            f"optimizer {name!r} has no hyperparameter(s) {sorted(unknown)}; "
            f"it takes {sorted(spec.hparams)}"
        )
    hp = {**spec.hparams, **overrides}
    tuned = {k: hp.pop(k) for k in spec.tune}

    def inner(learning_rate, **tuned):
        return spec.factory(learning_rate, task, **hp, **tuned)

    # optax.inject_hyperparams binds the factory's signature: name every injected argument
    P = inspect.Parameter
    inner.__signature__ = inspect.Signature(
        [P("learning_rate", P.POSITIONAL_OR_KEYWORD), *(P(k, P.KEYWORD_ONLY) for k in tuned)]
    )
    return optax.inject_hyperparams(inner)(learning_rate=learning_rate, **tuned)


# ---- entries ----------------------------------------------------------------------------------


def _steer(symmetries, target):
    """``ksbopt.steer(symmetries, target)`` at rate 1, buildable inside a jit trace.

    ``optax.inject_hyperparams`` rebuilds the optimizer inside the jitted step; steer's range
    check of a Python ``rate`` converts it with ``jnp.asarray``, which is traced there under
    jax 0.10, so the rate is given as an array (a traced value skips the check).
    """
    return ks("steer")(symmetries, target, rate=jnp.ones((), jnp.float32))


def _decays(weight_decay) -> bool:
    """Whether a weight decay term is built: a Python 0 builds none; an injected (array) weight
    decay, whose value the trace does not know, always builds one."""
    return not isinstance(weight_decay, (int, float)) or weight_decay != 0


def _sgd(lr, momentum, weight_decay):
    """Heavy-ball SGD with coupled weight decay (PyTorch's SGD, the NLD setting)."""
    m = momentum if momentum else None
    sgd = optax.sgd(lr, momentum=m)
    return (
        optax.chain(optax.add_decayed_weights(weight_decay), sgd) if _decays(weight_decay) else sgd
    )


register(
    "sgd",
    lambda lr, task, momentum, weight_decay: _sgd(lr, momentum, weight_decay),
    SGD_GRID,
    hparams={"momentum": 0.9, "weight_decay": 0.0},
    tune=(),  # the baseline without weight decay; sgd+wd tunes it
    description="SGD, heavy-ball momentum 0.9, no weight decay",
)
register(
    "sgd+wd",
    lambda lr, task, momentum, weight_decay: _sgd(lr, momentum, weight_decay),
    SGD_GRID,
    hparams={"momentum": 0.9, "weight_decay": 5e-4},
    description="SGD, momentum 0.9, coupled weight decay (default 5e-4, tuned)",
)


def _decoupled(tx, lr, weight_decay):
    """``tx`` followed by decoupled weight decay ``-lr * weight_decay * w`` (AdamW's form)."""
    if not _decays(weight_decay):
        return tx
    return optax.chain(tx, optax.add_decayed_weights(-lr * weight_decay))


register(
    "rmsprop",
    lambda lr, task, momentum, weight_decay: _decoupled(
        optax.rmsprop(lr, momentum=momentum or None), lr, weight_decay
    ),
    ADAPTIVE_GRID,
    hparams={"momentum": 0.9, "weight_decay": 1e-2},
    description="RMSProp (decay 0.9, eps 1e-8) with heavy-ball momentum 0.9 as the SGD family, "
    "decoupled weight decay (default 1e-2 as AdamW, tuned)",
)
register(
    "adam",
    lambda lr, task: optax.adam(lr),
    ADAPTIVE_GRID,
    description="Adam (0.9, 0.999, eps 1e-8)",
)
register(
    "adamw",
    lambda lr, task, weight_decay: optax.adamw(lr, weight_decay=weight_decay),
    ADAPTIVE_GRID,
    hparams={"weight_decay": 1e-2},
    description="AdamW, decoupled weight decay (default 1e-2, PyTorch's; tuned)",
)


def _muon_dims(params):
    """Which axes Muon orthogonalises: every hidden weight matrix, as ``(inputs, outputs)``.

    A kernel's last axis is its output (Flax's layout), all other axes are its inputs (a
    convolution is a ``(width * in) x out`` matrix), except attention's query/key/value
    kernels ``(d, heads, head_dim)``, whose outputs are the last two axes. The head, the
    embeddings and every vector (biases, normalisation scales) go to Muon's AdamW (``None``),
    as in Jordan et al.'s recipe.
    """
    from optax.contrib import MuonDimensionNumbers

    def dims(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if x.ndim < 2 or name.startswith(("head/", "embed/", "pos/")):
            return None
        if name.rsplit("/", 2)[-2] in ("query", "key", "value"):
            return MuonDimensionNumbers(reduction_axis=0, output_axis=(1, 2))
        return MuonDimensionNumbers(tuple(range(x.ndim - 1)), x.ndim - 1)

    return jax.tree_util.tree_map_with_path(dims, params)


def _schedule_free_x(opt_state, params):
    """The averaged iterate ``x`` of schedule-free AdamW, found in an injected state."""
    inner = getattr(opt_state, "inner_state", opt_state)
    return optax.contrib.schedule_free_eval_params(inner, params)


register(
    "lion",
    lambda lr, task, weight_decay: optax.lion(lr, weight_decay=weight_decay),
    LION_GRID,
    hparams={"weight_decay": 1e-1},
    description="Lion (Chen et al. 2023, https://arxiv.org/abs/2302.06675; b1 0.9, b2 0.99), "
    "decoupled weight decay (default 0.1: 10x AdamW's for a 10x smaller lr; tuned)",
)
if hasattr(optax.contrib, "muon"):
    register(
        "muon",
        lambda lr, task, weight_decay: optax.contrib.muon(
            lr,
            weight_decay=weight_decay,
            adam_weight_decay=weight_decay,
            consistent_rms=0.2,
            muon_weight_dimension_numbers=_muon_dims,
        ),
        ADAPTIVE_GRID,
        hparams={"weight_decay": 1e-2},
        description="Muon (optax.contrib; Jordan et al. 2024, https://kellerjordan.github.io/"
        "posts/muon/) on the hidden weight matrices, AdamW on the rest; updates scaled to "
        "RMS 0.2 (Liu et al. 2025, https://arxiv.org/abs/2502.16982) so that it shares "
        "AdamW's learning rate and decoupled weight decay (default 1e-2; tuned)",
    )
if hasattr(optax.contrib, "schedule_free_adamw"):
    register(
        "sf_adamw",
        lambda lr, task, weight_decay: optax.contrib.schedule_free_adamw(
            lr, weight_decay=weight_decay
        ),
        ADAPTIVE_GRID,
        hparams={"weight_decay": 1e-2},
        own_schedule=True,
        eval_params=_schedule_free_x,
        description="schedule-free AdamW (optax.contrib; Defazio et al. 2024, "
        "https://arxiv.org/abs/2405.15682), constant learning rate, evaluated at its "
        "averaged iterate; decoupled weight decay (default 1e-2; tuned)",
    )
register(
    "lars",
    lambda lr, task: optax.lars(lr),
    LARS_GRID,
    description="LARS (trust coefficient 1e-3, momentum 0.9)",
)
register(
    "sgd+retract",
    lambda lr, task, momentum, weight_decay: optax.chain(
        _sgd(lr, momentum, weight_decay), ks("retract")(task.symmetries("scale"))
    ),
    SGD_GRID,
    hparams={"momentum": 0.9, "weight_decay": 0.0},
    tune=(),  # the constrained-norm control of NLD: no weight decay
    needs=("retract", "Scale"),
    symmetry="scale",
    description="SGD momentum 0.9 + ksbopt.retract on the scale groups: the NLD "
    "constrained-filter-norm control",
)


def _register_sgd_steer_eq(name: str, follow: str, description: str) -> None:
    """sgd+wd steered to its own rotational equilibrium, ``targets.equilibrium(follow=...)``."""

    def factory(lr, task, momentum, weight_decay):
        target = ks("targets.equilibrium")(lr, weight_decay, momentum, follow=follow)
        return optax.chain(
            _sgd(lr, momentum, weight_decay), _steer(task.symmetries("scale"), target)
        )

    register(
        name,
        factory,
        SGD_GRID,
        hparams={"momentum": 0.9, "weight_decay": 5e-4},
        needs=("steer", "targets.equilibrium", "Scale"),
        symmetry="scale",
        description=description,
    )


_register_sgd_steer_eq(
    "sgd+steer_eq",
    "peak",
    "sgd+wd with every scale group steered to the rotational equilibrium of its own heavy ball "
    "from the first step: no warm-up transient (see :doc:`/concepts/implicit_rmsprop`)",
)
_register_sgd_steer_eq(
    "sgd+steer_eq_rate",
    "rate",
    "sgd+steer_eq whose target follows the equilibrium of the current, decaying rate (angular "
    "update ~ sqrt(eta_t) through the decay, as the rotational optimizers'; the norms shrink "
    "with it, so BatchNorm's running statistics fall behind; see :doc:`/when_it_helps`)",
)
register(
    "adam+steer_nld",
    lambda lr, task, nld_learning_rate, weight_decay, momentum: optax.chain(
        optax.adam(lr),
        _steer(
            task.symmetries("scale"), ks("targets.nld")(nld_learning_rate, weight_decay, momentum)
        ),
    ),
    ADAPTIVE_GRID,
    hparams={"nld_learning_rate": 0.1, "weight_decay": 5e-4, "momentum": 0.9},
    tune=(),  # the weight decay is the steered-to trajectory's, not a decay of this optimizer
    needs=("steer", "targets.nld", "Scale"),
    symmetry="scale",
    extra_args=("grad",),
    description="Adam with the scale-group norms steered to the trajectory that SGD (lr 0.1, "
    "momentum 0.9, weight decay 5e-4) on a normalised layer would give them (NLD's implicit "
    "RMSProp, :doc:`/concepts/implicit_rmsprop`)",
)
register(
    "adam+project",
    lambda lr, task: optax.chain(
        optax.adam(lr), ks("project")(task.symmetries(("scale", "translation")))
    ),
    ADAPTIVE_GRID,
    needs=("project",),
    symmetry="scale",
    description="Adam whose step is projected orthogonal to the scale and translation "
    "generators (AdamP's projection, every step, without its cosine test): those charges "
    "change only at second order",
)
register(
    "adam+symmetrize",
    lambda lr, task: ks("symmetrize")(optax.adam(lr), task.symmetries(("scale", "translation"))),
    ADAPTIVE_GRID,
    needs=("symmetrize",),
    symmetry="scale",
    description="ksbopt.symmetrize(optax.adam): Adam on the orbit-invariant coordinates of "
    "the scale and translation groups (a symmetric kinetic energy)",
)
register(
    "noether_rmsprop",
    lambda lr, task, weight_decay, momentum: ks("noether_rmsprop")(
        task.unit_symmetries(), lr, weight_decay, momentum
    ),
    SGD_GRID,
    hparams={"weight_decay": 5e-4, "momentum": 0.9},
    needs=("noether_rmsprop", "Scale"),
    task_features=("units",),
    description="the implicit RMSProp of normalisation + SGD made explicit (mode 'exact', "
    "momentum 0.9, weight decay 5e-4) on the units: the normalised groups, or the hidden "
    "ReLU units of a network without normalisation",
)
register(
    "sgd+teleport",
    lambda lr, task, momentum, every, steps: ks("teleport")(
        _sgd(lr, momentum, 0.0),
        task.symmetries(("rescale", "linear")),
        every,
        steps,
        rho=lr / (1 - momentum),  # the step momentum settles to
        objective="lookahead",
    ),
    SGD_GRID,
    hparams={"momentum": 0.9, "every": 100, "steps": 8},
    needs=("teleport",),
    symmetry=("rescale", "linear"),
    extra_args=("value_fn", "batch", "model_state"),
    description="SGD momentum 0.9, teleported every 100 steps along the rescale/linear orbits "
    "(Zhao et al. 2022) to where one step of its learning rate descends most (the gradient-"
    "norm gain minus the curvature along the step: 'lookahead'), momentum transported",
)
register(
    "sgdp",
    lambda lr, task, momentum, weight_decay: ks("peers.sgdp")(
        lr, momentum=momentum, weight_decay=weight_decay
    ),
    SGD_GRID,
    hparams={"momentum": 0.9, "weight_decay": 5e-4},
    needs=("peers.sgdp",),
    description="SGDP (Heo et al. 2021, the authors' defaults: delta 0.1, wd_ratio 0.1, momentum "
    "buffer projected), momentum 0.9, weight decay 5e-4 as sgd+wd",
)
register(
    "adamp",
    lambda lr, task, weight_decay: ks("peers.adamp")(lr, weight_decay=weight_decay),
    ADAPTIVE_GRID,
    hparams={"weight_decay": 1e-2},
    needs=("peers.adamp",),
    description="AdamP (Heo et al. 2021; delta 0.1, wd_ratio 0.1), weight decay 1e-2 as adamw",
)


def _balanced(params):
    """Nero's starting point: every kernel balanced (:func:`ksbopt.peers.balance_params`)."""
    return ks("peers.balance_params")(params)


def _centred(params):
    """Rotational optimizers' starting point: every kernel centred per unit, norms kept
    (:func:`ksbopt.peers.center_params`)."""
    return ks("peers.center_params")(params)


register(
    "nero",
    lambda lr, task: ks("peers.nero")(lr),
    NERO_GRID,
    needs=("peers.nero", "peers.balance_params"),
    prepare_params=_balanced,
    description="Nero (Liu et al. 2021, the authors' defaults: beta 0.999, balanced units, "
    "debiased; kernels balanced before training, as the authors' optimizer does at creation)",
)
register(
    "rotational",
    lambda lr, task, weight_decay, momentum: ks("peers.rotational")(
        optax.trace(momentum), lr, weight_decay, momentum, kind="sgdm"
    ),
    SGD_GRID,
    hparams={"weight_decay": 5e-4, "momentum": 0.9},
    needs=("peers.rotational", "peers.center_params"),
    prepare_params=_centred,
    description="rotational SGDM (Kosson et al. 2024, REQ's RotationalSGD defaults: per neuron, "
    "centred, update-norm decay 0.9): frozen unit norms, equilibrium angular update "
    "sqrt(2 lr 5e-4 / 1.9) per step; kernels centred before training, as REQ does at creation",
)
register(
    "path_sgd",
    lambda lr, task: ks("peers.path_sgd")(lr, path_norm_fn=task.path_norm_fn()),
    SGD_GRID,
    needs=("peers.path_sgd",),
    task_features=("path_norm",),
    description="Path-SGD (Neyshabur et al. 2015): steps divided by the path-norm curvature",
)
