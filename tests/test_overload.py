"""Overload on the real daemons (quickstart on the local backend, no root): a burst far beyond
the prefill node's sustainable rate ends with every request completed or refused at once with
a reason, none unanswered, and the daemons' memory bounded. benchmarks/overload_burst.py runs
the issue's full burst (about 400 requests of 3k tokens in 4 s) and docs/reliability.md has its
figures."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))  # as when the script runs: its results_file beside it
_spec = importlib.util.spec_from_file_location("overload_burst", REPO / "benchmarks/overload_burst.py")
assert _spec and _spec.loader
overload_burst = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(overload_burst)


def test_a_burst_on_real_daemons_is_completed_or_refused_with_memory_bounded(tmp_path: Path) -> None:
    """40x the sustainable rate for 1 s (~24 requests of 3000 prompt tokens) against a prefill
    queue of 4. Bounds and their margins: a refusal is answered without queueing (measured
    p50 0.03 s, max 0.15 s at 100 requests/s; bound 5 s); admitted requests finish within
    the queue's work (~5 prompts x 1.6 s wall, measured max 18 s for 43 of them; client timeout
    60 s); each daemon's RSS grows ~25 MiB serving 43 such requests (the byte-scaled KV buffers
    plus the interpreter's caches), bound 150 MiB: an unbounded queue or a leak per request
    would not stay under it with a burst this size only by chance, and the bound is 6x what
    was measured."""
    res = overload_burst.run(str(REPO / "scenarios/quickstart.yaml"),
                             ["pools.prefill.max_queue=4", "router.max_inflight=64"],
                             multiple=40, burst_s=1.0, prompt_tokens=3000, output_tokens=16,
                             client_timeout_s=60, out=tmp_path / "run", prefix="pt")
    o = res["outcomes"]
    assert o["sent"] >= 20 and o["unanswered"] == 0 and o["failed"] == 0, o
    assert o["completed"] + o["refused"] == o["sent"] and o["completed"] >= 4 and o["refused"] >= 5, o
    assert set(o["refused_by"]) == {"503 node_unavailable (Retry-After 1)"}, o["refused_by"]
    assert o["time_to_refusal"]["max_s"] < 5.0, o["time_to_refusal"]
    for name, m in res["memory"].items():
        assert m["baseline_mib"] > 10 and m["growth_mib"] < 150, (name, m)
    counts = res["router_counts"]  # the run's own accounting (router timeline) agrees with the client's
    assert counts["completed"] == o["completed"], counts
    assert counts["failed_by_reason"]["node prefill0 is unavailable"] == o["refused"], counts
