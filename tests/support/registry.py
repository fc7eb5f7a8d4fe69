"""The one list of transforms under test, read by every battery.

Each public transform (and each configuration of it worth testing on its own, e.g. ``steer``
with a dynamic target, ``monitor`` around Adam) is one :class:`Spec` in :data:`TRANSFORMS`.
The batteries take their transforms from here and nowhere else:

- the contract battery (:mod:`support.contract`, ``tests/test_contract.py``): every entry;
- the edge cases (``tests/test_edge_cases.py``): every entry that is not a building block;
- the sharding checks (:mod:`support.sharding_check`): the same, on 8 simulated devices;
- mixed precision (``tests/test_mixed_precision.py``): the pass-through transforms
  (``role == "transform"``);
- checkpoints (``tests/test_checkpoint.py``): every entry that is not a building block.

A new transform is one more entry here; the properties below say what each battery may
expect of it, so no battery keeps its own list.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

import ksbopt

ALL_KINDS = frozenset({"scale", "rescale", "translation", "linear"})
T = ksbopt.targets
D = ksbopt.dynamics


@dataclasses.dataclass(frozen=True)
class Spec:
    """How the batteries build one transform, and what they may expect of it.

    Attributes:
      name: the test id.
      factory: ``factory(symmetries, **hyperparams)`` returning the transform (with the
        ``problem_args`` as keywords too).
      hyperparams: numeric hyperparameters (plain arguments that ``inject_hyperparams``
        can schedule), with the values the batteries use.
      schedules: for the ``inject_hyperparams`` check, a schedule per hyperparameter.
      role: ``"transform"``: a pass-through step that acts only on the leaves the
        symmetries touch (project / retract / steer); ``"optimizer"``: ksbopt's complete
        optimizers and wrappers; ``"peer"``: the ports of the peers' optimizers.
      first: True if the transform goes BEFORE the base optimizer (it acts on gradients),
        False if it goes LAST (it acts on the final step and needs ``params``).
      alone: True for a complete optimizer (learning rate included): the batteries use it
        on its own instead of next to heavy-ball SGD (``first`` is then ignored).
      block: True for a building block of an optimizer (``scale_by_*``, a retraction), as
        opposed to what a user trains with; the edge cases, sharding and checkpoint
        batteries test the complete optimizers only.
      conserves: True if charges after ``apply_updates`` equal the charges at ``init``.
      needs_params: True if ``update`` requires ``params`` (``check_params_none``).
      problem_args: the keyword arguments of ``factory`` that describe the problem rather
        than the transform, bound by :meth:`factory_for`: ``"value_fn"`` (the loss: each
        battery passes its own, and its extra arguments go to ``update``) and
        ``"path_norm_fn"`` (the squared path norm; default :func:`sum_of_squares`).
      nonfinite: what a NaN / inf entry in the updates given to the transform does:
        ``"touched"``: zero updates on the leaves the symmetries act on, other leaves passed
        through, state kept; ``"all"``: zero updates on every leaf, state kept;
        ``"wrapped"``: passed on, as optax does; the batteries run the transform inside
        ``optax.apply_if_finite``, the documented tool for it.
      kinds: the symmetry kinds the transform accepts (``ksbopt.Scale`` is ``"scale"``, ...).
      declarations: False for a transform that takes no symmetry declarations (the peers:
        their factory ignores the ``symmetries`` the batteries pass).
      contract_checks: the names of the contract checks that apply (None: all of them).
      slow: where the entry runs only under ``-m slow``: a battery name (``"contract"``,
        ``"edge"``) or ``"contract.check_NAME"`` for one check of the contract battery.
      flax_symmetries: the declarations used by ``check_nnx`` / ``check_linen`` on their
        MLP (leaves ``l1/kernel``, ``l1/bias``, ``l2/kernel``, ``l2/bias``); default a
        Rescale of its hidden units.
    """

    name: str
    factory: Callable[..., optax.GradientTransformationExtraArgs]
    hyperparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    schedules: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    role: str = "transform"
    first: bool = False
    alone: bool = False
    block: bool = False
    conserves: bool = False
    needs_params: bool = True
    problem_args: tuple[str, ...] = ()
    nonfinite: str = "touched"
    kinds: frozenset = ALL_KINDS
    declarations: bool = True
    contract_checks: tuple[str, ...] | None = None
    slow: tuple[str, ...] = ()
    flax_symmetries: tuple | None = None

    def factory_for(self, loss: Callable | None = None, path_norm: Callable | None = None):
        """``factory`` with the problem's arguments bound (see ``problem_args``), and the
        signature of its hyperparameters, so that ``optax.inject_hyperparams`` sees them
        (and does not take a bound function for a schedule)."""
        if not self.problem_args:
            return self.factory
        problem = {"value_fn": loss, "path_norm_fn": path_norm or sum_of_squares}
        problem = {k: v for k, v in problem.items() if k in self.problem_args}
        if problem.get("value_fn", True) is None:
            raise ValueError(f"{self.name} needs the loss of the problem (loss=)")

        def make(*args, **kwargs):
            return self.factory(*args, **problem, **kwargs)

        params = inspect.signature(self.factory).parameters.values()
        make.__signature__ = inspect.Signature([p for p in params if p.name not in problem])
        return make

    def transform(self, symmetries, *, loss=None, path_norm=None, **overrides):
        """The transform on ``symmetries`` with the registry's hyperparameters (overridden
        by ``overrides``) and the problem's ``loss`` / ``path_norm`` where it takes them."""
        hyperparams = {**self.hyperparams, **overrides}
        return self.factory_for(loss, path_norm)(list(symmetries), **hyperparams)

    def chain(self, symmetries, tx=None, *, base=None, loss=None, path_norm=None, **overrides):
        """The transform in its place next to ``base`` (default heavy-ball SGD), or alone
        (see ``alone``); ``tx`` replaces the transform built from the registry."""
        if tx is None:
            tx = self.transform(symmetries, loss=loss, path_norm=path_norm, **overrides)
        if self.alone:
            return tx
        base = optax.sgd(0.1, momentum=0.9) if base is None else base
        return optax.chain(tx, base) if self.first else optax.chain(base, tx)

    def accepts(self, symmetries) -> bool:
        """Whether every declaration in ``symmetries`` is of a kind the transform takes."""
        return not self.declarations or all(s.kind in self.kinds for s in symmetries)

    def is_slow(self, battery: str, check: str | None = None) -> bool:
        """Whether the entry (or one contract check of it) runs only under ``-m slow``."""
        return battery in self.slow or (check is not None and f"{battery}.{check}" in self.slow)

    def __repr__(self) -> str:
        return self.name


# --------------------------------------------------------------------------- adapters


def _ignoring_symmetries(factory: Callable) -> Callable:
    """A factory for a peer optimizer that takes no symmetry declarations.

    It keeps the factory's named parameters in its signature, so that
    ``optax.inject_hyperparams`` sees (and can schedule) them.
    """

    def make(symmetries, **hyperparams):
        del symmetries
        return factory(**hyperparams)

    first = inspect.Parameter("symmetries", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    rest = list(inspect.signature(factory).parameters.values())
    make.__signature__ = inspect.Signature([first, *rest])
    return make


def sum_of_squares(squared: Any) -> jax.Array:
    """A scalar of the squared weights, standing in for a path norm (interface checks only)."""
    return sum(jnp.sum(x) for x in jax.tree.leaves(squared))


def _passing_grad(tx: optax.GradientTransformationExtraArgs):
    """``targets.nld`` reads the raw gradient (``grad=``); the batteries call ``update``
    without it, so give it the incoming updates (the gradient when the transform is alone,
    as in the edge cases). The tests of the target itself feed the real gradient."""

    def update(updates, state, params=None, **extra):
        extra.setdefault("grad", updates)
        return tx.update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(tx.init, update)


def _monitor(make_tx: Callable, make_dynamics: Callable | None = None) -> Callable:
    """``monitor(make_tx(symmetries, lr), symmetries, ...)``: with the exact-recursion
    ``dynamics`` built from the same learning rate, or with ``learning_rate`` alone."""

    def factory(symmetries, learning_rate=0.1):
        tx = make_tx(symmetries, learning_rate)
        if make_dynamics is None:
            return ksbopt.monitor(tx, symmetries, learning_rate=learning_rate)
        return ksbopt.monitor(tx, symmetries, dynamics=make_dynamics(learning_rate))

    return factory


# --------------------------------------------------------------------------- the registry

_SCALE = frozenset({"scale"})
# For the contract's flax MLP: a Scale of its hidden units (for transforms that take Scale
# only; the default is a Rescale of the same units).
_FLAX_SCALE = (ksbopt.Scale(["l1/kernel", "l1/bias"], axis=-1),)
_PEER = {"role": "peer", "nonfinite": "wrapped", "declarations": False, "slow": ("contract",)}

TRANSFORMS: tuple[Spec, ...] = (
    # ---- the pass-through transforms
    Spec("project", ksbopt.project, first=True),
    Spec("retract", ksbopt.retract, conserves=True),
    Spec(
        "steer",
        ksbopt.steer,
        hyperparams={"target": 1.5, "rate": 0.5},
        schedules={
            "target": optax.linear_schedule(1.0, 2.0, 3),
            "rate": optax.linear_schedule(0.25, 1.0, 3),
        },
    ),
    Spec(
        "steer_equilibrium",
        lambda sym, rate=1.0: ksbopt.steer(sym, T.equilibrium(0.1, 5e-4, 0.9), rate),
        hyperparams={"rate": 0.5},
        kinds=_SCALE,
        flax_symmetries=_FLAX_SCALE,
    ),
    # Its contract checks are those that exercise the target's own state (jit, wrappers,
    # dtypes, non-finite input); the others test steer itself, through steer_equilibrium.
    # Its check_extra_args: "grad" is the argument it consumes.
    Spec(
        "steer_nld",
        lambda sym, rate=1.0: _passing_grad(ksbopt.steer(sym, T.nld(0.1, 5e-4, 0.9), rate)),
        hyperparams={"rate": 0.5},
        kinds=_SCALE,
        contract_checks=(
            "check_jit",
            "check_multi_steps",
            "check_apply_if_finite",
            "check_nonfinite",
            "check_bfloat16",
        ),
        slow=("edge",),
    ),
    # ---- ksbopt's optimizers and wrappers
    Spec(
        "symmetrize",
        lambda sym, learning_rate: ksbopt.symmetrize(optax.adam(learning_rate), sym),
        hyperparams={"learning_rate": 0.05},
        role="optimizer",
        first=True,
        nonfinite="all",
        kinds=frozenset({"scale", "translation"}),
        flax_symmetries=_FLAX_SCALE,
    ),
    Spec(
        "noether_rmsprop",
        lambda sym, learning_rate=0.1, weight_decay=1e-2, momentum=0.9: ksbopt.noether_rmsprop(
            sym, learning_rate, weight_decay, momentum
        ),
        hyperparams={"learning_rate": 0.1, "weight_decay": 1e-2, "momentum": 0.9},
        schedules={"learning_rate": optax.linear_schedule(0.1, 0.05, 3)},
        role="optimizer",
        first=True,
        nonfinite="all",
        kinds=_SCALE,
        flax_symmetries=_FLAX_SCALE,
    ),
    Spec(
        "noether_rmsprop_nld",
        lambda sym, learning_rate=0.1, weight_decay=1e-2, momentum=0.9: ksbopt.noether_rmsprop(
            sym, learning_rate, weight_decay, momentum, mode="nld"
        ),
        hyperparams={"learning_rate": 0.1, "weight_decay": 1e-2, "momentum": 0.9},
        role="optimizer",
        first=True,
        nonfinite="all",
        kinds=_SCALE,
        flax_symmetries=_FLAX_SCALE,
        slow=("contract", "edge"),
    ),
    Spec(
        "scale_by_noether_rmsprop",
        lambda sym, learning_rate=0.1, weight_decay=1e-2, momentum=0.9: (
            ksbopt.scale_by_noether_rmsprop(sym, learning_rate, weight_decay, momentum)
        ),
        hyperparams={"learning_rate": 0.1, "weight_decay": 1e-2, "momentum": 0.9},
        schedules={"learning_rate": optax.linear_schedule(0.1, 0.05, 3)},
        role="optimizer",
        first=True,
        block=True,
        nonfinite="all",
        kinds=_SCALE,
        flax_symmetries=_FLAX_SCALE,
    ),
    Spec(
        "teleport",
        lambda sym, every=1, step_size=0.1, *, value_fn: ksbopt.teleport(
            optax.sgd(0.1, momentum=0.9), sym, every, 2, step_size, rho=1.0, value_fn=value_fn
        ),
        hyperparams={"every": 1, "step_size": 0.1},
        schedules={"step_size": optax.linear_schedule(0.1, 0.3, 3)},
        role="optimizer",
        alone=True,
        problem_args=("value_fn",),
        nonfinite="all",
    ),
    # The monitor returns the wrapped optimizer's updates unchanged, NaN included.
    Spec(
        "monitor",
        _monitor(lambda s, lr: optax.sgd(lr, momentum=0.9), lambda lr: D.sgd(lr, 0.9)),
        hyperparams={"learning_rate": 0.1},
        schedules={"learning_rate": optax.linear_schedule(0.1, 0.05, 3)},
        role="optimizer",
        alone=True,
        nonfinite="wrapped",
        slow=("contract.check_nnx", "contract.check_linen"),
    ),
    Spec(
        "monitor_adam",
        _monitor(lambda s, lr: optax.adam(lr), D.adam),
        hyperparams={"learning_rate": 1e-2},
        role="optimizer",
        alone=True,
        nonfinite="wrapped",
        slow=("contract", "edge"),
    ),
    Spec(
        "monitor_retract",
        _monitor(lambda s, lr: optax.chain(optax.sgd(lr, momentum=0.9), ksbopt.retract(s))),
        hyperparams={"learning_rate": 0.1},
        role="optimizer",
        alone=True,
        nonfinite="wrapped",
        slow=("contract",),
    ),
    # ---- the peers' ports: interface contract (their numerics: test_peers.py)
    Spec(
        "sgdp",
        _ignoring_symmetries(ksbopt.peers.sgdp),
        {"learning_rate": 0.05, "weight_decay": 1e-3},
        alone=True,
        **_PEER,
    ),
    Spec(
        "scale_by_sgdp",
        _ignoring_symmetries(ksbopt.peers.scale_by_sgdp),
        {"momentum": 0.9},
        first=True,
        block=True,
        **_PEER,
    ),
    Spec(
        "adamp",
        _ignoring_symmetries(ksbopt.peers.adamp),
        {"learning_rate": 0.01, "weight_decay": 1e-3},
        alone=True,
        **_PEER,
    ),
    Spec(
        "scale_by_adamp",
        _ignoring_symmetries(ksbopt.peers.scale_by_adamp),
        {"b1": 0.9},
        first=True,
        block=True,
        **_PEER,
    ),
    Spec(
        "nero",
        _ignoring_symmetries(ksbopt.peers.nero),
        {"learning_rate": 0.01},
        alone=True,
        **_PEER,
    ),
    # (params only when it has constraints)
    Spec(
        "scale_by_nero",
        _ignoring_symmetries(ksbopt.peers.scale_by_nero),
        {"beta": 0.999},
        first=True,
        block=True,
        needs_params=False,
        **_PEER,
    ),
    Spec(
        "nero_retraction", _ignoring_symmetries(ksbopt.peers.nero_retraction), block=True, **_PEER
    ),
    Spec(
        "rotational",
        _ignoring_symmetries(
            lambda learning_rate, weight_decay: ksbopt.peers.rotational(
                optax.trace(0.9), learning_rate, weight_decay, momentum=0.9
            )
        ),
        {"learning_rate": 0.05, "weight_decay": 0.01},
        alone=True,
        **_PEER,
    ),
    Spec(
        "path_sgd",
        _ignoring_symmetries(
            lambda learning_rate, *, path_norm_fn: ksbopt.peers.path_sgd(
                learning_rate, path_norm_fn=path_norm_fn
            )
        ),
        {"learning_rate": 0.05},
        alone=True,
        problem_args=("path_norm_fn",),
        **_PEER,
    ),
    Spec(
        "scale_by_path_norm",
        _ignoring_symmetries(lambda *, path_norm_fn: ksbopt.peers.scale_by_path_norm(path_norm_fn)),
        first=True,
        problem_args=("path_norm_fn",),
        block=True,
        **_PEER,
    ),
)

BY_NAME = {spec.name: spec for spec in TRANSFORMS}


def get(name: str) -> Spec:
    """The entry called ``name``."""
    return BY_NAME[name]


def optimizers() -> tuple[Spec, ...]:
    """Every entry a user trains with (building blocks left out)."""
    return tuple(spec for spec in TRANSFORMS if not spec.block)


def of_role(role: str) -> tuple[Spec, ...]:
    """The entries of one role (``"transform"``, ``"optimizer"``, ``"peer"``)."""
    return tuple(spec for spec in TRANSFORMS if spec.role == role)
