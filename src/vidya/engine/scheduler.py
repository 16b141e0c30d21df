"""Continuous batching under a token budget. Pure CPU logic: no tensors, no model.

Each step:
  1. running requests, in admission order, each catch up by as many tokens as the budget allows
     (1 for a decode, a chunk for a long prompt); when the pool is out of blocks, the most
     recently admitted running request is preempted (recompute) to make room;
  2. then waiting requests, front first, while budget, `max_num_seqs` and blocks last; a prefix
     hit is found before the chunk is sized.
A prompt's chunk is at most `long_prefill_token_threshold` tokens (vLLM's name): a long prompt
then leaves room in each step for the others (their decodes, and a prompt that arrives during
its prefill) instead of taking the budget until its prefill ends.
`update_from_output` applies the sampled tokens and finishes requests; their blocks go back to
the pool at once, so the next `schedule()` admits waiting requests into the freed room.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from vidya.config import SchedulerConfig
from vidya.engine.kv_cache_manager import KVCacheManager
from vidya.engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    block_ids: list[list[int]]  # one table per group of layers (KVCacheManager.group_block_ids)
    # the first position this step computes, where it was planned ahead (`schedule_ahead`: one
    # past the request's computed tokens then, its input the token the step before samples); -1:
    # the request's computed count when the step is prepared
    start: int = -1

    @property
    def samples(self) -> bool:
        """Whether this step reaches the request's last token, so a new token is sampled."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    num_scheduled_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class ContextLengthExceeded(ValueError):
    """Prompt + max_tokens do not fit the context window or the whole KV cache."""


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # ---- admission -------------------------------------------------------------------------
    def add_request(self, request: Request, front: bool = False) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.check_fits(request.num_prompt_tokens, request.max_tokens)
        self.requests[request.request_id] = request
        if front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Reject, with the numbers, a request that could never run to completion."""
        need = num_prompt_tokens + max_tokens
        if need > self.config.max_model_len:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.config.max_model_len} tokens. "
                f"However, you requested {need} tokens ({num_prompt_tokens} in the prompt, "
                f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.")
        blocks = self.kv.max_blocks(need, self.config.max_num_batched_tokens)
        if blocks > self.kv.num_blocks:
            raise ContextLengthExceeded(
                f"The request needs {need} tokens of KV cache ({num_prompt_tokens} prompt + "
                f"{max_tokens} max_tokens), {blocks} blocks of {self.kv.block_size}, but the whole cache holds "
                f"{self.kv.num_blocks * self.kv.block_size} ({self.kv.num_blocks} blocks). Raise the KV cache size "
                f"or lower max_tokens.")

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._chunk(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, n, self.kv.group_block_ids(req.request_id)))
                budget -= n
                i += 1
                continue
            break
        if not out.preempted:
            budget = self._admit_waiting(out, budget)
        out.num_scheduled_tokens = self.config.max_num_batched_tokens - budget
        return out

    def schedule_ahead(self, prev: SchedulerOutput) -> SchedulerOutput | None:
        """The step after `prev`, planned while `prev` runs, before its tokens are known (async
        scheduling): when `prev` decodes every running request and no waiting request could join
        the next step (none waits, or `max_num_seqs` are running, or the blocks its prompt needs
        would not be free even with those of the requests that end by length at `prev`), each
        request that cannot end by length at `prev` gets one more decode (its block allocated
        now, its input the token `prev` samples, which the runner takes on the device). A request
        that stops at `prev` on a token (EOS, a stop id or string) is found only after: its row of
        the planned step runs, and `update_from_output` drops it (a finished request is skipped;
        its seat and blocks come back a step later than without planning, so a request waiting
        for them joins a step later). None when the step must be scheduled normally (then nothing
        was allocated)."""
        live = [s for s in prev.scheduled if not s.request.is_finished]
        if not live or [s.request for s in live] != self.running:
            return None
        if any(s.num_new_tokens != 1 or not s.samples for s in live):
            return None
        out, need, freed = SchedulerOutput(), 0, set()
        ahead = []
        for s in live:
            r = s.request
            if r.num_output_tokens + 1 >= r.max_tokens or r.num_tokens + 1 >= self.config.max_model_len:
                # its token at `prev` is its last: the blocks no other request holds come back
                freed |= self.kv.blocks_freed_by(r.request_id)
                continue
            ahead.append(r)
            need += self.kv.num_new_blocks(r, 2)
        if not ahead or need > self.kv.pool.num_free_blocks:
            return None
        if self.waiting and self._could_admit(len(ahead), self.kv.pool.num_free_blocks - need, freed):
            return None  # it joins the next step, as without planning
        for r in ahead:
            if not self.kv.allocate_slots(r, 2):  # the token in flight and the one planned
                raise AssertionError("the pool had the blocks counted a moment ago")
            out.scheduled.append(ScheduledRequest(r, 1, self.kv.group_block_ids(r.request_id), r.num_computed_tokens + 1))
        out.num_scheduled_tokens = len(out.scheduled)
        return out

    def _could_admit(self, num_running: int, free_blocks: int, freed: set[int]) -> bool:
        """Whether the first waiting request could join a step beside `num_running` decodes with
        `free_blocks` free and the blocks `freed` coming back, as `_admit_waiting` would take it:
        a seat, the token budget, and the blocks of its first chunk (new ones, and its prefix hits
        that no request will hold: each takes a block off the free queue)."""
        budget = self.config.max_num_batched_tokens - num_running
        if num_running >= self.config.max_num_seqs or budget <= 0:
            return False
        req = self.waiting[0]
        hits, num_hit = self.kv.get_computed_blocks(req)
        n = self._chunk(req.num_tokens - num_hit, budget)
        return self.kv.num_new_blocks(req, n, hits, freed) <= free_blocks + len(freed)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        """Admit from the front of the queue; returns the budget left."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hits, num_hit = self.kv.get_computed_blocks(req)
            n = self._chunk(req.num_tokens - num_hit, budget)
            if not self.kv.allocate_slots(req, n, hits):
                break  # no room: it waits, in order, until blocks come back
            self.waiting.popleft()
            if req.num_cached_tokens < 0:  # count the first admission only, not recomputes
                req.num_cached_tokens = num_hit
                self.kv.record_prefix_query(req.num_tokens, num_hit)
            req.num_computed_tokens = num_hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n, self.kv.group_block_ids(req.request_id)))
            budget -= n
        return budget

    def _chunk(self, remaining: int, budget: int) -> int:
        """Tokens a request computes this step: what it has left, within the budget and the
        long-prefill threshold."""
        cap = self.config.long_prefill_token_threshold
        return min(remaining, budget, cap) if cap else min(remaining, budget)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- after the model ran ---------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed counts, append sampled tokens, finish requests that hit a limit.
        Returns the requests that got a new token this step."""
        advanced = []
        for s in out.scheduled:
            req = s.request
            if req.is_finished:  # aborted, or ended by a stop string found late (overlap), while the step ran
                continue
            req.num_computed_tokens += s.num_new_tokens
            token = sampled.get(req.request_id)
            if token is None:
                continue
            req.append_output_token(token)
            advanced.append(req)
            status = self._check_stop(req, token)
            if status is not None:
                self.finish_request(req.request_id, status)
        return advanced

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        sp = req.sampling_params
        num_tokens = len(req.all_token_ids)
        num_output = num_tokens - len(req.prompt_token_ids)
        if num_output >= sp.min_tokens:
            if not sp.ignore_eos and req.eos_token_ids and token in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if sp.stop_token_ids and token in sp.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if num_output >= req.max_tokens or num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Finish (or abort) a request wherever it is; frees its blocks. Idempotent."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        self.kv.free(req)
        return req

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def check(self, ahead: SchedulerOutput | None = None) -> None:
        """Every invariant between steps; `ahead`, a step planned ahead and still in flight, holds
        one more token's room for each of its requests."""
        self.kv.check()
        live = {r.request_id for r in self.running}
        assert set(self.kv.req_blocks) <= live, "a request that is not running holds blocks"
        extra = {s.request.request_id for s in ahead.scheduled} if ahead is not None else set()
        for r in self.running:
            assert r.status == RequestStatus.RUNNING
            # between steps a table covers exactly the computed tokens: only the last block is partial
            self.kv.check_request(r, r.num_computed_tokens + (r.request_id in extra))
        assert len(self.running) <= self.config.max_num_seqs
