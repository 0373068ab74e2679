"""``?plugin=dropsafe``: harden an engine made anywhere, by its URL alone.

Frameworks and tools create their engines themselves (Flask-SQLAlchemy and each of its binds,
Alembic, Celery, pandas): the one thing their users always control is the URL. SQLAlchemy loads
the ``sqlalchemy.plugins`` entry point named by ``plugin=`` in a URL (only that one, and only
then) and hands it the URL, then the finished engine: `DropsafePlugin` reads its settings from
the URL, removes them before the driver sees them, and calls `harden` on the engine.

The flag is the zero-code path: beyond the library's defaults it turns on the transaction
replay (`FLAG_DEFAULTS`), since its requests are not units of work.

Settings are the knobs of the three layers, flat, prefixed with ``dropsafe_``::

    postgresql+psycopg2://app@db/app?plugin=dropsafe&dropsafe_deadline=10&dropsafe_tcp_user_timeout=5

A name that is no knob, a value that does not parse or is out of range, raises
`ConfigurationError` naming the parameter, when the engine is created. Hooks cannot be given in
a URL: the engine gets the default `Policy.hooks` (the logging hook).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.engine import CreateEnginePlugin

from dropsafe._drivers import SUPPORTED, is_supported
from dropsafe._engine.guard import harden, resolve_driver
from dropsafe._errors import ConfigurationError
from dropsafe._policy import (
    ConnectionPolicy,
    Policy,
    PoolPolicy,
    UnitPolicy,
    environment_name,
    parse_knob,
)
from dropsafe._redaction import redact_url

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sqlalchemy.engine import URL, Engine

__all__ = ["FLAG_DEFAULTS", "PREFIX", "DropsafePlugin", "policy_from_query"]

PREFIX = "dropsafe_"
_L = TypeVar("_L", ConnectionPolicy, PoolPolicy, UnitPolicy)

# Each layer of a Policy: the keyword that takes it, and its class.
_LAYERS: dict[str, type[ConnectionPolicy | PoolPolicy | UnitPolicy]] = {
    "connection": ConnectionPolicy,
    "pool": PoolPolicy,
    "unit": UnitPolicy,
}
# knob -> the layer it belongs to; every field of every layer (tests check it against
# `dropsafe._policy._LAYER_OF`, so that a new knob is reachable from the URL too).
KNOBS: dict[str, str] = {
    each.name: layer for layer, kind in _LAYERS.items() for each in dataclasses.fields(kind)
}


class DropsafePlugin(CreateEnginePlugin):
    """The ``sqlalchemy.plugins`` entry point ``dropsafe``: one instance per `create_engine`.

    Made for `sqlalchemy.create_engine` and `create_async_engine` alike: for an async engine
    SQLAlchemy hands `engine_created` the sync `Engine` inside it, which is where `harden` puts
    its guard anyway.
    """

    def __init__(self, url: URL, kwargs: dict[str, Any]) -> None:
        super().__init__(url, kwargs)
        # Checked here, before any engine exists: a bad setting fails create_engine itself.
        # postgres:// and a URL without a driver are read as create_engine reads them;
        # update_url hands SQLAlchemy the driver read, before it looks for a dialect.
        if url.get_backend_name() in ("postgresql", "postgres"):
            url = resolve_driver(url, is_async=bool(kwargs.get("_is_async")))
        self.drivername = url.drivername
        if url.get_backend_name() != "postgresql" or not is_supported(url.get_driver_name()):
            raise ConfigurationError(
                f"plugin=dropsafe guards PostgreSQL engines only, through a supported driver, "
                f"not {redact_url(url)}; supported: {SUPPORTED}"
            )
        self.policy = policy_from_query(url.query)

    def update_url(self, url: URL) -> URL:
        """Return ``url`` without dropsafe's parameters (the driver would refuse them).

        Its driver is the one read for ``postgres://`` or a URL that names none.
        """
        ours = [key for key in url.query if key.startswith(PREFIX)]
        return url.difference_update_query(ours).set(drivername=self.drivername)

    def engine_created(self, engine: Engine) -> None:
        """Guard the new engine (the sync engine, for create_async_engine)."""
        harden(engine, self.policy)


#: What the flag turns on beyond the library's own defaults: it is the zero-code path, whose
#: requests are not units of work, so the transaction replay (docs/mid-transaction.md) is on.
#: ``dropsafe_replay_transaction=false`` (or ``DROPSAFE_REPLAY_TRANSACTION``) turns it off.
FLAG_DEFAULTS: dict[str, dict[str, object]] = {"pool": {"replay_transaction": True}}


def policy_from_query(query: Mapping[str, str | tuple[str, ...]]) -> Policy:
    """Build the `Policy` that a URL's ``dropsafe_*`` parameters describe.

    Example: ``{"dropsafe_deadline": "10"}`` gives ``Policy(unit=UnitPolicy(deadline=10.0))``
    with `FLAG_DEFAULTS` (the transaction replay on).
    """
    per_layer: dict[str, dict[str, Any]] = {layer: {} for layer in _LAYERS}
    for key in sorted(query):
        if not key.startswith(PREFIX):
            continue
        knob = key.removeprefix(PREFIX)
        layer = KNOBS.get(knob)
        if layer is None:
            raise ConfigurationError(
                f"unknown URL parameter {key!r}; dropsafe's are "
                f"{', '.join(PREFIX + name for name in sorted(KNOBS))}"
            )
        value = query[key]
        if not isinstance(value, str):
            raise ConfigurationError(f"URL parameter {key} is given {len(value)} times")
        per_layer[layer][knob] = _parse(key, _LAYERS[layer], knob, value)
    for layer, defaults in FLAG_DEFAULTS.items():
        for knob, default in defaults.items():
            if environment_name(knob) not in os.environ:  # the environment's default wins
                per_layer[layer].setdefault(knob, default)
    return Policy(
        connection=_layer(ConnectionPolicy, per_layer["connection"]),
        pool=_layer(PoolPolicy, per_layer["pool"]),
        unit=_layer(UnitPolicy, per_layer["unit"]),
    )


def _layer(kind: type[_L], knobs: dict[str, Any]) -> _L:
    try:
        return kind(**knobs)
    except ConfigurationError as exc:
        # The layer names its own field and range; say which URL parameters were involved.
        given = ", ".join(f"{PREFIX}{knob}={value!r}" for knob, value in knobs.items())
        raise ConfigurationError(f"URL parameters {given}: {exc}") from None


def _parse(
    key: str, kind: type[ConnectionPolicy | PoolPolicy | UnitPolicy], knob: str, text: str
) -> object:
    """Parse one parameter's text to the type of its knob; the layer checks its range."""
    return parse_knob(kind, knob, text, f"URL parameter {key}")
