"""Sphinx extension: fail the build when a public ksbopt name is missing from the reference.

The public names are ``ksbopt.__all__`` and the ``__all__`` of every public module: each
module of the ``ksbopt`` package whose name does not start with an underscore (found with
``pkgutil``, so a new public module is covered without editing this file). After all pages
are read (``env-check-consistency``), every such name must be a documented object of the
Python domain (``autofunction``, ``autoclass``, ``automodule``, ``py:data``, ...), otherwise
the build reports an error per missing name and exits with a non-zero status (with or
without ``-W``).

``tests/test_docstrings.py`` runs the same comparison against the text of ``docs/api/``
without building, so ``pytest`` catches a forgotten name too.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

# Sphinx is imported inside the hooks only, so that tests/test_docstrings.py can use
# public_names() without it.


def public_modules() -> list[str]:
    """Names of the public modules: ``ksbopt`` and its submodules without a leading ``_``."""
    import ksbopt

    names = ["ksbopt"]
    for info in pkgutil.iter_modules(ksbopt.__path__):
        if not info.name.startswith("_"):
            names.append(f"ksbopt.{info.name}")
    return sorted(names)


def public_names() -> dict[str, object]:
    """Every public dotted name (modules included) mapped to its object."""
    out: dict[str, object] = {}
    for modname in public_modules():
        module = importlib.import_module(modname)
        out[modname] = module
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            dotted = f"{modname}.{name}"
            if isinstance(obj, ModuleType):
                # a public module re-exported by name, e.g. ``ksbopt.theory`` or
                # ``ksbopt.bench.protocol``: its own ``__all__`` is public too
                dotted = obj.__name__
                for member in getattr(obj, "__all__", ()):
                    out[f"{dotted}.{member}"] = getattr(obj, member)
            out[dotted] = obj
    return out


def missing_names(documented: set[str]) -> list[str]:
    """The public names that are not in ``documented``, sorted."""
    return sorted(set(public_names()) - documented)


def _documented(env) -> set[str]:
    return {name for name, *_ in env.get_domain("py").get_objects()}


def _check(app, env) -> None:
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    missing = missing_names(_documented(env))
    for name in missing:
        logger.error(
            "public name %s is missing from the API reference: add an autodoc directive "
            "for it (e.g. '.. autofunction:: %s' inside an eval-rst block) to the matching "
            "page under docs/api/",
            name,
            name,
            type="apicheck",
        )
    if not missing:
        logger.info("apicheck: all %d public names are documented", len(public_names()))


def _fail(app, exception) -> None:
    # An error message alone fails the build only under -W; make the exit status non-zero
    # in every build so that a missing name can never pass unnoticed.
    if exception is None and missing_names(_documented(app.env)):
        app.statuscode = 1


def setup(app):
    app.connect("env-check-consistency", _check)
    app.connect("build-finished", _fail)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
