"""Model time vs wall time under a time dilation factor (TDF).

Model time = (wall - t0_wall) / TDF. Every modelled duration is slept as
``duration x TDF`` wall seconds, on absolute deadlines so errors never accumulate.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelClock:
    t0_wall: float
    tdf: float = 1.0

    def wall(self) -> float:
        return time.time()

    def now(self) -> float:
        """Model seconds since the run's t0."""
        return (time.time() - self.t0_wall) / self.tdf

    def to_model(self, wall: float) -> float:
        return (wall - self.t0_wall) / self.tdf

    def to_wall(self, model: float) -> float:
        return self.t0_wall + model * self.tdf

    async def sleep(self, model_s: float) -> None:
        """Sleep a modelled duration (stretched by TDF)."""
        if model_s > 0:
            await asyncio.sleep(model_s * self.tdf)

    async def sleep_until(self, model_t: float) -> float:
        """Sleep until an absolute model time; returns how late (model s) we woke up."""
        delay = self.to_wall(model_t) - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        return max(0.0, self.now() - model_t)
