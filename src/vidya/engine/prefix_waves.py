"""The order in which `LLMEngine.warm_prefix_cache` computes prompts that share prefixes (the
tutor's system prompts at start-up): pure logic over token ids."""
from __future__ import annotations


def _shared(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_waves(prompts: list[list[int]], block_size: int) -> list[list[list[int]]]:
    """Prompts in waves that batch well: within a wave no two would compute the same uncached
    block (a common prefix is computed once, by the first wave that holds it; later waves hit it)."""
    done: list[list[int]] = []
    waves, pending = [], list(prompts)
    while pending:
        wave, rest = [], []
        for p in pending:
            cached = max((_shared(p, d) for d in done), default=0) // block_size * block_size
            if any(_shared(p, w) >= cached + block_size for w in wave):
                rest.append(p)
            else:
                wave.append(p)
        waves.append(wave)
        done += wave
        pending = rest
    return waves
