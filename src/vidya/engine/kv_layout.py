"""Which KV-cache memory each layer uses: the groups of a hybrid cache (see kv_cache_manager.py).

Layers are grouped by how they attend: the full-attention layers in one group, the sliding-window
layers in groups of as many layers (vLLM's hybrid KV cache layout), so that one block of the pool
holds `slots` layers' K/V whichever group it serves. Layer i keeps its K/V in cache tensor
`layer_slot[i]` under its group's block table; the other groups' layers with the same slot share
that tensor, at other block ids. Gemma 3 270M (18 layers, every sixth full):

    group 0 (full)     layers  5 11 17        slots 0 1 2
    group 1 (window)   layers  0  1  2        slots 0 1 2
    ...
    group 5 (window)   layers 14 15 16        slots 0 1 2

A model whose layers all attend alike has one group of all its layers (today's uniform cache; with
a window, its blocks out of the window go back while it runs). Where the sliding layers do not
divide into groups of the full ones' count, the last group is short and its missing slots are
memory no layer uses (Gemma 3 4B: 29 sliding layers in groups of 5, one slot in 35 idle).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KVLayout:
    windows: tuple[int | None, ...]  # per group: None (full attention) or the sliding window
    layer_group: tuple[int, ...]  # per layer
    layer_slot: tuple[int, ...]  # per layer: which cache tensor (0 .. slots-1)
    slots: int  # layers' K/V one block holds

    @property
    def is_hybrid(self) -> bool:
        return len(self.windows) > 1 or self.windows[0] is not None

    def describe(self) -> str:
        if not self.is_hybrid:
            return f"uniform ({len(self.layer_group)} layers)"
        full = sum(w is None for w in self.windows)
        windows = sorted({w for w in self.windows if w is not None})
        return (f"hybrid: {full} full-attention group(s) and {len(self.windows) - full} sliding-window "
                f"group(s) (window {'/'.join(map(str, windows))}) of {self.slots} layers")


def uniform(num_layers: int) -> KVLayout:
    return KVLayout((None,), (0,) * num_layers, tuple(range(num_layers)), num_layers)


def kv_layout(windows_per_layer: list[int | None], hybrid: bool = True) -> KVLayout:
    """The layout for layers with these sliding windows (None: full attention); `hybrid` False
    (--disable-hybrid-kv-cache-manager): one group, every layer keeping every token."""
    n = len(windows_per_layer)
    kinds = sorted(set(windows_per_layer), key=lambda w: (w is not None, w or 0))
    if not hybrid or kinds == [None]:
        return uniform(n)
    if len(kinds) == 1:  # every layer slides over the same window: one group
        return KVLayout((kinds[0],), (0,) * n, tuple(range(n)), n)
    size = sum(w is None for w in windows_per_layer) or min(
        sum(w == k for w in windows_per_layer) for k in kinds)
    windows, group, slot = [], [0] * n, [0] * n
    for kind in kinds:
        layers = [i for i, w in enumerate(windows_per_layer) if w == kind]
        for at in range(0, len(layers), size):
            for s, i in enumerate(layers[at:at + size]):
                group[i], slot[i] = len(windows), s
            windows.append(kind)
    return KVLayout(tuple(windows), tuple(group), tuple(slot), size)
