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

import logging
from typing import Any

from nodes.config import NodeConfig
from nodes.engine import GenRequest, StreamingNode, admit_fifo, plan_colocated_step

log = logging.getLogger(__name__)


class ColocatedNode(StreamingNode):
    role = "colocated"

    def __init__(self, config: NodeConfig):
        super().__init__(config)
        self.prefilling: list[GenRequest] = []  # admitted, prompt not yet fully prefilled

    def load(self) -> dict[str, Any]:
        return {"queue_depth": len(self.waiting) + len(self.prefilling), "batch_size": len(self.running),
                "kv_used_bytes": self.kv.used, "kv_free_bytes": self.kv.free}

    async def _enqueue(self, gen: GenRequest) -> None:
        self.timeline.event("prefill_queued", gen.request_id, prompt_tokens=gen.prompt_tokens)
        self.waiting.append(gen)
        self.notify()

    def _drop(self, gen: GenRequest) -> None:
        if gen in self.prefilling:
            self.prefilling.remove(gen)
        super()._drop(gen)

    def _admit(self) -> None:
        room = self.config.decode.max_batch - len(self.running) - len(self.prefilling)
        self.prefilling.extend(admit_fifo(self.waiting, self.kv, room))

    async def run(self) -> None:
        chunk = self.config.prefill.chunk_tokens
        budget = self.config.prefill.token_budget
        while True:
            self.wake.clear()
            self._admit()
            if not self.prefilling and not self.running:
                self.timer.idle()
                await self.wake.wait()
                continue
            decoding, chunks = plan_colocated_step(self.prefilling, self.running, budget, chunk)
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
                self._release(gen)


async def serve(config: NodeConfig) -> None:
    await ColocatedNode(config).serve()
