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
from typing import Any

from core.config import ConfigError
from testbed.runner.process import Spawner

LINK_CLASSES = ("efa", "frontend", "mgmt")
FIDELITY_INTERVAL_S = 0.5


class MininetBackend:
    name = "mininet"

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.net: Any = None
        self.monitor: Any = None

    def build(self, topo: Any, *, tdf: float, byte_scale: float, impairment: str = "auto",
              rto_min_s: float | None = None) -> None:
        """Build and start the net of ``topo`` (model values; the scenario's overrides already applied).

        ``rto_min_s``: TCP's minimum RTO on EFA routes in model seconds (None: the fabric's default).
        """
        from fabric.net import FabricError, FabricNet

        self.topo = topo
        try:
            net = FabricNet(topo, tdf=tdf, byte_scale=byte_scale, prefix=self.prefix, impairment=impairment,
                            rto_min_s=rto_min_s)
        except FabricError as exc:  # leftovers of an earlier run: the user must clean first
            raise ConfigError("mininet backend", [("", str(exc))]) from None
        self.net = net
        net.start()

    @property
    def impairment_backend(self) -> str:
        return self.net.impairment_backend if self.net is not None else "none"

    def address(self, host: str, cls: str) -> str:
        return self.net.address(host, cls)

    def root_address(self, cls: str) -> str:
        return self.net.root_address(cls)

    def broker_host(self) -> str:
        return self.net.root_address("mgmt")

    def spawner(self, host: str | None) -> Spawner | None:
        if host is None:
            return None  # the root namespace: a plain subprocess

        def spawn(argv: list[str], **kw: Any) -> Any:
            return self.net.popen(host, argv, **kw)

        return spawn

    def link_names(self) -> list[str]:
        return list(self.net.link_names())

    def set_link(self, target: str, **params: Any) -> list[str]:
        """Change one link, or every link of a class (``efa``); model values. Returns the links changed."""
        if target in LINK_CLASSES:
            names = [lk.name for lk in self.topo.links if lk.cls == target]
        elif target in self.net.link_names():
            names = [target]
        else:
            raise ConfigError("set_link", [("", f"{target!r} is neither a link ({', '.join(self.net.link_names())}) "
                                                f"nor a link class ({', '.join(LINK_CLASSES)})")])
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
