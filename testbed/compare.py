"""``pdtb compare``: one table across deployments, models, workloads and loads.

A comparison file (``kind: comparison``) names deployments (scenario fragments: topology,
pools, router, KV transfer, emulation), models, workloads (a workload shape and its SLO) and
arrival rates; every cell (deployment x model x workload x load x fabric sweep point) is a
normal scenario run on the given backend, into ``OUT/cells/<label>/``. The results become
``comparison.json`` / ``comparison.csv`` (one row per cell) and ``comparison.html`` with PNG
plots (``testbed.report.write_comparison_report``). A cell whose model does not fit a
deployment is recorded with the reason, never silently dropped; a cell whose fidelity verdict
is not ``trustworthy`` is marked and left out of the speedups.
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from pydantic import Field, model_validator

from core.config import ConfigError, SafeName, StrictModel, load_model, validate_data
from nodes.profiles.models import ProfileName
from testbed.runner.backend import BackendChoice
from testbed.config.scenario import SloSpec, scenario_from_data, split_key_path

TRUSTED_VERDICTS = frozenset({"trustworthy", "simulated"})
"""Fidelity verdicts a speedup may be computed from: an emulation judged trustworthy, or the
virtual-time simulation (its agreement with the emulation is measured in docs/simulation.md);
every other verdict (untrustworthy, unmeasured) marks the cell."""

STATUS_OK, STATUS_NOT_RUN, STATUS_FAILED = "ok", "not_run", "failed"


class DeploymentSpec(StrictModel):
    """A way to serve a model (``kind: deployment``): the scenario keys that say where it runs.

    ``scenario`` holds scenario keys other than ``name``, ``model``, ``workload`` and ``slo``
    (the comparison sets those); ``models`` adds per-model overrides (``{key.path: value}``),
    for example more CS-3 systems or prefill nodes for a larger model."""

    KIND: ClassVar[str] = "deployment"
    name: SafeName
    description: str = ""
    scenario: dict[str, Any]
    models: dict[ProfileName, dict[str, Any]] = {}

    @model_validator(mode="after")
    def _only_placement(self) -> "DeploymentSpec":
        owned = sorted({"name", "model", "workload", "slo", "sweep"} & set(self.scenario))
        if owned:
            raise ValueError(f"scenario: the comparison sets {', '.join(owned)}, not a deployment")
        return self


class WorkloadProfile(StrictModel):
    """A workload shape and its SLO (``kind: workload``): scenario ``workload`` keys without
    the arrival rate and count, which the comparison's loads and ``requests`` set."""

    KIND: ClassVar[str] = "workload"
    name: SafeName
    description: str = ""
    workload: dict[str, Any]
    slo: SloSpec

    @model_validator(mode="after")
    def _no_rate(self) -> "WorkloadProfile":
        owned = sorted({"requests"} & set(self.workload))
        if owned:
            raise ValueError(f"workload: the comparison sets {', '.join(owned)}, not a workload")
        return self


class QuickSpec(StrictModel):
    """What ``pdtb compare --quick`` runs: deployments, models and workloads from the full lists,
    its own loads, request count and sweep."""

    deployments: list[SafeName] | None = None
    models: list[ProfileName] | None = None
    workloads: list[SafeName] | None = None
    loads: list[float] | None = Field(default=None, min_length=1)
    requests: int | None = Field(default=None, ge=1)
    sweep: dict[str, list[Any]] | None = None


class ComparisonConfig(StrictModel):
    """A comparison file (``kind: comparison``)."""

    KIND: ClassVar[str] = "comparison"
    name: SafeName
    description: str = ""
    backend: BackendChoice = "auto"  # as `pdtb run --backend`
    baseline: list[SafeName] = Field(min_length=1)  # deployments; per cell the fastest of them is the baseline
    deployments: list[str | dict[str, Any]] = Field(min_length=1)  # file paths (relative to this file) or inline
    models: list[ProfileName] = Field(min_length=1)
    workloads: list[str | dict[str, Any]] = Field(min_length=1)  # as deployments
    loads: list[float] = Field(min_length=1)  # arrival rates, requests per model second (Poisson)
    requests: int = Field(default=50, ge=1)  # per cell
    seed: int = 1
    sweep: dict[str, list[Any]] = {}  # scenario key path -> values, e.g. fabric.efa.bandwidth: [100Gbps, 400Gbps]
    sweep_deployments: list[SafeName] | None = None  # swept deployments; None = all but the baselines
    overrides: dict[str, Any] = {}  # scenario key path -> value for every cell (e.g. emulation.tdf)
    quick: QuickSpec | None = None

    @model_validator(mode="after")
    def _loads_positive(self) -> "ComparisonConfig":
        bad = [x for x in self.loads if not x > 0]
        if bad:
            raise ValueError(f"loads: arrival rates must be > 0, got {bad}")
        return self


@dataclass
class Comparison:
    """A loaded comparison: its deployments and workloads resolved and checked."""

    config: ComparisonConfig
    source: str
    base_dir: Path
    deployments: dict[str, DeploymentSpec]
    workloads: dict[str, WorkloadProfile]


@dataclass(frozen=True)
class Cell:
    deployment: str
    model: str
    workload: str
    load: float
    point: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        parts = [self.deployment, self.model, self.workload, f"load{self.load:g}"]
        parts += [f"{k.rsplit('.', 1)[-1]}{v}" for k, v in self.point]
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join(parts))[:180]


@dataclass
class CellResult:
    cell: Cell
    status: str
    reason: str = ""
    run_dir: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


def _load_part(item: str | dict[str, Any], kind: type[StrictModel], base_dir: Path, source: str,
               key: str) -> Any:
    """A deployment or workload: inline (checked against ``source`` at ``key``) or a file."""
    if isinstance(item, dict):
        return validate_data(kind, item, source, prefix=key)
    path = (base_dir / item).resolve()
    if not path.is_file():
        raise ConfigError(source, [(key, f"no {kind.KIND} file {item!r} (relative to {base_dir})")])
    return load_model(kind, path)


def _nested(exc: ConfigError, source: str, key: str) -> list[tuple[str, str]]:
    """Problems of a part, as lines of the comparison (naming the part's own file if it has one)."""
    if exc.source == source:
        return exc.problems
    return [(key, f"{exc.source}: {p or '<top>'}: {m}") for p, m in exc.problems]


def _with_trace_beside(w: Any, item: str | dict[str, Any], base_dir: Path) -> Any:
    """A trace path in a workload file is relative to that file, as in a scenario file."""
    trace = w.workload.get("trace") if isinstance(w, WorkloadProfile) else None
    if not (isinstance(item, str) and isinstance(trace, dict) and isinstance(trace.get("path"), str)):
        return w
    where = (base_dir / item).resolve().parent
    return w.model_copy(update={"workload": {**w.workload, "trace": {**trace, "path": str(where / trace["path"])}}})


def _load_parts(items: list[str | dict[str, Any]], kind: type[StrictModel], key: str, base_dir: Path, source: str,
                problems: list[tuple[str, str]]) -> dict[str, Any]:
    """Deployments or workloads by name; each problem (and a repeated name) goes to ``problems``."""
    parts: dict[str, Any] = {}
    for i, item in enumerate(items):
        try:
            part = _with_trace_beside(_load_part(item, kind, base_dir, source, f"{key}[{i}]"), item, base_dir)
        except ConfigError as exc:
            problems.extend(_nested(exc, source, f"{key}[{i}]"))
            continue
        if part.name in parts:
            problems.append((f"{key}[{i}]", f"a second {kind.KIND} named {part.name!r}"))
        parts[part.name] = part
    return parts


def load_comparison(path: str | Path) -> Comparison:
    """Read and check a comparison file: every problem on its own line, naming file and key."""
    path = Path(path)
    cfg = load_model(ComparisonConfig, path)
    base_dir = path.resolve().parent
    problems: list[tuple[str, str]] = []
    deployments = _load_parts(cfg.deployments, DeploymentSpec, "deployments", base_dir, str(path), problems)
    workloads = _load_parts(cfg.workloads, WorkloadProfile, "workloads", base_dir, str(path), problems)
    for key, names in (("baseline", cfg.baseline), ("sweep_deployments", cfg.sweep_deployments or [])):
        for i, name in enumerate(names):
            if len(deployments) == len(cfg.deployments) and name not in deployments:
                problems.append((f"{key}[{i}]", f"no deployment named {name!r}; known: {', '.join(deployments)}"))
    for key in list(cfg.sweep) + list(cfg.overrides):
        try:
            split_key_path(key)
        except ValueError as exc:
            problems.append((f"sweep.{key}" if key in cfg.sweep else f"overrides.{key}", str(exc)))
    if cfg.quick is not None:
        problems += _quick_problems(cfg, deployments, workloads)
    if problems:
        raise ConfigError(str(path), problems)
    return Comparison(cfg, str(path), base_dir, deployments, workloads)


def _quick_problems(cfg: ComparisonConfig, deployments: dict[str, Any], workloads: dict[str, Any]
                    ) -> list[tuple[str, str]]:
    q = cfg.quick
    assert q is not None
    known = {"deployments": list(deployments), "models": cfg.models, "workloads": list(workloads)}
    problems = []
    for key, full in known.items():
        for i, value in enumerate(getattr(q, key) or []):
            if value not in full:
                problems.append((f"quick.{key}[{i}]", f"{value!r} is not in the comparison's {key}"))
    return problems


def cells(cmp: Comparison, quick: bool = False) -> list[Cell]:
    """Every cell of the comparison (or of its ``quick`` subset), in a stable order."""
    cfg, q = cmp.config, cmp.config.quick if quick else None
    deps = (q.deployments if q and q.deployments else None) or list(cmp.deployments)
    models = (q.models if q and q.models else None) or cfg.models
    wls = (q.workloads if q and q.workloads else None) or list(cmp.workloads)
    loads = (q.loads if q and q.loads else None) or cfg.loads
    sweep = q.sweep if q and q.sweep is not None else cfg.sweep
    points = [tuple(zip(sweep, values)) for values in itertools.product(*sweep.values())] if sweep else [()]
    swept = set(cfg.sweep_deployments if cfg.sweep_deployments is not None
                else [d for d in cmp.deployments if d not in cfg.baseline])
    return [Cell(d, m, w, load, p)
            for d, m, w, load in itertools.product(deps, models, wls, loads)
            for p in (points if d in swept else [()])]


def requests_per_cell(cmp: Comparison, quick: bool = False) -> int:
    q = cmp.config.quick
    return q.requests if quick and q is not None and q.requests else cmp.config.requests


def cell_scenario(cmp: Comparison, cell: Cell, requests: int) -> Any:
    """The validated scenario of one cell (ConfigError if the deployment cannot serve it)."""
    dep, wl = cmp.deployments[cell.deployment], cmp.workloads[cell.workload]
    workload = json.loads(json.dumps(wl.workload))
    if "trace" in workload:  # a replayed trace keeps its burstiness: the load sets its speedup
        workload["trace"]["speedup"] = cell.load / trace_rate(cmp, wl)
    else:
        workload["arrival"] = {**workload.get("arrival", {"process": "poisson"}), "rate": cell.load}
    workload["requests"] = requests
    workload.setdefault("seed", cmp.config.seed)
    data = {**dep.scenario, "name": f"{cmp.config.name}-{cell.deployment}"[:32].rstrip("-"),
            "model": cell.model, "workload": workload, "slo": wl.slo.model_dump()}
    overrides = list(cmp.config.overrides.items()) + list(dep.models.get(cell.model, {}).items())
    overrides += list(cell.point)
    source = f"{cmp.source} [cell {cell.label}]"
    sc = scenario_from_data(data, source, cmp.base_dir, overrides)
    from testbed.config.scenario import check_references

    check_references(sc)
    sc._checked = True
    return sc


def trace_rate(cmp: Comparison, wl: WorkloadProfile) -> float:
    """Mean arrival rate (requests per trace second) of a trace workload's replayed window."""
    from core.units import parse_duration
    from testbed.trace import read_trace

    spec = wl.workload["trace"]
    records = read_trace((cmp.base_dir / spec["path"]).resolve())
    start = parse_duration(spec.get("start", 0))
    end = start + parse_duration(spec["window"]) if spec.get("window") is not None else None
    times = [r.t_s for r in records if r.t_s >= start and (end is None or r.t_s < end)]
    span = (end if end is not None else max(times)) - start
    if len(times) < 2 or span <= 0:
        raise ConfigError(cmp.source, [(f"workloads.{wl.name}", "the trace window holds fewer than two requests")])
    return len(times) / span


def cell_metrics(summary: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the comparison keeps of a run: latency percentiles, per-user speed, goodput, verdict,
    and where the end-to-end time went (means over completed requests, model ms)."""
    import numpy as np

    def pct(key: str) -> dict[str, float | None]:
        d = summary.get(key) or {}
        return {"p50": d.get("p50"), "p90": d.get("p90")}

    done = [r for r in rows if str(r.get("completed")).lower() in ("true", "1")]
    speeds = [(float(r["output_tokens"]) - 1) / (float(r["e2e_ms"]) - float(r["ttft_ms"])) * 1e3
              for r in done if r.get("e2e_ms") not in (None, "") and r.get("ttft_ms") not in (None, "")
              and float(r["output_tokens"]) > 1 and float(r["e2e_ms"]) > float(r["ttft_ms"])]

    def mean(col: str) -> float:
        vals = [float(r[col]) for r in done if r.get(col) not in (None, "")]
        return float(np.mean(vals)) if vals else 0.0

    queue, prefill, ttft, e2e = mean("prefill_queue_ms"), mean("prefill_ms"), mean("ttft_ms"), mean("e2e_ms")
    counts = summary.get("counts") or {}
    fid = summary.get("fidelity") or {}
    return {
        "ttft_ms": pct("ttft_ms"), "tpot_ms": pct("tpot_ms"), "e2e_ms": pct("e2e_ms"),
        "tokens_per_s_per_user": {"p50": float(np.percentile(speeds, 50)) if speeds else None,
                                  "p90": float(np.percentile(speeds, 90)) if speeds else None},
        "goodput_share": (summary.get("goodput") or {}).get("share"),
        "completed": counts.get("completed", 0), "failed": counts.get("failed", 0),
        "verdict": fid.get("verdict", "unmeasured"),
        "attribution_ms": {"queue": queue, "prefill": prefill,
                           "handoff_and_first_token": max(0.0, ttft - queue - prefill),
                           "decode": max(0.0, e2e - ttft)},
    }


def run_comparison(cmp: Comparison, out: Path, *, quick: bool = False, backend: str | None = None,
                   run_cell: Callable[[Any, Path, str], tuple[dict[str, Any], list[dict[str, Any]]]] | None = None,
                   log: Callable[[str], None] = lambda _s: None) -> dict[str, Any]:
    """Run every cell into ``out/cells/`` and write comparison.json / .csv / .html.

    ``run_cell(scenario, run_dir, backend) -> (summary, request rows)``; the default runs the
    scenario with the orchestrator. A cell that cannot be configured is ``not_run`` with the
    reason; one whose run fails is ``failed`` with the error; the others are ``ok``."""
    from testbed.runner.backend import pick_backend

    chosen = pick_backend(backend, cmp.config.backend)
    run_cell = run_cell or _orchestrated_run
    out.mkdir(parents=True, exist_ok=True)
    n = requests_per_cell(cmp, quick)
    results: list[CellResult] = []
    todo = cells(cmp, quick)
    for i, cell in enumerate(todo, 1):
        log(f"[{i}/{len(todo)}] {cell.label}")
        try:
            sc = cell_scenario(cmp, cell, n)
        except ConfigError as exc:
            results.append(CellResult(cell, STATUS_NOT_RUN, "; ".join(m for _, m in exc.problems)))
            continue
        run_dir = out / "cells" / cell.label
        try:
            summary, rows = run_cell(sc, run_dir, chosen)
        except Exception as exc:  # one failing cell must not lose the others' results
            results.append(CellResult(cell, STATUS_FAILED, f"{type(exc).__name__}: {exc}", str(run_dir)))
            continue
        results.append(CellResult(cell, STATUS_OK, "", str(run_dir), cell_metrics(summary, rows)))
    doc = aggregate(cmp, results, chosen, quick)
    write_outputs(doc, out)
    return doc


def _orchestrated_run(sc: Any, run_dir: Path, backend: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import csv

    from testbed.runner.backend import backend_class
    from testbed.runner.orchestrator import plan_run
    from testbed.runner.rundir import RunDir

    plan_run(sc, backend)
    rd = RunDir.create(sc.name, run_dir)
    summary = backend_class(backend).run(sc, rd)
    if summary is None:
        raise RuntimeError("the run produced no summary")
    with (rd.root / "requests.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return summary, rows


def _speedup(base: float | None, value: float | None) -> float | None:
    return base / value if base and value else None


def aggregate(cmp: Comparison, results: list[CellResult], backend: str, quick: bool) -> dict[str, Any]:
    """comparison.json: the cells, and each cell's speedup over the fastest trusted baseline
    deployment of the same model, workload, load and sweep point (E2E, TTFT and TPOT p50)."""
    rows = []
    for r in results:
        c = r.cell
        row: dict[str, Any] = {"deployment": c.deployment, "model": c.model, "workload": c.workload,
                               "load": c.load, "point": dict(c.point), "status": r.status, "reason": r.reason,
                               "run_dir": r.run_dir, **r.metrics}
        row["trusted"] = r.status == STATUS_OK and r.metrics.get("verdict") in TRUSTED_VERDICTS
        rows.append(row)

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["workload"], row["load"]), []).append(row)
    for group in groups.values():
        for row in group:
            # a baseline that is not swept stands for every sweep point of the others
            bases = [g for g in group if g["deployment"] in cmp.config.baseline and g["trusted"]
                     and (g.get("e2e_ms") or {}).get("p50") and g["point"] in (row["point"], {})]
            best = min(bases, key=lambda g: g["e2e_ms"]["p50"]) if bases else None
            row["baseline"] = best["deployment"] if best else None
            if best is None or not row["trusted"]:
                row["speedup"] = None
                continue
            row["speedup"] = {m: _speedup(best[m]["p50"], row[m]["p50"]) for m in ("e2e_ms", "ttft_ms", "tpot_ms")}
    return {"schema": "pdtb.comparison/1", "name": cmp.config.name, "description": cmp.config.description,
            "source": cmp.source, "backend": backend, "quick": quick, "baseline": cmp.config.baseline,
            "requests_per_cell": requests_per_cell(cmp, quick), "cells": rows}


CSV_COLUMNS: tuple[str, ...] = (
    "deployment", "model", "workload", "load", "point", "status", "verdict", "trusted", "completed", "failed",
    "ttft_ms_p50", "ttft_ms_p90", "tpot_ms_p50", "tpot_ms_p90", "e2e_ms_p50", "e2e_ms_p90",
    "tokens_per_s_per_user_p50", "tokens_per_s_per_user_p90", "goodput_share", "baseline",
    "speedup_e2e", "speedup_ttft", "speedup_tpot", "reason", "run_dir")
"""``comparison.csv``'s columns (model time; speedup = baseline p50 / this cell's p50)."""


def csv_row(row: dict[str, Any]) -> list[Any]:
    flat = {k: row.get(k) for k in CSV_COLUMNS}
    flat["point"] = ";".join(f"{k}={v}" for k, v in row["point"].items())
    for m in ("ttft_ms", "tpot_ms", "e2e_ms", "tokens_per_s_per_user"):
        for p in ("p50", "p90"):
            flat[f"{m}_{p}"] = (row.get(m) or {}).get(p)
    sp = row.get("speedup") or {}
    flat.update(speedup_e2e=sp.get("e2e_ms"), speedup_ttft=sp.get("ttft_ms"), speedup_tpot=sp.get("tpot_ms"))
    return [flat[c] for c in CSV_COLUMNS]


def write_outputs(doc: dict[str, Any], out: Path) -> None:
    from testbed.report import write_comparison_report
    from testbed.runner.rundir import write_atomically, write_csv

    write_atomically(out / "comparison.json", json.dumps(doc, indent=2, default=str) + "\n")
    write_csv(out / "comparison.csv", CSV_COLUMNS, [csv_row(r) for r in doc["cells"]])
    write_comparison_report(doc, out)
