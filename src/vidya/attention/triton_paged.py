"""Paged attention in Triton: the GPU attention backend (and, under TRITON_INTERPRET=1, the same
kernel on CPU for the tests), over a cache the step's K/V are already in (ops/triton_kernels.py's
`rotary_cache` writes them). Same contract as the reference's `attend` in attention/paged.py.

    attend      one program per (query tile, KV head) over the engine's flat batch, decodes and
                prefill chunks alike: a tile is up to BLOCK_Q consecutive query rows of one
                sequence times the GQA group of query heads that share the KV head (BLOCK_Q * G_PAD
                rows of one matrix, so K/V are read once for the group), walking the sequence's
                keys BLOCK_N at a time through its block table with an online softmax in fp32.
                Causal per row (row position = seq_len - q_len + row), and within the last
                `window` positions where one is given (Gemma 3's local layers); key tiles wholly
                before the window are skipped.

The tile maps (which sequence and first row each program takes) are built on the host from
`meta.query_starts`, once per step (all layers share them).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vidya.attention.metadata import AttentionMetadata

BLOCK_M = 64  # query rows (positions x heads of a group) per program of a prefill chunk (32 at head_dim 256)
BLOCK_N = 32  # keys per inner iteration (decode tiles: see attend_launch)
NO_WINDOW = 1 << 30  # a layer without a sliding window sees every earlier position


# Triton compiles a kernel anew for each specialisation of its integer arguments (1, a multiple of
# 16, other) and pointer alignments: the block-table width changes every step, so it is not
# specialised on (model_runner aligns the step's tensors)
@triton.jit(do_not_specialize=["stride_bt"])
def _attend_kernel(out_ptr, q_ptr, kc_ptr, vc_ptr, bt_ptr, seq_lens_ptr, qstart_ptr, tile_seq_ptr, tile_q0_ptr,
                   scale, window, v_scale,
                   stride_qt, stride_qh, stride_ot, stride_oh,
                   stride_cb, stride_cs, stride_ch, stride_bt,
                   G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                   BS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, IEEE: tl.constexpr):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.load(tile_seq_ptr + tile)
    q0 = tl.load(tile_q0_ptr + tile)
    row0 = tl.load(qstart_ptr + s)
    q_len = tl.load(qstart_ptr + s + 1) - row0
    ctx = tl.load(seq_lens_ptr + s)

    m = tl.arange(0, BLOCK_Q * G_PAD)
    qi = q0 + m // G_PAD  # query row within the sequence's chunk
    g = m % G_PAD
    row_ok = (qi < q_len) & (g < G)
    pos = ctx - q_len + qi  # the row's token position: it sees keys 0..pos
    head = kvh * G + g
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    q = tl.load(q_ptr + (row0 + qi)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_Q * G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * G_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * G_PAD, D_PAD], tl.float32)
    first_pos = ctx - q_len + q0
    hi = tl.minimum(ctx, first_pos + BLOCK_Q)  # one past the tile's last key
    lo = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N  # key tiles before the window: skipped
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < hi
        blk = tl.load(bt_ptr + s * stride_bt + j // BS, mask=j_ok, other=0)
        kv_off = blk * stride_cb + (j % BS) * stride_cs + kvh * stride_ch
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(kc_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(vc_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = scores * scale
        see = (j[None, :] <= pos[:, None]) & (j[None, :] > pos[:, None] - window) & j_ok[None, :] & row_ok[:, None]
        scores = tl.where(see, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None] * v_scale  # (an 8-bit cache's V scale; else 1)
    tl.store(out_ptr + (row0 + qi)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _pow2(n: int, at_least: int = 1) -> int:
    return max(at_least, 1 << (max(n, 1) - 1).bit_length())


def tile_maps(meta: AttentionMetadata, launch: "AttendLaunch", device: torch.device):
    """(query_starts, [(tile, tile_seq, tile_q0) for the decode rows, then the prefill chunks]),
    as device tensors, `tile` the part's Tile; a part with no tiles is left out."""
    if meta.static_tiles is not None:  # a captured decode step: one tile per sequence
        starts_t, tile_seq, tile_q0 = meta.static_tiles
        return starts_t, [(launch.decode, tile_seq, tile_q0)]
    key = ("triton_tiles", launch)
    if key in meta.derived:
        return meta.derived[key]
    starts = meta.query_starts
    as_t = lambda x: torch.tensor(x, dtype=torch.int32, device=device)
    parts = []
    for tile, seqs in ((launch.decode, range(meta.num_decodes)), (launch.prefill, range(meta.num_decodes, len(starts) - 1))):
        tile_seq, tile_q0 = [], []
        for i in seqs:
            for q0 in range(0, starts[i + 1] - starts[i], tile.block_q):
                tile_seq.append(i)
                tile_q0.append(q0)
        if tile_seq:
            parts.append((tile, as_t(tile_seq), as_t(tile_q0)))
    meta.derived[key] = (as_t(starts), parts)
    return meta.derived[key]


@dataclass(frozen=True, slots=True)
class Tile:
    """One kind of program's launch: query rows (positions) and keys per iteration, warps, and
    pipeline stages of the key loop (None: Triton's default)."""
    block_q: int
    block_n: int
    num_warps: int
    num_stages: int | None = None

    def kwargs(self) -> dict:
        out = {"BLOCK_Q": self.block_q, "BLOCK_N": self.block_n, "num_warps": self.num_warps}
        return out if self.num_stages is None else {**out, "num_stages": self.num_stages}


@dataclass(frozen=True, slots=True)
class AttendLaunch:
    """The attention kernel's compile-time constants and its two kinds of tile for one model shape."""
    constants: tuple  # (name, value) pairs shared by every call (hashable: the tile maps are cached by launch)
    decode: Tile  # a decode sequence has one query row: its tile is the group's heads (>= 16 rows for tl.dot)
    prefill: Tile


def _warps(rows: int, d_pad: int) -> int:
    """8 warps for tiles of 4,096 elements or more (16 x 256, 64 x 128), else 4: with 4, Triton's
    compiler spilled registers on sm_80, sm_86 and sm_90 (bench/gpu/compile.py)."""
    return 8 if rows * d_pad >= 4096 else 4


@functools.cache
def device_arch(device: torch.device) -> int:
    """The GPU's compute capability as 86, 90, ...; 0 off CUDA (the interpreter)."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@functools.cache  # once per model shape, not per layer and step
def attend_launch(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                  arch: int = 0) -> AttendLaunch:
    """Prefill tiles of BLOCK_M rows (32 at head_dim 256, where 64 spilled even with 8 warps).
    On Hopper (arch 90) decode tiles walk 64 keys an iteration, two stages deep, where the head is
    at most 128 wide: at Llama-3-8B's shape (256 decodes, ~640 tokens of context) that read the KV
    cache at 85% of the H200's copy bandwidth against 77% with 32 keys (bench/gpu/profile_decode.py),
    though ptxas reports ~100 bytes spilled. Elsewhere, unmeasured, the 32-key tile that spills none."""
    group = num_heads // num_kv_heads
    g_pad = _pow2(group)
    d_pad = _pow2(head_dim, 16)
    constants = (("G", group), ("G_PAD", g_pad), ("BS", block_size), ("D", head_dim), ("D_PAD", d_pad),
                 ("IEEE", dtype == torch.float32))
    q_decode = max(1, 16 // g_pad)
    q_prefill = max(1, (BLOCK_M // 2 if d_pad >= 256 else BLOCK_M) // g_pad)
    wide = d_pad <= 128 and arch == 90
    decode = Tile(q_decode, 64 if wide else BLOCK_N, _warps(q_decode * g_pad, d_pad), 2 if wide else None)
    prefill = Tile(q_prefill, BLOCK_N, _warps(q_prefill * g_pad, d_pad))
    return AttendLaunch(constants, decode, prefill)


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
           scale: float, window: int | None = None, kv_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """q: [T, H, d] (last dim contiguous) over a cache the step's K/V are already in -> [T, H, d].
    Decode rows and prefill chunks are two launches of one kernel, each with its own tile height.
    An 8-bit cache's values are widened to q's dtype as they load; its K scale folds into the
    softmax scale, its V scale into the output."""
    t, h, d = q.shape
    out = torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    kvh = k_cache.shape[2]
    launch = attend_launch(h, kvh, d, k_cache.shape[1], q.dtype, device_arch(q.device))
    starts, parts = tile_maps(meta, launch, q.device)
    bt = meta.block_tables
    for tile, tile_seq, tile_q0 in parts:
        _attend_kernel[(tile_seq.shape[0], kvh)](
            out, q, k_cache, v_cache, bt, meta.seq_lens, starts, tile_seq, tile_q0,
            float(scale * kv_scales[0]), int(window or NO_WINDOW), float(kv_scales[1]),
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), bt.stride(0),
            **tile.kwargs(), **dict(launch.constants))
    return out

