"""The local backend: every daemon a process on the loopback network, no emulated fabric.

Each node gets its own address in 127.0.0.0/8 (unique per node, the same for every link
class) and free ports on it, so several nodes never collide and a node's traffic is easy to
tell apart in a loopback capture. Links are not shaped: link faults and captures need the
Mininet backend. The broker listens on 127.0.0.1.
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from core.config import ConfigError
from testbed.runner.process import Spawner

FIRST_HOST_OCTET = 10


def free_port(host: str) -> int:
    """A port free on ``host`` right now (the daemon binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalBackend:
    name = "local"
    impairment_backend = "none"

    def __init__(self) -> None:
        self._addr: dict[str, str] = {}
        self._ports: dict[tuple[str, str], int] = {}

    def build(self, hosts: list[str], **_: Any) -> None:
        """Assign addresses to ``hosts`` (topology hosts plus any extra nodes, e.g. a client)."""
        if len(hosts) > 250 - FIRST_HOST_OCTET:
            raise ConfigError("local backend", [("", f"{len(hosts)} nodes do not fit in 127.0.0.0/24")])
        for i, host in enumerate(hosts):
            self._addr[host] = f"127.0.0.{FIRST_HOST_OCTET + i}"

    def address(self, host: str, cls: str) -> str:
        return self._addr[host]

    def broker_host(self) -> str:
        return "127.0.0.1"

    def root_address(self, cls: str) -> str:
        return "127.0.0.1"

    def port(self, host: str, kind: str) -> int:
        """A free port per (node, service): ``kind`` is ``http`` or ``kv``."""
        key = (host, kind)
        if key not in self._ports:
            self._ports[key] = free_port(self._addr[host])
        return self._ports[key]

    def spawner(self, host: str | None) -> Spawner | None:
        return None  # plain subprocesses in our own namespace

    def link_names(self) -> list[str]:
        return []

    def set_link(self, target: str, **params: Any) -> list[str]:
        raise ConfigError("local backend", [("faults", f"cannot change link {target!r}: the local backend has no "
                                                        "emulated links (use --backend mininet)")])

    def start_capture(self, targets: list[str], out_dir: Path) -> list[Path]:
        raise ConfigError("--pcap", [("", "captures need the mininet backend (--backend mininet)")])

    def start_monitor(self, run_dir: Path) -> None:
        return None

    def stop_monitor(self) -> dict[str, Any] | None:
        return None

    def close(self) -> None:
        return None
