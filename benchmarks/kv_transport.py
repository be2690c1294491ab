"""KV transport fidelity and cost: SRD-like datagrams vs TCP on the emulated `pair` fabric.

    sudo .venv/bin/python benchmarks/kv_transport.py [--prefix sk] [--tdf 10] [--byte-scale 0.00390625]
                                                     [--repeat 3] [--quick]

For each transport, the completion time of one KV handoff (connect/handshake to the receiver's
verified ACK, as ``send_kv``/``send_kv_srd`` return it) of 1 MB .. 1 GB of model bytes, from
``prefill0`` to ``decode0`` of topologies/pair.yaml on Mininet (TDF and byte scale as given:
wire bytes = model bytes x S, times / TDF = model time):

- idle fabric, against bytes / (rails x rate) + one-way latency (rate: the slower end, the
  CS-3's 1.2 Tbit/s; rails: 1 in pair today);
- with loss 0.1 .. 5 % on the decode node's EFA link, against each transport's analytic
  expectation: SRD, the loss-free time x 1 / (1 - p) (selective resends, no window collapse);
  TCP, the Padhye et al. (1998) steady-state model with the route's rto_min as T0
  (B = MSS / (RTT sqrt(2p/3) + T0 min(1, 3 sqrt(3p/8)) p (1 + 32p^2)), capped by the link rate).

And the CPU cost of each transport per transferred (wire) megabyte, sender and receiver
processes, and the highest rate each carries on loopback (unshaped, separate processes) next to
the host capacity the fabric check measured. Raw results: benchmarks/results/kv_transport.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nodes.kvproto import KvBegin, KvReceiver, send_kv  # noqa: E402
from nodes.srd import SrdReceiver, SrdStats, payload_bytes_for_mtu, send_kv_srd  # noqa: E402

SECRET = b"kv-transport-benchmark"
MODEL_SIZES = [1e6, 10e6, 100e6, 1e9]
LOSSES = [0.0, 0.001, 0.01, 0.02, 0.05]
PORT = 7471


# ---------------------------------------------------------------- the two processes

async def _serve(host: str, port: int, seconds: float) -> None:
    """Receiver: TCP and UDP on one port (as a decode node); prints its CPU seconds at the end."""
    tcp = KvReceiver(SECRET, max_transfer_bytes=1 << 40, frame_timeout_s=60)
    srd = SrdReceiver(SECRET, max_transfer_bytes=1 << 40, frame_timeout_s=60)
    await tcp.start(host, port)
    await srd.start(host, port)
    print("listening", flush=True)
    try:
        line = await asyncio.to_thread(sys.stdin.readline)   # the parent closes stdin: stop
        del line
    finally:
        cpu = time.process_time()
        await srd.close()
        await tcp.close()
        print(json.dumps({"cpu_s": cpu, "srd_completed": srd.completed, "tcp_completed": tcp.completed,
                          "srd_dropped": dict(srd.dropped)}), flush=True)


async def _send(args: argparse.Namespace) -> None:
    """Sender: every size x repeat over one transport; one JSON line per transfer."""
    sizes = [int(x) for x in args.wire_sizes.split(",")]
    for i in range(args.repeat):
        for size in sizes:
            b = KvBegin(f"b{size}-{i}", "llama-3.1-70b", 80, 1000, size)
            cpu, t = time.process_time(), time.perf_counter()
            stats = SrdStats()
            try:
                if args.transport == "srd":
                    await send_kv_srd([(args.dest, args.port)], SECRET, b, mtu=args.mtu, rate_bps=args.rate_bps,
                                      tdf=args.tdf, timeout_s=120, stats=stats)
                else:
                    await send_kv(args.dest, args.port, SECRET, b, chunk_bytes=256 * 1024, timeout_s=120)
                ok = True
            except Exception as exc:   # recorded, not fatal: the table shows it
                ok = False
                print(f"transfer failed: {exc}", file=sys.stderr)
            print(json.dumps({"wire_bytes": size, "wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - cpu,
                              "ok": ok, "retransmitted": stats.retransmitted, "packets": stats.packets,
                              "backoffs": stats.backoffs}), flush=True)


# ---------------------------------------------------------------- analytic expectations

def padhye_bps(mss: int, rtt_s: float, rto_s: float, p: float) -> float:
    """Padhye, Firoiu, Towsley, Kurose (SIGCOMM 1998), b = 1 (no delayed ACKs: quickack is on)."""
    if p <= 0:
        return math.inf
    denom = rtt_s * math.sqrt(2 * p / 3) + rto_s * min(1.0, 3 * math.sqrt(3 * p / 8)) * p * (1 + 32 * p * p)
    return mss * 8 / denom


# ---------------------------------------------------------------- driver

def _run_point(net: Any, transport: str, loss: float, wire_sizes: list[int], args: argparse.Namespace,
               rate_wire_bps: float, mtu: int) -> dict[str, Any]:
    net.set_link("decode0-efa", loss=loss)
    py = sys.executable
    me = str(Path(__file__).resolve())
    server = net.popen("decode0", [py, me, "--serve", "--bind", net.address("decode0", "efa"), "--port", str(PORT)],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        client = net.popen("prefill0", [py, me, "--send", "--transport", transport, "--dest",
                                        net.address("decode0", "efa"), "--port", str(PORT), "--wire-sizes",
                                        ",".join(map(str, wire_sizes)), "--repeat", str(args.repeat), "--mtu", str(mtu),
                                        "--rate-bps", str(rate_wire_bps), "--tdf", str(args.tdf)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = client.communicate(timeout=900)
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        server.stdin.close()
        tail = server.stdout.read()
        rx = json.loads([x for x in tail.splitlines() if x.startswith("{")][-1])
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=10)
    return {"transport": transport, "loss": loss, "transfers": rows, "receiver": rx,
            "sender_errors": err.strip().splitlines()[-5:]}


async def _loopback_max(transport: str, wire_bytes: int) -> dict[str, float]:
    """The highest rate on loopback, sender and receiver in separate processes (unshaped)."""
    py, me = sys.executable, str(Path(__file__).resolve())
    server = subprocess.Popen([py, me, "--serve", "--bind", "127.0.0.1", "--port", str(PORT + 1)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        out = subprocess.run([py, me, "--send", "--transport", transport, "--dest", "127.0.0.1", "--port",
                              str(PORT + 1), "--wire-sizes", str(wire_bytes), "--repeat", "3", "--mtu", "9001"],
                             capture_output=True, text=True, timeout=600).stdout
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        server.stdin.close()
        rx = json.loads([x for x in server.stdout.read().splitlines() if x.startswith("{")][-1])
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=10)
    best = min(r["wall_s"] for r in rows if r["ok"])
    total_mb = sum(r["wire_bytes"] for r in rows if r["ok"]) / 1e6
    return {"wire_bytes": wire_bytes, "best_bps": wire_bytes * 8 / best,
            "sender_cpu_ms_per_mb": 1e3 * sum(r["cpu_s"] for r in rows) / total_mb,
            "receiver_cpu_ms_per_mb": 1e3 * rx["cpu_s"] / total_mb}


def summarize(points: list[dict[str, Any]], args: argparse.Namespace, rate_model_bps: float, latency_s: float,
              rtt_wall_s: float, rto_wall_s: float, mtu: int) -> list[dict[str, Any]]:
    """Median completion time per (transport, loss, size), in model seconds, with expectations."""
    scale, tdf = args.byte_scale, args.tdf
    idle: dict[tuple[str, int], float] = {}
    rows = []
    for pt in sorted(points, key=lambda p: (p["transport"], p["loss"])):
        by_size: dict[int, list[dict]] = {}
        for r in pt["transfers"]:
            by_size.setdefault(r["wire_bytes"], []).append(r)
        for wire, rs in sorted(by_size.items()):
            ok = [r for r in rs if r["ok"]]
            med = statistics.median(r["wall_s"] for r in ok) / tdf if ok else None
            model_bytes = wire / scale
            ideal = model_bytes * 8 / rate_model_bps + latency_s
            if pt["loss"] == 0 and med is not None:
                idle[(pt["transport"], wire)] = med
            base = idle.get((pt["transport"], wire))
            p = pt["loss"]
            if pt["transport"] == "srd":
                expected = base / (1 - p) if base is not None else None
            else:
                rate_wall = rate_model_bps * scale / tdf
                b = min(rate_wall, padhye_bps(mtu - 40, rtt_wall_s, rto_wall_s, p))
                # the loss-free time plus the extra time at the loss-limited rate
                expected = (base + (wire * 8 / b - wire * 8 / rate_wall) / tdf) if base is not None else None
            rows.append({
                "transport": pt["transport"], "loss": p, "model_bytes": model_bytes, "wire_bytes": wire,
                "n": len(rs), "failed": len(rs) - len(ok), "median_model_s": med,
                "ideal_model_s": ideal, "ratio_to_ideal": med / ideal if med else None,
                "expected_model_s": expected, "ratio_to_expected": med / expected if med and expected else None,
                "slowdown_vs_idle": med / base if med and base else None,
                "retransmitted_mean": statistics.mean(r["retransmitted"] for r in rs) if rs else None,
                "sender_cpu_ms_per_mb": 1e3 * sum(r["cpu_s"] for r in rs) / max(1e-9, sum(r["wire_bytes"] for r in rs) / 1e6),
            })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| transport | loss | model bytes | completion (model ms) | ideal (ms) | ÷ ideal | expected (ms) | ÷ expected | ÷ loss-free |",
           "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)   # noqa: E731
    for r in rows:
        out.append(f"| {r['transport']} | {r['loss'] * 100:g} % | {r['model_bytes'] / 1e6:g} MB | "
                   f"{f(r['median_model_s'] and r['median_model_s'] * 1e3, '.3f')} | {r['ideal_model_s'] * 1e3:.3f} | "
                   f"{f(r['ratio_to_ideal'], '.2f')} | {f(r['expected_model_s'] and r['expected_model_s'] * 1e3, '.3f')} | "
                   f"{f(r['ratio_to_expected'], '.2f')} | {f(r['slowdown_vs_idle'], '.2f')} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--send", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bind", default="127.0.0.1", help=argparse.SUPPRESS)
    ap.add_argument("--dest", default="127.0.0.1", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=PORT, help=argparse.SUPPRESS)
    ap.add_argument("--transport", choices=["srd", "tcp"], default="srd", help=argparse.SUPPRESS)
    ap.add_argument("--wire-sizes", default="", help=argparse.SUPPRESS)
    ap.add_argument("--mtu", type=int, default=9001, help=argparse.SUPPRESS)
    ap.add_argument("--rate-bps", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--prefix", default="sk", help="name prefix of the benchmark's Mininet hosts")
    ap.add_argument("--tdf", type=float, default=10.0)
    ap.add_argument("--byte-scale", type=float, default=1 / 256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="losses 0, 1 %%, 5 %% and sizes 10 MB, 1 GB")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(_serve(args.bind, args.port, 0))
        return 0
    if args.send:
        asyncio.run(_send(args))
        return 0

    from fabric.dilation import load_host_capacity
    from fabric.net import FabricNet
    from results_file import write_results  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

    losses = [0.0, 0.01, 0.05] if args.quick else LOSSES
    sizes = [10e6, 1e9] if args.quick else MODEL_SIZES
    wire_sizes = [max(1, int(s * args.byte_scale)) for s in sizes]
    started = time.monotonic()
    net = FabricNet("pair", tdf=args.tdf, byte_scale=args.byte_scale, prefix=args.prefix)
    points = []
    try:
        net.start()
        pp, dp = net.link_params("prefill0-efa"), net.link_params("decode0-efa")
        rate_model = min(pp.bandwidth_bps, dp.bandwidth_bps)
        latency = pp.latency_s + dp.latency_s
        mtu = min(pp.mtu, dp.mtu)
        rate_wire = rate_model * args.byte_scale / args.tdf
        rto_wall = net.rto_min_wall_s
        for transport in ("srd", "tcp"):
            for loss in losses:
                print(f"{transport} loss {loss:g} ...", file=sys.stderr, flush=True)
                points.append(_run_point(net, transport, loss, wire_sizes, args, rate_wire, mtu))
    finally:
        net.stop()
    rtt_wall = 2 * latency * args.tdf
    rows = summarize(points, args, rate_model, latency, rtt_wall, rto_wall, mtu)
    loop = {t: asyncio.run(_loopback_max(t, 256 << 20)) for t in ("srd", "tcp")}
    cap = load_host_capacity()
    cpu = {}
    for pt in points:
        wire_mb = sum(r["wire_bytes"] for r in pt["transfers"]) / 1e6
        c = cpu.setdefault(pt["transport"], {"sender_cpu_s": 0.0, "receiver_cpu_s": 0.0, "wire_mb": 0.0})
        c["sender_cpu_s"] += sum(r["cpu_s"] for r in pt["transfers"])
        c["receiver_cpu_s"] += pt["receiver"]["cpu_s"]
        c["wire_mb"] += wire_mb
    for c in cpu.values():
        c["sender_cpu_ms_per_mb"] = 1e3 * c["sender_cpu_s"] / c["wire_mb"]
        c["receiver_cpu_ms_per_mb"] = 1e3 * c["receiver_cpu_s"] / c["wire_mb"]
    res = {"topology": "pair", "tdf": args.tdf, "byte_scale": args.byte_scale, "rate_model_bps": rate_model,
           "rate_wire_bps": rate_wire, "one_way_latency_model_s": latency, "mtu": mtu,
           "srd_payload_bytes_per_packet": payload_bytes_for_mtu(mtu), "tcp_rto_min_wall_s": rto_wall,
           "rails": 1, "repeat": args.repeat, "rows": rows, "cpu_per_wire_mb": cpu, "loopback_max": loop,
           "host_capacity_bps": cap, "points": points, "duration_s": time.monotonic() - started,
           "loadavg_at_end": os.getloadavg()}
    print(table(rows))
    print(json.dumps({"cpu_per_wire_mb": cpu, "loopback_max": loop, "host_capacity_bps": cap}, indent=1))
    write_results("kv_transport", res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
