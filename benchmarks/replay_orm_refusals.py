"""How often an ordinary ORM app's requests keep the first-statement replay (issue 26, history 9).

``python benchmarks/replay_orm_refusals.py [--trials 20] [--label NAME]``

The session-state proof refuses a replay on a connection whose earlier statements may have
changed its session, and onto a pooled connection that did. This measures what that costs an
app that never touches session state: a small blog (a ``"user"`` table, an ``app."order"``
table whose names SQLAlchemy quotes, posts with tags, JSONB, an enum, server defaults) and ten
request shapes of the ORM (inserts, selectinload / joinedload reads, ILIKE search, counts,
date_trunc and window statistics, an upsert, an update, a delete). Four threads warm a pool of
four; then each shape runs ``--trials`` times, after a few ordinary requests on every pooled
connection, with the backend of its next checkout terminated
(a real fault: ``pg_terminate_backend``), and every outcome is counted: replayed, refused (and
dropsafe's reason, from its debug log), or not a first-statement loss at all. Also printed:
the distinct statement texts the warm-up sent and how many of them the whitelist marks.
Runs against the ``dropsafe`` found on ``sys.path`` (``PYTHONPATH=old/src`` measures another
version). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime  # SQLAlchemy reads the Mapped[...] annotations at run time
import enum
import logging
import random
import threading

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
)

import dropsafe
from dropsafe.events import FirstStatementReplayed
from dropsafe.testing import PostgresServer


class Base(DeclarativeBase):
    """The blog's models."""


class Mood(enum.Enum):
    """An enum column, as apps have."""

    DRAFT = "draft"
    PUBLISHED = "published"


post_tags = sa.Table(
    "post_tags",
    Base.metadata,
    sa.Column("post_id", sa.ForeignKey("post.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("tag_id", sa.ForeignKey("tag.id", ondelete="CASCADE"), primary_key=True),
)


class User(Base):
    """A table named by a reserved word: SQLAlchemy quotes it."""

    __tablename__ = "user"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(sa.String(200), unique=True)
    created: Mapped[datetime.datetime] = mapped_column(server_default=sa.func.now())
    posts: Mapped[list[Post]] = relationship(back_populates="author")


class Post(Base):
    """Posts, with tags, JSONB and an enum."""

    __tablename__ = "post"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("user.id"))
    title: Mapped[str] = mapped_column(sa.String(200))
    meta: Mapped[dict[str, object]] = mapped_column(JSONB, default=dict)
    state: Mapped[Mood] = mapped_column(default=Mood.DRAFT)
    score: Mapped[float] = mapped_column(sa.Numeric(10, 2), default=0)
    created: Mapped[datetime.datetime] = mapped_column(server_default=sa.func.now())
    author: Mapped[User] = relationship(back_populates="posts")
    tags: Mapped[list[Tag]] = relationship(secondary=post_tags)


class Tag(Base):
    """Tags, written by an upsert."""

    __tablename__ = "tag"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50), unique=True)
    uses: Mapped[int] = mapped_column(default=0)


class Order(Base):
    """A schema-qualified table named by a reserved word: ``app."order"``."""

    __tablename__ = "order"
    __table_args__ = {"schema": "app"}  # noqa: RUF012 - SQLAlchemy's declarative form
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("user.id"))
    total: Mapped[float] = mapped_column(sa.Numeric(10, 2))


_COUNTER = iter(range(10**9))
_COUNTER_LOCK = threading.Lock()


def _n() -> int:
    with _COUNTER_LOCK:
        return next(_COUNTER)


def signup(s: Session) -> None:
    s.add(User(email=f"u{_n()}@example.org"))
    s.commit()


def create_post(s: Session) -> None:
    user = s.scalars(sa.select(User).order_by(User.id.desc()).limit(1)).one()
    tags = s.scalars(sa.select(Tag).where(Tag.name.in_(["a", "b"]))).all()
    s.add(Post(author=user, title=f"t{_n()}", meta={"k": 1}, tags=list(tags)))
    s.commit()


def list_posts(s: Session) -> None:
    query = sa.select(Post).options(selectinload(Post.tags), joinedload(Post.author))
    s.scalars(query.order_by(Post.created.desc()).limit(20).offset(0)).unique().all()


def search(s: Session) -> None:
    s.scalars(sa.select(Post).where(Post.title.ilike("%t1%")).limit(10)).all()
    s.scalar(sa.select(sa.func.count()).select_from(Post).where(Post.state == Mood.DRAFT))


def stats(s: Session) -> None:
    day = sa.func.date_trunc("day", Post.created)
    s.execute(sa.select(day, sa.func.count(Post.id)).group_by(day)).all()
    rank = sa.func.row_number().over(partition_by=Post.author_id, order_by=Post.score.desc())
    s.execute(sa.select(Post.id, rank).limit(10)).all()


def upsert_tag(s: Session) -> None:
    statement = insert(Tag).values(name=random.choice("abc"), uses=1)
    s.execute(
        statement.on_conflict_do_update(
            index_elements=[Tag.name], set_={"uses": Tag.uses + statement.excluded.uses}
        )
    )
    s.commit()


def update_post(s: Session) -> None:
    post = s.scalars(sa.select(Post).order_by(Post.id.desc()).limit(1)).first()
    if post is not None:
        post.score = float(post.score) + 1
        post.meta = {**post.meta, "seen": True}
    s.commit()


def delete_post(s: Session) -> None:
    post = s.scalars(sa.select(Post).order_by(Post.id).limit(1).with_for_update()).first()
    if post is not None:
        s.delete(post)
    s.commit()


def place_order(s: Session) -> None:
    user = s.get(User, 1)
    if user is not None:
        s.add(Order(user_id=user.id, total=9.5))
    s.commit()


def read_order(s: Session) -> None:
    s.scalars(sa.select(Order).where(Order.user_id == 1).limit(5)).all()


SHAPES = {
    f.__name__: f
    for f in (
        signup,
        create_post,
        list_posts,
        search,
        stats,
        upsert_tag,
        update_post,
        delete_post,
        place_order,
        read_order,
    )
}


class _Reasons(logging.Handler):
    """dropsafe's debug lines that say why a first statement was not replayed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "will not replay" in message:
            self.seen.append(message.split("replay this first statement:")[-1].strip())


def measure(  # noqa: C901, PLR0915 - one measurement, read top to bottom
    server: PostgresServer, driver: str, trials: int
) -> dict[str, collections.Counter]:
    """Warm a pool of four with four threads; then fault each shape ``trials`` times."""
    events: list[object] = []
    engine = dropsafe.create_engine(
        server.url(driver),
        policy=dropsafe.Policy(hooks=(events.append,)),
        pool_size=4,
        max_overflow=0,
    )
    texts: set[str] = set()
    event.listen(engine, "before_cursor_execute", lambda *a: texts.add(a[2]))
    names = list(SHAPES)

    def warm(seed: int, requests: int = 50) -> None:
        rng = random.Random(seed)
        for _ in range(requests):
            # Two threads on the same post: the app's own race, not a fault.
            with (
                Session(engine) as s,
                contextlib.suppress(sa.exc.IntegrityError, sa.orm.exc.StaleDataError),
            ):
                SHAPES[rng.choice(names)](s)

    def warm_all(requests: int) -> None:
        threads = [threading.Thread(target=warm, args=(i, requests)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)

    warm_all(50)
    marked = [t for t in sorted(texts) if _marks(t)]
    pool_marked = _pool_marks(engine)

    reasons = _Reasons()
    logger = logging.getLogger("dropsafe")
    logger.addHandler(reasons)
    logger.setLevel(logging.DEBUG)
    results: dict[str, collections.Counter] = {}
    armed: list[bool] = [False]

    @event.listens_for(engine, "checkout")
    def lose(dbapi_connection: object, *_: object) -> None:
        if armed[0]:
            armed[0] = False
            pid = dbapi_connection.get_backend_pid() if driver == "psycopg2" else None  # type: ignore[attr-defined]
            if pid is None:
                pid = dbapi_connection.info.backend_pid  # type: ignore[attr-defined]
            server.execute(f"SELECT pg_terminate_backend({int(pid)}, 5000)")

    try:
        for name, shape in SHAPES.items():
            counts: collections.Counter[str] = collections.Counter()
            for _ in range(trials):
                # A fault replaces the connection it hits: the app's ordinary traffic runs
                # between faults, as it would, before the next one.
                warm_all(3)
                del events[:], reasons.seen[:]
                armed[0] = True
                try:
                    with Session(engine) as s:
                        shape(s)
                    replays = [e for e in events if isinstance(e, FirstStatementReplayed)]
                    outcome = "replayed" if replays else "no loss seen"
                except sa.exc.DBAPIError:
                    outcome = "refused: " + (reasons.seen[0] if reasons.seen else "(no reason)")
                counts[outcome] += 1
            results[name] = counts
    finally:
        logger.removeHandler(reasons)
        engine.dispose()
    results["_texts"] = collections.Counter({"distinct": len(texts), "marked": len(marked)})
    results["_pool"] = pool_marked
    for text in marked:
        print(f"  marked ({driver}): {text[:160]!r}")
    return results


def _marks(text: str) -> bool:
    try:
        from dropsafe._engine.session_state import may_change_session
    except ImportError:  # a dropsafe before issue 26's whitelist: nothing is marked
        return False
    return may_change_session(text)


def _pool_marks(engine: sa.Engine) -> collections.Counter[str]:
    """How many of the pool's connections are marked as changed (checked out one by one)."""
    counts: collections.Counter[str] = collections.Counter()
    held = [engine.raw_connection() for _ in range(4)]
    for connection in held:
        marked = any(k.endswith("session_state_changed") and v for k, v in connection.info.items())
        counts["marked" if marked else "clean"] += 1
    for connection in held:
        connection.close()
    return counts


def main() -> None:
    """Run the measurement for psycopg2 and psycopg 3; print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--label", default="this branch")
    args = parser.parse_args()
    with PostgresServer() as server:
        engine = sa.create_engine(server.url("psycopg2"))
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE SCHEMA app")
            Base.metadata.create_all(conn)
            conn.execute(sa.insert(User).values(email="first@example.org"))
            conn.execute(sa.insert(Tag), [{"name": "a"}, {"name": "b"}])
        engine.dispose()
        print(f"## First-statement replay for an ordinary ORM app ({args.label})\n")
        for driver in ("psycopg2", "psycopg"):
            results = measure(server, driver, args.trials)
            texts, pool = results.pop("_texts"), results.pop("_pool")
            print(
                f"\n### {driver}: {texts['distinct']} distinct statement texts, "
                f"{texts['marked']} marked; pooled connections after warm-up: {dict(pool)}\n"
            )
            print("| shape | outcomes of a backend terminated at checkout |")
            print("|---|---|")
            for name, counts in results.items():
                cells = ", ".join(f"{k}: {v}" for k, v in counts.most_common())
                print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
