"""Workload generators: arrival rates and burstiness, length distributions, trace replay, JSONL output."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from core.config import ConfigError
from testbed.config.scenario import ArrivalSpec, LognormalLength, UniformLength, load_scenario
from core.vocab import request_id
from testbed.workload import (arrival_times, generate_workload, read_workload, sample_lengths,
                              write_workload)

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py

N = 20000


def scenario(tmp_path: Path, workload: dict, name: str = "s.yaml"):
    data = {"kind": "scenario", "name": "w", "topology": "pair", "model": "llama-3.1-8b", "workload": workload}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return load_scenario(path, check_refs=False)


def gaps(spec: ArrivalSpec, seed: int = 1) -> np.ndarray:
    return np.diff(arrival_times(spec, np.random.default_rng(seed), count=N))


def test_poisson_rate_and_cv() -> None:
    g = gaps(ArrivalSpec(process="poisson", rate=5.0))
    assert g.mean() == pytest.approx(0.2, rel=0.03)
    assert g.std() / g.mean() == pytest.approx(1.0, rel=0.05)
    assert g.min() >= 0


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_rate_and_burstiness(burstiness: float) -> None:
    g = gaps(ArrivalSpec(process="gamma", rate=10.0, burstiness=burstiness))
    assert g.mean() == pytest.approx(0.1, rel=0.05)
    assert (g.std() / g.mean()) ** 2 == pytest.approx(burstiness, rel=0.15)


def test_fixed_rate_is_exact() -> None:
    times = arrival_times(ArrivalSpec(process="fixed", rate=4.0), np.random.default_rng(0), count=9)
    assert times == pytest.approx(np.arange(9) * 0.25)


def test_duration_bounds_arrivals() -> None:
    t = arrival_times(ArrivalSpec(process="poisson", rate=50.0), np.random.default_rng(2), duration_s=100.0)
    assert t.max() < 100.0 and t[0] == 0.0
    assert len(t) == pytest.approx(5000, rel=0.05)
    t = arrival_times(ArrivalSpec(process="fixed", rate=2.0), np.random.default_rng(2), count=100, duration_s=3.0)
    assert len(t) == 6


def test_uniform_lengths() -> None:
    x = sample_lengths(UniformLength(dist="uniform", min=100, max=200), np.random.default_rng(0), N)
    assert x.min() == 100 and x.max() == 200
    assert x.mean() == pytest.approx(150, rel=0.01)
    counts = np.bincount(x - 100)
    assert counts.min() > 0.6 * N / 101  # every value turns up, roughly equally often


def test_lognormal_lengths() -> None:
    spec = LognormalLength(dist="lognormal", mean=1500, sigma=0.6)
    x = sample_lengths(spec, np.random.default_rng(0), N)
    assert x.mean() == pytest.approx(1500, rel=0.03)
    assert np.log(x).std() == pytest.approx(0.6, rel=0.05)
    clipped = sample_lengths(LognormalLength(dist="lognormal", mean=1500, sigma=0.6, min=1000, max=2000),
                             np.random.default_rng(0), N)
    assert clipped.min() == 1000 and clipped.max() == 2000


def test_generate_workload_is_seeded_and_streams_independent(tmp_path: Path) -> None:
    wl = {"arrival": {"process": "poisson", "rate": 3}, "requests": 50, "seed": 7,
          "prompt_tokens": {"dist": "uniform", "min": 10, "max": 1000}, "output_tokens": 16}
    a = generate_workload(scenario(tmp_path, wl))
    assert a == generate_workload(scenario(tmp_path, wl))
    assert [i.index for i in a] == list(range(50))
    assert all(i.output_tokens == 16 and 10 <= i.prompt_tokens <= 1000 for i in a)
    b = generate_workload(scenario(tmp_path, dict(wl, prompt_tokens=64)))
    assert [i.arrival_s for i in a] == [i.arrival_s for i in b]  # lengths do not move arrivals
    c = generate_workload(scenario(tmp_path, dict(wl, seed=8)))
    assert [i.arrival_s for i in a] != [i.arrival_s for i in c]


def test_write_and_read_jsonl(tmp_path: Path) -> None:
    wl = {"arrival": {"process": "fixed", "rate": 2}, "requests": 3, "prompt_tokens": 5, "output_tokens": 6}
    items = generate_workload(scenario(tmp_path, wl))
    path = write_workload(items, tmp_path / "run" / "workload.jsonl")
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[1] == {"index": 1, "arrival_s": 0.5, "prompt_tokens": 5, "output_tokens": 6}
    assert read_workload(path) == items
    assert request_id(12) == "r000012"


TRACE = """TIMESTAMP,ContextTokens,GeneratedTokens
2024-05-01 10:00:00.0000000,100,1
2024-05-01 10:00:01.0000000,200,2
2024-05-01 10:00:02.5000000,300,3
2024-05-01 10:00:04.0000000,400,4
2024-05-01 10:00:09.0000000,500,5
"""


def test_trace_replay_reproduces_arrivals_and_lengths(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.csv").write_text(TRACE)
    sc = scenario(tmp_path, {"trace": "data/t.csv"})
    items = generate_workload(sc)
    assert [(i.arrival_s, i.prompt_tokens, i.output_tokens) for i in items] == [
        (0.0, 100, 1), (1.0, 200, 2), (2.5, 300, 3), (4.0, 400, 4), (9.0, 500, 5)]
    sc = scenario(tmp_path, {"trace": {"path": "data/t.csv", "start": "1s", "window": "3.5s", "speedup": 2}})
    assert [(i.arrival_s, i.prompt_tokens) for i in generate_workload(sc)] == [(0.0, 200), (0.75, 300), (1.5, 400)]
    sc = scenario(tmp_path, {"trace": "data/t.csv", "requests": 2})
    assert len(generate_workload(sc)) == 2
    sc = scenario(tmp_path, {"trace": "data/t.csv", "duration": "3s"})
    assert [i.prompt_tokens for i in generate_workload(sc)] == [100, 200, 300]
    sc = scenario(tmp_path, {"trace": {"path": "data/t.csv", "start": "1h"}})
    with pytest.raises(ConfigError, match="workload.trace: no requests"):
        generate_workload(sc)


def test_shipped_trace_replay_scenario(shared_trace: Path) -> None:
    sc = load_scenario(Path(__file__).resolve().parents[1] / "scenarios" / "trace-replay.yaml", check_refs=False)
    assert sc.trace_path() == shared_trace.resolve()
    items = generate_workload(sc)
    t = sc.workload.trace
    span = items[-1].arrival_s * t.speedup
    assert 0 < span <= (t.window or span)
    assert 20 <= len(items) <= 1000
