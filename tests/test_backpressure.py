"""KV memory backpressure between real prefill and decode daemons on loopback: decode grants a
transfer only when the request's whole KV fits (refusing with KV_FULL otherwise), the prefill
node keeps the KV and asks again, its own held KV bounds which prompts it starts, and every
request completes."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from nodes.config import Endpoint, KvSettings, NodeConfig, PrefillSettings
from nodes.costmodel import CostModel
from nodes.decode import DecodeNode
from nodes.kvproto import Code, KvTransferError
from nodes.prefill import PrefillNode
from nodes.profiles import load_hardware, load_model

from daemon_helpers import events, free_port, running
from test_decode import push_kv

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py

MODEL = "qwen3-32b"
HW = "cs3"  # both roles: a CS-3 pair holds ~86k tokens of this model's KV, so a few long prompts fill it
SECRET = "ab" * 32


def node_config(tmp_path: Path, role: str, name: str, t0: float, transport: str = "tcp") -> NodeConfig:
    extra = ({"kv": Endpoint(host="127.0.0.1", port=free_port())} if role == "decode" else
             {"kv_bind": "127.0.0.1", "prefill": PrefillSettings(token_budget=16384, chunk_tokens=0)})
    return NodeConfig(run_id="t1", name=name, role=role, model=MODEL, hardware=HW, tdf=1.0, byte_scale=1e-6,
                      t0_wall=t0, run_dir=str(tmp_path), http=Endpoint(host="127.0.0.1", port=free_port()),
                      kv_transfer=KvSettings(secret_hex=SECRET, timeout_s=30.0, transport=transport, mtu=9001),
                      internal_secret_hex=SECRET, **extra)


async def generate(session, cfg: NodeConfig, rid: str, prompt: int, max_tokens: int) -> list[dict]:
    body = {"request_id": rid, "model": MODEL, "prompt_tokens": prompt, "max_tokens": max_tokens}
    async with session.post(f"{cfg.http.url}/internal/generate", json=body) as r:
        assert r.status == 200, await r.text()
        return [json.loads(line) async for line in r.content]


def first_times(evs: list[dict]) -> dict[tuple[str, str], float]:
    """(event, request id) -> wall time of its first occurrence."""
    first: dict[tuple[str, str], float] = {}
    for e in evs:
        first.setdefault((e["event"], e["request_id"]), e["t_wall"])
    return first


@pytest.mark.parametrize("transport", ["tcp", "srd"])
async def test_transfers_wait_for_decode_room_and_prefill_holds_back(tmp_path, transport):
    cost = CostModel(load_hardware(HW), load_model(MODEL))
    cap_tokens = cost.max_kv_tokens()
    prompt = int(0.44 * cap_tokens)  # two requests' KV fit on either node, three do not
    long_out, short_out = 1500, 5
    t0 = time.time()
    dcfg = node_config(tmp_path, "decode", "d1", t0)
    pcfg = node_config(tmp_path, "prefill", "p1", t0, transport)
    peer = {"name": "d1", "host": "127.0.0.1", "port": dcfg.kv.port}
    async with running(DecodeNode, dcfg) as (decode, dsession), running(PrefillNode, pcfg) as (prefill, psession):
        peak = [0]
        reserve = decode.kv.reserve

        def watched_reserve(nbytes: int) -> None:
            reserve(nbytes)
            peak[0] = max(peak[0], decode.kv.used)
        decode.kv.reserve = watched_reserve  # type: ignore[method-assign]

        # a and b fill the decode node's KV and decode for ~2 model s (1500 steps of ~1.5 ms)
        streams = {rid: asyncio.create_task(generate(dsession, dcfg, rid, prompt, long_out)) for rid in "ab"}
        await asyncio.sleep(0.1)
        for rid in "ab":
            await push_kv(dcfg, rid, prompt)
        # c, d, e go through the prefill node (~0.3 s each): c and d are refused by the full decode
        # node and held on the prefill node, which then has no room to start e
        for rid in "cde":
            streams[rid] = asyncio.create_task(generate(dsession, dcfg, rid, prompt, short_out))
        await asyncio.sleep(0.1)
        body = {"model": MODEL, "prompt_tokens": prompt, "decode": peer}
        answers = await asyncio.gather(*(psession.post(f"{pcfg.http.url}/internal/prefill",
                                                       json={"request_id": rid, **body}) for rid in "cde"))
        for r in answers:
            assert r.status == 200, await r.text()
            r.release()
        lines = {rid: await task for rid, task in streams.items()}

    for rid, n in {"a": long_out, "b": long_out, "c": short_out, "d": short_out, "e": short_out}.items():
        assert lines[rid][-1] == {"type": "done", "output_tokens": n}, (rid, lines[rid][-1])
    assert peak[0] <= cost.kv_capacity_bytes()  # never more KV taken than the node has
    assert decode.kv.used == 0 and not prefill.holding

    d = first_times(events(dcfg))
    p = first_times(events(pcfg))
    first_done = min(d[("decode_done", "a")], d[("decode_done", "b")])
    for rid in "cd":
        # refused while a and b held the room, granted only after one of them finished
        assert d[("kv_refused", rid)] < first_done <= d[("kv_granted", rid)] < d[("kv_recv_start", rid)]
        assert p[("kv_wait_start", rid)] < d[("kv_granted", rid)] < p[("kv_end", rid)]
    # e could not start while c and d's KV was held here; it started once one was handed off
    assert ("kv_hold_wait", "e") in p
    assert p[("kv_hold_wait", "e")] < min(p[("kv_end", "c")], p[("kv_end", "d")]) <= p[("prefill_start", "e")]
    [hold] = events(pcfg, "kv_hold_wait")
    assert hold["held_bytes"] == 2 * cost.kv_bytes(prompt) and hold["need_bytes"] == cost.kv_bytes(prompt)
    refusals = {e["request_id"]: e["refusals"] for e in events(pcfg, "kv_end")}
    assert refusals["c"] >= 1 and refusals["d"] >= 1 and all(e["ok"] for e in events(pcfg, "kv_end"))


async def test_handoff_gives_up_when_room_never_comes(tmp_path):
    """A transfer refused past its timeout fails with a reason (the router then fails the request
    and closes its stream); the decode node forgets it and keeps its room for others."""
    cost = CostModel(load_hardware(HW), load_model(MODEL))
    prompt = int(0.6 * cost.max_kv_tokens())  # one fits, two do not
    t0 = time.time()
    dcfg = node_config(tmp_path, "decode", "d1", t0)
    pcfg = node_config(tmp_path, "prefill", "p1", t0).model_copy(
        update={"kv_transfer": KvSettings(secret_hex=SECRET, timeout_s=0.5)})
    peer = {"name": "d1", "host": "127.0.0.1", "port": dcfg.kv.port}
    async with running(DecodeNode, dcfg) as (decode, dsession), running(PrefillNode, pcfg) as (prefill, psession):
        a = asyncio.create_task(generate(dsession, dcfg, "a", prompt, 1500))  # decodes for ~2 s
        await asyncio.sleep(0.1)
        await push_kv(dcfg, "a", prompt)
        body = {"request_id": "c", "model": MODEL, "prompt_tokens": prompt, "max_tokens": 5}
        c_stream = await dsession.post(f"{dcfg.http.url}/internal/generate", json=body)
        async with psession.post(f"{pcfg.http.url}/internal/prefill",
                                 json={"request_id": "c", "model": MODEL, "prompt_tokens": prompt, "decode": peer}) as r:
            assert r.status == 502
            assert "no KV room" in (await r.json())["reason"]
        assert "c" in decode.gate.refused and not prefill.holding  # the prefill node let the KV go
        c_stream.close()  # what the router does with a request whose handoff failed
        for _ in range(100):
            if "c" not in decode.requests:
                break
            await asyncio.sleep(0.02)
        assert "c" not in decode.requests and not decode.gate.refused
        assert decode.kv.used == cost.kv_bytes(prompt + 1500)  # only a's room is taken
        assert (await a)[-1] == {"type": "done", "output_tokens": 1500}
    [end] = [e for e in events(pcfg, "kv_end") if e["request_id"] == "c"]
    assert end["ok"] is False and "refused after" in end["reason"]


def test_retry_delay_doubles_to_its_cap_and_never_overflows():
    """1, 2, 4, 8, 16, 16 ... model ms; a prefill node refused for minutes (10^5 refusals, as a
    KV-bound simulated deployment reaches) still gets the cap, not an OverflowError."""
    from nodes.engine import KV_RETRY_MAX_S, kv_retry_delay_s

    assert [kv_retry_delay_s(n) * 1e3 for n in range(1, 8)] == [1, 2, 4, 8, 16, 16, 16]
    assert kv_retry_delay_s(0) == kv_retry_delay_s(1)
    assert kv_retry_delay_s(100_000) == KV_RETRY_MAX_S


async def test_last_try_unanswered_after_refusals_reports_no_room(tmp_path):
    """Refused, then the last try not answered before the handoff's time ran out (a busy
    receiver): the failure names the refusals, which are why it failed, and the last try's end."""
    t0 = time.time()
    dcfg = node_config(tmp_path, "decode", "d1", t0)
    pcfg = node_config(tmp_path, "prefill", "p1", t0).model_copy(
        update={"kv_transfer": KvSettings(secret_hex=SECRET, timeout_s=0.5)})
    answers = iter([KvTransferError("no KV room: test", Code.KV_FULL),
                    KvTransferError("transfer not acknowledged within 0.2 s", Code.TIMEOUT)])

    async def send(*_args, **_kwargs):
        raise next(answers)

    async with running(PrefillNode, pcfg) as (prefill, psession):
        prefill._send = send
        peer = {"name": "d1", "host": "127.0.0.1", "port": dcfg.kv.port}
        async with psession.post(f"{pcfg.http.url}/internal/prefill",
                                 json={"request_id": "c", "model": MODEL, "prompt_tokens": 100, "decode": peer}) as r:
            assert r.status == 502
            reason = (await r.json())["reason"]
    assert "no KV room: test; still refused after 1 tries within 0.5 s" in reason
    assert "(the last try: transfer not acknowledged within 0.2 s)" in reason
