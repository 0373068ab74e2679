"""The reference pages render the docstrings' examples as code, not as a literal ``Example::``."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
_spec = importlib.util.spec_from_file_location(
    "literal_blocks", ROOT / "docs" / "_griffe" / "literal_blocks.py"
)
assert _spec is not None
assert _spec.loader is not None
literal_blocks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(literal_blocks)


def test_an_example_paragraph_becomes_a_section_with_python():
    text = "Do it.\n\nExample::\n\n    engine = make(1)\n    run(engine)\n\nAfter."
    assert literal_blocks.convert(text) == (
        "Do it.\n\nExample:\n    ```python\n    engine = make(1)\n    run(engine)\n    ```\n\n"
        "After."
    )


def test_a_paragraph_ending_in_a_literal_block_keeps_its_text_and_colon():
    text = "Settings look like::\n\n    postgresql://a@b/c?x=1\n"
    assert literal_blocks.convert(text) == (
        "Settings look like:\n\n```text\npostgresql://a@b/c?x=1\n```"
    )


def test_converting_twice_changes_nothing():
    text = "Example::\n\n    engine = make(1)\n"
    once = literal_blocks.convert(text)
    assert literal_blocks.convert(once) == once


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert build.returncode == 0, build.stderr
    return out


@pytest.mark.parametrize("page", ["dropsafe", "events", "testing"])
def test_the_reference_pages_show_no_literal_markers(site, page):
    html = (site / "reference" / page / "index.html").read_text()
    assert "Example::" not in html
    assert not re.search(r"[a-z]::</p>", html)
    if page == "dropsafe":
        # create_engine's example, highlighted as Python under an Example heading.
        assert html.count("<summary>Example</summary>") >= 10
        assert '<span class="n">create_engine</span>' in html


def test_the_extension_is_no_page_of_the_site(site):
    assert not (site / "_griffe").exists()
