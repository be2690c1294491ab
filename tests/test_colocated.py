"""Colocated daemon (the GPU baseline): both phases in one scheduler, prefill-priority or
chunked mixed steps, admission by KV capacity, streaming."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import pytest

from nodes.colocated import ColocatedNode
from nodes.config import Endpoint, NodeConfig, PrefillSettings
from nodes.costmodel import CostModel
from nodes.profiles import load_hardware, load_model
from nodes.tokenizer import token_text

from daemon_helpers import events, free_port, running, INTERNAL_SECRET

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py

MODEL = "qwen3-32b"
HW = "h100"


def config(tmp_path: Path, *, tdf: float = 1.0, budget: int = 16384, chunk: int = 0) -> NodeConfig:
    return NodeConfig(run_id="t1", name="g1", role="colocated", model=MODEL, hardware=HW, tdf=tdf,
                      byte_scale=1.0, t0_wall=time.time(), run_dir=str(tmp_path),
                      http=Endpoint(host="127.0.0.1", port=free_port()),
                      prefill=PrefillSettings(token_budget=budget, chunk_tokens=chunk),
                      internal_secret_hex=INTERNAL_SECRET)


async def generate(session, cfg, rid, prompt, max_tokens) -> list[tuple[float, dict]]:
    """(arrival wall time, line) of every NDJSON line."""
    body = {"request_id": rid, "model": MODEL, "prompt_tokens": prompt, "max_tokens": max_tokens,
            "colocated": True}
    async with session.post(f"{cfg.http.url}/internal/generate", json=body) as r:
        assert r.status == 200, await r.text()
        return [(time.time(), json.loads(line)) async for line in r.content]


def cost() -> CostModel:
    return CostModel(load_hardware(HW), load_model(MODEL))


async def test_both_phases_and_stream(tmp_path):
    cfg = config(tmp_path, tdf=5.0)
    async with running(ColocatedNode, cfg) as (node, session):
        lines = [x for _, x in await generate(session, cfg, "r1", 2000, 5)]
        assert node.kv.used == 0 and not node.requests
    assert [x["type"] for x in lines] == ["token"] * 5 + ["done"]
    assert [x["text"] for x in lines[:-1]] == [token_text("r1", i) for i in range(5)]
    assert [e["event"] for e in events(cfg, rid="r1")] == [
        "prefill_queued", "prefill_start", "prefill_end", "decode_queued", "decode_admitted", "first_token",
        "decode_done"]
    steps = events(cfg, "step_timing")
    assert [s["kind"] for s in steps] == ["prefill"] + ["decode"] * 4
    c = cost()
    assert steps[0]["planned_s"] == pytest.approx(c.prefill([2000], [0]).time_s)
    assert steps[1]["planned_s"] == pytest.approx(c.decode_step([2001]).time_s)
    # the prefill pass produces the first token
    first = events(cfg, "first_token")[0]["t_model"]
    assert first == pytest.approx(events(cfg, "prefill_end")[0]["t_model"], abs=0.01)


async def _stall_of_running_request(tmp_path: Path, chunk: int) -> tuple[float, float]:
    """Largest token gap (model s) of a decoding request while a long prompt is prefilled."""
    c = cost()
    long_prompt = 16000
    tdf = max(1.0, 0.5 / c.prefill([long_prompt]).time_s)
    cfg = config(tmp_path / f"c{chunk}", tdf=tdf, budget=2048 if chunk else 16384, chunk=chunk)
    async with running(ColocatedNode, cfg) as (node, session):
        a = asyncio.create_task(generate(session, cfg, "a", 100, 400))
        while not node.running:
            await asyncio.sleep(0.005)
        b = asyncio.create_task(generate(session, cfg, "b", long_prompt, 2))
        await b
        a.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await a
    start = events(cfg, "prefill_start", "b")[0]["t_model"]
    end = events(cfg, "prefill_end", "b")[0]["t_model"]
    times = [t for t in events(cfg, "step_timing") if t["kind"] == "decode"]
    gaps = []
    prev = None
    for s in times:
        if prev is not None and start - 1e-3 <= s["t_model"] <= end + 1e-3:
            gaps.append(s["t_model"] - prev)
        prev = s["t_model"]
    return (max(gaps) if gaps else end - start), end - start


async def test_chunked_prefill_does_not_stall_decode(tmp_path):
    stall_whole, prefill_whole = await _stall_of_running_request(tmp_path, 0)
    stall_chunked, prefill_chunked = await _stall_of_running_request(tmp_path, 1024)
    # prefill priority: the running request waits for the whole prompt
    assert stall_whole >= 0.9 * prefill_whole
    # chunked mixed steps: it keeps decoding, one token per chunk-sized step
    assert stall_chunked < 0.4 * stall_whole
    assert prefill_chunked > prefill_whole * 0.9


async def test_admission_by_kv_capacity(tmp_path):
    c = cost()
    per_token = load_model(MODEL).kv_bytes_per_token
    out = int(0.55 * c.kv_capacity_bytes() / per_token)  # one request's reservation fits, two do not
    cfg = config(tmp_path, tdf=5.0)
    async with running(ColocatedNode, cfg) as (node, session):
        a = asyncio.create_task(generate(session, cfg, "a", 100, out))
        for _ in range(400):
            if node.running:
                break
            await asyncio.sleep(0.005)
        b = asyncio.create_task(generate(session, cfg, "b", 100, out))
        for _ in range(400):
            if node.waiting:
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.2)
        assert [g.request_id for g in node.waiting] == ["b"] and [g.request_id for g in node.running] == ["a"]
        assert node.kv.used == c.kv_bytes(100 + out) <= node.kv.capacity
        a.cancel()  # the router gives up on "a": its KV is freed and "b" gets in
        for _ in range(400):
            if [g.request_id for g in node.running] == ["b"]:
                break
            await asyncio.sleep(0.005)
        assert [g.request_id for g in node.running] == ["b"] and not node.waiting
        b.cancel()
        await asyncio.gather(a, b, return_exceptions=True)
    t = {(e["event"], e["request_id"]): e["t_wall"] for e in events(cfg)}
    assert t[("prefill_queued", "b")] < t[("failed", "a")] <= t[("prefill_start", "b")]
