"""SRD-like KV transport: reliable datagrams over UDP, sprayed over every path to the receiver.

EFA's transport (SRD, Shalev et al., IEEE Micro 2020) splits a message into MTU-sized packets,
sprays them over many paths, lets them arrive in any order (the layer above places data by
offset), acknowledges them selectively, resends a lost packet after a timeout of tens of
microseconds, and paces each peer by rate instead of a window that halves on one loss. This
module does that in userspace on asyncio datagram endpoints, with the TCP protocol's guarantees
(nodes/kvproto.py; one implementation of each: HMAC handshake, BEGIN/ACK bodies and checks,
deterministic payload, byte-wise verification, reason codes, KV_FULL refusal):

    sender                                         receiver
    REQ(session)                          ──▶      pending handshake, fresh nonce_s
                                          ◀──      HELLO(nonce_s)
    BEGIN(nonce_c, mac_c, fields) + tag   ──▶      mac_c checked, key derived, on_begin()
                                          ◀──      GRANT(mac_s, rate) + tag | ACK(code) + tag
    DATA(psn, offset, crc) + tag, payload ──▶ ×N   any order, any path; placed by offset
                                          ◀──      SACK(cum, bitmap, tsecr) + tag  (every few packets)
    END(total, packets, checksum) + tag   ──▶      all packets + checksum: on_complete()
                                          ◀──      ACK(verified) + tag

After the handshake every datagram carries an 8-byte tag, HMAC-SHA256 under a per-session key
derived from both nonces, over every byte before it; a DATA tag covers its header, whose CRC-32
covers the payload, and the payload is then checked byte by byte. Datagrams that are
malformed, truncated, untagged, wrongly tagged, for an unknown session or replayed are dropped
and counted (``SrdReceiver.dropped``; ``on_drop`` reports them at most once a second per
reason), never fatal. Layout in docs/wire-format.md.

Timers run in model time scaled by TDF, floored at ``RTO_FLOOR_S``: asyncio sleeps through
epoll, whose timeout has 1 ms granularity, so a timer shorter than ~2 ms wall fires late anyway.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import inspect
import logging
import os
import socket
import struct
import time
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Awaitable, Callable

import numpy as np

from nodes.kvproto import (NONCE_LEN, MAC_LEN, Code, KvAck, KvBegin, KvResult, KvTransferError, _Body,
                           FrameType, ack_body, begin_body, check_ack, check_begin, check_outgoing, client_mac,
                           decode_ack, decode_begin, layer_span, payload_view, server_mac, verify_payload)

SRD_MAGIC = b"PDSR"
SRD_VERSION = 1
COMMON = struct.Struct(">4sBBHQ")        # magic, version, type, flags, session id
COMMON_LEN = COMMON.size                 # 16
TAG_LEN = 8
DATA_FIXED = struct.Struct(">IIHQI")     # psn, tsval (sender µs clock, mod 2^32), layer, offset, crc32
DATA_HEADER_LEN = COMMON_LEN + DATA_FIXED.size + TAG_LEN   # 46; the payload follows the tag
PACKET_FIXED = struct.Struct(">I")       # BEGIN: payload bytes per DATA packet
GRANT_FIXED = struct.Struct(">Q")        # GRANT: the receiver's ingress rate, wire bit/s (0 = unknown)
SACK_FIXED = struct.Struct(">IIH")       # cum (every psn below received), tsecr, bitmap bytes
END_FIXED = struct.Struct(">QII")        # total bytes, packets, checksum (CRC-32 of the packet CRCs in psn order)
IP_UDP_OVERHEAD = 28                     # IPv4 header 20 + UDP header 8
MAX_SACK_BYTES = 1024                    # a SACK's bitmap covers at most 8192 packets past cum
MAX_PACKETS = 1 << 24                    # per message: bounds the receiver's tables
MIN_PACKET_BYTES = 256
FLAG_RETRANSMIT = 0x0001                 # DATA sent again (informational: analyze counts by psn)
RTO_FLOOR_S = 0.002                      # wall: 2 x epoll's 1 ms timeout granularity
DEFAULT_RTO_MODEL_S = 50e-6              # model: SRD retransmits within tens of µs
_SESSION_LABEL = b"pdsr-session"
# congestion control (per transfer and peer): pace at the path rate; back off only on sustained loss
LOSS_BACKOFF = 0.25     # fraction of an interval's packets that timed out: congestion, not random loss
RTT_BACKOFF = 4.0       # smoothed RTT above this multiple of the smallest RTT seen (at least the timer
                        # floor: this host's scheduling is not a queue): queues are building
RATE_DECREASE = 0.75
RATE_FLOOR = 1 / 64     # of the path rate

log = logging.getLogger("pdtb.kv.srd")


class SrdType(IntEnum):
    REQ = 1     # sender -> receiver: open a handshake for this session id
    HELLO = 2   # receiver -> sender: nonce_s
    BEGIN = 3   # sender -> receiver: nonce_c, mac_c, packet bytes, BEGIN fields; tag
    GRANT = 4   # receiver -> sender: mac_s, receiver rate; tag
    DATA = 5    # sender -> receiver
    SACK = 6    # receiver -> sender
    END = 7     # sender -> receiver
    ACK = 8     # receiver -> sender: final verdict (ACK body of nodes/kvproto.py); tag (zeros before a key)


_TYPES = frozenset(int(t) for t in SrdType)


def session_key(secret: bytes, nonce_s: bytes, nonce_c: bytes) -> bytes:
    """Per-session datagram key: both sides know it only after the handshake's proofs."""
    return hmac.digest(secret, _SESSION_LABEL + nonce_s + nonce_c, "sha256")


def tag(key: bytes, data: bytes | memoryview) -> bytes:
    return hmac.digest(key, data, "sha256")[:TAG_LEN]


def payload_bytes_for_mtu(mtu: int) -> int:
    """Payload of one DATA datagram on a link of this MTU (9001 on EFA: 8927 bytes)."""
    return mtu - IP_UDP_OVERHEAD - DATA_HEADER_LEN


def packet_table(total_bytes: int, layers: int, packet_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offset, length, layer) of every DATA packet: each layer split into ``packet_bytes``
    pieces (the last one shorter), so a packet never crosses a layer; both ends compute it."""
    offs, lens, lays = [], [], []
    for layer in range(layers):
        start, length = layer_span(total_bytes, layers, layer)
        o = np.arange(start, start + length, packet_bytes, dtype=np.int64)
        offs.append(o)
        lens.append(np.minimum(packet_bytes, start + length - o))
        lays.append(np.full(len(o), layer, dtype=np.int32))
    return np.concatenate(offs), np.concatenate(lens), np.concatenate(lays)


def checksum_of(crcs: np.ndarray) -> int:
    """CRC-32 over the packets' CRC-32s (4 bytes big-endian each) in psn order."""
    return zlib.crc32(crcs.astype(">u4").tobytes())


def header(ftype: SrdType, session: int, flags: int = 0, *, magic: bytes = SRD_MAGIC,
           version: int = SRD_VERSION) -> bytes:
    return COMMON.pack(magic, version, int(ftype), flags, session)


def tagged(key: bytes, raw: bytes) -> bytes:
    return raw + tag(key, raw)


def data_header(key: bytes, session: int, psn: int, tsval: int, layer: int, offset: int, crc: int,
                flags: int = 0) -> bytes:
    raw = header(SrdType.DATA, session, flags) + DATA_FIXED.pack(psn, tsval & 0xFFFFFFFF, layer, offset, crc)
    return raw + tag(key, raw)


def _now_us() -> int:
    return int(time.monotonic() * 1e6) & 0xFFFFFFFF


def _tune(sock: socket.socket, nbytes: int = 8 << 20) -> None:
    """Large socket buffers: loss should come from the emulated fabric, not this host's sockets.
    SO_*BUFFORCE needs CAP_NET_ADMIN (the testbed runs as root); otherwise capped by rmem_max."""
    for force, plain in ((getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
                         (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force if force is not None else plain, nbytes)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, plain, nbytes)
            except OSError:
                pass


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, handler: Callable[[bytes, tuple, "_Endpoint"], None]):
        self.handler = handler
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _tune(sock)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.handler(data, addr, self)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable etc.: timers resend
        pass

    def send(self, data: bytes, addr: tuple | None = None) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, addr)


# ---------------------------------------------------------------- receiver

@dataclass(eq=False)
class _RxSession:
    sid: int
    addr: tuple
    ep: _Endpoint
    nonce_s: bytes
    t_last: float
    state: str = "pending"            # pending -> active -> done
    key: bytes | None = None
    begin: KvBegin | None = None
    packet_bytes: int = 0
    offs: np.ndarray | None = None
    lens: np.ndarray | None = None
    lays: np.ndarray | None = None
    got: np.ndarray | None = None
    crcs: np.ndarray | None = None
    buf: bytearray | None = None
    nrecv: int = 0
    cum: int = 0
    end: tuple[int, int, int] | None = None
    since_ack: int = 0
    ack_handle: asyncio.TimerHandle | None = None
    tsecr: int = 0
    reply: bytes = b""                # the last answer to BEGIN / the final ACK, re-sent on duplicates
    verified_bytes: int = 0


class SrdReceiver:
    """Receives KV transfers over UDP on one port of each given address.

    Same callbacks as ``KvReceiver``: ``on_begin`` may raise KvTransferError (e.g. KV_FULL) to
    refuse, ``on_complete(begin, verified)`` runs once per transfer that got past BEGIN.
    ``on_drop(reason, count, peer)``: datagrams dropped, reported at most once a second per
    reason (``count`` is the total so far). ``rate_bps``: this node's ingress wire rate, told to
    senders in GRANT so they pace at the slower end of the path.
    """

    def __init__(self, secret: bytes, *, max_transfer_bytes: int,
                 on_begin: Callable[[KvBegin], None] | None = None,
                 on_complete: Callable[[KvBegin, bool], Awaitable[None] | None] | None = None,
                 on_drop: Callable[[str, int, str], None] | None = None,
                 logger: logging.Logger | None = None, frame_timeout_s: float = 30.0, rate_bps: float = 0.0,
                 ack_every: int = 4, ack_delay_s: float = RTO_FLOOR_S / 4, max_pending: int = 1024,
                 linger_s: float = 10.0):
        if not secret:
            raise ValueError("the KV secret must not be empty")
        self.secret = secret
        self.max_transfer_bytes = max_transfer_bytes
        self.on_begin, self.on_complete, self.on_drop = on_begin, on_complete, on_drop
        self.log = logger or log
        self.frame_timeout_s = frame_timeout_s
        self.rate_bps = rate_bps
        self.ack_every, self.ack_delay_s = ack_every, ack_delay_s
        self.max_pending, self.linger_s = max_pending, linger_s
        self.sessions: dict[int, _RxSession] = {}
        self.dropped: collections.Counter[str] = collections.Counter()
        self._drop_reported: dict[str, float] = {}
        self.completed = 0
        self.rejected = 0
        self.duplicates = 0
        self._eps: list[_Endpoint] = []
        self._port: int | None = None
        self._sweeper: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self, hosts: str | list[str], port: int) -> None:
        """Listen on ``port`` of every address in ``hosts`` (one per rail); port 0 picks one
        free port on the first address and uses it on the others."""
        loop = asyncio.get_running_loop()
        for host in [hosts] if isinstance(hosts, str) else hosts:
            _, ep = await loop.create_datagram_endpoint(lambda: _Endpoint(self._datagram), local_addr=(host, port))
            self._eps.append(ep)
            port = port or ep.transport.get_extra_info("sockname")[1]
        self._port = port
        self._sweeper = loop.create_task(self._sweep())

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("receiver not started")
        return self._port

    async def close(self) -> None:
        """Stop receiving; transfers in progress are reported failed."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for s in list(self.sessions.values()):
            if s.state == "active":
                s.state = "done"
                await self._complete(s.begin, False)
        self.sessions.clear()
        for ep in self._eps:
            if ep.transport is not None:
                ep.transport.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- bookkeeping
    def _drop(self, reason: str, addr: tuple | None) -> None:
        self.dropped[reason] += 1
        now = time.monotonic()
        if self.on_drop is not None and now - self._drop_reported.get(reason, -1e9) >= 1.0:
            self._drop_reported[reason] = now
            peer = f"{addr[0]}:{addr[1]}" if addr else "?"
            try:
                self.on_drop(reason, self.dropped[reason], peer)
            except Exception:
                self.log.exception("kv/srd: on_drop failed")

    async def _complete(self, begin: KvBegin | None, ok: bool) -> None:
        if begin is not None and self.on_complete is not None:
            res = self.on_complete(begin, ok)
            if inspect.isawaitable(res):
                await res

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sweep(self) -> None:
        """Expire idle handshakes, time out stalled transfers, forget finished sessions."""
        period = max(0.05, min(1.0, self.frame_timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for s in list(self.sessions.values()):
                idle = now - s.t_last
                if s.state == "pending" and idle > self.frame_timeout_s:
                    del self.sessions[s.sid]
                elif s.state == "active" and idle > self.frame_timeout_s:
                    self._reject(s, KvTransferError(f"no datagram for {self.frame_timeout_s:g} s "
                                                    f"({s.nrecv} of {len(s.got)} packets)", Code.TIMEOUT))
                elif s.state == "done" and idle > self.linger_s:
                    del self.sessions[s.sid]

    # -- datagrams
    def _datagram(self, data: bytes, addr: tuple, ep: _Endpoint) -> None:
        try:
            self._handle(data, addr, ep)
        except Exception:  # a bug must not stop the endpoint; the datagram is lost, timers resend
            self.log.exception("kv/srd: error handling a datagram from %s", addr)
            self._drop("error", addr)

    def _handle(self, data: bytes, addr: tuple, ep: _Endpoint) -> None:
        if len(data) < COMMON_LEN:
            return self._drop("truncated", addr)
        magic, version, ftype, flags, sid = COMMON.unpack_from(data)
        if magic != SRD_MAGIC:
            return self._drop("bad_magic", addr)
        if version != SRD_VERSION:
            return self._drop("bad_version", addr)
        if ftype not in _TYPES:
            return self._drop("bad_type", addr)
        s = self.sessions.get(sid)
        if ftype == SrdType.REQ:
            if len(data) != COMMON_LEN:
                return self._drop("malformed", addr)
            if s is None:
                if sum(1 for x in self.sessions.values() if x.state == "pending") >= self.max_pending:
                    return self._drop("handshakes_full", addr)
                s = self.sessions[sid] = _RxSession(sid, addr, ep, os.urandom(NONCE_LEN), time.monotonic())
            elif s.state != "pending":
                return self._drop("replayed", addr)
            ep.send(header(SrdType.HELLO, sid) + s.nonce_s, addr)
            return None
        if ftype not in (SrdType.BEGIN, SrdType.DATA, SrdType.END):
            return self._drop("bad_direction", addr)
        if s is None:
            return self._drop("unknown_session", addr)
        if ftype == SrdType.BEGIN:
            return self._begin(s, data, addr, ep)
        if s.key is None:
            return self._drop("unauthenticated", addr)
        if ftype == SrdType.DATA:
            if len(data) < DATA_HEADER_LEN:
                return self._drop("truncated", addr)
            hlen = DATA_HEADER_LEN - TAG_LEN
            if not hmac.compare_digest(data[hlen:DATA_HEADER_LEN], tag(s.key, memoryview(data)[:hlen])):
                return self._drop("unauthenticated", addr)
        else:
            if len(data) != COMMON_LEN + END_FIXED.size + TAG_LEN:
                return self._drop("malformed", addr)
            if not hmac.compare_digest(data[-TAG_LEN:], tag(s.key, memoryview(data)[:-TAG_LEN])):
                return self._drop("unauthenticated", addr)
        s.t_last = time.monotonic()
        if s.state == "done":       # retransmitted or replayed after the verdict: answer it again
            self.duplicates += 1
            self._drop("replayed", addr)
            ep.send(s.reply, addr)
            return None
        s.addr, s.ep = addr, ep
        if ftype == SrdType.END:
            s.end = END_FIXED.unpack_from(data, COMMON_LEN)
            if s.nrecv == len(s.got):
                self._finish(s)
            else:
                self._send_sack(s)
            return None
        self._data(s, data)
        return None

    def _begin(self, s: _RxSession, data: bytes, addr: tuple, ep: _Endpoint) -> None:
        if s.state != "pending":     # a retransmitted BEGIN: same answer (if it is the same datagram's sender)
            if s.key is not None and len(data) > TAG_LEN and hmac.compare_digest(
                    data[-TAG_LEN:], tag(s.key, memoryview(data)[:-TAG_LEN])):
                ep.send(s.reply, addr)
                self.duplicates += 1
                return None
            return self._drop("replayed", addr)
        fixed = COMMON_LEN + NONCE_LEN + MAC_LEN + PACKET_FIXED.size
        if len(data) < fixed + TAG_LEN:
            return self._drop("truncated", addr)
        nonce_c = data[COMMON_LEN:COMMON_LEN + NONCE_LEN]
        mac_c = data[COMMON_LEN + NONCE_LEN:COMMON_LEN + NONCE_LEN + MAC_LEN]
        if not hmac.compare_digest(mac_c, client_mac(self.secret, s.nonce_s, nonce_c)):
            self._drop("unauthenticated", addr)
            self.rejected += 1
            self.log.warning("kv/srd: rejected session %016x from %s:%s: sender failed authentication "
                             "(wrong HMAC) [AUTH_FAILED]", s.sid, addr[0], addr[1])
            del self.sessions[s.sid]
            ack = KvAck("", False, Code.AUTH_FAILED, 0, "sender failed authentication (wrong HMAC)")
            ep.send(header(SrdType.ACK, s.sid) + ack_body(ack) + bytes(TAG_LEN), addr)
            return None
        key = session_key(self.secret, s.nonce_s, nonce_c)
        if not hmac.compare_digest(data[-TAG_LEN:], tag(key, memoryview(data)[:-TAG_LEN])):
            return self._drop("unauthenticated", addr)
        s.key, s.addr, s.ep, s.t_last = key, addr, ep, time.monotonic()
        s.state = "active"
        try:
            (pbytes,) = PACKET_FIXED.unpack_from(data, fixed - PACKET_FIXED.size)
            begin = decode_begin(memoryview(data)[fixed:-TAG_LEN])
            check_begin(begin, self.max_transfer_bytes)
            if not MIN_PACKET_BYTES <= pbytes <= 65507 - DATA_HEADER_LEN:
                raise KvTransferError(f"packet size {pbytes} outside {MIN_PACKET_BYTES}..{65507 - DATA_HEADER_LEN}",
                                      Code.MALFORMED)
            npk = sum(-(-layer_span(begin.total_bytes, begin.layers, l)[1] // pbytes) for l in range(begin.layers)) \
                if begin.layers <= 65535 else MAX_PACKETS + 1
            if npk > MAX_PACKETS:
                raise KvTransferError(f"{npk} packets > {MAX_PACKETS}", Code.OVERSIZED)
            if self.on_begin is not None:
                self.on_begin(begin)
        except KvTransferError as exc:
            return self._reject(s, exc)
        s.begin, s.packet_bytes = begin, pbytes
        s.offs, s.lens, s.lays = packet_table(begin.total_bytes, begin.layers, pbytes)
        s.got = np.zeros(len(s.offs), dtype=bool)
        s.crcs = np.zeros(len(s.offs), dtype=np.uint32)
        s.buf = bytearray(begin.total_bytes)     # placement by offset, in whatever order packets come
        s.reply = tagged(key, header(SrdType.GRANT, s.sid) + server_mac(self.secret, nonce_c, s.nonce_s)
                         + GRANT_FIXED.pack(int(self.rate_bps)))
        ep.send(s.reply, addr)
        return None

    def _data(self, s: _RxSession, data: bytes) -> None:
        psn, tsval, layer, off, crc = DATA_FIXED.unpack_from(data, COMMON_LEN)
        s.tsecr = tsval
        n = len(data) - DATA_HEADER_LEN
        if psn >= len(s.got) or s.offs[psn] != off or s.lens[psn] != n or s.lays[psn] != layer:
            # authenticated, so the sender itself is broken: the transfer cannot be trusted
            return self._reject(s, KvTransferError(
                f"DATA psn {psn} at [{off}, {off + n}) layer {layer} does not match the packet table", Code.OUT_OF_ORDER))
        if s.got[psn]:
            self.duplicates += 1
            self._drop("duplicate", s.addr)
        else:
            body = memoryview(data)[DATA_HEADER_LEN:]
            if zlib.crc32(body) != crc:       # damaged in flight: drop, the sender's timer resends it
                return self._drop("bad_crc", s.addr)
            if not verify_payload(s.begin.request_id, off, body):
                return self._reject(s, KvTransferError(f"DATA at offset {off}: payload differs from the request's "
                                                       f"KV bytes", Code.BAD_PAYLOAD))
            s.buf[off:off + n] = body
            s.got[psn] = True
            s.crcs[psn] = crc
            s.nrecv += 1
            s.verified_bytes += n
            while s.cum < len(s.got) and s.got[s.cum]:
                s.cum += 1
        s.since_ack += 1
        if s.nrecv == len(s.got) and s.end is not None:
            return self._finish(s)
        if s.since_ack >= self.ack_every or s.nrecv == len(s.got):
            self._send_sack(s)
        elif s.ack_handle is None:
            s.ack_handle = asyncio.get_running_loop().call_later(self.ack_delay_s, self._send_sack, s)
        return None

    def _send_sack(self, s: _RxSession) -> None:
        if s.ack_handle is not None:
            s.ack_handle.cancel()
            s.ack_handle = None
        if s.state != "active":
            return
        s.since_ack = 0
        window = s.got[s.cum:s.cum + 8 * MAX_SACK_BYTES]
        bitmap = np.packbits(window).tobytes() if len(window) else b""
        s.ep.send(tagged(s.key, header(SrdType.SACK, s.sid) + SACK_FIXED.pack(s.cum, s.tsecr, len(bitmap)) + bitmap),
                  s.addr)

    def _finish(self, s: _RxSession) -> None:
        begin = s.begin
        total, packets, checksum = s.end
        if total != begin.total_bytes or packets != len(s.got) or checksum != checksum_of(s.crcs):
            return self._reject(s, KvTransferError(
                f"END checksum {checksum:08x}/{packets} packets/{total} B != {checksum_of(s.crcs):08x}/"
                f"{len(s.got)}/{begin.total_bytes}", Code.BAD_CHECKSUM))
        s.state = "done"
        if s.ack_handle is not None:
            s.ack_handle.cancel()
        s.buf = None
        self.completed += 1
        s.reply = tagged(s.key, header(SrdType.ACK, s.sid)
                         + ack_body(KvAck(begin.request_id, True, Code.OK, begin.total_bytes, "verified")))

        async def report() -> None:
            await self._complete(begin, True)
            s.ep.send(s.reply, s.addr)
        self._spawn(report())

    def _reject(self, s: _RxSession, exc: KvTransferError) -> None:
        begin = s.begin
        self.rejected += 1
        self.log.warning("kv/srd: rejected session %016x from %s:%s%s: %s [%s]", s.sid, s.addr[0], s.addr[1],
                         f" (request {begin.request_id})" if begin else "", exc.reason, exc.code.name)
        s.state = "done"
        if s.ack_handle is not None:
            s.ack_handle.cancel()
        s.buf = None
        rid = begin.request_id if begin else ""
        s.reply = tagged(s.key, header(SrdType.ACK, s.sid)
                         + ack_body(KvAck(rid, False, exc.code, s.verified_bytes if begin else 0, exc.reason)))
        s.ep.send(s.reply, s.addr)
        if begin is not None:
            self._spawn(self._complete(begin, False))


# ---------------------------------------------------------------- sender

@dataclass
class SrdStats:
    """What one sender saw: for benchmarks, tests and the timeline."""
    packets: int = 0
    sent: int = 0
    retransmitted: int = 0
    sacks: int = 0
    dropped: collections.Counter = field(default_factory=collections.Counter)
    per_dest_bytes: list[int] = field(default_factory=list)
    rate_bps: float = 0.0
    min_rtt_s: float = 0.0
    srtt_s: float = 0.0
    backoffs: int = 0


class _Sender:
    def __init__(self, begin: KvBegin, secret: bytes, dests: list[tuple[str, int]], packet_bytes: int,
                 rate_bps: float, rto_s: float, stats: SrdStats):
        self.begin, self.secret, self.dests = begin, secret, dests
        self.session = int.from_bytes(os.urandom(8), "big")
        self.packet_bytes = packet_bytes
        self.eps: list[_Endpoint] = []
        self.wake = asyncio.Event()
        self.phase = "handshake"
        self.nonce_s: bytes | None = None
        self.nonce_c = os.urandom(NONCE_LEN)
        self.key: bytes | None = None
        self.granted = False
        self.peer_rate_bps = 0.0
        self.ack: KvAck | None = None
        self.stats = stats
        self.offs, self.lens, self.lays = packet_table(begin.total_bytes, begin.layers, packet_bytes)
        n = len(self.offs)
        self.acked = np.zeros(n, dtype=bool)
        self.sent_t = np.zeros(n, dtype=np.float64)     # 0: never sent
        self.crcs = np.zeros(n, dtype=np.uint32)
        self.crc_known = np.zeros(n, dtype=bool)
        self.nacked = 0
        self.path = np.zeros(n, dtype=np.int16)          # the destination (rail) a packet last went by
        # per path, the send time of the latest-sent packet acknowledged so far: a packet is lost
        # when a later one on its own path was acknowledged first (paths reorder among themselves)
        self.acked_sent_t = np.zeros(max(1, len(dests)), dtype=np.float64)
        self.rate_max_bps = rate_bps
        self.rate_bps = rate_bps
        self.rto_model_s = rto_s
        self.srtt = 0.0
        self.rttvar = 0.0
        self.min_rtt = 0.0
        stats.packets = n
        stats.per_dest_bytes = [0] * len(dests)

    # -- receive path
    def datagram(self, data: bytes, addr: tuple, ep: _Endpoint) -> None:
        try:
            self._handle(data)
        except Exception:
            log.exception("kv/srd: sender failed to handle a datagram")
            self.stats.dropped["error"] += 1

    def _handle(self, data: bytes) -> None:
        d = self.stats.dropped
        if len(data) < COMMON_LEN:
            d["truncated"] += 1
            return
        magic, version, ftype, _flags, sid = COMMON.unpack_from(data)
        if magic != SRD_MAGIC or version != SRD_VERSION or sid != self.session:
            d["foreign"] += 1
            return
        if ftype == SrdType.HELLO:
            if self.nonce_s is None and len(data) == COMMON_LEN + NONCE_LEN:
                self.nonce_s = data[COMMON_LEN:]
                self.key = session_key(self.secret, self.nonce_s, self.nonce_c)
                self.wake.set()
            else:
                d["replayed" if self.nonce_s is not None else "malformed"] += 1
            return
        if ftype == SrdType.ACK and self.key is not None and not self.granted and data.endswith(bytes(TAG_LEN)):
            # an untagged verdict only before the grant: the receiver refused our proof (no key there)
            try:
                ack = decode_ack(memoryview(data)[COMMON_LEN:-TAG_LEN])
            except KvTransferError:
                d["malformed"] += 1
                return
            if ack.code == Code.AUTH_FAILED:
                self.ack = ack
                self.wake.set()
            else:
                d["unauthenticated"] += 1
            return
        if self.key is None or len(data) < COMMON_LEN + TAG_LEN or not hmac.compare_digest(
                data[-TAG_LEN:], tag(self.key, memoryview(data)[:-TAG_LEN])):
            d["unauthenticated"] += 1
            return
        body = memoryview(data)[COMMON_LEN:-TAG_LEN]
        if ftype == SrdType.GRANT:
            if len(body) != MAC_LEN + GRANT_FIXED.size:
                d["malformed"] += 1
                return
            if not hmac.compare_digest(bytes(body[:MAC_LEN]), server_mac(self.secret, self.nonce_c, self.nonce_s)):
                self.ack = KvAck(self.begin.request_id, False, Code.AUTH_FAILED, 0, "receiver failed authentication")
            elif not self.granted:
                self.granted = True
                (self.peer_rate_bps,) = GRANT_FIXED.unpack_from(body, MAC_LEN)
            self.wake.set()
        elif ftype == SrdType.SACK:
            if len(body) < SACK_FIXED.size:
                d["malformed"] += 1
                return
            cum, tsecr, nb = SACK_FIXED.unpack_from(body)
            if len(body) != SACK_FIXED.size + nb or cum > len(self.acked):
                d["malformed"] += 1
                return
            self.stats.sacks += 1
            before = self.acked.copy()
            if not self.acked[:cum].all():
                self.acked[:cum] = True
            if nb:
                bits = np.unpackbits(np.frombuffer(body, np.uint8, nb, SACK_FIXED.size)).astype(bool)
                bits = bits[:len(self.acked) - cum]
                self.acked[cum:cum + len(bits)] |= bits
            fresh = np.flatnonzero(self.acked & ~before)
            if len(fresh):   # the latest send time now acknowledged on each path: loss detection by SACK
                np.maximum.at(self.acked_sent_t, self.path[fresh], self.sent_t[fresh])
            self.nacked = int(np.count_nonzero(self.acked))
            self._rtt(((_now_us() - tsecr) & 0xFFFFFFFF) / 1e6)
            self.wake.set()
        elif ftype == SrdType.ACK:
            try:
                self.ack = decode_ack(body)
            except KvTransferError:
                d["malformed"] += 1
                return
            self.wake.set()
        else:
            d["bad_direction"] += 1

    def _rtt(self, sample: float) -> None:
        if sample > 60.0:        # a wrapped or bogus echo
            return
        if self.srtt == 0.0:
            self.srtt, self.rttvar, self.min_rtt = sample, sample / 2, sample
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - sample)
            self.srtt = 0.875 * self.srtt + 0.125 * sample
            self.min_rtt = min(self.min_rtt, sample)

    def rto(self) -> float:
        """Model-time timer x TDF, never below the host's timer floor, and above the measured
        RTT's spread (the emulated queue and this host's scheduling are part of the path)."""
        return max(RTO_FLOOR_S, self.rto_model_s, self.srtt + 4 * self.rttvar)

    # -- send path
    def send_ctl(self, raw: bytes) -> None:
        ep = self.eps[0]
        ep.send(raw)

    def send_packet(self, psn: int, now: float, retransmit: bool) -> int:
        off, n, layer = int(self.offs[psn]), int(self.lens[psn]), int(self.lays[psn])
        data = payload_view(self.begin.request_id, off, n)
        if not self.crc_known[psn]:
            self.crcs[psn] = zlib.crc32(data)
            self.crc_known[psn] = True
        hdr = data_header(self.key, self.session, psn, int(now * 1e6), layer, off, int(self.crcs[psn]),
                          FLAG_RETRANSMIT if retransmit else 0)
        # spray: round-robin over every path (by bytes, so unequal packets still split evenly);
        # a retransmission goes wherever the turn is, usually another path than the lost one
        per = self.stats.per_dest_bytes
        i = per.index(min(per)) if len(per) > 1 else 0
        self.eps[i].send(hdr + data)
        self.stats.per_dest_bytes[i] += n
        self.sent_t[psn] = now
        self.path[psn] = i
        self.stats.sent += 1
        if retransmit:
            self.stats.retransmitted += 1
        return n + DATA_HEADER_LEN + IP_UDP_OVERHEAD


async def send_kv_srd(dests: list[tuple[str, int]], secret: bytes, begin: KvBegin, *, mtu: int = 1500,
                      rate_bps: float = 0.0, tdf: float = 1.0, rto_model_s: float = DEFAULT_RTO_MODEL_S,
                      layer_ready: Callable[[int], Awaitable[None]] | None = None,
                      local_addrs: list[str | None] | None = None, timeout_s: float = 60.0,
                      stats: SrdStats | None = None) -> KvResult:
    """Push one request's KV cache over every destination (one per receiver rail); returns once
    the receiver verified every byte. ``rate_bps``: the wire rate of one of this node's rails
    (0: no pacing, only the in-flight cap); the sender paces each rail at the smaller of it and
    the receiver's announced rate per rail. ``rto_model_s`` is model time (x ``tdf``)."""
    if not dests:
        raise ValueError("send_kv_srd needs at least one destination")
    check_outgoing(begin)
    pbytes = payload_bytes_for_mtu(mtu)
    if pbytes < MIN_PACKET_BYTES:
        raise ValueError(f"MTU {mtu} leaves {pbytes} payload bytes per packet (< {MIN_PACKET_BYTES})")
    stats = stats if stats is not None else SrdStats()
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    tx = _Sender(begin, secret, dests, pbytes, rate_bps, rto_model_s * tdf, stats)
    layer_task: asyncio.Task | None = None
    try:
        for i, dest in enumerate(dests):
            local = local_addrs[i] if local_addrs and i < len(local_addrs) else None
            try:
                _, ep = await loop.create_datagram_endpoint(
                    lambda: _Endpoint(tx.datagram), remote_addr=dest,
                    local_addr=(local, 0) if local else None)
            except OSError as exc:
                raise KvTransferError(f"cannot reach {dest[0]}:{dest[1]}: {exc}", Code.REFUSED) from None
            tx.eps.append(ep)
        async with asyncio.timeout(timeout_s):
            await _handshake(tx)
            if tx.ack is not None:
                raise KvTransferError(f"rejected by receiver: {tx.ack.reason}", tx.ack.code)
            tx.phase = "data"
            if tx.peer_rate_bps and tx.rate_max_bps:
                tx.rate_max_bps = min(tx.rate_max_bps, tx.peer_rate_bps)
            elif tx.peer_rate_bps:
                tx.rate_max_bps = tx.peer_rate_bps
            tx.rate_max_bps *= len(dests)           # one rail's rate per path
            tx.rate_bps = tx.rate_max_bps
            ready = [0]
            layer_end = np.searchsorted(tx.lays, np.arange(begin.layers), side="right")

            async def release_layers() -> None:
                for layer in range(begin.layers):
                    if layer_ready is not None:
                        await layer_ready(layer)
                    ready[0] = int(layer_end[layer])
                    tx.wake.set()
            layer_task = loop.create_task(release_layers())
            await _pump(tx, ready)
            if tx.ack is None:
                await _finish(tx)
            check_ack(tx.ack, begin)
            return KvResult(bytes_sent=begin.total_bytes, duration_s=time.perf_counter() - started,
                            transport="srd", packets=stats.packets, retransmitted=stats.retransmitted)
    except TimeoutError:
        what = ("no answer to the handshake" if tx.phase == "handshake" else
                f"{tx.nacked} of {len(tx.acked)} packets acknowledged, {stats.retransmitted} resent")
        raise KvTransferError(f"transfer not acknowledged within {timeout_s:g} s ({what})", Code.TIMEOUT) from None
    finally:
        stats.rate_bps, stats.srtt_s, stats.min_rtt_s = tx.rate_bps, tx.srtt, tx.min_rtt
        if layer_task is not None:
            layer_task.cancel()
            await asyncio.gather(layer_task, return_exceptions=True)
        for ep in tx.eps:
            if ep.transport is not None:
                ep.transport.close()


async def _wait(tx: _Sender, timeout: float) -> None:
    """Until a datagram or event woke the sender (possibly already) or ``timeout`` passed."""
    if not tx.wake.is_set():
        try:
            await asyncio.wait_for(tx.wake.wait(), max(0.0, timeout))
        except asyncio.TimeoutError:
            pass
    tx.wake.clear()


async def _handshake(tx: _Sender) -> None:
    """REQ until HELLO, then BEGIN until GRANT or a verdict; control datagrams are resent on the
    same timer as data, doubling up to 64 x."""
    loop = asyncio.get_running_loop()
    backoff = 1.0
    while tx.nonce_s is None:
        sent = loop.time()
        tx.send_ctl(header(SrdType.REQ, tx.session))
        await _wait(tx, tx.rto() * backoff)
        if tx.nonce_s is not None and backoff == 1.0:   # the first RTT sample (unambiguous: sent once)
            tx._rtt(loop.time() - sent)
        backoff = min(64.0, backoff * 2)
    mac = client_mac(tx.secret, tx.nonce_s, tx.nonce_c)
    raw = tagged(tx.key, header(SrdType.BEGIN, tx.session) + tx.nonce_c + mac + PACKET_FIXED.pack(tx.packet_bytes)
                 + begin_body(tx.begin))
    backoff = 1.0
    while not tx.granted and tx.ack is None:
        tx.send_ctl(raw)
        await _wait(tx, tx.rto() * backoff)
        backoff = min(64.0, backoff * 2)


async def _pump(tx: _Sender, ready: list[int]) -> None:
    """Send every packet until all are acknowledged: paced by a token bucket at the current rate,
    lost packets first (timer expired, or overtaken by a later burst's SACK), at most ``cap`` packets in flight. Rate control per interval (about
    eight timer periods): down by RATE_DECREASE when more than LOSS_BACKOFF of the interval's
    packets timed out or the smoothed RTT grew past RTT_BACKOFF x the smallest, else back up by
    1/8 of the path rate. A few percent of random loss changes nothing: no slow start, no halving."""
    loop = asyncio.get_running_loop()
    n = len(tx.acked)
    next_new = 0
    budget = 0.0
    last = loop.time()
    interval_start, interval_sent, interval_lost = last, 0, 0
    pkt_wire = tx.packet_bytes + DATA_HEADER_LEN + IP_UDP_OVERHEAD
    while tx.nacked < n and tx.ack is None:
        now = loop.time()
        rto = tx.rto()
        paced = tx.rate_bps > 0
        if paced:
            # a burst may make up for a late wake-up (epoll's 1 ms steps, a busy host) of up to
            # two timer floors, so the rate holds; the emulated queue absorbs it
            budget = min(budget + (now - last) * tx.rate_bps / 8, max(8 * pkt_wire, tx.rate_bps / 8 * 2 * RTO_FLOOR_S))
        last = now
        outstanding = (tx.sent_t > 0) & ~tx.acked
        # lost: its timer expired, or a packet sent on the same path in a later burst was
        # acknowledged before it (SACK-based detection, about one RTT, not bound to the host's
        # timer floor; packets of one burst share a send time, and paths (rails) have queues of
        # their own, so reordering within a burst or across paths is not loss)
        # (once every packet has been sent, a path's last packets have no later ones on it to be
        # overtaken by: then a later acknowledgement on any path counts, so a tail loss does not
        # wait for the timer; spurious resends of a tail cost an idle link little)
        overtaken = tx.sent_t < tx.acked_sent_t[tx.path]
        if next_new >= n:
            overtaken |= tx.sent_t < tx.acked_sent_t.max()
        expired = np.flatnonzero(outstanding & ((now - tx.sent_t > rto) | overtaken))
        inflight = int(np.count_nonzero(outstanding)) - len(expired)
        rtt = max(tx.srtt, RTO_FLOOR_S)
        cap = max(64, int(4 * tx.rate_bps / 8 * rtt / pkt_wire)) if paced else 256
        sent_any = False
        for psn in expired:
            if paced and budget < pkt_wire:
                break
            budget -= tx.send_packet(int(psn), now, True)
            interval_lost += 1
            interval_sent += 1
            sent_any = True
        while next_new < ready[0] and inflight < cap and (not paced or budget >= pkt_wire):
            if not tx.acked[next_new]:
                budget -= tx.send_packet(next_new, now, False)
                inflight += 1
                interval_sent += 1
                sent_any = True
            next_new += 1
        if paced and now - interval_start > 8 * rto and interval_sent:
            if interval_lost > LOSS_BACKOFF * interval_sent or (tx.min_rtt and tx.srtt > RTT_BACKOFF * max(
                    tx.min_rtt, RTO_FLOOR_S)):
                tx.rate_bps = max(tx.rate_max_bps * RATE_FLOOR, tx.rate_bps * RATE_DECREASE)
                tx.stats.backoffs += 1
            else:
                tx.rate_bps = min(tx.rate_max_bps, tx.rate_bps + tx.rate_max_bps / 8)
            interval_start, interval_sent, interval_lost = now, 0, 0
        if tx.nacked >= n:
            break
        # sleep until the next thing to do: budget for a packet, the oldest timer, or a datagram
        waits = []
        if paced and budget < pkt_wire and (next_new < ready[0] or len(expired)):
            waits.append((pkt_wire - budget) * 8 / tx.rate_bps)
        if np.any(outstanding):
            oldest = float(tx.sent_t[outstanding & ~tx.acked].min()) if np.any(outstanding & ~tx.acked) else now
            waits.append(oldest + rto - now)
        if not waits:
            waits.append(rto)
        if sent_any:
            await asyncio.sleep(0)    # let SACKs in between bursts
        await _wait(tx, min(waits))


async def _finish(tx: _Sender) -> None:
    """END (with the checksum of every packet's CRC) until the receiver's verdict."""
    raw = tagged(tx.key, header(SrdType.END, tx.session)
                 + END_FIXED.pack(tx.begin.total_bytes, len(tx.acked), checksum_of(tx.crcs)))
    backoff = 1.0
    while tx.ack is None:
        tx.send_ctl(raw)
        await _wait(tx, tx.rto() * backoff)
        backoff = min(64.0, backoff * 2)
