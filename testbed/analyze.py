"""Packet-capture analysis of KV handoffs (``pdtb analyze RUN_DIR --pcap``).

Each TCP connection of each capture in ``RUN_DIR/pcap/`` is followed per direction by sequence
number. Byte accounting (bytes, retransmissions, throughput over time) uses only IP/TCP header
lengths and sequence numbers, so it is exact even when the capture's snaplen cut the payload.
The KV frames are parsed (with the scapy classes of ``fabric.kvlayer``) from the reassembled
byte stream wherever it was captured: the receiver's HELLO identifies a KV connection, BEGIN
(the first bytes after the handshake) gives the request id and the announced size, the
receiver's ACK the outcome. Each transfer is compared with the daemons' own timeline
(``kv_start``/``kv_end`` of the sender, ``kv_recv_start``/``kv_recv_end`` of the receiver).

Persistent connections (``nodes.kvproto.KvPeer``) carry many transfers each, and a transfer is
striped over one connection per rail, each rail in its own capture (``<link>-r<k>.pcap``): the
frames of every persistent connection are cut into stripes (BEGIN .. END of one request id)
and the stripes of one transfer attempt are joined across the rails of a host's link
(:func:`striped_transfers`): bytes per rail, the chunks' offsets tiling the transfer, the ACK.

SRD-like transfers (nodes/srd.py, UDP) are rebuilt per session id from their datagrams: every
DATA header (46 bytes, inside any snaplen the testbed uses) gives the packet number, offset and
layer, the UDP length the payload length, so the byte coverage of the message, its
retransmissions (a packet number seen again), reordering (a packet number below one already
seen, first copies only) and the bytes per destination (rail) are exact; payload bytes are
checked against the request's deterministic KV bytes and CRC where the capture holds them.
"""
from __future__ import annotations

import bisect
import json
import math
import re
import socket
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

from scapy.config import conf
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.utils import PcapReader, RawPcapReader

from fabric.kvlayer import (MAX_FIELDS_LEN, PDKVAck, PDKVBegin, PDKVChunk, PDKVEnd, PDSRAck, PDSRBegin, PDSREnd,
                            parse_datagram, parse_frame)
from nodes.kvproto import verify_payload
from nodes.srd import DATA_FIXED, DATA_HEADER_LEN, SRD_MAGIC, COMMON, SrdType
from nodes.kvproto import DEFAULT_KV_PORT, HEADER, HEADER_LEN, MAGIC, MAX_FRAME_BYTES, FrameType
from nodes.timeline import read_run_timeline
from core.config import ConfigError

_SEQ_MOD = 1 << 32
_SYN, _FIN, _RST, _ACK = 0x02, 0x01, 0x04, 0x10


@dataclass
class _Direction:
    """One direction of a connection: captured bytes by stream offset and wire accounting."""
    base: int | None = None           # sequence number of stream offset 0 (ISN + 1)
    from_syn: bool = False            # base known from the SYN (else: first segment seen)
    max_end: int = 0                  # highest stream offset seen + 1
    captured: dict[int, bytes] = field(default_factory=dict)   # offset -> captured payload bytes
    first_time: dict[int, float] = field(default_factory=dict)  # offset -> first time seen
    wire_bytes: int = 0               # sum of TCP payload lengths (retransmissions included)
    segments: int = 0
    retrans_segments: int = 0
    retrans_bytes: int = 0
    late_segments: int = 0            # segments that filled a gap below max_end (see add)
    holes: list[list[int]] = field(default_factory=list)   # [start, end) offsets below max_end never seen
    samples: list[tuple[float, int]] = field(default_factory=list)   # (time, payload length)
    first_t: float | None = None
    last_t: float | None = None
    last_new_t: float | None = None   # time of the last segment carrying new bytes

    def offset(self, seq: int) -> int:
        """Stream offset of ``seq``, unwrapped past 4 GiB by staying nearest to ``max_end``
        (negative: bytes from before the first segment seen, when the SYN was not captured)."""
        rel = (seq - self.base) % _SEQ_MOD
        cand = (self.max_end - self.max_end % _SEQ_MOD) + rel
        if cand - self.max_end > _SEQ_MOD // 2:
            cand -= _SEQ_MOD
        elif self.max_end - cand > _SEQ_MOD // 2:
            cand += _SEQ_MOD
        return cand

    def add(self, t: float, seq: int, length: int, data: bytes) -> None:
        if self.base is None:
            self.base = seq
        off = self.offset(seq)
        self.segments += 1
        self.wire_bytes += length
        self.samples.append((t, length))
        self.first_t = t if self.first_t is None else self.first_t
        self.last_t = t
        if off < self.max_end:
            filled = self._fill(off, off + length)
            # a gap filled late: reordered, or a retransmission whose original the capture missed
            # (tshark flags the latter a retransmission when it comes later than its out-of-order
            # threshold; bytes alone cannot tell the two apart)
            if filled > 0:
                self.late_segments += 1
            seen_before = min(self.max_end, off + length) - off - filled
            if seen_before > 0:   # bytes captured before: a retransmission
                self.retrans_segments += 1
                self.retrans_bytes += seen_before
        if off + length > self.max_end:
            if off > self.max_end:   # bytes the capture has not seen (yet): reordering or capture drops
                self.holes.append([self.max_end, off])
            self.max_end = off + length
            self.last_new_t = t
        if data and len(data) > len(self.captured.get(off, b"")):
            self.captured[off] = data
        if data:
            self.first_time.setdefault(off, t)

    def _fill(self, start: int, end: int) -> int:
        """Bytes of [start, end) that fill holes (arriving late, not retransmitted); the holes shrink."""
        filled, kept = 0, []
        for h0, h1 in self.holes:
            a, b = max(h0, start), min(h1, end)
            if a >= b:
                kept.append([h0, h1])
                continue
            filled += b - a
            kept += [[h0, a]] if h0 < a else []
            kept += [[b, h1]] if b < h1 else []
        self.holes = kept
        return filled

    @property
    def uncaptured_bytes(self) -> int:
        """Stream bytes below ``max_end`` that no captured segment held: packets the capture
        dropped (tcpdump's kernel buffer overflowed), not packets the network lost."""
        return sum(h1 - h0 for h0, h1 in self.holes)

    # -- captured stream access
    def _starts(self) -> list[int]:
        return sorted(self.captured)

    def window(self, pos: int, n: int, starts: list[int]) -> bytes:
        """Captured bytes [pos, pos + n), stopping at the first gap."""
        out = bytearray()
        i = bisect.bisect_right(starts, pos) - 1
        while len(out) < n:
            best = b""
            for j in range(max(0, i - 4), min(len(starts), i + 2)):   # overlapping segments
                s = starts[j]
                data = self.captured[s]
                if s <= pos < s + len(data) and s + len(data) - pos > len(best):
                    best = data[pos - s:]
            if not best:
                break
            take = best[:n - len(out)]
            out += take
            pos += len(take)
            i = bisect.bisect_right(starts, pos) - 1
        return bytes(out)

    def time_at(self, pos: int, starts: list[int]) -> float | None:
        """Time of the first captured segment holding stream offset ``pos``."""
        i = bisect.bisect_right(starts, pos) - 1
        return self.first_time[starts[i]] if i >= 0 else None


@dataclass
class _Frame:
    pos: int
    time: float | None
    pkt: Any


def walk_frames(d: _Direction) -> tuple[list[_Frame], bool]:
    """KV frames of one direction's captured stream, and whether the walk covered the whole
    stream. Where a frame header was not captured, the walk resumes at the next captured
    position holding a plausible frame header."""
    starts = d._starts()
    frames: list[_Frame] = []
    complete = True
    pos = 0
    while pos < d.max_end:
        head = d.window(pos, HEADER_LEN, starts)
        if len(head) == HEADER_LEN and head[:4] == MAGIC:
            length = HEADER.unpack(head)[4]
            pkt = parse_frame(d.window(pos, min(HEADER_LEN + length, MAX_FIELDS_LEN), starts))
            if pkt is not None:
                frames.append(_Frame(pos, d.time_at(pos, starts), pkt))
            else:   # the header's length still leads to the next frame, but this one went unread
                complete = False
            pos += HEADER_LEN + length
            continue
        complete = False
        nxt = _resync(d, starts, pos + 1)
        if nxt is None:
            break
        pos = nxt
    return frames, complete and pos == d.max_end


def _resync(d: _Direction, starts: list[int], pos: int) -> int | None:
    """The first captured position >= pos holding a plausible frame header (magic, version,
    known type, sane length). KV payload is pseudo-random, so a false match is ~2^-40 per byte."""
    marker = MAGIC + bytes([1])
    for s in starts[max(0, bisect.bisect_right(starts, pos) - 1):]:
        data = d.captured[s]
        i = data.find(marker, max(0, pos - s))
        while i >= 0:
            if _plausible(data[i:i + HEADER_LEN]):
                return s + i
            i = data.find(marker, i + 1)
    return None


def _plausible(data: bytes) -> bool:
    if len(data) < HEADER_LEN or data[:4] != MAGIC:
        return False
    _, version, ftype, _, length = HEADER.unpack(data[:HEADER_LEN])
    return version == 1 and ftype in FrameType._value2member_map_ and length <= MAX_FRAME_BYTES


@dataclass
class _Conn:
    a: tuple[str, int]
    b: tuple[str, int]
    client: tuple[str, int] | None = None
    syn_t: float | None = None
    start_t: float = 0.0
    end_t: float = 0.0
    closed: bool = False
    dirs: dict[tuple[str, int], _Direction] = field(default_factory=dict)   # keyed by the sender

    def direction(self, src: tuple[str, int]) -> _Direction:
        return self.dirs.setdefault(src, _Direction())


class _Seg(NamedTuple):
    """One TCP segment as the analysis needs it."""
    t: float
    src: tuple[str, int]
    dst: tuple[str, int]
    seq: int
    flags: int
    length: int      # TCP payload length from the IP header (exact even when truncated)
    data: bytes      # the captured part of the payload


def _seg_of(pkt, t: float) -> _Seg | None:
    """The TCP segment of a scapy-dissected packet, or None."""
    if IP in pkt:
        ip = pkt[IP]
        if TCP not in ip or ip.frag or ip.flags.MF:
            return None
        tcp = ip[TCP]
        length = ip.len - ip.ihl * 4 - tcp.dataofs * 4
    elif IPv6 in pkt and TCP in pkt[IPv6]:
        ip = pkt[IPv6]
        tcp = ip[TCP]
        length = ip.plen - (len(ip.payload) - len(tcp)) - tcp.dataofs * 4
    else:
        return None
    length = max(0, length)
    return _Seg(t, (ip.src, int(tcp.sport)), (ip.dst, int(tcp.dport)), int(tcp.seq), int(tcp.flags),
                length, bytes(tcp.payload)[:length])


def _segments_scapy(pcap: Path, stats: dict[str, int]) -> Iterator[_Seg]:
    """Reference reader: every packet dissected by scapy (slow: ~0.5 ms a packet)."""
    with PcapReader(str(pcap)) as reader:
        for pkt in reader:
            stats["packets"] += 1
            seg = _seg_of(pkt, float(pkt.time))
            if seg is not None:
                yield seg


_L2_FIXED = {12: 0, 101: 0, 228: 0, 229: 0, 0: 4, 108: 4, 113: 16, 276: 20}   # linktype -> IP offset


def _ip_offset(linktype: int, data: bytes) -> int | None:
    if linktype == 1:   # Ethernet, with optional VLAN tags
        off, ethertype = 14, int.from_bytes(data[12:14], "big")
        while ethertype in (0x8100, 0x88A8) and len(data) >= off + 4:
            ethertype = int.from_bytes(data[off + 2:off + 4], "big")
            off += 4
        return off if ethertype in (0x0800, 0x86DD) else None
    return _L2_FIXED.get(linktype)


def _segments_fast(pcap: Path, stats: dict[str, int]) -> Iterator[_Seg]:
    """Records read by scapy's RawPcapReader (pcap and pcapng), IP/TCP headers unpacked with
    struct: ~100x faster than full dissection; link types it does not know go to scapy."""
    with RawPcapReader(str(pcap)) as reader:
        for data, meta in reader:
            stats["packets"] += 1
            if hasattr(meta, "tshigh"):   # pcapng
                t, linktype = ((meta.tshigh << 32) | meta.tslow) / meta.tsresol, meta.linktype
            else:
                t, linktype = meta.sec + meta.usec / (1e9 if reader.nano else 1e6), reader.linktype
            seg = _parse_fast(t, linktype, data)
            if seg is _UNKNOWN:
                seg = _parse_scapy(t, linktype, data)
            if seg is not None:
                yield seg


_UNKNOWN = _Seg(0.0, ("", 0), ("", 0), 0, 0, 0, b"")


def _parse_fast(t: float, linktype: int, data: bytes) -> _Seg | None:
    off = _ip_offset(linktype, data)
    if off is None:
        return _UNKNOWN if linktype not in _L2_FIXED and linktype != 1 else None
    if len(data) < off + 1:
        return None
    version = data[off] >> 4
    if version == 4:
        if len(data) < off + 20:
            return None
        ihl = (data[off] & 0x0F) * 4
        total, frag, proto = struct.unpack_from(">H2xHxB", data, off + 2)
        if proto != 6 or frag & 0x3FFF:
            return None
        src, dst = socket.inet_ntop(socket.AF_INET, data[off + 12:off + 16]), \
            socket.inet_ntop(socket.AF_INET, data[off + 16:off + 20])
        tcp_off, ip_payload = off + ihl, total - ihl
    elif version == 6:
        if len(data) < off + 40:
            return None
        plen, nxt = struct.unpack_from(">HB", data, off + 4)
        if nxt != 6:
            return _UNKNOWN if nxt in (0, 43, 44, 60) else None   # extension headers: scapy
        src, dst = socket.inet_ntop(socket.AF_INET6, data[off + 8:off + 24]), \
            socket.inet_ntop(socket.AF_INET6, data[off + 24:off + 40])
        tcp_off, ip_payload = off + 40, plen
    else:
        return None
    if len(data) < tcp_off + 14:
        return None
    sport, dport, seq, _ack, dataofs, flags = struct.unpack_from(">HHIIBB", data, tcp_off)
    hdr = (dataofs >> 4) * 4
    length = max(0, ip_payload - hdr)
    start = tcp_off + hdr
    return _Seg(t, (src, sport), (dst, dport), seq, flags, length, bytes(data[start:start + length]))


def _parse_scapy(t: float, linktype: int, data: bytes) -> _Seg | None:
    cls = conf.l2types.get(linktype)
    return _seg_of(cls(data), t) if cls is not None else None


def read_connections(pcap: Path, *, engine: str = "fast") -> tuple[list[_Conn], dict[str, int]]:
    """Every TCP connection of a capture (a new SYN on a closed 4-tuple starts a new one).
    ``engine``: "fast" (struct-unpacked headers) or "scapy" (full dissection, the reference)."""
    conns: list[_Conn] = []
    live: dict[frozenset, _Conn] = {}
    stats = {"packets": 0, "tcp_packets": 0, "truncated_packets": 0}
    reader = _segments_fast if engine == "fast" else _segments_scapy
    for seg in reader(pcap, stats):
        stats["tcp_packets"] += 1
        t, src, flags = seg.t, seg.src, seg.flags
        key = frozenset((src, seg.dst))
        conn = live.get(key)
        if flags & _SYN and not flags & _ACK and conn is not None and (conn.closed or conn.client != src):
            conn = None   # the 4-tuple reused by a new connection
        if conn is None:
            conn = live[key] = _Conn(src, seg.dst, start_t=t)
            conns.append(conn)
        conn.end_t = t
        d = conn.direction(src)
        if flags & _SYN:
            d.base, d.from_syn = (seg.seq + 1) % _SEQ_MOD, True
            if not flags & _ACK:
                conn.client, conn.syn_t = src, t
        if flags & (_FIN | _RST):
            conn.closed = True
        if seg.length > 0:
            if len(seg.data) < seg.length:
                stats["truncated_packets"] += 1
            d.add(t, seg.seq, seg.length, seg.data)
    return conns, stats


class _Datagram(NamedTuple):
    t: float
    src: tuple[str, int]
    dst: tuple[str, int]
    length: int      # UDP payload length from the UDP header (exact even when truncated)
    data: bytes      # the captured part


def read_datagrams(pcap: Path) -> Iterator[_Datagram]:
    """The SRD datagrams (UDP payloads starting with the SRD magic) of a capture, IPv4 and IPv6."""
    with RawPcapReader(str(pcap)) as reader:
        for data, meta in reader:
            if hasattr(meta, "tshigh"):
                t, linktype = ((meta.tshigh << 32) | meta.tslow) / meta.tsresol, meta.linktype
            else:
                t, linktype = meta.sec + meta.usec / (1e9 if reader.nano else 1e6), reader.linktype
            off = _ip_offset(linktype, data)
            if off is None or len(data) < off + 1:
                continue
            version = data[off] >> 4
            if version == 4 and len(data) >= off + 20:
                ihl = (data[off] & 0x0F) * 4
                frag, proto = struct.unpack_from(">HxB", data, off + 6)
                if proto != 17 or frag & 0x3FFF:
                    continue
                fam, sa, da, udp = socket.AF_INET, data[off + 12:off + 16], data[off + 16:off + 20], off + ihl
            elif version == 6 and len(data) >= off + 40 and data[off + 6] == 17:
                fam, sa, da, udp = socket.AF_INET6, data[off + 8:off + 24], data[off + 24:off + 40], off + 40
            else:
                continue
            if len(data) < udp + 8 + 4 or data[udp + 8:udp + 12] != SRD_MAGIC:
                continue
            sport, dport, ulen = struct.unpack_from(">HHH", data, udp)
            yield _Datagram(t, (socket.inet_ntop(fam, sa), sport), (socket.inet_ntop(fam, da), dport),
                            ulen - 8, bytes(data[udp + 8:udp + ulen]))


class _Samples:
    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []


def _srd_transfers(pcap: Path, run: dict[str, float], bin_s: float) -> tuple[list[dict[str, Any]], int]:
    """One entry per SRD session of a capture; and the number of SRD datagrams seen."""
    sessions: dict[int, list[_Datagram]] = {}
    n = 0
    for d in read_datagrams(pcap):
        if len(d.data) < COMMON.size:
            continue
        n += 1
        sessions.setdefault(COMMON.unpack_from(d.data)[4], []).append(d)
    return [_srd_transfer(sid, dgs, run, bin_s) for sid, dgs in sessions.items()], n


def _srd_transfer(sid: int, dgs: list[_Datagram], run: dict[str, float], bin_s: float) -> dict[str, Any]:
    t0, tdf, scale = run["t0_wall"], run["tdf"], run["byte_scale"]
    begin = ack = end = None
    start_t = begin_t = ack_t = first_t = last_t = None
    seen: dict[int, tuple[int, int]] = {}        # psn -> (offset, length)
    per_dest: dict[str, dict[str, int]] = {}
    counts = {t.name: 0 for t in SrdType}
    retx = retx_bytes = reordered = wire = captured = 0
    crc_bad = payload_bad = 0
    max_psn = -1
    client = server = None
    series = _Samples()
    for d in dgs:
        ftype = d.data[5]
        name = SrdType(ftype).name if ftype in SrdType._value2member_map_ else None
        if name is None:
            continue
        counts[name] += 1
        if ftype == SrdType.REQ:
            start_t = d.t if start_t is None else start_t
            client = client or d.src
        elif ftype == SrdType.BEGIN:
            p = parse_datagram(d.data)
            if isinstance(p, PDSRBegin) and begin is None:
                begin, begin_t = p, d.t
            client, server = client or d.src, server or d.dst
        elif ftype == SrdType.END:
            p = parse_datagram(d.data)
            end = p if isinstance(p, PDSREnd) else end
        elif ftype == SrdType.ACK:
            p = parse_datagram(d.data)
            if isinstance(p, PDSRAck) and ack is None:
                ack, ack_t = p, d.t
        elif ftype == SrdType.DATA and len(d.data) >= DATA_HEADER_LEN - 8:
            psn, _ts, _layer, off, crc = DATA_FIXED.unpack_from(d.data, COMMON.size)
            nbytes = max(0, d.length - DATA_HEADER_LEN)
            client, server = client or d.src, server or d.dst
            dest = per_dest.setdefault(f"{d.dst[0]}:{d.dst[1]}", {"bytes": 0, "packets": 0})
            dest["bytes"] += nbytes
            dest["packets"] += 1
            wire += nbytes
            series.samples.append((d.t, nbytes))
            first_t = d.t if first_t is None else first_t
            if psn in seen:
                retx += 1
                retx_bytes += nbytes
                continue
            seen[psn] = (off, nbytes)
            last_t = d.t
            if psn < max_psn:
                reordered += 1
            max_psn = max(max_psn, psn)
            body = d.data[DATA_HEADER_LEN:]
            if begin is not None and len(body) == nbytes:      # the whole payload was captured
                captured += nbytes
                if zlib.crc32(body) != crc:
                    crc_bad += 1
                elif not verify_payload(_text(begin.request_id), off, body):
                    payload_bad += 1
    # byte-for-byte coverage of the message: the union of every packet's [offset, offset + length)
    spans = sorted(seen.values())
    covered, reach = 0, 0
    for off, nbytes in spans:
        lo = max(off, reach)
        if off + nbytes > lo:
            covered += off + nbytes - lo
            reach = off + nbytes
    total = begin.total_bytes if begin is not None else None
    status, reason = _ack_status(ack)
    rid = _text(begin.request_id) if begin is not None else (_text(ack.request_id) or None if ack else None)
    start = start_t if start_t is not None else (begin_t if begin_t is not None else first_t)
    duration = (last_t - begin_t) if last_t is not None and begin_t is not None else None
    session = (ack_t - start) if ack_t is not None and start is not None else None
    rate = covered * 8 / duration if duration else None
    return {
        "transport": "srd",
        "session": f"{sid:016x}",
        "request_id": rid,
        "client": f"{client[0]}:{client[1]}" if client else None,
        "server": f"{server[0]}:{server[1]}" if server else None,
        "status": status,
        "reason": reason,
        "model": _text(begin.model) if begin is not None else None,
        "layers": begin.num_layers if begin is not None else None,
        "tokens": begin.tokens if begin is not None else None,
        "announced_bytes": total,
        "packet_bytes": begin.packet_bytes if begin is not None else None,
        "end_packets": end.packets if end is not None else None,
        "datagrams_seen": counts,
        "packets": len(seen),
        "data_payload_bytes": covered,
        "data_payload_bytes_wire": wire,
        "complete": total is not None and covered == total,
        "retransmissions": retx,
        "retransmitted_bytes": retx_bytes,
        "reordered": reordered,
        "per_destination": per_dest,
        "payload_captured_bytes": captured,
        "payload_verified": (crc_bad == 0 and payload_bad == 0) if captured else None,
        "bad_crc_packets": crc_bad,
        "bad_payload_packets": payload_bad,
        **_timing(start, first_t, begin_t, last_t, ack_t, duration, session, rate, t0, tdf, scale),
        "series": _series(series, t0, tdf, scale, bin_s),
    }


def _timing(start: float | None, first_t: float | None, begin_t: float | None, last_t: float | None,
            ack_t: float | None, duration: float | None, session: float | None, rate: float | None,
            t0: float, tdf: float, scale: float) -> dict[str, Any]:
    """A transfer's times (wall, and model: since ``t0``, divided by ``tdf``) and throughput, for
    either transport: first to last data byte is its duration, connection (or session) start to
    ACK its session."""
    def model(t: float | None) -> float | None:
        return None if t is None else (t - t0) / tdf

    return {
        "syn_t_wall": start,
        "first_byte_t_wall": first_t,
        "begin_t_wall": begin_t,
        "last_byte_t_wall": last_t,
        "ack_t_wall": ack_t,
        "first_byte_t_model": model(first_t),
        "last_byte_t_model": model(last_t),
        "duration_s": duration,
        "duration_model_s": duration / tdf if duration is not None else None,
        "session_s": session,
        "session_model_s": session / tdf if session is not None else None,
        "throughput_bps": rate,
        "throughput_model_bps": rate * tdf / scale if rate is not None else None,
    }


def _ack_status(ack: Any) -> tuple[str, str | None]:
    """A transfer's outcome from its ACK (a TCP or SRD ACK layer, or None): incomplete,
    verified, or rejected with the receiver's code and reason."""
    if ack is None:
        return "incomplete", None
    if ack.verified:
        return "verified", None
    return "rejected", f"{ack.sprintf('%code%')}: {_text(ack.reason)}"


def _text(value: bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _kv_roles(conn: _Conn, kv_ports: set[int]) -> tuple[tuple[str, int], tuple[str, int]] | None:
    """(client, server) of a KV connection, or None if it is not one. The receiver speaks first
    (HELLO); without the connection start, the well-known port decides."""
    for server, client in ((conn.a, conn.b), (conn.b, conn.a)):
        d = conn.dirs.get(server)
        if d is not None and d.from_syn and d.captured.get(0, b"")[:6] == MAGIC + b"\x01" + bytes([FrameType.HELLO]):
            return client, server
    for server, client in ((conn.a, conn.b), (conn.b, conn.a)):
        if server[1] in kv_ports:
            return client, server
    return None


def _series(d: _Direction, t0: float, tdf: float, byte_scale: float, bin_s: float) -> list[dict[str, float]]:
    if not d.samples:
        return []
    first = math.floor((d.samples[0][0] - t0) / bin_s)
    last = math.floor((d.samples[-1][0] - t0) / bin_s)
    bins = [0] * (last - first + 1)
    for t, n in d.samples:
        bins[math.floor((t - t0) / bin_s) - first] += n
    out = []
    for i, n in enumerate(bins):
        start = t0 + (first + i) * bin_s
        out.append({"t_wall": start, "t_model": (start - t0) / tdf, "bytes": n,
                    "bps_wall": n * 8 / bin_s, "bps_model": n * 8 / byte_scale / (bin_s / tdf)})
    return out


def _transfer(conn: _Conn, client: tuple[str, int], server: tuple[str, int], run: dict[str, float],
              bin_s: float) -> dict[str, Any]:
    up, down = conn.direction(client), conn.direction(server)
    t0, tdf, scale = run["t0_wall"], run["tdf"], run["byte_scale"]
    up_frames, up_complete = walk_frames(up)
    down_frames, _ = walk_frames(down)
    begin = next((f for f in up_frames if isinstance(f.pkt, PDKVBegin)), None)
    end = next((f for f in up_frames if isinstance(f.pkt, PDKVEnd)), None)
    ack = next((f for f in down_frames if isinstance(f.pkt, PDKVAck)), None)
    chunks = [f for f in up_frames if isinstance(f.pkt, PDKVChunk)]
    status, reason = _ack_status(ack.pkt if ack else None)
    request_id = _text(begin.pkt.request_id) if begin else (_text(ack.pkt.request_id) or None if ack else None)
    start = conn.syn_t if conn.syn_t is not None else conn.start_t
    ack_t = ack.time if ack else down.last_new_t
    first_t, last_t = up.first_t, up.last_new_t
    data_t = begin.time if begin else first_t
    duration = (last_t - data_t) if last_t is not None and data_t is not None else None
    session = (ack_t - start) if ack_t is not None else None
    rate = (up.max_end - (begin.pos if begin else 0)) * 8 / duration if duration else None
    return {
        "request_id": request_id,
        "client": f"{client[0]}:{client[1]}",
        "server": f"{server[0]}:{server[1]}",
        "status": status,
        "reason": reason,
        "model": _text(begin.pkt.model) if begin else None,
        "layers": begin.pkt.num_layers if begin else None,
        "tokens": begin.pkt.tokens if begin else None,
        "announced_bytes": begin.pkt.total_bytes if begin else None,
        "end_chunks": end.pkt.chunks if end else None,
        "frames_complete": up_complete,
        "frames_seen": {name: sum(1 for f in up_frames + down_frames if f.pkt.sprintf("%type%") == name)
                        for name in ("HELLO", "AUTH", "AUTH_OK", "BEGIN", "CHUNK", "END", "ACK")},
        "chunks": len(chunks) if up_complete else None,
        "chunk_payload_bytes": sum(f.pkt.payload_len for f in chunks) if up_complete else None,
        "tcp_payload_bytes": up.max_end,
        "tcp_payload_bytes_wire": up.wire_bytes,
        "tcp_payload_bytes_reverse": down.wire_bytes,
        "segments": up.segments,
        "retransmissions": up.retrans_segments,
        "retransmitted_bytes": up.retrans_bytes,
        "late_segments": up.late_segments,
        "uncaptured_bytes": up.uncaptured_bytes,
        **_timing(conn.syn_t, first_t, data_t, last_t, ack_t, duration, session, rate, t0, tdf, scale),
        "series": _series(up, t0, tdf, scale, bin_s),
    }


def _persistent(conn: _Conn, client: tuple[str, int]) -> bool:
    """Whether a KV connection is a persistent one (several BEGINs, or a striped BEGIN)."""
    frames, _ = walk_frames(conn.direction(client))
    begins = [f for f in frames if isinstance(f.pkt, PDKVBegin)]
    return len(begins) > 1 or any((b.pkt.getfieldval("stripes") or 1) > 1 for b in begins)


@dataclass
class _StripeSeen:
    """One stripe of one transfer attempt on one captured connection."""
    capture: str
    rail_capture: str
    conn: str
    begin: _Frame
    end: _Frame | None = None
    chunks: list[_Frame] = field(default_factory=list)
    last_t: float | None = None
    bytes: int = 0          # stream bytes from BEGIN to the end of END (frames of this stripe only)


def _stripes(conn: _Conn, client: tuple[str, int], server: tuple[str, int], capture: str,
             rail_capture: str) -> tuple[list[_StripeSeen], dict[str, list[_Frame]]]:
    """The stripes a persistent connection carried (sender side) and its ACKs by request id."""
    up_frames, _ = walk_frames(conn.direction(client))
    down_frames, _ = walk_frames(conn.direction(server))
    name = f"{client[0]}:{client[1]}->{server[0]}:{server[1]}"
    open_: dict[str, _StripeSeen] = {}
    out: list[_StripeSeen] = []
    for fr in up_frames:
        pkt = fr.pkt
        rid = _text(getattr(pkt, "request_id", b"") or b"")
        size = HEADER_LEN + (pkt.length or 0)
        if isinstance(pkt, PDKVBegin):
            st = _StripeSeen(capture, rail_capture, name, fr, last_t=fr.time, bytes=size)
            open_[rid] = st
            out.append(st)
        elif rid in open_:
            st = open_[rid]
            st.bytes += size
            st.last_t = fr.time if fr.time is not None else st.last_t
            if isinstance(pkt, PDKVChunk):
                st.chunks.append(fr)
            elif isinstance(pkt, PDKVEnd):
                st.end = fr
                del open_[rid]
    acks: dict[str, list[_Frame]] = {}
    for fr in down_frames:
        if isinstance(fr.pkt, PDKVAck):
            acks.setdefault(_text(fr.pkt.request_id), []).append(fr)
    return out, acks


def striped_transfers(stripes: list[_StripeSeen], acks: dict[str, list[_Frame]], run: dict[str, float]
                      ) -> list[dict[str, Any]]:
    """Transfers rebuilt from their stripes, joined by (capture group, request id, attempt): a
    capture group is a host link's rails (``decode0-efa-r3.pcap`` is rail 3 of ``decode0-efa``)."""
    t0, tdf, scale = run["t0_wall"], run["tdf"], run["byte_scale"]
    groups: dict[tuple[str, str, int], list[_StripeSeen]] = {}
    for st in stripes:
        b = st.begin.pkt
        key = (st.capture, _text(b.request_id), int(b.getfieldval("attempt") or 0))
        groups.setdefault(key, []).append(st)
    out = []
    for (capture, rid, attempt), group in groups.items():
        b = group[0].begin.pkt
        total, n = int(b.total_bytes), int(b.getfieldval("stripes") or 1)
        begin_t = min(st.begin.time for st in group if st.begin.time is not None)
        ended = [st for st in group if st.end is not None]
        last_t = max((st.last_t for st in group if st.last_t is not None), default=None)
        spans = sorted((int(c.pkt.offset), int(c.pkt.payload_len)) for st in group for c in st.chunks)
        pos, tiled = 0, True
        for off, length in spans:
            if off != pos:
                tiled = False
                break
            pos += length
        tiled = tiled and pos == total
        # the ACK that follows this attempt's BEGIN (an earlier try of the request has its own)
        ack = next((a for a in sorted(acks.get(rid, []), key=lambda a: a.time or 0.0)
                    if a.time is not None and a.time >= begin_t), None)
        status, reason = _ack_status(ack.pkt if ack else None)
        refused = status == "rejected" and not spans
        duration = (last_t - begin_t) if last_t is not None else None
        nbytes = sum(st.bytes for st in group)
        rate = nbytes * 8 / duration if duration else None
        ack_t = ack.time if ack else None
        out.append({
            "request_id": rid, "transport": "tcp", "attempt": attempt, "capture": capture, "stripes": n,
            "stripes_seen": len(group), "stripes_ended": len(ended),
            "connections": sorted({st.conn for st in group}),
            "rails": {st.rail_capture: st.bytes for st in group},
            "status": status, "reason": reason, "refused_at_begin": refused,
            "model": _text(b.model), "layers": b.num_layers, "tokens": b.tokens, "announced_bytes": total,
            "end_chunks": sum(int(st.end.pkt.chunks) for st in ended) if ended else None,
            "chunks": len(spans), "chunk_payload_bytes": sum(length for _, length in spans),
            "chunks_tile_transfer": tiled,
            "tcp_payload_bytes": nbytes, "tcp_payload_bytes_wire": nbytes, "retransmissions": 0,
            "retransmitted_bytes": 0, "late_segments": 0, "uncaptured_bytes": 0,
            **_timing(None, begin_t, begin_t, last_t, ack_t, duration,
                      (ack_t - begin_t) if ack_t is not None else None, rate, t0, tdf, scale),
            "series": [],
        })
    return out


def _match_timeline(tr: dict[str, Any], events: list[dict[str, Any]], tdf: float) -> dict[str, Any] | None:
    """The sender's kv_start/kv_end (and the receiver's kv_recv_*) of this connection: the same
    request id, the start nearest to the connection's start (a retried request has several)."""
    rid = tr["request_id"]
    syn = tr["syn_t_wall"] or tr["first_byte_t_wall"]
    if rid is None or syn is None:
        return None
    mine = [e for e in events if e.get("request_id") == rid]

    def pair(start_ev: str, end_ev: str, ref: float, latest: float) -> tuple[dict, dict] | None:
        starts = [e for e in mine if e["event"] == start_ev and e["t_wall"] <= latest]
        if not starts:
            return None
        s = min(starts, key=lambda e: abs(e["t_wall"] - ref))
        e = next((e for e in mine if e["event"] == end_ev and e["t_wall"] >= s["t_wall"]), None)
        return (s, e) if e else None

    out: dict[str, Any] = {}
    # the sender logs kv_start just before connecting; after waits for the decode node's KV room
    # (refused connections, rejected with KV_FULL) the granted connection starts at kv_granted
    waited = any(e["event"] == "kv_wait_start" for e in mine)
    sent = None if tr["status"] == "rejected" else pair("kv_granted" if waited else "kv_start", "kv_end", syn, syn + 0.05)
    if sent:
        s, e = sent
        dur = e["t_wall"] - s["t_wall"]
        out.update({"kv_start_t_wall": s["t_wall"], "kv_end_t_wall": e["t_wall"], "duration_s": dur,
                    "duration_model_s": dur / tdf, "ok": e.get("ok"), "bytes": s.get("bytes"),
                    "node": s.get("node")})
        if tr["session_s"] is not None and dur > 0:
            out["diff_pct"] = 100.0 * (tr["session_s"] - dur) / dur
    # the receiver logs kv_recv_start when BEGIN arrives (one-way latency after it was captured)
    begin_t = tr["begin_t_wall"] or syn
    recv = pair("kv_recv_start", "kv_recv_end", begin_t, float("inf"))
    if recv:
        s, e = recv
        out.update({"recv_duration_s": e["t_wall"] - s["t_wall"], "verified": e.get("verified"),
                    "receiver": s.get("node")})
    return out or None


def read_run(run_dir: Path) -> dict[str, float]:
    path = run_dir / "run.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(str(path), [("", f"not found (is {run_dir} a run directory?)")]) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(str(path), [("", f"not valid JSON: {exc}")]) from None
    out = {}
    for key in ("tdf", "byte_scale", "t0_wall"):
        value = data.get(key) if isinstance(data, dict) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(str(path), [(key, f"expected a positive number, got {value!r}")])
        out[key] = float(value)
    return out


def analyze_run(run_dir: str | Path, *, bin_s: float = 0.01, kv_ports: Iterable[int] = (DEFAULT_KV_PORT,),
                write: bool = True) -> dict[str, Any]:
    """Analyse every capture of a run; writes RUN_DIR/analysis.json when ``write``."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    pcaps = sorted(p for p in (run_dir / "pcap").glob("*") if p.suffix in (".pcap", ".pcapng"))
    if not pcaps:
        raise ConfigError(str(run_dir / "pcap"), [("", "no .pcap files (was the run captured?)")])
    if bin_s <= 0:
        raise ConfigError("analyze", [("bin_s", f"expected a positive number, got {bin_s}")])
    events = read_run_timeline(run_dir) if (run_dir / "timeline").is_dir() else []
    ports = set(kv_ports)
    captures, transfers = [], []
    stripes: list[_StripeSeen] = []
    acks: dict[str, list[_Frame]] = {}
    groups: dict[str, list[Path]] = {}
    for pcap in pcaps:
        groups.setdefault(re.sub(r"-r\d+(\.pcap(ng)?)$", r"\1", str(pcap.relative_to(run_dir))), []).append(pcap)
    for pcap in pcaps:
        try:
            conns, stats = read_connections(pcap)
        except (OSError, ValueError, EOFError) as exc:
            raise ConfigError(str(pcap), [("", f"cannot read capture: {exc}")]) from None
        n = 0
        rel = str(pcap.relative_to(run_dir))
        group = re.sub(r"-r\d+(\.pcap(ng)?)$", r"\1", rel)    # a host link's rails are one capture group
        for conn in conns:
            roles = _kv_roles(conn, ports)
            if roles is None:
                continue
            n += 1
            if _persistent(conn, roles[0]):
                seen, conn_acks = _stripes(conn, *roles, group, rel)
                stripes += seen
                for rid, frames in conn_acks.items():
                    acks.setdefault(rid, []).extend(frames)
                continue
            tr = {"capture": rel, "transport": "tcp", **_transfer(conn, *roles, run, bin_s)}
            tr["timeline"] = _match_timeline(tr, events, run["tdf"])
            transfers.append(tr)
        if len(groups[group]) > 1:     # a rail: its SRD datagrams are read with its group's below
            captures.append({"file": rel, **stats, "kv_connections": n, "group": group})
            continue
        try:
            srd, n_dgrams = _srd_transfers(pcap, run, bin_s)
        except (OSError, ValueError, EOFError) as exc:
            raise ConfigError(str(pcap), [("", f"cannot read capture: {exc}")]) from None
        for tr in srd:
            tr = {"capture": rel, **tr}
            tr["timeline"] = _match_timeline(tr, events, run["tdf"])
            transfers.append(tr)
        captures.append({"file": rel, **stats, "kv_connections": n,
                         "srd_datagrams": n_dgrams, "srd_sessions": len(srd)})
    # SRD sprays a message over every rail: a host link's rail captures are merged (mergecap,
    # by timestamp) and its sessions rebuilt whole, ``per_destination`` naming each rail
    for group, files in groups.items():
        if len(files) < 2:
            continue
        with tempfile.TemporaryDirectory(prefix="pdtb-analyze-") as tmp:
            merged = Path(tmp) / "rails.pcap"
            proc = subprocess.run(["mergecap", "-F", "pcap", "-w", str(merged), *map(str, files)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise ConfigError(group, [("", f"cannot merge the rail captures: {proc.stderr.strip()[:200]}")])
            try:
                srd, n_dgrams = _srd_transfers(merged, run, bin_s)
            except (OSError, ValueError, EOFError) as exc:
                raise ConfigError(group, [("", f"cannot read the rail captures: {exc}")]) from None
        for tr in srd:
            tr = {"capture": group, **tr}
            tr["timeline"] = _match_timeline(tr, events, run["tdf"])
            transfers.append(tr)
    for tr in striped_transfers(stripes, acks, run):
        tr["timeline"] = _match_timeline(tr, events, run["tdf"])
        transfers.append(tr)
    transfers.sort(key=lambda t: (t["syn_t_wall"] or t["first_byte_t_wall"] or 0.0, t["capture"]))
    diffs = [abs(t["timeline"]["diff_pct"]) for t in transfers if t["timeline"] and "diff_pct" in t["timeline"]]
    result = {
        "run_dir": str(run_dir), **run, "bin_s": bin_s, "captures": captures, "transfers": transfers,
        "summary": {
            "transfers": len(transfers),
            "requests": len({t["request_id"] for t in transfers if t["request_id"]}),
            "verified": sum(t["status"] == "verified" for t in transfers),
            "rejected": sum(t["status"] == "rejected" for t in transfers),
            "incomplete": sum(t["status"] == "incomplete" for t in transfers),
            "tcp_payload_bytes": sum(t.get("tcp_payload_bytes", 0) for t in transfers),
            "srd_data_payload_bytes": sum(t.get("data_payload_bytes", 0) for t in transfers),
            "srd_transfers": sum(t["transport"] == "srd" for t in transfers),
            "retransmissions": sum(t["retransmissions"] for t in transfers),
            "reordered": sum(t.get("reordered", 0) for t in transfers),
            "uncaptured_bytes": sum(t.get("uncaptured_bytes", 0) for t in transfers),
            "timeline_matched": len(diffs),
            "max_abs_diff_pct": max(diffs) if diffs else None,
        },
    }
    if write:
        (run_dir / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def format_table(result: dict[str, Any]) -> str:
    """One line per transfer, model time (the run's tdf and byte scale applied)."""
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    head = (f"{'request':<14} {'capture':<18} {'via':<4} {'status':<10} {'KV bytes':>12} {'wire bytes':>12} {'retx':>5} "
            f"{'xfer ms':>9} {'Gbit/s':>8} {'session ms':>10} {'timeline ms':>11} {'diff %':>7}")
    lines = [f"run {result['run_dir']}: tdf {result['tdf']:g}, byte scale {result['byte_scale']:g} "
             f"(times and rates in model units)", head, "-" * len(head)]
    for t in result["transfers"]:
        tl = t["timeline"] or {}
        lines.append(
            f"{(t['request_id'] or '?'):<14.14} {t['capture']:<18.18} {t['transport']:<4} {t['status']:<10} "
            f"{f(t['announced_bytes'], 'd'):>12} {t.get('tcp_payload_bytes', t.get('data_payload_bytes', 0)):>12d} "
            f"{t['retransmissions']:>5d} "
            f"{f(t['duration_model_s'] and t['duration_model_s'] * 1e3, '.2f'):>9} "
            f"{f(t['throughput_model_bps'] and t['throughput_model_bps'] / 1e9, '.3f'):>8} "
            f"{f(t['session_model_s'] and t['session_model_s'] * 1e3, '.2f'):>10} "
            f"{f(tl.get('duration_model_s') and tl['duration_model_s'] * 1e3, '.2f'):>11} "
            f"{f(tl.get('diff_pct'), '+.1f'):>7}")
    s = result["summary"]
    lines.append(f"{s['transfers']} transfers: {s['verified']} verified, {s['rejected']} rejected, "
                 f"{s['incomplete']} incomplete; {s['retransmissions']} retransmitted segments/packets; "
                 f"max |diff| vs timeline {f(s['max_abs_diff_pct'], '.1f')} %")
    if s["uncaptured_bytes"]:
        lines.append(f"the captures missed {s['uncaptured_bytes']} stream bytes (tcpdump dropped packets): "
                     f"frames in those gaps were skipped, TCP byte counts include them")
    return "\n".join(lines)
