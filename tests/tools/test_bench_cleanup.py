"""The bench closes what it opened, also on a path where a request is still hung.

Once, an unclosed asyncpg transport (a ResourceWarning, an error under filterwarnings=error)
failed the quick benchmark's half-open section: its asyncpg requests run on an event loop of
their own, and the cleanup skipped the engine and the loop while a request still hung on it.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import warnings

import pytest
import sqlalchemy as sa

from dropsafe._bench._engines import Variant
from dropsafe._bench._faults import _warm


class _Routed:
    """The bench's view of a server, reached through a proxy."""

    def __init__(self, server, proxy) -> None:
        self.server = server
        self.proxy = proxy

    def url(self, driver: str) -> str:
        return self.proxy.route(self.server.url(driver))


def _hang_then_clean_up(server, proxy) -> bool:
    """Hang an asyncpg request of the half-open bench, run its cleanup; return if it ended."""
    cleanups = []
    request = _warm(Variant("plain"), "asyncpg", _Routed(server, proxy), cleanups)
    checked_out = threading.Event()

    def on_checkout(*_: object) -> None:
        checked_out.set()

    sa.event.listen(sa.pool.Pool, "checkout", on_checkout)
    proxy.blackhole()  # the request's query is never answered: it hangs, as half-open

    def hung() -> None:
        with contextlib.suppress(Exception):  # as run_half_open's threads do
            request()

    thread = threading.Thread(target=hung, daemon=True)
    try:
        thread.start()
        assert checked_out.wait(10)
        for cleanup in cleanups:
            cleanup()
        thread.join(10)
        return not thread.is_alive()
    finally:
        sa.event.remove(sa.pool.Pool, "checkout", on_checkout)
        proxy.cut("rst")  # old code: end the hung request, or the thread lives on
        proxy.heal()
        thread.join(10)


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.shares_server
@pytest.mark.timeout(60)
def test_a_request_still_hung_at_cleanup_is_ended_and_its_engine_closed(
    postgres_server, chaos_proxy
) -> None:
    ended = _hang_then_clean_up(postgres_server, chaos_proxy)
    assert ended, "the cleanup left a request hung on the bench's event loop"
    # Nothing of the loop is kept now: whatever it left open is reported when collected.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert unclosed == []
