"""The public surface: what users may import. Its one list is docs/reference: a change of API is
made there too, on purpose."""

import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dropsafe
import dropsafe.events
import dropsafe.testing

ROOT = Path(__file__).parents[2]

# Each public module and its page in docs/reference, which documents every name of its __all__
# (`::: module.Name`). That page is the one list of the API: a name added to or removed from
# __all__ fails here until the page changes with it, so an API change is always deliberate and
# always documented; restating the lists here would make a second copy to keep in step.
REFERENCE_PAGES = {
    "dropsafe": "dropsafe.md",
    "dropsafe.events": "events.md",
    "dropsafe.testing": "testing.md",
}
# Modules users may import by name: the three above, and the pytest plugin's entry point.
PUBLIC_MODULES = {*REFERENCE_PAGES, "dropsafe.testing.pytest_plugin"}


def _documented_names(module: str) -> set[str]:
    """The names docs/reference documents for ``module``, but its public submodules."""
    page = (ROOT / "docs" / "reference" / REFERENCE_PAGES[module]).read_text()
    names = re.findall(rf"^::: {re.escape(module)}\.(\w+)\s*$", page, flags=re.MULTILINE)
    return {name for name in names if f"{module}.{name}" not in PUBLIC_MODULES}


@pytest.mark.parametrize("name", sorted(REFERENCE_PAGES))
def test_the_public_names_are_exactly_those_the_reference_documents(name):
    module = importlib.import_module(name)
    assert sorted(module.__all__) == sorted(_documented_names(name))
    for public in module.__all__:
        assert getattr(module, public) is not None


@pytest.mark.parametrize("name", sorted(REFERENCE_PAGES))
def test_nothing_else_is_exported_by_accident(name):
    module = importlib.import_module(name)
    for public in module.__all__:
        getattr(module, public)  # the packages import their names on first use
    defined_here = {
        attribute
        for attribute, value in vars(module).items()
        if not attribute.startswith("_") and getattr(value, "__module__", None) == name
    }
    assert defined_here <= set(module.__all__)


def test_every_other_module_is_private():
    found = {
        info.name
        for info in pkgutil.walk_packages(dropsafe.__path__, "dropsafe.")
        if not any(part.startswith("_") for part in info.name.split(".")[1:])
    }
    assert found == PUBLIC_MODULES - {"dropsafe"}


def test_names_of_version_one_that_are_gone_say_what_replaced_them():
    with pytest.raises(ImportError, match="that error itself is raised"):
        dropsafe.RetriesExhausted  # noqa: B018
    with pytest.raises(ImportError, match=r"now dropsafe\.ErrorKind"):
        from dropsafe import Kind  # noqa: F401


def test_one_exception_tree():
    for error in (dropsafe.ConfigurationError, dropsafe.CommitOutcomeUnknown):
        assert issubclass(error, dropsafe.DropsafeError)
        assert error.__module__ == "dropsafe"
    assert issubclass(dropsafe.testing.ServerError, dropsafe.DropsafeError)
    # Users already catch ValueError for bad arguments.
    assert issubclass(dropsafe.ConfigurationError, ValueError)


def test_loading_the_pytest_plugin_imports_neither_sqlalchemy_nor_the_bench():
    # pytest loads it in every run of every project that has dropsafe installed.
    probe = (
        "import sys, dropsafe.testing.pytest_plugin; "
        "print(sorted(m for m in sys.modules if m.startswith(('sqlalchemy', 'dropsafe.'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert loaded.strip() == "['dropsafe.testing', 'dropsafe.testing.pytest_plugin']"


def test_the_version_is_public_beside_all():
    # dropsafe.__version__ is API (users and bug reports read it) without being in __all__.
    assert isinstance(dropsafe.__version__, str)
    assert "__version__" not in dropsafe.__all__
