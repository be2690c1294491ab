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
from nodes.engine import ColocatedStep, GenRequest, StreamingNode, admit_fifo

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
            step = ColocatedStep.plan(self.prefilling, self.running, budget, chunk)
            duration = self.compute_s(step.duration_s(self.cost))
            self.timer.begin(duration)
            step.start(self.timeline)
            await self.timer.end(step.size, step.kind)
            t = self.clock.now()
            for gen in step.finish(self.timeline, duration, self.prefilling, self.running,
                                   lambda g: g.emit_token(self.timeline, t)):
                self._release(gen)


async def serve(config: NodeConfig) -> None:
    await ColocatedNode(config).serve()
