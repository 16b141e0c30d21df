"""The Triton paged-attention kernel (vidya/attention/triton_paged.py) against the torch
reference (vidya/attention/paged.py), in fp32; on CPU it runs under TRITON_INTERPRET=1 (set by
conftest), on a GPU compiled. Shapes: GQA groups 1-8, head sizes 16-256, block sizes 4 and 16,
contexts crossing blocks, prefix hits and chunked prefill (a chunk after cached tokens), decodes
and chunks in one batch, sliding windows. (The KV-cache write, padded rows included, is the
Triton ops' `rotary_cache`: test_triton_ops.py.)"""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton", reason="the triton package is not installed here")

from vidya.attention import paged as reference  # noqa: E402
from vidya.attention import triton_paged  # noqa: E402
from vidya.attention.metadata import AttentionMetadata  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def batch(q_lens, ctx_lens, block_size, num_blocks, seed=0):
    """A flat batch as the model runner lays it out (decodes first), blocks shuffled so that
    tables are not in order."""
    rng = random.Random(seed)
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-ctx // block_size))] for ctx in ctx_lens]
    return AttentionMetadata.for_sequences(q_lens, ctx_lens, tables, block_size, DEVICE)


CASES = [  # (kv heads, query heads, head size, block size, window)
    (2, 4, 16, 4, None),
    (1, 4, 64, 16, None),  # GQA 4, head size 64
    (2, 16, 128, 16, None),  # GQA 8, head size 128
    (4, 4, 32, 16, None),  # no GQA
    (2, 6, 64, 16, None),  # a group of 3: padded to 4 in the tile
    (2, 8, 128, 16, 7),  # a sliding window shorter than a key tile
    (1, 4, 256, 16, 40),  # Gemma 3's head size, a window crossing tiles
]
# decodes (one row each, contexts inside a block and crossing several), a whole prompt, a chunk
# after a prefix hit, a long chunk after an earlier chunk
Q_LENS = [1, 1, 1, 9, 17, 70]
CTX_LENS = [3, 33, 90, 9, 50, 100]


@pytest.mark.parametrize("kvh,h,d,bs,window", CASES)
def test_matches_the_reference(kvh, h, d, bs, window):
    meta = batch(Q_LENS, CTX_LENS, bs, 200)
    g = torch.Generator(device=DEVICE).manual_seed(kvh * 1000 + d)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=DEVICE)
    k_cache, v_cache = rand(200, bs, kvh, d), rand(200, bs, kvh, d)
    tokens = sum(Q_LENS)
    qkv = rand(tokens, (h + 2 * kvh) * d)  # k and v as strided views of one projection, as the model has them
    q = qkv[:, :h * d].reshape(tokens, h, d)
    k = qkv[:, h * d:(h + kvh) * d].view(tokens, kvh, d)
    v = qkv[:, (h + kvh) * d:].view(tokens, kvh, d)
    want = reference.paged_attention(q, k, v, k_cache, v_cache, meta, 0.125, window)  # the step's K/V written
    got = triton_paged.attend(q, k_cache, v_cache, meta, 0.125, window)  # (q strided, as read from qkv)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kvh,h,d,bs,window", [CASES[2], CASES[5]])
def test_hoppers_decode_tile_matches_the_reference(monkeypatch, kvh, h, d, bs, window):
    """On sm_90 decode rows take another tile (64 keys an iteration: attend_launch); its
    arithmetic, interpreted here, against the reference (the compiled tile: bench/gpu/run.sh)."""
    monkeypatch.setattr(triton_paged, "device_arch", lambda device: 90)
    launch = triton_paged.attend_launch(h, kvh, d, bs, torch.float32, 90)
    assert launch.decode.block_n == 64 and launch.decode != triton_paged.attend_launch(h, kvh, d, bs, torch.float32).decode
    meta = batch(Q_LENS, CTX_LENS, bs, 200)
    k_cache, v_cache = torch.randn(200, bs, kvh, d, device=DEVICE), torch.randn(200, bs, kvh, d, device=DEVICE)
    q = torch.randn(sum(Q_LENS), h, d, device=DEVICE)
    torch.testing.assert_close(triton_paged.attend(q, k_cache, v_cache, meta, 0.125, window),
                               reference.attend(q, k_cache, v_cache, meta, 0.125, window), rtol=1e-4, atol=1e-5)


def test_a_window_changes_the_answer():
    """The window case above is not vacuous: attending without it gives another result."""
    meta = batch(Q_LENS, CTX_LENS, 16, 200)
    k_cache, v_cache = torch.randn(200, 16, 1, 64, device=DEVICE), torch.randn(200, 16, 1, 64, device=DEVICE)
    q = torch.randn(sum(Q_LENS), 4, 64, device=DEVICE)
    windowed = triton_paged.attend(q, k_cache, v_cache, meta, 0.125, 8)
    torch.testing.assert_close(windowed, reference.attend(q, k_cache, v_cache, meta, 0.125, 8), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(windowed, triton_paged.attend(q, k_cache, v_cache, meta, 0.125, None))


def test_a_16_bit_cache_under_fp32_queries():
    meta = batch([1, 5], [20, 30], 16, 10)
    k_cache = torch.randn(10, 16, 2, 32, device=DEVICE).to(torch.bfloat16)
    v_cache = torch.randn(10, 16, 2, 32, device=DEVICE).to(torch.bfloat16)
    q = torch.randn(6, 4, 32, device=DEVICE)
    torch.testing.assert_close(triton_paged.attend(q, k_cache, v_cache, meta, 0.2),
                               reference.attend(q, k_cache, v_cache, meta, 0.2), rtol=1e-4, atol=1e-5)


def test_the_kernels_compile_for_ampere_and_hopper_without_spilling(tmp_path):
    """bench/gpu/compile.py: the launches the engine makes at Llama-3-8B's and Gemma 3 4B's shapes
    (head_dim 128 and 256), in bf16, compiled by Triton for sm_86 (the A10) and sm_90 (H100/H200)
    with no GPU here, the pointers typed as the engine passes them: within shared memory, and no
    register spills on Ampere where Triton's ptxas reports them (with 4 warps the 64-row prefill
    tile at head_dim 128 and the tiles at 256 spilled, and an earlier KV write at 16 elements a
    thread); on Hopper at most compile.py's SPILL_LIMIT (its 64-key decode tile, measured
    faster). RoPE with the KV-cache write, the engine's third launch, is compiled beside them."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    env["PYTHONPATH"] = os.path.join(root, "src") + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, os.path.join(root, "bench", "gpu", "compile.py"), "--arch", "86", "90", "--dtype", "bf16",
                        "--models", "llama-3-8b", "gemma-3-4b", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env={**env, "TRITON_DEFAULT_FP_FUSION": "1"})
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 2 * 3 and all(r["ok"] for r in rows)
    ampere = [r for r in rows if r["arch"] == 86]
    assert all("registers" in r and r["spill_bytes"] == 0 for r in ampere), ampere  # ptxas read every one
    hopper = [r for r in rows if r["arch"] == 90]  # the 64-key decode tile there: a few bytes spilled, measured faster
    assert all(r["spill_bytes"] <= 128 for r in hopper if "spill_bytes" in r), hopper
    # an 8-bit cache (issue 33): e5m2 compiles for both; e4m3 does not for Ampere (Triton converts
    # it from sm_89 on), which is why the platform refuses fp8_e4m3 with Triton on an A10
    for kv, archs in (("fp8_e5m2", ["86", "90"]), ("fp8_e4m3", ["86"])):
        p = subprocess.run([sys.executable, os.path.join(root, "bench", "gpu", "compile.py"), "--arch", *archs, "--dtype",
                            "bf16", "--models", "llama-3-8b", "--kv-cache-dtype", kv, "--json", str(out)],
                           capture_output=True, text=True, timeout=300, env={**env, "TRITON_DEFAULT_FP_FUSION": "1"})
        rows = json.loads(out.read_text())
        if kv == "fp8_e5m2":
            assert p.returncode == 0 and len(rows) == 6 and all(r["ok"] for r in rows), (p.stdout + p.stderr)[-3000:]
            assert all(r["spill_bytes"] == 0 for r in rows if r["arch"] == 86)
        else:
            assert p.returncode == 1 and all("fp8e4nv not supported" in r["error"] for r in rows), rows
