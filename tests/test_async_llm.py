"""The asyncio wrapper: concurrent streams, early close aborts, errors before any stream."""
from __future__ import annotations

import asyncio

import pytest

from conftest import assert_all_blocks_free
from vidya import SamplingParams
from vidya.config import EngineArgs
from vidya.engine.async_llm import AsyncLLM


@pytest.fixture(scope="module", params=[False, True], ids=["step-by-step", "overlapped-outputs"])
def async_llm(tiny_models, request):
    """Also with the GPU's overlapped outputs (forced here): streams, aborts and errors the same."""
    llm = AsyncLLM(EngineArgs(model=tiny_models["llama"][0], dtype="float32", block_size=4,
                              show_progress=False, max_model_len=512, overlap_outputs=request.param))
    yield llm
    llm.shutdown()


def test_streams_grow_and_match_offline(async_llm):
    sp = SamplingParams(temperature=0, max_tokens=16, min_tokens=16)

    async def one(prompt):
        seen = []
        async for out in async_llm.generate(prompt, sp):
            seen.append(out.outputs[0])
        return seen

    async def main():
        return await asyncio.gather(*(one(p) for p in ["a b c", "The river", "प्रकाश", "x"]))

    results = asyncio.run(main())
    for seen in results:
        lengths = [len(s.token_ids) for s in seen]
        assert lengths[-1] == 16 and seen[-1].finish_reason == "length"
        if async_llm.engine.overlap_outputs:
            # a step's outputs come with the next step, and the last ones with a step that runs no
            # model: two can queue up at once, and a reader skips to the latest (outputs are
            # cumulative); each one it sees is longer than the one before
            assert len(seen) >= 8 and lengths == sorted(set(lengths)), lengths
        else:
            assert lengths == list(range(1, 17))
    offline = async_llm.engine
    assert not offline.has_unfinished_requests()
    assert_all_blocks_free(offline)


def test_closing_a_stream_aborts_and_frees(async_llm):
    async def main():
        agen = async_llm.generate("The river", SamplingParams(max_tokens=200, ignore_eos=True))
        async for out in agen:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await agen.aclose()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not async_llm.engine.has_unfinished_requests():
                return True
        return False

    assert asyncio.run(main())
    assert_all_blocks_free(async_llm.engine)


def test_invalid_request_fails_before_streaming(async_llm):
    async def main():
        async for _ in async_llm.generate("hi " * 400, SamplingParams(max_tokens=300)):
            pass

    with pytest.raises(ValueError, match="maximum context length"):
        asyncio.run(main())


def test_requests_arriving_together_share_the_first_step(async_llm):
    """An idle engine takes requests that arrive a few ms apart into one first step (a burst of
    chats at once is the tutor's morning), instead of stepping on the first alone."""
    sp = SamplingParams(temperature=0, max_tokens=4, min_tokens=4)
    engine = async_llm.engine
    before = engine.stats.num_steps

    async def one(prompt, delay):
        await asyncio.sleep(delay)
        return [out async for out in async_llm.generate(prompt, sp)][-1]

    async def main():
        return await asyncio.gather(*(one(f"word {i}", 0.003 * i) for i in range(5)))

    outs = asyncio.run(main())
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
    assert engine.stats.num_steps - before == 4, "all five should have run their four steps together"


def test_a_finished_answer_read_late_is_not_replaced_by_a_later_error(async_llm):
    """A drain that runs out of time fails the open streams; one whose request had already
    finished, its last output not yet read, still gets that output, not the error."""
    async def run():
        stream = async_llm.submit([5, 6, 7], SamplingParams(temperature=0, max_tokens=3, min_tokens=3))
        while async_llm.engine.has_unfinished_requests() or async_llm.num_waiting():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the finished output is on the stream's queue, unread
        async_llm.fail_open_requests("the server is shutting down")
        await asyncio.sleep(0.05)  # ...and the error behind it
        outs = [out async for out in stream]
        stream.close()
        return outs

    outs = asyncio.run(run())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3


def test_a_request_for_a_dead_engine_is_a_503_before_any_stream(tiny_models):
    """The server's Serving.submit (what a route calls once the queue's cap is checked) answers
    503 with Retry-After when the engine is not running, and leaves nothing registered."""
    from vidya.server.errors import APIError
    from vidya.server.serving import Job, Serving
    llm = AsyncLLM(EngineArgs(model=tiny_models["llama"][0], dtype="float32", show_progress=False, max_model_len=64))
    assert llm.shutdown()
    serving = Serving(llm, ["tiny"], None)
    jobs = [Job([5, 6, 7], "", SamplingParams(max_tokens=2), 0)]

    async def submit():
        return serving.submit(jobs)

    with pytest.raises(APIError) as e:
        asyncio.run(submit())
    assert e.value.status == 503 and e.value.headers == {"Retry-After": "5"}
    assert e.value.body()["error"]["code"] == "engine_dead" and not llm._streams
