"""Scapy layer and Wireshark dissector of the KV handoff protocol."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw
from scapy.utils import wrpcap

from fabric.kvlayer import (PDKV, PDKVAck, PDKVAuth, PDKVAuthOk, PDKVBegin, PDKVChunk, PDKVEnd, PDKVHello,
                            iter_frames, parse_frame)
from nodes import kvproto as kp
from nodes.kvproto import DEFAULT_KV_PORT, Code, FrameType, KvAck, KvBegin, KvEnd

from pcap_helpers import Segments

LUA = Path(__file__).resolve().parents[1] / "tools" / "pdtb-kv.lua"
BEGIN = KvBegin("r000007", "llama-3.1-70b", 80, 8192, 2_684_354_560)
DATA = kp.payload("r000007", 4096, 300)


def frames() -> dict[type, bytes]:
    return {
        PDKVHello: kp.frame(FrameType.HELLO, b"n" * 32),
        PDKVAuth: kp.frame(FrameType.AUTH, b"c" * 32 + b"m" * 32),
        PDKVAuthOk: kp.frame(FrameType.AUTH_OK, b"s" * 32),
        PDKVBegin: kp.encode_begin(BEGIN),
        PDKVChunk: kp.encode_chunk("r000007", 3, 4096, DATA),
        PDKVEnd: kp.encode_end(KvEnd("r000007", 2_684_354_560, 80, 0xCAFEBABE)),
        PDKVAck: kp.encode_ack(KvAck("r000007", False, Code.BAD_CRC, 4096, "CRC mismatch")),
    }


@pytest.mark.parametrize("cls", list(frames()))
def test_each_frame_type_parses_to_its_class(cls):
    raw = frames()[cls]
    pkt = PDKV(raw)
    assert type(pkt) is cls
    assert pkt.magic == b"PDKV" and pkt.version == 1 and pkt.length == len(raw) - 12
    assert bytes(pkt) == raw   # fields_desc describe every byte


def test_field_values():
    f = frames()
    b = PDKV(f[PDKVBegin])
    assert (b.request_id, b.model, b.num_layers, b.tokens, b.total_bytes, b.layout) == (
        b"r000007", b"llama-3.1-70b", 80, 8192, 2_684_354_560, b"layer-major")
    c = PDKV(f[PDKVChunk])
    assert (c.layer, c.offset, c.payload_len, c.data) == (3, 4096, 300, DATA)
    import zlib
    assert c.crc32 == zlib.crc32(DATA)
    e = PDKV(f[PDKVEnd])
    assert (e.total_bytes, e.chunks, e.checksum) == (2_684_354_560, 80, 0xCAFEBABE)
    a = PDKV(f[PDKVAck])
    assert (a.verified, a.code, a.bytes_verified, a.reason) == (0, Code.BAD_CRC, 4096, b"CRC mismatch")
    assert a.sprintf("%code%") == "BAD_CRC"


def test_built_frames_match_the_protocol_encoder():
    built = PDKVBegin(request_id=b"r000007", model=b"llama-3.1-70b", num_layers=80, tokens=8192,
                      total_bytes=2_684_354_560)
    assert bytes(built) == kp.encode_begin(BEGIN)
    import zlib
    chunk = PDKVChunk(request_id=b"r000007", layer=3, offset=4096, crc32=zlib.crc32(DATA), data=DATA)
    assert bytes(chunk) == kp.encode_chunk("r000007", 3, 4096, DATA)


def test_several_frames_in_one_segment_and_binding_to_the_port():
    f = frames()
    stream = f[PDKVBegin] + f[PDKVChunk] + f[PDKVEnd]
    pkt = IP(bytes(IP(src="10.202.0.1", dst="10.202.0.2") / TCP(sport=40000, dport=DEFAULT_KV_PORT) / stream))
    assert [type(x) for x in iter_frames(pkt)] == [PDKVBegin, PDKVChunk, PDKVEnd]
    back = IP(bytes(IP() / TCP(sport=DEFAULT_KV_PORT, dport=40000) / f[PDKVAck]))
    assert type(next(iter_frames(back))) is PDKVAck
    other = IP(bytes(IP() / TCP(sport=40000, dport=8080) / f[PDKVBegin]))
    assert list(iter_frames(other)) == [] and Raw in other


def test_mid_frame_and_truncated_segments():
    f = frames()
    middle = IP(bytes(IP() / TCP(dport=DEFAULT_KV_PORT) / f[PDKVChunk][40:]))
    assert list(iter_frames(middle)) == [] and Raw in middle
    cut = IP(bytes(IP() / TCP(dport=DEFAULT_KV_PORT) / (f[PDKVBegin] + f[PDKVChunk][:5])))
    assert [type(x) for x in iter_frames(cut)] == [PDKVBegin]   # the partial header stays Raw
    head = parse_frame(f[PDKVChunk][:40])   # fixed fields present, payload cut
    assert type(head) is PDKVChunk and head.offset == 4096 and head.payload_len == 300
    assert parse_frame(f[PDKVChunk][:20]) is None
    assert parse_frame(b"GET / HTTP/1.1\r\n") is None


def _session_pcap(path: Path, port: int) -> None:
    """A TCP session carrying a whole KV transfer, frames split across segments."""
    f = frames()
    c2s = f[PDKVAuth] + f[PDKVBegin] + f[PDKVChunk] + f[PDKVEnd]
    s2c = f[PDKVHello] + f[PDKVAuthOk] + f[PDKVAck]
    cli, srv = ("10.202.0.1", 40000), ("10.202.0.2", port)
    segments = Segments(t0=1_800_000_000.0)
    seg = segments.add
    cseq, sseq = 1000, 5000
    seg(cli, srv, cseq, 0, "S")
    seg(srv, cli, sseq, cseq + 1, "SA")
    cseq += 1
    sseq += 1
    seg(cli, srv, cseq, sseq, "A")
    for i in range(0, len(s2c), 50):
        seg(srv, cli, sseq + i, cseq, "PA", s2c[i:i + 50])
    for i in range(0, len(c2s), 90):
        seg(cli, srv, cseq + i, sseq + len(s2c), "PA", c2s[i:i + 90])
    wrpcap(str(path), segments.packets)


@pytest.mark.parametrize("port", [DEFAULT_KV_PORT, 45123])
def test_lua_dissector_decodes_fields(tmp_path, port):
    pcap = tmp_path / "kv.pcap"
    _session_pcap(pcap, port)
    cmd = ["tshark", "-X", f"lua_script:{LUA}", "-r", str(pcap), "-Y", "pdkv", "-T", "fields",
           "-e", "pdkv.type", "-e", "pdkv.request_id", "-e", "pdkv.total_bytes", "-e", "pdkv.offset",
           "-e", "pdkv.code"]
    if port != DEFAULT_KV_PORT:
        cmd[5:5] = ["-d", f"tcp.port=={port},pdkv"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.splitlines() if line.strip()]
    flat = [(t, rid, total, off, code) for row in rows for t, rid, total, off, code in [row + [""] * (5 - len(row))]]
    types = ",".join(r[0] for r in flat).split(",")
    assert {"1", "2", "3", "4", "5", "6", "7"} <= set(types), out.stdout
    assert any("r000007" in r[1] and "2684354560" in r[2] for r in flat), out.stdout
    assert any("4096" in r[3] for r in flat)
    assert any("9" in r[4] for r in flat)   # the ACK's BAD_CRC code


def test_srd_datagrams_parse_and_bind_to_udp():
    """Each SRD datagram type (built by nodes/srd.py's own encoders) parses to its class with
    its fields; on UDP port 7470 scapy dissects it; a truncated DATA still gives its header."""
    from scapy.layers.inet import IP, UDP

    from fabric.kvlayer import PDSRAck, PDSRBegin, PDSRData, PDSRSack, parse_datagram
    from nodes import srd
    from nodes.kvproto import KvAck, ack_body, begin_body

    key = b"k" * 32
    begin = kp.KvBegin("r000003", "llama-3.1-8b", 32, 900, 123456)
    raw_begin = srd.tagged(key, srd.header(srd.SrdType.BEGIN, 77) + bytes(64) + srd.PACKET_FIXED.pack(8927)
                           + begin_body(begin))
    p = parse_datagram(raw_begin)
    assert isinstance(p, PDSRBegin) and p.session == 77 and p.request_id == b"r000003"
    assert (p.num_layers, p.tokens, p.total_bytes, p.packet_bytes) == (32, 900, 123456, 8927)
    assert p.tag == raw_begin[-8:]
    data = srd.data_header(key, 77, 5, 1000, 3, 44627, 0xDEADBEEF, srd.FLAG_RETRANSMIT) + b"x" * 100
    d = parse_datagram(data)
    assert isinstance(d, PDSRData) and (d.psn, d.layer, d.offset, d.crc32, d.flags) == (5, 3, 44627, 0xDEADBEEF, 1)
    assert d.data == b"x" * 100
    cut = parse_datagram(data[:50])
    assert isinstance(cut, PDSRData) and cut.offset == 44627
    sack = parse_datagram(srd.tagged(key, srd.header(srd.SrdType.SACK, 77) + srd.SACK_FIXED.pack(9, 1, 2) + b"\xf0\x01"))
    assert isinstance(sack, PDSRSack) and (sack.cum, sack.bitmap) == (9, b"\xf0\x01")
    ack = parse_datagram(srd.tagged(key, srd.header(srd.SrdType.ACK, 77)
                                    + ack_body(KvAck("r000003", False, kp.Code.KV_FULL, 0, "no room"))))
    assert isinstance(ack, PDSRAck) and ack.sprintf("%code%") == "KV_FULL" and ack.reason == b"no room"
    assert parse_datagram(b"PDKV" + bytes(20)) is None
    pkt = IP(bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=40000, dport=kp.DEFAULT_KV_PORT) / data))
    assert PDSRData in pkt and pkt[PDSRData].psn == 5
