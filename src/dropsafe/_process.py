"""What belongs to one process alone, made anew in a forked child (`os.register_at_fork`).

A pre-fork server (gunicorn ``--preload``, uWSGI, Celery's prefork pool, multiprocessing's
``fork``) copies the parent's memory into each worker, but only the thread that forked: a
thread the parent started is gone in the child while the objects that stand for it say it
runs, a lock another thread held stays held for ever, and a random generator draws the
parent's numbers in every child. Whatever the parent did before the fork, each of those is
renewed here in the child, before any of the child's own code runs.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    import random
    from collections.abc import Callable

__all__ = ["renew_in_child", "renew_lock_in_child", "reseed_in_child", "unpatched"]


class _Locked(Protocol):
    _lock: threading.Lock


_RENEWALS: list[Callable[[], None]] = []
# Held weakly: an engine's objects register themselves and must not live on for it.
_LOCKED: weakref.WeakSet[_Locked] = weakref.WeakSet()
_GENERATORS: weakref.WeakSet[random.Random] = weakref.WeakSet()


def renew_in_child(renew: Callable[[], None]) -> None:
    """Call ``renew`` in every child forked from now on (a module's process-wide state)."""
    _RENEWALS.append(renew)


def renew_lock_in_child(owner: _Locked) -> None:
    """Give ``owner`` a fresh ``_lock`` in a forked child: another thread may hold the old one."""
    _LOCKED.add(owner)


def reseed_in_child(rng: random.Random) -> random.Random:
    """Reseed ``rng`` (from the OS) in a forked child, so that no two workers draw alike."""
    _GENERATORS.add(rng)
    return rng


def _in_child() -> None:
    # Only the forking thread lives on: no other thread can hold or take these meanwhile.
    for owner in list(_LOCKED):
        owner._lock = threading.Lock()  # noqa: SLF001 - the protocol's own attribute
    for rng in list(_GENERATORS):
        rng.seed()
    for renew in _RENEWALS:
        renew()


os.register_at_fork(after_in_child=_in_child)


# What eventlet calls the modules it patches, where that is not their own name.
_EVENTLET_NAMES = {"_thread": "thread", "queue": "thread"}


def unpatched(module: str, name: str) -> Callable[..., Any]:
    """Return the function ``module.name`` as the interpreter made it, even if gevent patched it.

    gevent's ``monkey.patch_all()`` (and eventlet's ``monkey_patch()``) replace threads, locks
    and ``select`` with cooperative ones, whether dropsafe was imported before or after. What
    must run beside the app's greenlets (the watchdog thread: a driver without a green wait
    callback blocks the whole hub) or look at a socket without yielding takes the originals.
    """
    gevent_monkey = sys.modules.get("gevent.monkey")
    eventlet_patcher = sys.modules.get("eventlet.patcher")
    if gevent_monkey is not None:
        original = gevent_monkey.get_original(module, name)
    # eventlet's original() imports a second copy of the module: only when it patched one.
    elif eventlet_patcher is not None and eventlet_patcher.is_monkey_patched(
        _EVENTLET_NAMES.get(module, module)
    ):
        original = getattr(eventlet_patcher.original(module), name)
    else:
        original = getattr(importlib.import_module(module), name)
    return cast("Callable[..., Any]", original)
