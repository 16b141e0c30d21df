"""CUDA graphs for decode steps, as vLLM captures them: a decode step of a few hundred small
kernels is bound by their launches, so the forward of each batch-size bucket is captured once at
start-up and replayed with one launch.

A step of n decodes (no prefill rows) is padded to the smallest bucket >= n (the model runner's
`prepare(pad_to=...)`: padding rows write no KV and nobody reads their output); its inputs are
copied into static buffers that every graph reads, the bucket's graph replays, and the hidden rows
come back from the graph's static output. Steps with prefill rows, or more decodes than the largest
bucket, run eagerly. Only the Triton attention backend is captured (the reference attention asks
the host for lengths, which a graph cannot), and only on CUDA; `--enforce-eager` turns it off.
"""
from __future__ import annotations

import bisect
import time

import torch

from vidya.attention.metadata import AttentionMetadata

LARGEST_BUCKET = 512


def decode_buckets(max_num_seqs: int) -> list[int]:
    """vLLM's sizes, 1, 2, 4, then every 8, up to the first that holds max_num_seqs (at most 512)."""
    sizes = [1, 2, 4] + list(range(8, LARGEST_BUCKET + 1, 8))
    i = bisect.bisect_left(sizes, max_num_seqs)
    return sizes[:i + 1]


def bucket_for(n: int, buckets: list[int]) -> int:
    """The smallest bucket that holds n rows; 0 when none does."""
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else 0


class DecodeGraphs:
    """One captured forward per bucket, all reading the same static inputs."""

    def __init__(self, model, ops, kv_caches, buckets: list[int], max_blocks_per_seq: int,
                 device: torch.device, layout=None) -> None:
        """`layout` (engine/kv_layout.py): a hybrid cache's groups each get static slots and tables."""
        n = buckets[-1]
        self.layout = layout
        groups = len(layout.windows) if layout is not None else 1
        longs = lambda *shape: torch.zeros(shape, dtype=torch.long, device=device)
        self.input_ids, self.positions = longs(n), longs(n)
        # until a step copies its slots in: write nothing
        self.slot_mappings = [longs(n) - 1 for _ in range(groups)]
        self.seq_lens = longs(n) + 1
        self.block_tables = [longs(n, max_blocks_per_seq) for _ in range(groups)]
        self.row_seq = torch.arange(n, device=device)
        self.row_ctx = longs(n) + 1
        ints = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.tiles = (ints, ints[:n], torch.zeros(n, dtype=torch.int32, device=device))
        self.graphs: dict = {}  # bucket -> its torch.cuda.CUDAGraph
        self.outputs: dict[int, torch.Tensor] = {}
        self._pool = None  # the graphs' shared memory pool, made at the first capture
        t0 = time.perf_counter()
        for b in reversed(buckets):  # the largest first: the others fit in its memory
            meta = self._meta(b)
            run = lambda b=b, meta=meta: model(self.input_ids[:b], self.positions[:b], kv_caches, meta, ops)
            self.graphs[b], self.outputs[b] = self.capture(run, device)
        self.capture_seconds = time.perf_counter() - t0

    def capture(self, run, device: torch.device):
        """(graph, its static output) of `run`, which reads only the static buffers. The tests
        replace this with an eager stand-in to run the replay path on CPU."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        run()  # compiles this shape's kernels, outside the capture
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = run()
        torch.cuda.synchronize(device)
        return graph, out

    def _meta(self, b: int) -> AttentionMetadata:
        starts, tile_seq, tile_q0 = self.tiles
        metas = [AttentionMetadata(slots[:b], tables[:b], self.row_seq[:b], self.row_ctx[:b], self.seq_lens[:b],
                                   list(range(b + 1)), b, static_tiles=(starts[:b + 1], tile_seq[:b], tile_q0[:b]))
                 for slots, tables in zip(self.slot_mappings, self.block_tables)]
        if self.layout is not None and self.layout.is_hybrid:
            metas[0].by_layer = [metas[g] for g in self.layout.layer_group]
        return metas[0]

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The hidden rows of a padded decode batch (its size one of the buckets)."""
        b = input_ids.shape[0]
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.seq_lens[:b].copy_(meta.seq_lens)
        groups = [meta] if meta.by_layer is None else [  # each group's metadata: its first layer's
            meta.by_layer[self.layout.layer_group.index(g)] for g in range(len(self.slot_mappings))]
        for m, slots, tables in zip(groups, self.slot_mappings, self.block_tables):
            slots[:b].copy_(m.slot_mapping)
            tables[:b, :m.block_tables.shape[1]].copy_(m.block_tables)
        self.graphs[b].replay()
        return self.outputs[b]
