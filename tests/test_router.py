"""The router against fake prefill/decode nodes that speak the internal API of docs/architecture.md."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from daemon_helpers import INTERNAL_SECRET
from nodes.config import Endpoint, NodeConfig, PeerInfo, RouterSettings
from nodes.router import DEFAULT_CONTEXT_TOKENS, ROUTER_KEY, ApiError, make_app, make_runner, parse_request
from nodes.timeline import read_timeline
from nodes.tokenizer import count_chat_tokens, count_tokens, synthetic_text, token_text

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py

MODEL = "llama-3-1-8b"
REPO = Path(__file__).resolve().parent.parent


class FakeDecode:
    """A decode (or colocated) node: registers the request, waits for the fake KV, streams tokens."""

    def __init__(self, name: str, *, itl_s: float = 0.0):
        self.name = name
        self.itl_s = itl_s
        self.mode = "ok"  # ok | http500 | http503 | error_after | die_after | short | silent
        self.error_after = 2
        self.requests: dict[str, dict[str, Any]] = {}
        self.kv: dict[str, asyncio.Event] = {}
        self.dropped: set[str] = set()
        self.completed: set[str] = set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/internal/generate", self.generate)
        return app

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        rid = body["request_id"]
        self.requests[rid] = body
        if self.mode == "http500":
            return web.json_response({"ok": False, "reason": "broken"}, status=500)
        if self.mode == "http503":
            return web.json_response({"ok": False, "reason": "3 requests waiting (decode.max_queue)"}, status=503)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)  # registered: the router may now start the prefill
        kv = self.kv.setdefault(rid, asyncio.Event())
        try:
            while not body["colocated"] and not kv.is_set():
                if request.transport is None or request.transport.is_closing():
                    self.dropped.add(rid)
                    return resp
                try:
                    await asyncio.wait_for(kv.wait(), 0.02)
                except TimeoutError:
                    pass
            n = body["max_tokens"] - (1 if self.mode == "short" else 0)
            first = body.get("first_index", 0)
            t_next = time.monotonic()
            for i in range(first, first + n):
                if self.mode == "error_after" and i == self.error_after:
                    await resp.write(b'{"type": "error", "reason": "decode exploded"}\n')
                    return resp
                if self.mode == "die_after" and i == self.error_after:
                    request.transport.abort()  # the node crashes mid-stream: the connection is cut
                    self.dropped.add(rid)
                    return resp
                await resp.write(json.dumps({"type": "token", "index": i, "text": token_text(rid, i)}).encode() + b"\n")
                if self.itl_s:
                    t_next += self.itl_s
                    await asyncio.sleep(max(0.0, t_next - time.monotonic()))
            if self.mode == "silent":
                await asyncio.sleep(30)
            await resp.write(json.dumps({"type": "done", "output_tokens": first + n}).encode() + b"\n")
            await resp.write_eof()
            self.completed.add(rid)
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            self.dropped.add(rid)
        return resp


class FakePrefill:
    """A prefill node: checks the decode registered the request, then 'hands off' the KV."""

    def __init__(self, name: str, decodes: dict[tuple[str, int], FakeDecode], *, delay_s: float = 0.0):
        self.name = name
        self.decodes = decodes
        self.delay_s = delay_s
        self.fail: str | None = None
        self.requests: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/internal/prefill", self.prefill)
        return app

    async def prefill(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        await asyncio.sleep(self.delay_s)
        if self.fail:
            return web.json_response({"ok": False, "reason": self.fail}, status=500)
        d = body["decode"]
        decode = self.decodes.get((d["host"], d["port"]))
        if decode is None or decode.name != d["name"]:
            return web.json_response({"ok": False, "reason": f"no decode at {d}"}, status=500)
        if body["request_id"] not in decode.requests:
            return web.json_response({"ok": False, "reason": "decode did not register the request"}, status=500)
        decode.kv.setdefault(body["request_id"], asyncio.Event()).set()
        return web.json_response({"ok": True, "kv_bytes": body["prompt_tokens"] * 1024})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Fake nodes plus an in-process router on ephemeral loopback ports."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.runners: list[web.AppRunner] = []
        self.decodes: list[FakeDecode] = []
        self.prefills: list[FakePrefill] = []
        self.kv_map: dict[tuple[str, int], FakeDecode] = {}
        self.peers: list[PeerInfo] = []
        self.config: NodeConfig | None = None
        self.app: web.Application | None = None
        self.url = ""

    async def _serve(self, app: web.Application, runner: web.AppRunner | None = None) -> int:
        runner = runner or web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.runners.append(runner)
        return runner.addresses[0][1]

    async def start(self, *, prefill: int = 1, decode: int = 1, colocated: int = 0, itl_s: float = 0.0,
                    prefill_delay_s: float = 0.0, status=None, tdf: float = 1.0, **router: Any) -> str:
        for i in range(colocated or decode):
            node = FakeDecode(f"c{i}" if colocated else f"d{i}", itl_s=itl_s)
            port = await self._serve(node.app())
            kv_port = 20000 + i  # the fake KV endpoint: only compared, never connected to
            self.kv_map[("127.0.0.1", kv_port)] = node
            self.decodes.append(node)
            self.peers.append(PeerInfo(name=node.name, role="colocated" if colocated else "decode",
                                       http=Endpoint(host="127.0.0.1", port=port),
                                       kv=Endpoint(host="127.0.0.1", port=kv_port)))
        for i in range(0 if colocated else prefill):
            node = FakePrefill(f"p{i}", self.kv_map, delay_s=prefill_delay_s)
            port = await self._serve(node.app())
            self.prefills.append(node)
            self.peers.append(PeerInfo(name=node.name, role="prefill", http=Endpoint(host="127.0.0.1", port=port)))
        self.config = NodeConfig(run_id="t", name="router", role="router", model=MODEL, tdf=tdf, byte_scale=1.0,
                                 t0_wall=time.time(), run_dir=str(self.run_dir), peers=self.peers,
                                 router=RouterSettings(**router), internal_secret_hex=INTERNAL_SECRET)
        kwargs = {"status": status} if status else {}
        self.app = make_app(self.config, **kwargs)
        port = await self._serve(self.app, make_runner(self.app))
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        path = self.run_dir / "timeline" / "router.jsonl"
        return [e for e in read_timeline(path) if event is None or e["event"] == event]

    async def close(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()


@pytest.fixture
async def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    await c.close()


async def post(url: str, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})}) as r:
            text = await r.text()
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = text
            return r.status, parsed, r.headers.copy()


async def sse(url: str, path: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """The raw data: payloads of a streamed response."""
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, json=body, headers=headers or {}) as r:
            raw = (await r.read()).decode()
    return r.status, [line[6:] for line in raw.split("\n\n") if line.startswith("data: ")]


# ---- exact counts and usage ---------------------------------------------------------------

async def test_completion_counts_and_usage(cluster):
    url = await cluster.start()
    prompt = "Hello, tokenizer world!"  # Hell o , toke nize r worl d !
    status, body, headers = await post(url, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 5},
                                       {"x-request-id": "abc-1"})
    assert status == 200, body
    assert headers["x-request-id"] == "abc-1"
    assert body["id"] == "cmpl-abc-1" and body["object"] == "text_completion" and body["model"] == MODEL
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
    choice = body["choices"][0]
    assert choice["text"] == synthetic_text("abc-1", 5) and count_tokens(choice["text"]) == 5
    assert choice["finish_reason"] == "length"
    prefill_body = cluster.prefills[0].requests[0]
    assert prefill_body["prompt_tokens"] == 9 and prefill_body["decode"]["name"] == "d0"
    assert cluster.decodes[0].requests["abc-1"]["max_tokens"] == 5
    assert cluster.decodes[0].requests["abc-1"]["colocated"] is False


async def test_chat_counts_rendered_template(cluster):
    url = await cluster.start()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    status, body, _ = await post(url, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 3})
    assert status == 200, body
    # "<|system|>" 6 (<, |, syst, em, |, >), "Be brief." 4, "<|user|>" 5, "Hi" 1, "<|assistant|>" 7
    assert body["usage"]["prompt_tokens"] == count_chat_tokens(messages) == 23
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert count_tokens(body["choices"][0]["message"]["content"]) == 3


async def test_extension_field_overrides_prompt_length(cluster):
    url = await cluster.start()
    status, body, _ = await post(url, "/v1/completions",
                                 {"model": MODEL, "prompt": "ignored text", "pdtb_prompt_tokens": 4321, "max_tokens": 2})
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == 4321
    assert cluster.prefills[0].requests[0]["prompt_tokens"] == 4321
    status, body, _ = await post(url, "/v1/completions", {"model": MODEL, "pdtb_prompt_tokens": 7, "max_tokens": 1})
    assert status == 200 and body["usage"]["prompt_tokens"] == 7  # prompt may be omitted


async def test_token_ids_prompt(cluster):
    url = await cluster.start()
    status, body, _ = await post(url, "/v1/completions", {"model": MODEL, "prompt": [1, 2, 3, 4], "max_tokens": 1})
    assert status == 200 and body["usage"]["prompt_tokens"] == 4


# ---- streaming through the openai SDK -----------------------------------------------------

async def test_openai_sdk_streaming_completions_with_usage(cluster):
    url = await cluster.start(itl_s=0.002)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused")
    stream = await client.completions.create(model=MODEL, prompt="one two six", max_tokens=40, stream=True,
                                             stream_options={"include_usage": True})
    texts, usage, finish = [], None, None
    async for chunk in stream:
        if chunk.choices:
            texts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(texts) == 40 and all(texts)
    assert count_tokens("".join(texts)) == 40
    assert finish == "length"
    assert usage.prompt_tokens == 3 and usage.completion_tokens == 40 and usage.total_tokens == 43
    await client.close()


async def test_openai_sdk_chat_streaming_and_models(cluster):
    url = await cluster.start()
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused")
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                                  max_tokens=7, stream=True)
    chunks = [c async for c in stream]
    assert all(c.usage is None for c in chunks)  # usage only when asked for
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert count_tokens(content) == 7 and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    reply = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                                 max_completion_tokens=4)
    assert reply.usage.completion_tokens == 4 and count_tokens(reply.choices[0].message.content) == 4
    await client.close()


def test_sync_openai_sdk_non_streaming(cluster):
    async def start() -> str:
        return await cluster.start()

    loop = asyncio.new_event_loop()
    url = loop.run_until_complete(start())
    # the router runs on `loop`: serve it from a thread while the sync SDK calls it
    import threading
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        reply = client.completions.create(model=MODEL, prompt="a b c d e", max_tokens=12)
        assert reply.usage.prompt_tokens == 5 and reply.usage.completion_tokens == 12
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    finally:
        asyncio.run_coroutine_threadsafe(cluster.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


# ---- errors: OpenAI-style bodies, and the router keeps serving ------------------------------

BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, "invalid_json"),
    ("/v1/completions", b"\xff\xfe", 400, "invalid_json"),
    ("/v1/completions", [1, 2], 400, None),
    ("/v1/completions", {"prompt": "x"}, 400, "missing_required_parameter"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model_not_found"),
    ("/v1/completions", {"model": MODEL}, 400, "missing_required_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": 5}, 400, "invalid_type"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "unsupported_value"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**12}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "5"}, 400, "invalid_type"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": True}, 400, "invalid_type"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2.5}, 400, "invalid_type"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 3}, 400, "unsupported_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 2}, 400, "unsupported_parameter"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}, 400, "unsupported_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 3}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": "high"}, 400, "invalid_type"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_type"),
    ("/v1/completions", {"model": MODEL, "prompt": [[["deep"]]]}, 400, "invalid_type"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "invalid_type"),
    ("/v1/completions", {"model": MODEL, "pdtb_prompt_tokens": 0}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "pdtb_prompt_tokens": 10**9}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "pdtb_prompt_tokens": DEFAULT_CONTEXT_TOKENS - 10, "max_tokens": 100},
     400, "context_length_exceeded"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 7}]}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": DEFAULT_CONTEXT_TOKENS + 1}, 400, "invalid_value"),
]


def test_context_bound_is_the_served_models_context_length():
    from nodes.profiles import load_model
    context = load_model("mixtral-8x7b").context_length
    assert context == 32768
    fits = parse_request({"model": "m", "pdtb_prompt_tokens": context - 16, "max_tokens": 16},
                         chat=False, model="m", context_tokens=context)
    assert (fits.prompt_tokens, fits.max_tokens) == (context - 16, 16)
    with pytest.raises(ApiError) as over:
        parse_request({"model": "m", "pdtb_prompt_tokens": context - 16, "max_tokens": 17},
                      chat=False, model="m", context_tokens=context)
    assert over.value.code == "context_length_exceeded" and "32768 tokens" in over.value.message
    with pytest.raises(ApiError) as too_long:
        parse_request({"model": "m", "messages": [{"role": "user", "content": "x"}],
                       "max_completion_tokens": context + 1}, chat=True, model="m", context_tokens=context)
    assert too_long.value.code == "invalid_value"

async def test_bad_requests_get_openai_errors_and_router_keeps_serving(cluster):
    url = await cluster.start()
    for path, body, status_expected, code in BAD_REQUESTS:
        status, answer, _ = await post(url, path, body)
        assert status == status_expected, (body, answer)
        err = answer["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"] == "invalid_request_error"
        assert err["code"] == code, (body, err)
    status, answer, _ = await post(url, "/v1/completions", b"x" * (40 * 1024 * 1024))
    assert status == 413 and answer["error"]["code"] == "body_too_large"
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/v1/nothing") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        async with s.get(url + "/v1/completions") as r:
            assert r.status == 405 and "error" in await r.json()
        async with s.get(url + "/health") as r:
            assert (await r.json()) == {"ok": True, "role": "router", "name": "router"}
    status, answer, _ = await post(url, "/v1/completions", {"model": MODEL, "prompt": "still alive", "max_tokens": 3})
    assert status == 200 and answer["usage"]["completion_tokens"] == 3
    assert cluster.decodes[0].requests.keys() == {answer["id"][5:]}  # rejected requests never reached a node
    rejected = cluster.events("failed")
    assert len(rejected) == len(BAD_REQUESTS) + 1 and all(e["reason"].startswith("rejected") for e in rejected)


async def test_request_ids(cluster):
    url = await cluster.start(itl_s=0.05)
    _, body, headers = await post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1},
                                  {"x-request-id": "bad id with spaces"})
    assert headers["x-request-id"].startswith("req-") and body["id"] == "cmpl-" + headers["x-request-id"]
    first = asyncio.create_task(post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10},
                                     {"x-request-id": "dup"}))
    await asyncio.sleep(0.2)
    status, body, _ = await post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1},
                                 {"x-request-id": "dup"})
    assert status == 409 and body["error"]["code"] == "duplicate_request_id"
    assert (await first)[0] == 200


# ---- failures after routing ----------------------------------------------------------------

async def test_prefill_failure_streaming_and_not(cluster):
    url = await cluster.start()
    cluster.prefills[0].fail = "kv handoff timed out"
    status, body, _ = await post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4, "stream": True},
                                 {"x-request-id": "pf1"})
    # no token was sent yet, so the stream has not started: an HTTP error, as without streaming
    assert status == 502, body
    err = body["error"]
    assert "kv handoff timed out" in err["message"] and err["code"] == "prefill_failed" and err["type"] == "server_error"
    status, body, _ = await post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4},
                                 {"x-request-id": "pf2"})
    assert status == 502 and body["error"]["code"] == "prefill_failed"
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIError, match="kv handoff timed out"):
        stream = await client.completions.create(model=MODEL, prompt="x", max_tokens=4, stream=True)
        async for _ in stream:
            pass
    await client.close()
    for _ in range(100):  # the router closed the decode streams: the node drops the requests
        if {"pf1", "pf2"} <= cluster.decodes[0].dropped:
            break
        await asyncio.sleep(0.02)
    assert {"pf1", "pf2"} <= cluster.decodes[0].dropped
    failed = {e["request_id"]: e["reason"] for e in cluster.events("failed")}
    assert "kv handoff timed out" in failed["pf1"] and "kv handoff timed out" in failed["pf2"]
    cluster.prefills[0].fail = None
    status, body, _ = await post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert status == 200


async def test_decode_failures(cluster):
    url = await cluster.start()
    decode = cluster.decodes[0]
    decode.mode = "error_after"
    status, events = await sse(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5, "stream": True})
    assert [json.loads(e)["choices"][0]["text"] != "" for e in events[:2]] == [True, True]
    assert "decode exploded" in json.loads(events[2])["error"]["message"] and events[3] == "[DONE]"
    decode.mode = "short"
    status, body, _ = await post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5})
    assert status == 502 and "expected 5" in body["error"]["message"]
    decode.mode = "http500"
    status, body, _ = await post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5})
    assert status == 502 and "HTTP 500" in body["error"]["message"]
    decode.mode = "ok"
    status, body, _ = await post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5})
    assert status == 200


async def test_unreachable_decode_and_timeout(cluster, tmp_path):
    url = await cluster.start(request_timeout_s=0.5)
    cluster.decodes[0].mode = "silent"  # all tokens, then nothing
    t = time.monotonic()
    status, body, _ = await post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert status == 504 and body["error"]["code"] == "timeout"
    assert 0.4 < time.monotonic() - t < 5
    router = cluster.app[ROUTER_KEY]
    dead = PeerInfo(name="d9", role="decode", http=Endpoint(host="127.0.0.1", port=free_port()),
                    kv=Endpoint(host="127.0.0.1", port=1))
    router.decode_nodes = [dead]
    status, body, _ = await post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert status == 502 and "unreachable" in body["error"]["message"]


async def test_client_disconnect_drops_the_request(cluster):
    url = await cluster.start(itl_s=0.05)
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 200,
                                                         "stream": True}, headers={"x-request-id": "gone"}) as r:
            await r.content.readline()
    for _ in range(200):
        if "gone" in cluster.decodes[0].dropped and cluster.events("failed"):
            break
        await asyncio.sleep(0.02)
    assert "gone" in cluster.decodes[0].dropped
    assert cluster.events("failed")[0]["reason"] == "client_disconnected"


# ---- modes, routing, timeline ---------------------------------------------------------------

async def test_colocated_mode(cluster):
    url = await cluster.start(colocated=2)
    for i in range(4):
        status, body, _ = await post(url, "/v1/completions", {"model": MODEL, "prompt": "x y", "max_tokens": 3},
                                     {"x-request-id": f"co{i}"})
        assert status == 200 and body["usage"]["completion_tokens"] == 3
    assert [len(d.requests) for d in cluster.decodes] == [2, 2]  # round robin without status
    assert all(b["colocated"] is True for d in cluster.decodes for b in d.requests.values())
    routed = cluster.events("routed")
    assert routed[0]["prefill"] is None and routed[0]["decode"] == "c0"


async def test_policies_use_status_and_skip_draining(cluster):
    statuses = {
        "d0": {"state": "up", "queue_depth": 50, "batch_size": 9, "kv_free_bytes": 10, "t_wall": time.time() + 60},
        "d1": {"state": "up", "queue_depth": 0, "batch_size": 1, "kv_free_bytes": 10**12, "t_wall": time.time() + 60},
        "p0": {"state": "draining"},
    }
    url = await cluster.start(prefill=2, decode=2, status=statuses.get, decode_policy="kv_aware",
                              prefill_policy="least_loaded")
    for _ in range(3):
        status, _, _ = await post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert status == 200
    assert len(cluster.decodes[1].requests) == 3 and not cluster.decodes[0].requests
    assert len(cluster.prefills[1].requests) == 3 and not cluster.prefills[0].requests
    statuses["p1"] = {"state": "offline"}
    status, body, _ = await post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert status == 503 and body["error"]["code"] == "no_available_node"


async def test_timeline_events(cluster):
    url = await cluster.start()
    await post(url, "/v1/completions", {"model": MODEL, "prompt": "a b", "max_tokens": 3, "stream": True},
               {"x-request-id": "tl1"})
    events = [e for e in cluster.events() if e["request_id"] == "tl1"]
    assert [e["event"] for e in events] == ["arrival", "routed", "done"]
    arrival, routed, done = events
    assert (arrival["prompt_tokens"], arrival["max_tokens"], arrival["stream"]) == (2, 3, True)
    assert (routed["prefill"], routed["decode"]) == ("p0", "d0")
    assert (done["prompt_tokens"], done["output_tokens"]) == (2, 3)
    assert arrival["t_model"] <= done["t_model"]


def test_config_errors(tmp_path):
    base = dict(run_id="t", name="router", role="router", model=MODEL, tdf=1.0, byte_scale=1.0,
                t0_wall=time.time(), run_dir=str(tmp_path), internal_secret_hex=INTERNAL_SECRET)
    http = Endpoint(host="127.0.0.1", port=1)
    with pytest.raises(ValueError, match="at least one prefill and one decode"):
        make_app(NodeConfig(**base, peers=[PeerInfo(name="p0", role="prefill", http=http)]))
    with pytest.raises(ValueError, match="no 'kv' endpoint"):
        make_app(NodeConfig(**base, peers=[PeerInfo(name="p0", role="prefill", http=http),
                                           PeerInfo(name="d0", role="decode", http=http)]))
    with pytest.raises(ValueError, match="mix"):
        make_app(NodeConfig(**base, peers=[PeerInfo(name="c0", role="colocated", http=http),
                                           PeerInfo(name="p0", role="prefill", http=http)]))


async def test_entry_point_subprocess(cluster, tmp_path):
    await cluster.start()  # only for its fake nodes
    port = free_port()
    config = cluster.config.model_copy(update={"http": Endpoint(host="127.0.0.1", port=port),
                                               "run_dir": str(tmp_path / "sub")})
    path = tmp_path / "router.json"
    config.save(path)
    proc = subprocess.Popen([sys.executable, "-m", "nodes", "--config", str(path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(150):
            try:
                async with aiohttp.ClientSession() as s:
                    async with s.get(url + "/health") as r:
                        if r.status == 200:
                            break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        status, body, _ = await post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4})
        assert status == 200 and body["usage"]["completion_tokens"] == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=10)
    assert proc.returncode == 0, err.decode()
    events = [e["event"] for e in read_timeline(tmp_path / "sub" / "timeline" / "router.jsonl")]
    assert events[0] == "node_start" and events[-1] == "node_stop" and "done" in events


async def test_hostile_bodies_never_cause_server_errors(cluster):
    url = await cluster.start()
    weird: list[Any] = [None, True, 0, -1, 2**70, 1.5, float("inf"), "", "x" * 1000, [], [None], [[]], {}, {"a": 1},
                        [{"role": []}], [{"role": "user", "content": [{"type": "text"}]}], [1, "a"], [[1], [2]]]
    fields = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options",
              "n", "pdtb_prompt_tokens"]
    valid = {"model": MODEL, "prompt": "x", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    async with aiohttp.ClientSession() as s:
        for path in ("/v1/completions", "/v1/chat/completions"):
            for field in fields:
                for value in weird:
                    body = json.dumps({**valid, field: value}, allow_nan=True)
                    async with s.post(url + path, data=body, headers={"Content-Type": "application/json"}) as r:
                        answer = await r.read()
                        assert r.status < 500, (path, field, value, answer)
                        if r.status != 200:
                            assert "error" in json.loads(answer)


async def test_streaming_failures_before_the_node_accepts_are_http_errors(cluster):
    statuses: dict[str, dict] = {}
    url = await cluster.start(status=statuses.get)
    cluster.decodes[0].mode = "http500"
    status, events = await sse(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, "stream": True})
    assert status == 502 and events == []
    statuses["d0"] = {"state": "offline"}
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        await client.completions.create(model=MODEL, prompt="x", max_tokens=2, stream=True)
    assert info.value.status_code == 503
    await client.close()


async def test_deeply_nested_json_is_a_400_not_a_500(cluster):
    url = await cluster.start()
    for raw in (b"[" * 10_000, b'{"a":' * 10_000, b"\xff\xfe not utf-8"):
        status, answer, _ = await post(url, "/v1/completions", raw)
        assert status == 400 and answer["error"]["code"] == "invalid_json", answer
    status, answer, _ = await post(url, "/v1/completions", {"model": MODEL, "prompt": "fine", "max_tokens": 2})
    assert status == 200 and answer["usage"]["completion_tokens"] == 2


async def test_beyond_max_inflight_the_router_answers_429_with_retry_after(cluster):
    url = await cluster.start(max_inflight=2, itl_s=0.2)  # slow streams keep two in flight
    slow = [asyncio.create_task(post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5}))
            for _ in range(2)]
    await asyncio.sleep(0.3)
    status, answer, headers = await post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert status == 429 and answer["error"]["code"] == "overloaded" and headers["Retry-After"] == "1"
    assert all(s == 200 for s, _, _ in await asyncio.gather(*slow))
    status, _, _ = await post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert status == 200  # served again once the others finished
    assert any("router.max_inflight" in e["reason"] for e in cluster.events("failed"))


async def test_a_decode_node_lost_mid_stream_is_retried_on_another(cluster):
    """d0 dies after 3 of 8 tokens: the router retries on d1 with the 3 delivered tokens in the
    prompt (re-prefilled) and d1 continues at index 3; the client sees one seamless stream."""
    url = await cluster.start(decode=2, decode_policy="round_robin")
    cluster.decodes[0].mode, cluster.decodes[0].error_after = "die_after", 3
    status, chunks = await sse(url, "/v1/completions", {"model": MODEL, "prompt": "hello world", "max_tokens": 8,
                                                        "stream": True}, headers={"x-request-id": "rr1"})
    assert status == 200 and chunks[-1] == "[DONE]"
    texts = [json.loads(c)["choices"][0]["text"] for c in chunks[:-1] if json.loads(c)["choices"]]
    assert texts == [token_text("rr1", i) for i in range(8)]
    prompts = [r["prompt_tokens"] for r in cluster.prefills[0].requests]
    assert prompts[1] == prompts[0] + 3  # the delivered tokens are prefilled again on the retry
    assert cluster.decodes[1].requests["rr1"]["first_index"] == 3
    assert cluster.decodes[1].requests["rr1"]["max_tokens"] == 5
    [retry] = cluster.events("retried")
    assert retry["lost"] == "d0" and retry["delivered"] == 3 and retry["attempt"] == 1
    assert [e["decode"] for e in cluster.events("routed")] == ["d0", "d1"]
    [done] = cluster.events("done")
    assert done["output_tokens"] == 8 and not cluster.events("failed")


async def test_without_retries_or_another_node_the_loss_is_the_answer(cluster):
    url = await cluster.start(decode=2, decode_policy="round_robin", retries=0)
    cluster.decodes[0].mode, cluster.decodes[0].error_after = "die_after", 2
    status, body, _ = await post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5})
    assert status == 502 and "d0" in body["error"]["message"]
    assert not cluster.events("retried") and len(cluster.events("failed")) == 1
