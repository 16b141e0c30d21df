"""Engine configuration: frozen dataclasses, one per concern, validated where they are made."""
from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "dummy")

# the scheduler's token budget a step unless --max-num-batched-tokens says otherwise: 4096 measured best
# on CPU (tutor-64: 2048 -> 661, 4096 -> 697, 8192 -> 663 tok/s)
DEFAULT_MAX_NUM_BATCHED_TOKENS = 4096
# a prompt's chunk per step: ~1 s of prefill for SmolLM2 on 2 AVX2 cores, ~20 ms for an 8B model on an A10
DEFAULT_LONG_PREFILL_TOKENS = 512


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory: float | None = None  # GiB, CPU; None = 4 GiB
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    # sliding-window layers keep only the blocks their window sees (engine/kv_layout.py); False:
    # every layer keeps every token (vLLM's --disable-hybrid-kv-cache-manager)
    hybrid_kv_cache: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 GiB, got {self.kv_cache_memory!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override!r}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    # a prompt's chunk in a step is at most this many tokens, so that one long prompt does not
    # hold up the rest for the whole of its prefill (0: no cap; vLLM's name)
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.long_prefill_token_threshold, int) or self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be an integer >= 0, got "
                             f"{self.long_prefill_token_threshold!r}")


@dataclass(frozen=True, slots=True)
class EngineArgs:
    """Everything `LLM(...)` and `vidya serve` accept, with vLLM's names."""

    model: str = "smollm2"
    tokenizer: str | None = None
    chat_template: str | None = None  # a Jinja file, or the template itself (vLLM's --chat-template)
    # where a request's unset sampling fields come from (vLLM's --generation-config): "auto" the
    # model's generation_config.json, "vllm" vLLM's (OpenAI's) defaults, else a folder holding one
    generation_config: str = "auto"
    # vLLM's --quantization: None reads the checkpoint's quantization_config; "int8"/"int4"
    # quantize a 16-bit checkpoint at load; "gptq"/"awq"/"compressed-tensors" name the checkpoint's;
    # "gguf" keeps a GGUF's projections quantized (a GPU's default for a GGUF; "none" dequantizes it)
    quantization: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    # None: DEFAULT_LONG_PREFILL_TOKENS (at most the budget); 0: none (SchedulerConfig)
    long_prefill_token_threshold: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory: float | None = None
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    hybrid_kv_cache: bool = True  # False: --disable-hybrid-kv-cache-manager (CacheConfig)
    kv_cache_dtype: str = "auto"  # vLLM's --kv-cache-dtype: auto, fp8 (= fp8_e4m3), fp8_e5m2 (platform.py)
    seed: int = 0
    num_threads: int | None = None
    show_progress: bool = True
    backend: str = "auto"  # vidya.platform.BACKENDS; "auto" reads VIDYA_BACKEND, else the best here
    attention_backend: str = "auto"  # torch, cpu, triton; "auto" reads VIDYA_ATTENTION_BACKEND, else by device
    load_format: str = "auto"  # "dummy": random weights from the model's config (as vLLM's)
    enforce_eager: bool = False  # no CUDA graphs for decode steps (vLLM's name)
    tensor_parallel_size: int = 1  # ranks the model is split across (vllm's name)
    overlap_outputs: bool | None = None  # build a step's outputs during the next forward; None: on a GPU
    # plan and launch the next decode step before this one's tokens reach the host (greedy decode
    # batches; vLLM's --async-scheduling); None: on a GPU (bench/gpu/run.sh measures it against
    # the engine without it: 12.7 ms a step at batch 256 on an H200 against 13.9)
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        from vidya.platform import ATTENTION_BACKENDS, BACKENDS, KV_CACHE_DTYPES
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise ValueError(f"max_model_len must be a positive integer, got {self.max_model_len!r}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens!r}")
        self.cache_config()  # validates before anything is loaded
        SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens or 1, self.max_model_len or 1,
                        self.long_prefill_token_threshold or 0)

    def cache_config(self) -> CacheConfig:
        return CacheConfig(
            block_size=self.block_size,
            enable_prefix_caching=self.enable_prefix_caching,
            kv_cache_memory=self.kv_cache_memory,
            gpu_memory_utilization=self.gpu_memory_utilization,
            num_gpu_blocks_override=self.num_gpu_blocks_override,
            hybrid_kv_cache=self.hybrid_kv_cache,
        )

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        budget = self.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS
        threshold = self.long_prefill_token_threshold
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=max_model_len,
            long_prefill_token_threshold=min(budget, DEFAULT_LONG_PREFILL_TOKENS) if threshold is None else threshold,
        )
