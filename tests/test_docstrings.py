"""Every public name has a complete docstring and a place in the API reference.

The public names are ``ksbopt.__all__`` and the ``__all__`` of every public module (each
module of the package whose name does not start with ``_``); ``docs/_ext/apicheck.py`` finds
them, and the Sphinx build uses the same list. Each docstring (Google style, rendered by
napoleon) must have:

- a one-line summary ending with a period, followed by a blank line;
- the math: a ``.. math::`` block, a ``:math:`` role, or an equation written as a literal
  (a ``::`` block or an inline double-backquoted formula with `` = ``, ``^`` or a TeX
  command); names in ``NO_MATH`` state why they have none;
- ``Args:`` naming every parameter of the signature (``Attributes:`` for the fields of a
  state container), where the object takes arguments;
- ``Returns:`` (or ``Yields:``) for a function that returns a value;
- an ``Example:`` with ``>>>`` lines (they run as doctests: ``pytest --doctest-modules``);
- ``References:`` with a paper title in quotes and an arXiv link, or a stated reason that
  begins with ``None:`` where no paper applies.

The doctests themselves run in the default suite (``addopts = --doctest-modules``); these
checks only read the text (the file's time is the import of ksbopt).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import pathlib
import re
from types import ModuleType

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
API_DIR = ROOT / "docs" / "api"


def _load_apicheck():
    spec = importlib.util.spec_from_file_location("apicheck", ROOT / "docs/_ext/apicheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


apicheck = _load_apicheck()
PUBLIC = apicheck.public_names()
OBJECTS = {name: obj for name, obj in PUBLIC.items() if not isinstance(obj, ModuleType)}
MODULES = {name: obj for name, obj in PUBLIC.items() if isinstance(obj, ModuleType)}

# Names whose docstring has no formula, and why. Everything else states its math.
NO_MATH = {
    "ksbopt.Symmetry": "abstract base class; each subclass states its action and charge",
    "ksbopt.peers.NeroRetractionState": "empty state container of nero_retraction",
    "ksbopt.peers.ScaleByPathNormState": "empty state container of scale_by_path_norm",
    "ksbopt.History": "a table of recorded numbers; NoetherDiagnostics defines them",
    "ksbopt.Recorder": "host-side bookkeeping; NoetherDiagnostics defines what it records",
    "ksbopt.summarize": "flattens recorded numbers into a dict; no formula of its own",
    "ksbopt.SymmetryReport": "a list of SymmetryCheck results; SymmetryCheck has the math",
    "ksbopt.targets.Target": "abstract base class of targets; each target states its charge",
    "ksbopt.targets.schedule": "the target is the user's function of the step",
    "ksbopt.theory.NLD_COEFFICIENTS": "a tuple of names; nld_coefficient has the formulas",
    "ksbopt.flax.param_paths": "lists path strings; no formula",
    "ksbopt.bench.host.setting": "reads back what reuse_large_buffers set; that one states it",
    "ksbopt.bench.advantage.is_kinetic_energy": "reads the registry; no formula",
    "ksbopt.bench.advantage.markdown": "formats advantages' numbers; advantages has the math",
    "ksbopt.bench.agreement.Verdict": "a record of one suite's verdict; Pair has the rule",
    "ksbopt.bench.agreement.markdown": "formats compare's pairs; Pair has the rule",
    "ksbopt.bench.agreement.main": "reads two summaries and prints markdown; Pair has the rule",
    "ksbopt.flax.nnx_loss": "builds a loss function from a model; no formula",
    "ksbopt.flax.linen_loss": "builds a loss function from a model; no formula",
    "ksbopt.bench.make_task": "a container of user parts; the harness's protocol is compare's",
    "ksbopt.bench.Results": "reads the files a benchmark wrote; no formula of its own",
}

# Plain data (not classes or functions) need only a summary: they are documented in the
# reference by a py:data directive.
DATA = {name for name, obj in OBJECTS.items() if not (inspect.isclass(obj) or callable(obj))}

SECTION = re.compile(r"^(\w[\w ]*):\s*$")
# A paper is cited by a resolvable link: arXiv, or a DOI for work that predates arXiv.
PAPER_LINK = re.compile(r"https://arxiv\.org/abs/\d{4}\.\d{4,5}|https://doi\.org/10\.\d{4,9}/\S+")


LITERAL = re.compile(r"``([^`]+)``")
EQUATION = re.compile(r"\s=\s|\^|\\[a-zA-Z]+")


def _has_math(doc: str) -> bool:
    if ".. math::" in doc or ":math:" in doc:
        return True
    if any(EQUATION.search(m) for m in LITERAL.findall(doc)):
        return True
    # a literal block: the lines indented below a line that ends with "::"
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.rstrip().endswith("::"):
            indent = len(line) - len(line.lstrip())
            for nxt in lines[i + 1 :]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                if EQUATION.search(nxt):
                    return True
    return False


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__ or "")


def _sections(doc: str) -> dict[str, str]:
    """Top-level Google-style sections (``Name:`` alone on an unindented line) -> body."""
    out: dict[str, list[str]] = {}
    current = None
    for line in doc.splitlines():
        match = SECTION.match(line)
        if match and not line.startswith(" "):
            current = match.group(1)
            out[current] = []
        elif current is not None:
            if line and not line.startswith(" "):
                current = None  # back to free text
            else:
                out[current].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def _documented_names(body: str) -> set[str]:
    """Parameter names introduced in an Args/Attributes body: ``name:`` or ``a, b:``."""
    lines = body.splitlines()
    indents = [len(x) - len(x.lstrip()) for x in lines if x.strip()]
    base = min(indents, default=0)
    names: set[str] = set()
    for line in lines:
        if line.strip() and len(line) - len(line.lstrip()) == base and ":" in line:
            head = line.split(":", 1)[0]
            for part in head.split(","):
                part = part.strip().lstrip("*")
                part = part.split(" ", 1)[0].split("(", 1)[0]
                if part:
                    names.add(part)
    return names


def _parameters(obj) -> list[str]:
    """Names the caller passes: function parameters, or a class's constructor fields."""
    if inspect.isclass(obj) and hasattr(obj, "_fields"):  # NamedTuple state
        return list(obj._fields)
    if inspect.isclass(obj) and inspect.isabstract(obj):
        return []  # never constructed by the user
    params = inspect.signature(obj).parameters.values()
    # ``*args`` / ``**kwargs`` that are only passed through carry no meaning of their own
    return [
        p.name
        for p in params
        if not (p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name in ("args", "kwargs"))
    ]


def _returns_value(obj) -> bool:
    if inspect.isclass(obj):
        return False
    annotation = inspect.signature(obj).return_annotation
    return annotation not in (None, "None")


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_summary_line(name):
    doc = _doc(PUBLIC[name])
    lines = doc.splitlines()
    assert lines and lines[0].strip(), f"{name}: no docstring"
    assert lines[0].rstrip().endswith("."), f"{name}: summary {lines[0]!r} must end with '.'"
    assert len(lines) == 1 or not lines[1].strip(), (
        f"{name}: the summary must be ONE line followed by a blank line; got {lines[:2]!r}"
    )


@pytest.mark.parametrize("name", sorted(set(OBJECTS) - DATA))
def test_math(name):
    doc = _doc(OBJECTS[name])
    if name in NO_MATH:
        return
    assert _has_math(doc), (
        f"{name}: state the formula in a '.. math::' block, with :math:`...` or as a literal "
        "equation (or add the name to NO_MATH with the reason)"
    )


@pytest.mark.parametrize("name", sorted(set(OBJECTS) - DATA))
def test_args_document_every_parameter(name):
    obj = OBJECTS[name]
    params = _parameters(obj)
    if not params:
        return
    sections = _sections(_doc(obj))
    # a NamedTuple state or a dataclass record describes its fields under Attributes
    is_container = inspect.isclass(obj) and (
        hasattr(obj, "_fields") or dataclasses.is_dataclass(obj)
    )
    key = "Attributes" if is_container and "Args" not in sections else "Args"
    assert key in sections, f"{name}: needs an '{key}:' section for {params}"
    documented = _documented_names(sections[key])
    missing = [p for p in params if p not in documented]
    assert not missing, f"{name}: '{key}:' does not describe {missing} (has {sorted(documented)})"


@pytest.mark.parametrize("name", sorted(n for n in set(OBJECTS) - DATA))
def test_returns(name):
    obj = OBJECTS[name]
    if not _returns_value(obj):
        return
    sections = _sections(_doc(obj))
    assert "Returns" in sections or "Yields" in sections, f"{name}: needs a 'Returns:' section"
    assert sections.get("Returns", sections.get("Yields", "")).strip()


@pytest.mark.parametrize("name", sorted(set(OBJECTS) - DATA))
def test_example_runs_as_doctest(name):
    doc = _doc(OBJECTS[name])
    sections = _sections(doc)
    example = sections.get("Example", sections.get("Examples"))
    assert example is not None, f"{name}: needs an 'Example:' section"
    assert ">>>" in example, f"{name}: the example must be doctest lines ('>>> ...')"


@pytest.mark.parametrize("name", sorted(set(OBJECTS) - DATA))
def test_references(name):
    sections = _sections(_doc(OBJECTS[name]))
    assert "References" in sections, f"{name}: needs a 'References:' section"
    body = " ".join(sections["References"].split())
    if body.startswith("None:"):
        assert len(body.split()) >= 6, f"{name}: state why no paper applies, in a sentence"
        return
    assert PAPER_LINK.search(body), (
        f"{name}: references need an arXiv link (https://arxiv.org/abs/...) or a DOI "
        "(https://doi.org/...)"
    )
    assert re.search(r'"[^"]{8,}"', body), f"{name}: give the paper's title in quotes"


# ------------------------------------------------------------------ the API reference pages

DIRECTIVE = re.compile(r"^\s*\.\. (?:auto\w+|py:\w+):: ([\w.]+)(.*?)(?=^\s*\.\. |\Z)", re.M | re.S)
MODULE_OPTION = re.compile(r":module: ([\w.]+)")


def _names_in_api_pages() -> set[str]:
    names: set[str] = set()
    for page in sorted(API_DIR.glob("*.md")):
        for match in DIRECTIVE.finditer(page.read_text()):
            name, rest = match.group(1), match.group(2)
            module = MODULE_OPTION.search(rest)
            names.add(f"{module.group(1)}.{name}" if module and "." not in name else name)
    return names


def test_public_names_are_found():
    # Guards the discovery itself: the reference would be vacuous if nothing were found.
    assert "ksbopt.retract" in PUBLIC and "ksbopt.theory.scale_sgd_step" in PUBLIC
    assert {"ksbopt.targets", "ksbopt.theory", "ksbopt.flax", "ksbopt.plotting"} <= set(MODULES)


def test_every_public_name_is_in_the_api_reference():
    missing = sorted(set(PUBLIC) - _names_in_api_pages())
    assert not missing, (
        f"public names missing from docs/api/*.md: {missing}; add an autodoc directive for "
        "each (the Sphinx build fails on them too)"
    )


def test_api_reference_names_exist():
    stale = sorted(n for n in _names_in_api_pages() if n not in PUBLIC)
    assert not stale, f"docs/api/*.md documents names that are not public (any more): {stale}"
