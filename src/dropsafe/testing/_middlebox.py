"""Forget idle TCP flows in the kernel, as a cloud NAT or load balancer does (`idle_reaper`).

Azure's load balancer forgets a flow after 4 idle minutes, AWS's NAT gateway and NLB after
350 s, and tell neither peer: the next query of a pooled connection hangs. Built from
connection tracking (nftables); how, at `_nft_table`. The rules outlive a dead process, so a
table's name carries its owner and the next instance removes those of dead owners.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dropsafe._errors import ConfigurationError
from dropsafe.testing._leftovers import (
    forget_on_sigterm,
    owner_is_gone,
    process_tag,
    remove_on_sigterm,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["IdleReaper", "idle_reaper", "idle_reaper_unavailable", "sweep_idle_reapers"]

_PREFIX = "dropsafe_idlereaper_"
# dropsafe_idlereaper_{port}_{owner pid}_{owner start}_{random}
_TAGGED_NAME = re.compile(rf"\b{_PREFIX}\d+_(?P<pid>\d+)_(?P<start>\d+)_[0-9a-f]+\b")
# conntrack's timeouts are whole seconds; a day is far beyond any middlebox worth modelling.
_MAX_IDLE = 86_400
_PORT_LIMIT = 65536  # ports are 1..65535
# "counter packets 3 bytes 180 drop"
_COUNTER = re.compile(r"counter packets (\d+) bytes \d+ drop")


def idle_reaper_unavailable() -> str | None:
    """Say why `idle_reaper` cannot run here, or return None when it can."""
    missing = _missing_requirement()
    if missing is not None:
        return missing
    try:
        with idle_reaper(1, 1):
            pass
    except (ConfigurationError, OSError) as exc:
        return f"the packet filter refused the rules: {exc}"
    return None


@dataclass(frozen=True)
class IdleReaper:
    """The middlebox of one `idle_reaper` block: what it tracks and what it dropped."""

    #: The server port whose flows are forgotten when idle.
    port: int
    #: Seconds of silence after which a flow is forgotten.
    idle_timeout: int
    #: The nftables table (``inet`` family) that holds the rules.
    table: str

    def tracked_flows(self, client_port: int | None = None) -> int:
        """Count the flows to ``port`` the kernel still remembers, or those from ``client_port``.

        A flow the middlebox has forgotten is no longer listed (``conntrack -L``).
        """
        command = ["conntrack", "-L", "-p", "tcp", "--dport", str(self.port)]
        if client_port is not None:
            command += ["--sport", str(client_port)]
        listing = _run(command, capture=True)
        # One line per entry; conntrack writes its summary to stderr.
        return sum(1 for line in listing.splitlines() if line.strip())

    def dropped_packets(self) -> int:
        """Count the packets of forgotten flows dropped so far, both directions."""
        listing = _run(["nft", "list", "table", "inet", self.table], capture=True)
        return sum(int(found.group(1)) for found in _COUNTER.finditer(listing))


@contextlib.contextmanager
def idle_reaper(port: int, idle_timeout: float) -> Iterator[IdleReaper]:
    """Forget TCP flows to loopback ``port`` idle for ``idle_timeout`` s, then drop their packets.

    Only flows opened inside the block are reaped (the kernel fixes a flow's timeouts when it
    first sees it). A flow that stays silent for ``idle_timeout`` seconds (rounded up to whole
    seconds) is forgotten, and every later packet of it, in either direction, is dropped
    without an answer: the client's next query hangs until its TCP gives up, as behind a cloud
    NAT. Traffic keeps a flow remembered, TCP keepalives included. New connections (a bare SYN)
    are tracked afresh and work. Everything is removed on exit, also when the block raises or
    is interrupted; the dropped packets of a forgotten flow may then be picked up again.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < _PORT_LIMIT:
        raise ConfigurationError(f"port must be an int within 1..65535: {port!r}")
    if (
        isinstance(idle_timeout, bool)
        or not isinstance(idle_timeout, int | float)
        or not 0 < idle_timeout <= _MAX_IDLE  # also refuses NaN
    ):
        raise ConfigurationError(
            f"idle_timeout must be seconds within (0, {_MAX_IDLE}]: {idle_timeout!r}"
        )
    missing = _missing_requirement()
    if missing is not None:
        raise ConfigurationError(missing)
    seconds = math.ceil(idle_timeout)
    name = f"{_PREFIX}{port}_{process_tag()}_{uuid.uuid4().hex[:8]}"
    sweep_idle_reapers()
    delete = ["nft", "delete", "table", "inet", name]
    # Registered first: a SIGTERM right after the table is made must still remove it.
    remove_on_sigterm(name, lambda: _run(delete, missing_ok=True))
    try:
        _run(["nft", "-f", "-"], stdin=_nft_table(name, port, seconds))
        yield IdleReaper(port=port, idle_timeout=seconds, table=name)
    finally:
        forget_on_sigterm(name)
        # Not missing_ok: only this process removes its own table (sweeps take dead owners'),
        # so a failure here is a rule left behind, and must be loud.
        _run(delete)


def sweep_idle_reapers() -> list[str]:
    """Remove the middleboxes of processes that ended without removing them; return their names.

    Those of live processes stay, whichever run they belong to.
    """
    swept: list[str] = []
    if shutil.which("nft") is None:
        return swept
    result = subprocess.run(
        ["nft", "list", "tables", "inet"], capture_output=True, text=True, timeout=30, check=False
    )
    for line in result.stdout.splitlines() if result.returncode == 0 else []:
        found = _TAGGED_NAME.search(line)
        if found and owner_is_gone(int(found["pid"]), int(found["start"])):
            _run(["nft", "delete", "table", "inet", found.group()], missing_ok=True)
            swept.append(found.group())
    return swept


def _missing_requirement() -> str | None:
    """Say what this machine lacks for `idle_reaper` (root, nft, conntrack), or None."""
    if os.geteuid() != 0:
        return "idle_reaper needs root (it changes the packet filter and connection tracking)"
    missing = [tool for tool in ("nft", "conntrack") if shutil.which(tool) is None]
    if missing:
        packages = " ".join("nftables" if tool == "nft" else tool for tool in missing)
        return f"idle_reaper needs {' and '.join(missing)} (apt-get install {packages})"
    return None


def _nft_table(name: str, port: int, seconds: int) -> str:
    # An output chain (after conntrack, which makes loopback entries at the OUTPUT hook,
    # priority -200) gives the port's new flows a `ct timeout` whose `established` time is the
    # idle timeout; the kernel deletes the entry when it expires. An input chain drops the later
    # packets of a flow whose entry is gone. Their state depends on the machine-wide
    # `nf_conntrack_tcp_loose`: with loose pickup (1, the default) conntrack starts a *new*
    # entry from any packet, so a new flow that does not begin with a bare SYN is dropped;
    # without it (0) the packet is *invalid*, and dropped too. Both rules, so that the sysctl
    # is never touched (other runs share it). The first `ct` rule turns tracking on for the
    # whole machine, with the kernel's default timeouts: nothing else is forgotten.
    # One timeout object per address family: a ct timeout names its l3proto.
    # "tcp flags & (...) != syn": any packet of a new flow but the opening bare SYN (see the
    # module doc for why both that and "invalid" are dropped).
    drops = "".join(
        f"    tcp {match} {port} ct state invalid counter drop\n"
        f"    tcp {match} {port} ct state new tcp flags & (fin|syn|rst|ack) != syn counter drop\n"
        for match in ("dport", "sport")
    )
    timeouts = "".join(
        f"  ct timeout {object_name} {{ protocol tcp; l3proto {family};"
        f" policy = {{ established: {seconds} }}; }}\n"
        for object_name, family in (("idle4", "ip"), ("idle6", "ip6"))
    )
    return (
        f"table inet {name} {{\n"
        f"{timeouts}"
        "  chain output {\n"
        "    type filter hook output priority filter; policy accept;\n"
        f'    oifname "lo" meta nfproto ipv4 tcp dport {port} ct timeout set "idle4"\n'
        f'    oifname "lo" meta nfproto ipv6 tcp dport {port} ct timeout set "idle6"\n'
        "  }\n"
        "  chain input {\n"
        "    type filter hook input priority filter; policy accept;\n"
        '    iifname != "lo" accept\n'
        f"{drops}"
        "  }\n"
        "}\n"
    )


def _run(
    command: list[str],
    *,
    stdin: str | None = None,
    missing_ok: bool = False,
    capture: bool = False,
) -> str:
    result = subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    # Another run's sweep may have removed a dead owner's table first.
    if result.returncode != 0 and not missing_ok:
        raise ConfigurationError(f"{' '.join(command[:3])} failed: {result.stderr.strip()}")
    return result.stdout if capture else ""
