"""Reports (HTML + PNG) for a run and a sweep, the report CLI, and the progress helper."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from testbed.cli import main
from testbed.metrics import compute_summary
from testbed.progress import RunProgress, print_summary_table
from testbed.report import write_report, write_sweep_report

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py


def ev(t: float, node: str, event: str, rid: str | None = None, **fields) -> dict:
    return {"t_wall": 1000.0 + t, "t_model": t, "node": node, "event": event, "request_id": rid, **fields}


def make_run(run_dir: Path, n: int = 6, kv_s: float = 0.01, point: dict | None = None, client: bool = True) -> Path:
    """A hand-made run: n requests through router, prefill0, decode0; the last one fails.

    ``client=False``: a ``pdtb up`` run, requests from a user: no client timeline, no workload."""
    tl: dict[str, list[dict]] = {"client0": [], "router": [], "prefill0": [], "decode0": []}
    tl["prefill0"].append(ev(0, "prefill0", "node_start", role="prefill", hardware="trn2"))
    tl["decode0"].append(ev(0, "decode0", "node_start", role="decode", hardware="cs3"))
    for i in range(n):
        rid, t = f"r{i:06d}", 0.2 * i
        tl["client0"].append(ev(t, "client0", "client_sent", rid, prompt_tokens=1000, output_tokens=4, scheduled_s=t))
        tl["router"] += [ev(t, "router", "arrival", rid, prompt_tokens=1000, max_tokens=4, stream=True),
                         ev(t, "router", "routed", rid, prefill="prefill0", decode="decode0")]
        if i == n - 1:
            tl["router"].append(ev(t + 0.05, "router", "failed", rid, reason="kv_timeout"))
            tl["client0"].append(ev(t + 0.05, "client0", "client_failed", rid, reason="http 504"))
            continue
        p0, p1 = t + 0.01, t + 0.06
        tl["prefill0"] += [ev(t, "prefill0", "prefill_queued", rid, prompt_tokens=1000),
                           ev(p0, "prefill0", "prefill_start", rid, batch_size=1, batch_tokens=1000),
                           ev(p1, "prefill0", "prefill_end", rid, compute_s=0.05),
                           ev(p1, "prefill0", "kv_start", rid, decode="decode0", mode="whole", bytes=1000,
                              model_bytes=128_000_000),
                           ev(p1 + kv_s, "prefill0", "kv_end", rid, bytes=1000, ok=True)]
        d0 = p1 + kv_s
        tokens = [d0 + 0.001 * (k + 1) for k in range(4)]
        tl["decode0"] += [ev(d0, "decode0", "decode_queued", rid, kv_model_bytes=128_000_000),
                          ev(d0, "decode0", "decode_admitted", rid, batch_size=1),
                          ev(tokens[0], "decode0", "first_token", rid),
                          ev(tokens[-1], "decode0", "decode_done", rid, output_tokens=4, token_times=tokens)]
        tl["decode0"] += [ev(tk, "decode0", "step_timing", kind="decode", planned_s=0.001, late_s=0.00001,
                             batch_size=1) for tk in tokens]
        tl["router"].append(ev(tokens[-1] + 0.0002, "router", "done", rid, prompt_tokens=1000, output_tokens=4))
        tl["client0"] += [ev(tokens[0] + 0.0003, "client0", "client_first_token", rid),
                          ev(tokens[-1] + 0.0003, "client0", "client_done", rid, output_tokens=4,
                             token_times=[tk + 0.0003 for tk in tokens])]
    (run_dir / "timeline").mkdir(parents=True)
    if not client:
        del tl["client0"]
    for node, events in tl.items():
        (run_dir / "timeline" / f"{node}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    run = {"run_id": run_dir.name, "scenario": "hand", "tdf": 5.0, "byte_scale": 0.25, "backend": "local",
           "impairment_backend": "fallback", "t0_wall": 1000.0, "slo": {"ttft_ms": 100.0, "tpot_ms": 2.0},
           "prediction": {"ttft_s": 0.07, "tpot_s": 0.001, "e2e_s": 0.073, "prompt_tokens": 1000,
                          "output_tokens": 4, "kv_bandwidth_bps": 1.2e12}}
    if point is not None:
        run["sweep_point"] = point
    (run_dir / "run.json").write_text(json.dumps(run))
    return run_dir


def test_run_report_is_self_contained(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run1")
    out = write_report(run_dir)
    assert out == run_dir / "report.html"
    text = out.read_text()
    for png in ("ttft_cdf.png", "itl_cdf.png", "timeline.png", "throughput.png", "kv_traffic.png"):
        data = (run_dir / png).read_bytes()
        assert data.startswith(b"\x89PNG")
    assert len(re.findall(r'src="data:image/png;base64,', text)) == 5
    assert not re.search(r'(src|href)="(https?:|/|\.\./)', text)  # nothing outside the file
    assert "kv_timeout" not in text and "http 504" in text  # the client's reason is the one counted
    assert "TDF" in text and "0.25" in text and "Byte scale below 1" in text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["counts"]["completed"] == 5 and summary["counts"]["failed"] == 1
    assert summary["prediction_check"]["requests"] == 6 - 1


def test_report_of_a_run_without_load_generator(tmp_path: Path) -> None:
    """``pdtb up``: requests from a user are timed by the router, not counted as never sent."""
    run_dir = make_run(tmp_path / "up", client=False)
    text = write_report(run_dir).read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["counts"] == {"total": 6, "completed": 5, "failed": 1, "failed_by_reason": {"kv_timeout": 1}}
    assert summary["timed_by"] == {"client": 0, "router": 6}
    # arrival t, prefill 10+50 ms, KV 10 ms, first token 1 ms later at the decode node
    assert summary["ttft_ms"]["p50"] == pytest.approx(71.0)
    assert summary["e2e_ms"]["p50"] == pytest.approx(74.2)
    assert (run_dir / "throughput.png").read_bytes().startswith(b"\x89PNG")
    assert text.count('src="data:image/png;base64,') == 5
    assert "had no load-generator events" in text


def test_sweep_report(tmp_path: Path) -> None:
    for i, (loss, mode) in enumerate([(0, "whole"), ("1%", "whole"), (0, "layerwise"), ("1%", "layerwise")]):
        make_run(tmp_path / f"p{i}", kv_s=0.01 * (i + 1), point={"fabric.efa.loss": loss, "kv_transfer.mode": mode})
        compute_summary(tmp_path / f"p{i}")
    out = write_sweep_report(tmp_path)
    text = out.read_text()
    assert text.count('src="data:image/png;base64,') == 2
    assert (tmp_path / "sweep_0_fabric_efa_loss.png").read_bytes().startswith(b"\x89PNG")
    rows = (tmp_path / "sweep.csv").read_text().splitlines()
    assert rows[0].startswith("fabric.efa.loss,kv_transfer.mode,TTFT p50 (ms)")
    assert len(rows) == 5 and rows[2].startswith("1%,whole,")
    ttft = [float(r.split(",")[2]) for r in rows[1:]]
    assert ttft == sorted(ttft)  # slower handoffs, later first tokens


def test_report_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = make_run(tmp_path / "sweep" / "a", point={"emulation.tdf": 5})
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.html").exists()
    (tmp_path / "sweep" / "timeline").mkdir()  # the orchestrator leaves empty run folders in a sweep's root
    assert main(["report", str(tmp_path / "sweep")]) == 0
    assert "pdtb sweep report" in (tmp_path / "sweep" / "report.html").read_text()
    assert (tmp_path / "sweep" / "sweep.csv").exists()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_progress_counts_client_timeline(tmp_path: Path) -> None:
    path = tmp_path / "client0.jsonl"
    console = Console(file=open(tmp_path / "out.txt", "w"), width=120)
    with RunProgress(3, console=console) as bar:
        bar.poll_timeline(path)  # not there yet
        with open(path, "w") as f:
            f.write(json.dumps(ev(0.1, "client0", "client_done", "r0")) + "\n")
            f.write(json.dumps(ev(0.2, "client0", "client_failed", "r1", reason="x")) + "\n")
            f.write('{"event": "client_done", "t_mod')  # a line still being written
        bar.poll_timeline(path)
        assert (bar.completed, bar.failed, bar.finished) == (1, 1, False)
        with open(path, "a") as f:
            f.write('el": 0.3}\n')
        bar.poll_timeline(path)
        assert (bar.completed, bar.failed, bar.finished) == (2, 1, True)
        assert bar.model_s == 0.3


def test_summary_table_prints(tmp_path: Path) -> None:
    summary = compute_summary(make_run(tmp_path / "r"))
    console = Console(record=True, width=140)
    print_summary_table(summary, console)
    text = console.export_text()
    assert "TTFT ms" in text and "goodput" in text and "5/6 completed" in text and "http 504 1" in text
    # measured vs predicted of the requests alone: TTFT 71.3 ms vs 70, TPOT 1 ms vs 1
    assert re.search(r"TTFT ms of requests alone \(n=5\).*71\.3.*70\.0.*1\.02", text)
    assert re.search(r"TPOT ms of requests alone \(n=5\).*1\.000.*1\.000.*1\.00", text)


def test_cli_start_does_not_load_plotting() -> None:
    """Every ``pdtb`` start (even --version) loads all CLI modules: none may pull in matplotlib."""
    import subprocess
    import sys

    code = ("import sys\nfrom testbed.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in ('matplotlib', 'testbed.report', 'testbed.metrics') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"
