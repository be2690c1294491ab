"""KV handoff throughput on loopback: one sender process, one receiver process, every byte
verified by the receiver (CRC-32 per chunk and comparison with the deterministic payload).

    .venv/bin/python benchmarks/kv_handoff.py [--mib 256] [--repeat 3]

Prints a table (best of --repeat per chunk size) and the payload generator/verifier rates.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodes.kvproto import KvBegin, KvReceiver, payload, send_kv, verify_payload  # noqa: E402
from results_file import write_results  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

SECRET = b"benchmark-secret"


def _receiver(port_q: mp.Queue, stop: mp.Event) -> None:
    async def main() -> None:
        rx = KvReceiver(SECRET, max_transfer_bytes=1 << 40)
        await rx.start("127.0.0.1", 0)
        port_q.put(rx.port)
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await rx.close()

    asyncio.run(main())


def _rates(nbytes: int) -> tuple[float, float]:
    data = payload("bench", 0, 1 << 20)
    t = time.perf_counter()
    for i in range(nbytes >> 20):
        payload("bench", i << 20, 1 << 20)
    gen = nbytes / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(nbytes >> 20):
        assert verify_payload("bench", 0, data)
    return gen, nbytes / (time.perf_counter() - t)


async def _bench(port: int, total: int, chunks: list[int], repeat: int) -> list[tuple[int, float, float]]:
    rows = []
    for chunk in chunks:
        best = float("inf")
        for i in range(repeat):
            b = KvBegin(f"bench-{chunk}-{i}", "llama-3.1-70b", 80, 1000, total)
            res = await send_kv("127.0.0.1", port, SECRET, b, chunk_bytes=chunk, timeout_s=300)
            best = min(best, res.duration_s)
        rows.append((chunk, best, total / best))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="transfer size in MiB (default 256)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunks-kib", default="256,1024,4096", help="chunk sizes in KiB, comma-separated")
    args = ap.parse_args()
    total = args.mib << 20
    chunks = [int(c) << 10 for c in args.chunks_kib.split(",")]
    ctx = mp.get_context("spawn")
    port_q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_receiver, args=(port_q, stop), daemon=True)
    proc.start()
    try:
        port = port_q.get(timeout=30)
        rows = asyncio.run(_bench(port, total, chunks, args.repeat))
    finally:
        stop.set()
        proc.join(10)
    gen, ver = _rates(256 << 20)
    print(f"KV handoff on loopback: {args.mib} MiB per transfer, best of {args.repeat}, "
          f"sender and receiver in separate processes, receiver verifies every byte")
    print(f"{'chunk':>10} {'seconds':>9} {'MB/s':>9} {'Gbit/s':>8}")
    for chunk, secs, rate in rows:
        print(f"{chunk >> 10:>7} KiB {secs:>9.3f} {rate / 1e6:>9.1f} {rate * 8 / 1e9:>8.2f}")
    print(f"payload generation {gen / 1e9:.2f} GB/s, verification {ver / 1e9:.2f} GB/s (one core)")
    write_results("kv_handoff", {"mib": args.mib, "repeat": args.repeat,
                                 "rows": [{"chunk_bytes": c, "seconds": s, "bytes_per_s": r} for c, s, r in rows],
                                 "payload_generation_bytes_per_s": gen, "verification_bytes_per_s": ver})
    return 0


if __name__ == "__main__":
    sys.exit(main())
