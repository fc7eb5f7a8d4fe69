"""Suites: which tasks, optimizers, seeds, schedule arms and experiments a run of the CLI plans.

Every suite tunes with the same protocol (:mod:`ksbopt.bench.protocol`: the half-decade
learning-rate lattice extended until the optimum is interior, weight decay where the entry has
one, the first seed for tuning and every seed at the chosen setting), so a smaller suite
is an exact subset of a larger one (:func:`subset_problems`): the quick suite trains the same
configurations as the full suite on the tasks they share and cannot contradict it.

- ``quick`` (the README's main command, a few minutes on 2 CPU cores): the MNIST-1D CNN with
  and without BatchNorm at the ``small`` scale, the warm-up + cosine arm, three seeds (one
  for tuning), and six optimizers: ``sgd`` and ``sgd+retract`` (is the norm's implicit
  adaptivity useful?), ``sgd+wd`` and ``noether_rmsprop`` (does the explicit version help?),
  ``adamw`` and ``adam+symmetrize`` (does a symmetric kinetic energy beat Adam?).
- ``full`` (sized for 6 hours on 2 CPU cores; ``--dry-run --costs FILE`` estimates it): the
  headline tasks at the ``small`` scale with every optimizer of the registry where it applies
  (the byte LM with ten of them), the quick suite's tasks with its optimizers, five seeds, the
  warm-up + cosine arm, and the constant arm on the deep MLP with LayerNorm for five entries;
  plus, at the published sizes (``base``), the NLD control and the MNIST-1D baselines.
- ``gpu``: the ``large`` scale (>= 10M parameters; only an accelerator runs it) with the same
  protocol, 600 steps and four optimizers, to fit about 10 minutes on one GPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from ksbopt.bench import protocol, registry
from ksbopt.bench import tasks as _tasks
from ksbopt.bench.protocol import MISSING, Protocol
from ksbopt.bench.records import RunConfig
from ksbopt.bench.tasks import TASKS

__all__ = [
    "EXPERIMENTS",
    "SUITES",
    "Suite",
    "arms_of",
    "plan",
    "subset_problems",
    "tuning_round",
]

EXPERIMENTS = ("grid", "nld", "baselines")


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    scale: str
    tasks: tuple[str, ...]
    optimizers: tuple[str, ...]
    seeds: tuple[int, ...]
    experiments: tuple[str, ...]
    description: str
    schedules: tuple[str, ...] = ("cosine",)
    protocol: Protocol = dataclasses.field(default_factory=Protocol)
    # Scales of experiments that do not run at ``scale`` (the reproductions run at the sizes of
    # the papers they reproduce); ``--scale`` overrides every experiment's.
    experiment_scales: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Schedule arms restricted to some tasks and optimizers: arm -> (tasks, optimizers); an
    # arm not named here runs on every task and optimizer (see :func:`arms_of`).
    arm_scope: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = dataclasses.field(
        default_factory=dict
    )
    # Tasks that run only some of the suite's optimizers: task -> optimizers (the smoke tasks
    # of the full suite run the quick suite's); a task not named here runs every optimizer.
    task_optimizers: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    steps: int | None = None  # every run's step budget (None: each task's at its scale)

    def scale_of(self, experiment: str) -> str:
        return self.experiment_scales.get(experiment, self.scale)


_QUICK_TASKS = ("mnist1d_cnn_bn", "mnist1d_cnn")
# The headline tasks (declared by the task registry), then the quick suite's smoke tasks.
_FULL_TASKS = tuple(dict.fromkeys((*_tasks.HEADLINE_TASKS, *_QUICK_TASKS)))

_QUICK_OPTIMIZERS = ("sgd", "sgd+wd", "adamw", "sgd+retract", "noether_rmsprop", "adam+symmetrize")
# One protocol for every suite (so each smaller suite is a subset of the full one): the search
# on one seed, every seed at the chosen point. Two tuning seeds would double the search's cost
# and put the full suite over its 6-hour budget on 2 CPU cores.
_PROTOCOL = Protocol(tuning_seeds=1)
# The constant arm (no warm-up, no decay) asks whether equilibrium steering removes the warm-up
# transient of normalisation + SGD: it runs on the deep MLP with LayerNorm (a normalised
# network whose run costs a tenth of the normalised ResNet's), for SGD with weight decay, its
# steered and explicit versions, the rotational optimizer and AdamW.
_CONSTANT_ARM = (
    ("mnist1d_deep_mlp_ln",),
    ("sgd+wd", "sgd+steer_eq", "noether_rmsprop", "rotational", "adamw"),
)
# The byte LM costs 2-3 MNIST-1D ResNet runs per run on CPU: it trains the optimizers a
# practitioner would pick, normalisation + SGD, and the ksbopt entries that act on every layer.
_LM_OPTIMIZERS = (
    "sgd+wd",
    "rmsprop",
    "adamw",
    "lion",
    "muon",
    "sf_adamw",
    "noether_rmsprop",
    "adam+symmetrize",
    "adam+project",
    "sgd+steer_eq",
)
# The gpu suite: the three accelerator-sized tasks, 600 steps (the CPU scale's 2000 would not
# fit 10 minutes), normalisation + SGD and its explicit version, AdamW and a symmetric Adam.
_GPU_OPTIMIZERS = ("sgd+wd", "noether_rmsprop", "adamw", "adam+symmetrize")
GPU_STEPS = 600

SUITES = {
    "quick": Suite(
        "quick",
        "small",
        _QUICK_TASKS,
        _QUICK_OPTIMIZERS,
        (0, 1, 2),
        ("grid",),
        "MNIST-1D CNN with vs without BatchNorm; normalisation + SGD with and without "
        "weight decay, AdamW, the constrained-norm control, noether_rmsprop and "
        "adam+symmetrize, tuned on the lattice, warm-up + cosine, 3 seeds",
        protocol=_PROTOCOL,
    ),
    "full": Suite(
        "full",
        "small",
        _FULL_TASKS,
        tuple(registry.REGISTRY),
        (0, 1, 2, 3, 4),
        EXPERIMENTS,
        "headline tasks (small scale) with every optimizer (the byte LM with ten: the "
        "practitioners' and the ksbopt entries acting on every layer) and the quick suite's "
        "tasks with its optimizers, tuned on the lattice, warm-up + cosine arm (the "
        "constant arm on the deep MLP with LayerNorm for sgd+wd, sgd+steer_eq, noether_rmsprop, "
        "rotational, adamw), "
        "5 seeds; NLD control and MNIST-1D baselines at the published sizes",
        schedules=("cosine", "constant"),
        protocol=_PROTOCOL,
        experiment_scales={"nld": "base", "baselines": "base"},
        arm_scope={"constant": _CONSTANT_ARM},
        task_optimizers={
            **{t: _QUICK_OPTIMIZERS for t in _QUICK_TASKS},
            "lm_stdlib_long": _LM_OPTIMIZERS,
        },
    ),
    "gpu": Suite(
        "gpu",
        "large",
        _tasks.GPU_TASKS,
        _GPU_OPTIMIZERS,
        (0, 1, 2),
        ("grid",),
        f"large scale (>= 10M parameters): the MNIST-1D ResNets with and without BatchNorm "
        f"and the byte LM, {GPU_STEPS} steps; sgd+wd, noether_rmsprop, adamw, adam+symmetrize "
        "tuned on the lattice, warm-up + cosine, 3 seeds",
        protocol=_PROTOCOL,
        steps=GPU_STEPS,
    ),
}

# The NLD control experiment (docs/concepts/implicit_rmsprop.md) on the MNIST-1D CNN with
# BatchNorm: free (sgd) vs constrained (sgd+retract) filter norm.
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
    """The runs fixed in advance, in order, without duplicates; inapplicable pairs left out.

    These are the NLD control and baseline experiments and, only when ``lrs`` is given (a
    user's fixed grid, no tuning), the grid experiment on those learning rates in every
    schedule arm. The tuned grid experiment is planned round by round by :func:`tuning_round`.
    ``scale`` (when given) replaces the scale of every experiment; ``steps`` the step budget
    of every run (default: the task's at the experiment's scale).
    """
    experiments = suite.experiments if experiments is None else experiments

    def scale_of(experiment):
        return scale or suite.scale_of(experiment)

    runs: list[RunConfig] = []
    if "grid" in experiments and lrs:
        for t in tasks:
            for o in optimizers:
                if not registry.get(o, check=False).applies_to(TASKS[t]):
                    continue
                runs += [
                    RunConfig("grid", t, o, float(lr), s, scale_of("grid"), (), steps, arm)
                    for arm in arms_of(suite, t, o)
                    for lr in lrs
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
    return _unique(runs)


def _unique(runs: list[RunConfig]) -> list[RunConfig]:
    seen, out = set(), []
    for r in runs:
        if r.run_id not in seen:
            seen.add(r.run_id)
            out.append(r)
    return out


def _wd_grid(spec, proto: Protocol) -> tuple[float, ...]:
    """The weight decays the search may try: the registry's ``tune`` says whether an entry's
    weight decay is tuned (the protocol says on which grid), else it keeps its own."""
    if "weight_decay" not in spec.tune:
        return ()
    return protocol.wd_grid(float(spec.hparams["weight_decay"]), proto.wd_factors)


def arms_of(suite: Suite, task: str, optimizer: str) -> tuple[str, ...]:
    """The schedule arms in which ``optimizer`` is tuned on ``task`` (none: it does not run
    there). This is the one place that decides which (task, optimizer, arm) a suite trains.

    A task named in :attr:`Suite.task_optimizers` runs only the optimizers listed there. An arm
    named in :attr:`Suite.arm_scope` runs only on the tasks and optimizers listed
    there. An entry with its own schedule (``own_schedule``: schedule-free AdamW) runs only in
    the suite's first arm, where its record says the suite's schedule was not applied: in
    another arm it would train the same configuration again.
    """
    if task in suite.task_optimizers and optimizer not in suite.task_optimizers[task]:
        return ()
    arms = []
    for arm in suite.schedules:
        scope = suite.arm_scope.get(arm)
        if scope is not None and (task not in scope[0] or optimizer not in scope[1]):
            continue
        arms.append(arm)
    if registry.get(optimizer, check=False).own_schedule:
        arms = arms[:1]
    return tuple(arms)


def tuning_round(
    suite: Suite,
    *,
    tasks: tuple[str, ...],
    optimizers: tuple[str, ...],
    seeds: tuple[int, ...],
    result: Callable[[RunConfig], float | object | None],
    higher_is_better: Callable[[str], bool],
    scale: str | None = None,
    steps: int | None = None,
) -> tuple[list[RunConfig], dict[tuple[str, str, str], protocol.Search]]:
    """The tuned grid runs to train next, and where each search stands.

    For every (task, schedule arm, optimizer) that applies, :func:`ksbopt.bench.protocol.search`
    is replayed on the known results; the runs it still needs (on the tuning seeds), or once
    it is over the chosen point on the remaining seeds, make the round. Called again after
    the round has trained, it goes on; it returns no runs when every search is over and every
    seed has trained (or failed: ``result`` answers None for a run that cannot train).

    Args:
      result: a run's final validation metric, None if it diverged, or
        :data:`ksbopt.bench.protocol.MISSING` if it has not run.
      higher_is_better: task name -> the direction of its metric.

    Returns:
      (runs, searches) with searches keyed by (task, schedule, optimizer).
    """
    proto = suite.protocol
    tuning = seeds[: proto.tuning_seeds]
    sc = scale or suite.scale_of("grid")
    runs: list[RunConfig] = []
    searches = {}
    for t in tasks:
        for o in optimizers:
            spec = registry.get(o, check=False)
            if not spec.applies_to(TASKS[t]):
                continue
            window = protocol.start_window(spec.lr_grid, proto.window)
            wds = _wd_grid(spec, proto)
            wd0 = wds[list(sorted(proto.wd_factors)).index(1.0)] if wds else None
            for arm in arms_of(suite, t, o):

                def cfg(point, seed, t=t, o=o, arm=arm):
                    k, wd = point
                    hp = (("weight_decay", wd),) if wd is not None else ()
                    return RunConfig("grid", t, o, protocol.lattice_lr(k), seed, sc, hp, steps, arm)

                def score(point, cfg=cfg):
                    vals = [result(cfg(point, s)) for s in tuning]
                    if any(v is MISSING for v in vals):
                        return MISSING
                    if any(v is None for v in vals):
                        return None
                    return sum(vals) / len(vals)

                found = protocol.search(
                    window,
                    wds,
                    score,
                    higher_is_better=higher_is_better(t),
                    max_extensions=proto.max_extensions,
                    wd0=wd0,
                    band_reach=proto.band_reach,
                )
                searches[(t, arm, o)] = found
                if found.needed:
                    runs += [cfg(p, s) for p in found.needed for s in tuning]
                else:
                    todo = [cfg(found.best, s) for s in seeds[len(tuning) :]]
                    runs += [r for r in todo if result(r) is MISSING]
    return _unique(runs), searches


def subset_problems(small: Suite, big: Suite) -> list[str]:
    """Why ``small``'s tuned grid runs are not an exact subset of ``big``'s ([] if they are).

    The searches are deterministic functions of the results, so the same protocol, scale,
    tuning seeds and arms on a subset of tasks and optimizers train the same configurations
    and choose the same settings.
    """
    out = []
    if small.protocol != big.protocol:
        out.append(f"protocol {small.protocol} != {big.protocol}")
    if small.scale_of("grid") != big.scale_of("grid"):
        out.append(f"scale {small.scale_of('grid')} != {big.scale_of('grid')}")
    n = small.protocol.tuning_seeds
    if small.seeds[:n] != big.seeds[:n]:
        out.append(f"tuning seeds {small.seeds[:n]} != {big.seeds[:n]}")
    for what in ("tasks", "optimizers", "seeds", "schedules"):
        if extra := set(getattr(small, what)) - set(getattr(big, what)):
            out.append(f"{what} {sorted(extra)} not in {big.name}")
    for t in small.tasks:
        for o in small.optimizers:
            if extra := set(arms_of(small, t, o)) - set(arms_of(big, t, o)):
                out.append(f"{o} on {t}: arms {sorted(extra)} not in {big.name}")
    return out
