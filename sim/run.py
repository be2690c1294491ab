"""``pdtb run SCENARIO --backend sim``: the scenario in virtual time, into a normal run directory.

The same files are read (scenario, topology with the scenario's link overrides, hardware and
model profiles, the workload or trace) and the same run directory is written: run.json,
workload.jsonl, timeline/*.jsonl with the daemons' event names, then summary.json,
requests.csv and report.html by the same code as an emulated run. Nothing sleeps on the wall
clock and nothing needs root. Time dilation and byte scale do not apply (TDF 1, byte scale 1:
the simulation runs the modelled rates and sizes).
"""
from __future__ import annotations

import json
import time
from typing import Any

import simpy
import yaml

from core.config import ConfigError
from nodes.clock import ModelClock
from nodes.costmodel import CostModel
from nodes.profiles import load_hardware, load_model
from nodes.timeline import Timeline
from sim.network import FlowNetwork, Port
from sim.nodes import SimClient, SimColocated, SimDecode, SimPrefill, SimRouter, SimSettings

SIM_FAULTS: tuple[str, ...] = ("drain", "resume", "slowdown", "set_link", "link_down", "link_up")
"""Faults the simulator applies: the daemons' control commands, and link faults on the KV fabric's
flows (sim/network.py); crash and restart are refused with the backends that run them named."""

FRONTEND, EFA = "frontend", "efa"
SIMULATED_VERDICT = {"verdict": "simulated", "trustworthy": False, "reasons": [
    "virtual-time simulation: no emulated network or host timing to judge; docs/simulation.md compares it "
    "with the emulation"], "warnings": [], "ports": {}}


def _port(topo: Any, host: str, cls: str, direction: str) -> Port | None:
    link = topo.host_link(host, cls)
    if link is None:
        return None
    p = link.params
    rate = float(p.bandwidth_bps) if p.bandwidth_bps else float("inf")
    return Port(f"{link.name}:{direction}", rate, float(p.latency_s), float(p.loss), int(p.mtu))


def _rail_ports(topo: Any, host: str, cls: str, direction: str) -> list[Port]:
    """One port per rail of ``host`` on ``cls`` (one for a plain link), in rail order."""
    rails = [lk for lk in topo.rail_links() if lk.cls == cls and host in (lk.a, lk.b)]
    return [Port(f"{lk.name}:{direction}", float(lk.params.bandwidth_bps) if lk.params.bandwidth_bps else float("inf"),
                 float(lk.params.latency_s), float(lk.params.loss)) for lk in rails]


def kv_stripes(src_ports: list[Port], dst_ports: list[Port]) -> list[tuple[Port, ...]]:
    """The flows of one striped KV transfer, as the emulation's TCP transport opens them: one
    per rail of the receiver (its ``kv_addrs``), stripe k leaving by the sender's rail k mod n."""
    if not dst_ports:
        return [tuple(src_ports[:1])] if src_ports else [()]
    if not src_ports:
        return [(d,) for d in dst_ports]
    return [(src_ports[k % len(src_ports)], d) for k, d in enumerate(dst_ports)]


def _latency(topo: Any, *hosts: str) -> float:
    """One-way frontend latency through the hosts' links to the switch (a root router adds none)."""
    total = 0.0
    for h in hosts:
        link = topo.host_link(h, FRONTEND)
        total += float(link.params.latency_s) if link is not None else 0.0
    return total


class SimBackend:
    """The virtual-time backend (``testbed.runner.backend``): no daemons, no emulated links."""

    name = "sim"
    live = False
    emulates_links = False
    link_faults = True  # on the KV fabric's simulated flows

    @classmethod
    def run(cls, sc: Any, rd: Any, *, scenario_path: str | None = None) -> dict[str, Any]:
        return run_sim(sc, rd, scenario_path=scenario_path)


def run_sim(sc: Any, rd: Any, *, scenario_path: str | None = None, log: Any = None) -> dict[str, Any]:
    """Simulate ``sc`` into the run directory ``rd`` (a RunDir); returns the summary."""
    from testbed.config.scenario import LINK_ACTIONS
    from testbed.metrics import summarize_run
    from testbed.predict import predict
    from testbed.report import write_report
    from testbed.runner.orchestrator import batching, plan_run
    from testbed.runner.rundir import utc_stamp
    from testbed.workload import generate_workload, write_workload

    problems = [(f"faults[{i}].action", f"the sim backend simulates the faults {', '.join(SIM_FAULTS)}; "
                                        f"{f.action} needs the mininet or local backend")
                for i, f in enumerate(sc.faults) if f.action not in SIM_FAULTS]
    if problems:
        raise ConfigError(sc.source, problems)
    topo, plans, client_name = plan_run(sc, "sim")
    for i, f in enumerate(sc.faults):
        if f.action in LINK_ACTIONS:
            other = sorted({lk.cls for lk in topo.fault_links(f.target)} - {EFA})
            if other:
                problems.append((f"faults[{i}].target", f"the sim backend models {', '.join(other)} links as "
                                                        f"fixed latency; a link fault on {f.target} needs the "
                                                        f"mininet backend (efa links and the efa class work)"))
        elif plans[f.target].role not in ("prefill", "decode", "colocated"):
            problems.append((f"faults[{i}].target", f"the sim backend applies {f.action} to compute nodes; "
                                                    f"{f.target} is the {plans[f.target].role}"))
    if problems:
        raise ConfigError(sc.source, problems)
    items = generate_workload(sc)
    write_workload(items, rd.workload)
    rd.scenario_yaml.write_text(yaml.safe_dump({"kind": "scenario", **sc.resolved_raw()}, sort_keys=False))
    wall0 = time.time()
    rd.update_run_json(
        run_id=rd.run_id, scenario=sc.name, scenario_path=scenario_path, backend="sim", impairment_backend=None,
        tdf=1.0, byte_scale=1.0, emulation_reason="virtual time: modelled rates and sizes", t0_wall=0.0,
        workload_offset_s=0.0, slo=sc.slo.model_dump() if sc.slo else None, model=sc.model, topology=topo.name,
        requests=len(items), prediction=predict(sc).to_dict(), started_wall=wall0, started=utc_stamp(),
        finished_wall=None, crashes=[], faults=[], stop_reason=None,
        nodes={p.name: {"role": p.role, "hardware": p.hardware, "host": p.host, "addresses": {}}
               for p in plans.values()},
        )
    # nothing emulated, nothing to judge: the verdict says so (docs/simulation.md has the cross-check)
    (rd.root / "fidelity.json").write_text(json.dumps(SIMULATED_VERDICT, indent=2) + "\n")

    env = simpy.Environment()
    clock = ModelClock(0.0, 1.0)
    timelines: list[Timeline] = []

    def timeline(name: str) -> Timeline:
        tl = Timeline(rd.timeline(name), name, clock, now_wall=lambda: env.now, line_buffered=False)
        timelines.append(tl)
        return tl

    model = load_model(sc.model)
    kvt = sc.kv_transfer

    def settings(role: str) -> SimSettings:
        prefill, decode = batching(sc, role)  # a node reads only its own role's half
        return SimSettings(
            kv_bytes_per_token=int(model.kv_bytes_per_token), layers=int(model.layers), kv_mode=kvt.mode,
            token_budget=prefill.token_budget, chunk_tokens=prefill.chunk_tokens, max_batch=decode.max_batch,
            prefill_policy=sc.router.prefill_policy, decode_policy=sc.router.decode_policy,
            request_timeout_s=float(sc.router.request_timeout), prefill_max_queue=prefill.max_queue,
            decode_max_queue=decode.max_queue)

    net = FlowNetwork(env, kvt.transport)
    router_plan = next(p for p in plans.values() if p.role == "router")
    router_host = router_plan.host if router_plan.host != "root" else None

    rail_ports = {(h.name, d): _rail_ports(topo, h.name, EFA, d) for h in topo.hosts for d in ("up", "down")}

    def kv_ports(decode: SimDecode, src: str) -> list[tuple[Port, ...]]:
        return kv_stripes(rail_ports.get((src, "up"), []), rail_ports.get((decode.name, "down"), []))

    client = SimClient(env, timeline(client_name))
    prefills: list[SimPrefill] = []
    decodes: list[Any] = []
    router_ref: list[SimRouter] = []

    def on_token(node: str):
        return lambda rid, count, t, done: router_ref[0].token(node, rid, count, t, done)

    for plan in plans.values():
        if plan.role not in ("prefill", "decode", "colocated"):
            continue
        cost = CostModel(load_hardware(plan.hardware), model)
        args = (env, plan.name, plan.hardware, cost, timeline(plan.name), settings(plan.role))
        if plan.role == "prefill":
            prefills.append(SimPrefill(*args, kv_ports=lambda d, src=plan.host: kv_ports(d, src), net=net))
        elif plan.role == "decode":
            decodes.append(SimDecode(*args, on_token=on_token(plan.name)))
        else:
            decodes.append(SimColocated(*args, on_token=on_token(plan.name)))
    hosts = {p.name: p.host for p in plans.values()}
    router_hosts = [router_host] if router_host else []
    to_node = {n: _latency(topo, *router_hosts, hosts[n]) for n in hosts if plans[n].role != "client"}
    to_client = {n: _latency(topo, hosts[n], *router_hosts, *router_hosts, hosts[client_name]) for n in to_node}
    from_client = _latency(topo, hosts[client_name], *router_hosts)
    router = SimRouter(env, timeline(router_plan.name), settings("decode" if prefills else "colocated"),
                       prefills, decodes, client, to_node.__getitem__, to_client.__getitem__)
    router_ref.append(router)

    def replay():
        from core.vocab import request_id

        for item in items:
            if item.arrival_s > env.now:
                yield env.timeout(item.arrival_s - env.now)
            rid = request_id(item.index)
            client.send(rid, item.prompt_tokens, item.output_tokens, item.arrival_s)
            env.process(_arrive(rid, item.prompt_tokens, item.output_tokens))

    def _arrive(rid: str, prompt: int, output: int):
        yield env.timeout(from_client)
        if prompt + output > model.context_length:
            router.timeline.event("failed", rid, reason=f"rejected: context length {model.context_length} exceeded",
                                  status=400)
            client.failed(rid, "HTTP 400")
            return
        router.arrive(rid, prompt, output)

    env.process(replay())
    compute = {n.name: n for n in (*prefills, *decodes)}
    faults = [{"at": float(f.at), "action": f.action, "target": f.target,
               "params": f.link_updates() if f.action == "set_link" else ({"factor": f.factor} if f.factor else {}),
               "applied_t_model": None, "ok": None, "error": None, "links": []} for f in sc.faults]

    def change_links(record: dict[str, Any]) -> None:
        """A link fault on the KV fabric's flows, as FabricNet.set_link applies it (a declared
        link's bandwidth split over its rails; jitter is not simulated)."""
        p = record["params"]
        up = None if record["action"] == "set_link" else record["action"] == "link_up"
        for lk in topo.fault_links(record["target"]):
            bw = p.get("bandwidth_bps")
            net.set_link(lk.name, rate_bps=None if bw is None else float(bw) / lk.rails,
                         latency_s=p.get("latency_s"), loss=p.get("loss"), up=up)
            record["links"].append(lk.name)

    def fault(record: dict[str, Any]):
        """At its model time, the link change, or the command the orchestrator would send the node over MQTT."""
        yield env.timeout(record["at"])
        record["applied_t_model"] = env.now
        try:
            if record["action"] in LINK_ACTIONS:
                change_links(record)
            else:
                compute[record["target"]].command(record["action"], record["params"].get("factor"))
            record["ok"] = True
        except ValueError as exc:
            record["ok"], record["error"] = False, f"ValueError: {exc}"

    for record in faults:
        env.process(fault(record))
    last_arrival = items[-1].arrival_s if items else 0.0
    env.run(until=last_arrival + float(sc.router.request_timeout) + 1.0)
    for tl in timelines:
        tl.event("node_stop", role=None, hardware=None)
        tl.close()
    rd.update_run_json(faults=faults)
    rd.update_run_json(finished_wall=time.time(), finished=utc_stamp(), stop_reason="completed",
                       sim_wall_s=time.time() - wall0, sim_model_s=env.now)
    summary, records = summarize_run(rd.root)
    rd.update_run_json(report=str(write_report(rd.root, records)))
    return summary
