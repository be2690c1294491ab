"""A burst far beyond what the real daemons sustain: every request must end (completed, or
refused at once with a reason), none may hang, and the daemons' memory must stay bounded.

The system is the quickstart deployment on the local backend (real router, trn2 prefill and CS-3
decode daemons on loopback, no root). The sustainable rate is the prefill node's: one prompt of
``--prompt-tokens`` takes ``prefill_s`` model seconds (``pdtb predict``), so it serves at most
``1 / prefill_s`` prompts per model second, ``1 / (prefill_s x TDF)`` per wall second. The burst
sends ``--multiple`` times that rate for ``--burst-s`` wall seconds, each request a streamed
completion. The queues are the scenario's (``pools.prefill.max_queue`` and the router's
``max_inflight``; defaults overridden with ``--set``). While it runs, each daemon's resident memory
(``/proc/PID/status`` VmRSS) is sampled every 0.1 s.

Reported: requests sent, completed, refused by status and error code (with Retry-After), failed
otherwise, unanswered after ``--client-timeout-s``; time to a refusal (p50/max) and to completion;
each daemon's RSS before the burst, its peak, and the peak's growth. Raw results are written to
benchmarks/results/overload_burst.json. Usage: ``.venv/bin/python benchmarks/overload_burst.py``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from results_file import write_results  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

from testbed.api import Testbed  # noqa: E402
from testbed.predict import predict  # noqa: E402

DAEMONS = ("router", "prefill0", "decode0")


def rss_kib(pid: int) -> int | None:
    """Resident memory of a live process, or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def daemon_pids(run_dir: Path) -> dict[str, int]:
    """The daemons' PIDs as the run recorded them (start lines of pids.jsonl)."""
    pids: dict[str, int] = {}
    for line in (run_dir / "pids.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry.get("name") in DAEMONS and "pid" in entry:
            pids[entry["name"]] = entry["pid"]
    return pids


class MemorySampler(threading.Thread):
    """Samples every daemon's RSS until stopped: the baseline and the peak per daemon."""

    def __init__(self, pids: dict[str, int], period_s: float = 0.1):
        super().__init__(daemon=True)
        self.pids, self.period_s = pids, period_s
        self.baseline = {name: rss_kib(pid) or 0 for name, pid in pids.items()}
        self.peak = dict(self.baseline)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.period_s):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_kib(pid) or 0)

    def stop(self) -> dict[str, dict[str, float]]:
        self._halt.set()
        self.join()
        return {name: {"baseline_mib": self.baseline[name] / 1024, "peak_mib": self.peak[name] / 1024,
                       "growth_mib": (self.peak[name] - self.baseline[name]) / 1024} for name in self.pids}


async def send_burst(url: str, model: str, *, rate_per_s: float, burst_s: float, prompt_tokens: int,
                     output_tokens: int, client_timeout_s: float) -> list[dict[str, Any]]:
    """Streamed completions at a fixed wall rate for burst_s; each one's outcome and time to it."""
    count = max(1, round(rate_per_s * burst_s))
    body = {"model": model, "pdtb_prompt_tokens": prompt_tokens, "max_tokens": output_tokens, "stream": True}
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=client_timeout_s)

    async def one(i: int, session: aiohttp.ClientSession) -> dict[str, Any]:
        await asyncio.sleep(i / rate_per_s)
        t0 = time.monotonic()
        out: dict[str, Any] = {"index": i}
        try:
            async with session.post(url + "/v1/completions", json=body, headers={"x-request-id": f"burst{i}"}) as r:
                out["status"] = r.status
                if r.status != 200:
                    out["code"] = json.loads(await r.text())["error"].get("code")
                    out["retry_after"] = r.headers.get("Retry-After")
                else:
                    tokens, error = 0, None
                    async for raw in r.content:
                        line = raw.decode().strip()
                        if not line.startswith("data:") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[5:])
                        if "error" in event:
                            error = event["error"].get("code") or event["error"].get("message")
                        tokens += sum(1 for c in event.get("choices", []) if c.get("text"))
                    out["tokens"], out["stream_error"] = tokens, error
        except asyncio.TimeoutError:
            out["status"] = "unanswered"
        except aiohttp.ClientError as e:
            out["status"], out["code"] = "connection", type(e).__name__
        out["elapsed_s"] = time.monotonic() - t0
        return out

    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        return list(await asyncio.gather(*(one(i, session) for i in range(count))))


def classify(results: list[dict[str, Any]], output_tokens: int) -> dict[str, Any]:
    """Counts by outcome; a 200 whose stream did not carry every token is a failure, not a completion."""
    completed = [r for r in results if r.get("status") == 200 and r.get("tokens") == output_tokens
                 and not r.get("stream_error")]
    refused = [r for r in results if isinstance(r.get("status"), int) and r["status"] in (429, 503)]
    unanswered = [r for r in results if r.get("status") == "unanswered"]
    failed = [r for r in results if r not in completed and r not in refused and r not in unanswered]
    by_code: dict[str, int] = {}
    for r in refused:
        key = f"{r['status']} {r.get('code')} (Retry-After {r.get('retry_after')})"
        by_code[key] = by_code.get(key, 0) + 1

    def times(rs: list[dict[str, Any]]) -> dict[str, float] | None:
        xs = sorted(r["elapsed_s"] for r in rs)
        return {"p50_s": statistics.median(xs), "max_s": xs[-1]} if xs else None

    return {"sent": len(results), "completed": len(completed), "refused": len(refused), "refused_by": by_code,
            "failed": len(failed), "failed_detail": [{k: r.get(k) for k in ("status", "code", "stream_error")}
                                                     for r in failed][:20],
            "unanswered": len(unanswered), "time_to_refusal": times(refused), "time_to_completion": times(completed)}


def run(scenario: str, overrides: list[str], *, multiple: float, burst_s: float, prompt_tokens: int,
        output_tokens: int, client_timeout_s: float, out: Path | None = None, prefix: str = "bb") -> dict[str, Any]:
    """Bring the deployment up, measure the sustainable rate, send the burst, account for it."""
    tb = Testbed(scenario, overrides, backend="local", out=out, prefix=prefix)
    prefill_s = predict(tb.scenario, prompt_tokens=prompt_tokens, output_tokens=output_tokens).prefill_s
    with tb:
        sustainable = 1.0 / (prefill_s * tb.tdf)
        pids = daemon_pids(tb.run_dir)
        sampler = MemorySampler(pids)
        sampler.start()
        t0 = time.monotonic()
        results = asyncio.run(send_burst(tb.router_url, tb.scenario.model, rate_per_s=sustainable * multiple,
                                         burst_s=burst_s, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                                         client_timeout_s=client_timeout_s))
        wall_s = time.monotonic() - t0
        memory = sampler.stop()
    summary = tb.results()
    return {"scenario": scenario, "overrides": overrides, "tdf": tb.tdf, "prefill_s_model": prefill_s,
            "sustainable_per_wall_s": sustainable, "offered_per_wall_s": sustainable * multiple,
            "burst_s": burst_s, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "wall_s": wall_s, "outcomes": classify(results, output_tokens), "memory": memory,
            "router_counts": summary.get("counts") if summary else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", default=str(REPO / "scenarios/quickstart.yaml"))
    p.add_argument("--set", dest="overrides", action="append",
                   default=["pools.prefill.max_queue=32", "router.max_inflight=64"])
    p.add_argument("--multiple", type=float, default=10.0, help="burst rate / sustainable rate")
    p.add_argument("--burst-s", type=float, default=4.0, help="wall seconds of the burst")
    p.add_argument("--prompt-tokens", type=int, default=3000)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--client-timeout-s", type=float, default=120.0)
    p.add_argument("--json", type=Path, default=None, help="raw results file (default benchmarks/results/)")
    a = p.parse_args()
    res = run(a.scenario, a.overrides, multiple=a.multiple, burst_s=a.burst_s, prompt_tokens=a.prompt_tokens,
              output_tokens=a.output_tokens, client_timeout_s=a.client_timeout_s)
    o = res["outcomes"]
    print(f"sustainable {res['sustainable_per_wall_s']:.2f}/s wall, offered {res['offered_per_wall_s']:.1f}/s "
          f"for {res['burst_s']} s: sent {o['sent']}, completed {o['completed']}, refused {o['refused']} "
          f"{o['refused_by']}, failed {o['failed']}, unanswered {o['unanswered']}")
    for what in ("time_to_refusal", "time_to_completion"):
        if o[what]:
            print(f"  {what}: p50 {o[what]['p50_s']:.3f} s, max {o[what]['max_s']:.3f} s")
    print(f"{'daemon':10} {'RSS before MiB':>15} {'peak MiB':>9} {'growth MiB':>11}")
    for name, m in res["memory"].items():
        print(f"{name:10} {m['baseline_mib']:15.1f} {m['peak_mib']:9.1f} {m['growth_mib']:11.1f}")
    write_results("overload_burst", res, a.json)


if __name__ == "__main__":
    main()
