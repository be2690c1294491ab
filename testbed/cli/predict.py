"""``pdtb predict SCENARIO``: the analytic timeline of one uncontended request."""
from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from testbed.config.scenario import expand_sweep, load_scenario
from testbed.predict import Prediction, predict
from core.units import format_bandwidth, format_bytes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="analytic TTFT/TPOT/E2E of one uncontended request of a scenario")
    p.add_argument("scenario", metavar="SCENARIO", help="scenario file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a scenario setting (repeatable), e.g. --set kv_transfer.mode=layerwise")
    p.add_argument("--json", action="store_true", help="print JSON (one object per sweep point)")
    p.set_defaults(func=run)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.4g} ms"


def prediction_table(pred: Prediction, title: str) -> Table:
    t = Table(title=title, caption="model time, no queueing")
    t.add_column("phase")
    t.add_column("time", justify="right")
    t.add_column("detail")
    t.add_row("request path", _ms(pred.request_path_s), "client -> router -> node (frontend)")
    t.add_row("prefill", _ms(pred.prefill_s),
              f"{pred.prompt_tokens} tokens on {pred.prefill_node} ({pred.prefill_hardware}), {pred.prefill_bound}-bound")
    if pred.mode != "colocated":
        bw = "unshaped" if pred.kv_bandwidth_bps is None else format_bandwidth(pred.kv_bandwidth_bps)
        t.add_row("KV handoff (exposed)", _ms(pred.kv_exposed_s),
                  f"{pred.mode}: {format_bytes(pred.kv_model_bytes)} over {len(pred.kv_links)} link(s), bottleneck "
                  f"{bw}, latency {_ms(pred.kv_latency_s)}, setup {_ms(pred.kv_setup_s)}, "
                  f"serialization {_ms(pred.kv_serialization_s)}")
    t.add_row("first decode step", _ms(pred.first_decode_s),
              f"on {pred.decode_node} ({pred.decode_hardware}), {pred.decode_bound}-bound")
    t.add_row("token path", _ms(pred.token_path_s), "node -> router -> client (frontend)")
    t.add_section()
    t.add_row("TTFT", _ms(pred.ttft_s), "")
    t.add_row("TPOT", _ms(pred.tpot_s), f"mean decode step over {pred.output_tokens} output tokens")
    t.add_row("E2E", _ms(pred.e2e_s), "TTFT + (output tokens - 1) x TPOT")
    for note in pred.notes:
        t.add_row("note", "", note)
    return t


def run(args: argparse.Namespace) -> int:
    sc = load_scenario(args.scenario, args.overrides)
    results = [(point, predict(cfg)) for point, cfg in expand_sweep(sc)]
    if args.json:
        out = [{"point": point, **pred.to_dict()} for point, pred in results]
        print(json.dumps(out[0] if not sc.sweep else out, indent=2))
        return 0
    console = Console()
    for point, pred in results:
        label = ", ".join(f"{k}={v}" for k, v in point.items())
        console.print(prediction_table(pred, f"{sc.name}" + (f" [{label}]" if label else "")))
    return 0
