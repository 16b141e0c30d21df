"""vidya: a self-hosted LLM serving engine (PagedAttention, continuous batching) with an
OpenAI-compatible API, and the Hindi study tutor that runs on it.

The engine's names are imported on first use, so that commands that need no model (`vidya plan`,
`vidya bench sweep`, `vidya chat` against a server) start without loading torch."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
_EXPORTS = {"LLM": "vidya.llm", "SamplingParams": "vidya.sampling_params", "RequestOutput": "vidya.outputs",
            "CompletionOutput": "vidya.outputs", "Logprob": "vidya.outputs"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vidya' has no attribute {name!r}")
