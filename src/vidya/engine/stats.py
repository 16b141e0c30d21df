"""Counters and per-step measurements the benchmarks and the server's metrics read."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class EngineStats:
    num_steps: int = 0
    waste_sum: float = 0.0  # sum over steps of (allocated - holding) / allocated
    waste_steps: int = 0
    finished: list[tuple[float, float | None, float]] = field(default_factory=list)  # arrival, ttft, e2e

    def record_step(self, scheduler) -> None:
        self.num_steps += 1
        allocated = scheduler.kv.num_slots_allocated()
        if allocated:
            holding = sum(r.num_computed_tokens for r in scheduler.running)
            self.waste_sum += (allocated - holding) / allocated
            self.waste_steps += 1

    @property
    def kv_waste(self) -> float:
        """Slots allocated but empty over slots allocated, averaged over steps."""
        return self.waste_sum / self.waste_steps if self.waste_steps else 0.0

    def record_finished(self, state, now: float) -> None:
        ttft = state.first_token_time - state.arrival_time if state.first_token_time else None
        self.finished.append((state.arrival_time, ttft, now - state.arrival_time))
