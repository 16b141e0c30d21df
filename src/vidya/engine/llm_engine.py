"""The step-level engine: add requests, step, abort. The loop is three lines: schedule, run
the model, update from the output. Everything else lives in the parts it calls."""
from __future__ import annotations

import dataclasses
import functools
import itertools
import sys
import time

import torch

from vidya.config import EngineArgs
from vidya.engine.detokenizer import IncrementalDetokenizer, decoder_of
from vidya.engine.kv_cache_manager import KVCacheManager
from vidya.engine.cuda_graphs import decode_buckets
from vidya.engine.model_runner import ModelRunner, model_layout, num_kv_blocks, profile_forward
from vidya.engine.output_processor import RequestState, SampleState, update_sample
from vidya.engine.request import Request, RequestStatus
from vidya.engine.sampler import Sampler, SamplerOutput
from vidya.engine.scheduler import Scheduler
from vidya.engine.stats import EngineStats
from vidya.engine.token_bytes import TokenBytes
from vidya.models import loader, quant, registry
from vidya.outputs import RequestOutput
from vidya.ops import make_ops
from vidya.engine.prefix_waves import prefix_waves
from vidya.engine.tensor_parallel import (Cache, Load, Profile, Workers, init_group, refuse_in_a_starting_rank,
                                          shard_config, threads_per_rank)
from vidya.platform import Platform, TPGroup, resolve_device, resolve_platform
from vidya.sampling_params import SamplingParams


def engine_platform(args: EngineArgs) -> Platform:
    """The platform every rank of an engine with these arguments runs on: resolved once, by the
    caller that starts the engine (`vidya serve` before its port opens, else LLMEngine). A
    quantization the checkpoint has, or --quantization, is read here too (an unserved one fails
    here, before anything loads)."""
    qc = loader.load_quant(loader.resolve(args.model), args.quantization, resolve_device(args.device).type == "cuda")
    p = resolve_platform(args.device, args.dtype, args.backend, args.attention_backend,
                         tensor_parallel=args.tensor_parallel_size > 1,
                         quantization=qc.describe() if qc else None, kv_cache_dtype=args.kv_cache_dtype)
    return dataclasses.replace(p, quantization=served_quant(qc, p).describe()) if qc else p


def served_quant(qc, platform: Platform):
    """The quantization as `platform` runs it: with 8-bit activations where it multiplies in integers."""
    return quant.int8_activations(qc) if qc is not None and platform.int8_activations else qc


class LLMEngine:
    def __init__(self, args: EngineArgs, platform: Platform | None = None) -> None:
        """`platform`: engine_platform(args), where the caller resolved it already."""
        t0 = time.perf_counter()
        self.args = args
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        world = args.tensor_parallel_size
        if world > 1:
            refuse_in_a_starting_rank()
        self.platform = platform or engine_platform(args)
        self.device, self.dtype = self.platform.device, self.platform.dtype
        src = loader.resolve(args.model)
        self.quant = served_quant(loader.load_quant(src, args.quantization, self.device.type == "cuda"), self.platform)
        self.model_config = loader.load_config(src)
        shard = shard_config(self.model_config, world)  # this rank's part; refuses what does not divide
        self.tokenizer = loader.load_tokenizer(src, args.tokenizer)
        if args.chat_template:
            self.tokenizer.chat_template = loader.chat_template_of(args.chat_template)
        # what a server request's unset sampling fields default to (--generation-config)
        self.sampling_defaults = loader.sampling_defaults(src, args.generation_config)
        if self.sampling_defaults:
            self._log(f"sampling defaults from generation_config.json: {self.sampling_defaults} "
                      f"(--generation-config vllm: none)")
        self.decode = decoder_of(self.tokenizer)
        self.max_model_len = self._max_model_len(args.max_model_len)
        self._log(f"backend: {self.platform.describe()}")
        self.workers = None
        try:
            self._start(args, src, shard, world, t0)
        except BaseException:  # ranks already started must not outlive a start-up that failed
            if self.workers is not None:
                self.workers.close()
                self.workers = None
            raise

    def _start(self, args: EngineArgs, src, shard, world: int, t0: float) -> None:
        """Start the other ranks (if any), load, size the KV cache, capture graphs, build the
        scheduler: what __init__ does once the model's config and tokenizer are read."""
        tp = TPGroup()
        if world > 1:  # ranks 1..N-1 start now and load beside rank 0
            torch.set_num_threads(threads_per_rank(world))
            self.workers = Workers(args, world, self.platform)
            tp = init_group(0, world, self.workers.port, self.platform)
            self.workers.send(Load(self.max_model_len))
            self._log(f"tensor parallel: {world} ranks on torch.distributed ({self.platform.distributed_backend})")
        kind = 'dummy weights' if args.load_format == 'dummy' else 'GGUF' if src.is_gguf else 'safetensors'
        self._log(f"loading {args.model} ({kind}" + (f", {self.quant.describe()}" if self.quant else "") + ")")
        model = loader.load_model(src, shard, self.dtype, self.device, self.max_model_len,
                                  load_format=args.load_format, progress=args.show_progress, tp=tp, qc=self.quant)
        if self.workers is not None:
            self.workers.wait("loading")
        # (tied weights once; under tensor parallelism a shard's count times the ranks, norms included)
        self.num_parameters = sum(p.numel() for p in model.parameters()) * world
        cache = args.cache_config()
        sched_config = args.scheduler_config(self.max_model_len)
        layout = model_layout(model, cache.hybrid_kv_cache)
        # every sequence at max_model_len at once, each group holding what it keeps of one
        per_seq = KVCacheManager(1, cache.block_size, windows=layout.windows).max_blocks(
            self.max_model_len, sched_config.max_num_batched_tokens)
        max_useful = sched_config.max_num_seqs * per_seq
        self.ops = make_ops(self.platform)
        self.ops.tp = tp
        activations = 0
        if self.device.type == "cuda" and cache.num_gpu_blocks_override is None:
            profile = (sched_config.max_num_batched_tokens, self.max_model_len, sched_config.max_num_seqs,
                       cache.block_size, self.platform.kv_dtype, self.device)
            if self.workers is not None:
                self.workers.send(Profile(profile))
            activations = profile_forward(model, self.ops, shard, *profile)
            if self.workers is not None:
                self.workers.wait("profiling")
            self._log(f"profiling forward of {sched_config.max_num_batched_tokens} tokens: "
                      f"peak activations {activations / 2**30:.2f} GiB")
        self.profiled_activation_bytes = activations
        num_blocks = num_kv_blocks(cache, shard, self.platform.kv_dtype, self.device, max_useful, activations,
                                   layout.slots)
        if self.workers is not None:
            self.workers.send(Cache(num_blocks, cache))
        self.runner = ModelRunner(model, shard, cache, num_blocks, self.platform, self.ops, layout)
        if self.workers is not None:
            self.workers.wait("allocating the KV cache")
        self.runner.workers = self.workers
        if (self.device.type == "cuda" and self.platform.attention == "triton" and not args.enforce_eager
                and world == 1):  # (captured collectives across ranks: not yet)
            buckets = decode_buckets(sched_config.max_num_seqs)
            seconds = self.runner.capture_decode_graphs(buckets, -(-self.max_model_len // cache.block_size))
            self._log(f"captured {len(buckets)} CUDA graphs for decode batches of up to {buckets[-1]} in {seconds:.1f} s")
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching, layout.windows)
        self.kv_layout = layout
        self.scheduler = Scheduler(sched_config, self.kv)
        self.sampler = Sampler(args.seed, self.ops.first_max)
        self.eos_token_id = self.tokenizer.eos_token_id
        self.eos_token_ids = loader.end_token_ids(src, self.model_config, self.tokenizer)
        self.states: dict[str, RequestState] = {}
        self.sample_of: dict[str, tuple[RequestState, SampleState]] = {}
        self.stats = EngineStats()
        # a step's outputs are built while the next step runs on the device (GPU; off elsewhere,
        # where the forward runs on this thread and would only delay them by a step)
        self.overlap_outputs = (self.device.type == "cuda") if args.overlap_outputs is None else args.overlap_outputs
        self._pending = None  # the `_advance` result of the step whose outputs are still to build
        # the next step planned and launched before this one's tokens reached the host (greedy
        # decode batches), so the device need not wait for the host's part of a step
        wanted = (self.device.type == "cuda") if args.async_scheduling is None else args.async_scheduling
        self.async_scheduling = wanted and self.workers is None
        self._ahead = None  # (its SchedulerOutput, what runner.execute returned for it)
        self._ids = itertools.count()
        self._log(f"engine loaded in {time.perf_counter() - t0:.1f} s: {num_blocks} KV blocks of "
                  f"{cache.block_size} tokens, max_model_len {self.max_model_len}; KV cache {layout.describe()}, "
                  f"room for {self.kv_token_room()} tokens ({self.kv_sequences_at_max_len()} sequences of {self.max_model_len})")

    def kv_sequences_at_max_len(self) -> int:
        """Sequences of max_model_len tokens the KV cache holds at once while they decode."""
        return self.kv.num_blocks // self.kv.max_blocks(self.max_model_len, 1)

    def kv_token_room(self) -> int:
        """Tokens of context the KV cache holds: every block's tokens (uniform); for a hybrid
        cache, sequences of max_model_len decoding at once times their length."""
        if self.kv.is_hybrid:
            return self.kv_sequences_at_max_len() * self.max_model_len
        return self.kv.num_blocks * self.kv.block_size

    def kv_cache_info(self) -> dict:
        """The KV cache's layout, for /version: groups (each one's window, None for full
        attention), layers a block holds, blocks, block size, dtype, tokens of room."""
        return {"layout": self.kv_layout.describe(), "groups": list(self.kv.windows),
                "layers_per_block": self.kv_layout.slots, "num_blocks": self.kv.num_blocks,
                "block_size": self.kv.block_size, "dtype": self.platform.as_dict()["kv_cache_dtype"],
                "token_room": self.kv_token_room(), "sequences_at_max_model_len": self.kv_sequences_at_max_len()}

    def workers_alive(self) -> bool:
        return self.workers is None or self.workers.alive()

    def close(self, kill: bool = False) -> None:
        """Stop the tensor-parallel workers, if any (idempotent); `kill` when rank 0 cannot take
        part in one more collective (a step is stuck)."""
        if self.workers is not None:
            self.workers.close(kill)
            self.workers = None

    def _log(self, msg: str) -> None:
        if self.args.show_progress:
            print(f"vidya: {msg}", file=sys.stderr, flush=True)

    def _max_model_len(self, asked: int | None) -> int:
        limit = int(getattr(self.model_config, "max_position_embeddings", 2048) or 2048)
        window = getattr(self.model_config, "sliding_window", None)
        if (window and getattr(self.model_config, "use_sliding_window", True) is not False
                and not registry.model_class(self.model_config).implements_sliding_window):
            limit = min(limit, int(window))  # this family's sliding window is not implemented: stay inside it
        if asked is None:
            return limit
        if asked > limit:
            raise ValueError(f"max_model_len {asked} is larger than the model's context ({limit}); "
                             f"pass --max-model-len {limit} or less")
        return asked

    @functools.cached_property
    def token_bytes(self) -> TokenBytes:
        """token id -> its raw UTF-8 bytes (logprobs' `bytes`), built on first use."""
        return TokenBytes(self.tokenizer)

    # ---- requests --------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use completions with a plain prompt")
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **kwargs)
        except Exception as e:
            raise ValueError(f"chat template error: {e}") from None

    def validate(self, token_ids: list[int], params: SamplingParams) -> int:
        """Raise ValueError (with the numbers) for a request that cannot run; returns its
        resolved max_tokens. Reads configuration only, so any thread may call it."""
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if params.logit_bias and any(not 0 <= t < vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias keys must be token ids in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids in [0, {vocab})")
        max_tokens = params.max_tokens or max(1, self.max_model_len - len(token_ids))
        self.scheduler.check_fits(len(token_ids), max_tokens)
        return max_tokens

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(self, request_id: str | None, prompt: str | list[int],
                    params: SamplingParams | None = None, prompt_text: str | None = None) -> str:
        params = params or SamplingParams()
        request_id = request_id or self.new_request_id()
        if request_id in self.states:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            prompt_text, prompt = prompt, self.encode(prompt)
        token_ids = list(prompt)
        max_tokens = self.validate(token_ids, params)
        state = RequestState(request_id, prompt_text, token_ids, [])
        for i in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            child = Request(child_id, token_ids, params.for_child(i) if params.n > 1 else params,
                            self.eos_token_ids, max_tokens, arrival_time=state.arrival_time)
            detok = IncrementalDetokenizer.for_prompt(self.decode, token_ids, params.skip_special_tokens)
            sample = SampleState(i, child, detok, [] if params.logprobs is not None else None)
            state.samples.append(sample)
            self.sample_of[child_id] = (state, sample)
        self.states[request_id] = state
        # n > 1: the first sample computes the prompt; the others join once it has, sharing
        # its blocks through the prefix cache instead of computing the prompt n times.
        share = params.n > 1 and self.kv.enable_caching
        first, rest = state.samples[0].request, [s.request for s in state.samples[1:]]
        self.scheduler.add_request(first)
        if share:
            state.pending = rest
        else:
            for r in rest:
                self.scheduler.add_request(r)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Abort a request (all its samples) wherever it is; its blocks are free at once."""
        state = self.states.pop(request_id, None)
        if state is None:
            return False
        for s in state.samples:
            self.scheduler.finish_request(s.request.request_id, RequestStatus.FINISHED_ABORTED)
            self._forget(s)
            s.finish_reason = s.finish_reason or "abort"
            self.stats.finished_by_reason[s.finish_reason] += 1
        state.pending.clear()
        return True

    def _forget(self, sample: SampleState) -> None:
        self.sample_of.pop(sample.request.request_id, None)
        self.sampler.forget(sample.request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.states)

    # ---- the loop --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step: schedule, run the model, apply its tokens. With `overlap_outputs` (on a GPU)
        the previous step's outputs (detokenizing, stop strings, logprobs' text, RequestOutputs)
        are built while this step's forward runs on the device and returned now; this step's
        come with the next call (a step with nothing scheduled returns what is still pending)."""
        if self._ahead is not None and all(s.request.is_finished for s in self._ahead[0].scheduled):
            self._ahead = None  # every request of it stopped or was aborted: its result is not wanted
        if self._ahead is not None:  # planned and launched by the call before
            (sched, (out, requests, are_tokens)), self._ahead = self._ahead, None
        else:
            sched = self.scheduler.schedule()
            if sched.is_empty:
                return self._process_pending()
            self._record_queue_time(sched)
            out, requests, are_tokens = self.runner.execute(sched, argmax_only=Sampler.only_argmax)
        ready = None
        if self.async_scheduling and are_tokens:
            # this step's tokens start for the host before the next step is queued behind it
            host, ready = self.runner.to_host(out)
            self._launch_ahead(sched, out, requests)
            out = host
        previous = self._process_pending()
        if are_tokens:  # (the device work runs until this copy to the host: the overlap's window)
            if ready is not None:
                ready.synchronize()
            sampled = SamplerOutput(out.tolist(), [None] * len(requests))
        else:
            sampled = self.sampler(out, requests) if requests else None
        done = self._advance(sched, requests, sampled)
        if self.overlap_outputs:
            self._pending = done
            return previous
        return self._process(done)

    def _launch_ahead(self, sched, out: torch.Tensor, requests: list[Request]) -> None:
        """Plan the step after `sched` and launch it behind it on the device, its input tokens
        the ones `sched` samples (`out`, still on the device); nothing when the scheduler says the
        next step must be scheduled once this one's tokens are known."""
        if self.device.type == "cuda" and not self.runner.graph_holds(len(sched.scheduled)):
            return  # an eager step would wait for this one (its attention tiles cross to the device)
        nxt = self.scheduler.schedule_ahead(sched)
        if nxt is None:
            return
        row = {r.request_id: i for i, r in enumerate(requests)}
        src = [row[s.request.request_id] for s in nxt.scheduled]
        rows = None if src == list(range(len(src))) else self.runner.to_device(torch.tensor(src))
        self._ahead = (nxt, self.runner.execute(nxt, argmax_only=Sampler.only_argmax, inputs_from=(out, rows)))

    def _process_pending(self) -> list[RequestOutput]:
        done, self._pending = self._pending, None
        return self._process(done) if done is not None else []

    def _record_queue_time(self, sched) -> None:
        now = time.monotonic()
        for s in sched.scheduled:
            entry = self.sample_of.get(s.request.request_id)
            if entry is not None and entry[0].scheduled_time is None:
                entry[0].scheduled_time = now
                self.stats.queue_time.observe(now - entry[0].arrival_time)

    def _advance(self, sched, requests: list[Request], sampled) -> tuple[float, list[Request], dict]:
        """The scheduler's part of a step's result: tokens appended, requests at EOS, a stop token
        or their length finished (their blocks free for the next schedule). Returns what
        `_process` needs: the time, the requests that got a token, their logprobs."""
        tokens, logprobs = {}, {}
        if sampled is not None:
            tokens = {req.request_id: tok for req, tok in zip(requests, sampled.token_ids)}
            if any(lp is not None for lp in sampled.logprobs):
                logprobs = {req.request_id: lp for req, lp in zip(requests, sampled.logprobs)}
        advanced = self.scheduler.update_from_output(sched, tokens)
        self.stats.record_step(self.scheduler)
        for req in advanced:  # an n > 1 request's other samples join once the first has its prompt
            entry = self.sample_of.get(req.request_id)
            if entry is not None and entry[0].pending:
                for r in entry[0].pending:
                    self.scheduler.add_request(r, front=True)
                entry[0].pending = []
        return time.monotonic(), advanced, logprobs

    def _process(self, done: tuple[float, list[Request], dict]) -> list[RequestOutput]:
        """A step's outputs: each new token into its sample's text (a stop string there finishes
        the request), timings, and one RequestOutput per request that changed."""
        now, advanced, logprobs = done
        touched: dict[str, RequestState] = {}
        for req in advanced:
            entry = self.sample_of.get(req.request_id)
            if entry is None:  # aborted since the step ran (overlapped outputs)
                continue
            state, sample = entry
            if state.first_token_time is None:
                state.first_token_time = now
                self.stats.record_first_token(len(state.prompt_token_ids), now - state.arrival_time)
            self.stats.record_token(now - sample.last_token_time if sample.last_token_time else None)
            sample.last_token_time = now
            # (the request's last token still: the next step's are appended after this runs)
            if update_sample(sample, req.all_token_ids[-1], logprobs.get(req.request_id), self.tokenizer):
                self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_STOPPED)
                req.stop_reason = sample.stop_reason
            if req.status.finished:
                sample.finish_reason = req.status.finish_reason
                sample.stop_reason = req.stop_reason
                self._forget(sample)
            touched[state.request_id] = state
        outputs = []
        for state in touched.values():
            out = state.output()
            outputs.append(out)
            if out.finished:
                self.states.pop(state.request_id, None)
                self.stats.record_finished(state, now)
        return outputs

    def warm_prefix_cache(self, prompts: list[list[int]]) -> tuple[int, int]:
        """Compute these prompts' KV into the prefix cache now (e.g. the tutor's system prompts at
        start-up), so the first request that begins with one reuses its blocks. The blocks stay
        evictable like any cached block. Counters and histograms start from zero afterwards: this
        is not traffic. A prompt that could not run here (over max_model_len or the whole cache) is
        left out. Returns the number of prompt tokens now cached in full blocks and the number of
        prompts left out."""
        fit = [p for p in prompts if self._fits(len(p), 1)]
        left_out, prompts = len(prompts) - len(fit), fit
        if not self.kv.enable_caching or not prompts:
            return 0, left_out
        params = SamplingParams(temperature=0.0, max_tokens=1)
        for wave in prefix_waves(prompts, self.kv.block_size):
            ids = {self.add_request(None, p, params) for p in wave}
            while ids & set(self.states):
                self.step()
        self.stats = EngineStats()
        self.kv.prefix_queries = self.kv.prefix_hits = 0
        bs = self.kv.block_size
        return sum(len(p) // bs * bs for p in prompts), left_out

    def _fits(self, num_prompt_tokens: int, max_tokens: int) -> bool:
        try:
            self.scheduler.check_fits(num_prompt_tokens, max_tokens)
        except ValueError:
            return False
        return True

    def check(self) -> None:
        """Assert every invariant of the scheduler and the block pool."""
        self.scheduler.check(self._ahead[0] if self._ahead is not None else None)
