"""What attention needs to know about a flat batch of tokens: one layout, built once a step by
the model runner and read by every backend.

The batch is laid out sequence by sequence, decodes first, then prefill chunks:

    tokens:  | d0 | d1 | ... | d(D-1) | p0 chunk ....... | p1 chunk ... |
             |<- one token each  ->|<- query_lens[i] tokens each   ->|

Sequence i owns rows query_starts[i] .. query_starts[i + 1]; its queries are the last
(query_starts[i + 1] - query_starts[i]) positions of its seq_lens[i] tokens (earlier ones came
from the cache: a prefix hit, an earlier chunk, or both). A decode batch padded to a CUDA-graph
bucket ends in padding sequences: one row each, slot -1 (nothing written), seq_len 1, whose
output nobody reads. Per row, `row_seq` names the row of
`block_tables` and `row_ctx` how many cached tokens it attends to (its position + 1), so decode
and prefill rows are one kind of work for a kernel; the reference walks the sequences instead.

A hybrid KV cache (engine/kv_layout.py) gives each group of layers its own block tables and slot
mapping: `by_layer[i]` is layer i's metadata, one object per group sharing every other field, so a
backend's `derived` views are built once a group; a uniform cache has `by_layer` None and every
layer reads this one (`for_layer`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: where each token's K/V is written
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    row_seq: torch.Tensor  # [num_tokens] int64: each query row's sequence (row of block_tables)
    row_ctx: torch.Tensor  # [num_tokens] int64: cached tokens each query row attends to
    seq_lens: torch.Tensor  # [num_seqs] int64: tokens in the cache after this step
    query_starts: list[int]  # num_seqs + 1 row offsets
    num_decodes: int  # the first num_decodes sequences have one query row each
    # a CUDA graph's fixed decode tile map for the Triton kernel (query starts, tile -> sequence,
    # tile -> first row), so that nothing is built on the host inside a captured step
    static_tiles: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # a backend's own view of this layout, built by the step's first layer, reused by the rest
    derived: dict = field(default_factory=dict)
    by_layer: list["AttentionMetadata"] | None = None  # a hybrid cache's per-layer (per-group) metadata

    def for_layer(self, i: int) -> "AttentionMetadata":
        return self if self.by_layer is None else self.by_layer[i]

    def map_tensors(self, fn) -> "AttentionMetadata":
        """A copy with `fn` applied to every tensor field (to another device), the groups' too."""
        def one(m: "AttentionMetadata") -> "AttentionMetadata":
            return dataclasses.replace(m, by_layer=None, derived={}, **{
                f.name: fn(getattr(m, f.name)) for f in dataclasses.fields(m) if isinstance(getattr(m, f.name), torch.Tensor)})
        out = one(self)
        if self.by_layer is not None:
            groups = {id(m): one(m) for m in self.by_layer}
            out.by_layer = [groups[id(m)] for m in self.by_layer]
        return out

    @classmethod
    def for_sequences(cls, q_lens: list[int], ctx_lens: list[int], tables: list[list[int]], block_size: int,
                      device) -> "AttentionMetadata":
        """The layout of sequences given directly (sequence i computes the last q_lens[i] of its
        ctx_lens[i] tokens, its blocks tables[i]; the leading run of q_len 1 are the decodes, a
        1-token sequence after a longer one a prefill, as the profiling forward's last may be): for
        the profiling forward, kernel tests and benchmarks. The model runner builds the same from a
        step."""
        slots, starts, row_seq, row_ctx = [], [0], [], []
        for i, (ql, ctx, table) in enumerate(zip(q_lens, ctx_lens, tables)):
            for p in range(ctx - ql, ctx):
                slots.append(table[p // block_size] * block_size + p % block_size)
                row_seq.append(i)
                row_ctx.append(p + 1)
            starts.append(starts[-1] + ql)
        width = max(len(t) for t in tables)
        t = lambda x: torch.tensor(x, dtype=torch.long, device=device)
        return cls(t(slots), t([tb + [0] * (width - len(tb)) for tb in tables]), t(row_seq), t(row_ctx),
                   t(list(ctx_lens)), starts, next((i for i, q in enumerate(q_lens) if q != 1), len(q_lens)))
