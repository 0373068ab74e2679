"""What the guard makes of connection objects it does not know: look through, or leave alone."""

from unittest.mock import MagicMock

import pg8000.core
import pytest
import sqlalchemy as sa

from dropsafe import Policy
from dropsafe._drivers import _Asyncpg, _Pg8000, _Psycopg, _Psycopg2
from dropsafe._liveness import ConnectionGuard


def _pg8000_connection():
    # The driver's own type, never connected: enough to be recognised, no socket needed.
    return pg8000.core.CoreConnection.__new__(pg8000.core.CoreConnection)


def _guard():
    dialect = sa.create_engine("postgresql+pg8000://u@h/d").dialect
    return ConnectionGuard(Policy(), _Pg8000(), dialect)


@pytest.mark.parametrize("driver", [_Psycopg2(), _Psycopg(), _Asyncpg(), _Pg8000()])
@pytest.mark.parametrize("candidate", [object(), MagicMock(), None, "conn"])
def test_no_driver_owns_what_is_not_its_connection(driver, candidate):
    # A mock has every attribute (its .closed is truthy): only the type decides.
    assert not driver.owns(candidate)


class Target:
    def __init__(self, inner):
        self.target_connection = inner


class Wrapt:
    def __init__(self, inner):
        self.__wrapped__ = inner


def test_known_wrappers_are_looked_through():
    native = _pg8000_connection()
    guard = _guard()
    assert guard._native(native) is native
    assert guard._native(Target(native)) is native
    assert guard._native(Wrapt(Target(native))) is native


def test_unknown_objects_stay_unknown():
    guard = _guard()
    assert guard._native(MagicMock()) is None
    assert guard._native(object()) is None
    # Deeper than three wrappers: not worth the search at every checkout.
    native = _pg8000_connection()
    assert guard._native(Wrapt(Wrapt(Wrapt(Wrapt(native))))) is None
