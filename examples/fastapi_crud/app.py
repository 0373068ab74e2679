"""Users and items: a FastAPI app of the most common shape, adopting dropsafe with one line.

The shape of the open-source full-stack FastAPI template: sync endpoints, psycopg 3, a session
per request through a dependency (``with Session(engine) as session: yield session``), CRUD
functions that commit themselves, users with password hashes owning items.

dropsafe is one line, ``dropsafe.harden(engine)``; ``create_app(url, engine_mode=...)`` (or
``CRUD_ENGINE_MODE``) switches to a plain engine or ``pool_pre_ping=True`` to compare. With
``units=True`` (or ``CRUD_UNITS=1``) every endpoint is also decorated with
``@dropsafe.request_unit``: its database work runs as one unit of work, retried whole on a
disconnect, the CRUD functions' commits joined into it (see README.md).

Run it::

    CRUD_DATABASE_URL=postgresql+psycopg://app:secret@db/app uvicorn app:app
"""

import hashlib
import hmac
import os
import secrets
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal, TypeVar

import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import dropsafe

EngineMode = Literal["plain", "pre_ping", "harden"]
_Row = TypeVar("_Row", bound="Base")
# A real hash's cost (the template uses bcrypt): the request holds its transaction meanwhile.
HASH_ITERATIONS = 20_000


class Base(DeclarativeBase):
    """The app's tables."""


class User(Base):
    """A user, with a password hash."""

    __tablename__ = "user"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(sa.String(255), unique=True, index=True)
    full_name: Mapped[str | None] = mapped_column(sa.String(255))
    hashed_password: Mapped[str] = mapped_column(sa.String(255))
    is_active: Mapped[bool] = mapped_column(default=True)


class Item(Base):
    """An item, owned by a user (deleted with them)."""

    __tablename__ = "item"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(sa.String(255))
    description: Mapped[str | None] = mapped_column(sa.String(255))
    owner_id: Mapped[int] = mapped_column(sa.ForeignKey("user.id", ondelete="CASCADE"))


# -- API models ------------------------------------------------------------------------------


class UserCreate(BaseModel):
    """A signup."""

    email: str = Field(max_length=255)
    password: str = Field(min_length=8, max_length=40)
    full_name: str | None = Field(default=None, max_length=255)


class UserUpdate(BaseModel):
    """A change to a user; a new password is hashed again."""

    full_name: str | None = Field(default=None, max_length=255)
    password: str | None = Field(default=None, min_length=8, max_length=40)


class UserPublic(BaseModel):
    """A user, as answered (never the hash)."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    email: str
    full_name: str | None
    is_active: bool


class UsersPublic(BaseModel):
    """A page of users and the total."""

    data: list[UserPublic]
    count: int


class ItemCreate(BaseModel):
    """A new item."""

    title: str = Field(min_length=1, max_length=255)
    description: str | None = Field(default=None, max_length=255)


class ItemPublic(BaseModel):
    """An item, as answered."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    title: str
    description: str | None
    owner_id: int


class ItemsPublic(BaseModel):
    """A page of items and the total."""

    data: list[ItemPublic]
    count: int


# -- CRUD: each function commits its own work, as the template's do ---------------------------


def hash_password(password: str) -> str:
    """Salted PBKDF2 (stdlib); costs about as much as the template's bcrypt."""
    salt = secrets.token_hex(8)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), HASH_ITERATIONS)
    return f"{salt}${digest.hex()}"


def verify_password(password: str, hashed: str) -> bool:
    """Whether ``password`` matches ``hashed``."""
    salt, _, digest = hashed.partition("$")
    mine = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), HASH_ITERATIONS)
    return hmac.compare_digest(mine.hex(), digest)


def get_user_by_email(*, session: Session, email: str) -> User | None:
    """Return the user with this email, if any."""
    return session.scalars(sa.select(User).where(User.email == email)).first()


def create_user(*, session: Session, user_create: UserCreate) -> User:
    """Add a user and commit."""
    user = User(
        email=user_create.email,
        full_name=user_create.full_name,
        hashed_password=hash_password(user_create.password),
    )
    session.add(user)
    session.commit()
    session.refresh(user)
    return user


def update_user(*, session: Session, user: User, user_in: UserUpdate) -> User:
    """Change a user and commit."""
    if user_in.full_name is not None:
        user.full_name = user_in.full_name
    if user_in.password is not None:
        user.hashed_password = hash_password(user_in.password)
    session.add(user)
    session.commit()
    session.refresh(user)
    return user


def found_or_404(session: Session, model: type[_Row], key: int) -> _Row:
    """Return the row of ``model`` with primary key ``key``, or answer 404 ("no such user")."""
    row = session.get(model, key)
    if row is None:
        raise HTTPException(status_code=404, detail=f"no such {model.__name__.lower()}")
    return row


def create_item(*, session: Session, item_in: ItemCreate, owner_id: int) -> Item:
    """Add an item and commit."""
    item = Item(title=item_in.title, description=item_in.description, owner_id=owner_id)
    session.add(item)
    session.commit()
    session.refresh(item)
    return item


# -- the app ---------------------------------------------------------------------------------


def make_engine(database_url: str, engine_mode: EngineMode) -> sa.Engine:
    """Make the engine: plain, with ``pool_pre_ping``, or hardened by dropsafe (one line)."""
    if engine_mode not in ("plain", "pre_ping", "harden"):
        raise ValueError(f"engine_mode must be plain, pre_ping or harden, not {engine_mode!r}")
    engine = sa.create_engine(database_url, pool_size=5, pool_pre_ping=engine_mode == "pre_ping")
    if engine_mode == "harden":
        dropsafe.harden(engine)
    return engine


def create_app(  # noqa: C901 - the endpoints, one after another
    database_url: str, *, engine_mode: EngineMode = "harden", units: bool = False
) -> FastAPI:
    """Build the app on its own engine; ``units`` runs each endpoint as one unit of work."""
    engine = make_engine(database_url, engine_mode)
    app = FastAPI(title="users and items")
    app.state.engine = engine

    def get_session() -> Iterator[Session]:
        with Session(engine) as session:
            yield session

    session_dep = Annotated[Session, Depends(get_session)]
    unit: Callable[[Callable[..., Any]], Callable[..., Any]] = (
        dropsafe.request_unit if units else (lambda endpoint: endpoint)
    )

    @app.post("/users/")
    @unit
    def register_user(session: session_dep, user_in: UserCreate) -> UserPublic:
        if get_user_by_email(session=session, email=user_in.email) is not None:
            raise HTTPException(status_code=400, detail="this email is already registered")
        user = create_user(session=session, user_create=user_in)
        return UserPublic.model_validate(user)

    @app.get("/users/")
    @unit
    def read_users(session: session_dep, skip: int = 0, limit: int = 100) -> UsersPublic:
        count = session.scalar(sa.select(sa.func.count()).select_from(User)) or 0
        users = session.scalars(sa.select(User).order_by(User.id).offset(skip).limit(limit))
        return UsersPublic(data=[UserPublic.model_validate(u) for u in users], count=count)

    @app.get("/users/{user_id}")
    @unit
    def read_user(session: session_dep, user_id: int) -> UserPublic:
        user = found_or_404(session, User, user_id)
        return UserPublic.model_validate(user)

    @app.patch("/users/{user_id}")
    @unit
    def patch_user(session: session_dep, user_id: int, user_in: UserUpdate) -> UserPublic:
        user = found_or_404(session, User, user_id)
        return UserPublic.model_validate(update_user(session=session, user=user, user_in=user_in))

    @app.delete("/users/{user_id}")
    @unit
    def delete_user(session: session_dep, user_id: int) -> dict[str, str]:
        user = found_or_404(session, User, user_id)
        session.execute(sa.delete(Item).where(Item.owner_id == user_id))
        session.delete(user)
        session.commit()
        return {"message": "user deleted"}

    @app.post("/users/{user_id}/items/")
    @unit
    def add_item(session: session_dep, user_id: int, item_in: ItemCreate) -> ItemPublic:
        found_or_404(session, User, user_id)
        item = create_item(session=session, item_in=item_in, owner_id=user_id)
        return ItemPublic.model_validate(item)

    @app.get("/items/")
    @unit
    def read_items(session: session_dep, owner_id: int | None = None) -> ItemsPublic:
        where = [Item.owner_id == owner_id] if owner_id is not None else []
        count = session.scalar(sa.select(sa.func.count()).select_from(Item).where(*where)) or 0
        items = session.scalars(sa.select(Item).where(*where).order_by(Item.id).limit(100))
        return ItemsPublic(data=[ItemPublic.model_validate(i) for i in items], count=count)

    @app.put("/items/{item_id}")
    @unit
    def update_item(session: session_dep, item_id: int, item_in: ItemCreate) -> ItemPublic:
        item = found_or_404(session, Item, item_id)
        item.title = item_in.title
        item.description = item_in.description
        session.commit()
        session.refresh(item)
        return ItemPublic.model_validate(item)

    @app.delete("/items/{item_id}")
    @unit
    def delete_item(session: session_dep, item_id: int) -> dict[str, str]:
        item = found_or_404(session, Item, item_id)
        session.delete(item)
        session.commit()
        return {"message": "item deleted"}

    return app


def create_schema(engine: sa.Engine) -> None:
    """Create the tables if missing (a real app would use Alembic)."""
    Base.metadata.create_all(engine)


def _app_from_environment() -> FastAPI | None:
    url = os.environ.get("CRUD_DATABASE_URL")
    if url is None:
        return None
    mode = os.environ.get("CRUD_ENGINE_MODE", "harden")
    app = create_app(url, engine_mode=mode, units=os.environ.get("CRUD_UNITS") == "1")  # type: ignore[arg-type]
    create_schema(app.state.engine)
    return app


# `uvicorn app:app` with CRUD_DATABASE_URL set; importing the module for tests needs neither.
app = _app_from_environment()
