"""Async scheduling (`--async-scheduling`, as vLLM's; on by default on a GPU): a greedy decode
step is planned and launched before the step before it has brought its tokens to the host, its
input tokens taken on the device, so a request that stops on a token (EOS, a stop id or string)
has one more row run, which is dropped. Turned on here on CPU, the engine must give exactly what
it gives without it: every output of every request in the same order, at the same step (but for
a waiting request that joins on the seat or blocks of one that stopped on a token: a step
later), and nothing left behind; the invariants (blocks held for the tokens computed, or
planned) hold after every step."""
from __future__ import annotations

import pytest
import torch

from conftest import make_engine
from vidya.llm import LLM
from vidya.sampling_params import SamplingParams

PROMPTS = ["The river flows", "Once upon a time", "Water is", "In the morning", "Numbers: 1, 2,", "Hello"]


def greedy_answer(d: str, prompt: str, n: int) -> list[int]:
    llm = LLM(d, dtype="float32", block_size=4, show_progress=False, max_model_len=512)
    return llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n), use_tqdm=False)[0].outputs[0].token_ids


def stream(engine, requests, abort_at: dict[int, str] | None = None):
    """Every output of every step() per request, checking the engine's invariants after each."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    seen: dict[str, list] = {}
    step = 0
    while engine.has_unfinished_requests():
        if abort_at and step in abort_at:
            engine.abort(abort_at[step])
        for o in engine.step():
            seen.setdefault(o.request_id, []).append(
                (step, [(c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs], o.finished))
        engine.check()
        step += 1
    return seen


def counted(engine) -> list[int]:
    """How many decode rows each step planned ahead had (the path under test ran)."""
    planned, plan = [], engine.scheduler.schedule_ahead

    def counting(prev):
        out = plan(prev)
        if out is not None:
            planned.append(len(out.scheduled))
        return out
    engine.scheduler.schedule_ahead = counting
    return planned


def requests(d: str):
    answer = greedy_answer(d, PROMPTS[2], 16)
    text = LLM(d, dtype="float32", block_size=4, show_progress=False, max_model_len=512).generate(
        [PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0].outputs[0].text
    stop = text[len(text) // 3:len(text) // 3 + 3]
    assert stop.strip(), f"no usable stop string in {text!r}"
    greedy = lambda **k: SamplingParams(temperature=0.0, **k)
    return [
        ("long", PROMPTS[1], greedy(max_tokens=30)),
        ("short", PROMPTS[3], greedy(max_tokens=3)),  # ends by length while others go on
        ("stop-id", PROMPTS[2], greedy(max_tokens=30, stop_token_ids=[answer[6]])),  # ends on a token mid-stream
        ("stop-string", PROMPTS[0], greedy(max_tokens=30, stop=[stop])),  # found while the next steps run
        ("one", PROMPTS[4], greedy(max_tokens=1)),
        ("ignore-eos", PROMPTS[5], greedy(max_tokens=17, ignore_eos=True)),
    ]


@pytest.mark.parametrize("overlap", [True, False])
def test_async_scheduling_gives_what_step_by_step_gives(tiny_models, overlap):
    d = tiny_models["llama"][0]
    reqs = requests(d)
    expected = stream(make_engine(d, backend="torch", overlap_outputs=overlap, async_scheduling=False), reqs)
    assert expected["stop-id"][-1][1][0][2] == "stop" and expected["stop-string"][-1][1][0][2] == "stop"
    engine = make_engine(d, backend="torch", overlap_outputs=overlap, async_scheduling=True)
    planned = counted(engine)
    got = stream(engine, reqs)
    assert got == expected
    assert sum(planned) > 50 and max(planned) == 5, planned  # it ran, over the batch (less "one") and its tail
    assert engine._ahead is None or all(s.request.is_finished for s in engine._ahead[0].scheduled)
    assert not engine.states and not engine.scheduler.running and not engine.kv.req_blocks


def test_sampled_requests_and_a_tiny_pool_fall_back_to_scheduling_after_the_tokens(tiny_models):
    """A step with a sampled (not greedy) request is never planned ahead; a pool too small for the
    planned step's blocks plans none (and allocates nothing); preemption then works as ever."""
    d = tiny_models["llama"][0]
    reqs = [(f"g{i}", p, SamplingParams(temperature=0.0, max_tokens=20)) for i, p in enumerate(PROMPTS)]
    reqs.append(("sampled", PROMPTS[0], SamplingParams(temperature=0.9, seed=3, max_tokens=6)))
    kw = dict(backend="torch", num_gpu_blocks_override=24)
    expected = stream(make_engine(d, async_scheduling=False, **kw), reqs)
    engine = make_engine(d, async_scheduling=True, **kw)
    planned = counted(engine)
    got = stream(engine, reqs)
    assert got == expected
    assert planned and engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("limit", [dict(max_num_seqs=2), dict(num_gpu_blocks_override=8)])
def test_steps_are_planned_while_requests_wait_that_could_not_join(tiny_models, limit):
    """More requests than `max_num_seqs`, or than the KV pool holds: while the running ones fill
    it, the waiting ones could not join the next step, so it is planned all the same; a request
    that ends by length frees its place (its seat, or its blocks) for the first waiting one at the
    step it would join without planning (the same outputs at the same steps). One that stops on a
    token is found a step late, so the next joins a step later: the same outputs, each request's
    in the same order."""
    d = tiny_models["llama"][0]
    by_length = [(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=10 + 2 * i))
                 for i, p in enumerate(PROMPTS)]
    kw = dict(backend="torch", **limit)
    expected = stream(make_engine(d, async_scheduling=False, **kw), by_length)
    engine = make_engine(d, async_scheduling=True, **kw)
    waited = []
    plan = engine.scheduler.schedule_ahead

    def planning(prev):
        out = plan(prev)
        if out is not None and engine.scheduler.waiting:
            waited.append(len(engine.scheduler.waiting))
        return out
    engine.scheduler.schedule_ahead = planning
    assert stream(engine, by_length) == expected
    assert len(waited) > 5, waited  # planned while others waited
    answer = greedy_answer(d, PROMPTS[2], 8)
    by_token = by_length[:2] + [("stop", PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=30,
                                                                     stop_token_ids=[answer[4]]))] + by_length[2:]
    want = stream(make_engine(d, async_scheduling=False, **kw), by_token)
    got = stream(make_engine(d, async_scheduling=True, **kw), by_token)
    assert want["stop"][-1][1][0][2] == "stop"
    drop_steps = lambda seen: {rid: [out for _, *out in outs] for rid, outs in seen.items()}
    assert drop_steps(got) == drop_steps(want)


def test_an_abort_with_a_step_planned_ahead_loses_nothing_else(tiny_models):
    d = tiny_models["llama"][0]
    reqs = [(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=12)) for i, p in enumerate(PROMPTS[:3])]
    expected = stream(make_engine(d, backend="torch", async_scheduling=False), reqs, abort_at={6: "r1"})
    engine = make_engine(d, backend="torch", async_scheduling=True)
    planned = counted(engine)
    got = stream(engine, reqs, abort_at={6: "r1"})
    assert got == expected and planned
    assert set(got) == {"r0", "r1", "r2"} and not got["r1"][-1][2]  # r1 never finished: aborted


def test_async_scheduling_is_on_by_default_on_a_gpu_only_and_the_cli_sets_it(tiny_models):
    """As vLLM's: on by default where it pays (a GPU, whose forward runs beside the host; on CPU
    the forward runs on the engine's own thread), `--async-scheduling` / `--no-async-scheduling`."""
    from vidya.cli import build_parser, engine_args
    assert make_engine(tiny_models["llama"][0], backend="torch").async_scheduling is False  # CPU
    parse = lambda *flags: engine_args(build_parser().parse_args(["serve", *flags])).async_scheduling
    assert parse() is None and parse("--async-scheduling") is True and parse("--no-async-scheduling") is False
    if torch.cuda.is_available():
        d = tiny_models["llama"][0]
        assert make_engine(d, device="cuda").async_scheduling is True
        assert make_engine(d, device="cuda", async_scheduling=False).async_scheduling is False


def test_a_planned_step_whose_requests_all_ended_is_dropped(tiny_models):
    """Every request aborted while a step planned for them is in flight: the next request is
    scheduled at once, not behind that dead step."""
    d = tiny_models["llama"][0]
    engine = make_engine(d, backend="torch", async_scheduling=True, overlap_outputs=False)
    for i, p in enumerate(PROMPTS[:2]):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=20))
    for _ in range(3):
        engine.step()
    assert engine._ahead is not None, "nothing planned ahead: the case is not tested"
    assert engine.abort("r0") and engine.abort("r1") and not engine.has_unfinished_requests()
    engine.check()
    engine.add_request("next", PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=1))
    outs = engine.step()  # its prompt runs in this very step: the dead one is dropped
    assert [o.request_id for o in outs] == ["next"] and outs[0].finished
    engine.check()
    assert not engine.kv.req_blocks
