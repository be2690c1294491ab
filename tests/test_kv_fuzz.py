"""Hostile input on the KV endpoint, property-based: whatever bytes a peer sends, before or after
authenticating, the receiver rejects that connection with a reason (never a verified transfer,
never a crash), counts it, and keeps verifying good transfers; replayed authentication and many
parallel bogus connections change nothing. The budget follows PDTB_FUZZ_EXAMPLES."""
from __future__ import annotations

import asyncio
import os

from hypothesis import HealthCheck, given, settings, strategies as st
import pytest

from nodes import kvproto as kp
from nodes.kvproto import FrameType

from test_hostile import FUZZ_EXAMPLES
from test_kvproto import HOST, SECRET, begin, good_transfer_still_works, raw_session, receiver  # noqa: F401

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py

FUZZ = settings(max_examples=max(20, FUZZ_EXAMPLES // 2), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

frame_types = st.sampled_from([t.value for t in FrameType] + [0, 99, 255])
# a frame whose header is well formed but whose body is anything (bounded), or raw garbage
any_frame = st.one_of(
    st.builds(lambda t, body: kp.frame(FrameType(t), body) if t in FrameType._value2member_map_ else
              kp.HEADER.pack(kp.MAGIC, kp.VERSION, t, 0, len(body)) + body,
              frame_types, st.binary(max_size=300)),
    st.binary(min_size=1, max_size=300))


@FUZZ
@given(data=st.lists(any_frame, min_size=1, max_size=4), authenticate=st.booleans())
async def test_any_bytes_on_the_kv_port_are_rejected_and_counted(receiver, data, authenticate):
    completed, rejected = receiver.completed, receiver.rejected
    if authenticate:
        ack = await raw_session(receiver.port, data, close_after=True)
    else:
        ack = await raw_session(receiver.port, [], raw=b"".join(data), close_after=True)
    assert ack is None or not ack.verified  # nothing but a real transfer is ever verified
    for _ in range(100):  # the receiver finishes with the connection after the ACK
        if receiver.rejected > rejected:
            break
        await asyncio.sleep(0.01)
    assert receiver.rejected == rejected + 1 and receiver.completed == completed
    assert not [e for e in receiver.events if e[1]]  # no transfer verified by the fuzz


async def test_replayed_authentication_is_refused(receiver):
    """An AUTH frame that answered one connection's nonce is worthless on the next connection."""
    reader, writer = await asyncio.open_connection(HOST, receiver.port)
    _, nonce_s = await kp.read_frame(reader)
    nonce_c = os.urandom(32)
    replay = kp.frame(FrameType.AUTH, nonce_c + kp.client_mac(SECRET, nonce_s, nonce_c))
    writer.write(replay)
    assert (await kp.read_frame(reader))[0] == FrameType.AUTH_OK
    writer.close()
    ack = await raw_session(receiver.port, [], raw=replay)
    assert ack is not None and ack.code == kp.Code.AUTH_FAILED
    await good_transfer_still_works(receiver)


async def test_many_parallel_bogus_connections_leave_good_transfers_intact(receiver):
    """100 connections that send a huge announced length, garbage or nothing at all, while good
    transfers run: the good ones verify, the bogus ones are each rejected."""
    huge = kp.HEADER.pack(kp.MAGIC, kp.VERSION, FrameType.AUTH, 0, (1 << 32) - 1)  # a 4 GiB frame announced
    bogus = [raw_session(receiver.port, [], raw=raw, close_after=True)
             for raw in (huge, b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n", kp.MAGIC) for _ in range(25)]
    good = [kp.send_kv(HOST, receiver.port, SECRET, begin(f"good{i}", 2_000_000, 8), chunk_bytes=65536)
            for i in range(3)]
    results = await asyncio.gather(*bogus, *good)
    assert all(ack is None or not ack.verified for ack in results[:100])
    assert [r.bytes_sent for r in results[100:]] == [2_000_000] * 3
    assert {("good0", True), ("good1", True), ("good2", True)} <= set(receiver.events)
    for _ in range(200):
        if receiver.rejected >= 100:
            break
        await asyncio.sleep(0.02)
    assert receiver.rejected >= 100
