"""A newcomer's first hour (issue 30): what a new user meets before reading any code."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dropsafe
from dropsafe._cli import main

ROOT = Path(__file__).parents[2]


def test_the_version_is_one_story():
    assert dropsafe.__version__ == importlib.metadata.version("dropsafe")
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{dropsafe.__version__}]" in changelog


def test_dropsafe_version_prints_it(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dropsafe {dropsafe.__version__}"


def test_no_text_cites_a_version_of_dropsafe_that_does_not_exist():
    # A version of dropsafe named in a message or a page must be a section of the changelog.
    changelog = (ROOT / "CHANGELOG.md").read_text()
    released = set(re.findall(r"^## \[(\d+\.\d+\.\d+)\]", changelog, re.MULTILINE))
    cited: dict[str, str] = {}
    files = [*(ROOT / "src").rglob("*.py"), *(ROOT / "docs").rglob("*.md"), ROOT / "README.md"]
    for path in files:
        text = path.read_text()
        for pattern in (r"dropsafe (\d+\.\d+(?:\.\d+)?)\b", r"CHANGELOG\.md \((\d+\.\d+\.\d+)"):
            for version in re.findall(pattern, text):
                cited[version] = str(path.relative_to(ROOT))
    unknown = {
        version: where
        for version, where in cited.items()
        if version not in released and f"{version}.0" not in released
    }
    assert unknown == {}


def test_the_package_metadata_links_docs_source_and_changelog():
    urls = importlib.metadata.metadata("dropsafe").get_all("Project-URL") or []
    labels = {entry.split(",", 1)[0] for entry in urls}
    assert {"Documentation", "Source", "Changelog"} <= labels


def test_test_mode_imported_into_a_test_module_is_not_collected(tmp_path):
    test_file = tmp_path / "test_user.py"
    test_file.write_text(
        textwrap.dedent(
            """
            from dropsafe import test_mode

            def test_mine():
                with test_mode():
                    pass
            """
        )
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-W",
            "error",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:asyncio",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    assert "test_mode" not in done.stdout.replace("from dropsafe import test_mode", "")


@pytest.mark.parametrize("argv", [["--help"], ["doctor", "--help"]])
def test_help_is_laid_out_as_written(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Traceback" not in out
    if argv[0] == "doctor":
        assert "\n  - whether the node is a standby\n" in out


# The request timeouts of the common web stacks' defaults, in seconds (docs/settings.md).
WEB_TIMEOUTS = {"gunicorn": 30, "Heroku": 30, "nginx": 60, "(ALB)": 60}


def test_the_default_deadline_ends_a_unit_before_a_web_timeout_kills_the_request():
    # A unit that gives up at 30 s is killed with its gunicorn worker or cut by Heroku's
    # router first: the app never gets to answer with its own error. Leave time to answer.
    deadline = dropsafe.UnitPolicy().deadline
    assert deadline <= min(WEB_TIMEOUTS.values()) - 5
    settings = (ROOT / "docs" / "settings.md").read_text()
    assert f"| `deadline` | {deadline:g} s |" in settings
    for stack in (*WEB_TIMEOUTS, "uWSGI"):
        assert stack in settings


def test_the_demo_script_installs_only_what_the_demo_needs():
    script = (ROOT / "scripts" / "demo.sh").read_text()
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    assert "setup.sh" not in code  # the full bench: Chromium, Patroni, etcd, HAProxy, ...
    for tool in ("chromium", "patroni", "etcd", "haproxy", "pgbouncer", "nftables", "[dev]"):
        assert tool not in code
    assert '".[$extras]"' in code
    assert "extras=demo" in code
    assert "exec .venv/bin/dropsafe demo" in code
    # scripts/test.sh keeps installing the full bench.
    assert "setup.sh" in (ROOT / "scripts" / "test.sh").read_text()
