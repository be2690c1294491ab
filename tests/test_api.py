"""The scripting API (``from testbed import Testbed``) and ``pdtb up`` on the local backend."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from run_helpers import PREFIX, REPO, no_leftovers, processes_of, write_scenario

from core.config import ConfigError

pytestmark = pytest.mark.slow


def _get(url: str) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as resp:
        return json.loads(resp.read())


def _complete(router_url: str, max_tokens: int = 8) -> dict:
    body = json.dumps({"model": "llama-3.1-8b", "prompt": "hello there", "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(f"{router_url}/v1/completions", data=body,
                                 headers={"content-type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_testbed_lifecycle_commands_and_results(tmp_path: Path) -> None:
    from testbed import Testbed

    scenario = write_scenario(tmp_path, requests=6, rate=8.0, output=8)
    tb = Testbed(scenario, overrides=["workload.requests=5"], backend="local", out=tmp_path / "run", prefix=PREFIX)
    with pytest.raises(RuntimeError, match="not started"):
        tb.router_url
    with tb:
        assert _get(f"{tb.router_url}/health")["ok"] is True
        assert tb.nodes() == {"p1": "prefill", "d1": "decode", "router": "router", "client": "client"}
        assert tb.tdf == 1.0 and 0 < tb.byte_scale <= 1
        with pytest.raises(ConfigError, match="no emulated links"):
            tb.set_link("efa", bandwidth_bps=1e9)
        with pytest.raises(ConfigError, match="not a node"):
            tb.node_command("nosuch", "drain")
        tb.node_command("d1", "slowdown", factor=2.0)
        tb.node_command("d1", "resume")
        tb.run_workload(wait=True)
        live = tb.results()  # a snapshot while the system is still up
        assert live["counts"]["completed"] == 5
        with pytest.raises(RuntimeError, match="already started"):
            tb.run_workload()
    summary = tb.results()
    assert summary["counts"] == {"total": 5, "completed": 5, "failed": 0, "failed_by_reason": {}}
    assert tb.stop() == summary, "stop() is idempotent"
    rows = tb.requests()
    assert [r["request_id"] for r in rows] == [f"r{i:06d}" for i in range(5)]
    assert all(r["completed"] and r["output_tokens"] == 8 and 0 < r["ttft_ms"] <= r["e2e_ms"] for r in rows), rows
    assert all(r["prefill_node"] == "p1" and r["decode_node"] == "d1" and r["kv_bytes"] > 0 for r in rows), rows
    with pytest.raises(RuntimeError, match="stopped"):
        tb.set_link("efa", bandwidth_bps=1e9)
    d1 = [json.loads(line) for line in (tb.run_dir / "timeline" / "d1.jsonl").read_text().splitlines()]
    controls = [(e["cmd"], e.get("factor")) for e in d1 if e["event"] == "control"]
    assert controls[:2] == [("slowdown", 2.0), ("resume", None)], controls
    run = json.loads((tb.run_dir / "run.json").read_text())
    assert run["finished_wall"] and (tb.run_dir / "summary.json").exists() and (tb.run_dir / "report.html").exists()
    no_leftovers(tb.run_dir)


def test_exception_inside_the_with_block_tears_down(tmp_path: Path) -> None:
    from testbed import Testbed

    scenario = write_scenario(tmp_path)
    with pytest.raises(ZeroDivisionError):
        with Testbed(scenario, backend="local", out=tmp_path / "run", prefix=PREFIX) as tb:
            assert processes_of(tb.run_dir)
            1 / 0
    no_leftovers(tb.run_dir)


def test_sweep_scenario_is_refused_by_testbed(tmp_path: Path) -> None:
    from testbed import Testbed

    scenario = write_scenario(tmp_path, extra="sweep: {workload.requests: [2, 3]}")
    with pytest.raises(ConfigError, match="one configuration"):
        Testbed(scenario, backend="local", prefix=PREFIX)


def test_pdtb_up_serves_until_interrupted(tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "up", str(scenario), "--backend", "local",
                             "--out", str(out), "--prefix", PREFIX], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("router: http://127.0.0."), (line, proc.poll())
        url = line.split()[1]
        reply = _complete(url, max_tokens=8)
        assert reply["usage"]["completion_tokens"] == 8
        # the openai SDK, unchanged, streams through the real daemons with usage in the last chunk
        import openai

        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model="llama-3.1-8b", messages=[{"role": "user", "content": "count to five"}], max_tokens=12,
            stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(texts) == 12
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == 12 and usage.prompt_tokens > 0
        assert usage.total_tokens == usage.prompt_tokens + 12
        time.sleep(0.5)
        assert proc.poll() is None, "up stays up"
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    assert not (out / "workload.jsonl").exists(), "up replays no workload: requests come from the user"
    router = [json.loads(x) for x in (out / "timeline" / "router.jsonl").read_text().splitlines()]
    assert any(e["event"] == "done" for e in router)
    no_leftovers(out)


def test_example_script_runs_on_the_local_backend(tmp_path: Path) -> None:
    """The shipped scripting example works as documented (local backend: no link changes)."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "scenarios" / "example_script.py"), "--backend", "local",
                           "--prefix", PREFIX, "--out", str(out)], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "30/30 completed" in proc.stdout, proc.stdout
    control = [json.loads(x) for x in (out / "timeline" / "decode0.jsonl").read_text().splitlines()
               if '"control"' in x]
    assert [(e["cmd"], e["factor"]) for e in control] == [("slowdown", 2.0)]
    no_leftovers(out)
