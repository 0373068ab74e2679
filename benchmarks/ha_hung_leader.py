"""The hung leader under another Patroni: ``python benchmarks/ha_hung_leader.py PATRONI``.

Does a Patroni version lose acknowledged writes when the leader's PostgreSQL is SIGSTOPped
long enough for its key to expire (a standby promoted) and then resumes? Debian's 3.0.2 does
(benchmarks/results/HA.md: the old leader's Patroni overwrote the new leader's key in etcd).
This runs `run_scenario`'s ``leader_hung`` through HAProxy (plain, pre-ping, dropsafe) with
asynchronous and then synchronous replication, on a cluster run by the Patroni given
(``/usr/bin/patroni`` for Debian's 3.0.2; by default `PatroniCluster`'s, 4.1 from
scripts/setup.sh; another must be runnable by the ``postgres`` user). Prints each
writer's figures and copies each node's Patroni log into ``--logs`` (the cluster's own folder is
removed on exit). Hold the hang longer than Patroni's ttl (4.x raises ttl to 20 s at least), or
no standby is promoted and nothing is tested. About 2 minutes per mode on 2 cores.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

from dropsafe._bench._ha import run_scenario
from dropsafe.testing import PatroniCluster


def main() -> None:
    """Run the hung leader in each mode; print the figures; keep the logs."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "patroni", help="the patroni executable (default: PatroniCluster's)", nargs="?"
    )
    parser.add_argument("--hold", type=float, default=30.0, help="seconds the leader is hung")
    parser.add_argument("--modes", default="async,sync")
    parser.add_argument("--logs", type=Path, default=Path("ha-hung-leader-logs"))
    args = parser.parse_args()
    command = [args.patroni] if args.patroni else None
    if args.patroni:
        version = subprocess.run(
            [args.patroni, "--version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
        print(version, flush=True)
    for mode in args.modes.split(","):
        with PatroniCluster(synchronous=mode == "sync", patroni_command=command) as cluster:
            print(f"{mode}: leader hung for {args.hold:g} s", flush=True)
            try:
                for row in run_scenario(
                    cluster, "leader_hung", routes=("haproxy",), hold=args.hold
                ):
                    print(
                        f"  {row.variant}: acknowledged {row.acknowledged}, lost {row.lost}, "
                        f"duplicated {row.duplicated}, errors {row.errors}, unknown "
                        f"{row.unknown}, unavailable {row.unavailable:.1f} s",
                        flush=True,
                    )
            finally:
                folder = args.logs / mode
                folder.mkdir(parents=True, exist_ok=True)
                for node in cluster.nodes:
                    shutil.copy(node.log_file, folder / f"{node.name}.log")


if __name__ == "__main__":
    main()
