"""The analytic timeline of one uncontended request: what an emulated run is compared with.

For a request of the scenario's typical size (the median prompt and output lengths of its
workload) on an idle system (no queueing): the request's hops on the frontend network,
prefill on the first prefill host (cost model), the KV handoff to the first decode host
over the EFA path (bottleneck bandwidth, summed one-way latency, connection setup; whole
or layer by layer), the first decode step, then one decode step per further token, and
each token's hops back to the client. Everything is in model time.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fabric.topology import LinkParams, TopologyConfig, load_topology
from nodes.costmodel import CostModel
from nodes.profiles import load_hardware, load_model
from core.config import ConfigError
from testbed.config.scenario import ScenarioConfig, selected_hosts
from testbed.workload import generate_workload

KV_SETUP_RTTS = 0
"""Round trips a KV handoff waits before its data: none, the prefill node's connections to each
decode node are opened and authenticated at start-up (nodes.kvproto.KvPeer); BEGIN and the first
chunks leave together. (A one-shot connection would pay 2: TCP handshake and HMAC.)"""
TPOT_SAMPLES = 256  # decode steps averaged for TPOT (evenly spaced over the output)


@dataclass
class PathInfo:
    links: list[dict[str, Any]]  # [{"name", "bandwidth_bps" (None = unshaped), "latency_s"}]
    bandwidth_bps: float | None  # bottleneck; None when no link on the path is shaped
    latency_s: float  # one-way, summed


@dataclass
class Prediction:
    scenario: str
    model: str
    mode: str  # "whole" | "layerwise" | "colocated"
    prompt_tokens: int
    output_tokens: int
    layers: int
    prefill_node: str
    prefill_hardware: str
    decode_node: str
    decode_hardware: str
    queue_s: float
    request_path_s: float  # client -> router -> prefill (or colocated) node, one way
    prefill_s: float
    prefill_bound: str
    kv_model_bytes: int
    kv_wire_bytes: int | None  # model bytes x byte_scale (None while byte_scale is 'auto')
    kv_links: list[dict[str, Any]]
    kv_bandwidth_bps: float | None
    kv_latency_s: float
    kv_setup_s: float
    kv_serialization_s: float  # the whole cache at the bottleneck rate
    kv_exposed_s: float  # what the handoff adds after prefill ends (less than serialization when layerwise)
    first_decode_s: float
    decode_bound: str
    token_path_s: float  # decode (or colocated) node -> router -> client, one way
    ttft_s: float
    tpot_s: float
    e2e_s: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kv_handoff(prefill_s: float, layers: int, kv_bytes: int, bandwidth_bps: float | None,
               latency_s: float, setup_s: float, mode: str) -> tuple[float, float]:
    """(exposed, serialization): model seconds the handoff adds after prefill ends, and the
    whole cache's time on the bottleneck link.

    whole: the connection opens when prefill ends; then setup + serialization + latency.
    layerwise: the connection opens when prefill starts; layer ``l`` (``kv_bytes / layers``)
    is sent once layer ``l`` is computed (at ``(l+1) x prefill_s / layers``) and the link
    is free; the cache has arrived one latency after the last layer's last byte.
    """
    serial = 0.0 if not bandwidth_bps else 8.0 * kv_bytes / bandwidth_bps
    if mode == "whole":
        return setup_s + serial + latency_s, serial
    per_layer = serial / layers
    link_free = setup_s
    for layer in range(layers):
        ready = (layer + 1) * prefill_s / layers
        link_free = max(ready, link_free) + per_layer
    return max(link_free - prefill_s, 0.0) + latency_s, serial


def _path(topo: TopologyConfig, src: str, dst: str, cls: str, override: LinkParams | None) -> PathInfo:
    declared = topo.path(src, dst, cls)
    # a link with rails: its total (the transfer is striped over its rails), as the override's bandwidth
    links = [lk.params.model_copy(update={"bandwidth_bps": topo.link_total_bps(lk)}).merged(override)
             for lk in declared]
    names = [lk.name for lk in declared]
    shaped = [p.bandwidth_bps for p in links if p.bandwidth_bps is not None]
    return PathInfo(
        links=[{"name": n, "bandwidth_bps": p.bandwidth_bps, "latency_s": p.latency_s} for n, p in zip(names, links)],
        bandwidth_bps=min(shaped) if shaped else None,
        latency_s=float(sum(p.latency_s for p in links)),
    )


def _frontend_s(topo: TopologyConfig, hops: list[tuple[str | None, str | None]], override: LinkParams | None) -> float:
    """One-way latency of consecutive frontend hops; hops with an absent end (no client or router host) count 0."""
    total = 0.0
    for a, b in hops:
        if a and b and a != b:
            total += _path(topo, a, b, "frontend", override).latency_s
    return total


def typical_size(sc: ScenarioConfig, base_dir: Path | None = None) -> tuple[int, int]:
    """Median prompt and output tokens of the scenario's workload."""
    items = generate_workload(sc, base_dir)
    return (int(round(float(np.median([i.prompt_tokens for i in items])))),
            int(round(float(np.median([i.output_tokens for i in items])))))


def mean_decode_step(cm: CostModel, prompt_tokens: int, output_tokens: int) -> float:
    """Mean batch-1 decode step over the output's context lengths (the first step excluded)."""
    if output_tokens <= 1:
        return 0.0
    count = min(output_tokens - 1, TPOT_SAMPLES)
    contexts = np.unique(np.rint(np.linspace(prompt_tokens + 1, prompt_tokens + output_tokens - 1, count)).astype(int))
    return float(np.mean([cm.decode_step([int(c)]).time_s for c in contexts]))


def predict(sc: ScenarioConfig, base_dir: Path | None = None, *, prompt_tokens: int | None = None,
            output_tokens: int | None = None, byte_scale: float | None = None,
            topo: TopologyConfig | None = None) -> Prediction:
    """The uncontended request's timeline for ``sc`` (see the module docstring).

    ``byte_scale`` (the one a run chose when the scenario says ``auto``) only sets ``kv_wire_bytes``;
    ``topo``: the scenario's topology when the caller has loaded it (a 512-node one takes ~0.5 s
    to parse, and a run's summary predicts up to 200 request sizes).
    """
    topo = topo or load_topology(sc.topology_ref())
    hosts = selected_hosts(sc, topo)
    typ_p, typ_o = (typical_size(sc, base_dir) if prompt_tokens is None or output_tokens is None
                    else (prompt_tokens, output_tokens))
    P = prompt_tokens if prompt_tokens is not None else typ_p
    O = output_tokens if output_tokens is not None else typ_o
    overrides = sc.fabric.link_params()
    fe = overrides.get("frontend")
    client = next((h.name for h in topo.hosts_with_role("client")), None)
    router = next((h.name for h in topo.hosts_with_role("router")), None)
    model = load_model(sc.model)
    notes: list[str] = []

    if hosts.get("prefill") and hosts.get("decode"):
        (p_node, p_hw), (d_node, d_hw) = hosts["prefill"][0], hosts["decode"][0]
        mode = sc.kv_transfer.mode
    elif hosts.get("colocated"):
        (p_node, p_hw) = (d_node, d_hw) = hosts["colocated"][0]
        mode = "colocated"
    else:
        raise ConfigError(sc.source, [("pools", "no prefill+decode or colocated hosts to predict for")])
    cm_p = CostModel(load_hardware(p_hw), model)
    cm_d = cm_p if d_hw == p_hw else CostModel(load_hardware(d_hw), model)

    prefill = cm_p.prefill([P])
    first = cm_d.decode_step([P + 1])
    tpot = mean_decode_step(cm_d, P, O)
    kv_bytes = cm_p.kv_bytes(P)
    scale = byte_scale if byte_scale is not None else sc.emulation.byte_scale
    wire = int(round(kv_bytes * float(scale))) if scale != "auto" else None
    if mode == "colocated":
        path = PathInfo(links=[], bandwidth_bps=None, latency_s=0.0)
        setup = exposed = serial = 0.0
    else:
        path = _path(topo, p_node, d_node, "efa", overrides.get("efa"))
        setup = KV_SETUP_RTTS * 2 * path.latency_s
        exposed, serial = kv_handoff(prefill.time_s, model.layers, kv_bytes, path.bandwidth_bps,
                                     path.latency_s, setup, mode)
        if path.bandwidth_bps is None:
            notes.append("no link on the EFA path is shaped: the handoff's serialization time is taken as 0")
    request_path = _frontend_s(topo, [(client, router), (router, p_node)], fe)
    token_path = _frontend_s(topo, [(d_node, router), (router, client)], fe)
    if client is None or router is None:
        notes.append("the topology has no client or router host: frontend hops count 0")
    if not cm_p.fits() or not cm_d.fits():
        notes.append("the model's weights do not fit the hardware's memory")
    ttft = request_path + prefill.time_s + exposed + first.time_s + token_path
    return Prediction(
        scenario=sc.name, model=sc.model, mode=mode, prompt_tokens=P, output_tokens=O, layers=model.layers,
        prefill_node=p_node, prefill_hardware=p_hw, decode_node=d_node, decode_hardware=d_hw,
        queue_s=0.0, request_path_s=request_path, prefill_s=prefill.time_s, prefill_bound=prefill.bound,
        kv_model_bytes=int(kv_bytes) if mode != "colocated" else 0, kv_wire_bytes=wire if mode != "colocated" else 0,
        kv_links=path.links, kv_bandwidth_bps=path.bandwidth_bps, kv_latency_s=path.latency_s, kv_setup_s=setup,
        kv_serialization_s=serial, kv_exposed_s=exposed, first_decode_s=first.time_s, decode_bound=first.bound,
        token_path_s=token_path, ttft_s=ttft, tpot_s=tpot, e2e_s=ttft + max(O - 1, 0) * tpot, notes=notes,
    )
