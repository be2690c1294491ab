"""The open-loop load generator against the router and fake nodes (see test_router.py)."""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from nodes.client import read_workload, serve
from nodes.config import ClientSettings, Endpoint, NodeConfig
from nodes.timeline import read_timeline
from test_router import MODEL, REPO, Cluster, free_port

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py


@pytest.fixture
async def cluster(tmp_path):
    c = Cluster(tmp_path / "router")
    yield c
    await c.close()


def write_workload(path: Path, rows: list[tuple[float, int, int]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, (arrival, prompt, output) in enumerate(rows):
            f.write(json.dumps({"index": i, "arrival_s": arrival, "prompt_tokens": prompt, "output_tokens": output}) + "\n")
    return str(path)


def client_config(tmp_path: Path, url: str, rows, *, tdf: float = 1.0, stream: bool = True,
                  timeout_s: float = 30.0, t0_delay: float = 0.3) -> NodeConfig:
    host, port = url.removeprefix("http://").split(":")
    settings = ClientSettings(workload_file=write_workload(tmp_path / "workload.jsonl", rows),
                              router=Endpoint(host=host, port=int(port)), stream=stream, request_timeout_s=timeout_s)
    return NodeConfig(run_id="t", name="client", role="client", model=MODEL, tdf=tdf, byte_scale=1.0,
                      t0_wall=time.time() + t0_delay, run_dir=str(tmp_path), client=settings)


def by_request(tmp_path: Path) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for e in read_timeline(tmp_path / "timeline" / "client.jsonl"):
        if e["request_id"]:
            out.setdefault(e["request_id"], {})[e["event"]] = e
    return out


async def test_open_loop_replay_records_token_times(cluster, tmp_path):
    url = await cluster.start(itl_s=0.01)
    # request 0 streams for ~1.5 s; the others must still be sent on schedule (open loop)
    rows = [(0.0, 100, 150), (0.1, 7, 5), (0.2, 3000, 10), (0.2, 1, 1), (0.45, 50, 20)]
    config = client_config(tmp_path, url, rows, tdf=2.0)
    t = time.monotonic()
    await serve(config)
    assert time.monotonic() - t < 15
    reqs = by_request(tmp_path)
    assert sorted(reqs) == [f"r{i:06d}" for i in range(5)]
    for i, (arrival, prompt, output) in enumerate(rows):
        ev = reqs[f"r{i:06d}"]
        assert set(ev) == {"client_sent", "client_first_token", "client_done"}, ev
        sent = ev["client_sent"]
        assert (sent["prompt_tokens"], sent["output_tokens"], sent["scheduled_s"]) == (prompt, output, arrival)
        assert arrival <= sent["t_model"] < arrival + 0.25  # model seconds, with TDF 2
        done = ev["client_done"]
        times = done["token_times"]
        assert done["output_tokens"] == output == len(times)
        assert times == sorted(times) and times[0] == pytest.approx(ev["client_first_token"]["t_model"], abs=0.05)
        assert sent["t_model"] < times[0] <= done["t_model"]
        if output > 20:  # the fake decode emits every 10 ms wall = 5 ms model
            gaps = [b - a for a, b in zip(times, times[1:])]
            assert 0.003 < sum(gaps) / len(gaps) < 0.02
    # the router saw the extension field
    assert sorted(b["prompt_tokens"] for b in cluster.prefills[0].requests) == sorted(r[1] for r in rows)
    events = [e["event"] for e in read_timeline(tmp_path / "timeline" / "client.jsonl")]
    assert events[0] == "node_start" and events[-1] == "node_stop"


async def test_failures_are_recorded_with_reasons(cluster, tmp_path):
    url = await cluster.start()
    cluster.prefills[0].fail = "kv transfer reset"
    config = client_config(tmp_path, url, [(0.0, 10, 5), (0.0, 130_000, 5_000)])
    await serve(config)
    reqs = by_request(tmp_path)
    assert "kv transfer reset" in reqs["r000000"]["client_failed"]["reason"]
    # status and OpenAI error code lead the reason: the summary counts failures by that kind
    assert reqs["r000001"]["client_failed"]["reason"].startswith(
        "http_400 context_length_exceeded: This model's maximum context length is 131072 tokens")
    assert not any("client_done" in r for r in reqs.values())


async def test_timeout_and_unreachable_router(cluster, tmp_path):
    url = await cluster.start(itl_s=0.5)
    config = client_config(tmp_path, url, [(0.0, 10, 50)], timeout_s=0.5)
    t = time.monotonic()
    await serve(config)
    assert time.monotonic() - t < 5
    assert by_request(tmp_path)["r000000"]["client_failed"]["reason"].startswith("timeout")
    dead = client_config(tmp_path / "dead", f"http://127.0.0.1:{free_port()}", [(0.0, 10, 5)])
    await serve(dead)
    assert by_request(tmp_path / "dead")["r000000"]["client_failed"]["reason"].startswith("connection")


async def test_usage_and_count_checks(tmp_path):
    """A router that lies about usage, or drops a token, fails the request at the client."""
    async def lying(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        rid = request.headers["x-request-id"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = body["max_tokens"] - (1 if rid == "r000001" else 0)
        for i in range(n):
            await resp.write(f'data: {{"choices": [{{"index": 0, "text": " w{i}"}}]}}\n\n'.encode())
        usage = {"prompt_tokens": body["pdtb_prompt_tokens"] + (1 if rid == "r000000" else 0),
                 "completion_tokens": n, "total_tokens": body["pdtb_prompt_tokens"] + n}
        await resp.write(f'data: {json.dumps({"choices": [], "usage": usage})}\n\ndata: [DONE]\n\n'.encode())
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", lying)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        await serve(client_config(tmp_path, url, [(0.0, 10, 5), (0.0, 10, 5), (0.0, 10, 5)]))
    finally:
        await runner.cleanup()
    reqs = by_request(tmp_path)
    assert reqs["r000000"]["client_failed"]["reason"].startswith("usage_mismatch")
    assert reqs["r000001"]["client_failed"]["reason"].startswith("token_count")
    assert reqs["r000002"]["client_done"]["output_tokens"] == 5


async def test_non_streaming_mode(cluster, tmp_path):
    url = await cluster.start()
    await serve(client_config(tmp_path, url, [(0.0, 10, 8)], stream=False))
    done = by_request(tmp_path)["r000000"]["client_done"]
    assert done["output_tokens"] == 8 and len(set(done["token_times"])) == 1


def test_read_workload_errors(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text('{"index": 1, "arrival_s": 0.5, "prompt_tokens": 3, "output_tokens": 2}\n\n'
                    '{"index": 0, "arrival_s": 0.1, "prompt_tokens": 3, "output_tokens": 2, "extra": 1}\n')
    assert [i.index for i in read_workload(path)] == [0, 1]
    for line, message in [("{", "not JSON"), ("[1]", "expected an object"),
                          ('{"index": 0, "arrival_s": -1, "prompt_tokens": 1, "output_tokens": 1}', "arrival_s"),
                          ('{"index": 0, "arrival_s": 0, "prompt_tokens": 0, "output_tokens": 1}', "prompt_tokens"),
                          ('{"index": 0, "arrival_s": 0, "prompt_tokens": 1, "output_tokens": true}', "output_tokens")]:
        path.write_text(line + "\n")
        with pytest.raises(ValueError, match=f"w.jsonl:1: .*{message}"):
            read_workload(path)
    path.write_text('{"index": 0, "arrival_s": 0, "prompt_tokens": 1, "output_tokens": 1}\n' * 2)
    with pytest.raises(ValueError, match="w.jsonl:2: duplicate index 0"):
        read_workload(path)


async def test_entry_point_exits_when_all_accounted(cluster, tmp_path):
    url = await cluster.start()
    config = client_config(tmp_path, url, [(0.0, 5, 3), (0.1, 5, 3)], t0_delay=1.0)
    path = tmp_path / "client.json"
    config.save(path)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "nodes", "--config", str(path), cwd=REPO,
                                                env={**os.environ, "PYTHONPATH": str(REPO)},
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert "2 completed, 0 failed" in err.decode()
    reqs = by_request(tmp_path)
    assert all("client_done" in reqs[f"r{i:06d}"] for i in range(2))
