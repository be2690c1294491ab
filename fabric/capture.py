"""Packet capture with tcpdump inside a host's namespace.

The snap length (256 bytes) keeps Ethernet, IP and TCP headers with options and the KV
protocol's frame header, not the KV payload, so a long run's pcaps stay small. ``-U`` writes
each packet as it comes so a stopped capture is complete; tcpdump flushes on SIGTERM.
"""
from __future__ import annotations

import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

SNAPLEN = 256
DRAIN_S = 1.2
"""tcpdump reads packets in TPACKET_V3 blocks handed over after at most 1 s (its timeout): on
SIGTERM it does not read the block in progress, so stopping waits this long first."""


class CaptureError(RuntimeError):
    """tcpdump did not start."""


class Capture:
    """One tcpdump on one interface of one node."""

    def __init__(self, node: Any, intf_name: str, path: Path, proc: subprocess.Popen) -> None:
        self.node = node
        self.intf_name = intf_name
        self.path = path
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(cls, node: Any, intf_name: str, path: Path, snaplen: int = SNAPLEN, timeout_s: float = 10.0) -> "Capture":
        """Start tcpdump and wait until it listens, so the first packets are not missed."""
        path.parent.mkdir(parents=True, exist_ok=True)
        argv = ["tcpdump", "-i", intf_name, "-s", str(snaplen), "-U", "-n", "-Z", "root", "-w", str(path)]
        proc = node.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        cap = cls(node, intf_name, path, proc)
        deadline = time.monotonic() + timeout_s
        seen = b""
        while b"listening on" not in seen:
            left = deadline - time.monotonic()
            if proc.poll() is not None or left <= 0:
                cap.stop()
                raise CaptureError(f"tcpdump on {node.name}:{intf_name} did not start: "
                                   f"{seen.decode(errors='replace').strip() or 'timeout'}")
            ready, _, _ = select.select([proc.stderr], [], [], min(left, 0.2))
            if ready:
                chunk = proc.stderr.read1(4096) if hasattr(proc.stderr, "read1") else proc.stderr.read(1)
                if not chunk:
                    continue
                seen += chunk
        return cap

    def stop(self, drain: bool = True) -> None:
        """Wait for the last packets to reach tcpdump (``drain``), then SIGTERM (it flushes and
        closes the file), SIGKILL after 5 s. Idempotent."""
        if self.proc.poll() is None:
            if drain:
                time.sleep(DRAIN_S)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stderr:
            self.proc.stderr.close()


def stop_all(captures: list[Capture]) -> None:
    """Stop several captures, draining once for all of them."""
    if any(c.proc.poll() is None for c in captures):
        time.sleep(DRAIN_S)
    for cap in captures:
        cap.stop(drain=False)
