"""The documentation site's build is strict: a broken link, anchor or API reference fails it.

scripts/test.sh builds the site with ``mkdocs build --strict``; these tests prove that the
build would catch what it is there to catch. Each one builds a copy of the site with one defect
added and checks that the build fails naming the defect; the same copy without the defect must
build, so that a failure cannot come from the copy or the machine. They also check that the API
reference documents every public name, which no build would notice.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
BUILD_TIMEOUT = 120  # seconds; a build takes about 2 s on a quiet machine

# One defect per case: the text appended to a page in the nav, and what the failure must name.
DEFECTS = {
    "link to a missing page": ("[the missing page](no-such-page.md)", "no-such-page.md"),
    "link to a missing anchor": ("[a heading](tutorial.md#no-such-heading)", "#no-such-heading"),
    "missing API reference": ("::: dropsafe.no_such_name", "dropsafe.no_such_name"),
    "missing cross-reference": ("[a name][dropsafe.no_such_name]", "dropsafe.no_such_name"),
}


def _site_copy(tmp_path: Path) -> Path:
    """A copy of mkdocs.yml and docs/ to damage; the sources are linked, not copied."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", project / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", project / "docs")
    (project / "src").symlink_to(ROOT / "src")  # mkdocstrings reads the docstrings from here
    return project


def _build(project: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(project / "mkdocs.yml"),
            "--site-dir",
            str(project / "site"),
        ],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's notice, not a warning
    )


REFERENCE = [
    ("dropsafe", "__init__.py", "dropsafe"),
    ("dropsafe.events", "events.py", "events"),
    ("dropsafe.testing", "testing/__init__.py", "testing"),
]


def test_the_copy_builds_without_a_defect(tmp_path):
    build = _build(_site_copy(tmp_path))
    assert build.returncode == 0, build.stderr
    # The public names are imported lazily, declared under TYPE_CHECKING: griffe must still
    # find each one at its public path, with its docstring.
    for module, source, page in REFERENCE:
        html = (tmp_path / "project" / "site" / "reference" / page / "index.html").read_text()
        for name in _all_of(ROOT / "src" / "dropsafe" / source):
            assert f'id="{module}.{name}"' in html, f"{module}.{name} is not on the page"


@pytest.mark.parametrize(("defect", "named"), DEFECTS.values(), ids=DEFECTS.keys())
def test_a_defect_fails_the_build(tmp_path, defect, named):
    project = _site_copy(tmp_path)
    page = project / "docs" / "index.md"
    page.write_text(f"{page.read_text()}\n{defect}\n")

    build = _build(project)

    assert build.returncode != 0, f"the build passed with {defect!r} in docs/index.md"
    assert named in build.stderr, build.stderr


def _all_of(module_file: Path) -> list[str]:
    """The names in a module's ``__all__``, read from its source (no import needed)."""
    for node in ast.parse(module_file.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"{module_file} has no __all__")


@pytest.mark.parametrize(("module", "source", "page"), REFERENCE)
def test_the_reference_documents_every_public_name(module, source, page):
    public = _all_of(ROOT / "src" / "dropsafe" / source)
    text = (ROOT / "docs" / "reference" / f"{page}.md").read_text()
    documented = re.findall(rf"^::: {re.escape(module)}\.(\w+)\s*$", text, flags=re.MULTILINE)
    missing = sorted(set(public) - set(documented))
    assert not missing, f"docs/reference/{page}.md must document {missing}: '::: {module}.NAME'"
    # Anything else documented there is a public submodule (the pytest plugin), not a name
    # that __all__ forgot.
    package = (ROOT / "src" / "dropsafe" / source).parent
    others = set(documented) - set(public)
    assert all((package / f"{name}.py").is_file() for name in others), others
