"""The argument-checking module: one check and one message per kind of error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ksbopt._src import checks


def test_numbers_and_concrete_values():
    for x in (1, 0.5, np.float32(2.0), np.array(3.0), jnp.asarray(4.0)):
        assert checks.is_number(x), x
        assert checks.concrete_value(x) == float(x)
    for x in (True, "0.1", None, [0.1], jnp.ones(2), lambda k: 0.1):
        assert not checks.is_number(x), x
        assert checks.concrete_value(x) is None

    @jax.jit
    def traced(x):
        assert checks.is_number(x) and checks.concrete_value(x) is None
        checks.check_positive("f", "x", x, example=1.0)  # not inspected
        return x

    traced(-1.0)


@pytest.mark.parametrize(
    ("check", "value", "ok"),
    [
        (checks.check_positive, 1e-9, True),
        (checks.check_positive, 0.0, False),
        (checks.check_positive, float("nan"), False),
        (checks.check_nonnegative, 0.0, True),
        (checks.check_nonnegative, -1e-9, False),
        (checks.check_nonnegative, float("nan"), False),
        (checks.check_unit_interval, 0.0, True),
        (checks.check_unit_interval, 0.999, True),
        (checks.check_unit_interval, 1.0, False),
        (checks.check_unit_interval, -0.1, False),
        (checks.check_positive_int, 3, True),
        (checks.check_positive_int, 3.0, True),
        (checks.check_positive_int, 2.5, False),
        (checks.check_positive_int, 0, False),
    ],
)
def test_range_checks(check, value, ok):
    if ok:
        check("owner", "x", value, example=1)
    else:
        with pytest.raises(ValueError, match=r"^owner: x=.* e\.g\. x=1\.$"):
            check("owner", "x", value, example=1)


def test_schedules_are_not_range_checked():
    for check in (checks.check_positive, checks.check_unit_interval):
        check("owner", "x", lambda step: -1.0, example=1)
        check("owner", "x", jnp.array([-1.0, 2.0]), example=1)


def test_messages_name_owner_argument_value_and_fix():
    with pytest.raises(
        TypeError, match=r"owner: lr='a' \(type str\) must be a number, e\.g\. lr=0\.1\."
    ):
        checks.check_number("owner", "lr", "a", example=0.1)
    with pytest.raises(
        ValueError, match=r"owner: beta=1\.5 must be in \[0, 1\), e\.g\. beta=0\.9\."
    ):
        checks.check_unit_interval("owner", "beta", 1.5)
    with pytest.raises(ValueError, match=r"ksbopt\.f needs the current parameters: params=None"):
        checks.require_params(None, "ksbopt.f")
    checks.require_params({}, "ksbopt.f")


def test_transformation_check_names_owner_argument_and_fix():
    import optax

    checks.check_transformation(
        "ksbopt.f", "tx", optax.sgd(0.1), example="ksbopt.f(optax.sgd(0.1))"
    )
    with pytest.raises(TypeError, match=r"ksbopt.f: tx=.* \(type function\) is not an optax "):
        checks.check_transformation(
            "ksbopt.f", "tx", optax.adam, example="ksbopt.f(optax.sgd(0.1))"
        )
