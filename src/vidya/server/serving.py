"""Chat and text completions: a validated request -> engine requests -> OpenAI response objects,
whole or streamed as Server-Sent Events.

Tokenizing and applying the chat template run in a worker thread, never on the event loop and
never in the engine's step loop. Every check that can fail (model name, template, context
length, sampling values) runs before a stream starts, so a stream never begins with an error.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from vidya.engine.async_llm import AsyncLLM, EngineDeadError, RequestStream
from vidya.engine.scheduler import ContextLengthExceeded
from vidya.outputs import CompletionOutput, RequestOutput
from vidya.sampling_params import SamplingParams
from vidya.server.errors import APIError, bad_request
from vidya.server.protocol import ChatCompletionRequest, CompletionRequest


@dataclass(slots=True)
class Job:
    """One engine request behind a response: its prompt ids, and where its choices go."""
    prompt_ids: list[int]
    prompt_text: str
    params: SamplingParams
    first_index: int  # choice index of its first sample


@dataclass(slots=True)
class Submitted:
    """A response's jobs, handed to the engine, each with its stream of outputs."""
    jobs: list[Job]
    streams: list[RequestStream]

    def close(self) -> None:
        """Abort whichever of them has not finished; however the response ended, this runs."""
        for stream in self.streams:
            stream.close()


class Serving:
    def __init__(self, llm: AsyncLLM, model_names: list[str], max_tokens_default: int | None,
                 max_sequences: int = 128, max_logprob_entries: int = 1 << 18) -> None:
        self.llm = llm
        self.engine = llm.engine
        self.model_names = model_names
        self.max_tokens_default = max_tokens_default
        self.max_sequences = max_sequences  # sequences one request may start (n x prompts)
        self.max_logprob_entries = max_logprob_entries  # sequences x max_tokens x (1 + top logprobs)

    # ---- preparing ---------------------------------------------------------------------------
    def model_name(self, asked: str | None) -> str:
        if asked is None or asked in self.model_names:
            return asked or self.model_names[0]
        raise APIError(404, f"The model '{asked[:200]}' does not exist; this server serves "
                       f"{', '.join(self.model_names)}", param="model", code="model_not_found")

    def _max_tokens(self, asked: int | None, num_prompt: int, fallback: int | None) -> int | None:
        if asked is not None:
            return asked
        default = self.max_tokens_default or fallback
        room = self.engine.max_model_len - num_prompt
        return min(default, room) if default and room >= 1 else None

    def _check_sequences(self, num: int, param: str) -> None:
        if num > self.max_sequences:
            raise bad_request(f"this request would start {num} sequences; this server allows at most "
                              f"{self.max_sequences} per request (n times the number of prompts)", param=param)

    def _job(self, ids: list[int], text: str, req, asked_max: int | None, fallback: int | None,
             logprobs: int | None, first_index: int, prompt_param: str, num_jobs: int = 1) -> Job:
        params = req.sampling_params(self._max_tokens(asked_max, len(ids), fallback), logprobs,
                                     self.engine.sampling_defaults)
        try:
            max_tokens = self.engine.validate(ids, params)
        except ContextLengthExceeded as e:
            raise bad_request(str(e), param=prompt_param, code="context_length_exceeded") from None
        except ValueError as e:
            name = str(e).split(" ", 1)[0]
            raise bad_request(str(e), param=name if name in ("logit_bias", "stop_token_ids") else prompt_param) from None
        if logprobs is not None:
            entries = num_jobs * params.n * max_tokens * (1 + logprobs)
            if entries > self.max_logprob_entries:
                raise bad_request(
                    f"logprobs for {num_jobs * params.n} sequences x {max_tokens} tokens x {1 + logprobs} "
                    f"alternatives = {entries} entries, over this server's limit of {self.max_logprob_entries}; "
                    f"lower n, max_tokens or the number of top logprobs",
                    param="top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs")
        return Job(ids, text, params, first_index)

    async def chat_jobs(self, req: ChatCompletionRequest) -> list[Job]:
        self._check_sequences(req.n, "n")
        conversation = req.conversation()

        def render() -> tuple[str, list[int]]:
            text = self.engine.apply_chat_template(conversation, add_generation_prompt=req.add_generation_prompt,
                                                   **(req.chat_template_kwargs or {}))
            return text, self.engine.tokenizer(text, add_special_tokens=False).input_ids

        try:
            text, ids = await asyncio.to_thread(render)
        except ValueError as e:  # the template's own message
            raise bad_request(str(e), param="messages") from None
        return [self._job(ids, text, req, req.requested_max_tokens(), None, req.requested_logprobs(), 0, "messages")]

    async def completion_jobs(self, req: CompletionRequest) -> list[Job]:
        prompts = req.prompts()
        self._check_sequences(len(prompts) * req.n, "n" if len(prompts) == 1 else "prompt")

        def render(p: str | list[int]) -> tuple[str, list[int]]:
            if isinstance(p, str):
                return p, self.engine.encode(p)
            return self.engine.tokenizer.decode(p), list(p)

        jobs = []
        for i, p in enumerate(prompts):
            text, ids = await asyncio.to_thread(render, p)
            jobs.append(self._job(ids, text, req, req.max_tokens, 16, req.logprobs, i * req.n, "prompt", len(prompts)))
        return jobs

    # ---- running -----------------------------------------------------------------------------
    def submit(self, jobs: list[Job]) -> Submitted:
        """Hand the jobs to the engine at once (no await: see app.py's admission check)."""
        streams: list[RequestStream] = []
        try:
            for job in jobs:
                streams.append(self.llm.submit(job.prompt_ids, job.params))
        except BaseException as e:
            Submitted(jobs, streams).close()  # the ones already handed over
            if isinstance(e, EngineDeadError):
                raise APIError(503, str(e), code="engine_dead", headers={"Retry-After": "5"}) from None
            raise
        return Submitted(jobs, streams)

    async def run(self, sub: Submitted) -> AsyncIterator[tuple[Job, RequestOutput]]:
        """Read the jobs' streams concurrently; yield (job, output) as each advances. Closing this
        iterator (a client went away) aborts every job that has not finished."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(job: Job, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    await queue.put((job, out))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                await queue.put(e)
                return
            await queue.put(None)

        tasks = [asyncio.create_task(pump(j, s)) for j, s in zip(sub.jobs, sub.streams)]
        try:
            done = 0
            while done < len(tasks):
                item = await queue.get()
                if item is None:
                    done += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            sub.close()

    async def final_outputs(self, sub: Submitted) -> list[RequestOutput]:
        last: dict[int, RequestOutput] = {}
        try:
            async for job, out in self.run(sub):
                last[job.first_index] = out
        except EngineDeadError as e:
            raise APIError(503, str(e), code="engine_dead") from None
        return [last[j.first_index] for j in sub.jobs]


# ---- response objects -------------------------------------------------------------------------
def usage(jobs: list[Job], outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(j.prompt_ids) for j in jobs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def finish_reason(c: CompletionOutput) -> str | None:
    return c.finish_reason if c.finish_reason in ("stop", "length") else None


def chat_logprobs(entries, k: int, token_bytes, skip_special_tokens: bool = True) -> dict:
    """OpenAI's chat logprobs; `bytes` are each token's own raw bytes (token_bytes), so that
    they join into the content even where a token holds part of a character."""
    content = []
    for entry in entries:
        (tid, lp), *_ = entry.items()
        top = sorted(((i, x) for i, x in entry.items() if x.rank <= k), key=lambda ix: ix[1].rank)[:k]
        content.append({"token": lp.decoded_token, "logprob": lp.logprob,
                        "bytes": list(token_bytes(tid, skip_special_tokens)),
                        "top_logprobs": [{"token": t.decoded_token, "logprob": t.logprob,
                                          "bytes": list(token_bytes(i, skip_special_tokens))} for i, t in top]})
    return {"content": content}


def completion_logprobs(entries, k: int, offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for entry in entries:
        (tid, lp), *_ = entry.items()
        tokens.append(lp.decoded_token)
        token_lps.append(lp.logprob)
        tops.append({t.decoded_token: t.logprob for t in sorted(entry.values(), key=lambda x: x.rank) if t.rank <= k})
        offsets.append(offset)
        offset += len(lp.decoded_token)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_response(rid: str, model: str, jobs: list[Job], outputs: list[RequestOutput], token_bytes) -> dict:
    choices = []
    params = jobs[0].params
    for c in outputs[0].outputs:
        lps = chat_logprobs(c.logprobs, params.logprobs, token_bytes, params.skip_special_tokens) \
            if c.logprobs is not None else None
        choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": lps,
                        "finish_reason": finish_reason(c)})
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(jobs, outputs)}


def completion_response(rid: str, model: str, jobs: list[Job], outputs: list[RequestOutput], echo: bool) -> dict:
    choices = []
    for job, out in zip(jobs, outputs):
        prefix = job.prompt_text if echo else ""
        for c in out.outputs:
            lps = completion_logprobs(c.logprobs, job.params.logprobs, len(prefix)) if c.logprobs is not None else None
            choices.append({"index": job.first_index + c.index, "text": prefix + c.text, "logprobs": lps,
                            "finish_reason": finish_reason(c)})
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(jobs, outputs)}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"
