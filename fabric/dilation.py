"""Automatic choice of time dilation (TDF) and byte scale from a host-capacity calibration.

An emulated link runs at ``model rate x byte_scale / tdf`` (byte scale on the EFA network only,
which carries the scaled KV payloads) and its latency is ``model latency x tdf``. This module fills in whichever of the two is ``auto`` so that

1. the fastest emulated link (at the most it can carry: :func:`carried_rate_bound_bps`) stays
   within what this host can shape faithfully:
   ``<= min(1 Gbit/s, 50 % of the measured host capacity)`` (the range `pdtb fabric check`
   verifies, and the userspace delayer's measured ceiling);
2. the smallest link latency becomes at least ~1 ms of wall time when the wall budget allows
   (sub-millisecond delays are dominated by scheduler and delayer noise);
3. byte scale stays as close to 1 as the budget allows (S = 1 keeps packet-level behaviour:
   packet counts per transfer, loss events, TCP window dynamics).

The choice records why it was made (``EmulationChoice.reason``) for the run's records.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from fabric.topology import LinkSpec, TopologyConfig
from core.vocab import KV_ROLES, SCALED_NETWORKS

"""Hosts at the two ends of a KV handoff, the only traffic of the byte-scaled (EFA) network."""

MAX_EMULATED_RATE_BPS = 1e9
"""Above ~1 Gbit/s the userspace delayer (and HTB on 2 cores) no longer keep up (docs/fidelity.md)."""
HOST_CAPACITY_SHARE = 0.5
MIN_WALL_LATENCY_S = 1e-3
CACHE_PATH = Path("/var/cache/pdtb/host_capacity.json")
CACHE_MAX_AGE_S = 7 * 24 * 3600.0

Auto = Literal["auto"]


@dataclass(frozen=True)
class EmulationChoice:
    """The dilation a run uses, and why (recorded in the run)."""

    tdf: float
    byte_scale: float
    reason: str
    host_capacity_bps: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def carried_rate_bound_bps(topology: TopologyConfig, link: LinkSpec) -> float | None:
    """The most (model) bit/s ``link`` can ever carry, all its rails together: its own rate, and
    no more than the other links of a switch at either end can bring to it or take from it. On
    the EFA network, which carries KV handoffs from prefill to decode hosts only, a prefill
    (decode) host's link gets nothing from the switch's links to other prefill (decode) hosts.
    In ``pair.yaml`` the prefill host's 16 rails (3.2 Tbit/s) only ever carry what the decode
    host's 12 rails (1.2 Tbit/s) take; in ``pod.yaml`` a prefill host at most what the two decode
    hosts take. A host's rails are one link here: their sum is what the host pushes through this
    machine, so the busiest host is what must fit the host capacity. None: unshaped."""
    own = topology.link_total_bps(link)
    bounds = [own] if own else []
    switches = {sw.name for sw in topology.switches}
    roles = {h.name: h.role for h in topology.hosts}
    kv_role = next((roles[e] for e in (link.a, link.b) if roles.get(e) in KV_ROLES), None) \
        if link.cls in SCALED_NETWORKS else None
    for end in (link.a, link.b):
        if end in switches:
            others = [topology.link_total_bps(lk) for lk in topology.links
                      if lk is not link and lk.cls == link.cls and end in (lk.a, lk.b)
                      and (kv_role is None or roles.get(lk.other(end)) != kv_role)]
            if others and all(others):
                bounds.append(sum(others))  # type: ignore[arg-type]
    return min(bounds) if bounds else None


def _extremes(topology: TopologyConfig) -> tuple[float | None, float | None, float | None]:
    """(largest rate a link on a byte-scaled network can carry, the same on unscaled ones,
    smallest non-zero latency) over all links, in model units (a link with rails: all its
    rails together, which is what one host pushes through this machine)."""
    carried = {lk.name: carried_rate_bound_bps(topology, lk) for lk in topology.links}
    scaled = [carried[lk.name] for lk in topology.links if carried[lk.name] and lk.cls in SCALED_NETWORKS]
    unscaled = [carried[lk.name] for lk in topology.links if carried[lk.name] and lk.cls not in SCALED_NETWORKS]
    lats = [lk.params.latency_s for lk in topology.links if lk.params.latency_s > 0]
    return (max(scaled) if scaled else None), (max(unscaled) if unscaled else None), (min(lats) if lats else None)


def rate_cap_bps(host_capacity_bps: float | None) -> float:
    """The largest emulated link rate this host carries faithfully."""
    if host_capacity_bps is None or host_capacity_bps <= 0:
        return MAX_EMULATED_RATE_BPS
    return min(MAX_EMULATED_RATE_BPS, HOST_CAPACITY_SHARE * host_capacity_bps)


def _fmt_bps(bps: float) -> str:
    for unit, div in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= div:
            return f"{bps / div:.4g} {unit}"
    return f"{bps:.4g} bit/s"


def choose_emulation(topology: TopologyConfig, tdf: float | Auto, byte_scale: float | Auto,
                     wall_budget_s: float | None = None, workload_model_s: float | None = None,
                     host_capacity: float | None = None) -> EmulationChoice:
    """Fill in ``auto`` TDF and/or byte scale (see the module docstring for the policy).

    ``wall_budget_s`` / ``workload_model_s`` bound TDF from above (a run of ``workload_model_s``
    model seconds takes ``tdf`` times as long on the wall). ``host_capacity`` is the measured
    shaped-veth capacity in bit/s (:func:`measure_host_capacity`), None when unknown. Byte scale
    applies to the byte-scaled networks only (EFA); the others are slowed by TDF alone.
    """
    for name, value in (("tdf", tdf), ("byte_scale", byte_scale)):
        if value != "auto" and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be 'auto' or a positive number, got {value!r}")
    if tdf != "auto" and tdf < 1:
        raise ValueError(f"tdf must be >= 1, got {tdf!r}")
    if byte_scale != "auto" and byte_scale > 1:
        raise ValueError(f"byte_scale must be in (0, 1], got {byte_scale!r}")
    cap = rate_cap_bps(host_capacity)
    scaled_max, unscaled_max, min_lat = _extremes(topology)
    tdf_budget = None
    if wall_budget_s is not None and workload_model_s is not None and workload_model_s > 0:
        tdf_budget = max(1.0, wall_budget_s / workload_model_s)
    tdf_latency = max(1.0, MIN_WALL_LATENCY_S / min_lat) if min_lat else 1.0
    tdf_unscaled = max(1.0, unscaled_max / cap) if unscaled_max else 1.0   # byte scale cannot slow these
    notes = [f"rate cap {_fmt_bps(cap)} (min of {_fmt_bps(MAX_EMULATED_RATE_BPS)} and {HOST_CAPACITY_SHARE:.0%} "
             f"of host capacity {_fmt_bps(host_capacity) if host_capacity else 'unknown'})"]

    if tdf != "auto":
        chosen_tdf = float(tdf)
        notes.append(f"TDF {chosen_tdf:.4g} given")
    else:
        floors = {"latency floor (smallest latency -> 1 ms wall)": tdf_latency,
                  "unscaled-network rate floor": tdf_unscaled}
        if byte_scale != "auto" and scaled_max:
            floors["EFA rate floor at the given byte scale"] = scaled_max * float(byte_scale) / cap
        chosen_tdf = max(1.0, *floors.values())
        why = max(floors, key=floors.get) if chosen_tdf > 1 else "no floor above 1"
        notes.append(f"TDF {chosen_tdf:.4g} from the {why}")
        if tdf_budget is not None and chosen_tdf > tdf_budget:
            if tdf_budget >= tdf_unscaled and byte_scale == "auto":
                chosen_tdf = tdf_budget
                notes.append(f"lowered to the wall budget's {tdf_budget:.4g} ({wall_budget_s:.4g} s for "
                             f"{workload_model_s:.4g} model s): the smallest latency is "
                             f"{(min_lat or 0) * chosen_tdf * 1e3:.3g} ms wall")
            else:
                notes.append(f"warning: above the wall budget's TDF {tdf_budget:.4g}; the run takes longer")
        elif (byte_scale == "auto" and scaled_max and tdf_budget is not None
              and scaled_max / chosen_tdf > cap and tdf_budget > chosen_tdf):
            chosen_tdf = min(tdf_budget, scaled_max / cap)
            notes.append(f"raised to {chosen_tdf:.4g} within the wall budget to keep the byte scale near 1")
    if byte_scale == "auto":
        chosen_s = min(1.0, cap * chosen_tdf / scaled_max) if scaled_max else 1.0
        notes.append(f"byte scale {chosen_s:.4g}" + (
            f" puts the busiest an EFA link can be ({_fmt_bps(scaled_max)}) at "
            f"{_fmt_bps(scaled_max * chosen_s / chosen_tdf)}"
            if scaled_max else " (no shaped EFA link)"))
    else:
        chosen_s = float(byte_scale)
        notes.append(f"byte scale {chosen_s:.4g} given")
    if scaled_max and scaled_max * chosen_s / chosen_tdf > cap * 1.0001:
        notes.append(f"warning: an EFA link can carry up to {_fmt_bps(scaled_max * chosen_s / chosen_tdf)} "
                     "emulated, above the cap: expect an untrustworthy run")
    if unscaled_max and unscaled_max / chosen_tdf > cap * 1.0001:
        # requests and token streams are light: such a link is a ceiling that is never reached
        # unless a run backlogs it, and the fidelity monitor flags that case
        notes.append(f"frontend/mgmt links run at up to {_fmt_bps(unscaled_max / chosen_tdf)} emulated, above "
                     "the cap; they carry only requests and tokens, and the fidelity monitor flags them if "
                     "they back up")
    if min_lat and min_lat * chosen_tdf < MIN_WALL_LATENCY_S * 0.9999:
        notes.append(f"warning: the smallest latency is {min_lat * chosen_tdf * 1e3:.3g} ms wall, below "
                     f"{MIN_WALL_LATENCY_S * 1e3:.3g} ms")
    return EmulationChoice(tdf=chosen_tdf, byte_scale=chosen_s, reason="; ".join(notes),
                           host_capacity_bps=host_capacity)


# -- host capacity ------------------------------------------------------------------------------

CALIBRATION_LATENCY_S = 2.5e-3
"""One-way latency of the calibration link: delay is on, as in a run (the fallback's userspace
delayer is usually the bottleneck), with a round trip (10 ms) inside the checked range."""


def calibration_topology() -> TopologyConfig:
    """Two hosts on one EFA switch, links far faster than any host can carry."""
    link = {"bandwidth": "100Gbps", "latency": f"{CALIBRATION_LATENCY_S * 1e6:g}us"}
    return TopologyConfig.model_validate({
        "name": "calibration",
        "hosts": [{"name": "cala", "role": "router"}, {"name": "calb", "role": "router"}],
        "switches": [{"name": "calfe", "network": "frontend"}, {"name": "calef", "network": "efa"}],
        "links": [{"name": "a-fe", "a": "cala", "b": "calfe", "class": "frontend"},
                  {"name": "b-fe", "a": "calb", "b": "calfe", "class": "frontend"},
                  {"name": "a-efa", "a": "cala", "b": "calef", "class": "efa", "params": link},
                  {"name": "b-efa", "a": "calb", "b": "calef", "class": "efa", "params": link}]})


def load_host_capacity(backend: str | None = None, cache_path: Path = CACHE_PATH,
                       max_age_s: float = CACHE_MAX_AGE_S) -> float | None:
    """The cached capacity if it is fresh and was measured on this kernel, with this CPU count
    (and with ``backend``, when given)."""
    try:
        data = json.loads(cache_path.read_text())
        fresh = time.time() - float(data["measured_at"]) <= max_age_s
        same = (data.get("kernel") == os.uname().release and data.get("cpus") == os.cpu_count()
                and (backend is None or data.get("backend") == backend))
        return float(data["host_capacity_bps"]) if fresh and same else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def measure_host_capacity(prefix: str = "pt", duration_s: float = 2.0, runs: int = 2, cache_path: Path = CACHE_PATH,
                          use_cache: bool = True, impairment: str = "auto") -> float:
    """TCP goodput (bit/s) over one shaped, delayed link of a two-host FabricNet (prefix
    ``prefix``): what this host pushes through the same shaping path a run uses (HTB, offloads
    off, and on kernels without netem the NFQUEUE delayer). The best of ``runs`` (a capacity is
    a maximum: a run that shared the CPUs with something else only underestimates it).
    Cached with a timestamp."""
    from fabric.check import measure_tcp
    from fabric.net import FabricNet
    from fabric.shaping import resolve_backend

    backend = resolve_backend(impairment, prefix)
    if use_cache:
        cached = load_host_capacity(backend, cache_path)
        if cached is not None:
            return cached
    net = FabricNet(calibration_topology(), tdf=1.0, byte_scale=1.0, prefix=prefix, impairment=backend)
    try:
        net.start()
        bps = max(measure_tcp(net, "cala", "calb", "efa", duration_s) for _ in range(max(1, runs)))
    finally:
        net.stop()
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps({
            "host_capacity_bps": bps, "measured_at": time.time(), "kernel": os.uname().release,
            "cpus": os.cpu_count(), "backend": backend,
            "method": f"best of {runs} iperf3 TCP runs of {duration_s:g} s over a 100 Gbit/s link with "
                      f"{CALIBRATION_LATENCY_S * 1e3:g} ms one-way latency (FabricNet, {backend})"}) + "\n")
    except OSError:
        pass
    return bps
