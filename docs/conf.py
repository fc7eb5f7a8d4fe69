"""Sphinx configuration of the ksbopt documentation.

Build (offline, warnings are errors; ``pip install -e ".[docs]"``)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html                     # full
    KSBOPT_DOCS_TINY=1 python -m sphinx -W --keep-going -b html docs docs/_build/html  # CI

The build runs every script of ``examples/`` for the gallery (docs/_ext/gallery.py says at
which size), renders the benchmark tables from ``benchmarks/results/`` (docs/_ext/
benchtables.py) and fails when a page loads anything from outside the site (docs/_ext/
offline.py): MathJax is served from the site itself (``sphinx-mathjax-offline``).
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # ksbopt (and the examples' imports) from this checkout
sys.path.insert(0, os.path.join(HERE, "_ext"))

# examples/sharded_lm.py asks for 8 simulated CPU devices before jax starts; the gallery runs
# it inside this process, where jax starts earlier, so the device count is set here.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import gallery  # noqa: E402

import ksbopt  # noqa: E402

project = "ksbopt"
author = "ksbopt developers"
copyright = "2026, ksbopt developers"
release = ksbopt.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 copied into _static/mathjax: no CDN
    "myst_parser",
    "sphinx_gallery.gen_gallery",
    "gallery",  # docs/_ext/gallery.py: the examples' sizes, figures and page titles
    "apicheck",  # docs/_ext/apicheck.py: a public name missing from the reference fails the build
    "benchtables",  # docs/_ext/benchtables.py: tables generated from benchmarks/results/
    "offline",  # docs/_ext/offline.py: a page loading a remote resource fails the build
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}  # .rst: the gallery's pages
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "sg_execution_times.rst"]

mathjax_path = "mathjax/tex-chtml.js"  # relative: served from _static/ (sphinx-mathjax-offline)

sphinx_gallery_conf = gallery.sphinx_gallery_conf()

# MyST Markdown: $...$ and $$...$$ math, ::: fences, definition lists, heading anchors.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Google-style docstrings only (the dialect of the code base).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_class_signature = "mixed"
# Keep array-like hints short in signatures (they would expand into a long Union).
autodoc_type_aliases = {"ArrayLike": "jax.typing.ArrayLike"}

# The package must import without optional dependencies it does not need for the reference.
autodoc_mock_imports: list[str] = []

# The theme of the JAX libraries' sites. The repository buttons ("edit this page", source,
# issues) point at REPOSITORY_URL: set KSBOPT_DOCS_REPOSITORY_URL to the project's public
# repository when publishing; the default is a placeholder.
REPOSITORY_URL = os.environ.get("KSBOPT_DOCS_REPOSITORY_URL", "https://github.com/OWNER/ksbopt")
html_theme = "sphinx_book_theme"
html_title = f"ksbopt {release}"
html_theme_options = {
    "repository_url": REPOSITORY_URL,
    "repository_branch": "main",
    "path_to_docs": "docs",
    "use_repository_button": True,
    "use_edit_page_button": True,
    "use_source_button": True,
    "use_issues_button": True,
    "use_download_button": True,
    "show_toc_level": 2,
    "home_page_in_toc": True,
}
html_static_path: list[str] = []
