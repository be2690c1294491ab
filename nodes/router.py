"""The router: an OpenAI-compatible HTTP front end (the managed service's endpoint).

It validates a request, counts its prompt tokens (``nodes.tokenizer``, or the extension
field ``pdtb_prompt_tokens``), picks nodes with the configured policies (``nodes.routing``)
and relays the decode node's NDJSON token stream to the client as server-sent events or
one JSON body. Disaggregated: open ``/internal/generate`` on the decode node first (so it
registers the request before any KV arrives), then ``/internal/prefill`` on the prefill node
naming the decode node's KV endpoint. Colocated: one ``/internal/generate`` with
``colocated: true``. Every accepted request ends with a ``done`` or ``failed`` timeline event.
The public API and error codes are documented in docs/api.md.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Mapping

import aiohttp
from aiohttp import web

from nodes.auth import internal_headers
from nodes.clock import ModelClock
from nodes.config import NodeConfig, PeerInfo
from nodes.profiles import ModelProfile, load_model
from nodes.prometheus import ServingMetrics
from nodes.routing import StatusFn, make_policy, no_status
from nodes.timeline import Timeline
from nodes.tokenizer import count_chat_tokens, count_tokens, token_text
from core.vocab import REQUEST_ID_RE

log = logging.getLogger(__name__)

DEFAULT_CONTEXT_TOKENS = 131072  # prompt + max_tokens bound when the served model has no profile
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions, used for chat too
MAX_BODY_BYTES = 32 * 1024 * 1024  # a 128k-token prompt is well under this
MAX_LINE_BYTES = 1024 * 1024  # one NDJSON line from a node
KV_LOST_PREFIXES = ("KV transfer failed", "no KV cache within")  # a decode node's reasons for a lost handoff
OVERLOAD_RETRY_AFTER_S = 1  # Retry-After (wall seconds) of a 429 when max_inflight requests are in flight
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


class ApiError(Exception):
    """A request the router refuses, answered with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error", retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: Mapping[str, str] | None = None) -> web.Response:
        extra = {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}
        return web.json_response(self.body(), status=self.status, headers={**(headers or {}), **extra})


class RequestFailed(Exception):
    """An accepted request that could not be completed; ``reason`` goes to the timeline.

    ``lost``: the node whose loss (crash, unreachable, stream cut) failed this attempt; the
    router may retry the request without it (``router.retries``)."""

    def __init__(self, reason: str, status: int = 502, code: str = "upstream_error", *, lost: str | None = None):
        super().__init__(reason)
        self.reason, self.status, self.code, self.lost = reason, status, code, lost

    def api_error(self) -> ApiError:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return ApiError(self.status, self.reason, code=self.code, type=kind,
                        retry_after_s=OVERLOAD_RETRY_AFTER_S if self.status == 503 else None)

    @classmethod
    def from_node(cls, node: str, status: int, detail: str, default_code: str) -> "RequestFailed":
        """A node's refusal: its 503 (queue full, draining) stays a 503 the client may retry."""
        if status == 503:
            return cls(f"node {node} is unavailable: {detail}", 503, "node_unavailable")
        return cls(f"node {node} answered HTTP {status}: {detail}", 502, default_code)


@dataclass(frozen=True)
class Parsed:
    """A validated generation request."""

    chat: bool
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool


def _int_field(body: Mapping[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be an integer", param=key, code="invalid_type")
    if not lo <= value <= hi:
        raise ApiError(400, f"'{key}' must be between {lo} and {hi}, got {value}", param=key,
                       code="invalid_value")
    return value


def _prompt_tokens(prompt: Any) -> int:
    """Tokens of a completions ``prompt``: a string, or one prompt as a list (strings or token ids)."""
    if isinstance(prompt, str):
        return count_tokens(prompt)
    if isinstance(prompt, list):
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return len(prompt)  # token ids
        if len(prompt) == 1 and (isinstance(prompt[0], str) or (
                isinstance(prompt[0], list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt[0]))):
            return _prompt_tokens(prompt[0])
        if len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
            raise ApiError(400, "only one prompt per request is supported", param="prompt",
                           code="unsupported_value")
    raise ApiError(400, "'prompt' must be a string, a list of token ids, or a list of one of those",
                   param="prompt", code="invalid_type")


def _messages_tokens(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages", code="invalid_type")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in CHAT_ROLES:
            raise ApiError(400, f"messages[{i}] must be an object with 'role' one of {sorted(CHAT_ROLES)}",
                           param=f"messages[{i}]", code="invalid_value")
    try:
        return count_chat_tokens(messages)
    except ValueError as e:
        raise ApiError(400, f"messages: {e}", param="messages", code="invalid_type") from None


UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    # parameter -> "this value asks for something the testbed does not do"
    "logprobs": lambda v: v not in (None, False, 0),
    "top_logprobs": lambda v: v not in (None, 0),
    "best_of": lambda v: v not in (None, 1),
    "echo": lambda v: v not in (None, False),
    "suffix": lambda v: v is not None,
    "tools": lambda v: v not in (None, []),
    "tool_choice": lambda v: v not in (None, "none"),
    "functions": lambda v: v not in (None, []),
    "function_call": lambda v: v not in (None, "none"),
    "logit_bias": lambda v: v not in (None, {}),
    "response_format": lambda v: v is not None and v != {"type": "text"},
}
"""Parameters that would change what is generated in ways the testbed does not model: refused,
not silently ignored."""

SAMPLING_RANGES = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "presence_penalty": (-2.0, 2.0),
                   "frequency_penalty": (-2.0, 2.0)}
"""Accepted (the token stream's timing does not depend on them) but checked as OpenAI does."""


def _check_options(body: Mapping[str, Any]) -> None:
    for key, asks in UNSUPPORTED.items():
        if key in body and asks(body[key]):
            raise ApiError(400, f"'{key}' is not supported by this endpoint", param=key, code="unsupported_parameter")
    for key, (lo, hi) in SAMPLING_RANGES.items():
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ApiError(400, f"'{key}' must be a number", param=key, code="invalid_type")
        if not lo <= value <= hi:  # NaN fails both comparisons
            raise ApiError(400, f"'{key}' must be between {lo:g} and {hi:g}, got {value}", param=key,
                           code="invalid_value")
    _int_field(body, "seed", -(2**63), 2**63 - 1)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", param="stop",
                       code="invalid_type")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(400, "'user' must be a string", param="user", code="invalid_type")


def parse_request(body: Any, *, chat: bool, model: str, context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> Parsed:
    """Validate a completions or chat body against the served model's context length;
    ApiError says what is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    name = body.get("model")
    if name is None:
        raise ApiError(400, "missing required field 'model'", param="model", code="missing_required_parameter")
    if not isinstance(name, str):
        raise ApiError(400, "'model' must be a string", param="model", code="invalid_type")
    if name != model:
        raise ApiError(404, f"The model '{name}' does not exist; this endpoint serves '{model}'",
                       param="model", code="model_not_found")
    if body.get("n") not in (None, 1):
        if isinstance(body["n"], int) and not isinstance(body["n"], bool) and body["n"] > 1:
            raise ApiError(400, "'n' > 1 is not supported: one sequence per request", param="n",
                           code="unsupported_parameter")
        _int_field(body, "n", 1, 1)
    _check_options(body)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream", code="invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be an object with a boolean 'include_usage'",
                       param="stream_options", code="invalid_type")
    max_tokens = _int_field(body, "max_completion_tokens", 1, context_tokens) if chat else None
    if max_tokens is None:
        max_tokens = _int_field(body, "max_tokens", 1, context_tokens)
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    override = _int_field(body, "pdtb_prompt_tokens", 1, context_tokens)
    key = "messages" if chat else "prompt"
    if key not in body and override is None:
        raise ApiError(400, f"missing required field '{key}'", param=key, code="missing_required_parameter")
    counted = None
    if key in body:  # validated even when the extension field overrides its count
        counted = _messages_tokens(body[key]) if chat else _prompt_tokens(body[key])
    prompt_tokens = override if override is not None else counted
    assert prompt_tokens is not None
    if prompt_tokens < 1:
        raise ApiError(400, "the prompt must contain at least one token", param=key, code="invalid_value")
    if prompt_tokens + max_tokens > context_tokens:
        raise ApiError(400, f"This model's maximum context length is {context_tokens} tokens; the request "
                       f"has {prompt_tokens} prompt tokens and max_tokens {max_tokens}",
                       param=key, code="context_length_exceeded")
    return Parsed(chat=chat, prompt_tokens=prompt_tokens, max_tokens=max_tokens, stream=stream,
                  include_usage=stream and bool(options.get("include_usage", False)))


class _Formatter:
    """OpenAI response objects; stream chunks are pre-split so a token costs one json.dumps."""

    def __init__(self, rid: str, model: str, req: Parsed):
        self.req = req
        self.created = int(time.time())
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + rid
        self.model = model
        head = {"id": self.id, "object": "chat.completion.chunk" if req.chat else "text_completion",
                "created": self.created, "model": model}
        if req.chat:
            head["system_fingerprint"] = None
        opening = json.dumps(head)[:-1] + ', "choices": [{"index": 0, '
        if req.chat:
            self._first = opening + '"delta": {"role": "assistant", "content": '
            self._prefix = opening + '"delta": {"content": '
            close = '}, "logprobs": null, "finish_reason": '
        else:
            self._first = self._prefix = opening + '"text": '
            close = ', "logprobs": null, "finish_reason": '
        tail = "]" + (', "usage": null' if req.include_usage else "") + "}\n\n"
        self._suffix = close + "null}" + tail
        self._last = close + '"length"}' + tail

    def usage(self, output_tokens: int) -> dict[str, int]:
        p = self.req.prompt_tokens
        return {"prompt_tokens": p, "completion_tokens": output_tokens, "total_tokens": p + output_tokens}

    def chunk(self, index: int, text: str) -> str:
        """The SSE event of output token ``index`` (the last one carries finish_reason)."""
        prefix = self._first if index == 0 else self._prefix
        suffix = self._last if index == self.req.max_tokens - 1 else self._suffix
        return "data: " + prefix + json.dumps(text) + suffix

    def usage_chunk(self, output_tokens: int) -> str:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.req.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": [], "usage": self.usage(output_tokens)}
        return "data: " + json.dumps(obj) + "\n\n"

    def full(self, text: str, output_tokens: int) -> dict[str, Any]:
        if self.req.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": "length"}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        return {"id": self.id, "object": "chat.completion" if self.req.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice],
                "usage": self.usage(output_tokens)}


def _error_event(err: ApiError) -> bytes:
    return ("data: " + json.dumps(err.body()) + "\n\ndata: [DONE]\n\n").encode()


class _TokenTiming:
    """When one request's tokens pass the router, for the TTFT and inter-token histograms."""

    def __init__(self, metrics: ServingMetrics, clock: ModelClock):
        self.metrics, self.clock = metrics, clock
        self.arrival = clock.now()
        self.previous: float | None = None

    def relayed(self, count: int) -> None:
        if count:
            now = self.clock.now()
            self.metrics.observe_tokens(self.arrival, self.previous, now, count)
            self.previous = now


class Router:
    """Per-process router state: peers, policies, the internal HTTP session, in-flight ids."""

    def __init__(self, config: NodeConfig, timeline: Timeline, status: StatusFn,
                 kv_bytes_per_token: int | None, context_tokens: int):
        self.config = config
        self.context_tokens = context_tokens
        self.timeline = timeline
        self.status = status
        self.timeout_wall_s = config.router.request_timeout_s * config.tdf
        by_role: dict[str, list[PeerInfo]] = {"prefill": [], "decode": [], "colocated": []}
        for peer in config.peers:
            if peer.role in by_role:
                if peer.http is None:
                    raise ValueError(f"peer {peer.name!r} ({peer.role}) has no 'http' endpoint")
                by_role[peer.role].append(peer)
        self.colocated = bool(by_role["colocated"])
        if self.colocated and (by_role["prefill"] or by_role["decode"]):
            raise ValueError("router peers mix colocated nodes with prefill/decode nodes")
        if not self.colocated and not (by_role["prefill"] and by_role["decode"]):
            raise ValueError("router needs colocated peers, or at least one prefill and one decode peer")
        for peer in by_role["decode"]:
            if peer.kv is None:
                raise ValueError(f"decode peer {peer.name!r} has no 'kv' endpoint")
        self.prefill_nodes = by_role["prefill"]
        self.decode_nodes = by_role["colocated"] if self.colocated else by_role["decode"]
        self.prefill_policy = make_policy("prefill", config.router.prefill_policy)
        self.decode_policy = make_policy("decode", config.router.decode_policy,
                                         kv_bytes_per_token=kv_bytes_per_token)
        self.inflight: set[str] = set()
        self.session: aiohttp.ClientSession | None = None
        self.metrics = ServingMetrics(lambda: {"batch_size": len(self.inflight)})
        timeline.observers.append(self.metrics.observe)
        assert config.internal_secret_hex is not None  # NodeConfig requires it of the router
        self.internal_headers = internal_headers(config.internal_secret_hex)

    async def start(self, _app: web.Application) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True),
            timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False, headers=self.internal_headers)

    async def stop(self, _app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    # ---- HTTP handlers -------------------------------------------------------------------

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "role": "router", "name": self.config.name})

    def _model_object(self) -> dict[str, Any]:
        return {"id": self.config.model, "object": "model", "created": int(self.config.t0_wall),
                "owned_by": "pdtb"}

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_object()]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name != self.config.model:
            raise ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return web.json_response(self._model_object())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    # ---- one request ---------------------------------------------------------------------

    @staticmethod
    def _request_id(request: web.Request) -> str:
        given = request.headers.get("x-request-id", "")
        return given if REQUEST_ID_RE.match(given) else "req-" + uuid.uuid4().hex[:20]

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        rid = self._request_id(request)
        headers = {"x-request-id": rid}
        try:
            try:
                async with asyncio.timeout(self.config.router.client_timeout_s):  # a slow body is refused
                    raw = await request.read()
                body = json.loads(raw)
            except TimeoutError:
                raise ApiError(408, f"the request body did not arrive within {self.config.router.client_timeout_s:g} s",
                               code="request_timeout") from None
            except web.HTTPRequestEntityTooLarge:
                raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes", code="body_too_large")
            except (ValueError, UnicodeDecodeError) as e:
                raise ApiError(400, f"could not parse the JSON body: {e}", code="invalid_json") from None
            except RecursionError:  # json's decoder recurses per nesting level
                raise ApiError(400, "could not parse the JSON body: nested too deeply", code="invalid_json") from None
            req = parse_request(body, chat=chat, model=self.config.model, context_tokens=self.context_tokens)
            if rid in self.inflight:  # checked and added with no await in between
                raise ApiError(409, f"request id {rid!r} is already in flight", code="duplicate_request_id")
            if len(self.inflight) >= self.config.router.max_inflight:  # bounded: refuse, never queue without end
                headers["Retry-After"] = str(OVERLOAD_RETRY_AFTER_S)
                raise ApiError(429, f"the router holds {len(self.inflight)} requests, its limit "
                               f"(router.max_inflight); retry later", code="overloaded", type="rate_limit_error")
        except ApiError as e:
            self.timeline.event("failed", rid, reason=f"rejected: {e.message}", status=e.status)
            return e.response(headers)
        self.inflight.add(rid)
        try:
            self.timeline.event("arrival", rid, prompt_tokens=req.prompt_tokens, max_tokens=req.max_tokens,
                                stream=req.stream, endpoint="chat" if chat else "completions")
            fmt = _Formatter(rid, self.config.model, req)
            if req.stream:
                return await self._respond_stream(request, rid, req, fmt, headers)
            return await self._respond_json(rid, req, fmt, headers)
        finally:
            self.inflight.discard(rid)

    async def _respond_json(self, rid: str, req: Parsed, fmt: _Formatter,
                            headers: dict[str, str]) -> web.Response:
        texts: list[str] = []
        tokens = self._tokens(rid, req)
        timing = _TokenTiming(self.metrics, self.timeline.clock)
        try:
            async with asyncio.timeout(self.timeout_wall_s):
                async for batch in tokens:
                    timing.relayed(len(batch))
                    texts.extend(batch)
        except RequestFailed as e:
            return self._fail(rid, e).response(headers)
        except TimeoutError:
            return self._fail(rid, self._timeout()).response(headers)
        except asyncio.CancelledError:
            self.timeline.event("failed", rid, reason="cancelled")
            raise
        finally:
            await tokens.aclose()
        self.timeline.event("done", rid, prompt_tokens=req.prompt_tokens, output_tokens=len(texts))
        return web.json_response(fmt.full("".join(texts), len(texts)), headers=headers)

    async def _respond_stream(self, request: web.Request, rid: str, req: Parsed, fmt: _Formatter,
                              headers: dict[str, str]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        tokens = self._tokens(rid, req)
        timing = _TokenTiming(self.metrics, self.timeline.clock)
        sent = 0
        try:
            async with asyncio.timeout(self.timeout_wall_s):
                async for batch in tokens:
                    timing.relayed(len(batch))
                    if batch:
                        if not resp.prepared:  # the first token: start the SSE stream (a refusal
                            await resp.prepare(request)  # or failure before it is an HTTP error)
                        out = []
                        for text in batch:
                            out.append(fmt.chunk(sent, text))
                            sent += 1
                        await resp.write("".join(out).encode())
            tail = (fmt.usage_chunk(sent) if req.include_usage else "") + "data: [DONE]\n\n"
            await resp.write(tail.encode())
            await resp.write_eof()
        except RequestFailed as e:
            return await self._stream_error(resp, headers, self._fail(rid, e))
        except TimeoutError:
            return await self._stream_error(resp, headers, self._fail(rid, self._timeout()))
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            self.timeline.event("failed", rid, reason="client_disconnected", output_tokens=sent)
            return resp
        except asyncio.CancelledError:
            self.timeline.event("failed", rid, reason="cancelled", output_tokens=sent)
            raise
        finally:
            await tokens.aclose()
        self.timeline.event("done", rid, prompt_tokens=req.prompt_tokens, output_tokens=sent)
        return resp

    @staticmethod
    async def _stream_error(resp: web.StreamResponse, headers: dict[str, str], err: ApiError) -> web.StreamResponse:
        """Before the stream started: an HTTP error; after: an SSE error event, then [DONE]."""
        if not resp.prepared:
            return err.response(headers)
        with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
            await resp.write(_error_event(err))
            await resp.write_eof()
        return resp

    def _timeout(self) -> RequestFailed:
        return RequestFailed(f"timeout: no completion within {self.config.router.request_timeout_s} model s",
                             504, "timeout")

    def _fail(self, rid: str, e: RequestFailed) -> ApiError:
        self.timeline.event("failed", rid, reason=e.reason)
        return e.api_error()

    # ---- talking to the nodes --------------------------------------------------------------

    async def _tokens(self, rid: str, req: Parsed) -> AsyncIterator[list[str]]:
        """Batches of output token texts as the decode (or colocated) node streams them.

        The first batch is empty: it says the decode node accepted the request (routing and
        connection failures before it are plain HTTP errors to the client). When a node is lost
        mid-request (crashed, unreachable, its stream cut), the request is retried up to
        ``router.retries`` times on the other nodes: the tokens already delivered join the
        prompt (their KV is gone with the node, so the prefill runs again) and the new decode
        node continues the stream at the next token index."""
        delivered = 0
        avoid: set[str] = set()
        lost: RequestFailed | None = None
        for attempt in range(self.config.router.retries + 1):
            try:
                async for batch in self._attempt(rid, req, delivered, avoid):
                    delivered += len(batch)
                    yield batch
                return
            except RequestFailed as e:
                if lost is not None and e.code == "no_available_node":
                    raise lost from None  # no other node to try: the loss is the answer
                if e.lost is None or attempt == self.config.router.retries:
                    raise
                lost = e
                avoid.add(e.lost)
                self.timeline.event("retried", rid, attempt=attempt + 1, lost=e.lost, reason=e.reason,
                                    delivered=delivered)

    async def _attempt(self, rid: str, req: Parsed, delivered: int, avoid: set[str]) -> AsyncIterator[list[str]]:
        """One try at the request on nodes not in ``avoid``, from output token ``delivered`` on."""
        assert self.session is not None
        prompt, left = req.prompt_tokens + delivered, req.max_tokens - delivered
        decode = self.decode_policy.choose([n for n in self.decode_nodes if n.name not in avoid], self.status,
                                           tokens=prompt + left)
        if decode is None:
            raise RequestFailed("no available decode node", 503, "no_available_node")
        prefill = None
        if not self.colocated:
            prefill = self.prefill_policy.choose([n for n in self.prefill_nodes if n.name not in avoid], self.status,
                                                 tokens=prompt)
            if prefill is None:
                raise RequestFailed("no available prefill node", 503, "no_available_node")
        self.timeline.event("routed", rid, prefill=prefill.name if prefill else None, decode=decode.name)
        body = {"request_id": rid, "model": self.config.model, "prompt_tokens": prompt,
                "max_tokens": left, "colocated": self.colocated, "first_index": delivered}
        try:
            resp = await self.session.post(f"{decode.http.url}/internal/generate", json=body)
        except aiohttp.ClientError as e:
            raise RequestFailed(f"decode node {decode.name} unreachable: {e}", 502, "upstream_unreachable",
                                lost=decode.name) from None
        finished = False
        prefill_task: asyncio.Task[None] | None = None
        try:
            if resp.status != 200:
                raise RequestFailed.from_node(decode.name, resp.status, (await resp.text())[:200], "upstream_error")
            if prefill is not None:
                prefill_task = asyncio.create_task(self._prefill(prefill, decode, rid, prompt))
            yield []
            async for batch in self._relay(resp, decode.name, rid, delivered, req.max_tokens, prefill_task,
                                           prefill.name if prefill else None):
                yield batch
            finished = True
        finally:
            if prefill_task is not None:
                if not prefill_task.done():
                    prefill_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, RequestFailed):
                    await prefill_task  # retrieve its outcome; the relay already reported any failure
            if finished:
                resp.release()
            else:
                resp.close()  # the node sees the disconnect and drops the request

    async def _prefill(self, prefill: PeerInfo, decode: PeerInfo, rid: str, prompt_tokens: int) -> None:
        assert self.session is not None and decode.kv is not None
        body = {"request_id": rid, "model": self.config.model, "prompt_tokens": prompt_tokens,
                "decode": {"name": decode.name, "host": decode.kv.host, "port": decode.kv.port,
                           "addrs": list(decode.kv_addrs) or [decode.kv.host]}}
        try:
            async with self.session.post(f"{prefill.http.url}/internal/prefill", json=body) as resp:
                text = await resp.text()
                status = resp.status
        except aiohttp.ClientError as e:
            raise RequestFailed(f"prefill node {prefill.name} unreachable: {e}", 502, "upstream_unreachable",
                                lost=prefill.name) from None
        try:
            answer = json.loads(text)
        except ValueError:
            answer = {}
        if status != 200 or not isinstance(answer, dict) or answer.get("ok") is not True:
            reason = answer.get("reason") if isinstance(answer, dict) else None
            if status == 503:
                raise RequestFailed.from_node(prefill.name, status, reason or text[:200], "prefill_failed")
            raise RequestFailed(f"prefill on {prefill.name} failed: {reason or f'HTTP {status} {text[:200]}'}",
                                502, "prefill_failed")

    async def _relay(self, resp: aiohttp.ClientResponse, node: str, rid: str, first: int, max_tokens: int,
                     prefill_task: asyncio.Task[None] | None, prefill: str | None) -> AsyncIterator[list[str]]:
        """Parse the NDJSON stream of tokens ``first``..``max_tokens - 1``; while the prefill is
        pending, its failure ends the attempt. A KV transfer that broke points at the prefill node."""
        buffer = b""
        count = first
        read: asyncio.Future[bytes] | None = None
        try:
            while True:
                try:
                    if read is not None and prefill_task is None:
                        data, read = await read, None  # the read begun while the prefill ran
                    elif prefill_task is None:
                        data = await resp.content.readany()
                    else:
                        if read is None:
                            read = asyncio.ensure_future(resp.content.readany())
                        await asyncio.wait({read, prefill_task}, return_when=asyncio.FIRST_COMPLETED)
                        if prefill_task.done():
                            prefill_task.result()  # raises RequestFailed when the prefill failed
                            prefill_task = None
                        if not read.done():
                            continue
                        data, read = read.result(), None
                except aiohttp.ClientError as e:
                    raise RequestFailed(f"decode stream from {node} broke: {e}", lost=node) from None
                if not data:
                    raise RequestFailed(f"decode stream from {node} ended after {count} of {max_tokens} tokens",
                                        lost=node)
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                batch: list[str] = []
                failure: RequestFailed | None = None
                try:
                    for line in lines:
                        if not line.strip():
                            continue
                        try:
                            msg = json.loads(line)
                        except ValueError:
                            raise RequestFailed(f"decode node {node} sent a malformed line: {line[:100]!r}") from None
                        kind = msg.get("type") if isinstance(msg, dict) else None
                        if kind == "token":
                            if msg.get("index", count) != count or count >= max_tokens:
                                raise RequestFailed(f"decode node {node} sent token {msg.get('index')} "
                                                    f"after {count} of {max_tokens}")
                            text = msg.get("text")
                            batch.append(text if isinstance(text, str) else token_text(rid, count))
                            count += 1
                        elif kind == "done":
                            if batch:
                                yield batch
                                batch = []
                            if count != max_tokens or msg.get("output_tokens", count) != count:
                                raise RequestFailed(f"decode node {node} finished with {count} tokens "
                                                    f"(reported {msg.get('output_tokens')}), expected {max_tokens}")
                            if prefill_task is not None:
                                await prefill_task  # a finished decode implies the KV arrived; raise if not ok
                            return
                        elif kind == "error":
                            reason = str(msg.get("reason", "error"))
                            # the KV never came or broke off: the prefill node is the suspect
                            lost = prefill if reason.startswith(KV_LOST_PREFIXES) else None
                            raise RequestFailed(f"decode node {node}: {reason}", 502, "decode_failed", lost=lost)
                        else:
                            raise RequestFailed(f"decode node {node} sent an unknown message: {line[:100]!r}")
                except RequestFailed as e:
                    failure = e  # relay the tokens before it first
                if batch:
                    yield batch
                if failure is not None:
                    raise failure
                if len(buffer) > MAX_LINE_BYTES:
                    raise RequestFailed(f"decode node {node} sent a line over {MAX_LINE_BYTES} bytes")
        finally:
            if read is not None and not read.done():
                read.cancel()


@web.middleware
async def _errors(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Every error the client sees is an OpenAI-style JSON body, and the server keeps serving."""
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(e.status)
        return ApiError(e.status, f"{e.reason}: {request.method} {request.path}", code=code).response()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return ApiError(500, "internal router error", type="server_error", code="internal_error").response()


ROUTER_KEY = web.AppKey("router", Router)


def make_runner(app: web.Application) -> web.AppRunner:
    """The router app's runner. A connection without a complete request within
    ``router.client_timeout_s`` is closed (aiohttp's keep-alive timer runs from the connection's
    start until its first request's headers are in, and between requests), so slow or idle
    clients cannot hold the router's connections; a slow body is cut by the same bound."""
    config = app[ROUTER_KEY].config
    return web.AppRunner(app, access_log=None, shutdown_timeout=2.0, keepalive_timeout=config.router.client_timeout_s)


def make_app(config: NodeConfig, *, status: StatusFn = no_status, timeline: Timeline | None = None,
             kv_bytes_per_token: int | None = None,
             context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> web.Application:
    """The router's aiohttp application (tests run it in-process; ``serve`` runs it for real)."""
    own_timeline = timeline is None
    if timeline is None:
        timeline = Timeline(config.timeline_path, config.name, ModelClock(config.t0_wall, config.tdf))
    router = Router(config, timeline, status, kv_bytes_per_token, context_tokens)
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
    app[ROUTER_KEY] = router
    app.on_startup.append(router.start)
    app.on_cleanup.append(router.stop)
    if own_timeline:
        async def close_timeline(_app: web.Application) -> None:
            timeline.close()
        app.on_cleanup.append(close_timeline)
    app.router.add_get("/health", router.health)
    app.router.add_get("/metrics", router.metrics.handler)
    app.router.add_get("/v1/models", router.models)
    app.router.add_get("/v1/models/{model}", router.model)
    app.router.add_post("/v1/completions", router.completions)
    app.router.add_post("/v1/chat/completions", router.chat_completions)
    return app


def _served_profile(model: str) -> ModelProfile | None:
    """The served model's profile: its context length bounds requests, its KV size feeds kv_aware."""
    try:
        return load_model(model)
    except Exception as e:  # still serves: default context bound, kv_aware from reported free bytes
        log.warning("no profile for model %r (%s): context bound %d tokens, kv_aware uses reported "
                    "free bytes only", model, e, DEFAULT_CONTEXT_TOKENS)
        return None


async def serve(config: NodeConfig) -> None:
    """Run the router until cancelled; with MQTT settings, route on live node status."""
    if config.http is None:
        raise ValueError(f"router {config.name}: the node config has no 'http' endpoint to listen on")
    clock = ModelClock(config.t0_wall, config.tdf)
    timeline = Timeline(config.timeline_path, config.name, clock)
    timeline.event("node_start", role="router", hardware=None)
    try:
        async with contextlib.AsyncExitStack() as stack:
            status: StatusFn = no_status
            if config.mqtt is not None:
                from nodes.control import StatusWatcher
                watcher = await stack.enter_async_context(StatusWatcher(config.mqtt))
                status = watcher.status
            profile = _served_profile(config.model)
            kv_per_token = (int(profile.kv_bytes_per_token)
                            if profile is not None and config.router.decode_policy == "kv_aware" else None)
            app = make_app(config, status=status, timeline=timeline, kv_bytes_per_token=kv_per_token,
                           context_tokens=profile.context_length if profile else DEFAULT_CONTEXT_TOKENS)
            runner = make_runner(app)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, config.http.host, config.http.port, backlog=1024)
            await site.start()
            log.info("router %s serving %s on %s (%s)", config.name, config.model, config.http.url,
                     "colocated" if app[ROUTER_KEY].colocated else "disaggregated")
            await asyncio.Event().wait()
    finally:
        timeline.event("node_stop", role="router", hardware=None)
        timeline.close()
