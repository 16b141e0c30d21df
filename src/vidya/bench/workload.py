"""Benchmark workloads: chats with fixed output lengths (the shared tutor-64 format)."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

from vidya.sampling_params import SamplingParams

DEFAULT_WORKLOAD = os.path.join(os.path.dirname(__file__), "tutor-64.json")


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    conversations: list[list[dict]]
    max_tokens: int
    temperature: float
    ignore_eos: bool
    min_tokens: int

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, max_tokens=self.max_tokens,
                              min_tokens=self.min_tokens, ignore_eos=self.ignore_eos)


def num_prompts_arg(value: str) -> int:
    """--num-prompts: a whole number >= 1 (the workload's requests repeat to reach it)."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (leave it out for the whole workload), got {value!r}")
    return n


def load_workload(path: str | None = None, num_prompts: int | None = None) -> Workload:
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1 (None: the whole workload), got {num_prompts}")
    path = path or DEFAULT_WORKLOAD
    packaged = os.path.join(os.path.dirname(__file__), f"{path}.json")
    if not os.path.exists(path) and os.path.exists(packaged):  # a packaged workload by name
        path = packaged
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        convs = [r["messages"] for r in data["requests"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read workload {path}: {e}; expected the tutor-64.json format") from None
    if num_prompts is not None:
        convs = (convs * (num_prompts // len(convs) + 1))[:num_prompts]
    return Workload(data.get("name", os.path.basename(path)), convs, int(data.get("max_tokens", 128)),
                    float(data.get("temperature", 0.0)), bool(data.get("ignore_eos", True)),
                    int(data.get("min_tokens", 0)))
