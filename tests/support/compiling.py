"""Compiling test programs: fast XLA options and trace counting."""

from __future__ import annotations

import functools
from collections.abc import Callable

import chex
import jax

# XLA's CPU backend spends nearly all of a test's time compiling (~1 s per small program).
# For programs this small its optimisation passes and new fusion emitters buy nothing; with
# these options they compile 2-4x faster. Both keep IEEE semantics (no fast math), so the
# exactness tolerances are unaffected. If a future XLA drops an option, fall back to none.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


@functools.cache
def compiler_options() -> dict | None:
    try:
        jax.jit(lambda x: x + 1).lower(1.0).compile(FAST_COMPILE)
    except Exception:  # an unknown option on another XLA version / backend
        return None
    return FAST_COMPILE


def jit(fn: Callable, **kwargs) -> Callable:
    """``jax.jit`` with :data:`FAST_COMPILE` (for the test programs, not the code under test)."""
    return jax.jit(fn, compiler_options=compiler_options(), **kwargs)


class TraceCounter:
    """Wrap a function and count how often JAX traces it (a Python call under ``jit``)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.count = 0
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        self.count += 1
        return self.fn(*args, **kwargs)


def jit_max_traces(fn: Callable, n: int = 1) -> Callable:
    """``jax.jit(fn)`` that fails (chex.assert_max_traces) when traced more than ``n`` times."""
    chex.clear_trace_counter()
    return jit(chex.assert_max_traces(fn, n=n))
