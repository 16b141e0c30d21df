"""Tiny random-weight models of each family the engine runs, as transformers builds them: the
tests' token-exact references (tests/conftest.py) and bench/gpu's checks on a GPU. Also a
word-level tokenizer of any vocabulary size, for models that come without one."""
from __future__ import annotations

import torch

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
SLIDING_WINDOW = 8  # tiny Gemma 3: prompts of 9..57 tokens and 12 more cross it


def tiny_config(arch: str, vocab_size: int):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, initializer_range=0.5, bos_token_id=1, eos_token_id=2,
                  pad_token_id=2, tie_word_embeddings=arch in ("qwen2", "gemma3"))
    if arch == "llama":
        return LlamaConfig(architectures=["LlamaForCausalLM"], **common,
                           rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 64})
    if arch == "mistral":
        return MistralConfig(architectures=["MistralForCausalLM"], sliding_window=None, head_dim=16, **common)
    if arch == "qwen3":  # q/k RMSNorm; head_dim 32 x 4 heads is wider than the hidden size
        return Qwen3Config(architectures=["Qwen3ForCausalLM"], head_dim=32, **common)
    if arch == "gemma3":  # three layers: sliding (local RoPE base), sliding, global (its own base)
        return Gemma3TextConfig(architectures=["Gemma3ForCausalLM"], **{**common, "num_hidden_layers": 3, "initializer_range": 0.05},
                                head_dim=16, query_pre_attn_scalar=24, sliding_window=SLIDING_WINDOW,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                hidden_activation="gelu_pytorch_tanh",
                                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                 "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                    "rope_theta": 1000000.0}})
    return Qwen2Config(architectures=["Qwen2ForCausalLM"], **common)


def tiny_model(arch: str, vocab_size: int, seed: int = 1234):
    """A transformers model in float32 with random weights (norms made to count)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size), dtype=torch.float32).eval()
    if arch in ("qwen3", "gemma3"):  # their norms start at identity (Gemma's w = 0): make them count
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn_like(p) * 0.3)
    return model


def word_tokenizer(vocab_size: int):
    """A fast tokenizer whose vocabulary is "<unk>", "<s>", "</s>", then "w3" .. : enough to serve
    and detokenize a model of any vocabulary (ids 1 and 2 are bos and eos, as tiny_config says)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
