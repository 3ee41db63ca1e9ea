"""Opens pages of the built documentation in headless Chromium and fails on formulas left as TeX.

Usage: python .ci/check_docs_browser.py SITE_DIR [--screenshots DIR] [PAGE ...]

``mkdocs build --strict`` and an HTML grep cannot tell whether the formula renderer ran: a page
whose renderer is never loaded shows raw TeX to its reader. This check serves SITE_DIR on
127.0.0.1, lets Chromium run each page's scripts with every other host unreachable (so a page
that needs the network fails too), and reads the resulting DOM. A page fails when

1. an element that pymdownx.arithmatex marked holds no KaTeX output (the renderer did not run);
2. KaTeX reported a formula it could not parse (``katex-error``);
3. its text outside code blocks still shows TeX: ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``$$`` or a
   command such as ``\\frac`` (a formula without delimiters is never typeset).

PAGE defaults to ``math/``, ``api/`` and ``ood/``, and any other page whose HTML holds a
formula. With ``--screenshots DIR`` it also saves a PNG of each page, for a person to look at.
"""

from __future__ import annotations

import argparse
import functools
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PAGES = ("math/", "api/", "ood/")
RAW_TEX = re.compile(r"\\[()\[\]]|\$\$|\\[A-Za-z]+")
# Chromium as root needs --no-sandbox; the rest keeps it off the network and quick to start.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--virtual-time-budget=15000",
)
TIMEOUT_S = 60
SHOWN = 5  # raw-TeX hits printed per page
# Text of these elements is not prose: code, scripts, and the TeX source that KaTeX keeps for
# screen readers and copying (<annotation encoding="application/x-tex">).
SKIPPED = {"head", "script", "style", "pre", "code", "annotation", "svg", "noscript"}
VOID = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "source",
    "track",
    "wbr",
}


class Page(HTMLParser):
    """Prose text, rendered formulas and their failures, from one page's DOM."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, set[str]]] = []
        self.text: list[str] = []
        self.formulas = 0  # elements arithmatex marked
        self.typeset = 0  # of those, the ones holding KaTeX output
        self.errors: list[str] = []
        self._open_formula: list[int] = []  # stack depths of open arithmatex elements
        self._formula_has_katex: list[bool] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = set((dict(attrs).get("class") or "").split())
        if tag in VOID:
            return
        self.stack.append((tag, classes))
        if "arithmatex" in classes:
            self.formulas += 1
            self._open_formula.append(len(self.stack))
            self._formula_has_katex.append(False)
        if "katex" in classes and self._formula_has_katex:
            self._formula_has_katex[-1] = True
        if "katex-error" in classes:
            self.errors.append(f"KaTeX could not parse: {dict(attrs).get('title', '?')}")

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        # Browsers' DOM dumps are well nested: pop to the matching tag.
        while self.stack:
            open_tag, _ = self.stack.pop()
            if self._open_formula and self._open_formula[-1] == len(self.stack) + 1:
                self._open_formula.pop()
                self.typeset += self._formula_has_katex.pop()
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        if not any(tag in SKIPPED for tag, _ in self.stack):
            self.text.append(data)


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("no Chromium found: install Debian's `chromium` package (apt-get install chromium)")


def run_chromium(args: list[str]) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )


def check_page(url: str, name: str) -> tuple[list[str], int]:
    try:
        done = run_chromium(["--dump-dom", url])
    except subprocess.TimeoutExpired:
        return [f"{name}: Chromium did not return the page within {TIMEOUT_S} s"], 0
    if done.returncode != 0 or "<body" not in done.stdout:
        tail = "\n".join(done.stderr.splitlines()[-5:])
        return [f"{name}: Chromium returned no page (exit {done.returncode}):\n{tail}"], 0
    page = Page()
    page.feed(done.stdout)
    problems = [f"{name}: {error}" for error in page.errors]
    if page.typeset < page.formulas:
        problems.append(
            f"{name}: {page.formulas - page.typeset} of {page.formulas} formulas not typeset "
            "(is KaTeX loaded?)"
        )
    text = re.sub(r"\s+", " ", "".join(page.text))
    raw = list(RAW_TEX.finditer(text))
    for match in raw[:SHOWN]:
        context = text[max(0, match.start() - 40) : match.end() + 40]
        problems.append(f"{name}: raw TeX {match.group()!r} in the text: ...{context}...")
    if len(raw) > SHOWN:
        problems.append(f"{name}: ... and {len(raw) - SHOWN} more pieces of raw TeX")
    return problems, page.typeset


def default_pages(site: Path) -> list[str]:
    """``PAGES``, and any other page whose HTML holds a formula."""
    pages = list(PAGES)
    for html_file in sorted(site.rglob("index.html")):
        folder = html_file.parent.relative_to(site).as_posix()
        name = "" if folder == "." else folder + "/"
        if name not in pages and 'class="arithmatex"' in html_file.read_text(encoding="utf-8"):
            pages.append(name)
    return pages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path)
    parser.add_argument("pages", nargs="*")
    parser.add_argument("--screenshots", type=Path, help="save a PNG of each page here")
    args = parser.parse_args()
    args.pages = args.pages or default_pages(args.site)

    handler = functools.partial(QuietHandler, directory=str(args.site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    problems: list[str] = []
    typeset = 0
    try:
        for name in args.pages:
            if not (args.site / name / "index.html").is_file():
                problems.append(f"{name}: no such page in {args.site}")
                continue
            page_problems, page_typeset = check_page(base + name, name)
            problems += page_problems
            typeset += page_typeset
            if args.screenshots:
                args.screenshots.mkdir(parents=True, exist_ok=True)
                png = args.screenshots / f"{name.strip('/').replace('/', '_') or 'index'}.png"
                run_chromium(
                    [f"--screenshot={png.resolve()}", "--window-size=1280,2400", base + name]
                )
    finally:
        server.shutdown()
    if typeset == 0 and not problems:
        problems.append("no formula was typeset on any checked page: is this the right site?")
    for problem in problems:
        print(problem)
    print(
        f"browser check of {len(args.pages)} pages: {typeset} formulas typeset, "
        f"{len(problems)} problem(s)"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
