"""The reference app: a blog on Flask and SQLAlchemy, as the user runs it, with or without dropsafe.

``create_app(url, robust=False)`` is the problem statement: ``pool_pre_ping=True`` and writes in
``with session.begin():``. ``robust=True`` is the same app on `dropsafe.create_engine` with
writes through `dropsafe.run_transaction`. Configured from the environment when served alone::

    DATABASE_URL=postgresql+psycopg2://... DROPSAFE_ROBUST=1 python -m dropsafe._demo.blog

It validates its input as a real app must: a post is a title (1..200 characters) and a text (up
to 100 000), strings without NUL, sent as a JSON object or through the page's form; anything else
gets a 4xx with a message, and a body over 1 MiB is refused before it is read. Every response
forbids framing, scripts and type sniffing (CSP, X-Frame-Options, nosniff). The form carries
a CSRF token tied to the browser's session (``BLOG_SECRET_KEY`` signs the session cookie; a
random key is made when it is unset); the JSON API only takes ``application/json``, which a
cross-site form cannot send.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import hmac
import html
import os
import secrets
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import dropsafe

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable

    from flask import Flask
    from waitress.server import BaseWSGIServer
    from werkzeug.wrappers import Response

__all__ = [
    "BODY_MAX",
    "TEXT_MAX",
    "TITLE_MAX",
    "BlogPost",
    "create_app",
    "post_problem",
    "serve",
    "stop",
]

_READY_TIMEOUT = 1.0
TITLE_MAX = 200  # the column's width
TEXT_MAX = 100_000
BODY_MAX = 1 << 20  # a request body larger than this is refused unread (413)
_T = TypeVar("_T")
_CSP = "default-src 'none'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"


class Base(DeclarativeBase):
    """The blog's tables."""


class BlogPost(Base):
    """One post."""

    __tablename__ = "blog_posts"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(sa.String(200))
    text: Mapped[str] = mapped_column(sa.Text)
    created_at: Mapped[dt.datetime] = mapped_column(
        sa.DateTime(timezone=True), server_default=sa.func.now()
    )

    def as_dict(self) -> dict[str, Any]:
        """Return the post as JSON-ready values."""
        return {
            "id": self.id,
            "title": self.title,
            "text": self.text,
            "created_at": self.created_at.isoformat() if self.created_at else None,
        }


def create_app(database_url: str | None = None, *, robust: bool = True) -> Flask:  # noqa: C901, PLR0915 - an app factory registers its routes in one place
    """Build the blog; ``robust`` chooses dropsafe or the plain ``pool_pre_ping`` setup."""
    from flask import (
        Flask,
        abort,
        jsonify,
        redirect,
        request,
        session,
    )
    from werkzeug.exceptions import HTTPException

    url = database_url or os.environ.get("DATABASE_URL")
    if not url:
        raise dropsafe.ConfigurationError("set DATABASE_URL (a postgresql+DRIVER:// URL)")
    if robust:
        engine = dropsafe.create_engine(url, pool_size=10)
    else:
        engine = sa.create_engine(url, pool_pre_ping=True, pool_size=10)
    Base.metadata.create_all(engine)
    session_factory = sessionmaker(engine)

    def add_post(title: str, text: str) -> int:
        def write(session: Session) -> int:
            post = BlogPost(title=title, text=text)
            session.add(post)
            session.flush()
            return post.id

        if robust:
            return dropsafe.run_transaction(session_factory, write)
        with session_factory() as session, session.begin():
            return write(session)

    def read(unit: Callable[[Session], _T]) -> _T:
        # Reads are units of work too: with dropsafe, one that meets a dead connection
        # simply runs again (it wrote nothing, so there is no COMMIT to resolve).
        if robust:
            return dropsafe.run_transaction(session_factory, unit)
        with session_factory() as session:
            return unit(session)

    def get_post(post_id: int) -> dict[str, Any] | None:
        def unit(session: Session) -> dict[str, Any] | None:
            post = session.get(BlogPost, post_id)
            return None if post is None else post.as_dict()

        return read(unit)

    def list_posts(limit: int = 50) -> list[dict[str, Any]]:
        def unit(session: Session) -> list[dict[str, Any]]:
            query = sa.select(BlogPost).order_by(BlogPost.id.desc()).limit(limit)
            return [post.as_dict() for post in session.scalars(query)]

        return read(unit)

    app = Flask("dropsafe-blog")
    app.config["ENGINE"] = engine
    app.config["ROBUST"] = robust
    app.config["MAX_CONTENT_LENGTH"] = BODY_MAX
    app.config["SESSION_COOKIE_SAMESITE"] = "Lax"
    app.secret_key = os.environ.get("BLOG_SECRET_KEY") or secrets.token_hex(32)

    def csrf_token() -> str:
        token = session.get("csrf")
        if not isinstance(token, str):
            token = session["csrf"] = secrets.token_urlsafe(32)
        return token

    @app.after_request
    def security_headers(response: Response) -> Response:
        # The pages load nothing and run no script: a CSP that allows nothing else stops an
        # injected one; no other site may frame them (clickjacking the form) or have a
        # response read as another type than the one sent.
        response.headers.setdefault("Content-Security-Policy", _CSP)
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    @app.errorhandler(HTTPException)
    def api_error(error: HTTPException) -> Response | tuple[Response, int]:
        if not request.path.startswith("/api/"):
            return error.get_response()
        return jsonify({"error": error.description}), error.code or 500

    @app.errorhandler(413)
    def too_large(_error: HTTPException) -> tuple[Response | str, int]:
        message = f"the request body is too large: at most {BODY_MAX} bytes"
        if request.path.startswith("/api/"):
            return jsonify({"error": message}), 413
        return _page("Too large", f"<p>{html.escape(message)}</p>"), 413

    @app.get("/")
    def index() -> str:
        items = "".join(
            f'<li><a href="/posts/{p["id"]}">{html.escape(p["title"])}</a></li>'
            for p in list_posts()
        )
        side = "with dropsafe" if robust else "plain SQLAlchemy (pool_pre_ping)"
        return _page(
            "Blog",
            f"<p>{side}</p>"
            '<form method="post" action="/posts">'
            f'<input type="hidden" name="csrf_token" value="{html.escape(csrf_token())}">'
            f'<input name="title" placeholder="Title" required maxlength="{TITLE_MAX}"> '
            f'<textarea name="text" placeholder="Text" required maxlength="{TEXT_MAX}"></textarea> '
            '<button type="submit">Publish</button></form>'
            f'<ul id="posts">{items}</ul>',
        )

    @app.post("/posts")
    def create_from_form() -> Response:
        expected = session.get("csrf")
        sent = request.form.get("csrf_token", "")
        if not isinstance(expected, str) or not hmac.compare_digest(sent, expected):
            abort(403, "the form's CSRF token is missing or wrong: reload the page, then submit")
        title, text = request.form.get("title", "").strip(), request.form.get("text", "")
        if problem := post_problem(title, text):
            abort(400, problem)
        return redirect(f"/posts/{add_post(title, text)}", code=303)

    @app.get("/posts/<int:post_id>")
    def show(post_id: int) -> str:
        post = get_post(post_id)
        if post is None:
            abort(404)
        return _page(
            html.escape(post["title"]),
            f'<h1 id="title">{html.escape(post["title"])}</h1>'
            f"<p>{html.escape(post['text'])}</p><a href='/'>All posts</a>",
        )

    @app.get("/api/posts")
    def api_list() -> Response:
        return jsonify(list_posts())

    @app.post("/api/posts")
    def api_create() -> tuple[Response, int]:
        if not request.is_json:
            abort(415, "send the post as JSON, with Content-Type: application/json")
        body = request.get_json(silent=True)
        if body is None:
            abort(400, "the body is not valid JSON")
        if not isinstance(body, dict):
            abort(400, 'the body must be a JSON object: {"title": "...", "text": "..."}')
        title, text = body.get("title", ""), body.get("text", "")
        if isinstance(title, str):
            title = title.strip()
        if problem := post_problem(title, text):
            abort(400, problem)
        post_id = add_post(title, text)
        return jsonify({"id": post_id, "title": title}), 201

    @app.get("/api/posts/<int:post_id>")
    def api_show(post_id: int) -> Response:
        post = get_post(post_id)
        if post is None:
            abort(404)
        return jsonify(post)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "alive"})

    # A hung network must not hang the probe: the check runs aside, and waits 1 s at most.
    checker = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="blog-readyz")
    # A check given up on after 1 s goes on connecting (connect_wait) in its thread: whoever
    # ends the app first waits for it (``shutdown(wait=True)``), or it outlives the engine.
    app.config["READY_CHECKER"] = checker

    def database_answers() -> None:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        try:
            checker.submit(database_answers).result(timeout=_READY_TIMEOUT)
        except concurrent.futures.TimeoutError:
            return jsonify({"status": "unavailable", "why": "no answer within 1 s"}), 503
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            return jsonify({"status": "unavailable", "why": dropsafe.classify(exc).value}), 503
        return jsonify({"status": "ready"}), 200

    return app


def post_problem(title: object, text: object) -> str | None:
    """Say what is wrong with a post, or None: the checks the database would fail with a 500."""
    for name, value, limit in (("title", title, TITLE_MAX), ("text", text, TEXT_MAX)):
        if not isinstance(value, str):
            return f"the {name} must be a string, not {type(value).__name__}"
        if len(value) > limit:
            return f"the {name} is {len(value)} characters long: at most {limit}"
        if "\x00" in value:
            return f"the {name} holds a NUL character, which PostgreSQL text cannot store"
        try:
            value.encode()
        except UnicodeEncodeError:
            return f"the {name} is not valid UTF-8 text (a lone surrogate)"
    if not title:
        return "a post needs a title"
    return None


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
        f"<body>{body}</body></html>"
    )


def serve(app: Flask, host: str = "127.0.0.1", port: int = 8000) -> BaseWSGIServer:
    """Return a waitress server for ``app`` (call ``.run()``; `stop` it from another thread)."""
    import waitress

    return waitress.create_server(app, host=host, port=port, threads=16)


def stop(server: BaseWSGIServer, thread: threading.Thread, timeout: float = 10.0) -> None:
    """Stop a waitress ``server`` whose ``run()`` runs in ``thread``, and wait for it to end.

    Its sockets are closed by its own loop, woken by its trigger: closed from another thread
    while the loop sits in select(), they end the loop with EBADF, a crash of the server thread
    (seen under load). With every socket closed the loop has nothing left to watch and returns.
    """
    from waitress import wasyncore

    sockets = server._map  # noqa: SLF001 - waitress keeps the loop's sockets there, and only there
    server.trigger.pull_trigger(lambda: wasyncore.close_all(sockets))
    thread.join(timeout)
    server.task_dispatcher.shutdown(timeout=timeout)


if __name__ == "__main__":
    robust_flag = os.environ.get("DROPSAFE_ROBUST", "1") not in ("0", "false", "no")
    server = serve(create_app(robust=robust_flag), port=int(os.environ.get("PORT", "8000")))
    print(f"serving the blog on http://127.0.0.1:{server.effective_port}")
    server.run()
