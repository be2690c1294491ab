"""The Mininet backend: daemons in the topology's hosts, on the emulated fabric.

``fabric.net.FabricNet`` builds the namespaces, shaped links and address plan. Daemons run
inside their host's namespace (``net.popen``): HTTP on the frontend address, KV on the EFA
address, MQTT to the broker in the root namespace on the management network. The root
namespace joins frontend and mgmt, so the router URL works from the machine running the
testbed. ``close()`` stops the net, which removes only what it created (our prefix).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from core.config import ConfigError
from core.vocab import NETWORKS
from nodes.config import Endpoint
from testbed.runner.backend import ROOT, LiveBackend, NodePlan
from testbed.runner.process import Spawner

HTTP_PORT = 8000  # every daemon in its own namespace serves HTTP here
FIDELITY_INTERVAL_S = 0.5


class MininetBackend(LiveBackend):
    name = "mininet"
    emulates_links = True
    link_faults = True

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.net: Any = None
        self.monitor: Any = None

    @classmethod
    def host_capacity(cls, prefix: str) -> float | None:
        """Measured on a throwaway pair of namespaces (fabric.dilation), in bit/s."""
        from fabric.dilation import measure_host_capacity

        return measure_host_capacity(prefix=prefix)

    def build(self, topo: Any, nodes: Mapping[str, NodePlan], *, tdf: float, byte_scale: float,
              emulation: Any) -> None:
        """Build and start the net of ``topo`` (model values; the scenario's overrides already
        applied), with the scenario's ``emulation.impairment`` and ``emulation.rto_min``."""
        from fabric.net import FabricError, FabricNet

        self.topo = topo
        rto = emulation.rto_min
        try:
            net = FabricNet(topo, tdf=tdf, byte_scale=byte_scale, prefix=self.prefix, impairment=emulation.impairment,
                            rto_min_s=None if rto == "auto" else float(rto))
        except FabricError as exc:  # leftovers of an earlier run: the user must clean first
            raise ConfigError("mininet backend", [("", str(exc))]) from None
        self.net = net
        net.start()

    @property
    def impairment_backend(self) -> str:
        return self.net.impairment_backend if self.net is not None else "none"

    def address(self, plan: NodePlan, cls: str) -> str:
        return self.net.root_address(cls) if plan.host == ROOT else self.net.address(plan.host, cls)

    def http_endpoint(self, plan: NodePlan) -> Endpoint:
        host = self.address(plan, "frontend")
        if plan.host == ROOT:  # shares the root namespace with the user's own services
            from testbed.runner.local import free_port

            return Endpoint(host=host, port=free_port(host))
        return Endpoint(host=host, port=HTTP_PORT)

    def kv_endpoint(self, plan: NodePlan) -> Endpoint:
        from nodes.kvproto import DEFAULT_KV_PORT

        return Endpoint(host=self.address(plan, "efa"), port=DEFAULT_KV_PORT)

    def kv_addresses(self, plan: NodePlan) -> list[str]:
        """The node's EFA address on each of its rails, rail order (rail 0's is kv_endpoint's)."""
        return self.net.addresses(plan.host, "efa")

    def mgmt_address(self, plan: NodePlan) -> str | None:
        if plan.host == ROOT:
            return None
        try:
            return self.net.address(plan.host, "mgmt")
        except KeyError:  # a host without a mgmt interface
            return None

    def broker_host(self) -> str:
        return self.net.root_address("mgmt")

    def spawner(self, plan: NodePlan) -> Spawner | None:
        if plan.host == ROOT:
            return None  # the root namespace: a plain subprocess
        host = plan.host

        def spawn(argv: list[str], **kw: Any) -> Any:
            return self.net.popen(host, argv, **kw)

        return spawn

    def link_names(self) -> list[str]:
        return list(self.net.link_names())

    def set_link(self, target: str, **params: Any) -> list[str]:
        """Change one link, or every link of a class (``efa``); model values. Returns the links changed."""
        if target in NETWORKS:
            names = [lk.name for lk in self.topo.links if lk.cls == target]
        elif target in self.net.link_names():
            names = [target]
        else:
            raise ConfigError("set_link", [("", f"{target!r} is neither a link ({', '.join(self.net.link_names())}) "
                                                f"nor a link class ({', '.join(NETWORKS)})")])
        for name in names:
            self.net.set_link(name, **params)
        return names

    def start_capture(self, targets: list[str], out_dir: Path) -> list[Path]:
        return list(self.net.start_capture(targets, out_dir))

    def start_monitor(self, run_dir: Path) -> None:
        """Start the fidelity monitor; if it cannot start, say so in fidelity.json (the run is
        then ``unmeasured``, never silently taken as trustworthy)."""
        from fabric.fidelity import FidelityMonitor, unmeasured_verdict

        try:
            self.monitor = FidelityMonitor(self.net, run_dir, FIDELITY_INTERVAL_S).start()
        except (OSError, RuntimeError, ValueError) as exc:
            self.monitor = None
            reason = f"the fidelity monitor could not start: {type(exc).__name__}: {exc}"
            (Path(run_dir) / "fidelity.json").write_text(json.dumps(unmeasured_verdict(reason), indent=2) + "\n")

    def stop_monitor(self) -> dict[str, Any] | None:
        monitor, self.monitor = self.monitor, None
        return monitor.stop() if monitor is not None else None

    def close(self) -> None:
        net, self.net = self.net, None
        if net is not None:
            net.stop()
