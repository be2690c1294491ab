"""Hostile input, property-based: whatever a client sends, the router answers with a clear
OpenAI-style error (never a 5xx), and a compute node's internal API refuses callers without the
run's token; both keep serving normal requests afterwards. A bounded fuzz budget runs here;
benchmarks/fuzz_router.py runs a longer one."""
from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import aiohttp
from hypothesis import HealthCheck, given, settings, strategies as st
import pytest

from nodes.auth import INTERNAL_AUTH_HEADER
from nodes.decode import DecodeNode

from daemon_helpers import events, running
from test_decode import config as decode_config, generate, generate_with_kv
from test_router import MODEL, cluster, post  # noqa: F401  (cluster is a fixture)

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py

FUZZ_EXAMPLES = int(os.environ.get("PDTB_FUZZ_EXAMPLES", "120"))  # per property; benchmarks/fuzz_router.py: more

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options", "n",
          "pdtb_prompt_tokens", "temperature", "top_p", "stop", "seed", "logprobs", "tools", "user", "echo"]
VALID = {"model": MODEL, "prompt": "x", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _check_answer(status: int, raw: bytes, what: Any) -> None:
    assert status < 500, (what, raw[:300])
    if status != 200:
        err = json.loads(raw)["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"], (what, err)


@FUZZ
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=json_values)
async def test_any_json_body_gets_a_clear_answer(cluster, path, body):
    url = cluster.url if cluster.url else await cluster.start()
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, data=json.dumps(body, allow_nan=True),
                          headers={"Content-Type": "application/json"}) as r:
            _check_answer(r.status, await r.read(), body)


@FUZZ
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), field=st.sampled_from(FIELDS),
       value=json_values)
async def test_any_value_of_any_field_gets_a_clear_answer(cluster, path, field, value):
    url = cluster.url if cluster.url else await cluster.start()
    body = {**VALID, field: value}
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, data=json.dumps(body, allow_nan=True),
                          headers={"Content-Type": "application/json"}) as r:
            _check_answer(r.status, await r.read(), body)


@FUZZ
@given(raw=st.binary(max_size=300))
async def test_any_bytes_get_a_clear_answer(cluster, raw):
    url = cluster.url if cluster.url else await cluster.start()
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/completions", data=raw, headers={"Content-Type": "application/json"}) as r:
            _check_answer(r.status, await r.read(), raw)


async def test_router_serves_normally_after_the_fuzz(cluster):
    url = await cluster.start()
    async with aiohttp.ClientSession() as s:
        for raw in (b"[" * 10_000, b"\x00" * 1000, json.dumps({"model": MODEL, "prompt": "x", "n": 5}).encode()):
            async with s.post(url + "/v1/completions", data=raw) as r:
                _check_answer(r.status, await r.read(), raw)
                assert r.status == 400
    status, answer, _ = await post(url, "/v1/completions", {"model": MODEL, "prompt": "ok", "max_tokens": 2})
    assert status == 200 and answer["usage"]["completion_tokens"] == 2


async def test_internal_api_refuses_callers_without_the_run_token(tmp_path):
    cfg = decode_config(tmp_path)
    body = {"request_id": "evil1", "model": cfg.model, "prompt_tokens": 100, "max_tokens": 2}
    async with running(DecodeNode, cfg) as (node, session):
        async with aiohttp.ClientSession() as outsider:
            for headers in ({}, {INTERNAL_AUTH_HEADER: "0" * 64}, {INTERNAL_AUTH_HEADER: ""}):
                for method, path in (("POST", "/internal/generate"), ("GET", "/internal/status")):
                    async with outsider.request(method, cfg.http.url + path, json=body, headers=headers) as r:
                        assert r.status == 401, (path, headers)
            async with outsider.get(cfg.http.url + "/health") as r:
                assert r.status == 200  # health stays open for the orchestrator's readiness probe
        assert "evil1" not in node.requests
        # the authenticated caller (the router's token) is served as before
        lines = await generate_with_kv(session, cfg, "r1", 100, 2)
        assert lines[-1]["type"] == "done"
    rejected = events(cfg, "auth_rejected")
    assert len(rejected) == 6 and {e["path"] for e in rejected} == {"/internal/generate", "/internal/status"}


async def test_a_burst_beyond_max_inflight_is_refused_at_once_and_every_request_ends(cluster):
    """40 simultaneous requests against a limit of 4: each ends as 200 or 429 with a reason, none
    hangs, the refusals are immediate, and /metrics accounts for the same requests. Each admitted
    request streams 10 tokens 0.2 s apart (>= 2 s) while the 40 loopback requests arrive within
    milliseconds: seconds of margin on a loaded machine."""
    burst, limit = 40, 4
    url = await cluster.start(itl_s=0.2, max_inflight=limit)
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 10}

    async def one(i: int) -> tuple[int, dict, str | None]:
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/completions", json=body, headers={"x-request-id": f"b{i}"}) as r:
                return r.status, json.loads(await r.text()), r.headers.get("Retry-After")

    async with asyncio.timeout(60):
        results = await asyncio.gather(*(one(i) for i in range(burst)))
    done = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(done) + len(refused) == burst and limit <= len(done) < burst, [r[0] for r in results]
    assert all(a["error"]["code"] == "overloaded" and ra == "1" for _, a, ra in refused)
    assert all(a["usage"]["completion_tokens"] == 10 for _, a, _ in done)
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/metrics") as r:
            text = await r.text()
    assert f'pdtb:requests_total{{outcome="rejected"}} {float(len(refused))}' in text
    assert f'pdtb:requests_total{{outcome="completed"}} {float(len(done))}' in text


async def test_slow_clients_are_cut_and_the_router_keeps_serving(cluster):
    """A bounded slowloris: 200 connections that never finish their headers and one that never
    finishes its body are closed after router.client_timeout_s (here 1 s; the body one with a 408),
    and a normal request is served while they hang. The 20 s bound is 20x the timeout."""
    url = await cluster.start(client_timeout_s=1.0)
    port = int(url.rsplit(":", 1)[1])
    slow: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(200):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # headers never end
        slow.append((reader, writer))
    body_reader, body_writer = await asyncio.open_connection("127.0.0.1", port)
    body_writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"model\": ")  # the body never ends
    status, answer, _ = await post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert status == 200 and answer["usage"]["completion_tokens"] == 2
    async with asyncio.timeout(20):
        reply = await body_reader.read()  # the router answers 408 and closes
        for reader, _ in slow:
            assert await reader.read() == b""  # closed by the router without an answer
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
    for _, writer in [*slow, (body_reader, body_writer)]:
        writer.close()


async def test_a_full_node_queue_is_a_503_with_retry_after(cluster):
    url = await cluster.start()
    cluster.decodes[0].mode = "http503"
    status, answer, headers = await post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert status == 503 and headers["Retry-After"] == "1"
    assert answer["error"]["code"] == "node_unavailable" and "decode.max_queue" in answer["error"]["message"]
    [failed] = cluster.events("failed")
    assert "d0 is unavailable" in failed["reason"]


async def test_decode_and_prefill_queues_are_bounded(tmp_path):
    """Beyond ``max_queue`` waiting requests a node answers 503 at once instead of queueing."""
    from nodes.config import DecodeSettings, PrefillSettings
    from nodes.prefill import PrefillNode
    from test_prefill import config as prefill_config, prefill

    dcfg = decode_config(tmp_path, decode=DecodeSettings(max_queue=2))
    async with running(DecodeNode, dcfg) as (node, session):
        waiting = [asyncio.create_task(generate(session, dcfg, f"q{i}", 100, 2)) for i in range(2)]
        for _ in range(100):
            if len(node.requests) == 2:
                break
            await asyncio.sleep(0.02)
        [refused] = await generate(session, dcfg, "q2", 100, 2, status=503)
        assert "decode.max_queue" in refused["reason"]
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
    pcfg = prefill_config(tmp_path / "p", timeout_s=0.2).model_copy(
        update={"prefill": PrefillSettings(token_budget=30000, max_queue=1)})
    dead = {"name": "d9", "host": "127.0.0.1", "port": 9}  # the handoffs fail; only the queue matters here
    async with running(PrefillNode, pcfg) as (node, session):
        # each 30k-token prompt computes for ~1 s on trn2; the first starts, the second waits
        first = asyncio.create_task(prefill(session, pcfg, "p0", 30000, dead, status=502))
        for _ in range(100):
            if node.queue and node.queue[0].started:
                break
            await asyncio.sleep(0.02)
        second = asyncio.create_task(prefill(session, pcfg, "p1", 30000, dead, status=502))
        for _ in range(100):
            if len(node.queue) == 2:
                break
            await asyncio.sleep(0.02)
        answer = await prefill(session, pcfg, "p2", 30000, dead, status=503)
        assert "prefill.max_queue" in answer["reason"]
        await asyncio.gather(first, second)
