"""The scheduler is pure logic: drive it with random add / step / abort and a fake model, and
check every invariant after every step. Nothing is ever dropped or deadlocked. The KV cache is
drawn uniform or hybrid (a full-attention group beside sliding-window groups of drawn windows, or
sliding only): no block freed that a window still sees, none kept that no window sees, counts
conserved (KVCacheManager.check / check_request, after every step)."""
from __future__ import annotations

import random
import zlib

import pytest

from hypothesis import given, settings, strategies as st

from vidya.config import SchedulerConfig
from vidya.engine.kv_cache_manager import KVCacheManager
from vidya.engine.request import Request, RequestStatus
from vidya.engine.scheduler import Scheduler
from vidya.sampling_params import SamplingParams

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 12), st.integers(0, 3)),
        st.tuples(st.just("step"), st.integers(1, 4)),
        st.tuples(st.just("abort"), st.integers(0, 50)),
    ),
    max_size=60,
)


class FakeEngine:
    """The engine's loop over a fake model: a step's tokens are pseudo-random (7 stops a request
    that asked for it); with `ahead`, as the engine's async scheduling, the next step is planned
    before this one's tokens are applied, and applied a call later."""

    def __init__(self, sched: Scheduler, ahead: bool) -> None:
        self.sched, self.use_ahead, self.ahead = sched, ahead, None
        self.joins = None  # the waiting request that planning left room for: the next step admits it
        could_admit = sched._could_admit

        def recorded(*a):
            yes = could_admit(*a)
            self.joins = sched.waiting[0] if yes else None
            return yes
        sched._could_admit = recorded

    def step(self) -> None:
        joins, self.joins = self.joins, None
        out, self.ahead = (self.ahead, None) if self.ahead is not None else (self.sched.schedule(), None)
        if joins is not None and not joins.is_finished:  # (not aborted meanwhile)
            assert joins in self.sched.running, "planning was held back for a request that did not join"
        # a request's token depends on the request and its length only, as a model's would
        sampled = {s.request.request_id: 3 + zlib.crc32(f"{s.request.request_id}:{s.request.num_tokens}".encode()) % 17
                   for s in out.scheduled if s.samples}
        if self.use_ahead and out.scheduled:
            self.ahead = self.sched.schedule_ahead(out)
        self.sched.update_from_output(out, sampled)

    def check(self) -> None:
        self.sched.check(self.ahead)

    @property
    def busy(self) -> bool:
        return self.sched.has_unfinished or self.ahead is not None


windows = st.one_of(st.just((None,)), st.integers(1, 12).map(lambda w: (None, w, w)),
                    st.integers(1, 12).map(lambda w: (w,)), st.tuples(st.just(None), st.integers(1, 12)))


@settings(max_examples=160, deadline=None)
@given(ops=ops, block_size=st.integers(1, 5), num_blocks=st.integers(8, 40),
       budget=st.integers(1, 16), max_seqs=st.integers(1, 6), caching=st.booleans(), ahead=st.booleans(),
       threshold=st.integers(0, 6), windows=windows)
def test_random_add_step_abort_keeps_invariants(ops, block_size, num_blocks, budget, max_seqs, caching, ahead,
                                                threshold, windows):
    rng = random.Random(0)
    kv = KVCacheManager(num_blocks, block_size, caching, windows)
    sched = Scheduler(SchedulerConfig(max_seqs, budget, 64, threshold), kv)
    engine = FakeEngine(sched, ahead)
    added = []
    prefixes = [[rng.randrange(3, 20) for _ in range(12)] for _ in range(4)]
    for op in ops:
        if op[0] == "add":
            _, plen, max_tokens, family = op
            prompt = (prefixes[family] + [rng.randrange(3, 20) for _ in range(plen)])[:plen]
            stop = [7] if family == 3 else None  # a request that can stop on a token
            r = Request(f"r{len(added)}", prompt, SamplingParams(max_tokens=max_tokens, stop_token_ids=stop), None,
                        max_tokens)
            try:
                sched.add_request(r)
            except ValueError:
                assert plen + max_tokens > 64 or kv.max_blocks(plen + max_tokens, budget) > num_blocks
                continue
            added.append(r)
        elif op[0] == "step":
            for _ in range(op[1]):
                engine.step()
                engine.check()
        elif added:
            r = added[op[1] % len(added)]
            sched.finish_request(r.request_id, RequestStatus.FINISHED_ABORTED)
            engine.check()
    for _ in range(10_000):  # drain: every request finishes, no deadlock
        if not engine.busy:
            break
        engine.step()
        engine.check()
    assert not engine.busy
    for r in added:
        assert r.is_finished
        if r.status == RequestStatus.FINISHED_LENGTH:
            assert r.num_output_tokens == r.max_tokens
        elif r.status == RequestStatus.FINISHED_STOPPED:
            assert r.all_token_ids[-1] == 7 and 7 not in r.all_token_ids[r.num_prompt_tokens:-1]
    assert kv.pool.num_free_blocks == num_blocks


def test_out_of_blocks_with_nothing_to_preempt_queues():
    kv = KVCacheManager(4, 4)
    sched = Scheduler(SchedulerConfig(4, 64, 64), kv)
    a = Request("a", list(range(10)), SamplingParams(max_tokens=6), None, 6)
    b = Request("b", list(range(20, 30)), SamplingParams(max_tokens=6), None, 6)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["a"]  # b waits: no room
    assert list(sched.waiting) == [b]
    sched.update_from_output(out, {"a": 7})
    sched.check()


def test_preemption_takes_the_most_recent_and_keeps_its_output():
    kv = KVCacheManager(5, 2)
    sched = Scheduler(SchedulerConfig(4, 64, 64), kv)
    a = Request("a", [5, 6, 7], SamplingParams(max_tokens=5), None, 5)
    b = Request("b", [8, 9, 10], SamplingParams(max_tokens=5), None, 5)
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(3):
        FakeEngine(sched, ahead=False).step()
        sched.check()
    assert sched.num_preemptions >= 1
    assert b.num_preemptions >= 1 and a.num_preemptions == 0
    assert b.num_output_tokens >= 1  # kept across the preemption
    while sched.has_unfinished:
        FakeEngine(sched, ahead=False).step()
        sched.check()
    assert a.num_output_tokens == b.num_output_tokens == 5
    assert b.num_cached_tokens == 0, "recomputed tokens after preemption are not cache hits"


def test_request_that_can_never_fit_is_rejected_with_numbers():
    import pytest
    kv = KVCacheManager(4, 4)
    sched = Scheduler(SchedulerConfig(4, 64, 100), kv)
    over_pool = Request("a", list(range(10)), SamplingParams(max_tokens=10), None, 10)
    with pytest.raises(ValueError, match=r"needs 20 tokens .* holds 16"):
        sched.add_request(over_pool)
    over_context = Request("b", list(range(90)), SamplingParams(max_tokens=20), None, 20)
    with pytest.raises(ValueError, match=r"maximum context length is 100 .* requested 110"):
        sched.add_request(over_context)
    assert not sched.has_unfinished


def test_a_finished_request_leaves_and_a_waiting_one_joins_at_once():
    kv = KVCacheManager(8, 4)
    sched = Scheduler(SchedulerConfig(1, 64, 64), kv)  # room for one sequence at a time
    a = Request("a", [5, 6, 7], SamplingParams(max_tokens=1), None, 1)
    b = Request("b", [8, 9], SamplingParams(max_tokens=1), None, 1)
    sched.add_request(a)
    sched.add_request(b)
    first = sched.schedule()
    assert [s.request.request_id for s in first.scheduled] == ["a"]
    sched.update_from_output(first, {"a": 3})
    assert a.is_finished and kv.pool.num_free_blocks == 8
    second = sched.schedule()
    assert [s.request.request_id for s in second.scheduled] == ["b"]


def test_steps_planned_ahead_apply_as_the_steps_they_follow():
    """Async scheduling's bookkeeping alone: with every step planned ahead where it can be, each
    request gets the tokens and finish it gets step by step (a request stopped on a token has its
    planned row dropped), the blocks held cover the planned tokens, and all come back."""
    def run(ahead: bool):
        kv = KVCacheManager(40, 2)
        sched = Scheduler(SchedulerConfig(4, 64, 64), kv)
        engine, planned = FakeEngine(sched, ahead), []
        plan = sched.schedule_ahead
        sched.schedule_ahead = lambda prev: planned.append(plan(prev)) or planned[-1]
        reqs = [Request(f"r{i}", [3 + i, 4, 5], SamplingParams(max_tokens=n, stop_token_ids=[7] if i % 2 else None),
                        None, n) for i, n in enumerate((9, 14, 3, 20))]
        for r in reqs:
            sched.add_request(r)
        while engine.busy:
            engine.step()
            engine.check()
        assert kv.pool.num_free_blocks == 40
        return [(r.all_token_ids, r.status) for r in reqs], [p for p in planned if p is not None]
    (want, _), (got, planned) = run(False), run(True)
    assert got == want and len(planned) >= 5
    assert any(status == RequestStatus.FINISHED_STOPPED for _, status in got)  # a token stopped one


def test_planning_ahead_holds_back_only_for_a_request_that_then_joins():
    """Async scheduling declines to plan a step only when the first waiting request could join
    it (`Scheduler._could_admit`); FakeEngine asserts that it then does. Many small runs where
    requests share cached prefixes, end by length while others wait, and the pool is tight: the
    blocks that come back (only those no other request holds), the prefix hits that take a free
    block, seats and the token budget must all be counted as `_admit_waiting` counts them."""
    declined = 0
    for seed in range(1000):
        rng = random.Random(seed)
        bs = rng.randint(1, 4)
        w = rng.randint(1, 10)
        kv = KVCacheManager(rng.randint(6, 24), bs, True, rng.choice([(None,), (None,), (None, w), (None, w, w)]))
        sched = Scheduler(SchedulerConfig(rng.randint(2, 6), rng.randint(4, 24), 64, rng.choice([0, 0, 2, 5])), kv)
        engine = FakeEngine(sched, ahead=True)
        prefixes = [[rng.randrange(3, 20) for _ in range(3 * bs)] for _ in range(2)]
        n = 0
        for _ in range(40):
            if rng.random() < 0.4:
                prompt = prefixes[rng.randrange(2)] + [rng.randrange(3, 20) for _ in range(rng.randint(1, 2 * bs))]
                r = Request(f"r{n}", prompt, SamplingParams(max_tokens=rng.randint(1, 6)), None, 6)
                n += 1
                try:
                    sched.add_request(r)
                except ValueError:
                    continue
            engine.step()
            declined += engine.joins is not None
            engine.check()
        while engine.busy:
            engine.step()
            declined += engine.joins is not None
            engine.check()
    assert declined > 50, declined  # the case under test came up


def test_a_long_prompt_shares_its_steps_with_requests_that_come_after_it():
    """With `long_prefill_token_threshold`, a long prompt's chunk leaves room in every step for
    a request that arrives during its prefill: that one runs its prompt and decodes beside the
    long prefill instead of waiting for it to end (without the cap: the long prompt takes the
    whole budget until its last chunk)."""
    def run(threshold: int) -> tuple[list[int], int]:
        kv = KVCacheManager(64, 4)
        sched = Scheduler(SchedulerConfig(4, 16, 128, threshold), kv)
        long = Request("long", list(range(3, 83)), SamplingParams(max_tokens=2), None, 2)
        sched.add_request(long)
        chunks, short = [], None
        for step in range(100):
            if step == 1:
                short = Request("short", [5, 6, 7], SamplingParams(max_tokens=3), None, 3)
                sched.add_request(short)
            out = sched.schedule()
            chunks.append(next((s.num_new_tokens for s in out.scheduled if s.request is long), 0))
            sched.update_from_output(out, {s.request.request_id: 9 for s in out.scheduled if s.samples})
            sched.check()
            if short is not None and short.is_finished:
                return chunks, long.num_computed_tokens
        raise AssertionError("the short request never finished")
    chunks, long_done = run(threshold=4)
    assert chunks[0] == 4 and all(c <= 4 for c in chunks)
    assert long_done < 80  # the short request finished while the long prompt was still prefilling
    chunks, long_done = run(threshold=0)
    assert long_done >= 80  # without the cap it waited for the whole prefill


@pytest.mark.parametrize("threshold", [8, 0])
def test_the_engine_answers_a_short_request_during_a_long_prefill(tiny_models, threshold):
    """Through the engine (tiny Llama): a short request added after a long prompt's first step
    finishes while that prompt is still prefilling, with the cap; without it, only after. Either
    way every answer is the same greedy answer."""
    from conftest import make_engine
    from vidya import SamplingParams as SP
    engine = make_engine(tiny_models["llama"][0], max_num_batched_tokens=32, long_prefill_token_threshold=threshold)
    greedy = lambda n: SP(temperature=0.0, max_tokens=n, min_tokens=n)
    long = engine.add_request("long", list(range(5, 205)), greedy(3))
    outs = {o.request_id: o for o in engine.step()}
    engine.add_request("short", [5, 6, 7], greedy(3))
    long_tokens_when_short_ended = None  # the long prompt's answer so far: none while it prefills
    for _ in range(200):
        for o in engine.step():
            outs[o.request_id] = o
        if long_tokens_when_short_ended is None and outs.get("short") and outs["short"].finished:
            long_tokens_when_short_ended = len(outs["long"].outputs[0].token_ids) if long in outs else 0
        if not engine.has_unfinished_requests():
            break
    assert outs["long"].finished and outs["short"].finished
    assert (long_tokens_when_short_ended == 0) == bool(threshold), long_tokens_when_short_ended
    ref = make_engine(tiny_models["llama"][0])
    for rid, prompt in (("long", list(range(5, 205))), ("short", [5, 6, 7])):
        ref.add_request(rid, prompt, greedy(3))
    want = {}
    while ref.has_unfinished_requests():
        want.update({o.request_id: o for o in ref.step()})
    assert [outs[r].outputs[0].token_ids for r in ("long", "short")] == \
        [want[r].outputs[0].token_ids for r in ("long", "short")]
