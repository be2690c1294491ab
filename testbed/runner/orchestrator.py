"""One run, start to end: the only place that knows scenarios, the fabric and the daemons.

Sequence: load the scenario -> choose the emulation (TDF, byte scale) -> predict -> write
the workload -> build the backend (Mininet net or loopback) -> start mosquitto -> start the
compute nodes and the router and wait for their ``/health`` -> start the fidelity monitor
and captures -> start the client -> drive faults on a model-time schedule while watching
for crashes and counting finished requests -> stop everything in reverse order (always, in a
``finally``) -> account for every request -> summary, report.

Model time 0 (``t0_wall``) is fixed when the node configs are written, a little in the
future so the workload normally begins exactly at model time 0. When the system needs longer
to come up (or a script starts the workload later), the workload and the fault schedule are
shifted together by ``workload_offset_s`` (model seconds, recorded in run.json).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from core.pids import PidRegistry
from fabric.cleanup import prefix_registry
from nodes.config import (ClientSettings, DecodeSettings, KvSettings, NodeConfig, PeerInfo,
                          PrefillSettings, RouterSettings)
from nodes.timeline import Timeline, read_timeline
from nodes.clock import ModelClock
from core.vocab import KV_ROLES, request_id
from core.config import ConfigError
from testbed.runner.backend import ROOT, NodePlan, backend_class, require_live
from testbed.runner.process import Managed, Supervisor, record_start, record_stop
from testbed.runner.rundir import RunDir, utc_stamp

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "pt"


class RunError(RuntimeError):
    """The run could not be brought up (a daemon died, a health check timed out)."""


# ------------------------------------------------------------------ choices
def check_prefix(prefix: str) -> str:
    """The Mininet/cleanup prefix, validated as the fabric requires (a ConfigError otherwise)."""
    from fabric.shaping import check_prefix as fabric_check

    try:
        return fabric_check(prefix)
    except ValueError as exc:
        raise ConfigError("prefix", [("", str(exc))]) from None


def clean_registry(prefix: str) -> PidRegistry | None:
    """Where ``pdtb clean --prefix`` finds a run's PIDs (fabric.cleanup's registry; root only)."""
    return prefix_registry(prefix) if os.geteuid() == 0 else None


# ------------------------------------------------------------------ plan of nodes
@dataclass
class FaultRecord:
    at: float
    action: str
    target: str
    params: dict[str, Any]
    applied_t_model: float | None = None
    ok: bool | None = None
    error: str | None = None
    links: list[str] = field(default_factory=list)


def effective_topology(topo: Any, overrides: dict[str, dict[str, Any]]) -> Any:
    """The topology with the scenario's per-class link overrides (``fabric.efa.bandwidth`` ...) applied."""
    if not overrides:
        return topo
    from fabric.topology import LinkParams

    def params(updates: dict[str, Any]) -> Any:
        # the unit-checked fields take text with units, as in a topology file
        units = {"bandwidth_bps": "bps", "latency_s": "s", "jitter_s": "s"}
        return LinkParams.model_validate({k: f"{v!r}{units[k]}" if k in units else v for k, v in updates.items()})

    links = [lk.model_copy(update={"params": lk.params.merged(params(overrides[lk.cls]))})
             if lk.cls in overrides else lk for lk in topo.links]
    return topo.model_copy(update={"links": links})


def batching(sc: Any, role: str) -> tuple[PrefillSettings, DecodeSettings]:
    """How a node of ``role`` batches and queues: its pool's ``token_budget``, ``chunk_tokens``,
    ``max_batch`` and ``max_queue`` where the scenario sets them, else the daemons' defaults."""
    spec = getattr(sc.pools, role, None) if role in ("prefill", "decode", "colocated") else None
    prefill = {k: getattr(spec, k, None) for k in ("token_budget", "chunk_tokens", "max_queue")}
    decode = {k: getattr(spec, k, None) for k in ("max_batch", "max_queue")}
    return (PrefillSettings(**{k: v for k, v in prefill.items() if v is not None}),
            DecodeSettings(**{k: v for k, v in decode.items() if v is not None}))


def plan_run(sc: Any, backend: str) -> tuple[Any, dict[str, NodePlan], str]:
    """(topology with overrides, nodes by name, client name) of a scenario on a backend.

    The scenario's pools on the topology, its router (or one in the root namespace) and its
    client; raises ConfigError for a scenario this backend cannot run. Cheap: call it before
    making a run directory.
    """
    from fabric.topology import load_topology
    from testbed.config.scenario import BROKER, LINK_ACTIONS, selected_hosts, topology_problems

    topo = effective_topology(load_topology(sc.topology_ref()), sc.fabric.overrides())
    problems = topology_problems(sc, topo)
    if problems:
        raise ConfigError(sc.source, problems)
    nodes: dict[str, NodePlan] = {}
    for role, hosts in selected_hosts(sc, topo).items():
        for name, hw in hosts:
            nodes[name] = NodePlan(name, role, name, hw)
    routers = topo.hosts_with_role("router")
    router = routers[0].name if routers else next(n for n in ("router", "rtr") if n not in nodes)
    nodes[router] = NodePlan(router, "router", routers[0].name if routers else ROOT)
    clients = topo.hosts_with_role("client")
    client = clients[0].name if clients else next(n for n in ("client", "loadgen") if n not in nodes)
    nodes[client] = NodePlan(client, "client", clients[0].name if clients else ROOT)
    for i, f in enumerate(sc.faults):
        if f.action in LINK_ACTIONS and not backend_class(backend).link_faults:
            problems.append((f"faults[{i}].action", f"{f.action} needs emulated or simulated links: use the "
                                                    f"mininet or sim backend (the {backend} backend has none)"))
        if f.action == "restart" and f.target == BROKER:
            continue
        if f.action not in LINK_ACTIONS and (f.target not in nodes or nodes[f.target].role == "client"):
            problems.append((f"faults[{i}].target", f"{f.target!r} is not a serving node of this run "
                                                    f"({', '.join(n for n, p in nodes.items() if p.role != 'client')})"))
    if problems:
        raise ConfigError(sc.source, problems)
    return topo, nodes, client


class Orchestrator:
    """Brings one scenario up on a backend and runs it; ``stop()`` always tears everything down.

    ``run()`` is the whole of ``pdtb run`` for one scenario (no sweep). ``start()`` / ``run_client()``
    / ``stop()`` are the pieces ``pdtb up`` and the scripting API use.
    """

    def __init__(self, scenario: Any, run_dir: RunDir, *, backend: str = "local", scenario_path: str | None = None,
                 pcap: list[str] | None = None, prefix: str = DEFAULT_PREFIX, quiet: bool = False):
        self.sc = scenario
        self.rd = run_dir
        self.backend_name = backend
        self.backend_cls = require_live(backend, "an orchestrated run")
        self.scenario_path = scenario_path
        self.pcap = list(pcap or [])
        self.prefix = check_prefix(prefix)
        self.quiet = quiet
        self.topo: Any = None
        self.backend: Any = None
        self.broker: Any = None
        self.tdf = 1.0
        self.byte_scale = 1.0
        self.emulation_reason = ""
        self.host_capacity_bps: float | None = None
        self.t0_wall = 0.0
        self.workload_offset_s = 0.0
        self.nodes: dict[str, NodePlan] = {}
        self.configs: dict[str, NodeConfig] = {}
        self.clean_registry = clean_registry(prefix)
        self.registries = [PidRegistry(run_dir.pids), *([self.clean_registry] if self.clean_registry else [])]
        self.sup = Supervisor(self.registries)
        self.crashes: list[dict[str, Any]] = []
        self.faults: list[FaultRecord] = []
        self.stop_reason: str | None = None
        self.started = False
        self.stopped = False
        self._client_name: str | None = None
        self._secret = secrets.token_hex(32)
        self._n_requests = 0
        self._fidelity: dict[str, Any] | None = None
        self._captures: list[str] = []
        self._stop_lock = threading.Lock()

    # -------------------------------------------------------------- setup
    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def plan(self) -> None:
        """Which daemons run where (see :func:`plan_run`), and the fault schedule."""
        self.topo, self.nodes, self._client_name = plan_run(self.sc, self.backend_name)
        for f in self.sc.faults:
            params = f.link_updates() if f.action == "set_link" else ({"factor": f.factor} if f.factor else {})
            self.faults.append(FaultRecord(f.at, f.action, f.target, params))

    @property
    def router_name(self) -> str:
        return next(n for n, p in self.nodes.items() if p.role == "router")

    @property
    def client_name(self) -> str:
        assert self._client_name
        return self._client_name

    @property
    def compute_nodes(self) -> list[NodePlan]:
        return [p for p in self.nodes.values() if p.role in ("prefill", "decode", "colocated")]

    def choose_emulation(self) -> None:
        """TDF and byte scale: as set in the scenario, else chosen for this host and the (overridden) topology.

        A backend without emulated links: an ``auto`` TDF is 1 there (byte scale still applies).
        """
        from fabric.dilation import choose_emulation, load_host_capacity

        em = self.sc.emulation
        tdf: Any = em.tdf
        notes = []
        if not self.backend_cls.emulates_links and tdf == "auto":
            tdf = 1.0
            notes.append(f"{self.backend_name} backend (no emulated links): TDF 1")
        capacity = None
        if em.byte_scale == "auto" or tdf == "auto":
            capacity = load_host_capacity()
            if capacity is None:
                capacity = self.backend_cls.host_capacity(self.prefix)
            bound = self.backend_cls.capacity_bound(self.prefix, em)  # e.g. a tunnel between servers
            if bound is not None and (capacity is None or bound[0] < capacity):
                capacity = bound[0]
                notes.append(bound[1])
        span = self._workload_span_s()
        choice = choose_emulation(self.topo, tdf, em.byte_scale,
                                  wall_budget_s=float(em.wall_budget) if em.wall_budget is not None else None,
                                  workload_model_s=span or None, host_capacity=capacity)
        self.tdf, self.byte_scale = float(choice.tdf), float(choice.byte_scale)
        self.host_capacity_bps = choice.host_capacity_bps
        self.emulation_reason = "; ".join([*notes, choice.reason])

    def _workload_span_s(self) -> float:
        """Model seconds from the first to the last arrival (0 before the workload exists)."""
        if not self.rd.workload.exists():
            return 0.0
        return max((float(i["arrival_s"]) for i in read_timeline(self.rd.workload)), default=0.0)

    def _write_workload(self) -> None:
        from testbed.workload import generate_workload, write_workload

        items = generate_workload(self.sc)
        write_workload(items, self.rd.workload)
        self._n_requests = len(items)

    def _build_backend(self) -> None:
        self.backend = self.backend_cls(self.prefix)
        self.backend.build(self.topo, self.nodes, tdf=self.tdf, byte_scale=self.byte_scale, emulation=self.sc.emulation)

    def _addr(self, plan: NodePlan, cls: str) -> str:
        return self.backend.address(plan, cls)

    def _write_configs(self) -> None:
        sc = self.sc
        kv = KvSettings(mode=sc.kv_transfer.mode, secret_hex=self._secret, chunk_bytes=int(sc.kv_transfer.chunk_bytes),
                        timeout_s=float(sc.kv_transfer.timeout), transport=sc.kv_transfer.transport,
                        rto_s=float(sc.kv_transfer.rto))
        router_settings = RouterSettings(prefill_policy=sc.router.prefill_policy,
                                         decode_policy=sc.router.decode_policy,
                                         request_timeout_s=float(sc.router.request_timeout),
                                         max_inflight=sc.router.max_inflight, retries=sc.router.retries,
                                         client_timeout_s=float(sc.router.client_timeout))
        http = {p.name: self.backend.http_endpoint(p) for p in self.nodes.values() if p.role != "client"}
        # colocated nodes keep their KV cache where it was made: no KV endpoint (and no EFA link)
        kv_ep = {p.name: self.backend.kv_endpoint(p) for p in self.compute_nodes if p.role == "decode"}
        kv_addrs = {p.name: self.backend.kv_addresses(p) for p in self.compute_nodes if p.role in KV_ROLES}
        peers = [PeerInfo(name=p.name, role=p.role, http=http[p.name], kv=kv_ep.get(p.name),
                          kv_addrs=kv_addrs.get(p.name, []) if p.role == "decode" else [], hardware=p.hardware)
                 for p in self.compute_nodes]
        common = dict(run_id=self.rd.run_id, model=sc.model, tdf=self.tdf, byte_scale=self.byte_scale,
                      t0_wall=self.t0_wall, run_dir=str(self.rd.root), kv_transfer=kv, router=router_settings,
                      internal_secret_hex=self._secret)
        for p in self.nodes.values():
            if p.role == "client":
                continue
            prefill, decode = batching(self.sc, p.role)
            node_common = dict(common, kv_transfer=self._kv_link_settings(kv, p))
            cfg = NodeConfig(name=p.name, role=p.role, hardware=p.hardware, http=http[p.name],
                             kv=kv_ep.get(p.name), prefill=prefill, decode=decode,
                             kv_bind=self._addr(p, "efa") if p.role == "prefill" else None,
                             kv_addrs=kv_addrs.get(p.name, []),
                             peers=peers if p.role == "router" else
                             [q for q in peers if q.role == "decode"] if p.role == "prefill" else [],
                             mqtt=self.broker.mqtt_settings(p.name), **node_common)
            cfg.save(self.rd.node_config(p.name))
            self.configs[p.name] = cfg

    def _kv_link_settings(self, kv: KvSettings, plan: NodePlan) -> KvSettings:
        """The node's EFA link, as the SRD transport paces and packetises by it: wire rate
        (model rate x byte scale / TDF, on a backend that shapes links; 0 = unpaced otherwise)
        and MTU."""
        links = [lk for lk in self.topo.links if lk.cls == "efa" and plan.host in (lk.a, lk.b)]
        if plan.role not in ("prefill", "decode") or not links:
            return kv
        params = links[0].params
        bw = self.topo.link_total_bps(links[0])   # a link with rails: all of them (the sender sprays over them)
        rate = float(bw) * self.byte_scale / self.tdf if bw is not None and self.backend_name == "mininet" else 0.0
        return kv.model_copy(update={"rate_bps": rate, "mtu": int(params.mtu)})

    def _client_config(self) -> NodeConfig:
        p = self.nodes[self.client_name]
        timeout = float(self.sc.router.request_timeout) * 1.1 + 5.0  # the router fails a request first
        cfg = NodeConfig(run_id=self.rd.run_id, name=p.name, role="client", model=self.sc.model, tdf=self.tdf,
                         byte_scale=self.byte_scale, t0_wall=self.t0_wall, run_dir=str(self.rd.root),
                         client=ClientSettings(workload_file=str(self.rd.workload),
                                               router=self.configs[self.router_name].http,
                                               stream=self.sc.workload.stream, request_timeout_s=timeout))
        cfg.save(self.rd.node_config(p.name))
        self.configs[p.name] = cfg
        return cfg

    def _spawn(self, plan: NodePlan) -> Managed:
        argv = [sys.executable, "-m", "nodes", "--config", str(self.rd.node_config(plan.name))]
        spawner = self.backend.spawner(plan)
        env = dict(os.environ)
        repo = str(Path(__file__).resolve().parents[2])  # the daemons import this very source tree
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        return self.sup.spawn(plan.name, argv, log_path=self.rd.log(plan.name), env=env, spawner=spawner)

    def _wait_healthy(self, names: list[str], timeout_s: float) -> None:
        """Poll each node's ``/health`` until all answer; a daemon that exits meanwhile fails the start."""
        pending = list(names)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout_s
        while pending:
            for name in list(pending):
                m = self.sup.get(name)
                if m.poll() is not None:
                    m.reported = True
                    raise RunError(f"{name} exited with status {m.poll()} while starting; its log "
                                   f"{self.rd.log(name)} ends:\n{_tail(self.rd.log(name))}")
                try:
                    with opener.open(f"{self.configs[name].http.url}/health", timeout=1.0) as resp:
                        body = json.loads(resp.read() or b"{}")
                    if resp.status == 200 and body.get("ok", True):
                        pending.remove(name)
                except (OSError, ValueError, urllib.error.URLError):
                    pass
            if pending and time.monotonic() > deadline:
                raise RunError(f"no /health answer within {timeout_s:.0f} s from {', '.join(pending)}; see "
                               f"{self.rd.logs_dir}")
            if pending:
                time.sleep(0.1)

    def start(self, health_timeout_s: float = 60.0, with_workload: bool = True) -> None:
        """Everything up to (not including) the client. On failure everything started is stopped.

        ``with_workload=False`` (``pdtb up``) writes no workload: requests come from the user.
        """
        self.started = True
        try:
            self._start(health_timeout_s, with_workload)
        except BaseException:
            self.stop()
            raise

    def _start(self, health_timeout_s: float, with_workload: bool) -> None:
        from testbed.broker import Broker

        if not self.nodes:
            self.plan()
        if with_workload:
            self._write_workload()
        self.choose_emulation()
        self.rd.scenario_yaml.write_text(yaml.safe_dump({"kind": "scenario", **self.sc.resolved_raw()},
                                                        sort_keys=False))
        from testbed.predict import predict

        prediction = predict(self.sc).to_dict()
        self.rd.update_run_json(
            run_id=self.rd.run_id, scenario=self.sc.name, scenario_path=self.scenario_path,
            backend=self.backend_name, impairment_backend=None, tdf=self.tdf, byte_scale=self.byte_scale,
            emulation_reason=self.emulation_reason, host_capacity_bps=self.host_capacity_bps, t0_wall=None,
            workload_offset_s=0.0,
            slo=self.sc.slo.model_dump() if self.sc.slo else None, model=self.sc.model,
            topology=self.topo.name, requests=self._n_requests, prediction=prediction,
            started_wall=time.time(), started=utc_stamp(), finished_wall=None, pids_registry=str(self.rd.pids),
            crashes=[], faults=[], stop_reason=None)
        self._say(f"run {self.rd.run_id}: backend {self.backend_name}, TDF {self.tdf:g}, byte scale "
                  f"{self.byte_scale:g} ({self.emulation_reason}); run directory {self.rd.root}")
        self._build_backend()
        users = [n for n in self.nodes if self.nodes[n].role != "client"]
        self.broker = Broker(self.rd.root, self.rd.run_id, self.backend.broker_host(), users)
        self.broker.start()
        record_start(self.registries, "mosquitto", self.broker.pid, ["mosquitto"], pgid=self.broker.pid)
        n_procs = len(self.nodes)
        self.t0_wall = time.time() + 1.0 + 0.6 * n_procs / max(1, os.cpu_count() or 1)
        self._write_configs()
        compute = [p.name for p in self.compute_nodes]
        for name in compute:
            self._spawn(self.nodes[name])
        self._spawn(self.nodes[self.router_name])
        self._wait_healthy(compute + [self.router_name], health_timeout_s)
        self.rd.update_run_json(
            t0_wall=self.t0_wall, impairment_backend=self.backend.impairment_backend,
            nodes={p.name: {"role": p.role, "hardware": p.hardware, "host": p.host,
                            "addresses": self._addresses(p)} for p in self.nodes.values()},
            router_url=self.router_url)
        self.backend.start_monitor(self.rd.root)
        if self.pcap:
            self._captures = [str(p) for p in self.backend.start_capture(self.pcap, self.rd.pcap_dir)]
            self.rd.update_run_json(pcaps=self._captures)

    def _addresses(self, p: NodePlan) -> dict[str, str]:
        cfg = self.configs.get(p.name)
        out: dict[str, str] = {}
        if cfg is not None and cfg.http is not None:
            out["frontend"] = f"{cfg.http.host}:{cfg.http.port}"
        if cfg is not None and cfg.kv is not None:
            out["efa"] = f"{cfg.kv.host}:{cfg.kv.port}"
        elif cfg is not None and cfg.kv_bind:
            out["efa"] = cfg.kv_bind
        if cfg is not None and len(cfg.kv_addrs) > 1:
            out["efa_rails"] = ",".join(cfg.kv_addrs)
        mgmt = self.backend.mgmt_address(p)
        if mgmt is not None:
            out["mgmt"] = mgmt
        return out

    @property
    def n_requests(self) -> int:
        return self._n_requests

    @property
    def router_url(self) -> str:
        return self.configs[self.router_name].http.url

    @property
    def clock(self) -> ModelClock:
        return ModelClock(self.t0_wall, self.tdf)

    # -------------------------------------------------------------- the workload
    def start_client(self) -> Managed:
        """Start the load generator; shift the workload when model time 0 is already past."""
        lead_wall = 1.0  # the client needs a moment to start before its first arrival
        late = time.time() + lead_wall - self.t0_wall
        if late > 0:
            self.workload_offset_s = late / self.tdf
            _shift_workload(self.rd.workload, self.workload_offset_s)
            self.rd.update_run_json(workload_offset_s=self.workload_offset_s)
        self._client_config()
        return self._spawn(self.nodes[self.client_name])

    def run_client(self, timeout_s: float | None = None, on_progress: Callable[["Orchestrator"], None] | None = None) -> None:
        """Start the client, drive faults, watch for crashes, wait until the client is done."""
        client = self.start_client()
        items = list(read_timeline(self.rd.workload)) if self.rd.workload.exists() else []
        last_arrival = max((i["arrival_s"] for i in items), default=0.0)
        budget = timeout_s
        if budget is None:
            model_span = last_arrival + float(self.sc.router.request_timeout) * 1.1 + 10.0
            budget = self.workload_offset_s * self.tdf + model_span * self.tdf + 30.0
            if self.sc.emulation.wall_budget is not None:
                budget = min(budget, float(self.sc.emulation.wall_budget))
        deadline = time.monotonic() + budget
        pending = list(self.faults)
        while True:
            now_model = self.clock.now() - self.workload_offset_s
            while pending and pending[0].at <= now_model:
                self._apply_fault(pending.pop(0))
            for m in self.sup.unexpected_exits():
                if m.name == self.client_name:
                    if m.poll() == 0:
                        continue
                    self._record_crash(m)
                    self.stop_reason = f"node_crashed:{m.name}"
                else:
                    self._record_crash(m)
                    if self._fatal(m.name):
                        self.stop_reason = f"node_crashed:{m.name}"
            if on_progress:
                on_progress(self)
            if client.poll() is not None or self.stop_reason:
                break
            if time.monotonic() > deadline:
                self.stop_reason = "run_timeout"
                break
            time.sleep(0.1)
        if on_progress:
            on_progress(self)

    def _fatal(self, name: str) -> bool:
        """Whether the run can no longer complete requests after ``name`` died."""
        role = self.nodes[name].role if name in self.nodes else "broker"
        if role in ("router", "broker"):
            return True
        alive = {p.role for p in self.compute_nodes if self.sup.get(p.name).running()}
        if "colocated" in alive:
            return False
        return not ({"prefill", "decode"} <= alive)

    def check_crashes(self) -> list[str]:
        """Record daemons that exited on their own since the last check; returns their names."""
        crashed = self.sup.unexpected_exits()
        for m in crashed:
            self._record_crash(m)
        return [m.name for m in crashed]

    def _record_crash(self, m: Managed) -> None:
        entry = {"node": m.name, "returncode": m.poll(), "t_model": round(self.clock.now(), 6),
                 "t_wall": time.time(), "log_tail": _tail(m.log_path, 600) if m.log_path else ""}
        self.crashes.append(entry)
        self.rd.update_run_json(crashes=self.crashes)
        self._say(f"warning: {m.name} exited unexpectedly (status {m.poll()}) at model time {entry['t_model']:.3f} s")

    # -------------------------------------------------------------- runtime changes
    def set_link(self, target: str, **params: Any) -> list[str]:
        """Change a link (or every link of a class) now; model-time values (``bandwidth_bps``, ``latency_s``, ...)."""
        return self.backend.set_link(target, **params)

    def node_command(self, node: str, cmd: str, factor: float | None = None) -> None:
        """drain / resume / slowdown / crash over the control plane (a crashed node's exit is expected)."""
        from nodes.control import Controller

        if node not in self.nodes or self.nodes[node].role == "client":
            raise ConfigError("node command", [("", f"{node!r} is not a node of this run ({', '.join(self.nodes)})")])
        if cmd == "crash":
            self.sup.get(node).expected_exit = True
        asyncio.run(Controller(self.broker.mqtt_settings("controller")).send(node, cmd, factor))

    def restart(self, target: str) -> None:
        """Stop a daemon (or the MQTT broker, target ``broker``) and start it again with the same
        config: what it held is lost (its peers see the loss), then it serves again."""
        from testbed.config.scenario import BROKER

        if target == BROKER:
            old = self.broker.pid
            self.broker.restart()
            record_stop(self.registries, old, 0)
            record_start(self.registries, "mosquitto", self.broker.pid, ["mosquitto"], pgid=self.broker.pid)
            return
        if target not in self.nodes or self.nodes[target].role == "client":
            raise ConfigError("restart", [("", f"{target!r} is not a node of this run ({', '.join(self.nodes)})")])
        self.sup.stop(target, grace_s=2.0)
        self._spawn(self.nodes[target])
        self._wait_healthy([target], timeout_s=30.0)

    def _apply_fault(self, f: FaultRecord) -> None:
        f.applied_t_model = round(self.clock.now() - self.workload_offset_s, 6)
        try:
            if f.action == "set_link":
                f.links = self.set_link(f.target, **f.params)
            elif f.action in ("link_down", "link_up"):
                f.links = self.set_link(f.target, up=f.action == "link_up")
            elif f.action == "restart":
                self.restart(f.target)
            else:
                self.node_command(f.target, f.action, f.params.get("factor"))
            f.ok = True
        except Exception as exc:  # a fault that fails is recorded, the run goes on
            f.ok, f.error = False, f"{type(exc).__name__}: {exc}"
            self._say(f"warning: fault {f.action} {f.target} at {f.at:g} s failed: {f.error}")
        self.rd.update_run_json(faults=[vars(x) for x in self.faults])
        log.info("fault %s %s at model %.3f s", f.action, f.target, f.applied_t_model)

    # -------------------------------------------------------------- teardown
    def stop(self, grace_s: float = 5.0) -> None:
        """Stop everything we started, in reverse order. Safe to call twice, and from a signal path."""
        with self._stop_lock:
            if self.stopped:
                return
            self.stopped = True
        with _signals_deferred():
            errors: list[str] = []
            for what, step in (
                ("client", lambda: self.sup.stop(self._client_name, grace_s) if self._client_name else None),
                ("router", lambda: self.sup.stop(self.router_name, grace_s) if self.nodes else None),
                ("compute nodes", lambda: self.sup.stop_group([p.name for p in self.compute_nodes], grace_s)),
                ("other processes", lambda: self.sup.stop_all(grace_s=grace_s)),
                ("fidelity monitor", self._stop_monitor),
                ("broker", self._stop_broker),
                ("fabric", lambda: self.backend.close() if self.backend is not None else None),
            ):
                try:
                    step()
                except Exception as exc:  # keep tearing down the rest; report at the end
                    errors.append(f"{what}: {type(exc).__name__}: {exc}")
            self.registries[0].settle()
            if self.clean_registry is not None:  # what `pdtb clean` would still have to look at: what survived
                self.clean_registry.forget_ended()
            if errors:
                self._say("warning: teardown problems (run `pdtb clean --prefix "
                          f"{self.prefix}` if anything is left): " + "; ".join(errors))
            if self.started:
                self.rd.update_run_json(finished_wall=time.time(), finished=utc_stamp(), stop_reason=self.stop_reason,
                                        crashes=self.crashes, faults=[vars(x) for x in self.faults],
                                        teardown_errors=errors)

    def _stop_monitor(self) -> None:
        if self.backend is not None:
            self._fidelity = self.backend.stop_monitor()
            if self._fidelity is not None:
                self.rd.update_run_json(fidelity=self._fidelity)

    def _stop_broker(self) -> None:
        if self.broker is not None and self.broker.pid:
            pid = self.broker.pid
            self.broker.stop()
            record_stop(self.registries, pid, 0)

    def account_for_requests(self, reason: str | None = None) -> int:
        """Write ``client_failed`` for every workload request without an outcome; returns how many."""
        if not self._client_name or not self.rd.workload.exists():
            return 0
        path = self.rd.timeline(self.client_name)
        seen: set[str] = set()
        if path.exists():
            for e in read_timeline(path):
                if e.get("event") in ("client_done", "client_failed") and e.get("request_id"):
                    seen.add(e["request_id"])
        missing = [request_id(int(i["index"])) for i in read_timeline(self.rd.workload)
                   if request_id(int(i["index"])) not in seen]
        if not missing:
            return 0
        why = reason or self.stop_reason or "not_completed"
        tl = Timeline(path, self.client_name, self.clock)
        try:
            for rid in missing:
                tl.event("client_failed", rid, reason=why)
        finally:
            tl.close()
        return len(missing)

    def run(self, on_progress: Callable[["Orchestrator"], None] | None = None) -> dict[str, Any]:
        """The whole run: start, workload, stop, account, summary and report. Ctrl-C stops it early."""
        try:
            self.start()
            self._say(f"router at {self.router_url}; {self._n_requests} requests")
            self.run_client(on_progress=on_progress)
        except KeyboardInterrupt:
            self.stop_reason = self.stop_reason or "interrupted"
            self._say("interrupted: stopping the run")
        finally:
            self.stop()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Account for every request, write summary.json and report.html; returns the summary."""
        from testbed.metrics import summarize_run
        from testbed.report import write_report

        self.account_for_requests()
        summary, records = summarize_run(self.rd.root)
        self.rd.update_run_json(report=str(write_report(self.rd.root, records)))
        return summary


def _shift_workload(path: Path, offset_s: float) -> None:
    items = list(read_timeline(path))
    with open(path, "w") as f:
        for item in items:
            item["arrival_s"] = round(float(item["arrival_s"]) + offset_s, 9)
            f.write(json.dumps(item, separators=(",", ":")) + "\n")


def _tail(path: Path | None, n: int = 2000) -> str:
    if path is None:
        return ""
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return ""


class _signals_deferred:
    """While tearing down, a second Ctrl-C or SIGTERM must not abort the teardown half way."""

    def __enter__(self) -> None:
        self._old: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._note)

    @staticmethod
    def _note(signum: int, frame: Any) -> None:
        print("stopping: please wait for the teardown to finish", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
