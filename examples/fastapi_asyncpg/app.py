"""Notes: a small FastAPI app on asyncpg that keeps answering while its connections fail.

What dropsafe brings here, and nothing else changes:

- the engine comes from `dropsafe.create_async_engine`: dead pooled connections are replaced
  at checkout without a round trip, half-open sockets are found by TCP in seconds;
- every write is a unit of work, `dropsafe.run_transaction_async`: a connection cut, a backend
  terminated, the server restarted, and the whole unit runs again; a COMMIT whose reply was
  lost is resolved by asking the server, so a note is never written twice;
- `get_session` is the request-scoped `AsyncSession` dependency FastAPI users know, for code
  that does not need retries (a failure there is a 503, not a wrong answer).

Run it (a PostgreSQL URL with the asyncpg driver)::

    NOTES_DATABASE_URL=postgresql+asyncpg://app:secret@db/app uvicorn app:app

The tests in tests/examples/test_fastapi_asyncpg.py drive it over HTTP while they cut its
connections, terminate its backends and restart the server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator  # noqa: TC003 - FastAPI reads annotations at run time
from contextlib import asynccontextmanager
from typing import Annotated

import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import dropsafe


class Base(DeclarativeBase):
    """The app's tables."""


class Note(Base):
    """A note, as stored."""

    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    # The client's own id for the request: what the tests count notes by. No UNIQUE
    # constraint on purpose: a note written twice must show, not be refused.
    request_id: Mapped[str] = mapped_column(sa.String(64), index=True)
    text: Mapped[str] = mapped_column(sa.Text)


class NoteIn(BaseModel):
    """A note to add; ``request_id`` is the client's own id for the request."""

    text: str = Field(min_length=1, max_length=10_000)
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex, max_length=64)


class NoteOut(BaseModel):
    """A note, as answered."""

    id: int
    request_id: str
    text: str


def create_app(database_url: str, *, policy: dropsafe.Policy | None = None) -> FastAPI:
    """Build the app on its own engine (the tests build one per server they start)."""
    engine = dropsafe.create_async_engine(database_url, policy=policy, pool_size=5)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await create_schema(engine)
        yield
        await engine.dispose()

    app = FastAPI(title="notes", lifespan=lifespan)
    app.state.engine = engine
    app.state.sessions = sessions

    @app.post("/notes", status_code=201)
    async def add_note(note: NoteIn, request: Request) -> NoteOut:
        async def unit(session: AsyncSession) -> NoteOut:
            row = Note(request_id=note.request_id, text=note.text)
            session.add(row)
            await session.flush()  # the id, inside the unit: run again whole on a retry
            return NoteOut(id=row.id, request_id=row.request_id, text=row.text)

        return await dropsafe.run_transaction_async(request.app.state.sessions, unit)

    @app.get("/notes")
    async def count_notes(request: Request, request_id: str | None = None) -> dict[str, int]:
        # A read that must not fail is a unit of work too (nothing to commit, run again whole).
        async def unit(session: AsyncSession) -> int:
            query = sa.select(sa.func.count()).select_from(Note)
            if request_id is not None:
                query = query.where(Note.request_id == request_id)
            return int(await session.scalar(query) or 0)

        return {"count": await dropsafe.run_transaction_async(request.app.state.sessions, unit)}

    @app.get("/notes/{note_id}")
    async def get_note(
        note_id: int, session: Annotated[AsyncSession, Depends(get_session)]
    ) -> NoteOut:
        row = await session.get(Note, note_id)
        if row is None:
            raise HTTPException(status_code=404, detail="no such note")
        return NoteOut(id=row.id, request_id=row.request_id, text=row.text)

    return app


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """Yield the request's `AsyncSession`; closed (its connection pooled) after the reply."""
    async with request.app.state.sessions() as session:
        yield session


async def create_schema(engine: AsyncEngine) -> None:
    """Create the table if missing (a real app would use Alembic)."""
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)


# `uvicorn app:app` with NOTES_DATABASE_URL set; importing the module for tests needs neither.
app = create_app(os.environ["NOTES_DATABASE_URL"]) if "NOTES_DATABASE_URL" in os.environ else None
