"""The load generator (client role): replays a workload open-loop through the router's HTTP API.

Request ``i`` of ``workload.jsonl`` is sent at ``t0_wall + arrival_s x TDF`` whatever happened
to earlier requests (open loop), as a streaming ``POST /v1/completions`` carrying the prompt
length in the extension field ``pdtb_prompt_tokens`` and header ``x-request-id`` (``core.vocab.request_id``: ``r{i:06d}``).
The client times every streamed token itself (``client_*`` timeline events, model seconds),
counts tokens from the SSE chunks, checks ``usage``, and exits once every request has ended.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from core.vocab import request_id
from nodes.clock import ModelClock
from nodes.config import NodeConfig
from nodes.timeline import Timeline
from nodes.tokenizer import count_tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkItem:
    index: int
    arrival_s: float  # model seconds after t0
    prompt_tokens: int
    output_tokens: int

    @property
    def request_id(self) -> str:
        return request_id(self.index)


def read_workload(path: str | Path) -> list[WorkItem]:
    """The workload file's requests, sorted by arrival; ValueError names the file and line."""
    items: list[WorkItem] = []
    seen: set[int] = set()
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected an object")
            for key in ("index", "prompt_tokens", "output_tokens"):
                value = obj.get(key)
                if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "index" else 1):
                    raise ValueError(f"{where}: {key!r} must be an integer >= {0 if key == 'index' else 1}, got {value!r}")
            arrival = obj.get("arrival_s")
            if not isinstance(arrival, (int, float)) or isinstance(arrival, bool) or not arrival >= 0:
                raise ValueError(f"{where}: 'arrival_s' must be a number >= 0, got {arrival!r}")
            if obj["index"] in seen:
                raise ValueError(f"{where}: duplicate index {obj['index']}")
            seen.add(obj["index"])
            items.append(WorkItem(obj["index"], float(arrival), obj["prompt_tokens"], obj["output_tokens"]))
    items.sort(key=lambda item: (item.arrival_s, item.index))
    return items


class RequestError(Exception):
    """Why one request failed, as written to the ``client_failed`` event."""


class LoadClient:
    def __init__(self, config: NodeConfig, timeline: Timeline, session: aiohttp.ClientSession):
        assert config.client is not None
        self.config = config
        self.settings = config.client
        self.clock = timeline.clock
        self.timeline = timeline
        self.session = session
        self.url = f"{config.client.router.url}/v1/completions"
        self.completed = 0
        self.failed = 0

    async def run(self, items: list[WorkItem]) -> None:
        """Send each request at its arrival time; wait until all have ended."""
        tasks: list[asyncio.Task[None]] = []
        try:
            for item in items:
                await self.clock.sleep_until(item.arrival_s)
                tasks.append(asyncio.create_task(self.one(item), name=item.request_id))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def one(self, item: WorkItem) -> None:
        rid = item.request_id
        body: dict[str, Any] = {"model": self.config.model, "prompt": "", "pdtb_prompt_tokens": item.prompt_tokens,
                                "max_tokens": item.output_tokens, "stream": self.settings.stream}
        if self.settings.stream:
            body["stream_options"] = {"include_usage": True}
        self.timeline.event("client_sent", rid, prompt_tokens=item.prompt_tokens, output_tokens=item.output_tokens,
                            scheduled_s=item.arrival_s)
        try:
            async with asyncio.timeout(self.settings.request_timeout_s * self.config.tdf):
                async with self.session.post(self.url, json=body, headers={"x-request-id": rid}) as resp:
                    if resp.status != 200:
                        raise RequestError(_http_reason(resp.status, await resp.text()))
                    if self.settings.stream:
                        token_times, usage = await self._read_stream(rid, resp)
                    else:
                        token_times, usage = await self._read_body(rid, resp)
            _check(item, len(token_times), usage)
        except RequestError as e:
            self._fail(rid, str(e))
        except TimeoutError:
            self._fail(rid, f"timeout: no completion within {self.settings.request_timeout_s} model s")
        except (aiohttp.ClientError, OSError) as e:
            self._fail(rid, f"connection: {type(e).__name__}: {e}")
        except asyncio.CancelledError:
            self._fail(rid, "cancelled")
            raise
        else:
            self.completed += 1
            self.timeline.event("client_done", rid, output_tokens=len(token_times), token_times=token_times)

    def _fail(self, rid: str, reason: str) -> None:
        self.failed += 1
        self.timeline.event("client_failed", rid, reason=reason)

    async def _read_stream(self, rid: str, resp: aiohttp.ClientResponse) -> tuple[list[float], dict | None]:
        """Token arrival times (model s) from the SSE stream: one per chunk carrying text."""
        token_times: list[float] = []
        usage = None
        async for line in resp.content:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return token_times, usage
            now = self.clock.now()
            try:
                chunk = json.loads(data)
            except ValueError:
                raise RequestError(f"malformed SSE data: {data[:100]!r}") from None
            if "error" in chunk:
                raise RequestError(f"error: {_error_message(json.dumps(chunk))}")
            for choice in chunk.get("choices") or ():
                if choice.get("text"):
                    if not token_times:
                        self.timeline.event("client_first_token", rid)
                    token_times.append(now)
            if chunk.get("usage"):
                usage = chunk["usage"]
        raise RequestError(f"stream ended without [DONE] after {len(token_times)} tokens")

    async def _read_body(self, rid: str, resp: aiohttp.ClientResponse) -> tuple[list[float], dict | None]:
        """Non-streaming: every token "arrives" with the body."""
        try:
            body = await resp.json(content_type=None)
            text = body["choices"][0]["text"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise RequestError("malformed completion body") from None
        now = self.clock.now()
        self.timeline.event("client_first_token", rid)
        return [now] * count_tokens(text), body.get("usage")


def _check(item: WorkItem, received: int, usage: dict | None) -> None:
    """Exactly max_tokens tokens, and a usage that agrees with what was sent and received."""
    if received != item.output_tokens:
        raise RequestError(f"token_count: received {received} of {item.output_tokens} tokens")
    if not isinstance(usage, dict):
        raise RequestError("usage_missing")
    want = {"prompt_tokens": item.prompt_tokens, "completion_tokens": received,
            "total_tokens": item.prompt_tokens + received}
    got = {k: usage.get(k) for k in want}
    if got != want:
        raise RequestError(f"usage_mismatch: got {got}, expected {want}")


def _error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return text[:300]


def _http_reason(status: int, text: str) -> str:
    """``http_400 context_length_exceeded: <message>``: status and OpenAI error code lead, so
    the summary's ``failed_by_reason`` (grouped by what precedes ': ') counts them apart."""
    try:
        code = json.loads(text)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    kind = f"http_{status} {code}" if isinstance(code, str) and code else f"http_{status}"
    return f"{kind}: {_error_message(text)}"


async def serve(config: NodeConfig) -> None:
    """Replay the workload file, then return (the process exits when all requests ended)."""
    if config.client is None:
        raise ValueError(f"client {config.name}: the node config has no 'client' settings")
    items = read_workload(config.client.workload_file)
    clock = ModelClock(config.t0_wall, config.tdf)
    timeline = Timeline(config.timeline_path, config.name, clock)
    timeline.event("node_start", role="client", hardware=None)
    connector = aiohttp.TCPConnector(limit=0)  # open loop: never queue behind a connection limit
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                         auto_decompress=False) as session:
            client = LoadClient(config, timeline, session)
            try:
                await client.run(items)
            finally:
                log.info("client %s: %d requests, %d completed, %d failed", config.name, len(items),
                         client.completed, client.failed)
    finally:
        timeline.event("node_stop", role="client", hardware=None)
        timeline.close()
