"""The built docs site: offline, typeset, with its gallery, and strict about bad input.

Fast tests check the two build-time scanners of docs/_ext on small inputs: the offline check
(a page loading anything from outside the site) and the benchmark tables (malformed JSON
names its file). The ``slow`` tests build the site at the gallery's tiny size (the command of
.ci/run, or reuse the build named by ``KSBOPT_DOCS_HTML``), scan it, open its pages in
headless Chromium (Debian's ``chromium``) with every host name unresolvable, and build a
copy of the docs with a broken reference, an undocumented public name, a remote image and an
example that raises, which must fail naming each. Chromium missing is a failure, not a skip:
``apt-get install -y chromium``. ``KSBOPT_DOCS_SCREENSHOTS=DIR`` keeps a screenshot of every
page opened.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

import benchtables  # noqa: E402
import offline  # noqa: E402
from sphinx.errors import ExtensionError  # noqa: E402

BUILD = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]


# ----------------------------------------------------------------------------- offline scan


def test_offline_scan_names_remote_and_missing_resources(tmp_path):
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "ok.js").write_text("")
    (tmp_path / "_static" / "a.css").write_text(
        "p {}\n@font-face { src: url('https://f.example/x.woff2') }"
    )
    (tmp_path / "page.html").write_text(
        "<html><head>\n"
        '<script src="_static/ok.js"></script>\n'
        '<script src="https://cdn.example/mathjax.js"></script>\n'
        '<link rel="stylesheet" href="//cdn.example/s.css">\n'
        '<link rel="canonical" href="https://example.org/page.html">\n'
        "</head><body>\n"
        '<a href="https://github.com/x">a link is not a resource</a>\n'
        '<img src="data:image/png;base64,AAAA">\n'
        '<img src="_images/missing.png">\n'
        "<style>body { background: url(http://img.example/b.png) }</style>\n"
        "</body></html>\n"
    )
    assert offline.find_remote(tmp_path) == [
        "page.html:3: https://cdn.example/mathjax.js (loads a resource from outside the site)",
        "page.html:4: //cdn.example/s.css (loads a resource from outside the site)",
        "page.html:9: _images/missing.png (loads a file the site does not have)",
        "page.html:10: http://img.example/b.png (loads a resource from outside the site)",
        "_static/a.css:2: https://f.example/x.woff2 (loads a resource from outside the site)",
    ]


# -------------------------------------------------------------------------- benchmark tables


def _results(tmp_path, monkeypatch, files: dict[str, object]) -> Path:
    root = tmp_path / "benchmarks" / "results"
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    monkeypatch.setattr(benchtables, "RESULTS", root)
    return root


ROW = {"min_ms": 1.0, "compile_s": 0.6, "peak_ratio": 1.0, "state_ratio": 1.0, "copies": None}
MICRO = {
    "command": "python -m benchmarks.bench_transforms --sizes 1",
    "devices": ["cpu:0"],
    "machine": "x86_64",
    "cpu_count": 2,
    "jax": "0.10.2",
    "optax": "0.2.8",
    "date": "2026-11-27 14:41:35",
    "results": [
        {
            "layout": "cnn",
            "size": 1.0,
            "params": 1011181,
            "leaves": 4,
            "bytes": 4044724,
            "load_average": [1.0, 1.1],
            "rows": [
                {
                    **ROW,
                    "variant": "optax.sgd(momentum=0.9)",
                    "baseline": "optax.sgd(momentum=0.9)",
                    "median_ms": 1.5,
                    "ratio": 1.0,
                    "ratio_floor": None,
                    "copies": 1.6,
                },
                {
                    **ROW,
                    "variant": "+ ksbopt.retract",
                    "baseline": "optax.sgd(momentum=0.9)",
                    "floor": "floor: exact retraction",
                    "median_ms": 3.0,
                    "ratio": 2.0,
                    "ratio_floor": 1.25,
                    "compile_s": 1.6,
                    "peak_ratio": 1.5,
                },
            ],
        }
    ],
}

MODELS = {
    "command": "python -m benchmarks.bench_models --models relu_mlp --sizes small",
    "cpu_cores": 2,
    "machine": "x86_64",
    "versions": {"jax": "0.10.2"},
    "devices": ["cpu:0"],
    "results": [
        {
            "model": "relu_mlp",
            "size": "small",
            "config": {"width": 8},
            "batch": 4,
            "parameters": 1234,
            "detect_s": 0.5,
            "symmetries": {"rescale": 2},
            "load_before": 1.0,
            "load_after": 1.1,
            "rows": [
                {
                    "base": "adam",
                    "variant": "+ retract",
                    "step_ms": 2.0,
                    "step_ratio": 1.5,
                    "step_ratio_range": [1.25, 1.75],
                    "compile_s": 3.0,
                    "compile_ratio": 2.0,
                    "residual": 1e-6,
                }
            ],
        }
    ],
}


def test_bench_tables_render_micro_json_with_run_facts(tmp_path, monkeypatch):
    _results(
        tmp_path,
        monkeypatch,
        {"micro/bench_transforms.json": MICRO, "models/bench_models.json": MODELS},
    )
    text = benchtables.render("all")
    assert "python -m benchmarks.bench_transforms --sizes 1`, 2026-11-27 14:41:35" in text
    assert "x86_64 with 2 CPU cores, jax 0.10.2, optax 0.2.8" in text
    assert "`cnn`: 1.0M parameters in 4 leaves (load average 1.0, 1.1)" in text
    assert (
        "| variant | ms/step | ratio to base | ratio to floor | compile s | peak memory / base "
        "| state / base |" in text
    )
    assert "| + ksbopt.retract | 3.00 | 2.00 | 1.25 | 1.60 | 1.50 | 1.00 |" in text
    assert "| adam | + retract | 2.00 | 1.50 | 1.25-1.75 | 3.00 | 2.00 | 1.0e-06 |" in text


def test_bench_tables_name_the_malformed_file_and_field(tmp_path, monkeypatch):
    _results(tmp_path, monkeypatch, {"micro/bench_x.json": "{not json"})
    with pytest.raises(ExtensionError, match=r"micro/bench_x\.json: not readable JSON"):
        benchtables.render("all")
    broken = json.loads(json.dumps(MICRO))
    del broken["results"][0]["rows"][1]["ratio"]
    _results(tmp_path, monkeypatch, {"micro/bench_x.json": broken})
    with pytest.raises(
        ExtensionError,
        match=r"bench_x\.json: field \['results'\]\[0\]\['rows'\]\[1\]\['ratio'\] is missing",
    ):
        benchtables.render("all")
    broken["results"][0]["rows"][1]["ratio"] = "fast"
    _results(tmp_path, monkeypatch, {"micro/bench_x.json": broken})
    with pytest.raises(
        ExtensionError, match=r"bench_x\.json: field .*\['ratio'\] must be a number"
    ):
        benchtables.render("all")


def test_bench_tables_name_an_unknown_file_and_a_missing_folder(tmp_path, monkeypatch):
    _results(tmp_path, monkeypatch, {"new/other.json": {"something": 1}, "new/bench.json": MICRO})
    text = benchtables.render("all")
    assert (
        "Not rendered (a format docs/_ext/benchtables.py does not know): `other.json` in `new/`"
        in text
    )
    assert "`new/bench.json`" in text
    with pytest.raises(ExtensionError, match="no folder benchmarks/results/nope"):
        benchtables.render("nope")
    with pytest.raises(ExtensionError, match=r"new has no summary\.json"):
        benchtables.render("new", "nld")
    with pytest.raises(ExtensionError, match="a part is one of"):
        benchtables.render("new", "table")


def test_bench_tables_of_the_committed_suite_state_its_run():
    summary = json.loads((benchtables.RESULTS / "full-cpu" / "summary.json").read_text())
    text = benchtables.render("full-cpu")
    assert f"- date: {summary['meta']['date']}" in text
    assert f"- command: `{summary['meta']['command']}`" in text
    row = next(line for line in text.splitlines() if line.startswith("| mnist1d_cnn_bn ("))
    results = summary["grid"]["mnist1d_cnn_bn"]["optimizers"]
    best = max(r["test_mean"] for r in results.values())
    assert f"**{best:.4f}**" in row
    # A suite without NLD runs (the quick one) gets no empty NLD section.
    quick = json.loads((benchtables.RESULTS / "quick-cpu" / "summary.json").read_text())
    assert ("### NLD control" in benchtables.render("quick-cpu")) == bool(quick.get("nld"))


def test_bench_tables_advantage_part_is_the_advantage_module_per_arm():
    """``{bench-tables} FOLDER advantage``: ksbopt.bench.advantage's section for each arm."""
    from ksbopt.bench import advantage

    summary = json.loads((benchtables.RESULTS / "quick-cpu" / "summary.json").read_text())
    text = benchtables.render("quick-cpu", "advantage")
    for arm, tasks in summary["arms"].items():
        want = advantage.markdown(tasks)
        assert want, "the quick suite compares ksbopt entries with sgd+wd and adamw"
        assert want[0].startswith("## ") and want[1] == ""  # the heading gives way to the arm's
        assert f"Schedule arm `{arm}`:\n" + "\n".join(want[1:]) in text
    # a summary rebuilt by --report-only names the command that trained its records
    meta = summary["meta"]
    assert meta["made_by"] != meta["command"] and "--report-only" in meta["command"]
    assert f"- last training command: `{meta['made_by']}` (its wall time " in text
    assert f"report rebuilt from the folder's {meta['reused']} records on {meta['date']}" in text


# ------------------------------------------------------------------ the built site (slow)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The HTML of a tiny-size build (or the one ``KSBOPT_DOCS_HTML`` names)."""
    given = os.environ.get("KSBOPT_DOCS_HTML")
    if given:
        return Path(given).resolve()
    out = tmp_path_factory.mktemp("html")
    env = dict(os.environ, KSBOPT_DOCS_TINY="1")
    run = subprocess.run([*BUILD, str(DOCS), str(out)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    return out


@pytest.mark.slow
def test_site_loads_nothing_from_outside(site):
    assert offline.find_remote(site) == []
    assert (site / "_static" / "mathjax" / "tex-chtml.js").exists()


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (no network, no ports)."""

    def __init__(self):
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            pytest.fail("chromium is not installed: apt-get install -y chromium")
        self.profile = tempfile.mkdtemp()
        read_in, self._write = os.pipe()
        self._read, write_out = os.pipe()
        args = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-pipe",  # the protocol on file descriptors 3 (in) and 4 (out)
            f"--user-data-dir={self.profile}",
            # Every host name fails to resolve: the page gets what a machine offline gets.
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--window-size=1280,900",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{read_in} 4>&{write_out}', "chromium", *args],
            pass_fds=(read_in, write_out),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(read_in)
        os.close(write_out)
        self._buffer = b""
        self._id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Page.enable", "Network.enable", "Runtime.enable"):
            self.call(domain, session=True)

    def _message(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: bool = False, timeout: float = 60, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._message(timeout)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def open(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        deadline = time.monotonic() + 60
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not load")
            self.events.append(self._message(60))

    def evaluate(self, expression: str):
        result = self.call(
            "Runtime.evaluate",
            session=True,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def requested(self) -> list[str]:
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e.get("method") == "Network.requestWillBeSent"
        ]

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._read)
        os.close(self._write)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    chromium = Chromium()
    yield chromium
    chromium.close()


def _visit(browser, site: Path, page: str) -> None:
    browser.open((site / page).as_uri())
    outside = [u for u in browser.requested() if not u.startswith(("file:", "data:", "blob:"))]
    assert outside == [], f"{page} requested {outside}"
    shots = os.environ.get("KSBOPT_DOCS_SCREENSHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        browser.screenshot(Path(shots) / (page.replace("/", "_") + ".png"))


CONCEPTS = sorted(p.stem for p in (DOCS / "concepts").glob("*.md"))


@pytest.mark.slow
@pytest.mark.parametrize("page", CONCEPTS)
def test_concepts_math_is_typeset_offline(site, browser, page):
    _visit(browser, site, f"concepts/{page}.html")
    # MathJax's startup promise resolves once the page is typeset.
    assert browser.evaluate("window.MathJax.startup.promise.then(() => true)") is True
    typeset = browser.evaluate("document.querySelectorAll('mjx-container').length")
    text = browser.evaluate("document.querySelector('main').innerText")
    source = (DOCS / "concepts" / f"{page}.md").read_text()
    if "$" in source:
        assert typeset > 0, f"concepts/{page}: no formula typeset"
    edit = browser.evaluate("document.querySelector('a[href*=\"/edit/\"]').href")
    assert edit.endswith(f"/edit/main/docs/concepts/{page}.md"), edit
    raw = [tex for tex in ("\\[", "\\(", "$$") if tex in text]
    assert raw == [], f"concepts/{page}: raw TeX {raw} left in the rendered text"


GALLERY_PAGES = sorted(p.stem for p in (ROOT / "examples").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("page", GALLERY_PAGES)
def test_gallery_page_shows_its_code_output_and_images(site, browser, page):
    _visit(browser, site, f"gallery/{page}.html")
    images = browser.evaluate(
        "Array.from(document.querySelectorAll('main img')).map("
        "i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
    )
    broken = [src for src, complete, width in images if not (complete and width > 0)]
    assert broken == [], f"gallery/{page}: images that did not load: {broken}"
    code = browser.evaluate("document.querySelectorAll('main div.highlight-Python').length")
    assert code > 0, f"gallery/{page}: no code shown"
    output = browser.evaluate(
        "Array.from(document.querySelectorAll('main .sphx-glr-script-out'))"
        ".map(e => e.innerText).join('')"
    )
    assert output.strip(), f"gallery/{page}: no printed output shown"
    edit = browser.evaluate("document.querySelector('a[href*=\"/edit/\"]').href")
    assert edit.endswith(f"/edit/main/examples/{page}.py"), edit  # the script, not the page
    script = (ROOT / "examples" / f"{page}.py").read_text()
    if "savefig" in script or "plotting." in script:
        assert images, f"gallery/{page}: the script writes figures, the page shows none"


# --------------------------------------------------------------------------- bad input (slow)


@pytest.mark.slow
def test_bad_input_fails_the_build_naming_page_and_line(site, tmp_path):
    # A copy of the docs and examples beside links to the package and the results; the
    # gallery cache of the tiny build comes along, so only the new example runs.
    for name in ("ksbopt", "benchmarks", "pyproject.toml"):
        (tmp_path / name).symlink_to(ROOT / name)
    shutil.copytree(DOCS, tmp_path / "docs", ignore=shutil.ignore_patterns("_build"))
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    docs = tmp_path / "docs"
    (docs / "quickstart.md").write_text(
        (docs / "quickstart.md").read_text()
        + "\n\nSee [the missing page](no_such_page.md).\n\n![remote](https://example.com/x.png)\n"
    )
    api = docs / "api" / "transforms.md"
    lines = api.read_text().splitlines(keepends=True)
    api.write_text("".join(line for line in lines if line != ".. autofunction:: ksbopt.retract\n"))
    (tmp_path / "examples" / "raises.py").write_text(
        '"""An example that raises."""\n\nraise RuntimeError("this example is broken")\n'
    )
    env = dict(os.environ, KSBOPT_DOCS_TINY="1")
    gallery = (tmp_path / "docs" / "_ext" / "gallery.py").read_text()
    (tmp_path / "docs" / "_ext" / "gallery.py").write_text(
        gallery.replace('"quickstart.py": [', '"raises.py": [],\n    "quickstart.py": [')
    )
    run = subprocess.run(
        [*BUILD, str(docs), str(tmp_path / "html")], env=env, capture_output=True, text=True
    )
    log = run.stdout + run.stderr
    assert run.returncode != 0
    quickstart = docs / "quickstart.md"
    assert f"{quickstart}:" in log and "no_such_page" in log, log
    assert "https://example.com/x.png is loaded from outside the site" in log, log
    assert "public name ksbopt.retract is missing from the API reference" in log, log
    assert "raises.py" in log and "this example is broken" in log, log
