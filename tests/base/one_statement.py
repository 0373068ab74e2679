"""What the classification tests share: one statement on a fresh dropsafe engine, its error."""

from __future__ import annotations

import asyncio

import dropsafe


def error_of_one_statement(url, driver, statement, *, policy, connect_args, listen=None):
    """Run ``statement`` on a fresh dropsafe engine (async for asyncpg, with ``connect_args``
    otherwise), ``listen(sync_engine)`` called on it first: the error raised, or None."""
    if driver == "asyncpg":

        async def attempt():
            engine = dropsafe.create_async_engine(url, policy=policy)
            if listen is not None:
                listen(engine.sync_engine)
            try:
                async with engine.connect() as conn:
                    await conn.execute(statement)
            except Exception as exc:
                return exc
            finally:
                await engine.dispose()
            return None

        return asyncio.run(attempt())
    engine = dropsafe.create_engine(url, policy=policy, connect_args=connect_args)
    if listen is not None:
        listen(engine)
    try:
        with engine.connect() as conn:
            conn.execute(statement)
    except Exception as exc:
        return exc
    finally:
        engine.dispose()
    return None


__all__ = ["error_of_one_statement"]
