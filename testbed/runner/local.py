"""The local backend: every daemon a process on the loopback network, no emulated fabric.

Each node gets its own address in 127.0.0.0/8 (unique per node, the same for every link
class) and free ports on it, so several nodes never collide and a node's traffic is easy to
tell apart in a loopback capture. Links are not shaped: link faults and captures need the
Mininet backend. The broker listens on 127.0.0.1.
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Mapping

from core.config import ConfigError
from nodes.config import Endpoint
from testbed.runner.backend import LiveBackend, NodePlan
from testbed.runner.process import Spawner

FIRST_HOST_OCTET = 10


def free_port(host: str) -> int:
    """A port free on ``host`` right now (the daemon binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalBackend(LiveBackend):
    name = "local"
    emulates_links = False
    link_faults = False
    impairment_backend = "none"

    def __init__(self, prefix: str = "") -> None:
        self._addr: dict[str, str] = {}
        self._ports: dict[tuple[str, str], int] = {}

    @classmethod
    def host_capacity(cls, prefix: str) -> float | None:
        return None  # loopback has no fabric to measure

    def build(self, topo: Any, nodes: Mapping[str, NodePlan], **_: Any) -> None:
        """Assign addresses to the run's nodes (topology hosts plus any extra, e.g. a client)."""
        if len(nodes) > 250 - FIRST_HOST_OCTET:
            raise ConfigError("local backend", [("", f"{len(nodes)} nodes do not fit in 127.0.0.0/24")])
        for i, name in enumerate(nodes):
            self._addr[name] = f"127.0.0.{FIRST_HOST_OCTET + i}"

    def address(self, plan: NodePlan, cls: str) -> str:
        return self._addr[plan.name]

    def http_endpoint(self, plan: NodePlan) -> Endpoint:
        return Endpoint(host=self._addr[plan.name], port=self._port(plan.name, "http"))

    def kv_endpoint(self, plan: NodePlan) -> Endpoint:
        return Endpoint(host=self._addr[plan.name], port=self._port(plan.name, "kv"))

    def kv_addresses(self, plan: NodePlan) -> list[str]:
        """One rail: the node's loopback address (the local backend has no fabric)."""
        return [self._addr[plan.name]]

    def mgmt_address(self, plan: NodePlan) -> str | None:
        return None

    def broker_host(self) -> str:
        return "127.0.0.1"

    def _port(self, node: str, kind: str) -> int:
        """A free port per (node, service): ``kind`` is ``http`` or ``kv``."""
        key = (node, kind)
        if key not in self._ports:
            self._ports[key] = free_port(self._addr[node])
        return self._ports[key]

    def spawner(self, plan: NodePlan) -> Spawner | None:
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
