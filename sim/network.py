"""Flow-level network in virtual time: max-min fair sharing of the topology's links.

Each transfer is a flow of bytes over a path of directed link ports (a host's link to its
switch, in one direction; one port per rail of a host with rails). A KV transfer is striped:
one flow per rail pair, its bytes split evenly (:meth:`FlowNetwork.transfer_striped`). Whenever a flow starts or ends, the rates of all flows are
recomputed by progressive filling (every unfrozen flow grows at the same pace until a port it
crosses is full; those flows freeze; repeat), the max-min fair allocation. A flow is done when
its bytes are delivered, plus the path's one-way latency.

Link faults (``set_link``, ``link_down``, ``link_up``) change a link's rate at once for the flows
in progress (a link down carries nothing: its flows stall until it is up); latency and loss
apply to the flows that start after the change (a flow's loss stretch and latency are fixed
when it starts).

Loss follows the scenario's ``kv_transfer.transport``:

- ``srd``: a flow over ports with loss p_i is stretched by 1 / prod(1 - p_i), the expected
  packets sent per packet delivered when each lost packet is resent (SRD: selective resends on
  a short timer, no window collapse, so loss costs only the resent bytes).
- ``tcp``: the same stretch, and the flow's rate is capped by the Mathis et al. (1997) bound
  of loss-limited TCP throughput, MSS x 8 / RTT x sqrt(3 / (2 p)), with p = 1 - prod(1 - p_i),
  MSS = MTU - 40 and RTT = twice the path's one-way latency. It leaves out retransmission
  timeouts (RTO floors, the 1 s initial-SYN timeout), which emulated TCP also pays: for TCP
  the simulator is a lower bound on the transfer time under loss.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable

import simpy


@dataclass(frozen=True)
class Port:
    """One direction of one link: ``(link name, "up" | "down")``, with its model rate and loss."""

    name: str
    rate_bps: float
    latency_s: float = 0.0
    loss: float = 0.0
    mtu: int = 1500


def mathis_rate_bps(mtu: int, rtt_s: float, loss: float) -> float:
    """Loss-limited TCP throughput (Mathis, Semke, Mahdavi, Ott 1997): MSS/RTT x sqrt(3/(2p))."""
    if loss <= 0 or rtt_s <= 0:
        return float("inf")
    return (mtu - 40) * 8 / rtt_s * (1.5 / loss) ** 0.5


def srd_stretch(losses: Iterable[float]) -> float:
    """Expected packets sent per packet delivered with selective resends: 1 / prod(1 - p)."""
    stretch = 1.0
    for p in losses:
        stretch /= max(1e-9, 1.0 - p)
    return stretch


@dataclass(eq=False)
class Flow:
    ports: tuple[Port, ...]
    remaining_bits: float
    done: simpy.Event
    rate_bps: float = 0.0
    latency_s: float = 0.0


def max_min_rates(flows: Iterable[Flow], capacity: Callable[[Port], float] = lambda p: p.rate_bps) -> None:
    """Progressive filling: set each flow's ``rate_bps`` to its max-min fair share of each port's
    ``capacity`` (its rate, or what a link fault made of it)."""
    active = [f for f in flows]
    for f in active:
        f.rate_bps = 0.0
    free = {p: capacity(p) for f in active for p in f.ports}
    unfrozen = set(active)
    while unfrozen:
        users: dict[Port, int] = {}
        for f in unfrozen:
            for p in f.ports:
                users[p] = users.get(p, 0) + 1
        if not users:  # flows over no shaped port: unlimited
            for f in unfrozen:
                f.rate_bps = float("inf")
            return
        port, share = min(((p, free[p] / n) for p, n in users.items()), key=lambda x: x[1])
        for f in unfrozen:
            f.rate_bps += share
        for p in users:
            free[p] -= share * users[p]
        frozen = {f for f in unfrozen if any(free[p] <= 1e-9 * max(1.0, p.rate_bps) for p in f.ports)}
        unfrozen -= frozen or {next(iter(unfrozen))}


class FlowNetwork:
    """The flows in progress on one simulated fabric."""

    def __init__(self, env: simpy.Environment, transport: str = "srd"):
        if transport not in ("srd", "tcp"):
            raise ValueError(f"transport must be srd or tcp, got {transport!r}")
        self.env = env
        self.transport = transport
        self.flows: list[Flow] = []
        self.changed: dict[str, dict[str, float]] = {}  # link name -> Port fields a link fault changed
        self.down: set[str] = set()         # links taken down
        self._last = 0.0
        self._wake: simpy.Event | None = None
        env.process(self._run())

    @staticmethod
    def link_of(port: Port) -> str:
        return port.name.rsplit(":", 1)[0]

    def set_link(self, link: str, *, rate_bps: float | None = None, latency_s: float | None = None,
                 loss: float | None = None, up: bool | None = None) -> None:
        """A link fault now, on both directions of ``link`` (None leaves a parameter as it is)."""
        self._advance()
        change = {k: v for k, v in (("rate_bps", rate_bps), ("latency_s", latency_s), ("loss", loss)) if v is not None}
        self.changed.setdefault(link, {}).update(change)
        if up is not None:
            (self.down.discard if up else self.down.add)(link)
        self._reschedule()

    def current(self, port: Port) -> Port:
        """The port as link faults left it (rate, latency, loss)."""
        change = self.changed.get(self.link_of(port))
        return replace(port, **change) if change else port

    def capacity(self, port: Port) -> float:
        return 0.0 if self.link_of(port) in self.down else self.current(port).rate_bps

    def transfer(self, ports: tuple[Port, ...], nbytes: float) -> simpy.Event:
        """An event that fires when ``nbytes`` have crossed ``ports`` (plus their latency)."""
        done = self.env.event()
        stretch = srd_stretch(self.current(p).loss for p in ports)
        latency = sum(self.current(p).latency_s for p in ports)
        if self.transport == "tcp" and stretch > 1.0 and ports:
            cap = mathis_rate_bps(min(p.mtu for p in ports), 2 * latency, 1.0 - 1.0 / stretch)
            ports = (*ports, Port(f"tcp-loss-cap:{id(done)}", cap))   # a private port: this flow's cap
        flow = Flow(ports, nbytes * 8.0 * stretch, done, latency_s=latency)
        self._advance()
        if flow.remaining_bits <= 0 or not ports:
            self._deliver(flow)
            return done
        self.flows.append(flow)
        self._reschedule()
        return done

    def transfer_striped(self, stripes: list[tuple[Port, ...]], nbytes: float) -> simpy.Event:
        """``nbytes`` split evenly over several flows (one per rail pair, as the TCP transport
        stripes a transfer over its connections); fires when the last stripe has arrived."""
        if len(stripes) <= 1:
            return self.transfer(stripes[0] if stripes else (), nbytes)
        share = nbytes / len(stripes)
        return simpy.AllOf(self.env, [self.transfer(ports, share) for ports in stripes])

    def _advance(self) -> None:
        """Account the bits sent since the last change at the current rates."""
        dt = self.env.now - self._last
        if dt > 0:
            for f in self.flows:
                f.remaining_bits -= f.rate_bps * dt
        self._last = self.env.now

    def _reschedule(self) -> None:
        max_min_rates(self.flows, self.capacity)
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def _deliver(self, flow: Flow) -> None:
        """The flow's last bit arrives one path latency after it left (a timeout's callback)."""
        self.env.timeout(flow.latency_s).callbacks.append(lambda _: flow.done.succeed())

    def _run(self):
        while True:
            self._wake = self.env.event()
            if not self.flows:
                yield self._wake
                continue
            finish = min(f.remaining_bits / f.rate_bps if f.rate_bps > 0 else float("inf") for f in self.flows)
            if finish == float("inf"):  # every flow stalled on a link that is down: wait for a change
                yield self._wake
            else:
                yield self._wake | self.env.timeout(max(0.0, finish))
            self._advance()
            ended = [f for f in self.flows if f.remaining_bits <= 1e-3 + f.rate_bps * 1e-12]
            if ended:
                self.flows = [f for f in self.flows if f not in ended]
                for f in ended:
                    self._deliver(f)
                max_min_rates(self.flows, self.capacity)
