"""What attention needs to know about a flat batch of tokens.

The batch is laid out decodes first, then prefill chunks:

    tokens:  | d0 | d1 | ... | d(D-1) | p0 chunk ....... | p1 chunk ... |
             |<- one token each  ->|<- query_lens[i] tokens each   ->|

A decode's query is one token at position seq_len - 1. A prefill chunk's queries are the
last `query_len` positions of its `seq_len` tokens (earlier ones came from the cache: a prefix
hit, an earlier chunk, or both).

The C++ kernel sees the same batch row by row instead (`RowIndex`): every query row names its
sequence's block table and how many cached tokens it attends to (its position + 1), so decode
and prefill rows are one kind of work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class RowIndex:
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    row_seq: torch.Tensor  # [num_tokens] int64: the row of block_tables of each query row
    row_ctx: torch.Tensor  # [num_tokens] int64: cached tokens the query row attends to


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: where each token's K/V is written
    num_decodes: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int64 (padded with 0)
    decode_seq_lens: torch.Tensor  # [num_decodes] int64
    decode_max_seq_len: int
    # one entry per prefill chunk: (query_start, query_len, seq_len, block_table [n] int64)
    prefills: list[tuple[int, int, int, torch.Tensor]]
    block_size: int
    rows: RowIndex | None = None  # set when the C++ kernel runs this step
