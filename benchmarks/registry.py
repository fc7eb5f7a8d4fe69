"""The one optimizer registry of the benchmarks.

An entry maps a name to ``factory(learning_rate, task, **hparams) -> optax transformation``,
its learning-rate grid (log-spaced, at least five points, the same size for every optimizer:
the same tuning budget), the smaller grid of the quick suite, the other hyperparameters at their
published defaults, the ``ksbopt`` features it needs and the kind of symmetry the task must
declare (``"scale"`` for the constrained-norm control, for instance).

Adding an optimizer is one line::

    register("nero", lambda lr, task: ks("nero")(lr), ADAPTIVE_GRID, needs=("nero",))

An entry whose ``ksbopt`` feature is missing stays listed; looking it up with :func:`get`
raises :class:`FeatureUnavailable` naming the feature (nothing is faked or stubbed).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import optax

__all__ = [
    "ADAPTIVE_GRID",
    "LARS_GRID",
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


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """One registry entry; see the module docstring."""

    name: str
    factory: Callable[..., optax.GradientTransformation]
    lr_grid: tuple[float, ...]
    quick_lrs: tuple[float, ...]
    hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    needs: tuple[str, ...] = ()
    symmetry: str | None = None
    description: str = ""

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

    def applies_to(self, task) -> bool:
        """Whether the task declares the symmetry this entry acts on."""
        return self.symmetry is None or task.has_symmetry(self.symmetry)


REGISTRY: dict[str, OptimizerSpec] = {}


def register(
    name: str,
    factory: Callable[..., optax.GradientTransformation],
    grid: tuple[float, ...],
    *,
    quick: tuple[float, ...] | None = None,
    hparams: Mapping[str, Any] | None = None,
    needs: tuple[str, ...] = (),
    symmetry: str | None = None,
    description: str = "",
) -> OptimizerSpec:
    """Adds (or replaces) a registry entry; ``quick`` defaults to grid points 2, 4 and 5."""
    if len(grid) < 5:
        raise ValueError(f"{name}: {grid=} needs at least 5 learning rates (equal tuning budget).")
    quick = tuple(quick) if quick is not None else (grid[1], grid[3], grid[4])
    spec = OptimizerSpec(
        name, factory, tuple(grid), quick, dict(hparams or {}), tuple(needs), symmetry, description
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
    """The transformation of entry ``name``, its learning rate injected as a state hyperparameter.

    The learning rate lives in the optimizer state (``optax.inject_hyperparams``), so one
    compiled training step serves every learning rate of the grid.
    """
    spec = get(name)
    unknown = set(overrides) - set(spec.hparams)
    if unknown:
        raise TypeError(
            f"optimizer {name!r} has no hyperparameter(s) {sorted(unknown)}; "
            f"it takes {sorted(spec.hparams)}"
        )
    hp = {**spec.hparams, **overrides}

    def inner(learning_rate):
        return spec.factory(learning_rate, task, **hp)

    return optax.inject_hyperparams(inner)(learning_rate=learning_rate)


# ---- entries ----------------------------------------------------------------------------------


def _sgd(lr, momentum, weight_decay):
    """Heavy-ball SGD with coupled weight decay (PyTorch's SGD, the NLD setting)."""
    m = momentum if momentum else None
    sgd = optax.sgd(lr, momentum=m)
    return optax.chain(optax.add_decayed_weights(weight_decay), sgd) if weight_decay else sgd


register(
    "sgd",
    lambda lr, task, momentum, weight_decay: _sgd(lr, momentum, weight_decay),
    SGD_GRID,
    hparams={"momentum": 0.9, "weight_decay": 0.0},
    description="SGD, heavy-ball momentum 0.9",
)
register(
    "sgd+wd",
    lambda lr, task, momentum, weight_decay: _sgd(lr, momentum, weight_decay),
    SGD_GRID,
    hparams={"momentum": 0.9, "weight_decay": 5e-4},
    description="SGD, momentum 0.9, coupled weight decay 5e-4",
)
register(
    "rmsprop",
    lambda lr, task: optax.rmsprop(lr),
    ADAPTIVE_GRID,
    description="RMSProp (optax defaults: decay 0.9, eps 1e-8)",
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
    description="AdamW, decoupled weight decay 1e-2 (PyTorch's default)",
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
    needs=("retract", "Scale"),
    symmetry="scale",
    description="SGD momentum 0.9 + ksbopt.retract on the scale groups: the NLD "
    "constrained-filter-norm control",
)
