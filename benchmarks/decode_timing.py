"""Benchmark: how precisely does a decode node keep the cost model's step times?

Starts a real decode daemon (``python -m nodes``) on loopback with a TDF chosen so that one
decode step lasts about ``--step-ms`` wall milliseconds, pushes KV caches for ``--batch``
requests over the real KV protocol, streams their tokens, and reads the node's
``step_timing`` events. The timing error of a step is how late the daemon woke up after the
step's absolute deadline (``late_s``), as a percentage of the step's planned duration; the
interval error is the deviation of the wall interval between consecutive step ends from the
planned step. Reports median and p99 of both (and, with ``--plot``, their CDFs).

    .venv/bin/python benchmarks/decode_timing.py --step-ms 10 --steps 1000 --batch 8 \\
        --out /tmp/decode_timing.json --plot docs/benchmarks-decode.png
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nodes.config import Endpoint, KvSettings, NodeConfig, DecodeSettings  # noqa: E402
from nodes.costmodel import CostModel  # noqa: E402
from nodes.engine import kv_wire_bytes  # noqa: E402
from nodes.kvproto import KvBegin, send_kv  # noqa: E402
from nodes.profiles import load_hardware, load_model  # noqa: E402
from nodes.timeline import read_timeline  # noqa: E402
from nodes.auth import internal_headers  # noqa: E402
from tests.daemon_helpers import free_port  # noqa: E402
from results_file import write_results  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

SECRET = os.urandom(32).hex()


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def _request(session: aiohttp.ClientSession, cfg: NodeConfig, model, rid: str, prompt: int,
                   steps: int) -> int:
    body = {"request_id": rid, "model": cfg.model, "prompt_tokens": prompt, "max_tokens": steps}
    async with session.post(f"{cfg.http.url}/internal/generate", json=body, headers=internal_headers(SECRET)) as r:
        r.raise_for_status()
        begin = KvBegin(request_id=rid, model=cfg.model, layers=model.layers, tokens=prompt,
                        total_bytes=kv_wire_bytes(model.kv_bytes_per_token, prompt, cfg.byte_scale))
        await send_kv(cfg.kv.host, cfg.kv.port, bytes.fromhex(SECRET), begin, chunk_bytes=256 * 1024)
        n = 0
        async for line in r.content:
            if json.loads(line)["type"] == "token":
                n += 1
        return n


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _run(cfg: NodeConfig, cfg_path: Path, model, batch: int, prompt: int, steps: int, nice: int) -> float:
    """Run the node through ``steps`` decode steps of ``batch`` requests; its CPU share while decoding."""
    proc = subprocess.Popen([sys.executable, "-m", "nodes", "--config", str(cfg_path)], cwd=REPO,
                            stderr=subprocess.DEVNULL, preexec_fn=(lambda: os.nice(nice)) if nice else None)
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"decode node did not come up (exit code {proc.poll()})")
                try:
                    async with session.get(f"{cfg.http.url}/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            cpu0, wall0 = _cpu_s(proc.pid), time.time()
            counts = await asyncio.gather(*(_request(session, cfg, model, f"b{i:04d}", prompt, steps)
                                            for i in range(batch)))
            cpu_share = (_cpu_s(proc.pid) - cpu0) / (time.time() - wall0)
            assert counts == [steps] * batch, counts
            return cpu_share
    finally:
        proc.terminate()
        proc.wait(10)


def measure(hardware: str, model_name: str, step_ms: float, steps: int, batch: int, prompt: int,
            nice: int = 0) -> dict:
    hw, model = load_hardware(hardware), load_model(model_name)
    cost = CostModel(hw, model)
    step_model_s = cost.decode_step([prompt] * batch).time_s
    tdf = max(1.0, step_ms / 1000 / step_model_s)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = NodeConfig(run_id="bench", name="d1", role="decode", model=model_name, hardware=hardware,
                         tdf=tdf, byte_scale=1e-3, t0_wall=time.time(), run_dir=tmp,
                         http=Endpoint(host="127.0.0.1", port=free_port()),
                         kv=Endpoint(host="127.0.0.1", port=free_port()),
                         kv_transfer=KvSettings(secret_hex=SECRET), decode=DecodeSettings(max_batch=batch),
                         internal_secret_hex=SECRET)
        cfg_path = Path(tmp) / "d1.json"
        cfg.save(cfg_path)
        cpu_share = asyncio.run(_run(cfg, cfg_path, model, batch, prompt, steps, nice))
        events = [e for e in read_timeline(cfg.timeline_path) if e["event"] == "step_timing"]
    # only steps with the full batch: the first steps run while the other KV caches arrive
    full = [e for e in events if e["batch_size"] == batch]
    late = [100 * e["late_s"] / e["planned_s"] for e in full]
    interval = [100 * abs((b["t_wall"] - a["t_wall"]) / tdf - b["planned_s"]) / b["planned_s"]
                for a, b in zip(full, full[1:])]
    # deadlines are absolute: jitter must not add up over the run
    span_planned = sum(e["planned_s"] for e in full[1:])
    span_actual = (full[-1]["t_wall"] - full[0]["t_wall"]) / tdf
    return {
        "span_error_pct": 100 * (span_actual / span_planned - 1),
        "nice": nice, "hardware": hardware, "model": model_name, "batch": batch, "prompt_tokens": prompt, "tdf": tdf,
        "node_cpu_share": cpu_share, "load_avg_1m": os.getloadavg()[0], "cpus": os.cpu_count(),
        "step_model_ms": 1000 * step_model_s, "step_wall_ms": 1000 * step_model_s * tdf, "steps": len(full),
        "late_pct": {"median": statistics.median(late), "p99": percentile(late, 99), "max": max(late)},
        "interval_err_pct": {"median": statistics.median(interval), "p99": percentile(interval, 99),
                             "max": max(interval)},
        "late_pct_all": late, "interval_err_pct_all": interval,
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        label = f"{r['step_wall_ms']:.1f} ms wall steps (TDF {r['tdf']:.0f}, nice {r['nice']})"
        for ax, key in zip(axes, ("late_pct_all", "interval_err_pct_all")):
            xs = sorted(r[key])
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
    axes[0].set_xlabel("wake-up after deadline, % of step")
    axes[1].set_xlabel("|step interval - planned|, % of step")
    for ax in axes:
        ax.set_ylabel("CDF")
        ax.set_xscale("symlog", linthresh=1)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"decode step timing, {results[0]['model']} on {results[0]['hardware']}, "
                 f"batch {results[0]['batch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hardware", default="cs3")
    ap.add_argument("--model", default="qwen3-32b")
    ap.add_argument("--step-ms", type=float, nargs="+", default=[10.0], help="target wall ms per step")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=2000)
    ap.add_argument("--nice", type=int, default=0, help="niceness of the decode node (negative needs root)")
    ap.add_argument("--out", type=Path, help="raw results JSON (default benchmarks/results/decode_timing.json)")
    ap.add_argument("--plot", type=Path, help="write the CDFs as PNG")
    args = ap.parse_args(argv)
    results = [measure(args.hardware, args.model, ms, args.steps, args.batch, args.prompt, args.nice) for ms in args.step_ms]
    for r in results:
        print(f"{r['model']} on {r['hardware']}, batch {r['batch']}, TDF {r['tdf']:.1f}: "
              f"step {r['step_model_ms']:.3f} ms model = {r['step_wall_ms']:.2f} ms wall, {r['steps']} steps; "
              f"wake-up late median {r['late_pct']['median']:.2f}% p99 {r['late_pct']['p99']:.2f}% "
              f"of the step; interval error median {r['interval_err_pct']['median']:.2f}% "
              f"p99 {r['interval_err_pct']['p99']:.2f}%; whole-run span error {r['span_error_pct']:+.3f}%; node CPU {100 * r['node_cpu_share']:.0f}% of a core, "
              f"load average {r['load_avg_1m']:.1f} on {r['cpus']} CPUs")
    write_results("decode_timing", results, args.out)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
