"""Dead peers found fast, slow ones never: ``python benchmarks/detection.py [--runs 3]``.

Issue 27 item 4, measured with the default policy on real servers and kernel faults (needs
root: `kernel_blackhole`):
- half-open: a connection's server blackholed while it is idle in a transaction (the next
  statement is sent into the void) or while a query runs; seconds to the driver's error;
- vanished primary: a writer (`run_transaction`) on ``primary,standby``; the primary is
  blackholed and its standby promoted at once, or after a failover manager's delay (6 s);
  seconds from the promotion to the first acknowledged write;
- slow link (false positives): through a ChaosProxy with 100 ms round trip and a bandwidth
  limit, a large result and a large upload that each take longer than ``tcp_user_timeout``,
  and a query longer than it through the link and directly. Any error is a false alarm.

Each figure is the median of ``--runs`` runs (all runs kept in the JSON). ``--label`` names the
code measured (``before`` / ``after``): results/detection.json keeps one entry per label and
results/DETECTION.md shows every label's table. Takes about 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import dropsafe
from dropsafe._bench._detection import half_open_seconds, slow_link_run, vanished_primary_seconds
from dropsafe._bench._report import load_average, machine, table
from dropsafe.testing import ChaosProxy, PostgresServer, kernel_blackhole

RESULTS = Path(__file__).parent / "results"
DRIVERS = ("psycopg2", "psycopg", "asyncpg", "pg8000")
MULTI_HOST_DRIVERS = ("psycopg2", "psycopg", "asyncpg")  # pg8000 takes one host
PROMOTE_AFTER = (0.0, 6.0)
SLOW_LINK_KBPS = 40_000  # 5 MB/s: 32 MB take 6.4 s, past the default tcp_user_timeout (4 s)
SLOW_LINK_MEGABYTES = 32
LONG_QUERY = 8.0


def half_open(drivers: list[str], runs: int) -> dict[str, list[float]]:
    """Return seconds per "driver mid-idle" / "driver mid-query", one per run."""
    found: dict[str, list[float]] = {}
    with PostgresServer() as server:
        for _ in range(runs):
            for driver in drivers:
                for mid_query in (False, True):
                    name = f"{driver} {'mid-query' if mid_query else 'mid-idle'}"
                    seconds = half_open_seconds(
                        server,
                        driver,
                        kernel_blackhole,
                        mid_query=mid_query,
                    )
                    print(f"half-open {name}: {seconds:.2f}s", flush=True)
                    found.setdefault(name, []).append(seconds)
    return found


def vanished(drivers: list[str], runs: int) -> dict[str, list[float]]:
    """Return seconds per "driver, promoted after N s", one per run."""
    found: dict[str, list[float]] = {}
    for _ in range(runs):
        for driver in [d for d in drivers if d in MULTI_HOST_DRIVERS]:
            for delay in PROMOTE_AFTER:
                with PostgresServer() as primary:
                    primary.execute("CREATE TABLE ledger (n int)")
                    standby = primary.make_standby()
                    try:
                        seconds = vanished_primary_seconds(
                            primary,
                            standby,
                            driver,
                            kernel_blackhole,
                            promote_after=delay,
                        )
                    finally:
                        standby.close()
                name = f"{driver}, promoted after {delay:g} s"
                print(f"vanished primary {name}: {seconds:.2f}s", flush=True)
                found.setdefault(name, []).append(seconds)
    return found


def slow_link(drivers: list[str]) -> dict[str, Any]:
    """Return each driver's slow-link run: seconds per operation and errors (false alarms)."""
    found: dict[str, Any] = {}
    with PostgresServer() as server, ChaosProxy(server.host, server.port) as proxy:
        proxy.latency(50)
        proxy.bandwidth(SLOW_LINK_KBPS)
        for driver in drivers:
            run = slow_link_run(
                proxy.route(server.url(driver)),
                driver,
                policy=dropsafe.Policy(),
                megabytes=SLOW_LINK_MEGABYTES,
                sleep=LONG_QUERY,
                direct_url=server.url(driver),
                connect_args=server.connect_args(driver),
            )
            print(f"slow link {driver}: {run.seconds} errors={run.errors}", flush=True)
            found[driver] = {"seconds": run.seconds, "errors": run.errors}
    return found


def report(everything: dict[str, Any]) -> list[str]:
    """Return DETECTION.md's lines: one section per label."""
    lines = [
        "# Detection: a vanished primary, half-open connections, a slow link",
        "",
        "Written by `python benchmarks/detection.py` (issue 27 item 4). Seconds; each figure",
        "the median of the runs (min-max beside it). Half-open: from the blackhole to the",
        "driver's error. Vanished primary: from the standby's promotion to the first write",
        "acknowledged on it. Slow link: 100 ms round trip and a bandwidth limit through a",
        "ChaosProxy, a large result, a large upload and a long query; an error is a false alarm.",
    ]
    for label, result in everything.items():
        lines += ["", f"## {label}", "", f"{result['machine']}; load {result['load']}."]
        lines += [f"Defaults: {result['defaults']}.", ""]
        rows = [
            [f"half-open, {name}", *_stats(values)] for name, values in result["half_open"].items()
        ]
        rows += [
            [f"vanished primary, {name}", *_stats(values)]
            for name, values in result["vanished"].items()
        ]
        lines += table(["scenario", "median", "min-max", "runs"], rows)
        if result.get("slow_link"):
            lines += [""]
            slow_rows = [
                [
                    driver,
                    *(f"{run['seconds'].get(op, 0):.2f}" for op in _OPERATIONS),
                    len(run["errors"]),
                ]
                for driver, run in result["slow_link"].items()
            ]
            lines += table(["driver", *_OPERATIONS, "false alarms"], slow_rows)
    return lines


_OPERATIONS = ("large_result", "large_upload", "long_query_slow_link", "long_query_direct")


def _stats(values: list[float]) -> list[object]:
    return [
        f"{statistics.median(values):.2f}",
        f"{min(values):.2f}-{max(values):.2f}",
        len(values),
    ]


def main() -> None:
    """Run the scenarios asked for; merge the result under ``--label``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--drivers", default=",".join(DRIVERS))
    parser.add_argument("--label", default="after")
    parser.add_argument("--skip", default="", help="comma-separated: half_open,vanished,slow")
    args = parser.parse_args()
    drivers = args.drivers.split(",")
    skip = set(args.skip.split(","))
    started = time.monotonic()
    policy = dropsafe.ConnectionPolicy()
    result: dict[str, Any] = {
        "machine": machine(),
        "load": load_average(),
        "defaults": (
            f"tcp_user_timeout {policy.tcp_user_timeout} s, keepalives {policy.keepalive_idle}/"
            f"{policy.keepalive_interval}/{policy.keepalive_count}, connect_timeout "
            f"{policy.connect_timeout} s; slow link {SLOW_LINK_KBPS // 1000} Mbit/s, "
            f"{SLOW_LINK_MEGABYTES} MB, a {LONG_QUERY:g} s query"
        ),
    }
    result["half_open"] = {} if "half_open" in skip else half_open(drivers, args.runs)
    result["vanished"] = {} if "vanished" in skip else vanished(drivers, args.runs)
    result["slow_link"] = {} if "slow" in skip else slow_link(drivers)
    result["seconds"] = round(time.monotonic() - started, 1)
    path = RESULTS / "detection.json"
    everything = json.loads(path.read_text()) if path.exists() else {}
    previous = everything.get(args.label, {})
    for section in ("half_open", "vanished", "slow_link"):  # a skipped one keeps its last run
        if not result[section] and previous.get(section):
            result[section] = previous[section]
    everything[args.label] = result
    path.write_text(json.dumps(everything, indent=1) + "\n")
    (RESULTS / "DETECTION.md").write_text("\n".join(report(everything)) + "\n")
    print(f"wrote {path} and DETECTION.md in {result['seconds']} s")


if __name__ == "__main__":
    main()
