"""kernel_blackhole: packets really dropped, rules always removed."""

from __future__ import annotations

import socket
import subprocess

import pytest

from dropsafe import ConfigurationError

pytestmark = pytest.mark.fault


def _filter_rules() -> str:
    nft = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=False)
    ipt = subprocess.run(["iptables-save"], capture_output=True, text=True, check=False)
    return nft.stdout + ipt.stdout


def test_new_connections_get_no_answer_and_rules_go_away(postgres_server, kernel_blackhole):
    with (  # noqa: PT012 - the error must come from inside the block
        pytest.raises(RuntimeError, match="inside"),
        kernel_blackhole(postgres_server.port),
    ):
        assert f"dropsafe_blackhole_{postgres_server.port}" in _filter_rules()
        # Dropped, not refused: the handshake never completes.
        with pytest.raises(TimeoutError):
            socket.create_connection(("127.0.0.1", postgres_server.port), timeout=1)
        raise RuntimeError("inside")
    assert f"dropsafe_blackhole_{postgres_server.port}" not in _filter_rules()
    socket.create_connection(("127.0.0.1", postgres_server.port), timeout=5).close()


def test_bad_port_is_refused(kernel_blackhole):
    with pytest.raises(ConfigurationError, match="port"), kernel_blackhole(0):
        pass
