"""KV-cache handoff protocol: prefill pushes a request's KV cache to a decode node over TCP.

Versioned binary frames (layout in docs/wire-format.md) on authenticated connections: the
receiver greets with a nonce, both sides prove knowledge of the run's secret (HMAC-SHA256
challenge-response, mutual), then the sender streams BEGIN, CHUNK..., END and waits for the
receiver's ACK, sent only after every byte was checked. Payload bytes are a deterministic
function of (request id, offset), so the receiver verifies each byte, not only CRCs.

:class:`KvPeer` keeps one persistent connection per rail of a receiver, opened ahead of the
transfers (no SYN, handshake or slow start from idle in a transfer's path), and stripes each
transfer over them: chunk i goes to stripe i mod S, each stripe carries its own BEGIN (with
``stripe``/``stripes``) and END (its chunk count and checksum), and the receiver places chunks
by offset and acknowledges once, on stripe 0's connection, when every stripe has ended and
every byte is there. :func:`send_kv` is the one-shot form (one connection, one transfer).

A receiver refuses a transfer (no KV room: KV_FULL) with an ACK and keeps the connection; on
a malformed or unauthenticated stream it answers with an ACK carrying the reason when the
socket still allows it, closes that connection only (failing the transfers striped over it),
and keeps serving.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import inspect
import logging
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Awaitable, Callable

import numpy as np
from core.vocab import REQUEST_ID_RE

DEFAULT_KV_PORT = 7470
MAGIC = b"PDKV"
VERSION = 1
HEADER = struct.Struct(">4sBBHI")          # magic, version, type, flags, body length
HEADER_LEN = HEADER.size                   # 12
MAX_FRAME_BYTES = 16 * 1024 * 1024 + 1024  # a 16 MiB chunk plus its fields
MAX_CHUNK_BYTES = 16 * 1024 * 1024
NONCE_LEN = 32
MAC_LEN = 32
LAYOUTS = frozenset({"layer-major"})
_CLIENT_LABEL = b"pdkv-client"
_SERVER_LABEL = b"pdkv-server"

log = logging.getLogger("pdtb.kv")


class FrameType(IntEnum):
    HELLO = 1     # receiver -> sender: nonce_s
    AUTH = 2      # sender -> receiver: nonce_c, HMAC(secret, "pdkv-client" | nonce_s | nonce_c)
    AUTH_OK = 3   # receiver -> sender: HMAC(secret, "pdkv-server" | nonce_c | nonce_s)
    BEGIN = 4     # sender -> receiver
    CHUNK = 5     # sender -> receiver
    END = 6       # sender -> receiver
    ACK = 7       # receiver -> sender: verified or not, with code and reason


class Code(IntEnum):
    """Reason codes carried by ACK frames and KvTransferError.code."""
    OK = 0
    BAD_MAGIC = 1
    BAD_VERSION = 2
    BAD_TYPE = 3
    OVERSIZED = 4
    TRUNCATED = 5
    MALFORMED = 6
    AUTH_FAILED = 7
    OUT_OF_ORDER = 8
    BAD_CRC = 9
    BAD_PAYLOAD = 10
    BAD_CHECKSUM = 11
    TIMEOUT = 12
    REFUSED = 13
    KV_FULL = 14  # the receiver has no KV room for this request now: the sender waits and retries
    UNREACHABLE = 15  # sender side: no connection to the receiver (refused, no route): the sender retries


# Fixed parts of the bodies (all big-endian); strings are u8-length-prefixed UTF-8.
_BEGIN_FIXED = struct.Struct(">HIQ")      # layers, tokens, total_bytes
_CHUNK_FIXED = struct.Struct(">HQII")     # layer, offset, payload_len, crc32
_END_FIXED = struct.Struct(">QII")        # total_bytes, chunks, checksum (CRC-32 of the chunk CRCs)
_ACK_FIXED = struct.Struct(">BHQH")       # verified, code, bytes_verified, reason_len
_STRIPE = struct.Struct(">BBI")           # optional BEGIN trailer: stripe, stripes, attempt (striped transfers)
MAX_STRIPES = 32                           # fabric.topology.MAX_RAILS


@dataclass(frozen=True)
class KvBegin:
    request_id: str
    model: str
    layers: int
    tokens: int
    total_bytes: int
    layout: str = "layer-major"
    stripe: int = 0     # which stripe this BEGIN opens (a striped transfer sends one per connection)
    stripes: int = 1    # how many connections the transfer is striped over
    attempt: int = 0    # the sender's number for this try of a striped transfer (a retry gets another)

    def transfer(self) -> tuple:
        """What every stripe's BEGIN of one transfer must agree on."""
        return (self.request_id, self.model, self.layers, self.tokens, self.total_bytes, self.layout, self.stripes,
                self.attempt)

    @property
    def key(self) -> tuple[str, int]:
        """A transfer attempt: stale stripes of a refused try never join its retry."""
        return self.request_id, self.attempt


@dataclass
class KvResult:
    bytes_sent: int
    duration_s: float  # wall seconds, connect to verified ACK
    transport: str = "tcp"
    packets: int = 0  # SRD: data packets of the message (0 for TCP)
    retransmitted: int = 0  # SRD: data packets sent again after their timer expired


class KvTransferError(Exception):
    """A transfer failed or a frame was rejected; ``reason`` is one line for logs and timelines."""

    def __init__(self, reason: str, code: Code = Code.REFUSED):
        super().__init__(reason)
        self.reason = reason
        self.code = Code(code)


@dataclass(frozen=True)
class KvChunk:
    request_id: str
    layer: int
    offset: int
    crc32: int
    payload: bytes | memoryview


@dataclass(frozen=True)
class KvEnd:
    request_id: str
    total_bytes: int
    chunks: int
    checksum: int


@dataclass(frozen=True)
class KvAck:
    request_id: str
    verified: bool
    code: Code
    bytes_verified: int
    reason: str


# ---------------------------------------------------------------- deterministic payload

_PATTERN_BYTES = 1 << 20
_PATTERN_WORDS = _PATTERN_BYTES // 8
_MIX = np.uint64(0x9E3779B97F4A7C15)
_WORD_MIX = np.arange(_PATTERN_WORDS, dtype="<u8") * _MIX   # j * MIX, reused for every block


@functools.lru_cache(maxsize=16)
def _pattern(request_id: str) -> np.ndarray:
    """1 MiB of per-request PCG64 bytes; word k of a transfer is pattern[k mod W] ^ (k * MIX),
    so every 8-byte word depends on the request and its absolute position."""
    seed = int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=16,
                                          person=b"pdkv-payload").digest(), "little")
    pattern = np.frombuffer(np.random.Generator(np.random.PCG64(seed)).bytes(_PATTERN_BYTES), dtype="<u8")
    return pattern


_scratch = threading.local()


def _scratch_words(n: int) -> np.ndarray:
    """A per-thread reusable word buffer (fresh 1 MiB arrays cost more in page faults than
    generating the bytes)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < n:
        buf = _scratch.buf = np.empty(max(n, _PATTERN_WORDS), dtype="<u8")
    return buf[:n]


def _words(request_id: str, k0: int, k1: int, out: np.ndarray | None = None) -> np.ndarray:
    """Payload words k0..k1 (8-byte words from the start of the transfer), in ``out`` or else
    in the scratch buffer."""
    pattern = _pattern(request_id)
    out = _scratch_words(k1 - k0) if out is None else out
    pos, k = 0, k0
    while k < k1:
        j = k % _PATTERN_WORDS
        n = min(_PATTERN_WORDS - j, k1 - k)
        seg = out[pos:pos + n]
        # k * MIX = (k - j) * MIX + j * MIX  (mod 2**64)
        np.add(_WORD_MIX[j:j + n], np.uint64(((k - j) * int(_MIX)) & 0xFFFFFFFFFFFFFFFF), out=seg)
        np.bitwise_xor(seg, pattern[j:j + n], out=seg)
        pos += n
        k += n
    return out


def payload(request_id: str, offset: int, length: int) -> bytes:
    """The KV bytes [offset, offset + length) of a request: any range can be regenerated alone."""
    if offset < 0 or length < 0:
        raise ValueError("offset and length must be >= 0")
    if length == 0:
        return b""
    k0 = offset // 8
    words = _words(request_id, k0, (offset + length + 7) // 8)
    start = offset - 8 * k0
    return memoryview(words).cast("B")[start:start + length].tobytes()


def payload_view(request_id: str, offset: int, length: int) -> memoryview:
    """Like payload(), in a fresh buffer of its own (no copy): what the sender hands to the
    transport, which may keep it until the bytes are sent."""
    k0 = offset // 8
    words = _words(request_id, k0, (offset + length + 7) // 8, np.empty((offset + length + 7) // 8 - k0, "<u8"))
    start = offset - 8 * k0
    return memoryview(words).cast("B")[start:start + length]


def verify_payload(request_id: str, offset: int, data: bytes | memoryview) -> bool:
    """Whether ``data`` equals the request's KV bytes at ``offset`` (word-wise, no copies)."""
    n = len(data)
    head = min((-offset) % 8, n)
    if head and bytes(data[:head]) != payload(request_id, offset, head):
        return False
    m = (n - head) // 8
    if m:
        k0 = (offset + head) // 8
        got = np.frombuffer(data, dtype="<u8", count=m, offset=head)
        if not np.array_equal(got, _words(request_id, k0, k0 + m)):
            return False
    tail = head + 8 * m
    return tail == n or bytes(data[tail:]) == payload(request_id, offset + tail, n - tail)


def layer_span(total_bytes: int, layers: int, layer: int) -> tuple[int, int]:
    """(offset, length) of one layer in the layer-major layout: bytes split as evenly as
    possible, the first ``total_bytes % layers`` layers one byte longer."""
    if layers < 1 or not 0 <= layer < layers:
        raise ValueError(f"layer {layer} out of range for {layers} layers")
    base, rem = divmod(total_bytes, layers)
    return layer * base + min(layer, rem), base + (1 if layer < rem else 0)


def layer_of(total_bytes: int, layers: int, offset: int) -> int:
    """The layer holding byte ``offset`` (inverse of layer_span)."""
    base, rem = divmod(total_bytes, layers)
    edge = rem * (base + 1)
    if offset < edge:
        return offset // (base + 1)
    return rem + (offset - edge) // base if base else layers - 1


# ---------------------------------------------------------------- encoding

def _str8(value: str, what: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise ValueError(f"{what} longer than 255 bytes")
    return bytes([len(raw)]) + raw


def frame(ftype: FrameType, body: bytes, *, version: int = VERSION, magic: bytes = MAGIC, flags: int = 0) -> bytes:
    """One frame: header + body."""
    return HEADER.pack(magic, version, int(ftype), flags, len(body)) + body


def begin_body(begin: KvBegin) -> bytes:
    """BEGIN's fields (also the tail of the SRD transport's BEGIN datagram)."""
    return (_BEGIN_FIXED.pack(begin.layers, begin.tokens, begin.total_bytes)
            + _str8(begin.request_id, "request id") + _str8(begin.model, "model") + _str8(begin.layout, "layout"))


def encode_begin(begin: KvBegin) -> bytes:
    """A BEGIN frame; a striped transfer's (``stripes`` > 1) ends with the stripe trailer."""
    trailer = _STRIPE.pack(begin.stripe, begin.stripes, begin.attempt) if begin.stripes > 1 else b""
    return frame(FrameType.BEGIN, begin_body(begin) + trailer)


def chunk_header(request_id: str, layer: int, offset: int, data: bytes | memoryview,
                 crc: int | None = None) -> bytes:
    """Header and fields of a CHUNK frame; the payload follows it on the wire."""
    rid = _str8(request_id, "request id")
    fields = rid + _CHUNK_FIXED.pack(layer, offset, len(data), zlib.crc32(data) if crc is None else crc)
    return HEADER.pack(MAGIC, VERSION, FrameType.CHUNK, 0, len(fields) + len(data)) + fields


def encode_chunk(request_id: str, layer: int, offset: int, data: bytes, crc: int | None = None) -> bytes:
    return chunk_header(request_id, layer, offset, data, crc) + data


def encode_end(end: KvEnd) -> bytes:
    return frame(FrameType.END, _str8(end.request_id, "request id")
                 + _END_FIXED.pack(end.total_bytes, end.chunks, end.checksum))


def ack_body(ack: KvAck) -> bytes:
    """ACK's fields (also the body of the SRD transport's ACK datagram)."""
    reason = ack.reason.encode()[:1024]
    return (_str8(ack.request_id, "request id")
            + _ACK_FIXED.pack(int(ack.verified), int(ack.code), ack.bytes_verified, len(reason)) + reason)


def encode_ack(ack: KvAck) -> bytes:
    return frame(FrameType.ACK, ack_body(ack))


def client_mac(secret: bytes, nonce_s: bytes, nonce_c: bytes) -> bytes:
    return hmac.new(secret, _CLIENT_LABEL + nonce_s + nonce_c, hashlib.sha256).digest()


def server_mac(secret: bytes, nonce_c: bytes, nonce_s: bytes) -> bytes:
    return hmac.new(secret, _SERVER_LABEL + nonce_c + nonce_s, hashlib.sha256).digest()


# ---------------------------------------------------------------- decoding

def parse_header(raw: bytes | memoryview, max_frame_bytes: int = MAX_FRAME_BYTES) -> tuple[FrameType, int]:
    """(type, body length) of a 12-byte frame header; KvTransferError with the protocol code
    when it is not a frame this version accepts."""
    magic, version, ftype, _flags, length = HEADER.unpack(raw)
    if magic != MAGIC:
        raise KvTransferError(f"bad magic {bytes(magic)!r}", Code.BAD_MAGIC)
    if version != VERSION:
        raise KvTransferError(f"unsupported version {version} (expected {VERSION})", Code.BAD_VERSION)
    try:
        ftype = FrameType(ftype)
    except ValueError:
        raise KvTransferError(f"unknown frame type {ftype}", Code.BAD_TYPE) from None
    if length > max_frame_bytes:
        raise KvTransferError(f"oversized {ftype.name} frame: {length} bytes > {max_frame_bytes}", Code.OVERSIZED)
    return ftype, length


async def read_frame(reader: asyncio.StreamReader, max_frame_bytes: int = MAX_FRAME_BYTES) -> tuple[FrameType, bytes]:
    """Read one frame from a stream; raises KvTransferError with the protocol code on anything malformed."""
    try:
        raw = await reader.readexactly(HEADER_LEN)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise KvTransferError("connection closed by peer", Code.TRUNCATED) from None
        raise KvTransferError(f"truncated frame header ({len(exc.partial)} of {HEADER_LEN} bytes)",
                              Code.TRUNCATED) from None
    ftype, length = parse_header(raw, max_frame_bytes)
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise KvTransferError(f"truncated {ftype.name} frame: {len(exc.partial)} of {length} body bytes",
                              Code.TRUNCATED) from None
    return ftype, body


class _Body:
    """Cursor over a frame body; any overrun or leftover is MALFORMED."""

    def __init__(self, ftype: FrameType, body: bytes | memoryview):
        self.ftype, self.body, self.pos = ftype, body, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.body):
            raise KvTransferError(f"{self.ftype.name} frame body too short ({len(self.body)} bytes)", Code.MALFORMED)
        out = bytes(self.body[self.pos:self.pos + n])
        self.pos += n
        return out

    def unpack(self, st: struct.Struct) -> tuple:
        return st.unpack(self.take(st.size))

    def str8(self, what: str) -> str:
        raw = self.take(self.take(1)[0])
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise KvTransferError(f"{self.ftype.name}: {what} is not UTF-8", Code.MALFORMED) from None

    def request_id(self) -> str:
        rid = self.str8("request id")
        if not REQUEST_ID_RE.match(rid):
            raise KvTransferError(f"{self.ftype.name}: bad request id {rid[:80]!r}", Code.MALFORMED)
        return rid

    def done(self) -> None:
        if self.pos != len(self.body):
            raise KvTransferError(f"{self.ftype.name} frame has {len(self.body) - self.pos} trailing bytes",
                                  Code.MALFORMED)


def decode_begin(body: bytes | memoryview) -> KvBegin:
    b = _Body(FrameType.BEGIN, body)
    layers, tokens, total = b.unpack(_BEGIN_FIXED)
    rid = b.request_id()
    model = b.str8("model")
    layout = b.str8("layout")
    stripe, stripes, attempt = b.unpack(_STRIPE) if len(body) - b.pos == _STRIPE.size else (0, 1, 0)
    b.done()
    if not (1 <= stripes <= MAX_STRIPES and stripe < stripes):
        raise KvTransferError(f"BEGIN stripe {stripe} of {stripes}", Code.MALFORMED)
    return KvBegin(rid, model, layers, tokens, total, layout, stripe, stripes, attempt)


def decode_chunk(body: bytes | memoryview) -> KvChunk:
    b = _Body(FrameType.CHUNK, body)
    rid = b.request_id()
    layer, offset, length, crc = b.unpack(_CHUNK_FIXED)
    if len(body) - b.pos != length:
        raise KvTransferError(f"CHUNK declares {length} payload bytes, frame holds {len(body) - b.pos}",
                              Code.MALFORMED)
    return KvChunk(rid, layer, offset, crc, memoryview(body)[b.pos:])


def decode_end(body: bytes | memoryview) -> KvEnd:
    b = _Body(FrameType.END, body)
    rid = b.request_id()
    total, chunks, checksum = b.unpack(_END_FIXED)
    b.done()
    return KvEnd(rid, total, chunks, checksum)


def decode_ack(body: bytes | memoryview) -> KvAck:
    b = _Body(FrameType.ACK, body)
    rid = b.str8("request id")
    verified, code, nbytes, reason_len = b.unpack(_ACK_FIXED)
    reason = b.take(reason_len).decode(errors="replace")
    b.done()
    try:
        code = Code(code)
    except ValueError:
        raise KvTransferError(f"ACK with unknown code {code}", Code.MALFORMED) from None
    return KvAck(rid, bool(verified), code, nbytes, reason)


def check_begin(begin: KvBegin, max_transfer_bytes: int) -> None:
    """The receiver's checks of a BEGIN before its callback sees it (both transports)."""
    if begin.layers < 1:
        raise KvTransferError("BEGIN with 0 layers", Code.MALFORMED)
    if begin.layout not in LAYOUTS:
        raise KvTransferError(f"unknown layout {begin.layout!r}", Code.MALFORMED)
    if begin.total_bytes > max_transfer_bytes:
        raise KvTransferError(f"oversized transfer: {begin.total_bytes} bytes > {max_transfer_bytes}",
                              Code.OVERSIZED)


async def _expect(reader: asyncio.StreamReader, want: FrameType, timeout_s: float,
                  max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
    try:
        ftype, body = await asyncio.wait_for(read_frame(reader, max_frame_bytes), timeout_s)
    except asyncio.TimeoutError:
        raise KvTransferError(f"timed out waiting for {want.name}", Code.TIMEOUT) from None
    if ftype != want:
        if ftype == FrameType.ACK and want != FrameType.ACK:
            ack = decode_ack(body)
            raise KvTransferError(f"rejected by receiver: {ack.reason}", ack.code)
        raise KvTransferError(f"expected {want.name}, got {ftype.name}", Code.OUT_OF_ORDER)
    return body


# ---------------------------------------------------------------- sender

def check_outgoing(begin: KvBegin, chunk_bytes: int | None = None) -> None:
    """A sender's checks of what it is asked to send (every transport): ValueError, a caller's bug."""
    if chunk_bytes is not None and not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in (0, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
    if begin.layers < 1 or begin.total_bytes < 0 or begin.layout not in LAYOUTS:
        raise ValueError(f"bad KvBegin {begin}")
    if not REQUEST_ID_RE.match(begin.request_id):
        raise ValueError(f"bad request id {begin.request_id!r}")


def check_ack(ack: KvAck, begin: KvBegin) -> None:
    """The receiver's final answer to a transfer (every transport): verified, for this request and
    every byte, or a KvTransferError with the receiver's code."""
    if not ack.verified:
        raise KvTransferError(f"rejected by receiver: {ack.reason}", ack.code)
    if ack.request_id != begin.request_id or ack.bytes_verified != begin.total_bytes:
        raise KvTransferError(f"ACK for {ack.request_id!r}/{ack.bytes_verified} B does not match "
                              f"{begin.request_id!r}/{begin.total_bytes} B", Code.MALFORMED)


async def client_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes,
                           timeout_s: float) -> None:
    """The sender's side of a connection's HMAC handshake: HELLO in, AUTH out, AUTH_OK checked."""
    nonce_s = await _expect(reader, FrameType.HELLO, timeout_s)
    if len(nonce_s) != NONCE_LEN:
        raise KvTransferError("HELLO with a bad nonce length", Code.MALFORMED)
    nonce_c = os.urandom(NONCE_LEN)
    writer.write(frame(FrameType.AUTH, nonce_c + client_mac(secret, nonce_s, nonce_c)))
    mac = await _expect(reader, FrameType.AUTH_OK, timeout_s)
    if not hmac.compare_digest(mac, server_mac(secret, nonce_c, nonce_s)):
        raise KvTransferError("receiver failed authentication", Code.AUTH_FAILED)


async def send_kv(host: str, port: int, secret: bytes, begin: KvBegin, *, chunk_bytes: int,
                  layer_ready: Callable[[int], Awaitable[None]] | None = None,
                  local_addr: str | None = None, timeout_s: float = 60.0) -> KvResult:
    """Push one request's KV cache; returns once the receiver verified every byte.

    With ``layer_ready`` (layer-wise mode) layer l is sent only after ``await layer_ready(l)``.
    Backpressure: every chunk waits for the socket buffer to drain before the next one.
    """
    check_outgoing(begin, chunk_bytes)
    started = time.perf_counter()
    writer: asyncio.StreamWriter | None = None
    ack_task: asyncio.Task | None = None
    try:
        async with asyncio.timeout(timeout_s):
            try:
                reader, writer = await asyncio.open_connection(
                    host, port, local_addr=(local_addr, 0) if local_addr else None)
            except OSError as exc:
                raise KvTransferError(f"connect to {host}:{port} failed: {exc}", Code.UNREACHABLE) from None
            await client_handshake(reader, writer, secret, timeout_s)
            writer.write(encode_begin(begin))
            ack_task = asyncio.ensure_future(_expect(reader, FrameType.ACK, timeout_s))
            running, chunks = await _send_chunks(writer, begin, chunk_bytes, layer_ready, ack_task)
            if not ack_task.done():
                writer.write(encode_end(KvEnd(begin.request_id, begin.total_bytes, chunks, running)))
                try:
                    await writer.drain()
                except (ConnectionError, OSError):
                    pass
            try:
                ack = decode_ack(await ack_task)
            except (ConnectionError, OSError) as exc:
                raise KvTransferError(f"connection lost: {exc}", Code.TRUNCATED) from None
            check_ack(ack, begin)
            return KvResult(bytes_sent=begin.total_bytes, duration_s=time.perf_counter() - started)
    except TimeoutError:
        raise KvTransferError(f"transfer not acknowledged within {timeout_s:g} s", Code.TIMEOUT) from None
    except (ConnectionError, OSError) as exc:
        raise KvTransferError(f"connection lost: {exc}", Code.TRUNCATED) from None
    finally:
        if ack_task is not None:
            if not ack_task.done():
                ack_task.cancel()
            elif not ack_task.cancelled():
                ack_task.exception()   # retrieved: the error (if any) was already reported
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass


async def _send_chunks(writer: asyncio.StreamWriter, begin: KvBegin, chunk_bytes: int,
                       layer_ready: Callable[[int], Awaitable[None]] | None,
                       ack_task: asyncio.Future) -> tuple[int, int]:
    """CHUNK frames layer by layer; stops early when the receiver already answered (a rejection)
    or the connection broke. Returns (whole-transfer checksum, chunk count): the checksum is
    the CRC-32 of every chunk's CRC-32 (4 bytes big-endian each) in order, so it covers every
    payload byte and the chunk order without a second pass over the data."""
    running, chunks = 0, 0
    for layer in range(begin.layers):
        if layer_ready is not None:
            await layer_ready(layer)
        start, length = layer_span(begin.total_bytes, begin.layers, layer)
        for off in range(start, start + length, chunk_bytes):
            if ack_task.done():
                return running, chunks
            data = payload_view(begin.request_id, off, min(chunk_bytes, start + length - off))
            crc = zlib.crc32(data)
            running = zlib.crc32(crc.to_bytes(4, "big"), running)
            writer.write(chunk_header(begin.request_id, layer, off, data, crc))
            writer.write(data)
            chunks += 1
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                return running, chunks
    return running, chunks


# ---------------------------------------------------------------- persistent, striped sender

class _OutConn:
    """One authenticated connection of a :class:`KvPeer` (one rail); a reader task hands the
    receiver's ACKs to the transfers waiting for them."""

    def __init__(self, peer: "KvPeer", rail: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.peer, self.rail, self.reader, self.writer = peer, rail, reader, writer
        self.task = asyncio.get_running_loop().create_task(self._read_acks(), name=f"kv-acks-{rail}")

    @property
    def alive(self) -> bool:
        return not self.task.done() and not self.writer.is_closing()

    async def _read_acks(self) -> None:
        error: KvTransferError
        try:
            while True:
                ftype, body = await read_frame(self.reader, self.peer.max_frame_bytes)
                if ftype != FrameType.ACK:
                    raise KvTransferError(f"expected ACK, got {ftype.name}", Code.OUT_OF_ORDER)
                ack = decode_ack(body)
                waiter = self.peer.pending.get(ack.request_id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(ack)
        except KvTransferError as exc:
            error = KvTransferError(f"rail {self.rail} connection: {exc.reason}", exc.code)
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            error = KvTransferError(f"rail {self.rail} connection lost: {exc}", Code.TRUNCATED)
        except asyncio.CancelledError:
            error = KvTransferError(f"rail {self.rail} connection closed", Code.TRUNCATED)
        self.writer.close()
        # every transfer in flight is striped over this connection too: it cannot complete
        for waiter in self.peer.pending.values():
            if not waiter.done():
                waiter.set_exception(error)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


class KvPeer:
    """Persistent connections to one KV receiver, one per rail address (``addrs``, rail
    order), over which every transfer to it is striped (chunk i on stripe i mod S).

    Connections are opened by :meth:`connect` ahead of the transfers (a node calls it at
    start-up), so a transfer pays no TCP handshake (and no lost-SYN timeout), no
    authentication round trips and no slow start from a cold connection; only the first
    connection to a peer, and a reconnection after a failure, do. A broken connection fails the
    transfers in flight (TRUNCATED) and is opened again by the next transfer. Stripe k's
    connection is bound to ``binds[k % len(binds)]`` (the sender's rail addresses), so that it
    leaves by that rail (the fabric's policy routes)."""

    def __init__(self, addrs: list[str], port: int, secret: bytes, *, binds: list[str] | None = None,
                 max_frame_bytes: int = MAX_FRAME_BYTES):
        if not 1 <= len(addrs) <= MAX_STRIPES:
            raise ValueError(f"a KV peer has 1..{MAX_STRIPES} rail addresses, got {len(addrs)}")
        if not secret:
            raise ValueError("the KV secret must not be empty")
        self.addrs, self.port, self.secret = list(addrs), port, secret
        self.binds = list(binds or [])
        self.max_frame_bytes = max_frame_bytes
        self.pending: dict[str, asyncio.Future] = {}
        self._conns: list[_OutConn | None] = [None] * len(addrs)
        self._lock = asyncio.Lock()
        self.connects = 0     # connections opened (a test and the logs see reconnections)

    @property
    def connected(self) -> bool:
        return all(c is not None and c.alive for c in self._conns)

    async def connect(self, timeout_s: float = 10.0) -> None:
        """Open (or reopen) every rail's connection that is not up, in parallel, with the HMAC
        handshake; KvTransferError (REFUSED, AUTH_FAILED, TIMEOUT) when one cannot be."""
        async with self._lock:
            todo = [k for k, c in enumerate(self._conns) if c is None or not c.alive]
            if not todo:
                return
            results = await asyncio.gather(*(self._open(k, timeout_s) for k in todo), return_exceptions=True)
            errors = []
            for k, res in zip(todo, results):
                if isinstance(res, BaseException):
                    errors.append(res)
                else:
                    old, self._conns[k] = self._conns[k], res
                    if old is not None:
                        await old.close()
            if errors:
                err = errors[0]
                if isinstance(err, KvTransferError):
                    raise err
                raise KvTransferError(f"connect to {self.addrs}: {err}", Code.UNREACHABLE)

    async def _open(self, rail: int, timeout_s: float) -> _OutConn:
        host = self.addrs[rail]
        bind = self.binds[rail % len(self.binds)] if self.binds else None
        try:
            async with asyncio.timeout(timeout_s):
                try:
                    reader, writer = await asyncio.open_connection(host, self.port,
                                                                   local_addr=(bind, 0) if bind else None)
                except OSError as exc:   # no listener, no route: the sender asks again (UNREACHABLE)
                    raise KvTransferError(f"connect to {host}:{self.port} failed: {exc}", Code.UNREACHABLE) from None
                try:
                    await client_handshake(reader, writer, self.secret, timeout_s)
                except BaseException:
                    writer.close()
                    raise
        except TimeoutError:
            raise KvTransferError(f"connect to {host}:{self.port} timed out", Code.TIMEOUT) from None
        except (ConnectionError, OSError) as exc:
            raise KvTransferError(f"connect to {host}:{self.port}: {exc}", Code.UNREACHABLE) from None
        self.connects += 1
        return _OutConn(self, rail, reader, writer)

    async def send(self, begin: KvBegin, *, chunk_bytes: int,
                   layer_ready: Callable[[int], Awaitable[None]] | None = None,
                   timeout_s: float = 60.0) -> KvResult:
        """Push one request's KV cache striped over the rails; returns once the receiver
        verified every byte. Layer l's chunks wait for ``await layer_ready(l)``. Backpressure:
        a chunk waits for its connection's socket buffer to drain before the next one."""
        check_outgoing(begin, chunk_bytes)
        rid = begin.request_id
        if rid in self.pending:
            raise ValueError(f"a transfer of {rid!r} to this peer is already in flight")
        started = time.perf_counter()
        waiter: asyncio.Future = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout_s):
                await self.connect(timeout_s)
                conns = [c for c in self._conns if c is not None]
                self.pending[rid] = waiter
                n = len(conns)
                attempt = int.from_bytes(os.urandom(4), "big")
                for k, c in enumerate(conns):
                    c.writer.write(encode_begin(replace(begin, stripe=k, stripes=n, attempt=attempt)))
                running, chunks = [0] * n, [0] * n
                i = 0
                try:
                    for layer in range(begin.layers):
                        if layer_ready is not None and not waiter.done():
                            # an ACK (a refusal) or a lost connection ends the wait for the layer
                            ready = asyncio.ensure_future(layer_ready(layer))
                            await asyncio.wait({ready, waiter}, return_when=asyncio.FIRST_COMPLETED)
                            if not ready.done():
                                ready.cancel()
                                await asyncio.gather(ready, return_exceptions=True)
                            else:
                                ready.result()
                        start, length = layer_span(begin.total_bytes, begin.layers, layer)
                        for off in range(start, start + length, chunk_bytes):
                            if waiter.done():
                                break
                            k = i % n
                            data = payload_view(rid, off, min(chunk_bytes, start + length - off))
                            crc = zlib.crc32(data)
                            running[k] = zlib.crc32(crc.to_bytes(4, "big"), running[k])
                            conns[k].writer.write(chunk_header(rid, layer, off, data, crc))
                            conns[k].writer.write(data)
                            chunks[k] += 1
                            i += 1
                            await conns[k].writer.drain()
                            # drain() does not yield below its high-water mark: let the ACK
                            # readers run, so that a refusal stops the stream at once
                            await asyncio.sleep(0)
                    # every stripe ends, a refused one too: its connection is clean for the next transfer
                    for k, c in enumerate(conns):
                        c.writer.write(encode_end(KvEnd(rid, begin.total_bytes, chunks[k], running[k])))
                    await asyncio.gather(*(c.writer.drain() for c in conns))
                except (ConnectionError, OSError):
                    pass   # the connection's reader reports the loss to the waiter
                ack: KvAck = await waiter
        except TimeoutError:
            raise KvTransferError(f"transfer not acknowledged within {timeout_s:g} s", Code.TIMEOUT) from None
        finally:
            if self.pending.get(rid) is waiter:
                del self.pending[rid]
            if waiter.done() and not waiter.cancelled():
                waiter.exception()
        check_ack(ack, begin)
        return KvResult(bytes_sent=begin.total_bytes, duration_s=time.perf_counter() - started)

    async def close(self) -> None:
        conns, self._conns = self._conns, [None] * len(self.addrs)
        await asyncio.gather(*(c.close() for c in conns if c is not None))


# ---------------------------------------------------------------- receiver

class _FrameConn(asyncio.BufferedProtocol):
    """One receiving connection. The kernel copies straight into a per-connection buffer that
    holds at most one frame plus 64 KiB read ahead (no StreamReader copies: the receiver
    verifies hundreds of MB); reading pauses while a frame waits to be handled, which is the
    receiver's backpressure. A frame's body is a view valid until the next ``read_frame``."""

    _SLACK = 64 * 1024

    def __init__(self, receiver: "KvReceiver"):
        self.receiver = receiver
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray(self._SLACK)
        self.start = self.end = 0     # unread bytes are buf[start:end]
        self.want = 0                 # read until end >= want
        self.waiter: asyncio.Future | None = None
        self.closed: BaseException | bool = False   # True on EOF, the exception on a lost connection
        self.paused = False
        self.task: asyncio.Task | None = None
        self.stripes: dict[str, _Stripe] = {}   # request id -> the stripe open on this connection

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.task = asyncio.get_running_loop().create_task(self.receiver._serve(self))

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)[self.end:]

    def buffer_updated(self, nbytes: int) -> None:
        self.end += nbytes
        if self.end == len(self.buf) and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = exc or True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # -- reading
    async def read_exact(self, n: int, timeout_s: float | None) -> memoryview:
        """The next n bytes; TIMEOUT when no byte arrives for ``timeout_s`` (None: wait)."""
        if self.end - self.start < n:
            if len(self.buf) - self.start < n:   # make room: move the unread bytes to the front
                left = self.end - self.start
                if len(self.buf) < n + self._SLACK:
                    new = bytearray(n + self._SLACK)
                    new[:left] = self.buf[self.start:self.end]
                    self.buf = new
                else:
                    self.buf[:left] = self.buf[self.start:self.end]
                self.start, self.end = 0, left
            self.want = self.start + n
            if self.paused:
                self.paused = False
                self.transport.resume_reading()
            loop = asyncio.get_running_loop()
            while self.end < self.want:
                if self.closed:
                    raise asyncio.IncompleteReadError(bytes(self.buf[self.start:self.end]), n)
                self.waiter = loop.create_future()
                try:
                    await asyncio.wait_for(self.waiter, timeout_s)
                except asyncio.TimeoutError:
                    raise KvTransferError(f"no data for {timeout_s:g} s", Code.TIMEOUT) from None
                finally:
                    self.waiter = None
        view = memoryview(self.buf)[self.start:self.start + n]
        self.start += n
        return view

    async def read_frame(self, idle: bool = False) -> tuple[FrameType, memoryview]:
        """The next frame; ``idle``: between transfers, so the next header may take any time
        (a persistent connection waits for the next transfer)."""
        rx = self.receiver
        try:
            head = await self.read_exact(HEADER_LEN, None if idle else rx.frame_timeout_s)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise KvTransferError("connection closed by peer", Code.TRUNCATED) from None
            raise KvTransferError(f"truncated frame header ({len(exc.partial)} of {HEADER_LEN} bytes)",
                                  Code.TRUNCATED) from None
        ftype, length = parse_header(head, rx.max_frame_bytes)
        try:
            return ftype, await self.read_exact(length, rx.frame_timeout_s)
        except asyncio.IncompleteReadError as exc:
            raise KvTransferError(f"truncated {ftype.name} frame: {len(exc.partial)} of {length} body bytes",
                                  Code.TRUNCATED) from None

    async def discard(self, limit_s: float) -> None:
        """Drop what a rejected peer still sends, until it closes or ``limit_s`` passes, so that
        closing does not reset the connection before the peer read our ACK with the reason."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while not self.closed and (left := deadline - loop.time()) > 0:
            self.start = self.end = 0
            if self.paused:
                self.paused = False
                self.transport.resume_reading()
            self.waiter = loop.create_future()
            try:
                await asyncio.wait_for(self.waiter, left)
            except asyncio.TimeoutError:
                return
            finally:
                self.waiter = None

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)


class KvReceiver:
    """Accepts KV transfers; each connection is checked frame by frame and byte by byte.

    ``on_begin`` may raise KvTransferError to refuse a transfer (e.g. an unknown request);
    ``on_complete(begin, verified)`` runs once per transfer that got past BEGIN.
    ``frame_timeout_s``: a connection that sends nothing for this long is dropped (TIMEOUT).
    """

    def __init__(self, secret: bytes, *, max_transfer_bytes: int,
                 on_begin: Callable[[KvBegin], None] | None = None,
                 on_complete: Callable[[KvBegin, bool], Awaitable[None] | None] | None = None,
                 logger: logging.Logger | None = None,
                 max_frame_bytes: int = MAX_FRAME_BYTES, frame_timeout_s: float = 30.0):
        if not secret:
            raise ValueError("the KV secret must not be empty")
        self.secret = secret
        self.max_transfer_bytes = max_transfer_bytes
        self.max_frame_bytes = max_frame_bytes
        self.frame_timeout_s = frame_timeout_s
        self.on_begin = on_begin
        self.on_complete = on_complete
        self.log = logger or log
        self._servers: list[asyncio.base_events.Server] = []
        self._port: int | None = None
        self._conns: set[_FrameConn] = set()
        self._inbound: dict[tuple[str, int], _Inbound] = {}
        self._dead: dict[tuple[str, int], None] = {}   # transfer attempts refused or failed lately, oldest first
        self.rejected = 0
        self.completed = 0

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host``:``port``; call again for each further rail address (same port)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _FrameConn(self), host, port)
        self._servers.append(server)
        if self._port is None:
            self._port = server.sockets[0].getsockname()[1]

    @property
    def port(self) -> int:
        """The listening port (the ephemeral one when started with port 0)."""
        if self._port is None:
            raise RuntimeError("receiver not started")
        return self._port

    async def close(self) -> None:
        """Stop listening and abort the transfers in progress (their on_complete gets False)."""
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        tasks = [c.task for c in self._conns if c.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for server in servers:
            await server.wait_closed()

    async def _serve(self, conn: _FrameConn) -> None:
        self._conns.add(conn)
        peer = conn.transport.get_extra_info("peername")
        peer_s = f"{peer[0]}:{peer[1]}" if peer else "?"
        try:
            await self._session(conn)
        except KvTransferError as exc:
            self.rejected += 1
            rid, verified = await self._fail_conn(conn)
            self.log.warning("kv: rejected connection from %s%s: %s [%s]", peer_s,
                             f" (request {rid})" if rid else "", exc.reason, exc.code.name)
            conn.write(encode_ack(KvAck(rid, False, exc.code, verified, exc.reason)))
            await conn.discard(1.0)
        except (ConnectionError, OSError) as exc:
            self.rejected += 1
            self.log.warning("kv: connection from %s lost: %s", peer_s, exc)
            await self._fail_conn(conn)
        except asyncio.CancelledError:
            await self._fail_conn(conn)
            raise
        except Exception as exc:  # a bug in a callback must not leave the sender waiting
            self.rejected += 1
            self.log.exception("kv: error serving %s", peer_s)
            rid, verified = await self._fail_conn(conn)
            conn.write(encode_ack(KvAck(rid, False, Code.REFUSED, verified,
                                        f"receiver error: {type(exc).__name__}: {exc}")))
        finally:
            conn.transport.close()   # sends what is still buffered (the ACK), then FIN
            self._conns.discard(conn)

    async def _fail_conn(self, conn: _FrameConn) -> tuple[str, int]:
        """Fail every transfer with a stripe open on ``conn`` (the other stripes' frames are
        dropped from now on); (request id, bytes verified) of one of them for the ACK."""
        first = ("", 0)
        for rid, stripe in list(conn.stripes.items()):
            if stripe.inbound is None:
                continue
            if first == ("", 0):
                first = (rid, stripe.inbound.verified)
            await self._fail(stripe.inbound)
        conn.stripes.clear()
        return first

    async def _fail(self, inbound: _Inbound, notify: KvAck | None = None) -> None:
        """Forget a transfer as failed: its connections drop its later frames; ``notify`` is
        sent on its lead connection (the sender waits there) when given."""
        if inbound.failed:
            return
        inbound.failed = True
        rid = inbound.begin.request_id
        if self._inbound.get(inbound.begin.key) is inbound:
            del self._inbound[inbound.begin.key]
        self._forget(inbound.begin.key)
        for c in inbound.conns:
            if rid in c.stripes:
                c.stripes[rid] = _Stripe(None, c.stripes[rid].stripe)   # drop the rest of its stripe
        if notify is not None:
            lead = inbound.lead or next(iter(inbound.conns), None)
            if lead is not None:
                lead.write(encode_ack(notify))
        await self._complete(inbound.begin, False)

    def _forget(self, key: tuple[str, int]) -> None:
        """Remember a refused or failed transfer attempt for a while: its other stripes, already
        on their way, are dropped instead of starting it again."""
        self._dead[key] = None
        while len(self._dead) > 4096:
            self._dead.pop(next(iter(self._dead)))

    async def _complete(self, begin: KvBegin, ok: bool) -> None:
        if self.on_complete is not None:
            res = self.on_complete(begin, ok)
            if inspect.isawaitable(res):
                await res

    async def _session(self, conn: _FrameConn) -> None:
        nonce_s = os.urandom(NONCE_LEN)
        conn.write(frame(FrameType.HELLO, nonce_s))
        ftype, body = await conn.read_frame()
        if ftype != FrameType.AUTH:
            raise KvTransferError(f"expected AUTH, got {ftype.name}", Code.OUT_OF_ORDER)
        if len(body) != NONCE_LEN + MAC_LEN:
            raise KvTransferError(f"AUTH body of {len(body)} bytes", Code.MALFORMED)
        nonce_c, mac = bytes(body[:NONCE_LEN]), bytes(body[NONCE_LEN:])
        if not hmac.compare_digest(mac, client_mac(self.secret, nonce_s, nonce_c)):
            raise KvTransferError("sender failed authentication (wrong HMAC)", Code.AUTH_FAILED)
        conn.write(frame(FrameType.AUTH_OK, server_mac(self.secret, nonce_c, nonce_s)))
        served = False
        while True:
            between = served and not any(st.inbound is not None for st in conn.stripes.values())
            try:
                ftype, body = await conn.read_frame(idle=between)
            except KvTransferError as exc:
                if between and exc.code == Code.TRUNCATED and conn.start == conn.end:
                    return   # the sender closed a persistent connection between transfers
                raise
            if ftype == FrameType.BEGIN:
                await self._on_begin(conn, decode_begin(body))
                served = True
            elif ftype == FrameType.CHUNK:
                self._on_chunk(conn, decode_chunk(body))
            elif ftype == FrameType.END:
                await self._on_end(conn, decode_end(body))
            else:
                raise KvTransferError(f"unexpected {ftype.name} frame", Code.OUT_OF_ORDER)

    async def _on_begin(self, conn: _FrameConn, begin: KvBegin) -> None:
        rid = begin.request_id
        old = conn.stripes.get(rid)
        if old is not None:
            if old.inbound is not None and old.inbound.begin.key == begin.key:
                raise KvTransferError(f"second BEGIN for {rid!r} on one connection", Code.OUT_OF_ORDER)
            if old.inbound is not None:      # the sender gave up on that try without ending it
                await self._fail(old.inbound)
            del conn.stripes[rid]
        if begin.stripes > 1 and begin.key in self._dead:
            conn.stripes[rid] = _Stripe(None, begin.stripe)   # a stripe of a refused or failed try
            return
        inbound = self._inbound.get(begin.key)
        if inbound is None:
            check_begin(begin, self.max_transfer_bytes)
            if self.on_begin is not None:
                try:
                    self.on_begin(begin)   # may raise KvTransferError to refuse
                except KvTransferError as exc:
                    # a refusal of this transfer, not of the connection: answer and keep serving
                    self.rejected += 1
                    self._forget(begin.key)
                    self.log.info("kv: refused %s: %s [%s]", rid, exc.reason, exc.code.name)
                    conn.write(encode_ack(KvAck(rid, False, exc.code, 0, exc.reason)))
                    conn.stripes[rid] = _Stripe(None, begin.stripe)
                    return
            inbound = self._inbound[begin.key] = _Inbound(begin)
        elif inbound.begin.transfer() != begin.transfer() or begin.stripe in inbound.opened:
            raise KvTransferError(f"BEGIN of stripe {begin.stripe} does not match transfer {rid!r}", Code.OUT_OF_ORDER)
        inbound.opened.add(begin.stripe)
        inbound.conns.add(conn)
        if begin.stripe == 0:
            inbound.lead = conn
        conn.stripes[rid] = _Stripe(inbound, begin.stripe)

    def _on_chunk(self, conn: _FrameConn, c: KvChunk) -> None:
        stripe = conn.stripes.get(c.request_id)
        if stripe is None:
            raise KvTransferError(f"CHUNK for {c.request_id!r} without its BEGIN on this connection", Code.OUT_OF_ORDER)
        inbound = stripe.inbound
        if inbound is None:
            return         # the rest of a refused or failed transfer's stripe
        begin, total, n = inbound.begin, inbound.begin.total_bytes, len(c.payload)
        if begin.stripes == 1 and c.offset != stripe.next_offset:
            raise KvTransferError(f"CHUNK at offset {c.offset}, expected {stripe.next_offset}", Code.OUT_OF_ORDER)
        if c.offset < stripe.next_offset:
            raise KvTransferError(f"CHUNK at offset {c.offset} behind its stripe's {stripe.next_offset}",
                                  Code.OUT_OF_ORDER)
        if n == 0 or c.offset + n > total:
            raise KvTransferError(f"CHUNK of {n} bytes at {c.offset} overruns {total}", Code.OUT_OF_ORDER)
        if not 0 <= c.layer < begin.layers:
            raise KvTransferError(f"CHUNK layer {c.layer} outside 0..{begin.layers - 1}", Code.OUT_OF_ORDER)
        lstart, llen = layer_span(total, begin.layers, c.layer)
        if not (lstart <= c.offset and c.offset + n <= lstart + llen):
            raise KvTransferError(f"CHUNK [{c.offset}, {c.offset + n}) not inside layer {c.layer} "
                                  f"[{lstart}, {lstart + llen})", Code.OUT_OF_ORDER)
        if c.offset in inbound.spans:
            raise KvTransferError(f"CHUNK at offset {c.offset} received twice", Code.OUT_OF_ORDER)
        crc = zlib.crc32(c.payload)
        if crc != c.crc32:
            raise KvTransferError(f"CHUNK at offset {c.offset}: CRC {crc:08x} != {c.crc32:08x}", Code.BAD_CRC)
        if not verify_payload(c.request_id, c.offset, c.payload):
            raise KvTransferError(f"CHUNK at offset {c.offset}: payload differs from the request's "
                                  f"KV bytes", Code.BAD_PAYLOAD)
        stripe.running = zlib.crc32(crc.to_bytes(4, "big"), stripe.running)
        stripe.chunks += 1
        stripe.next_offset = c.offset + n
        inbound.spans[c.offset] = n
        inbound.verified += n

    async def _on_end(self, conn: _FrameConn, end: KvEnd) -> None:
        stripe = conn.stripes.get(end.request_id)
        if stripe is None:
            raise KvTransferError(f"END for {end.request_id!r} without its BEGIN on this connection", Code.OUT_OF_ORDER)
        inbound = stripe.inbound
        if inbound is None:
            del conn.stripes[end.request_id]
            return
        begin, total = inbound.begin, inbound.begin.total_bytes
        if end.total_bytes != total:
            raise KvTransferError(f"END says {end.total_bytes} bytes, BEGIN {total}", Code.OUT_OF_ORDER)
        if begin.stripes == 1 and stripe.next_offset != total:
            raise KvTransferError(f"END after {stripe.next_offset} of {total} bytes (END says {end.total_bytes})",
                                  Code.OUT_OF_ORDER)
        if end.chunks != stripe.chunks or end.checksum != stripe.running:
            raise KvTransferError(f"END checksum {end.checksum:08x}/{end.chunks} chunks != "
                                  f"{stripe.running:08x}/{stripe.chunks}", Code.BAD_CHECKSUM)
        del conn.stripes[end.request_id]
        inbound.ended.add(stripe.stripe)
        if len(inbound.ended) < begin.stripes:
            return
        rid = begin.request_id
        pos = 0
        for off in sorted(inbound.spans):      # every byte once: the spans tile [0, total)
            if off != pos:
                break
            pos += inbound.spans[off]
        if pos != total:
            await self._fail(inbound, KvAck(rid, False, Code.OUT_OF_ORDER, inbound.verified,
                                            f"every stripe ended with bytes [{pos}, {total}) missing"))
            self.rejected += 1
            return
        del self._inbound[begin.key]
        self.completed += 1
        await self._complete(begin, True)
        lead = inbound.lead if inbound.lead is not None and not inbound.lead.transport.is_closing() else conn
        lead.write(encode_ack(KvAck(rid, True, Code.OK, total, "verified")))


@dataclass(eq=False)
class _Inbound:
    """A transfer being received, over one connection or striped over several."""

    begin: KvBegin
    opened: set[int] = field(default_factory=set)
    ended: set[int] = field(default_factory=set)
    spans: dict[int, int] = field(default_factory=dict)     # offset -> length of each verified chunk
    verified: int = 0
    conns: set[_FrameConn] = field(default_factory=set)
    lead: _FrameConn | None = None                            # stripe 0's connection: the ACK goes there
    failed: bool = False


@dataclass(eq=False)
class _Stripe:
    """One stripe of a transfer on one connection: its chunks arrive in increasing offset order."""

    inbound: _Inbound | None   # None: a refused or failed transfer's stripe, dropped until its END
    stripe: int
    next_offset: int = 0
    running: int = 0
    chunks: int = 0
