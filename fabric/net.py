"""FabricNet: a topology file as a running Mininet network, with dilated, shaped links.

Hosts are network namespaces; each network (frontend, efa, mgmt) is a tree of Linux bridges.
The root namespace joins frontend and mgmt (so the router URL and the MQTT broker are reachable
from the machine running the testbed), never efa. Everything it creates carries the prefix, and
every process it starts is recorded (``fabric.cleanup``), so teardown, even after a crash,
removes exactly what this run made.
"""
from __future__ import annotations

import math
import subprocess
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from mininet.net import Mininet
from mininet.node import Host, Node

from fabric.capture import Capture, stop_all
from core.pids import kill_recorded
from fabric.cleanup import our_links, prefix_registry
from fabric.link import FabricBridge, ShapedLink
from fabric.shaping import check_prefix
from fabric.shaping.loss import LossRule, LossRules
from fabric.topo import FabricTopo
from core.vocab import NETWORKS
from fabric.topology import LinkParams, RailLink, TopologyConfig, find_path, load_topology

if TYPE_CHECKING:
    from fabric.shaping.nfqdelay import Delayer

RTO_MIN_FLOOR_S = 0.005
"""Wall-clock floor of the default rto_min: about one jiffy at HZ=250 plus timer slack."""
RTO_MIN_RTT_FACTOR = 3.0
"""Default rto_min = this x the largest dilated EFA round trip (with jitter), at least the floor."""
RAIL_TABLE_BASE = 100
"""Rail k's policy-routing table (and rule preference) in a host's namespace: 100 + k."""
QUEUE_BY_NETWORK = {"frontend": 1, "efa": 2, "mgmt": 3}
"""NFQUEUE numbers of the fallback delayer, per network (queues are per namespace)."""


def root_addresses_in(networks: Iterable[IPv4Network]) -> list[str]:
    """``"ADDR/LEN on IFACE"`` for each root-namespace IPv4 address inside one of ``networks``."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        if "inet" not in fields:
            continue
        iface, cidr = fields[1], fields[fields.index("inet") + 1]
        addr = IPv4Interface(cidr).ip
        if any(addr in net for net in networks):
            found.append(f"{cidr} on {iface}")
    return found


class FabricError(RuntimeError):
    """The fabric cannot be built or changed as asked."""


class FabricNet(Mininet):
    """Mininet built from a :class:`TopologyConfig`, dilated by ``tdf`` and ``byte_scale``.

    Link parameters given to the constructor (``overrides``) and to :meth:`set_link` are MODEL
    values; the emulated rate is ``rate x byte_scale / tdf`` (byte scale on the efa network only:
    the other networks carry unscaled payloads) and latency and jitter are ``x tdf``.
    """

    def __init__(self, topo: TopologyConfig | str | Path, *, tdf: float = 1.0, byte_scale: float = 1.0,
                 prefix: str = "pt", impairment: str = "auto", overrides: dict[str, LinkParams] | None = None,
                 rto_min_s: float | None = None, subnets: dict[str, str] | None = None,
                 root_access: bool = True) -> None:
        self.prefix = check_prefix(prefix)
        topology = topo if isinstance(topo, TopologyConfig) else load_topology(topo)
        self.registry = prefix_registry(prefix)
        leftovers = our_links(prefix)
        alive = self.registry.alive()
        if leftovers or alive:
            raise FabricError(f"leftovers of an earlier run with prefix {prefix!r} (interfaces {leftovers}, "
                              f"processes {[e['pid'] for e in alive]}): run `pdtb clean --prefix {prefix}` first")
        self.registry.clear()
        if rto_min_s is not None and not (0 < rto_min_s <= 10):
            raise ValueError(f"rto_min_s must be in (0, 10] model seconds, got {rto_min_s!r}")
        self.fabric_topo = FabricTopo(topology, tdf=tdf, byte_scale=byte_scale, prefix=prefix,
                                      impairment=impairment, overrides=overrides, subnets=subnets,
                                      root_access=root_access)
        self.topology = topology
        self.plan = self.fabric_topo.plan
        if root_access:
            clashes = root_addresses_in(self.plan.nets.values())
            if clashes:
                # two runs joining the root namespace to one subnet would split its traffic silently
                raise FabricError(f"the root namespace already has addresses in this run's subnets ({clashes}): "
                                  "another run is up, or the host uses these networks; stop it or give this "
                                  "run other subnets")
        self.dilation = self.fabric_topo.dilation
        self.root_access = root_access
        self._rto_min_s = rto_min_s
        self._procs: list[subprocess.Popen] = []
        self._captures: list[Capture] = []
        self._delayers: dict[tuple[str, str], Delayer] = {}
        self._loss: dict[tuple[str, str], LossRules] = {}
        self._links: dict[str, ShapedLink] = {}
        self._down: set[str] = set()
        self.fidelity_notes: list[str] = []
        self.teardown_problems: list[str] = []
        self._stopped = False
        self._started = False
        super().__init__(topo=self.fabric_topo, switch=FabricBridge, host=Host, controller=None,
                         link=ShapedLink, build=False)

    # -- construction ----------------------------------------------------------------------------

    def addHost(self, name: str, cls: Any = None, **params: Any) -> Node:  # noqa: N802 (Mininet API)
        node = super().addHost(name, cls=cls, **params)
        self.registry.record(node.pid, f"shell {name}")
        return node

    def addSwitch(self, name: str, cls: Any = None, **params: Any) -> Node:  # noqa: N802
        node = super().addSwitch(name, cls=cls, **params)
        self.registry.record(node.pid, f"shell {name}")
        return node

    def start(self) -> None:
        """Build the namespaces, bridges and shaped links, then the routes and impairments.
        On any failure everything made so far is removed before the error propagates."""
        if self._started:
            return
        self._started = True
        try:
            self.build()
            self._links = {lk.name: lk for lk in self.links if getattr(lk, "name", None)}
            super().start()
            self._quiet_ipv6()
            self._set_rto_min()
            if self.impairment_backend == "fallback":
                for net in NETWORKS:
                    self._apply_fallback(net)
                self.fidelity_notes.append(
                    "fallback impairments: loss is exact per link and direction; one-way latency and jitter are "
                    "held at the receiving host (each host's ingress holds twice its own link's latency), so "
                    "every round trip is exact and a one-way delay is shifted between the two directions "
                    "when the two ends' links differ")
        except BaseException as exc:
            try:
                self.stop()
            except FabricError as teardown:
                exc.add_note(str(teardown))
            raise

    def _quiet_ipv6(self) -> None:
        """No IPv6 on the fabric: no router solicitations, DAD or MLD in the captures."""
        for host in self.hosts:
            if host.inNamespace:
                host.cmd("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")
        for name in our_links(self.prefix):
            subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"], capture_output=True)

    # -- transport knobs ---------------------------------------------------------------------------

    @property
    def rto_min_wall_s(self) -> float:
        """The rto_min set on every EFA route (wall seconds): the knob x TDF, or by default
        3 x the largest dilated EFA round trip (plus jitter), at least 5 ms."""
        if self._rto_min_s is not None:
            return self._rto_min_s * self.dilation.tdf
        efa_hosts = [h.name for h in self.topology.hosts if self.plan.rails(h.name, "efa")]
        pairs = [(a, b) for i, a in enumerate(efa_hosts) for b in efa_hosts[i + 1:]]
        return max([RTO_MIN_FLOOR_S] + [self.route_rto_min_wall_s(a, b) for a, b in pairs])

    def route_rto_min_wall_s(self, a: str, b: str) -> float:
        """The rto_min of the EFA routes between hosts ``a`` and ``b`` (wall seconds): the knob x
        TDF, or 3 x their dilated round trip (with jitter), at least 5 ms."""
        if self._rto_min_s is not None:
            return self._rto_min_s * self.dilation.tdf
        path = self._path(a, b, "efa")
        rtt = 2 * sum(self._model(lk.name).latency_s + self._model(lk.name).jitter_s for lk in path)
        return max(RTO_MIN_FLOOR_S, RTO_MIN_RTT_FACTOR * self.dilation.time(rtt))

    def efa_route_lines(self, host: str) -> list[str]:
        """``ip -batch`` lines for ``host``'s EFA routes. Every route carries rto_min and quickack
        (TCP's RTO floor from the dilated RTT, ACKs not delayed). With rails (docs/fabric.md):
        rail k's own subnet is reached on rail k; another rail subnet r that the host lacks on
        rail r mod n; and a socket bound to rail k's address always leaves by rail k (a policy
        rule selects table 100 + k), so a sender can pick the rail of each connection."""
        rails = self.plan.rails(host, "efa")
        if not rails:
            return []
        ms = max(1, math.ceil(self.rto_min_wall_s * 1000))
        knobs = f"rto_min {ms}ms quickack 1"
        n = len(rails)
        intf = [self.plan.host_intf(host, "efa", k) for k in range(n)]
        addr = [self.plan.address(host, "efa", k) for k in range(n)]
        lines = [f"route replace {self.plan.rail_subnet(k)} dev {intf[k]} proto kernel scope link src {addr[k]} {knobs}"
                 for k in range(n)]
        top = self.plan.max_rails["efa"]
        if top > 1:
            lines += [f"route replace {self.plan.rail_subnet(r)} dev {intf[r % n]} scope link src {addr[r % n]} {knobs}"
                      for r in range(n, top)]
            efa = self.plan.nets["efa"]
            for k in range(n):
                table = RAIL_TABLE_BASE + k
                lines += [f"rule add from {addr[k]} lookup {table} pref {table}",
                          f"route replace {efa} dev {intf[k]} scope link src {addr[k]} table {table} {knobs}"]
        # per peer: a host route with that route's own rto_min (3 x its dilated round trip);
        # the subnet routes above carry the largest, for addresses of no host
        for peer in (h.name for h in self.topology.hosts if h.name != host and self.plan.rails(h.name, "efa")):
            pms = max(1, math.ceil(self.route_rto_min_wall_s(host, peer) * 1000))
            if pms == ms:
                continue
            pknobs = f"rto_min {pms}ms quickack 1"
            for r, paddr in enumerate(self.plan.addresses(peer, "efa")):
                k = r if r < n else r % n
                lines.append(f"route replace {paddr}/32 dev {intf[k]} scope link src {addr[k]} {pknobs}")
                if top > 1:
                    lines += [f"route replace {paddr}/32 dev {intf[j]} scope link src {addr[j]} "
                              f"table {RAIL_TABLE_BASE + j} {pknobs}" for j in range(n)]
        return lines

    def _set_rto_min(self) -> None:
        """Routes (and, with rails, the ARP and reverse-path settings several interfaces on one
        bridge need: answer ARP only for the interface's own address, loose rp_filter)."""
        multi = self.plan.max_rails["efa"] > 1
        for h in self.topology.hosts:
            lines = self.efa_route_lines(h.name)
            if not lines:
                continue
            node = self._node(h.name)
            if multi:
                node.cmd("sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 "
                         "net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.default.rp_filter=2")
            proc = node.popen(["ip", "-batch", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
            out, err = proc.communicate(("\n".join(lines) + "\n").encode(), timeout=30)
            if proc.returncode != 0:
                raise FabricError(f"ip -batch (EFA routes) in {node.name} failed: "
                                  f"{(err or out).decode(errors='replace').strip()}")

    # -- fallback impairments ----------------------------------------------------------------------

    def _apply_fallback(self, net: str) -> None:
        """Loss rules and delayers of every host on ``net`` from the current link parameters."""
        from fabric.shaping.nfqdelay import Delayer

        hosts = [h.name for h in self.topology.hosts if self._host_link(h.name, net) is not None]
        root_sw = self.plan.root_switch(net) if self.root_access and net in ("frontend", "mgmt") else None
        for g in hosts:
            rails = self.plan.rails(g, net)
            intfs = [self.plan.link_intf(lk, g) for lk in rails]
            node = self._node(g)
            own = self._emulated(rails[0].name)
            mids_lat: list[float] = []
            mids_jit: list[float] = []
            senders = [(s, a, s) for s in hosts if s != g for a in self.plan.addresses(s, net)] \
                if net == "efa" else [(s, self.plan.address(s, net), s) for s in hosts if s != g]
            if root_sw is not None:
                senders.append((root_sw, self.plan.root_address(net), None))
            changes: list[tuple[LossRules, list[LossRule]]] = []
            for lk, intf in zip(rails, intfs):
                rules: list[LossRule] = []
                for start, addr, sender_host in senders:
                    path = self._path(start, g, net)
                    path = [*path[:-1], lk] if path else path   # the last hop is this rail
                    keep = math.prod(1.0 - self._emulated(p.name)["loss"] for p in path)
                    rules.append(LossRule(addr, 1.0 - keep))
                    if sender_host is not None and lk.rail == 0:
                        middle = [p for p in path if not self._touches_host(p)]
                        mids_lat.append(sum(self._emulated(p.name)["latency_s"] for p in middle))
                        mids_jit.append(sum(self._emulated(p.name)["jitter_s"] ** 2 for p in middle))
                rules.append(LossRule(None, self._emulated(lk.name)["loss"]))
                key = (g, intf)
                if key in self._loss or any(r.probability > 0 for r in rules):
                    if key not in self._loss:
                        self._loss[key] = LossRules(node, intf, self.prefix)
                    changes.append((self._loss[key], rules))
            LossRules.set_many(changes)   # all of the host's rails in one iptables-restore
            mid_lat = sum(mids_lat) / len(mids_lat) if mids_lat else 0.0
            mid_jit2 = sum(mids_jit) / len(mids_jit) if mids_jit else 0.0
            latency = 2 * own["latency_s"] + mid_lat
            jitter = math.sqrt(2 * own["jitter_s"] ** 2 + mid_jit2)
            key = (g, net)
            if key in self._delayers:
                self._delayers[key].update(latency, jitter)
            elif latency > 0 or jitter > 0:
                # one delayer for all of a host's rails: they share the link's latency (a latency
                # set on one rail at run time applies to rail 0's value for all: docs/fabric.md)
                delayer = Delayer.start(node, intfs[0], QUEUE_BY_NETWORK[net], latency, jitter,
                                        comment=f"pdtb:{self.prefix}:delay:{intfs[0]}", also_intfs=tuple(intfs[1:]))
                self._delayers[key] = delayer
                self.registry.record(delayer.pid, f"delayer {intfs[0]}")

    def _touches_host(self, lk: RailLink) -> bool:
        return self.plan.is_host(lk.a) or self.plan.is_host(lk.b)

    # -- queries -----------------------------------------------------------------------------------

    @property
    def impairment_backend(self) -> str:
        """``netem`` or ``fallback``: how delay, jitter and loss are applied (record it with results)."""
        return self.fabric_topo.backend

    def address(self, host: str, cls: str, rail: int = 0) -> str:
        """The address of topology host ``host`` on network ``cls`` (on efa: of rail ``rail``)."""
        rails = self.plan.rails(host, cls)
        if not rails:
            raise KeyError(f"host {host!r} has no {cls} link")
        if not 0 <= rail < len(rails):
            raise KeyError(f"host {host!r} has {len(rails)} {cls} rails, no rail {rail}")
        return self.plan.address(host, cls, rail)

    def addresses(self, host: str, cls: str = "efa") -> list[str]:
        """One address per rail of ``host`` on ``cls``, in rail order (what a KV sender stripes over)."""
        if not self.plan.rails(host, cls):
            raise KeyError(f"host {host!r} has no {cls} link")
        return self.plan.addresses(host, cls)

    def root_address(self, cls: str) -> str:
        """The root namespace's address on ``frontend`` or ``mgmt``."""
        if not self.root_access or cls not in ("frontend", "mgmt") or self.plan.root_switch(cls) is None:
            raise KeyError(f"the root namespace is not attached to the {cls} network")
        return self.plan.root_address(cls)

    def link_names(self) -> list[str]:
        """The emulated links of the topology's declared links: a plain link's name, or
        ``<link>-r<k>`` per rail of a link with rails (the implicit mgmt links are not listed)."""
        declared = {lk.name for lk in self.topology.links}
        return [lk.name for lk in self.plan.links if lk.group in declared]

    def rail_groups(self) -> dict[str, list[str]]:
        """Declared links with rails -> their emulated links, in rail order."""
        out: dict[str, list[str]] = {}
        for lk in self.plan.links:
            if lk.railed:
                out.setdefault(lk.group, []).append(lk.name)
        return out

    def host_node(self, host: str) -> Node:
        """The Mininet node of topology host ``host``."""
        return self._node(host)

    def link_params(self, link_name: str) -> LinkParams:
        """Current MODEL parameters of a link (after overrides and runtime changes); of a
        declared link with rails: its rail 0's, with the rails' summed bandwidth."""
        rails = self.rail_groups().get(link_name)
        if rails:
            bws = [self._model(r).bandwidth_bps for r in rails]
            total = sum(bws) if all(bws) else None   # type: ignore[arg-type]
            return self._model(rails[0]).model_copy(update={"bandwidth_bps": total})
        return self._model(link_name)

    def delayers(self) -> dict[str, Delayer]:
        """The fallback backend's NFQUEUE delayers by the interface whose ingress they hold
        (``<node>-e`` etc.; empty on the netem backend). A snapshot: set_link may add one."""
        return {d.intf_name: d for d in self._delayers.values()}

    def settings(self) -> dict[str, Any]:
        """What a run must record about its fabric."""
        return {
            "prefix": self.prefix, "impairment_backend": self.impairment_backend, "tdf": self.dilation.tdf,
            "byte_scale": self.dilation.byte_scale, "byte_scaled_networks": ["efa"],
            "rto_min_wall_s": self.rto_min_wall_s, "subnets": dict(self.plan.subnets),
            "links": {name: {"class": self._spec(name).cls, "group": self._spec(name).group,
                             "rail": self._spec(name).rail,
                             "model": self._model(name).model_dump(mode="json", by_alias=True),
                             "emulated": self._emulated(name), "up": name not in self._down}
                      for name in self.link_names()},
            "rails": {h.name: self.plan.addresses(h.name, "efa") for h in self.topology.hosts
                      if self.plan.rails(h.name, "efa")},
            "fidelity_notes": list(self.fidelity_notes),
        }

    # -- processes ---------------------------------------------------------------------------------

    def popen(self, host: str | Node, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start ``argv`` inside ``host``'s namespace; the PID is recorded and killed on stop().
        stdin/stdout/stderr default to /dev/null (pass files to keep output)."""
        node = host if isinstance(host, Node) else self._node(host)
        for stream in ("stdin", "stdout", "stderr"):
            kw.setdefault(stream, subprocess.DEVNULL)
        proc = node.popen([str(a) for a in argv], **kw)
        self._procs.append(proc)
        self.registry.record(proc.pid, f"{node.name}: {argv[0]}")
        return proc

    # -- runtime changes ---------------------------------------------------------------------------

    def set_link(self, link_name: str, *, bandwidth_bps: float | None = None, latency_s: float | None = None,
                 jitter_s: float | None = None, loss: float | None = None, up: bool | None = None,
                 _refresh_fallback: bool = True) -> None:
        """Change a link at run time (MODEL values; None leaves a parameter as it is).
        Both directions change; ``up=False`` takes the link down, ``up=True`` brings it back.
        A declared link with rails changes all its rails, its ``bandwidth_bps`` split over them."""
        groups = self.rail_groups()
        if link_name in groups:
            rails = groups[link_name]
            for name in rails:
                self.set_link(name, bandwidth_bps=None if bandwidth_bps is None else bandwidth_bps / len(rails),
                              latency_s=latency_s, jitter_s=jitter_s, loss=loss, up=up, _refresh_fallback=False)
            changed = any(v is not None for v in (bandwidth_bps, latency_s, jitter_s, loss))
            if changed and self.impairment_backend == "fallback":
                self._apply_fallback(self._spec(rails[0]).cls)   # once for all the rails
            return
        if link_name not in self._links or link_name not in self.link_names():
            raise KeyError(f"no link {link_name!r}; links: {self.link_names()}")
        change = {k: v for k, v in (("bandwidth_bps", bandwidth_bps), ("latency_s", latency_s),
                                    ("jitter_s", jitter_s), ("loss", loss)) if v is not None}
        if change:
            current = self._model(link_name)
            merged = current.merged(LinkParams.si(**change))
            self.fabric_topo.model_params[link_name] = merged
            emu = self._emulated(link_name)
            self._links[link_name].reshape(rate_bps=emu["rate_bps"], latency_s=emu["latency_s"],
                                           jitter_s=emu["jitter_s"], loss=emu["loss"],
                                           queue_packets=emu["queue_packets"])
            if self.impairment_backend == "fallback" and _refresh_fallback:
                self._apply_fallback(self._spec(link_name).cls)
        if up is not None:
            self._links[link_name].set_up(up)
            (self._down.discard if up else self._down.add)(link_name)

    # -- capture -----------------------------------------------------------------------------------

    def start_capture(self, targets: Sequence[str], out_dir: Path) -> list[Path]:
        """tcpdump (``fabric.capture.SNAPLEN``: headers and the KV BEGIN frame, not payloads) on
        each target: a link name, or a network (``efa``, ``frontend``, ``mgmt``) meaning all its
        links. Captured at the host end of the link (both directions, as the host's NIC sees them).
        Returns the pcap paths; stopped by stop() or stop_capture()."""
        names: list[str] = []
        known = {lk.name: lk for lk in self.plan.links}
        for target in targets:
            if target in NETWORKS:
                names += [lk.name for lk in self.plan.links if lk.cls == target]
            elif target in self.rail_groups():
                names += self.rail_groups()[target]
            elif target in known:
                names.append(target)
            else:
                raise ValueError(f"capture target {target!r} is neither a network ({', '.join(NETWORKS)}) "
                                 f"nor a link ({', '.join(self.link_names())})")
        out_dir = Path(out_dir)
        paths = []
        for name in dict.fromkeys(names):
            lk = known[name]
            link = self._links[name]
            end = link.intf1 if self.plan.is_host(lk.a) else link.intf2
            path = out_dir / f"{name}.pcap"
            cap = Capture.start(end.node, end.name, path)
            self._captures.append(cap)
            self.registry.record(cap.pid, f"tcpdump {end.name}")
            paths.append(path)
        return paths

    def stop_capture(self) -> None:
        """Stop all captures, once their files have stopped growing (at most a few seconds), so
        the packets tcpdump already received are written."""
        stop_all(self._captures)
        self._captures.clear()

    # -- teardown ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop captures, delayers and started processes, then the network. Idempotent, and
        safe after a partial start. Anything recorded that still runs is killed at the end; a
        step that failed without leaving anything behind is noted in ``teardown_problems``;
        FabricError only if something is left."""
        if self._stopped:
            return
        self._stopped = True
        errors: list[str] = []
        for step in (self.stop_capture, self._stop_delayers, self._stop_procs, super().stop):
            try:
                step()
            except Exception as exc:  # keep tearing down; report at the end
                errors.append(f"{getattr(step, '__name__', step)}: {exc}")
        kill_recorded(self.registry.entries())
        for name in our_links(self.prefix):
            subprocess.run(["ip", "link", "del", "dev", name], capture_output=True)
        still = self.registry.alive()
        left = our_links(self.prefix)
        self.teardown_problems = errors
        if still or left:
            raise FabricError(f"teardown left processes {[e['pid'] for e in still]} and interfaces {left} "
                              f"({'; '.join(errors) or 'no step failed'}); run `pdtb clean --prefix {self.prefix}`")
        self.registry.clear()

    def _stop_delayers(self) -> None:
        """In parallel: each stop may wait seconds for its process to release held packets."""
        def stop_one(delayer: Any) -> None:
            try:
                delayer.stop()
            except Exception:  # the namespace goes away next; the process is killed by PID anyway
                pass
        if self._delayers:
            with ThreadPoolExecutor(max_workers=len(self._delayers)) as pool:
                list(pool.map(stop_one, self._delayers.values()))
        self._delayers.clear()

    def _stop_procs(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3)
        self._procs.clear()

    def __enter__(self) -> FabricNet:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- helpers -----------------------------------------------------------------------------------

    def _node(self, host: str) -> Node:
        if not self.plan.is_host(host):
            raise KeyError(f"no host {host!r}; hosts: {[h.name for h in self.topology.hosts]}")
        return self[self.plan.node(host)]

    def _host_link(self, host: str, net: str) -> RailLink | None:
        rails = self.plan.rails(host, net)
        return rails[0] if rails else None

    def _spec(self, link_name: str) -> RailLink:
        return next(lk for lk in self.plan.links if lk.name == link_name)

    def _path(self, src: str, dst: str, net: str) -> list[RailLink]:
        return find_path(self.plan.links, src, dst, net, set(self.plan.index))

    def _model(self, link_name: str) -> LinkParams:
        return self.fabric_topo.model_params[link_name]

    def _emulated(self, link_name: str) -> dict[str, Any]:
        cls = next(lk.cls for lk in self.plan.links if lk.name == link_name)
        return self.dilation.link(self._model(link_name), cls)

