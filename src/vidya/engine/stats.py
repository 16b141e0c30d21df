"""Counters, histograms and per-step measurements the benchmarks and the server's metrics read.

Written by the engine thread only; readers in other threads (the /metrics endpoint) see values
that may be one step old, never torn ones that matter (each field is one Python object).
"""
from __future__ import annotations

import bisect
from collections import Counter, deque
from dataclasses import dataclass, field

# Bucket bounds in seconds, as vLLM's (so the same dashboard panels read well).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclass(slots=True)
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last is +Inf
    sum: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(slots=True)
class EngineStats:
    num_steps: int = 0
    waste_sum: float = 0.0  # sum over steps of (allocated - holding) / allocated
    waste_steps: int = 0
    prompt_tokens: int = 0  # prompt tokens of requests that started generating
    generation_tokens: int = 0
    finished_by_reason: Counter = field(default_factory=Counter)  # "stop" / "length" / "abort"
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    inter_token: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(REQUEST_BUCKETS))
    queue_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_BUCKETS))
    # the last finished requests (arrival, ttft, e2e), for benchmarks; bounded for long-lived servers
    finished: deque = field(default_factory=lambda: deque(maxlen=100_000))

    def record_step(self, scheduler) -> None:
        self.num_steps += 1
        allocated, holding = scheduler.kv.slots(scheduler.running)
        if allocated:
            self.waste_sum += (allocated - holding) / allocated
            self.waste_steps += 1

    @property
    def kv_waste(self) -> float:
        """Slots allocated but empty over slots allocated, averaged over steps."""
        return self.waste_sum / self.waste_steps if self.waste_steps else 0.0

    def record_token(self, since_last: float | None) -> None:
        self.generation_tokens += 1
        if since_last is not None:
            self.inter_token.observe(since_last)

    def record_first_token(self, num_prompt_tokens: int, ttft: float) -> None:
        self.prompt_tokens += num_prompt_tokens
        self.ttft.observe(ttft)

    def record_finished(self, state, now: float) -> None:
        ttft = state.first_token_time - state.arrival_time if state.first_token_time else None
        e2e = now - state.arrival_time
        self.finished.append((state.arrival_time, ttft, e2e))
        self.e2e.observe(e2e)
        for s in state.samples:
            self.finished_by_reason[s.finish_reason or "abort"] += 1
