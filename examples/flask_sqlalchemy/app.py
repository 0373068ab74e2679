r"""A Flask-SQLAlchemy app hardened by its URLs alone: notes, accounts and an audit log.

Three engines, all made by Flask-SQLAlchemy: the default one (notes) and two binds (accounts,
audit). Each URL ends in ``?plugin=dropsafe``, which is all it takes to guard an engine
(see docs/frameworks.md). Writes run as dropsafe units of work, retried whole on a lost
connection and never applied twice; reads use ``db.session`` as any Flask-SQLAlchemy app does.

Run it (three databases; they may be the same one)::

    DATABASE_URL='postgresql+psycopg2://app:pw@db/notes?plugin=dropsafe' \
    ACCOUNTS_URL='postgresql+psycopg2://app:pw@db/accounts?plugin=dropsafe' \
    AUDIT_URL='postgresql+psycopg2://app:pw@db/audit?plugin=dropsafe' \
    python examples/flask_sqlalchemy/app.py
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from flask import Flask, abort, current_app, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import dropsafe

if TYPE_CHECKING:
    from collections.abc import Callable

    from flask.typing import ResponseReturnValue

_T = TypeVar("_T")


class Base(DeclarativeBase):
    """The models' base."""


db = SQLAlchemy(model_class=Base)


class Note(db.Model):  # type: ignore[name-defined,misc]
    """A note, on the default engine. ``token`` is the client's id for the request."""

    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]
    token: Mapped[str]


class Account(db.Model):  # type: ignore[name-defined,misc]
    """A balance, on the ``accounts`` bind: a deposit applied twice would show in it."""

    __bind_key__ = "accounts"
    __tablename__ = "accounts"
    name: Mapped[str] = mapped_column(primary_key=True)
    balance: Mapped[int]


class AuditEntry(db.Model):  # type: ignore[name-defined,misc]
    """One line per deposit, on the ``audit`` bind."""

    __bind_key__ = "audit"
    __tablename__ = "audit_entries"
    id: Mapped[int] = mapped_column(primary_key=True)
    token: Mapped[str]
    what: Mapped[str]


def create_app(database_url: str, binds: dict[str, str]) -> Flask:
    """Make the app; ``binds`` must name ``accounts`` and ``audit``."""
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = database_url
    app.config["SQLALCHEMY_BINDS"] = binds
    db.init_app(app)
    with app.app_context():
        db.create_all()
        # One sessionmaker per engine, made once: what units of work open their sessions with.
        app.extensions["dropsafe_sessions"] = {
            key: sessionmaker(engine) for key, engine in db.engines.items()
        }
    app.add_url_rule("/notes", view_func=add_note, methods=["POST"])
    app.add_url_rule("/notes/<int:note_id>", view_func=show_note)
    app.add_url_rule("/accounts/<name>/deposit", view_func=deposit, methods=["POST"])
    app.add_url_rule("/accounts/<name>", view_func=show_account)
    app.add_url_rule("/audit/<token>", view_func=show_audit)
    return app


def run_unit(fn: Callable[[Session], _T], bind_key: str | None = None) -> _T:
    """Run ``fn(session)`` as a dropsafe unit of work on one engine of the app.

    The session is a fresh plain ``Session`` bound to ``db.engines[bind_key]`` (not
    ``db.session``): every attempt starts clean, and everything ``fn`` does goes to that one
    engine, whose COMMIT dropsafe can verify. ``fn`` should return plain values.
    """
    return dropsafe.run_transaction(current_app.extensions["dropsafe_sessions"][bind_key], fn)


# -- views -----------------------------------------------------------------------------------


def add_note() -> ResponseReturnValue:
    """Create a note: one unit of work on the default engine."""
    body, token = _field("body"), _field("token")

    def write(session: Session) -> int:
        note = Note(body=body, token=token)
        session.add(note)
        session.flush()
        return note.id

    return jsonify(id=run_unit(write)), 201


def show_note(note_id: int) -> ResponseReturnValue:
    """Read a note with ``db.session``, as Flask-SQLAlchemy apps do."""
    note = db.get_or_404(Note, note_id)
    return jsonify(id=note.id, body=note.body)


def deposit(name: str) -> ResponseReturnValue:
    """Add to a balance, then log it: two units of work, one per engine (not atomic together)."""
    amount, token = _field("amount", int), _field("token")

    def add(session: Session) -> int:
        upsert = (
            insert(Account)
            .values(name=name, balance=amount)
            .on_conflict_do_update(
                index_elements=[Account.name], set_={"balance": Account.balance + amount}
            )
            .returning(Account.balance)
        )
        return int(session.execute(upsert).scalar_one())

    balance = run_unit(add, "accounts")
    run_unit(
        lambda session: session.add(AuditEntry(token=token, what=f"deposit {amount} to {name}")),
        "audit",
    )
    return jsonify(balance=balance)


def show_account(name: str) -> ResponseReturnValue:
    """Read a balance with ``db.session`` (the ``accounts`` bind)."""
    account = db.get_or_404(Account, name)
    return jsonify(name=account.name, balance=account.balance)


def show_audit(token: str) -> ResponseReturnValue:
    """Read a request's audit lines with ``db.session`` (the ``audit`` bind)."""
    lines = db.session.scalars(sa.select(AuditEntry.what).where(AuditEntry.token == token))
    return jsonify(list(lines))


def _field(name: str, kind: type[Any] = str) -> Any:  # noqa: ANN401 - the kind asked for
    body = request.get_json(silent=True)
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        abort(400, f"{name} must be a {kind.__name__}")
    return value


if __name__ == "__main__":
    create_app(
        os.environ["DATABASE_URL"],
        {"accounts": os.environ["ACCOUNTS_URL"], "audit": os.environ["AUDIT_URL"]},
    ).run()
