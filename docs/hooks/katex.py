"""MkDocs hook: copies KaTeX, the formula renderer, into the built site.

KaTeX comes from the npm registry, pinned in ``package.json`` and ``package-lock.json`` at the
repository root: ``npm ci`` installs it under ``node_modules/``. This hook adds its script, its
style sheet and its fonts to the site as ``assets/katex/...``; ``mkdocs.yml`` loads them and
``docs/javascripts/katex.js`` typesets what ``pymdownx.arithmatex`` marked. The built pages
therefore need no network to show their formulas, and the repository holds none of KaTeX.

A build without KaTeX installed stops with the command that installs it, rather than publishing
pages that show raw TeX. ``KATEX_DIST`` may name another copy of KaTeX's ``dist`` folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

SITE_FOLDER = "assets/katex"
REQUIRED = ("katex.min.js", "katex.min.css", "fonts")


def _dist(config: MkDocsConfig) -> Path:
    root = Path(config.config_file_path).parent
    dist = Path(os.environ.get("KATEX_DIST") or root / "node_modules" / "katex" / "dist")
    missing = [name for name in REQUIRED if not (dist / name).exists()]
    if missing:
        raise PluginError(
            f"KaTeX, which renders the formulas, is not installed: {dist} lacks "
            f"{', '.join(missing)}. Run `npm ci` in {root} (it installs the version pinned in "
            "package-lock.json), or set KATEX_DIST to a KaTeX dist folder."
        )
    return dist


def on_files(files: Files, *, config: MkDocsConfig) -> Files:
    dist = _dist(config)
    paths = [dist / "katex.min.js", dist / "katex.min.css"]
    paths += sorted(p for p in (dist / "fonts").iterdir() if p.is_file())
    for path in paths:
        uri = f"{SITE_FOLDER}/{path.relative_to(dist).as_posix()}"
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
