"""Sphinx extension: the site loads nothing from outside itself.

After the HTML is written (and after sphinx-mathjax-offline has copied MathJax into
``_static``), every page is scanned for the resources a browser fetches when it opens the page:
scripts, style sheets, fonts, icons and preloads (``<link href>``), images, media and frames,
and ``url(...)`` / ``@import`` in inline styles and in the site's CSS files. A resource that
is not a file of the site (an ``http:``, ``https:`` or protocol-relative ``//`` address) is
an error naming the page and the line; so is a local resource whose file is missing. Links
(``<a href>``) are not resources and may point anywhere.

``find_remote(site)`` is the same scan as a function, for tests/test_docs_site.py.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

# The attributes through which a page makes the browser fetch something.
_RESOURCE_ATTRS = {
    "script": ("src",),
    "img": ("src", "srcset"),
    "source": ("src", "srcset"),
    "video": ("src", "poster"),
    "audio": ("src",),
    "iframe": ("src",),
    "embed": ("src",),
    "object": ("data",),
    "input": ("src",),
}
_LINK_RESOURCES = {"stylesheet", "icon", "preload", "modulepreload", "prefetch", "manifest"}
_CSS_URL = re.compile(r"""url\(\s*['"]?([^'")\s]+)|@import\s+['"]([^'"]+)""")


def _remote(url: str) -> bool:
    parts = urlsplit(url.strip())
    return parts.scheme in ("http", "https") or (not parts.scheme and url.strip().startswith("//"))


def _urls(tag: str, attrs: dict[str, str]) -> list[str]:
    names = _RESOURCE_ATTRS.get(tag, ())
    if tag == "link" and _LINK_RESOURCES & set(attrs.get("rel", "").lower().split()):
        names = ("href",)
    out = []
    for name in names:
        value = attrs.get(name) or ""
        if name == "srcset":
            out += [part.split()[0] for part in value.split(",") if part.strip()]
        elif value:
            out.append(value)
    out += [a or b for a, b in _CSS_URL.findall(attrs.get("style") or "")]
    return out


class _Scanner(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[int, str]] = []  # (line, url)
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        line = self.getpos()[0]
        self.found += [(line, u) for u in _urls(tag, {k: v or "" for k, v in attrs})]
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            line = self.getpos()[0]
            self.found += [
                (line + data[: m.start()].count("\n"), m[1] or m[2])
                for m in _CSS_URL.finditer(data)
            ]


def _local_target(page: Path, url: str) -> Path | None:
    parts = urlsplit(url)
    if parts.scheme or not parts.path:  # data:, blob:, a fragment
        return None
    return (page.parent / unquote(parts.path)).resolve()


def scan_page(page: Path) -> list[tuple[int, str, str]]:
    """Problems of one HTML page: ``(line, url, why)`` for each remote or missing resource."""
    scanner = _Scanner()
    scanner.feed(page.read_text(encoding="utf-8"))
    problems = []
    for line, url in scanner.found:
        if _remote(url):
            problems.append((line, url, "loads a resource from outside the site"))
        else:
            target = _local_target(page, url)
            if target is not None and not target.exists():
                problems.append((line, url, "loads a file the site does not have"))
    return problems


def scan_css(css: Path) -> list[tuple[int, str, str]]:
    """Remote ``url(...)`` and ``@import`` of one style sheet: ``(line, url, why)``."""
    text = css.read_text(encoding="utf-8", errors="replace")
    return [
        (text[: m.start()].count("\n") + 1, m[1] or m[2], "loads a resource from outside the site")
        for m in _CSS_URL.finditer(text)
        if _remote(m[1] or m[2])
    ]


def find_remote(site: Path, pages: list[Path] | None = None) -> list[str]:
    """Every remote or missing resource of a built site, as ``'file:line: url (why)'``.

    ``pages``: the HTML files to scan (default: every one outside ``_static``, which holds
    the theme's templates, not pages); the site's CSS files are scanned in every case.
    """
    site = Path(site)
    if pages is None:
        pages = [p for p in sorted(site.rglob("*.html")) if "_static" not in p.parts]
    out = []
    for path in pages:
        out += [f"{path.relative_to(site)}:{ln}: {u} ({why})" for ln, u, why in scan_page(path)]
    for path in sorted(site.rglob("*.css")):
        out += [f"{path.relative_to(site)}:{ln}: {u} ({why})" for ln, u, why in scan_css(path)]
    return out


def _check_images(app, doctree) -> None:
    # The source page and line of a remote image, before the HTML scan names the built page.
    from docutils import nodes
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    for node in doctree.findall(nodes.image):
        if _remote(node["uri"]):
            logger.error(
                "offline site: image %s is loaded from outside the site; put the file in the "
                "repository and give its path",
                node["uri"],
                location=node,
                type="offline",
            )


def _check(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    site = Path(app.outdir)
    # The pages of this build (an output folder may keep pages of files since removed).
    pages = [site / app.builder.get_target_uri(d) for d in sorted(app.env.found_docs)]
    pages += [site / f"{name}.html" for name in ("genindex", "search", "py-modindex")]
    problems = find_remote(site, [p for p in pages if p.exists()])
    for problem in problems:
        logger.error("offline site: %s", problem, type="offline")
    if problems:
        app.statuscode = 1
    else:
        logger.info("offline: no page loads anything from outside the site")


def setup(app):
    # After sphinx-mathjax-offline's build-finished copy (default priority 500).
    app.connect("doctree-read", _check_images)
    app.connect("build-finished", _check, priority=900)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
