"""No module imports upward: every module under src/dropsafe sits in a layer written down here.

A module may import modules of lower layers. Modules of one layer are peers and do not import
each other, except inside a package layer (the test bench, the benchmark, the demo, the CLI),
whose modules are one piece. Imports inside functions count; imports under ``TYPE_CHECKING``
do not (they never run). A new module must be placed here: the test fails until it is.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).parents[2] / "src"

# Lowest first. A name ending in ".*" is a package layer: the package and all its modules.
LAYERS: list[tuple[str, ...]] = [
    # What one process owns alone, renewed in a forked child.
    ("dropsafe._process",),
    # The exception tree, redaction, and the thread that shuts sockets down: no dropsafe deps.
    ("dropsafe._errors", "dropsafe._redaction", "dropsafe._socket_shutdown", "dropsafe._log"),
    # Vocabulary: the events hooks receive, and the ErrorKind of any error.
    ("dropsafe.events", "dropsafe._classify"),
    # Settings per layer, and handing events to hooks.
    ("dropsafe._policy", "dropsafe._hooks"),
    # Per-driver facts; the backoff schedule of a unit of work.
    ("dropsafe._drivers", "dropsafe._backoff"),
    # Mechanisms built on the driver's facts: the deadline on a wait, the host order, the
    # checkout check; and the connection lifetime (on the policy alone).
    # Whether two connections' session states may differ (the replay's proof).
    (
        "dropsafe._watchdog",
        "dropsafe._hosts",
        "dropsafe._liveness",
        "dropsafe._lifetime",
        "dropsafe._session_state",
    ),
    # What dropsafe adds to a connect; a connect that waits out a short outage; how much of
    # the pool an error ends; a ROLLBACK that met a lost connection, absorbed; a
    # transaction's first statement, replayed.
    (
        "dropsafe._connect_args",
        "dropsafe._connect_wait",
        "dropsafe._invalidation",
        "dropsafe._quiet_rollback",
        "dropsafe._replay",
    ),
    # Wiring: the engine and its guard.
    ("dropsafe._engine",),
    # ?plugin=dropsafe: an engine made anywhere, hardened by its URL.
    ("dropsafe._url_plugin",),
    # The unit of work's side: the server's identity, the commit record, the resolution of an
    # ambiguous COMMIT, the decisions of a unit of work, and the loops that drive them.
    ("dropsafe._server_life",),
    ("dropsafe._recording",),
    # Acknowledged commits remembered, and checked after a failover.
    ("dropsafe._failover_audit",),
    # ... and the shapes a unit of work may take (two-phase and AUTOCOMMIT refused).
    ("dropsafe._resolution", "dropsafe._unit", "dropsafe._unit_shapes"),
    ("dropsafe._transaction",),
    # A request handler that takes a Session, run as one unit of work.
    ("dropsafe._request_unit",),
    # The public face.
    ("dropsafe",),
    # Built on the public face: the test bench, the benchmark, the demo, the CLI.
    ("dropsafe.testing.*",),
    ("dropsafe._bench.*",),
    ("dropsafe._demo.*",),
    ("dropsafe._cli.*",),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted((SOURCE / "dropsafe").rglob("*.py"))}


def _layer_of(module: str) -> int | None:
    for index, names in enumerate(LAYERS):
        for name in names:
            if name.endswith(".*"):
                package = name.removesuffix(".*")
                if module == package or module.startswith(package + "."):
                    return index
            elif module == name:
                return index
    return None


def _is_package_layer(index: int) -> bool:
    return any(name.endswith(".*") for name in LAYERS[index])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node that can run: all but the bodies of ``if TYPE_CHECKING:``."""
    found: list[ast.AST] = []
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))
    return found


def imports_of(module: str, source: str, known: set[str]) -> set[str]:
    """Return the dropsafe modules ``module`` imports at run time (``source`` is its text)."""
    is_package = MODULES.get(module, Path()).name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # "from package import submodule" imports the submodule.
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return {name for name in found if name == "dropsafe" or name.startswith("dropsafe.")}


def test_every_module_has_a_layer():
    unplaced = [module for module in MODULES if _layer_of(module) is None]
    assert not unplaced, f"place these modules in LAYERS: {unplaced}"


def test_every_layer_names_existing_modules():
    missing = [name for names in LAYERS for name in names if name.removesuffix(".*") not in MODULES]
    assert not missing, f"LAYERS names modules that do not exist: {missing}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_upward(module):
    own = _layer_of(module)
    assert own is not None
    imported = imports_of(module, MODULES[module].read_text(encoding="utf-8"), set(MODULES))
    wrong = []
    for target in sorted(imported):
        layer = _layer_of(target)
        if layer is None:
            wrong.append(f"{target} (no such module)")
        elif layer > own:
            wrong.append(f"{target} (a higher layer)")
        elif layer == own and not _is_package_layer(own) and target != module:
            wrong.append(f"{target} (a peer in the same layer)")
    assert not wrong, f"{module} imports {', '.join(wrong)}"


def test_the_parser_counts_imports_in_functions_but_not_under_type_checking():
    source = """
from typing import TYPE_CHECKING
import dropsafe._errors
if TYPE_CHECKING:
    from dropsafe._engine import guard_of
else:
    from dropsafe import _policy
def later():
    from dropsafe._transaction import run_transaction
    from . import _hooks
"""
    known = set(MODULES)
    assert imports_of("dropsafe._drivers", source, known) == {
        "dropsafe._errors",
        "dropsafe._policy",
        "dropsafe._transaction",
        "dropsafe._hooks",
    }
