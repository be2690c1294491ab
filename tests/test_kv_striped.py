"""Persistent, striped KV transfers (KvPeer): one connection per rail, opened once and reused,
chunks placed by offset on the receiver, refusals that keep the connections, reconnection
after the receiver restarts. Rails are loopback addresses (127.0.0.x): no fabric needed."""
from __future__ import annotations

import asyncio
import logging
import os
import zlib

import pytest

from nodes import kvproto as kp
from nodes.kvproto import Code, FrameType, KvBegin, KvPeer, KvReceiver, KvTransferError

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py

SECRET = b"per-run-secret"
RAILS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


async def start_receiver(port: int = 0, **kw) -> KvReceiver:
    events: list[tuple[str, bool]] = []
    rx = KvReceiver(SECRET, max_transfer_bytes=64 << 20, logger=logging.getLogger("test.kv"), frame_timeout_s=5.0,
                    on_complete=lambda b, ok: events.append((b.request_id, ok)), **kw)
    for addr in RAILS:
        await rx.start(addr, port or (rx.port if rx._port else 0))
    rx.events = events
    return rx


def begin(rid: str, total: int, layers: int = 4) -> KvBegin:
    return KvBegin(request_id=rid, model="m", layers=layers, tokens=100, total_bytes=total)


async def test_striped_transfers_reuse_one_connection_per_rail():
    rx = await start_receiver()
    peer = KvPeer(RAILS, rx.port, SECRET)
    try:
        await peer.connect()
        assert peer.connected and peer.connects == 3
        # 4 layers of 250 000 bytes in 64 KiB chunks: 16 chunks, spread over 3 stripes
        res = await peer.send(begin("r000001", 1_000_000), chunk_bytes=64 * 1024)
        assert res.bytes_sent == 1_000_000
        res = await peer.send(begin("r000002", 333_333, layers=3), chunk_bytes=10_000)
        assert rx.events == [("r000001", True), ("r000002", True)]
        assert peer.connects == 3                # persistent: no connection opened for a transfer
        assert rx.completed == 2 and rx.rejected == 0
        # every rail carried a connection
        rails = {c.transport.get_extra_info("sockname")[0] for c in rx._conns}
        assert rails == set(RAILS)
    finally:
        await peer.close()
        await rx.close()


async def test_concurrent_layerwise_transfers_interleave_on_the_same_connections():
    rx = await start_receiver()
    peer = KvPeer(RAILS, rx.port, SECRET)

    async def layer_ready(layer: int) -> None:
        await asyncio.sleep(0.002 * layer)

    try:
        await peer.connect()
        results = await asyncio.gather(*(peer.send(begin(f"r00001{i}", 200_000 + i, layers=8), chunk_bytes=4096,
                                                   layer_ready=layer_ready) for i in range(4)))
        assert [r.bytes_sent for r in results] == [200_000 + i for i in range(4)]
        assert sorted(rx.events) == [(f"r00001{i}", True) for i in range(4)]
        assert peer.connects == 3
    finally:
        await peer.close()
        await rx.close()


async def test_refusal_keeps_the_connections_and_the_next_transfer_goes_through():
    full = {"r000021"}

    def on_begin(b: KvBegin) -> None:
        if b.request_id in full:
            raise KvTransferError("no KV room", Code.KV_FULL)

    rx = await start_receiver(on_begin=on_begin)
    peer = KvPeer(RAILS, rx.port, SECRET)
    try:
        await peer.connect()
        with pytest.raises(KvTransferError) as err:
            await peer.send(begin("r000021", 2_000_000), chunk_bytes=16 * 1024)
        assert err.value.code == Code.KV_FULL
        full.clear()      # room again: the sender's retry uses the same connections
        await peer.send(begin("r000021", 2_000_000), chunk_bytes=16 * 1024)
        await peer.send(begin("r000022", 1000), chunk_bytes=16 * 1024)
        assert peer.connects == 3 and peer.connected
        assert rx.events == [("r000021", True), ("r000022", True)]
        assert rx.rejected == 1
    finally:
        await peer.close()
        await rx.close()


async def test_reconnects_after_the_receiver_restarts():
    rx = await start_receiver()
    port = rx.port
    peer = KvPeer(RAILS, port, SECRET)
    try:
        await peer.send(begin("r000031", 100_000), chunk_bytes=8192)
        await rx.close()
        for _ in range(200):                    # the ACK readers see the connections close
            if not any(c is not None and c.alive for c in peer._conns):
                break
            await asyncio.sleep(0.01)
        assert not peer.connected
        rx = await start_receiver(port)
        await peer.send(begin("r000032", 100_000), chunk_bytes=8192)
        assert peer.connects == 6 and rx.events == [("r000032", True)]
    finally:
        await peer.close()
        await rx.close()


async def test_a_lost_connection_fails_the_transfer_in_flight():
    rx = await start_receiver()
    peer = KvPeer(RAILS, rx.port, SECRET)
    gate = asyncio.Event()

    async def layer_ready(layer: int) -> None:
        if layer == 2:
            await gate.wait()

    try:
        await peer.connect()
        task = asyncio.create_task(peer.send(begin("r000041", 400_000), chunk_bytes=8192, layer_ready=layer_ready))
        await asyncio.sleep(0.1)
        for c in list(rx._conns):              # the receiver drops one rail mid-transfer
            if c.transport.get_extra_info("sockname")[0] == RAILS[1]:
                c.transport.abort()
        with pytest.raises(KvTransferError) as err:
            await asyncio.wait_for(task, 10)
        assert err.value.code in (Code.TRUNCATED, Code.OUT_OF_ORDER)
        gate.set()
        assert ("r000041", False) in rx.events
        await peer.send(begin("r000042", 50_000), chunk_bytes=8192)   # reconnects the lost rail
        assert rx.events[-1] == ("r000042", True) and peer.connects == 4
    finally:
        await peer.close()
        await rx.close()


async def test_stripes_must_tile_the_transfer():
    """A hand-made striped sender whose stripes leave a hole: refused once every stripe ended."""
    rx = await start_receiver()
    try:
        conns = []
        for addr in RAILS[:2]:
            reader, writer = await asyncio.open_connection(addr, rx.port)
            ftype, nonce_s = await kp.read_frame(reader)
            nonce_c = os.urandom(32)
            writer.write(kp.frame(FrameType.AUTH, nonce_c + kp.client_mac(SECRET, nonce_s, nonce_c)))
            assert (await kp.read_frame(reader))[0] == FrameType.AUTH_OK
            conns.append((reader, writer))
        b = KvBegin("r000051", "m", 1, 10, 3000, stripes=2)
        crcs = []
        for k, (_, w) in enumerate(conns):
            w.write(kp.encode_begin(KvBegin("r000051", "m", 1, 10, 3000, stripe=k, stripes=2)))
        data = kp.payload("r000051", 0, 1000)
        conns[0][1].write(kp.encode_chunk("r000051", 0, 0, data))
        crcs.append(zlib.crc32(data))
        data2 = kp.payload("r000051", 2000, 1000)          # [1000, 2000) never sent
        conns[1][1].write(kp.encode_chunk("r000051", 0, 2000, data2))
        conns[0][1].write(kp.encode_end(kp.KvEnd("r000051", b.total_bytes, 1, zlib.crc32(crcs[0].to_bytes(4, "big")))))
        conns[1][1].write(kp.encode_end(kp.KvEnd("r000051", b.total_bytes, 1,
                                                 zlib.crc32(zlib.crc32(data2).to_bytes(4, "big")))))
        ftype, body = await asyncio.wait_for(kp.read_frame(conns[0][0]), 5)
        ack = kp.decode_ack(body)
        assert ftype == FrameType.ACK and not ack.verified and ack.code == Code.OUT_OF_ORDER
        assert rx.events == [("r000051", False)]
        for _, w in conns:
            w.close()
    finally:
        await rx.close()
