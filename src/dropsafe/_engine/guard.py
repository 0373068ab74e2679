"""create_engine, create_async_engine and harden: SQLAlchemy engines with dropsafe's guard.

Wiring only: `EngineGuard` builds the pieces that do the work (`CheckoutCheck`,
`ConnectArguments`, `InvalidationScope`, ...) from the engine's `Policy` and its driver, and
attaches their listeners to the engine's events. The guard and the policy are kept in the
engine's one `EngineState` (`dropsafe._engine_state`), with what the unit wing keeps for it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import sys
from collections import deque
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import sqlalchemy
import sqlalchemy.exc
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url

from dropsafe._drivers import (
    SUPPORTED,
    async_drivers,
    driver_for,
    driver_named,
    is_supported,
    sync_drivers,
)
from dropsafe._engine.connect_args import ConnectArguments
from dropsafe._engine.connect_wait import ConnectWait
from dropsafe._engine.first_flight import FirstFlight
from dropsafe._engine.invalidation import InvalidationScope
from dropsafe._engine.lifetime import ConnectionLifetime
from dropsafe._engine.liveness import CheckoutCheck
from dropsafe._engine.quiet_rollback import QuietRollback
from dropsafe._engine.replay import FirstStatementReplay
from dropsafe._engine_state import EngineState, peek_state, root_engine, state_of
from dropsafe._errors import ConfigurationError
from dropsafe._log import SafeLogger
from dropsafe._policy import Policy, seconds
from dropsafe._redaction import redact_url, split_credentials

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "EngineGuard",
    "create_async_engine",
    "create_engine",
    "guard_of",
    "harden",
    "loaded_asyncio",
    "policy_of",
    "require_asyncio",
    "resolve_driver",
]

logger = SafeLogger()

# (URL scheme as given, as read): each reading is logged once per process.
_SAID: set[tuple[str, str]] = set()
_E = TypeVar("_E", "Engine", "AsyncEngine")
#: Whatever SQLAlchemy's create_engine takes as a keyword argument (passed on unchanged).
EngineArgument: TypeAlias = Any


def create_engine(
    url: str | URL, *, policy: Policy | None = None, **engine_kwargs: EngineArgument
) -> Engine:
    """Create a SQLAlchemy `Engine` guarded by dropsafe.

    ``engine_kwargs`` go to `sqlalchemy.create_engine` unchanged; connect arguments you set
    (in the URL or ``connect_args``) win over dropsafe's defaults.

    Example::

        engine = dropsafe.create_engine("postgresql+psycopg2://app@db.example/app")
    """
    parsed = _parse(url)
    try:
        engine = sqlalchemy.create_engine(parsed, **engine_kwargs)
    except ImportError as exc:
        raise _driver_missing(parsed, exc) from None
    except (sqlalchemy.exc.ArgumentError, TypeError) as exc:
        raise ConfigurationError(
            f"cannot create an engine for {redact_url(parsed)}: {exc}"
        ) from None
    return harden(engine, policy)


def create_async_engine(
    url: str | URL,
    *,
    policy: Policy | None = None,
    **engine_kwargs: EngineArgument,
) -> AsyncEngine:
    """Create a SQLAlchemy `AsyncEngine` guarded by dropsafe (asyncpg or psycopg 3).

    Example::

        engine = dropsafe.create_async_engine("postgresql+asyncpg://app@db.example/app")
    """
    require_asyncio()
    from sqlalchemy.ext import asyncio as sa_asyncio  # imported on first use

    parsed = _parse(url, is_async=True)
    try:
        engine = sa_asyncio.create_async_engine(parsed, **engine_kwargs)
    except ImportError as exc:
        raise _driver_missing(parsed, exc) from None
    except sqlalchemy.exc.InvalidRequestError as exc:
        raise ConfigurationError(
            f"{redact_url(parsed)} needs an asyncio driver "
            f"({' or '.join(f'postgresql+{name}' for name in async_drivers())}): {exc}"
        ) from None
    except (sqlalchemy.exc.ArgumentError, TypeError) as exc:
        raise ConfigurationError(
            f"cannot create an engine for {redact_url(parsed)}: {exc}"
        ) from None
    return harden(engine, policy)


def harden(engine: _E, policy: Policy | None = None) -> _E:
    """Guard an engine made elsewhere (Flask-SQLAlchemy, a framework's settings); return it.

    Idempotent: hardening twice changes nothing. Connect arguments apply to connections
    opened from now on. Hardening again with a different policy is refused. The ``dropsafe``
    logger says once, at INFO, that the engine is hardened and with what; `policy_of` asks.
    """
    sync_engine: object = getattr(engine, "sync_engine", engine)
    if not isinstance(sync_engine, Engine):
        raise ConfigurationError(
            f"harden() takes a SQLAlchemy Engine or AsyncEngine, not {type(engine).__name__}"
        )
    # An execution_options() copy is its parent's engine: the parent is hardened, once.
    sync_engine = root_engine(sync_engine)
    state = state_of(sync_engine)
    existing = guard_of(sync_engine)
    if existing is not None:
        if policy is not None and policy != existing.policy:
            raise ConfigurationError(
                "this engine is already hardened with another policy; create a new engine "
                "to change it"
            )
        return engine
    guard = EngineGuard(policy or Policy(), sync_engine, state)
    guard.attach(sync_engine)
    state.policy = guard.policy
    state.guard = guard
    # One line per engine, so that a log says the guard is on and with what (URL masked).
    if logger.isEnabledFor(logging.INFO):
        logger.info(
            "dropsafe hardened the engine for %s (driver %s): %s",
            redact_url(sync_engine.url),
            guard.driver.name,
            describe(guard.policy),
        )
    return engine


def policy_of(engine: Engine | AsyncEngine) -> Policy | None:
    """Return the `Policy` an engine is hardened with, or None if dropsafe does not guard it.

    The way to check that ``?plugin=dropsafe`` or `harden` took effect (``engine.url`` no
    longer shows the plugin), and with which settings.

    Example::

        assert dropsafe.policy_of(engine) is not None
    """
    state = peek_state(engine)
    return None if state is None else state.policy


def describe(policy: Policy) -> str:
    """Say a policy's settings in one line: ``connection: connect_timeout=5, ...; pool: ...``.

    Durations are in seconds, as `Policy` stores them.
    """
    layers = []
    for layer in ("connection", "pool", "unit"):
        settings = getattr(policy, layer)
        knobs = ", ".join(
            f"{each.name}={_shown(getattr(settings, each.name))}"
            for each in dataclasses.fields(settings)
        )
        layers.append(f"{layer}: {knobs}")
    return "; ".join(layers)


def _shown(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


class EngineGuard:
    """What dropsafe attached to one engine: its `Policy`, its `Driver`, and the listeners.

    ``policy`` is read by units of work run on the engine (their defaults); ``driver`` is the
    one `Driver` instance every piece of this engine asks.
    """

    def __init__(self, policy: Policy, engine: Engine, state: EngineState) -> None:
        self.policy = policy
        self.driver = driver_for(engine.dialect)
        self.lifetime = ConnectionLifetime(policy.pool)
        self.connect_wait = ConnectWait(policy.connection, policy.hooks, engine)
        self.replay = FirstStatementReplay(
            policy.pool,
            policy.hooks,
            engine.dialect,
            state,
            self.connect_wait,
            behind_pooler=policy.connection.pooler is not None,
        )
        self.quiet_rollback = QuietRollback(
            policy.hooks,
            engine.dialect,
            defer=policy.pool.defer_checkin_rollback,
            settle_timeout=seconds(policy.pool.ping_timeout),
        )
        self.check = CheckoutCheck(
            policy.pool,
            policy.hooks,
            self.driver,
            engine.dialect,
            pre_ping=bool(getattr(engine.pool, "_pre_ping", False)),
            draw_lifetime=self.lifetime.draw if self.lifetime.enabled else None,
            marks_unsent=self.replay.enabled,
            settle=self.quiet_rollback.settler,
        )
        self.connects = ConnectArguments(
            policy.connection, self.driver, policy.hooks, redact_url(engine.url)
        )
        self.invalidation = InvalidationScope(policy.hooks, self.driver, self.check)
        self.first_flight = FirstFlight(policy.pool, self.driver)

    def attach(self, engine: Engine) -> None:
        """Listen to the engine's connect, pool, transaction and error events."""
        # The checkout check also retires connections past their lifetime: one listener per
        # pool event keeps a checkout nearly as cheap as a plain pool's.
        listeners: list[tuple[str, Callable[..., None]]] = [
            *self.connects.listeners().items(),
            ("handle_error", self.invalidation.on_handle_error),
            *self.check.listeners().items(),
            *self.replay.listeners().items(),
            *self.first_flight.listeners().items(),
        ]
        for name, listener in listeners:
            event.listen(engine, name, listener)
            if name == "handle_error":
                _run_first(engine, name, listener)
        self.quiet_rollback.wrap_do_rollback()
        self.replay.wrap_execute()
        if self.connect_wait.enabled:
            self.connect_wait.wrap(engine.pool)


def _run_first(engine: Engine, identifier: str, listener: Callable[..., None]) -> None:
    """Move ``listener``, just added, to the front of the engine's listeners.

    Listeners of the user's, added before or after harden(), then see dropsafe's decision
    and can overrule it (is_disconnect, invalidate_pool_on_disconnect). ``insert=True``
    would say so, but SQLAlchemy drops it for handle_error, whose listeners live on the
    engine's dialect; this reorders that dialect's own list (listeners on the Dialect
    class still run before every engine's own, as SQLAlchemy runs them).
    """
    listeners = getattr(getattr(engine.dialect.dispatch, identifier), "listeners", None)
    if isinstance(listeners, deque) and listeners and listeners[-1] == listener:
        listeners.rotate(1)
    else:
        logger.debug("dropsafe could not put its %s listener first", identifier)


def require_asyncio() -> None:
    """Import SQLAlchemy's asyncio extension, or say exactly what to install for it.

    It needs greenlet, which SQLAlchemy 2.1 no longer installs: dropsafe imports it only when
    async support is asked for, so that a sync application never needs it. greenlet is looked
    for first: after one failed import SQLAlchemy's asyncio module imports without it.
    """
    missing = importlib.util.find_spec("greenlet") is None
    try:
        if not missing:
            import sqlalchemy.ext.asyncio  # noqa: F401 - needs greenlet
    except ImportError:
        missing = True
    if missing:
        raise ConfigurationError(
            "async engines and units of work need SQLAlchemy's asyncio support, which needs "
            "greenlet: pip install 'dropsafe[asyncpg]' (or 'dropsafe[psycopg]' with "
            "'sqlalchemy[asyncio]')"
        )


def loaded_asyncio() -> ModuleType | None:
    """Return SQLAlchemy's asyncio extension if it is already imported, without importing it.

    An async engine or sessionmaker can only exist once it is: a check for one needs no import.
    """
    module = sys.modules.get("sqlalchemy.ext.asyncio")
    return module if isinstance(module, ModuleType) else None


def guard_of(engine: Engine | AsyncEngine) -> EngineGuard | None:
    """Return the guard dropsafe put on ``engine`` (or on its parent), or None if it has none."""
    state = peek_state(engine)
    guard = None if state is None else state.guard
    return guard if isinstance(guard, EngineGuard) else None


def _driver_missing(url: URL, error: ImportError) -> ConfigurationError:
    extra = url.get_driver_name().removesuffix("_async")
    return ConfigurationError(
        f"the driver for {redact_url(url)} is not installed ({error}): "
        f"pip install 'dropsafe[{extra}]'"
    )


def resolve_driver(
    url: URL, *, is_async: bool, installed: Callable[[str], bool] | None = None
) -> URL:
    """Return ``url`` with the driver it will really use, for ``postgres://`` and bare URLs.

    SQLAlchemy dropped the ``postgres`` alias that Heroku's and many clouds' ``DATABASE_URL``
    still write, and a bare ``postgresql://`` gets SQLAlchemy's default driver (psycopg 3
    since 2.1) even when only another one is installed. So: ``postgres`` reads as
    ``postgresql``; a URL without a driver keeps SQLAlchemy's default when it is installed,
    else gets the installed one (the first of psycopg2, psycopg, pg8000; asyncpg, psycopg
    for an async engine). Each reading is logged once, at INFO, with what to write instead.
    None installed: a `ConfigurationError` naming the pip command. Other URLs are returned
    as they are.
    """
    backend, _, driver = url.drivername.partition("+")
    if backend not in ("postgres", "postgresql") or (backend == "postgresql" and driver):
        return url
    is_installed = installed or _module_installed
    if driver and not is_supported(driver):
        return url  # refused by the caller, who names the supported ones
    if not driver:
        chosen = _default_driver(url, is_async=is_async, installed=is_installed)
        if chosen is None and backend == "postgresql":
            return url  # SQLAlchemy's own default is installed: nothing to read
        driver = chosen or url.set(drivername="postgresql").get_dialect().driver
    resolved = url.set(drivername=f"postgresql+{driver}")
    _say_once(url.drivername, resolved.drivername)
    return resolved


def _default_driver(url: URL, *, is_async: bool, installed: Callable[[str], bool]) -> str | None:
    """Name the driver for a URL without one; None when SQLAlchemy's default is installed."""
    # The registry's drivers for this face, in order of preference (each module has its name).
    choices = async_drivers() if is_async else sync_drivers()
    default = url.set(drivername="postgresql").get_dialect().driver
    if default in choices and installed(default):
        return None
    found = [name for name in choices if installed(name)]
    if not found:
        extras = ", ".join(f"dropsafe[{driver_named(name).extra}]" for name in choices)
        raise ConfigurationError(
            f"{redact_url(url)} names no driver and no PostgreSQL driver"
            f"{' for asyncio' if is_async else ''} is installed: pip install one of "
            f"{extras}, and write postgresql+{choices[0]}://..."
        )
    return found[0]


def _module_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _say_once(given: str, read: str) -> None:
    if (given, read) in _SAID:
        return
    _SAID.add((given, read))
    logger.info(
        "dropsafe reads %s:// as %s://; write %s:// to say so yourself",
        given,
        read,
        read,
    )


def _parse(url: str | URL, *, is_async: bool = False) -> URL:
    if not isinstance(url, (str, URL)):
        raise ConfigurationError(
            f"url must be a string or sqlalchemy.URL, not {type(url).__name__}"
        )
    # Name the URL as given, masked as text: a parse may move a password elsewhere.
    shown = redact_url(url)
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        # Text that is not even scheme://... is not echoed: it may be anything, secrets too.
        named = repr(shown) if "://" in shown else "(not shown: it has no scheme://)"
        hint = (
            "; percent-encode the user and password ('@' as %40, '/' as %2F, ':' as %3A, "
            "'%' as %25)"
            if _split_by_an_at(str(url))
            else ""
        )
        raise ConfigurationError(
            f"malformed database URL {named}; expected "
            f"postgresql+DRIVER://user:password@host:port/database{hint}"
        ) from None
    split = split_credentials(url)
    if split is not None:
        raise ConfigurationError(split)
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise ConfigurationError(
            f"dropsafe supports PostgreSQL only, not {parsed.get_backend_name()!r} "
            f"in {shown}; supported: {SUPPORTED}"
        )
    parsed = resolve_driver(parsed, is_async=is_async)
    if not is_supported(parsed.get_driver_name()):
        raise ConfigurationError(
            f"unsupported driver {parsed.get_driver_name()!r} in {shown}; supported: {SUPPORTED}"
        )
    return parsed


def _split_by_an_at(text: str) -> bool:
    """Whether a URL that did not parse has an '@' before the one that ends its credentials.

    A password holding '@' and '/' unencoded may not parse at all (a piece becomes the
    port): the message then names the likely cause, as `split_credentials` does for those
    that parse.
    """
    _, _, rest = text.partition("://")
    rest = rest.split("?", 1)[0]
    authority = rest.rsplit("@", 1)[0] if "@" in rest else ""
    return "@" in authority
