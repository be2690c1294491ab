"""Reports: one self-contained ``report.html`` (PNGs embedded) plus the PNG files.

A run's report shows the summary (model time), TTFT and ITL CDFs, a per-request timeline
(queue, prefill, KV handoff, decode) for a sample of requests, output throughput and KV
traffic over time. A sweep's report plots headline metrics against each swept key and
tabulates every point. Emulation settings (TDF, byte scale) are always stated, since byte
scaling changes packet counts per transfer.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on the test machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from testbed.metrics import (compute_summary, expected_request_ids, request_records, run_events,  # noqa: E402
                             summarize_run)
from testbed.runner.rundir import write_csv  # noqa: E402
from core.units import parse_bandwidth, parse_duration, parse_ratio  # noqa: E402

CDF_POINTS = 4000  # points a CDF is drawn through
TIMELINE_SAMPLE = 40  # requests drawn in the per-request timeline
PHASES = (("queue", "#bbbbbb"), ("prefill", "#1f77b4"), ("kv", "#ff7f0e"), ("decode wait", "#d9d9d9"),
          ("decode", "#2ca02c"))

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:0.5em 0}
.warn{background:#fff4d6;padding:0.6em;border-left:4px solid #e0a800}.fail{background:#fde2e2;padding:0.6em;
border-left:4px solid #c00}.ok{background:#e6f4e6;padding:0.6em;border-left:4px solid #2a2}code{background:#f3f3f3}"""


# ---------------------------------------------------------------- helpers
def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:,.0f}" if 1e3 <= abs(v) < 1e15 else f"{v:.{digits}g}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def _cdf(ax: plt.Axes, values: list[float] | np.ndarray, label: str | None = None) -> None:
    """The empirical CDF, drawn through at most ``CDF_POINTS`` of its points (every one of a
    large run's ITLs as a path costs hundreds of MB and looks the same at figure resolution)."""
    xs = np.sort(np.asarray(values, dtype=float))
    ys = np.arange(1, len(xs) + 1) / len(xs)
    if len(xs) > CDF_POINTS:
        keep = np.unique(np.linspace(0, len(xs) - 1, CDF_POINTS).round().astype(int))
        xs, ys = xs[keep], ys[keep]
    ax.step(xs, ys, where="post", label=label)


# ---------------------------------------------------------------- run plots
def plot_cdf(values: list[float] | np.ndarray, xlabel: str, title: str, path: Path,
             slo: float | None = None) -> Path | None:
    if len(values) == 0:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    _cdf(ax, values)
    if slo is not None:
        ax.axvline(slo, color="red", linestyle="--", label=f"SLO {slo:g}")
        ax.legend(loc="lower right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests" if "TTFT" in title else "fraction")
    ax.set_title(title)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _phases(r: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(phase, start, end) of one request record, in model seconds."""
    end = r["done_s"] if r["done_s"] is not None else r["failed_s"]
    out = []
    marks = [("queue", r["sent_s"], r["prefill_start_s"]),
             ("prefill", r["prefill_start_s"], r["prefill_end_s"]),
             ("kv", r["kv_start_s"], r["kv_end_s"])]
    decode_from = r["decode_admitted_s"] or r["kv_end_s"] or r["prefill_end_s"]
    if r["decode_queued_s"] is not None and r["decode_admitted_s"] is not None:
        marks.append(("decode wait", r["decode_queued_s"], r["decode_admitted_s"]))
    marks.append(("decode", decode_from, end))
    for name, s, e in marks:
        if s is not None and e is not None and e >= s:
            out.append((name, s, e))
    return out


def plot_request_timeline(records: list[dict[str, Any]], path: Path) -> Path | None:
    sent = [r for r in records if r["sent_s"] is not None]
    if not sent:
        return None
    step = max(1, math.ceil(len(sent) / TIMELINE_SAMPLE))
    sample = sorted(sent, key=lambda r: r["sent_s"])[::step]
    fig, ax = plt.subplots(figsize=(10, 0.25 * len(sample) + 1.5))
    colors = dict(PHASES)
    for y, r in enumerate(sample):
        for name, s, e in _phases(r):
            # the handoff is drawn thin on top: in layerwise mode it overlaps the prefill
            ax.barh(y, (e - s) * 1e3, left=s * 1e3, color=colors[name], height=0.3 if name == "kv" else 0.7,
                    zorder=3 if name == "kv" else 2)
        if not r["completed"]:
            x = r["failed_s"] if r["failed_s"] is not None else r["sent_s"]
            ax.plot([x * 1e3], [y], "rx")
    ax.set_yticks(range(len(sample)), [r["request_id"] for r in sample], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("model time (ms)")
    ax.set_title(f"per-request timeline ({len(sample)} of {len(sent)} requests; x = failed)")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for _, c in PHASES], labels=[n for n, _ in PHASES],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    return _save(fig, path)


def _bins(t_min: float, t_max: float, n: int = 60) -> np.ndarray:
    span = max(t_max - t_min, 1e-9)
    return np.linspace(t_min, t_min + span, n + 1)


def plot_throughput(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Output tokens/s and completions/s over time, from the completed requests' token times
    (the client's, or the decode node's for requests timed by the router)."""
    done_recs = [r for r in records if r["completed"]]
    times = np.concatenate([r["token_times"] for r in done_recs] or [np.empty(0)])
    done = [r["done_s"] for r in done_recs if r["done_s"] is not None]
    if not len(times):
        return None
    edges = _bins(float(times.min()), float(times.max()))
    width = edges[1] - edges[0]
    tok, _ = np.histogram(times, edges)
    req, _ = np.histogram(done, edges)
    fig, ax = plt.subplots(figsize=(7, 3.4))
    centers = (edges[:-1] + edges[1:]) / 2
    ax.plot(centers, tok / width, label="output tokens/s")
    ax.set_xlabel("model time (s)")
    ax.set_ylabel("output tokens/s")
    ax2 = ax.twinx()
    ax2.plot(centers, req / width, color="gray", alpha=0.6, label="completions/s")
    ax2.set_ylabel("requests completed/s")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="upper right")
    ax.set_title("throughput over time (model time)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_kv_traffic(records: list[dict[str, Any]], path: Path, capacity_bps: float | None) -> Path | None:
    """KV handoff traffic (modelled bits spread over each transfer) per decode node, over time."""
    xfers = [r for r in records if r["kv_ok"] and r["kv_start_s"] is not None and r["kv_end_s"] is not None
             and r["kv_model_bytes"]]
    if not xfers:
        return None
    edges = _bins(min(r["kv_start_s"] for r in xfers), max(r["kv_end_s"] for r in xfers))
    width = edges[1] - edges[0]
    per_node: dict[str, np.ndarray] = {}
    for r in xfers:
        s, e = r["kv_start_s"], max(r["kv_end_s"], r["kv_start_s"] + 1e-12)
        bits_per_s = 8 * r["kv_model_bytes"] / (e - s)
        overlap = np.clip(np.minimum(edges[1:], e) - np.maximum(edges[:-1], s), 0, None)
        node = r["decode_node"] or "?"
        per_node.setdefault(node, np.zeros(len(edges) - 1))
        per_node[node] += bits_per_s * overlap / width
    fig, ax = plt.subplots(figsize=(7, 3.4))
    centers = (edges[:-1] + edges[1:]) / 2
    for node, series in sorted(per_node.items()):
        ax.plot(centers, series / 1e9, label=f"into {node}")
    if capacity_bps:
        ax.axhline(capacity_bps / 1e9, color="red", linestyle="--", label="predicted path bottleneck")
        sec = ax.secondary_yaxis("right", functions=(lambda g: 100 * g * 1e9 / capacity_bps,
                                                     lambda u: u * capacity_bps / 1e9 / 100))
        sec.set_ylabel("utilisation (%)")
    ax.set_xlabel("model time (s)")
    ax.set_ylabel("KV traffic (Gbit/s, modelled)")
    ax.set_title("KV handoff traffic on the EFA fabric")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


# ---------------------------------------------------------------- run report
def _emulation_html(summary: dict[str, Any]) -> str:
    em = summary["emulation"]
    fid = summary["fidelity"]
    css = {"trustworthy": "ok", "untrustworthy": "fail"}.get(fid["verdict"], "warn")
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in fid["reasons"])
    reasons += "".join(f"<li>warning: {html.escape(w)}</li>" for w in fid.get("warnings") or [])
    scale = em.get("byte_scale")
    note = ("Byte scale 1: packet-level behaviour is preserved; only wall time grows."
            if scale == 1 else
            "Byte scale below 1: each KV cache is sent as S x its size, so model transfer times are kept but "
            "packet counts per transfer (loss events, TCP window dynamics) are not.")
    return (f"<h2>Emulation and fidelity</h2>{_table(['backend', 'impairment', 'TDF', 'byte scale S'], [[em.get('backend'), em.get('impairment_backend'), em.get('tdf'), scale]])}"
            f"<p>{html.escape(note)} All times are model time (wall / TDF).</p>"
            f"<div class='{css}'><b>Fidelity: {html.escape(str(fid['verdict']))}</b><ul>{reasons}</ul></div>"
            + _links_html(fid.get("links") or {}, em))


def _links_html(links: dict[str, dict[str, Any]], em: dict[str, Any]) -> str:
    """The fidelity monitor's per-interface digest; EFA rates also in model terms (x TDF / S)."""
    if not links:
        return ""
    tdf, scale = em.get("tdf") or 1.0, em.get("byte_scale") or 1.0
    rows = []
    for name, p in sorted(links.items()):
        peak = p.get("peak_delivered_bps")
        model = peak * tdf / scale / 1e9 if peak is not None and "efa" in str(p.get("link")) else None
        rows.append([p.get("link"), name, None if peak is None else peak / 1e6, model,
                     p.get("median_delivered_ratio"), p.get("max_backlog_packets"), p.get("drops")])
    return ("<h3>Shaped links (fidelity monitor)</h3>" + _table(
        ["link", "interface", "peak delivered Mbit/s (emulated)", "peak Gbit/s (model, EFA)",
         "delivered/configured when backlogged", "max backlog (packets)", "drops"], rows))


def _summary_html(summary: dict[str, Any]) -> str:
    c = summary["counts"]
    parts = [f"<p>Run <code>{_fmt(summary.get('run_id'))}</code>, scenario <code>{_fmt(summary.get('scenario'))}</code>, "
             f"model-time duration {_fmt(summary['duration_s'])} s.</p>"]
    if summary.get("sweep_point"):
        parts.append("<p>Sweep point: " + ", ".join(f"<code>{html.escape(k)}={_fmt(v)}</code>"
                                                   for k, v in summary["sweep_point"].items()) + "</p>")
    parts.append(_table(["total", "completed", "failed"] + list(c["failed_by_reason"]),
                        [[c["total"], c["completed"], c["failed"], *c["failed_by_reason"].values()]]))
    by_router = (summary.get("timed_by") or {}).get("router")
    if by_router:
        parts.append(f"<p>{by_router} request(s) had no load-generator events (sent by a user to "
                     "<code>pdtb up</code>): their TTFT and E2E run from the router's arrival to the decode "
                     "node's first token and the router's completion, and their ITLs are the decode node's "
                     "token gaps.</p>")
    rows = [[label, *(summary[k][s] for s in ("mean", "p50", "p90", "p99")), summary[k]["count"]]
            for k, label in (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"),
                             ("e2e_ms", "E2E (ms)"))]
    parts.append(_table(["metric", "mean", "p50", "p90", "p99", "n"], rows))
    tp, g, slo = summary["throughput"], summary.get("goodput"), summary.get("slo")
    rows = [["output tokens/s", tp["output_tokens_per_s"]], ["input tokens/s", tp["input_tokens_per_s"]],
            ["requests/s", tp["requests_per_s"]]]
    if g:
        rows += [[f"goodput share (TTFT <= {slo['ttft_ms']:g} ms and TPOT <= {slo['tpot_ms']:g} ms)", g["share"]],
                 ["goodput rate (requests/s)", g["rate_per_s"]], ["TTFT attainment", g["ttft_attainment"]],
                 ["TPOT attainment", g["tpot_attainment"]]]
    parts.append(_table(["throughput and goodput", "value"], rows))
    kv = summary["kv_transfer"]
    parts.append("<h2>KV handoff</h2>" + _table(
        ["ok", "failed", "bytes on wire", "modelled bytes", "time p50 ms", "time p90 ms", "after prefill p50 ms",
         "after prefill p90 ms", "Gbit/s p50", "Gbit/s aggregate"],
        [[kv["count"], kv["failed"], kv["bytes"], kv["model_bytes"], kv["time_ms"]["p50"], kv["time_ms"]["p90"],
          kv["exposed_ms"]["p50"], kv["exposed_ms"]["p90"], kv["achieved_gbps"]["p50"],
          kv["achieved_gbps"]["aggregate"]]]))
    if kv["failed_by_reason"]:
        parts.append(_table(["KV failure", "count"], [[k, v] for k, v in kv["failed_by_reason"].items()]))
    rows = [[name, n["role"], n["hardware"], n["busy_fraction"], n["queue_wait_ms"]["p50"],
             n["queue_wait_ms"]["p99"], n["max_queue_depth"], n["steps"], n["step_late_ms"]["p99"]]
            for name, n in summary["nodes"].items()]
    parts.append("<h2>Nodes</h2>" + _table(["node", "role", "hardware", "busy fraction", "queue wait p50 ms",
                                            "queue wait p99 ms", "max queue", "steps", "step late p99 ms"], rows))
    check = summary.get("prediction_check")
    if check:
        m, p, ratio = check["measured"], check["predicted"], check["ratio"]
        parts.append(f"<h2>Measured vs predicted (requests alone in the system: {check['requests']})</h2>" + _table(
            ["", "TTFT ms", "TPOT ms", "E2E ms", "prompt tokens"],
            [["measured p50", m["ttft_ms_p50"], m["tpot_ms_p50"], m["e2e_ms_p50"], m["prompt_tokens_p50"]],
             ["predicted", p["ttft_ms"], p["tpot_ms"], p["e2e_ms"], p["prompt_tokens"]],
             ["ratio", ratio["ttft"], ratio["tpot"], ratio["e2e"], None]]))
    return "".join(parts)


def write_report(run_dir: str | Path, records: list[dict[str, Any]] | None = None) -> Path:
    """Write ``report.html`` and the PNGs into ``run_dir`` (computing summary.json if absent);
    ``records``: the run's request records when the caller has them (``summarize_run``)."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        summary, records = summarize_run(run_dir)
    else:
        summary = json.loads(summary_path.read_text())
        if records is None:
            records = request_records(run_events(run_dir), expected_request_ids(run_dir))
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    done = [r for r in records if r["completed"]]
    slo = summary.get("slo") or {}
    prediction = run.get("prediction") or {}
    plots = [
        (plot_cdf([r["ttft_s"] * 1e3 for r in done if r["ttft_s"] is not None], "TTFT (ms, model time)",
                  "TTFT CDF", run_dir / "ttft_cdf.png", slo.get("ttft_ms")), "TTFT CDF"),
        (plot_cdf(np.concatenate([r["itl_s"] for r in done] or [np.empty(0)]) * 1e3, "inter-token latency (ms, model time)",
                  "ITL CDF", run_dir / "itl_cdf.png", slo.get("tpot_ms")), "ITL CDF"),
        (plot_request_timeline(records, run_dir / "timeline.png"), "per-request timeline"),
        (plot_throughput(records, run_dir / "throughput.png"), "throughput"),
        (plot_kv_traffic(records, run_dir / "kv_traffic.png", prediction.get("kv_bandwidth_bps")), "KV traffic"),
    ]
    figures = "".join(_img(p, alt) for p, alt in plots if p is not None) or "<p>No completed requests to plot.</p>"
    body = _emulation_html(summary) + _summary_html(summary) + "<h2>Plots</h2>" + figures
    out = run_dir / "report.html"
    out.write_text(_page(f"pdtb run report: {summary.get('scenario') or run_dir.name}", body))
    return out


# ---------------------------------------------------------------- sweeps
SWEEP_METRICS: tuple[tuple[str, str], ...] = (
    ("ttft_ms.p50", "TTFT p50 (ms)"), ("ttft_ms.p99", "TTFT p99 (ms)"), ("tpot_ms.p50", "TPOT p50 (ms)"),
    ("e2e_ms.p50", "E2E p50 (ms)"), ("goodput.share", "goodput share"),
    ("throughput.output_tokens_per_s", "output tokens/s"), ("kv_transfer.exposed_ms.p50", "KV after prefill p50 (ms)"),
    ("counts.failed", "failed requests"),
)


def _get(d: dict[str, Any] | None, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def _numeric(value: Any) -> float | None:
    """A sweep value as a number for an x axis: plain numbers, ratios, bandwidths, durations."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    for parse in (parse_ratio, parse_bandwidth, parse_duration):
        try:
            return float(parse(value))
        except (ValueError, TypeError):
            continue
    return None


def is_sweep_dir(path: Path) -> bool:
    """A sweep's directory: no run.json of its own, sub-runs whose run.json has a ``sweep_point``."""
    if (path / "run.json").exists():
        return False
    for run_json in path.glob("*/run.json"):
        try:
            if "sweep_point" in json.loads(run_json.read_text()):
                return True
        except (OSError, json.JSONDecodeError):
            continue
    return False


def sweep_points(sweep_dir: Path) -> list[tuple[dict[str, Any], dict[str, Any], Path]]:
    """(point, summary, run dir) of every run under ``sweep_dir`` whose run.json has a ``sweep_point``."""
    found = []
    for run_json in sorted(sweep_dir.glob("*/run.json")):
        run = json.loads(run_json.read_text())
        if "sweep_point" in run:
            found.append((float(run.get("started_wall") or 0.0), run["sweep_point"], run_json.parent))
    found.sort(key=lambda x: x[0])  # the order the points ran in (the sweep's order)
    out = []
    for _, point, run_dir in found:
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else compute_summary(run_dir)
        out.append((point, summary, run_dir))
    return out


def plot_sweep_key(points: list[tuple[dict[str, Any], dict[str, Any], Path]], key: str, path: Path) -> Path:
    """Every headline metric against ``key``, one line per combination of the other keys."""
    others = sorted({k for p, _, _ in points for k in p if k != key})
    values = list(dict.fromkeys(p[key] for p, _, _ in points if key in p))
    nums = [_numeric(v) for v in values]
    numeric = all(n is not None for n in nums)
    order = sorted(range(len(values)), key=lambda i: nums[i]) if numeric else list(range(len(values)))
    xs_of = {repr(values[i]): (nums[i] if numeric else rank) for rank, i in enumerate(order)}
    groups: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for p, s, _ in points:
        label = ", ".join(f"{k}={p.get(k)}" for k in others) or key
        groups.setdefault(label, []).append((p, s))
    cols = 2
    rows = math.ceil(len(SWEEP_METRICS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(10, 2.6 * rows))
    for ax, (metric, label) in zip(axes.flat, SWEEP_METRICS):
        for glabel, members in groups.items():
            pts = sorted((xs_of[repr(p[key])], _get(s, metric)) for p, s in members if key in p)
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=glabel)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        if not numeric:
            ax.set_xticks(range(len(values)), [str(values[i]) for i in order])
    axes.flat[0].legend(fontsize=7)
    for ax in axes.flat[len(SWEEP_METRICS):]:
        ax.set_visible(False)
    fig.suptitle(f"metrics vs {key} (model time)")
    return _save(fig, path)


def write_sweep_report(sweep_dir: str | Path) -> Path:
    """Write ``report.html``, ``sweep.csv`` and one PNG per swept key into ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    points = sweep_points(sweep_dir)
    if not points:
        raise FileNotFoundError(f"{sweep_dir}: no runs with a sweep_point in */run.json")
    keys = list(dict.fromkeys(k for p, _, _ in points for k in p))
    header = keys + [label for _, label in SWEEP_METRICS] + ["fidelity", "run"]
    rows = [[p.get(k) for k in keys] + [_get(s, m) for m, _ in SWEEP_METRICS] + [s["fidelity"]["verdict"], d.name]
            for p, s, d in points]
    write_csv(sweep_dir / "sweep.csv", header, rows)
    figures = ""
    for i, key in enumerate(keys):
        png = plot_sweep_key(points, key, sweep_dir / f"sweep_{i}_{''.join(c if c.isalnum() else '_' for c in key)}.png")
        figures += f"<h2>vs <code>{html.escape(key)}</code></h2>" + _img(png, f"metrics vs {key}")
    first = points[0][1]["emulation"]
    body = (f"<p>{len(points)} points over {', '.join(f'<code>{html.escape(k)}</code>' for k in keys)}. "
            f"Model time; TDF {_fmt(first.get('tdf'))}, byte scale {_fmt(first.get('byte_scale'))} "
            f"(backend {_fmt(first.get('backend'))}).</p>" + _table(header, rows) + figures)
    out = sweep_dir / "report.html"
    out.write_text(_page(f"pdtb sweep report: {sweep_dir.name}", body))
    return out


# ---------------------------------------------------------------- comparison report
COMPARE_METRICS = (("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms"), ("e2e_ms", "E2E ms"),
                   ("tokens_per_s_per_user", "output tok/s per user"))
ATTRIBUTION = (("queue", "#bbbbbb"), ("prefill", "#1f77b4"), ("handoff_and_first_token", "#ff7f0e"),
               ("decode", "#2ca02c"))


def _cell_groups(cells: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Cells by (model, workload, sweep point): one figure each."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for c in cells:
        point = ", ".join(f"{k}={v}" for k, v in c["point"].items())
        groups.setdefault((c["model"], c["workload"], point), []).append(c)
    return groups


def plot_comparison_group(cells: list[dict[str, Any]], title: str, path: Path) -> Path:
    """p50 (solid) and p90 (dashed) of each headline metric against load, goodput and the
    speedup over the baseline, one colour per deployment; untrusted cells are drawn hollow."""
    deployments = list(dict.fromkeys(c["deployment"] for c in cells))
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for i, dep in enumerate(deployments):
        colour = f"C{i % 10}"
        mine = sorted((c for c in cells if c["deployment"] == dep and c["status"] == "ok"), key=lambda c: c["load"])
        for ax, (metric, label) in zip(axes.flat, COMPARE_METRICS):
            for pct, style in (("p50", "-"), ("p90", "--")):
                pts = [(c["load"], c[metric][pct], c["trusted"]) for c in mine if c[metric][pct] is not None]
                if pts:
                    ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], style, color=colour,
                            label=dep if pct == "p50" else None)
                    ax.scatter([x for x, _, t in pts], [y for _, y, t in pts], color=colour,
                               facecolors=[colour if t else "none" for _, _, t in pts], zorder=3)
            ax.set_title(label, fontsize=9)
        pts = [(c["load"], c["goodput_share"]) for c in mine if c["goodput_share"] is not None]
        if pts:
            axes.flat[4].plot([x for x, _ in pts], [y for _, y in pts], "-o", color=colour)
        pts = [(c["load"], c["speedup"]["e2e_ms"]) for c in mine if c.get("speedup") and c["speedup"]["e2e_ms"]]
        if pts:
            axes.flat[5].plot([x for x, _ in pts], [y for _, y in pts], "-o", color=colour)
    axes.flat[4].set_title("goodput share at the SLO", fontsize=9)
    axes.flat[5].set_title("E2E p50 speedup over the baseline", fontsize=9)
    axes.flat[5].axhline(1.0, color="#999", lw=0.8)
    for ax in axes.flat:
        ax.set_xlabel("load (requests per model s)", fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{title} (model time; hollow markers: fidelity not trustworthy)", fontsize=10)
    return _save(fig, path)


def plot_attribution(cells: list[dict[str, Any]], title: str, path: Path) -> Path | None:
    """Where the mean end-to-end time went, one stacked bar per deployment and load."""
    done = [c for c in cells if c["status"] == "ok" and c.get("attribution_ms")]
    if not done:
        return None
    done.sort(key=lambda c: (c["deployment"], c["load"]))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(done) + 2), 3.6))
    bottom = np.zeros(len(done))
    for phase, colour in ATTRIBUTION:
        vals = np.array([c["attribution_ms"][phase] for c in done])
        ax.bar(range(len(done)), vals, bottom=bottom, color=colour, label=phase.replace("_", " "))
        bottom += vals
    ax.set_xticks(range(len(done)), [f"{c['deployment']}\n@{c['load']:g}" for c in done], fontsize=7, rotation=30)
    ax.set_ylabel("mean model ms per request")
    ax.legend(fontsize=7)
    ax.set_title(f"{title}: where end-to-end time went", fontsize=10)
    return _save(fig, path)


def plot_breakeven(cells: list[dict[str, Any]], key: str, title: str, path: Path) -> Path | None:
    """The E2E speedup over the baseline against one swept fabric key (log x for rates), one
    line per deployment and load: where the line crosses 1 the network took the advantage back."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for c in cells:
        x = _numeric(c["point"].get(key)) if key in c["point"] else None
        sp = (c.get("speedup") or {}).get("e2e_ms")
        if x is not None and sp:
            lines.setdefault(f"{c['deployment']} @{c['load']:g}/s", []).append((x, sp))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for label, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([x for x, _ in pts], [y for _, y in pts], "-o", label=label)
    ax.axhline(1.0, color="#c00", lw=0.8, ls="--")
    if all(x > 0 for pts in lines.values() for x, _ in pts):
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel("E2E p50 speedup over the baseline")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"{title}: break-even", fontsize=10)
    return _save(fig, path)


def write_comparison_report(doc: dict[str, Any], out: Path) -> Path:
    """``comparison.html`` and its PNGs: the table of every cell (untrusted and failed cells
    marked), then per model, workload and sweep point the plots against load."""
    cells = doc["cells"]
    header = ["deployment", "model", "workload", "load", "point", "status", "fidelity", "TTFT p50", "TPOT p50",
              "E2E p50", "tok/s/user p50", "goodput", "speedup E2E", "baseline", "note"]
    rows = []
    for c in cells:
        ok = c["status"] == "ok"
        rows.append([c["deployment"], c["model"], c["workload"], c["load"],
                     ", ".join(f"{k}={v}" for k, v in c["point"].items()),
                     c["status"], c.get("verdict") if ok else None,
                     *((c[m]["p50"] for m in ("ttft_ms", "tpot_ms", "e2e_ms", "tokens_per_s_per_user")) if ok
                       else [None] * 4),
                     c.get("goodput_share"), (c.get("speedup") or {}).get("e2e_ms"), c.get("baseline"),
                     c["reason"] or ("" if c["trusted"] or not ok else "not trusted: left out of speedups")])
    untrusted = sum(1 for c in cells if c["status"] == "ok" and not c["trusted"])
    notes = ""
    if untrusted:
        notes += (f"<p class='warn'>{untrusted} cell(s) did not get a trustworthy fidelity verdict: they are "
                  f"shown, marked, and left out of every speedup.</p>")
    skipped = sum(1 for c in cells if c["status"] != "ok")
    if skipped:
        notes += f"<p class='fail'>{skipped} cell(s) not run or failed: the note column says why.</p>"
    figures = ""
    keys = list(dict.fromkeys(k for c in cells for k in c["point"]))
    by_mw: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in cells:
        by_mw.setdefault((c["model"], c["workload"]), []).append(c)
    for j, ((model, workload), group) in enumerate(by_mw.items()):
        for k, key in enumerate(keys):
            png = plot_breakeven(group, key, f"{model}, {workload}", out / f"breakeven_{j}_{k}.png")
            if png is not None:
                figures += f"<h2>{html.escape(model)}, {html.escape(workload)}: speedup vs <code>{html.escape(key)}</code></h2>"
                figures += _img(png, f"break-even {model} {workload} {key}")
    for i, ((model, workload, point), group) in enumerate(_cell_groups(cells).items()):
        title = f"{model}, {workload}" + (f", {point}" if point else "")
        figures += f"<h2>{html.escape(title)}</h2>"
        figures += _img(plot_comparison_group(group, title, out / f"compare_{i}.png"), title)
        bars = plot_attribution(group, title, out / f"compare_{i}_attribution.png")
        if bars is not None:
            figures += _img(bars, f"{title}: attribution")
    body = (f"<p>{html.escape(doc.get('description') or '')}</p><p>{len(cells)} cells on the "
            f"<code>{html.escape(doc['backend'])}</code> backend, {doc['requests_per_cell']} requests each"
            f"{' (--quick subset)' if doc.get('quick') else ''}; baseline: the fastest trusted of "
            f"{', '.join(html.escape(b) for b in doc['baseline'])} per cell; all times model time.</p>"
            + notes + _table(header, rows) + figures)
    path = out / "comparison.html"
    path.write_text(_page(f"pdtb comparison: {doc['name']}", body))
    return path
