"""The high-availability matrix: ``python benchmarks/ha.py [--scenarios switchover,...]``.

A three-node Patroni cluster (etcd, HAProxy; ``dropsafe.testing.PatroniCluster``), with
synchronous replication off and then on. For each scenario (planned switchover, the leader's
postmaster SIGKILLed, the leader node crashed, the leader hung by SIGSTOP, the leader cut off in
the kernel, etcd lost) six writers run at once: plain pool, ``pool_pre_ping=True`` and dropsafe
(``create_engine`` + ``run_transaction``), each through HAProxy and through a multi-host URL.
Each is audited on the new leader. Writes benchmarks/results/HA.md (the machine named) and
benchmarks/results/ha.png. Needs root (the kernel cut) and Patroni, etcd and HAProxy
(scripts/setup.sh installs them). Takes about 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from dropsafe._bench._ha import (
    HOLD,
    KINDS,
    SCENARIOS,
    UNIT_DEADLINE,
    VariantResult,
    run_scenario,
)
from dropsafe._bench._report import load_average, machine
from dropsafe.testing import PatroniCluster

RESULTS = Path(__file__).parent / "results"
WHAT = {
    "switchover": "planned switchover (Patroni REST /switchover)",
    "postmaster_kill": "the leader's postmaster SIGKILLed (Patroni restarts it)",
    "node_crash": "the leader node crashed (Patroni and PostgreSQL SIGKILLed)",
    "leader_hung": f"the leader's PostgreSQL SIGSTOPped for {HOLD['leader_hung']:g} s",
    "leader_cut": f"the leader cut off in the kernel for {HOLD['leader_cut']:g} s",
    "etcd_lost": f"etcd SIGKILLed, started again after {HOLD['etcd_lost']:g} s",
}


def main() -> None:
    """Run the matrix and write the report and the plot."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--modes", default="async,sync")
    args = parser.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    results: dict[tuple[str, str], list[VariantResult]] = {}
    started = time.monotonic()
    for mode in args.modes.split(","):
        with PatroniCluster(synchronous=mode == "sync") as cluster:
            for scenario in scenarios:
                print(f"{mode} {scenario} ...", flush=True)
                results[mode, scenario] = run_scenario(cluster, scenario)
                for row in results[mode, scenario]:
                    print(f"  {row}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "HA.md").write_text(report(results, time.monotonic() - started))
    plot(results, RESULTS / "ha.png")


def report(results: dict[tuple[str, str], list[VariantResult]], seconds: float) -> str:
    """Return the text of HA.md: one table per scenario and replication mode."""
    lines = [
        "# High availability: a Patroni cluster failing over under writers",
        "",
        (
            f"Machine: {machine()}. Load before the run: {load_average()}. "
            f"Run took {seconds / 60:.1f} min (`python benchmarks/ha.py`)."
        ),
        "",
        (
            "Three nodes on loopback: Patroni 3.0.2 (ttl=10, loop_wait=2, retry_timeout=3), etcd "
            "3.4, HAProxy 2.6 routing through Patroni's REST `/primary` check (inter 1 s, fall 2), "
            "PostgreSQL 15 with TLS. Six writers at once, one write each 50 ms, one row per write "
            "(psycopg2): plain pool, `pool_pre_ping=True`, and dropsafe (`create_engine` + "
            f"`run_transaction`, deadline {UNIT_DEADLINE:g} s), each through HAProxy and through a "
            "multi-host URL (`target_session_attrs=read-write`). A failed write is counted and the "
            "writer goes on (the app's next request). Audit on the new leader: acknowledged writes "
            "missing (lost; for dropsafe, also how many it reported: `AcknowledgedCommitLost`) "
            "and rows written twice (duplicated). *Unavailable*: the longest gap "
            "between two acknowledged writes after the event; *first write*: seconds from the "
            "event to the write that ended that gap; *longest write*: the slowest single call."
        ),
        "",
    ]
    lines += [summary(results), ""]
    for (mode, scenario), rows in results.items():
        replication = "synchronous" if mode == "sync" else "asynchronous"
        lines += [
            f"## {WHAT[scenario]}, {replication} replication",
            "",
            (
                "| variant | writes | acknowledged | app errors | unknown | lost / reported "
                "| duplicated "
                "| unavailable (s) | first write (s) | longest write (s) |"
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
    return "\n".join(lines)


SHORT = {
    "switchover": "switchover",
    "postmaster_kill": "postmaster SIGKILL",
    "node_crash": "node crash",
    "leader_cut": f"leader cut ({HOLD['leader_cut']:g} s)",
    "etcd_lost": f"etcd lost ({HOLD['etcd_lost']:g} s)",
    "leader_hung": f"leader hung ({HOLD['leader_hung']:g} s)",
}


def _lost(row: VariantResult) -> str:
    """Acknowledged writes lost; for dropsafe, also how many it reported (docs/guarantees.md)."""
    if not row.variant.startswith("dropsafe"):
        return str(row.lost)
    return f"{row.lost} / {row.reported_lost}"


def summary(results: dict[tuple[str, str], list[VariantResult]]) -> str:
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

    order = [f"{kind}/{route}" for route in ("haproxy", "multi_host") for kind in KINDS]
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
        lines.append(f"| {SHORT[scenario]} | {mode} | {cells} |")
    return "\n".join(lines)


_ROUTE = {"haproxy": "HAProxy", "multi_host": "multi-host"}


def _number(value: float) -> str:
    return "never" if math.isnan(value) else f"{value:.1f}"


def plot(results: dict[tuple[str, str], list[VariantResult]], out: Path) -> None:
    """Unavailability per variant and scenario, one panel per replication mode."""
    import matplotlib  # noqa: PLC0415 - only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

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
