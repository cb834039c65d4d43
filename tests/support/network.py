"""A test that must not use the network: every way out of this machine fails it, and torch's cache is empty."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest


class NetworkUsed(AssertionError):
    """Raised by every way out of this machine while a test forbids the network."""


def forbid_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Any connection or name lookup fails the test, and torch's weight cache is empty (as on a fresh machine):
    a download attempted would be seen, not served from the cache or hidden by a failed connection."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise NetworkUsed(f"network used: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
