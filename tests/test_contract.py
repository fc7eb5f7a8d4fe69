"""Every transform of the registry passes the shared contract battery (support.contract).

A new transform is one more ``Spec`` in ``support.registry.TRANSFORMS``; the checks that
apply to it (``contract.applicable``) run here. The peers' ports, the Adam-monitored and
retract-monitored optimizers and the second noether_rmsprop mode run under ``-m slow``
(about two minutes: a dozen more optimizers).
"""

from __future__ import annotations

import inspect

import pytest
from support import contract, registry

import ksbopt


def _cases():
    for spec in registry.TRANSFORMS:
        for check in contract.applicable(spec):
            name = check.__name__
            slow = spec.is_slow("contract", name)
            yield pytest.param(
                spec,
                check,
                id=f"{spec.name}-{name[len('check_') :]}",
                marks=pytest.mark.slow if slow else (),
            )


@pytest.mark.parametrize(("spec", "check"), list(_cases()))
def test_contract(spec, check):
    check(spec)


def _public_transform_factories() -> set[str]:
    """Names in ``ksbopt.__all__`` and ``ksbopt.peers.__all__`` of functions annotated to
    return a GradientTransformation."""
    names = set()
    for module in (ksbopt, ksbopt.peers):
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj):
                ret = inspect.signature(obj).return_annotation
                if "GradientTransformation" in str(ret):
                    names.add(name)
    return names


def test_every_public_transform_is_in_the_registry():
    public = _public_transform_factories()
    assert {"project", "retract", "steer"} <= public, public
    missing = public - set(registry.BY_NAME)
    assert not missing, (
        f"public transforms {sorted(missing)} have no entry in the registry of transforms "
        "under test; add a Spec to support.registry.TRANSFORMS."
    )


def test_every_entry_gets_the_core_checks():
    """No entry escapes the battery: jit, apply_if_finite and bfloat16 apply to all."""
    for spec in registry.TRANSFORMS:
        names = {c.__name__ for c in contract.applicable(spec)}
        assert {"check_jit", "check_apply_if_finite", "check_bfloat16"} <= names, spec
