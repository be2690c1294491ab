"""Prefill daemon: batched (optionally chunked) prefill, then the KV handoff to decode.

``POST /internal/prefill`` queues a request. One scheduler forms batches of at most
``token_budget`` tokens in FIFO order (with ``chunk_tokens`` > 0 a long prompt is split into
chunks, each costed with the tokens already cached before it), sleeps the cost model's time
x TDF x slowdown on absolute deadlines, and hands each finished request's KV cache
(``kv_bytes_per_token x prompt_tokens x byte_scale`` bytes) to the decode node the router
chose. ``whole`` mode sends after the request's prefill ends; ``layerwise`` mode starts the
transfer with the request's last batch and releases layer l as soon as that layer's share
of the batch's compute (split evenly over layers) is done, so transfer overlaps compute.
The compute is the one serial resource: transfers run alongside the next batches.

KV memory bounds both sides (backpressure): a request's KV stays on this node until the decode
node has verified it, so a new prompt starts only when its KV fits beside the KV held here
(``kv_hold_wait``); a decode node without room refuses the transfer with ``KV_FULL`` and the
handoff waits and asks again within the transfer timeout (``kv_wait_start``; the decode node logs
``kv_refused``/``kv_granted``).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web

from nodes.config import NodeConfig
from nodes.engine import (KV_LAST_TRY_MIN_WALL_S, BadRequest, ComputeNode, StepTimer, error_response,
                          kv_retry_delay_s, kv_wire_bytes, plan_prefill, read_body, read_decode_peer, runnable_prefill)
from nodes.kvproto import Code, KvBegin, KvPeer, KvResult, KvTransferError
from nodes.srd import send_kv_srd

log = logging.getLogger(__name__)


@dataclass(eq=False)
class PrefillJob:
    """One request's prefill: progress through its chunks, then the outcome of its KV handoff."""

    request_id: str
    prompt_tokens: int
    decode: dict[str, Any]
    kv_model_bytes: int
    prefilled: int = 0  # prompt tokens already prefilled (by earlier chunks)
    compute_s: float = 0.0
    started: bool = False
    held_back: bool = False  # waited for KV room on this node before its prefill could start
    handed_off: asyncio.Event = field(default_factory=asyncio.Event)
    result: KvResult | None = None
    error: str | None = None


class PrefillNode(ComputeNode):
    role = "prefill"

    def __init__(self, config: NodeConfig):
        super().__init__(config)
        if config.kv_transfer is None:
            raise ValueError(f"node {config.name}: a prefill node needs kv_transfer settings")
        self.queue: list[PrefillJob] = []  # not yet fully prefilled, FIFO
        self.batch_size = 0
        self.holding: set[PrefillJob] = set()  # KV resident here: started and not yet handed off
        self.capacity = self.cost.kv_capacity_bytes()
        self.timer = StepTimer(self.clock, self.timeline, "prefill")
        self.transfers: set[asyncio.Task[None]] = set()
        self.kv_peers: dict[tuple[tuple[str, ...], int], KvPeer] = {}
        # this node's EFA addresses, rail order: a connection (or SRD path) to a receiver's rail k
        # is bound to rail k mod n, which picks the rail it leaves by
        self.kv_binds = list(config.kv_addrs) or ([config.kv_bind] if config.kv_bind else [])
        self.app.router.add_post("/internal/prefill", self._prefill)

    def kv_peer(self, addrs: list[str], port: int) -> KvPeer:
        """The persistent, striped connections to one decode node's KV receiver (one per rail)."""
        key = (tuple(addrs), port)
        if key not in self.kv_peers:
            self.kv_peers[key] = KvPeer(list(addrs), port, bytes.fromhex(self.config.kv_transfer.secret_hex),
                                        binds=self.kv_binds)
        return self.kv_peers[key]

    async def _warm_peers(self) -> None:
        """Open the connections to every decode node this run knows at start-up, so that no
        transfer pays a TCP handshake (a lost SYN costs a 1 s timeout that rto_min does not
        lower) or the HMAC round trips. A decode node not listening yet is tried again."""
        if self.config.kv_transfer.transport != "tcp":
            return
        peers = [p for p in self.config.peers if p.role == "decode" and p.kv is not None]

        async def warm(p: Any) -> None:
            peer = self.kv_peer(list(p.kv_addrs) or [p.kv.host], p.kv.port)
            delay = 0.05
            while not peer.connected:
                try:
                    await peer.connect(timeout_s=5.0)
                except KvTransferError as e:
                    log.debug("KV connections to %s not up yet: %s", p.name, e.reason)
                    await asyncio.sleep(delay)
                    delay = min(1.0, delay * 2)
        await asyncio.gather(*(warm(p) for p in peers))

    def load(self) -> dict[str, Any]:
        used = sum(j.kv_model_bytes for j in self.holding)
        return {"queue_depth": len(self.queue), "batch_size": self.batch_size,
                "kv_used_bytes": used, "kv_free_bytes": max(0, self.capacity - used)}

    async def _prefill(self, request: web.Request) -> web.Response:
        try:
            body = await read_body(request, self.config.model)
            peer = read_decode_peer(body)
        except BadRequest as e:
            return error_response(400, str(e))
        if not self.accepting():
            return error_response(503, f"node {self.config.name} is {self.state}")
        waiting = sum(1 for j in self.queue if not j.started)
        if waiting >= self.config.prefill.max_queue:  # bounded: refuse, never queue without end
            return error_response(503, f"node {self.config.name} has {waiting} prompts waiting, its limit "
                                  "(prefill.max_queue); retry later")
        job = PrefillJob(body["request_id"], body["prompt_tokens"], peer,
                         kv_model_bytes=self.cost.kv_bytes(body["prompt_tokens"]))
        if job.kv_model_bytes > self.capacity:
            return error_response(507, f"KV of {job.kv_model_bytes} bytes exceeds node capacity {self.capacity}")
        self.timeline.event("prefill_queued", job.request_id, prompt_tokens=job.prompt_tokens)
        self.queue.append(job)
        self.notify()
        try:
            await job.handed_off.wait()
        except asyncio.CancelledError:
            # the router went away: drop the request if its compute has not started
            if not job.started and job in self.queue:
                self.queue.remove(job)
                self.timeline.event("failed", job.request_id, reason="router disconnected")
            raise
        if job.result is None:
            return error_response(502, f"KV handoff to {peer['name']} failed: {job.error}")
        return web.json_response({"ok": True, "kv_bytes": job.result.bytes_sent})

    async def run(self) -> None:
        warm = asyncio.create_task(self._warm_peers(), name="kv-warm")
        try:
            await self._scheduler()
        finally:
            warm.cancel()
            for task in list(self.transfers):
                task.cancel()
            await asyncio.gather(warm, *self.transfers, return_exceptions=True)
            await asyncio.gather(*(p.close() for p in self.kv_peers.values()), return_exceptions=True)

    async def _scheduler(self) -> None:
        layerwise = self.config.kv_transfer.mode == "layerwise"
        while True:
            self.wake.clear()
            runnable = self._runnable()
            if not runnable:
                self.batch_size = 0
                self.timer.idle()
                await self.wake.wait()
                continue
            batch = plan_prefill(runnable, self.config.prefill.token_budget, self.config.prefill.chunk_tokens)
            step = self.cost.prefill([n for _, n in batch], [j.prefilled for j, _ in batch])
            duration = self.compute_s(step.time_s)
            start, end = self.timer.begin(duration)
            self.batch_size = len(batch)
            tokens = sum(n for _, n in batch)
            finishing = [j for j, n in batch if j.prefilled + n >= j.prompt_tokens]
            for job, _ in batch:
                if not job.started:
                    job.started = True
                    self.holding.add(job)
                    self.timeline.event("prefill_start", job.request_id, batch_size=len(batch),
                                        batch_tokens=tokens)
            if layerwise:
                for job in finishing:
                    self._start_transfer(job, self._layer_clock(start, duration))
            await self.timer.end(len(batch))
            for job, n in batch:
                job.prefilled += n
                job.compute_s += duration
            for job in finishing:
                self.queue.remove(job)
                self.timeline.event("prefill_end", job.request_id, compute_s=job.compute_s)
                if not layerwise:
                    self._start_transfer(job, None)

    def _runnable(self) -> list[PrefillJob]:
        """What the next step may take: a new prompt starts only when its KV fits beside the KV
        this node still holds for requests whose handoff is not done."""
        runnable, held_back, held = runnable_prefill(self.queue, sum(j.kv_model_bytes for j in self.holding),
                                                     self.capacity)
        if held_back is not None and not held_back.held_back:
            held_back.held_back = True
            self.timeline.event("kv_hold_wait", held_back.request_id, need_bytes=held_back.kv_model_bytes,
                                held_bytes=held)
        return runnable

    def _layer_clock(self, start: float, duration: float) -> Callable[[int], Awaitable[None]]:
        """layer_ready(l): wait until layer l's share of this batch's compute is done."""
        layers = self.model.layers

        async def layer_ready(layer: int) -> None:
            await self.clock.sleep_until(start + duration * (layer + 1) / layers)
        return layer_ready

    def _start_transfer(self, job: PrefillJob, layer_ready: Callable[[int], Awaitable[None]] | None) -> None:
        task = asyncio.create_task(self._transfer(job, layer_ready), name=f"kv-{job.request_id}")
        self.transfers.add(task)
        task.add_done_callback(self.transfers.discard)

    async def _send(self, job: PrefillJob, begin: KvBegin, layer_ready: Callable[[int], Awaitable[None]] | None,
                    timeout_s: float) -> KvResult:
        """One try of the handoff over the configured transport. SRD sprays over every KV
        address the decode node has (one per rail: ``addrs`` when the router gives them)."""
        cfg, kv = self.config, self.config.kv_transfer
        secret = bytes.fromhex(kv.secret_hex)
        addrs = job.decode.get("addrs") or [job.decode["host"]]
        if kv.transport == "srd":
            binds = self.kv_binds
            return await send_kv_srd([(a, job.decode["port"]) for a in addrs], secret, begin, mtu=kv.mtu,
                                     rate_bps=kv.rate_bps, tdf=cfg.tdf, rto_model_s=kv.rto_s, layer_ready=layer_ready,
                                     local_addrs=[binds[k % len(binds)] for k in range(len(addrs))] if binds else None,
                                     timeout_s=timeout_s)
        # TCP: striped over persistent connections, one per receiver rail, opened at start-up
        peer = self.kv_peer(addrs, job.decode["port"])
        return await peer.send(begin, chunk_bytes=kv.chunk_bytes, layer_ready=layer_ready, timeout_s=timeout_s)

    async def _transfer(self, job: PrefillJob, layer_ready: Callable[[int], Awaitable[None]] | None) -> None:
        cfg = self.config
        kv = cfg.kv_transfer
        begin = KvBegin(request_id=job.request_id, model=cfg.model, layers=self.model.layers,
                        tokens=job.prompt_tokens,
                        total_bytes=kv_wire_bytes(self.model.kv_bytes_per_token, job.prompt_tokens, cfg.byte_scale))
        self.timeline.event("kv_start", job.request_id, decode=job.decode["name"], mode=kv.mode,
                            bytes=begin.total_bytes, model_bytes=job.kv_model_bytes, transport=kv.transport)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + kv.timeout_s * cfg.tdf
        refusals = tries = 0
        refused = ""   # the last refusal's reason

        def given_up(reason: str, code: Code, last_try: str = "") -> KvTransferError:
            return KvTransferError(f"{reason}; still refused after {tries} tries within {kv.timeout_s:g} s"
                                   + (f" (the last try: {last_try})" if last_try else ""), code)

        try:
            while True:
                try:
                    job.result = await self._send(job, begin, layer_ready, max(0.0, deadline - loop.time()))
                    break
                except KvTransferError as e:
                    if e.code == Code.TIMEOUT and refusals:
                        # the handoff's time ran out while the receiver had no room: that is why it
                        # failed, whether or not the last try's answer came back in time
                        raise given_up(refused, Code.KV_FULL, e.reason) from None
                    if e.code not in (Code.KV_FULL, Code.UNREACHABLE):
                        raise
                    tries += 1
                    if e.code == Code.KV_FULL:
                        if refusals == 0:
                            self.timeline.event("kv_wait_start", job.request_id, decode=job.decode["name"],
                                                reason=e.reason)
                        refusals += 1
                        refused = e.reason
                    else:  # the path is down (a link fault): ask again, as a transport would
                        self.timeline.event("kv_retry", job.request_id, decode=job.decode["name"], reason=e.reason)
                    retry_s = kv_retry_delay_s(tries) * cfg.tdf
                    if loop.time() + retry_s + KV_LAST_TRY_MIN_WALL_S >= deadline:
                        raise given_up(e.reason, e.code) from None
                    await asyncio.sleep(retry_s)
            extra = ({"packets": job.result.packets, "retransmitted": job.result.retransmitted}
                     if job.result.transport == "srd" else {})
            self.timeline.event("kv_end", job.request_id, bytes=job.result.bytes_sent, ok=True, refusals=refusals,
                                transport=job.result.transport, **extra)
        except KvTransferError as e:
            job.error = e.reason
        except Exception as e:  # a bug must still answer the router, not leave it waiting
            log.exception("KV handoff of %s crashed", job.request_id)
            job.error = f"{type(e).__name__}: {e}"
        finally:
            if job.error is not None:
                log.warning("KV handoff of %s to %s failed: %s", job.request_id, job.decode["name"], job.error)
                self.timeline.event("kv_end", job.request_id, bytes=0, ok=False, reason=job.error, refusals=refusals)
            self.holding.discard(job)
            job.handed_off.set()
            self.notify()

async def serve(config: NodeConfig) -> None:
    await PrefillNode(config).serve()
