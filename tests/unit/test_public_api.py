import types

import pytest

import dropsafe
import dropsafe.testing


@pytest.mark.parametrize("module", [dropsafe, dropsafe.testing])
def test_all_lists_exactly_the_public_names(module):
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and name != "annotations"
    }
    assert set(module.__all__) == public


def test_one_exception_tree():
    for error in (
        dropsafe.ConfigurationError,
        dropsafe.RetriesExhausted,
        dropsafe.CommitOutcomeUnknown,
        dropsafe.testing.ServerError,
    ):
        assert issubclass(error, dropsafe.DropsafeError)
    # Users already catch ValueError for bad arguments.
    assert issubclass(dropsafe.ConfigurationError, ValueError)
    assert dropsafe.ConfigurationError.__module__ == "dropsafe"
