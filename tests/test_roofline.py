"""vidya/bench/roofline.py: the bytes and FLOPs the GPU bench measures against and the README's A10
projection is made of, checked against transformers' own parameter counts and by hand."""
import pytest

from vidya.bench.roofline import A10, GRAPH_MARGIN, CUDA_CONTEXT, Card, ModelShape, decode_step_floor_s, project
from vidya.engine import model_runner
from vidya.models.tiny import tiny_model

LLAMA3_8B = ModelShape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128,
                       vocab=128256, tied=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # untied; tied with q/k/v biases; q/k norms
def test_parameter_count_is_transformers_own(arch):
    model = tiny_model(arch, 300)
    shape = ModelShape.from_config(model.config)
    assert shape.params() == sum(p.numel() for p in model.parameters())


def test_llama3_8b_bytes():
    assert LLAMA3_8B.params() == 8_030_261_248  # Meta's published count
    assert LLAMA3_8B.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    # a decode step does not read the untied input embedding: 525M parameters fewer
    assert LLAMA3_8B.params() * 2 - LLAMA3_8B.step_weight_bytes() == 128256 * 4096 * 2
    assert GRAPH_MARGIN == model_runner.GRAPH_MARGIN


def test_projection_by_hand():
    # ~0.5 GB of weights (a tied 1M x 250 embedding, one attention-only layer) and 1,000 bytes of KV
    # a token, on a 4 GiB card at 100 GB/s and 10 TFLOP/s
    shape = ModelShape(layers=1, hidden=250, intermediate=0, heads=1, kv_heads=1, head_dim=250, vocab=1_000_000, tied=True)
    assert shape.kv_bytes_per_token() == 1000 and shape.params() == 4 * 250 * 250 + 2 * 250 + 250_000_000 + 250
    card = Card("test", 4 << 30, 100.0, 10.0)
    p = project(card, shape, prompt_tokens=100, output_tokens=100, util=0.5, activation_bytes=0)
    room = (2 << 30) - shape.params() * 2 - CUDA_CONTEXT - GRAPH_MARGIN
    assert p.kv_room_tokens == room // 1000
    assert p.batch == min(256, room // 1000 // 150)  # each request holds 100 + 100/2 tokens on average
    floor = (shape.params() * 2 + p.batch * 150 * 1000) / 100e9
    assert p.step_floor_ms == pytest.approx(1e3 * floor)
    assert p.output_tok_s_bandwidth == pytest.approx(p.batch / floor)
    per_request = 100 * shape.flops_per_token(50) + 100 * shape.flops_per_token(150)
    assert p.output_tok_s_compute == pytest.approx(10e12 / per_request * 100)
    assert p.output_tok_s == min(p.output_tok_s_bandwidth, p.output_tok_s_compute)
    slower = project(card, shape, 100, 100, 0.5, 0, efficiency=0.5)
    assert slower.step_ms == pytest.approx(2 * p.step_ms) and slower.output_tok_s_bandwidth == pytest.approx(p.output_tok_s_bandwidth / 2)
    assert decode_step_floor_s(card, shape, 0, 0) == pytest.approx(shape.params() * 2 / 100e9)


def test_a10_llama3_8b_leaves_room_for_about_36k_tokens():
    p = project(A10, LLAMA3_8B, 512, 256, 0.92, LLAMA3_8B.activation_bytes(4096, 256))
    assert 34_000 < p.kv_room_tokens < 38_000 and 15.9 < p.weights_gib * 1.073741824 < 16.1
    assert p.output_tok_s == p.output_tok_s_bandwidth  # 512 in / 256 out: memory-bound
    assert 7_500 < p.total_tok_s_compute < 8_500  # ~15 GFLOP a token against 125 TFLOP/s


def test_refusals():
    with pytest.raises(ValueError, match="no room"):
        project(A10, LLAMA3_8B, 512, 256, 0.6, 0)
    with pytest.raises(ValueError, match="efficiency"):
        project(A10, LLAMA3_8B, 512, 256, 0.9, 0, efficiency=1.5)
