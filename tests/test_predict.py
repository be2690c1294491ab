"""The analytic prediction: KV handoff arithmetic, timeline composition, overrides, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from nodes.costmodel import CostModel
from nodes.profiles import load_hardware, load_model
from testbed.cli import main
from testbed.config.scenario import load_scenario
from testbed.predict import KV_SETUP_RTTS, kv_handoff, predict

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py


def test_whole_handoff_is_setup_serialization_latency() -> None:
    exposed, serial = kv_handoff(0.3, 32, 10**9, 8e9, 1e-3, 4e-3, "whole")
    assert serial == pytest.approx(1.0)
    assert exposed == pytest.approx(4e-3 + 1.0 + 1e-3)


def test_layerwise_hides_transfer_behind_compute_when_the_link_keeps_up() -> None:
    # 32 layers, 10 ms of compute each; each layer's KV takes 0.5 ms: only the last layer is exposed
    exposed, serial = kv_handoff(0.32, 32, 2 * 10**6, 1e9, 1e-4, 1e-3, "layerwise")
    assert serial == pytest.approx(0.016)
    assert exposed == pytest.approx(0.0005 + 1e-4)


def test_layerwise_link_bound_exposes_the_rest() -> None:
    # each layer's KV takes 20 ms > 10 ms of compute: the link is busy from the first layer on
    exposed, serial = kv_handoff(0.32, 32, 80 * 10**6, 1e9, 0.0, 0.0, "layerwise")
    assert serial == pytest.approx(0.64)
    assert exposed == pytest.approx(0.01 + 0.64 - 0.32)
    # a slow connection setup delays the first layer
    late, _ = kv_handoff(0.32, 32, 80 * 10**6, 1e9, 0.0, 0.05, "layerwise")
    assert late == pytest.approx(0.05 + 0.64 - 0.32)
    assert kv_handoff(0.32, 32, 80 * 10**6, None, 0.0, 0.0, "layerwise") == (0.0, 0.0)


def scenario(tmp_path: Path, **over) -> Path:
    data = {"kind": "scenario", "name": "p", "topology": "pair", "model": "llama-3.1-8b",
            "workload": {"arrival": {"process": "fixed", "rate": 1}, "requests": 5, "prompt_tokens": 2000,
                         "output_tokens": 33}, "emulation": {"tdf": 10, "byte_scale": 0.25}}
    data.update(over)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_prediction_adds_up_from_the_cost_model_and_topology(tmp_path: Path) -> None:
    sc = load_scenario(scenario(tmp_path))
    p = predict(sc)
    model = load_model("llama-3.1-8b")
    trn2, cs3 = CostModel(load_hardware("trn2"), model), CostModel(load_hardware("cs3"), model)
    assert (p.prompt_tokens, p.output_tokens, p.mode) == (2000, 33, "whole")
    assert (p.prefill_node, p.decode_node) == ("prefill0", "decode0")
    assert p.prefill_s == pytest.approx(trn2.prefill([2000]).time_s)
    assert p.first_decode_s == pytest.approx(cs3.decode_step([2001]).time_s)
    assert p.kv_model_bytes == trn2.kv_bytes(2000) and p.kv_wire_bytes == round(p.kv_model_bytes * 0.25)
    topo_links = {lk["name"] for lk in p.kv_links}
    assert topo_links == {"prefill0-efa", "decode0-efa"}
    assert p.kv_bandwidth_bps == min(lk["bandwidth_bps"] for lk in p.kv_links)
    assert p.kv_latency_s == pytest.approx(sum(lk["latency_s"] for lk in p.kv_links))
    assert p.kv_setup_s == pytest.approx(KV_SETUP_RTTS * 2 * p.kv_latency_s)
    # pair: client0-fe (250 us) + router-fe (25 us) to the router, router-fe + prefill0-fe on to prefill
    assert p.request_path_s == pytest.approx(325e-6)
    assert p.token_path_s == pytest.approx(325e-6)
    assert p.ttft_s == pytest.approx(p.request_path_s + p.prefill_s + p.kv_exposed_s + p.first_decode_s
                                     + p.token_path_s)
    assert p.e2e_s == pytest.approx(p.ttft_s + 32 * p.tpot_s)
    assert p.queue_s == 0.0
    d = p.to_dict()
    assert json.loads(json.dumps(d))["ttft_s"] == pytest.approx(p.ttft_s)


def test_layerwise_and_fabric_overrides(tmp_path: Path) -> None:
    path = scenario(tmp_path)
    whole = predict(load_scenario(path))
    layer = predict(load_scenario(path, ["kv_transfer.mode=layerwise"]))
    assert layer.kv_exposed_s < whole.kv_exposed_s and layer.ttft_s < whole.ttft_s
    slow = predict(load_scenario(path, ["fabric.efa.bandwidth=100Gbps", "fabric.efa.latency=1ms"]))
    assert slow.kv_bandwidth_bps == 1e11 and slow.kv_latency_s == pytest.approx(2e-3)
    assert slow.kv_serialization_s == pytest.approx(8 * slow.kv_model_bytes / 1e11)
    assert slow.ttft_s - whole.ttft_s == pytest.approx(
        (slow.kv_serialization_s - whole.kv_serialization_s)
        + (1 + 2 * KV_SETUP_RTTS) * (slow.kv_latency_s - whole.kv_latency_s))
    fe = predict(load_scenario(path, ["fabric.frontend.latency=1ms"]))
    assert fe.request_path_s == pytest.approx(4e-3)


def test_colocated_has_no_handoff(tmp_path: Path) -> None:
    sc = load_scenario(scenario(tmp_path, topology="gpu-colocated", pools={"colocated": {"hardware": "h200"}}))
    p = predict(sc)
    assert p.mode == "colocated" and p.kv_exposed_s == 0 and p.kv_model_bytes == 0
    assert p.prefill_hardware == p.decode_hardware == "h200"


def test_typical_size_is_the_workload_median(tmp_path: Path) -> None:
    sc = load_scenario(scenario(tmp_path), ["workload.prompt_tokens={dist: uniform, min: 1000, max: 3000}",
                                            "workload.requests=2001"])
    p = predict(sc)
    assert 1900 <= p.prompt_tokens <= 2100
    assert predict(sc, prompt_tokens=100, output_tokens=2).prompt_tokens == 100
    auto = load_scenario(scenario(tmp_path), ["emulation.byte_scale=auto"])
    assert predict(auto).kv_wire_bytes is None
    p = predict(auto, byte_scale=0.5)
    assert p.kv_wire_bytes == round(p.kv_model_bytes * 0.5)


def test_cli_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = scenario(tmp_path)
    assert main(["predict", str(path), "--json", "--set", "kv_transfer.mode=layerwise"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "layerwise" and out["ttft_s"] > out["prefill_s"]
    assert main(["predict", str(path), "--set", "sweep={kv_transfer.mode: [whole, layerwise]}", "--json"]) == 0
    points = json.loads(capsys.readouterr().out)
    assert [p["point"] for p in points] == [{"kv_transfer.mode": "whole"}, {"kv_transfer.mode": "layerwise"}]
    assert main(["predict", str(path)]) == 0
    assert "TTFT" in capsys.readouterr().out
    assert main(["predict", str(path), "--set", "workload.nope=1"]) == 2
    assert "workload.nope: unknown key path" in capsys.readouterr().err
