"""A fresh database per test on a server shared by the session: the ``postgres_database`` fixture.

Starting a server costs about half a second; creating a database from ``template0`` costs a few
tens of milliseconds. A suite whose tests do not stop, restart or break the server shares one
(``postgres_session_server``) and gives each test its own empty database, as pytest-postgresql
users expect; tests that stop or break the server keep ``postgres_server`` (one per test).
"""

from __future__ import annotations

import itertools
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dropsafe.testing._server import PostgresServer
    from dropsafe.testing._urls import Driver

__all__ = ["Database"]

_NUMBERS = itertools.count(1)


class Database:
    """One database on a shared `PostgresServer`, made empty for one test and dropped after it.

    Example::

        def test_posts(postgres_database):
            engine = dropsafe.create_engine(postgres_database.url("psycopg2"))
    """

    def __init__(self, server: PostgresServer, name: str | None = None) -> None:
        self.server = server
        # The pid keeps two suites that share a server apart (pytest-xdist workers do not).
        self.name = name or f"test_{os.getpid()}_{next(_NUMBERS)}"

    def __repr__(self) -> str:
        return f"<Database {self.name!r} on {self.server!r}>"

    def create(self) -> None:
        """Create the database, empty (from ``template0``: nothing a test put in template1)."""
        self.server.execute(f'CREATE DATABASE "{self.name}" TEMPLATE template0')

    def drop(self) -> None:
        """Drop the database, ending the sessions a test left open on it (PostgreSQL 13+)."""
        self.server.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def url(self, driver: Driver = "psycopg2", **params: str) -> str:
        """Return a URL for ``driver`` that reaches this database (it carries the password)."""
        return self.server.url(driver, database=self.name, **params)

    def connect_args(self, driver: Driver = "psycopg2") -> dict[str, object]:
        """Extra ``connect_args`` a driver needs for the server (TLS for pg8000)."""
        return self.server.connect_args(driver)

    def execute(self, sql: str) -> list[tuple[str, ...]]:
        """Run SQL in this database as the superuser, through psql; rows come as text."""
        return self.server.execute(sql, database=self.name)
