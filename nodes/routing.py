"""Routing policies: which prefill / decode (or colocated) node gets a request.

A policy sees the candidate nodes and, per node, the latest status dict from the control
plane (``nodes.control.StatusWatcher.status``: ``state``, ``queue_depth``, ``batch_size``,
``kv_used_bytes``, ``kv_free_bytes``, ``t_wall``) or None when nothing is known yet.

Common rules:
* a node whose status says ``offline`` or ``draining`` is never chosen;
* a load-based policy ranks only nodes with a known status; when no eligible node has one
  (no control plane, or before the first heartbeat) it falls back to round robin;
* status reports are up to one heartbeat old, so a load-based policy adds what this router
  sent to a node after that report (``t_wall``) to the reported load. Without that, every
  request of a burst would go to the same "least loaded" node.

``PREFILL_POLICIES`` and ``DECODE_POLICIES`` map the names used in ``RouterSettings`` to
classes; colocated nodes are chosen with the decode policy.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence, TypeVar

SKIPPED_STATES = frozenset({"offline", "draining"})
StatusFn = Callable[[str], "Mapping[str, Any] | None"]


class Named(Protocol):
    @property
    def name(self) -> str: ...


N = TypeVar("N", bound=Named)


def no_status(_node: str) -> None:
    """The status function when the router has no control plane."""
    return None


class Policy:
    """Base: eligibility, round robin fallback and the record of recent sends."""

    name: ClassVar[str] = ""
    load_based: ClassVar[bool] = True

    def __init__(self) -> None:
        self._next = 0
        # node -> deque of (wall time sent, tokens) not yet older than the node's last report
        self._sent: dict[str, deque[tuple[float, int]]] = {}

    def choose(self, candidates: Sequence[N], status: StatusFn = no_status, *, tokens: int = 0) -> N | None:
        """The node for a request of ``tokens`` tokens (prompt + output), or None if none is eligible."""
        statuses = {c.name: status(c.name) for c in candidates}
        eligible = [c for c in candidates if (statuses[c.name] or {}).get("state") not in SKIPPED_STATES]
        if not eligible:
            return None
        known = [c for c in eligible if statuses[c.name] is not None]
        chosen = self._rank(known, statuses) if known else None
        if chosen is None:
            chosen = self._round_robin(candidates, eligible)
        report = statuses[chosen.name]
        if self.load_based and report is not None:
            self._since_report(chosen.name, report)  # prune what the report already covers
            self._sent.setdefault(chosen.name, deque()).append((time.time(), tokens))
        return chosen

    def _rank(self, known: Sequence[N], statuses: Mapping[str, Mapping[str, Any] | None]) -> N | None:
        """The best of the nodes with a known status; None means "use round robin"."""
        return None

    def _round_robin(self, candidates: Sequence[N], eligible: Sequence[N]) -> N:
        allowed = {c.name for c in eligible}
        for step in range(len(candidates)):
            node = candidates[(self._next + step) % len(candidates)]
            if node.name in allowed:
                self._next = (self._next + step + 1) % len(candidates)
                return node
        raise AssertionError("eligible nodes must be among the candidates")

    def _since_report(self, node: str, report: Mapping[str, Any]) -> tuple[int, int]:
        """(requests, tokens) sent to ``node`` after its status ``report`` was published."""
        sent = self._sent.get(node)
        if not sent:
            return 0, 0
        t_report = report.get("t_wall")
        if not isinstance(t_report, (int, float)):
            sent.clear()  # a report without a time cannot be corrected
            return 0, 0
        while sent and sent[0][0] <= t_report:
            sent.popleft()
        return len(sent), sum(tokens for _, tokens in sent)


def _number(report: Mapping[str, Any], key: str) -> float:
    value = report.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


class RoundRobin(Policy):
    """Each eligible node in turn, ignoring load."""

    name = "round_robin"
    load_based = False


class LeastLoaded(Policy):
    """Fewest requests queued + running (reported, plus sent since the report); ties in list order."""

    name = "least_loaded"

    def _rank(self, known, statuses):
        def load(node: Named) -> float:
            report = statuses[node.name] or {}
            recent, _ = self._since_report(node.name, report)
            return _number(report, "queue_depth") + _number(report, "batch_size") + recent
        return min(known, key=load)


class KvAware(Policy):
    """Most free KV capacity, after subtracting the KV of requests sent since the report.

    ``kv_bytes_per_token`` (modelled bytes) converts those requests' tokens to bytes; when it
    is unknown only the reported free capacity counts. Ties go to the less loaded node.
    """

    name = "kv_aware"

    def __init__(self, kv_bytes_per_token: int | None = None) -> None:
        super().__init__()
        self.kv_bytes_per_token = kv_bytes_per_token

    def _rank(self, known, statuses):
        def key(node: Named) -> tuple[float, float]:
            report = statuses[node.name] or {}
            recent, tokens = self._since_report(node.name, report)
            free = _number(report, "kv_free_bytes") - tokens * (self.kv_bytes_per_token or 0)
            load = _number(report, "queue_depth") + _number(report, "batch_size") + recent
            return (-free, load)
        return min(known, key=key)


PREFILL_POLICIES: dict[str, type[Policy]] = {p.name: p for p in (RoundRobin, LeastLoaded)}
DECODE_POLICIES: dict[str, type[Policy]] = {p.name: p for p in (RoundRobin, LeastLoaded, KvAware)}


def make_policy(phase: str, name: str, *, kv_bytes_per_token: int | None = None) -> Policy:
    """A fresh policy for ``phase`` ("prefill" or "decode"); ValueError names the choices."""
    registry = PREFILL_POLICIES if phase == "prefill" else DECODE_POLICIES
    cls = registry.get(name)
    if cls is None:
        raise ValueError(f"unknown {phase} routing policy {name!r}; expected one of {sorted(registry)}")
    if cls is KvAware:
        return KvAware(kv_bytes_per_token)
    return cls()
