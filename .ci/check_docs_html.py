"""Checks the built documentation for rendering defects that `mkdocs build --strict` lets through.

Usage: python .ci/check_docs_html.py SITE_DIR

1. Every doctest of every public object of gq_loss must appear inside a code block (``<pre>``) of
   some page: a singular ``Example:`` section renders its ``>>>`` lines as nested blockquotes.
2. No page may hold nested blockquotes (the symptom of 1. in prose).
3. No page may show a raw Sphinx role (``:meth:`x```), which mkdocstrings does not understand.
4. Every link inside the site that names an anchor (``page/#anchor``, ``#anchor``) must reach an
   element with that id: ``mkdocs build --strict`` passes a broken one unless ``mkdocs.yml``'s
   ``validation: anchors`` is set, and this checks the HTML whatever the builder.
5. Every page must be in the navigation (linked from the home page's ``<nav>``): an orphan page
   is built, and found by nobody.
"""

from __future__ import annotations

import html
import inspect
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import gq_loss

PRE = re.compile(r"<pre[^>]*>(.*?)</pre>", re.S)
TAG = re.compile(r"<[^>]+>")
NESTED_QUOTE = re.compile(r"<blockquote>\s*<blockquote>")
SPHINX_ROLE = re.compile(r":(?:meth|func|class|data|attr|mod|obj|exc|ref):`")
HREF = re.compile(r'href="([^"]*)"')
ELEMENT_ID = re.compile(r'\sid="([^"]+)"')
NAV_TAG = re.compile(r"<(/?)nav\b")


def nav_html(text: str) -> str:
    """Everything inside ``<nav>`` elements (nested ones included) of a page."""
    out, depth, start = [], 0, 0
    for tag in NAV_TAG.finditer(text):
        if not tag.group(1):
            depth, start = depth + 1, tag.start() if depth == 0 else start
        elif depth:
            depth -= 1
            if depth == 0:
                out.append(text[start : tag.end()])
    return "".join(out)


def _target(site: Path, page: Path, link: str) -> Path | None:
    """The HTML file a relative link of ``page`` points to (None: outside the site)."""
    path = link.split("#", 1)[0]
    if not path:
        return page
    target = (page.parent / path).resolve()
    if target.is_dir():
        target = target / "index.html"
    try:
        target.relative_to(site.resolve())
    except ValueError:
        return None
    return target if target.suffix == ".html" else None


def link_errors(site: Path, pages: dict[Path, str]) -> list[str]:
    """Broken anchors (4.) and pages missing from the navigation (5.)."""
    ids = {p.resolve(): set(ELEMENT_ID.findall(text)) for p, text in pages.items()}
    errors = []
    for page, text in pages.items():
        for link in sorted(set(HREF.findall(text))):
            if "#" not in link or re.match(r"[a-z]+:", link):
                continue
            target = _target(site, page, html.unescape(link))
            anchor = html.unescape(link.split("#", 1)[1])
            if target is not None and anchor and anchor not in ids.get(target, set()):
                name = target.relative_to(site.resolve()) if target in ids else target
                errors.append(
                    f"{page.relative_to(site)}: link {link!r}: no id {anchor!r} in {name}"
                )
    home = site / "index.html"
    if home in pages:
        nav = nav_html(pages[home])
        linked = {_target(site, home, html.unescape(h)) for h in HREF.findall(nav)}
        for page in pages:
            if page.name != "404.html" and page.resolve() not in linked:
                errors.append(f"{page.relative_to(site)}: not in the navigation (an orphan page)")
    return errors


def public_objects() -> Iterator[tuple[str, object]]:
    """Every public name of the package and of its public modules, with public members."""
    seen: set[int] = set()
    modules = [gq_loss] + [
        m for name in dir(gq_loss) if inspect.ismodule(m := getattr(gq_loss, name))
    ]
    for module in modules:
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if id(obj) in seen or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            seen.add(id(obj))
            yield f"{module.__name__}.{name}", obj
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if not attr.startswith("_") and inspect.isfunction(member):
                        yield f"{module.__name__}.{name}.{attr}", member


def first_doctest_line(doc: str) -> str | None:
    for line in inspect.cleandoc(doc).splitlines():
        if line.strip().startswith(">>> "):
            return line.strip()[4:].strip()
    return None


def main(site: Path) -> int:
    pages = {p: p.read_text(encoding="utf-8") for p in site.rglob("*.html")}
    code_text = "\n".join(
        html.unescape(TAG.sub("", block)) for text in pages.values() for block in PRE.findall(text)
    )
    errors = []
    for name, obj in public_objects():
        line = first_doctest_line(obj.__doc__ or "")
        if line is not None and line not in code_text:
            errors.append(f"{name}: its example is not rendered as a code block: {line!r}")
    for path, text in pages.items():
        page = path.relative_to(site)
        if NESTED_QUOTE.search(text):
            errors.append(f"{page}: nested blockquotes (a '>>>' example outside a code block?)")
        for block in PRE.findall(text):
            text = text.replace(block, "")
        for role in sorted(set(SPHINX_ROLE.findall(text))):
            errors.append(f"{page}: raw Sphinx role {role!r} (use Markdown cross-references)")
    errors += link_errors(site, pages)
    for error in errors:
        print(error)
    print(f"checked {len(pages)} pages: {len(errors)} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
