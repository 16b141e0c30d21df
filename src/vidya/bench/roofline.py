"""What a GPU can give a model, from bytes and FLOPs alone: the floor bench/gpu/run.py measures
decode steps against, and the projection of a card no session has (the A10 of the mission).

- A decode step reads every weight once (of the input embedding only the rows it looks up, unless
  the output layer shares it) and the K/V of every running sequence: its floor is those bytes over
  the memory bandwidth.
- A token, in a prompt or generated, costs 2 FLOPs per weight it is multiplied by, plus attention's
  4 x layers x heads x head_dim per token of context: the compute ceiling is the card's dense
  16-bit tensor throughput over that.
- The KV room is what --gpu-memory-utilization leaves after the weights, the CUDA context, the
  profiled activations and the graphs' margin (engine/model_runner.py sizes it the same way).

A request of P prompt and O output tokens holds P + O/2 tokens of cache on average while it
decodes (continuous batching keeps requests at every stage), so the room holds room / (P + O/2)
requests at once; output tok/s is the lower of that batch over its step floor and the compute
ceiling (prefill rides in the decode steps' spare compute, as chunked prefill does).
"""
from __future__ import annotations

from dataclasses import dataclass

MiB, GiB = 1 << 20, 1 << 30
CUDA_CONTEXT = 512 * MiB  # the driver's context, in use before the first tensor (typical, not measured here)
GRAPH_MARGIN = 256 * MiB  # as engine/model_runner.py


@dataclass(frozen=True, slots=True)
class Card:
    name: str
    memory_bytes: int  # as the driver reports it
    gb_s: float  # memory bandwidth, datasheet
    tflops_16bit: float  # dense bf16 / fp16 tensor throughput, datasheet


A10 = Card("NVIDIA A10 (24 GB)", 23_028 * MiB, 600.0, 125.0)


@dataclass(frozen=True, slots=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3

    @classmethod
    def from_config(cls, c) -> "ModelShape":
        return cls(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                   c.num_key_value_heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                   c.vocab_size, bool(getattr(c, "tie_word_embeddings", False)),
                   c.model_type == "qwen2" or bool(getattr(c, "attention_bias", False)), c.model_type == "qwen3")

    def layer_params(self) -> int:
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        extra = (q + 2 * kv) * self.qkv_bias + 2 * self.head_dim * self.qk_norm
        return self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.intermediate + 2 * self.hidden + extra

    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params() + embeddings + self.hidden

    def step_weight_bytes(self, dtype_bytes: int = 2) -> int:
        """Weights one decode step reads: all but an untied input embedding."""
        unread = 0 if self.tied else self.vocab * self.hidden
        return (self.params() - unread) * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def flops_per_token(self, context: float) -> float:
        matmul_params = self.layers * self.layer_params() + self.vocab * self.hidden
        return 2 * matmul_params + 4 * self.layers * self.heads * self.head_dim * context

    def activation_bytes(self, num_batched_tokens: int, num_sample_rows: int, dtype_bytes: int = 2) -> int:
        """An estimate of the profiling forward's peak (the GPU run measures it): one layer's MLP
        (gate, up, their product) and four hidden-size buffers per token, plus float32 logits."""
        per_token = (3 * self.intermediate + 4 * self.hidden) * dtype_bytes
        return num_batched_tokens * per_token + num_sample_rows * self.vocab * 4


@dataclass(frozen=True, slots=True)
class Projection:
    card: str
    weights_gib: float
    kv_room_gib: float
    kv_room_tokens: int
    batch: int  # requests decoding at once that the room holds
    step_floor_ms: float  # that batch's decode step at the bandwidth floor
    efficiency: float  # measured step floor / step time (1.0: at the floor)
    step_ms: float
    output_tok_s_bandwidth: float
    output_tok_s_compute: float  # the compute ceiling, prompts counted
    output_tok_s: float  # the lower of the two
    total_tok_s_compute: float  # prompt + output tokens a second at the compute ceiling


def kv_room_bytes(card: Card, shape: ModelShape, util: float, activation_bytes: int, dtype_bytes: int = 2) -> int:
    return int(card.memory_bytes * util - shape.params() * dtype_bytes - CUDA_CONTEXT - activation_bytes - GRAPH_MARGIN)


def decode_step_floor_s(card: Card, shape: ModelShape, batch: int, mean_context: float, dtype_bytes: int = 2) -> float:
    kv = batch * mean_context * shape.kv_bytes_per_token(dtype_bytes)
    return (shape.step_weight_bytes(dtype_bytes) + kv) / (card.gb_s * 1e9)


def project(card: Card, shape: ModelShape, prompt_tokens: float, output_tokens: float, util: float,
            activation_bytes: int, efficiency: float = 1.0, max_num_seqs: int = 256) -> Projection:
    room = kv_room_bytes(card, shape, util, activation_bytes)
    if room <= 0:
        raise ValueError(f"{card.name} has no room for a KV cache at --gpu-memory-utilization {util}")
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency must be in (0, 1], got {efficiency}")
    room_tokens = room // shape.kv_bytes_per_token()
    mean_context = prompt_tokens + output_tokens / 2
    batch = max(1, min(max_num_seqs, int(room_tokens // mean_context)))
    floor = decode_step_floor_s(card, shape, batch, mean_context)
    step = floor / efficiency
    bandwidth = batch / step
    flops_per_request = (prompt_tokens * shape.flops_per_token(prompt_tokens / 2)
                         + output_tokens * shape.flops_per_token(mean_context))
    requests_s = card.tflops_16bit * 1e12 / flops_per_request
    return Projection(card.name, shape.params() * 2 / GiB, room / GiB, int(room_tokens), batch, 1e3 * floor,
                      efficiency, 1e3 * step, bandwidth, requests_s * output_tokens, min(bandwidth, requests_s * output_tokens),
                      requests_s * (prompt_tokens + output_tokens))
