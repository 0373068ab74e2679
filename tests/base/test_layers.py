"""The house's rule: the engine wing and the unit wing never import each other.

Every module under src/dropsafe belongs to one part (below, lowest first). A module imports
its own part and the parts below it: the base (errors, redaction, policy, events, classify,
hooks, backoff, the process's own state) at the bottom, the drivers' knowledge above it, the
commit truth (what became of a COMMIT whose reply was lost) above them, the two wings above
all three and side by side, then the place where they meet (the unit runner and the
public face), then the tools built on the public face. No module takes part in an import
circle. Imports inside functions count; imports under ``TYPE_CHECKING`` do not (they never
run). A new top-level module must be placed here: the test fails until it is.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).parents[2] / "src"

BASE = "base"
DRIVERS = "drivers"
COMMIT_TRUTH = "commit truth"
ENGINE_WING = "engine wing"
UNIT_WING = "unit wing"
MEETING = "where the wings meet"
TOOLS = "tools"

# Lowest first; the two wings share a rank and may not import each other.
RANKS = {BASE: 0, DRIVERS: 1, COMMIT_TRUTH: 2, ENGINE_WING: 3, UNIT_WING: 3, MEETING: 4, TOOLS: 5}

# Packages, by prefix: every module in them belongs to the part.
PACKAGES = {
    "dropsafe._drivers": DRIVERS,
    "dropsafe._commit_truth": COMMIT_TRUTH,
    "dropsafe._engine": ENGINE_WING,
    "dropsafe._unit": UNIT_WING,
    "dropsafe.testing": TOOLS,
    "dropsafe._bench": TOOLS,
    "dropsafe._demo": TOOLS,
    "dropsafe._cli": TOOLS,
}
# The modules directly under dropsafe/.
MODULES_OF_PARTS = {
    "dropsafe._process": BASE,
    "dropsafe._errors": BASE,
    "dropsafe._redaction": BASE,
    "dropsafe._socket_shutdown": BASE,
    "dropsafe._log": BASE,
    "dropsafe._event_types": BASE,
    "dropsafe._metrics": BASE,
    "dropsafe.events": BASE,
    "dropsafe._classify": BASE,
    "dropsafe._policy": BASE,
    "dropsafe._hooks": BASE,
    "dropsafe._backoff": BASE,
    "dropsafe._engine_state": BASE,
    "dropsafe._dbapi": BASE,
    "dropsafe._verdicts": BASE,
    "dropsafe._sqlalchemy_private": BASE,
    "dropsafe._transaction": MEETING,
    "dropsafe._request_unit": MEETING,
    "dropsafe": MEETING,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted((SOURCE / "dropsafe").rglob("*.py"))}


def part_of(module: str) -> str | None:
    """Return the part ``module`` belongs to, or None if it has none."""
    for package, part in PACKAGES.items():
        if module == package or module.startswith(package + "."):
            return part
    return MODULES_OF_PARTS.get(module)


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


def _imports() -> dict[str, set[str]]:
    known = set(MODULES)
    return {
        module: imports_of(module, path.read_text(encoding="utf-8"), known) - {module}
        for module, path in MODULES.items()
    }


def test_every_module_has_a_part():
    unplaced = [module for module in MODULES if part_of(module) is None]
    assert not unplaced, f"place these modules in MODULES_OF_PARTS or PACKAGES: {unplaced}"


def test_every_part_names_existing_modules():
    missing = [name for name in [*PACKAGES, *MODULES_OF_PARTS] if name not in MODULES]
    assert not missing, f"the parts name modules that do not exist: {missing}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_part_or_the_other_wing(module):
    own = part_of(module)
    assert own is not None
    wrong = []
    for target in sorted(_imports()[module]):
        part = part_of(target)
        if part is None:
            wrong.append(f"{target} (no such module)")
        elif RANKS[part] > RANKS[own]:
            wrong.append(f"{target} ({part}, above {own})")
        elif RANKS[part] == RANKS[own] and part != own:
            wrong.append(f"{target} (the {part}: the wings never import each other)")
    assert not wrong, f"{module} imports {', '.join(wrong)}"


def test_no_import_circle():
    imports = _imports()
    circles = []
    # Tarjan's strongly connected components: a component of two or more modules is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in imports.get(module, ()):
            if target not in imports:
                continue
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(imports):
        if module not in index:
            visit(module)
    assert not circles, f"import circles: {circles}"


def test_the_rule_catches_a_wing_importing_the_other():
    assert part_of("dropsafe._engine.replay") == ENGINE_WING
    assert part_of("dropsafe._engine.replay_refusals") == ENGINE_WING
    assert part_of("dropsafe._engine.fresh_connection") == ENGINE_WING
    assert part_of("dropsafe._engine.unsent_commit") == ENGINE_WING
    assert part_of("dropsafe._unit.recording") == UNIT_WING
    assert RANKS[ENGINE_WING] == RANKS[UNIT_WING]
    assert part_of("dropsafe._nowhere") is None


def test_the_parser_counts_imports_in_functions_but_not_under_type_checking():
    source = """
from typing import TYPE_CHECKING
import dropsafe._errors
if TYPE_CHECKING:
    from dropsafe._engine.guard import guard_of
else:
    from dropsafe import _policy
def later():
    from dropsafe._transaction import run_transaction
    from . import _hooks
"""
    known = set(MODULES)
    assert imports_of("dropsafe._errors", source, known) == {
        "dropsafe._errors",
        "dropsafe._policy",
        "dropsafe._transaction",
        "dropsafe._hooks",
    }
