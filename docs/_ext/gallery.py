"""Settings of the examples gallery (sphinx-gallery): sizes, figures, and the cache.

Every script in ``examples/`` runs when the docs build, in the build's process, and its page
shows the code, what it printed and the figures it wrote. Two sizes:

- full (default): each script runs with no arguments, exactly as ``python examples/X.py``;
  the scripts that draw figures write them to ``examples/figures/``, so the README's figure
  and the concepts pages' figures are the ones this build made;
- tiny (environment variable ``KSBOPT_DOCS_TINY=1``, what CI builds): each script runs with
  the arguments in ``TINY_ARGS`` (a few steps, every code path), and figures go to
  ``docs/_build/gallery_figures/`` so that the committed ones are not replaced.

The figures are collected from the files a script writes (``FigureFiles``), not from open
matplotlib figures: the scripts save them with ``savefig`` and ``ksbopt.plotting``.
sphinx-gallery reruns only the scripts that changed since the last build (a checksum per
script); ``prepare`` empties the cache when the size changes between builds.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from sphinx.errors import ConfigError

DOCS = Path(__file__).resolve().parent.parent
ROOT = DOCS.parent
EXAMPLES = ROOT / "examples"
GALLERY = DOCS / "gallery"  # generated pages (ignored by git)
TINY_FIGURES = DOCS / "_build" / "gallery_figures"
TINY_ENV = "KSBOPT_DOCS_TINY"

# The arguments of every example in a tiny build: enough steps to run each code path and draw
# each figure, a few seconds of training per script on 2 CPU cores. ``{out}`` is replaced by
# the script's own figure folder under TINY_FIGURES.
TINY_ARGS = {
    "compare_my_optimizer.py": ["--tiny", "--out", "{out}/compare_my_optimizer"],
    "quickstart.py": ["--steps", "100"],
    "detect_and_train.py": ["--steps", "50"],
    "noether_diagnostics.py": ["--steps", "100", "--out", "{out}"],
    "implicit_adaptive.py": ["--steps", "200", "--steps1", "50", "--out", "{out}"],
    "mixed_precision.py": ["--steps", "100"],
    "sharded_lm.py": ["--mesh", "4x2", "--scale", "tiny", "--steps", "10"],
}


def tiny() -> bool:
    """Whether this build runs the examples at their tiny size (``KSBOPT_DOCS_TINY=1``)."""
    value = os.environ.get(TINY_ENV, "0")
    if value not in ("0", "1"):
        raise ConfigError(f"{TINY_ENV}={value!r} must be 0 (full size) or 1 (tiny size).")
    return value == "1"


def scripts() -> list[Path]:
    """The example scripts, sorted."""
    return sorted(EXAMPLES.glob("*.py"))


def prepare() -> None:
    """Check the tiny arguments against the scripts; drop the cache made at the other size."""
    if tiny():
        names = {p.name for p in scripts()}
        missing, extra = sorted(names - set(TINY_ARGS)), sorted(set(TINY_ARGS) - names)
        if missing or extra:
            raise ConfigError(
                f"docs/_ext/gallery.py TINY_ARGS must list every script of examples/: "
                f"missing {missing}, no such script {extra}; give each new example the "
                f"arguments of a few-second run."
            )
    mode = "tiny" if tiny() else "full"
    stamp = GALLERY / ".size"
    if stamp.exists() and stamp.read_text() != mode:
        shutil.rmtree(GALLERY)
    GALLERY.mkdir(parents=True, exist_ok=True)
    stamp.write_text(mode)


def reset_argv(gallery_conf, script_vars) -> list[str]:
    """The command-line arguments of one script (sphinx-gallery sets ``sys.argv`` to them)."""
    if not tiny():
        return []
    name = Path(script_vars["src_file"]).name
    out = TINY_FIGURES / name.removesuffix(".py")
    return [a.replace("{out}", str(out)) for a in TINY_ARGS[name]]


class FigureFiles:
    """Image scraper: the PNG files a script wrote, to show on its page.

    After each code block sphinx-gallery calls the scraper; it shows every PNG under the
    watched folders that is new or rewritten since the last call, in name order.
    """

    def __init__(self, *folders: Path):
        self.folders = folders
        self.seen = self._stamps()

    def _stamps(self) -> dict[Path, int]:
        files = [p for folder in self.folders for p in sorted(folder.rglob("*.png"))]
        return {p: p.stat().st_mtime_ns for p in files}

    def __repr__(self) -> str:  # sphinx-gallery checksums its configuration by repr
        return f"FigureFiles({', '.join(str(f) for f in self.folders)})"

    def __call__(self, block, block_vars, gallery_conf) -> str:
        from sphinx_gallery.scrapers import figure_rst

        now = self._stamps()
        written = [p for p, t in now.items() if self.seen.get(p) != t]
        self.seen = now
        out = []
        for path, target in zip(written, block_vars["image_path_iterator"], strict=False):
            shutil.copyfile(path, target)
            # One figure at a time: the page's full width, not a grid of thumbnails.
            out.append(figure_rst([target], gallery_conf["src_dir"]))
        return "".join(out)


scrape_figures = FigureFiles(EXAMPLES / "figures", TINY_FIGURES)


def sphinx_gallery_conf() -> dict:
    """The ``sphinx_gallery_conf`` of docs/conf.py."""
    prepare()
    TINY_FIGURES.mkdir(parents=True, exist_ok=True)
    (EXAMPLES / "figures").mkdir(exist_ok=True)
    return {
        "examples_dirs": str(EXAMPLES),
        "gallery_dirs": str(GALLERY),
        "filename_pattern": r".*\.py$",  # run every script, not only plot_*.py
        "within_subsection_order": "FileNameSortKey",
        # Named by module path, so that Sphinx can pickle the configuration.
        "reset_argv": "gallery.reset_argv",
        "image_scrapers": ("gallery.scrape_figures",),
        "reset_modules": ("matplotlib",),
        "capture_repr": (),
        "download_all_examples": False,
        "remove_config_comments": True,
        "show_signature": False,
        # Its page loads jQuery and DataTables from CDNs; each example page shows its own time.
        "write_computation_times": False,
    }


def _title(app, docname, source) -> None:
    # The examples' docstrings are plain text that starts with a sentence, not a reST title:
    # the sentence up to its first colon or comma is the page title, and ``|`` (norms) are
    # literal.
    if docname.startswith("gallery/") and docname != "gallery/index":
        name = docname.removeprefix("gallery/") + ".py"
        label = f".. _sphx_glr_gallery_{name}:\n\n"
        head, found, rest = source[0].partition(label)
        if found:
            doc, sep, code = rest.partition(".. GENERATED FROM PYTHON SOURCE LINES")
            doc = doc.replace("|", "\\|")
            # "Quick start: a BatchNorm MLP ..." -> "Quick start"
            title = re.split(r"[:,]", doc.strip().partition("\n")[0])[0].strip() or name
            source[0] = f"{head}{label}{title}\n{'=' * len(title)}\n\n{doc}{sep}{code}"


def _source_links(app, pagename, templatename, context, doctree) -> None:
    # The repository buttons of a gallery page (source, "edit this page") point at the script
    # in examples/, not at the page sphinx-gallery generated from it (not in the repository).
    if not pagename.startswith("gallery/") or pagename == "gallery/index":
        return
    generated = f"docs/{pagename}.rst"
    script = f"examples/{pagename.removeprefix('gallery/')}.py"

    def fix(buttons):
        for button in buttons:
            if isinstance(button.get("url"), str):
                button["url"] = button["url"].replace(generated, script)
            fix(button.get("buttons", []))

    fix(context.get("header_buttons", []))


def setup(app):
    app.connect("source-read", _title)
    # After sphinx-book-theme makes its header buttons (priority 501).
    app.connect("html-page-context", _source_links, priority=900)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
