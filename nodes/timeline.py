"""Per-node, per-request event log (JSONL).

Each line: ``{"t_wall", "t_model", "node", "event", "request_id", ...fields}``.
A daemon's lines are flushed as written so a crash loses nothing already done (the simulator,
which cannot crash mid-run, buffers them: ``line_buffered=False``). Event names
are listed in ``EVENTS`` and documented in docs/timeline.md; the metrics code reads them.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from nodes.clock import ModelClock

EVENTS = frozenset({
    # router
    "arrival", "routed", "retried", "done", "failed",
    # prefill (and colocated)
    "prefill_queued", "prefill_start", "prefill_end", "kv_start", "kv_end",
    "kv_hold_wait", "kv_wait_start", "kv_retry",
    # decode (and colocated)
    "kv_refused", "kv_granted", "kv_recv_start", "kv_recv_end", "kv_dropped", "decode_queued", "decode_admitted", "first_token", "decode_done",
    # client (load generator)
    "client_sent", "client_first_token", "client_done", "client_failed",
    # node-level, request_id null
    "node_start", "node_stop", "control", "step_timing", "auth_rejected",
})

_encode = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps builds an encoder per call for these separators


class Timeline:
    def __init__(self, path: str | Path, node: str, clock: ModelClock,
                 now_wall: Callable[[], float] = time.time, line_buffered: bool = True):
        """``now_wall``: where the wall time of an event comes from (the simulator's virtual clock);
        ``line_buffered``: each event reaches the OS at once (a daemon), or in large writes."""
        self.path = Path(path)
        self.now_wall = now_wall
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.node = node
        self.clock = clock
        self._file = open(self.path, "a", buffering=1 if line_buffered else 1 << 20)
        self.observers: list[Callable[[dict[str, Any]], None]] = []  # e.g. the Prometheus metrics

    def event(self, event: str, request_id: str | None = None, **fields: Any) -> dict[str, Any]:
        if event not in EVENTS:
            raise ValueError(f"unknown timeline event {event!r}")
        wall = self.now_wall()
        record = {"t_wall": wall, "t_model": self.clock.to_model(wall), "node": self.node,
                  "event": event, "request_id": request_id, **fields}
        self._file.write(_encode(record) + "\n")
        for observe in self.observers:
            observe(record)
        return record

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_timeline(path: str | Path) -> Iterator[dict[str, Any]]:
    """Events of one JSONL file; a torn last line (a crash mid-write) is skipped."""
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def read_run_timeline(run_dir: str | Path) -> list[dict[str, Any]]:
    """All nodes' events of a run, sorted by wall time."""
    events: list[dict[str, Any]] = []
    for path in sorted((Path(run_dir) / "timeline").glob("*.jsonl")):
        events.extend(read_timeline(path))
    events.sort(key=lambda e: e["t_wall"])
    return events
