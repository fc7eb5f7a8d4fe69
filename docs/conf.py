"""Sphinx configuration of the ksbopt documentation.

Build (offline, warnings are errors)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # ksbopt from this checkout
sys.path.insert(0, os.path.join(HERE, "_ext"))

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
    "myst_parser",
    "apicheck",  # docs/_ext/apicheck.py: a public name missing from the reference fails the build
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

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

html_theme = "alabaster"
html_title = f"ksbopt {release}"
html_theme_options = {
    "description": "Symmetry-aware Optax transforms for JAX",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "240px",
}
html_static_path: list[str] = []
