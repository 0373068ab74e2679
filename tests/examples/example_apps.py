"""What the example tests share: an example app under examples/, loaded as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import ModuleType

EXAMPLES = Path(__file__).parents[2] / "examples"


def load_example(folder: str, module_name: str) -> ModuleType:
    """Load ``examples/<folder>/app.py`` as ``module_name`` (registered in ``sys.modules``:
    pydantic resolves the models' annotations through it)."""
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / folder / "app.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
