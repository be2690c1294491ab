"""The serving system's entities as SimPy processes: client, router, prefill, decode, colocated.

Each makes the decisions the daemons make by calling the same code (``nodes.engine``:
``plan_prefill``, ``runnable_prefill``, ``ColocatedStep``, ``admit_fifo``, ``KvBudget``, ``KvGate``,
``kv_retry_delay_s``, ``GenRequest``;
``nodes.routing`` policies; ``nodes.costmodel``), and writes the same timeline events with the
same fields, in virtual time. What it leaves out: HTTP and MQTT (routing sees every node's
status at once, as if heartbeats were instant), and the per-token frontend traffic (a token
reaches the client one frontend path latency after its step).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import simpy

from nodes.costmodel import CostModel
from nodes.engine import (ColocatedStep, GenRequest, KvBudget, KvGate, admit_fifo, kv_retry_delay_s, plan_prefill,
                          runnable_prefill)
from nodes.routing import make_policy
from nodes.timeline import Timeline
from sim.network import FlowNetwork, Port


@dataclass
class SimSettings:
    """What the daemons read from their node config, for the simulated nodes."""

    kv_bytes_per_token: int
    layers: int
    kv_mode: str
    token_budget: int
    chunk_tokens: int
    max_batch: int
    prefill_policy: str
    decode_policy: str
    request_timeout_s: float
    prefill_max_queue: int
    decode_max_queue: int


class SimNode:
    """A compute node: its cost model, timeline, wake-up event and status."""

    role = ""

    def __init__(self, env: simpy.Environment, name: str, hardware: str, cost: CostModel, timeline: Timeline,
                 settings: SimSettings):
        self.env, self.name, self.hardware, self.cost, self.timeline, self.s = env, name, hardware, cost, timeline, settings
        self._wake = env.event()
        self.state = "up"      # "draining": the routing policies skip it (nodes.routing.SKIPPED_STATES)
        self.slowdown = 1.0    # compute takes this many times the cost model's time (a slowdown fault)
        timeline.event("node_start", role=self.role, hardware=hardware)

    def compute_s(self, model_s: float) -> float:
        """A cost-model duration as this node runs it now (x the slowdown factor), as the daemon's
        ``Engine.compute_s``."""
        return model_s * self.slowdown

    def command(self, cmd: str, factor: float | None = None) -> None:
        """A control command at this virtual time, as the daemon's ``Engine.on_command`` applies it
        (drain, resume, slowdown; a crash is not simulated)."""
        self.timeline.event("control", cmd=cmd, factor=factor)
        if cmd == "drain":
            self.state = "draining"
        elif cmd == "resume":  # ends a drain and a slowdown
            self.state = "up"
            self.slowdown = 1.0
        elif cmd == "slowdown":
            if factor is None or not factor > 0:
                raise ValueError(f"slowdown needs a factor > 0, got {factor!r}")
            self.slowdown = float(factor)
        else:
            raise ValueError(f"the simulated node {self.name} cannot {cmd}")
        self.notify()

    def notify(self) -> None:
        if not self._wake.triggered:
            self._wake.succeed()

    def wait_for_work(self) -> simpy.Event:
        self._wake = self.env.event()
        return self._wake

    def step(self, duration_s: float, batch_size: int, kind: str):
        """One compute step: ``step_timing`` as a daemon logs it (never late in virtual time)."""
        yield self.env.timeout(duration_s)
        self.timeline.event("step_timing", kind=kind, planned_s=duration_s, late_s=0.0, batch_size=batch_size)

    def status(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(eq=False)
class SimJob:
    """A prefill node's request (nodes.prefill.PrefillJob's fields the planning reads)."""

    request_id: str
    prompt_tokens: int
    decode: "SimDecode"
    max_tokens: int
    kv_model_bytes: int
    prefilled: int = 0
    started: bool = False
    held_back: bool = False
    compute_s: float = 0.0


class SimPrefill(SimNode):
    role = "prefill"

    def __init__(self, *args: Any, kv_ports: Callable[["SimDecode"], list[tuple[Port, ...]]], net: FlowNetwork,
                 **kw: Any):
        super().__init__(*args, **kw)
        self.queue: list[SimJob] = []
        self.holding: set[SimJob] = set()  # KV resident here: started and not yet handed off
        self.capacity = self.cost.kv_capacity_bytes()
        self.batch_size = 0
        self.kv_ports, self.net = kv_ports, net
        self.env.process(self._scheduler())

    def held_bytes(self) -> int:
        return sum(j.kv_model_bytes for j in self.holding)

    def status(self) -> dict[str, Any]:
        used = self.held_bytes()
        return {"state": self.state, "slowdown": self.slowdown, "queue_depth": len(self.queue),
                "batch_size": self.batch_size,
                "kv_used_bytes": used, "kv_free_bytes": max(0, self.capacity - used)}

    def submit(self, job: SimJob) -> str | None:
        """Queue the job, or refuse it as the daemon answers (507: larger than the node's KV
        memory; 503: draining, or ``prefill.max_queue`` prompts already waiting). Returns the refusal."""
        if self.state != "up":
            return f"node {self.name} is {self.state}"
        if job.kv_model_bytes > self.capacity:
            return f"KV of {job.kv_model_bytes} bytes exceeds node capacity {self.capacity}"
        waiting = sum(1 for j in self.queue if not j.started)
        if waiting >= self.s.prefill_max_queue:
            return f"node {self.name} is unavailable: {waiting} prompts waiting (prefill.max_queue)"
        self.timeline.event("prefill_queued", job.request_id, prompt_tokens=job.prompt_tokens)
        self.queue.append(job)
        self.notify()
        return None

    def _scheduler(self):
        layerwise = self.s.kv_mode == "layerwise"
        while True:
            runnable, held_back, held = runnable_prefill(self.queue, self.held_bytes(), self.capacity)
            if held_back is not None and not held_back.held_back:
                held_back.held_back = True
                self.timeline.event("kv_hold_wait", held_back.request_id, need_bytes=held_back.kv_model_bytes,
                                    held_bytes=held)
            if not runnable:
                self.batch_size = 0
                yield self.wait_for_work()
                continue
            batch = plan_prefill(runnable, self.s.token_budget, self.s.chunk_tokens)
            cost = self.cost.prefill([n for _, n in batch], [j.prefilled for j, _ in batch])
            step_s = self.compute_s(cost.time_s)
            start = self.env.now
            self.batch_size = len(batch)
            tokens = sum(n for _, n in batch)
            finishing = [j for j, n in batch if j.prefilled + n >= j.prompt_tokens]
            for job, _ in batch:
                if not job.started:
                    job.started = True
                    self.holding.add(job)
                    self.timeline.event("prefill_start", job.request_id, batch_size=len(batch), batch_tokens=tokens)
            if layerwise:
                for job in finishing:
                    self.env.process(self._transfer(job, start, step_s))
            yield from self.step(step_s, len(batch), "prefill")
            for job, n in batch:
                job.prefilled += n
                job.compute_s += step_s
            for job in finishing:
                self.queue.remove(job)
                self.timeline.event("prefill_end", job.request_id, compute_s=job.compute_s)
                if not layerwise:
                    self.env.process(self._transfer(job, None, 0.0))

    def _transfer(self, job: SimJob, step_start: float | None, step_s: float):
        """The KV handoff as a flow: whole after prefill; layer by layer, layer l leaves when its
        share of the last step is done (all but the last layer as one flow, then the last)."""
        model_bytes = job.kv_model_bytes
        wire = model_bytes  # byte scale 1: the simulated wire carries the modelled bytes
        self.timeline.event("kv_start", job.request_id, decode=job.decode.name, mode=self.s.kv_mode,
                            bytes=wire, model_bytes=model_bytes)
        refusals = 0
        while not job.decode.kv_begin(job.request_id, wire):  # backpressure: wait for the decode's room
            if refusals == 0:
                self.timeline.event("kv_wait_start", job.request_id, decode=job.decode.name, reason="no KV room")
            refusals += 1
            yield self.env.timeout(kv_retry_delay_s(refusals))
        stripes = self.kv_ports(job.decode)   # one flow per rail pair, the bytes split evenly
        if step_start is None:
            yield self.net.transfer_striped(stripes, model_bytes)
        else:
            layers = max(1, self.s.layers)
            last = model_bytes / layers
            yield self.net.transfer_striped(stripes, model_bytes - last)
            last_ready = step_start + step_s  # the last layer's compute ends with the step
            if self.env.now < last_ready:
                yield self.env.timeout(last_ready - self.env.now)
            yield self.net.transfer_striped(stripes, last)
        self.timeline.event("kv_end", job.request_id, bytes=wire, ok=True, refusals=refusals)
        self.holding.discard(job)
        self.notify()
        job.decode.kv_complete(job.request_id, wire)


class _Streaming(SimNode):
    """Decode and colocated: GenRequests, a KV budget, continuous batching."""

    def __init__(self, *args: Any, on_token: Callable[[str, int, float, bool], None], **kw: Any):
        super().__init__(*args, **kw)
        self.kv = KvBudget(self.cost.kv_capacity_bytes())
        self.waiting: deque[GenRequest] = deque()
        self.running: list[GenRequest] = []
        self.on_token = on_token  # (request id, tokens so far, t, done): to the router and client

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "slowdown": self.slowdown, "queue_depth": len(self.waiting),
                "batch_size": len(self.running),
                "kv_used_bytes": self.kv.used, "kv_free_bytes": self.kv.free}

    def gen(self, rid: str, prompt_tokens: int, max_tokens: int) -> GenRequest:
        return GenRequest(rid, prompt_tokens, max_tokens, kv_bytes=self.cost.kv_bytes(prompt_tokens + max_tokens),
                          out=None)

    def emit(self, g: GenRequest) -> None:
        g.emit_token(self.timeline, self.env.now)
        self.on_token(g.request_id, g.generated, self.env.now, g.finished)

    def refusal(self, g: GenRequest, queued: int) -> str | None:
        """The daemon's answer to a request it will not take: 507 when its KV exceeds the node's
        capacity, 503 when draining or beyond ``decode.max_queue`` requests waiting."""
        if self.state != "up":
            return f"node {self.name} is {self.state}"
        if g.kv_bytes > self.kv.capacity:
            return f"KV of {g.kv_bytes} bytes exceeds node capacity {self.kv.capacity}"
        if queued >= self.s.decode_max_queue:
            return f"node {self.name} is unavailable: {queued} requests waiting (decode.max_queue)"
        return None

    def release(self, g: GenRequest) -> None:
        if g.reserved:
            self.kv.release(g.kv_bytes)
            g.reserved = False


class SimDecode(_Streaming):
    role = "decode"

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.requests: dict[str, GenRequest] = {}  # registered, KV not yet received
        self.gate = KvGate(self.kv)
        self.env.process(self._scheduler())

    def register(self, rid: str, prompt_tokens: int, max_tokens: int) -> str | None:
        """The router opened the request's stream here, before its prefill (as the daemon's
        ``/internal/generate``), or the node refused it (returned)."""
        g = self.gen(rid, prompt_tokens, max_tokens)
        refusal = self.refusal(g, len(self.requests) + len(self.waiting))
        if refusal is None:
            self.requests[rid] = g
        return refusal

    def drop(self, rid: str) -> None:
        """The router gave up on a registered request (its prefill was refused)."""
        self.requests.pop(rid, None)
        self.gate.forget(rid)

    def kv_begin(self, rid: str, wire: int) -> bool:
        """Grant the transfer the request's whole KV, or refuse it for now (``KvGate``)."""
        g = self.requests[rid]
        if not self.gate.ask(rid, g.kv_bytes):
            self.timeline.event("kv_refused", rid, need_bytes=g.kv_bytes, free_bytes=self.kv.free)
            return False
        g.reserved = True
        self.timeline.event("kv_granted", rid, kv_model_bytes=g.kv_bytes, free_bytes=self.kv.free)
        self.timeline.event("kv_recv_start", rid, bytes=wire)
        return True

    def kv_complete(self, rid: str, wire: int) -> None:
        self.timeline.event("kv_recv_end", rid, bytes=wire, verified=True)
        g = self.requests.pop(rid)
        self.timeline.event("decode_queued", rid, kv_model_bytes=g.kv_bytes)
        self.waiting.append(g)
        self.notify()

    def _scheduler(self):
        while True:
            for g in admit_fifo(self.waiting, self.kv, self.s.max_batch - len(self.running)):
                self.running.append(g)
                self.timeline.event("decode_admitted", g.request_id, batch_size=len(self.running))
            if not self.running:
                yield self.wait_for_work()
                continue
            batch = list(self.running)
            yield from self.step(self.compute_s(self.cost.decode_step([g.context for g in batch]).time_s), len(batch),
                                 "decode")
            for g in batch:
                self.emit(g)
                if g.finished:
                    self.running.remove(g)
                    self.release(g)


class SimColocated(_Streaming):
    role = "colocated"

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.prefilling: list[GenRequest] = []
        self.env.process(self._scheduler())

    def status(self) -> dict[str, Any]:
        return {**super().status(), "queue_depth": len(self.waiting) + len(self.prefilling)}

    def submit(self, rid: str, prompt_tokens: int, max_tokens: int) -> str | None:
        g = self.gen(rid, prompt_tokens, max_tokens)
        refusal = self.refusal(g, len(self.waiting) + len(self.prefilling))
        if refusal is not None:
            return refusal
        self.timeline.event("prefill_queued", rid, prompt_tokens=prompt_tokens)
        self.waiting.append(g)
        self.notify()
        return None

    def _scheduler(self):
        while True:
            room = self.s.max_batch - len(self.running) - len(self.prefilling)
            self.prefilling.extend(admit_fifo(self.waiting, self.kv, room))
            if not self.prefilling and not self.running:
                yield self.wait_for_work()
                continue
            step = ColocatedStep.plan(self.prefilling, self.running, self.s.token_budget, self.s.chunk_tokens)
            duration = self.compute_s(step.duration_s(self.cost))
            step.start(self.timeline)
            yield from self.step(duration, step.size, step.kind)
            for g in step.finish(self.timeline, duration, self.prefilling, self.running, self.emit):
                self.release(g)


@dataclass(eq=False)
class _InFlight:
    request_id: str
    prompt_tokens: int
    max_tokens: int
    arrival: float
    ended: bool = False


class SimRouter:
    """Routes with the daemons' policies on every node's current status; logs the router's events."""

    def __init__(self, env: simpy.Environment, timeline: Timeline, settings: SimSettings,
                 prefills: list[SimPrefill], decodes: list[_Streaming], client: "SimClient",
                 to_node_s: Callable[[str], float], to_client_s: Callable[[str], float]):
        self.env, self.timeline, self.s = env, timeline, settings
        self.prefills, self.decodes, self.client = prefills, decodes, client
        self.to_node_s, self.to_client_s = to_node_s, to_client_s
        self.prefill_policy = make_policy("prefill", settings.prefill_policy)
        self.decode_policy = make_policy("decode", settings.decode_policy, kv_bytes_per_token=settings.kv_bytes_per_token)
        self.inflight: dict[str, _InFlight] = {}
        self.colocated = not prefills
        self._nodes: dict[str, SimNode] = {n.name: n for n in [*prefills, *decodes]}
        timeline.event("node_start", role="router", hardware=None)

    def _status(self, name: str) -> dict[str, Any] | None:
        node = self._nodes.get(name)
        return node.status() if node is not None else None

    def arrive(self, rid: str, prompt_tokens: int, max_tokens: int) -> None:
        self.timeline.event("arrival", rid, prompt_tokens=prompt_tokens, max_tokens=max_tokens, stream=True,
                            endpoint="completions")
        req = _InFlight(rid, prompt_tokens, max_tokens, self.env.now)
        self.inflight[rid] = req
        decode = self.decode_policy.choose(self.decodes, self._status, tokens=prompt_tokens + max_tokens)
        prefill = None if self.colocated else self.prefill_policy.choose(self.prefills, self._status,
                                                                         tokens=prompt_tokens)
        if decode is None or (prefill is None and not self.colocated):  # every node drained: the router's 503
            reason = f"no available {'decode' if decode is None else 'prefill'} node"
            req.ended = True
            self.timeline.event("failed", rid, reason=reason, status=503)
            self.client.failed(rid, reason)
            return
        self.timeline.event("routed", rid, prefill=prefill.name if prefill else None, decode=decode.name)
        self.env.process(self._timeout(req))
        self.env.process(self._dispatch(req, prefill, decode))

    def _dispatch(self, req: _InFlight, prefill: SimPrefill | None, decode: _Streaming):
        target = decode if prefill is None else prefill
        yield self.env.timeout(self.to_node_s(target.name))
        rid = req.request_id
        if prefill is None:
            refusal = decode.submit(rid, req.prompt_tokens, req.max_tokens)  # type: ignore[attr-defined]
        else:
            refusal = decode.register(rid, req.prompt_tokens, req.max_tokens)  # type: ignore[attr-defined]
            if refusal is None:
                refusal = prefill.submit(SimJob(rid, req.prompt_tokens, decode, req.max_tokens,  # type: ignore[arg-type]
                                                kv_model_bytes=prefill.cost.kv_bytes(req.prompt_tokens)))
                if refusal is not None:
                    decode.drop(rid)  # type: ignore[attr-defined]
        if refusal is not None:  # the router fails the request with the node's answer
            req.ended = True
            self.timeline.event("failed", rid, reason=refusal)
            self.client.failed(rid, refusal)

    def _timeout(self, req: _InFlight):
        yield self.env.timeout(self.s.request_timeout_s)
        if not req.ended:
            req.ended = True
            self.timeline.event("failed", req.request_id,
                                reason=f"timeout: no completion within {self.s.request_timeout_s} model s")
            self.client.failed(req.request_id, "timeout")

    def token(self, node: str, rid: str, count: int, t: float, done: bool) -> None:
        """A node emitted a token (``count`` so far) at ``t``: relay it to the client."""
        req = self.inflight.get(rid)
        if req is None or req.ended:
            return
        self.env.timeout(self.to_client_s(node)).callbacks.append(lambda _: self._relay(node, req, count, done))

    def _relay(self, node: str, req: _InFlight, count: int, done: bool) -> None:
        """The token reaches the client one frontend path later (a timeout's callback: a process
        per token would cost two more SimPy events)."""
        if req.ended:
            return
        if count == 0 and done:  # the node failed the request
            req.ended = True
            self.timeline.event("failed", req.request_id, reason=f"decode node {node} failed the request")
            self.client.failed(req.request_id, "decode failed")
            return
        self.client.token(req.request_id, self.env.now)
        if done:
            req.ended = True
            self.timeline.event("done", req.request_id, prompt_tokens=req.prompt_tokens, output_tokens=count)
            self.client.done(req.request_id)
            del self.inflight[req.request_id]


class SimClient:
    """Replays the workload open-loop and times every token, as the load generator does."""

    def __init__(self, env: simpy.Environment, timeline: Timeline):
        self.env, self.timeline = env, timeline
        self.tokens: dict[str, list[float]] = {}
        timeline.event("node_start", role="client", hardware=None)

    def send(self, rid: str, prompt_tokens: int, output_tokens: int, scheduled_s: float) -> None:
        self.timeline.event("client_sent", rid, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                            scheduled_s=scheduled_s)
        self.tokens[rid] = []

    def token(self, rid: str, t: float) -> None:
        times = self.tokens[rid]
        if not times:
            self.timeline.event("client_first_token", rid)
        times.append(t)

    def done(self, rid: str) -> None:
        times = self.tokens.pop(rid, [])
        self.timeline.event("client_done", rid, output_tokens=len(times), token_times=times)

    def failed(self, rid: str, reason: str) -> None:
        self.tokens.pop(rid, None)
        self.timeline.event("client_failed", rid, reason=reason)
