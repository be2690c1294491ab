"""``pdtb analyze`` on persistent, striped KV connections (KvPeer over three loopback rails):
each transfer rebuilt from its stripes, byte for byte against tshark's stream accounting, a
refused try and its retry told apart, and the Wireshark dissector showing the stripe fields."""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest

from nodes.kvproto import Code, KvBegin, KvPeer, KvReceiver, KvTransferError
from testbed.analyze import analyze_run, format_table

from test_analyze import _settle

SECRET = b"run-secret"
RAILS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
SIZES = {"r000001": 3_000_000, "r000002": 1_000_003}
LUA = Path(__file__).resolve().parents[1] / "tools" / "pdtb-kv.lua"
pytestmark = pytest.mark.root   # tcpdump needs root


async def _striped_run(run: Path) -> int:
    (run / "run.json").write_text(json.dumps({"tdf": 10.0, "byte_scale": 0.25, "t0_wall": time.time()}))
    full = {"r000002"}

    def on_begin(b: KvBegin) -> None:
        if b.request_id in full:
            full.clear()                       # refused once, then there is room
            raise KvTransferError("no KV room", Code.KV_FULL)

    rx = KvReceiver(SECRET, max_transfer_bytes=1 << 30, on_begin=on_begin)
    for addr in RAILS:
        await rx.start(addr, rx.port if rx._port else 0)
    (run / "pcap").mkdir()
    pcap = run / "pcap" / "lo.pcap"
    cap = subprocess.Popen(["tcpdump", "-i", "lo", "-n", "-s", "0", "-B", "65536", "--immediate-mode", "-U",
                            "-w", str(pcap), f"tcp port {rx.port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peer = KvPeer(RAILS, rx.port, SECRET)
    try:
        assert b"listening" in await asyncio.to_thread(cap.stderr.readline)
        await peer.connect()
        await peer.send(KvBegin("r000001", "m", 8, 100, SIZES["r000001"]), chunk_bytes=64 * 1024)
        with pytest.raises(KvTransferError):
            await peer.send(KvBegin("r000002", "m", 4, 100, SIZES["r000002"]), chunk_bytes=64 * 1024)
        await peer.send(KvBegin("r000002", "m", 4, 100, SIZES["r000002"]), chunk_bytes=64 * 1024)
        await _settle(pcap)
    finally:
        await peer.close()
        cap.send_signal(signal.SIGINT)
        await asyncio.to_thread(cap.wait, 20)
        await rx.close()
    return rx.port


@pytest.fixture(scope="module")
def striped_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("striped")
    return run, asyncio.run(_striped_run(run))


def test_striped_transfers_rebuilt_byte_for_byte(striped_run):
    run, port = striped_run
    result = analyze_run(run)
    trs = result["transfers"]
    done = [t for t in trs if t["status"] == "verified"]
    assert sorted(t["request_id"] for t in done) == ["r000001", "r000002"]
    for t in done:
        assert t["stripes"] == 3 and t["stripes_seen"] == 3 and t["stripes_ended"] == 3
        assert t["chunks_tile_transfer"] and t["chunk_payload_bytes"] == SIZES[t["request_id"]]
        assert t["chunks"] == t["end_chunks"] and len(t["connections"]) == 3
    refused = [t for t in trs if t["status"] == "rejected"]
    assert len(refused) == 1 and refused[0]["request_id"] == "r000002" and "KV_FULL" in refused[0]["reason"]
    assert refused[0]["attempt"] != next(t["attempt"] for t in done if t["request_id"] == "r000002")
    # byte for byte: the stripes plus the three handshakes' AUTH frames are every byte the
    # sender put on its three connections, as tshark counts them
    out = subprocess.run(["tshark", "-r", str(run / "pcap" / "lo.pcap"), "-T", "fields", "-e", "tcp.dstport",
                          "-e", "tcp.len"], capture_output=True, text=True, check=True, timeout=120).stdout
    sums: dict[bool, int] = defaultdict(int)
    for line in out.splitlines():
        dport, length = line.split("\t")
        sums[int(dport) == port] += int(length)
    auth = 3 * (12 + 64)
    assert sum(t["tcp_payload_bytes"] for t in trs) + auth == sums[True]
    assert "r000001" in format_table(result)


def test_dissector_shows_the_stripes(striped_run):
    run, port = striped_run
    cmd = ["tshark", "-X", f"lua_script:{LUA}", "-r", str(run / "pcap" / "lo.pcap"), "-d", f"tcp.port=={port},pdkv",
           "-Y", "pdkv.stripes", "-T", "fields", "-e", "pdkv.request_id", "-e", "pdkv.stripe", "-e", "pdkv.stripes"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {tuple(line.split("\t")) for line in out.stdout.splitlines() if line.strip()}
    assert {("r000001", str(k), "3") for k in range(3)} <= rows, out.stdout
