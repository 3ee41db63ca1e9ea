"""Package metadata: declared lower bounds are the tested ones, the sdist ships what the tests
use, and the README reads correctly on a package index page."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import gq_loss

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"

pytestmark = pytest.mark.skipif(not PYPROJECT.exists(), reason="needs the source tree")


def _project() -> dict:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def _lower_bound(requirement: str) -> str:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", requirement.strip())
    assert match, f"dependency {requirement!r} must be declared as 'name>=version'"
    return match.group(2)


def test_dependencies_are_torch_and_numpy_with_lower_bounds_that_ci_installs() -> None:
    deps = {
        re.split(r"[<>=!~ ]", d, maxsplit=1)[0]: d for d in _project()["project"]["dependencies"]
    }
    assert set(deps) == {"torch", "numpy"}
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for name, requirement in deps.items():
        bound = _lower_bound(requirement)
        # CI pins exactly the declared minimum (torch: the pinned build; numpy: a fresh venv).
        pinned = re.findall(rf'"{name}==([0-9.]+)"', ci)
        assert pinned, f".ci/run must install {name} at its declared minimum {bound}"
        assert all(p.startswith(bound) for p in pinned), (name, bound, pinned)


def test_python_lower_bound_and_classifiers_agree_with_the_running_interpreter() -> None:
    project = _project()["project"]
    minimum = tuple(int(v) for v in _lower_bound("python" + project["requires-python"]).split("."))
    versions = [
        tuple(int(v) for v in c.rsplit(" :: ", 1)[1].split("."))
        for c in project["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    ]
    assert versions and min(versions) == minimum
    assert sys.version_info[:2] >= minimum


def test_sdist_ships_every_folder_the_tests_read() -> None:
    include = set(_project()["tool"]["hatch"]["build"]["targets"]["sdist"]["include"])
    used = set()
    for test in (ROOT / "tests").glob("*.py"):
        text = test.read_text(encoding="utf-8")
        used |= {
            d for d in ("examples", "benchmarks", "docs") if f'"{d}"' in text or f"/ {d!r}" in text
        }
    used |= {"gq_loss", "tests"}
    assert used <= include, f"the sdist misses {sorted(used - include)}"


def test_readme_has_no_relative_links_and_urls_exist() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    relative = re.findall(r"\]\((?!https?://|#)([^)]+)\)", readme)
    assert not relative, f"relative links die on a package index page: {relative}"
    assert _project()["project"]["urls"]


def test_gq_loss_forward_and_init_have_their_own_docstrings() -> None:
    # help(GQLoss) used to show torch.nn.Module's boilerplate for both.
    for name in ("__init__", "forward"):
        doc = getattr(gq_loss.GQLoss, name).__doc__
        assert doc and doc != getattr(torch.nn.Module, name).__doc__, name


def test_version_is_the_release_the_changelog_describes() -> None:
    # The changelog's unreleased section speaks of the "1.0 API": the version is a 1.0 (a
    # pre-release until it is published), not 0.1.0.
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    unreleased = changelog.split("## [Unreleased]", 1)[1].split("\n## [", 1)[0]
    apis = re.findall(r"^### (\d+)\.(\d+) API", unreleased, re.M)
    released = re.findall(r"^## \[(\d+)\.(\d+)\.(\d+)\]", changelog, re.M)
    version = gq_loss.__version__
    major, minor = (int(v) for v in version.split(".")[:2])
    if apis:
        assert (major, minor) == tuple(int(v) for v in apis[0]), (version, apis[0])
        assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+|a\d+|b\d+)?", version), version
    if released:
        assert (major, minor) >= tuple(int(v) for v in released[0][:2]), (version, released[0])


def test_every_extra_the_docs_and_examples_name_exists() -> None:
    extras = set(_project()["project"]["optional-dependencies"])
    texts = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").glob("*.py")]
    named = {
        extra
        for path in texts
        for group in re.findall(r"""(?:gq-loss|\.)\[([a-z,]+)\]""", path.read_text("utf-8"))
        for extra in group.split(",")
    }
    assert {"examples", "test", "hf"} <= named  # the README and the examples name these
    assert named <= extras, sorted(named - extras)
