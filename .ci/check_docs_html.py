"""Checks the built documentation for rendering defects that `mkdocs build --strict` lets through.

Usage: python .ci/check_docs_html.py SITE_DIR

1. Every doctest of every public object of gq_loss must appear inside a code block (``<pre>``) of
   some page: a singular ``Example:`` section renders its ``>>>`` lines as nested blockquotes.
2. No page may hold nested blockquotes (the symptom of 1. in prose).
3. No page may show a raw Sphinx role (``:meth:`x```), which mkdocstrings does not understand.
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
    for error in errors:
        print(error)
    print(f"checked {len(pages)} pages: {len(errors)} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
