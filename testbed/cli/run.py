"""``pdtb run SCENARIO`` (a run or a sweep, to the end) and ``pdtb up SCENARIO`` (serve until Ctrl-C)."""
from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from core.config import ConfigError
from testbed.runner.backend import BACKEND_CHOICES



def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run a scenario (or its sweep) into a run directory; prints the summary")
    _common(run)
    run.add_argument("--pcap", action="append", default=[], metavar="TARGET",
                     help="capture packets on a link class (efa, frontend, mgmt) or a link name; repeat or "
                          "separate with commas (mininet backend)")
    run.add_argument("--out", metavar="DIR", help="run directory (default runs/<scenario>-<UTC time>)")
    run.add_argument("--json", action="store_true", help="print summary.json to stdout instead of the table")
    run.add_argument("--no-progress", action="store_true", help="no live progress bar")
    run.set_defaults(func=cmd_run)
    up = sub.add_parser("up", help="bring a scenario's system up, print the router URL, serve until Ctrl-C")
    _common(up)
    up.add_argument("--out", metavar="DIR", help="run directory (default runs/<scenario>-<UTC time>)")
    up.set_defaults(func=cmd_up)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", metavar="SCENARIO", help="scenario YAML file")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=None,
                   help="where daemons run (default: the scenario's emulation.backend; auto = mininet as root; "
                        "sim = a virtual-time simulation, no daemons)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a scenario setting (repeatable), e.g. --set workload.arrival.rate=4")
    p.add_argument("--prefix", default="pt",
                   help="name prefix of the run's Mininet hosts, interfaces and PID registry "
                        "(a lowercase letter, then a letter or digit; default pt)")


def _pcap_targets(values: list[str]) -> list[str]:
    targets = [t.strip() for v in values for t in v.split(",") if t.strip()]
    for t in targets:
        if not re.match(r"^[a-z][a-z0-9_-]{0,62}$", t):
            raise ConfigError("--pcap", [("", f"{t!r} is not a link class or link name")])
    return targets


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: stop the run in order and still write the summary."""


def _sigterm_as_interrupt() -> None:
    def handler(signum: int, frame: Any) -> None:
        raise _Terminated()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def cmd_run(args: argparse.Namespace) -> int:
    from testbed.config.scenario import expand_sweep, load_scenario, point_label
    from testbed.runner.backend import backend_class, pick_backend
    from testbed.runner.orchestrator import Orchestrator, RunError, check_prefix, plan_run
    from testbed.runner.rundir import RunDir

    prefix = check_prefix(args.prefix)
    pcap = _pcap_targets(args.pcap)
    sc = load_scenario(args.scenario, args.overrides)
    backend = pick_backend(args.backend, sc.emulation.backend)
    runner = backend_class(backend)
    if pcap and not runner.emulates_links:
        raise ConfigError("--pcap", [("", "captures need the mininet backend (--backend mininet, as root)")])
    points = expand_sweep(sc)
    for _, cfg in points:
        plan_run(cfg, backend)  # every point must be runnable before anything starts
    sweep = bool(sc.sweep)
    _sigterm_as_interrupt()
    rd = RunDir.create(sc.name, args.out, sweep=sweep)
    progress = not args.no_progress and not args.json and sys.stderr.isatty()
    interrupted = False
    failed_points: list[str] = []
    results: list[tuple[dict[str, Any], Any, Any]] = []
    for point, cfg in points:
        prd = rd.child(point_label(point)) if sweep else rd
        if sweep:
            prd.update_run_json(sweep_point=point)
            print(f"sweep point {point_label(point)} -> {prd.root}", file=sys.stderr)
        if not runner.live:  # nothing to watch: the backend runs the point to its summary
            results.append((point, runner.run(cfg, prd, scenario_path=str(args.scenario)), prd.root))
            continue
        orch = Orchestrator(cfg, prd, backend=backend, scenario_path=str(args.scenario), pcap=pcap, prefix=prefix)
        try:
            summary = _run_one(orch, progress)
        except RunError as exc:  # this configuration could not be brought up; a sweep goes on
            print(f"error: {exc}", file=sys.stderr)
            failed_points.append(point_label(point))
            continue
        results.append((point, summary, prd.root))
        if orch.stop_reason == "interrupted":
            interrupted = True
            break
    if sweep and results:
        from testbed.report import write_sweep_report

        print(f"sweep report: {write_sweep_report(rd.root)}", file=sys.stderr)
    if args.json:
        out = [{"point": p, "summary": s} for p, s, _ in results] if sweep else (results[0][1] if results else None)
        print(json.dumps(out, indent=2))
    else:
        for _, summary, root in results:
            _print_summary(summary, root)
    if failed_points:
        print(f"error: could not run {'sweep point(s) ' + ', '.join(failed_points) if sweep else 'the scenario'}",
              file=sys.stderr)
    return 130 if interrupted else 1 if failed_points else 0


class _Bar:
    """The live progress bar, made once the run knows how many requests it has."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, orch: Any) -> None:
        from testbed.progress import RunProgress

        if self.bar is None:
            self.bar = RunProgress(orch.n_requests, orch.sc.name).__enter__()
        self.bar.poll_timeline(orch.rd.timeline(orch.client_name))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _run_one(orch: Any, progress: bool) -> Any:
    """Run one configuration, with a live progress bar when on a terminal."""
    if not progress:
        return orch.run()
    bar = _Bar()
    try:
        return orch.run(on_progress=bar)
    finally:
        bar.close()


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    from testbed.progress import print_summary_table

    print_summary_table(summary)
    lines = [f"run directory: {run_dir}"]
    for label, name in (("report", "report.html"), ("per request", "requests.csv")):
        if (run_dir / name).exists():
            lines.append(f"{label}: {run_dir / name}")
    print("\n".join(lines))


def cmd_up(args: argparse.Namespace) -> int:
    from testbed.config.scenario import load_scenario
    from testbed.runner.backend import pick_backend, require_live
    from testbed.runner.orchestrator import Orchestrator, RunError, check_prefix, plan_run
    from testbed.runner.rundir import RunDir

    prefix = check_prefix(args.prefix)
    sc = load_scenario(args.scenario, args.overrides)
    if sc.sweep:
        raise ConfigError(sc.source, [("sweep", "pdtb up serves one configuration: drop the sweep with "
                                                "--set 'sweep={}' and choose its keys' values with --set")])
    backend = pick_backend(args.backend, sc.emulation.backend)
    require_live(backend, "pdtb up")
    plan_run(sc, backend)
    _sigterm_as_interrupt()
    rd = RunDir.create(sc.name, args.out)
    orch = Orchestrator(sc, rd, backend=backend, scenario_path=str(args.scenario), prefix=prefix)
    try:
        try:
            orch.start(with_workload=False)
        except RunError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"router: {orch.router_url}", flush=True)
        scrape = [f"{cfg.http.url}/metrics" for name, cfg in orch.configs.items() if cfg.http is not None]
        print(f"metrics (Prometheus): {' '.join(scrape)}", flush=True)
        print(f"  try: curl -s {orch.router_url}/v1/completions -H 'content-type: application/json' "
              f"-d '{{\"model\": \"{sc.model}\", \"prompt\": \"hello\", \"max_tokens\": 16}}'", file=sys.stderr)
        print(f"  run directory: {rd.root}; Ctrl-C to stop", file=sys.stderr, flush=True)
        while True:
            orch.check_crashes()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        orch.stop()
    orch.finish()
    print(f"run directory: {rd.root}", file=sys.stderr)
    return 0
