"""request_unit: a request handler's database work, committed once and retried whole.

For apps written as "a session per request, CRUD functions that commit themselves": each attempt
runs `run_transaction` on the session's engine, and the handler gets a new Session of the same
class joined to that transaction with ``join_transaction_mode="create_savepoint"``, so its
``session.commit()`` calls release SAVEPOINTs and the request commits once. What it cannot make
safe (effects outside the database, other sessions): docs/frameworks.md.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any, TypeVar, overload

import sqlalchemy as sa
from sqlalchemy.orm import Session

from dropsafe._errors import ConfigurationError
from dropsafe._transaction import _settings, run_transaction

if TYPE_CHECKING:
    from collections.abc import Callable

    from dropsafe._policy import Duration, UnitPolicy

__all__ = ["request_unit"]

_F = TypeVar("_F", bound="Callable[..., Any]")


@overload
def request_unit(fn: _F, /) -> _F: ...
@overload
def request_unit(
    *,
    policy: UnitPolicy | None = None,
    deadline: Duration | None = None,
    max_attempts: int | None = None,
) -> Callable[[_F], _F]: ...
def request_unit(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    policy: UnitPolicy | None = None,
    deadline: Duration | None = None,
    max_attempts: int | None = None,
) -> Any:  # the decorated function, or a decorator (see the overloads)
    """Run a handler that takes a Session as one unit of work, retried whole on a disconnect.

    The handler keeps its signature (frameworks such as FastAPI read it) and its code: the
    ``Session`` argument it is called with (from a ``get_session`` dependency) is replaced, on
    every attempt, by a new session of the same class joined to the unit's transaction, so
    that the ``session.commit()`` calls of its CRUD functions become SAVEPOINT releases and
    the request commits once, at the end. Work the handler leaves uncommitted is rolled back,
    as closing its session would have done. The keyword arguments are those of
    `run_transaction`.

    Example::

        @app.post("/users/")
        @dropsafe.request_unit
        def create_user(session: SessionDep, user_in: UserCreate) -> UserPublic:
            return crud.create_user(session=session, user_create=user_in)  # commits inside
    """
    settings: dict[str, Any] = {
        "policy": policy,
        "deadline": deadline,
        "max_attempts": max_attempts,
    }
    _settings(None, policy, deadline, max_attempts)  # refuse bad settings at decoration

    def decorate(handler: _F) -> _F:
        if not callable(handler):
            raise ConfigurationError(f"@request_unit decorates functions, not {handler!r}")
        if inspect.iscoroutinefunction(handler):
            raise ConfigurationError(
                f"@request_unit runs sync handlers (a sync Session); {handler.__qualname__} is "
                "async: use await dropsafe.run_transaction_async(...) in it"
            )

        @functools.wraps(handler)
        def run(*args: object, **kwargs: object) -> object:
            where, given = _the_session(handler, args, kwargs)
            try:
                engine: object = given.get_bind()
            except sa.exc.UnboundExecutionError:
                engine = None
            if not isinstance(engine, sa.Engine):
                raise ConfigurationError(
                    f"the session given to {handler.__qualname__} must be bound to an Engine "
                    f"(Session(engine)), not {type(engine).__name__}"
                )
            # What other dependencies read with it stays readable, detached: the handler may
            # session.add() or session.merge() those objects into its unit's session.
            given.close()

            def attempt(connection: sa.Connection) -> object:
                with type(given)(
                    bind=connection,
                    join_transaction_mode="create_savepoint",
                    autoflush=given.autoflush,
                    expire_on_commit=given.expire_on_commit,
                    info=dict(given.info),
                ) as session:
                    if isinstance(where, int):
                        call_args = (*args[:where], session, *args[where + 1 :])
                        return handler(*call_args, **kwargs)
                    return handler(*args, **{**kwargs, where: session})
                # Leaving the block closed the session: a SAVEPOINT still open (work the
                # handler did not commit) is rolled back before the unit's COMMIT.

            attempt.__qualname__ = handler.__qualname__  # what events name the unit by
            return run_transaction(engine, attempt, **settings)

        return run  # type: ignore[return-value]

    if fn is None:
        return decorate
    return decorate(fn)


def _the_session(
    handler: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[int | str, Session]:
    """Return where the handler's one Session argument is (a position or a name) and it."""
    found: list[tuple[int | str, Session]] = [
        (position, value) for position, value in enumerate(args) if isinstance(value, Session)
    ]
    found += [(name, value) for name, value in kwargs.items() if isinstance(value, Session)]
    if len(found) != 1:
        raise ConfigurationError(
            f"@request_unit needs exactly one Session argument in the call of "
            f"{handler.__qualname__}, got {len(found)}"
        )
    return found[0]
