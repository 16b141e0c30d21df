"""Per-request output state: detokenization, stop strings, logprobs, and the RequestOutput
objects handed to callers. One `RequestState` per user request; an n > 1 request has n samples.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from vidya.engine.detokenizer import IncrementalDetokenizer, find_stop, held_back
from vidya.engine.request import Request
from vidya.outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs


@dataclass(slots=True)
class SampleState:
    index: int
    request: Request
    detok: IncrementalDetokenizer
    logprobs: list[TokenLogprobs] | None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str = ""
    last_token_time: float | None = None

    def completion(self, stops: list[str]) -> CompletionOutput:
        text = self.text
        if self.finish_reason is None and stops:
            text = text[:len(text) - held_back(text, stops)]
        return CompletionOutput(
            index=self.index, text=text, token_ids=self.request.output_token_ids,  # (a fresh slice)
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason, stop_reason=self.stop_reason)


@dataclass(slots=True)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[SampleState]
    pending: list[Request] = field(default_factory=list)  # n > 1 samples not yet scheduled
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)

    def output(self) -> RequestOutput:
        first = self.samples[0].request
        stops = first.sampling_params.stop
        outputs = [s.completion(stops) for s in self.samples]
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
            outputs=outputs, finished=all(o.finish_reason is not None for o in outputs),
            num_cached_tokens=max(first.num_cached_tokens, 0),
            metrics={"arrival_time": self.arrival_time, "first_token_time": self.first_token_time or 0.0})


def update_sample(sample: SampleState, token_id: int, logprob, tokenizer) -> bool:
    """Fold one new token into a sample. Returns True when a stop string ended it."""
    req = sample.request
    sp = req.sampling_params
    if logprob is not None and sample.logprobs is not None:
        lp, rank, top = logprob
        entry: TokenLogprobs = {token_id: Logprob(lp, rank, tokenizer.decode([token_id]))}
        for r, (tid, val) in enumerate(top, start=1):
            entry.setdefault(tid, Logprob(val, r, tokenizer.decode([tid])))
        sample.logprobs.append(entry)
        sample.cumulative_logprob += lp
    delta = sample.detok.add([token_id])
    if req.status.finished:
        delta += sample.detok.flush()
    sample.text += delta
    if delta and sp.stop:
        hit = find_stop(sample.text, len(delta), sp.stop)
        if hit is not None:
            sample.text = sample.text[:hit[0] + (len(hit[1]) if sp.include_stop_str_in_output else 0)]
            sample.stop_reason = hit[1]
            return True
    return False
