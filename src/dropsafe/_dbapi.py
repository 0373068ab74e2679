"""Names for what the drivers hand dropsafe: DBAPI connections and cursors.

They are ``Any`` on purpose. PEP 249 is a convention, not a class: psycopg2, psycopg 3,
SQLAlchemy's asyncpg adapter and pg8000 each have their own classes, and dropsafe reads their
extras (backend pid, socket, transaction status), which SQLAlchemy's ``DBAPIConnection``
Protocol does not name. One alias per role says which value a signature takes, where a bare
``Any`` would not.
"""

from __future__ import annotations

from typing import Any, TypeAlias

#: The connection a pool event or a dialect hook receives (``dbapi_connection``).
DBAPIConnection: TypeAlias = Any
#: The driver's own connection under SQLAlchemy's adapter (``.driver_connection``): an
#: ``asyncpg.Connection`` for asyncpg, the DBAPI connection itself for the others.
NativeConnection: TypeAlias = Any
#: A DBAPI cursor, as ``Dialect.do_execute`` receives it.
DBAPICursor: TypeAlias = Any
