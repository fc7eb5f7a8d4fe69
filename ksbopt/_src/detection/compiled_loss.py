"""The loss as a compiled function of its floating-point leaves.

:func:`problem_of` checks the arguments of :func:`~ksbopt.detect` / :func:`~ksbopt.verify`,
splits the parameter tree into the differentiable leaves and the others, and traces the loss
once. :func:`value_and_grad` and :func:`loss_value` run it, compiled with options that keep
the compile time low (verification evaluates each compiled function only a handful of times).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from ksbopt._src import groups as groups_lib


def _check_batches(batches: tuple, name: str) -> None:
    if not batches:
        raise ValueError(
            f"ksbopt.{name} needs at least one batch: call ksbopt.{name}(..., loss_fn, params, "
            "batch) with loss_fn(params, batch) -> scalar; pass several batches to check the "
            "symmetry on each (a symmetry holds for every minibatch)."
        )


@dataclasses.dataclass(frozen=True, eq=False)
class _Spec:
    """Everything static about the loss (hashable: compiled functions are reused)."""

    loss_fn: Callable
    treedef: Any
    float_idx: tuple[int, ...]
    array_idx: tuple[int, ...]  # non-float array leaves, passed as arguments
    fixed: tuple[tuple[int, Any], ...]  # non-array leaves, held as they are
    has_aux: bool
    traced: dict = dataclasses.field(default_factory=dict)  # input avals -> ClosedJaxpr

    def _key(self):
        return (
            self.loss_fn,
            self.treedef,
            self.float_idx,
            self.array_idx,
            tuple((i, id(x)) for i, x in self.fixed),
            self.has_aux,
        )

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, _Spec) and self._key() == other._key()

    def call(self, float_leaves, array_leaves, batch):
        full: list = [None] * (len(self.float_idx) + len(self.array_idx) + len(self.fixed))
        for i, x in zip(self.float_idx, float_leaves, strict=False):
            full[i] = x
        for i, x in zip(self.array_idx, array_leaves, strict=False):
            full[i] = x
        for i, x in self.fixed:
            full[i] = x
        out = self.loss_fn(jax.tree_util.tree_unflatten(self.treedef, full), batch)
        if self.has_aux:
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise TypeError(
                    f"has_aux=True needs loss_fn to return (loss, aux); got {type(out).__name__}."
                )
            out = out[0]
        return out

    def call_traced(self, float_leaves, array_leaves, batch):
        """``call``, replaying the jaxpr already traced for these shapes when there is one
        (a Flax model is then traced once per detect, not once per compiled function)."""
        flat = jax.tree_util.tree_leaves((float_leaves, array_leaves, batch))
        closed = self.traced.get(_signature(flat))
        if closed is None:
            return self.call(float_leaves, array_leaves, batch)
        return jcore.jaxpr_as_fun(closed)(*flat)[0]


def _signature(flat: Sequence[Any]) -> tuple:
    return tuple((tuple(np.shape(x)), jnp.result_type(x)) for x in flat)


# Verification evaluates each compiled function a handful of times, so compile time counts
# as much as run time. On XLA:CPU, the MLIR fusion emitters and the full LLVM optimisation
# cost most of the compile time of a network's gradient (about 5.7 s of CPU for the 10M
# parameter CNN of benchmarks/bench_detect.py, against 2.8 s with the classic emitters at
# -O1, which run as fast there). Small models (compile time is all that counts) use -O0;
# from LARGE parameters on, -O1, with a separate forward-only function for the finite
# actions. An option that this XLA does not know is dropped (see :func:`options`).
_FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
_LARGE_CPU = {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False}
LARGE = 1 << 20


@functools.cache
def options(large: bool) -> dict | None:
    """The compiler options for a small or LARGE model, as far as this XLA accepts them."""
    if large and jax.default_backend() != "cpu":
        return None  # accelerators: XLA's defaults
    wanted = _LARGE_CPU if large else _FAST
    level = {"xla_backend_optimization_level": wanted["xla_backend_optimization_level"]}
    for opts in (wanted, level):
        try:
            jax.jit(lambda x: x + 1).lower(1.0).compile(opts)
        except Exception:  # an option unknown to this XLA version or backend
            continue
        return opts
    return None


def _vg(float_leaves, array_leaves, batch, spec: _Spec):
    return jax.value_and_grad(spec.call_traced)(float_leaves, array_leaves, batch)


def _value(float_leaves, array_leaves, batch, spec: _Spec):
    return spec.call_traced(float_leaves, array_leaves, batch)


@functools.cache
def _jitted(fn: Callable, large: bool) -> Callable:
    return jax.jit(fn, static_argnames=("spec",), compiler_options=options(large))


def is_large(float_leaves) -> bool:
    return sum(int(np.size(x)) for x in float_leaves) >= LARGE


def value_and_grad(float_leaves, array_leaves, batch, spec: _Spec):
    """The loss and its gradient (the one model evaluation per batch that the Lie check needs)."""
    fn = _jitted(_vg, is_large(float_leaves))
    return fn(float_leaves, array_leaves, batch, spec=spec)


def loss_value(float_leaves, array_leaves, batch, spec: _Spec):
    """The loss alone: a forward pass for large models, the gradient's function for small ones
    (one compile instead of two)."""
    if is_large(float_leaves):
        return _jitted(_value, True)(float_leaves, array_leaves, batch, spec=spec)
    return value_and_grad(float_leaves, array_leaves, batch, spec)[0]


def compile_loss_value(float_leaves, array_leaves, batch, spec: _Spec) -> None:
    """Compile what :func:`loss_value` will run, without running it."""
    if is_large(float_leaves):
        _jitted(_value, True).lower(float_leaves, array_leaves, batch, spec=spec).compile()


@dataclasses.dataclass
class Problem:
    """The loss as a function of the differentiable leaves."""

    leaves: list
    paths: list[str]
    float_idx: list[int]
    skipped: list[tuple[str, str]]
    spec: _Spec
    closed: Any  # the jaxpr traced on the first batch

    @property
    def float_leaves(self) -> list:
        return [self.leaves[i] for i in self.float_idx]

    @property
    def array_leaves(self) -> list:
        return [self.leaves[i] for i in self.spec.array_idx]

    def fn(self, float_leaves, batch):
        return self.spec.call(float_leaves, self.array_leaves, batch)


def problem_of(loss_fn: Callable, params: Any, batches: tuple, has_aux: bool, name: str) -> Problem:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn={loss_fn!r} must be a callable loss_fn(params, batch) -> scalar.")
    _check_batches(batches, name)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [groups_lib.path_str(p) for p, _ in flat]
    leaves = [x for _, x in flat]
    float_idx, array_idx, fixed, skipped = [], [], [], []
    for i, (p, x) in enumerate(zip(paths, leaves, strict=False)):
        dtype = getattr(x, "dtype", None)
        if dtype is None or not hasattr(x, "shape"):
            skipped.append((p, f"{type(x).__name__} leaf (not an array)"))
            fixed.append((i, x))
            continue
        if not jnp.issubdtype(dtype, jnp.floating):
            skipped.append((p, f"{dtype} leaf (not differentiable)"))
        elif np.size(x) == 0:
            skipped.append((p, "empty array"))
        else:
            float_idx.append(i)
            continue
        array_idx.append(i)
    if not float_idx:
        raise ValueError(
            f"params has no floating-point leaves to analyse (leaves: {paths}); "
            "pass the trainable parameters, e.g. variables['params'] or "
            "nnx.state(model, nnx.Param)."
        )
    spec = _Spec(loss_fn, treedef, tuple(float_idx), tuple(array_idx), tuple(fixed), has_aux)
    float_leaves = [leaves[i] for i in float_idx]
    arrays = [leaves[i] for i in array_idx]
    closed = jax.make_jaxpr(spec.call)(float_leaves, arrays, batches[0])
    spec.traced[_signature(jax.tree_util.tree_leaves((float_leaves, arrays, batches[0])))] = closed
    out = closed.out_avals[0] if len(closed.out_avals) == 1 else None
    if out is None or tuple(out.shape) != ():
        got = tuple(out.shape) if out is not None else f"{len(closed.out_avals)} outputs"
        hint = (
            " It returned several values: pass has_aux=True if it is (loss, aux)."
            if out is None
            else ""
        )
        raise ValueError(
            f"loss_fn must return a scalar loss; it returned {got}. Reduce it "
            f"(e.g. .mean()) inside loss_fn.{hint}"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"loss_fn must return a floating-point scalar; it returned {out.dtype}.")
    return Problem(leaves, paths, float_idx, skipped, spec, closed)
