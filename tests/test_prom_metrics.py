"""GET /metrics on the router and on a compute node: Prometheus text format, values that match
what happened (the metrics are fed from the same events as the timeline)."""
from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
import pytest

from nodes.decode import DecodeNode

from daemon_helpers import events, running, wire_bytes
from test_decode import config as decode_config, generate, generate_with_kv
from test_router import MODEL, cluster, post  # noqa: F401  (cluster is a fixture)

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py


async def scrape(url: str) -> dict[str, float]:
    """sample name{labels} -> value."""
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
            key = sample.name + (f"{{{labels}}}" if labels else "")
            if "le" not in sample.labels:
                out[key] = sample.value
    return out


async def test_router_metrics_count_requests_tokens_and_latencies(cluster):
    url = await cluster.start(itl_s=0.002)
    for _ in range(3):
        status, _, _ = await post(url, "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 4})
        assert status == 200
    status, _, _ = await post(url, "/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404
    m = await scrape(url)
    assert m["pdtb:requests_total{outcome=completed}"] == 3 and m["pdtb:requests_total{outcome=rejected}"] == 1
    assert m["pdtb:generation_tokens_total"] == 12
    assert m["pdtb:time_to_first_token_seconds_count"] == 3 and m["pdtb:e2e_request_latency_seconds_count"] == 3
    assert m["pdtb:inter_token_latency_seconds_count"] == 3 * 3  # 4 tokens: 3 gaps each
    assert m["pdtb:e2e_request_latency_seconds_sum"] >= m["pdtb:time_to_first_token_seconds_sum"] > 0
    assert m["pdtb:num_requests_running"] == 0


async def test_decode_node_metrics_follow_its_timeline(tmp_path):
    cfg = decode_config(tmp_path)
    async with running(DecodeNode, cfg) as (node, session):
        await generate_with_kv(session, cfg, "r1", 100, 3)
        m = await scrape(cfg.http.url)  # /metrics needs no internal token: operators scrape it
    steps = events(cfg, "step_timing")
    assert m["pdtb:step_lateness_seconds_count"] == len(steps) == 3
    assert m["pdtb:kv_transfer_bytes_total{direction=received}"] == wire_bytes(cfg, 100)
    assert m["pdtb:kv_cache_used_bytes"] == 0 and m["pdtb:kv_cache_free_bytes"] > 0
    assert m["pdtb:num_requests_waiting"] == 0


async def test_dropped_datagrams_are_counted_by_reason(tmp_path):
    """Hostile SRD datagrams at the decode node's KV port: the drop counter follows its
    kv_dropped records (running totals per reason) without counting a total twice."""
    import asyncio
    import socket

    cfg = decode_config(tmp_path)
    async with running(DecodeNode, cfg) as (node, session):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"PDSR\x01\x05" + bytes(60), (cfg.kv.host, cfg.kv.port))  # DATA of no session
        s.close()
        for _ in range(250):  # a loopback datagram is read within milliseconds; 5 s on a loaded machine
            m = await scrape(cfg.http.url)
            if m.get("pdtb:kv_datagrams_dropped_total{reason=unknown_session}"):
                break
            await asyncio.sleep(0.02)
    assert m["pdtb:kv_datagrams_dropped_total{reason=unknown_session}"] == 1
    node.metrics.observe({"event": "kv_dropped", "request_id": None, "t_model": 1.0,
                          "reason": "unknown_session", "count": 3})  # a later record: the total so far
    node.metrics.observe({"event": "kv_dropped", "request_id": None, "t_model": 2.0,
                          "reason": "unknown_session", "count": 3})
    assert node.metrics.kv_dropped.labels("unknown_session")._value.get() == 3
