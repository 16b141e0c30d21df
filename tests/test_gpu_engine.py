"""The GPU engine's start-up arithmetic, checked on any machine: the profiling forward that
measures peak activations (it runs here too, on the real model, as a check of the batch it
builds) and the KV-cache budget from --gpu-memory-utilization. The kernels are in
test_triton_attention.py, bucket padding in test_equivalence.py; bench/gpu/run.sh runs the rest on
a GPU."""
from __future__ import annotations

import pytest
import torch

from conftest import make_engine
from vidya.config import CacheConfig
from vidya.engine import model_runner
from vidya.engine.model_runner import GRAPH_MARGIN, kv_bytes_per_block, num_kv_blocks, profile_forward

GiB = 1 << 30


@pytest.mark.parametrize("arch", ("llama", "gemma3"))
def test_the_profiling_forward_runs_the_largest_step(arch, tiny_models):
    """max_num_batched_tokens prompt tokens split into sequences of at most max_model_len: the
    forward runs over its scratch cache (on CPU nothing is measured)."""
    engine = make_engine(tiny_models[arch][0], backend="torch")
    r = engine.runner
    assert profile_forward(r.model, r.ops, engine.model_config, 50, 20, 8, 4, torch.float32, torch.device("cpu")) == 0
    assert profile_forward(r.model, r.ops, engine.model_config, 7, 512, 256, 16, torch.float32, torch.device("cpu")) == 0


def test_a_one_token_prompt_after_longer_ones_is_no_decode():
    """The profiling forward's sequences may be 20, 20 and 1 tokens: the last, of one token, is a
    prompt. Only the leading run of 1-token sequences are decodes (a backend tiles them so)."""
    from vidya.attention.metadata import AttentionMetadata
    tables = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10]]
    cpu = torch.device("cpu")
    assert AttentionMetadata.for_sequences([20, 20, 1], [20, 20, 1], tables, 4, cpu).num_decodes == 0
    assert AttentionMetadata.for_sequences([1, 1, 20], [7, 9, 20], [[0, 1], [2, 3, 4], tables[0]], 4, cpu).num_decodes == 2


def test_kv_budget_is_the_utilisation_less_what_is_used_and_the_activations(tiny_models, monkeypatch):
    engine = make_engine(tiny_models["llama"][0], backend="torch")
    config = engine.model_config
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * GiB, 80 * GiB))  # 20 GiB in use
    cache = CacheConfig(block_size=16, gpu_memory_utilization=0.9)
    per_block = kv_bytes_per_block(config, 16, torch.bfloat16)
    got = num_kv_blocks(cache, config, torch.bfloat16, torch.device("cuda"), 10**12, activation_bytes=3 * GiB)
    assert got == int((72 * GiB - 20 * GiB - 3 * GiB - GRAPH_MARGIN) // per_block)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GiB, 80 * GiB))
    with pytest.raises(ValueError, match="No memory is left for the KV cache"):
        num_kv_blocks(cache, config, torch.bfloat16, torch.device("cuda"), 10**12, activation_bytes=3 * GiB)
    assert model_runner.num_kv_blocks(cache, config, torch.bfloat16, torch.device("cuda"), 100, 0) == 100


def test_the_gpu_bench_script_runs_at_toy_size(tmp_path):
    """bench/gpu/run.py --smoke: the serving section's bookkeeping (TTFT, inter-token, decode steps
    against the bandwidth floor) on a toy Llama with dummy weights, the A10 projection, and the
    sweep section (a live server, the sweep and the plan), here on CPU; the kernels and tiny_exact
    sections are covered by their own tests."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, os.path.join(root, "bench", "gpu", "run.py"), "--smoke", "--json", str(out),
                        "--only", "versions", "bandwidth", "serve_8b", "a10", "sweep_24gb", "serve_8b_w4a16",
                        "serve_8b_24gb_w4a16_kv8"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["all_ok"] and r["bandwidth"]["gb_s"] > 0
    s = r["serve_8b"]
    assert s["requests"] == 6 and s["output_tok_s"] > 0 and s["decode_steps"] >= s["output_tokens"] - 1
    assert 0 < s["ttft_s"]["p50"] <= s["ttft_s"]["p99"] and 0 < s["itl_s"]["p50"] <= s["itl_s"]["p99"]
    assert 0 < s["fraction_of_floor"] and s["decode_step_ms"] > s["host_ms_per_step"] > 0
    assert s["overlap_outputs"] and s["overlapped_host_ms_per_step"] > 0  # outputs built during the next step
    assert s["async_scheduling"]  # as on a GPU: each step applied by the call after the one that planned it
    st = s["steady"]  # more requests than max_num_seqs: waiting ones join as others finish, beside decodes
    assert st["requests"] == 300 and st["output_tok_s"] > 0 and 64 < st["near_full_batch"] <= 256
    assert 0 < st["mixed_fraction"] < 1 and st["mixed_step_ms"] > 0 and st["decode_only_step_ms"] > 0
    a10 = r["a10"]  # the projection: at the floor with estimated activations unless a GPU run measured them
    assert not a10["efficiency_measured"] and a10["efficiency"] == 1.0
    assert a10["tutor_util0.92"]["kv_room_tokens"] == a10["bench_512_256_util0.92"]["kv_room_tokens"] > 20_000
    sw = r["sweep_24gb"]  # vidya serve + vidya bench sweep + vidya plan through the CLI, the sweep file beside
    assert [lv["concurrency"] for lv in sw["levels"]] == [1, 2] and all(lv["completed"] == 2 for lv in sw["levels"])
    assert all(150 < lv["prompt_tokens_per_request"] < 260 for lv in sw["levels"])  # the tutor's prompt lengths
    assert json.loads((tmp_path / "gpu-sweep-24gb.json").read_text())["levels"] == sw["levels"]
    assert sw["plan"]["feasible"] and sw["plan"]["hpa_target_running_per_pod"] == 2
    q = r["serve_8b_w4a16"]  # the projections in int4 over the dummy weights: fewer bytes a step reads
    assert q["quantization"] == "int4 W4A16 g128 asym" and q["output_tok_s"] > 0
    assert q["weight_bytes"] < s["weight_bytes"] and s["quantization"] is None
    kv8 = r["serve_8b_24gb_w4a16_kv8"]  # the A10's setting: int4 weights and an 8-bit (e5m2) cache
    assert kv8["kv_cache_dtype"] == "float8_e5m2" and kv8["output_tok_s"] > 0 and kv8["decode_steps"] > 0
    assert kv8["quantization"] == q["quantization"] and kv8["weight_bytes"] == q["weight_bytes"]


def test_the_gpu_real_model_section_runs_here_and_agrees_in_float32(tmp_path):
    """bench/gpu/run.py's real_models section (issue 31, item 8) at toy size on CPU: the default
    model's real weights through vidya and through transformers, in float32, where greedy tokens
    must agree (the GPU run reports bf16's agreement instead)."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, os.path.join(root, "bench", "gpu", "run.py"), "--smoke", "--json", str(out),
                        "--only", "real_models"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (m,) = json.loads(out.read_text())["real_models"]
    assert m["model"] == "smollm2" and m["prompts"] == 2 and m["agree"] == 2, m
    assert all(r["vidya"] == r["transformers"] and r["first_divergence"] is None for r in m["rows"])


def test_every_field_of_a_step_starts_16_byte_aligned(tiny_models):
    """Triton compiles a kernel anew for each 16-byte alignment of its pointer arguments: the
    step's fields (views of one buffer copied to the device once) must start aligned whatever the
    step's counts, or odd token counts would compile the attention kernel again mid-serving."""
    from vidya import SamplingParams
    engine = make_engine(tiny_models["llama"][0], backend="torch")
    groups = [[5], [3, 4, 7], [2, 9, 1]]  # prompt lengths; a group joins each step, answers of k tokens
    seen = set()
    while groups or engine.scheduler.has_unfinished:
        for k in groups.pop(0) if groups else ():
            engine.add_request(f"r{len(groups)}-{k}", list(range(3, 3 + k)), SamplingParams(temperature=0, max_tokens=k))
        sched = engine.scheduler.schedule()
        inp = engine.runner.prepare(sched)
        m = inp.meta
        fields = dict(input_ids=inp.input_ids, positions=inp.positions, logits_indices=inp.logits_indices,
                      slot_mapping=m.slot_mapping, block_tables=m.block_tables, row_seq=m.row_seq,
                      row_ctx=m.row_ctx, seq_lens=m.seq_lens)
        assert {k: v.data_ptr() % 16 for k, v in fields.items()} == dict.fromkeys(fields, 0)
        assert m.seq_lens.tolist() == [s.request.num_computed_tokens + s.num_new_tokens for s in
                                       sorted(sched.scheduled, key=lambda s: (not (s.num_new_tokens == 1 and s.samples), s.num_new_tokens))]
        assert m.num_decodes == sum(s.num_new_tokens == 1 and s.samples for s in sched.scheduled)
        assert inp.input_ids.numel() == sched.num_scheduled_tokens == m.slot_mapping.numel()
        seen.add((inp.input_ids.numel() % 2, len(sched.scheduled) % 2))
        engine.scheduler.update_from_output(sched, {r.request_id: 5 for r in inp.sampling_requests})
        engine.check()
    assert seen >= {(1, 1), (0, 1), (1, 0)}, seen  # odd and even token and sequence counts were met
