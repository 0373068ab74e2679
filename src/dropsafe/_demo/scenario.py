"""``dropsafe demo``: the blog twice, plain and with dropsafe, simulated users, one fault schedule.

A throwaway PostgreSQL (system binaries, or the embedded wheel) serves two databases; each blog
reaches its own through a proxy adding about 10 ms RTT; every fault hits both at the same moment:
cuts (FIN, RST), terminated backends, cuts while COMMITs run, a blackhole, a restart. Users
create and read posts, and, like people, submit a form again once when it fails. At the end: a
side-by-side table, a PNG timeline, and the raw results as JSON.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from dropsafe._bench._report import machine, percentile
from dropsafe.testing import ChaosProxy, PostgresServer
from dropsafe.testing._runtime import free_port

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

__all__ = ["Outcome", "run_demo"]

SIDES = ("plain", "dropsafe")
SLOW_COMMIT = """
CREATE OR REPLACE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN PERFORM pg_sleep(0.03); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON blog_posts
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
"""
_REQUEST_TIMEOUT = 30.0


@dataclass(frozen=True)
class Outcome:
    """One HTTP request a simulated user made."""

    side: str
    at: float  # seconds since the start
    what: str  # create, resubmit, read
    ok: bool
    latency: float


@dataclass
class Run:
    """Everything the demo records."""

    outcomes: list[Outcome] = field(default_factory=list)
    faults: list[tuple[float, str]] = field(default_factory=list)
    acknowledged: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in SIDES})
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)


def run_demo(
    *,
    duration: float = 60.0,
    seed: int = 1,
    out: Path,
    users: int = 4,
    show: Callable[[Run, float, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the demo; write results.json and timeline.png into ``out``; return the summary."""
    from dropsafe._demo.blog import create_app, serve, stop

    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("waitress").setLevel(logging.CRITICAL)
    run = Run()
    with PostgresServer() as server:
        urls, proxies, servers = {}, {}, {}
        try:
            for side in SIDES:
                server.execute(f"CREATE DATABASE blog_{side}")
                proxy = ChaosProxy(server.host, server.port)
                proxy.start()
                proxy.latency(5)
                proxies[side] = proxy
                app = create_app(
                    proxy.route(server.url("psycopg2", database=f"blog_{side}")),
                    robust=side == "dropsafe",
                )
                app.logger.disabled = True  # errors are counted, not printed over the display
                server.execute(SLOW_COMMIT, database=f"blog_{side}")
                web = serve(app, port=free_port("127.0.0.1"))
                urls[side] = f"http://127.0.0.1:{web.effective_port}"
                thread = threading.Thread(target=web.run, daemon=True, name=f"blog-{side}")
                thread.start()
                servers[side] = (web, thread)
            _drive(run, urls, server, proxies, duration=duration, seed=seed, users=users, show=show)
            summary = _summarise(run, server, duration)
        finally:
            for web, thread in servers.values():
                stop(web, thread)
            for proxy in proxies.values():
                proxy.close()
    (out / "results.json").write_text(
        json.dumps(
            {
                "machine": machine(),
                "duration": duration,
                "seed": seed,
                "summary": summary,
                "faults": run.faults,
                "outcomes": [asdict(o) for o in run.outcomes],
            },
            indent=1,
        )
    )
    _timeline(run, duration, out / "timeline.png")
    return summary


def _drive(
    run: Run,
    urls: dict[str, str],
    server: PostgresServer,
    proxies: dict[str, ChaosProxy],
    *,
    duration: float,
    seed: int,
    users: int,
    show: Callable[[Run, float, dict[str, Any]], None] | None,
) -> None:
    started = time.monotonic()
    stop = threading.Event()
    workers = [
        threading.Thread(
            target=_user,
            args=(run, side, urls[side]),
            kwargs={"number": number, "started": started, "stop": stop},
            daemon=True,
        )
        for side in SIDES
        for number in range(users)
    ]
    for worker in workers:
        worker.start()
    status: dict[str, Any] = {"last fault": "-"}
    schedule = _schedule(duration, random.Random(seed))
    for due, fault in schedule:
        while time.monotonic() - started < due:
            if show is not None:
                show(run, time.monotonic() - started, status)
            stop.wait(0.25)  # the display's refresh pace, not a synchronisation
        run.faults.append((round(time.monotonic() - started, 2), fault))
        _inject(fault, server, proxies)
        status["last fault"] = fault
    while time.monotonic() - started < duration:
        if show is not None:
            show(run, time.monotonic() - started, status)
        stop.wait(0.25)
    stop.set()
    for worker in workers:
        worker.join(timeout=_REQUEST_TIMEOUT + 5)


def _schedule(duration: float, rng: random.Random) -> list[tuple[float, str]]:
    """Spread the faults over the run, each kind at least once; both sides get the same."""
    kinds = ["cut-fin", "cut-rst", "terminate", "commit-cut", "commit-cut", "cut-rst"]
    rng.shuffle(kinds)
    kinds.insert(len(kinds) // 2, "blackhole")
    kinds.insert(len(kinds) * 3 // 4, "restart")
    step = duration / (len(kinds) + 1)
    return [(round(step * (i + 1), 2), kind) for i, kind in enumerate(kinds)]


def _inject(fault: str, server: PostgresServer, proxies: dict[str, ChaosProxy]) -> None:
    both = list(proxies.values())
    if fault in ("cut-fin", "cut-rst"):
        for proxy in both:
            proxy.cut("fin" if fault == "cut-fin" else "rst")
    elif fault == "terminate":
        server.terminate_backends()
    elif fault == "restart":
        server.restart("fast")
    elif fault == "blackhole":
        _blackhole(both)
    elif fault == "commit-cut":
        _cut_at_commit(server, both)


def _blackhole(proxies: list[ChaosProxy]) -> None:
    for proxy in proxies:
        proxy.blackhole()
    time.sleep(3)  # the length of the outage itself
    for proxy in proxies:
        proxy.heal()
        proxy.latency(5)


def _cut_at_commit(server: PostgresServer, proxies: list[ChaosProxy]) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if server.execute(
            "SELECT 1 FROM pg_stat_activity WHERE query ILIKE 'COMMIT%' AND state = 'active'"
        ):
            break
    for proxy in proxies:
        proxy.cut("rst")


def _user(
    run: Run, side: str, base: str, *, number: int, started: float, stop: threading.Event
) -> None:
    for n in range(100_000):
        if stop.is_set():
            return
        title = f"{side}-{number}-{n}"
        post_id = None
        for what in ("create", "resubmit"):
            ok, latency, body = _call(f"{base}/api/posts", {"title": title, "text": "hello"})
            run.add(Outcome(side, time.monotonic() - started, what, ok, latency))
            if ok:
                post_id = body.get("id")
                with run.lock:
                    run.acknowledged[side].append(title)
                break
        if post_id is not None:
            ok, latency, _ = _call(f"{base}/api/posts/{post_id}")
            run.add(Outcome(side, time.monotonic() - started, "read", ok, latency))


def _call(url: str, payload: dict[str, str] | None = None) -> tuple[bool, float, dict[str, Any]]:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    began = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=_REQUEST_TIMEOUT) as response:
            body = json.loads(response.read() or b"{}")
    except (urllib.error.URLError, OSError, ValueError):
        return False, time.monotonic() - began, {}
    return True, time.monotonic() - began, body


def _summarise(run: Run, server: PostgresServer, duration: float) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for side in SIDES:
        rows = server.execute(
            "SELECT title, count(*) FROM blog_posts GROUP BY title", database=f"blog_{side}"
        )
        stored = Counter({title: int(count) for title, count in rows})
        outcomes = [o for o in run.outcomes if o.side == side]
        latencies = [o.latency for o in outcomes if o.ok]
        summary[side] = {
            "requests ok": sum(o.ok for o in outcomes),
            "requests failed": sum(not o.ok for o in outcomes),
            "p50 ms": round(percentile(latencies, 0.5) * 1000, 1),
            "p99 ms": round(percentile(latencies, 0.99) * 1000, 1),
            "posts lost": sum(1 for title in run.acknowledged[side] if stored[title] == 0),
            "posts duplicated": sum(1 for count in stored.values() if count > 1),
            "requests per s": round(len(outcomes) / duration, 1),
        }
    return summary


def _timeline(run: Run, duration: float, path: Path) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    seconds = int(duration) + 1
    figure, axes = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
    for row, side in enumerate(SIDES):
        ok, failed = [0] * seconds, [0] * seconds
        for outcome in run.outcomes:
            if outcome.side == side and int(outcome.at) < seconds:
                (ok if outcome.ok else failed)[int(outcome.at)] += 1
        axes[row].plot(range(seconds), ok, label="requests ok /s", color="tab:green")
        axes[row].bar(range(seconds), failed, label="errors /s", color="tab:red")
        for at, fault in run.faults:
            axes[row].axvline(at, color="grey", linestyle=":", linewidth=1)
            axes[row].text(at, axes[row].get_ylim()[1] * 0.05, fault, fontsize=7, rotation=90)
        title = "plain SQLAlchemy, pool_pre_ping=True" if side == "plain" else "with dropsafe"
        axes[row].set_title(f"{title}: {sum(failed)} errors", fontsize=10)
        axes[row].legend(loc="upper right", fontsize=7)
    axes[1].set_xlabel("seconds")
    axes[1].text(0.01, -0.35, machine(), transform=axes[1].transAxes, fontsize=6, color="grey")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
