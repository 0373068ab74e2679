"""idle_reaper's input and rules, without touching the kernel (pure logic)."""

from __future__ import annotations

import pytest

from dropsafe import ConfigurationError
from dropsafe.testing import _middlebox


@pytest.mark.parametrize(
    ("port", "idle", "match"),
    [
        (0, 5, "port"),
        (65536, 5, "port"),
        (True, 5, "port"),
        ("5432", 5, "port"),
        (5432, 0, "idle_timeout"),
        (5432, -1, "idle_timeout"),
        (5432, float("nan"), "idle_timeout"),
        (5432, 86_401, "idle_timeout"),
        (5432, True, "idle_timeout"),
    ],
)
def test_bad_input_is_refused_at_the_call(port, idle, match):
    with pytest.raises(ConfigurationError, match=match), _middlebox.idle_reaper(port, idle):
        pass


def test_without_root_or_tools_the_error_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(_middlebox.os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigurationError, match="needs root"), _middlebox.idle_reaper(5432, 5):
        pass
    assert "needs root" in (_middlebox.idle_reaper_unavailable() or "")
    monkeypatch.setattr(_middlebox.os, "geteuid", lambda: 0)
    monkeypatch.setattr(
        _middlebox.shutil, "which", lambda tool: None if tool == "conntrack" else "/x"
    )
    with pytest.raises(ConfigurationError, match="apt-get install conntrack"):  # noqa: SIM117
        with _middlebox.idle_reaper(5432, 5):
            pass


def test_the_rules_touch_only_the_given_port():
    table = _middlebox._nft_table("t", 6543, 7)
    # Every rule that matches traffic names the port; the input chain leaves other devices be.
    rules = [line.strip() for line in table.splitlines() if "tcp " in line]
    assert rules
    assert all("6543" in rule for rule in rules)
    assert table.count("established: 7") == 2
    # Both kinds of packet of a forgotten flow are dropped, whatever nf_conntrack_tcp_loose is.
    assert "ct state invalid counter drop" in table
    assert "ct state new tcp flags & (fin|syn|rst|ack) != syn counter drop" in table
