"""The scheduling properties the docs promise: steps on absolute deadlines (a late start does
not push later steps) and prefill planning within the token budget, FIFO, with chunks."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodes.clock import ModelClock
from nodes.engine import StepTimer, plan_prefill
from nodes.timeline import Timeline, read_timeline

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py


async def test_a_late_step_does_not_push_the_steps_after_it(tmp_path: Path):
    clock = ModelClock(t0_wall=time.time(), tdf=1.0)
    timer = StepTimer(clock, Timeline(tmp_path / "n.jsonl", "n", clock), "decode")
    step_s = 0.02
    first_start, _ = timer.begin(step_s)
    ends = [await timer.end(1)]
    time.sleep(0.015)  # the loop is blocked: step 2 starts 15 ms late...
    for _ in range(3):
        timer.begin(step_s)
        ends.append(await timer.end(1))
    # ...yet every deadline stays on the grid of the first start: exact, not a timed bound
    assert ends == pytest.approx([first_start + (i + 1) * step_s for i in range(4)], abs=1e-12)
    steps = [e for e in read_timeline(tmp_path / "n.jsonl") if e["event"] == "step_timing"]
    assert [s["planned_s"] for s in steps] == pytest.approx([step_s] * 4)


async def test_an_idle_node_starts_its_next_step_now(tmp_path: Path):
    clock = ModelClock(t0_wall=time.time(), tdf=1.0)
    timer = StepTimer(clock, Timeline(tmp_path / "n.jsonl", "n", clock), "decode")
    timer.begin(0.01)
    end = await timer.end(1)
    time.sleep(0.02)
    timer.idle()
    start, _ = timer.begin(0.01)
    assert start >= end + 0.02  # after waiting for work, no catching up on missed deadlines


@dataclass
class Job:
    name: str
    prompt_tokens: int
    prefilled: int = 0


def test_plan_prefill_whole_prompts_within_the_budget_in_fifo_order():
    q = [Job("a", 1000), Job("b", 1500), Job("c", 600), Job("d", 100)]
    plan = plan_prefill(q, 3000, 0)
    assert [(j.name, n) for j, n in plan] == [("a", 1000), ("b", 1500)]  # c would exceed: FIFO stops, no skipping
    assert sum(n for _, n in plan) <= 3000


def test_plan_prefill_a_prompt_larger_than_the_budget_runs_alone():
    plan = plan_prefill([Job("big", 9000), Job("small", 10)], 4096, 0)
    assert [(j.name, n) for j, n in plan] == [("big", 9000)]


def test_plan_prefill_chunks_respect_chunk_size_budget_and_progress():
    q = [Job("a", 2500, prefilled=2000), Job("b", 3000), Job("c", 3000)]
    plan = plan_prefill(q, 2048, 1024)
    assert [(j.name, n) for j, n in plan] == [("a", 500), ("b", 1024), ("c", 524)]
    assert sum(n for _, n in plan) == 2048
