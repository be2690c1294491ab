"""Packet capture with tcpdump inside a host's namespace.

The snap length keeps the headers, not the KV payload, so a long run's pcaps stay small (see
``SNAPLEN``). tcpdump runs with ``--immediate-mode`` (each packet is handed to it as it arrives,
not in blocks released after up to 1 s) and ``-U`` (each packet is written to the file at once).
When it is stopped it drops what it has read from the kernel but not yet written, so stopping
first waits until the capture files stop growing (bounded), then sends SIGTERM, on which tcpdump
flushes and closes the file.
"""
from __future__ import annotations

import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

HEADERS_MAX = 14 + 60 + 60
"""Ethernet, IPv4 and TCP headers with the most options each may carry."""
KV_BEGIN_HEAD_MAX = 12 + 14 + 1 + 64
"""The KV protocol's (docs/wire-format.md) frame header, BEGIN's fixed fields (layers, tokens,
total_bytes) and its request id (str8 of at most 64 bytes). BEGIN starts a segment (the sender
waits for AUTH_OK before sending it)."""
SNAPLEN = 256
"""Keeps a whole BEGIN header and request id behind the largest IP and TCP headers (225 bytes),
and with usual options (IP 20, TCP 32 bytes) the model name and layout too."""
SETTLE_S = 0.3
"""Stop once no capture file has grown for this long: tcpdump has written what it received."""
DRAIN_MAX_S = 3.0
"""Bound on that wait (traffic that never pauses keeps the files growing)."""
POLL_S = 0.05


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
        argv = ["tcpdump", "-i", intf_name, "-s", str(snaplen), "--immediate-mode", "-U", "-n", "-Z", "root",
                "-w", str(path)]
        proc = node.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        cap = cls(node, intf_name, path, proc)
        deadline = time.monotonic() + timeout_s
        seen = b""
        while b"listening on" not in seen:
            left = deadline - time.monotonic()
            if proc.poll() is not None or left <= 0:
                cap.stop(drain=False)
                raise CaptureError(f"tcpdump on {node.name}:{intf_name} did not start: "
                                   f"{seen.decode(errors='replace').strip() or 'timeout'}")
            ready, _, _ = select.select([proc.stderr], [], [], min(left, 0.2))
            if ready:
                chunk = proc.stderr.read1(4096) if hasattr(proc.stderr, "read1") else proc.stderr.read(1)
                if not chunk:
                    continue
                seen += chunk
        return cap

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return -1

    def stop(self, drain: bool = True) -> None:
        """Wait until the file stops growing (``drain``), then SIGTERM (tcpdump flushes and
        closes the file), SIGKILL after 5 s. Idempotent."""
        if self.proc.poll() is None:
            if drain:
                wait_settled([self])
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stderr:
            self.proc.stderr.close()


def wait_settled(captures: list[Capture], settle_s: float = SETTLE_S, max_s: float = DRAIN_MAX_S) -> float:
    """Wait until none of the running captures' files has grown for ``settle_s``, at most
    ``max_s``; returns the seconds waited."""
    running = [c for c in captures if c.proc.poll() is None]
    start = time.monotonic()
    if not running:
        return 0.0
    sizes = [c.size() for c in running]
    changed = start
    while True:
        time.sleep(POLL_S)
        now = time.monotonic()
        current = [c.size() for c in running]
        if current != sizes:
            sizes, changed = current, now
        if now - changed >= settle_s or now - start >= max_s:
            return now - start


def stop_all(captures: list[Capture]) -> None:
    """Stop several captures, waiting once for all their files to settle."""
    wait_settled(captures)
    for cap in captures:
        cap.stop(drain=False)
