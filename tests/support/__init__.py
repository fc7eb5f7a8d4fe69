"""The test-support package: assertions, compiling, toy problems, the transforms under test.

- :mod:`support.asserts`: tolerance-explicit tree comparisons (``assert_close``, ``rel_err``).
- :mod:`support.compiling`: ``jit`` with fast XLA options, trace counting.
- :mod:`support.problems`: exactly symmetric toy problems (:class:`support.problems.Case`).
- :mod:`support.registry`: the one list of transforms under test, read by every battery.
- :mod:`support.contract`: the contract battery run over the registry.
- :mod:`support.sharding_check`: the sharding checks, run as a script on 8 CPU devices.
- :mod:`support.bench_cli`: the benchmark command line run in-process (``run_cli``).

Test files ``import support`` and use the flat names re-exported below.
"""

from .asserts import (
    assert_close,
    assert_dtypes,
    assert_equal,
    assert_finite,
    assert_rel_close,
    rel_err,
)
from .compiling import FAST_COMPILE, TraceCounter, compiler_options, jit, jit_max_traces
from .problems import (
    ALL_CASES,
    CASES_BY_NAME,
    OVERLAP_CASES,
    SINGLE_CASES,
    Case,
    charge_errors,
    random_like,
    symmetry_leaves,
    train,
)

__all__ = [
    "ALL_CASES",
    "CASES_BY_NAME",
    "FAST_COMPILE",
    "OVERLAP_CASES",
    "SINGLE_CASES",
    "Case",
    "TraceCounter",
    "assert_close",
    "assert_dtypes",
    "assert_equal",
    "assert_finite",
    "assert_rel_close",
    "charge_errors",
    "compiler_options",
    "jit",
    "jit_max_traces",
    "random_like",
    "rel_err",
    "symmetry_leaves",
    "train",
]
