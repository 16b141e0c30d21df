"""Owns the model and its paged KV cache; turns a SchedulerOutput into one forward pass and
returns the logits of the rows that sample."""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch

from vidya.attention import AttentionMetadata, cpu_kernels
from vidya.attention.metadata import RowIndex
from vidya.config import CacheConfig
from vidya.engine.request import Request
from vidya.engine.scheduler import ScheduledRequest, SchedulerOutput
from vidya.models.llama import head_dim_of
from vidya.platform import return_freed_memory

GiB = 1 << 30
DEFAULT_CPU_KV_CACHE_GIB = 4.0


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim_of(config)
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


def num_kv_blocks(cache: CacheConfig, model_config, dtype: torch.dtype, device: torch.device,
                  max_useful: int) -> int:
    """Blocks that fit the memory budget, but no more than `max_useful` (every sequence at
    max_model_len at once): a small model must not allocate millions of idle blocks."""
    if cache.num_gpu_blocks_override is not None:
        return cache.num_gpu_blocks_override
    per_block = kv_bytes_per_block(model_config, cache.block_size, dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = total * cache.gpu_memory_utilization - (total - free) - 0.5 * GiB  # activations
    else:
        budget = (cache.kv_cache_memory or DEFAULT_CPU_KV_CACHE_GIB) * GiB
    n = min(int(budget // per_block), max_useful)
    if n < 1:
        raise ValueError("No memory is left for the KV cache: raise --gpu-memory-utilization or "
                         "--kv-cache-memory, or use a smaller model")
    return n


def cpu_zeros_huge_pages(numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, mmap.mmap]:
    """A zeroed CPU tensor in anonymous memory advised to use transparent huge pages, every page
    faulted in: the KV cache is read block by block all over a large buffer, and 4 KiB pages make
    every block a TLB miss (measured: paged decode attention ~25% faster). Returns the mapping to
    keep it alive."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    mem = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mem.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # THP off: still correct, just 4 KiB pages
    t = torch.frombuffer(mem, dtype=dtype, count=numel)
    # touch every page now (as allocating with torch.zeros would): faulting in fresh pages while
    # a prefill writes its K/V costs a quarter of that step (measured), and the first requests
    # should see the steady-state speed
    t.zero_()
    return t, mem


@dataclass(slots=True)
class ModelInput:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the flat batch whose next token is sampled
    sampling_requests: list[Request]  # in the order of logits_indices


class ModelRunner:
    def __init__(self, model, model_config, cache: CacheConfig, num_blocks: int,
                 dtype: torch.dtype, device: torch.device, attention_backend: str = "auto") -> None:
        self.model = model
        self.device = device
        self.use_kernel = self._use_kernel(attention_backend, device)
        if self.use_kernel and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
            amx = cpu_kernels.amx_available()
            # with AMX, oneDNN only runs the big (prefill) batches: lay its weights out for those
            model.pack_linears(batch_hint=4096 if amx else 64, amx=amx)
            return_freed_memory()
        self.block_size = cache.block_size
        kvh, d = model_config.num_key_value_heads, head_dim_of(model_config)
        shape = (num_blocks, cache.block_size, kvh, d)
        self._kv_memory = None
        if device.type == "cpu":
            flat, self._kv_memory = cpu_zeros_huge_pages(2 * model_config.num_hidden_layers * math.prod(shape), dtype)
            caches = flat.view(model_config.num_hidden_layers, 2, *shape)
            self.kv_caches = [(caches[i, 0], caches[i, 1]) for i in range(model_config.num_hidden_layers)]
        else:
            self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device),
                               torch.zeros(shape, dtype=dtype, device=device))
                              for _ in range(model_config.num_hidden_layers)]

    @staticmethod
    def _use_kernel(backend: str, device: torch.device) -> bool:
        if backend == "torch" or device.type != "cpu":
            return False
        ok = cpu_kernels.available()
        if backend == "cpu" and not ok:
            raise ValueError("attention_backend 'cpu' needs the C++ kernels, which failed to build "
                             "(is a C++ compiler installed?); use 'auto' or 'torch'")
        return ok

    def _row_index(self, scheduled: list[ScheduledRequest]) -> RowIndex:
        """Per query row: its sequence's block-table row and its context length (position + 1)."""
        row_seq: list[int] = []
        row_ctx: list[int] = []
        for i, s in enumerate(scheduled):
            start = s.request.num_computed_tokens
            row_seq.extend([i] * s.num_new_tokens)
            row_ctx.extend(range(start + 1, start + s.num_new_tokens + 1))
        width = max(len(s.block_ids) for s in scheduled)
        tables = [s.block_ids + [0] * (width - len(s.block_ids)) for s in scheduled]
        dev = self.device
        return RowIndex(torch.tensor(tables, dtype=torch.long, device=dev),
                        torch.tensor(row_seq, dtype=torch.long, device=dev),
                        torch.tensor(row_ctx, dtype=torch.long, device=dev))

    def prepare(self, out: SchedulerOutput) -> ModelInput:
        bs = self.block_size
        decodes = [s for s in out.scheduled if s.num_new_tokens == 1 and s.samples]
        prefills = [s for s in out.scheduled if not (s.num_new_tokens == 1 and s.samples)]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        sampling: list[Request] = []
        prefill_meta = []

        def add(s: ScheduledRequest) -> None:
            r, start = s.request, s.request.num_computed_tokens
            end = start + s.num_new_tokens
            ids.extend(r.all_token_ids[start:end])
            positions.extend(range(start, end))
            table = s.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if s.samples:
                logits_rows.append(len(ids) - 1)
                sampling.append(r)

        for s in decodes:
            add(s)
        for s in prefills:
            q_start = len(ids)
            add(s)
            seq_len = s.request.num_computed_tokens + s.num_new_tokens
            prefill_meta.append((q_start, s.num_new_tokens, seq_len,
                                 torch.tensor(s.block_ids, dtype=torch.long, device=self.device)))
        dev = self.device
        if decodes:
            width = max(len(s.block_ids) for s in decodes)
            tables = torch.tensor([s.block_ids + [0] * (width - len(s.block_ids)) for s in decodes],
                                  dtype=torch.long, device=dev)
            lens = [s.request.num_computed_tokens + 1 for s in decodes]
        else:
            tables, lens = torch.zeros((0, 1), dtype=torch.long, device=dev), []
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decodes=len(decodes),
            decode_block_tables=tables,
            decode_seq_lens=torch.tensor(lens, dtype=torch.long, device=dev),
            decode_max_seq_len=max(lens, default=0),
            prefills=prefill_meta,
            block_size=bs,
            rows=self._row_index(decodes + prefills) if self.use_kernel else None,
        )
        return ModelInput(torch.tensor(ids, dtype=torch.long, device=dev),
                          torch.tensor(positions, dtype=torch.long, device=dev), meta,
                          torch.tensor(logits_rows, dtype=torch.long, device=dev), sampling)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, argmax_only=None) -> tuple[torch.Tensor, list[Request], bool]:
        """Runs the step; returns (logits of the rows that sample, their requests, False), or,
        when `argmax_only(requests)` says every one of them just takes the argmax and the model
        can fuse it into the lm_head, (their token ids, requests, True)."""
        inp = self.prepare(out)
        hidden = self.model(inp.input_ids, inp.positions, self.kv_caches, inp.meta, fused=self.use_kernel)
        if not inp.sampling_requests:
            return hidden.new_empty((0, 0)), [], False
        rows = hidden[inp.logits_indices]
        if argmax_only is not None and self.model.can_argmax(rows) and argmax_only(inp.sampling_requests):
            return self.model.compute_argmax(rows), inp.sampling_requests, True
        return self.model.compute_logits(rows), inp.sampling_requests, False
