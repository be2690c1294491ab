"""Live progress of a run (rich) and the summary table printed at its end.

The orchestrator owns the loop; :class:`RunProgress` only shows counts. It can count for
itself by tailing the client's timeline file (``poll_timeline``), so the orchestrator
need not know event names.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class RunProgress:
    """A progress bar of finished requests (completed + failed) out of ``total``."""

    def __init__(self, total: int, description: str = "requests", console: Console | None = None):
        self.total = total
        self.completed = 0
        self.failed = 0
        self.model_s: float | None = None
        self._offsets: dict[Path, int] = {}
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("ok {task.fields[ok]}  [red]failed {task.fields[failed]}[/]  model t={task.fields[t]}"),
            TimeElapsedColumn(), console=console or Console(stderr=True), transient=False)
        self._task = self._progress.add_task(description, total=total, ok=0, failed=0, t="-")

    def __enter__(self) -> "RunProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, completed: int, failed: int, model_s: float | None = None) -> None:
        self.completed, self.failed = completed, failed
        if model_s is not None:
            self.model_s = model_s
        self._progress.update(self._task, completed=completed + failed, ok=completed, failed=failed,
                              t="-" if self.model_s is None else f"{self.model_s:.3f}s")

    def poll_timeline(self, path: str | Path) -> None:
        """Count ``client_done`` / ``client_failed`` lines appended to a client timeline since the last poll."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                f.seek(self._offsets.get(path, 0))
                data = f.read()
        except FileNotFoundError:
            return
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self._offsets[path] = self._offsets.get(path, 0) + len(complete)
        completed, failed, t = self.completed, self.failed, self.model_s
        for line in complete.splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue
            if e.get("event") == "client_done":
                completed += 1
            elif e.get("event") == "client_failed":
                failed += 1
            t = e.get("t_model", t)
        self.update(completed, failed, t)

    @property
    def finished(self) -> bool:
        return self.completed + self.failed >= self.total


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _num(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summary_table(summary: dict[str, Any]) -> Table:
    """The run's headline numbers (model time) as a rich table."""
    c = summary["counts"]
    title = f"{summary.get('scenario') or 'run'}: {c['completed']}/{c['total']} completed"
    if c["failed"]:
        title += ", failed: " + ", ".join(f"{_short(k)} {v}" for k, v in c["failed_by_reason"].items())
    table = Table(title=title, caption="model time", show_lines=False)
    table.add_column("metric")
    for col in ("mean", "p50", "p90", "p99"):
        table.add_column(col, justify="right")
    for key, label in (("ttft_ms", "TTFT ms"), ("tpot_ms", "TPOT ms"), ("itl_ms", "ITL ms"), ("e2e_ms", "E2E ms")):
        s = summary[key]
        table.add_row(label, *(_ms(s[k]) for k in ("mean", "p50", "p90", "p99")))
    kv = summary["kv_transfer"]
    if kv["count"] or kv["failed"]:
        t = kv["time_ms"]
        table.add_row(f"KV handoff ms ({kv['count']} ok, {kv['failed']} failed)", _ms(t["mean"]), _ms(t["p50"]),
                      _ms(t["p90"]), _ms(t["p99"]))
        x = kv["exposed_ms"]
        table.add_row("KV after prefill ms", _ms(x["mean"]), _ms(x["p50"]), _ms(x["p90"]), _ms(x["p99"]))
        bp = kv.get("backpressure") or {}
        for count, key, label in (("decode_refused", "decode_wait_ms", "waited for decode KV room"),
                                  ("prefill_held", "prefill_hold_ms", "held for prefill KV room")):
            if bp.get(count):
                w = bp[key]
                table.add_row(f"{label} ms ({bp[count]} req)", _ms(w["mean"]), _ms(w["p50"]), _ms(w["p90"]),
                              _ms(w["p99"]))
    tp = summary["throughput"]
    table.add_section()
    table.add_row("output tokens/s", _num(tp["output_tokens_per_s"], "{:.1f}"), "", "", "")
    table.add_row("requests/s", _num(tp["requests_per_s"]), "", "", "")
    g = summary.get("goodput")
    if g:
        slo = summary["slo"]
        table.add_row(f"goodput (TTFT<={slo['ttft_ms']:g}ms, TPOT<={slo['tpot_ms']:g}ms)",
                      _num(None if g["share"] is None else 100 * g["share"], "{:.1f}%"),
                      _num(g["rate_per_s"], "{:.2f}/s"), "", "")
    if kv["count"]:
        table.add_row("KV Gbit/s (per transfer, p50)", _num(kv["achieved_gbps"]["p50"], "{:.1f}"), "", "", "")
    em, fid = summary["emulation"], summary["fidelity"]
    table.add_section()
    table.add_row("emulation", f"{em.get('backend')}/{em.get('impairment_backend')}",
                  f"TDF {em.get('tdf')}", f"S {em.get('byte_scale')}", "")
    table.add_row("fidelity", str(fid["verdict"]), "", "", "")
    check = summary.get("prediction_check")
    if check and check["requests"]:
        m, p, ratio = check["measured"], check["predicted"], check["ratio"]
        table.add_section()
        for key, label in (("ttft", "TTFT"), ("tpot", "TPOT")):
            table.add_row(f"{label} ms of requests alone (n={check['requests']}): measured p50 | predicted | ratio",
                          _ms(m[f"{key}_ms_p50"]), _ms(p[f"{key}_ms"]), _num(ratio[key]), "")
    return table


def print_summary_table(summary: dict[str, Any], console: Console | None = None) -> None:
    (console or Console()).print(summary_table(summary))
