"""KV handoff protocol: round trips, every rejection path, payload integrity, backpressure."""
from __future__ import annotations

import asyncio
import logging
import os
import struct
import zlib

import pytest

from nodes import kvproto as kp
from nodes.kvproto import Code, FrameType, KvBegin, KvReceiver, KvTransferError, send_kv

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py

SECRET = b"per-run-secret"
HOST = "127.0.0.1"


@pytest.fixture
async def receiver():
    events: list[tuple[str, bool]] = []
    logger = logging.getLogger("test.kv")
    rx = KvReceiver(SECRET, max_transfer_bytes=64 << 20, logger=logger, frame_timeout_s=5.0,
                    on_complete=lambda b, ok: events.append((b.request_id, ok)))
    await rx.start(HOST, 0)
    rx.events = events
    yield rx
    await rx.close()


async def raw_session(port: int, frames: list[bytes], *, secret: bytes = SECRET, raw: bytes | None = None,
                      close_after: bool = False) -> kp.KvAck | None:
    """A hand-made sender: handshake (unless ``raw`` replaces it), then the given bytes; returns
    the receiver's ACK, or None when the connection closed without one."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        ftype, nonce_s = await kp.read_frame(reader)
        assert ftype == FrameType.HELLO and len(nonce_s) == 32
        if raw is not None:
            writer.write(raw)
        else:
            nonce_c = os.urandom(32)
            writer.write(kp.frame(FrameType.AUTH, nonce_c + kp.client_mac(secret, nonce_s, nonce_c)))
            ftype, body = await kp.read_frame(reader)
            if ftype == FrameType.ACK:
                return kp.decode_ack(body)
            assert ftype == FrameType.AUTH_OK and body == kp.server_mac(secret, nonce_c, nonce_s)
            for f in frames:
                writer.write(f)
        await writer.drain()
        if close_after:
            writer.write_eof()
        try:
            ftype, body = await asyncio.wait_for(kp.read_frame(reader), 5)
        except KvTransferError:
            return None
        assert ftype == FrameType.ACK
        return kp.decode_ack(body)
    finally:
        writer.close()


def begin(rid: str = "r000001", total: int = 3 * 1000 + 7, layers: int = 3) -> KvBegin:
    return KvBegin(rid, "llama-3.1-8b", layers, 100, total)


def chunks_for(b: KvBegin, size: int = 400) -> list[bytes]:
    out = []
    for layer in range(b.layers):
        start, length = kp.layer_span(b.total_bytes, b.layers, layer)
        for off in range(start, start + length, size):
            n = min(size, start + length - off)
            out.append(kp.encode_chunk(b.request_id, layer, off, kp.payload(b.request_id, off, n)))
    return out


async def good_transfer_still_works(rx: KvReceiver, rid: str = "r-after") -> None:
    res = await send_kv(HOST, rx.port, SECRET, begin(rid, 100_000, 4), chunk_bytes=8192)
    assert res.bytes_sent == 100_000
    assert (rid, True) in rx.events


# ---------------------------------------------------------------- payload and layout

def test_payload_is_deterministic_and_position_dependent():
    whole = kp.payload("r1", 0, 3 << 20)
    assert whole == kp.payload("r1", 0, 3 << 20)
    for off, n in [(0, 1), (3, 13), (1 << 20, 5000), ((1 << 20) - 3, 11), (2_999_999, 17)]:
        assert kp.payload("r1", off, n) == whole[off:off + n]
    assert kp.payload("r2", 0, 4096) != whole[:4096]
    assert bytes(kp.payload_view("r1", 1_000_003, 77_777)) == whole[1_000_003:1_077_780]
    assert whole[:1 << 20] != whole[1 << 20:2 << 20]   # the 1 MiB pattern does not simply repeat


@pytest.mark.parametrize("offset", [0, 5, 1 << 20])
def test_verify_payload_detects_any_corrupted_byte(offset):
    data = bytearray(kp.payload("r9", offset, 70_001))
    assert kp.verify_payload("r9", offset, bytes(data))
    for pos in (0, 3, 8, 35_000, 70_000):
        bad = bytearray(data)
        bad[pos] ^= 0x01
        assert not kp.verify_payload("r9", offset, bytes(bad)), pos
    assert not kp.verify_payload("r9", offset + 8, bytes(data))   # right bytes, wrong place
    assert not kp.verify_payload("other", offset, bytes(data))


def test_layer_span_partitions_the_transfer():
    for total, layers in [(1000, 3), (7, 10), (0, 2), (2_684_354_560, 80)]:
        pos = 0
        for layer in range(layers):
            off, n = kp.layer_span(total, layers, layer)
            assert off == pos
            if n:
                assert kp.layer_of(total, layers, off) == layer
                assert kp.layer_of(total, layers, off + n - 1) == layer
            pos += n
        assert pos == total
    with pytest.raises(ValueError):
        kp.layer_span(10, 2, 2)


def test_frame_encodings_round_trip():
    b = begin()
    ftype, body = asyncio.run(_read_one(kp.encode_begin(b)))
    assert ftype == FrameType.BEGIN and kp.decode_begin(body) == b
    data = kp.payload("r1", 40, 100)
    ftype, body = asyncio.run(_read_one(kp.encode_chunk("r1", 2, 40, data)))
    c = kp.decode_chunk(body)
    assert (c.request_id, c.layer, c.offset, bytes(c.payload), c.crc32) == ("r1", 2, 40, data, zlib.crc32(data))
    ack = kp.KvAck("r1", False, Code.BAD_CRC, 12, "bad crc")
    ftype, body = asyncio.run(_read_one(kp.encode_ack(ack)))
    assert kp.decode_ack(body) == ack


async def _read_one(raw: bytes) -> tuple[FrameType, bytes]:
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    return await kp.read_frame(reader)


# ---------------------------------------------------------------- round trips

async def test_round_trip_whole_and_layerwise(receiver):
    seen: list[KvBegin] = []
    receiver.on_begin = seen.append
    b = KvBegin("r000042", "llama-3.1-70b", 80, 512, 5_000_003)
    res = await send_kv(HOST, receiver.port, SECRET, b, chunk_bytes=64 * 1024)
    assert res.bytes_sent == b.total_bytes and res.duration_s > 0
    assert seen == [b] and receiver.events == [("r000042", True)]

    ready_order: list[int] = []

    async def layer_ready(layer: int) -> None:
        ready_order.append(layer)
        await asyncio.sleep(0.001)

    b2 = KvBegin("r000043", "llama-3.1-70b", 8, 512, 800_001)
    await send_kv(HOST, receiver.port, SECRET, b2, chunk_bytes=50_000, layer_ready=layer_ready)
    assert ready_order == list(range(8))
    assert receiver.events[-1] == ("r000043", True)


async def test_concurrent_transfers(receiver):
    bs = [KvBegin(f"c{i}", "m", 4, 10, 300_000 + i) for i in range(4)]
    res = await asyncio.gather(*(send_kv(HOST, receiver.port, SECRET, b, chunk_bytes=32768) for b in bs))
    assert [r.bytes_sent for r in res] == [b.total_bytes for b in bs]
    assert sorted(receiver.events) == sorted((b.request_id, True) for b in bs)


async def test_zero_byte_transfer(receiver):
    res = await send_kv(HOST, receiver.port, SECRET, KvBegin("z1", "m", 2, 0, 0), chunk_bytes=1024)
    assert res.bytes_sent == 0 and receiver.events == [("z1", True)]


# ---------------------------------------------------------------- rejections

async def test_wrong_hmac_is_refused(receiver, caplog):
    with caplog.at_level(logging.WARNING, "test.kv"):
        with pytest.raises(KvTransferError) as err:
            await send_kv(HOST, receiver.port, b"not-the-secret", begin(), chunk_bytes=1024)
    assert err.value.code == Code.AUTH_FAILED
    assert "wrong HMAC" in caplog.text and "AUTH_FAILED" in caplog.text
    assert receiver.events == []          # never got to BEGIN
    await good_transfer_still_works(receiver)


async def test_client_refuses_unauthenticated_server():
    async def impostor(reader, writer):
        writer.write(kp.frame(FrameType.HELLO, os.urandom(32)))
        await kp.read_frame(reader)
        writer.write(kp.frame(FrameType.AUTH_OK, os.urandom(32)))   # cannot know the secret
        await writer.drain()
        await asyncio.sleep(1)
        writer.close()

    server = await asyncio.start_server(impostor, HOST, 0)
    try:
        with pytest.raises(KvTransferError) as err:
            await send_kv(HOST, server.sockets[0].getsockname()[1], SECRET, begin(), chunk_bytes=1024)
        assert err.value.code == Code.AUTH_FAILED
    finally:
        server.close()
        await server.wait_closed()


def _hdr(ftype: int, length: int, magic: bytes = kp.MAGIC, version: int = kp.VERSION) -> bytes:
    return struct.pack(">4sBBHI", magic, version, ftype, 0, length)


@pytest.mark.parametrize("raw, code", [
    (_hdr(FrameType.AUTH, 64, magic=b"HTTP") + bytes(64), Code.BAD_MAGIC),
    (_hdr(FrameType.AUTH, 64, version=9) + bytes(64), Code.BAD_VERSION),
    (_hdr(99, 0), Code.BAD_TYPE),
    (_hdr(FrameType.AUTH, 1 << 30), Code.OVERSIZED),
    (_hdr(FrameType.BEGIN, 10) + bytes(10), Code.OUT_OF_ORDER),   # BEGIN before authenticating
])
async def test_bad_frames_before_auth(receiver, caplog, raw, code):
    with caplog.at_level(logging.WARNING, "test.kv"):
        ack = await raw_session(receiver.port, [], raw=raw)
    assert ack is not None and not ack.verified and ack.code == code
    assert code.name in caplog.text
    await good_transfer_still_works(receiver)


async def test_truncated_frame(receiver, caplog):
    b = begin()
    with caplog.at_level(logging.WARNING, "test.kv"):
        await raw_session(receiver.port, [kp.encode_begin(b), chunks_for(b)[0][:-100]], close_after=True)
        for _ in range(50):
            if "TRUNCATED" in caplog.text:
                break
            await asyncio.sleep(0.05)
    assert "truncated CHUNK frame" in caplog.text
    assert receiver.events == [(b.request_id, False)]
    await good_transfer_still_works(receiver)


def _with_crc(chunk: bytes, rid: str, crc: int) -> bytes:
    pos = kp.HEADER_LEN + 1 + len(rid) + 2 + 8 + 4
    return chunk[:pos] + struct.pack(">I", crc) + chunk[pos + 4:]


def _corrupt_payload(chunk: bytes, rid: str) -> bytes:
    """Flip a payload byte and fix the CRC: only the byte-level check can catch it."""
    pos = kp.HEADER_LEN + 1 + len(rid) + 18
    data = bytearray(chunk[pos:])
    data[len(data) // 2] ^= 0xFF
    return _with_crc(chunk[:pos] + bytes(data), rid, zlib.crc32(bytes(data)))


async def _transfer_case(case: str) -> tuple[list[bytes], Code]:
    b = begin()
    cs = chunks_for(b)
    rid = b.request_id
    good_end = kp.encode_end(kp.KvEnd(rid, b.total_bytes, len(cs), _end_checksum(cs, rid)))
    if case == "bad_crc":
        return [kp.encode_begin(b), cs[0], _with_crc(cs[1], rid, 0xDEADBEEF)], Code.BAD_CRC
    if case == "corrupted_payload":
        return [kp.encode_begin(b), cs[0], _corrupt_payload(cs[1], rid)], Code.BAD_PAYLOAD
    if case == "chunk_before_begin":
        return [cs[0]], Code.OUT_OF_ORDER
    if case == "gap":
        return [kp.encode_begin(b), cs[0], cs[2]], Code.OUT_OF_ORDER
    if case == "wrong_layer":   # bytes of layer 0 labelled layer 1
        return [kp.encode_begin(b), kp.encode_chunk(rid, 1, 0, kp.payload(rid, 0, 100))], Code.OUT_OF_ORDER
    if case == "other_request":
        return [kp.encode_begin(b), kp.encode_chunk("r-other", 0, 0, kp.payload("r-other", 0, 100))], Code.OUT_OF_ORDER
    if case == "early_end":
        return [kp.encode_begin(b), cs[0], good_end], Code.OUT_OF_ORDER
    if case == "bad_end_checksum":
        bad_end = kp.encode_end(kp.KvEnd(rid, b.total_bytes, len(cs), 12345))
        return [kp.encode_begin(b), *cs, bad_end], Code.BAD_CHECKSUM
    if case == "oversized_transfer":
        return [kp.encode_begin(KvBegin(rid, "m", 2, 1, 1 << 40))], Code.OVERSIZED
    if case == "malformed_begin":
        return [kp.frame(FrameType.BEGIN, b"\x00\x01")], Code.MALFORMED
    if case == "bad_request_id":
        return [kp.encode_begin(KvBegin("bad id!", "m", 2, 1, 10))], Code.MALFORMED
    if case == "chunk_length_mismatch":
        c = bytearray(cs[0])
        c[kp.HEADER_LEN + 1 + len(rid) + 10:kp.HEADER_LEN + 1 + len(rid) + 14] = struct.pack(">I", 5)
        return [kp.encode_begin(b), bytes(c)], Code.MALFORMED
    raise AssertionError(case)


def _end_checksum(cs: list[bytes], rid: str) -> int:
    running = 0
    pos = kp.HEADER_LEN + 1 + len(rid) + 14
    for c in cs:
        running = zlib.crc32(c[pos:pos + 4], running)
    return running


CASES = ["bad_crc", "corrupted_payload", "chunk_before_begin", "gap", "wrong_layer", "other_request",
         "early_end", "bad_end_checksum", "oversized_transfer", "malformed_begin", "bad_request_id",
         "chunk_length_mismatch"]


@pytest.mark.parametrize("case", CASES)
async def test_rejections_after_auth(receiver, caplog, case):
    frames, code = await _transfer_case(case)
    with caplog.at_level(logging.WARNING, "test.kv"):
        ack = await raw_session(receiver.port, frames)
    assert ack is not None and not ack.verified, case
    assert ack.code == code, (case, ack)
    assert f"[{code.name}]" in caplog.text and ack.reason in caplog.text
    await good_transfer_still_works(receiver)


async def test_hand_made_good_transfer_is_verified(receiver):
    b = begin()
    cs = chunks_for(b)
    ack = await raw_session(receiver.port, [kp.encode_begin(b), *cs,
                                            kp.encode_end(kp.KvEnd(b.request_id, b.total_bytes, len(cs),
                                                                   _end_checksum(cs, b.request_id)))])
    assert ack.verified and ack.code == Code.OK and ack.bytes_verified == b.total_bytes


async def test_frames_split_at_random_points(receiver):
    """The receiver reassembles frames from arbitrary TCP read boundaries."""
    import random
    rng = random.Random(7)
    b = begin("r-split", 50_000, 5)
    cs = chunks_for(b, size=3000)
    stream = kp.encode_begin(b) + b"".join(cs) + kp.encode_end(
        kp.KvEnd(b.request_id, b.total_bytes, len(cs), _end_checksum(cs, b.request_id)))
    reader, writer = await asyncio.open_connection(HOST, receiver.port)
    try:
        _, nonce_s = await kp.read_frame(reader)
        nonce_c = os.urandom(32)
        writer.write(kp.frame(FrameType.AUTH, nonce_c + kp.client_mac(SECRET, nonce_s, nonce_c)))
        assert (await kp.read_frame(reader))[0] == FrameType.AUTH_OK
        pos = 0
        while pos < len(stream):
            n = rng.choice([1, 2, 11, 12, 13, 500, 4096, 70_000])
            writer.write(stream[pos:pos + n])
            await writer.drain()
            await asyncio.sleep(0)
            pos += n
        ftype, body = await kp.read_frame(reader)
        ack = kp.decode_ack(body)
        assert ack.verified and ack.bytes_verified == 50_000
    finally:
        writer.close()


async def test_silent_peer_times_out(caplog):
    rx = KvReceiver(SECRET, max_transfer_bytes=1 << 20, frame_timeout_s=0.3, logger=logging.getLogger("test.kv"))
    await rx.start(HOST, 0)
    try:
        with caplog.at_level(logging.WARNING, "test.kv"):
            reader, writer = await asyncio.open_connection(HOST, rx.port)
            await kp.read_frame(reader)   # HELLO, then say nothing
            ftype, body = await asyncio.wait_for(kp.read_frame(reader), 5)
            assert ftype == FrameType.ACK and kp.decode_ack(body).code == Code.TIMEOUT
            writer.close()
        assert "[TIMEOUT]" in caplog.text
    finally:
        await rx.close()


async def test_on_begin_can_refuse(receiver):
    def refuse(b: KvBegin) -> None:
        raise KvTransferError(f"unknown request {b.request_id}", Code.REFUSED)

    receiver.on_begin = refuse
    with pytest.raises(KvTransferError) as err:
        await send_kv(HOST, receiver.port, SECRET, begin(), chunk_bytes=1024)
    assert err.value.code == Code.REFUSED and "unknown request" in err.value.reason


async def test_callback_bug_fails_the_transfer_not_the_receiver(receiver, caplog):
    def broken(b: KvBegin) -> None:
        raise ValueError("bug in the decode node")

    receiver.on_begin = broken
    with caplog.at_level(logging.ERROR, "test.kv"):
        with pytest.raises(KvTransferError) as err:
            await send_kv(HOST, receiver.port, SECRET, begin(), chunk_bytes=1024)
    assert "receiver error: ValueError" in err.value.reason and "bug in the decode node" in caplog.text
    receiver.on_begin = None
    await good_transfer_still_works(receiver)
    assert receiver.rejected == 1 and receiver.completed == 1


async def test_sender_sees_corruption_as_error(receiver, monkeypatch):
    """A sender whose KV bytes got corrupted (CRC computed after the damage) is told so."""
    real = kp.payload_view

    def damaged(rid: str, off: int, n: int) -> memoryview:
        data = real(rid, off, n)
        if off > 0:
            data[0] ^= 0x80
        return data

    monkeypatch.setattr(kp, "payload_view", damaged)
    with pytest.raises(KvTransferError) as err:
        await send_kv(HOST, receiver.port, SECRET, begin("r-bad", 200_000, 2), chunk_bytes=16384)
    assert err.value.code == Code.BAD_PAYLOAD
    assert receiver.events == [("r-bad", False)]


# ---------------------------------------------------------------- backpressure and limits

async def test_backpressure_bounds_sender_memory(monkeypatch):
    """Against a receiver that stops reading, the sender generates only what the socket
    buffers hold, then times out."""
    generated = []
    real = kp.payload_view
    monkeypatch.setattr(kp, "payload_view", lambda rid, off, n: generated.append(n) or real(rid, off, n))

    async def stall(reader, writer):
        nonce_s = os.urandom(32)
        writer.write(kp.frame(FrameType.HELLO, nonce_s))
        _, body = await kp.read_frame(reader)
        writer.write(kp.frame(FrameType.AUTH_OK, kp.server_mac(SECRET, body[:32], nonce_s)))
        await asyncio.sleep(3)
        writer.close()

    server = await asyncio.start_server(stall, HOST, 0, limit=65536)
    try:
        with pytest.raises(KvTransferError) as err:
            await send_kv(HOST, server.sockets[0].getsockname()[1], SECRET, begin("r-bp", 512 << 20, 4),
                          chunk_bytes=1 << 20, timeout_s=1.5)
        assert err.value.code == Code.TIMEOUT
    finally:
        server.close()
        await server.wait_closed()
    assert sum(generated) < 64 << 20, f"{sum(generated)} bytes generated for a stalled receiver"


async def test_sender_validates_arguments():
    with pytest.raises(ValueError):
        await send_kv(HOST, 1, SECRET, begin(), chunk_bytes=0)
    with pytest.raises(ValueError):
        await send_kv(HOST, 1, SECRET, begin(), chunk_bytes=kp.MAX_CHUNK_BYTES + 1)
    with pytest.raises(ValueError):
        await send_kv(HOST, 1, SECRET, KvBegin("no spaces", "m", 1, 1, 1), chunk_bytes=10)


async def test_connect_failure_is_a_transfer_error():
    sock_port = 1  # nothing listens on port 1 of loopback
    with pytest.raises(KvTransferError) as err:
        await send_kv(HOST, sock_port, SECRET, begin(), chunk_bytes=1024, timeout_s=5)
    assert "connect" in err.value.reason


async def test_close_aborts_transfers_in_progress():
    events: list[tuple[str, bool]] = []
    started = asyncio.Event()

    async def slow_layer(layer: int) -> None:
        if layer == 1:
            started.set()
            await asyncio.sleep(30)

    rx = KvReceiver(SECRET, max_transfer_bytes=1 << 20, on_complete=lambda b, ok: events.append((b.request_id, ok)))
    await rx.start(HOST, 0)
    send = asyncio.create_task(send_kv(HOST, rx.port, SECRET, begin("r-abort", 1000, 2), chunk_bytes=100,
                                       layer_ready=slow_layer))
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.sleep(0.1)
    await asyncio.wait_for(rx.close(), 5)
    assert events == [("r-abort", False)]
    send.cancel()
    with pytest.raises((asyncio.CancelledError, KvTransferError)):
        await send
