"""What a backend is: the place a run's daemons live, chosen by name, known by its capabilities.

``local`` (loopback processes), ``mininet`` (the emulated fabric) and ``sim`` (virtual time, no
daemons) implement :class:`Backend`; the orchestrator, ``pdtb run``/``up``/``compare`` and the
scripting API ask a backend what it can do (``live``, ``emulates_links``) and call its methods,
and never branch on its name. ``backend_class`` is the registry.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Protocol, get_args

from core.config import ConfigError
from nodes.config import Endpoint

BackendChoice = Literal["auto", "local", "mininet", "sim", "mininet-cluster"]  # the scenario's emulation.backend, --backend
BACKEND_CHOICES: tuple[str, ...] = get_args(BackendChoice)
BACKEND_NAMES = BACKEND_CHOICES[1:]
ROOT = "root"  # a node that runs in the root namespace (no topology host)


@dataclass
class NodePlan:
    """One daemon of a run: its name, role, the topology host it runs in (or ROOT), its profile."""

    name: str
    role: str
    host: str
    hardware: str | None = None


class Backend(Protocol):
    """A backend. Every one has ``run``; a live one (``LiveBackend``) is also built by the
    orchestrator, which then starts the daemons where it says and reaches them as it says."""

    name: ClassVar[str]
    live: ClassVar[bool]            # runs real daemons (pdtb up, the scripting API); sim does not
    emulates_links: ClassVar[bool]  # shaped links: captures, fidelity, an auto TDF
    link_faults: ClassVar[bool]     # applies set_link / link_down / link_up (emulated, or simulated flows)

    @classmethod
    def run(cls, sc: Any, rd: Any, *, scenario_path: str | None = None) -> dict[str, Any] | None:
        """One scenario (no sweep) into the run directory ``rd``; returns its summary."""

    @classmethod
    def host_capacity(cls, prefix: str) -> float | None:
        """This host's measured fabric capacity (bit/s) when a backend can measure it, else None."""

    @classmethod
    def capacity_bound(cls, prefix: str, emulation: Any) -> tuple[float, str] | None:
        """A capacity (bit/s) below the host's bounding every emulated link, with why; or None."""

    @property
    def impairment_backend(self) -> str: ...

    def build(self, topo: Any, nodes: Mapping[str, NodePlan], *, tdf: float, byte_scale: float,
              emulation: Any) -> None: ...
    def address(self, plan: NodePlan, cls: str) -> str: ...
    def http_endpoint(self, plan: NodePlan) -> Endpoint: ...
    def kv_endpoint(self, plan: NodePlan) -> Endpoint: ...
    def kv_addresses(self, plan: NodePlan) -> list[str]: ...
    def mgmt_address(self, plan: NodePlan) -> str | None: ...
    def broker_host(self) -> str: ...
    def spawner(self, plan: NodePlan) -> Any: ...
    def link_names(self) -> list[str]: ...
    def set_link(self, target: str, **params: Any) -> list[str]: ...
    def start_capture(self, targets: list[str], out_dir: Path) -> list[Path]: ...
    def start_monitor(self, run_dir: Path) -> None: ...
    def stop_monitor(self) -> dict[str, Any] | None: ...
    def close(self) -> None: ...


class LiveBackend:
    """Base of the backends that run real daemons under the orchestrator (local, mininet)."""

    name: ClassVar[str]
    live: ClassVar[bool] = True

    @classmethod
    def capacity_bound(cls, prefix: str, emulation: Any) -> tuple[float, str] | None:
        """A capacity (bit/s) below the host's that bounds every emulated link, with the reason
        (the mininet-cluster backend's tunnel between servers); None: the host's capacity rules."""
        return None

    @classmethod
    def run(cls, sc: Any, rd: Any, *, scenario_path: str | None = None) -> dict[str, Any] | None:
        """One scenario (no sweep) into the run directory ``rd``; returns its summary."""
        from testbed.runner.orchestrator import Orchestrator

        return Orchestrator(sc, rd, backend=cls.name, scenario_path=scenario_path).run()


def mininet_available() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        import mininet.net  # noqa: F401  (importable with its dependencies, not just present)
    except ImportError:
        return False
    return True


def pick_backend(requested: str | None, scenario_backend: str = "auto") -> str:
    """``--backend`` beats the scenario's ``emulation.backend``; ``auto`` -> mininet as root, else local."""
    choice = requested or scenario_backend or "auto"
    if choice not in BACKEND_CHOICES:
        raise ConfigError("--backend", [("", f"expected one of {', '.join(BACKEND_CHOICES)}, got {choice!r}")])
    if choice == "auto":
        return "mininet" if mininet_available() else "local"
    if choice in ("mininet", "mininet-cluster") and not mininet_available():
        raise ConfigError("--backend", [("", "the mininet backend needs root and the mininet python module "
                                             "(run ./bootstrap.sh, then sudo); or use --backend local")])
    return choice


def backend_class(name: str) -> Any:
    """The class of backend ``name`` (imported on demand: Mininet and SimPy only when used)."""
    if name == "local":
        from testbed.runner.local import LocalBackend
        return LocalBackend
    if name == "mininet":
        from testbed.runner.mininet import MininetBackend
        return MininetBackend
    if name == "sim":
        from sim.run import SimBackend
        return SimBackend
    if name == "mininet-cluster":
        from testbed.runner.cluster import ClusterBackend
        return ClusterBackend
    raise ConfigError("--backend", [("", f"expected one of {', '.join(BACKEND_NAMES)}, got {name!r}")])


def require_live(name: str, what: str) -> Any:
    """The backend class, refusing one that runs no daemons for ``what`` (pdtb up, a Testbed)."""
    cls = backend_class(name)
    if not cls.live:
        raise ConfigError("--backend", [("", f"{what} drives live daemons: use --backend local or mininet "
                                             f"({name} runs a scenario's workload in virtual time: pdtb run)")])
    return cls
