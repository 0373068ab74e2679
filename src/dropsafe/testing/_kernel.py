"""Drop a port's packets in the kernel, making connections half-open as a real network does."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from typing import TYPE_CHECKING, Literal

from dropsafe._errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Iterator

Direction = Literal["both", "to"]

__all__ = ["kernel_blackhole", "kernel_blackhole_unavailable"]


def kernel_blackhole_unavailable() -> str | None:
    """Say why `kernel_blackhole` cannot run here, or return None when it can."""
    if os.geteuid() != 0:
        return "kernel_blackhole needs root (it changes the packet filter)"
    if shutil.which("nft") is None and shutil.which("iptables") is None:
        return "kernel_blackhole needs nft or iptables (apt-get install nftables iptables)"
    try:
        with kernel_blackhole(1):
            pass
    except (ConfigurationError, OSError) as exc:
        return f"the packet filter refused a rule: {exc}"
    return None


@contextlib.contextmanager
def kernel_blackhole(port: int, *, direction: Direction = "both") -> Iterator[None]:
    """Drop every loopback TCP packet to or from ``port`` while the block runs.

    Unlike a userspace proxy, whose kernel acknowledges everything, this leaves both peers
    with open sockets and no answers: the half-open connection a dead NAT or a vanished host
    makes. With ``direction="to"`` only packets *to* ``port`` are dropped: given a client's
    local port, its requests still reach the server but no answer (nor acknowledgement) comes
    back, which is how a reply gets lost. The rules are removed on exit, also when the block
    raises.
    """
    if not 0 < port < 65536:  # noqa: PLR2004
        raise ConfigurationError(f"port must be within 1..65535: {port!r}")
    if direction not in ("both", "to"):
        raise ConfigurationError(f"direction must be 'both' or 'to': {direction!r}")
    matches = ("dport",) if direction == "to" else ("dport", "sport")
    name = f"dropsafe_blackhole_{port}_{uuid.uuid4().hex[:8]}"
    if shutil.which("nft") is not None:
        _run(["nft", "-f", "-"], stdin=_nft_table(name, port, matches))
        try:
            yield
        finally:
            _run(["nft", "delete", "table", "inet", name])
        return
    rules = [
        ["-i", "lo", "-p", "tcp", f"--{match}", str(port), "-m", "comment", "--comment", name]
        for match in matches
    ]
    tools = [tool for tool in ("iptables", "ip6tables") if shutil.which(tool)]
    added: list[list[str]] = []
    try:
        for tool in tools:
            for rule in rules:
                _run([tool, "-I", "INPUT", *rule, "-j", "DROP"])
                added.append([tool, "-D", "INPUT", *rule, "-j", "DROP"])
        yield
    finally:
        for command in reversed(added):
            _run(command)


def _nft_table(name: str, port: int, matches: tuple[str, ...]) -> str:
    rules = "".join(f'    iifname "lo" tcp {match} {port} drop\n' for match in matches)
    return (
        f"table inet {name} {{\n"
        "  chain input {\n"
        "    type filter hook input priority -300; policy accept;\n"
        f"{rules}"
        "  }\n"
        "}\n"
    )


def _run(command: list[str], *, stdin: str | None = None) -> None:
    result = subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        raise ConfigurationError(f"{' '.join(command[:3])} failed: {result.stderr.strip()}")
