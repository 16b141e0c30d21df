"""Which model class runs which Hugging Face architecture: the one table the loader reads."""
from __future__ import annotations

from vidya.models.gemma3 import Gemma3ForCausalLM
from vidya.models.llama import CausalLM, LlamaForCausalLM

ARCHITECTURES: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForCausalLM,  # its language model; images are not served
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


def architecture_of(config) -> str:
    return (getattr(config, "architectures", None) or ["?"])[0]


def model_class(config) -> type[CausalLM]:
    return ARCHITECTURES[architecture_of(config)]

