"""docs/errors.md documents every error ksbopt raises, with its message.

A *raise site* is ``raise SomeError(message)`` in ``ksbopt/`` (the harness ``ksbopt/bench/``
included) or ``benchmarks/``, or a ``parser.error(message)`` call of the benchmark CLI. Its
*template* is the message with every value the code formats into it written as a placeholder
``{...}`` (f-string fields, string concatenation of variables, ``str.format``). The page must
quote every template in a ```` ```text ```` block: the fixed text verbatim (whitespace may
differ), any placeholder text inside braces where the code formats a value. And every ````
```text ```` block of the page must still be the template of some raise site (no stale
messages).

So a new ``raise`` or a reworded message fails here until the page says what it means and
how to fix it; a message that is only placeholders (``raise ValueError(msg)``) fails too:
the fixed text is what users search for. Exempt: bare re-raises, ``NotImplementedError``
stubs without a message, and the jaxpr analysis' own exception classes (control flow caught
inside the analysis, never seen by users: checked below).
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "errors.md"
SOURCES = ("ksbopt", "benchmarks")
# Exceptions that steer the jaxpr analysis: defined in findings.py, raised by the interpreters
# and their primitive rules, caught by the analysis; no other module sees them.
INTERNAL_EXCEPTIONS = ("Broken", "Ambiguous", "NeedUniform")
INTERNAL = {
    f"ksbopt/_src/detection/{module}.py": INTERNAL_EXCEPTIONS
    for module in ("findings", "interpreter", "multiplicative_rules", "shift_rules", "analyser")
}
# A message must carry at least this much fixed text to be findable on the page.
MIN_FIXED = 12

LIT, HOLE = "lit", "hole"


@dataclasses.dataclass(frozen=True)
class Site:
    path: str  # relative to the repository root
    line: int
    function: str
    error: str  # the exception type, or "parser.error"
    parts: tuple  # ((LIT, text) | (HOLE, source), ...)

    @property
    def template(self) -> str:
        return "".join(t if k == LIT else "{" + t + "}" for k, t in self.parts)

    @property
    def fixed(self) -> int:
        return sum(len(t.strip()) for k, t in self.parts if k == LIT)

    def regex(self) -> re.Pattern:
        out = []
        for kind, text in self.parts:
            if kind == HOLE:
                out.append(r"\{[^{}\n]*\}")
            else:
                out.extend(
                    r"\s+" if w.isspace() else re.escape(w) for w in re.split(r"(\s+)", text)
                )
        return re.compile("".join(x for x in out if x))

    def __str__(self) -> str:
        return f"{self.path}:{self.line} ({self.function}) {self.error}: {self.template}"


def _format_parts(text: str) -> list:
    """``"a {} b {x}".format(...)``: the braces of the format string are holes."""
    parts, pos = [], 0
    for m in re.finditer(r"\{[^{}]*\}", text):
        parts += [(LIT, text[pos : m.start()]), (HOLE, m.group(0)[1:-1] or "...")]
        pos = m.end()
    return [*parts, (LIT, text[pos:])]


def _parts(node: ast.AST) -> list:
    """The template of a message expression as literal pieces and holes."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [(LIT, node.value)]
    if isinstance(node, ast.JoinedStr):
        out = []
        for v in node.values:
            if isinstance(v, ast.FormattedValue):
                conv = {-1: "", 115: "!s", 114: "!r", 97: "!a"}[v.conversion]
                out.append((HOLE, ast.unparse(v.value) + conv))
            else:
                out += _parts(v)
        return out
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _parts(node.left) + _parts(node.right)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("format", "strip", "rstrip", "lstrip")
        and isinstance(node.func.value, (ast.Constant, ast.JoinedStr, ast.BinOp))
    ):
        inner = _parts(node.func.value)
        if node.func.attr == "format":
            inner = [p for k, t in inner for p in (_format_parts(t) if k == LIT else [(k, t)])]
        return inner  # .strip() and friends keep the text
    return [(HOLE, ast.unparse(node))]


def _merge(parts: list) -> tuple:
    out: list = []
    for kind, text in parts:
        if out and kind == LIT and out[-1][0] == LIT:
            out[-1] = (LIT, out[-1][1] + text)
        elif kind == HOLE or text:
            out.append((kind, text))
    return tuple(out)


def _name(node: ast.AST) -> str:
    return node.id if isinstance(node, ast.Name) else ast.unparse(node)


def raise_sites() -> tuple[list[Site], list[str]]:
    """Every raise site, and the problems found (no message, message without fixed text)."""
    sites, problems = [], []
    for top in SOURCES:
        for file in sorted((ROOT / top).rglob("*.py")):
            rel = file.relative_to(ROOT).as_posix()
            tree = ast.parse(file.read_text())
            internal = INTERNAL.get(rel, ())
            for func in ast.walk(tree):
                if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module)):
                    continue
                name = getattr(func, "name", "<module>")
                for node in _own_nodes(func):
                    site = _site(node, rel, name, internal, problems, top)
                    if site is not None:
                        sites.append(site)
    return sites, problems


def _own_nodes(func: ast.AST):
    """Nodes of ``func`` that are not inside a nested function (each site counted once)."""
    stack = list(ast.iter_child_nodes(func))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _site(node, rel, name, internal, problems, top) -> Site | None:
    if isinstance(node, ast.Raise):
        exc = node.exc
        if exc is None:
            return None  # re-raise
        call = exc if isinstance(exc, ast.Call) else None
        error = _name(call.func if call else exc)
        if error in internal:
            return None
        args = call.args if call else []
        if not args:
            if error != "NotImplementedError":
                problems.append(f"{rel}:{node.lineno} raises {error} without a message")
            return None
        msg = args[0]
    elif (
        (top == "benchmarks" or rel.startswith("ksbopt/bench/"))
        and isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "error"
        and _name(node.func.value) in ("p", "parser")
        and node.args
    ):
        error, msg = "parser.error", node.args[0]
    else:
        return None
    site = Site(rel, node.lineno, name, error, _merge(_parts(msg)))
    if site.fixed < MIN_FIXED:
        problems.append(f"{site}: the message has almost no fixed text; write it out")
    return site


def page_blocks() -> list[str]:
    """The ```text blocks of docs/errors.md, each whitespace-normalised."""
    text = PAGE.read_text()
    blocks = re.findall(r"^```text[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    return [" ".join(b.split()) for b in blocks]


SITES, PROBLEMS = raise_sites()


def test_sites_are_found():
    # The scan sees the errors it must (a broken scanner would pass everything below).
    where = {(s.path, s.error) for s in SITES}
    assert ("ksbopt/_src/groups.py", "ValueError") in where
    assert ("ksbopt/_src/symmetries/declarations.py", "TypeError") in where
    assert ("ksbopt/bench/cli.py", "parser.error") in where
    assert len(SITES) > 100, len(SITES)


def test_every_message_has_fixed_text():
    assert not PROBLEMS, "\n".join(PROBLEMS)


@pytest.mark.parametrize("site", SITES, ids=lambda s: f"{s.path}:{s.line}")
def test_every_raise_site_is_on_the_page(site):
    blocks = page_blocks()
    pattern = site.regex()
    assert any(pattern.fullmatch(b) or pattern.search(b) for b in blocks), (
        f"{site}\nis not documented: add to docs/errors.md, in the section where it fires, "
        f"a ```text block with\n{' '.join(site.template.split())}\n"
        "then what it means and how to fix it."
    )


def test_every_message_on_the_page_still_exists():
    patterns = [s.regex() for s in SITES]
    stale = [b for b in page_blocks() if not any(p.search(b) for p in patterns)]
    assert not stale, "docs/errors.md quotes messages no raise site has:\n" + "\n".join(stale)


def test_internal_exceptions_never_leave_the_analysis():
    caught = set()
    for rel in INTERNAL:
        for node in ast.walk(ast.parse((ROOT / rel).read_text())):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                types = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
                caught |= {_name(t) for t in types}
    assert set(INTERNAL_EXCEPTIONS) <= caught, set(INTERNAL_EXCEPTIONS) - caught
    # ... and no other module imports them (so none can raise or expect one).
    modules = {rel.removesuffix(".py").replace("/", ".") for rel in INTERNAL}
    for other in (ROOT / "ksbopt").rglob("*.py"):
        if other.relative_to(ROOT).as_posix() in INTERNAL:
            continue
        for node in ast.walk(ast.parse(other.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                assert not {a.name for a in node.names} & set(INTERNAL_EXCEPTIONS), other
            if isinstance(node, ast.Attribute) and node.attr in INTERNAL_EXCEPTIONS:
                raise AssertionError(f"{other} uses {ast.unparse(node)}")
