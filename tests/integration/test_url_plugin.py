"""``?plugin=dropsafe``: engines made anywhere, by the URL alone, hardened as `harden` does."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from dropsafe._engine import guard_of

flask_sqlalchemy = pytest.importorskip("flask_sqlalchemy")
flask = pytest.importorskip("flask")


def test_flask_sqlalchemy_engines_with_the_url_flag_are_hardened(shared_server):
    """Flask-SQLAlchemy makes its engines itself: the URL flag alone must guard every bind."""
    app = flask.Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = shared_server.url("psycopg2", plugin="dropsafe")
    app.config["SQLALCHEMY_BINDS"] = {
        "one": shared_server.url("psycopg", plugin="dropsafe"),
        "two": shared_server.url("psycopg2", plugin="dropsafe", dropsafe_deadline="7"),
    }
    db = flask_sqlalchemy.SQLAlchemy(app)
    with app.app_context():
        try:
            engines = db.engines
            assert set(engines) == {None, "one", "two"}
            for engine in engines.values():
                assert guard_of(engine) is not None, engine.url
                # The driver never sees dropsafe's parameters.
                assert "plugin" not in engine.url.query
                assert not any(key.startswith("dropsafe_") for key in engine.url.query)
                with engine.connect() as connection:
                    assert connection.scalar(sa.text("SELECT 1")) == 1
            guard = guard_of(engines["two"])
            assert guard is not None
            assert guard.policy.unit.deadline == 7.0
        finally:
            for engine in db.engines.values():
                engine.dispose()
