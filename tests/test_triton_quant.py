"""The fused quantized projection (ops/triton_quant.py) against the reference (dequantize, then
F.linear), in Triton's interpreter in float32: 4 and 8 bits, groups of 16..128 and per channel,
with and without bias, decode-sized and prefill-sized row counts, ragged N; and the tiny Llama
served through it (the Triton ops) token for token as through the torch ops."""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton package is not installed here")
os.environ.setdefault("TRITON_INTERPRET", "1")

from vidya.models import quant  # noqa: E402


def quantized_linear(n: int, k: int, bits: int, group: int, bias: bool, seed: int = 0) -> quant.QuantLinear:
    torch.manual_seed(seed)
    qc = quant.QuantConfig("int8" if bits == 8 else "int4", bits, group, symmetric=bits == 8)
    return quant.QuantLinear.from_weight(torch.randn(n, k) * 0.05, qc, torch.randn(n) if bias else None)


@pytest.mark.parametrize("bits,group,bias", [(4, 128, False), (4, 16, True), (4, 32, False), (8, 0, True),
                                             (8, 64, False)])
@pytest.mark.parametrize("m", [1, 5, 70])
def test_the_fused_kernel_matches_dequantize_then_matmul(bits, group, bias, m):
    from vidya.ops import triton_quant
    n, k = 96, 256  # N not a multiple of the 64-wide output tile
    lin = quantized_linear(n, k, bits, group, bias)
    assert triton_quant.supported(lin)
    x = torch.randn(m, k)
    want = torch.nn.functional.linear(x, lin.dequantize(torch.float32), lin.bias)
    got = triton_quant.quant_linear(x, lin)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["int4", "w8a8"])
def test_the_tiny_llama_quantized_through_the_triton_ops_equals_the_torch_ops(tiny_models, tmp_path, kind):
    """Online int4, and a compressed-tensors W8A8 checkpoint (activations quantized per token)."""
    from conftest import make_engine, run_to_completion
    from test_quantization import quantized_checkpoint
    from vidya import SamplingParams
    from vidya.ops.triton_ops import TritonOps
    params = SamplingParams(temperature=0.0, max_tokens=6, min_tokens=6)
    prompts = [[5, 9, 17, 3], list(range(3, 40))]
    model, quantization = tiny_models["llama"][0], "int4"
    if kind == "w8a8":
        quantized_checkpoint(model, tiny_models["llama"][1], tmp_path / "q", "w8a8", 8, -1, True)
        model, quantization = str(tmp_path / "q"), None
    outs = []
    for backend in ("torch", "triton"):
        engine = make_engine(model, backend=backend, quantization=quantization)
        assert isinstance(engine.ops, TritonOps) == (backend == "triton")
        ids = [engine.add_request(None, p, params) for p in prompts]
        done = run_to_completion(engine)
        outs.append([done[i].outputs[0].token_ids for i in ids])
    assert outs[0] == outs[1]


def test_the_gpu_scripts_quant_kernel_section_runs_at_toy_size(tmp_path):
    """bench/gpu/run.py's quant_kernels section (run on the GPU when one is lent), here interpreted."""
    import json
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, os.path.join(root, "bench", "gpu", "run.py"), "--smoke", "--json", str(out),
                        "--device", "cpu", "--only", "quant_kernels"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.path.join(root, "src")})
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())["quant_kernels"]
    assert len(rows) == 4 and all(r["ok"] and r["fused_ms"] > 0 and r["floor_ms"] > 0 for r in rows)
    assert {r["method"] for r in rows} == {"int4 W4A16 g128 asym", "int8 W8A16 per channel"}


def test_quantized_decode_steps_replayed_from_graph_buckets_with_async_scheduling_change_no_token(tiny_models,
                                                                                                  monkeypatch):
    """The CUDA-graph path on CPU (as tests/test_equivalence.py's graph test: an eager stand-in
    replaying the bucket's captured forward over its static buffers), with async scheduling, on
    the tiny Llama in int4 through the fused kernel: the tokens of the torch ops without graphs."""
    from conftest import make_engine, run_to_completion
    from test_equivalence import EagerGraph
    from vidya import SamplingParams
    from vidya.engine.cuda_graphs import DecodeGraphs, decode_buckets

    def eager_capture(self, run, device):
        out = run()
        return EagerGraph(run, out), out
    monkeypatch.setattr(DecodeGraphs, "capture", eager_capture)
    prompts = [[5, 9, 17, 3], list(range(3, 40)), [7] * 11]
    lengths = [8, 6, 4]

    def run(engine):
        ids = [engine.add_request(None, p, SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n))
               for p, n in zip(prompts, lengths)]
        done = run_to_completion(engine)
        return [done[i].outputs[0].token_ids for i in ids]
    want = run(make_engine(tiny_models["llama"][0], backend="torch", quantization="int4"))
    engine = make_engine(tiny_models["llama"][0], backend="triton", quantization="int4", async_scheduling=True)
    runner = engine.runner
    runner.capture_decode_graphs(decode_buckets(4), -(-engine.max_model_len // runner.block_size))
    assert run(engine) == want
    assert all(g.replays > 0 for b, g in runner.graphs.graphs.items() if b in (4, 2, 1))
