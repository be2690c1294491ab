"""``pdtb fabric show TOPOLOGY`` and ``pdtb clean``.

``fabric`` is a subcommand group: other modules add to it through ``fabric.check.register_check``
(``pdtb fabric check``), imported here when present.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from core.units import format_bandwidth, format_duration


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fabric", help="inspect the emulated fabric (topologies, checks)")
    fsub = p.add_subparsers(dest="fabric_command", metavar="FABRIC_COMMAND")
    show = fsub.add_parser("show", help="print a topology: hosts, addresses, links (model and emulated)")
    show.add_argument("topology", metavar="TOPOLOGY", help="shipped name (pair, pod, gpu-colocated) or a path")
    show.add_argument("--tdf", type=float, default=1.0, help="time dilation factor for the emulated column")
    show.add_argument("--byte-scale", type=float, default=1.0, help="byte scale for the emulated column")
    show.add_argument("--prefix", default="pt", help="name prefix of the emulated nodes (default pt)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=run_show)
    try:
        check = importlib.import_module("fabric.check")
    except ModuleNotFoundError as exc:
        if exc.name != "fabric.check":
            raise
    else:
        check.register_check(fsub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    clean = sub.add_parser("clean", help="remove a crashed run's leftovers (recorded processes, prefixed "
                                         "namespaces, interfaces and iptables rules); never `mn -c`")
    clean.add_argument("--prefix", default="pt", help="the testbed's name prefix (default pt)")
    clean.set_defaults(func=run_clean)


def run_show(args: argparse.Namespace) -> int:
    from fabric.topo import Dilation, Plan
    from fabric.topology import load_topology

    topo = load_topology(args.topology)
    try:
        dilation = Dilation(args.tdf, args.byte_scale)
        plan = Plan(topo, args.prefix)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    hosts = [{"name": h.name, "role": h.role, "hardware": h.hardware, "node": plan.node(h.name),
              "addresses": {net: plan.address(h.name, net) for net in ("frontend", "efa", "mgmt")
                            if any(lk.cls == net and h.name in (lk.a, lk.b) for lk in plan.links)},
              "efa_rails": plan.addresses(h.name, "efa")}
             for h in topo.hosts]
    # the emulated links: a link with rails as one line per rail (model values per rail)
    declared = {lk.name for lk in topo.links}
    rail_links = [lk for lk in plan.links if lk.group in declared]
    links = [{"name": lk.name, "a": lk.a, "b": lk.b, "class": lk.cls, "group": lk.group, "rail": lk.rail,
              "model": lk.params.model_dump(mode="json", by_alias=True),
              "emulated": dilation.link(lk.params, lk.cls)} for lk in rail_links]
    params = {lk.name: lk.params for lk in rail_links}
    if args.json:
        print(json.dumps({"name": topo.name, "tdf": dilation.tdf, "byte_scale": dilation.byte_scale,
                          "implicit_mgmt": plan.implicit_mgmt, "hosts": hosts, "links": links}, indent=2))
        return 0
    print(f"topology {topo.name}: {len(topo.hosts)} hosts, {len(topo.switches)} switches, {len(topo.links)} links"
          f"{' (+ implicit mgmt switch)' if plan.implicit_mgmt else ''}; tdf={dilation.tdf:g} "
          f"byte_scale={dilation.byte_scale:g} (efa only)")
    print(f"\n{'host':<10} {'role':<9} {'hardware':<10} {'frontend':<15} {'efa':<15} {'mgmt':<15}")
    for h in hosts:
        a = h["addresses"]
        print(f"{h['name']:<10} {h['role']:<9} {h['hardware'] or '-':<10} {a.get('frontend', '-'):<15} "
              f"{a.get('efa', '-'):<15} {a.get('mgmt', '-'):<15}"
              + (f" (+{len(h['efa_rails']) - 1} rails: {', '.join(h['efa_rails'][1:])})"
                 if len(h["efa_rails"]) > 1 else ""))
    print(f"\n{'link':<16} {'class':<8} {'a':<10} {'b':<10} {'bandwidth':>10} {'latency':>9} {'jitter':>8} "
          f"{'loss':>6} {'mtu':>5} {'queue':>5}   {'emul. rate':>11} {'emul. lat':>9}")
    for lk in links:
        m, e = params[lk["name"]], lk["emulated"]
        bw = format_bandwidth(m.bandwidth_bps) if m.bandwidth_bps else "unshaped"
        ebw = format_bandwidth(e["rate_bps"]) if e["rate_bps"] else "unshaped"
        print(f"{lk['name']:<16} {lk['class']:<8} {lk['a']:<10} {lk['b']:<10} {bw:>10} "
              f"{format_duration(m.latency_s):>9} {format_duration(m.jitter_s):>8} {m.loss:>6.2%} {m.mtu:>5} "
              f"{m.queue_packets:>5}   {ebw:>11} {format_duration(e['latency_s']):>9}")
    return 0


def run_clean(args: argparse.Namespace) -> int:
    from fabric.cleanup import clean
    from fabric.net import FabricError
    from testbed.runner.cluster import clean_this_server

    if os.geteuid() != 0:
        print("error: pdtb clean needs root (it deletes interfaces and namespaces)", file=sys.stderr)
        return 2
    try:
        # first what a cluster run recorded on this machine as one of its servers: ending those
        # remote host shells also ends their local ssh clients
        served = clean_this_server(args.prefix)
        report = clean(args.prefix)
    except (ValueError, FabricError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if served is not None:
        print(f"cluster processes recorded on this machine: {served['signalled']} signalled; "
              f"interfaces deleted: {served['links_deleted'] or 'none'}")
    for line in report.lines():
        print(line)
    return 0
