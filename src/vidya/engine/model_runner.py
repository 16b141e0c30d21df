"""Owns the model and its paged KV cache; turns a SchedulerOutput into one forward pass and
returns the logits of the rows that sample."""
from __future__ import annotations

import array
import math
import mmap
from dataclasses import dataclass

import torch

from vidya.attention import AttentionMetadata
from vidya.config import CacheConfig
from vidya.engine.cuda_graphs import DecodeGraphs, bucket_for
from vidya.engine.kv_layout import KVLayout, kv_layout
from vidya.engine.request import Request
from vidya.engine.scheduler import SchedulerOutput
from vidya.engine.tensor_parallel import Step
from vidya.models.llama import head_dim_of
from vidya.platform import return_freed_memory

GiB = 1 << 30
DEFAULT_CPU_KV_CACHE_GIB = 4.0


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype, layers: int | None = None) -> int:
    """A block's bytes: K and V of `block_size` tokens in `layers` layers (a hybrid layout's
    `slots`; every layer by default)."""
    per_token = 2 * (layers or config.num_hidden_layers) * config.num_key_value_heads * head_dim_of(config)
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


def model_layout(model, hybrid: bool = True) -> KVLayout:
    """The KV layout of a built model, from its layers' sliding windows (engine/kv_layout.py)."""
    return kv_layout([layer.self_attn.sliding_window for layer in model.model.layers], hybrid)


GRAPH_MARGIN = 256 << 20  # CUDA graphs' pool and allocator slack, allocated after the KV cache


def num_kv_blocks(cache: CacheConfig, model_config, dtype: torch.dtype, device: torch.device,
                  max_useful: int, activation_bytes: int = 0, layers: int | None = None) -> int:
    """Blocks that fit the memory budget, but no more than `max_useful` (every sequence at
    max_model_len at once): a small model must not allocate millions of idle blocks. On a GPU the
    budget is --gpu-memory-utilization of its memory less what is in use (weights, CUDA context,
    anything else on the GPU), the peak activations a profiling forward measured
    (`profile_forward`) and a margin for CUDA graphs, as vLLM sizes it."""
    if cache.num_gpu_blocks_override is not None:
        return cache.num_gpu_blocks_override
    per_block = kv_bytes_per_block(model_config, cache.block_size, dtype, layers)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = total * cache.gpu_memory_utilization - (total - free) - activation_bytes - GRAPH_MARGIN
    else:
        budget = (cache.kv_cache_memory or DEFAULT_CPU_KV_CACHE_GIB) * GiB
    n = min(int(budget // per_block), max_useful)
    if n < 1:
        raise ValueError("No memory is left for the KV cache: raise --gpu-memory-utilization or "
                         "--kv-cache-memory, or use a smaller model")
    return n


@torch.inference_mode()
def profile_forward(model, ops, model_config, num_tokens: int, max_len: int, num_sample_rows: int,
                    block_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """Run the largest step the scheduler can send (`num_tokens` prompt tokens in sequences of at
    most `max_len`, then logits for `num_sample_rows` rows) over a scratch KV cache just big
    enough, and return the peak memory it needed beyond what was allocated before, the scratch
    cache not counted (CUDA; 0 elsewhere, where the forward still runs as a check)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    lens = [min(max_len, num_tokens - i) for i in range(0, num_tokens, max_len)]
    per_seq = -(-max(lens) // block_size)
    kvh, d = model_config.num_key_value_heads, head_dim_of(model_config)
    shape = (per_seq * len(lens), block_size, kvh, d)
    caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
              for _ in range(model_config.num_hidden_layers)]
    cache_bytes = 2 * len(caches) * math.prod(shape) * caches[0][0].element_size()
    tensor = lambda x: torch.tensor(x, dtype=torch.long, device=device)
    positions = [p for n in lens for p in range(n)]
    tables = [[i * per_seq + b for b in range(per_seq)] for i in range(len(lens))]
    meta = AttentionMetadata.for_sequences(lens, lens, tables, block_size, device)
    ids = tensor([1] * num_tokens)
    hidden = model(ids, tensor(positions), caches, meta, ops)
    rows = hidden[-min(num_sample_rows, num_tokens):]
    ops.logits(model.lm_head, rows).float().softmax(dim=-1)  # the sampler's float32 copy of the logits
    if not cuda:
        return 0
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base - cache_bytes
    del caches, hidden, rows
    torch.cuda.empty_cache()
    return max(0, peak)


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
    """Runs the model with the ops backend chosen at start-up (`ops`, from vidya/platform.py)."""

    def __init__(self, model, model_config, cache: CacheConfig, num_blocks: int, platform, ops,
                 layout: KVLayout | None = None) -> None:
        """`layout`: which cache tensor and block table each layer uses (model_layout); uniform
        when None."""
        self.model = model
        self.device = platform.device
        self.ops = ops
        ops.prepare(model)
        return_freed_memory()
        self.block_size = cache.block_size
        self.decode_buckets: list[int] = []  # decode-only batches are padded to these sizes (CUDA graphs)
        self.graphs = None  # DecodeGraphs, once captured
        self.padded_rows = 0  # padding rows run so far
        self.workers = None  # tensor_parallel.Workers on rank 0 of a tensor-parallel group
        self.layout = layout or model_layout(model, hybrid=False)
        kvh, d = model_config.num_key_value_heads, head_dim_of(model_config)
        shape = (num_blocks, cache.block_size, kvh, d)
        dtype, device = platform.kv_dtype, platform.device
        self._kv_memory = None
        slots = self.layout.slots
        if device.type == "cpu":
            flat, self._kv_memory = cpu_zeros_huge_pages(2 * slots * math.prod(shape), dtype)
            caches = flat.view(slots, 2, *shape)
            slot_caches = [(caches[i, 0], caches[i, 1]) for i in range(slots)]
        else:
            slot_caches = [(torch.zeros(shape, dtype=dtype, device=device),
                            torch.zeros(shape, dtype=dtype, device=device)) for _ in range(slots)]
        # each layer's (K, V): layers of different groups share a tensor at different block ids
        self.kv_caches = [slot_caches[s] for s in self.layout.layer_slot]

    def prepare(self, out: SchedulerOutput, pad_to: int = 0) -> ModelInput:
        """The step's flat batch and its one attention-metadata layout (decodes first; a hybrid
        cache's groups each get their slot mapping and block tables). A batch of decodes only may
        be padded to `pad_to` sequences (a CUDA-graph bucket): padding rows read token 0 at
        position 0, write no KV (slot -1) and attend to one key of block 0."""
        bs, groups = self.block_size, len(self.layout.windows)
        decodes, prefills = [], []
        for s in out.scheduled:
            (decodes if s.num_new_tokens == 1 and s.samples else prefills).append(s)
        # decodes first, then prefill chunks shortest first (a backend may send the long ones,
        # a suffix of the batch, to another kernel)
        prefills.sort(key=lambda s: s.num_new_tokens)
        # decodes: one row each, and each samples (a step planned ahead: its input token is not
        # on the host yet, 0 here until `execute` puts the step before's on the device)
        positions = [s.start if s.start >= 0 else s.request.num_computed_tokens for s in decodes]
        ids = [s.request.all_token_ids[p] if p < s.request.num_tokens else 0 for s, p in zip(decodes, positions)]
        slots = [[s.block_ids[g][p // bs] * bs + p % bs for s, p in zip(decodes, positions)] for g in range(groups)]
        n = len(decodes)
        row_seq, starts, logits_rows = list(range(n)), list(range(n + 1)), list(range(n))
        seq_lens = [p + 1 for p in positions]
        sampling = [s.request for s in decodes]
        for i, s in enumerate(prefills, start=n):
            r, start = s.request, s.request.num_computed_tokens
            end = start + s.num_new_tokens
            ids.extend(r.all_token_ids[start:end])
            positions.extend(range(start, end))
            for g in range(groups):
                table = s.block_ids[g]
                slots[g].extend(table[p // bs] * bs + p % bs for p in range(start, end))
            row_seq.extend([i] * s.num_new_tokens)
            starts.append(len(ids))
            seq_lens.append(end)
            if s.samples:
                logits_rows.append(len(ids) - 1)
                sampling.append(r)
        tables = [[s.block_ids[g] for s in decodes] + [s.block_ids[g] for s in prefills] for g in range(groups)]
        for i in range(len(out.scheduled), pad_to):
            ids.append(0)
            positions.append(0)
            row_seq.append(i)
            starts.append(len(ids))
            seq_lens.append(1)
            for g in range(groups):
                slots[g].append(-1)
                tables[g].append([0])
        width = max((len(t) for ts in tables for t in ts), default=1)
        num_seqs = len(tables[0])
        # one host list, one tensor, one copy to the device; the fields are views of it, each
        # starting 16-byte aligned (an even number of int64s): Triton compiles a kernel anew for
        # each alignment of its pointer arguments, and an odd token count would flip it each step
        fields = (ids, positions, row_seq, [p + 1 for p in positions], seq_lens, logits_rows, *slots)
        flat = []
        for field in fields:
            flat += field
            flat += [0] * (len(field) & 1)
        for ts in tables:
            for table in ts:
                flat += table
                flat += [0] * (width - len(table))
            flat += [0] * (num_seqs * width & 1)
        # (through array: 3-4x faster than torch.tensor on a list of ~12k ints, 0.6 ms a 256-decode step)
        host = self.to_device(torch.frombuffer(array.array("q", flat), dtype=torch.long))
        parts, at = [], 0
        for size in [len(f) for f in fields] + [num_seqs * width] * groups:
            parts.append(host[at:at + size])
            at += size + (size & 1)
        shared = dict(row_seq=parts[2], row_ctx=parts[3], seq_lens=parts[4], query_starts=starts,
                      num_decodes=n + max(0, pad_to - len(out.scheduled)))
        metas = [AttentionMetadata(slot_mapping=parts[6 + g], block_tables=parts[6 + groups + g].view(num_seqs, width),
                                   **shared) for g in range(groups)]
        meta = metas[0]
        if self.layout.is_hybrid:
            meta.by_layer = [metas[g] for g in self.layout.layer_group]
        return ModelInput(parts[0], parts[1], meta, parts[5], sampling)

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device without waiting for the device: on a GPU through pinned
        memory, copied behind the work already queued (a plain copy would wait for it, and a
        step planned ahead would wait for the step it follows)."""
        if self.device.type != "cuda":
            return host.to(self.device)
        pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        pinned.copy_(host)  # (the host allocator keeps it until the copy has run)
        return pinned.to(self.device, non_blocking=True)

    def to_host(self, device_tensor: torch.Tensor):
        """(a host copy of a device tensor, queued now, and an event to wait on before reading it;
        None off a GPU, where the tensor is on the host already). Queued before a step planned
        ahead is launched, so reading it waits for this step alone, not for the next as well."""
        if self.device.type != "cuda":
            return device_tensor, None
        host = torch.empty(device_tensor.shape, dtype=device_tensor.dtype, pin_memory=True)
        host.copy_(device_tensor, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready

    def graph_holds(self, num_decodes: int) -> bool:
        """Whether a decode step of this many rows replays a captured CUDA graph."""
        return self.graphs is not None and bucket_for(num_decodes, self.decode_buckets) > 0

    @torch.inference_mode()
    def forward(self, step: Step) -> None:
        """A tensor-parallel worker's part of rank 0's step: the forward on this rank's shard and
        its slice of the logits, which the ops gather to rank 0."""
        input_ids, positions, meta, logits_indices = step.input_ids, step.positions, step.meta, step.logits_indices
        if input_ids.device != self.device:  # (rank 0's tensors arrive on rank 0's GPU)
            to = lambda t: t.to(self.device)
            input_ids, positions, logits_indices = to(input_ids), to(positions), to(logits_indices)
            meta = meta.map_tensors(to)
        hidden = self.model(input_ids, positions, self.kv_caches, meta, self.ops)
        if logits_indices.numel():
            self.ops.logits(self.model.lm_head, hidden[logits_indices])

    def _bucket(self, out: SchedulerOutput) -> int:
        """The bucket a decode-only step is padded to; 0 for a step with prefill rows or too many rows."""
        if not self.decode_buckets or not all(s.num_new_tokens == 1 and s.samples for s in out.scheduled):
            return 0
        return bucket_for(len(out.scheduled), self.decode_buckets)

    @torch.inference_mode()
    def capture_decode_graphs(self, buckets: list[int], max_blocks_per_seq: int) -> float:
        """Capture one CUDA graph per decode bucket; returns the seconds it took."""
        self.graphs = DecodeGraphs(self.model, self.ops, self.kv_caches, buckets, max_blocks_per_seq, self.device,
                                   self.layout)
        self.decode_buckets = buckets
        return self.graphs.capture_seconds

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, argmax_only=None,
                inputs_from: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> tuple[torch.Tensor, list[Request], bool]:
        """Runs the step; returns (logits of the rows that sample, their requests, False), or,
        when `argmax_only(requests)` says every one of them just takes the argmax, (their token
        ids on the device, requests, True). `inputs_from` = (token ids the step before sampled,
        on the device; which of them, in this step's row order, or None for the first rows): a
        step planned ahead (`Scheduler.schedule_ahead`) takes its input tokens there, never
        through the host."""
        pad = self._bucket(out)
        inp = self.prepare(out, pad)
        if inputs_from is not None:
            prev, rows = inputs_from
            n = len(out.scheduled)
            inp.input_ids[:n].copy_(prev[:n] if rows is None else prev.index_select(0, rows))
        if pad:
            self.padded_rows += pad - len(out.scheduled)
        if self.workers is not None:  # every rank runs the same step on its shard
            self.workers.send(Step.on_host(inp.input_ids, inp.positions, inp.meta, inp.logits_indices))
        if pad and self.graphs is not None:
            hidden = self.graphs.replay(inp.input_ids, inp.positions, inp.meta)
        else:
            hidden = self.model(inp.input_ids, inp.positions, self.kv_caches, inp.meta, self.ops)
        if not inp.sampling_requests:
            return hidden.new_empty((0, 0)), [], False
        rows = hidden[inp.logits_indices]
        if argmax_only is not None and argmax_only(inp.sampling_requests):
            ids = self.ops.argmax(self.model.lm_head, rows)
            if ids is None:  # (the sampler's greedy pick, the same function, kept on the device)
                ids = self.ops.first_max(self.ops.logits(self.model.lm_head, rows))
            return ids, inp.sampling_requests, True
        return self.ops.logits(self.model.lm_head, rows), inp.sampling_requests, False
