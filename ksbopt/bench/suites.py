"""Suites: which tasks, optimizers, learning rates, seeds and experiments a run of the CLI plans.

- ``quick`` (the README's main command): MNIST-1D CNN with and without BatchNorm at the
  ``small`` scale (800 steps); SGD with momentum (with and without weight decay), RMSProp,
  Adam, AdamW, AdamP, the constrained-norm control ``sgd+retract``, ``sgd+steer_eq``,
  ``adam+symmetrize`` and ``noether_rmsprop``, so that its report answers the four questions;
  three learning rates per optimizer, two seeds; about 5 minutes on 2 idle CPU cores.
- ``full``: every task except the larger-set variants (those are the gpu suite's), at the
  ``small`` scale, and every optimizer of the registry where it applies, on its whole
  learning-rate grid (5 log-spaced points), 3 seeds; plus, at the published sizes (``base``),
  the NLD control experiment (constrained vs free filter norm at a low and a high constant
  learning rate, a momentum sweep and a weight-decay sweep) and the MNIST-1D published
  baselines. About 70 minutes on 2 idle CPU cores (measured per-run costs; see
  ``benchmarks/results/README.md``).
- ``gpu``: the ``large`` scale (widths, batches, data; the language model at ~25M parameters)
  for about 10 minutes on one modern GPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ksbopt.bench import registry
from ksbopt.bench.records import RunConfig
from ksbopt.bench.tasks import TASKS

__all__ = ["EXPERIMENTS", "SUITES", "Suite", "plan"]

EXPERIMENTS = ("grid", "nld", "baselines")


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    scale: str
    tasks: tuple[str, ...]
    optimizers: tuple[str, ...]
    seeds: tuple[int, ...]
    lr_grid: str  # "quick": the registry's quick_lrs; "full": its lr_grid
    experiments: tuple[str, ...]
    description: str
    max_lrs: int | None = None  # keep only the first max_lrs learning rates of the grid
    # Scales of experiments that do not run at ``scale`` (the reproductions run at the sizes of
    # the papers they reproduce); ``--scale`` overrides every experiment's.
    experiment_scales: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def scale_of(self, experiment: str) -> str:
        return self.experiment_scales.get(experiment, self.scale)


_GRID_TASKS = tuple(t for t in TASKS if not t.endswith("_published"))
# The larger generated MNIST-1D set belongs to the gpu suite: on 2 CPU cores the full suite's
# time goes to the learning-rate grids of the standard tasks.
_FULL_TASKS = tuple(t for t in _GRID_TASKS if "_large_" not in t)

SUITES = {
    "quick": Suite(
        "quick",
        "small",
        ("mnist1d_cnn_bn", "mnist1d_cnn"),
        (
            "sgd",
            "sgd+wd",
            "rmsprop",
            "adam",
            "adamw",
            "adamp",
            "sgd+retract",
            "sgd+steer_eq",
            "adam+symmetrize",
            "noether_rmsprop",
        ),
        (0, 1),
        "quick",
        ("grid",),
        "MNIST-1D CNN with vs without BatchNorm; 10 optimizers x 3 learning rates x 2 seeds",
    ),
    "full": Suite(
        "full",
        "small",
        _FULL_TASKS,
        tuple(registry.REGISTRY),
        (0, 1, 2),
        "full",
        EXPERIMENTS,
        "every task (small scale) and optimizer, 5 learning rates, 3 seeds; NLD control and "
        "MNIST-1D baselines at the published sizes",
        experiment_scales={"nld": "base", "baselines": "base"},
    ),
    "gpu": Suite(
        "gpu",
        "large",
        ("mnist1d_large_cnn_bn", "mnist1d_large_cnn", "lm_stdlib_qknorm", "lm_stdlib"),
        ("sgd", "adam", "sgd+retract"),
        (0,),
        "quick",
        ("grid",),
        "large scale: MNIST-1D CNNs on a 40k generated set, ~25M-parameter byte LM",
        max_lrs=2,
    ),
}

# The NLD control experiment (THEORY.md section 5) on the MNIST-1D CNN with BatchNorm: free
# (sgd) vs constrained (sgd+retract) filter norm.
NLD_TASK = "mnist1d_cnn_bn"
NLD_LOW_LR, NLD_HIGH_LR = 0.003, 0.3
NLD_MOMENTA = (0.0, 0.5, 0.9)
NLD_WEIGHT_DECAYS = (0.0, 1e-4, 5e-4, 2e-3)
BASELINE_TASKS = ("mnist1d_mlp_published", "mnist1d_cnn_published")
BASELINE_LR = 1e-2  # the MNIST-1D paper trains both with Adam, lr 1e-2, batch 100, 6000 steps
PUBLISHED = {"mnist1d_mlp_published": 0.68, "mnist1d_cnn_published": 0.94}


def nld_settings() -> list[tuple[str, float, float, float]]:
    """(sweep, learning rate, momentum, weight decay) of the NLD control experiment."""
    out = [("lr", lr, 0.9, 0.0) for lr in (NLD_LOW_LR, NLD_HIGH_LR)]
    out += [("momentum", NLD_HIGH_LR, m, 0.0) for m in NLD_MOMENTA]
    out += [("weight_decay", NLD_HIGH_LR, 0.9, wd) for wd in NLD_WEIGHT_DECAYS]
    return out


def plan(
    suite: Suite,
    *,
    tasks: tuple[str, ...],
    optimizers: tuple[str, ...],
    seeds: tuple[int, ...],
    scale: str | None = None,
    lrs: tuple[float, ...] | None = None,
    steps: int | None = None,
    experiments: tuple[str, ...] | None = None,
) -> list[RunConfig]:
    """The runs to do, in order, without duplicates. Inapplicable pairs are left out.

    ``scale`` (when given) replaces the scale of every experiment; ``steps`` the step budget of
    every run (default: the task's at the experiment's scale).
    """
    experiments = suite.experiments if experiments is None else experiments

    def scale_of(experiment):
        return scale or suite.scale_of(experiment)

    runs: list[RunConfig] = []
    if "grid" in experiments:
        for t in tasks:
            for o in optimizers:
                spec = registry.get(o, check=False)
                if not spec.applies_to(TASKS[t]):
                    continue
                grid = lrs or (spec.quick_lrs if suite.lr_grid == "quick" else spec.lr_grid)
                if suite.max_lrs and not lrs:
                    grid = grid[: suite.max_lrs]
                runs += [
                    RunConfig("grid", t, o, float(lr), s, scale_of("grid"), steps=steps)
                    for lr in grid
                    for s in seeds
                ]
    if "nld" in experiments:
        for o in ("sgd", "sgd+retract"):
            for _, lr, m, wd in nld_settings():
                hp = (("momentum", m), ("weight_decay", wd))
                sc = scale_of("nld")
                runs += [RunConfig("nld", NLD_TASK, o, lr, s, sc, hp, steps) for s in seeds]
    if "baselines" in experiments:
        runs += [
            RunConfig("baselines", t, "adam", BASELINE_LR, s, scale_of("baselines"), steps=steps)
            for t in BASELINE_TASKS
            for s in seeds
        ]
    seen, out = set(), []
    for r in runs:
        if r.run_id not in seen:
            seen.add(r.run_id)
            out.append(r)
    return out
