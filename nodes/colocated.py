"""Colocated daemon: one node runs both phases (the GPU baseline), vLLM-like.

``POST /internal/generate`` (``"colocated": true``) streams tokens as on a decode node, but
the node prefills the prompt itself. One scheduler owns the accelerator:

- a request is admitted (FIFO) when the KV of its prompt plus all its output tokens fits
  the node's KV capacity and the batch has room; it then waits for prefill;
- without chunking (``chunk_tokens`` = 0) a step is either a prefill batch of whole prompts
  within ``token_budget`` (pending prefills first, as vLLM's default scheduler) or a decode
  step of the running batch;
- with chunking each step is mixed (as vLLM's chunked prefill): every running request
  decodes one token and prompt chunks fill the rest of the token budget; the step's time is
  the decode step's plus the chunks' prefill time.

As in vLLM, the forward pass that completes a prompt also samples its first output token.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from aiohttp import web

from nodes.config import NodeConfig
from nodes.engine import (BadRequest, ComputeNode, GenRequest, KvBudget, StepTimer, require_field, admit_fifo,
                          error_response, open_stream, read_body, relay)

log = logging.getLogger(__name__)


class ColocatedNode(ComputeNode):
    role = "colocated"

    def __init__(self, config: NodeConfig):
        super().__init__(config)
        self.kv = KvBudget(self.cost.kv_capacity_bytes())
        self.requests: dict[str, GenRequest] = {}
        self.waiting: deque[GenRequest] = deque()  # waiting for KV room
        self.prefilling: list[GenRequest] = []  # admitted, prompt not yet fully prefilled
        self.running: list[GenRequest] = []  # decoding
        self.timer = StepTimer(self.clock, self.timeline, "decode")
        self.app.router.add_post("/internal/generate", self._generate)

    def load(self) -> dict[str, Any]:
        return {"queue_depth": len(self.waiting) + len(self.prefilling), "batch_size": len(self.running),
                "kv_used_bytes": self.kv.used, "kv_free_bytes": self.kv.free}

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await read_body(request, self.config.model)
            max_tokens = require_field(body, "max_tokens", int, minimum=1)
        except BadRequest as e:
            return error_response(400, str(e))
        if not self.accepting():
            return error_response(503, f"node {self.config.name} is {self.state}")
        rid = body["request_id"]
        if rid in self.requests:
            return error_response(409, f"request {rid} is already registered")
        gen = GenRequest(rid, body["prompt_tokens"], max_tokens,
                         kv_bytes=self.cost.kv_bytes(body["prompt_tokens"] + max_tokens))
        if gen.kv_bytes > self.kv.capacity:
            return error_response(507, f"KV of {gen.kv_bytes} bytes exceeds node capacity {self.kv.capacity}")
        self.requests[rid] = gen
        resp = None
        try:
            resp = await open_stream(request)
            self.timeline.event("prefill_queued", rid, prompt_tokens=gen.prompt_tokens)
            self.waiting.append(gen)
            self.notify()
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
        self.requests.pop(gen.request_id, None)
        for queue in (self.waiting, self.prefilling, self.running):
            if gen in queue:
                queue.remove(gen)
        if gen.reserved:
            gen.reserved = False
            self.kv.release(gen.kv_bytes)
        self.notify()

    def _admit(self) -> None:
        room = self.config.decode.max_batch - len(self.running) - len(self.prefilling)
        self.prefilling.extend(admit_fifo(self.waiting, self.kv, room))

    def _prefill_chunks(self, budget: int) -> list[tuple[GenRequest, int]]:
        """(request, prompt tokens this step) in FIFO order within ``budget`` tokens."""
        chunk = self.config.prefill.chunk_tokens
        out: list[tuple[GenRequest, int]] = []
        left = budget
        for gen in self.prefilling:
            remaining = gen.prompt_tokens - gen.prefilled
            if chunk > 0:
                take = min(remaining, chunk, left)
            elif remaining <= left or not out:
                take = remaining
            else:
                break
            if take <= 0:
                break
            out.append((gen, take))
            left -= take
        return out

    async def run(self) -> None:
        chunked = self.config.prefill.chunk_tokens > 0
        budget = self.config.prefill.token_budget
        while True:
            self.wake.clear()
            self._admit()
            if not self.prefilling and not self.running:
                self.timer.idle()
                await self.wake.wait()
                continue
            if chunked:
                decoding = list(self.running)
                chunks = self._prefill_chunks(max(0, budget - len(decoding)))
            elif self.prefilling:
                decoding, chunks = [], self._prefill_chunks(budget)
            else:
                decoding, chunks = list(self.running), []
            duration = 0.0
            if decoding:
                duration += self.cost.decode_step([g.context for g in decoding]).time_s
            if chunks:
                duration += self.cost.prefill([n for _, n in chunks], [g.prefilled for g, _ in chunks]).time_s
            duration = self.compute_s(duration)
            self.timer.begin(duration)
            tokens = sum(n for _, n in chunks)
            for gen, _ in chunks:
                if gen.prefilled == 0:
                    self.timeline.event("prefill_start", gen.request_id, batch_size=len(chunks),
                                        batch_tokens=tokens)
            await self.timer.end(len(decoding) + len(chunks), "prefill" if chunks and not decoding else "decode")
            t = self.clock.now()
            for gen in decoding:
                if not gen.finished:
                    gen.emit_token(self.timeline, t)
            for gen, n in chunks:
                if gen.finished:
                    continue
                gen.prefilled += n
                gen.compute_s += duration
                if gen.prefilled >= gen.prompt_tokens:
                    self.prefilling.remove(gen)
                    self.timeline.event("prefill_end", gen.request_id, compute_s=gen.compute_s)
                    self.timeline.event("decode_queued", gen.request_id, kv_model_bytes=gen.kv_bytes)
                    self.running.append(gen)
                    self.timeline.event("decode_admitted", gen.request_id, batch_size=len(self.running))
                    gen.emit_token(self.timeline, t)  # the prefill pass samples the first token
            for gen in [g for g in self.running if g.finished]:
                self.running.remove(gen)
                gen.reserved = False
                self.kv.release(gen.kv_bytes)


async def serve(config: NodeConfig) -> None:
    await ColocatedNode(config).serve()
