"""Every public transform passes the shared contract battery (tests/support/contract.py).

A new transform is one more ``contract.Spec`` in ``contract.TRANSFORMS`` (or a Spec and a
``contract.CHECKS`` parametrisation in its own test file). The peers' ports run the same
battery under ``-m slow`` (about a minute: ten more optimizers).
"""

from __future__ import annotations

import ast
import inspect
import pathlib

import pytest
from support import contract

import ksbopt

_IDS = {"ids": lambda c: c.__name__[len("check_") :]}


@pytest.mark.parametrize("check", contract.CHECKS, **_IDS)
@pytest.mark.parametrize("spec", contract.TRANSFORMS, ids=repr)
def test_contract(spec, check):
    check(spec)


@pytest.mark.slow
@pytest.mark.parametrize("check", contract.CHECKS, **_IDS)
@pytest.mark.parametrize("spec", contract.PEERS, ids=repr)
def test_contract_peers(spec, check):
    check(spec)


def _public_transform_factories() -> set[str]:
    """Names in ``ksbopt.__all__`` of functions annotated to return a GradientTransformation."""
    names = set()
    for name in ksbopt.__all__:
        obj = getattr(ksbopt, name)
        if inspect.isfunction(obj):
            ret = inspect.signature(obj).return_annotation
            if "GradientTransformation" in str(ret):
                names.add(name)
    return names


def _specs_in_test_files() -> set[str]:
    """Names of every ``contract.Spec("name", ...)`` written in tests/*.py ("monitor(adam)"
    counts for "monitor")."""
    names = set()
    for path in pathlib.Path(__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", None)) == "Spec"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                names.add(node.args[0].value.split("(")[0])
    return names


def test_every_public_transform_is_in_the_battery():
    public = _public_transform_factories()
    assert {"project", "retract", "steer"} <= public, public
    covered = {s.name for s in contract.TRANSFORMS + contract.PEERS} | _specs_in_test_files()
    missing = public - covered
    assert not missing, (
        f"public transforms {sorted(missing)} have no contract.Spec; add one entry to "
        "contract.TRANSFORMS (or a Spec run over contract.CHECKS in their own test file)."
    )
