"""Drop a port's packets in the kernel, making connections half-open as a real network does.

The rules outlive the process that set them if it dies without cleaning up (SIGKILL, or
pytest-timeout's ``os._exit``), and would then break unrelated connections on that port. So
their names carry their owner (see ``_leftovers``): each new blackhole first removes those of
dead owners, and a SIGTERM removes this process's own.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import uuid
from typing import TYPE_CHECKING, Literal

from dropsafe._errors import ConfigurationError
from dropsafe.testing._leftovers import (
    forget_on_sigterm,
    owner_is_gone,
    process_tag,
    remove_on_sigterm,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

Direction = Literal["both", "to"]

__all__ = ["kernel_blackhole", "kernel_blackhole_unavailable", "sweep_blackholes"]

_PORT_LIMIT = 65536  # ports are 1..65535
_PREFIX = "dropsafe_blackhole_"
# dropsafe_blackhole_{port}_{owner pid}_{owner start}_{random}
_TAGGED_NAME = re.compile(rf"\b{_PREFIX}\d+_(?P<pid>\d+)_(?P<start>\d+)_[0-9a-f]+\b")


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
    if not 0 < port < _PORT_LIMIT:
        raise ConfigurationError(f"port must be within 1..65535: {port!r}")
    if direction not in ("both", "to"):
        raise ConfigurationError(f"direction must be 'both' or 'to': {direction!r}")
    matches = ("dport",) if direction == "to" else ("dport", "sport")
    name = f"{_PREFIX}{port}_{process_tag()}_{uuid.uuid4().hex[:8]}"
    sweep_blackholes()
    if shutil.which("nft") is not None:
        delete = ["nft", "delete", "table", "inet", name]
        # Registered first: a SIGTERM right after the table is made must still remove it.
        remove_on_sigterm(name, lambda: _run(delete))
        try:
            _run(["nft", "-f", "-"], stdin=_nft_table(name, port, matches))
        except BaseException:
            forget_on_sigterm(name)
            raise
        try:
            yield
        finally:
            forget_on_sigterm(name)
            _run(delete)
        return
    rules = [
        ["-i", "lo", "-p", "tcp", f"--{match}", str(port), "-m", "comment", "--comment", name]
        for match in matches
    ]
    tools = [tool for tool in ("iptables", "ip6tables") if shutil.which(tool)]
    added: list[list[str]] = []

    def remove() -> None:
        for command in reversed(added):
            _run(command)

    remove_on_sigterm(name, remove)
    try:
        for tool in tools:
            for rule in rules:
                _run([tool, "-I", "INPUT", *rule, "-j", "DROP"])
                added.append([tool, "-D", "INPUT", *rule, "-j", "DROP"])
        yield
    finally:
        forget_on_sigterm(name)
        remove()


def sweep_blackholes() -> list[str]:
    """Remove the blackholes of processes that ended without removing them; return their names.

    Those of live processes stay, whichever run they belong to.
    """
    swept: list[str] = []
    if shutil.which("nft") is not None:
        listing = _output(["nft", "list", "tables", "inet"])
        for line in listing.splitlines():
            # "table inet dropsafe_blackhole_..."
            found = _TAGGED_NAME.search(line)
            if found and _dead(found):
                _run(["nft", "delete", "table", "inet", found.group()], missing_ok=True)
                swept.append(found.group())
        return swept
    for tool in ("iptables", "ip6tables"):
        if shutil.which(tool) is None:
            continue
        # "-A INPUT -i lo -p tcp -m tcp --dport 5432 -m comment --comment NAME -j DROP"
        for line in _output([tool, "-S", "INPUT"]).splitlines():
            found = _TAGGED_NAME.search(line)
            if found and _dead(found) and line.startswith("-A INPUT "):
                _run([tool, "-D", *shlex.split(line)[1:]], missing_ok=True)
                swept.append(found.group())
    return swept


def _dead(found: re.Match[str]) -> bool:
    return owner_is_gone(int(found["pid"]), int(found["start"]))


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


def _output(command: list[str]) -> str:
    # For the sweep: a listing that fails leaves nothing to sweep, it is no error of the caller.
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    return result.stdout if result.returncode == 0 else ""


def _run(command: list[str], *, stdin: str | None = None, missing_ok: bool = False) -> None:
    result = subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    # Another run's sweep may have removed a dead owner's rule first.
    if result.returncode != 0 and not missing_ok:
        raise ConfigurationError(f"{' '.join(command[:3])} failed: {result.stderr.strip()}")
