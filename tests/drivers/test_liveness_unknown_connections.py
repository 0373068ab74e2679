"""What dropsafe makes of connection objects it does not know: look through, or leave alone."""

from unittest.mock import MagicMock

import pg8000.core
import pytest

from dropsafe._drivers import _Asyncpg, _Pg8000, _Psycopg, _Psycopg2, socket_fd


def _pg8000_connection():
    # The driver's own type, never connected: enough to be recognised, no socket needed.
    return pg8000.core.CoreConnection.__new__(pg8000.core.CoreConnection)


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
    driver = _Pg8000()
    assert driver.native(native) is native
    assert driver.native(Target(native)) is native
    assert driver.native(Wrapt(Target(native))) is native


def test_unknown_objects_stay_unknown():
    driver = _Pg8000()
    assert driver.native(MagicMock()) is None
    assert driver.native(object()) is None
    # Deeper than three wrappers: not worth the search at every checkout.
    native = _pg8000_connection()
    assert driver.native(Wrapt(Wrapt(Wrapt(Wrapt(native))))) is None


def test_the_watchdog_finds_no_socket_in_what_no_driver_owns():
    # A mock's fileno() returns a mock: only a supported driver's connection names a socket.
    assert socket_fd(MagicMock()) is None
    assert socket_fd(object()) is None
    # The driver's own type without a socket (never connected, or closed): none either.
    assert socket_fd(Target(_pg8000_connection())) is None
