"""The high-availability matrix: ``python benchmarks/ha.py [--scenarios switchover,...]``.

A three-node Patroni cluster (etcd, HAProxy; ``dropsafe.testing.PatroniCluster``, Patroni 4.1
when scripts/setup.sh installed it), with synchronous replication off and then on. For each
scenario (planned switchover, the leader's postmaster SIGKILLed, the leader node crashed, the
leader hung by SIGSTOP, the leader cut off in the kernel, etcd lost) writers run at once, each
through HAProxy and through a multi-host URL: plain pool, ``pool_pre_ping=True`` and dropsafe
(``create_engine`` + ``run_transaction``) on psycopg2, and dropsafe on psycopg 3 and asyncpg
(``create_async_engine`` + ``run_transaction_async``; ``--drivers`` chooses). Each is audited on
the new leader. Writes benchmarks/results/HA.md (the machine and the Patroni named),
benchmarks/results/ha.png, and benchmarks/results/ha.json (every figure, and each lost write's
op_id and transaction id per writer). Needs root (the kernel cut) and Patroni, etcd and HAProxy
(scripts/setup.sh installs them). Takes about 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import cast

from dropsafe._bench._ha import (
    DRIVERS,
    KINDS,
    SCENARIOS,
    UNIT_DEADLINE,
    Driver,
    VariantResult,
    hold_of,
    run_scenario,
    variant_name,
)
from dropsafe._bench._report import load_average, machine
from dropsafe.testing import PatroniCluster

RESULTS = Path(__file__).parent / "results"


@dataclasses.dataclass
class Setup:
    """What the matrix ran on: the Patroni, its timings, how long lasting faults were held."""

    patroni: str
    ttl: int
    loop_wait: int
    retry_timeout: int
    drivers: tuple[Driver, ...]

    def hold(self, scenario: str) -> float:
        """Return how many seconds ``scenario``'s fault lasted."""
        return hold_of(scenario, self.ttl)

    def what(self, scenario: str) -> str:
        """Return the scenario in words (a section title)."""
        return {
            "switchover": "planned switchover (Patroni REST /switchover)",
            "postmaster_kill": "the leader's postmaster SIGKILLed (Patroni restarts it)",
            "node_crash": "the leader node crashed (Patroni and PostgreSQL SIGKILLed)",
            "leader_hung": f"the leader's PostgreSQL SIGSTOPped for {self.hold(scenario):g} s",
            "leader_cut": f"the leader cut off in the kernel for {self.hold(scenario):g} s",
            "etcd_lost": f"etcd SIGKILLed, started again after {self.hold(scenario):g} s",
        }[scenario]

    def short(self, scenario: str) -> str:
        """Return the scenario in a few words (a row of the summary)."""
        if scenario in ("leader_cut", "etcd_lost", "leader_hung"):
            name = {
                "leader_cut": "leader cut",
                "etcd_lost": "etcd lost",
                "leader_hung": "leader hung",
            }
            return f"{name[scenario]} ({self.hold(scenario):g} s)"
        return {
            "switchover": "switchover",
            "postmaster_kill": "postmaster SIGKILL",
            "node_crash": "node crash",
        }[scenario]


def main() -> None:
    """Run the matrix and write the report, the plot and the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--modes", default="async,sync")
    parser.add_argument(
        "--drivers",
        default=",".join(DRIVERS),
        help="dropsafe's drivers: psycopg2 (and the baselines), psycopg, asyncpg",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where HA.md etc. go")
    parser.add_argument(
        "--logs", type=Path, help="copy each node's Patroni and PostgreSQL log here, per mode"
    )
    args = parser.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    drivers = tuple(d for d in args.drivers.split(",") if d)
    unknown += [d for d in drivers if d not in DRIVERS]
    if unknown:
        parser.error(f"unknown scenario or driver: {', '.join(unknown)}")
    results: dict[tuple[str, str], list[VariantResult]] = {}
    started = time.monotonic()
    setup: Setup | None = None
    for mode in args.modes.split(","):
        with PatroniCluster(synchronous=mode == "sync") as cluster:
            print(repr(cluster), flush=True)
            setup = Setup(
                cluster.patroni_version,
                cluster.ttl,
                cluster.loop_wait,
                cluster.retry_timeout,
                cast("tuple[Driver, ...]", drivers),
            )
            try:
                for scenario in scenarios:
                    print(f"{mode} {scenario} ... {time.strftime('%H:%M:%S')}", flush=True)
                    results[mode, scenario] = run_scenario(cluster, scenario, drivers=setup.drivers)
                    for row in results[mode, scenario]:
                        print(f"  {_line(row)}", flush=True)
            finally:
                if args.logs is not None:
                    # The cluster's own folder goes with it: its logs explain a surprising cell.
                    folder = args.logs / mode
                    folder.mkdir(parents=True, exist_ok=True)
                    for log in [*cluster.base_dir.glob("*.log"), *cluster.base_dir.glob("*/*.log")]:
                        shutil.copy(log, folder / log.name.replace("patroni", log.parent.name))
    if setup is None:
        parser.error("no mode given")
    args.out.mkdir(exist_ok=True)
    (args.out / "HA.md").write_text(report(results, setup, time.monotonic() - started))
    (args.out / "ha.json").write_text(as_json(results, setup))
    plot(results, args.out / "ha.png")


def _line(row: VariantResult) -> str:
    return (
        f"{row.variant}: writes {row.attempted}, acknowledged {row.acknowledged}, errors "
        f"{row.errors}, unknown {row.unknown}, lost {row.lost} (reported {row.reported_lost}), "
        f"duplicated {row.duplicated}, "
        f"unavailable {row.unavailable:.1f} s, longest {row.longest_write:.1f} s {row.error_kinds}"
    )


def as_json(results: dict[tuple[str, str], list[VariantResult]], setup: Setup) -> str:
    """Every figure, and per writer each acknowledged write the audit did not find."""
    return json.dumps(
        {
            "setup": dataclasses.asdict(setup),
            "runs": [
                {"replication": mode, "scenario": scenario, "hold": setup.hold(scenario)}
                | {"variants": [dataclasses.asdict(row) for row in rows]}
                for (mode, scenario), rows in results.items()
            ],
        },
        indent=1,
    )


def report(
    results: dict[tuple[str, str], list[VariantResult]], setup: Setup, seconds: float
) -> str:
    """Return the text of HA.md: one table per scenario and replication mode."""
    async_drivers = [d for d in setup.drivers if d != "psycopg2"]
    also = (
        f" and dropsafe on {' and '.join(async_drivers)} with asyncio (`create_async_engine` + "
        "`run_transaction_async`)"
        if async_drivers
        else ""
    )
    lines = [
        "# High availability: a Patroni cluster failing over under writers",
        "",
        (
            f"Machine: {machine()}. Load before the run: {load_average()}. "
            f"Run took {seconds / 60:.1f} min (`python benchmarks/ha.py`)."
        ),
        "",
        (
            f"Three nodes on loopback: **Patroni {setup.patroni}** (ttl={setup.ttl}, "
            f"loop_wait={setup.loop_wait}, retry_timeout={setup.retry_timeout}), etcd 3.4, "
            "HAProxy 2.6 routing through Patroni's REST `/primary` check (inter 1 s, fall 2), "
            "PostgreSQL 15 with TLS. Writers at once, one write each 50 ms, one row per write: "
            "plain pool, `pool_pre_ping=True`, and dropsafe (`create_engine` + `run_transaction`) "
            f"on psycopg2{also}; dropsafe's deadline {UNIT_DEADLINE:g} s. Each through HAProxy "
            "and through a multi-host URL (`target_session_attrs=read-write`). A failed write is "
            "counted and the writer goes on (the app's next request). Audit on the new leader: "
            "acknowledged writes missing (lost; for dropsafe, also how many it reported: "
            "`AcknowledgedCommitLost`) and rows written twice (duplicated); "
            "benchmarks/results/ha.json names each lost write (op_id, transaction id) per writer. "
            "*Unavailable*: the longest gap between two acknowledged writes after the event; "
            "*first write*: seconds from the event to the write that ended that gap; *longest "
            "write*: the slowest single call. Faults that last are held ttl + 10 s, so that a "
            "standby is promoted while they last."
        ),
        "",
    ]
    lines += [summary(results, setup), ""]
    for (mode, scenario), rows in results.items():
        replication = "synchronous" if mode == "sync" else "asynchronous"
        lines += [
            f"## {setup.what(scenario)}, {replication} replication",
            "",
            (
                "| variant | writes | acknowledged | app errors | unknown | lost / reported "
                "| duplicated | unavailable (s) | first write (s) | longest write (s) |"
            ),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r.variant} | {r.attempted} | {r.acknowledged} | {r.errors} | {r.unknown} "
            f"| {_lost(r)} | {r.duplicated} | {r.unavailable:.1f} | {_number(r.first_write_after)} "
            f"| {r.longest_write:.1f} |"
            for r in rows
        ]
        kinds = {r.variant: r.error_kinds for r in rows if r.error_kinds}
        if kinds:
            lines += ["", "Errors the app saw: " + "; ".join(f"{v}: {k}" for v, k in kinds.items())]
        lines.append("")
    lines += [_EARLIER, ""]
    return "\n".join(lines)


# Measured before Patroni 4.1 was the bench's Patroni; docs/how-to/failover.md has the log lines.
_EARLIER = (
    "## The hung leader under Debian's Patroni 3.0.2, for comparison\n\n"
    "Debian 12's Patroni 3.0.2 (ttl 10 s, a 20 s hang; `python benchmarks/ha_hung_leader.py "
    "/usr/bin/patroni`, earlier runs on this machine) lost 131-171 acknowledged writes per writer "
    "through HAProxy, with synchronous replication too: on resuming, the old leader's Patroni "
    "rewrote the etcd3 leader key unconditionally, over the new leader's, and the promoted node "
    "was demoted and rewound with what it had acknowledged. Patroni 4.1 writes the key only if "
    "it still holds it (upstream pull request 2689) and demotes the old leader instead: the "
    "losses above under the hung leader are the few writes the resumed old leader committed in "
    "the ~0.25 s before its Patroni shut it down."
)


def _lost(row: VariantResult) -> str:
    """Acknowledged writes lost; for dropsafe, also how many it reported (docs/guarantees.md)."""
    if not row.variant.startswith("dropsafe"):
        return str(row.lost)
    return f"{row.lost} / {row.reported_lost}"


def summary(results: dict[tuple[str, str], list[VariantResult]], setup: Setup) -> str:
    """Return one table of every scenario: errors, unavailability, and losses where any."""

    def cell(row: VariantResult) -> str:
        text = f"{row.errors} / {row.unavailable:.1f} s"
        if row.lost:
            text += f" / **{row.lost} lost**"
        if row.reported_lost:  # dropsafe's AcknowledgedCommitLost events
            text += f" ({row.reported_lost} reported)"
        if row.unknown:
            text += f" / {row.unknown} unknown"
        return text

    order = [
        variant_name(kind, driver, route)
        for route in ("haproxy", "multi_host")
        for driver in setup.drivers
        for kind in KINDS
        if driver == "psycopg2" or kind == "dropsafe"
    ]
    lines = [
        "Each cell: errors the application saw / write unavailability; acknowledged writes lost "
        "and unknown outcomes where there were any."
        + (
            " No variant wrote anything twice in any scenario."
            if not any(r.duplicated for rows in results.values() for r in rows)
            else ""
        ),
        "",
        "| event | replication | "
        + " | ".join(f"{v.split('/')[0]} ({_ROUTE[v.split('/')[1]]})" for v in order)
        + " |",
        "|---|---|" + "---|" * len(order),
    ]
    for (mode, scenario), rows in results.items():
        by_variant = {row.variant: row for row in rows}
        cells = " | ".join(cell(by_variant[v]) for v in order if v in by_variant)
        lines.append(f"| {setup.short(scenario)} | {mode} | {cells} |")
    return "\n".join(lines)


_ROUTE = {"haproxy": "HAProxy", "multi_host": "multi-host"}


def _number(value: float) -> str:
    return "never" if math.isnan(value) else f"{value:.1f}"


def plot(results: dict[tuple[str, str], list[VariantResult]], out: Path) -> None:
    """Unavailability per variant and scenario, one panel per replication mode."""
    import matplotlib  # only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({mode for mode, _ in results})
    figure, axes = plt.subplots(len(modes), 1, figsize=(11, 4.5 * len(modes)), squeeze=False)
    for axis, mode in zip(axes[:, 0], modes, strict=True):
        scenarios = [s for m, s in results if m == mode]
        variants = [r.variant for r in results[mode, scenarios[0]]]
        width = 0.8 / len(variants)
        for index, variant in enumerate(variants):
            values = [
                next(r.unavailable for r in results[mode, s] if r.variant == variant)
                for s in scenarios
            ]
            positions = [x + index * width for x in range(len(scenarios))]
            axis.bar(positions, values, width, label=variant)
        axis.set_xticks([x + 0.4 - width / 2 for x in range(len(scenarios))], scenarios)
        axis.set_ylabel("write unavailability (s)")
        axis.set_title(f"{'synchronous' if mode == 'sync' else 'asynchronous'} replication")
        axis.legend(fontsize=7, ncol=3)
    figure.tight_layout()
    figure.savefig(out, dpi=90)


if __name__ == "__main__":
    main()
