"""The `vidya` command: `serve` (the OpenAI-compatible server), `chat` (a terminal conversation
with the offline engine) and `bench` (`throughput` offline, `serve` against any OpenAI server)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys


class Parser(argparse.ArgumentParser):
    """argparse, whose errors are one line naming the flag (not the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # vLLM's --dtype names


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="smollm2 (default), a HF model directory, a .gguf file or a hub id")
    p.add_argument("--tokenizer", default=None, help="a tokenizer other than the model's (a directory or hub id)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", *DTYPE_ALIASES],
                   help="auto, float32 (float), bfloat16, float16 (half)")
    p.add_argument("--quantization", "-q", default=None, type=quantization_method,
                   help="the weights' quantization: by default the checkpoint's own (gptq, awq, "
                        "compressed-tensors; read from its quantization_config); int8 (per channel) or int4 "
                        "(groups of 128) quantize a 16-bit checkpoint at load; gguf: a GGUF's projections kept "
                        "quantized (a GPU's default for a GGUF); none: 16/32-bit")
    p.add_argument("--chat-template", default=None,
                   help="a Jinja chat template file (or the template text) in place of the model's")
    p.add_argument("--generation-config", default="auto",
                   help="sampling defaults for requests that leave them unset: auto (the model's "
                        "generation_config.json, as vLLM), vllm (OpenAI's defaults) or a folder holding one")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--long-prefill-token-threshold", type=int, default=None,
                   help="a prompt's chunk in a step is at most this many tokens, so that a long prompt leaves room "
                        "for other requests in every step "
                        "(default 512; 0: no cap)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory", type=float, default=None, help="GiB of KV cache on CPU (default 4)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights and KV cache (GPU only)")
    p.add_argument("--no-prefix-caching", "--no-enable-prefix-caching", dest="no_prefix_caching", action="store_true")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
                   help="auto: the model's (16-bit); fp8 (= fp8_e4m3) or fp8_e5m2: an 8-bit cache, half the "
                        "bytes a token (vLLM's flag; read by the torch reference attention so far)")
    p.add_argument("--disable-hybrid-kv-cache-manager", action="store_true",
                   help="sliding-window layers (Gemma 3) keep every token as the full-attention ones do, "
                        "instead of only the blocks their window sees (vLLM's flag)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto",
                   choices=["auto", "torch", "cpu", "amx", "avx512_bf16", "avx512", "avx2"],
                   help="which ops run the model: auto (the best this machine has; or VIDYA_BACKEND), "
                        "torch (the reference ops), cpu (vidya's C++ kernels at this CPU's best ISA), "
                        "or an ISA level at or below this CPU's")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU if there is one, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "cpu", "triton"],
                   help="paged attention: auto (triton on CUDA, the C++ kernels' own on CPU; or "
                        "VIDYA_ATTENTION_BACKEND), torch (the reference), cpu, triton")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model across this many processes (one per GPU; gloo on CPU)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs: every decode step runs eagerly (GPU only)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="plan and launch each greedy decode step before the step before it has brought its "
                        "tokens to the host, so the GPU does not wait for the host's part of a step "
                        "(vLLM's flag; default: on a GPU, off on CPU, where the forward runs on the "
                        "engine's own thread)")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights from the model's config, to serve and benchmark a model's "
                        "shape where its weights cannot be downloaded")


def engine_args(args, show_progress: bool = True):
    from vidya.config import EngineArgs
    return EngineArgs(model=args.model, tokenizer=args.tokenizer,
                      dtype=DTYPE_ALIASES.get(args.dtype, args.dtype), max_model_len=args.max_model_len,
                      chat_template=args.chat_template, generation_config=args.generation_config,
                      quantization=args.quantization,
                      max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                      long_prefill_token_threshold=args.long_prefill_token_threshold,
                      block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
                      gpu_memory_utilization=args.gpu_memory_utilization,
                      enable_prefix_caching=not args.no_prefix_caching, seed=args.seed,
                      hybrid_kv_cache=not args.disable_hybrid_kv_cache_manager, kv_cache_dtype=args.kv_cache_dtype,
                      backend=args.backend, device=args.device, attention_backend=args.attention_backend,
                      load_format=args.load_format, enforce_eager=args.enforce_eager,
                      async_scheduling=args.async_scheduling,
                      tensor_parallel_size=args.tensor_parallel_size, show_progress=show_progress)


def origins(value: str) -> list[str]:
    """--allowed-origins takes vLLM's JSON list ('["https://a"]') or plain origins."""
    if value.startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a JSON list of origins: {value}") from None
        if not all(isinstance(o, str) for o in parsed):
            raise argparse.ArgumentTypeError("--allowed-origins must list strings")
        return parsed
    return [value]


def port_number(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1 to 65535, got {value!r}")
    return port


# vLLM flags a vLLM command line carries that vidya accepts without acting on them, each with what
# vidya does instead (printed once at start-up). `None` as the value: any value is accepted.
VLLM_NOTED_FLAGS = {
    "--enable-prefix-caching": (0, "prefix caching is always on (--no-enable-prefix-caching turns it off)"),
    "--enable-chunked-prefill": (0, "chunked prefill is always on"),
    "--trust-remote-code": (0, "vidya runs its own code for the architectures it supports; no remote code is run"),
    "--disable-log-requests": (0, "vidya does not log requests (only uvicorn's access log: "
                                  "--disable-uvicorn-access-log)"),
    "--disable-log-stats": (0, "vidya logs no periodic stats; /metrics has them"),
    "--disable-frontend-multiprocessing": (0, "the API server and engine share one process"),
    "--swap-space": (1, "preempted requests are recomputed, never swapped to CPU memory"),
    "--max-log-len": (1, "vidya does not log prompts"),
    "--distributed-executor-backend": (1, "tensor-parallel ranks are always processes (mp)"),
}


def quantization_method(value: str) -> str | None:
    from vidya.models.quant import METHODS
    value = value.lower()
    if value not in ("none", *METHODS):
        raise argparse.ArgumentTypeError(f"{value!r} is not served: use none, {', '.join(METHODS)} (FP8, bitsandbytes "
                                         f"and others are not implemented)")
    return value  # ("none" too: a GGUF dequantized where its default would keep it quantized)


def only(value: str, why: str):
    def check(given: str) -> str:
        if given.lower() != value:
            raise argparse.ArgumentTypeError(f"{given!r}: only {value} is accepted ({why})")
        return given.lower()
    return check


class NotedFlag(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        namespace.vllm_notes = [*getattr(namespace, "vllm_notes", []),
                                f"{option_string}: accepted; {VLLM_NOTED_FLAGS[option_string][1]}"]


def add_vllm_compat_args(p: argparse.ArgumentParser) -> None:
    """`vllm serve MODEL` and the vLLM flags listed in VLLM_NOTED_FLAGS, so that a vLLM command
    line runs unchanged; the parallel sizes take the values vidya can serve and refuse the others."""
    p.add_argument("model_tag", nargs="?", default=None, help="the model, as `vllm serve MODEL` takes it")
    for flag, (nargs, why) in VLLM_NOTED_FLAGS.items():
        p.add_argument(flag, nargs=nargs, action=NotedFlag, help=f"(vLLM's; {why})")
    p.add_argument("--pipeline-parallel-size", "-pp", default="1",
                   type=only("1", "pipeline parallelism is not implemented; split a model with --tensor-parallel-size"),
                   help="1 only (tensor parallelism: --tensor-parallel-size)")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    add_vllm_compat_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in 'model' (default: the --model value)")
    p.add_argument("--api-key", nargs="+", default=None,
                   help="require one of these keys as 'Authorization: Bearer KEY' (or set VIDYA_API_KEY)")
    p.add_argument("--max-waiting", type=int, default=512,
                   help="answer 429 when this many requests wait for the engine (0: no limit)")
    p.add_argument("--max-tokens-default", type=int, default=None,
                   help="max_tokens for chat requests that give none and completions that send null "
                        "(default: up to the context window); a completion without max_tokens gets OpenAI's 16")
    p.add_argument("--max-sequences-per-request", type=int, default=128,
                   help="most sequences one request may start, n times its prompts (default 128, OpenAI's n limit)")
    p.add_argument("--max-logprob-entries", type=int, default=1 << 18,
                   help="most logprob entries one request may ask for, sequences x max_tokens x (1 + top) "
                        "(default 262144, about 40 MB)")
    p.add_argument("--max-request-bytes", type=int, default=4 << 20,
                   help="larger request bodies get 413 (default 4 MiB)")
    p.add_argument("--no-tutor-warmup", action="store_true",
                   help="do not compute the tutor's system prompts into the prefix cache at start-up")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds requests in flight may take to finish after SIGTERM")
    p.add_argument("--allowed-origins", type=origins, nargs="+", default=None,
                   help="CORS origins allowed to call the API (default: none, CORS off)")
    p.add_argument("--timeout-keep-alive", type=int, default=75,
                   help="seconds an idle keep-alive connection stays open (above an ingress's 60)")
    p.add_argument("--uvicorn-log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--disable-uvicorn-access-log", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vidya", description="vidya: LLM serving engine and Hindi study tutor")
    from vidya import __version__
    parser.add_argument("--version", action="version", version=f"vidya {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_args(sub.add_parser("serve", help="serve the OpenAI-compatible API (and the tutor page)"))
    chat = sub.add_parser("chat", help="talk to the tutor in the terminal (a running server, or the offline engine)")
    add_engine_args(chat)
    chat.add_argument("--base-url", default=None,
                      help="talk to a running server (e.g. http://127.0.0.1:8000) instead of loading a model here")
    chat.add_argument("--api-key", default=None, help="the server's API key (the class code), if it has one")
    chat.add_argument("--subject", default="science", help="science, maths, hindi, social or english")
    chat.add_argument("--class", dest="klass", default="8", help="6 to 12")
    chat.add_argument("--system", default=None,
                      help="a system prompt of your own, in place of the tutor's for --subject and --class")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.7)
    from vidya.bench.workload import num_prompts_arg
    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench", required=True)
    tp = bsub.add_parser("throughput", help="offline throughput on a fixed workload")
    add_engine_args(tp)
    tp.add_argument("--workload", default=None, help="workload JSON (default: the packaged tutor-64.json)")
    tp.add_argument("--num-prompts", type=num_prompts_arg, default=None,
                    help="requests to run (default: the workload's; repeated to reach more)")
    tp.add_argument("--baseline", choices=["none", "hf"], default="none")
    tp.add_argument("--baseline-requests", type=int, default=8,
                    help="requests the transformers baseline runs (one at a time; default 8)")
    tp.add_argument("--json", default=None, help="also write the report here")
    from vidya.bench import serve as bench_serve
    bench_serve.add_args(bsub.add_parser("serve", help="load-test a running OpenAI-compatible server"))
    from vidya.bench import plan, sweep
    sweep.add_args(bsub.add_parser("sweep", help="the tutor workload at rising concurrency against a running server"))
    plan.add_args(sub.add_parser("plan", help="replicas and rupees from a sweep (vidya bench sweep --json)",
                                 description=plan.__doc__.split("\n\n")[0]))
    return parser


def run_serve(args) -> int:
    from vidya.server.app import ServerSettings
    from vidya.server.launcher import serve
    if args.model_tag is not None:
        if args.model not in ("smollm2", args.model_tag):
            raise ValueError(f"two models given: {args.model_tag} (positional) and --model {args.model}; give one")
        args.model = args.model_tag
    for note in getattr(args, "vllm_notes", []):
        print(f"vidya: {note}", file=sys.stderr, flush=True)
    keys = args.api_key or ([os.environ["VIDYA_API_KEY"]] if os.environ.get("VIDYA_API_KEY") else [])
    for name in ("max_waiting", "max_tokens_default", "timeout_keep_alive"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if args.max_tokens_default == 0:
        raise ValueError("--max-tokens-default must be >= 1")
    for name in ("max_sequences_per_request", "max_logprob_entries", "max_request_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    settings = ServerSettings(
        served_model_names=args.served_model_name or [args.model], api_keys=keys,
        max_waiting=args.max_waiting or None, max_tokens_default=args.max_tokens_default,
        allowed_origins=[o for group in args.allowed_origins or [] for o in group],
        warm_tutor_prompts=not args.no_tutor_warmup, max_sequences_per_request=args.max_sequences_per_request,
        max_logprob_entries=args.max_logprob_entries, max_request_bytes=args.max_request_bytes)
    return serve(engine_args(args), settings, args.host, args.port, shutdown_timeout=args.shutdown_timeout,
                 timeout_keep_alive=args.timeout_keep_alive, log_level=args.uvicorn_log_level,
                 access_log=not args.disable_uvicorn_access_log)


def run_chat(args) -> int:
    # (checked before the first question, not relayed from the server after it)
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if not 0 <= args.temperature <= 2:
        raise ValueError(f"--temperature must be between 0 and 2, got {args.temperature}")
    from vidya.tutor import prompts
    tutor_prompt = prompts.system_prompt(args.subject, args.klass)  # (an unknown one says what exists)
    if args.base_url:
        from vidya.tutor import terminal
        return terminal.run(args.base_url, args.api_key or os.environ.get("VIDYA_API_KEY"), args.subject,
                            args.klass, args.system, args.max_tokens, args.temperature, fallback_system=tutor_prompt)
    from vidya import LLM, SamplingParams
    llm = LLM(**dataclasses.asdict(engine_args(args)))
    engine = llm.engine
    messages = [{"role": "system", "content": args.system or tutor_prompt}]
    print("vidya chat: type a question (Hindi or English); empty line or Ctrl-D to quit.")
    from vidya.tutor.terminal import read_question
    while (line := read_question()) is not None:
        messages.append({"role": "user", "content": line})
        prompt = engine.tokenizer(engine.apply_chat_template(messages), add_special_tokens=False).input_ids
        try:
            rid = engine.add_request(None, prompt, SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens))
        except ValueError as e:
            print(f"(conversation too long: {e}; starting over)")
            messages = messages[:1]
            continue
        sent, reason = "", None
        print("शिक्षक> ", end="", flush=True)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == rid:
                    text, reason = out.outputs[0].text, out.outputs[0].finish_reason
                    print(text[len(sent):], end="", flush=True)
                    sent = text
        print("\n(cut at the length limit)" if reason == "length" else "")
        messages.append({"role": "assistant", "content": sent})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = run_command(args)
        sys.stdout.flush()  # (here, where a closed pipe can be caught, not at exit)
        return rc
    except BrokenPipeError:  # `vidya plan --json | head`: the reader left; no traceback for it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def run_command(args) -> int:
    try:
        if args.command == "serve":
            return run_serve(args)
        if args.command == "chat":
            return run_chat(args)
        if args.command == "bench" and args.bench == "throughput":
            from vidya.bench.throughput import main as bench_main
            return bench_main(args)
        if args.command == "bench" and args.bench == "serve":
            from vidya.bench.serve import main as bench_serve_main
            return bench_serve_main(args)
        if args.command == "bench" and args.bench == "sweep":
            from vidya.bench.sweep import main as sweep_main
            return sweep_main(args)
        if args.command == "plan":
            from vidya.bench.plan import main as plan_main
            return plan_main(args)
    except ValueError as e:  # user-fixable: bad flag values, model not found, ...
        print(f"vidya: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
