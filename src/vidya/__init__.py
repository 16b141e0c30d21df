"""vidya: a self-hosted LLM serving engine (PagedAttention, continuous batching) with an
OpenAI-compatible API, and the Hindi study tutor that runs on it."""
from vidya.llm import LLM
from vidya.outputs import CompletionOutput, Logprob, RequestOutput
from vidya.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]
