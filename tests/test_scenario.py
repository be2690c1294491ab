"""Scenario schema: validation errors name key paths, --set overrides, sweeps, topology cross-checks."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from testbed.config.kinds import load_any
from core.config import ConfigError
from testbed.config.scenario import (ScenarioConfig, expand_sweep, load_scenario, parse_override, point_label,
                                     selected_hosts, set_key_path, topology_problems)

BASE = {
    "kind": "scenario",
    "name": "t",
    "topology": "pair",
    "model": "llama-3.1-8b",
    "workload": {"arrival": {"process": "poisson", "rate": 4}, "requests": 10,
                 "prompt_tokens": {"dist": "uniform", "min": 10, "max": 20}, "output_tokens": 8},
    "slo": {"ttft_ms": 200, "tpot_ms": 10},
}


def write(tmp_path: Path, data: dict, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def load(tmp_path: Path, data: dict, overrides: list[str] = ()) -> ScenarioConfig:
    return load_scenario(write(tmp_path, data), list(overrides), check_refs=False)


def errors(tmp_path: Path, data: dict, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, data, overrides)
    return str(err.value)


def with_(path: str, value, base: dict = BASE) -> dict:
    import copy
    data = copy.deepcopy(base)
    set_key_path(data, path, value)
    return data


def test_minimal_scenario_defaults(tmp_path: Path) -> None:
    sc = load(tmp_path, BASE)
    assert sc.kv_transfer.mode == "whole" and sc.kv_transfer.chunk_bytes == 256 * 1024
    assert sc.emulation.tdf == "auto" and sc.emulation.byte_scale == "auto" and sc.emulation.backend == "auto"
    assert sc.workload.output_tokens.dist == "fixed" and sc.workload.output_tokens.value == 8
    assert sc.faults == [] and sc.sweep == {}
    assert sc.disaggregated and sc.base_dir == tmp_path.resolve()


@pytest.mark.parametrize("path, value, where", [
    ("workload.arrival.rate", -1, "workload.arrival.rate"),
    ("workload.arrival.process", "weibull", "workload.arrival.process"),
    ("workload.prompt_tokens", {"dist": "uniform", "min": 50, "max": 10}, "workload.prompt_tokens"),
    ("workload.prompt_tokens", {"dist": "lognormal", "mean": 100}, "workload.prompt_tokens.sigma"),
    ("workload.output_tokens", "many", "workload.output_tokens"),
    ("emulation.tdf", 0.5, "emulation.tdf"),
    ("emulation.byte_scale", 2, "emulation.byte_scale"),
    ("kv_transfer.mode", "pipelined", "kv_transfer.mode"),
    ("fabric.efa.bandwidth", "fast", "fabric.efa.bandwidth"),
    ("fabric.efa.latency", 15, "fabric.efa.latency"),
    ("fabric.efa.loss", "200%", "fabric.efa.loss"),
    ("slo.ttft_ms", 0, "slo.ttft_ms"),
    ("pools.decode.count", 0, "pools.decode.count"),
    ("model", "Llama 8B", "model"),
    ("router.decode_policy", "random", "router.decode_policy"),
])
def test_validation_errors_name_the_key_path(tmp_path: Path, path: str, value, where: str) -> None:
    text = errors(tmp_path, with_(path, value))
    assert f": {where}: " in text, text
    assert "Traceback" not in text


def test_unknown_keys_and_missing_keys(tmp_path: Path) -> None:
    assert ": workload.arrival.rat: unknown key" in errors(tmp_path, with_("workload.arrival", {"rat": 3}))
    data = dict(BASE)
    del data["model"]
    assert ": model: required key is missing" in errors(tmp_path, data)
    assert ": kind: expected 'scenario'" in errors(tmp_path, dict(BASE, kind="topology"))


def test_workload_completeness(tmp_path: Path) -> None:
    assert "requests" in errors(tmp_path, with_("workload.requests", None))
    sc = load(tmp_path, with_("workload.duration", "2s"))
    assert sc.workload.duration == 2.0 and sc.workload.requests == 10
    text = errors(tmp_path, with_("workload.trace", "t.csv"))
    assert "workload: arrival, prompt_tokens, output_tokens cannot be combined with trace" in text
    assert "burstiness" in errors(tmp_path, with_("workload.arrival.burstiness", 4))


def test_faults_validated_and_sorted(tmp_path: Path) -> None:
    faults = [{"at": "2s", "action": "link_down", "target": "efa"},
              {"at": "500ms", "action": "set_link", "target": "p1-d1", "loss": "1%", "latency": "1ms"},
              {"at": "1s", "action": "slowdown", "target": "d1", "factor": 2}]
    sc = load(tmp_path, dict(BASE, faults=faults))
    assert [f.at for f in sc.faults] == [0.5, 1.0, 2.0]
    assert sc.faults[0].link_updates() == {"latency_s": 0.001, "loss": 0.01}
    bad = [{"at": "1s", "action": "set_link", "target": "efa"}]
    assert ": faults[0]: set_link needs" in errors(tmp_path, dict(BASE, faults=bad))
    bad = [{"at": "1s", "action": "crash", "target": "d1; rm -rf /"}]
    assert ": faults[0].target: " in errors(tmp_path, dict(BASE, faults=bad))
    bad = [{"at": "1s", "action": "slowdown", "target": "d1"}]
    assert "slowdown needs factor" in errors(tmp_path, dict(BASE, faults=bad))
    bad = [{"at": "1s", "action": "drain", "target": "d1", "loss": 0.1}]
    assert "only apply to action set_link" in errors(tmp_path, dict(BASE, faults=bad))


def test_set_overrides_every_required_key_path(tmp_path: Path) -> None:
    trace = tmp_path / "other.csv"
    sc = load(tmp_path, BASE, [
        "workload.arrival.rate=8.5", "workload.requests=30", "workload.prompt_tokens=512",
        "workload.output_tokens={dist: lognormal, mean: 100, sigma: 0.5}", "emulation.tdf=25",
        "emulation.byte_scale=0.125", "kv_transfer.mode=layerwise", "slo.ttft_ms=300", "slo.tpot_ms=7.5",
        "fabric.efa.bandwidth=400Gbps", "fabric.frontend.latency=50us", "pools.decode.count=1",
        "router.prefill_policy=least_loaded",
    ])
    w = sc.workload
    assert w.arrival.rate == 8.5 and w.requests == 30 and w.prompt_tokens.value == 512
    assert w.output_tokens.dist == "lognormal" and w.output_tokens.mean == 100
    assert sc.emulation.tdf == 25 and sc.emulation.byte_scale == 0.125
    assert sc.kv_transfer.mode == "layerwise" and sc.slo.ttft_ms == 300 and sc.slo.tpot_ms == 7.5
    assert sc.fabric.overrides() == {"efa": {"bandwidth_bps": 4e11}, "frontend": {"latency_s": pytest.approx(5e-5)}}
    assert sc.pools.decode.count == 1 and sc.router.prefill_policy == "least_loaded"
    # a trace replaces the synthetic workload once its keys are cleared
    sc = load(tmp_path, BASE, [f"workload.trace={trace}", "workload.arrival=null", "workload.prompt_tokens=null",
                               "workload.output_tokens=null", "workload.trace.speedup=4"])
    assert sc.trace_path() == trace and sc.workload.trace.speedup == 4
    # setting the trace file keeps the other trace settings
    traced = with_("workload", {"trace": {"path": "a.csv", "window": "60s", "speedup": 2}, "requests": 5})
    sc = load(tmp_path, traced, ["workload.trace=b.csv"])
    assert sc.workload.trace.path == "b.csv" and sc.workload.trace.window == 60.0
    assert sc.trace_path() == tmp_path.resolve() / "b.csv"


def test_set_errors_name_the_path(tmp_path: Path) -> None:
    assert ": workload.foo: unknown key path" in errors(tmp_path, BASE, ["workload.foo=1"])
    assert ": emulation.tdf.x: unknown key path" in errors(tmp_path, BASE, ["emulation.tdf.x=1"])
    assert ": faults[0].at: index [0] is out of range" in errors(tmp_path, BASE, ["faults[0].at=1s"])
    assert ": emulation.tdf: " in errors(tmp_path, BASE, ["emulation.tdf=fast"])
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        parse_override("emulation.tdf")
    assert parse_override("a.b=2.5") == ("a.b", 2.5)
    assert parse_override("a.b=auto") == ("a.b", "auto")
    assert parse_override("a.b=400Gbps") == ("a.b", "400Gbps")
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    # list elements can be set by index once they exist
    sc = load(tmp_path, dict(BASE, faults=[{"at": "1s", "action": "crash", "target": "d1"}]), ["faults[0].at=3s"])
    assert sc.faults[0].at == 3.0


def test_sweep_grid_is_cartesian_and_revalidated(tmp_path: Path) -> None:
    data = dict(BASE, sweep={"fabric.efa.loss": [0, "1%", "5%"], "kv_transfer.mode": ["whole", "layerwise"]})
    sc = load(tmp_path, data)
    points = expand_sweep(sc)
    assert len(points) == 6
    seen = {(p["fabric.efa.loss"], p["kv_transfer.mode"]) for p, _ in points}
    assert seen == {(l, m) for l in (0, "1%", "5%") for m in ("whole", "layerwise")}
    for point, cfg in points:
        assert cfg.sweep == {}
        assert cfg.kv_transfer.mode == point["kv_transfer.mode"]
        assert cfg.fabric.efa.loss == {0: 0.0, "1%": 0.01, "5%": 0.05}[point["fabric.efa.loss"]]
        assert cfg.base_dir == sc.base_dir
    assert point_label(points[1][0]) == "fabric.efa.loss=0,kv_transfer.mode=layerwise"
    assert expand_sweep(load(tmp_path, BASE)) == [({}, load(tmp_path, BASE))]
    # --set applies to every point; a sweep can itself be overridden
    sc = load(tmp_path, data, ["emulation.tdf=30", "sweep={workload.arrival.rate: [1, 2]}"])
    assert [(p, c.emulation.tdf, c.workload.arrival.rate) for p, c in expand_sweep(sc)] == [
        ({"workload.arrival.rate": 1}, 30, 1), ({"workload.arrival.rate": 2}, 30, 2)]
    # or one sweep key at a time (its values replace the file's for that key)
    sc = load(tmp_path, data, ["sweep.kv_transfer.mode=[layerwise]", "sweep.emulation.tdf=[5, 50]"])
    assert sc.sweep == {"fabric.efa.loss": [0, "1%", "5%"], "kv_transfer.mode": ["layerwise"],
                        "emulation.tdf": [5, 50]}
    assert len(expand_sweep(sc)) == 6


def test_sweep_errors_name_key_and_value(tmp_path: Path) -> None:
    assert ": sweep.workload.nope: unknown key path" in errors(tmp_path, dict(BASE, sweep={"workload.nope": [1]}))
    text = errors(tmp_path, dict(BASE, sweep={"emulation.tdf": [10, 0.1]}))
    assert ": sweep.emulation.tdf[1]: emulation.tdf: " in text
    assert "has no values" in errors(tmp_path, dict(BASE, sweep={"emulation.tdf": []}))


def test_set_reaches_one_sweep_key(tmp_path: Path) -> None:
    """Sweep keys contain dots: ``--set sweep.KEY.PATH=[...]`` sets one axis, checked like any key path."""
    data = dict(BASE, sweep={"fabric.efa.loss": [0, "1%"], "faults[0].at": ["1s", "2s"]},
                faults=[{"at": "1s", "action": "crash", "target": "d1"}])
    sc = load(tmp_path, data, ["sweep.faults[0].at=[3s]", "sweep.workload.prompt_tokens=[64, 128]"])
    assert sc.sweep == {"fabric.efa.loss": [0, "1%"], "faults[0].at": ["3s"], "workload.prompt_tokens": [64, 128]}
    points = expand_sweep(sc)
    assert len(points) == 4 and {c.faults[0].at for _, c in points} == {3.0}
    assert {c.workload.prompt_tokens.value for _, c in points} == {64, 128}
    # null removes an axis; removing the last one removes the sweep
    assert load(tmp_path, data, ["sweep.fabric.efa.loss=null"]).sweep == {"faults[0].at": ["1s", "2s"]}
    sc = load(tmp_path, data, ["sweep.fabric.efa.loss=null", "sweep.faults[0].at=null"])
    assert sc.sweep == {} and "sweep" not in sc.raw and len(expand_sweep(sc)) == 1
    # a scenario without a sweep gets one
    assert load(tmp_path, BASE, ["sweep.kv_transfer.mode=[whole, layerwise]"]).sweep == {
        "kv_transfer.mode": ["whole", "layerwise"]}
    # the swept path is validated like any --set path, and so are its values
    assert ": sweep.workload.nope: unknown key path" in errors(tmp_path, BASE, ["sweep.workload.nope=[1]"])
    assert ": sweep.workload..rate: sweep key: bad key path segment ''" in errors(
        tmp_path, BASE, ["sweep.workload..rate=[1]"])
    assert ": sweep.sweep.x: a sweep cannot sweep itself" in errors(tmp_path, BASE, ["sweep.sweep.x=[1]"])
    assert ": sweep.kind: unknown key path" in errors(tmp_path, BASE, ["sweep.kind=[1]"])
    assert "takes a list of values" in errors(tmp_path, BASE, ["sweep.emulation.tdf=5"])
    assert ": sweep.emulation.tdf[1]: emulation.tdf: " in errors(tmp_path, BASE, ["sweep.emulation.tdf=[5, 0.5]"])
    assert "must be a mapping" in errors(tmp_path, dict(BASE, sweep=[1]), ["sweep.emulation.tdf=[5]"])


def test_set_null_removes_a_setting(tmp_path: Path) -> None:
    sc = load(tmp_path, dict(BASE, router={"request_timeout": "5s"}), ["router.request_timeout=null", "slo=null"])
    assert sc.router.request_timeout == load(tmp_path, BASE).router.request_timeout and sc.slo is None
    assert "request_timeout" not in sc.raw["router"] and "slo" not in sc.raw


def test_generic_loader_checks_sweeps_too(tmp_path: Path) -> None:
    """``pdtb validate`` loads by kind (load_any): sweep values are still checked, and expand."""
    kind, sc = load_any(write(tmp_path, dict(BASE, sweep={"kv_transfer.mode": ["whole", "layerwise"]})))
    assert kind == "scenario" and [c.kv_transfer.mode for _, c in expand_sweep(sc)] == ["whole", "layerwise"]
    with pytest.raises(ConfigError) as err:
        load_any(write(tmp_path, dict(BASE, sweep={"kv_transfer.mode": ["whole", "sideways"],
                                                   "workload.nope": [1]})))
    text = str(err.value)
    assert "sweep.kv_transfer.mode[1]: kv_transfer.mode: " in text and "sweep.workload.nope: unknown key path" in text


def test_topology_ref_resolves_relative_to_scenario(tmp_path: Path) -> None:
    sub = tmp_path / "scen"
    sub.mkdir()
    sc = load_scenario(write(sub, dict(BASE, topology="../topo/mine.yaml")), check_refs=False)
    assert sc.topology_ref() == str(tmp_path.resolve() / "topo" / "mine.yaml")
    assert load(tmp_path, BASE).topology_ref() == "pair"


def test_resolved_raw_loads_the_same_scenario_from_elsewhere(tmp_path: Path) -> None:
    """A run's scenario.yaml: file references made absolute, so it loads from the run directory."""
    from testbed.config.scenario import scenario_from_data

    sub = tmp_path / "scen"
    sub.mkdir()
    traced = with_("workload.trace", {"path": "../traces/t.csv", "speedup": 2},
                   with_("workload.arrival", None, with_("workload.prompt_tokens", None,
                                                         with_("workload.output_tokens", None))))
    sc = load_scenario(write(sub, dict(traced, topology="../topo/mine.yaml")), check_refs=False)
    raw = sc.resolved_raw()
    assert raw["topology"] == str(tmp_path.resolve() / "topo" / "mine.yaml")
    assert raw["workload"]["trace"] == {"path": str(tmp_path.resolve() / "traces" / "t.csv"), "speedup": 2}
    elsewhere = scenario_from_data(raw, "run/scenario.yaml", tmp_path / "run")
    assert elsewhere.topology_ref() == sc.topology_ref() and elsewhere.trace_path() == sc.trace_path()
    assert elsewhere.workload.trace.speedup == 2 and elsewhere.workload.requests == sc.workload.requests
    shorthand = load_scenario(write(sub, dict(traced, workload={"trace": "t.csv", "requests": 3})), check_refs=False)
    assert shorthand.resolved_raw()["workload"]["trace"] == str(sub.resolve() / "t.csv")
    assert load(tmp_path, BASE).resolved_raw()["topology"] == "pair"


TOPO = {
    "name": "mini",
    "hosts": [{"name": "cl", "role": "client"}, {"name": "rt", "role": "router"},
              {"name": "p1", "role": "prefill", "hardware": "trn2"}, {"name": "p2", "role": "prefill", "hardware": "trn2"},
              {"name": "d1", "role": "decode", "hardware": "cs3"}],
    "switches": [{"name": "fe", "network": "frontend"}, {"name": "sw", "network": "efa"}],
    "links": [{"name": f"{h}-fe", "a": h, "b": "fe", "class": "frontend"} for h in ("cl", "rt", "p1", "p2", "d1")]
    + [{"name": f"{h}-sw", "a": h, "b": "sw", "class": "efa"} for h in ("p1", "p2", "d1")],
}


def test_topology_cross_check(tmp_path: Path) -> None:
    from fabric.topology import TopologyConfig

    topo = TopologyConfig.model_validate(TOPO)
    ok = load(tmp_path, dict(BASE, pools={"prefill": {"count": 1, "hardware": "trn1"}, "decode": {}},
                             faults=[{"at": "1s", "action": "crash", "target": "d1"},
                                     {"at": "1s", "action": "link_down", "target": "p1-sw"},
                                     {"at": "1s", "action": "set_link", "target": "efa", "loss": "1%"}]))
    assert topology_problems(ok, topo) == []
    assert selected_hosts(ok, topo) == {"prefill": [("p1", "trn1")], "decode": [("d1", "cs3")]}
    assert selected_hosts(load(tmp_path, BASE), topo) == {"prefill": [("p1", "trn2"), ("p2", "trn2")],
                                                          "decode": [("d1", "cs3")]}
    bad = load(tmp_path, dict(BASE, pools={"prefill": {"count": 3}, "decode": {}},
                              faults=[{"at": "1s", "action": "crash", "target": "d9"},
                                      {"at": "1s", "action": "link_up", "target": "nolink"}]))
    problems = dict(topology_problems(bad, topo))
    assert "only 2 prefill host(s)" in problems["pools.prefill.count"]
    assert "not a host" in problems["faults[0].target"] and "not a link" in problems["faults[1].target"]
    colo = load(tmp_path, dict(BASE, pools={"colocated": {}}))
    assert not colo.disaggregated
    assert "no colocated hosts" in dict(topology_problems(colo, topo))["pools.colocated"]
    only_decode = load(tmp_path, dict(BASE, pools={"decode": {"hardware": "cs3x4"}}))
    assert selected_hosts(only_decode, topo) == {"prefill": [("p1", "trn2"), ("p2", "trn2")],
                                                 "decode": [("d1", "cs3x4")]}


SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"


@pytest.mark.parametrize("name", ["quickstart", "kv-loss-sweep", "bandwidth-sweep", "incast", "trace-replay",
                                  "gpu-baseline", "cluster-trace"])
def test_shipped_scenarios_validate(name: str) -> None:
    path = SCENARIOS / f"{name}.yaml"
    if name in ("trace-replay", "cluster-trace"):
        sc = load_scenario(path, check_refs=False)
        if not sc.trace_path().exists():
            pytest.skip("the shared trace is not beside the checkout")
    sc = load_scenario(path)
    assert sc.name == name
    kind, _ = load_any(path)
    assert kind == "scenario"
    points = expand_sweep(sc)
    if name.endswith("-sweep"):
        assert len(points) > 1


def test_workload_longer_than_the_models_context_is_refused(tmp_path: Path) -> None:
    long = with_("model", "mixtral-8x7b", with_("workload.prompt_tokens", {"dist": "uniform", "min": 100, "max": 32000}))
    with pytest.raises(ConfigError) as err:
        load_scenario(write(tmp_path, with_("workload.output_tokens", 1000, long)))
    assert "workload: prompt_tokens + output_tokens reach 33000 tokens" in str(err.value)
    assert "32768-token context of mixtral-8x7b" in str(err.value)
    # the same lengths fit Llama-3.1's 128k context; unbounded lognormal draws are left to the router
    load_scenario(write(tmp_path, with_("workload.output_tokens", 1000, with_("model", "llama-3.1-8b", long))))
    load_scenario(write(tmp_path, with_("workload.prompt_tokens", {"dist": "lognormal", "mean": 2000, "sigma": 1},
                                        with_("model", "mixtral-8x7b"))))


def test_pool_batching_keys_are_checked_against_the_role(tmp_path):
    base = (SCENARIOS / "quickstart.yaml").read_text()
    path = tmp_path / "s.yaml"
    path.write_text(base.replace("prefill: {count: 1}", "prefill: {count: 1, max_batch: 4}")
                    .replace("decode: {count: 1}", "decode: {count: 1, chunk_tokens: 512}"))
    with pytest.raises(ConfigError) as exc:
        load_scenario(path, check_refs=False)
    msg = str(exc.value)
    assert "pools.prefill.max_batch: unknown key" in msg and "pools.decode.chunk_tokens: unknown key" in msg
    ok = load_scenario(SCENARIOS / "quickstart.yaml",
                       ["pools.prefill.token_budget=4096", "pools.decode.max_batch=8", "workload.stream=false"])
    assert ok.pools.prefill.token_budget == 4096 and ok.pools.decode.max_batch == 8 and ok.workload.stream is False


def test_kv_link_settings_pace_srd_at_the_dilated_efa_rate() -> None:
    """The orchestrator gives each KV node its EFA link's wire rate (model rate x S / TDF, only
    where links are shaped) and MTU; kv_transfer.transport defaults to srd."""
    from fabric.topology import load_topology
    from nodes.config import KvSettings
    from testbed.config.scenario import KvTransferSpec
    from testbed.runner.backend import NodePlan
    from testbed.runner.orchestrator import Orchestrator

    assert KvTransferSpec().transport == "srd"
    orch = Orchestrator.__new__(Orchestrator)
    orch.topo, orch.tdf, orch.byte_scale, orch.backend_name = load_topology("pair"), 10.0, 1 / 256, "mininet"
    kv = KvSettings(secret_hex="ab" * 32, transport="srd")
    dec = orch._kv_link_settings(kv, NodePlan("decode0", "decode", "decode0", "cs3"))
    pre = orch._kv_link_settings(kv, NodePlan("prefill0", "prefill", "prefill0", "trn2"))
    assert (dec.rate_bps, dec.mtu) == (pytest.approx(1.2e12 / 256 / 10), 9001)
    assert (pre.rate_bps, pre.mtu) == (pytest.approx(3.2e12 / 256 / 10), 9001)
    assert orch._kv_link_settings(kv, NodePlan("router", "router", "router")) is kv
    orch.backend_name = "local"
    assert orch._kv_link_settings(kv, NodePlan("decode0", "decode", "decode0", "cs3")).rate_bps == 0.0
