"""``pdtb analyze``: real loopback captures of KV transfers, cross-checked with tshark and
the daemons' timeline; a crafted capture for retransmissions."""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import subprocess
import time
import zlib
from collections import defaultdict
from pathlib import Path

import pytest
from scapy.layers.l2 import CookedLinux
from scapy.utils import wrpcap

from nodes import kvproto as kp
from nodes.clock import ModelClock
from nodes.kvproto import KvBegin, KvReceiver, KvTransferError, send_kv
from nodes.timeline import Timeline
from testbed.analyze import analyze_run, format_table, read_connections
from testbed.cli import analyze as cli_analyze
from core.config import ConfigError

from pcap_helpers import Segments

SECRET = b"run-secret"
TDF, SCALE = 10.0, 0.25
SIZES = [40_000_000, 40_000_003]
needs_capture = pytest.mark.root  # tcpdump needs root; tcpdump and tshark come from bootstrap.sh


async def _run_transfers(run: Path, snaplen: int) -> int:
    t0 = time.time()
    (run / "run.json").write_text(json.dumps({"tdf": TDF, "byte_scale": SCALE, "t0_wall": t0}))
    clock = ModelClock(t0, TDF)
    tx = Timeline(run / "timeline" / "p0.jsonl", "p0", clock)
    rx_tl = Timeline(run / "timeline" / "d0.jsonl", "d0", clock)
    rx = KvReceiver(SECRET, max_transfer_bytes=1 << 30,
                    on_begin=lambda b: rx_tl.event("kv_recv_start", b.request_id, bytes=b.total_bytes),
                    on_complete=lambda b, ok: rx_tl.event("kv_recv_end", b.request_id, bytes=b.total_bytes,
                                                          verified=ok))
    await rx.start("127.0.0.1", 0)
    (run / "pcap").mkdir()
    cap = subprocess.Popen(["tcpdump", "-i", "lo", "-n", "-s", str(snaplen), "-B", "65536", "--immediate-mode", "-U",
                            "-w", str(run / "pcap" / "lo.pcap"), f"tcp port {rx.port}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert b"listening" in await asyncio.to_thread(cap.stderr.readline)
        for i, size in enumerate(SIZES):
            b = KvBegin(f"r{i:06d}", "llama-3.1-8b", 32, 1000, size)
            tx.event("kv_start", b.request_id, decode="d0", mode="whole", bytes=size, model_bytes=int(size / SCALE))
            res = await send_kv("127.0.0.1", rx.port, SECRET, b, chunk_bytes=1 << 20)
            tx.event("kv_end", b.request_id, bytes=res.bytes_sent, ok=True)
        with pytest.raises(KvTransferError):
            await send_kv("127.0.0.1", rx.port, b"intruder", KvBegin("r-x", "m", 1, 1, 10), chunk_bytes=1024)
        await _settle(run / "pcap" / "lo.pcap")
    finally:
        cap.send_signal(signal.SIGINT)
        await asyncio.to_thread(cap.wait, 20)
        await rx.close()
        tx.close()
        rx_tl.close()
    return rx.port


async def _settle(pcap: Path, quiet_s: float = 0.5, limit_s: float = 15.0) -> None:
    """Wait until tcpdump (packet-buffered, -U) stopped writing: stopping it earlier would drop
    the packets it has not read yet on a busy machine."""
    size, since, deadline = -1, time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() < deadline:
        now = pcap.stat().st_size if pcap.exists() else 0
        if now != size:
            size, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module", params=[0, 200], ids=["full", "snap200"])
def captured_run(request, tmp_path_factory):
    run = tmp_path_factory.mktemp(f"run-{request.param}")
    port = asyncio.run(_run_transfers(run, request.param))
    return run, port, request.param


def _tshark_stream_bytes(pcap: Path, port: int) -> dict[tuple[str, str], int]:
    """tcp.len summed per (client, server) direction, as tshark sees it."""
    out = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "ip.src", "-e", "tcp.srcport",
                          "-e", "ip.dst", "-e", "tcp.dstport", "-e", "tcp.len"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    sums: dict[tuple[str, str], int] = defaultdict(int)
    for line in out.splitlines():
        src, sport, dst, dport, length = line.split("\t")
        sums[(f"{src}:{sport}", f"{dst}:{dport}")] += int(length)
    return sums


def _tshark_behind(pcap: Path) -> dict[str, list[int]]:
    """Per sender: [retransmissions, out-of-order segments] as tshark flags them, data segments
    only (a resent SYN or FIN carries no stream bytes). Neither advanced the stream; tshark
    tells them apart by timing (a segment within its out-of-order threshold, ~the first RTT,
    of the highest one is "out-of-order" even when its bytes were seen before), analyze by
    bytes (seen before, or filling a gap)."""
    out = subprocess.run(["tshark", "-r", str(pcap), "-Y",
                          "tcp.len > 0 && (tcp.analysis.retransmission || tcp.analysis.fast_retransmission || "
                          "tcp.analysis.spurious_retransmission || tcp.analysis.out_of_order)",
                          "-T", "fields", "-e", "ip.src", "-e", "tcp.srcport", "-e", "tcp.analysis.out_of_order"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for line in out.splitlines():
        src, sport, ooo = line.split("\t")
        counts[f"{src}:{sport}"][1 if ooo else 0] += 1
    return counts


@needs_capture
def test_transfers_rebuilt_and_match_tshark(captured_run):
    run, port, snaplen = captured_run
    result = analyze_run(run, bin_s=0.01)
    assert json.loads((run / "analysis.json").read_text())["summary"] == result["summary"]
    trs = result["transfers"]
    assert [t["status"] for t in trs] == ["verified", "verified", "rejected"]
    assert [t["request_id"] for t in trs[:2]] == ["r000000", "r000001"]   # from BEGIN, even truncated
    assert "AUTH_FAILED" in trs[2]["reason"]
    pcap = run / "pcap" / "lo.pcap"
    (caps,) = result["captures"]
    sums = _tshark_stream_bytes(pcap, port)
    behind = _tshark_behind(pcap)
    for t in trs:
        assert t["tcp_payload_bytes_wire"] == sums[(t["client"], t["server"])]        # exactly
        assert t["tcp_payload_bytes_reverse"] == sums[(t["server"], t["client"])]
        # every segment that did not advance the stream is one of tshark's retransmissions or
        # out-of-order segments, and one of analyze's retransmissions (bytes seen before) or late
        # segments (filling a gap: reordered, or resent after tcpdump dropped the original), or
        # both; the two tools split them differently (one run: analyze 3 + 1, tshark 1 + 3)
        retrans, ooo = behind[t["client"]] if t["client"] in behind else (0, 0)
        assert max(t["retransmissions"], t["late_segments"]) <= retrans + ooo
        assert retrans + ooo <= t["retransmissions"] + t["late_segments"]
        # every stream byte was captured once, or more (retransmitted), or not at all (tcpdump dropped it)
        assert t["tcp_payload_bytes"] == (t["tcp_payload_bytes_wire"] - t["retransmitted_bytes"]
                                          + t["uncaptured_bytes"])
    for t, size in zip(trs, SIZES):
        assert t["announced_bytes"] == size
        if t["frames_complete"]:
            assert t["chunk_payload_bytes"] == size and t["chunks"] == t["end_chunks"]
        else:
            # some frame headers were not captured: loopback's 64 KiB GSO packets come out cut to
            # 65,535 bytes even with -s 0 here, and snaplen 200 keeps only each segment's start
            assert t["chunk_payload_bytes"] is None and caps["truncated_packets"] > 0
        if snaplen == 0:
            assert t["frames_seen"]["CHUNK"] >= 0.9 * t["end_chunks"]   # resynchronised past the cuts
        # the wire carries the payload plus frame overhead: a few hundred bytes per MiB chunk
        assert size < t["tcp_payload_bytes"] < size * 1.001
        series_bytes = sum(b["bytes"] for b in t["series"])
        assert series_bytes == t["tcp_payload_bytes_wire"]
        assert all(abs(b["bps_model"] - b["bps_wall"] * TDF / SCALE) < 1e-6 * max(1, b["bps_model"])
                   for b in t["series"])
        tl = t["timeline"]
        assert tl and tl["ok"] is True and tl["verified"] is True
        assert abs(tl["diff_pct"]) < 5.0, tl            # pcap session vs the sender's kv_start..kv_end
        assert t["duration_model_s"] == pytest.approx(t["duration_s"] / TDF)
        assert t["throughput_model_bps"] == pytest.approx(t["throughput_bps"] * TDF / SCALE)
    table = format_table(result)
    assert "r000000" in table and "verified" in table and "rejected" in table


@needs_capture
def test_fast_reader_matches_scapy_dissection(captured_run):
    """The struct fast path reads exactly what scapy's full dissection reads."""
    run, _, _ = captured_run

    def digest(engine: str) -> list:
        conns, stats = read_connections(run / "pcap" / "lo.pcap", engine=engine)
        return [stats] + [(c.a, c.b, c.client, c.syn_t, [
            (k, d.base, d.max_end, d.wire_bytes, d.segments, d.retrans_segments, d.samples,
             sorted((o, len(b), zlib.crc32(b)) for o, b in d.captured.items()))
            for k, d in sorted(c.dirs.items())]) for c in conns]

    assert digest("fast") == digest("scapy")


@needs_capture
def test_cli_json_and_table(captured_run, capsys):
    run, _, _ = captured_run
    parser = argparse.ArgumentParser()
    cli_analyze.register(parser.add_subparsers())
    args = parser.parse_args(["analyze", str(run), "--json", "--bin-ms", "20"])
    assert args.func(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["bin_s"] == 0.02 and data["summary"]["verified"] == 2
    args = parser.parse_args(["analyze", str(run)])
    assert args.func(args) == 0
    assert "max |diff| vs timeline" in capsys.readouterr().out


def test_frame_whose_fields_were_cut_makes_the_walk_incomplete():
    """A capture cut a segment just after a CHUNK's 12-byte header (loopback's GSO packets come
    out cut at 65,535 bytes): the walk still lands on every later frame from the header's length,
    but that CHUNK cannot be read, so its payload is not counted and the walk is not complete
    (it was reported complete once, with the sum of chunk payloads 1 MiB short)."""
    from fabric.kvlayer import PDKVChunk
    from testbed.analyze import _Direction, walk_frames

    frames = [bytes(PDKVChunk(request_id=b"r1", layer=k, offset=k * 1000, data=bytes([k]) * 1000))
              for k in range(3)]
    stream = b"".join(frames)
    cut = len(frames[0]) + kp.HEADER_LEN + 3              # inside the second CHUNK's fields
    seg = cut + 500                                       # the first segment's length on the wire
    whole, cut_short = _Direction(), _Direction()
    for d, captured in ((whole, seg), (cut_short, cut)):
        d.add(0.0, 1000, seg, stream[:captured])
        d.add(0.001, 1000 + seg, len(stream) - seg, stream[seg:])
    found, complete = walk_frames(whole)
    assert complete and [f.pkt.layer for f in found] == [0, 1, 2]
    found, complete = walk_frames(cut_short)
    assert not complete and [f.pkt.layer for f in found] == [0, 2]


def _crafted_run(tmp_path: Path, variant: str = "clean", link: str = "ip") -> Path:
    """A KV transfer written by scapy: ``clean``, or its second data segment ``duplicate`` (sent
    twice), ``dropped`` (missing from the capture) or ``reordered`` (after the third)."""
    (tmp_path / "pcap").mkdir()
    (tmp_path / "run.json").write_text(json.dumps({"tdf": 1, "byte_scale": 1, "t0_wall": 1_800_000_000}))
    b = KvBegin("r000009", "m", 2, 10, 5000)
    chunks = [kp.encode_chunk("r000009", layer, off, kp.payload("r000009", off, n))
              for layer in range(2) for off, n in [kp.layer_span(5000, 2, layer)]]
    c2s = kp.frame(kp.FrameType.AUTH, bytes(64)) + kp.encode_begin(b) + b"".join(chunks) + kp.encode_end(
        kp.KvEnd("r000009", 5000, 2, 0))
    s2c = kp.frame(kp.FrameType.HELLO, bytes(32)) + kp.frame(kp.FrameType.AUTH_OK, bytes(32)) + kp.encode_ack(
        kp.KvAck("r000009", True, kp.Code.OK, 5000, "verified"))
    cli, srv = ("10.202.0.1", 41000), ("10.202.0.2", 9999)   # not the default port: found by its HELLO
    segments = Segments(t0=1_800_000_001.0)
    seg = segments.add
    seg(cli, srv, 100, 0, "S")
    seg(srv, cli, 900, 101, "SA")
    seg(cli, srv, 101, 901, "A")
    seg(srv, cli, 901, 101, "PA", s2c[:44])
    seg(cli, srv, 101, 945, "PA", c2s[:76])
    seg(srv, cli, 945, 177, "PA", s2c[44:88])
    mss = 1400
    body = c2s[76:]
    order = list(range(0, len(body), mss))
    if variant == "reordered":
        order[1], order[2] = order[2], order[1]
    for i in order:
        if not (variant == "dropped" and i == mss):
            seg(cli, srv, 177 + i, 989, "PA", body[i:i + mss])
        if variant == "duplicate" and i == mss:
            seg(cli, srv, 177 + i, 989, "PA", body[i:i + mss])
    seg(srv, cli, 989, 177 + len(body), "PA", s2c[88:])
    seg(cli, srv, 177 + len(body), 989 + len(s2c) - 88, "FA")
    pkts = segments.packets
    if link == "sll":   # Linux cooked capture (tcpdump -i any)
        framed = []
        for p in pkts:
            q = CookedLinux(proto=0x0800) / p
            q.time = p.time
            framed.append(q)
        pkts = framed
    wrpcap(str(tmp_path / "pcap" / "crafted.pcap"), pkts, linktype=101 if link == "ip" else None)
    return tmp_path


@pytest.mark.parametrize("variant, link", [("clean", "ip"), ("duplicate", "ip"), ("duplicate", "sll"),
                                           ("dropped", "ip"), ("reordered", "ip")])
def test_retransmissions_counted_like_tshark(tmp_path, variant, link):
    run = _crafted_run(tmp_path, variant, link)
    duplicate = variant == "duplicate"
    result = analyze_run(run)
    (t,) = result["transfers"]
    assert t["request_id"] == "r000009" and t["status"] == "verified"
    if variant == "dropped":   # the second chunk's header was in the missing segment: skipped, walk resumed
        assert not t["frames_complete"] and t["chunk_payload_bytes"] is None and t["chunks"] is None
    else:
        assert t["frames_complete"] and t["chunk_payload_bytes"] == 5000 and t["chunks"] == 2
    assert t["frames_seen"] == {"HELLO": 1, "AUTH": 1, "AUTH_OK": 1, "BEGIN": 1, "CHUNK": 1 if variant == "dropped" else 2,
                                "END": 1, "ACK": 1}
    assert t["retransmissions"] == (1 if duplicate else 0)
    assert t["retransmitted_bytes"] == (1400 if duplicate else 0)
    assert t["uncaptured_bytes"] == (1400 if variant == "dropped" else 0)   # a late segment fills its gap
    assert t["late_segments"] == (1 if variant == "reordered" else 0)
    assert t["tcp_payload_bytes"] == t["tcp_payload_bytes_wire"] - t["retransmitted_bytes"] + t["uncaptured_bytes"]
    assert result["summary"]["uncaptured_bytes"] == t["uncaptured_bytes"]
    assert ("the captures missed 1400 stream bytes" in format_table(result)) == (variant == "dropped")
    assert t["timeline"] is None   # no timeline in this run
    pcap = run / "pcap" / "crafted.pcap"
    behind = list(_tshark_behind(pcap).values())
    assert [sum(c[0] for c in behind), sum(c[1] for c in behind)] == [t["retransmissions"], t["late_segments"]]
    assert _tshark_stream_bytes(pcap, 9999)[(t["client"], t["server"])] == t["tcp_payload_bytes_wire"]


def test_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="run.json: <top>: not found"):
        analyze_run(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"tdf": 0, "byte_scale": 1, "t0_wall": 1}))
    with pytest.raises(ConfigError, match="tdf: expected a positive number"):
        analyze_run(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"tdf": 1, "byte_scale": 1, "t0_wall": 1}))
    with pytest.raises(ConfigError, match="no .pcap files"):
        analyze_run(tmp_path)


def test_wireshark_dissector_decodes_every_frame(tmp_path):
    """tools/pdtb-kv.lua in tshark: the crafted transfer's frames, in order, with their fields."""
    run = _crafted_run(tmp_path, "clean", "ip")
    lua = Path(__file__).resolve().parents[1] / "tools" / "pdtb-kv.lua"
    proc = subprocess.run(["tshark", "-n", "-X", f"lua_script:{lua}", "-d", "tcp.port==9999,pdkv",
                           "-r", str(run / "pcap" / "crafted.pcap"), "-Y", "pdkv", "-T", "fields",
                           "-E", "occurrence=a", "-E", "aggregator=,", "-e", "pdkv.type", "-e", "pdkv.request_id",
                           "-e", "pdkv.layer", "-e", "pdkv.offset", "-e", "pdkv.verified", "-e", "pdkv.reason"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    types = [int(t) for line in proc.stdout.splitlines() for t in line.split("\t")[0].split(",") if t]
    assert types == [kp.FrameType.HELLO, kp.FrameType.AUTH, kp.FrameType.AUTH_OK, kp.FrameType.BEGIN,
                     kp.FrameType.CHUNK, kp.FrameType.CHUNK, kp.FrameType.END, kp.FrameType.ACK], proc.stdout
    text = proc.stdout
    assert "r000009" in text and "verified" in text
    # the two chunks: layer 0 at offset 0 and layer 1 at offset 2500 (layer_span of 5000 bytes, 2 layers)
    layers = ",".join(line.split("\t")[2] for line in text.splitlines() if line.split("\t")[2])
    offsets = ",".join(line.split("\t")[3] for line in text.splitlines() if line.split("\t")[3])
    assert layers.split(",") == ["0", "1"] and offsets.split(",") == ["0", "2500"], text


# ---------------------------------------------------------------- SRD-like transfers

SRD_SIZES = [3_000_000, 1_000_003]


async def _run_srd_transfers(run: Path, snaplen: int, monkeypatch) -> dict:
    """Two SRD transfers sprayed over two receiver addresses (127.0.0.1, 127.0.0.2) with
    duplicated and delayed (reordered) datagrams, and one refused sender, captured on lo."""
    import random

    from nodes import srd

    t0 = time.time()
    (run / "run.json").write_text(json.dumps({"tdf": TDF, "byte_scale": SCALE, "t0_wall": t0}))
    clock = ModelClock(t0, TDF)
    tx_tl = Timeline(run / "timeline" / "p0.jsonl", "p0", clock)
    rx_tl = Timeline(run / "timeline" / "d0.jsonl", "d0", clock)
    rx = srd.SrdReceiver(SECRET, max_transfer_bytes=1 << 30,
                         on_begin=lambda b: rx_tl.event("kv_recv_start", b.request_id, bytes=b.total_bytes),
                         on_complete=lambda b, ok: rx_tl.event("kv_recv_end", b.request_id, bytes=b.total_bytes,
                                                               verified=ok))
    await rx.start(["127.0.0.1", "127.0.0.2"], 0)
    rng = random.Random(3)
    shim = {"dups": 0, "dup_bytes": 0}
    real = srd._Endpoint.send

    def send(ep, data, addr=None):
        if ep.handler.__self__.__class__ is srd._Sender and data[5] == srd.SrdType.DATA:
            if rng.random() < 0.05:
                shim["dups"] += 1
                shim["dup_bytes"] += len(data) - srd.DATA_HEADER_LEN
                real(ep, data, addr)
            if rng.random() < 0.1:
                asyncio.get_running_loop().call_later(0.001, real, ep, data, addr)
                return None
        return real(ep, data, addr)
    monkeypatch.setattr(srd._Endpoint, "send", send)
    (run / "pcap").mkdir()
    cap = subprocess.Popen(["tcpdump", "-i", "lo", "-n", "-s", str(snaplen), "-B", "65536", "--immediate-mode", "-U",
                            "-w", str(run / "pcap" / "lo.pcap"), f"udp port {rx.port}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stats = []
    try:
        assert b"listening" in await asyncio.to_thread(cap.stderr.readline)
        for i, size in enumerate(SRD_SIZES):
            b = KvBegin(f"r{i:06d}", "llama-3.1-8b", 32, 1000, size)
            st = srd.SrdStats()
            tx_tl.event("kv_start", b.request_id, decode="d0", mode="whole", bytes=size, model_bytes=int(size / SCALE))
            res = await srd.send_kv_srd([("127.0.0.1", rx.port), ("127.0.0.2", rx.port)], SECRET, b, mtu=9001,
                                        timeout_s=20, stats=st)
            tx_tl.event("kv_end", b.request_id, bytes=res.bytes_sent, ok=True)
            stats.append(st)
        with pytest.raises(KvTransferError):
            await srd.send_kv_srd([("127.0.0.1", rx.port)], b"intruder", KvBegin("r-x", "m", 1, 1, 10), timeout_s=5)
        await asyncio.sleep(0.2)
        await _settle(run / "pcap" / "lo.pcap")
    finally:
        cap.send_signal(signal.SIGINT)
        await asyncio.to_thread(cap.wait, 20)
        await rx.close()
        tx_tl.close()
        rx_tl.close()
    # tcpdump's own count of packets it could not keep up with (a busy host): exact byte
    # accounting against the sender holds only for a capture that lost nothing
    tail = cap.stderr.read().decode(errors="replace")
    m = re.search(r"(\d+) packets? dropped by kernel", tail)
    return {"port": rx.port, "stats": stats, "dups": shim["dups"], "dup_bytes": shim["dup_bytes"],
            "capture_dropped": int(m.group(1)) if m else 0}


@needs_capture
@pytest.mark.parametrize("snaplen", [0, 200], ids=["full", "snap200"])
def test_srd_transfers_rebuilt_byte_for_byte(tmp_path, monkeypatch, snaplen):
    info = asyncio.run(_run_srd_transfers(tmp_path, snaplen, monkeypatch))
    res = analyze_run(tmp_path)
    srd_tr = [t for t in res["transfers"] if t["transport"] == "srd"]
    ok = sorted((t for t in srd_tr if t["status"] == "verified"), key=lambda t: t["request_id"])
    assert [t["request_id"] for t in ok] == ["r000000", "r000001"]
    if info["capture_dropped"]:
        pytest.skip(f"tcpdump dropped {info['capture_dropped']} packets on this busy host: no exact accounting")
    assert [t["status"] for t in srd_tr if t["request_id"] is None or t["request_id"] == "r-x"] == ["rejected"]
    for t, size, st in zip(ok, SRD_SIZES, info["stats"]):
        # every byte of the message covered by exactly the packets the sender made
        assert t["announced_bytes"] == size and t["data_payload_bytes"] == size and t["complete"]
        assert t["packets"] == st.packets == t["end_packets"]
        assert set(t["per_destination"]) == {f"127.0.0.1:{info['port']}", f"127.0.0.2:{info['port']}"}
        assert all(v["bytes"] > size // 3 for v in t["per_destination"].values())
        assert t["timeline"] and t["timeline"]["verified"] is True and t["timeline"]["ok"] is True
        if snaplen == 0:
            assert t["payload_verified"] is True and t["payload_captured_bytes"] == size
        else:
            assert t["payload_verified"] is None
    # duplicates and resends show up as retransmissions; delayed datagrams as reordering
    assert sum(t["retransmissions"] for t in ok) == info["dups"] + sum(st.retransmitted for st in info["stats"])
    # ~10 % of ~450 datagrams delayed 1 ms behind later ones: P(none reordered) ~ 0.9^450 ~ 3e-21
    assert sum(t["reordered"] for t in ok) > 0
    # the capture holds each datagram sent: the sender's (first copies and timer resends, per
    # destination) plus the shim's duplicates
    assert sum(t["data_payload_bytes_wire"] for t in ok) == sum(sum(st.per_dest_bytes) for st in info["stats"]) \
        + info["dup_bytes"]
    assert "srd" in format_table(res)


@needs_capture
def test_srd_dissector_in_tshark(tmp_path, monkeypatch):
    """tools/pdtb-kv.lua shows the SRD datagrams: types, request id, per-destination payload bytes
    equal to the analysis's."""
    info = asyncio.run(_run_srd_transfers(tmp_path, 0, monkeypatch))
    res = analyze_run(tmp_path, write=False)
    lua = Path(__file__).resolve().parents[1] / "tools" / "pdtb-kv.lua"
    proc = subprocess.run(["tshark", "-n", "-X", f"lua_script:{lua}", "-d", f"udp.port=={info['port']},pdsr",
                           "-r", str(tmp_path / "pcap" / "lo.pcap"), "-Y", "pdsr", "-T", "fields",
                           "-e", "pdsr.type", "-e", "pdsr.session", "-e", "ip.dst", "-e", "udp.dstport",
                           "-e", "pdsr.payload_len", "-e", "pdsr.request_id", "-e", "pdsr.code"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    types = {int(r[0]) for r in rows}
    assert types == {1, 2, 3, 4, 5, 6, 7, 8}, types
    per: dict[tuple[str, str], int] = defaultdict(int)
    for r in rows:
        if r[0] == "5":
            per[(int(r[1], 16), f"{r[2]}:{r[3]}")] += int(r[4])
    for t in res["transfers"]:
        if t["status"] == "verified":
            for dest, v in t["per_destination"].items():
                assert per[(int(t["session"], 16), dest)] == v["bytes"]
    assert any(r[5] == "r000001" for r in rows)
    assert any(r[0] == "8" and r[6] == "7" for r in rows)    # the intruder's AUTH_FAILED verdict
