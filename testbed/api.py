"""Scripting API: drive the testbed from Python.

    from testbed import Testbed

    with Testbed("scenarios/pair.yaml", overrides=["workload.requests=20"]) as tb:
        tb.run_workload(wait=False)           # the scenario's workload, in the background
        tb.sleep_model(5.0)                   # five model seconds later...
        tb.set_link("efa", bandwidth_bps=100e9, loss=0.01)
        tb.node_command("d1", "slowdown", factor=2.0)
        tb.wait()
        print(tb.results()["ttft_ms"])

Everything the scenario's run would do (run directory, daemons, broker, captures, fidelity)
happens on ``start()``; ``stop()`` (or leaving the ``with`` block, also on an exception)
tears it all down and writes the summary and report. Link and node changes take model-time
values and are recorded in run.json like scenario faults.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from core.config import ConfigError


class Testbed:
    """One running system built from a scenario (a path or a ``ScenarioConfig``)."""

    def __init__(self, scenario: str | Path | Any, overrides: list[str] | None = None, backend: str | None = None,
                 out: str | Path | None = None, *, pcap: list[str] | None = None, prefix: str = "pt",
                 quiet: bool = True):
        from testbed.config.scenario import ScenarioConfig, load_scenario
        from testbed.runner.backend import pick_backend, require_live
        from testbed.runner.orchestrator import check_prefix, plan_run

        if isinstance(scenario, ScenarioConfig):
            if overrides:
                raise ConfigError("Testbed", [("overrides", "apply overrides when loading: pass a path instead")])
            self.scenario = scenario
            self.scenario_path = None
        else:
            self.scenario = load_scenario(scenario, list(overrides or []))
            self.scenario_path = str(scenario)
        if self.scenario.sweep:
            raise ConfigError(self.scenario.source, [("sweep", "a Testbed runs one configuration: loop over "
                                                               "expand_sweep() yourself, or pass "
                                                               "overrides=['sweep={}', ...]")])
        self.backend = pick_backend(backend, self.scenario.emulation.backend)
        require_live(self.backend, "a Testbed")
        plan_run(self.scenario, self.backend)
        self._out = out
        self._pcap = pcap
        self._prefix = check_prefix(prefix)
        self._quiet = quiet
        self._orch: Any = None
        self._client_thread: threading.Thread | None = None
        self._client_error: BaseException | None = None
        self._summary: dict[str, Any] | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "Testbed":
        """Bring the system up (everything but the load generator)."""
        from testbed.runner.orchestrator import Orchestrator
        from testbed.runner.rundir import RunDir

        if self._orch is not None:
            raise RuntimeError("this Testbed was already started; make a new one for another run")
        rd = RunDir.create(self.scenario.name, self._out)
        self._orch = Orchestrator(self.scenario, rd, backend=self.backend, scenario_path=self.scenario_path,
                                  pcap=self._pcap, prefix=self._prefix, quiet=self._quiet)
        self._orch.start()
        return self

    def stop(self) -> dict[str, Any] | None:
        """Stop the client and every daemon, account for every request, write summary and report."""
        orch = self._orch
        if orch is None or orch.stopped:
            return self._summary
        if self._client_thread is not None and self._client_thread.is_alive():
            orch.stop_reason = orch.stop_reason or "stopped"
            self._client_thread.join(30)
        orch.stop()
        self._summary = orch.finish()
        return self._summary

    def __enter__(self) -> "Testbed":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ the workload
    def run_workload(self, wait: bool = True, timeout_s: float | None = None) -> None:
        """Replay the scenario's workload (``RUN_DIR/workload.jsonl``) with the load generator.

        Model time is shifted so the first arrival comes now; faults in the scenario follow it.
        With ``wait=False`` it runs in the background: ``wait()`` joins it.
        """
        orch = self._running()
        if self._client_thread is not None:
            raise RuntimeError("the workload was already started")

        def body() -> None:
            try:
                orch.run_client(timeout_s=timeout_s)
            except BaseException as exc:  # surfaced by wait()
                self._client_error = exc

        self._client_thread = threading.Thread(target=body, name="pdtb-client", daemon=True)
        self._client_thread.start()
        if wait:
            self.wait()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the workload to finish; True if it did."""
        if self._client_thread is None:
            raise RuntimeError("no workload running: call run_workload() first")
        self._client_thread.join(timeout_s)
        if self._client_error is not None:
            err, self._client_error = self._client_error, None
            raise err
        return not self._client_thread.is_alive()

    # ------------------------------------------------------------ runtime changes
    def set_link(self, name: str, **params: Any) -> list[str]:
        """Change a link or a link class now (mininet backend): ``bandwidth_bps``, ``latency_s``,
        ``jitter_s``, ``loss`` (model values) or ``up=False``/``True``. Returns the links changed."""
        return self._running().set_link(name, **params)

    def node_command(self, node: str, cmd: str, factor: float | None = None) -> None:
        """Send ``drain``, ``resume``, ``slowdown`` (with ``factor``) or ``crash`` to a node."""
        self._running().node_command(node, cmd, factor)

    def now_model(self) -> float:
        """Model seconds since the run's t0."""
        return self._running().clock.now()

    def sleep_model(self, seconds: float) -> None:
        """Sleep ``seconds`` of model time (``seconds x TDF`` of wall time)."""
        time.sleep(max(0.0, seconds) * self._running().tdf)

    # ------------------------------------------------------------ results
    @property
    def router_url(self) -> str:
        return self._running(allow_stopped=True).router_url

    @property
    def run_dir(self) -> Path:
        return self._running(allow_stopped=True).rd.root

    @property
    def tdf(self) -> float:
        return self._running(allow_stopped=True).tdf

    @property
    def byte_scale(self) -> float:
        return self._running(allow_stopped=True).byte_scale

    def nodes(self) -> dict[str, str]:
        """node name -> role."""
        return {n: p.role for n, p in self._running(allow_stopped=True).nodes.items()}

    def results(self) -> dict[str, Any]:
        """The summary (summary.json): after stop() the final one, before it a snapshot so far."""
        orch = self._running(allow_stopped=True)
        if self._summary is not None:
            return self._summary
        from testbed.metrics import compute_summary

        return compute_summary(orch.rd.root)

    def requests(self) -> list[dict[str, Any]]:
        """One row per request (``requests.csv``'s columns, model time), so far or final."""
        from testbed.metrics import run_request_rows

        return run_request_rows(self._running(allow_stopped=True).rd.root)

    def _running(self, allow_stopped: bool = False) -> Any:
        if self._orch is None:
            raise RuntimeError("the Testbed is not started: call start() or use it as a context manager")
        if self._orch.stopped and not allow_stopped:
            raise RuntimeError("the Testbed was stopped")
        return self._orch
