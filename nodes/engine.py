"""What the compute daemons (prefill, decode, colocated) share.

- ``ComputeNode``: the HTTP app with ``/health``, the load/status dict published on MQTT,
  the control commands (drain, resume, slowdown, crash), startup and clean shutdown.
- ``StepTimer``: compute steps slept on absolute model-time deadlines (each step ends at the
  previous step's deadline + its duration, never "now + duration"), so scheduling error never
  accumulates over a long decode; every step is logged as a ``step_timing`` event.
- ``GenRequest``, ``KvBudget`` and ``KvGate``: a generation request, the KV memory it reserves,
  and the decode side's grants of KV transfers (backpressure).
- ``StreamingNode``: a ``ComputeNode`` that answers ``/internal/generate`` with a token
  stream (decode, colocated): admission checks, the stream, disconnects and KV release.
- ``plan_prefill``: which prompt tokens a prefill step takes (prefill, colocated);
  ``ColocatedStep``: one colocated step, planned, timed, started and finished (daemon and simulator).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, TypeVar

from aiohttp import web

from nodes.auth import require_internal_auth
from nodes.clock import ModelClock
from nodes.config import NodeConfig
from nodes.control import NodeControl
from nodes.costmodel import CostModel
from nodes.profiles import load_hardware, load_model
from nodes.prometheus import ServingMetrics
from nodes.timeline import Timeline
from nodes.tokenizer import token_text
from core.vocab import REQUEST_ID_RE

_HOST_RE = re.compile(r"^[A-Za-z0-9.:-]{1,253}$")
NDJSON = "application/x-ndjson"

log = logging.getLogger(__name__)


class BadRequest(Exception):
    """A request body that does not follow the internal API (answered with 400)."""


def require_field(body: dict[str, Any], key: str, kind: type, *, minimum: int | None = None) -> Any:
    value = body.get(key)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise BadRequest(f"{key}: expected an integer, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise BadRequest(f"{key}: expected a string, got {value!r}")
    if minimum is not None and value < minimum:
        raise BadRequest(f"{key}: expected >= {minimum}, got {value!r}")
    return value


async def read_body(request: web.Request, model: str) -> dict[str, Any]:
    """The JSON body with a valid ``request_id`` and ``prompt_tokens`` for our ``model``."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    rid = require_field(body, "request_id", str)
    if not REQUEST_ID_RE.match(rid):
        raise BadRequest(f"request_id: must match {REQUEST_ID_RE.pattern}")
    if body.get("model") != model:
        raise BadRequest(f"model: this node serves {model!r}, got {body.get('model')!r}")
    require_field(body, "prompt_tokens", int, minimum=1)
    return body


MAX_PEER_RAILS = 32
"""At most this many rail addresses per KV peer (fabric.topology.MAX_RAILS)."""


def read_decode_peer(body: dict[str, Any]) -> dict[str, Any]:
    """The ``decode`` target of a prefill request: ``{"name", "host", "port"[, "addrs"]}``
    validated; ``addrs`` (the receiver's address per rail, rail order, which the TCP transport
    stripes and the SRD sender sprays over) defaults to ``[host]``."""
    peer = body.get("decode")
    if not isinstance(peer, dict):
        raise BadRequest("decode: expected an object {name, host, port, addrs}")
    name = require_field(peer, "name", str)
    host = require_field(peer, "host", str)
    port = require_field(peer, "port", int, minimum=1)
    if not REQUEST_ID_RE.match(name) or not _HOST_RE.match(host) or port > 65535:
        raise BadRequest(f"decode: invalid peer {peer!r}")
    addrs = peer.get("addrs", [host])
    if (not isinstance(addrs, list) or not 1 <= len(addrs) <= MAX_PEER_RAILS
            or not all(isinstance(a, str) and _HOST_RE.match(a) for a in addrs)):
        raise BadRequest(f"decode.addrs: expected a list of 1..{MAX_PEER_RAILS} addresses, got {addrs!r}")
    return {"name": name, "host": host, "port": port, "addrs": list(addrs)}


def error_response(status: int, reason: str) -> web.Response:
    return web.json_response({"ok": False, "reason": reason}, status=status)


class KvBudget:
    """KV memory of a node in model bytes: reservations against the cost model's capacity."""

    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.used = 0

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.used)

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.capacity

    def reserve(self, nbytes: int) -> None:
        self.used += nbytes

    def release(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)


class KvGate:
    """Decode-side backpressure: a KV transfer is granted only when its request's whole KV
    (prompt + every output token) can be reserved now, so a node never receives a cache it has
    no room for. Refused requests are remembered in the order of their first refusal and room
    is granted in that order (a large request is not starved by smaller ones that keep
    arriving); the sender waits and asks again."""

    def __init__(self, budget: KvBudget):
        self.budget = budget
        self.refused: dict[str, int] = {}  # request id -> KV bytes it needs, oldest refusal first

    def ask(self, request_id: str, nbytes: int) -> bool:
        """Reserve ``nbytes`` for the request if it fits after the requests refused before it."""
        ahead = 0
        for rid, need in self.refused.items():
            if rid == request_id:
                break
            ahead += need
        if not self.budget.fits(ahead + nbytes):
            self.refused.setdefault(request_id, nbytes)
            return False
        self.refused.pop(request_id, None)
        self.budget.reserve(nbytes)
        return True

    def forget(self, request_id: str) -> None:
        """The request ended without its grant (failed, timed out, abandoned)."""
        self.refused.pop(request_id, None)


@dataclass(eq=False)
class GenRequest:
    """A request being generated: its KV reservation, progress and its token stream."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    kv_bytes: int  # model bytes reserved at admission: KV of prompt + max_tokens
    # the token stream to the router; None where nothing reads it (the simulator)
    out: asyncio.Queue[dict[str, Any]] | None = field(default_factory=asyncio.Queue)
    reserved: bool = False
    first_index: int = 0  # a retried request resumes its stream here (the router delivered the tokens before)
    generated: int = 0
    prefilled: int = 0  # prompt tokens already prefilled (colocated, chunked)
    compute_s: float = 0.0
    token_times: list[float] = field(default_factory=list)
    finished: bool = False

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.generated

    def emit_token(self, timeline: Timeline, t_model: float) -> None:
        """Produce the next output token; the final one also closes the stream."""
        index = self.first_index + self.generated
        self.generated += 1
        self.token_times.append(t_model)
        if self.generated == 1:
            timeline.event("first_token", self.request_id)
        if self.out is not None:
            self.out.put_nowait({"type": "token", "index": index, "text": token_text(self.request_id, index)})
        if self.generated >= self.max_tokens:
            self.finished = True
            timeline.event("decode_done", self.request_id, output_tokens=self.generated,
                           token_times=self.token_times)
            if self.out is not None:
                self.out.put_nowait({"type": "done", "output_tokens": self.first_index + self.generated})

    def fail(self, timeline: Timeline, reason: str) -> None:
        if not self.finished:
            self.finished = True
            timeline.event("failed", self.request_id, reason=reason)
            if self.out is not None:
                self.out.put_nowait({"type": "error", "reason": reason})


SPIN_S = 0.0015  # wall seconds before a deadline where we stop sleeping and only yield


async def sleep_until_wall(deadline: float) -> None:
    """Sleep until a wall time, precisely: the event loop's epoll wait rounds its timeout up
    to whole milliseconds (a mean 0.5 ms late, 5 % of a 10 ms step), so the last
    ``SPIN_S`` are spent yielding to other tasks instead (a few % of one core)."""
    while True:
        left = deadline - time.time()
        if left <= 0:
            return
        await asyncio.sleep(left - SPIN_S if left > SPIN_S else 0)


class StepTimer:
    """Back-to-back compute steps on absolute deadlines, each logged as ``step_timing``."""

    def __init__(self, clock: ModelClock, timeline: Timeline, kind: str):
        self.clock = clock
        self.timeline = timeline
        self.kind = kind
        self._deadline: float | None = None
        self._planned: tuple[float, float] | None = None

    def idle(self) -> None:
        """The node waited for work: the next step starts now, not at the old deadline."""
        self._deadline = None

    def begin(self, duration_s: float) -> tuple[float, float]:
        """Plan a step of ``duration_s`` model seconds; returns its (start, end) in model time."""
        start = self._deadline if self._deadline is not None else self.clock.now()
        self._planned = (start, start + duration_s)
        return self._planned

    async def end(self, batch_size: int, kind: str | None = None) -> float:
        """Sleep until the planned step's deadline; returns it (model time)."""
        start, end = self._planned
        await sleep_until_wall(self.clock.to_wall(end))
        late = max(0.0, self.clock.now() - end)
        self._deadline = end
        self.timeline.event("step_timing", kind=kind or self.kind, planned_s=end - start, late_s=late,
                            batch_size=batch_size)
        return end


class ComputeNode:
    """Base of the compute daemons: HTTP server, status, control commands, lifecycle."""

    role: str = ""

    def __init__(self, config: NodeConfig):
        if config.http is None:
            raise ValueError(f"node {config.name}: a {config.role} node needs an http endpoint")
        if config.hardware is None:
            raise ValueError(f"node {config.name}: a {config.role} node needs a hardware profile")
        self.config = config
        self.model = load_model(config.model)
        self.cost = CostModel(load_hardware(config.hardware), self.model)
        if not self.cost.fits():
            raise ValueError(f"node {config.name}: model {config.model} does not fit on {config.hardware} "
                             "(no memory left for KV after the weights)")
        self.clock = ModelClock(config.t0_wall, config.tdf)
        self.timeline = Timeline(config.timeline_path, config.name, self.clock)
        self.state = "up"
        self.slowdown = 1.0
        self.wake = asyncio.Event()  # set whenever a scheduler may have new work
        self.control: NodeControl | None = None
        assert config.internal_secret_hex is not None  # NodeConfig requires it of compute roles
        self.app = web.Application(middlewares=[require_internal_auth(config.internal_secret_hex,
                                                                      self._auth_rejected)])
        self.metrics = ServingMetrics(self.status)
        self.timeline.observers.append(self.metrics.observe)
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/metrics", self.metrics.handler)
        self.app.router.add_get("/internal/status", self._status_handler)

    # --- to be provided by each role
    def load(self) -> dict[str, Any]:
        """``queue_depth``, ``batch_size``, ``kv_used_bytes``, ``kv_free_bytes``."""
        raise NotImplementedError

    async def run(self) -> None:
        """The role's schedulers; runs until cancelled."""
        raise NotImplementedError

    # --- shared
    def status(self) -> dict[str, Any]:
        return {"state": self.state, **self.load(), "slowdown": self.slowdown}

    def accepting(self) -> bool:
        return self.state == "up"

    def compute_s(self, model_s: float) -> float:
        """A cost-model duration as this node runs it now (x the slowdown factor)."""
        return model_s * self.slowdown

    def notify(self) -> None:
        self.wake.set()
        if self.control:
            self.control.publish_now()

    def _auth_rejected(self, request: web.Request) -> None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.timeline.event("auth_rejected", method=request.method, path=request.path[:200],
                            peer=str(peer[0]) if peer else None)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "role": self.role, "name": self.config.name})

    async def _status_handler(self, request: web.Request) -> web.Response:
        return web.json_response({"node": self.config.name, "role": self.role, **self.status()})

    def on_command(self, cmd: dict[str, Any]) -> None:
        self.timeline.event("control", cmd=cmd["cmd"], factor=cmd["factor"])
        if cmd["cmd"] == "crash":
            log.warning("crash command: exiting at once")
            self.timeline.sync()
            os._exit(1)
        if cmd["cmd"] == "drain":
            self.state = "draining"
        elif cmd["cmd"] == "resume":  # ends a drain and a slowdown
            self.state = "up"
            self.slowdown = 1.0
        elif cmd["cmd"] == "slowdown":
            self.slowdown = cmd["factor"]
        self.notify()

    async def serve(self) -> None:
        http = self.config.http
        runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, http.host, http.port, reuse_address=True).start()
            self.timeline.event("node_start", role=self.role, hardware=self.config.hardware)
            log.info("%s node %s on %s", self.role, self.config.name, http.url)
            async with contextlib.AsyncExitStack() as stack:
                if self.config.mqtt is not None:
                    self.control = await stack.enter_async_context(NodeControl(
                        self.config.mqtt, self.config.name, self.role, self.status, self.on_command))
                await self.run()
        finally:
            self.control = None
            with contextlib.suppress(Exception):
                await runner.cleanup()
            self.timeline.event("node_stop", role=self.role, hardware=self.config.hardware)
            self.timeline.close()


class StreamingNode(ComputeNode):
    """A compute node whose ``POST /internal/generate`` stays open as the request's token
    stream; requests reserve KV for prompt + all output tokens and run in ``running``."""

    def __init__(self, config: NodeConfig):
        super().__init__(config)
        self.kv = KvBudget(self.cost.kv_capacity_bytes())
        self.requests: dict[str, GenRequest] = {}  # registered by /internal/generate
        self.waiting: deque[GenRequest] = deque()  # waiting for KV room
        self.running: list[GenRequest] = []  # decoding
        self.timer = StepTimer(self.clock, self.timeline, "decode")
        self.app.router.add_post("/internal/generate", self._generate)

    # --- to be provided by each role
    async def _enqueue(self, gen: GenRequest) -> None:
        """Once the stream is open: queue the request for its work (or fail it)."""
        raise NotImplementedError

    # --- shared
    def _register(self, gen: GenRequest) -> web.Response | None:
        """Record an accepted request; a role may refuse it instead (the error response)."""
        self.requests[gen.request_id] = gen
        return None

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await read_body(request, self.config.model)
            max_tokens = require_field(body, "max_tokens", int, minimum=1)
            first_index = require_field(body, "first_index", int, minimum=0) if "first_index" in body else 0
        except BadRequest as e:
            return error_response(400, str(e))
        if not self.accepting():
            return error_response(503, f"node {self.config.name} is {self.state}")
        rid = body["request_id"]
        if rid in self.requests:
            return error_response(409, f"request {rid} is already registered")
        queued = len(self.requests) - len(self.running)
        if queued >= self.config.decode.max_queue:  # bounded: refuse, never queue without end
            return error_response(503, f"node {self.config.name} has {queued} requests waiting, its limit "
                                  "(decode.max_queue); retry later")
        gen = GenRequest(rid, body["prompt_tokens"], max_tokens,
                         kv_bytes=self.cost.kv_bytes(body["prompt_tokens"] + max_tokens), first_index=first_index)
        if gen.kv_bytes > self.kv.capacity:
            return error_response(507, f"KV of {gen.kv_bytes} bytes exceeds node capacity {self.kv.capacity}")
        refusal = self._register(gen)
        if refusal is not None:
            return refusal
        resp = None
        try:
            resp = await open_stream(request)
            await self._enqueue(gen)
            await relay(resp, gen)
            return resp
        except (asyncio.CancelledError, ConnectionError) as e:
            if not gen.finished:
                gen.finished = True
                self.timeline.event("failed", rid, reason="router disconnected")
            if isinstance(e, asyncio.CancelledError):
                raise
            return resp or web.Response(status=499)
        finally:
            self._drop(gen)

    def _drop(self, gen: GenRequest) -> None:
        """Forget a request (done, failed or abandoned) and free its KV."""
        self.requests.pop(gen.request_id, None)
        for queue in (self.waiting, self.running):
            if gen in queue:
                queue.remove(gen)
        self._release(gen)
        self.notify()

    def _release(self, gen: GenRequest) -> None:
        """Give back a request's KV reservation (once)."""
        if gen.reserved:
            gen.reserved = False
            self.kv.release(gen.kv_bytes)


async def open_stream(request: web.Request) -> web.StreamResponse:
    """Open the NDJSON response at once (the router learns the request is registered)."""
    resp = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
    await resp.prepare(request)
    return resp


async def relay(resp: web.StreamResponse, gen: GenRequest) -> None:
    """Write the request's token/done/error lines until its stream ends."""
    while True:
        item = await gen.out.get()
        await resp.write((json.dumps(item, separators=(",", ":")) + "\n").encode())
        if item["type"] != "token":
            break
    await resp.write_eof()


def kv_wire_bytes(kv_bytes_per_token: int, tokens: int, byte_scale: float) -> int:
    """Bytes of a request's KV cache on the wire: modelled size x byte scale (at least 1)."""
    return max(1, round(kv_bytes_per_token * tokens * byte_scale))


def admit_fifo(waiting: deque[GenRequest], budget: KvBudget, room: int) -> list[GenRequest]:
    """Admit from the head of the queue while KV fits and there is batch room (strict FIFO).
    A request whose KV was reserved before (granted with its transfer) needs only batch room."""
    admitted: list[GenRequest] = []
    while waiting and room > len(admitted) and (waiting[0].reserved or budget.fits(waiting[0].kv_bytes)):
        gen = waiting.popleft()
        if not gen.reserved:
            budget.reserve(gen.kv_bytes)
            gen.reserved = True
        admitted.append(gen)
    return admitted


class Prefillable(Protocol):
    """A request as prefill planning sees it (a prefill node's job, a colocated request)."""

    prompt_tokens: int
    prefilled: int  # prompt tokens already prefilled (by earlier chunks)


P = TypeVar("P", bound=Prefillable)


@dataclass
class ColocatedStep:
    """One step of a colocated node: the sequences that decode a token and the prompt chunks it
    prefills. The daemon and the simulator both plan, time, start and finish steps with it."""

    decoding: list[GenRequest]
    chunks: list[tuple[GenRequest, int]]

    @classmethod
    def plan(cls, prefilling: Sequence[GenRequest], running: Sequence[GenRequest], budget: int,
             chunk_tokens: int) -> "ColocatedStep":
        """With chunked prefill, decodes and chunks share the step's token budget (each decoding
        sequence takes one token); without, a step prefills whole prompts and decodes nothing (a
        prefill step stalls the decodes, as engines without chunking do)."""
        if chunk_tokens > 0:
            return cls(list(running), plan_prefill(prefilling, max(0, budget - len(running)), chunk_tokens))
        if prefilling:
            return cls([], plan_prefill(prefilling, budget, chunk_tokens))
        return cls(list(running), [])

    @property
    def size(self) -> int:
        return len(self.decoding) + len(self.chunks)

    @property
    def kind(self) -> str:
        return "prefill" if self.chunks and not self.decoding else "decode"

    def duration_s(self, cost: CostModel) -> float:
        """Model seconds of the step: its decode and its prefill work, one after the other."""
        duration = 0.0
        if self.decoding:
            duration += cost.decode_step([g.context for g in self.decoding]).time_s
        if self.chunks:
            duration += cost.prefill([n for _, n in self.chunks], [g.prefilled for g, _ in self.chunks]).time_s
        return duration

    def start(self, timeline: Timeline) -> None:
        """``prefill_start`` for the prompts whose first chunk this step takes."""
        tokens = sum(n for _, n in self.chunks)
        for gen, _ in self.chunks:
            if gen.prefilled == 0:
                timeline.event("prefill_start", gen.request_id, batch_size=len(self.chunks), batch_tokens=tokens)

    def finish(self, timeline: Timeline, duration_s: float, prefilling: list[GenRequest],
               running: list[GenRequest], emit: Callable[[GenRequest], None]) -> list[GenRequest]:
        """After the step: a token for each decoding sequence, chunk progress, finished prompts
        move to ``running`` with their first token (the prefill pass samples it). Returns the
        sequences that finished, for the caller to release (a request dropped during the step is
        skipped)."""
        for gen in self.decoding:
            if not gen.finished:
                emit(gen)
        for gen, n in self.chunks:
            if gen.finished:
                continue
            gen.prefilled += n
            gen.compute_s += duration_s
            if gen.prefilled >= gen.prompt_tokens:
                prefilling.remove(gen)
                timeline.event("prefill_end", gen.request_id, compute_s=gen.compute_s)
                timeline.event("decode_queued", gen.request_id, kv_model_bytes=gen.kv_bytes)
                running.append(gen)
                timeline.event("decode_admitted", gen.request_id, batch_size=len(running))
                emit(gen)
        done = [g for g in running if g.finished]
        for gen in done:
            running.remove(gen)
        return done


class HeldPrefill(Prefillable, Protocol):
    """A prefill node's request: its KV stays on the node from its first chunk to its handoff."""

    started: bool
    kv_model_bytes: int


H = TypeVar("H", bound=HeldPrefill)


def runnable_prefill(queue: Sequence[H], held_bytes: int, capacity_bytes: int) -> tuple[list[H], H | None, int]:
    """The queue's requests a prefill step may take: those already started, then new ones in FIFO
    order while their KV fits beside the ``held_bytes`` the node holds (requests whose handoff is
    not done keep their KV here). Returns them, the first request held back (or None) and the KV
    it waits on: what is held plus what the requests ahead of it will hold."""
    held = held_bytes
    runnable: list[H] = []
    for item in queue:
        if not item.started:
            if held + item.kv_model_bytes > capacity_bytes:
                return runnable, item, held
            held += item.kv_model_bytes
        runnable.append(item)
    return runnable, None, held


# Backoff between a decode node's KV_FULL refusals of a transfer, in model seconds: from about
# one decode step, doubling up to a few steps, so a grant follows within a few steps of the room
# appearing without flooding the decode node with handshakes.
KV_RETRY_MIN_S = 1e-3
KV_RETRY_MAX_S = 16e-3
# A last try is not started with less than this much time (wall) left before the handoff's
# deadline: it could only time out, and the answer would say "timeout" where the truth is "refused".
KV_LAST_TRY_MIN_WALL_S = 0.05


def kv_retry_delay_s(refusals: int) -> float:
    """Model seconds to wait after the ``refusals``-th refusal before asking again."""
    doublings = min(max(1, refusals) - 1, math.ceil(math.log2(KV_RETRY_MAX_S / KV_RETRY_MIN_S)))
    return min(KV_RETRY_MAX_S, KV_RETRY_MIN_S * 2 ** doublings)  # the exponent bounded: a long wait never overflows


def plan_prefill(queue: Sequence[P], budget: int, chunk_tokens: int) -> list[tuple[P, int]]:
    """(item, prompt tokens this step) in FIFO order within ``budget`` tokens: chunks of at most
    ``chunk_tokens`` when chunking, else whole prompts (one larger than the budget runs alone)."""
    batch: list[tuple[P, int]] = []
    left = budget
    for item in queue:
        remaining = item.prompt_tokens - item.prefilled
        if chunk_tokens > 0:
            take = min(remaining, chunk_tokens, left)
        elif remaining <= left or not batch:
            take = remaining
        else:
            break
        if take <= 0:
            break
        batch.append((item, take))
        left -= take
        if left <= 0:
            break
    return batch
