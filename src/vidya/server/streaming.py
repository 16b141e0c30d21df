"""Server-Sent Event streams for chat and text completions, as OpenAI sends them:

    chat:  {delta: {role, content: ""}} per choice, then {delta: {content}} ..., then one
           {delta: {}, finish_reason} per choice, then (stream_options.include_usage) a chunk with
           choices [] and usage, then [DONE].
    text:  {text} ..., {text: "", finish_reason} per choice, usage chunk, [DONE].

Deltas are cut from the same text the non-streamed response returns (text that may still
become a stop string is held back by the engine), so the concatenated stream equals it.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from vidya.engine.async_llm import EngineDeadError
from vidya.outputs import CompletionOutput
from vidya.server.errors import APIError
from vidya.server.serving import (Serving, Submitted, chat_logprobs, completion_logprobs, finish_reason,
                                  sse, usage)


class _Cursor:
    """How much of one choice has been sent: characters of text, logprob entries, finished."""
    __slots__ = ("text", "logprobs", "done")

    def __init__(self) -> None:
        self.text = 0
        self.logprobs = 0
        self.done = False

    def advance(self, c: CompletionOutput) -> tuple[str, list | None]:
        delta = c.text[self.text:]
        new = None
        if c.logprobs is not None and (delta or c.finished):
            new = c.logprobs[self.logprobs:]
            self.logprobs = len(c.logprobs)
        self.text = len(c.text)
        return delta, new


async def _outputs(serving: Serving, sub: Submitted):
    """(choice index, CompletionOutput, job) as choices advance; the RequestOutputs at the end."""
    finals = {}
    async for job, out in serving.run(sub):
        finals[job.first_index] = out
        for c in out.outputs:
            yield job.first_index + c.index, c, job
    yield None, [finals[j.first_index] for j in sub.jobs], None


def _error_event(e: BaseException) -> str:
    err = e if isinstance(e, APIError) else APIError(503 if isinstance(e, EngineDeadError) else 500, str(e))
    return sse(err.body())


async def chat_stream(serving: Serving, rid: str, model: str, sub: Submitted,
                      include_usage: bool) -> AsyncIterator[str]:
    jobs = sub.jobs
    created = int(time.time())
    k = jobs[0].params.logprobs

    def chunk(index: int, delta: dict, lps=None, reason=None) -> str:
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": index, "delta": delta, "logprobs": lps, "finish_reason": reason}]})

    cursors = [_Cursor() for _ in range(jobs[0].params.n)]
    try:
        for i in range(len(cursors)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for index, c, _ in _outputs(serving, sub):
            if index is None:
                if include_usage:
                    yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                               "choices": [], "usage": usage(jobs, c)})
                break
            cur = cursors[index]
            if cur.done:
                continue
            delta, new = cur.advance(c)
            if delta or new:
                lps = chat_logprobs(new, k, serving.engine.token_bytes, jobs[0].params.skip_special_tokens) \
                    if new is not None else None
                yield chunk(index, {"content": delta}, lps)
            if c.finished and finish_reason(c):
                cur.done = True
                yield chunk(index, {}, None, finish_reason(c))
    except (EngineDeadError, APIError) as e:
        yield _error_event(e)
    yield sse("[DONE]")


async def completion_stream(serving: Serving, rid: str, model: str, sub: Submitted, echo: bool,
                            include_usage: bool) -> AsyncIterator[str]:
    jobs = sub.jobs
    created = int(time.time())

    def chunk(index: int, text: str, lps=None, reason=None) -> str:
        return sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": index, "text": text, "logprobs": lps, "finish_reason": reason}]})

    cursors: dict[int, _Cursor] = {}
    try:
        if echo:
            for job in jobs:
                for i in range(job.params.n):
                    yield chunk(job.first_index + i, job.prompt_text)
        async for index, c, job in _outputs(serving, sub):
            if index is None:
                if include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                               "choices": [], "usage": usage(jobs, c)})
                break
            cur = cursors.setdefault(index, _Cursor())
            if cur.done:
                continue
            start = (len(job.prompt_text) if echo else 0) + cur.text
            delta, new = cur.advance(c)
            if delta or new:
                lps = completion_logprobs(new, job.params.logprobs, start) if new is not None else None
                yield chunk(index, delta, lps)
            if c.finished and finish_reason(c):
                cur.done = True
                yield chunk(index, "", None, finish_reason(c))
    except (EngineDeadError, APIError) as e:
        yield _error_event(e)
    yield sse("[DONE]")
