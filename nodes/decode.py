"""Decode daemon: receives KV caches, admits requests by KV capacity, continuous batching.

A request arrives twice: first the router's ``POST /internal/generate`` (which stays open as
the token stream), then the prefill node's KV transfer on the EFA network. The transfer's
BEGIN is granted only when the KV of the prompt plus all output tokens can be reserved in the
node's KV capacity (from the cost model); otherwise it is refused with ``KV_FULL`` and the
prefill node, which keeps holding the KV, asks again (backpressure: the node never receives a
cache it has no room for). Once the KV is verified (byte by byte by ``KvReceiver``, and here:
model, layers, tokens and size must match the request), the request queues and is admitted,
strictly FIFO, when the running batch has room.
Each decode step runs the whole running batch for the cost model's step time x TDF x
slowdown, on absolute deadlines, and streams one token per running request.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from nodes.config import NodeConfig
from nodes.engine import GenRequest, KvGate, StreamingNode, admit_fifo, kv_wire_bytes
from nodes.kvproto import Code, KvBegin, KvReceiver, KvTransferError
from nodes.srd import SrdReceiver

log = logging.getLogger(__name__)


class DecodeNode(StreamingNode):
    role = "decode"

    def __init__(self, config: NodeConfig):
        super().__init__(config)
        if config.kv is None or config.kv_transfer is None:
            raise ValueError(f"node {config.name}: a decode node needs kv and kv_transfer settings")
        self.kv_waiters: dict[str, asyncio.Future[KvBegin]] = {}
        self.gate = KvGate(self.kv)
        self.receiver = KvReceiver(
            bytes.fromhex(config.kv_transfer.secret_hex),
            max_transfer_bytes=kv_wire_bytes(1, max(1, self.kv.capacity), config.byte_scale),
            on_begin=self._kv_begin, on_complete=self._kv_complete, logger=log)
        # the same port over UDP: SRD-like transfers (nodes/srd.py), same grant and verification
        self.srd_receiver = SrdReceiver(
            bytes.fromhex(config.kv_transfer.secret_hex), max_transfer_bytes=self.receiver.max_transfer_bytes,
            on_begin=self._kv_begin, on_complete=self._kv_complete, on_drop=self._kv_dropped, logger=log,
            rate_bps=config.kv_transfer.rate_bps)

    def load(self) -> dict[str, Any]:
        return {"queue_depth": len(self.requests) - len(self.running), "batch_size": len(self.running),
                "kv_used_bytes": self.kv.used, "kv_free_bytes": self.kv.free}

    def expected_wire_bytes(self, tokens: int) -> int:
        return kv_wire_bytes(self.model.kv_bytes_per_token, tokens, self.config.byte_scale)

    # --- KV handoff
    def _kv_begin(self, begin: KvBegin) -> None:
        """Grant a transfer its KV room before its bytes flow, or refuse it: a transfer that
        cannot be this node's request's KV is refused for good, one that does not fit now is
        refused with ``KV_FULL`` (the sender waits and asks again)."""
        rid = begin.request_id
        if begin.model != self.config.model or begin.layers != self.model.layers:
            raise KvTransferError(f"KV for model {begin.model!r} with {begin.layers} layers; this node "
                                  f"serves {self.config.model!r} with {self.model.layers}")
        if begin.total_bytes != self.expected_wire_bytes(begin.tokens):
            raise KvTransferError(f"KV of {begin.tokens} tokens must be {self.expected_wire_bytes(begin.tokens)} "
                                  f"bytes on the wire, announced {begin.total_bytes}")
        gen = self.requests.get(rid)
        if gen is None:
            raise KvTransferError(f"KV for request {rid}, which this node has not registered")
        if gen.prompt_tokens != begin.tokens:
            raise KvTransferError(f"KV of {begin.tokens} tokens for a request of {gen.prompt_tokens} prompt tokens")
        waiter = self.kv_waiters.get(rid)
        if gen.reserved or waiter is None or waiter.done():
            raise KvTransferError(f"KV for request {rid} already received")
        if not self.gate.ask(rid, gen.kv_bytes):
            self.timeline.event("kv_refused", rid, need_bytes=gen.kv_bytes, free_bytes=self.kv.free)
            raise KvTransferError(f"no KV room: the request needs {gen.kv_bytes} model bytes, "
                                  f"{self.kv.free} free", Code.KV_FULL)
        gen.reserved = True
        self.timeline.event("kv_granted", rid, kv_model_bytes=gen.kv_bytes, free_bytes=self.kv.free)
        self.timeline.event("kv_recv_start", rid, bytes=begin.total_bytes)

    def _kv_dropped(self, reason: str, count: int, peer: str) -> None:
        self.timeline.event("kv_dropped", None, reason=reason, count=count, peer=peer)

    def _kv_complete(self, begin: KvBegin, ok: bool) -> None:
        self.timeline.event("kv_recv_end", begin.request_id, bytes=begin.total_bytes, verified=ok)
        waiter = self.kv_waiters.get(begin.request_id)
        if waiter is not None and not waiter.done():
            if ok:
                waiter.set_result(begin)
            else:
                waiter.set_exception(KvTransferError("KV transfer failed verification"))

    # --- the token stream
    def _register(self, gen: GenRequest) -> web.Response | None:
        """Also await the request's KV (the router registers a request before its prefill)."""
        super()._register(gen)
        self.kv_waiters[gen.request_id] = asyncio.get_running_loop().create_future()
        return None

    async def _enqueue(self, gen: GenRequest) -> None:
        """Queue for admission once the KV is verified; fail the stream if it never is."""
        waiter = self.kv_waiters[gen.request_id]
        try:
            while True:
                try:
                    await asyncio.wait_for(asyncio.shield(waiter), self.config.kv_transfer.timeout_s * self.config.tdf)
                    break
                except asyncio.TimeoutError:
                    if gen.request_id not in self.gate.refused:
                        raise
                    # its prefill node holds the KV and keeps asking: this node's room is the wait
        except asyncio.TimeoutError:
            gen.fail(self.timeline, f"no KV cache within {self.config.kv_transfer.timeout_s:g} s")
        except KvTransferError as e:
            gen.fail(self.timeline, f"KV transfer failed: {e.reason}")
        else:
            self.timeline.event("decode_queued", gen.request_id, kv_model_bytes=gen.kv_bytes)
            self.waiting.append(gen)
            self.notify()

    def _drop(self, gen: GenRequest) -> None:
        waiter = self.kv_waiters.pop(gen.request_id, None)
        if waiter is not None and not waiter.done():
            waiter.cancel()
        self.gate.forget(gen.request_id)
        super()._drop(gen)

    # --- continuous batching
    def _admit(self) -> None:
        for gen in admit_fifo(self.waiting, self.kv, self.config.decode.max_batch - len(self.running)):
            self.running.append(gen)
            self.timeline.event("decode_admitted", gen.request_id, batch_size=len(self.running))

    async def run(self) -> None:
        # the KV receiver's address on each rail (kv.host is rail 0's): a TCP listener on each,
        # and a UDP socket on each for SRD, which sprays a message over every rail
        rails = [self.config.kv.host] + [a for a in self.config.kv_addrs if a != self.config.kv.host]
        await self.receiver.start(rails[0], self.config.kv.port)
        for addr in rails[1:]:
            await self.receiver.start(addr, self.receiver.port)
        try:
            await self.srd_receiver.start(rails, self.receiver.port)
            await self._scheduler()
        finally:
            await self.srd_receiver.close()
            await self.receiver.close()

    async def _scheduler(self) -> None:
        while True:
            self.wake.clear()
            self._admit()
            if not self.running:
                self.timer.idle()
                await self.wake.wait()
                continue
            batch = list(self.running)
            step = self.cost.decode_step([g.context for g in batch])
            self.timer.begin(self.compute_s(step.time_s))
            await self.timer.end(len(batch))
            t = self.clock.now()
            for gen in batch:
                if gen.finished:  # dropped during the step
                    continue
                gen.emit_token(self.timeline, t)
                if gen.finished:
                    self.running.remove(gen)
                    self._release(gen)


async def serve(config: NodeConfig) -> None:
    await DecodeNode(config).serve()
