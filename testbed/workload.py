"""The requests a run sends: synthetic arrivals and lengths, or a replayed trace.

The result is written as ``RUN_DIR/workload.jsonl`` (one ``{"index", "arrival_s",
"prompt_tokens", "output_tokens"}`` per line, arrival in model seconds) and replayed
open-loop by the client. Randomness comes from numpy Generators seeded by
``workload.seed``, one independent stream per quantity, so changing the length
distribution does not move the arrivals (and a sweep compares like with like).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from core.config import ConfigError
from testbed.config.scenario import (ArrivalSpec, FixedLength, LognormalLength, ScenarioConfig, UniformLength,
                                     WorkloadSpec)
from testbed.trace import read_trace, replay

# stream ids of the seeded generators
_ARRIVALS, _PROMPT, _OUTPUT = 1, 2, 3
MAX_REQUESTS = 1_000_000  # guards against a duration x rate that would exhaust memory


@dataclass(frozen=True)
class WorkloadItem:
    index: int
    arrival_s: float  # model seconds since the run's start
    prompt_tokens: int
    output_tokens: int


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _gaps(spec: ArrivalSpec, rng: np.random.Generator, n: int) -> np.ndarray:
    mean = 1.0 / spec.rate
    if spec.process == "fixed":
        return np.full(n, mean)
    if spec.process == "poisson":
        return rng.exponential(mean, n)
    shape = 1.0 / spec.burstiness  # gamma gaps: CV^2 = 1/shape = burstiness, mean = shape x scale
    return rng.gamma(shape, mean / shape, n)


def arrival_times(spec: ArrivalSpec, rng: np.random.Generator, *, count: int | None = None,
                  duration_s: float | None = None) -> np.ndarray:
    """Arrival times (model s): the first at 0, then gaps of the process; ``count`` and/or ``duration_s``."""
    if count is None and duration_s is None:
        raise ValueError("arrival_times needs a count or a duration")
    if count is not None:
        times = np.concatenate([[0.0], np.cumsum(_gaps(spec, rng, max(count - 1, 0)))])
    else:
        expected = duration_s * spec.rate
        if expected > MAX_REQUESTS:
            raise ValueError(f"duration x rate gives about {expected:.0f} requests, more than {MAX_REQUESTS}")
        chunk = int(expected + 10 * math.sqrt(expected) + 16)
        times = np.array([0.0])
        while times[-1] < duration_s:
            times = np.concatenate([times, times[-1] + np.cumsum(_gaps(spec, rng, chunk))])
    if duration_s is not None:
        times = times[times < duration_s]
    return times


def sample_lengths(spec: FixedLength | UniformLength | LognormalLength, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` token counts (int64, each >= 1) from a length distribution."""
    if isinstance(spec, FixedLength):
        return np.full(n, spec.value, dtype=np.int64)
    if isinstance(spec, UniformLength):
        return rng.integers(spec.min, spec.max, size=n, endpoint=True, dtype=np.int64)
    mu = math.log(spec.mean) - spec.sigma ** 2 / 2  # so that E[length] = mean
    values = np.rint(rng.lognormal(mu, spec.sigma, n)).astype(np.int64)
    return np.clip(values, spec.min, spec.max if spec.max is not None else np.iinfo(np.int64).max)


def synthetic_workload(w: WorkloadSpec) -> list[WorkloadItem]:
    if w.requests is not None and w.requests > MAX_REQUESTS:
        raise ValueError(f"requests ({w.requests}) is more than {MAX_REQUESTS}")
    times = arrival_times(w.arrival, _rng(w.seed, _ARRIVALS), count=w.requests, duration_s=w.duration)
    n = len(times)
    prompts = sample_lengths(w.prompt_tokens, _rng(w.seed, _PROMPT), n)
    outputs = sample_lengths(w.output_tokens, _rng(w.seed, _OUTPUT), n)
    return [WorkloadItem(i, float(times[i]), int(prompts[i]), int(outputs[i])) for i in range(n)]


def trace_workload(w: WorkloadSpec, trace_path: Path) -> list[WorkloadItem]:
    t = w.trace
    records = read_trace(trace_path)
    replayed = replay(records, start_s=t.start, window_s=t.window, speedup=t.speedup, sample=t.sample,
                      seed=w.seed, max_requests=w.requests, max_arrival_s=w.duration)
    return [WorkloadItem(i, r.arrival_s, r.prompt_tokens, r.output_tokens) for i, r in enumerate(replayed)]


def generate_workload(sc: ScenarioConfig, base_dir: Path | None = None) -> list[WorkloadItem]:
    """The scenario's requests, in arrival order. Relative trace paths resolve against ``base_dir``
    (default: the scenario file's folder)."""
    w = sc.workload
    if w.trace is not None:
        path = Path(w.trace.path).expanduser()
        if not path.is_absolute():
            path = (base_dir / path) if base_dir is not None else sc.resolve_path(w.trace.path)
        items = trace_workload(w, path)
        if not items:
            raise ConfigError(sc.source, [("workload.trace", f"no requests of {path} fall in the chosen start, "
                                                             "window and sample")])
        return items
    try:
        items = synthetic_workload(w)
    except ValueError as exc:
        raise ConfigError(sc.source, [("workload", str(exc))]) from None
    return items


def write_workload(items: list[WorkloadItem], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for item in items:
            f.write(json.dumps(asdict(item), separators=(",", ":")) + "\n")
    return path


def read_workload(path: str | Path) -> list[WorkloadItem]:
    with open(path) as f:
        return [WorkloadItem(**json.loads(line)) for line in f if line.strip()]


