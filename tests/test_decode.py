"""Decode daemon: KV verification, admission by KV capacity, deadline-timed continuous
batching, token streaming, disconnects and control commands (drain, resume, slowdown, crash)."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nodes.config import Endpoint, KvSettings, NodeConfig
from nodes.control import Controller, StatusWatcher
from nodes.costmodel import CostModel
from nodes.decode import DecodeNode
from nodes.kvproto import Code, KvBegin, KvTransferError, send_kv
from nodes.profiles import load_hardware, load_model
from nodes.tokenizer import token_text
from testbed.broker import Broker

from daemon_helpers import events, free_port, running, wire_bytes

REPO = Path(__file__).resolve().parents[1]
MODEL = "qwen3-32b"
HW = "cs3"
SECRET = "ab" * 32


def config(tmp_path: Path, *, tdf: float = 1.0, byte_scale: float = 1e-3, timeout_s: float = 10.0,
           **kw) -> NodeConfig:
    return NodeConfig(run_id="t1", name=kw.pop("name", "d1"), role="decode", model=MODEL, hardware=HW, tdf=tdf,
                      byte_scale=byte_scale, t0_wall=time.time(), run_dir=str(tmp_path),
                      http=Endpoint(host="127.0.0.1", port=free_port()),
                      kv=Endpoint(host="127.0.0.1", port=free_port()),
                      kv_transfer=KvSettings(secret_hex=SECRET, timeout_s=timeout_s), internal_secret_hex=SECRET, **kw)


async def push_kv(cfg: NodeConfig, rid: str, tokens: int, *, secret: str = SECRET, total: int | None = None):
    begin = KvBegin(request_id=rid, model=MODEL, layers=load_model(MODEL).layers, tokens=tokens,
                    total_bytes=wire_bytes(cfg, tokens) if total is None else total)
    return await send_kv(cfg.kv.host, cfg.kv.port, bytes.fromhex(secret), begin, chunk_bytes=64 * 1024,
                         timeout_s=10)


async def generate(session, cfg, rid, prompt, max_tokens, status: int = 200) -> list[dict]:
    body = {"request_id": rid, "model": MODEL, "prompt_tokens": prompt, "max_tokens": max_tokens}
    async with session.post(f"{cfg.http.url}/internal/generate", json=body) as r:
        assert r.status == status, await r.text()
        if status != 200:
            return [await r.json()]
        return [json.loads(line) async for line in r.content]


async def generate_with_kv(session, cfg, rid, prompt, max_tokens) -> list[dict]:
    """The router's order: register the request (its stream opens), then its KV arrives."""
    gen = asyncio.create_task(generate(session, cfg, rid, prompt, max_tokens))
    await asyncio.sleep(0.1)
    await push_kv(cfg, rid, prompt)
    return await gen


def check_stream(lines: list[dict], rid: str, n: int) -> None:
    assert [x["type"] for x in lines] == ["token"] * n + ["done"]
    assert [x["index"] for x in lines[:-1]] == list(range(n))
    assert [x["text"] for x in lines[:-1]] == [token_text(rid, i) for i in range(n)]
    assert lines[-1]["output_tokens"] == n


async def test_kv_granted_after_generate_refused_before(tmp_path):
    cfg = config(tmp_path)
    async with running(DecodeNode, cfg) as (node, session):
        # generate first, KV second (the router's order)
        gen = asyncio.create_task(generate(session, cfg, "r1", 300, 8))
        await asyncio.sleep(0.1)
        res = await push_kv(cfg, "r1", 300)
        assert res.bytes_sent == wire_bytes(cfg, 300)
        check_stream(await gen, "r1", 8)
        # KV for a request the node has not registered: no room can be reserved, refused
        with pytest.raises(KvTransferError, match="not registered") as refused:
            await push_kv(cfg, "r2", 200)
        assert refused.value.code == Code.REFUSED
        assert node.kv.used == 0 and not node.requests
    order = [e["event"] for e in events(cfg) if e["request_id"] == "r1"]
    assert order == ["kv_granted", "kv_recv_start", "kv_recv_end", "decode_queued", "decode_admitted",
                     "first_token", "decode_done"]
    done = events(cfg, "decode_done")[0]
    assert done["output_tokens"] == 8 and len(done["token_times"]) == 8
    assert events(cfg, "kv_recv_end")[0]["verified"] is True
    assert [e["event"] for e in events(cfg)][::len(events(cfg)) - 1] == ["node_start", "node_stop"]


async def test_kv_verification_path(tmp_path):
    cfg = config(tmp_path, timeout_s=1.0)
    async with running(DecodeNode, cfg) as (node, session):
        gen = asyncio.create_task(generate(session, cfg, "r1", 300, 4))
        await asyncio.sleep(0.1)
        with pytest.raises(KvTransferError, match="authentication"):
            await push_kv(cfg, "r1", 300, secret="cd" * 32)  # a sender without the run's key
        with pytest.raises(KvTransferError, match="prompt tokens"):
            await push_kv(cfg, "r1", 301, total=wire_bytes(cfg, 301))  # not this request's KV
        with pytest.raises(KvTransferError, match="bytes on the wire"):
            await push_kv(cfg, "r1", 300, total=wire_bytes(cfg, 300) + 1)  # wrong size
        lines = await gen  # no valid KV came: the request fails after kv timeout_s
        assert lines == [{"type": "error", "reason": "no KV cache within 1 s"}]
        # a real one is accepted afterwards for another request; a duplicate is refused
        gen2 = asyncio.create_task(generate(session, cfg, "r2", 100, 3000))  # decodes for ~1 s
        await asyncio.sleep(0.1)
        await push_kv(cfg, "r2", 100)
        with pytest.raises(KvTransferError, match="already received"):
            await push_kv(cfg, "r2", 100)
        check_stream(await gen2, "r2", 3000)
        # bad request bodies
        await generate(session, cfg, "r/3", 100, 2, status=400)
        body = {"request_id": "r3", "model": "other", "prompt_tokens": 1, "max_tokens": 1}
        async with session.post(f"{cfg.http.url}/internal/generate", json=body) as r:
            assert r.status == 400 and "model" in (await r.json())["reason"]
    assert [e["reason"] for e in events(cfg, "failed")] == ["no KV cache within 1 s"]


async def test_transfer_waits_for_kv_capacity(tmp_path):
    """Backpressure: a transfer that does not fit now is refused with KV_FULL before any byte is
    taken (the node never holds more KV than its capacity), and granted once room is back."""
    cfg = config(tmp_path, byte_scale=1e-6)
    cost = CostModel(load_hardware(HW), load_model(MODEL))
    cap = cost.kv_capacity_bytes()
    per_token = load_model(MODEL).kv_bytes_per_token
    prompt = int(0.55 * cap / per_token)  # one request fits, two do not
    async with running(DecodeNode, cfg) as (node, session):
        a = asyncio.create_task(generate(session, cfg, "a", prompt, 6))
        b = asyncio.create_task(generate(session, cfg, "b", prompt, 6))
        await asyncio.sleep(0.1)
        await push_kv(cfg, "a", prompt)
        with pytest.raises(KvTransferError, match="no KV room") as full:
            await push_kv(cfg, "b", prompt)
        assert full.value.code == Code.KV_FULL
        assert node.kv.used == cost.kv_bytes(prompt + 6) <= cap
        assert node.status()["kv_free_bytes"] == cap - node.kv.used
        check_stream(await a, "a", 6)
        await push_kv(cfg, "b", prompt)  # a's KV is released: b's transfer is granted
        check_stream(await b, "b", 6)
        assert node.kv.used == 0
    t = {(e["event"], e["request_id"]): e["t_wall"] for e in events(cfg)}
    assert t[("kv_refused", "b")] < t[("decode_done", "a")] <= t[("kv_granted", "b")] < t[("kv_recv_start", "b")]
    assert [e["request_id"] for e in events(cfg, "kv_recv_start")] == ["a", "b"]  # b's bytes only after its grant
    assert max(e["batch_size"] for e in events(cfg, "decode_admitted")) == 1


async def test_oversized_request_refused(tmp_path):
    cfg = config(tmp_path)
    cap = CostModel(load_hardware(HW), load_model(MODEL)).kv_capacity_bytes()
    too_many = cap // load_model(MODEL).kv_bytes_per_token + 1
    async with running(DecodeNode, cfg) as (node, session):
        [r] = await generate(session, cfg, "big", too_many, 1, status=507)
        assert "capacity" in r["reason"]


async def test_steps_follow_cost_model_on_deadlines(tmp_path):
    tdf = 20.0
    cfg = config(tmp_path, tdf=tdf)
    cost = CostModel(load_hardware(HW), load_model(MODEL))
    n = 30
    async with running(DecodeNode, cfg) as (node, session):
        gen = asyncio.create_task(generate(session, cfg, "r1", 1000, n))
        await asyncio.sleep(0.05)
        await push_kv(cfg, "r1", 1000)
        check_stream(await gen, "r1", n)
    steps = events(cfg, "step_timing")
    assert len(steps) == n and all(s["kind"] == "decode" and s["batch_size"] == 1 for s in steps)
    for i, s in enumerate(steps):
        assert s["planned_s"] == pytest.approx(cost.decode_step([1000 + i]).time_s, rel=1e-9)
    times = events(cfg, "decode_done")[0]["token_times"]
    span = times[-1] - times[0]
    planned = sum(s["planned_s"] for s in steps[1:])
    assert span == pytest.approx(planned, rel=0.1, abs=0.005 / tdf * n)  # model time, deadline-based


async def test_router_disconnect_frees_kv(tmp_path):
    cfg = config(tmp_path, tdf=50.0)
    async with running(DecodeNode, cfg) as (node, session):
        body = {"request_id": "r1", "model": MODEL, "prompt_tokens": 100, "max_tokens": 20000}
        r = await session.post(f"{cfg.http.url}/internal/generate", json=body)
        await push_kv(cfg, "r1", 100)
        assert json.loads(await r.content.readline())["type"] == "token"
        assert node.kv.used > 0
        r.close()  # the router goes away mid-stream
        for _ in range(200):
            if node.kv.used == 0 and not node.requests and not node.running:
                break
            await asyncio.sleep(0.02)
        assert node.kv.used == 0 and not node.requests and not node.running
    assert [e["reason"] for e in events(cfg, "failed")] == ["router disconnected"]


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path, "t1", "127.0.0.1", ["d1", "router"])
    b.start()
    yield b
    b.stop()


async def test_commands_drain_resume_slowdown(tmp_path, broker):
    cfg = config(tmp_path, tdf=10.0, mqtt=broker.mqtt_settings("d1", heartbeat_s=0.2))
    ctl = Controller(broker.mqtt_settings("controller"))
    async with running(DecodeNode, cfg) as (node, session), StatusWatcher(broker.mqtt_settings("router")) as w:
        assert await w.wait_for(lambda w: w.is_up("d1"), 5)
        await ctl.send("d1", "drain")
        assert await w.wait_for(lambda w: w.status("d1")["state"] == "draining", 5)
        [r] = await generate(session, cfg, "r1", 100, 2, status=503)
        assert "draining" in r["reason"]
        await ctl.send("d1", "resume")
        assert await w.wait_for(lambda w: w.status("d1")["state"] == "up", 5)
        check_stream(await generate_with_kv(session, cfg, "r1", 100, 3), "r1", 3)
        await ctl.send("d1", "slowdown", factor=3.0)
        assert await w.wait_for(lambda w: w.status("d1")["slowdown"] == 3.0, 5)
        check_stream(await generate_with_kv(session, cfg, "r2", 100, 3), "r2", 3)
    steps = events(cfg, "step_timing")
    assert len(steps) == 6
    assert steps[3]["planned_s"] == pytest.approx(3.0 * steps[0]["planned_s"], rel=1e-3)
    assert [(e["cmd"], e["factor"]) for e in events(cfg, "control")] == [
        ("drain", None), ("resume", None), ("slowdown", 3.0)]


async def test_crash_command_exits_and_last_will_fires(tmp_path, broker):
    cfg = config(tmp_path, mqtt=broker.mqtt_settings("d1", heartbeat_s=0.2))
    path = tmp_path / "d1.json"
    cfg.save(path)
    proc = subprocess.Popen([sys.executable, "-m", "nodes", "--config", str(path)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        async with StatusWatcher(broker.mqtt_settings("router")) as w:
            assert await w.wait_for(lambda w: w.is_up("d1"), 30)
            await Controller(broker.mqtt_settings("controller")).send("d1", "crash")
            assert await asyncio.to_thread(proc.wait, 10) == 1
            assert await w.wait_for(lambda w: w.status("d1")["state"] == "offline", 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    ev = events(cfg)
    assert [e["event"] for e in ev] == ["node_start", "control"]  # no node_stop: it crashed
    assert ev[-1]["cmd"] == "crash"


async def test_kv_over_srd_on_the_same_port(tmp_path):
    """The decode node takes SRD transfers on its KV port over UDP, with the same grant,
    refusal and verification as TCP; hostile datagrams become kv_dropped events."""
    import socket

    from nodes.srd import send_kv_srd

    cfg = config(tmp_path)
    async with running(DecodeNode, cfg) as (node, session):
        gen = asyncio.create_task(generate(session, cfg, "r1", 300, 8))
        await asyncio.sleep(0.1)
        begin = KvBegin(request_id="r1", model=MODEL, layers=load_model(MODEL).layers, tokens=300,
                        total_bytes=wire_bytes(cfg, 300))
        res = await send_kv_srd([(cfg.kv.host, cfg.kv.port)], bytes.fromhex(SECRET), begin, mtu=9001, timeout_s=10)
        assert res.transport == "srd" and res.bytes_sent == wire_bytes(cfg, 300)
        check_stream(await gen, "r1", 8)
        with pytest.raises(KvTransferError, match="not registered") as refused:
            await send_kv_srd([(cfg.kv.host, cfg.kv.port)], bytes.fromhex(SECRET),
                              KvBegin("r2", MODEL, begin.layers, 200, wire_bytes(cfg, 200)), mtu=9001, timeout_s=10)
        assert refused.value.code == Code.REFUSED
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"PDSR\x01\x05" + bytes(60), (cfg.kv.host, cfg.kv.port))   # DATA of no session
        s.close()
        for _ in range(250):  # a loopback datagram is read within milliseconds; 5 s on a loaded machine
            if node.srd_receiver.dropped["unknown_session"]:
                break
            await asyncio.sleep(0.02)
        assert node.srd_receiver.dropped["unknown_session"] == 1
    order = [e["event"] for e in events(cfg) if e["request_id"] == "r1"]
    assert order == ["kv_granted", "kv_recv_start", "kv_recv_end", "decode_queued", "decode_admitted",
                     "first_token", "decode_done"]
    dropped = events(cfg, "kv_dropped")
    assert [(e["reason"], e["count"]) for e in dropped] == [("unknown_session", 1)]
